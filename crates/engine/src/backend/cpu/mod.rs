//! The reference backend: f32 on the host, parallel with rayon.

mod attention;
mod logprob;
mod matmul;
mod vector;

use attention::Heads;

use matmul::matvec_rows;
pub use matmul::{as_is, mm, transposed, Mat};
use vector::{dot, softmax_in_place};

use anyhow::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;

use super::{AdamW, AdamWTensor, Backend, DType, HostTensor, StepMeta, TrainBackend};

#[derive(Debug, Clone, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

/// Rows at or below this count use the streaming matrix-vector kernel instead of `gemm`.
const SMALL_ROWS: usize = 8;

fn to_f32(t: &HostTensor) -> Vec<f32> {
    let n = t.numel();
    let mut out = vec![0f32; n];
    const CHUNK: usize = 1 << 16;
    let esz = t.dtype.size();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dst)| {
        let src = &t.bytes[c * CHUNK * esz..(c * CHUNK + dst.len()) * esz];
        match t.dtype {
            DType::F32 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
            DType::F16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
        }
    });
    out
}

/// `inv_freq[i] = 1 / theta^(2i/d)`, computed in f32 exactly as transformers does.
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect()
}

/// Rotary embedding (rotate-half form) of `x: [rows, heads, head_dim]` by `sign * angle`.
fn rotate(x: &mut [f32], positions: &[u32], heads: usize, head_dim: usize, theta: f32, sign: f32) {
    let inv_freq = rope_inv_freq(head_dim, theta);
    let half = head_dim / 2;
    x[..positions.len() * heads * head_dim].par_chunks_mut(heads * head_dim).zip(positions).for_each(|(row, &pos)| {
        // freqs in f32 as transformers computes them; cos/sin rounded once from f64.
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|&f| {
                let a = (pos as f32 * f) as f64;
                (a.cos() as f32, sign * a.sin() as f32)
            })
            .unzip();
        for h in row.chunks_mut(head_dim) {
            let (lo, hi) = h.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * cos[i] - b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    });
}

/// Asks the kernel to back a large, fresh buffer with transparent huge pages. Training
/// allocates gigabytes of zeroed buffers per step; with 4 KiB pages their first touches cost
/// more page faults (and, in a VM, TLB-shootdown interrupts) than the arithmetic.
fn advise_huge_pages(v: &[f32]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(v);
    if bytes < 2 * HUGE {
        return;
    }
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_ptr() as usize + bytes) & !(HUGE - 1);
    if end > start {
        // SAFETY: the range lies inside `v`'s allocation; MADV_HUGEPAGE changes no contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Meta = StepMeta;

    fn name(&self) -> String {
        format!("cpu (f32, {} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, n: usize) -> Vec<f32> {
        let v = vec![0.0f32; n];
        advise_huge_pages(&v);
        v
    }

    fn upload_f32(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }

    fn write_f32(&self, dst: &mut Vec<f32>, data: &[f32]) {
        dst[..data.len()].copy_from_slice(data);
    }

    fn upload(&self, t: &HostTensor) -> Result<Vec<f32>> {
        if t.bytes.len() != t.numel() * t.dtype.size() {
            bail!(
                "tensor data is {} bytes, expected {} for {:?} {:?}",
                t.bytes.len(),
                t.numel() * t.dtype.size(),
                t.dtype,
                t.shape
            );
        }
        Ok(to_f32(t))
    }

    fn to_f32(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }

    fn prepare(&self, meta: &StepMeta) -> StepMeta {
        meta.clone()
    }

    fn embedding(&self, table: &Vec<f32>, meta: &StepMeta, out: &mut Vec<f32>, dim: usize) {
        out[..meta.rows() * dim].par_chunks_mut(dim).zip(&meta.tokens).for_each(|(row, &t)| {
            let t = t as usize;
            row.copy_from_slice(&table[t * dim..(t + 1) * dim]);
        });
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, out: &mut Vec<f32>, rows: usize, dim: usize, eps: f32) {
        out[..rows * dim].par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, xr)| {
            let inv = 1.0 / (dot(xr, xr) / dim as f32 + eps).sqrt();
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w.iter()) {
                *o = wv * (xv * inv);
            }
        });
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: Option<&Vec<f32>>,
        out: &mut Vec<f32>,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        let out = &mut out[..rows * n];
        if rows <= SMALL_ROWS {
            matvec_rows(out, x, w, rows, k, n);
            if let Some(b) = b {
                out.chunks_mut(n).for_each(|r| r.iter_mut().zip(b.iter()).for_each(|(o, b)| *o += b));
            }
            return;
        }
        if let Some(b) = b {
            out.par_chunks_mut(n).for_each(|r| r.copy_from_slice(&b[..n]));
        }
        mm(out, as_is(x), transposed(w), rows, n, k, b.is_some(), 1.0, true);
    }

    fn rope(&self, x: &mut Vec<f32>, meta: &StepMeta, heads: usize, head_dim: usize, theta: f32) {
        rotate(x, &meta.positions, heads, head_dim, theta, 1.0);
    }

    fn kv_store(
        &self,
        k: &Vec<f32>,
        v: &Vec<f32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        meta: &StepMeta,
        kv_dim: usize,
    ) {
        for (r, &slot) in meta.slots.iter().enumerate() {
            let s = slot as usize * kv_dim;
            k_cache[s..s + kv_dim].copy_from_slice(&k[r * kv_dim..(r + 1) * kv_dim]);
            v_cache[s..s + kv_dim].copy_from_slice(&v[r * kv_dim..(r + 1) * kv_dim]);
        }
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        out: &mut Vec<f32>,
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        attention::paged(q, k_cache, v_cache, out, meta, Heads { heads, kv_heads, head_dim });
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>, n: usize) {
        out[..n]
            .par_chunks_mut(4096)
            .zip(gate[..n].par_chunks(4096))
            .zip(up[..n].par_chunks(4096))
            .for_each(|((o, g), u)| vector::swiglu(o, g, u));
    }

    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>, n: usize) {
        x[..n].par_chunks_mut(4096).zip(y[..n].par_chunks(4096)).for_each(|(x, y)| {
            x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        });
    }

    fn gather_logit_rows(&self, x: &Vec<f32>, meta: &StepMeta, out: &mut Vec<f32>, dim: usize) {
        for (i, &r) in meta.logit_rows.iter().enumerate() {
            let r = r as usize;
            out[i * dim..(i + 1) * dim].copy_from_slice(&x[r * dim..(r + 1) * dim]);
        }
    }

    fn softmax(&self, x: &mut Vec<f32>, rows: usize, cols: usize) {
        x[..rows * cols].par_chunks_mut(cols).for_each(|r| {
            softmax_in_place(r);
        });
    }

    fn log_softmax(&self, x: &mut Vec<f32>, rows: usize, cols: usize) {
        x[..rows * cols].par_chunks_mut(cols).for_each(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            row.iter_mut().for_each(|v| *v -= lse);
        });
    }

    fn scale(&self, x: &mut Vec<f32>, s: f32, n: usize) {
        x[..n].par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
    }

    fn len(&self, x: &Vec<f32>) -> usize {
        x.len()
    }

    fn zero(&self, x: &mut Vec<f32>, n: usize) {
        x[..n].par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
    }

    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>, n: usize) {
        dst[..n].copy_from_slice(&src[..n]);
    }

    fn copy_rows(&self, src: &Vec<f32>, src_rows: &[u32], dst: &mut Vec<f32>, dst_rows: &[u32], dim: usize) {
        assert_eq!(src_rows.len(), dst_rows.len(), "copy_rows: as many source rows as destination rows");
        for (&s, &d) in src_rows.iter().zip(dst_rows) {
            let (s, d) = (s as usize * dim, d as usize * dim);
            dst[d..d + dim].copy_from_slice(&src[s..s + dim]);
        }
    }

    fn dropout(&self, x: &Vec<f32>, out: &mut Vec<f32>, n: usize, p: f32, seed: u64) {
        let s = 1.0 / (1.0 - p);
        out[..n].par_chunks_mut(1 << 14).enumerate().for_each(|(c, o)| {
            let base = c << 14;
            for (j, v) in o.iter_mut().enumerate() {
                let i = base + j;
                *v = if crate::backend::dropout_keeps(seed, i as u64, p) { x[i] * s } else { 0.0 };
            }
        });
    }
}

impl TrainBackend for CpuBackend {
    fn embedding_bwd(&self, dout: &Vec<f32>, meta: &StepMeta, dtable: &mut Vec<f32>, dim: usize) {
        // Serial: two rows may name the same token.
        for (r, &t) in meta.tokens.iter().enumerate() {
            let dst = &mut dtable[t as usize * dim..(t as usize + 1) * dim];
            dst.iter_mut().zip(&dout[r * dim..(r + 1) * dim]).for_each(|(a, b)| *a += b);
        }
    }

    fn rmsnorm_bwd(
        &self,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dx: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        // y = w * x * inv, inv = (mean(x^2) + eps)^-1/2:
        // dx = inv * (dout * w) - x * inv^3 / dim * sum(dout * w * x);  dw = sum_rows(dout * x * inv).
        let inv: Vec<f32> =
            x[..rows * dim].par_chunks(dim).map(|xr| 1.0 / (dot(xr, xr) / dim as f32 + eps).sqrt()).collect();
        dx[..rows * dim].par_chunks_mut(dim).enumerate().for_each(|(r, dxr)| {
            let (xr, dr) = (&x[r * dim..(r + 1) * dim], &dout[r * dim..(r + 1) * dim]);
            let c: f32 = (0..dim).map(|i| dr[i] * w[i] * xr[i]).sum::<f32>() * inv[r].powi(3) / dim as f32;
            for i in 0..dim {
                dxr[i] = inv[r] * dr[i] * w[i] - xr[i] * c;
            }
        });
        if let Some(dw) = dw {
            dw[..dim].par_chunks_mut(64).enumerate().for_each(|(c, dwc)| {
                for (j, d) in dwc.iter_mut().enumerate() {
                    let i = c * 64 + j;
                    *d += (0..rows).map(|r| dout[r * dim + i] * x[r * dim + i] * inv[r]).sum::<f32>();
                }
            });
        }
    }

    fn linear_bwd(
        &self,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        dw: Option<&mut Vec<f32>>,
        db: Option<&mut Vec<f32>>,
        rows: usize,
        k: usize,
        n: usize,
    ) {
        if let Some(dx) = dx {
            mm(dx, as_is(dout), as_is(w), rows, k, n, false, 1.0, true);
        }
        if let Some(dw) = dw {
            mm(dw, transposed(dout), as_is(x), n, k, rows, true, 1.0, true);
        }
        if let Some(db) = db {
            for r in 0..rows {
                db[..n].iter_mut().zip(&dout[r * n..(r + 1) * n]).for_each(|(a, b)| *a += b);
            }
        }
    }

    fn rope_bwd(&self, dx: &mut Vec<f32>, meta: &StepMeta, heads: usize, head_dim: usize, theta: f32) {
        // The rotation is orthogonal: its gradient is the rotation by the opposite angle.
        rotate(dx, &meta.positions, heads, head_dim, theta, -1.0);
    }

    fn attention_train(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        attention::train_fwd(q, k, v, out, lse, &meta.seqs, Heads { heads, kv_heads, head_dim });
    }

    fn attention_train_bwd(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        let s = Heads { heads, kv_heads, head_dim };
        attention::train_bwd(q, k, v, out, lse, dout, dq, dk, dv, &meta.seqs, s);
    }

    fn swiglu_bwd(
        &self,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        n: usize,
    ) {
        dgate[..n].par_chunks_mut(4096).zip(dup[..n].par_chunks_mut(4096)).enumerate().for_each(|(c, (dg, du))| {
            let r = c * 4096..c * 4096 + dg.len();
            vector::swiglu_bwd(&dout[r.clone()], &gate[r.clone()], &up[r], dg, du);
        });
    }

    fn token_logprobs(
        &self,
        h: &Vec<f32>,
        w: &Vec<f32>,
        targets: &[u32],
        logp: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) {
        logprob::forward(h, w, targets, logp, lse, rows, dim, vocab);
    }

    fn token_logprobs_bwd(
        &self,
        dlogp: &Vec<f32>,
        h: &Vec<f32>,
        w: &Vec<f32>,
        targets: &[u32],
        lse: &Vec<f32>,
        dh: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) {
        logprob::backward(dlogp, h, w, targets, lse, dh, dw.map(|d| d.as_mut_slice()), rows, dim, vocab);
    }

    fn sum_squares(&self, x: &Vec<f32>, n: usize) -> f64 {
        // Partials in a fixed order, summed serially: the same bits on every run, which exact
        // resume of a training run relies on (rayon's own reduction order may vary).
        let partials: Vec<f64> =
            x[..n].par_chunks(1 << 14).map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>()).collect();
        partials.iter().sum()
    }

    fn adamw(&self, tensors: &mut [AdamWTensor<'_, Self>], hp: &AdamW, grad_scale: f32, step: u64) {
        // torch.optim.AdamW (single-tensor path), step counted from 1.
        let bc1 = 1.0 - (hp.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(step as i32);
        let step_size = (hp.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        for t in tensors.iter_mut() {
            let n = t.n;
            let decay = 1.0 - hp.lr * if t.decay { hp.weight_decay } else { 0.0 };
            t.param[..n]
                .par_chunks_mut(1 << 14)
                .zip(t.grad[..n].par_chunks(1 << 14))
                .zip(t.m[..n].par_chunks_mut(1 << 14))
                .zip(t.v[..n].par_chunks_mut(1 << 14))
                .for_each(|(((p, g), m), v)| {
                    for i in 0..p.len() {
                        let g = g[i] * grad_scale;
                        p[i] *= decay;
                        m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
                        v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
                        let denom = v[i].sqrt() / bc2_sqrt + hp.eps;
                        p[i] -= step_size * m[i] / denom;
                    }
                });
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each op against a naive, obviously-correct loop (the model as a whole is checked
    //! against transformers in tests/it/model_reference.rs).
    use super::*;
    use crate::backend::SeqSlice;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    fn naive_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut s = b.map(|b| b[j] as f64).unwrap_or(0.0);
                for i in 0..k {
                    s += x[r * k + i] as f64 * w[j * k + i] as f64;
                }
                out[r * n + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn linear_both_paths_with_and_without_bias() {
        let be = CpuBackend::new();
        for (rows, k, n) in [(1, 37, 19), (3, 64, 130), (8, 5, 7), (9, 33, 65), (100, 96, 40)] {
            let x = rand_vec(rows * k, 1);
            let w = rand_vec(n * k, 2);
            let b = rand_vec(n, 3);
            let mut out = vec![0f32; rows * n];
            be.linear(&x, &w, Some(&b), &mut out, rows, k, n);
            close(&out, &naive_linear(&x, &w, Some(&b), rows, k, n), 1e-5);
            be.linear(&x, &w, None, &mut out, rows, k, n);
            close(&out, &naive_linear(&x, &w, None, rows, k, n), 1e-5);
        }
    }

    #[test]
    fn rmsnorm_swiglu_add_softmax() {
        let be = CpuBackend::new();
        let (rows, dim) = (3, 10);
        let x = rand_vec(rows * dim, 4);
        let w = rand_vec(dim, 5);
        let mut out = vec![0f32; rows * dim];
        be.rmsnorm(&x, &w, &mut out, rows, dim, 1e-6);
        for r in 0..rows {
            let xr = &x[r * dim..(r + 1) * dim];
            let rms = (xr.iter().map(|v| v * v).sum::<f32>() / dim as f32 + 1e-6).sqrt();
            let want: Vec<f32> = xr.iter().zip(&w).map(|(v, w)| w * v / rms).collect();
            close(&out[r * dim..(r + 1) * dim], &want, 1e-6);
        }
        let (g, u) = (rand_vec(30, 6), rand_vec(30, 7));
        let mut o = vec![0f32; 30];
        be.swiglu(&g, &u, &mut o, 30);
        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g * (1.0 / (1.0 + (-g).exp())) * u).collect();
        close(&o, &want, 1e-6);
        let mut a = g.clone();
        be.add_assign(&mut a, &u, 30);
        close(&a, &g.iter().zip(&u).map(|(x, y)| x + y).collect::<Vec<_>>(), 0.0);

        let mut s = rand_vec(2 * 7, 8);
        let mut ls = s.clone();
        be.softmax(&mut s, 2, 7);
        be.log_softmax(&mut ls, 2, 7);
        for r in 0..2 {
            assert!((s[r * 7..(r + 1) * 7].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        close(&ls.iter().map(|v| v.exp()).collect::<Vec<_>>(), &s, 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        let be = CpuBackend::new();
        let (heads, hd) = (2, 8);
        let x = rand_vec(2 * heads * hd, 9);
        let meta = StepMeta { positions: vec![0, 5], tokens: vec![0, 0], slots: vec![0, 1], ..Default::default() };
        let mut y = x.clone();
        be.rope(&mut y, &meta, heads, hd, 10000.0);
        close(&y[..heads * hd], &x[..heads * hd], 0.0); // position 0 is the identity
        let inv = rope_inv_freq(hd, 10000.0);
        for h in 0..heads {
            let base = heads * hd + h * hd;
            for i in 0..hd / 2 {
                let a = 5.0 * inv[i] as f64;
                let (x1, x2) = (x[base + i] as f64, x[base + i + hd / 2] as f64);
                assert!((y[base + i] as f64 - (x1 * a.cos() - x2 * a.sin())).abs() < 1e-6);
                assert!((y[base + i + hd / 2] as f64 - (x2 * a.cos() + x1 * a.sin())).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn attention_matches_naive_causal_gqa_over_paged_cache() {
        let be = CpuBackend::new();
        let (heads, kv_heads, hd, bs) = (6, 2, 4, 4);
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        // Two sequences: one with 3 cached tokens and 70 new (two query chunks), one decoding
        // a single token after 9; blocks deliberately out of order.
        let lens = [(3usize, 70usize), (9, 1)];
        let tables = [vec![7u32, 2, 9, 0, 1, 3, 4, 5, 6, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18], vec![21u32, 19, 20]];
        let k_all: Vec<Vec<f32>> =
            lens.iter().enumerate().map(|(s, (p, n))| rand_vec((p + n) * kvd, 10 + s as u64)).collect();
        let v_all: Vec<Vec<f32>> =
            lens.iter().enumerate().map(|(s, (p, n))| rand_vec((p + n) * kvd, 20 + s as u64)).collect();
        let mut k_cache = vec![0f32; 22 * bs * kvd];
        let mut v_cache = k_cache.clone();
        let mut meta = StepMeta { block_size: bs, ..Default::default() };
        for (s, &(past, new)) in lens.iter().enumerate() {
            for t in 0..past + new {
                let slot = crate::backend::cache_slot(&tables[s], t, bs) as usize * kvd;
                k_cache[slot..slot + kvd].copy_from_slice(&k_all[s][t * kvd..(t + 1) * kvd]);
                v_cache[slot..slot + kvd].copy_from_slice(&v_all[s][t * kvd..(t + 1) * kvd]);
            }
            meta.seqs.push(SeqSlice {
                row_start: meta.tokens.len(),
                n_new: new,
                n_ctx: past + new,
                block_table: tables[s].clone(),
            });
            meta.tokens.extend(std::iter::repeat_n(0, new));
        }
        let rows = meta.tokens.len();
        let q = rand_vec(rows * qd, 30);
        let mut out = vec![0f32; rows * qd];
        be.attention(&q, &k_cache, &v_cache, &mut out, &meta, heads, kv_heads, hd);
        for (s, seq) in meta.seqs.iter().enumerate() {
            let past = lens[s].0;
            for i in 0..seq.n_new {
                for h in 0..heads {
                    let kvh = h / (heads / kv_heads);
                    let qv = &q[(seq.row_start + i) * qd + h * hd..][..hd];
                    let visible = past + i + 1;
                    let scores: Vec<f64> = (0..visible)
                        .map(|t| {
                            (0..hd).map(|d| qv[d] as f64 * k_all[s][t * kvd + kvh * hd + d] as f64).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|v| (v - m).exp()).sum();
                    for d in 0..hd {
                        let want: f64 = (0..visible)
                            .map(|t| (scores[t] - m).exp() / z * v_all[s][t * kvd + kvh * hd + d] as f64)
                            .sum();
                        let got = out[(seq.row_start + i) * qd + h * hd + d] as f64;
                        assert!((got - want).abs() < 1e-5, "seq {s} row {i} head {h} dim {d}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn weights_convert_from_every_dtype() {
        let be = CpuBackend::new();
        let vals = [1.5f32, -2.25, 0.0, 3.0e-3];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let hf: Vec<u8> = vals.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        for (dtype, bytes, tol) in [(DType::F32, &f32b, 0.0), (DType::BF16, &bf, 1e-2), (DType::F16, &hf, 1e-3)] {
            let t = HostTensor { dtype, shape: vec![4], bytes };
            close(&be.upload(&t).unwrap(), &vals, tol);
        }
        let short = HostTensor { dtype: DType::F32, shape: vec![5], bytes: &f32b };
        assert!(be.upload(&short).is_err());
    }
}
#[cfg(test)]
mod grad_tests;
