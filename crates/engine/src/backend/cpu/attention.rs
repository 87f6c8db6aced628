//! Causal grouped-query attention on the CPU: over the paged KV cache for inference, and over
//! packed sequences (with its backward) for training.
//!
//! Work is split into (sequence, KV head, chunk of query rows) items. Each item gathers its
//! keys and values into contiguous `[len, head_dim]` blocks and multiplies all query heads of
//! the group at once, so the scores are one `[group * rows, len]` product.

use rayon::prelude::*;

use super::matmul::{as_is, mm, transposed, SharedMut};
use super::vector::{dot, exp_f32, softmax_in_place};
use crate::backend::{cache_slot, SeqSlice, StepMeta};

/// Query rows per work item: bounds the score matrix and gives rayon enough items.
const Q_CHUNK: usize = 64;

/// Shapes shared by every attention call.
#[derive(Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Copies the `[rows, head_dim]` slices of all query heads of group `kvh` for rows
/// `first..first + n` of `x: [*, heads * head_dim]` into `dst: [group * n, head_dim]`.
fn gather_group(dst: &mut [f32], x: &[f32], first: usize, n: usize, kvh: usize, s: Heads) {
    let hd = s.head_dim;
    for g in 0..s.group() {
        let h = kvh * s.group() + g;
        for i in 0..n {
            let src = (first + i) * s.q_dim() + h * hd;
            dst[(g * n + i) * hd..][..hd].copy_from_slice(&x[src..src + hd]);
        }
    }
}

/// The inverse of [`gather_group`]: writes `src: [group * n, head_dim]` into `out`.
///
/// # Safety
/// The (row, head) pairs written must belong to the caller alone.
unsafe fn scatter_group(out: SharedMut, src: &[f32], first: usize, n: usize, kvh: usize, s: Heads) {
    let hd = s.head_dim;
    for g in 0..s.group() {
        let h = kvh * s.group() + g;
        for i in 0..n {
            let dst = (first + i) * s.q_dim() + h * hd;
            std::ptr::copy_nonoverlapping(src[(g * n + i) * hd..].as_ptr(), out.ptr().add(dst), hd);
        }
    }
}

fn work_items(seqs: &[SeqSlice], kv_heads: usize) -> Vec<(usize, usize, usize)> {
    seqs.iter()
        .enumerate()
        .flat_map(|(s, seq)| {
            (0..kv_heads).flat_map(move |kvh| (0..seq.n_new.div_ceil(Q_CHUNK)).map(move |c| (s, kvh, c)))
        })
        .collect()
}

/// Attention of the new rows over the paged KV cache (`k_cache, v_cache: [slots, kv_dim]`).
pub fn paged(q: &[f32], k_cache: &[f32], v_cache: &[f32], out: &mut [f32], meta: &StepMeta, s: Heads) {
    let (hd, kv_dim, group, bs) = (s.head_dim, s.kv_dim(), s.group(), meta.block_size);
    let out_ptr = SharedMut(out.as_mut_ptr());
    work_items(&meta.seqs, s.kv_heads).into_par_iter().for_each(|(si, kvh, c)| {
        let seq = &meta.seqs[si];
        let past = seq.n_ctx - seq.n_new;
        let (q_lo, q_hi) = (c * Q_CHUNK, ((c + 1) * Q_CHUNK).min(seq.n_new));
        let nq = q_hi - q_lo;
        // Causal: the last row of the chunk sees positions up to past + q_hi - 1.
        let len = past + q_hi;
        let mut keys = vec![0f32; len * hd];
        let mut vals = vec![0f32; len * hd];
        for t in 0..len {
            let slot = cache_slot(&seq.block_table, t, bs) as usize;
            let src = slot * kv_dim + kvh * hd;
            keys[t * hd..(t + 1) * hd].copy_from_slice(&k_cache[src..src + hd]);
            vals[t * hd..(t + 1) * hd].copy_from_slice(&v_cache[src..src + hd]);
        }
        let mut qs = vec![0f32; group * nq * hd];
        gather_group(&mut qs, q, seq.row_start + q_lo, nq, kvh, s);
        let mut scores = vec![0f32; group * nq * len];
        mm(&mut scores, as_is(&qs), transposed(&keys), group * nq, len, hd, false, s.scale(), false);
        for (r, row) in scores.chunks_mut(len).enumerate() {
            let visible = past + q_lo + r % nq + 1;
            softmax_in_place(&mut row[..visible]);
            row[visible..].fill(0.0);
        }
        let mut o = vec![0f32; group * nq * hd];
        mm(&mut o, as_is(&scores), as_is(&vals), group * nq, hd, len, false, 1.0, false);
        // SAFETY: (row, head) pairs are disjoint across work items.
        unsafe { scatter_group(out_ptr, &o, seq.row_start + q_lo, nq, kvh, s) };
    });
}

/// Rows `first..first + len` of head `kvh` of `x: [*, kv_dim]` as a contiguous block.
fn gather_kv(x: &[f32], first: usize, len: usize, kvh: usize, s: Heads) -> Vec<f32> {
    let hd = s.head_dim;
    let mut dst = vec![0f32; len * hd];
    for t in 0..len {
        let src = (first + t) * s.kv_dim() + kvh * hd;
        dst[t * hd..(t + 1) * hd].copy_from_slice(&x[src..src + hd]);
    }
    dst
}

/// Training forward over packed sequences; `lse: [rows, heads]`.
pub fn train_fwd(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32], seqs: &[SeqSlice], s: Heads) {
    let (hd, group) = (s.head_dim, s.group());
    let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    work_items(seqs, s.kv_heads).into_par_iter().for_each(|(si, kvh, c)| {
        let seq = &seqs[si];
        let (q_lo, q_hi) = (c * Q_CHUNK, ((c + 1) * Q_CHUNK).min(seq.n_new));
        let (nq, len) = (q_hi - q_lo, q_hi);
        let keys = gather_kv(k, seq.row_start, len, kvh, s);
        let vals = gather_kv(v, seq.row_start, len, kvh, s);
        let mut qs = vec![0f32; group * nq * hd];
        gather_group(&mut qs, q, seq.row_start + q_lo, nq, kvh, s);
        let mut scores = vec![0f32; group * nq * len];
        mm(&mut scores, as_is(&qs), transposed(&keys), group * nq, len, hd, false, s.scale(), false);
        for (r, row) in scores.chunks_mut(len).enumerate() {
            let (g, i) = (r / nq, r % nq);
            let visible = q_lo + i + 1;
            let l = softmax_in_place(&mut row[..visible]);
            row[visible..].fill(0.0);
            let at = (seq.row_start + q_lo + i) * s.heads + kvh * group + g;
            // SAFETY: each (row, head) is written by one work item.
            unsafe { *lse_ptr.ptr().add(at) = l };
        }
        let mut o = vec![0f32; group * nq * hd];
        mm(&mut o, as_is(&scores), as_is(&vals), group * nq, hd, len, false, 1.0, false);
        // SAFETY: (row, head) pairs are disjoint across work items.
        unsafe { scatter_group(out_ptr, &o, seq.row_start + q_lo, nq, kvh, s) };
    });
}

/// Training backward: recomputes the probabilities from `lse`, then
/// `dV = P^T dO`, `dS = P * (dO V^T - rowsum(dO * O))`, `dQ = scale dS K`, `dK = scale dS^T Q`.
pub fn train_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    seqs: &[SeqSlice],
    s: Heads,
) {
    let (hd, group, kv_dim) = (s.head_dim, s.group(), s.kv_dim());
    let (dq_ptr, dk_ptr, dv_ptr) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
    // One item per (sequence, KV head): it owns that head's dK and dV rows.
    let items: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|si| (0..s.kv_heads).map(move |h| (si, h))).collect();
    items.into_par_iter().for_each(|(si, kvh)| {
        let seq = &seqs[si];
        let n = seq.n_new;
        let keys = gather_kv(k, seq.row_start, n, kvh, s);
        let vals = gather_kv(v, seq.row_start, n, kvh, s);
        let mut dkeys = vec![0f32; n * hd];
        let mut dvals = vec![0f32; n * hd];
        for c in 0..n.div_ceil(Q_CHUNK) {
            let (q_lo, q_hi) = (c * Q_CHUNK, ((c + 1) * Q_CHUNK).min(n));
            let (nq, len) = (q_hi - q_lo, q_hi);
            let rows = group * nq;
            let first = seq.row_start + q_lo;
            let (mut qs, mut os, mut dos) = (vec![0f32; rows * hd], vec![0f32; rows * hd], vec![0f32; rows * hd]);
            gather_group(&mut qs, q, first, nq, kvh, s);
            gather_group(&mut os, out, first, nq, kvh, s);
            gather_group(&mut dos, dout, first, nq, kvh, s);
            // P, recomputed.
            let mut p = vec![0f32; rows * len];
            mm(&mut p, as_is(&qs), transposed(&keys[..len * hd]), rows, len, hd, false, s.scale(), false);
            for (r, row) in p.chunks_mut(len).enumerate() {
                let (g, i) = (r / nq, r % nq);
                let l = lse[(first + i) * s.heads + kvh * group + g];
                let visible = q_lo + i + 1;
                row[..visible].iter_mut().for_each(|x| *x = exp_f32(*x - l));
                row[visible..].fill(0.0);
            }
            mm(&mut dvals[..len * hd], transposed(&p), as_is(&dos), len, hd, rows, true, 1.0, false);
            let mut ds = vec![0f32; rows * len];
            mm(&mut ds, as_is(&dos), transposed(&vals[..len * hd]), rows, len, hd, false, 1.0, false);
            for r in 0..rows {
                let d = dot(&dos[r * hd..(r + 1) * hd], &os[r * hd..(r + 1) * hd]);
                let (pr, dr) = (&p[r * len..(r + 1) * len], &mut ds[r * len..(r + 1) * len]);
                dr.iter_mut().zip(pr).for_each(|(x, &pv)| *x = pv * (*x - d));
            }
            let mut dqs = vec![0f32; rows * hd];
            mm(&mut dqs, as_is(&ds), as_is(&keys[..len * hd]), rows, hd, len, false, s.scale(), false);
            mm(&mut dkeys[..len * hd], transposed(&ds), as_is(&qs), len, hd, rows, true, s.scale(), false);
            // SAFETY: this item owns the dQ (row, head) pairs of its group.
            unsafe { scatter_group(dq_ptr, &dqs, first, nq, kvh, s) };
        }
        for t in 0..n {
            let dst = (seq.row_start + t) * kv_dim + kvh * hd;
            // SAFETY: this item owns head kvh of its sequence's dK/dV rows.
            unsafe {
                std::ptr::copy_nonoverlapping(dkeys[t * hd..].as_ptr(), dk_ptr.ptr().add(dst), hd);
                std::ptr::copy_nonoverlapping(dvals[t * hd..].as_ptr(), dv_ptr.ptr().add(dst), hd);
            }
        }
    });
}
