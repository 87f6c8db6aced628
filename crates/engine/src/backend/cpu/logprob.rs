//! Fused log-prob / cross-entropy over the output head.
//!
//! `logp[r] = h[r] . w[t_r] - logsumexp_j(h[r] . w[j])`, computed over blocks of rows and
//! chunks of the vocabulary with an online log-sum-exp: at most one `[ROW_BLOCK, VOCAB_CHUNK]`
//! tile of logits per thread exists at any time, whatever the sequence length and vocabulary.
//! The backward recomputes each tile.

use rayon::prelude::*;

use super::matmul::{as_is, mm, transposed, SharedMut};
use super::vector::exp_f32;

pub const ROW_BLOCK: usize = 64;
pub const VOCAB_CHUNK: usize = 2048;

/// Forward: `logp: [rows]`, `lse: [rows]`.
pub fn forward(
    h: &[f32],
    w: &[f32],
    targets: &[u32],
    logp: &mut [f32],
    lse: &mut [f32],
    rows: usize,
    dim: usize,
    vocab: usize,
) {
    assert!(targets.len() >= rows && logp.len() >= rows && lse.len() >= rows);
    logp[..rows].par_chunks_mut(ROW_BLOCK).zip(lse[..rows].par_chunks_mut(ROW_BLOCK)).enumerate().for_each(
        |(b, (logp, lse))| {
            let (r0, nr) = (b * ROW_BLOCK, logp.len());
            let hb = &h[r0 * dim..(r0 + nr) * dim];
            let mut max = vec![f32::NEG_INFINITY; nr];
            let mut sum = vec![0f32; nr];
            let mut target_logit = vec![0f32; nr];
            let mut tile = vec![0f32; nr * VOCAB_CHUNK];
            for c0 in (0..vocab).step_by(VOCAB_CHUNK) {
                let nc = VOCAB_CHUNK.min(vocab - c0);
                mm(&mut tile, as_is(hb), transposed(&w[c0 * dim..(c0 + nc) * dim]), nr, nc, dim, false, 1.0, false);
                for r in 0..nr {
                    let row = &tile[r * nc..(r + 1) * nc];
                    let t = targets[r0 + r] as usize;
                    if (c0..c0 + nc).contains(&t) {
                        target_logit[r] = row[t - c0];
                    }
                    let m = row.iter().copied().fold(max[r], f32::max);
                    let s: f32 = row.iter().map(|&z| exp_f32(z - m)).sum();
                    sum[r] = sum[r] * exp_f32(max[r] - m) + s;
                    max[r] = m;
                }
            }
            for r in 0..nr {
                lse[r] = max[r] + sum[r].ln();
                logp[r] = target_logit[r] - lse[r];
            }
        },
    );
}

/// Backward: `dlogits = dlogp * (onehot(t) - softmax)`, `dh = dlogits @ w` (overwritten),
/// `dw += dlogits^T @ h`. Parallel over vocabulary chunks so that each thread owns its rows of
/// `dw`; each thread keeps one partial `dh`, summed at the end.
pub fn backward(
    dlogp: &[f32],
    h: &[f32],
    w: &[f32],
    targets: &[u32],
    lse: &[f32],
    dh: &mut [f32],
    dw: Option<&mut [f32]>,
    rows: usize,
    dim: usize,
    vocab: usize,
) {
    let chunks = vocab.div_ceil(VOCAB_CHUNK);
    let threads = rayon::current_num_threads().min(chunks).max(1);
    let dw_ptr = dw.map(|d| SharedMut(d.as_mut_ptr()));
    let partials: Vec<Vec<f32>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let mut dh_part = vec![0f32; rows * dim];
            let mut tile = vec![0f32; ROW_BLOCK * VOCAB_CHUNK];
            for c in (t * chunks / threads)..((t + 1) * chunks / threads) {
                let (c0, nc) = (c * VOCAB_CHUNK, VOCAB_CHUNK.min(vocab - c * VOCAB_CHUNK));
                let wc = &w[c0 * dim..(c0 + nc) * dim];
                for r0 in (0..rows).step_by(ROW_BLOCK) {
                    let nr = ROW_BLOCK.min(rows - r0);
                    let hb = &h[r0 * dim..(r0 + nr) * dim];
                    let g = &mut tile[..nr * nc];
                    mm(g, as_is(hb), transposed(wc), nr, nc, dim, false, 1.0, false);
                    for r in 0..nr {
                        let (scale, l, t) = (dlogp[r0 + r], lse[r0 + r], targets[r0 + r] as usize);
                        let row = &mut g[r * nc..(r + 1) * nc];
                        row.iter_mut().for_each(|z| *z = -scale * exp_f32(*z - l));
                        if (c0..c0 + nc).contains(&t) {
                            row[t - c0] += scale;
                        }
                    }
                    mm(&mut dh_part[r0 * dim..(r0 + nr) * dim], as_is(g), as_is(wc), nr, dim, nc, true, 1.0, false);
                    if let Some(dw) = dw_ptr {
                        // SAFETY: rows c0..c0 + nc of dw belong to this thread's chunks alone.
                        let dwc = unsafe { std::slice::from_raw_parts_mut(dw.ptr().add(c0 * dim), nc * dim) };
                        mm(dwc, transposed(g), as_is(hb), nc, dim, nr, true, 1.0, false);
                    }
                }
            }
            dh_part
        })
        .collect();
    let dh = &mut dh[..rows * dim];
    dh.fill(0.0);
    for p in &partials {
        dh.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
}
