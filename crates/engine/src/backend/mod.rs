//! The op set the Qwen2 model is written over.
//!
//! One implementation per device: `cpu` (f32, rayon: the reference) and `cuda` (bf16 through
//! cudarc, kernels compiled by NVRTC); [`Device`] and [`with_backend!`](crate::with_backend) pick one. Ops take explicit
//! shapes, as in llm.c, so a backend needs no tensor library. Activations are laid out
//! row-major as `[tokens, features]` with the tokens of every sequence in a batch packed one
//! after another (no padding); per-step metadata (token ids, positions, KV-cache slots,
//! sequence boundaries) travels in [`StepMeta`], which a device backend uploads once per
//! forward pass through [`Backend::prepare`].

pub mod cpu;
pub mod cuda;
mod device;
pub mod sampling;

pub use device::{default_device, Device};

use anyhow::Result;

/// Element type of a tensor stored in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// A tensor's raw little-endian bytes on the host (usually borrowed from a memory map).
pub struct HostTensor<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl HostTensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The index of the first NaN or ±inf element, if any (all exponent bits set, read from
    /// the raw bytes in whichever float format).
    pub fn first_non_finite(&self) -> Option<usize> {
        use rayon::prelude::*;
        let (width, exponent): (usize, u32) = match self.dtype {
            DType::F32 => (4, 0x7f80_0000),
            DType::BF16 => (2, 0x7f80),
            DType::F16 => (2, 0x7c00),
        };
        let bad = |c: &[u8]| {
            let bits = if width == 4 {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            } else {
                u16::from_le_bytes([c[0], c[1]]) as u32
            };
            bits & exponent == exponent
        };
        self.bytes.par_chunks_exact(width).position_first(bad)
    }
}

/// One sequence's share of a forward step.
#[derive(Debug, Clone)]
pub struct SeqSlice {
    /// First row of this sequence's tokens in the packed activations.
    pub row_start: usize,
    /// Tokens of this sequence processed in this step.
    pub n_new: usize,
    /// Tokens in the KV cache for this sequence once this step's tokens are stored
    /// (earlier context + `n_new`). The new tokens sit at positions `n_ctx - n_new ..`.
    pub n_ctx: usize,
    /// KV-cache blocks holding this sequence, in order.
    pub block_table: Vec<u32>,
}

/// Whether element `i` survives dropout with probability `p` under `seed`: a counter-based hash
/// (splitmix64's finaliser) that every backend computes the same way.
pub fn dropout_keeps(seed: u64, i: u64, p: f32) -> bool {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 uniform bits against p.
    ((z >> 40) as f32) >= p * (1u32 << 24) as f32
}

/// The KV-cache slot of position `pos` of a sequence whose blocks are `block_table`.
pub fn cache_slot(block_table: &[u32], pos: usize, block_size: usize) -> u32 {
    block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32
}

/// Everything about one forward step that is not an activation.
#[derive(Debug, Clone, Default)]
pub struct StepMeta {
    /// Token id of every row.
    pub tokens: Vec<u32>,
    /// Position (for RoPE) of every row.
    pub positions: Vec<u32>,
    /// KV-cache slot (`block * block_size + offset`) that every row's keys/values go to.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Rows whose logits are wanted (e.g. the last token of each sequence when sampling).
    pub logit_rows: Vec<u32>,
}

impl StepMeta {
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }
}

/// How to sample the next token from a row of logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1.0 disables.
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0 }
    }
}

/// One adapter's tensors as the fused LoRA ops read them: `a: [rank, in]`, `b: [out, rank]`,
/// the update scaled by `scale` (`alpha / rank`).
pub struct LoraRef<'a, B: Backend + ?Sized> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    pub rank: usize,
    pub scale: f32,
}

impl<B: Backend + ?Sized> Clone for LoraRef<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for LoraRef<'_, B> {}

/// One trained tensor in an optimiser step.
pub struct AdamWTensor<'a, B: Backend + ?Sized> {
    pub param: &'a mut B::Buf,
    /// The f32 master copy the update is made in, where the backend computes in a lower
    /// precision ([`TrainBackend::master_weights`]); `param` then receives its rounding.
    pub master: Option<&'a mut B::Buf>,
    pub grad: &'a B::Buf,
    pub m: &'a mut B::Buf,
    pub v: &'a mut B::Buf,
    pub n: usize,
    /// Whether weight decay applies (matrices yes, biases and norm weights no).
    pub decay: bool,
}

/// Hyper-parameters of one AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// The device operations of a Qwen2 forward and backward pass.
///
/// Shapes are given in elements. `x: [rows, dim]` means `rows * dim` contiguous values,
/// row-major. Weights follow HF's layout: a linear weight is `[out, in]`.
pub trait Backend: Send + Sync {
    /// A device buffer of activations or weights.
    type Buf: Send + Sync;
    /// [`StepMeta`] in the form the device reads it.
    type Meta;

    fn name(&self) -> String;
    /// Bytes per value of weights and activations (4 for f32, 2 for bf16).
    fn compute_bytes(&self) -> usize {
        4
    }
    /// Waits for every queued op (for timing phases; a no-op where ops are synchronous).
    fn sync(&self) {}
    /// The device's (free, total) memory in bytes, where the backend can tell.
    fn memory_info(&self) -> Option<(u64, u64)> {
        None
    }

    // ---- memory ----
    fn zeros(&self, n: usize) -> Self::Buf;
    /// Zeros held in f32 whatever the compute precision: gradients, optimiser state,
    /// log-probs and log-sum-exps, where bf16 would lose what matters.
    fn zeros_f32(&self, n: usize) -> Self::Buf {
        self.zeros(n)
    }
    /// Stores host values in the backend's compute precision.
    fn upload_f32(&self, data: &[f32]) -> Self::Buf;
    /// Stores host values in f32 whatever the compute precision (see [`Backend::zeros_f32`]).
    fn upload_f32_full(&self, data: &[f32]) -> Self::Buf {
        self.upload_f32(data)
    }
    /// Stores a checkpoint tensor in the backend's compute precision.
    fn upload(&self, t: &HostTensor) -> Result<Self::Buf>;
    fn to_f32(&self, buf: &Self::Buf) -> Vec<f32>;
    /// Overwrites `dst` with host values, kept in `dst`'s own precision (e.g. a tensor
    /// received from another rank).
    fn write_f32(&self, dst: &mut Self::Buf, data: &[f32]);
    fn prepare(&self, meta: &StepMeta) -> Self::Meta;

    // ---- ops ----
    /// `out[r] = table[meta.tokens[r]]`, `table: [vocab, dim]`, `out: [rows, dim]`.
    fn embedding(&self, table: &Self::Buf, meta: &Self::Meta, out: &mut Self::Buf, dim: usize);
    /// `out = x / rms(x) * w` per row.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, out: &mut Self::Buf, rows: usize, dim: usize, eps: f32);
    /// `out = x @ w^T (+ b)`, `x: [rows, k]`, `w: [n, k]`, `b: [n]`, `out: [rows, n]`.
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        b: Option<&Self::Buf>,
        out: &mut Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
    );
    /// Rotates `x: [rows, heads, head_dim]` in place by each row's position (rotate-half form).
    fn rope(&self, x: &mut Self::Buf, meta: &Self::Meta, heads: usize, head_dim: usize, theta: f32);
    /// Writes `k, v: [rows, kv_dim]` into the caches `[slots, kv_dim]` at `meta.slots`.
    fn kv_store(
        &self,
        k: &Self::Buf,
        v: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        meta: &Self::Meta,
        kv_dim: usize,
    );
    /// Causal grouped-query attention of the new rows over each sequence's cached keys/values.
    /// `q, out: [rows, heads * head_dim]`; softmax scale `1/sqrt(head_dim)`.
    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        out: &mut Self::Buf,
        meta: &Self::Meta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    );
    /// `out = silu(gate) * up`, elementwise over `n` values.
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf, n: usize);
    /// `x += y` over `n` values (the residual stream).
    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize);
    /// `out[i] = x[meta.logit_rows[i]]` for `x: [*, dim]` (the rows whose logits are wanted; a
    /// device backend reads the indices it uploaded in [`Backend::prepare`]).
    fn gather_logit_rows(&self, x: &Self::Buf, meta: &Self::Meta, out: &mut Self::Buf, dim: usize);
    /// Row-wise softmax in place, `x: [rows, cols]`.
    fn softmax(&self, x: &mut Self::Buf, rows: usize, cols: usize);
    /// Row-wise log-softmax in place, `x: [rows, cols]`.
    fn log_softmax(&self, x: &mut Self::Buf, rows: usize, cols: usize);

    // ---- utilities ----
    /// Number of values `x` holds.
    fn len(&self, x: &Self::Buf) -> usize;
    /// `x[..n] = 0`.
    fn zero(&self, x: &mut Self::Buf, n: usize);
    /// `x *= s` over `n` values.
    fn scale(&self, x: &mut Self::Buf, s: f32, n: usize);
    /// `dst[..n] = src[..n]`.
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf, n: usize);
    /// `dst[dst_rows[i]] = src[src_rows[i]]` for rows of `dim` values, both buffers in one
    /// precision: gathers or scatters a few rows of a large matrix (trained token rows of the
    /// embedding). The default goes through host memory; backends copy on the device.
    fn copy_rows(&self, src: &Self::Buf, src_rows: &[u32], dst: &mut Self::Buf, dst_rows: &[u32], dim: usize) {
        assert_eq!(src_rows.len(), dst_rows.len(), "copy_rows: as many source rows as destination rows");
        let (from, mut to) = (self.to_f32(src), self.to_f32(dst));
        for (&s, &d) in src_rows.iter().zip(dst_rows) {
            let (s, d) = (s as usize * dim, d as usize * dim);
            to[d..d + dim].copy_from_slice(&from[s..s + dim]);
        }
        self.write_f32(dst, &to);
    }
    /// Inverted dropout: `out[i] = x[i] / (1 - p)` where [`dropout_keeps`]`(seed, i, p)`, else 0.
    /// The mask is a pure function of `(seed, i)`, so the backward is this same op on the
    /// gradient and no mask is stored.
    fn dropout(&self, x: &Self::Buf, out: &mut Self::Buf, n: usize, p: f32, seed: u64);

    /// A LoRA-adapted linear layer: `out = x W^T (+ b) + scale * xa B^T` with `xa = xd A^T`
    /// (written to `xa`, which the backward needs), where `xd` is the adapter's input after
    /// dropout (`None`: `x` itself). `a: [r, k]`, `b_lora: [n, r]`. The default composes
    /// [`Backend::linear`] calls through a full-size intermediate; a device backend fuses the
    /// low-rank update into the base GEMM's output.
    #[allow(clippy::too_many_arguments)]
    fn lora_linear(
        &self,
        x: &Self::Buf,
        xd: Option<&Self::Buf>,
        w: &Self::Buf,
        b: Option<&Self::Buf>,
        lora: LoraRef<'_, Self>,
        out: &mut Self::Buf,
        xa: &mut Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        self.linear(x, w, b, out, rows, k, n);
        self.linear(xd.unwrap_or(x), lora.a, None, xa, rows, k, lora.rank);
        let mut y = self.zeros(rows * n);
        self.linear(xa, lora.b, None, &mut y, rows, lora.rank, n);
        self.scale(&mut y, lora.scale, rows * n);
        self.add_assign(out, &y, rows * n);
    }

    /// Picks one token per row of `logits: [rows, vocab]`. The default brings the logits to the
    /// host; a device backend overrides it so that full logits never leave the device.
    fn sample(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        params: &[SamplingParams],
        rngs: &mut [crate::backend::sampling::Rng],
    ) -> Vec<u32> {
        let host = self.to_f32(logits);
        params
            .iter()
            .zip(rngs.iter_mut())
            .enumerate()
            .map(|(r, (p, rng))| crate::backend::sampling::sample_row(&host[r * vocab..(r + 1) * vocab], p, rng))
            .collect()
    }
}

/// The backward ops and the optimiser: what training needs beyond [`Backend`]. A device
/// backend that only serves inference does not implement it, and training refuses to run on it.
pub trait TrainBackend: Backend {
    // Gradient outputs named `d*` are overwritten, except where "accumulates" is said: weight
    // gradients accumulate so that micro-batches add up without extra buffers.

    /// `dtable[meta.tokens[r]] += dout[r]` (accumulates).
    fn embedding_bwd(&self, dout: &Self::Buf, meta: &Self::Meta, dtable: &mut Self::Buf, dim: usize);
    /// Backward of [`Backend::rmsnorm`]: `dx` (overwritten) and `dw` (accumulates).
    fn rmsnorm_bwd(
        &self,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
        rows: usize,
        dim: usize,
        eps: f32,
    );
    /// Backward of [`Backend::linear`]: `dx = dout @ w` (overwritten), `dw += dout^T @ x`,
    /// `db += sum_rows(dout)` (accumulate). Any of them may be skipped.
    fn linear_bwd(
        &self,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dw: Option<&mut Self::Buf>,
        db: Option<&mut Self::Buf>,
        rows: usize,
        k: usize,
        n: usize,
    );
    /// Backward of [`Backend::rope`]: rotates the gradient back, in place.
    fn rope_bwd(&self, dx: &mut Self::Buf, meta: &Self::Meta, heads: usize, head_dim: usize, theta: f32);
    /// Causal GQA self-attention within each sequence of a packed batch (`meta.seqs`, no KV
    /// cache): `q, out: [rows, heads*head_dim]`, `k, v: [rows, kv_heads*head_dim]`; also
    /// writes each (row, head)'s softmax log-sum-exp to `lse: [rows, heads]` for the backward.
    fn attention_train(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        meta: &Self::Meta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    );
    /// Backward of [`Backend::attention_train`], recomputing the probabilities from `lse`;
    /// `dq, dk, dv` are overwritten.
    fn attention_train_bwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        meta: &Self::Meta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    );
    /// Backward of [`Backend::swiglu`]: `dgate`, `dup` (overwritten).
    fn swiglu_bwd(
        &self,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        n: usize,
    );
    /// Fused log-prob: `logp[r] = log softmax(h[r] @ w^T)[targets[r]]` and the row's
    /// log-sum-exp, for `h: [rows, dim]`, `w: [vocab, dim]`, computed over vocabulary chunks
    /// with an online log-sum-exp so the `[rows, vocab]` logits never exist at once.
    fn token_logprobs(
        &self,
        h: &Self::Buf,
        w: &Self::Buf,
        targets: &[u32],
        logp: &mut Self::Buf,
        lse: &mut Self::Buf,
        rows: usize,
        dim: usize,
        vocab: usize,
    );
    /// Backward of [`Backend::token_logprobs`] given `dlogp: [rows]`: `dh` (overwritten) and
    /// `dw` (accumulates; skipped when `None`, e.g. a frozen head).
    fn token_logprobs_bwd(
        &self,
        dlogp: &Self::Buf,
        h: &Self::Buf,
        w: &Self::Buf,
        targets: &[u32],
        lse: &Self::Buf,
        dh: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
        rows: usize,
        dim: usize,
        vocab: usize,
    );
    /// `sum(x^2)` over the first `n` values, in f64.
    fn sum_squares(&self, x: &Self::Buf, n: usize) -> f64;
    /// `sum(g^2)` over several tensors (the squared global gradient norm); a device backend
    /// reduces them all in one pass and reads back one number.
    fn sum_squares_all(&self, xs: &[(&Self::Buf, usize)]) -> f64 {
        xs.iter().map(|(x, n)| self.sum_squares(x, *n)).sum()
    }
    /// Whether the optimiser keeps f32 master copies of the trained parameters (the backend
    /// computes in a lower precision, where small updates would round away); false where
    /// parameters are f32 already.
    fn master_weights(&self) -> bool {
        false
    }
    /// Backward of [`Backend::lora_linear`] for a frozen base: `dx` (overwritten) =
    /// `dout W + d(scale * dout B A)` with `d` the dropout's backward (`dropout`: its
    /// probability and seed), and the adapter gradients `da += dxa^T xd`, `db += scale dout^T xa`
    /// (accumulate), `dxa = scale dout B`. The default composes [`TrainBackend::linear_bwd`].
    #[allow(clippy::too_many_arguments)]
    fn lora_linear_bwd(
        &self,
        dout: &Self::Buf,
        x: &Self::Buf,
        xd: Option<&Self::Buf>,
        xa: &Self::Buf,
        w: &Self::Buf,
        lora: LoraRef<'_, Self>,
        dx: &mut Self::Buf,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        dropout: Option<(f32, u64)>,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        let r = lora.rank;
        self.linear_bwd(dout, x, w, Some(dx), None, None, rows, k, n);
        let mut ds = self.zeros(rows * n);
        self.copy(dout, &mut ds, rows * n);
        self.scale(&mut ds, lora.scale, rows * n);
        let mut dxa = self.zeros(rows * r);
        self.linear_bwd(&ds, xa, lora.b, Some(&mut dxa), Some(db), None, rows, r, n);
        let mut dx_lora = self.zeros(rows * k);
        self.linear_bwd(&dxa, xd.unwrap_or(x), lora.a, Some(&mut dx_lora), Some(da), None, rows, k, r);
        if let Some((p, seed)) = dropout {
            // The mask is linear: its backward is the same dropout on the gradient.
            let mut masked = self.zeros(rows * k);
            self.dropout(&dx_lora, &mut masked, rows * k, p, seed);
            dx_lora = masked;
        }
        self.add_assign(dx, &dx_lora, rows * k);
    }
    /// One AdamW step (PyTorch's formulation, decoupled weight decay) over every trained
    /// tensor, each gradient first multiplied by `grad_scale` (the clipping coefficient, so
    /// clipping needs no pass of its own). A device backend updates all tensors in one launch.
    fn adamw(&self, tensors: &mut [AdamWTensor<'_, Self>], hp: &AdamW, grad_scale: f32, step: u64);
}
