//! `protege rl`: GRPO on multi-turn agent episodes, colocated (rollouts and training share the
//! one copy of the weights in this process), with the SWE-Protégé reward and a curriculum of
//! stages.
//!
//! Per step: the stage's task pool is sampled (seeded by the step, so a resumed run samples
//! the same tasks), `group_size` episodes per task run concurrently with batched generation
//! ([`super::rollout`]), each is graded in a fresh copy, judged and rewarded; rewards become
//! group-relative advantages; the clipped objective ([`super::grpo`]) is minimised on the
//! policy's own tokens, from the ids recorded at generation (never re-tokenised). `RlRun`
//! holds the run; each of these is one of its methods, and `rl_with` calls them in order.
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
use super::export::export_trained;
use super::grpo::{advantages, sequence_logp, token_weights, PgConfig, PgStats};
/// The policy-gradient pass this loop drives; it lives with the objective in [`super::grpo`].
pub use super::grpo::{policy_gradient, PolicySeq};
use super::rollout::{run_rollouts, Rollout, RolloutEnv, RolloutJob, RolloutStats};
use super::untrained::attach_training_adapters;
use super::{OptimConfig, Optimizer};
use crate::agent::episode::ExitStatus;
use crate::agent::experts::{make_expert, prepare_expert, ExpertModel, ExpertSpec};
use crate::agent::trajectory::Source;
use crate::backend::cpu::CpuBackend;
use crate::backend::Device;
use crate::backend::{Backend, TrainBackend};
use crate::config::{ExpertKind, RlConfig};
use crate::executor::docker::DockerConfig;
use crate::executor::{Executors, LocalExecutor};
use crate::model::training::Grads;
use crate::model::Qwen2;
use crate::reward::{ExpertJudge, HeuristicJudge, Judge, JudgeKind};
use crate::sandbox::scratch::Scratch;
use crate::sandbox::{best_isolation, Isolation};
use crate::tasks::grade::Grader;
use crate::tasks::{load_suite, TaskInstance};
use crate::tensorboard::EventWriter;
use crate::tokenizer::Tokenizer;
use crate::util::write_atomic;

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

pub struct RlOutcome {
    pub run_dir: PathBuf,
    pub last_step: u64,
    pub metrics: Vec<RlMetrics>,
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
    crate::with_backend!(device, |be| rl_with(be, cfg, config_text, resume, stop_after))
}

/// The RL loop: a page of named steps, each a method of `RlRun`.
fn rl_with<B: TrainBackend>(
    be: B,
    cfg: &RlConfig,
    config_text: &str,
    resume: bool,
    stop_after: Option<u64>,
) -> Result<RlOutcome> {
    let mut run = RlRun::setup(be, cfg, config_text, resume)?;
    let first = run.state.step;
    while run.state.step < run.total {
        if stop_after.is_some_and(|n| run.state.step - first >= n) {
            break;
        }
        let plan = run.sample_tasks();
        let (rollouts, rollout_stats) = run.rollouts(&plan)?;
        // Stopped by a signal: the step is dropped whole; the last checkpoint stays the resume point.
        crate::interrupt::check()?;
        let adv = run.advantages(&plan, &rollouts);
        // Rollout file first (atomic): what the step saw survives even if training fails.
        run.record(&plan, &rollouts, &adv)?;
        let update = run.update(&plan, &rollouts, &adv)?;
        run.log(&plan, &rollouts, &rollout_stats, &adv, &update)?;
        run.checkpoint(plan.step)?;
    }
    run.finish()
}

/// One RL run: the policy, its optimiser, the episode machinery, and the files the steps
/// append to. Fields drop in declaration order: the executors before the scratch directory
/// they run in, and the backend, which the models' buffers live on, last.
struct RlRun<'c, B: TrainBackend> {
    cfg: &'c RlConfig,
    /// The run directory.
    dir: PathBuf,
    /// RL steps of the whole curriculum.
    total: u64,
    /// Optimiser steps per RL step (PPO epochs × minibatches).
    opt_steps_per_step: u64,
    pg: PgConfig,
    state: RlState,
    metrics: Vec<RlMetrics>,
    metrics_file: std::fs::File,
    /// The same scalars for TensorBoard.
    events: EventWriter,
    started: Instant,
    grads: Grads<B>,
    executors: Executors,
    _scratch: Scratch,
    _signals: crate::interrupt::Guard,
    expert_spec: ExpertSpec,
    expert_model: Option<ExpertModel>,
    /// Each curriculum stage's task pool.
    stage_tasks: Vec<Vec<TaskInstance>>,
    opt: Optimizer<B>,
    /// The reference of the KL term when it needs its own copy of the weights.
    ref_model: Option<Qwen2<B>>,
    model: Qwen2<B>,
    tok: Tokenizer,
    be: B,
}

/// What one RL step runs: its stage, and an episode (a rollout job) per drawn task and group
/// member.
struct StepPlan {
    /// 1-based.
    step: u64,
    /// Index of the stage in the config.
    stage: usize,
    /// Tasks drawn, one GRPO group each.
    groups: usize,
    jobs: Vec<RolloutJob>,
}

/// How a step's episodes count in the loss.
struct StepAdvantages {
    /// Per episode, relative to its group.
    adv: Vec<f64>,
    /// Episodes left out of the loss (errors, and the exit statuses `grpo.mask_exit` names).
    masked: Vec<bool>,
    /// Per group, the episodes that ran and were graded.
    groups: Vec<Vec<usize>>,
}

/// What a step's update did.
#[derive(Default)]
struct UpdateStats {
    pg: PgStats,
    /// Of the step's last optimiser step.
    grad_norm: f64,
    lr: f64,
    trained_tokens: usize,
    opt_steps: usize,
    train_s: f64,
}

impl<'c, B: TrainBackend> RlRun<'c, B> {
    /// Prepares the run directory (or resumes the run in it), loads the policy, its reference
    /// and optimiser, the stages' tasks and the expert, and readies the executors.
    fn setup(be: B, cfg: &'c RlConfig, config_text: &str, resume: bool) -> Result<Self> {
        let dir = cfg.output.run_dir.clone();
        let metrics_path = dir.join("metrics.jsonl");
        // A run exists once it has a checkpoint; a run killed before its first one starts over.
        if !resume && dir.join("checkpoints").join("latest").exists() {
            bail!(
                "run directory {} already holds a run; pass --resume to continue it or choose another output.run_dir",
                dir.display()
            );
        }
        if !resume && dir.join("checkpoints").exists() {
            std::fs::remove_dir_all(dir.join("checkpoints"))?;
        }
        std::fs::create_dir_all(dir.join("rollouts")).with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(&dir.join("config.toml"), config_text.as_bytes())?;

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
        let stage_tasks = load_stage_tasks(cfg)?;

        let total = cfg.total_steps();
        let opt_steps_per_step = (cfg.grpo.ppo_epochs * cfg.grpo.minibatches) as u64;
        let ocfg = OptimConfig::from_section(&cfg.optim, total * opt_steps_per_step);
        let mut opt = Optimizer::new(&be, model.trainable(), ocfg);
        let mut state = RlState { step: 0, opt_step: 0 };
        let mut metrics: Vec<RlMetrics> = vec![];
        if resume {
            state = checkpoint::load(&be, &dir, &mut model, &mut opt)?;
            opt.step = state.opt_step;
            metrics = checkpoint::cut_metrics(&metrics_path, state.step)?;
            eprintln!("rl: resumed after step {}", state.step);
        } else if metrics_path.exists() {
            std::fs::remove_file(&metrics_path)?;
        }
        let metrics_file = std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?;
        // Cut back like metrics.jsonl on a resume.
        let events = EventWriter::for_run(&dir, resume.then_some(state.step))?;

        let expert_spec = cfg.expert.spec()?;
        let expert_model = prepare_expert(&expert_spec)?;
        let isolation = best_isolation();
        cfg.rollout.protection.validate()?;
        let signals = crate::interrupt::watch();
        let scratch = Scratch::new("rl")?;
        let executors = rollout_executors(cfg, &dir, &scratch, isolation)?;
        executors.prepare(&stage_tasks.concat())?;

        let pg = PgConfig { clip_low: cfg.grpo.clip_low, clip_high: cfg.grpo.clip_high, kl_beta: cfg.grpo.kl_beta };
        let grads = Grads::zeros_for(&be, &model);
        Ok(Self {
            cfg,
            dir,
            total,
            opt_steps_per_step,
            pg,
            state,
            metrics,
            metrics_file,
            events,
            started: Instant::now(),
            grads,
            executors,
            _scratch: scratch,
            _signals: signals,
            expert_spec,
            expert_model,
            stage_tasks,
            opt,
            ref_model,
            model,
            tok,
            be,
        })
    }

    /// Draws the next step's tasks from its stage's pool, `group_size` episodes each. Tasks and
    /// seeds follow from (seed, step): a resumed step samples the same.
    fn sample_tasks(&self) -> StepPlan {
        let g = &self.cfg.grpo;
        let step = self.state.step + 1;
        let (stage, _) = self.cfg.stage_at(self.state.step);
        let pool = &self.stage_tasks[stage];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(g.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..pool.len()).collect();
        order.shuffle(&mut rng);
        let chosen: Vec<usize> = (0..g.tasks_per_step).map(|i| order[i % order.len()]).collect();
        let jobs = chosen
            .iter()
            .enumerate()
            .flat_map(|(group, &task)| {
                (0..g.group_size).map(move |j| RolloutJob {
                    task,
                    group,
                    seed: g.seed ^ (step << 24) ^ ((group as u64) << 12) ^ j as u64,
                })
            })
            .collect();
        StepPlan { step, stage, groups: chosen.len(), jobs }
    }

    /// Runs the step's episodes concurrently against the policy: generated, graded, judged and
    /// rewarded.
    fn rollouts(&self, plan: &StepPlan) -> Result<(Vec<Rollout>, RolloutStats)> {
        let cfg = self.cfg;
        let stage = &cfg.stages[plan.stage];
        let make_expert_fn = || make_expert(&self.expert_spec, self.expert_model.as_ref(), false);
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
            tasks: &self.stage_tasks[plan.stage],
            tok: &self.tok,
            cfg: &cfg.rollout,
            reward: &stage.reward,
            expert: &make_expert_fn,
            judge: &make_judge,
            exec: &self.executors,
            step: plan.step,
        };
        let bar = indicatif::ProgressBar::new(plan.jobs.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix} {bar:24} {pos}/{len} episodes | {msg}")
                .expect("template"),
        );
        bar.set_prefix(format!("rl step {}/{} [{}]", plan.step, self.total, stage.name));
        let out = run_rollouts(&self.be, &self.model, &env, &plan.jobs, |done, st| {
            bar.set_position(done as u64);
            bar.set_message(format!(
                "{} tokens generated, {:.0} tok/s, {} prompt tokens reused",
                st.generated_tokens,
                st.generated_tokens as f64 / st.busy_s.max(1e-9),
                st.reused_tokens
            ));
        })?;
        bar.finish_and_clear();
        Ok(out)
    }

    /// Rewards become advantages within each group of the episodes that ran; episodes that
    /// failed or ended as `grpo.mask_exit` lists are masked out of the loss.
    fn advantages(&self, plan: &StepPlan, rollouts: &[Rollout]) -> StepAdvantages {
        let g = &self.cfg.grpo;
        let ok: Vec<bool> = rollouts.iter().map(|r| r.error.is_none()).collect();
        let rewards: Vec<f64> = rollouts.iter().map(|r| r.reward.total).collect();
        let groups: Vec<Vec<usize>> = (0..plan.groups)
            .map(|group| (0..rollouts.len()).filter(|&i| ok[i] && rollouts[i].job.group == group).collect())
            .collect();
        let adv = advantages(&rewards, &groups, g.advantage);
        let masked =
            rollouts.iter().map(|r| r.error.is_some() || g.mask_exit.contains(&r.episode.exit_status)).collect();
        StepAdvantages { adv, masked, groups }
    }

    /// Writes `rollouts/step-N.jsonl`: every episode of the step with its reward and advantage.
    fn record(&self, plan: &StepPlan, rollouts: &[Rollout], adv: &StepAdvantages) -> Result<()> {
        let pool = &self.stage_tasks[plan.stage];
        let max_bytes = self.cfg.rollout.episode.max_record_bytes;
        let mut lines = String::new();
        for (i, r) in rollouts.iter().enumerate() {
            lines += &rollout_line(r, &pool[r.job.task], adv.adv[i], adv.masked[i], plan.step, max_bytes)?;
        }
        write_atomic(&self.dir.join("rollouts").join(format!("step-{}.jsonl", plan.step)), lines.as_bytes())
    }

    /// The policy update: `ppo_epochs` passes over the step's episodes in `minibatches`
    /// optimiser steps each, on the clipped objective of their recorded tokens.
    fn update(&mut self, plan: &StepPlan, rollouts: &[Rollout], adv: &StepAdvantages) -> Result<UpdateStats> {
        let started = Instant::now();
        let mut seqs = policy_sequences(rollouts, adv)?;
        if self.opt_steps_per_step > 1 && !seqs.is_empty() {
            // More than one optimiser step per batch: the ratio is to the policy that sampled.
            let old = self.score(&self.model, &seqs)?;
            for (s, l) in seqs.iter_mut().zip(old) {
                s.old_logp = Some(l);
            }
        }
        if self.pg.kl_beta > 0.0 && !seqs.is_empty() {
            let reference = self.reference_logp(&seqs)?;
            for (s, l) in seqs.iter_mut().zip(reference) {
                s.ref_logp = Some(l);
            }
        }
        let g = &self.cfg.grpo;
        let mut stats = UpdateStats::default();
        let mut shuffle_rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(g.seed ^ plan.step.wrapping_mul(0xD1B5_4A32_D192_ED03));
        for _epoch in 0..g.ppo_epochs {
            let mut order: Vec<usize> = (0..seqs.len()).collect();
            order.shuffle(&mut shuffle_rng);
            let n_mb = g.minibatches.min(order.len().max(1));
            for mb in 0..n_mb {
                let members: Vec<&PolicySeq> = order.iter().skip(mb).step_by(n_mb).map(|&i| &seqs[i]).collect();
                self.optimiser_step(plan.step, &members, &mut stats)?;
            }
        }
        stats.train_s = started.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// One optimiser step on a minibatch of sequences (none when no sequence carries gradient).
    fn optimiser_step(&mut self, step: u64, members: &[&PolicySeq], stats: &mut UpdateStats) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        let g = &self.cfg.grpo;
        let counts: Vec<usize> = members.iter().map(|s| s.policy_tokens).collect();
        let weights = token_weights(&counts, g.loss_agg);
        // With β = 0 an episode with zero advantage has zero gradient: skip its passes (its
        // tokens still count in the weights above).
        let active: Vec<usize> =
            (0..members.len()).filter(|&i| self.pg.kl_beta > 0.0 || members[i].adv != 0.0).collect();
        if active.is_empty() {
            return Ok(());
        }
        let (be, model) = (&self.be, &mut self.model);
        self.grads.zero(be, &model.cfg);
        let act: Vec<&PolicySeq> = active.iter().map(|&i| members[i]).collect();
        let w: Vec<f64> = active.iter().map(|&i| weights[i]).collect();
        let temperature = self.cfg.rollout.temperature;
        let st =
            policy_gradient(be, model, &act, &w, &self.pg, temperature, g.batch_tokens, g.recompute, &mut self.grads)
                .with_context(|| {
                format!("step {step}; the last good checkpoint is in {}", self.dir.join("checkpoints").display())
            })?;
        stats.pg.add(&st);
        stats.trained_tokens += act.iter().map(|s| s.ids.len()).sum::<usize>();
        let model_cfg = model.cfg.clone();
        let report = self.opt.step(be, model.trainable_mut(), self.grads.tensors(&model_cfg))?;
        model.sync_token_rows(be);
        stats.grad_norm = report.grad_norm as f64;
        stats.lr = report.lr as f64;
        stats.opt_steps += 1;
        Ok(())
    }

    /// `log p` of every row of `seqs` under `model`, without a backward.
    fn score(&self, model: &Qwen2<B>, seqs: &[PolicySeq]) -> Result<Vec<Vec<f32>>> {
        let all: Vec<&PolicySeq> = seqs.iter().collect();
        sequence_logp(&self.be, model, &all, self.cfg.grpo.batch_tokens, self.cfg.rollout.temperature)
    }

    /// `log p` of every row of `seqs` under the reference: its own copy, or the policy with the
    /// adapters off (and the base's own token rows back in).
    fn reference_logp(&mut self, seqs: &[PolicySeq]) -> Result<Vec<Vec<f32>>> {
        if let Some(m) = &self.ref_model {
            return self.score(m, seqs);
        }
        let adapters = self.model.detach_lora(&self.be);
        let r = self.score(&self.model, seqs);
        if let Some(a) = adapters {
            self.model.attach_lora(&self.be, a);
        }
        r
    }

    /// Appends the step's line to `metrics.jsonl` and the event file, and prints its summary.
    fn log(
        &mut self,
        plan: &StepPlan,
        rollouts: &[Rollout],
        rollout_stats: &RolloutStats,
        adv: &StepAdvantages,
        update: &UpdateStats,
    ) -> Result<()> {
        let stage = &self.cfg.stages[plan.stage].name;
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let m = step_metrics(plan.step, stage, rollouts, rollout_stats, adv, update, elapsed_s);
        let (step, total) = (plan.step, self.total);
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
        writeln!(self.metrics_file, "{}", serde_json::to_string(&m)?)?;
        self.metrics_file.flush()?;
        let mut tb = serde_json::to_value(&m)?;
        // Every exit status at every step (0 when none ended so): charts without gaps.
        if let Some(exit) = tb["exit"].as_object_mut() {
            for s in ExitStatus::ALL {
                exit.entry(s.as_str()).or_insert(json!(0));
            }
        }
        self.events.scalars(step, &crate::tensorboard::scalars_of("rl", &tb))?;
        self.metrics.push(m);
        Ok(())
    }

    /// Marks `step` done and, every `grpo.checkpoint_every` steps and at the end, saves the
    /// exact resume point (pruned to `grpo.keep_checkpoints`).
    fn checkpoint(&mut self, step: u64) -> Result<()> {
        self.state = RlState { step, opt_step: self.opt.step };
        let every = self.cfg.grpo.checkpoint_every;
        if (every > 0 && step.is_multiple_of(every)) || step == self.total {
            checkpoint::save(&self.be, &self.dir, &self.model, &self.opt, step, &self.state)?;
            checkpoint::prune(&self.dir, self.cfg.grpo.keep_checkpoints)?;
        }
        Ok(())
    }

    /// Exports the trained model when the curriculum is done (an interrupted run leaves its
    /// checkpoints only).
    fn finish(mut self) -> Result<RlOutcome> {
        if self.state.step == self.total {
            let mut masters = std::mem::take(&mut self.opt.master);
            export_trained(&self.be, &mut self.model, &mut masters, &self.cfg.model.path, &self.dir)?;
        }
        let metrics = std::mem::take(&mut self.metrics);
        Ok(RlOutcome { run_dir: self.dir.clone(), last_step: self.state.step, metrics })
    }
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

/// Each stage's task pool: its suite, cut to the listed ids.
fn load_stage_tasks(cfg: &RlConfig) -> Result<Vec<Vec<TaskInstance>>> {
    cfg.stages
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
        .collect()
}

/// Where the episodes run: locally (in `scratch`, graded with the suites, the run directory
/// and the scratch hidden from the tests) or in Docker, as the config says.
fn rollout_executors(cfg: &RlConfig, run: &Path, scratch: &Scratch, isolation: Isolation) -> Result<Executors> {
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
    hidden.push(std::fs::canonicalize(run)?);
    hidden.push(scratch.path().to_path_buf());
    hidden.dedup();
    let r = &cfg.rollout;
    let grader = Grader { hidden, ..Grader::new(isolation, r.grade_limits, r.protection.clone()) };
    Ok(Executors::new(
        Some(LocalExecutor { grader, limits: r.limits, scratch: scratch.path().to_path_buf() }),
        Some(DockerConfig { limits: r.limits, protection: r.protection.clone(), ..r.docker.clone() }),
        r.executor,
    ))
}

/// The training sequences of a step: each unmasked episode's recorded tokens, the policy's own
/// marked trained, with its advantage (episodes without a policy token are left out).
fn policy_sequences(rollouts: &[Rollout], adv: &StepAdvantages) -> Result<Vec<PolicySeq>> {
    let mut seqs = vec![];
    for (i, r) in rollouts.iter().enumerate() {
        if adv.masked[i] {
            continue;
        }
        let Some(rec) = &r.episode.tokens else { continue };
        let trained: Vec<bool> = rec.sources()?.into_iter().map(|s| s == Source::Policy).collect();
        let seq = PolicySeq::new(rec.ids.clone(), trained, adv.adv[i]);
        if seq.policy_tokens > 0 {
            seqs.push(seq);
        }
    }
    Ok(seqs)
}

/// The step's line of `metrics.jsonl`: every reward component averaged over the episodes that
/// ran, the objective's statistics, and where the time went.
fn step_metrics(
    step: u64,
    stage: &str,
    rollouts: &[Rollout],
    rstats: &RolloutStats,
    adv: &StepAdvantages,
    update: &UpdateStats,
    elapsed_s: f64,
) -> RlMetrics {
    let good: Vec<&Rollout> = rollouts.iter().filter(|r| r.error.is_none()).collect();
    let comp = |f: &dyn Fn(&Rollout) -> f64| mean(good.iter().map(|r| f(r)));
    let expert_tokens: usize =
        good.iter().map(|r| r.episode.expert_calls.iter().map(|c| c.tokens_out).sum::<usize>()).sum();
    let policy_tokens: usize = good.iter().map(|r| r.episode.policy_tokens).sum();
    let mut exit = BTreeMap::new();
    for r in rollouts {
        *exit.entry(r.episode.exit_status.as_str().to_string()).or_insert(0) += 1;
    }
    let reward_mean = comp(&|r| r.reward.total);
    let (stats, train_s, trained_tokens) = (&update.pg, update.train_s, update.trained_tokens);
    RlMetrics {
        step,
        stage: stage.to_string(),
        episodes: rollouts.len(),
        errors: rollouts.len() - good.len(),
        masked: adv.masked.iter().filter(|&&m| m).count(),
        groups_with_signal: adv.groups.iter().filter(|g| g.iter().any(|&i| adv.adv[i] != 0.0)).count(),
        groups: adv.groups.len(),
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
        loss: stats.loss / update.opt_steps.max(1) as f64,
        kl: stats.kl(),
        clip_frac: stats.clip_frac(),
        ratio: stats.ratio(),
        entropy: stats.entropy(),
        grad_norm: update.grad_norm,
        lr: update.lr,
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
        elapsed_s,
    }
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

fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = xs.into_iter().fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}
