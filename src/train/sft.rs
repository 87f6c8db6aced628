//! `protege sft`: supervised fine-tuning on trajectories, loss on the agent's tokens only.
//!
//! The run directory holds `config.toml` (a snapshot), `metrics.jsonl` (one line per step:
//! step, loss, eval_loss when evaluated, lr, grad_norm, tokens, tokens_per_s, elapsed_s),
//! `checkpoints/step-N/` (trained tensors, optimiser moments, `state.json` with the step and
//! data cursor; each written under a temporary name, then renamed) with `checkpoints/latest`
//! naming the newest, and the result: `adapter/` (PEFT) or `model/` (HF directory).
//! Resuming restores the newest checkpoint and cuts `metrics.jsonl` back to it, so the loss
//! curve continues exactly as an uninterrupted run's.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::data::{build_examples, pack_batches, DataStats, Example};
use super::memory::MemoryPlan;
use super::{OptimConfig, Optimizer, Schedule};
use crate::agent::trajectory::read_jsonl;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, Device};
use crate::backend::TrainBackend;
use crate::config::SftConfig;
use crate::model::export::{export_peft, write_atomic};
use crate::model::lora::Lora;
use crate::model::training::{Grads, TrainBatch};
use crate::model::Qwen2;
use crate::tokenizer::Tokenizer;

/// Where the data stream stands: epoch and next batch within it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub batch: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    step: u64,
    cursor: Cursor,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

pub struct SftOutcome {
    pub run_dir: PathBuf,
    pub last_step: u64,
    pub data: DataStats,
    pub metrics: Vec<StepMetrics>,
}

/// The batches of one epoch, in a seeded order.
fn epoch_batches(examples: &[Example], batch_tokens: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    pack_batches(examples, batch_tokens, seed.wrapping_add(epoch.wrapping_mul(0x9E37_79B9)))
}

fn to_batch(examples: &[Example], idx: &[usize]) -> Result<TrainBatch> {
    let seqs: Vec<(Vec<u32>, Vec<bool>)> =
        idx.iter().map(|&i| (examples[i].ids.clone(), examples[i].trained.clone())).collect();
    TrainBatch::pack(&seqs)
}

/// Mean loss per learned token over `examples`.
fn eval_loss<B: TrainBackend>(be: &B, model: &Qwen2<B>, examples: &[Example], batch_tokens: usize) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for idx in pack_batches(examples, batch_tokens, 0) {
        let batch = to_batch(examples, &idx)?;
        // No backward follows: recomputation mode keeps only layer inputs alive.
        let (logp, _) = model.train_forward(be, &batch, true)?;
        for (l, &m) in logp.iter().zip(&batch.trained) {
            if m {
                sum -= *l as f64;
                n += 1;
            }
        }
    }
    Ok(sum / n.max(1) as f64)
}

/// Runs (or, with `resume`, continues) the SFT run of `cfg` on the CPU backend. `config_text`
/// is snapshotted into the run directory. `stop_after` ends the process-local run after that
/// many steps (as an interruption would), leaving the checkpoints to resume from.
pub fn run_sft(cfg: &SftConfig, config_text: &str, resume: bool, stop_after: Option<u64>) -> Result<SftOutcome> {
    sft_with(CpuBackend::new(), cfg, config_text, resume, stop_after)
}

/// As [`run_sft`], on `device` (the GPU: bf16 compute, f32 gradients and optimiser state).
pub fn run_sft_on(
    device: Device,
    cfg: &SftConfig,
    config_text: &str,
    resume: bool,
    stop_after: Option<u64>,
) -> Result<SftOutcome> {
    match device {
        Device::Cpu => run_sft(cfg, config_text, resume, stop_after),
        Device::Cuda(n) => sft_with(CudaBackend::new(n)?, cfg, config_text, resume, stop_after),
    }
}

fn sft_with<B: TrainBackend>(
    be: B,
    cfg: &SftConfig,
    config_text: &str,
    resume: bool,
    stop_after: Option<u64>,
) -> Result<SftOutcome> {
    let run = cfg.output.run_dir.clone();
    let metrics_path = run.join("metrics.jsonl");
    // A run exists once it has a checkpoint; a run killed before its first one starts over.
    if !resume && run.join("checkpoints").join("latest").exists() {
        bail!(
            "run directory {} already holds a run; pass --resume to continue it or choose another output.run_dir",
            run.display()
        );
    }
    if !resume && run.join("checkpoints").exists() {
        std::fs::remove_dir_all(run.join("checkpoints"))?;
    }
    std::fs::create_dir_all(&run).with_context(|| format!("cannot create run directory {}", run.display()))?;
    write_atomic(&run.join("config.toml"), config_text.as_bytes())?;

    eprintln!("sft: on {}", be.name());
    let tok = Tokenizer::from_dir(&cfg.model.path)?;
    let mut model = Qwen2::load_merged(&be, &cfg.model.path, None, cfg.model.context)?;
    if let Some(l) = &cfg.lora {
        model.lora = Some(Lora::init(&be, &model.cfg, l)?);
    }
    let mut trajectories = vec![];
    for f in &cfg.data.train {
        trajectories.extend(read_jsonl(f)?);
    }
    trajectories.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.train.seed));
    let n_eval = (trajectories.len() as f32 * cfg.data.eval_fraction).floor() as usize;
    let eval_set = trajectories.split_off(trajectories.len() - n_eval);
    let (train, stats) = build_examples(&trajectories, &tok, cfg.data.max_seq_len, cfg.data.overlong)?;
    let (eval, _) = build_examples(&eval_set, &tok, cfg.data.max_seq_len, cfg.data.overlong)?;
    if train.is_empty() {
        bail!("no training examples: {} trajectories, {stats:?}", trajectories.len());
    }
    eprintln!(
        "sft: {} train examples ({} truncated, {} dropped too long, {} with nothing to learn), {} eval",
        stats.kept,
        stats.truncated,
        stats.dropped_too_long,
        stats.dropped_nothing_to_learn,
        eval.len()
    );

    let longest = train.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let plan = MemoryPlan::new(&be, &model, cfg.data.batch_tokens.max(longest), cfg.train.recompute);
    eprintln!("sft: memory plan: {plan}");
    let o = &cfg.optim;
    let ocfg = OptimConfig {
        schedule: Schedule {
            lr: o.lr,
            warmup_steps: o.warmup_steps,
            total_steps: cfg.train.steps,
            decay: o.decay,
            min_lr_ratio: o.min_lr_ratio,
        },
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
        max_grad_norm: (o.max_grad_norm > 0.0).then_some(o.max_grad_norm),
    };
    let mut opt = Optimizer::new(&be, model.trainable(), ocfg);
    let mut state = State { step: 0, cursor: Cursor { epoch: 0, batch: 0 } };
    let mut metrics = vec![];
    if resume {
        state = checkpoint::load(&be, &run, &mut model, &mut opt)?;
        opt.step = state.step;
        metrics = checkpoint::cut_metrics(&metrics_path, state.step)?;
        eprintln!("sft: resumed at step {}", state.step);
    } else if metrics_path.exists() {
        std::fs::remove_file(&metrics_path)?;
    }
    let mut metrics_file = std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?;

    let bar = indicatif::ProgressBar::new(cfg.train.steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps, ETA {eta} | {msg}")
            .expect("valid template"),
    );
    bar.set_position(state.step);
    let started = Instant::now();
    let mut batches = epoch_batches(&train, cfg.data.batch_tokens, cfg.train.seed, state.cursor.epoch);
    let first = state.step;
    let mut grads = Grads::zeros_for(&be, &model);
    while state.step < cfg.train.steps {
        if stop_after.is_some_and(|n| state.step - first >= n) {
            break;
        }
        let step_started = Instant::now();
        grads.zero(&be, &model.cfg);
        let (mut loss, mut tokens) = (0f64, 0usize);
        for micro in 0..cfg.train.grad_accum {
            if state.cursor.batch >= batches.len() {
                state.cursor = Cursor { epoch: state.cursor.epoch + 1, batch: 0 };
                batches = epoch_batches(&train, cfg.data.batch_tokens, cfg.train.seed, state.cursor.epoch);
            }
            let mut batch = to_batch(&train, &batches[state.cursor.batch])?;
            state.cursor.batch += 1;
            // Dropout masks follow from (seed, step, micro-batch), so a resumed run draws the same.
            batch.dropout_seed =
                Some(cfg.train.seed ^ (state.step * cfg.train.grad_accum + micro).wrapping_mul(0xA24B_AED4_963E_E407));
            // Token mean within the micro-batch, averaged over the accumulated micro-batches.
            let denom = batch.trained_rows().max(1) as f32 * cfg.train.grad_accum as f32;
            let (logp, trace) = model.train_forward(&be, &batch, cfg.train.recompute)?;
            let micro = batch.nll(&logp, denom);
            let dlogp = batch.nll_dlogp(denom);
            if !micro.is_finite() {
                bail!(
                    "loss is {micro} at step {}; stopping. The last good checkpoint is in {}",
                    state.step + 1,
                    run.join("checkpoints").display()
                );
            }
            loss += micro;
            tokens += batch.rows();
            model.train_backward(&be, &batch, trace, &dlogp, &mut grads)?;
        }
        let model_cfg = model.cfg.clone();
        let report = opt.step(&be, model.trainable_mut(), grads.tensors(&model_cfg))?;
        state.step = report.step;
        let eval_due = !eval.is_empty()
            && ((cfg.train.eval_every > 0 && state.step.is_multiple_of(cfg.train.eval_every))
                || state.step == cfg.train.steps);
        let m = StepMetrics {
            step: state.step,
            loss,
            eval_loss: if eval_due { Some(eval_loss(&be, &model, &eval, cfg.data.batch_tokens)?) } else { None },
            lr: report.lr,
            grad_norm: report.grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
        metrics_file.flush()?;
        bar.set_message(format!("loss {:.4}, {:.0} tok/s", m.loss, m.tokens_per_s));
        bar.set_position(state.step);
        metrics.push(m);
        let ckpt_due = (cfg.train.checkpoint_every > 0 && state.step.is_multiple_of(cfg.train.checkpoint_every))
            || state.step == cfg.train.steps;
        if ckpt_due {
            checkpoint::save(&be, &run, &model, &opt, state.step, &state)?;
        }
    }
    bar.finish_and_clear();
    if state.step == cfg.train.steps {
        match &model.lora {
            Some(_) => export_peft(&be, &model, &cfg.model.path.display().to_string(), &run.join("adapter"))?,
            // With the context override recorded in its config.json.
            None => super::rl::export_final(&be, &mut model, &cfg.model.path, &run.join("model"))?,
        }
    }
    Ok(SftOutcome { run_dir: run, last_step: state.step, data: stats, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutting_metrics_drops_later_steps_and_a_torn_last_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let line = |step| {
            let m = StepMetrics {
                step,
                loss: 1.0,
                eval_loss: None,
                lr: 0.1,
                grad_norm: 1.0,
                tokens: 4,
                tokens_per_s: 1.0,
                elapsed_s: 1.0,
            };
            serde_json::to_string(&m).unwrap()
        };
        std::fs::write(&path, format!("{}\n{}\n{}\n{{\"step\": 4, \"lo", line(1), line(2), line(3))).unwrap();
        let kept: Vec<StepMetrics> = checkpoint::cut_metrics(&path, 2).unwrap();
        assert_eq!(kept.iter().map(|m| m.step).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{}\n{}\n", line(1), line(2)));
        std::fs::write(&path, format!("{}\ngarbage\n{}\n", line(1), line(2))).unwrap();
        let e = format!("{:#}", checkpoint::cut_metrics::<StepMetrics>(&path, 2).unwrap_err());
        assert!(e.contains("metrics.jsonl:2"), "{e}");
    }
}
