//! The CUDA backend: bf16 weights and activations with f32 accumulation, hand-written kernels
//! (`crates/engine/kernels/*.cu`, compiled by NVRTC at run time, see [`nvrtc`]) and cuBLAS for
//! the GEMMs.
//!
//! The same binary runs with or without a GPU: [`libs::probe`] looks for the libraries before
//! any cudarc call (cudarc panics when one is missing), and [`CudaBackend::new`] fails with a
//! clear error where there is no driver or device. It serves inference (prefill, decode,
//! sampling; this file) and training ([`super::TrainBackend`] in `train.rs`: the backward
//! kernels, fused log-prob and LoRA, f32 master weights and the multi-tensor AdamW).
//!
//! Ops are infallible in the [`Backend`] trait; a CUDA error inside one (a failed launch, an
//! exhausted device memory) panics with the op's name and the driver's message.

pub mod buf;
pub mod libs;
pub mod nvrtc;
mod train;

pub use buf::CudaBuf;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;

use super::cpu::CpuBackend;
use super::{Backend, HostTensor, SamplingParams, StepMeta};

/// Number of CUDA devices, 0 when the driver or a device is missing.
pub fn device_count() -> usize {
    if !libs::probe().driver.present() {
        return 0;
    }
    CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

/// The kernel functions the backend launches, named once: the `Kernels` fields, the
/// `KERNEL_FUNCTIONS` list (file, function) the compile test checks, and the loader.
macro_rules! kernels {
    ($($field:ident: $file:literal / $func:literal,)*) => {
        /// Every kernel function the backend launches, with its file.
        pub const KERNEL_FUNCTIONS: &[(&str, &str)] = &[$(($file, $func)),*];

        /// Kernel functions, looked up once.
        struct Kernels {
            $($field: CudaFunction,)*
        }

        impl Kernels {
            fn load(modules: &std::collections::HashMap<&str, Arc<CudaModule>>) -> Result<Self> {
                Ok(Self {
                    $($field: modules[$file]
                        .load_function($func)
                        .with_context(|| format!("kernel {} in {}.cu", $func, $file))?,)*
                })
            }
        }
    };
}

kernels! {
    embedding: "embedding" / "embedding",
    gather_rows: "embedding" / "gather_rows",
    rmsnorm: "rmsnorm" / "rmsnorm",
    rope: "rope" / "rope",
    swiglu: "elementwise" / "swiglu",
    add_assign: "elementwise" / "add_assign",
    scale: "elementwise" / "scale",
    fill_rows: "elementwise" / "fill_rows",
    dropout: "elementwise" / "dropout",
    fill_uniform: "elementwise" / "fill_uniform",
    kv_store: "kv_cache" / "kv_store",
    softmax: "softmax" / "softmax",
    flash_d64: "flash_attn" / "flash_prefill_d64",
    flash_d128: "flash_attn" / "flash_prefill_d128",
    decode_d64: "decode_attn" / "decode_partial_d64",
    decode_d128: "decode_attn" / "decode_partial_d128",
    decode_combine: "decode_attn" / "decode_combine",
    attention_generic: "attention_generic" / "attention_generic",
    sample: "sampling" / "sample",
    // Training (train.rs).
    embedding_bwd: "embedding" / "embedding_bwd",
    rmsnorm_bwd: "rmsnorm" / "rmsnorm_bwd",
    rope_bwd: "rope" / "rope_bwd",
    swiglu_bwd: "elementwise" / "swiglu_bwd",
    scale_f32: "elementwise" / "scale_f32",
    add_assign_f32: "elementwise" / "add_assign_f32",
    cast_f32_bf16: "elementwise" / "cast_f32_bf16",
    bias_grad: "elementwise" / "bias_grad",
    attn_train_fwd_generic: "attention_train_generic" / "attn_train_fwd_generic",
    attn_train_bwd_generic: "attention_train_generic" / "attn_train_bwd_generic",
    flash_train_fwd_d64: "flash_attn_train" / "flash_train_fwd_d64",
    flash_train_fwd_d128: "flash_attn_train" / "flash_train_fwd_d128",
    flash_train_bwd_pre: "flash_attn_train" / "flash_train_bwd_pre",
    flash_train_bwd_d64: "flash_attn_train" / "flash_train_bwd_d64",
    flash_train_bwd_d128: "flash_attn_train" / "flash_train_bwd_d128",
    logprob_chunk_fwd: "logprob" / "logprob_chunk_fwd",
    logprob_finish: "logprob" / "logprob_finish",
    logprob_chunk_bwd: "logprob" / "logprob_chunk_bwd",
    sum_squares_multi: "optimizer" / "sum_squares_multi",
    sum_squares_bf16: "optimizer" / "sum_squares_bf16",
    adamw_multi: "optimizer" / "adamw_multi",
}

/// How [`CudaBackend::attention`] runs, for tests and benchmarks that pin one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// Tensor-core flash attention for prefill rows and split decode for single new rows, where
    /// the head dim is 64 or 128; the generic kernel otherwise.
    Auto,
    /// The generic one-warp-per-row kernel for every row.
    Generic,
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    arch: String,
    sms: usize,
    device_name: String,
    attention_path: std::sync::Mutex<AttentionPath>,
    /// NVTX ranges around ops (for Nsight), when enabled and libnvToolsExt is present.
    nvtx: std::sync::atomic::AtomicBool,
    /// Kernel files compiled by NVRTC this run (the others came from the disk cache).
    pub compiled_now: Vec<String>,
}

/// The step metadata on the device, plus the host-side counts that size the launches.
pub struct CudaMeta {
    rows: usize,
    tokens: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    logit_rows: CudaSlice<i32>,
    n_logit_rows: usize,
    row_seq: CudaSlice<i32>,
    seq_row_start: CudaSlice<i32>,
    seq_n_new: CudaSlice<i32>,
    seq_n_ctx: CudaSlice<i32>,
    seq_bt_off: CudaSlice<i32>,
    block_tables: CudaSlice<i32>,
    block_size: usize,
    /// Prefill tiles (sequence, first query) over sequences with more than one new row.
    tiles: CudaSlice<i32>,
    n_tiles: usize,
    /// Sequences with exactly one new row, and their longest context.
    decode_seqs: CudaSlice<i32>,
    n_decode: usize,
    max_decode_ctx: usize,
    /// Every 64-row chunk (sequence, first row) of every sequence: the query tiles of the
    /// training forward and the key tiles of its backward. Uploaded at the first training
    /// attention, so that inference steps do not pay for it.
    train_tiles_host: Vec<i32>,
    train_tiles: std::sync::OnceLock<CudaSlice<i32>>,
    n_train_tiles: usize,
}

impl CudaMeta {
    fn train_tiles(&self, be: &CudaBackend) -> &CudaSlice<i32> {
        self.train_tiles.get_or_init(|| be.upload_i32(&self.train_tiles_host))
    }
}

/// Rows per flash-attention tile (BR in flash_attn.cu).
const FLASH_ROWS: usize = 64;
/// Largest query-head group the split decode kernel serves (MAX_GROUP in decode_attn.cu).
const DECODE_MAX_GROUP: usize = 16;

fn check<T, E: std::fmt::Debug>(what: &str, r: std::result::Result<T, E>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("CUDA error in {what}: {e:?}"),
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads from the cache) every kernel for its architecture
    /// and creates the cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<Self> {
        let libs = libs::probe();
        if !libs.driver.present() {
            bail!("no CUDA driver (libcuda.so) was found on this machine: run with --device cpu");
        }
        for (name, found, wheel) in [
            ("NVRTC", &libs.nvrtc, "nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12"),
            ("cuBLAS", &libs.cublas, "nvidia-cublas-cu12"),
            ("cuBLASLt", &libs.cublaslt, "nvidia-cublas-cu12"),
        ] {
            if !found.present() {
                bail!(
                    "the CUDA driver is present but {name} was not found: install the CUDA toolkit, or \
                     `pip install --target {} {wheel}` (PyTorch's environment has it too), or point \
                     PROTEGE_CUDA_LIBS at the directory holding it",
                    libs::wheel_dir().display()
                );
            }
        }
        let count = device_count();
        if ordinal >= count {
            bail!("CUDA device {ordinal} does not exist ({count} found)");
        }
        let ctx = CudaContext::new(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))?;
        let (major, minor) = ctx.compute_capability().context("reading the compute capability")?;
        if major < 8 {
            bail!("protege's CUDA kernels need bf16 tensor cores (compute capability 8.0+); device {ordinal} is {major}.{minor}");
        }
        let arch = format!("sm_{major}{minor}");
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(1)
            .max(1) as usize;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        // One stream: the per-buffer events cudarc records for cross-stream safety are not needed.
        // SAFETY: every op of this backend runs on the context's default stream.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        let stream = ctx.default_stream();
        let includes = libs::include_dirs();
        let mut compiled_now = vec![];
        let mut modules = std::collections::HashMap::new();
        for (file, _) in nvrtc::KERNEL_FILES {
            let (image, cached) = nvrtc::compile_cached(file, &arch, &includes)?;
            if !cached {
                compiled_now.push(file.to_string());
            }
            let module = match ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image)) {
                Ok(m) => m,
                // A damaged or stale cache entry: compile afresh once.
                Err(_) if cached => {
                    let fresh = nvrtc::compile(file, &arch, &includes)?;
                    nvrtc::store_cached(file, &arch, &fresh.image);
                    compiled_now.push(file.to_string());
                    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(fresh.image))
                        .with_context(|| format!("loading the compiled {file}.cu on {arch}"))?
                }
                Err(e) => return Err(e).with_context(|| format!("loading the compiled {file}.cu on {arch}")),
            };
            modules.insert(*file, module);
        }
        let k = Kernels::load(&modules)?;
        let blas = CudaBlas::new(stream.clone()).context("creating the cuBLAS handle")?;
        Ok(Self {
            ctx,
            stream,
            blas,
            k,
            arch,
            sms,
            device_name,
            attention_path: std::sync::Mutex::new(AttentionPath::Auto),
            nvtx: std::sync::atomic::AtomicBool::new(
                std::env::var_os("PROTEGE_NVTX").is_some_and(|v| v == "1") && libs.nvtx.present(),
            ),
            compiled_now,
        })
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for every queued op (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("synchronising the CUDA stream")
    }

    /// Returns the memory pool's cached free memory to the driver (e.g. before another process
    /// — the PyTorch side of a benchmark — needs the device memory).
    pub fn release_cached_memory(&self) -> Result<()> {
        use cudarc::driver::sys;
        self.synchronize()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: valid out-pointer and device; trimming only releases unused pool memory.
        unsafe {
            if sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS {
                sys::cuMemPoolTrimTo(pool, 0);
            }
        }
        Ok(())
    }

    pub fn set_attention_path(&self, p: AttentionPath) {
        *self.attention_path.lock().unwrap() = p;
    }

    /// Turns NVTX ranges around every op on or off; returns whether they are on (they need
    /// libnvToolsExt, which the CUDA toolkit and PyTorch's nvidia-nvtx wheel provide).
    pub fn set_nvtx(&self, on: bool) -> bool {
        let on = on && libs::probe().nvtx.present();
        self.nvtx.store(on, std::sync::atomic::Ordering::Relaxed);
        on
    }

    /// An NVTX range that ends when dropped, or nothing when NVTX is off.
    pub fn range(&self, name: &str) -> Option<cudarc::nvtx::safe::Range> {
        self.nvtx.load(std::sync::atomic::Ordering::Relaxed).then(|| cudarc::nvtx::safe::scoped_range(name))
    }

    /// `n` values uniform in `(-scale, scale)`, made on the device from `seed`.
    pub fn random(&self, n: usize, scale: f32, seed: u64) -> CudaBuf {
        let mut x = self.zeros(n);
        let nn = n as i64;
        let mut b = self.stream.launch_builder(&self.k.fill_uniform);
        b.arg(x.bf_mut()).arg(&nn).arg(&scale).arg(&seed);
        check("fill_uniform", unsafe { b.launch(self.elementwise_cfg(n)) });
        x
    }

    fn upload_i32(&self, v: &[i32]) -> CudaSlice<i32> {
        // Empty arrays still get one element: kernels never read it, and a zero-byte
        // allocation is an error for the driver.
        let data: &[i32] = if v.is_empty() { &[0] } else { v };
        check("uploading step metadata", self.stream.clone_htod(data))
    }

    /// Grid for a grid-stride elementwise kernel over `n` values.
    fn elementwise_cfg(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.sms * 16);
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    fn rows_cfg(rows: usize, threads: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
    }

    /// Threads for a one-block-per-row kernel over `dim` values.
    fn row_threads(dim: usize) -> usize {
        dim.next_power_of_two().clamp(32, 1024)
    }
}

/// Lets the device's default memory pool keep freed memory instead of returning it to the
/// driver at every synchronisation, so that per-step activations are cheap to allocate.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: valid out-pointer and device; failure only means the default threshold stays.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS {
            let mut threshold = u64::MAX;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Meta = CudaMeta;

    fn name(&self) -> String {
        format!("cuda:{} ({}, {}, bf16)", self.ctx.ordinal(), self.device_name, self.arch)
    }

    fn compute_bytes(&self) -> usize {
        2
    }

    fn sync(&self) {
        check("synchronising the CUDA stream", self.stream.synchronize());
    }

    fn memory_info(&self) -> Option<(u64, u64)> {
        self.ctx.bind_to_thread().ok()?;
        cudarc::driver::result::mem_get_info().ok().map(|(free, total)| (free as u64, total as u64))
    }

    fn zeros(&self, n: usize) -> CudaBuf {
        CudaBuf::Bf16(check("allocating device memory", self.stream.alloc_zeros::<bf16>(n.max(1))))
    }

    fn zeros_f32(&self, n: usize) -> CudaBuf {
        CudaBuf::F32(check("allocating device memory", self.stream.alloc_zeros::<f32>(n.max(1))))
    }

    fn upload_f32(&self, data: &[f32]) -> CudaBuf {
        let host: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        if host.is_empty() {
            return self.zeros(1);
        }
        CudaBuf::Bf16(check("uploading", self.stream.clone_htod(&host)))
    }

    fn upload_f32_full(&self, data: &[f32]) -> CudaBuf {
        if data.is_empty() {
            return self.zeros_f32(1);
        }
        CudaBuf::F32(check("uploading", self.stream.clone_htod(data)))
    }

    fn write_f32(&self, dst: &mut CudaBuf, data: &[f32]) {
        if data.is_empty() {
            return;
        }
        assert!(dst.len() >= data.len(), "write_f32: {} values into a buffer of {}", data.len(), dst.len());
        match dst {
            CudaBuf::Bf16(d) => {
                let host: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
                check("uploading", self.stream.memcpy_htod(&host, &mut d.slice_mut(..data.len())));
            }
            CudaBuf::F32(d) => check("uploading", self.stream.memcpy_htod(data, &mut d.slice_mut(..data.len()))),
        }
    }

    fn upload(&self, t: &HostTensor) -> Result<CudaBuf> {
        // The CPU backend's checked, parallel dtype conversion; bf16 -> f32 -> bf16 is exact.
        let host: Vec<bf16> = CpuBackend::new().upload(t)?.into_iter().map(bf16::from_f32).collect();
        if host.is_empty() {
            return Ok(self.zeros(1));
        }
        Ok(CudaBuf::Bf16(self.stream.clone_htod(&host).context("copying a tensor to the GPU")?))
    }

    fn to_f32(&self, buf: &CudaBuf) -> Vec<f32> {
        match buf {
            CudaBuf::Bf16(s) => {
                check("copying to the host", self.stream.clone_dtoh(s)).into_iter().map(|v| v.to_f32()).collect()
            }
            CudaBuf::F32(s) => check("copying to the host", self.stream.clone_dtoh(s)),
        }
    }

    fn prepare(&self, meta: &StepMeta) -> CudaMeta {
        let i = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let mut row_seq = vec![0i32; meta.rows()];
        let (mut starts, mut n_new, mut n_ctx, mut bt_off, mut bts) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut tiles, mut decode, mut max_decode_ctx) = (vec![], vec![], 0usize);
        let mut train_tiles = vec![];
        for (s, seq) in meta.seqs.iter().enumerate() {
            row_seq[seq.row_start..seq.row_start + seq.n_new].fill(s as i32);
            starts.push(seq.row_start as i32);
            n_new.push(seq.n_new as i32);
            n_ctx.push(seq.n_ctx as i32);
            bt_off.push(bts.len() as i32);
            bts.extend(seq.block_table.iter().map(|&b| b as i32));
            for t0 in (0..seq.n_new).step_by(FLASH_ROWS) {
                train_tiles.extend([s as i32, t0 as i32]);
            }
            if seq.n_new == 1 {
                assert!(seq.n_ctx >= 1, "a decode row needs its own key in the cache (n_ctx >= 1)");
                decode.push(s as i32);
                max_decode_ctx = max_decode_ctx.max(seq.n_ctx);
            } else {
                for q0 in (0..seq.n_new).step_by(FLASH_ROWS) {
                    tiles.push(s as i32);
                    tiles.push(q0 as i32);
                }
            }
        }
        CudaMeta {
            rows: meta.rows(),
            tokens: self.upload_i32(&i(&meta.tokens)),
            positions: self.upload_i32(&i(&meta.positions)),
            slots: self.upload_i32(&i(&meta.slots)),
            logit_rows: self.upload_i32(&i(&meta.logit_rows)),
            n_logit_rows: meta.logit_rows.len(),
            row_seq: self.upload_i32(&row_seq),
            seq_row_start: self.upload_i32(&starts),
            seq_n_new: self.upload_i32(&n_new),
            seq_n_ctx: self.upload_i32(&n_ctx),
            seq_bt_off: self.upload_i32(&bt_off),
            block_tables: self.upload_i32(&bts),
            block_size: meta.block_size.max(1),
            n_tiles: tiles.len() / 2,
            tiles: self.upload_i32(&tiles),
            n_decode: decode.len(),
            decode_seqs: self.upload_i32(&decode),
            max_decode_ctx,
            n_train_tiles: train_tiles.len() / 2,
            train_tiles_host: train_tiles,
            train_tiles: std::sync::OnceLock::new(),
        }
    }

    fn embedding(&self, table: &Self::Buf, meta: &CudaMeta, out: &mut Self::Buf, dim: usize) {
        let _r = self.range("embedding");
        if meta.rows == 0 {
            return;
        }
        let dim = dim as i32;
        let mut b = self.stream.launch_builder(&self.k.embedding);
        b.arg(table.bf()).arg(&meta.tokens).arg(out.bf_mut()).arg(&dim);
        check("embedding", unsafe { b.launch(Self::rows_cfg(meta.rows, Self::row_threads(dim as usize).min(256))) });
    }

    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, out: &mut Self::Buf, rows: usize, dim: usize, eps: f32) {
        let _r = self.range("rmsnorm");
        if rows == 0 {
            return;
        }
        let d = dim as i32;
        let mut b = self.stream.launch_builder(&self.k.rmsnorm);
        b.arg(x.bf()).arg(w.bf()).arg(out.bf_mut()).arg(&d).arg(&eps);
        check("rmsnorm", unsafe { b.launch(Self::rows_cfg(rows, Self::row_threads(dim).min(1024))) });
    }

    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        out: &mut Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        let _r = self.range("linear");
        if rows == 0 || n == 0 {
            return;
        }
        // With a bias, `out` starts as the bias in every row and the GEMM adds into it
        // (beta = 1), so the sum is rounded to bf16 once, as a fused bias epilogue would.
        match bias {
            Some(b) => {
                let (r, c) = (rows as i64, n as i32);
                let mut l = self.stream.launch_builder(&self.k.fill_rows);
                l.arg(out.bf_mut()).arg(b.bf()).arg(&r).arg(&c);
                check("fill_rows", unsafe { l.launch(self.elementwise_cfg(rows * n)) });
            }
            None if k == 0 => return self.zero(out, rows * n),
            None => {}
        }
        if k == 0 {
            return;
        }
        // Row-major out[rows, n] = x[rows, k] @ w[n, k]^T is column-major out^T = w^T^T x^T:
        // cuBLAS sees w as a k x n column-major matrix (transposed) and x as k x rows.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: rows as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: if bias.is_some() { bf16::ONE } else { bf16::ZERO },
            ldc: n as i32,
        };
        // cuBLAS calls do not make the context current themselves.
        check("binding the CUDA context", self.ctx.bind_to_thread());
        check("cuBLAS bf16 GEMM", unsafe { self.blas.gemm(cfg, w.bf(), x.bf(), out.bf_mut()) });
    }

    fn rope(&self, x: &mut Self::Buf, meta: &CudaMeta, heads: usize, head_dim: usize, theta: f32) {
        let _r = self.range("rope");
        if meta.rows == 0 {
            return;
        }
        let (h, d) = (heads as i32, head_dim as i32);
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(x.bf_mut()).arg(&meta.positions).arg(&h).arg(&d).arg(&theta);
        check("rope", unsafe { b.launch(Self::rows_cfg(meta.rows, (heads * head_dim / 2).clamp(32, 256))) });
    }

    fn kv_store(
        &self,
        k: &Self::Buf,
        v: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        meta: &CudaMeta,
        kv_dim: usize,
    ) {
        let _r = self.range("kv_store");
        if meta.rows == 0 {
            return;
        }
        let d = kv_dim as i32;
        let mut b = self.stream.launch_builder(&self.k.kv_store);
        b.arg(k.bf()).arg(v.bf()).arg(k_cache.bf_mut()).arg(v_cache.bf_mut()).arg(&meta.slots).arg(&d);
        check("kv_store", unsafe { b.launch(Self::rows_cfg(meta.rows, kv_dim.clamp(32, 256))) });
    }

    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        out: &mut Self::Buf,
        meta: &CudaMeta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        let _r = self.range("attention");
        if meta.rows == 0 {
            return;
        }
        let scale_log2 = std::f32::consts::LOG2_E / (head_dim as f32).sqrt();
        let (bs, h, kvh) = (meta.block_size as i32, heads as i32, kv_heads as i32);
        let fast = matches!(head_dim, 64 | 128)
            && heads / kv_heads <= DECODE_MAX_GROUP
            && *self.attention_path.lock().unwrap() == AttentionPath::Auto;
        if !fast {
            assert!(head_dim <= 256, "attention supports head dims up to 256, got {head_dim}");
            let d = head_dim as i32;
            let mut b = self.stream.launch_builder(&self.k.attention_generic);
            b.arg(q.bf())
                .arg(k_cache.bf())
                .arg(v_cache.bf())
                .arg(out.bf_mut())
                .arg(&meta.row_seq)
                .arg(&meta.seq_row_start)
                .arg(&meta.seq_n_new)
                .arg(&meta.seq_n_ctx)
                .arg(&meta.seq_bt_off)
                .arg(&meta.block_tables)
                .arg(&bs)
                .arg(&h)
                .arg(&kvh)
                .arg(&d)
                .arg(&scale_log2);
            let cfg = LaunchConfig {
                grid_dim: (meta.rows as u32, heads as u32, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            check("attention_generic", unsafe { b.launch(cfg) });
            return;
        }
        if meta.n_tiles > 0 {
            let f = if head_dim == 64 { &self.k.flash_d64 } else { &self.k.flash_d128 };
            let mut b = self.stream.launch_builder(f);
            b.arg(q.bf())
                .arg(k_cache.bf())
                .arg(v_cache.bf())
                .arg(out.bf_mut())
                .arg(&meta.tiles)
                .arg(&meta.seq_row_start)
                .arg(&meta.seq_n_new)
                .arg(&meta.seq_n_ctx)
                .arg(&meta.seq_bt_off)
                .arg(&meta.block_tables)
                .arg(&bs)
                .arg(&h)
                .arg(&kvh)
                .arg(&scale_log2);
            let cfg = LaunchConfig {
                grid_dim: (meta.n_tiles as u32, heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            check("flash attention", unsafe { b.launch(cfg) });
        }
        if meta.n_decode > 0 {
            // Enough splits to give every SM about two blocks, with splits of roughly 64 keys or more.
            let want = (2 * self.sms).div_ceil(meta.n_decode * kv_heads);
            let splits = want.clamp(1, meta.max_decode_ctx.div_ceil(64).max(1));
            let split_len = meta.max_decode_ctx.div_ceil(splits);
            let splits = meta.max_decode_ctx.div_ceil(split_len);
            let parts = meta.n_decode * heads * splits;
            // SAFETY: decode_partial writes every element before decode_combine reads it.
            let mut part_o = check("decode workspace", unsafe { self.stream.alloc::<f32>(parts * head_dim) });
            let mut part_ml = check("decode workspace", unsafe { self.stream.alloc::<f32>(parts * 2) });
            let sl = split_len as i32;
            let f = if head_dim == 64 { &self.k.decode_d64 } else { &self.k.decode_d128 };
            let mut b = self.stream.launch_builder(f);
            b.arg(q.bf())
                .arg(k_cache.bf())
                .arg(v_cache.bf())
                .arg(&mut part_o)
                .arg(&mut part_ml)
                .arg(&meta.decode_seqs)
                .arg(&meta.seq_row_start)
                .arg(&meta.seq_n_ctx)
                .arg(&meta.seq_bt_off)
                .arg(&meta.block_tables)
                .arg(&bs)
                .arg(&h)
                .arg(&kvh)
                .arg(&sl)
                .arg(&scale_log2);
            let cfg = LaunchConfig {
                grid_dim: (meta.n_decode as u32, kv_heads as u32, splits as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            check("decode attention", unsafe { b.launch(cfg) });
            let (d, sp) = (head_dim as i32, splits as i32);
            let mut b = self.stream.launch_builder(&self.k.decode_combine);
            b.arg(&part_o)
                .arg(&part_ml)
                .arg(out.bf_mut())
                .arg(&meta.decode_seqs)
                .arg(&meta.seq_row_start)
                .arg(&h)
                .arg(&d)
                .arg(&sp);
            let cfg = LaunchConfig {
                grid_dim: (meta.n_decode as u32, heads as u32, 1),
                block_dim: (head_dim as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            check("decode combine", unsafe { b.launch(cfg) });
        }
    }

    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf, n: usize) {
        let _r = self.range("swiglu");
        if n == 0 {
            return;
        }
        let nn = n as i64;
        let mut b = self.stream.launch_builder(&self.k.swiglu);
        b.arg(gate.bf()).arg(up.bf()).arg(out.bf_mut()).arg(&nn);
        check("swiglu", unsafe { b.launch(self.elementwise_cfg(n)) });
    }

    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) {
        let _r = self.range("add_assign");
        if n == 0 {
            return;
        }
        let nn = n as i64;
        let (f, mut b) = match x {
            CudaBuf::Bf16(_) => ("add_assign", self.stream.launch_builder(&self.k.add_assign)),
            CudaBuf::F32(_) => ("add_assign_f32", self.stream.launch_builder(&self.k.add_assign_f32)),
        };
        match (x, y) {
            (CudaBuf::Bf16(x), CudaBuf::Bf16(y)) => b.arg(x).arg(y),
            (CudaBuf::F32(x), CudaBuf::F32(y)) => b.arg(x).arg(y),
            _ => panic!("add_assign: both buffers must have one precision"),
        };
        b.arg(&nn);
        check(f, unsafe { b.launch(self.elementwise_cfg(n)) });
    }

    fn gather_logit_rows(&self, x: &Self::Buf, meta: &CudaMeta, out: &mut Self::Buf, dim: usize) {
        let _r = self.range("gather_logit_rows");
        if meta.n_logit_rows == 0 {
            return;
        }
        let d = dim as i32;
        let mut b = self.stream.launch_builder(&self.k.gather_rows);
        b.arg(x.bf()).arg(&meta.logit_rows).arg(out.bf_mut()).arg(&d);
        check("gather_rows", unsafe { b.launch(Self::rows_cfg(meta.n_logit_rows, Self::row_threads(dim).min(256))) });
    }

    fn softmax(&self, x: &mut Self::Buf, rows: usize, cols: usize) {
        self.softmax_rows(x.bf_mut(), rows, cols, false);
    }

    fn log_softmax(&self, x: &mut Self::Buf, rows: usize, cols: usize) {
        self.softmax_rows(x.bf_mut(), rows, cols, true);
    }

    fn len(&self, x: &Self::Buf) -> usize {
        x.len()
    }

    fn zero(&self, x: &mut Self::Buf, n: usize) {
        if n > 0 {
            match x {
                CudaBuf::Bf16(x) => check("memset", self.stream.memset_zeros(&mut x.slice_mut(..n))),
                CudaBuf::F32(x) => check("memset", self.stream.memset_zeros(&mut x.slice_mut(..n))),
            }
        }
    }

    fn scale(&self, x: &mut Self::Buf, s: f32, n: usize) {
        if n == 0 {
            return;
        }
        let nn = n as i64;
        let mut b = match x {
            CudaBuf::Bf16(x) => {
                let mut b = self.stream.launch_builder(&self.k.scale);
                b.arg(x);
                b
            }
            CudaBuf::F32(x) => {
                let mut b = self.stream.launch_builder(&self.k.scale_f32);
                b.arg(x);
                b
            }
        };
        b.arg(&s).arg(&nn);
        check("scale", unsafe { b.launch(self.elementwise_cfg(n)) });
    }

    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf, n: usize) {
        if n == 0 {
            return;
        }
        match (src, dst) {
            (CudaBuf::Bf16(s), CudaBuf::Bf16(d)) => {
                check("device copy", self.stream.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n)))
            }
            (CudaBuf::F32(s), CudaBuf::F32(d)) => {
                check("device copy", self.stream.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n)))
            }
            _ => panic!("copy: both buffers must have one precision"),
        }
    }

    fn copy_rows(&self, src: &Self::Buf, src_rows: &[u32], dst: &mut Self::Buf, dst_rows: &[u32], dim: usize) {
        assert_eq!(src_rows.len(), dst_rows.len(), "copy_rows: as many source rows as destination rows");
        // A few rows (trained token rows): one device copy each.
        for (&s, &d) in src_rows.iter().zip(dst_rows) {
            let (s, d) = (s as usize * dim, d as usize * dim);
            match (src, &mut *dst) {
                (CudaBuf::Bf16(a), CudaBuf::Bf16(b)) => check(
                    "device row copy",
                    self.stream.memcpy_dtod(&a.slice(s..s + dim), &mut b.slice_mut(d..d + dim)),
                ),
                (CudaBuf::F32(a), CudaBuf::F32(b)) => check(
                    "device row copy",
                    self.stream.memcpy_dtod(&a.slice(s..s + dim), &mut b.slice_mut(d..d + dim)),
                ),
                _ => panic!("copy_rows: both buffers must have one precision"),
            }
        }
    }

    fn dropout(&self, x: &Self::Buf, out: &mut Self::Buf, n: usize, p: f32, seed: u64) {
        if n == 0 {
            return;
        }
        let nn = n as i64;
        let mut b = self.stream.launch_builder(&self.k.dropout);
        b.arg(x.bf()).arg(out.bf_mut()).arg(&nn).arg(&p).arg(&seed);
        check("dropout", unsafe { b.launch(self.elementwise_cfg(n)) });
    }

    fn lora_linear(
        &self,
        x: &CudaBuf,
        xd: Option<&CudaBuf>,
        w: &CudaBuf,
        b: Option<&CudaBuf>,
        lora: super::LoraRef<'_, Self>,
        out: &mut CudaBuf,
        xa: &mut CudaBuf,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        self.lora_linear_fused(x, xd, w, b, lora, out, xa, rows, k, n);
    }

    fn sample(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        params: &[SamplingParams],
        rngs: &mut [crate::backend::sampling::Rng],
    ) -> Vec<u32> {
        let _r = self.range("sample");
        use rand::Rng as _;
        let rows = params.len();
        assert_eq!(rows, rngs.len(), "sample: one random stream per row");
        assert!(logits.len() >= rows * vocab, "sample: logits hold fewer than {rows} rows of {vocab}");
        if rows == 0 {
            return vec![];
        }
        // Four words per row, as sampling.cu reads them; greedy rows draw no seed, as on the CPU.
        let mut words = Vec::with_capacity(rows * 4);
        for (p, rng) in params.iter().zip(rngs.iter_mut()) {
            let greedy = p.temperature <= 0.0 || p.top_k == 1;
            words.extend_from_slice(&[
                p.temperature.to_bits() as u64,
                p.top_k.min(i32::MAX as usize) as u64,
                p.top_p.to_bits() as u64,
                if greedy { 0 } else { rng.gen::<u64>() },
            ]);
        }
        let words = check("sampling", self.stream.clone_htod(&words));
        let mut out = check("sampling", self.stream.alloc_zeros::<i32>(rows));
        let v = vocab as i32;
        let mut b = self.stream.launch_builder(&self.k.sample);
        b.arg(logits.bf()).arg(&v).arg(&words).arg(&mut out);
        check("sample", unsafe { b.launch(Self::rows_cfg(rows, 1024)) });
        check("sampling", self.stream.clone_dtoh(&out)).into_iter().map(|t| t as u32).collect()
    }
}

impl CudaBackend {
    fn softmax_rows(&self, x: &mut CudaSlice<bf16>, rows: usize, cols: usize, log_space: bool) {
        if rows == 0 {
            return;
        }
        let (c, l) = (cols as i32, log_space as i32);
        let mut b = self.stream.launch_builder(&self.k.softmax);
        b.arg(x).arg(&c).arg(&l);
        check("softmax", unsafe { b.launch(Self::rows_cfg(rows, Self::row_threads(cols).min(1024))) });
    }
}
