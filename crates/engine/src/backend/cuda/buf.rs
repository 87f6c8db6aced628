//! The CUDA backend's buffer: bf16 for weights and activations, f32 for what accumulates
//! (gradients, optimiser state and master weights, log-probs and log-sum-exps).

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::bf16;

pub enum CudaBuf {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

impl CudaBuf {
    /// The bf16 values; an f32 buffer here is a bug in the caller (the op's contract names the
    /// precision of every argument), so it panics with both names.
    pub fn bf(&self) -> &CudaSlice<bf16> {
        match self {
            CudaBuf::Bf16(s) => s,
            CudaBuf::F32(_) => panic!("CUDA op expected a bf16 buffer and got an f32 one"),
        }
    }

    pub fn bf_mut(&mut self) -> &mut CudaSlice<bf16> {
        match self {
            CudaBuf::Bf16(s) => s,
            CudaBuf::F32(_) => panic!("CUDA op expected a bf16 buffer and got an f32 one"),
        }
    }

    pub fn f32(&self) -> &CudaSlice<f32> {
        match self {
            CudaBuf::F32(s) => s,
            CudaBuf::Bf16(_) => {
                panic!("CUDA op expected an f32 buffer (gradient or optimiser state) and got a bf16 one")
            }
        }
    }

    pub fn f32_mut(&mut self) -> &mut CudaSlice<f32> {
        match self {
            CudaBuf::F32(s) => s,
            CudaBuf::Bf16(_) => {
                panic!("CUDA op expected an f32 buffer (gradient or optimiser state) and got a bf16 one")
            }
        }
    }

    pub fn is_f32(&self) -> bool {
        matches!(self, CudaBuf::F32(_))
    }

    pub fn len(&self) -> usize {
        match self {
            CudaBuf::Bf16(s) => s.len(),
            CudaBuf::F32(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device address of element `offset` (for cuBLAS calls and the optimiser's tensor
    /// tables). The backend runs on one stream with event tracking off, so no event is needed.
    pub fn ptr_at(&self, stream: &CudaStream, offset: usize) -> u64 {
        match self {
            CudaBuf::Bf16(s) => s.device_ptr(stream).0 + (offset * 2) as u64,
            CudaBuf::F32(s) => s.device_ptr(stream).0 + (offset * 4) as u64,
        }
    }

    pub fn ptr(&self, stream: &CudaStream) -> u64 {
        self.ptr_at(stream, 0)
    }
}
