//! A bf16 emulation of the CUDA backend on the CPU, so that CI without a GPU can check
//! (a) that the generic training and inference code respects the CUDA backend's precision
//! contract and (b) that the selftest's tolerances are reachable with bf16 arithmetic.
//!
//! [`Bf16Emu`] delegates every op to [`CpuBackend`] and
//! - holds each buffer as the CUDA backend would, bf16 or f32 ([`EmuBuf::f32`]): `zeros`,
//!   `upload_f32` and `upload` give bf16; `zeros_f32` and `upload_f32_full` give f32;
//! - panics, naming the op and the argument, wherever an argument's precision differs from what
//!   the CUDA op reads or writes (`cuda/mod.rs`, `cuda/train.rs`). Where the CUDA code would
//!   accept either precision but its contract names one, the contract is enforced: weight and
//!   adapter gradients (`dw`, `db`, `dtable`, LoRA `dA`/`dB`) must be f32 — a bf16 one would
//!   silently accumulate in bf16 on the GPU — and activation gradients (`dx`) bf16;
//! - rounds to bf16 (round-to-nearest-even) every value a bf16 buffer receives, where the
//!   kernels round: RMSNorm's two roundings, silu rounded before SwiGLU's product, a bias added
//!   before the single rounding of a GEMM, P (and, backward, dS) rounded before the tensor-core
//!   products of the flash attention kernels (head dims 64 and 128), the log-prob's logit
//!   gradient rounded before its GEMMs, and LoRA's fused GEMMs (dxa rounded, dx rounded after
//!   each GEMM). f32 buffers keep f32, and the optimiser keeps f32 masters whose rounding is
//!   the bf16 parameter.
//!
//! What it does not model: f32 summation order (cuBLAS, atomics, block reductions) and the
//! online-softmax rescaling of the flash kernels — both far below bf16's rounding.

use anyhow::Result;
use half::bf16;
use rayon::prelude::*;

use crate::backend::cpu::{as_is, mm, transposed, CpuBackend};
use crate::backend::{
    cache_slot, AdamW, AdamWTensor, Backend, HostTensor, LoraRef, SamplingParams, StepMeta, TrainBackend,
};

/// A buffer as the CUDA backend holds it: `CudaBuf::F32` when `f32`, else `CudaBuf::Bf16`,
/// whose values are then always bf16-representable.
pub struct EmuBuf {
    pub v: Vec<f32>,
    pub f32: bool,
}

/// The CUDA backend's precision contract and rounding, computed by the CPU backend.
#[derive(Default)]
pub struct Bf16Emu {
    cpu: CpuBackend,
}

impl Bf16Emu {
    pub fn new() -> Self {
        Self::default()
    }
}

fn to_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Stores `v` as a bf16 buffer would.
fn round(v: &mut [f32]) {
    v.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|x| *x = to_bf16(*x)));
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

fn precision(f32: bool) -> &'static str {
    if f32 {
        "f32"
    } else {
        "bf16"
    }
}

#[track_caller]
fn expect(op: &str, arg: &str, b: &EmuBuf, f32: bool) {
    assert!(b.f32 == f32, "precision contract: {op} needs `{arg}` in {} and got {}", precision(f32), precision(b.f32));
}

#[track_caller]
fn bf<'a>(op: &str, arg: &str, b: &'a EmuBuf) -> &'a Vec<f32> {
    expect(op, arg, b, false);
    &b.v
}
#[track_caller]
fn bf_mut<'a>(op: &str, arg: &str, b: &'a mut EmuBuf) -> &'a mut Vec<f32> {
    expect(op, arg, b, false);
    &mut b.v
}
#[track_caller]
fn fp<'a>(op: &str, arg: &str, b: &'a EmuBuf) -> &'a Vec<f32> {
    expect(op, arg, b, true);
    &b.v
}
#[track_caller]
fn fp_mut<'a>(op: &str, arg: &str, b: &'a mut EmuBuf) -> &'a mut Vec<f32> {
    expect(op, arg, b, true);
    &mut b.v
}
#[track_caller]
fn opt_bf<'a>(op: &str, arg: &str, b: Option<&'a EmuBuf>) -> Option<&'a Vec<f32>> {
    b.map(|b| bf(op, arg, b))
}
#[track_caller]
fn opt_bf_mut<'a>(op: &str, arg: &str, b: Option<&'a mut EmuBuf>) -> Option<&'a mut Vec<f32>> {
    b.map(|b| bf_mut(op, arg, b))
}
#[track_caller]
fn opt_fp_mut<'a>(op: &str, arg: &str, b: Option<&'a mut EmuBuf>) -> Option<&'a mut Vec<f32>> {
    b.map(|b| fp_mut(op, arg, b))
}

/// `args!("op": bf x, fp_mut lse, ...)`: checks each buffer argument's precision against the
/// op's contract and rebinds the name to its values.
macro_rules! args {
    ($op:literal: $($kind:ident $name:ident),* $(,)?) => {
        $(let $name = $kind($op, stringify!($name), $name);)*
    };
}

/// `x` and `y` of an op that takes either precision but one for both.
#[track_caller]
fn same(op: &str, x: &EmuBuf, y: &EmuBuf) {
    assert!(
        x.f32 == y.f32,
        "precision contract: {op} needs both buffers in one precision, got {} and {}",
        precision(x.f32),
        precision(y.f32)
    );
}

/// Whether the CUDA attention kernels for this head dim are the tensor-core (flash) ones, which
/// round probabilities (and dS) to bf16 before their products; the generic kernels keep f32.
fn tensor_cores(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128)
}

/// Softmax attention of one query over `n` keys, `key(t) = (k_t, v_t)`: writes the f32 output
/// to `o` and returns the log-sum-exp. With `round_p` the unnormalised probabilities enter the
/// P·V product as bf16 (the normaliser sums them unrounded, as the flash kernel does).
fn attend<'a>(
    q: &[f32],
    n: usize,
    key: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    round_p: bool,
    o: &mut [f32],
) -> f32 {
    let s: Vec<f32> = (0..n).map(|t| dot(q, key(t).0) * scale).collect();
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut l = 0f32;
    o.fill(0.0);
    for (t, &st) in s.iter().enumerate() {
        let p = (st - m).exp();
        l += p;
        axpy(o, if round_p { to_bf16(p) } else { p }, key(t).1);
    }
    o.iter_mut().for_each(|x| *x /= l);
    m + l.ln()
}

impl Backend for Bf16Emu {
    type Buf = EmuBuf;
    type Meta = StepMeta;

    fn name(&self) -> String {
        "bf16 emulation of the CUDA backend (on the cpu)".into()
    }

    fn compute_bytes(&self) -> usize {
        2
    }

    // As on the GPU, an empty allocation holds one value.
    fn zeros(&self, n: usize) -> EmuBuf {
        EmuBuf { v: vec![0.0; n.max(1)], f32: false }
    }

    fn zeros_f32(&self, n: usize) -> EmuBuf {
        EmuBuf { v: vec![0.0; n.max(1)], f32: true }
    }

    fn upload_f32(&self, data: &[f32]) -> EmuBuf {
        if data.is_empty() {
            return self.zeros(1);
        }
        let mut v = data.to_vec();
        round(&mut v);
        EmuBuf { v, f32: false }
    }

    fn upload_f32_full(&self, data: &[f32]) -> EmuBuf {
        if data.is_empty() {
            return self.zeros_f32(1);
        }
        EmuBuf { v: data.to_vec(), f32: true }
    }

    fn upload(&self, t: &HostTensor) -> Result<EmuBuf> {
        let mut v = self.cpu.upload(t)?;
        if v.is_empty() {
            return Ok(self.zeros(1));
        }
        round(&mut v);
        Ok(EmuBuf { v, f32: false })
    }

    fn to_f32(&self, buf: &EmuBuf) -> Vec<f32> {
        buf.v.clone()
    }

    fn write_f32(&self, dst: &mut EmuBuf, data: &[f32]) {
        assert!(dst.v.len() >= data.len(), "write_f32: {} values into a buffer of {}", data.len(), dst.v.len());
        dst.v[..data.len()].copy_from_slice(data);
        if !dst.f32 {
            round(&mut dst.v[..data.len()]);
        }
    }

    fn prepare(&self, meta: &StepMeta) -> StepMeta {
        meta.clone()
    }

    fn embedding(&self, table: &EmuBuf, meta: &StepMeta, out: &mut EmuBuf, dim: usize) {
        args!("embedding": bf table, bf_mut out);
        self.cpu.embedding(table, meta, out, dim);
    }

    fn rmsnorm(&self, x: &EmuBuf, w: &EmuBuf, out: &mut EmuBuf, rows: usize, dim: usize, eps: f32) {
        args!("rmsnorm": bf x, bf w, bf_mut out);
        // As Qwen2RMSNorm in bf16: the normalised value rounded, then scaled and rounded again.
        out[..rows * dim].par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, xr)| {
            let inv = 1.0 / (dot(xr, xr) / dim as f32 + eps).sqrt();
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w.iter()) {
                *o = to_bf16(to_bf16(xv * inv) * wv);
            }
        });
    }

    fn linear(&self, x: &EmuBuf, w: &EmuBuf, b: Option<&EmuBuf>, out: &mut EmuBuf, rows: usize, k: usize, n: usize) {
        args!("linear": bf x, bf w, opt_bf b, bf_mut out);
        // The bias enters the GEMM's f32 result (beta = 1): one rounding.
        self.cpu.linear(x, w, b, out, rows, k, n);
        round(&mut out[..rows * n]);
    }

    fn rope(&self, x: &mut EmuBuf, meta: &StepMeta, heads: usize, head_dim: usize, theta: f32) {
        args!("rope": bf_mut x);
        self.cpu.rope(x, meta, heads, head_dim, theta);
        round(&mut x[..meta.rows() * heads * head_dim]);
    }

    fn kv_store(
        &self,
        k: &EmuBuf,
        v: &EmuBuf,
        k_cache: &mut EmuBuf,
        v_cache: &mut EmuBuf,
        meta: &StepMeta,
        kv_dim: usize,
    ) {
        args!("kv_store": bf k, bf v, bf_mut k_cache, bf_mut v_cache);
        self.cpu.kv_store(k, v, k_cache, v_cache, meta, kv_dim);
    }

    fn attention(
        &self,
        q: &EmuBuf,
        k_cache: &EmuBuf,
        v_cache: &EmuBuf,
        out: &mut EmuBuf,
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        args!("attention": bf q, bf k_cache, bf v_cache, bf_mut out);
        let (qd, kvd, group, hd) = (heads * head_dim, kv_heads * head_dim, heads / kv_heads, head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        for seq in &meta.seqs {
            // Prefill rows take the flash kernel; single decode rows the split kernel (f32 P).
            let round_p = tensor_cores(hd) && group <= 16 && seq.n_new > 1;
            let rows = seq.row_start..seq.row_start + seq.n_new;
            out[rows.start * qd..rows.end * qd].par_chunks_mut(qd).enumerate().for_each(|(i, orow)| {
                let (r, visible) = (seq.row_start + i, seq.n_ctx - seq.n_new + i + 1);
                for h in 0..heads {
                    let off = (h / group) * hd;
                    let key = |t: usize| {
                        let s = cache_slot(&seq.block_table, t, meta.block_size) as usize * kvd + off;
                        (&k_cache[s..s + hd], &v_cache[s..s + hd])
                    };
                    attend(&q[r * qd + h * hd..][..hd], visible, key, scale, round_p, &mut orow[h * hd..][..hd]);
                }
                orow.iter_mut().for_each(|x| *x = to_bf16(*x));
            });
        }
    }

    fn swiglu(&self, gate: &EmuBuf, up: &EmuBuf, out: &mut EmuBuf, n: usize) {
        args!("swiglu": bf gate, bf up, bf_mut out);
        // silu(gate) rounded before the product, as transformers in bf16.
        out[..n].par_iter_mut().zip(&gate[..n]).zip(&up[..n]).for_each(|((o, &g), &u)| {
            *o = to_bf16(to_bf16(g / (1.0 + (-g).exp())) * u);
        });
    }

    fn add_assign(&self, x: &mut EmuBuf, y: &EmuBuf, n: usize) {
        same("add_assign", x, y);
        self.cpu.add_assign(&mut x.v, &y.v, n);
        if !x.f32 {
            round(&mut x.v[..n]);
        }
    }

    fn gather_logit_rows(&self, x: &EmuBuf, meta: &StepMeta, out: &mut EmuBuf, dim: usize) {
        args!("gather_logit_rows": bf x, bf_mut out);
        self.cpu.gather_logit_rows(x, meta, out, dim);
    }

    fn softmax(&self, x: &mut EmuBuf, rows: usize, cols: usize) {
        args!("softmax": bf_mut x);
        self.cpu.softmax(x, rows, cols);
        round(&mut x[..rows * cols]);
    }

    fn log_softmax(&self, x: &mut EmuBuf, rows: usize, cols: usize) {
        args!("log_softmax": bf_mut x);
        self.cpu.log_softmax(x, rows, cols);
        round(&mut x[..rows * cols]);
    }

    fn len(&self, x: &EmuBuf) -> usize {
        x.v.len()
    }

    fn zero(&self, x: &mut EmuBuf, n: usize) {
        self.cpu.zero(&mut x.v, n);
    }

    fn scale(&self, x: &mut EmuBuf, s: f32, n: usize) {
        self.cpu.scale(&mut x.v, s, n);
        if !x.f32 {
            round(&mut x.v[..n]);
        }
    }

    fn copy(&self, src: &EmuBuf, dst: &mut EmuBuf, n: usize) {
        same("copy", src, dst);
        self.cpu.copy(&src.v, &mut dst.v, n);
    }

    fn dropout(&self, x: &EmuBuf, out: &mut EmuBuf, n: usize, p: f32, seed: u64) {
        args!("dropout": bf x, bf_mut out);
        self.cpu.dropout(x, out, n, p, seed);
        round(&mut out[..n]);
    }

    /// The fused LoRA forward: `out = bf(x W^T + b)`, `xa = bf(xd A^T)`, then
    /// `out = bf(out + scale xa B^T)` (the second GEMM accumulates into the bf16 output).
    fn lora_linear(
        &self,
        x: &EmuBuf,
        xd: Option<&EmuBuf>,
        w: &EmuBuf,
        b: Option<&EmuBuf>,
        lora: LoraRef<'_, Self>,
        out: &mut EmuBuf,
        xa: &mut EmuBuf,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        let (lora_a, lora_b) = (lora.a, lora.b);
        args!("lora_linear": bf x, opt_bf xd, bf w, opt_bf b, bf lora_a, bf lora_b, bf_mut out, bf_mut xa);
        let r = lora.rank;
        self.cpu.linear(x, w, b, out, rows, k, n);
        round(&mut out[..rows * n]);
        mm(xa, as_is(xd.unwrap_or(x)), transposed(lora_a), rows, r, k, false, 1.0, true);
        round(&mut xa[..rows * r]);
        let mut y = vec![0f32; rows * n];
        mm(&mut y, as_is(xa), transposed(lora_b), rows, n, r, false, lora.scale, true);
        out[..rows * n].par_iter_mut().zip(&y).for_each(|(o, y)| *o = to_bf16(*o + y));
    }

    fn sample(
        &self,
        logits: &EmuBuf,
        vocab: usize,
        params: &[SamplingParams],
        rngs: &mut [crate::backend::sampling::Rng],
    ) -> Vec<u32> {
        args!("sample": bf logits);
        self.cpu.sample(logits, vocab, params, rngs)
    }
}

impl TrainBackend for Bf16Emu {
    fn embedding_bwd(&self, dout: &EmuBuf, meta: &StepMeta, dtable: &mut EmuBuf, dim: usize) {
        args!("embedding_bwd": bf dout, fp_mut dtable);
        self.cpu.embedding_bwd(dout, meta, dtable, dim);
    }

    fn rmsnorm_bwd(
        &self,
        dout: &EmuBuf,
        x: &EmuBuf,
        w: &EmuBuf,
        dx: &mut EmuBuf,
        dw: Option<&mut EmuBuf>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        args!("rmsnorm_bwd": bf dout, bf x, bf w, bf_mut dx, opt_fp_mut dw);
        self.cpu.rmsnorm_bwd(dout, x, w, dx, dw, rows, dim, eps);
        round(&mut dx[..rows * dim]);
    }

    fn linear_bwd(
        &self,
        dout: &EmuBuf,
        x: &EmuBuf,
        w: &EmuBuf,
        dx: Option<&mut EmuBuf>,
        dw: Option<&mut EmuBuf>,
        db: Option<&mut EmuBuf>,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        args!("linear_bwd": bf dout, bf x, bf w, opt_bf_mut dx, opt_fp_mut dw, opt_fp_mut db);
        let mut dx = dx;
        self.cpu.linear_bwd(dout, x, w, dx.as_deref_mut(), dw, db, rows, k, n);
        if let Some(dx) = dx {
            round(&mut dx[..rows * k]);
        }
    }

    fn rope_bwd(&self, dx: &mut EmuBuf, meta: &StepMeta, heads: usize, head_dim: usize, theta: f32) {
        args!("rope_bwd": bf_mut dx);
        self.cpu.rope_bwd(dx, meta, heads, head_dim, theta);
        round(&mut dx[..meta.rows() * heads * head_dim]);
    }

    fn attention_train(
        &self,
        q: &EmuBuf,
        k: &EmuBuf,
        v: &EmuBuf,
        out: &mut EmuBuf,
        lse: &mut EmuBuf,
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        args!("attention_train": bf q, bf k, bf v, bf_mut out, fp_mut lse);
        let (qd, kvd, group, hd) = (heads * head_dim, kv_heads * head_dim, heads / kv_heads, head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        for seq in &meta.seqs {
            let rows = seq.row_start..seq.row_start + seq.n_new;
            let outs = out[rows.start * qd..rows.end * qd].par_chunks_mut(qd);
            outs.zip(lse[rows.start * heads..rows.end * heads].par_chunks_mut(heads)).enumerate().for_each(
                |(i, (orow, lrow))| {
                    let r = seq.row_start + i;
                    for h in 0..heads {
                        let off = (h / group) * hd;
                        let key = |t: usize| {
                            let s = (seq.row_start + t) * kvd + off;
                            (&k[s..s + hd], &v[s..s + hd])
                        };
                        let (qh, oh) = (&q[r * qd + h * hd..][..hd], &mut orow[h * hd..][..hd]);
                        lrow[h] = attend(qh, i + 1, key, scale, tensor_cores(hd), oh);
                    }
                    orow.iter_mut().for_each(|x| *x = to_bf16(*x));
                },
            );
        }
    }

    /// With `D = dout·out`, `P = exp(scale q·k - lse)`, `dS = P (dout·v - D)`:
    /// `dq = scale Σ dS k`, `dk = scale Σ dS q`, `dv = Σ P dout`, accumulated in f32 and rounded
    /// once; the tensor-core kernels round P and dS to bf16 before the products.
    fn attention_train_bwd(
        &self,
        q: &EmuBuf,
        k: &EmuBuf,
        v: &EmuBuf,
        out: &EmuBuf,
        lse: &EmuBuf,
        dout: &EmuBuf,
        dq: &mut EmuBuf,
        dk: &mut EmuBuf,
        dv: &mut EmuBuf,
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        args!("attention_train_bwd": bf q, bf k, bf v, bf out, fp lse, bf dout, bf_mut dq, bf_mut dk, bf_mut dv);
        let (qd, kvd, group, hd) = (heads * head_dim, kv_heads * head_dim, heads / kv_heads, head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        let tc = |x: f32| if tensor_cores(hd) { to_bf16(x) } else { x };
        let rows = meta.rows();
        let delta: Vec<f32> = (0..rows * heads)
            .into_par_iter()
            .map(|rh| {
                let i = (rh / heads) * qd + (rh % heads) * hd;
                dot(&dout[i..i + hd], &out[i..i + hd])
            })
            .collect();
        // (P, dS) of query row r, head h and key row j.
        let p_ds = |r: usize, h: usize, j: usize| {
            let (qi, ki) = (r * qd + h * hd, j * kvd + (h / group) * hd);
            let p = (dot(&q[qi..qi + hd], &k[ki..ki + hd]) * scale - lse[r * heads + h]).exp();
            (p, p * (dot(&dout[qi..qi + hd], &v[ki..ki + hd]) - delta[r * heads + h]))
        };
        for seq in &meta.seqs {
            let (s0, s1) = (seq.row_start, seq.row_start + seq.n_new);
            dq[s0 * qd..s1 * qd].par_chunks_mut(qd).enumerate().for_each(|(i, dqr)| {
                let r = s0 + i;
                dqr.fill(0.0);
                for h in 0..heads {
                    for j in s0..=r {
                        let ki = j * kvd + (h / group) * hd;
                        axpy(&mut dqr[h * hd..][..hd], tc(p_ds(r, h, j).1), &k[ki..ki + hd]);
                    }
                }
                dqr.iter_mut().for_each(|x| *x = to_bf16(scale * *x));
            });
            let dks = dk[s0 * kvd..s1 * kvd].par_chunks_mut(kvd);
            dks.zip(dv[s0 * kvd..s1 * kvd].par_chunks_mut(kvd)).enumerate().for_each(|(jj, (dkr, dvr))| {
                let j = s0 + jj;
                dkr.fill(0.0);
                dvr.fill(0.0);
                for h in 0..heads {
                    let off = (h / group) * hd;
                    for r in j..s1 {
                        let (p, ds) = p_ds(r, h, j);
                        let qi = r * qd + h * hd;
                        axpy(&mut dvr[off..off + hd], tc(p), &dout[qi..qi + hd]);
                        axpy(&mut dkr[off..off + hd], tc(ds), &q[qi..qi + hd]);
                    }
                }
                dkr.iter_mut().for_each(|x| *x = to_bf16(scale * *x));
                dvr.iter_mut().for_each(|x| *x = to_bf16(*x));
            });
        }
    }

    fn swiglu_bwd(&self, dout: &EmuBuf, gate: &EmuBuf, up: &EmuBuf, dgate: &mut EmuBuf, dup: &mut EmuBuf, n: usize) {
        args!("swiglu_bwd": bf dout, bf gate, bf up, bf_mut dgate, bf_mut dup);
        self.cpu.swiglu_bwd(dout, gate, up, dgate, dup, n);
        round(&mut dgate[..n]);
        round(&mut dup[..n]);
    }

    fn token_logprobs(
        &self,
        h: &EmuBuf,
        w: &EmuBuf,
        targets: &[u32],
        logp: &mut EmuBuf,
        lse: &mut EmuBuf,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) {
        // f32 logits from bf16 inputs, f32 results: the CPU's arithmetic as is.
        args!("token_logprobs": bf h, bf w, fp_mut logp, fp_mut lse);
        self.cpu.token_logprobs(h, w, targets, logp, lse, rows, dim, vocab);
    }

    /// The logit gradient `dlogp (onehot - softmax)` is rounded to bf16 before both GEMMs;
    /// `dh` sums over the vocabulary in f32 and is rounded once; `dw` accumulates in f32.
    fn token_logprobs_bwd(
        &self,
        dlogp: &EmuBuf,
        h: &EmuBuf,
        w: &EmuBuf,
        targets: &[u32],
        lse: &EmuBuf,
        dh: &mut EmuBuf,
        dw: Option<&mut EmuBuf>,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) {
        args!("token_logprobs_bwd": fp dlogp, bf h, bf w, fp lse, bf_mut dh, opt_fp_mut dw);
        let mut dw = dw;
        let h = &h[..rows * dim];
        let chunk = vocab.clamp(1, 8192);
        let mut dh_acc = vec![0f32; rows * dim];
        let mut tile = vec![0f32; rows * chunk];
        for v0 in (0..vocab).step_by(chunk) {
            let c = chunk.min(vocab - v0);
            let (wc, g) = (&w[v0 * dim..(v0 + c) * dim], &mut tile[..rows * c]);
            mm(g, as_is(h), transposed(wc), rows, c, dim, false, 1.0, true);
            g.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
                let (s, l, t) = (dlogp[r], lse[r], targets[r] as usize);
                for (i, z) in row.iter_mut().enumerate() {
                    let hit = if v0 + i == t { 1.0 } else { 0.0 };
                    *z = to_bf16(s * (hit - (*z - l).exp()));
                }
            });
            mm(&mut dh_acc, as_is(g), as_is(wc), rows, dim, c, true, 1.0, true);
            if let Some(dw) = dw.as_mut() {
                mm(&mut dw[v0 * dim..(v0 + c) * dim], transposed(g), as_is(h), c, dim, rows, true, 1.0, true);
            }
        }
        round(&mut dh_acc);
        dh[..rows * dim].copy_from_slice(&dh_acc);
    }

    fn sum_squares(&self, x: &EmuBuf, n: usize) -> f64 {
        self.cpu.sum_squares(&x.v, n)
    }

    fn master_weights(&self) -> bool {
        true
    }

    /// The fused LoRA backward's GEMMs: `dxa = bf(s dout B)`, `dB += s dout^T xa`,
    /// `dA += dxa^T xd` (f32), `dx = bf(dout W)`, then the adapter path added by a second
    /// rounding GEMM (or, with dropout, rounded, masked and added).
    fn lora_linear_bwd(
        &self,
        dout: &EmuBuf,
        x: &EmuBuf,
        xd: Option<&EmuBuf>,
        xa: &EmuBuf,
        w: &EmuBuf,
        lora: LoraRef<'_, Self>,
        dx: &mut EmuBuf,
        da: &mut EmuBuf,
        db: &mut EmuBuf,
        dropout: Option<(f32, u64)>,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        let (lora_a, lora_b) = (lora.a, lora.b);
        args!("lora_linear_bwd": bf dout, bf x, opt_bf xd, bf xa, bf w, bf lora_a, bf lora_b, bf_mut dx, fp_mut da,
            fp_mut db);
        let (r, s, xd) = (lora.rank, lora.scale, xd.unwrap_or(x));
        let mut dxa = vec![0f32; rows * r];
        mm(&mut dxa, as_is(dout), as_is(lora_b), rows, r, n, false, s, true);
        round(&mut dxa);
        mm(db, transposed(dout), as_is(xa), n, r, rows, true, s, true);
        mm(da, transposed(&dxa), as_is(xd), r, k, rows, true, 1.0, true);
        let dx = &mut dx[..rows * k];
        mm(dx, as_is(dout), as_is(w), rows, k, n, false, 1.0, true);
        round(dx);
        match dropout {
            None => mm(dx, as_is(&dxa), as_is(lora_a), rows, k, r, true, 1.0, true),
            Some((p, seed)) => {
                let mut through = vec![0f32; rows * k];
                mm(&mut through, as_is(&dxa), as_is(lora_a), rows, k, r, false, 1.0, true);
                round(&mut through);
                let mut masked = vec![0f32; rows * k];
                self.cpu.dropout(&through, &mut masked, rows * k, p, seed);
                round(&mut masked);
                dx.iter_mut().zip(&masked).for_each(|(d, m)| *d += m);
            }
        }
        round(dx);
    }

    fn adamw(&self, tensors: &mut [AdamWTensor<'_, Self>], hp: &AdamW, grad_scale: f32, step: u64) {
        // The update is made in the f32 master; the bf16 parameter receives its rounding.
        let mut on_cpu: Vec<AdamWTensor<CpuBackend>> = tensors
            .iter_mut()
            .map(|t| {
                let master = t.master.as_deref_mut().expect("precision contract: adamw needs f32 master weights");
                let (param, grad, m, v) = (&*t.param, t.grad, &mut *t.m, &mut *t.v);
                args!("adamw": bf param, fp_mut master, fp grad, fp_mut m, fp_mut v);
                let _ = param;
                AdamWTensor { param: master, master: None, grad, m, v, n: t.n, decay: t.decay }
            })
            .collect();
        self.cpu.adamw(&mut on_cpu, hp, grad_scale, step);
        drop(on_cpu);
        for t in tensors.iter_mut() {
            let master = &t.master.as_deref().unwrap().v[..t.n];
            t.param.v[..t.n].iter_mut().zip(master).for_each(|(p, m)| *p = to_bf16(*m));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::diagnostics::selftest::{fixture_models, run_checks, train::run_train_checks, Check, Report};
    use crate::model::lora::{Lora, LoraConfig, Target};
    use crate::model::training::{Grads, TrainBatch};
    use crate::model::Qwen2;
    use crate::train::{checkpoint, Decay, OptimConfig, Optimizer, Schedule};
    use rand::{Rng, SeedableRng};

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// `err / tol`; an exact check (tol 0) is 0 when exact, else infinite.
    fn ratio(c: &Check) -> f64 {
        if c.tol > 0.0 {
            c.err / c.tol
        } else if c.err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    }

    /// The worst check of each group (by err / tol), then every failing check.
    fn print_margins(rep: &Report) {
        let mut groups: Vec<&str> = vec![];
        for c in &rep.checks {
            if !groups.contains(&c.group.as_str()) {
                groups.push(&c.group);
            }
        }
        println!("{:12} {:>6} {:>10} {:>9} {:>7}  worst check", "group", "checks", "worst err", "tol", "err/tol");
        for g in groups {
            let cs: Vec<_> = rep.checks.iter().filter(|c| c.group == g).collect();
            let worst = cs.iter().copied().max_by(|a, b| ratio(a).total_cmp(&ratio(b))).unwrap();
            println!(
                "{:12} {:>6} {:>10.3e} {:>9.1e} {:>7.3}  {} {}",
                g,
                cs.len(),
                worst.err,
                worst.tol,
                ratio(worst),
                worst.name,
                worst.note
            );
        }
        for c in rep.checks.iter().filter(|c| c.group == "model" || c.group == "train step") {
            println!("  {:10} {:60} err {:9.3e} tol {:8.1e}  {}", c.group, c.name, c.err, c.tol, c.note);
        }
        for c in rep.checks.iter().filter(|c| !c.passed) {
            println!("FAIL {} {}: err {:.3e} tol {:.1e} {}", c.group, c.name, c.err, c.tol, c.note);
        }
    }

    fn assert_passed(rep: &Report) {
        let failed: Vec<String> = rep
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{} {} ({:.3e})", c.group, c.name, c.err))
            .collect();
        assert!(failed.is_empty(), "selftest checks failed under the bf16 emulation: {failed:#?}");
    }

    #[test]
    fn inference_selftest_passes_under_bf16_emulation() {
        let models = fixture_models(&fixtures());
        assert_eq!(models.len(), 3);
        let mut rep = Report { quiet: true, ..Default::default() };
        run_checks(&Bf16Emu::new(), &CpuBackend::new(), &models, &mut rep, "emu").unwrap();
        print_margins(&rep);
        assert_passed(&rep);
    }

    #[test]
    fn training_selftest_passes_under_bf16_emulation() {
        let models = fixture_models(&fixtures());
        let mut rep = Report { quiet: true, ..Default::default() };
        run_train_checks(&Bf16Emu::new(), &CpuBackend::new(), &models, &mut rep, "emu").unwrap();
        print_margins(&rep);
        assert_passed(&rep);
    }

    #[test]
    #[should_panic(expected = "precision contract: rmsnorm_bwd needs `dw` in f32 and got bf16")]
    fn a_contract_violation_panics_with_the_op_and_argument() {
        let be = Bf16Emu::new();
        let (x, w) = (be.upload_f32(&[1.0; 8]), be.upload_f32(&[1.0; 4]));
        let (mut dx, mut dw) = (be.zeros(8), be.zeros(4));
        be.rmsnorm_bwd(&x, &x, &w, &mut dx, Some(&mut dw), 2, 4, 1e-6);
    }

    /// Random sequences with a trained suffix.
    fn sequences(rng: &mut impl Rng, lengths: &[usize], vocab: usize) -> Vec<(Vec<u32>, Vec<bool>)> {
        lengths
            .iter()
            .map(|&n| ((0..n).map(|_| rng.gen_range(0..vocab as u32)).collect(), (0..n).map(|i| i >= n / 4).collect()))
            .collect()
    }

    /// One optimiser step of SFT over `micro` micro-batches (LoRA dropout on, the last one with
    /// activation recomputation), as `train::sft` runs it; returns the loss.
    fn sft_step(
        be: &Bf16Emu,
        model: &mut Qwen2<Bf16Emu>,
        opt: &mut Optimizer<Bf16Emu>,
        grads: &mut Grads<Bf16Emu>,
        micro: &[Vec<(Vec<u32>, Vec<bool>)>],
    ) -> Result<f64> {
        grads.zero(be, &model.cfg);
        let mut loss = 0.0;
        for (i, seqs) in micro.iter().enumerate() {
            let mut batch = TrainBatch::pack(seqs)?;
            batch.dropout_seed = Some(opt.step * 31 + i as u64);
            let denom = batch.trained_rows().max(1) as f32 * micro.len() as f32;
            let (logp, trace) = model.train_forward(be, &batch, i + 1 == micro.len())?;
            loss += batch.nll(&logp, denom);
            model.train_backward(be, &batch, trace, &batch.nll_dlogp(denom), grads)?;
        }
        let cfg = model.cfg.clone();
        let report = opt.step(be, model.trainable_mut(), grads.tensors(&cfg))?;
        model.sync_token_rows(be);
        assert!(report.grad_norm.is_finite() && report.grad_norm > 0.0);
        Ok(loss)
    }

    /// Every trained parameter is bf16 and the rounding of its f32 master.
    fn assert_params_round_masters(be: &Bf16Emu, model: &Qwen2<Bf16Emu>, opt: &Optimizer<Bf16Emu>) {
        assert_eq!(opt.master.len(), model.trainable_tensors().len());
        for (p, m) in model.trainable_tensors().into_iter().zip(&opt.master) {
            assert!(!p.f32 && m.f32);
            assert!(be.to_f32(p).iter().zip(&m.v).all(|(p, m)| *p == to_bf16(*m)));
        }
    }

    #[test]
    fn lora_sft_with_checkpoint_and_resume_keeps_the_precision_contract() -> Result<()> {
        let be = Bf16Emu::new();
        let dir = fixtures().join("tiny");
        let lcfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: Target::ALL.to_vec(),
            seed: 3,
            trainable_tokens: None,
        };
        let ocfg = OptimConfig {
            schedule: Schedule { lr: 2e-3, warmup_steps: 1, total_steps: 4, decay: Decay::Cosine, min_lr_ratio: 0.1 },
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(0.5),
        };
        let start = || -> Result<(Qwen2<Bf16Emu>, Optimizer<Bf16Emu>, Grads<Bf16Emu>)> {
            let mut model = Qwen2::load(&be, &dir)?;
            // With trained token rows (as `lora.trainable_tokens` makes them).
            let mut lora = Lora::init(&be, &model.cfg, &lcfg)?;
            lora.tokens = Some(crate::model::token_rows::TokenRows::from_model(&be, &model, &[453, 454, 7]));
            model.attach_lora(&be, lora);
            let opt = Optimizer::new(&be, model.trainable(), ocfg);
            let grads = Grads::zeros_for(&be, &model);
            Ok((model, opt, grads))
        };
        let (mut model, mut opt, mut grads) = start()?;
        let vocab = model.cfg.vocab_size;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(41);
        let micro = vec![sequences(&mut rng, &[40, 7, 66], vocab), sequences(&mut rng, &[90, 12], vocab)];

        let run = tempfile::tempdir()?;
        let mut losses = vec![];
        for step in 1..=4u64 {
            losses.push(sft_step(&be, &mut model, &mut opt, &mut grads, &micro)?);
            if step == 2 {
                checkpoint::save(&be, run.path(), &model, &opt, step, &serde_json::json!({ "step": step }))?;
            }
        }
        assert_params_round_masters(&be, &model, &opt);
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");

        // Resume from step 2 in a fresh model and optimiser: the same steps 3 and 4.
        let (mut model2, mut opt2, mut grads2) = start()?;
        let state: serde_json::Value = checkpoint::load(&be, run.path(), &mut model2, &mut opt2)?;
        opt2.step = state["step"].as_u64().unwrap();
        assert_params_round_masters(&be, &model2, &opt2);
        for (step, want) in [(3, losses[2]), (4, losses[3])] {
            let got = sft_step(&be, &mut model2, &mut opt2, &mut grads2, &micro)?;
            assert!((got - want).abs() <= 1e-6 * want.abs(), "step {step}: resumed loss {got} vs {want}");
        }
        for (a, b) in opt.master.iter().zip(&opt2.master) {
            assert_eq!(a.v, b.v);
        }

        // Evaluation (forward only, recomputation mode) and the adapter export from the masters,
        // as the end of an SFT run does.
        let (logp, _) = model.train_forward(&be, &TrainBatch::pack(&micro[1])?, true)?;
        assert!(logp.iter().all(|l| l.is_finite()));
        for (p, m) in model.trainable_mut().into_iter().zip(opt.master.iter_mut()) {
            std::mem::swap(p, m);
        }
        crate::model::export::export_peft(&be, &model, "tiny", &run.path().join("adapter"))?;
        Ok(())
    }

    #[test]
    fn full_finetuning_and_tempered_steps_keep_the_precision_contract() -> Result<()> {
        let be = Bf16Emu::new();
        let ocfg = OptimConfig {
            schedule: Schedule { lr: 1e-3, warmup_steps: 0, total_steps: 2, decay: Decay::Linear, min_lr_ratio: 0.0 },
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            max_grad_norm: Some(1.0),
        };
        // Tied and untied heads.
        for name in ["tiny", "tiny-untied"] {
            let mut model = Qwen2::load(&be, &fixtures().join(name))?;
            let mut opt = Optimizer::new(&be, model.trainable(), ocfg);
            let mut grads = Grads::zeros_for(&be, &model);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(43);
            let micro = vec![sequences(&mut rng, &[33, 70], model.cfg.vocab_size)];
            for _ in 0..2 {
                sft_step(&be, &mut model, &mut opt, &mut grads, &micro)?;
            }
            assert_params_round_masters(&be, &model, &opt);
            assert!(grads.tensors(&model.cfg).iter().all(|g| g.f32));
            // RL scores tokens at a sampling temperature: the hidden state and its gradient scaled.
            let mut batch = TrainBatch::pack(&micro[0])?;
            batch.temperature = 0.7;
            let (logp, trace) = model.train_forward(&be, &batch, false)?;
            let dlogp: Vec<f32> = logp.iter().map(|_| rng.gen_range(-0.1..0.1)).collect();
            grads.zero(&be, &model.cfg);
            model.train_backward(&be, &batch, trace, &dlogp, &mut grads)?;
        }
        Ok(())
    }
}
