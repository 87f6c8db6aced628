//! The training half of the selftest: every backward op, the fused log-prob, fused LoRA and
//! AdamW on the device against the CPU backend, then whole training steps of the tiny model
//! (gradients, an optimiser update, a 20-step LoRA SFT loss curve).
//!
//! The ops' cases and tolerances are their families' (see [`crate::diagnostics::ops`]).
//! Whole-model steps (bf16 weights and activations through every layer, against f32): the
//! gradient's cosine similarity to the CPU's >= 0.99 and its norm within 5%; the AdamW update's
//! cosine >= 0.95 (Adam's first step is nearly `lr * sign(g)`, so components with tiny
//! gradients may flip); the 20-step SFT losses within 2% of the CPU's at every step.

use anyhow::Result;
use rand::{Rng, SeedableRng};

use super::Report;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, TrainBackend};
use crate::diagnostics::ops::{self, Ctx, OpFamily, Visitor};
use crate::model::lora::{Lora, LoraConfig, Target};
use crate::model::training::{Grads, TrainBatch};
use crate::model::Qwen2;
use crate::train::{Decay, OptimConfig, Optimizer, Schedule};

const MODEL_GRAD_COSINE: f64 = 0.99;
const MODEL_GRAD_NORM: f64 = 0.05;
const MODEL_UPDATE_COSINE: f64 = 0.95;
const SFT_LOSS_REL: f64 = 0.02;

/// Runs the training cases of one op family (see [`crate::diagnostics::ops`]), labelled
/// `label`.
pub fn check_train_family<B: TrainBackend, F: OpFamily>(
    family: &F,
    dev: &B,
    cpu: &CpuBackend,
    rep: &mut Report,
    label: &str,
) {
    let mut t = Ctx::new(dev, cpu, F::TRAIN_SEED, rep, label);
    for case in family.train_cases() {
        family.check_train(&mut t, &case);
    }
}

/// Runs the training cases of every registered op family whose name `only` accepts, in
/// registry order.
pub fn check_train_families<B: TrainBackend>(
    dev: &B,
    cpu: &CpuBackend,
    rep: &mut Report,
    label: &str,
    only: impl Fn(&str) -> bool,
) {
    struct Run<'a, B, P> {
        dev: &'a B,
        cpu: &'a CpuBackend,
        rep: &'a mut Report,
        label: &'a str,
        only: P,
    }
    impl<B: TrainBackend, P: Fn(&str) -> bool> Visitor for Run<'_, B, P> {
        fn visit<F: OpFamily>(&mut self, family: &F) {
            if (self.only)(F::NAME) {
                check_train_family(family, self.dev, self.cpu, self.rep, self.label);
            }
        }
    }
    ops::registry(&mut Run { dev, cpu, rep, label, only });
}

/// Training attention (forward with log-sum-exp, backward) over packed batches, labelled
/// `label` (the attention family alone: the CUDA selftest runs it again on the generic
/// kernels).
pub fn check_train_attention<B: TrainBackend>(dev: &B, cpu: &CpuBackend, rep: &mut Report, label: &str) {
    check_train_family(&ops::attention::Attention, dev, cpu, rep, label);
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

/// Every training check: the training cases of every op family (backward ops, training
/// attention labelled `label`, the fused log-prob and LoRA linear, the optimiser), then
/// training steps of the first model.
pub fn run_train_checks<B: TrainBackend>(
    dev: &B,
    cpu: &CpuBackend,
    models: &[std::path::PathBuf],
    rep: &mut Report,
    label: &str,
) -> Result<()> {
    check_train_families(dev, cpu, rep, label, |_| true);
    if let Some(m) = models.first() {
        check_training_steps(dev, cpu, m, rep)?;
    }
    Ok(())
}
