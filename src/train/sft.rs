//! `protege sft`: supervised fine-tuning on trajectories, loss on the agent's tokens only.
//!
//! The run directory holds `config.toml` (a snapshot), `metrics.jsonl` (one line per step:
//! step, loss, eval_loss when evaluated, lr, grad_norm, tokens, tokens_per_s, elapsed_s),
//! `checkpoints/step-N/` (trained tensors, optimiser moments, `state.json` with the step and
//! data cursor; each written under a temporary name, then renamed) with `checkpoints/latest`
//! naming the newest, and the result: `model/` (HF directory, as `save_pretrained` writes it: the
//! base's dtype, sharded, tokenizer files; LoRA adapters merged) and, with LoRA, `adapter/` (PEFT).
//! Resuming restores the newest checkpoint and cuts `metrics.jsonl` back to it, so the loss
//! curve continues exactly as an uninterrupted run's. The same scalars go to a TensorBoard
//! event file in the run directory ([`crate::tensorboard`]), cut back the same way.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::data::{build_examples, pack_batches, read_rows, DataStats, Example};
use super::dist::nccl::NcclCollective;
use super::dist::{Collective, HostCollective, Star, World};
use super::export::export_trained;
use super::memory::MemoryPlan;
use super::untrained::attach_training_adapters;
use super::{OptimConfig, Optimizer, StepReport};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{libs, CudaBackend};
use crate::backend::Device;
use crate::backend::TrainBackend;
use crate::config::SftConfig;
use crate::model::training::{Grads, Trace, TrainBatch};
use crate::model::Qwen2;
use crate::tensorboard::EventWriter;
use crate::tokenizer::Tokenizer;
use crate::util::write_atomic;

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
    run_sft_on(Device::Cpu, &World::single(), cfg, config_text, resume, stop_after)
}

/// As [`run_sft`], on `device` (the GPU: bf16 compute, f32 gradients and optimiser state), as
/// rank `world.rank` of a data-parallel run of `world.size` processes (see [`super::dist`]):
/// gradients summed by NCCL on GPUs (through host memory where NCCL is missing, and on the
/// CPU), optimiser state sharded. Only rank 0 writes metrics and exports; every rank writes its
/// shard of each checkpoint (the run directory must be shared between machines).
pub fn run_sft_on(
    device: Device,
    world: &World,
    cfg: &SftConfig,
    config_text: &str,
    resume: bool,
    stop_after: Option<u64>,
) -> Result<SftOutcome> {
    let star = Star::connect(world)?;
    match device {
        Device::Cpu => {
            sft_with(CpuBackend::new(), &mut HostCollective::new(star), cfg, config_text, resume, stop_after)
        }
        Device::Cuda(n) => {
            let be = CudaBackend::new(n)?;
            if world.size > 1 && libs::probe().nccl.present() {
                let mut coll = NcclCollective::new(&be, star)?;
                sft_with(be, &mut coll, cfg, config_text, resume, stop_after)
            } else {
                if world.size > 1 {
                    eprintln!("sft: libnccl not found; gradients are summed through host memory (slow)");
                }
                sft_with(be, &mut HostCollective::new(star), cfg, config_text, resume, stop_after)
            }
        }
    }
}

/// The SFT loop: a page of named steps, each a method of `SftRun`.
fn sft_with<B: TrainBackend>(
    be: B,
    coll: &mut dyn Collective<B>,
    cfg: &SftConfig,
    config_text: &str,
    resume: bool,
    stop_after: Option<u64>,
) -> Result<SftOutcome> {
    let mut run = SftRun::setup(be, coll, cfg, config_text, resume)?;
    let first = run.state.step;
    while run.state.step < cfg.train.steps {
        if stop_after.is_some_and(|n| run.state.step - first >= n) {
            break;
        }
        let step_started = Instant::now();
        let (loss, tokens) = run.accumulate_gradients()?;
        let report = run.update()?;
        let eval_loss = run.evaluate()?;
        let m = StepMetrics {
            step: run.state.step,
            loss,
            eval_loss,
            lr: report.lr,
            grad_norm: report.grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
            elapsed_s: run.started.elapsed().as_secs_f64(),
        };
        run.log(m)?;
        run.checkpoint()?;
    }
    run.finish()
}

/// One SFT run, as one rank of a data-parallel run: the model, its optimiser, the examples and
/// where the data stream stands. Only the main rank writes metrics (`metrics_file`, `events`
/// are `None` elsewhere). The backend, which the model's buffers live on, drops last.
struct SftRun<'a, B: TrainBackend> {
    cfg: &'a SftConfig,
    coll: &'a mut dyn Collective<B>,
    world: World,
    /// The run directory.
    dir: PathBuf,
    state: State,
    train: Vec<Example>,
    eval: Vec<Example>,
    data: DataStats,
    /// The current epoch's batches, in order.
    batches: Vec<Vec<usize>>,
    metrics: Vec<StepMetrics>,
    metrics_file: Option<std::fs::File>,
    /// The same scalars for TensorBoard.
    events: Option<EventWriter>,
    bar: indicatif::ProgressBar,
    /// Without a terminal (a batch job's log) the bar draws nothing: a plain line per step instead.
    plain_log: bool,
    started: Instant,
    grads: Grads<B>,
    opt: Optimizer<B>,
    model: Qwen2<B>,
    be: B,
}

impl<'a, B: TrainBackend> SftRun<'a, B> {
    /// Prepares the run directory (or resumes the run in it), loads the model with its training
    /// adapters, builds the train and eval examples, and sets up the optimiser (sharded across
    /// ranks) and the metrics files.
    fn setup(
        be: B,
        coll: &'a mut dyn Collective<B>,
        cfg: &'a SftConfig,
        config_text: &str,
        resume: bool,
    ) -> Result<Self> {
        let world = coll.world().clone();
        let main = world.is_main();
        let dir = cfg.output.run_dir.clone();
        let metrics_path = dir.join("metrics.jsonl");
        // A run exists once it has a checkpoint; a run killed before its first one starts over.
        if !resume && dir.join("checkpoints").join("latest").exists() {
            bail!(
                "run directory {} already holds a run; pass --resume to continue it or choose another output.run_dir",
                dir.display()
            );
        }
        coll.barrier()?;
        if main {
            if !resume && dir.join("checkpoints").exists() {
                std::fs::remove_dir_all(dir.join("checkpoints"))?;
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create run directory {}", dir.display()))?;
            write_atomic(&dir.join("config.toml"), config_text.as_bytes())?;
        }
        coll.barrier()?;

        if world.size > 1 {
            // One write, so that the ranks' lines do not interleave on a shared stderr.
            let line = format!("sft: rank {} of {} on {}\n", world.rank, world.size, be.name());
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        } else {
            eprintln!("sft: on {}", be.name());
        }
        let tok = Tokenizer::from_dir(&cfg.model.path)?;
        let mut model = Qwen2::load_merged(&be, &cfg.model.path, None, cfg.model.context)?;
        attach_training_adapters(&be, &mut model, &tok, cfg.lora.as_ref(), "sft", main)?;
        let (train, eval, data) = load_examples(cfg, &tok, model.cfg.vocab_size, main)?;

        let longest = train.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let plan = MemoryPlan::new(&be, &model, cfg.data.batch_tokens.max(longest), cfg.train.recompute);
        if main {
            eprintln!("sft: memory plan: {plan}");
        }
        let mut opt = Optimizer::new(&be, model.trainable(), OptimConfig::from_section(&cfg.optim, cfg.train.steps));
        opt.shard(&be, world.rank, world.size);
        let mut state = State { step: 0, cursor: Cursor { epoch: 0, batch: 0 } };
        let mut metrics = vec![];
        if resume {
            state = checkpoint::load(&be, &dir, &mut model, &mut opt)?;
            opt.step = state.step;
            if main {
                metrics = checkpoint::cut_metrics(&metrics_path, state.step)?;
                eprintln!("sft: resumed at step {}", state.step);
            }
        } else if main && metrics_path.exists() {
            std::fs::remove_file(&metrics_path)?;
        }
        coll.barrier()?;
        let metrics_file =
            if main { Some(std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?) } else { None };
        // Cut back like metrics.jsonl on a resume.
        let events = if main { Some(EventWriter::for_run(&dir, resume.then_some(state.step))?) } else { None };

        let bar = if main { indicatif::ProgressBar::new(cfg.train.steps) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps, ETA {eta} | {msg}")
                .expect("valid template"),
        );
        bar.set_position(state.step);
        let plain_log = main && !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let started = Instant::now();
        let batches = epoch_batches(&train, cfg.data.batch_tokens, cfg.train.seed, state.cursor.epoch);
        let grads = Grads::zeros_for(&be, &model);
        Ok(Self {
            cfg,
            coll,
            world,
            dir,
            state,
            train,
            eval,
            data,
            batches,
            metrics,
            metrics_file,
            events,
            bar,
            plain_log,
            started,
            grads,
            opt,
            model,
            be,
        })
    }

    /// This rank's next batch. Each takes `world.size` batches of the stream, one per rank, so
    /// a run of N ranks trains on what one process with grad_accum * N would; the stream
    /// starts a new epoch (a new seeded order) when one runs out.
    fn next_batch(&mut self) -> Result<TrainBatch> {
        let (cfg, cursor) = (self.cfg, &mut self.state.cursor);
        let mut mine = None;
        for r in 0..self.world.size {
            if cursor.batch >= self.batches.len() {
                *cursor = Cursor { epoch: cursor.epoch + 1, batch: 0 };
                self.batches = epoch_batches(&self.train, cfg.data.batch_tokens, cfg.train.seed, cursor.epoch);
            }
            if r == self.world.rank {
                mine = Some(to_batch(&self.train, &self.batches[cursor.batch])?);
            }
            cursor.batch += 1;
        }
        Ok(mine.expect("every rank takes a batch"))
    }

    /// Forward and backward over `grad_accum` micro-batches, their gradients summed (and, with
    /// several ranks, summed across them too); returns the loss and the tokens of the step.
    fn accumulate_gradients(&mut self) -> Result<(f64, usize)> {
        let cfg = self.cfg;
        let world_size = self.world.size;
        self.grads.zero(&self.be, &self.model.cfg);
        let (mut loss, mut tokens) = (0f64, 0usize);
        for micro in 0..cfg.train.grad_accum {
            let mut batch = self.next_batch()?;
            // Dropout masks follow from (seed, step, micro-batch, rank), so a resumed run draws
            // the same.
            let global_micro =
                (self.state.step * cfg.train.grad_accum + micro) * world_size as u64 + self.world.rank as u64;
            batch.dropout_seed = Some(cfg.train.seed ^ global_micro.wrapping_mul(0xA24B_AED4_963E_E407));
            // Token mean within the micro-batch, averaged over the accumulated micro-batches of
            // every rank (the ranks' gradients are summed).
            let denom = batch.trained_rows().max(1) as f32 * (cfg.train.grad_accum * world_size as u64) as f32;
            let (logp, trace) = self.model.train_forward(&self.be, &batch, cfg.train.recompute)?;
            let micro_loss = batch.nll(&logp, denom);
            let dlogp = batch.nll_dlogp(denom);
            if !micro_loss.is_finite() {
                bail!(
                    "loss is {micro_loss} at step {}; stopping. The last good checkpoint is in {}",
                    self.state.step + 1,
                    self.dir.join("checkpoints").display()
                );
            }
            loss += micro_loss;
            tokens += batch.rows();
            if world_size > 1 && micro + 1 == cfg.train.grad_accum {
                self.backward_all_reduce(&batch, trace, &dlogp)?;
            } else {
                self.model.train_backward(&self.be, &batch, trace, &dlogp, &mut self.grads)?;
            }
        }
        if world_size > 1 {
            let mut sums = [loss, tokens as f64];
            self.coll.all_reduce_host(&mut sums)?;
            (loss, tokens) = (sums[0], sums[1] as usize);
        }
        Ok((loss, tokens))
    }

    /// The backward of the last micro-batch of a data-parallel step: each layer's gradients
    /// are summed across ranks as soon as its backward is done, overlapping the layers still
    /// to come (on GPUs); the rest (embeddings, final norm) after.
    fn backward_all_reduce(&mut self, batch: &TrainBatch, trace: Trace<B>, dlogp: &[f32]) -> Result<()> {
        let (be, coll) = (&self.be, &mut *self.coll);
        let model_cfg = self.model.cfg.clone();
        self.model.train_backward_with(be, batch, trace, dlogp, &mut self.grads, &mut |l, g| {
            let range = g.layer_range(l);
            let sizes: Vec<usize> = g.tensors(&model_cfg).iter().map(|t| be.len(t)).collect();
            let bufs = g.tensors_mut(&model_cfg).into_iter().zip(sizes).skip(range.start).take(range.len()).collect();
            coll.all_reduce_sum(be, bufs)
        })?;
        let ranges: Vec<_> = (0..model_cfg.num_layers).map(|l| self.grads.layer_range(l)).collect();
        let inside = |i: usize| ranges.iter().any(|r| r.contains(&i));
        let sizes: Vec<usize> = self.grads.tensors(&model_cfg).iter().map(|t| be.len(t)).collect();
        let rest = self
            .grads
            .tensors_mut(&model_cfg)
            .into_iter()
            .zip(sizes)
            .enumerate()
            .filter(|(i, _)| !inside(*i))
            .map(|(_, b)| b)
            .collect();
        coll.all_reduce_sum(be, rest)?;
        coll.wait(be)
    }

    /// The optimiser step; with several ranks (ZeRO-1) every tensor's owner updated it and the
    /// others receive it.
    fn update(&mut self) -> Result<StepReport> {
        let be = &self.be;
        let model_cfg = self.model.cfg.clone();
        let report = self.opt.step(be, self.model.trainable_mut(), self.grads.tensors(&model_cfg))?;
        if self.world.size > 1 {
            let owners: Vec<usize> = (0..self.opt.shapes.len()).map(|i| self.opt.owner(i)).collect();
            for (p, owner) in self.model.trainable_mut().into_iter().zip(owners) {
                let n = be.len(p);
                self.coll.broadcast(be, p, n, owner)?;
            }
            self.coll.wait(be)?;
        }
        self.model.sync_token_rows(be);
        self.state.step = report.step;
        Ok(report)
    }

    /// The eval loss, on the main rank every `train.eval_every` steps and at the end.
    fn evaluate(&self) -> Result<Option<f64>> {
        let t = &self.cfg.train;
        let step = self.state.step;
        let due = self.world.is_main()
            && !self.eval.is_empty()
            && ((t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || step == t.steps);
        if !due {
            return Ok(None);
        }
        Ok(Some(eval_loss(&self.be, &self.model, &self.eval, self.cfg.data.batch_tokens)?))
    }

    /// Appends the step's line to `metrics.jsonl` and the event file (main rank) and shows it.
    fn log(&mut self, m: StepMetrics) -> Result<()> {
        if let Some(f) = self.metrics_file.as_mut() {
            writeln!(f, "{}", serde_json::to_string(&m)?)?;
            f.flush()?;
        }
        if let Some(w) = self.events.as_mut() {
            w.scalars(m.step, &crate::tensorboard::scalars_of("sft", &serde_json::to_value(&m)?))?;
        }
        self.bar.set_message(format!("loss {:.4}, {:.0} tok/s", m.loss, m.tokens_per_s));
        self.bar.set_position(self.state.step);
        if self.plain_log {
            let eval = m.eval_loss.map(|e| format!(", eval loss {e:.4}")).unwrap_or_default();
            eprintln!(
                "sft: step {}/{}: loss {:.4}{eval}, lr {:.3e}, grad norm {:.3}, {:.0} tok/s, {:.0}s",
                m.step, self.cfg.train.steps, m.loss, m.lr, m.grad_norm, m.tokens_per_s, m.elapsed_s
            );
        }
        self.metrics.push(m);
        Ok(())
    }

    /// Every `train.checkpoint_every` steps and at the end: every rank writes its shard of the
    /// exact resume point.
    fn checkpoint(&mut self) -> Result<()> {
        let t = &self.cfg.train;
        let step = self.state.step;
        if (t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every)) || step == t.steps {
            let coll = &mut *self.coll;
            checkpoint::save_ranked(
                &self.be,
                &self.dir,
                &self.model,
                &self.opt,
                step,
                &self.state,
                &self.world,
                &mut || coll.barrier(),
            )?;
        }
        Ok(())
    }

    /// Exports the trained model when the run is done (an interrupted run leaves its
    /// checkpoints only): rank 0 writes it, from the f32 masters where the optimiser keeps them
    /// (each collected from the rank that owns it).
    fn finish(mut self) -> Result<SftOutcome> {
        self.bar.finish_and_clear();
        if self.state.step == self.cfg.train.steps {
            let mut masters = collect_masters(&self.be, self.coll, &self.opt)?;
            if self.world.is_main() {
                export_trained(&self.be, &mut self.model, &mut masters, &self.cfg.model.path, &self.dir)?;
            }
        }
        let metrics = std::mem::take(&mut self.metrics);
        Ok(SftOutcome { run_dir: self.dir.clone(), last_step: self.state.step, data: self.data.clone(), metrics })
    }
}

/// The train and eval examples: the trajectories of `data.train`, shuffled by the seed, the last
/// `data.eval_fraction` of them held out for the eval loss.
fn load_examples(
    cfg: &SftConfig,
    tok: &Tokenizer,
    vocab_size: usize,
    main: bool,
) -> Result<(Vec<Example>, Vec<Example>, DataStats)> {
    let mut trajectories = vec![];
    for f in &cfg.data.train {
        trajectories.extend(read_rows(f, vocab_size)?);
    }
    trajectories.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.train.seed));
    let n_eval = (trajectories.len() as f32 * cfg.data.eval_fraction).floor() as usize;
    let eval_set = trajectories.split_off(trajectories.len() - n_eval);
    let (train, stats) = build_examples(&trajectories, tok, cfg.data.max_seq_len, cfg.data.overlong)?;
    let (eval, _) = build_examples(&eval_set, tok, cfg.data.max_seq_len, cfg.data.overlong)?;
    if train.is_empty() {
        bail!("no training examples: {} trajectories, {stats:?}", trajectories.len());
    }
    if main {
        eprintln!(
            "sft: {} train examples ({} truncated, {} dropped too long, {} with nothing to learn), {} eval",
            stats.kept,
            stats.truncated,
            stats.dropped_too_long,
            stats.dropped_nothing_to_learn,
            eval.len()
        );
    }
    Ok((train, eval, stats))
}

/// Every trained tensor's f32 master copy on rank 0 (each broadcast from the rank that owns
/// it); empty where the backend keeps no masters. Every rank must call it.
fn collect_masters<B: TrainBackend>(be: &B, coll: &mut dyn Collective<B>, opt: &Optimizer<B>) -> Result<Vec<B::Buf>> {
    if opt.master.is_empty() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for (i, (_, shape)) in opt.shapes.iter().enumerate() {
        let n = shape.iter().product();
        let mut buf = be.zeros_f32(n);
        if opt.owns(i) {
            be.copy(&opt.master[i], &mut buf, n);
        }
        coll.broadcast(be, &mut buf, n, opt.owner(i))?;
        out.push(buf);
    }
    Ok(out)
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
        // Kept lines stay byte for byte, even where a float would print differently again.
        let exact = r#"{"step": 1, "loss": 0.12345678901234, "eval_loss": null, "lr": 1e-5, "grad_norm": 1, "tokens": 4, "tokens_per_s": 1.0, "elapsed_s": 1.0}"#;
        let text = format!("{exact}\n{}\n{}\n", line(2), line(3));
        std::fs::write(&path, &text).unwrap();
        let kept: Vec<StepMetrics> = checkpoint::cut_metrics(&path, 3).unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        checkpoint::cut_metrics::<StepMetrics>(&path, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{exact}\n{}\n", line(2)));
    }
}
