//! Finite-difference checks of every backward op: for a random projection `r`, the loss
//! `L(x) = sum(op(x) * r)` is differentiated numerically (central differences in f64 around
//! f32 evaluations) and compared with the op's analytic gradient.

use rand::{Rng, SeedableRng};

use super::CpuBackend;
use crate::backend::{Backend, SeqSlice, StepMeta, TrainBackend};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn proj(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Compares `analytic` with central differences of `loss` around `x`.
fn fd_check(what: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    const EPS: f32 = 1e-2;
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let mut worst = 0f64;
    for i in 0..x.len() {
        let mut xp = x.to_vec();
        xp[i] += EPS;
        let mut xm = x.to_vec();
        xm[i] -= EPS;
        let numeric = (loss(&xp) - loss(&xm)) / (2.0 * EPS as f64);
        let err = (numeric - analytic[i] as f64).abs() / (1.0 + numeric.abs());
        worst = worst.max(err);
        assert!(err < 2e-3, "{what}[{i}]: analytic {} vs numeric {numeric}", analytic[i]);
    }
    println!("{what}: worst relative error {worst:.1e}");
}

#[test]
fn rmsnorm_grad() {
    let be = CpuBackend::new();
    let (rows, dim) = (3, 12);
    let (x, w, r) = (rand_vec(rows * dim, 1), rand_vec(dim, 2), rand_vec(rows * dim, 3));
    let f = |x: &[f32], w: &[f32]| {
        let mut y = vec![0f32; rows * dim];
        be.rmsnorm(&x.to_vec(), &w.to_vec(), &mut y, rows, dim, 1e-6);
        proj(&y, &r)
    };
    let (mut dx, mut dw) = (vec![0f32; rows * dim], vec![0f32; dim]);
    be.rmsnorm_bwd(&r, &x, &w, &mut dx, Some(&mut dw), rows, dim, 1e-6);
    fd_check("rmsnorm dx", &x, &dx, |x| f(x, &w));
    fd_check("rmsnorm dw", &w, &dw, |w| f(&x, w));
}

#[test]
fn linear_grad() {
    let be = CpuBackend::new();
    let (rows, k, n) = (11, 6, 5); // rows above the decode threshold: the gemm path
    let (x, w, b, r) = (rand_vec(rows * k, 4), rand_vec(n * k, 5), rand_vec(n, 6), rand_vec(rows * n, 7));
    let f = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut y = vec![0f32; rows * n];
        be.linear(&x.to_vec(), &w.to_vec(), Some(&b.to_vec()), &mut y, rows, k, n);
        proj(&y, &r)
    };
    let (mut dx, mut dw, mut db) = (vec![0f32; rows * k], vec![0f32; n * k], vec![0f32; n]);
    be.linear_bwd(&r, &x, &w, Some(&mut dx), Some(&mut dw), Some(&mut db), rows, k, n);
    fd_check("linear dx", &x, &dx, |x| f(x, &w, &b));
    fd_check("linear dw", &w, &dw, |w| f(&x, w, &b));
    fd_check("linear db", &b, &db, |b| f(&x, &w, b));
}

#[test]
fn rope_swiglu_embedding_grads() {
    let be = CpuBackend::new();
    let (heads, hd) = (2, 6);
    let meta = StepMeta { tokens: vec![3, 1, 3], positions: vec![0, 7, 300], ..Default::default() };
    let (x, r) = (rand_vec(3 * heads * hd, 8), rand_vec(3 * heads * hd, 9));
    let mut dx = r.clone();
    be.rope_bwd(&mut dx, &meta, heads, hd, 1e4);
    fd_check("rope", &x, &dx, |x| {
        let mut y = x.to_vec();
        be.rope(&mut y, &meta, heads, hd, 1e4);
        proj(&y, &r)
    });

    let (g, u, r) = (rand_vec(20, 10), rand_vec(20, 11), rand_vec(20, 12));
    let (mut dg, mut du) = (vec![0f32; 20], vec![0f32; 20]);
    be.swiglu_bwd(&r, &g, &u, &mut dg, &mut du, 20);
    let f = |g: &[f32], u: &[f32]| {
        let mut y = vec![0f32; 20];
        be.swiglu(&g.to_vec(), &u.to_vec(), &mut y, 20);
        proj(&y, &r)
    };
    fd_check("swiglu dgate", &g, &dg, |g| f(g, &u));
    fd_check("swiglu dup", &u, &du, |u| f(&g, u));

    let dim = 4;
    let (table, r) = (rand_vec(5 * dim, 13), rand_vec(3 * dim, 14));
    let mut dt = vec![0f32; 5 * dim];
    be.embedding_bwd(&r, &meta, &mut dt, dim);
    fd_check("embedding", &table, &dt, |t| {
        let mut y = vec![0f32; 3 * dim];
        be.embedding(&t.to_vec(), &meta, &mut y, dim);
        proj(&y, &r)
    });
}

#[test]
fn attention_train_grad_and_agreement_with_paged_attention() {
    let be = CpuBackend::new();
    let (heads, kv_heads, hd) = (4, 2, 3);
    let (qd, kvd) = (heads * hd, kv_heads * hd);
    // Two packed sequences of 5 and 3 rows.
    let seqs = vec![
        SeqSlice { row_start: 0, n_new: 5, n_ctx: 5, block_table: vec![] },
        SeqSlice { row_start: 5, n_new: 3, n_ctx: 3, block_table: vec![] },
    ];
    let rows = 8;
    let meta = StepMeta { seqs: seqs.clone(), ..Default::default() };
    let (q, k, v, r) =
        (rand_vec(rows * qd, 15), rand_vec(rows * kvd, 16), rand_vec(rows * kvd, 17), rand_vec(rows * qd, 18));
    let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
        let (mut out, mut lse) = (vec![0f32; rows * qd], vec![0f32; rows * heads]);
        be.attention_train(&q.to_vec(), &k.to_vec(), &v.to_vec(), &mut out, &mut lse, &meta, heads, kv_heads, hd);
        (out, lse)
    };
    let (out, lse) = fwd(&q, &k, &v);
    // The same numbers as inference attention over a cache holding exactly these rows.
    let paged_meta = StepMeta {
        seqs: vec![
            SeqSlice { row_start: 0, n_new: 5, n_ctx: 5, block_table: vec![0] },
            SeqSlice { row_start: 5, n_new: 3, n_ctx: 3, block_table: vec![1] },
        ],
        block_size: 5,
        ..Default::default()
    };
    let mut kc = vec![0f32; 10 * kvd];
    let mut vc = vec![0f32; 10 * kvd];
    kc[..5 * kvd].copy_from_slice(&k[..5 * kvd]);
    kc[5 * kvd..8 * kvd].copy_from_slice(&k[5 * kvd..]);
    vc[..5 * kvd].copy_from_slice(&v[..5 * kvd]);
    vc[5 * kvd..8 * kvd].copy_from_slice(&v[5 * kvd..]);
    let mut paged = vec![0f32; rows * qd];
    be.attention(&q, &kc, &vc, &mut paged, &paged_meta, heads, kv_heads, hd);
    assert!(out.iter().zip(&paged).all(|(a, b)| (a - b).abs() < 1e-6));

    let (mut dq, mut dk, mut dv) = (vec![0f32; rows * qd], vec![0f32; rows * kvd], vec![0f32; rows * kvd]);
    be.attention_train_bwd(&q, &k, &v, &out, &lse, &r, &mut dq, &mut dk, &mut dv, &meta, heads, kv_heads, hd);
    fd_check("attention dq", &q, &dq, |q| proj(&fwd(q, &k, &v).0, &r));
    fd_check("attention dk", &k, &dk, |k| proj(&fwd(&q, k, &v).0, &r));
    fd_check("attention dv", &v, &dv, |v| proj(&fwd(&q, &k, v).0, &r));
}

#[test]
fn token_logprobs_match_log_softmax_and_grads() {
    let be = CpuBackend::new();
    // A vocabulary spanning several chunks, with a ragged last chunk, and rows spanning blocks.
    let (rows, dim, vocab) = (70, 3, 2 * super::logprob::VOCAB_CHUNK + 37);
    let (h, w) = (rand_vec(rows * dim, 19), rand_vec(vocab * dim, 20));
    let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 97 + 5) % vocab as u32).collect();
    let (mut logp, mut lse) = (vec![0f32; rows], vec![0f32; rows]);
    be.token_logprobs(&h, &w, &targets, &mut logp, &mut lse, rows, dim, vocab);
    let mut logits = vec![0f32; rows * vocab];
    be.linear(&h, &w, None, &mut logits, rows, dim, vocab);
    be.log_softmax(&mut logits, rows, vocab);
    for r in 0..rows {
        assert!((logp[r] - logits[r * vocab + targets[r] as usize]).abs() < 1e-5, "row {r}");
    }

    // Gradient check on a small problem (finite differences per element).
    let (rows, dim, vocab) = (3, 4, 9);
    let (h, w, dl) = (rand_vec(rows * dim, 21), rand_vec(vocab * dim, 22), rand_vec(rows, 23));
    let targets = vec![2u32, 8, 0];
    let f = |h: &[f32], w: &[f32]| {
        let (mut logp, mut lse) = (vec![0f32; rows], vec![0f32; rows]);
        be.token_logprobs(&h.to_vec(), &w.to_vec(), &targets, &mut logp, &mut lse, rows, dim, vocab);
        (proj(&logp, &dl), lse)
    };
    let lse = f(&h, &w).1;
    let (mut dh, mut dw) = (vec![0f32; rows * dim], vec![0f32; vocab * dim]);
    be.token_logprobs_bwd(&dl, &h, &w, &targets, &lse, &mut dh, Some(&mut dw), rows, dim, vocab);
    fd_check("logprob dh", &h, &dh, |h| f(h, &w).0);
    fd_check("logprob dw", &w, &dw, |w| f(&h, w).0);
}

#[test]
fn adamw_matches_a_hand_computed_step() {
    let be = CpuBackend::new();
    let hp = crate::backend::AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let (mut p, g, mut m, mut v) = (vec![1.0f32, -2.0], vec![0.5f32, 0.25], vec![0f32; 2], vec![0f32; 2]);
    let (mut q, mut mq, mut vq) = (vec![3.0f32], vec![0f32], vec![0f32]);
    let tensor =
        |param, grad, m, v, n, decay| crate::backend::AdamWTensor { param, master: None, grad, m, v, n, decay };
    be.adamw(
        &mut [tensor(&mut p, &g, &mut m, &mut v, 2, true), tensor(&mut q, &g, &mut mq, &mut vq, 1, false)],
        &hp,
        0.5,
        1,
    );
    // Step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps) after decay,
    // whatever the gradient scale (clipping); the second tensor takes no decay.
    for (i, p0) in [1.0f32, -2.0].iter().enumerate() {
        let gs = 0.5 * g[i];
        let want = p0 * (1.0 - 0.1 * 0.01) - 0.1 * gs / (gs.abs() + 1e-8);
        assert!((p[i] - want).abs() < 1e-6, "{} vs {want}", p[i]);
    }
    assert!((q[0] - (3.0 - 0.1)).abs() < 1e-6, "{}", q[0]);
}

#[test]
fn dropout_keeps_the_expected_share_and_is_its_own_backward() {
    let be = CpuBackend::new();
    let n = 100_000;
    let x = vec![1.0f32; n];
    let mut y = be.zeros(n);
    be.dropout(&x, &mut y, n, 0.25, 42);
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept share {kept}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6), "survivors are scaled by 1/(1-p)");
    let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!((mean - 1.0).abs() < 0.02, "inverted dropout preserves the mean: {mean}");
    // Another seed, another mask; the same seed, the same mask.
    let mut z = be.zeros(n);
    be.dropout(&x, &mut z, n, 0.25, 43);
    assert_ne!(y, z);
    be.dropout(&x, &mut z, n, 0.25, 42);
    assert_eq!(y, z);
    // L = sum(dropout(x) * r): dL/dx = dropout(r).
    let (x, r) = (rand_vec(64, 1), rand_vec(64, 2));
    let mut g = be.zeros(64);
    be.dropout(&r, &mut g, 64, 0.5, 7);
    fd_check("dropout", &x, &g, |x| {
        let mut y = be.zeros(64);
        be.dropout(&x.to_vec(), &mut y, 64, 0.5, 7);
        proj(&y, &r)
    });
}
