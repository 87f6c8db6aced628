//! The reference backend: f32 on the host, parallel with rayon.
//!
//! Large matrix products go through the `gemm` crate (runtime-dispatched AVX2/AVX-512
//! micro-kernels, what candle uses). Products with only a few rows — the decode step — are
//! memory-bound, so they get a dedicated kernel that streams every weight row once for all
//! input rows. Everything else is a plain loop written to auto-vectorise.

use anyhow::{bail, Result};
use gemm::Parallelism;
use half::{bf16, f16};
use rayon::prelude::*;

use super::{Backend, DType, HostTensor, StepMeta};

#[derive(Debug, Clone, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

/// A raw pointer that rayon tasks may share because each writes a disjoint region.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Rows at or below this count use the streaming matrix-vector kernel instead of `gemm`.
const SMALL_ROWS: usize = 8;

/// `dst[m, n] (+)= lhs[m, k] @ rhs^T` on one thread, `rhs: [n, k]`; `dst` has row stride
/// `ldd`. `beta` scales the product; with `accumulate` the old `dst` is kept.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_nt_serial(
    dst: *mut f32,
    ldd: usize,
    lhs: *const f32,
    rhs: *const f32,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        accumulate,
        lhs,
        1,
        k as isize,
        rhs,
        k as isize,
        1,
        1.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// `dst[m, n] (+)= lhs[m, k] @ rhs^T`, `rhs: [n, k]`, all row-major.
///
/// With `par`, the product is split into independent blocks of at most 512 output columns
/// (or into row blocks when the output is narrow), one single-threaded `gemm` each. On two
/// cores `gemm`'s own threading reached ~116 GFLOP/s at the Qwen2.5-0.5B MLP shape, these
/// blocks ~155 (PyTorch/MKL: ~140-175); the weight block stays cache-resident.
#[allow(clippy::too_many_arguments)]
fn matmul_nt(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    beta: f32,
    par: bool,
) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= n * k);
    let threads = if par { rayon::current_num_threads() } else { 1 };
    let (d, l, r) = (
        SharedMut(dst.as_mut_ptr()),
        lhs.as_ptr() as usize,
        rhs.as_ptr() as usize,
    );
    // SAFETY (both arms): blocks are disjoint and every access stays inside the slices
    // checked above.
    if threads > 1 && n >= 64 * threads {
        let cols = n.div_ceil(threads).next_multiple_of(16).min(512);
        (0..n.div_ceil(cols)).into_par_iter().for_each(|t| {
            let (lo, hi) = (t * cols, ((t + 1) * cols).min(n));
            unsafe {
                gemm_nt_serial(
                    d.ptr().add(lo),
                    n,
                    l as *const f32,
                    (r as *const f32).add(lo * k),
                    m,
                    hi - lo,
                    k,
                    accumulate,
                    beta,
                )
            };
        });
    } else if threads > 1 && m >= 16 * threads {
        let rows = m.div_ceil(threads);
        (0..m.div_ceil(rows)).into_par_iter().for_each(|t| {
            let (lo, hi) = (t * rows, ((t + 1) * rows).min(m));
            unsafe {
                gemm_nt_serial(
                    d.ptr().add(lo * n),
                    n,
                    (l as *const f32).add(lo * k),
                    r as *const f32,
                    hi - lo,
                    n,
                    k,
                    accumulate,
                    beta,
                )
            };
        });
    } else {
        unsafe {
            gemm_nt_serial(
                d.ptr(),
                n,
                lhs.as_ptr(),
                rhs.as_ptr(),
                m,
                n,
                k,
                accumulate,
                beta,
            )
        };
    }
}

/// `dst[m, n] (+)= lhs[m, k] @ rhs[k, n]`, all row-major.
#[allow(clippy::too_many_arguments)]
fn matmul_nn(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    beta: f32,
) {
    debug_assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    // SAFETY: as above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            1.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler use full SIMD registers.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected at run time.
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// `e^x` in f32 to about 1 ulp (the Cephes polynomial), branch-free so that loops over it
/// vectorise; libm's `expf` is a scalar call and dominated SwiGLU.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_55, 88.376_26);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1_f64 as f32;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn swiglu_body(o: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + exp_f32(-g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(o: &mut [f32], g: &[f32], u: &[f32]) {
    swiglu_body(o, g, u)
}

fn swiglu_chunk(o: &mut [f32], g: &[f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected at run time.
        return unsafe { swiglu_avx2(o, g, u) };
    }
    swiglu_body(o, g, u)
}

/// `out[m, n] = x[m, k] @ w[n, k]^T` for a handful of rows: each weight row is read once.
fn matvec_rows(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    const COLS_PER_TASK: usize = 64;
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..n.div_ceil(COLS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let (lo, hi) = (task * COLS_PER_TASK, ((task + 1) * COLS_PER_TASK).min(n));
            for j in lo..hi {
                let wrow = &w[j * k..(j + 1) * k];
                for r in 0..m {
                    let v = dot(&x[r * k..(r + 1) * k], wrow);
                    // SAFETY: column j of every row belongs to this task alone.
                    unsafe { *out_ptr.ptr().add(r * n + j) = v };
                }
            }
        });
}

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
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Query rows per attention work item: bounds the score matrix and gives rayon enough items.
const ATTN_Q_CHUNK: usize = 64;

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Meta = StepMeta;

    fn name(&self) -> String {
        format!("cpu (f32, {} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }

    fn upload_f32(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
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
        out[..meta.rows() * dim]
            .par_chunks_mut(dim)
            .zip(&meta.tokens)
            .for_each(|(row, &t)| {
                let t = t as usize;
                row.copy_from_slice(&table[t * dim..(t + 1) * dim]);
            });
    }

    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        out[..rows * dim]
            .par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .for_each(|(o, xr)| {
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
                out.chunks_mut(n)
                    .for_each(|r| r.iter_mut().zip(b.iter()).for_each(|(o, b)| *o += b));
            }
            return;
        }
        if let Some(b) = b {
            out.par_chunks_mut(n)
                .for_each(|r| r.copy_from_slice(&b[..n]));
        }
        matmul_nt(out, x, w, rows, n, k, b.is_some(), 1.0, true);
    }

    fn rope(&self, x: &mut Vec<f32>, meta: &StepMeta, heads: usize, head_dim: usize, theta: f32) {
        let inv_freq = rope_inv_freq(head_dim, theta);
        let half = head_dim / 2;
        x[..meta.rows() * heads * head_dim]
            .par_chunks_mut(heads * head_dim)
            .zip(&meta.positions)
            .for_each(|(row, &pos)| {
                // freqs in f32 as transformers computes them; cos/sin rounded once from f64.
                let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                    .iter()
                    .map(|&f| {
                        let a = (pos as f32 * f) as f64;
                        (a.cos() as f32, a.sin() as f32)
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
        let group = heads / kv_heads;
        let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let bs = meta.block_size;
        // Work items: (sequence, kv head, chunk of new rows).
        let items: Vec<(usize, usize, usize)> = meta
            .seqs
            .iter()
            .enumerate()
            .flat_map(|(s, seq)| {
                (0..kv_heads).flat_map(move |kvh| {
                    (0..seq.n_new.div_ceil(ATTN_Q_CHUNK)).map(move |c| (s, kvh, c))
                })
            })
            .collect();
        let out_ptr = SharedMut(out.as_mut_ptr());
        items.into_par_iter().for_each(|(s, kvh, c)| {
            let seq = &meta.seqs[s];
            let past = seq.n_ctx - seq.n_new;
            let (q_lo, q_hi) = (c * ATTN_Q_CHUNK, ((c + 1) * ATTN_Q_CHUNK).min(seq.n_new));
            let nq = q_hi - q_lo;
            // Causal: the last row of the chunk sees positions up to past + q_hi - 1.
            let len = past + q_hi;
            // Gather this head's keys and values into contiguous [len, head_dim].
            let mut keys = vec![0f32; len * head_dim];
            let mut vals = vec![0f32; len * head_dim];
            for t in 0..len {
                let slot = seq.block_table[t / bs] as usize * bs + t % bs;
                let src = slot * kv_dim + kvh * head_dim;
                keys[t * head_dim..(t + 1) * head_dim]
                    .copy_from_slice(&k_cache[src..src + head_dim]);
                vals[t * head_dim..(t + 1) * head_dim]
                    .copy_from_slice(&v_cache[src..src + head_dim]);
            }
            // All query heads of the group at once: rows are (head, query) pairs.
            let mut qs = vec![0f32; group * nq * head_dim];
            for g in 0..group {
                let h = kvh * group + g;
                for i in 0..nq {
                    let src = (seq.row_start + q_lo + i) * q_dim + h * head_dim;
                    qs[(g * nq + i) * head_dim..][..head_dim]
                        .copy_from_slice(&q[src..src + head_dim]);
                }
            }
            let mut scores = vec![0f32; group * nq * len];
            matmul_nt(
                &mut scores,
                &qs,
                &keys,
                group * nq,
                len,
                head_dim,
                false,
                scale,
                false,
            );
            for (r, row) in scores.chunks_mut(len).enumerate() {
                let visible = past + q_lo + r % nq + 1;
                softmax_in_place(&mut row[..visible]);
                row[visible..].iter_mut().for_each(|v| *v = 0.0);
            }
            let mut o = vec![0f32; group * nq * head_dim];
            matmul_nn(
                &mut o,
                &scores,
                &vals,
                group * nq,
                head_dim,
                len,
                false,
                1.0,
            );
            for g in 0..group {
                let h = kvh * group + g;
                for i in 0..nq {
                    let dst = (seq.row_start + q_lo + i) * q_dim + h * head_dim;
                    // SAFETY: (row, head) pairs are disjoint across work items.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            o[(g * nq + i) * head_dim..].as_ptr(),
                            out_ptr.ptr().add(dst),
                            head_dim,
                        )
                    };
                }
            }
        });
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>, n: usize) {
        out[..n]
            .par_chunks_mut(4096)
            .zip(gate[..n].par_chunks(4096))
            .zip(up[..n].par_chunks(4096))
            .for_each(|((o, g), u)| swiglu_chunk(o, g, u));
    }

    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>, n: usize) {
        x[..n]
            .par_chunks_mut(4096)
            .zip(y[..n].par_chunks(4096))
            .for_each(|(x, y)| {
                x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
            });
    }

    fn gather_rows(&self, x: &Vec<f32>, rows: &[u32], out: &mut Vec<f32>, dim: usize) {
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            out[i * dim..(i + 1) * dim].copy_from_slice(&x[r * dim..(r + 1) * dim]);
        }
    }

    fn softmax(&self, x: &mut Vec<f32>, rows: usize, cols: usize) {
        x[..rows * cols]
            .par_chunks_mut(cols)
            .for_each(softmax_in_place);
    }

    fn log_softmax(&self, x: &mut Vec<f32>, rows: usize, cols: usize) {
        x[..rows * cols].par_chunks_mut(cols).for_each(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            row.iter_mut().for_each(|v| *v -= lse);
        });
    }
}

#[cfg(test)]
mod tests {
    //! Each op against a naive, obviously-correct loop (the model as a whole is checked
    //! against transformers in tests/model_reference.rs).
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
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    fn naive_linear(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
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
        for (rows, k, n) in [
            (1, 37, 19),
            (3, 64, 130),
            (8, 5, 7),
            (9, 33, 65),
            (100, 96, 40),
        ] {
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
        let want: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g * (1.0 / (1.0 + (-g).exp())) * u)
            .collect();
        close(&o, &want, 1e-6);
        let mut a = g.clone();
        be.add_assign(&mut a, &u, 30);
        close(
            &a,
            &g.iter().zip(&u).map(|(x, y)| x + y).collect::<Vec<_>>(),
            0.0,
        );

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
        let meta = StepMeta {
            positions: vec![0, 5],
            tokens: vec![0, 0],
            slots: vec![0, 1],
            ..Default::default()
        };
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
        let tables = [
            vec![
                7u32, 2, 9, 0, 1, 3, 4, 5, 6, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18,
            ],
            vec![21u32, 19, 20],
        ];
        let k_all: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(s, (p, n))| rand_vec((p + n) * kvd, 10 + s as u64))
            .collect();
        let v_all: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(s, (p, n))| rand_vec((p + n) * kvd, 20 + s as u64))
            .collect();
        let mut k_cache = vec![0f32; 22 * bs * kvd];
        let mut v_cache = k_cache.clone();
        let mut meta = StepMeta {
            block_size: bs,
            ..Default::default()
        };
        for (s, &(past, new)) in lens.iter().enumerate() {
            for t in 0..past + new {
                let slot = (tables[s][t / bs] as usize * bs + t % bs) * kvd;
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
                            (0..hd)
                                .map(|d| qv[d] as f64 * k_all[s][t * kvd + kvh * hd + d] as f64)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|v| (v - m).exp()).sum();
                    for d in 0..hd {
                        let want: f64 = (0..visible)
                            .map(|t| {
                                (scores[t] - m).exp() / z * v_all[s][t * kvd + kvh * hd + d] as f64
                            })
                            .sum();
                        let got = out[(seq.row_start + i) * qd + h * hd + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "seq {s} row {i} head {h} dim {d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in -1990..=2000 {
            let x = i as f32 * 0.0437;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_f32(-1000.0), exp_f32(-87.336_55));
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(1000.0).is_finite());
    }

    #[test]
    fn weights_convert_from_every_dtype() {
        let be = CpuBackend::new();
        let vals = [1.5f32, -2.25, 0.0, 3.0e-3];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let hf: Vec<u8> = vals
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        for (dtype, bytes, tol) in [
            (DType::F32, &f32b, 0.0),
            (DType::BF16, &bf, 1e-2),
            (DType::F16, &hf, 1e-3),
        ] {
            let t = HostTensor {
                dtype,
                shape: vec![4],
                bytes,
            };
            close(&be.upload(&t).unwrap(), &vals, tol);
        }
        let short = HostTensor {
            dtype: DType::F32,
            shape: vec![5],
            bytes: &f32b,
        };
        assert!(be.upload(&short).is_err());
    }
}
