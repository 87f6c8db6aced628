//! The training half of the selftest: every backward op, the fused log-prob, fused LoRA and
//! AdamW on the device against the CPU backend, then whole training steps of the tiny model
//! (gradients, an optimiser update, a 20-step LoRA SFT loss curve).
//!
//! Tolerances (normalised as in the parent module, `max|dev - cpu| / max|cpu|`):
//! - backward ops that round their result once (RMSNorm, RoPE, SwiGLU, GEMM `dx`): as their
//!   forward, 1e-2 / 1.5e-2; gradients accumulated in f32 from bf16 inputs (`dW`, `db`,
//!   embedding, the log-prob's `dW`): 1e-2;
//! - attention forward (out; lse is f32) 2e-2; attention backward 3e-2: `dS = P (dP - D)` is
//!   rounded to bf16 before the dQ/dK products and `dP - D` cancels (a lane-level emulation of
//!   the kernels measured at most 7e-3);
//! - the fused log-prob: log-probs 1e-3 (f32 throughout, bf16 inputs), `dh` 1.5e-2 (the logit
//!   gradient is rounded to bf16 before its GEMMs);
//! - AdamW: the device's bf16 parameter is the rounding of its f32 master: 1e-2;
//! - whole-model steps (bf16 weights and activations through every layer, against f32): the
//!   gradient's cosine similarity to the CPU's >= 0.99 and its norm within 5%; the AdamW update's
//!   cosine >= 0.95 (Adam's first step is nearly `lr * sign(g)`, so components with tiny
//!   gradients may flip); the 20-step SFT losses within 2% of the CPU's at every step.

use anyhow::Result;
use rand::{Rng, SeedableRng};

use super::{both, norm_err, random, Report, TOL_ATTENTION, TOL_NORM, TOL_ONE_ROUNDING};
use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamW, AdamWTensor, Backend, LoraRef, SeqSlice, StepMeta, TrainBackend};
use crate::model::lora::{Lora, LoraConfig, Target};
use crate::model::training::{Grads, TrainBatch};
use crate::model::Qwen2;
use crate::train::{Decay, OptimConfig, Optimizer, Schedule};

const TOL_ATTENTION_GRAD: f64 = 3e-2;
const TOL_LOGP: f64 = 1e-3;
const MODEL_GRAD_COSINE: f64 = 0.99;
const MODEL_GRAD_NORM: f64 = 0.05;
const MODEL_UPDATE_COSINE: f64 = 0.95;
const SFT_LOSS_REL: f64 = 0.02;

fn err2<B: Backend>(dev: &B, a: &B::Buf, b: &[f32], n: usize) -> f64 {
    norm_err(&dev.to_f32(a), b, n)
}

/// A training batch of packed sequences of the given lengths with random tokens.
fn packed(lengths: &[usize], vocab: usize, rng: &mut impl Rng) -> StepMeta {
    let mut meta = StepMeta::default();
    for &n in lengths {
        let row_start = meta.tokens.len();
        meta.seqs.push(SeqSlice { row_start, n_new: n, n_ctx: n, block_table: vec![] });
        meta.tokens.extend((0..n).map(|_| rng.gen_range(0..vocab as u32)));
        meta.positions.extend(0..n as u32);
    }
    meta
}

/// Backward ops of norms, RoPE, SwiGLU, embedding and linear layers.
pub fn check_backward_ops<B: TrainBackend>(dev: &B, cpu: &CpuBackend, rep: &mut Report) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    for &(rows, dim) in &[(1usize, 7usize), (5, 64), (33, 1000), (17, 3584)] {
        let (x, w, g) =
            (random(&mut rng, rows * dim, 2.0), random(&mut rng, dim, 1.5), random(&mut rng, rows * dim, 1.0));
        let ((dx_, cx), (dw_, cw), (dg, cg)) = (both(dev, cpu, &x), both(dev, cpu, &w), both(dev, cpu, &g));
        let (mut ddx, mut cdx) = (dev.zeros(rows * dim), cpu.zeros(rows * dim));
        let (mut ddw, mut cdw) = (dev.zeros_f32(dim), cpu.zeros_f32(dim));
        dev.rmsnorm_bwd(&dg, &dx_, &dw_, &mut ddx, Some(&mut ddw), rows, dim, 1e-6);
        cpu.rmsnorm_bwd(&cg, &cx, &cw, &mut cdx, Some(&mut cdw), rows, dim, 1e-6);
        let shape = format!("rows={rows} dim={dim}");
        rep.add("backward", format!("rmsnorm dx {shape}"), err2(dev, &ddx, &cdx, rows * dim), TOL_NORM, String::new());
        rep.add("backward", format!("rmsnorm dw {shape}"), err2(dev, &ddw, &cdw, dim), TOL_NORM, String::new());
    }
    for &(rows, heads, hd) in &[(3usize, 2usize, 16usize), (37, 28, 128), (5, 9, 10)] {
        let meta = packed(&[rows], 100, &mut rng);
        let (dm, cm) = (dev.prepare(&meta), cpu.prepare(&meta));
        let g = random(&mut rng, rows * heads * hd, 1.0);
        let (mut dg, mut cg) = both(dev, cpu, &g);
        dev.rope_bwd(&mut dg, &dm, heads, hd, 10000.0);
        cpu.rope_bwd(&mut cg, &cm, heads, hd, 10000.0);
        let n = rows * heads * hd;
        rep.add(
            "backward",
            format!("rope rows={rows} h={heads} d={hd}"),
            err2(dev, &dg, &cg, n),
            TOL_ONE_ROUNDING,
            String::new(),
        );
    }
    for &n in &[1usize, 1000, 65_537] {
        let (d, ga, u) = (random(&mut rng, n, 1.0), random(&mut rng, n, 3.0), random(&mut rng, n, 2.0));
        let ((dd, cd), (dga, cga), (du, cu)) = (both(dev, cpu, &d), both(dev, cpu, &ga), both(dev, cpu, &u));
        let (mut dgg, mut cgg, mut dgu, mut cgu) = (dev.zeros(n), cpu.zeros(n), dev.zeros(n), cpu.zeros(n));
        dev.swiglu_bwd(&dd, &dga, &du, &mut dgg, &mut dgu, n);
        cpu.swiglu_bwd(&cd, &cga, &cu, &mut cgg, &mut cgu, n);
        let e = err2(dev, &dgg, &cgg, n).max(err2(dev, &dgu, &cgu, n));
        rep.add("backward", format!("swiglu n={n}"), e, TOL_ONE_ROUNDING, String::new());
    }
    {
        // Repeated tokens: their gradients must add up.
        let (rows, dim, vocab) = (300usize, 96usize, 17usize);
        let meta = packed(&[rows], vocab, &mut rng);
        let (dm, cm) = (dev.prepare(&meta), cpu.prepare(&meta));
        let g = random(&mut rng, rows * dim, 1.0);
        let (dg, cg) = both(dev, cpu, &g);
        let (mut dt, mut ct) = (dev.zeros_f32(vocab * dim), cpu.zeros_f32(vocab * dim));
        dev.embedding_bwd(&dg, &dm, &mut dt, dim);
        cpu.embedding_bwd(&cg, &cm, &mut ct, dim);
        let n = vocab * dim;
        rep.add(
            "backward",
            format!("embedding rows={rows} vocab={vocab}"),
            err2(dev, &dt, &ct, n),
            TOL_ONE_ROUNDING,
            String::new(),
        );
    }
    for &(rows, k, n) in &[(1usize, 7usize, 3usize), (5, 64, 48), (33, 100, 257), (130, 896, 128)] {
        let (dout, x, w, b0) = (
            random(&mut rng, rows * n, 1.0),
            random(&mut rng, rows * k, 1.0),
            random(&mut rng, n * k, 0.5),
            random(&mut rng, n * k, 0.5),
        );
        let ((dd, cd), (dx_, cx), (dw_, cw)) = (both(dev, cpu, &dout), both(dev, cpu, &x), both(dev, cpu, &w));
        // Weight gradients accumulate: start both from the same non-zero values.
        let (mut ddw, mut cdw) = (dev.upload_f32_full(&b0), cpu.upload_f32_full(&b0));
        let (mut ddb, mut cdb) = (dev.upload_f32_full(&b0[..n]), cpu.upload_f32_full(&b0[..n]));
        let (mut ddx, mut cdx) = (dev.zeros(rows * k), cpu.zeros(rows * k));
        dev.linear_bwd(&dd, &dx_, &dw_, Some(&mut ddx), Some(&mut ddw), Some(&mut ddb), rows, k, n);
        cpu.linear_bwd(&cd, &cx, &cw, Some(&mut cdx), Some(&mut cdw), Some(&mut cdb), rows, k, n);
        let shape = format!("rows={rows} k={k} n={n}");
        rep.add(
            "backward",
            format!("linear dx {shape}"),
            err2(dev, &ddx, &cdx, rows * k),
            TOL_ONE_ROUNDING,
            String::new(),
        );
        rep.add(
            "backward",
            format!("linear dw {shape}"),
            err2(dev, &ddw, &cdw, n * k),
            TOL_ONE_ROUNDING,
            String::new(),
        );
        rep.add("backward", format!("linear db {shape}"), err2(dev, &ddb, &cdb, n), TOL_ONE_ROUNDING, String::new());
    }
}

/// Training attention (forward with log-sum-exp, backward) over packed batches, labelled `label`.
pub fn check_train_attention<B: TrainBackend>(dev: &B, cpu: &CpuBackend, rep: &mut Report, label: &str) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
    for &(heads, kv, hd) in
        &[(4usize, 2usize, 16usize), (9, 3, 10), (8, 8, 64), (14, 2, 64), (28, 4, 128), (12, 2, 128)]
    {
        for lengths in [vec![1usize, 37, 64, 130], vec![65, 1, 5, 200]] {
            let meta = packed(&lengths, 100, &mut rng);
            let rows = meta.rows();
            let (qd, kvd) = (heads * hd, kv * hd);
            let (dm, cm) = (dev.prepare(&meta), cpu.prepare(&meta));
            let (q, k, v, g) = (
                random(&mut rng, rows * qd, 1.5),
                random(&mut rng, rows * kvd, 1.5),
                random(&mut rng, rows * kvd, 1.5),
                random(&mut rng, rows * qd, 1.0),
            );
            let ((dq, cq), (dk, ck), (dv, cv), (dg, cg)) =
                (both(dev, cpu, &q), both(dev, cpu, &k), both(dev, cpu, &v), both(dev, cpu, &g));
            let (mut dout, mut cout) = (dev.zeros(rows * qd), cpu.zeros(rows * qd));
            let (mut dlse, mut clse) = (dev.zeros_f32(rows * heads), cpu.zeros_f32(rows * heads));
            dev.attention_train(&dq, &dk, &dv, &mut dout, &mut dlse, &dm, heads, kv, hd);
            cpu.attention_train(&cq, &ck, &cv, &mut cout, &mut clse, &cm, heads, kv, hd);
            let shape = format!(
                "{label} h={heads} kv={kv} d={hd} seqs={}",
                lengths.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
            );
            rep.add(
                "attn train",
                format!("fwd out {shape}"),
                err2(dev, &dout, &cout, rows * qd),
                TOL_ATTENTION,
                String::new(),
            );
            rep.add(
                "attn train",
                format!("fwd lse {shape}"),
                err2(dev, &dlse, &clse, rows * heads),
                TOL_LOGP,
                String::new(),
            );
            // The backward reads the forward's own output (as in training); the CPU gets the
            // device's rounding of it so that both differentiate the same function values.
            let out_host = dev.to_f32(&dout);
            let cout = cpu.upload_f32(&out_host);
            let (mut ddq, mut cdq) = (dev.zeros(rows * qd), cpu.zeros(rows * qd));
            let (mut ddk, mut cdk) = (dev.zeros(rows * kvd), cpu.zeros(rows * kvd));
            let (mut ddv, mut cdv) = (dev.zeros(rows * kvd), cpu.zeros(rows * kvd));
            dev.attention_train_bwd(&dq, &dk, &dv, &dout, &dlse, &dg, &mut ddq, &mut ddk, &mut ddv, &dm, heads, kv, hd);
            cpu.attention_train_bwd(&cq, &ck, &cv, &cout, &clse, &cg, &mut cdq, &mut cdk, &mut cdv, &cm, heads, kv, hd);
            let e = [
                err2(dev, &ddq, &cdq, rows * qd),
                err2(dev, &ddk, &cdk, rows * kvd),
                err2(dev, &ddv, &cdv, rows * kvd),
            ];
            let note = format!("dq {:.1e} dk {:.1e} dv {:.1e}", e[0], e[1], e[2]);
            rep.add("attn train", format!("bwd {shape}"), e[0].max(e[1]).max(e[2]), TOL_ATTENTION_GRAD, note);
        }
    }
}

/// The fused log-prob (forward and backward) and the fused LoRA linear (forward and backward).
pub fn check_fused<B: TrainBackend>(dev: &B, cpu: &CpuBackend, rep: &mut Report) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(29);
    // 300 x 151936 logits span two vocabulary chunks on the GPU.
    for &(rows, dim, vocab) in &[(5usize, 64usize, 1000usize), (300, 64, 151_936)] {
        let (h, w) = (random(&mut rng, rows * dim, 2.0), random(&mut rng, vocab * dim, 0.5));
        let targets: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
        let dlogp: Vec<f32> = (0..rows).map(|i| if i % 3 == 0 { 0.0 } else { -1.0 / rows as f32 }).collect();
        let ((dh_, ch), (dw_, cw)) = (both(dev, cpu, &h), both(dev, cpu, &w));
        let (mut dlp, mut clp, mut dlse, mut clse) =
            (dev.zeros_f32(rows), cpu.zeros_f32(rows), dev.zeros_f32(rows), cpu.zeros_f32(rows));
        dev.token_logprobs(&dh_, &dw_, &targets, &mut dlp, &mut dlse, rows, dim, vocab);
        cpu.token_logprobs(&ch, &cw, &targets, &mut clp, &mut clse, rows, dim, vocab);
        let shape = format!("rows={rows} dim={dim} vocab={vocab}");
        rep.add("logprob", format!("fwd logp {shape}"), err2(dev, &dlp, &clp, rows), TOL_LOGP, String::new());
        rep.add("logprob", format!("fwd lse {shape}"), err2(dev, &dlse, &clse, rows), TOL_LOGP, String::new());
        let (dd, cd) = (dev.upload_f32_full(&dlogp), cpu.upload_f32_full(&dlogp));
        let (mut ddh, mut cdh) = (dev.zeros(rows * dim), cpu.zeros(rows * dim));
        let (mut ddw, mut cdw) = (dev.zeros_f32(vocab * dim), cpu.zeros_f32(vocab * dim));
        dev.token_logprobs_bwd(&dd, &dh_, &dw_, &targets, &dlse, &mut ddh, Some(&mut ddw), rows, dim, vocab);
        cpu.token_logprobs_bwd(&cd, &ch, &cw, &targets, &clse, &mut cdh, Some(&mut cdw), rows, dim, vocab);
        rep.add("logprob", format!("bwd dh {shape}"), err2(dev, &ddh, &cdh, rows * dim), TOL_NORM, String::new());
        rep.add("logprob", format!("bwd dw {shape}"), err2(dev, &ddw, &cdw, vocab * dim), TOL_NORM, String::new());
    }
    for &(rows, k, n, r, dropout) in
        &[(5usize, 64usize, 48usize, 4usize, None), (70, 896, 128, 16, Some((0.1f32, 9u64)))]
    {
        let (x, w, bias) = (random(&mut rng, rows * k, 1.0), random(&mut rng, n * k, 0.1), random(&mut rng, n, 0.5));
        let (a, bm, g) = (random(&mut rng, r * k, 0.2), random(&mut rng, n * r, 0.2), random(&mut rng, rows * n, 1.0));
        let ((dx_, cx), (dw_, cw), (dbias, cbias)) = (both(dev, cpu, &x), both(dev, cpu, &w), both(dev, cpu, &bias));
        let ((da, ca), (dbm, cbm), (dg, cg)) = (both(dev, cpu, &a), both(dev, cpu, &bm), both(dev, cpu, &g));
        let (xd_dev, xd_cpu) = match dropout {
            Some((p, seed)) => {
                let (mut d, mut c) = (dev.zeros(rows * k), cpu.zeros(rows * k));
                dev.dropout(&dx_, &mut d, rows * k, p, seed);
                cpu.dropout(&cx, &mut c, rows * k, p, seed);
                (Some(d), Some(c))
            }
            None => (None, None),
        };
        let dl = LoraRef { a: &da, b: &dbm, rank: r, scale: 2.0 };
        let cl = LoraRef { a: &ca, b: &cbm, rank: r, scale: 2.0 };
        let (mut dout, mut cout) = (dev.zeros(rows * n), cpu.zeros(rows * n));
        let (mut dxa, mut cxa) = (dev.zeros(rows * r), cpu.zeros(rows * r));
        dev.lora_linear(&dx_, xd_dev.as_ref(), &dw_, Some(&dbias), dl, &mut dout, &mut dxa, rows, k, n);
        cpu.lora_linear(&cx, xd_cpu.as_ref(), &cw, Some(&cbias), cl, &mut cout, &mut cxa, rows, k, n);
        let shape = format!("rows={rows} k={k} n={n} r={r}{}", if dropout.is_some() { " dropout" } else { "" });
        rep.add("lora", format!("fwd {shape}"), err2(dev, &dout, &cout, rows * n), TOL_NORM, String::new());
        // The backward reads the device's own xa, rounded as the device stored it.
        let cxa = cpu.upload_f32(&dev.to_f32(&dxa));
        let (mut ddx, mut cdx) = (dev.zeros(rows * k), cpu.zeros(rows * k));
        let (mut dga, mut cga) = (dev.zeros_f32(r * k), cpu.zeros_f32(r * k));
        let (mut dgb, mut cgb) = (dev.zeros_f32(n * r), cpu.zeros_f32(n * r));
        dev.lora_linear_bwd(
            &dg,
            &dx_,
            xd_dev.as_ref(),
            &dxa,
            &dw_,
            dl,
            &mut ddx,
            &mut dga,
            &mut dgb,
            dropout,
            rows,
            k,
            n,
        );
        cpu.lora_linear_bwd(
            &cg,
            &cx,
            xd_cpu.as_ref(),
            &cxa,
            &cw,
            cl,
            &mut cdx,
            &mut cga,
            &mut cgb,
            dropout,
            rows,
            k,
            n,
        );
        rep.add("lora", format!("bwd dx {shape}"), err2(dev, &ddx, &cdx, rows * k), TOL_NORM, String::new());
        // dA goes through dxa, which the device rounds to bf16 first.
        rep.add("lora", format!("bwd dA {shape}"), err2(dev, &dga, &cga, r * k), TOL_NORM, String::new());
        rep.add("lora", format!("bwd dB {shape}"), err2(dev, &dgb, &cgb, n * r), TOL_ONE_ROUNDING, String::new());
    }
}

/// The global gradient norm and three multi-tensor AdamW steps (decay on and off, clipping).
pub fn check_optimizer<B: TrainBackend>(dev: &B, cpu: &CpuBackend, rep: &mut Report) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(31);
    let sizes = [3usize, 65_536, 70_001, 1];
    let params: Vec<Vec<f32>> = sizes.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let mut dp: Vec<B::Buf> = params.iter().map(|p| dev.upload_f32(p)).collect();
    let mut cp: Vec<Vec<f32>> = params.clone();
    let mut dmaster: Vec<B::Buf> = params.iter().map(|p| dev.upload_f32_full(p)).collect();
    let mut dm: Vec<B::Buf> = sizes.iter().map(|&n| dev.zeros_f32(n)).collect();
    let mut dv: Vec<B::Buf> = sizes.iter().map(|&n| dev.zeros_f32(n)).collect();
    let mut cm: Vec<Vec<f32>> = sizes.iter().map(|&n| cpu.zeros_f32(n)).collect();
    let mut cv: Vec<Vec<f32>> = sizes.iter().map(|&n| cpu.zeros_f32(n)).collect();
    let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let (mut norm_err_max, mut update_err) = (0f64, 0f64);
    for step in 1..=3u64 {
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
        let dg: Vec<B::Buf> = grads.iter().map(|g| dev.upload_f32_full(g)).collect();
        let cg: Vec<Vec<f32>> = grads.clone();
        let dsq = dev.sum_squares_all(&dg.iter().zip(sizes).collect::<Vec<_>>());
        let csq = cpu.sum_squares_all(&cg.iter().zip(sizes).collect::<Vec<_>>());
        norm_err_max = norm_err_max.max((dsq - csq).abs() / csq);
        let grad_scale = if step == 2 { 0.5 } else { 1.0 };
        let mut dt: Vec<AdamWTensor<B>> = dp
            .iter_mut()
            .zip(dmaster.iter_mut())
            .zip(dg.iter())
            .zip(dm.iter_mut().zip(dv.iter_mut()))
            .enumerate()
            .map(|(i, (((param, master), grad), (m, v)))| AdamWTensor {
                param,
                master: dev.master_weights().then_some(master),
                grad,
                m,
                v,
                n: sizes[i],
                decay: i % 2 == 1,
            })
            .collect();
        dev.adamw(&mut dt, &hp, grad_scale, step);
        let mut ct: Vec<AdamWTensor<CpuBackend>> = cp
            .iter_mut()
            .zip(cg.iter())
            .zip(cm.iter_mut().zip(cv.iter_mut()))
            .enumerate()
            .map(|(i, ((param, grad), (m, v)))| AdamWTensor {
                param,
                master: None,
                grad,
                m,
                v,
                n: sizes[i],
                decay: i % 2 == 1,
            })
            .collect();
        cpu.adamw(&mut ct, &hp, grad_scale, step);
    }
    for (i, n) in sizes.iter().enumerate() {
        // Compare the updates (param - start): the step is small against the parameter.
        let d: Vec<f32> =
            dev.to_f32(master_or_param(dev, &dmaster[i], &dp[i])).iter().zip(&params[i]).map(|(a, b)| a - b).collect();
        let c: Vec<f32> = cp[i].iter().zip(&params[i]).map(|(a, b)| a - b).collect();
        update_err = update_err.max(norm_err(&d, &c, *n));
    }
    rep.add("optimizer", "global gradient norm, 4 tensors".into(), norm_err_max, 1e-5, String::new());
    rep.add("optimizer", "adamw 3 steps (decay, clipping), f32 state".into(), update_err, 1e-4, String::new());
    let bf: f64 = (0..sizes.len()).map(|i| norm_err(&dev.to_f32(&dp[i]), &cp[i], sizes[i])).fold(0.0, f64::max);
    rep.add("optimizer", "adamw bf16 parameters".into(), bf, TOL_ONE_ROUNDING, String::new());
}

/// The master copy where the backend keeps one, else the parameter itself.
fn master_or_param<'a, B: TrainBackend>(dev: &B, master: &'a B::Buf, param: &'a B::Buf) -> &'a B::Buf {
    if dev.master_weights() {
        master
    } else {
        param
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

fn flat<B: TrainBackend>(be: &B, bufs: Vec<&B::Buf>) -> Vec<f32> {
    bufs.into_iter().flat_map(|b| be.to_f32(b)).collect()
}

/// Whole training steps of the model in `dir`: full-model gradients, a LoRA AdamW update and a
/// 20-step LoRA SFT loss curve, device against CPU.
pub fn check_training_steps<B: TrainBackend>(
    dev: &B,
    cpu: &CpuBackend,
    dir: &std::path::Path,
    rep: &mut Report,
) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dmodel = Qwen2::load(dev, dir)?;
    let cmodel = Qwen2::load(cpu, dir)?;
    let vocab = cmodel.cfg.vocab_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(37);
    let seqs: Vec<(Vec<u32>, Vec<bool>)> = [45usize, 80, 3]
        .iter()
        .map(|&n| ((0..n).map(|_| rng.gen_range(0..vocab as u32)).collect(), (0..n).map(|i| i >= n / 3).collect()))
        .collect();
    let batch = TrainBatch::pack(&seqs)?;
    let denom = batch.trained_rows().max(1) as f32;
    let dlogp = batch.nll_dlogp(denom);

    // Full fine-tuning gradients.
    let (dlp, dtrace) = dmodel.train_forward(dev, &batch, false)?;
    let (clp, ctrace) = cmodel.train_forward(cpu, &batch, false)?;
    let (dloss, closs) = (batch.nll(&dlp, denom), batch.nll(&clp, denom));
    rep.add(
        "train step",
        format!("{name} loss"),
        (dloss - closs).abs() / closs.abs().max(1e-6),
        SFT_LOSS_REL,
        format!("{dloss:.4} vs {closs:.4}"),
    );
    let mut dgrads = Grads::zeros_for(dev, &dmodel);
    let mut cgrads = Grads::zeros_for(cpu, &cmodel);
    dmodel.train_backward(dev, &batch, dtrace, &dlogp, &mut dgrads)?;
    cmodel.train_backward(cpu, &batch, ctrace, &dlogp, &mut cgrads)?;
    let (dg, cg) = (flat(dev, dgrads.tensors(&dmodel.cfg)), flat(cpu, cgrads.tensors(&cmodel.cfg)));
    let cos = cosine(&dg, &cg);
    rep.add(
        "train step",
        format!("{name} full gradient cosine"),
        1.0 - cos,
        1.0 - MODEL_GRAD_COSINE,
        format!("cosine {cos:.5}"),
    );
    let (dn, cn) = (
        dg.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt(),
        cg.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt(),
    );
    rep.add(
        "train step",
        format!("{name} full gradient norm"),
        (dn - cn).abs() / cn,
        MODEL_GRAD_NORM,
        format!("{dn:.4} vs {cn:.4}"),
    );

    // LoRA: one AdamW update, then a 20-step loss curve.
    let lcfg = LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        seed: 5,
        trainable_tokens: None,
    };
    let (mut dl, mut cl) = (dmodel, cmodel);
    dl.lora = Some(Lora::init(dev, &dl.cfg, &lcfg)?);
    cl.lora = Some(Lora::init(cpu, &cl.cfg, &lcfg)?);
    // The same starting adapters: the CPU takes the device's (bf16) values.
    let starts: Vec<Vec<f32>> = dl.trainable_tensors().into_iter().map(|b| dev.to_f32(b)).collect();
    for (buf, v) in cl.trainable_mut().into_iter().zip(&starts) {
        *buf = cpu.upload_f32(v);
    }
    let ocfg = OptimConfig {
        schedule: Schedule { lr: 2e-3, warmup_steps: 0, total_steps: 20, decay: Decay::Constant, min_lr_ratio: 1.0 },
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
    };
    let (mut dopt, mut copt) = (Optimizer::new(dev, dl.trainable(), ocfg), Optimizer::new(cpu, cl.trainable(), ocfg));
    let (mut dgr, mut cgr) = (Grads::zeros_for(dev, &dl), Grads::zeros_for(cpu, &cl));
    let mut worst_loss = 0f64;
    let mut losses = vec![];
    for step in 1..=20 {
        dgr.zero(dev, &dl.cfg);
        cgr.zero(cpu, &cl.cfg);
        let (dlp, dtr) = dl.train_forward(dev, &batch, true)?;
        let (clp, ctr) = cl.train_forward(cpu, &batch, true)?;
        let (dloss, closs) = (batch.nll(&dlp, denom), batch.nll(&clp, denom));
        worst_loss = worst_loss.max((dloss - closs).abs() / closs.abs().max(1e-6));
        losses.push((dloss, closs));
        dl.train_backward(dev, &batch, dtr, &dlogp, &mut dgr)?;
        cl.train_backward(cpu, &batch, ctr, &dlogp, &mut cgr)?;
        let dcfg = dl.cfg.clone();
        dopt.step(dev, dl.trainable_mut(), dgr.tensors(&dcfg))?;
        copt.step(cpu, cl.trainable_mut(), cgr.tensors(&dcfg))?;
        if step == 1 {
            let du: Vec<f32> =
                flat(dev, dl.trainable_tensors()).iter().zip(starts.iter().flatten()).map(|(a, b)| a - b).collect();
            let cu: Vec<f32> =
                flat(cpu, cl.trainable_tensors()).iter().zip(starts.iter().flatten()).map(|(a, b)| a - b).collect();
            let cos = cosine(&du, &cu);
            rep.add(
                "train step",
                format!("{name} lora adamw update cosine"),
                1.0 - cos,
                1.0 - MODEL_UPDATE_COSINE,
                format!("cosine {cos:.4}"),
            );
        }
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    rep.add(
        "train step",
        format!("{name} lora sft 20 steps, losses"),
        worst_loss,
        SFT_LOSS_REL,
        format!("device {:.4} -> {:.4}, cpu {:.4} -> {:.4}", first.0, last.0, first.1, last.1),
    );
    Ok(())
}

/// Every training check: backward ops, training attention (labelled `label`), fused ops, the
/// optimiser, then training steps of the first model.
pub fn run_train_checks<B: TrainBackend>(
    dev: &B,
    cpu: &CpuBackend,
    models: &[std::path::PathBuf],
    rep: &mut Report,
    label: &str,
) -> Result<()> {
    check_backward_ops(dev, cpu, rep);
    check_train_attention(dev, cpu, rep, label);
    check_fused(dev, cpu, rep);
    check_optimizer(dev, cpu, rep);
    if let Some(m) = models.first() {
        check_training_steps(dev, cpu, m, rep)?;
    }
    Ok(())
}
