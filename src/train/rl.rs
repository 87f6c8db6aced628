//! `protege rl`: GRPO on multi-turn agent episodes, colocated (rollouts and training share the
//! one copy of the weights in this process), with the SWE-Protégé reward and a curriculum of
//! stages.
//!
//! Per step: the stage's task pool is sampled (seeded by the step, so a resumed run samples
//! the same tasks), `group_size` episodes per task run concurrently with batched generation
//! ([`super::rollout`]), each is graded in a fresh copy, judged and rewarded; rewards become
//! group-relative advantages; the clipped objective ([`super::grpo`]) is minimised on the
//! policy's own tokens, from the ids recorded at generation (never re-tokenised).
//!
//! The run directory holds `config.toml`, `metrics.jsonl` (one line per step, every reward
//! component; the same scalars in a TensorBoard event file, [`crate::tensorboard`]),
//! `rollouts/step-N.jsonl` (the step's trajectories with their rewards),
//! `checkpoints/` (exact resume: trained tensors, AdamW moments, the step) and at the end
//! `model/` (HF directory, adapters merged) and, with LoRA, `adapter/`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::checkpoint;
use super::grpo::{advantages, policy_loss, token_weights, PgConfig, PgRows, PgStats};
use super::rollout::{run_rollouts, Rollout, RolloutEnv, RolloutJob};
use super::untrained::attach_training_adapters;
use super::{OptimConfig, Optimizer, Schedule};
use crate::agent::sandbox::best_isolation;
use crate::agent::trajectory::Source;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, Device};
use crate::backend::{Backend, TrainBackend};
use crate::config::{ExpertKind, RlConfig};
use crate::eval::{make_expert, prepare_expert};
use crate::model::export::{export_hf, export_peft, write_atomic, HfExportOptions};
use crate::model::training::{Grads, TrainBatch};
use crate::model::Qwen2;
use crate::reward::{ExpertJudge, HeuristicJudge, Judge, JudgeKind};
use crate::tasks::{load_suite, TaskInstance};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct RlState {
    /// RL steps done.
    step: u64,
    /// Optimiser steps done.
    opt_step: u64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RlMetrics {
    pub step: u64,
    pub stage: String,
    pub episodes: usize,
    /// Episodes that could not run or be graded (left out).
    pub errors: usize,
    /// Episodes left out of the loss by their exit status.
    pub masked: usize,
    /// Groups whose episodes got different rewards (the others carry no policy gradient).
    pub groups_with_signal: usize,
    pub groups: usize,
    pub reward: f64,
    pub reward_std: f64,
    pub r_loop: f64,
    pub r_format: f64,
    pub r_follow: f64,
    pub r_other: f64,
    pub r_correct: f64,
    pub r_sim: f64,
    pub r_expert: f64,
    pub r_warrant: f64,
    pub r_b2b: f64,
    pub r_quota: f64,
    pub g_loop: f64,
    pub g_follow: f64,
    pub resolve_rate: f64,
    pub looping_rate: f64,
    pub longest_run: f64,
    pub expert_calls: f64,
    pub expert_token_share: f64,
    pub steps_per_episode: f64,
    pub format_errors: f64,
    /// Share of the policy's replies that were a valid tool call (0 when it never acted: its
    /// looping and expert rates then say nothing).
    #[serde(default)]
    pub valid_call_rate: f64,
    pub exit: BTreeMap<String, usize>,
    /// The objective, averaged over the step's optimiser steps.
    pub loss: f64,
    pub kl: f64,
    pub clip_frac: f64,
    pub ratio: f64,
    /// Mean −log p of the sampled policy tokens (an estimate of the policy's entropy).
    pub entropy: f64,
    /// Of the step's last optimiser step.
    pub grad_norm: f64,
    pub lr: f64,
    /// Tokens through the training passes (prompts included, every epoch).
    pub trained_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt tokens the engine computed, and those it reused from an episode's earlier turns.
    pub prefilled_tokens: usize,
    pub reused_tokens: usize,
    pub gen_s: f64,
    pub tools_s: f64,
    pub train_s: f64,
    pub rollout_wall_s: f64,
    pub gen_tokens_per_s: f64,
    pub train_tokens_per_s: f64,
    pub judge_cost_usd: f64,
    pub elapsed_s: f64,
}

fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = xs.into_iter().fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

pub struct RlOutcome {
    pub run_dir: PathBuf,
    pub last_step: u64,
    pub metrics: Vec<RlMetrics>,
}

/// A training sequence: one episode's recorded tokens.
pub struct PolicySeq {
    pub ids: Vec<u32>,
    /// Whether each token is the policy's own (its prediction is trained).
    pub trained: Vec<bool>,
    pub adv: f64,
    /// Policy tokens that are predicted (all but a first token).
    pub policy_tokens: usize,
    /// Per row `log p` under the behaviour policy; `None`: the current parameters (one
    /// optimiser step per batch of episodes, so the ratio starts at 1).
    pub old_logp: Option<Vec<f32>>,
    /// Per row `log p` under the reference (needed when β > 0).
    pub ref_logp: Option<Vec<f32>>,
}

impl PolicySeq {
    pub fn new(ids: Vec<u32>, trained: Vec<bool>, adv: f64) -> Self {
        let policy_tokens = trained.iter().skip(1).filter(|&&m| m).count();
        Self { ids, trained, adv, policy_tokens, old_logp: None, ref_logp: None }
    }
}

/// Accumulates into `grads` the gradient of the clipped objective over `seqs`, whose tokens
/// weigh `weights[i]` each ([`super::grpo::token_weights`]), in micro-batches of at most
/// `batch_tokens`; returns the objective's statistics.
#[allow(clippy::too_many_arguments)]
pub fn policy_gradient<B: TrainBackend>(
    be: &B,
    model: &Qwen2<B>,
    seqs: &[&PolicySeq],
    weights: &[f64],
    pg: &PgConfig,
    temperature: f32,
    batch_tokens: usize,
    recompute: bool,
    grads: &mut Grads<B>,
) -> Result<PgStats> {
    if pg.kl_beta > 0.0 && seqs.iter().any(|s| s.ref_logp.is_none()) {
        bail!("kl_beta > 0 needs the reference log-probs of every sequence");
    }
    let mut stats = PgStats::default();
    for micro in micro_batches(seqs, batch_tokens) {
        let batch = pack(seqs, &micro, temperature)?;
        let (logp, trace) = model.train_forward(be, &batch, recompute)?;
        let rows = batch.rows();
        let (mut old, mut reference, mut row_adv, mut row_w) =
            (vec![0f32; rows], vec![0f32; rows], vec![0f64; rows], vec![0f64; rows]);
        for (k, &j) in micro.iter().enumerate() {
            let s = &batch.meta.seqs[k];
            let seq = seqs[j];
            for r in s.row_start..s.row_start + s.n_new {
                let local = r - s.row_start;
                old[r] = seq.old_logp.as_ref().map_or(logp[r], |o| o[local]);
                reference[r] = seq.ref_logp.as_ref().map_or(0.0, |o| o[local]);
                row_adv[r] = seq.adv;
                row_w[r] = if batch.trained[r] { weights[j] } else { 0.0 };
            }
        }
        let rows_in = PgRows {
            logp: &logp,
            old_logp: &old,
            ref_logp: (pg.kl_beta > 0.0).then_some(&reference[..]),
            adv: &row_adv,
            weight: &row_w,
        };
        let (dlogp, st) = policy_loss(pg, &rows_in)?;
        if !st.loss.is_finite() {
            bail!("the RL loss is {}", st.loss);
        }
        stats.add(&st);
        model.train_backward(be, &batch, trace, &dlogp, grads)?;
    }
    Ok(stats)
}

/// Groups sequences into micro-batches of at most `max_tokens` (a longer one goes alone).
fn micro_batches(seqs: &[&PolicySeq], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    let mut tokens = 0;
    for (i, s) in seqs.iter().enumerate() {
        match out.last_mut() {
            Some(b) if tokens + s.ids.len() <= max_tokens => {
                b.push(i);
                tokens += s.ids.len();
            }
            _ => {
                out.push(vec![i]);
                tokens = s.ids.len();
            }
        }
    }
    out
}

fn pack(seqs: &[&PolicySeq], idx: &[usize], temperature: f32) -> Result<TrainBatch> {
    let parts: Vec<(Vec<u32>, Vec<bool>)> =
        idx.iter().map(|&i| (seqs[i].ids.clone(), seqs[i].trained.clone())).collect();
    let mut b = TrainBatch::pack(&parts)?;
    b.temperature = temperature;
    Ok(b)
}

/// `log p` of every row of every sequence under `model` (no backward), in `batch_tokens`
/// micro-batches.
fn score<B: TrainBackend>(
    be: &B,
    model: &Qwen2<B>,
    seqs: &[&PolicySeq],
    batch_tokens: usize,
    t: f32,
) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![vec![]; seqs.len()];
    for mb in micro_batches(seqs, batch_tokens) {
        let batch = pack(seqs, &mb, t)?;
        let (logp, _) = model.train_forward(be, &batch, true)?;
        for (k, &i) in mb.iter().enumerate() {
            let s = &batch.meta.seqs[k];
            out[i] = logp[s.row_start..s.row_start + s.n_new].to_vec();
        }
    }
    Ok(out)
}

/// The trajectory line of a rollout, with its reward and advantage in `meta`.
fn rollout_line(
    r: &Rollout,
    task: &TaskInstance,
    adv: f64,
    masked: bool,
    step: u64,
    max_bytes: usize,
) -> Result<String> {
    let mut extra = serde_json::Map::new();
    extra.insert("rl_step".into(), json!(step));
    extra.insert("group".into(), json!(r.job.group));
    extra.insert("seed".into(), json!(r.job.seed));
    extra.insert("reward".into(), json!(r.reward));
    extra.insert("advantage".into(), json!(adv));
    extra.insert("masked".into(), json!(masked));
    extra.insert("grade".into(), r.grade.clone());
    extra.insert("judge_cost_usd".into(), json!(r.judge.cost_usd));
    if let Some(e) = &r.error {
        extra.insert("rollout_error".into(), json!(e));
    }
    let mut t = r.episode.to_trajectory(Some(r.resolved), extra).bounded(max_bytes);
    if t.messages.is_empty() {
        // An episode that never started still gets a valid line.
        t.messages = vec![crate::chat::Message::user(task.problem_statement.clone())];
    }
    Ok(serde_json::to_string(&t)? + "\n")
}

/// Loads the policy: the model RL starts from (with an SFT adapter merged) and, when the
/// config asks, a fresh LoRA on top (with the token rows it trains); says which token rows are
/// untrained.
pub fn load_policy<B: Backend>(be: &B, cfg: &RlConfig, tok: &Tokenizer) -> Result<Qwen2<B>> {
    let m = &cfg.model;
    let mut model = Qwen2::load_merged(be, &m.path, m.adapter.as_deref(), m.context)?;
    attach_training_adapters(be, &mut model, tok, cfg.lora.as_ref(), "rl", true)?;
    Ok(model)
}

/// Runs (or, with `resume`, continues) the RL run of `cfg` on the CPU backend. `stop_after`
/// ends this process's run after that many steps, as an interruption would.
pub fn run_rl(cfg: &RlConfig, config_text: &str, resume: bool, stop_after: Option<u64>) -> Result<RlOutcome> {
    rl_with(CpuBackend::new(), cfg, config_text, resume, stop_after)
}

/// As [`run_rl`], on `device`: on a GPU the rollouts (prefill, decode, sampling) and the
/// policy update both run there, sharing one copy of the weights.
pub fn run_rl_on(
    device: Device,
    cfg: &RlConfig,
    config_text: &str,
    resume: bool,
    stop_after: Option<u64>,
) -> Result<RlOutcome> {
    match device {
        Device::Cpu => run_rl(cfg, config_text, resume, stop_after),
        Device::Cuda(n) => rl_with(CudaBackend::new(n)?, cfg, config_text, resume, stop_after),
    }
}

fn rl_with<B: TrainBackend>(
    be: B,
    cfg: &RlConfig,
    config_text: &str,
    resume: bool,
    stop_after: Option<u64>,
) -> Result<RlOutcome> {
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
    std::fs::create_dir_all(run.join("rollouts")).with_context(|| format!("cannot create {}", run.display()))?;
    write_atomic(&run.join("config.toml"), config_text.as_bytes())?;

    eprintln!("rl: on {}", be.name());
    let tok = Tokenizer::from_dir(&cfg.model.path)?;
    let mut model = load_policy(&be, cfg, &tok)?;
    // The reference for the KL term: the starting model. With LoRA it is the same weights
    // with the adapters off; for full fine-tuning a second copy.
    let ref_model = if cfg.grpo.kl_beta > 0.0 && cfg.lora.is_none() {
        Some(Qwen2::load_merged(&be, &cfg.model.path, cfg.model.adapter.as_deref(), cfg.model.context)?)
    } else {
        None
    };
    let stage_tasks: Vec<Vec<TaskInstance>> = cfg
        .stages
        .iter()
        .map(|s| {
            let mut t = load_suite(&s.suite).with_context(|| format!("stage {:?}", s.name))?;
            if !s.tasks.is_empty() {
                for id in &s.tasks {
                    if !t.iter().any(|x| &x.instance_id == id) {
                        bail!("stage {:?}: task {id:?} is not in {}", s.name, s.suite.display());
                    }
                }
                t.retain(|x| s.tasks.contains(&x.instance_id));
            }
            if t.is_empty() {
                bail!("stage {:?}: no tasks in {}", s.name, s.suite.display());
            }
            Ok(t)
        })
        .collect::<Result<_>>()?;

    let total = cfg.total_steps();
    let per_step = (cfg.grpo.ppo_epochs * cfg.grpo.minibatches) as u64;
    let o = &cfg.optim;
    let ocfg = OptimConfig {
        schedule: Schedule {
            lr: o.lr,
            warmup_steps: o.warmup_steps,
            total_steps: total * per_step,
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
    let mut state = RlState { step: 0, opt_step: 0 };
    let mut metrics: Vec<RlMetrics> = vec![];
    if resume {
        state = checkpoint::load(&be, &run, &mut model, &mut opt)?;
        opt.step = state.opt_step;
        metrics = checkpoint::cut_metrics(&metrics_path, state.step)?;
        eprintln!("rl: resumed after step {}", state.step);
    } else if metrics_path.exists() {
        std::fs::remove_file(&metrics_path)?;
    }
    let mut metrics_file = std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?;
    // The same scalars for TensorBoard, cut back like metrics.jsonl on a resume.
    let mut events = crate::tensorboard::EventWriter::for_run(&run, resume.then_some(state.step))?;

    let expert_spec = cfg.expert.spec()?;
    let expert_model = prepare_expert(&expert_spec)?;
    let isolation = best_isolation();
    cfg.rollout.protection.validate()?;
    let _signals = crate::interrupt::watch();
    let scratch = crate::agent::sandbox::scratch::Scratch::new("rl")?;
    let mut hidden: Vec<PathBuf> = cfg
        .stages
        .iter()
        .map(|s| {
            let dir = if s.suite.is_dir() {
                s.suite.clone()
            } else {
                s.suite.parent().unwrap_or(Path::new(".")).to_path_buf()
            };
            std::fs::canonicalize(&dir).unwrap_or(dir)
        })
        .collect();
    hidden.push(std::fs::canonicalize(&run)?);
    hidden.push(scratch.path().to_path_buf());
    hidden.dedup();
    let grader = crate::tasks::grade::Grader {
        hidden,
        ..crate::tasks::grade::Grader::new(isolation, cfg.rollout.grade_limits, cfg.rollout.protection.clone())
    };
    let executors = crate::executor::Executors::new(
        Some(crate::executor::LocalExecutor {
            grader,
            limits: cfg.rollout.limits,
            scratch: scratch.path().to_path_buf(),
        }),
        Some(crate::executor::docker::DockerConfig {
            limits: cfg.rollout.limits,
            protection: cfg.rollout.protection.clone(),
            ..cfg.rollout.docker.clone()
        }),
        cfg.rollout.executor,
    );
    executors.prepare(&stage_tasks.concat())?;

    let pg = PgConfig { clip_low: cfg.grpo.clip_low, clip_high: cfg.grpo.clip_high, kl_beta: cfg.grpo.kl_beta };
    let temperature = cfg.rollout.temperature;
    let started = Instant::now();
    let first = state.step;
    let mut grads = Grads::zeros_for(&be, &model);
    while state.step < total {
        if stop_after.is_some_and(|n| state.step - first >= n) {
            break;
        }
        let step = state.step + 1;
        let (si, stage) = cfg.stage_at(state.step);
        let pool = &stage_tasks[si];

        // Tasks and seeds follow from (seed, step): a resumed step samples the same.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.grpo.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..pool.len()).collect();
        order.shuffle(&mut rng);
        let chosen: Vec<usize> = (0..cfg.grpo.tasks_per_step).map(|i| order[i % order.len()]).collect();
        let jobs: Vec<RolloutJob> = chosen
            .iter()
            .enumerate()
            .flat_map(|(g, &task)| {
                (0..cfg.grpo.group_size).map(move |j| RolloutJob {
                    task,
                    group: g,
                    seed: cfg.grpo.seed ^ (step << 24) ^ ((g as u64) << 12) ^ j as u64,
                })
            })
            .collect();

        // ---- rollouts ----
        let make_expert_fn = || make_expert(&expert_spec, expert_model.as_ref(), false);
        let judge_kind = stage.reward.judge;
        let endpoint = cfg.expert.endpoint.clone();
        let context_messages = cfg.rollout.episode.expert_context_messages;
        let make_judge = move || -> Box<dyn Judge> {
            match (judge_kind, &endpoint) {
                (JudgeKind::Expert, Some(ep)) if cfg.expert.kind == ExpertKind::Remote => Box::new(ExpertJudge {
                    endpoint: ep.clone(),
                    context_messages,
                    fallback: HeuristicJudge::default(),
                }),
                _ => Box::new(HeuristicJudge::default()),
            }
        };
        let env = RolloutEnv {
            tasks: pool,
            tok: &tok,
            cfg: &cfg.rollout,
            reward: &stage.reward,
            expert: &make_expert_fn,
            judge: &make_judge,
            exec: &executors,
            step,
        };
        let bar = indicatif::ProgressBar::new(jobs.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix} {bar:24} {pos}/{len} episodes | {msg}")
                .expect("template"),
        );
        bar.set_prefix(format!("rl step {step}/{total} [{}]", stage.name));
        let (rollouts, rstats) = run_rollouts(&be, &model, &env, &jobs, |done, st| {
            bar.set_position(done as u64);
            bar.set_message(format!(
                "{} tokens generated, {:.0} tok/s, {} prompt tokens reused",
                st.generated_tokens,
                st.generated_tokens as f64 / st.busy_s.max(1e-9),
                st.reused_tokens
            ));
        })?;
        bar.finish_and_clear();
        // Stopped by a signal: the step is dropped whole; the last checkpoint stays the resume point.
        crate::interrupt::check()?;

        // ---- advantages ----
        let ok: Vec<bool> = rollouts.iter().map(|r| r.error.is_none()).collect();
        let rewards: Vec<f64> = rollouts.iter().map(|r| r.reward.total).collect();
        let groups: Vec<Vec<usize>> = (0..chosen.len())
            .map(|g| (0..rollouts.len()).filter(|&i| ok[i] && rollouts[i].job.group == g).collect())
            .collect();
        let adv = advantages(&rewards, &groups, cfg.grpo.advantage);
        let masked: Vec<bool> =
            rollouts.iter().map(|r| r.error.is_some() || cfg.grpo.mask_exit.contains(&r.episode.exit_status)).collect();

        // Rollout file first (atomic): what the step saw survives even if training fails.
        let mut lines = String::new();
        for (i, r) in rollouts.iter().enumerate() {
            lines +=
                &rollout_line(r, &pool[r.job.task], adv[i], masked[i], step, cfg.rollout.episode.max_record_bytes)?;
        }
        write_atomic(&run.join("rollouts").join(format!("step-{step}.jsonl")), lines.as_bytes())?;

        // ---- training ----
        let train_started = Instant::now();
        let mut seqs: Vec<PolicySeq> = vec![];
        for (i, r) in rollouts.iter().enumerate() {
            if masked[i] {
                continue;
            }
            let Some(rec) = &r.episode.tokens else { continue };
            let trained: Vec<bool> = rec.sources()?.into_iter().map(|s| s == Source::Policy).collect();
            let seq = PolicySeq::new(rec.ids.clone(), trained, adv[i]);
            if seq.policy_tokens > 0 {
                seqs.push(seq);
            }
        }
        let single_pass = per_step == 1;
        {
            let all: Vec<&PolicySeq> = seqs.iter().collect();
            if !single_pass && !all.is_empty() {
                let old = score(&be, &model, &all, cfg.grpo.batch_tokens, temperature)?;
                for (s, l) in seqs.iter_mut().zip(old) {
                    s.old_logp = Some(l);
                }
            }
        }
        if pg.kl_beta > 0.0 && !seqs.is_empty() {
            let all: Vec<&PolicySeq> = seqs.iter().collect();
            let reference = match &ref_model {
                Some(m) => score(&be, m, &all, cfg.grpo.batch_tokens, temperature)?,
                None => {
                    // The adapters off, and the base's own token rows back in.
                    let adapters = model.detach_lora(&be);
                    let r = score(&be, &model, &all, cfg.grpo.batch_tokens, temperature);
                    if let Some(a) = adapters {
                        model.attach_lora(&be, a);
                    }
                    r?
                }
            };
            for (s, l) in seqs.iter_mut().zip(reference) {
                s.ref_logp = Some(l);
            }
        }
        let mut stats = PgStats::default();
        let (mut grad_norm, mut lr, mut trained_tokens, mut opt_steps) = (0f64, 0f64, 0usize, 0usize);
        let mut shuffle_rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(cfg.grpo.seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03));
        for _epoch in 0..cfg.grpo.ppo_epochs {
            let mut order: Vec<usize> = (0..seqs.len()).collect();
            order.shuffle(&mut shuffle_rng);
            let n_mb = cfg.grpo.minibatches.min(order.len().max(1));
            for mb in 0..n_mb {
                let members: Vec<&PolicySeq> = order.iter().skip(mb).step_by(n_mb).map(|&i| &seqs[i]).collect();
                if members.is_empty() {
                    continue;
                }
                let counts: Vec<usize> = members.iter().map(|s| s.policy_tokens).collect();
                let weights = token_weights(&counts, cfg.grpo.loss_agg);
                // With β = 0 an episode with zero advantage has zero gradient: skip its passes
                // (its tokens still count in the weights above).
                let active: Vec<usize> =
                    (0..members.len()).filter(|&i| pg.kl_beta > 0.0 || members[i].adv != 0.0).collect();
                if active.is_empty() {
                    continue;
                }
                grads.zero(&be, &model.cfg);
                let act: Vec<&PolicySeq> = active.iter().map(|&i| members[i]).collect();
                let w: Vec<f64> = active.iter().map(|&i| weights[i]).collect();
                let st = policy_gradient(
                    &be,
                    &model,
                    &act,
                    &w,
                    &pg,
                    temperature,
                    cfg.grpo.batch_tokens,
                    cfg.grpo.recompute,
                    &mut grads,
                )
                .with_context(|| {
                    format!("step {step}; the last good checkpoint is in {}", run.join("checkpoints").display())
                })?;
                stats.add(&st);
                trained_tokens += act.iter().map(|s| s.ids.len()).sum::<usize>();
                let model_cfg = model.cfg.clone();
                let report = opt.step(&be, model.trainable_mut(), grads.tensors(&model_cfg))?;
                model.sync_token_rows(&be);
                grad_norm = report.grad_norm as f64;
                lr = report.lr as f64;
                opt_steps += 1;
            }
        }
        let train_s = train_started.elapsed().as_secs_f64();

        // ---- metrics ----
        let good: Vec<&Rollout> = rollouts.iter().filter(|r| r.error.is_none()).collect();
        let comp = |f: &dyn Fn(&Rollout) -> f64| mean(good.iter().map(|r| f(r)));
        let expert_tokens: usize =
            good.iter().map(|r| r.episode.expert_calls.iter().map(|c| c.tokens_out).sum::<usize>()).sum();
        let policy_tokens: usize = good.iter().map(|r| r.episode.policy_tokens).sum();
        let mut exit = BTreeMap::new();
        for r in &rollouts {
            *exit.entry(r.episode.exit_status.as_str().to_string()).or_insert(0) += 1;
        }
        let reward_mean = comp(&|r| r.reward.total);
        let m = RlMetrics {
            step,
            stage: stage.name.clone(),
            episodes: rollouts.len(),
            errors: rollouts.len() - good.len(),
            masked: masked.iter().filter(|&&m| m).count(),
            groups_with_signal: groups.iter().filter(|g| g.iter().any(|&i| adv[i] != 0.0)).count(),
            groups: groups.len(),
            reward: reward_mean,
            reward_std: mean(good.iter().map(|r| (r.reward.total - reward_mean).powi(2))).sqrt(),
            r_loop: comp(&|r| r.reward.r_loop),
            r_format: comp(&|r| r.reward.r_format),
            r_follow: comp(&|r| r.reward.r_follow),
            r_other: comp(&|r| r.reward.r_other),
            r_correct: comp(&|r| r.reward.r_correct),
            r_sim: comp(&|r| r.reward.r_sim),
            r_expert: comp(&|r| r.reward.r_expert),
            r_warrant: comp(&|r| r.reward.r_warrant),
            r_b2b: comp(&|r| r.reward.r_b2b),
            r_quota: comp(&|r| r.reward.r_quota),
            g_loop: comp(&|r| r.reward.g_loop),
            g_follow: comp(&|r| r.reward.g_follow),
            resolve_rate: comp(&|r| r.resolved as u8 as f64),
            looping_rate: comp(&|r| r.reward.looping as u8 as f64),
            longest_run: comp(&|r| r.reward.longest_run as f64),
            expert_calls: comp(&|r| r.episode.expert_calls.len() as f64),
            expert_token_share: expert_tokens as f64 / (expert_tokens + policy_tokens).max(1) as f64,
            steps_per_episode: comp(&|r| r.episode.actions.len() as f64),
            format_errors: comp(&|r| r.episode.format_errors as f64),
            valid_call_rate: good.iter().map(|r| r.episode.actions.len()).sum::<usize>() as f64
                / good.iter().map(|r| r.episode.turns).sum::<usize>().max(1) as f64,
            exit,
            loss: stats.loss / opt_steps.max(1) as f64,
            kl: stats.kl(),
            clip_frac: stats.clip_frac(),
            ratio: stats.ratio(),
            entropy: stats.entropy(),
            grad_norm,
            lr,
            trained_tokens,
            generated_tokens: rstats.engine.generated_tokens,
            prefilled_tokens: rstats.engine.prompt_tokens,
            reused_tokens: rstats.engine.reused_tokens,
            gen_s: rstats.engine.busy_s,
            tools_s: rstats.tools_s,
            train_s,
            rollout_wall_s: rstats.wall_s,
            gen_tokens_per_s: rstats.engine.generated_tokens as f64 / rstats.engine.busy_s.max(1e-9),
            train_tokens_per_s: trained_tokens as f64 / train_s.max(1e-9),
            judge_cost_usd: rollouts.iter().map(|r| r.judge.cost_usd).sum(),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        eprintln!(
            "rl step {step}/{total} [{}]: reward {:+.3} (loop {:+.2}, format {:+.2}, follow {:+.2}, other {:+.2}), resolved {:.0}%, valid calls {:.0}%, looping {:.0}%, expert calls {:.2}, kl {:.4}, clip {:.3}, {}/{} groups with a signal, {:.0}s gen / {:.0}s tools / {:.0}s train",
            m.stage,
            m.reward,
            m.r_loop,
            m.r_format,
            m.r_follow,
            m.r_other,
            100.0 * m.resolve_rate,
            100.0 * m.valid_call_rate,
            100.0 * m.looping_rate,
            m.expert_calls,
            m.kl,
            m.clip_frac,
            m.groups_with_signal,
            m.groups,
            m.gen_s,
            m.tools_s,
            m.train_s
        );
        if m.groups_with_signal == 0 {
            eprintln!(
                "rl step {step}: no learning signal — within every group the episodes got the same reward, so no \
                 advantage is non-zero and the policy is not updated"
            );
        }
        writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
        metrics_file.flush()?;
        let mut tb = serde_json::to_value(&m)?;
        // Every exit status at every step (0 when none ended so): charts without gaps.
        if let Some(exit) = tb["exit"].as_object_mut() {
            for s in crate::agent::episode::ExitStatus::ALL {
                exit.entry(s.as_str()).or_insert(json!(0));
            }
        }
        events.scalars(step, &crate::tensorboard::scalars_of("rl", &tb))?;
        metrics.push(m);
        state = RlState { step, opt_step: opt.step };
        let due = (cfg.grpo.checkpoint_every > 0 && step.is_multiple_of(cfg.grpo.checkpoint_every)) || step == total;
        if due {
            checkpoint::save(&be, &run, &model, &opt, step, &state)?;
            checkpoint::prune(&run, cfg.grpo.keep_checkpoints)?;
        }
    }
    if state.step == total {
        // On a bf16 device the exports write the optimiser's f32 masters (the merge is done
        // on the host, in f32).
        let mut masters = std::mem::take(&mut opt.master);
        let base = cfg.model.path.display().to_string();
        super::sft::with_masters(&mut model, &mut masters, |m| {
            if m.lora.is_some() {
                export_peft(&be, m, &base, &run.join("adapter"))?;
            }
            export_final(&be, m, &cfg.model.path, &run.join("model"))
        })?;
    }
    Ok(RlOutcome { run_dir: run, last_step: state.step, metrics })
}

/// Writes the trained model as an HF directory like `save_pretrained` (its LoRA adapters merged,
/// the source's dtype, sharded, with the tokenizer files of `source`), replacing `out` at once.
pub fn export_final<B: Backend>(be: &B, model: &Qwen2<B>, source: &Path, out: &Path) -> Result<()> {
    let opts = HfExportOptions { overwrite: true, ..Default::default() };
    export_hf(be, model, model.lora.as_ref(), source, out, &opts)
}
