//! Training on the GPU: the [`TrainBackend`] ops of the CUDA backend.
//!
//! Precision: weights and activations (and their gradients flowing backward) are bf16;
//! everything that accumulates is f32 — parameter gradients (cuBLAS writes `dW += dout^T x`
//! straight into f32), the optimiser's moments and master weights, log-probs and log-sum-exps.
//! The GEMMs are cuBLAS (`cublasGemmEx`, bf16 inputs, f32 compute); the rest are the kernels
//! in `kernels/` (attention backward, fused log-prob, multi-tensor AdamW, norm/rope/swiglu/
//! embedding backward).

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{check, AttentionPath, CudaBackend, CudaBuf, CudaMeta};
use crate::backend::{AdamW, AdamWTensor, Backend, LoraRef, TrainBackend};

/// A row-major operand of [`CudaBackend::gemm`]: a bf16 buffer from element `offset`, stored
/// as the operand itself or (`transposed`) as its transpose.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    buf: &'a CudaBuf,
    offset: usize,
    transposed: bool,
}

pub(crate) fn plain(buf: &CudaBuf) -> Operand<'_> {
    Operand { buf, offset: 0, transposed: false }
}

pub(crate) fn trans(buf: &CudaBuf) -> Operand<'_> {
    Operand { buf, offset: 0, transposed: true }
}

impl Operand<'_> {
    fn at(self, offset: usize) -> Self {
        Self { offset, ..self }
    }
}

/// Elements per chunk of the multi-tensor optimiser kernels (CHUNK in optimizer.cu).
const OPT_CHUNK: usize = 65536;

impl CudaBackend {
    /// Row-major `c[m, n] = alpha * op(a)[m, k] op(b)[k, n] + beta * c[m, n]` (from element
    /// `c_offset` of `c`), bf16 inputs, f32 accumulation, `c` bf16 or f32.
    ///
    /// cuBLAS is column-major: a row-major `[m, n]` matrix is its column-major transpose, so
    /// this computes `c^T = op(b)^T op(a)^T` with the operands swapped.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        what: &str,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: &mut CudaBuf,
        c_offset: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        assert!(!a.buf.is_f32() && !b.buf.is_f32(), "{what}: GEMM inputs must be bf16");
        assert!(a.buf.len() >= a.offset + m * k, "{what}: operand a holds fewer than {m}x{k} values");
        assert!(b.buf.len() >= b.offset + k * n, "{what}: operand b holds fewer than {k}x{n} values");
        assert!(c.len() >= c_offset + m * n, "{what}: output holds fewer than {m}x{n} values");
        if k == 0 {
            if beta == 0.0 {
                self.zero_range(c, c_offset, m * n);
            }
            return;
        }
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let (transa, lda) = if b.transposed { (CUBLAS_OP_T, k) } else { (CUBLAS_OP_N, n) };
        let (transb, ldb) = if a.transposed { (CUBLAS_OP_T, m) } else { (CUBLAS_OP_N, k) };
        let bf = blas_sys::cudaDataType::CUDA_R_16BF;
        let c_type = if c.is_f32() { blas_sys::cudaDataType::CUDA_R_32F } else { bf };
        let s = &self.stream;
        check("binding the CUDA context", self.ctx.bind_to_thread());
        // SAFETY: the pointers address live buffers whose sizes were checked above; alpha and
        // beta are host f32 values, as CUBLAS_COMPUTE_32F with the default pointer mode reads them.
        let r = unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                transa,
                transb,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const std::ffi::c_void,
                b.buf.ptr_at(s, b.offset) as *const std::ffi::c_void,
                bf,
                lda as i32,
                a.buf.ptr_at(s, a.offset) as *const std::ffi::c_void,
                bf,
                ldb as i32,
                &beta as *const f32 as *const std::ffi::c_void,
                c.ptr_at(s, c_offset) as *mut std::ffi::c_void,
                c_type,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        };
        check(what, r);
    }

    fn zero_range(&self, x: &mut CudaBuf, offset: usize, n: usize) {
        match x {
            CudaBuf::Bf16(x) => check("memset", self.stream.memset_zeros(&mut x.slice_mut(offset..offset + n))),
            CudaBuf::F32(x) => check("memset", self.stream.memset_zeros(&mut x.slice_mut(offset..offset + n))),
        }
    }

    /// `out[..n] = bf16(x[..n])`.
    pub(crate) fn cast_to_bf16(&self, x: &CudaBuf, out: &mut CudaBuf, n: usize) {
        if n == 0 {
            return;
        }
        let nn = n as i64;
        let mut b = self.stream.launch_builder(&self.k.cast_f32_bf16);
        b.arg(x.f32()).arg(out.bf_mut()).arg(&nn);
        check("cast_f32_bf16", unsafe { b.launch(self.elementwise_cfg(n)) });
    }

    /// Vocabulary columns per chunk of the fused log-prob: about 2^25 logits (128 MB of f32) at
    /// a time, a multiple of 128 so every chunk of the head starts 256-byte aligned.
    fn logprob_chunk(rows: usize, vocab: usize) -> usize {
        let cols = ((1usize << 25) / rows.max(1)).max(256) / 128 * 128;
        cols.min(vocab)
    }

    /// Uploads the `(tensor, first element)` chunk list of the multi-tensor kernels.
    fn chunk_list(&self, sizes: impl Iterator<Item = usize>) -> (cudarc::driver::CudaSlice<i64>, usize) {
        let mut chunks = vec![];
        for (t, n) in sizes.enumerate() {
            for start in (0..n).step_by(OPT_CHUNK) {
                chunks.extend([t as i64, start as i64]);
            }
        }
        let count = chunks.len() / 2;
        if chunks.is_empty() {
            chunks.extend([0, 0]);
        }
        (check("uploading the chunk list", self.stream.clone_htod(&chunks)), count)
    }

    fn read_sum(&self, out: &cudarc::driver::CudaSlice<f64>) -> f64 {
        check("reading a reduction", self.stream.clone_dtoh(out))[0]
    }

    /// Whether training attention takes the tensor-core kernels (head dim 64 or 128).
    fn flash_train(&self, head_dim: usize) -> bool {
        matches!(head_dim, 64 | 128) && *self.attention_path.lock().unwrap() == AttentionPath::Auto
    }
}

impl TrainBackend for CudaBackend {
    fn embedding_bwd(&self, dout: &CudaBuf, meta: &CudaMeta, dtable: &mut CudaBuf, dim: usize) {
        let _r = self.range("embedding_bwd");
        if meta.rows == 0 {
            return;
        }
        let d = dim as i32;
        let mut b = self.stream.launch_builder(&self.k.embedding_bwd);
        b.arg(dout.bf()).arg(&meta.tokens).arg(dtable.f32_mut()).arg(&d);
        check("embedding_bwd", unsafe { b.launch(Self::rows_cfg(meta.rows, Self::row_threads(dim).min(256))) });
    }

    fn rmsnorm_bwd(
        &self,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        dx: &mut CudaBuf,
        dw: Option<&mut CudaBuf>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        let _r = self.range("rmsnorm_bwd");
        if rows == 0 {
            return;
        }
        // A null dw skips the weight gradient (a frozen norm).
        let dw_ptr: u64 = dw
            .map(|d| {
                assert!(d.is_f32(), "rmsnorm_bwd: the weight gradient must be f32");
                d.ptr(&self.stream)
            })
            .unwrap_or(0);
        let d = dim as i32;
        let mut b = self.stream.launch_builder(&self.k.rmsnorm_bwd);
        b.arg(dout.bf()).arg(x.bf()).arg(w.bf()).arg(dx.bf_mut()).arg(&dw_ptr).arg(&d).arg(&eps);
        check("rmsnorm_bwd", unsafe { b.launch(Self::rows_cfg(rows, Self::row_threads(dim).min(1024))) });
    }

    fn linear_bwd(
        &self,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        dx: Option<&mut CudaBuf>,
        dw: Option<&mut CudaBuf>,
        db: Option<&mut CudaBuf>,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        let _r = self.range("linear_bwd");
        if rows == 0 {
            return;
        }
        if let Some(dx) = dx {
            // dx[rows, k] = dout[rows, n] w[n, k]
            self.gemm("linear_bwd dx", rows, k, n, 1.0, plain(dout), plain(w), 0.0, dx, 0);
        }
        if let Some(dw) = dw {
            // dw[n, k] += dout^T[n, rows] x[rows, k], into the f32 gradient
            self.gemm("linear_bwd dw", n, k, rows, 1.0, trans(dout), plain(x), 1.0, dw, 0);
        }
        if let Some(db) = db {
            let chunk = 256usize;
            let (r, c, rc) = (rows as i32, n as i32, chunk as i32);
            let mut b = self.stream.launch_builder(&self.k.bias_grad);
            b.arg(dout.bf()).arg(db.f32_mut()).arg(&r).arg(&c).arg(&rc);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(32) as u32, rows.div_ceil(chunk) as u32, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            check("bias_grad", unsafe { b.launch(cfg) });
        }
    }

    fn rope_bwd(&self, dx: &mut CudaBuf, meta: &CudaMeta, heads: usize, head_dim: usize, theta: f32) {
        let _r = self.range("rope_bwd");
        if meta.rows == 0 {
            return;
        }
        let (h, d) = (heads as i32, head_dim as i32);
        let mut b = self.stream.launch_builder(&self.k.rope_bwd);
        b.arg(dx.bf_mut()).arg(&meta.positions).arg(&h).arg(&d).arg(&theta);
        check("rope_bwd", unsafe { b.launch(Self::rows_cfg(meta.rows, (heads * head_dim / 2).clamp(32, 256))) });
    }

    fn attention_train(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        meta: &CudaMeta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        let _r = self.range("attention_train");
        if meta.rows == 0 {
            return;
        }
        let scale_log2 = std::f32::consts::LOG2_E / (head_dim as f32).sqrt();
        let (h, kvh) = (heads as i32, kv_heads as i32);
        if self.flash_train(head_dim) {
            let f = if head_dim == 64 { &self.k.flash_train_fwd_d64 } else { &self.k.flash_train_fwd_d128 };
            let mut b = self.stream.launch_builder(f);
            b.arg(q.bf())
                .arg(k.bf())
                .arg(v.bf())
                .arg(out.bf_mut())
                .arg(lse.f32_mut())
                .arg(meta.train_tiles(self))
                .arg(&meta.seq_row_start)
                .arg(&meta.seq_n_new)
                .arg(&h)
                .arg(&kvh)
                .arg(&scale_log2);
            let cfg = LaunchConfig {
                grid_dim: (meta.n_train_tiles as u32, heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            check("flash attention (training forward)", unsafe { b.launch(cfg) });
            return;
        }
        assert!(head_dim <= 256, "attention supports head dims up to 256, got {head_dim}");
        let d = head_dim as i32;
        let mut b = self.stream.launch_builder(&self.k.attn_train_fwd_generic);
        b.arg(q.bf())
            .arg(k.bf())
            .arg(v.bf())
            .arg(out.bf_mut())
            .arg(lse.f32_mut())
            .arg(&meta.row_seq)
            .arg(&meta.seq_row_start)
            .arg(&h)
            .arg(&kvh)
            .arg(&d)
            .arg(&scale_log2);
        let cfg =
            LaunchConfig { grid_dim: (meta.rows as u32, heads as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        check("attention (training forward)", unsafe { b.launch(cfg) });
    }

    fn attention_train_bwd(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        dout: &CudaBuf,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        meta: &CudaMeta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        let _r = self.range("attention_train_bwd");
        let rows = meta.rows;
        if rows == 0 {
            return;
        }
        let (qd, kvd) = (heads * head_dim, kv_heads * head_dim);
        let (h, kvh, d) = (heads as i32, kv_heads as i32, head_dim as i32);
        if self.flash_train(head_dim) {
            // dQ gathers contributions from every key tile: f32 atomics, then one rounding.
            let mut dq_acc = self.zeros_f32(rows * qd);
            let mut delta = self.zeros_f32(rows * heads);
            let r = rows as i32;
            let mut b = self.stream.launch_builder(&self.k.flash_train_bwd_pre);
            b.arg(out.bf()).arg(dout.bf()).arg(delta.f32_mut()).arg(&r).arg(&h).arg(&d);
            check("flash attention backward (pre)", unsafe { b.launch(flash_pre_cfg(rows, heads)) });
            let scale_log2 = std::f32::consts::LOG2_E / (head_dim as f32).sqrt();
            let f = if head_dim == 64 { &self.k.flash_train_bwd_d64 } else { &self.k.flash_train_bwd_d128 };
            let mut b = self.stream.launch_builder(f);
            b.arg(q.bf())
                .arg(k.bf())
                .arg(v.bf())
                .arg(dout.bf())
                .arg(lse.f32())
                .arg(delta.f32())
                .arg(dq_acc.f32_mut())
                .arg(dk.bf_mut())
                .arg(dv.bf_mut())
                .arg(meta.train_tiles(self))
                .arg(&meta.seq_row_start)
                .arg(&meta.seq_n_new)
                .arg(&h)
                .arg(&kvh)
                .arg(&scale_log2);
            let cfg = LaunchConfig {
                grid_dim: (meta.n_train_tiles as u32, kv_heads as u32, 1),
                block_dim: (FLASH_BWD_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            check("flash attention backward", unsafe { b.launch(cfg) });
            self.cast_to_bf16(&dq_acc, dq, rows * qd);
            return;
        }
        let mut dk_acc = self.zeros_f32(rows * kvd);
        let mut dv_acc = self.zeros_f32(rows * kvd);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut b = self.stream.launch_builder(&self.k.attn_train_bwd_generic);
        b.arg(q.bf())
            .arg(k.bf())
            .arg(v.bf())
            .arg(out.bf())
            .arg(lse.f32())
            .arg(dout.bf())
            .arg(dq.bf_mut())
            .arg(dk_acc.f32_mut())
            .arg(dv_acc.f32_mut())
            .arg(&meta.row_seq)
            .arg(&meta.seq_row_start)
            .arg(&h)
            .arg(&kvh)
            .arg(&d)
            .arg(&scale);
        let cfg = LaunchConfig { grid_dim: (rows as u32, heads as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        check("attention backward", unsafe { b.launch(cfg) });
        self.cast_to_bf16(&dk_acc, dk, rows * kvd);
        self.cast_to_bf16(&dv_acc, dv, rows * kvd);
    }

    fn swiglu_bwd(
        &self,
        dout: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
        n: usize,
    ) {
        let _r = self.range("swiglu_bwd");
        if n == 0 {
            return;
        }
        let nn = n as i64;
        let mut b = self.stream.launch_builder(&self.k.swiglu_bwd);
        b.arg(dout.bf()).arg(gate.bf()).arg(up.bf()).arg(dgate.bf_mut()).arg(dup.bf_mut()).arg(&nn);
        check("swiglu_bwd", unsafe { b.launch(self.elementwise_cfg(n)) });
    }

    fn token_logprobs(
        &self,
        h: &CudaBuf,
        w: &CudaBuf,
        targets: &[u32],
        logp: &mut CudaBuf,
        lse: &mut CudaBuf,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) {
        let _r = self.range("token_logprobs");
        if rows == 0 || vocab == 0 {
            return;
        }
        assert_eq!(targets.len(), rows, "token_logprobs: one target per row");
        let t = self.upload_i32(&targets.iter().map(|&x| x as i32).collect::<Vec<_>>());
        let cv = Self::logprob_chunk(rows, vocab);
        let mut logits = self.zeros_f32(rows * cv);
        // The running sums start empty (run_sum 0 marks "no chunk yet").
        let (mut run_max, mut run_sum) = (self.zeros_f32(rows), self.zeros_f32(rows));
        for v0 in (0..vocab).step_by(cv) {
            let c = cv.min(vocab - v0);
            // logits[rows, c] = h[rows, dim] w[v0..v0+c, dim]^T
            self.gemm("log-prob logits", rows, c, dim, 1.0, plain(h), trans(w).at(v0 * dim), 0.0, &mut logits, 0);
            let (ci, v) = (c as i32, v0 as i32);
            let mut b = self.stream.launch_builder(&self.k.logprob_chunk_fwd);
            b.arg(logits.f32())
                .arg(&ci)
                .arg(&v)
                .arg(&t)
                .arg(run_max.f32_mut())
                .arg(run_sum.f32_mut())
                .arg(logp.f32_mut());
            check("logprob_chunk_fwd", unsafe { b.launch(Self::rows_cfg(rows, 1024)) });
        }
        let r = rows as i32;
        let mut b = self.stream.launch_builder(&self.k.logprob_finish);
        b.arg(run_max.f32()).arg(run_sum.f32()).arg(logp.f32_mut()).arg(lse.f32_mut()).arg(&r);
        check("logprob_finish", unsafe { b.launch(self.elementwise_cfg(rows)) });
    }

    fn token_logprobs_bwd(
        &self,
        dlogp: &CudaBuf,
        h: &CudaBuf,
        w: &CudaBuf,
        targets: &[u32],
        lse: &CudaBuf,
        dh: &mut CudaBuf,
        mut dw: Option<&mut CudaBuf>,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) {
        let _r = self.range("token_logprobs_bwd");
        if rows == 0 || vocab == 0 {
            return;
        }
        assert_eq!(targets.len(), rows, "token_logprobs_bwd: one target per row");
        let t = self.upload_i32(&targets.iter().map(|&x| x as i32).collect::<Vec<_>>());
        let cv = Self::logprob_chunk(rows, vocab);
        let mut logits = self.zeros_f32(rows * cv);
        let mut dlogits = self.zeros(rows * cv);
        // dh sums over every chunk: f32, rounded once at the end.
        let mut dh_acc = self.zeros_f32(rows * dim);
        for v0 in (0..vocab).step_by(cv) {
            let c = cv.min(vocab - v0);
            self.gemm("log-prob logits", rows, c, dim, 1.0, plain(h), trans(w).at(v0 * dim), 0.0, &mut logits, 0);
            let (ci, v) = (c as i32, v0 as i32);
            let mut b = self.stream.launch_builder(&self.k.logprob_chunk_bwd);
            b.arg(logits.f32()).arg(&ci).arg(&v).arg(&t).arg(lse.f32()).arg(dlogp.f32()).arg(dlogits.bf_mut());
            check("logprob_chunk_bwd", unsafe { b.launch(Self::rows_cfg(rows, 1024)) });
            // dh[rows, dim] += dlogits[rows, c] w[v0..v0+c, dim]
            self.gemm("log-prob dh", rows, dim, c, 1.0, plain(&dlogits), plain(w).at(v0 * dim), 1.0, &mut dh_acc, 0);
            if let Some(dw) = dw.as_deref_mut() {
                // dw[v0..v0+c, dim] += dlogits^T[c, rows] h[rows, dim]
                self.gemm("log-prob dw", c, dim, rows, 1.0, trans(&dlogits), plain(h), 1.0, dw, v0 * dim);
            }
        }
        self.cast_to_bf16(&dh_acc, dh, rows * dim);
    }

    fn sum_squares(&self, x: &CudaBuf, n: usize) -> f64 {
        match x {
            CudaBuf::F32(_) => self.sum_squares_all(&[(x, n)]),
            CudaBuf::Bf16(s) => {
                if n == 0 {
                    return 0.0;
                }
                let mut out = check("allocating", self.stream.alloc_zeros::<f64>(1));
                let nn = n as i64;
                let mut b = self.stream.launch_builder(&self.k.sum_squares_bf16);
                b.arg(s).arg(&nn).arg(&mut out);
                check("sum_squares_bf16", unsafe { b.launch(self.elementwise_cfg(n)) });
                self.read_sum(&out)
            }
        }
    }

    fn sum_squares_all(&self, xs: &[(&CudaBuf, usize)]) -> f64 {
        let _r = self.range("grad_norm");
        if xs.iter().any(|(x, _)| !x.is_f32()) {
            return xs.iter().map(|(x, n)| self.sum_squares(x, *n)).sum();
        }
        let mut table = Vec::with_capacity(xs.len() * 2);
        for (x, n) in xs {
            assert!(x.len() >= *n, "sum_squares: a tensor holds fewer than {n} values");
            table.extend([x.ptr(&self.stream), *n as u64]);
        }
        let (chunks, count) = self.chunk_list(xs.iter().map(|(_, n)| *n));
        if count == 0 {
            return 0.0;
        }
        let table = check("uploading the tensor table", self.stream.clone_htod(&table));
        let mut out = check("allocating", self.stream.alloc_zeros::<f64>(1));
        let mut b = self.stream.launch_builder(&self.k.sum_squares_multi);
        b.arg(&table).arg(&chunks).arg(&mut out);
        let cfg = LaunchConfig { grid_dim: (count as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        check("sum_squares_multi", unsafe { b.launch(cfg) });
        self.read_sum(&out)
    }

    fn master_weights(&self) -> bool {
        true
    }

    fn lora_linear_bwd(
        &self,
        dout: &CudaBuf,
        x: &CudaBuf,
        xd: Option<&CudaBuf>,
        xa: &CudaBuf,
        w: &CudaBuf,
        lora: LoraRef<'_, Self>,
        dx: &mut CudaBuf,
        da: &mut CudaBuf,
        db: &mut CudaBuf,
        dropout: Option<(f32, u64)>,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        let _r = self.range("lora_linear_bwd");
        if rows == 0 {
            return;
        }
        let (r, s) = (lora.rank, lora.scale);
        let xd = xd.unwrap_or(x);
        // dxa[rows, r] = s dout[rows, n] B[n, r]; the scale rides in alpha, no scaled copy of dout.
        let mut dxa = self.zeros(rows * r);
        self.gemm("lora dxa", rows, r, n, s, plain(dout), plain(lora.b), 0.0, &mut dxa, 0);
        // dB[n, r] += s dout^T xa;  dA[r, k] += dxa^T xd (f32 gradients).
        self.gemm("lora dB", n, r, rows, s, trans(dout), plain(xa), 1.0, db, 0);
        self.gemm("lora dA", r, k, rows, 1.0, trans(&dxa), plain(xd), 1.0, da, 0);
        // dx[rows, k] = dout W, then the adapter's path added into it by the GEMM (beta = 1).
        self.gemm("lora dx", rows, k, n, 1.0, plain(dout), plain(w), 0.0, dx, 0);
        match dropout {
            None => self.gemm("lora dx (adapter)", rows, k, r, 1.0, plain(&dxa), plain(lora.a), 1.0, dx, 0),
            Some((p, seed)) => {
                // The dropout mask sits between: its backward is the same mask on the gradient.
                let mut through = self.zeros(rows * k);
                self.gemm("lora dx (adapter)", rows, k, r, 1.0, plain(&dxa), plain(lora.a), 0.0, &mut through, 0);
                let mut masked = self.zeros(rows * k);
                self.dropout(&through, &mut masked, rows * k, p, seed);
                self.add_assign(dx, &masked, rows * k);
            }
        }
    }

    fn adamw(&self, tensors: &mut [AdamWTensor<'_, Self>], hp: &AdamW, grad_scale: f32, step: u64) {
        let _r = self.range("adamw");
        if tensors.is_empty() {
            return;
        }
        // 56-byte AdamTensor records (optimizer.cu), packed word by word.
        let s = &self.stream;
        let mut table = Vec::with_capacity(tensors.len() * 7);
        for t in tensors.iter() {
            let master = t.master.as_deref().expect("the CUDA optimiser needs f32 master weights");
            assert!(
                !t.param.is_f32() && master.is_f32() && t.grad.is_f32() && t.m.is_f32() && t.v.is_f32(),
                "adamw: parameters are bf16; master weights, gradients and moments f32"
            );
            let wd = if t.decay { hp.weight_decay } else { 0.0 };
            table.extend([
                t.param.ptr(s),
                master.ptr(s),
                t.grad.ptr(s),
                t.m.ptr(s),
                t.v.ptr(s),
                t.n as u64,
                wd.to_bits() as u64,
            ]);
        }
        let (chunks, count) = self.chunk_list(tensors.iter().map(|t| t.n));
        if count == 0 {
            return;
        }
        let table = check("uploading the tensor table", s.clone_htod(&table));
        // As the CPU backend: torch's single-tensor formulation, step counted from 1.
        let bc1 = 1.0 - (hp.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(step as i32);
        let step_size = (hp.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let mut b = s.launch_builder(&self.k.adamw_multi);
        b.arg(&table)
            .arg(&chunks)
            .arg(&hp.lr)
            .arg(&hp.beta1)
            .arg(&hp.beta2)
            .arg(&hp.eps)
            .arg(&step_size)
            .arg(&bc2_sqrt)
            .arg(&grad_scale);
        let cfg = LaunchConfig { grid_dim: (count as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        check("adamw_multi", unsafe { b.launch(cfg) });
    }
}

/// Threads per block of the flash-attention backward (see flash_attn_train.cu).
const FLASH_BWD_THREADS: u32 = 128;

/// Launch of flash_train_bwd_pre (see flash_attn_train.cu).
fn flash_pre_cfg(rows: usize, heads: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, heads as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }
}

impl CudaBackend {
    /// The fused LoRA forward of [`Backend::lora_linear`]: the base GEMM, then `xa = xd A^T`,
    /// then `out += scale * xa B^T` accumulated by the GEMM into the base output (beta = 1,
    /// the scale in alpha), so no full-size intermediate is written or read.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lora_linear_fused(
        &self,
        x: &CudaBuf,
        xd: Option<&CudaBuf>,
        w: &CudaBuf,
        b: Option<&CudaBuf>,
        lora: LoraRef<'_, Self>,
        out: &mut CudaBuf,
        xa: &mut CudaBuf,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        let _r = self.range("lora_linear");
        self.linear(x, w, b, out, rows, k, n);
        let r = lora.rank;
        self.gemm("lora xa", rows, r, k, 1.0, plain(xd.unwrap_or(x)), trans(lora.a), 0.0, xa, 0);
        self.gemm("lora out", rows, n, r, lora.scale, plain(xa), trans(lora.b), 1.0, out, 0);
    }
}
