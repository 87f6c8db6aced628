//! Run configuration files (TOML). Every field is documented here; unknown fields are errors
//! so that a typo fails before any work is done.
//!
//! This is the schema layer: plain settings, their defaults and their checks. The training
//! loops, synthesis and the pipeline read these types; nothing here depends on them (the few
//! enums the trainers act on, such as [`Decay`] or [`AdvantageMode`], are defined here and
//! re-exported where they are used).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::agent::episode::EpisodeConfig;
use crate::agent::experts::ExpertSpec;
use crate::model::lora::LoraConfig;
use crate::sandbox::Limits;

/// `protege sft --config FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    #[serde(default)]
    pub optim: OptimSection,
    /// Present: train LoRA adapters on a frozen base. Absent: full fine-tuning.
    pub lora: Option<LoraConfig>,
    pub output: OutputSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF model directory (config.json, safetensors, tokenizer.json). Relative paths are
    /// resolved against the config file's directory.
    pub path: PathBuf,
    /// Context length in tokens, overriding config.json's `max_position_embeddings`.
    #[serde(default)]
    pub context: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Trajectory JSONL files (the shared schema); relative to the config file.
    pub train: Vec<PathBuf>,
    /// Trajectories held out for the eval loss: the last `eval_fraction` of them (after a seeded
    /// shuffle). 0 disables evaluation.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f32,
    /// Longest sequence in tokens.
    pub max_seq_len: usize,
    /// What to do with longer ones: "drop" or "truncate_at_turn".
    #[serde(default)]
    pub overlong: Overlong,
    /// Tokens per micro-batch (sequences are packed up to this; a longer one goes alone).
    pub batch_tokens: usize,
}

fn default_eval_fraction() -> f32 {
    0.1
}

/// What to do with a sequence longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Skip it.
    Drop,
    /// Cut it after the last complete assistant turn that fits; drop it if none fits.
    #[default]
    TruncateAtTurn,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimiser steps.
    pub steps: u64,
    /// Micro-batches whose gradients are summed per optimiser step.
    #[serde(default = "one")]
    pub grad_accum: u64,
    #[serde(default)]
    pub seed: u64,
    /// Recompute each layer's activations in the backward instead of storing them.
    #[serde(default)]
    pub recompute: bool,
    /// Eval loss every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_every: u64,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f32,
    pub warmup_steps: u64,
    /// "constant", "linear" or "cosine".
    pub decay: Decay,
    /// Floor of the decay as a fraction of `lr`.
    pub min_lr_ratio: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global gradient-norm clip; 0 disables.
    pub max_grad_norm: f32,
}

/// How the learning rate falls after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Constant,
    Linear,
    #[default]
    Cosine,
}

impl OptimSection {
    /// Every field in its range, for a run of `steps` optimiser steps; errors name the field.
    pub fn validate(&self, steps: u64) -> Result<()> {
        let positive = |x: f32| x.is_finite() && x > 0.0;
        let at_least_zero = |x: f32| x.is_finite() && x >= 0.0;
        if !positive(self.lr) {
            bail!("optim.lr must be a positive number, got {}", self.lr);
        }
        if !positive(self.eps) {
            bail!("optim.eps must be a positive number, got {}", self.eps);
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("optim.{name} must be in [0, 1), got {b}");
            }
        }
        if !at_least_zero(self.weight_decay) {
            bail!("optim.weight_decay must be 0 or more, got {}", self.weight_decay);
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!("optim.min_lr_ratio is a fraction of lr and must be in [0, 1], got {}", self.min_lr_ratio);
        }
        if !at_least_zero(self.max_grad_norm) {
            bail!("optim.max_grad_norm must be 0 (no clipping) or more, got {}", self.max_grad_norm);
        }
        if self.warmup_steps > steps {
            bail!(
                "optim.warmup_steps ({}) exceeds the run's {steps} steps: lr would never reach optim.lr",
                self.warmup_steps
            );
        }
        Ok(())
    }
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            warmup_steps: 0,
            decay: Decay::Cosine,
            min_lr_ratio: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run directory (relative to the config file).
    pub run_dir: PathBuf,
}

impl SftConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: SftConfig =
            crate::inputs::toml_file(&text, &path.display().to_string()).context("invalid config")?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        cfg.model.path = resolve(&cfg.model.path);
        cfg.output.run_dir = resolve(&cfg.output.run_dir);
        cfg.data.train = cfg.data.train.iter().map(|p| resolve(p)).collect();
        cfg.validate().with_context(|| format!("invalid config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let d = &self.data;
        if d.train.is_empty() {
            bail!("data.train lists no trajectory files");
        }
        if !(0.0..1.0).contains(&d.eval_fraction) {
            bail!("data.eval_fraction must be in [0, 1), got {}", d.eval_fraction);
        }
        if d.max_seq_len < 2 || d.batch_tokens == 0 {
            bail!("data.max_seq_len must be >= 2 and data.batch_tokens > 0");
        }
        if self.train.steps == 0 || self.train.grad_accum == 0 {
            bail!("train.steps and train.grad_accum must be positive");
        }
        self.optim.validate(self.train.steps)?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Shared sections of the agent configs (synth, rl, train).

/// The policy model: an HF directory, optionally with a PEFT adapter merged into it first
/// (e.g. the SFT stage's `adapter/`), and a context override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyModelSection {
    /// HF model directory; relative to the config file.
    pub path: PathBuf,
    /// A PEFT adapter directory merged into the weights at load.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Context length in tokens, overriding config.json's `max_position_embeddings` (RoPE
    /// positions extend; useful for small test models).
    #[serde(default)]
    pub context: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExpertKind {
    None,
    /// The rule-based gold-patch oracle (deterministic; demos, tests).
    #[default]
    Oracle,
    /// A model behind an OpenAI-compatible or Anthropic endpoint (`[expert.endpoint]`).
    Remote,
    /// A second local model (`path`).
    Local,
}

/// `[expert]`: who answers `ask_expert` (and, with `judge = "expert"`, scores the calls).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertSection {
    #[serde(default)]
    pub kind: ExpertKind,
    #[serde(default)]
    pub endpoint: Option<crate::agent::remote::Endpoint>,
    /// Local expert model directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Most tokens of one reply.
    #[serde(default = "default_expert_tokens")]
    pub max_tokens: usize,
}

fn default_expert_tokens() -> usize {
    1024
}

impl Default for ExpertSection {
    fn default() -> Self {
        Self { kind: ExpertKind::Oracle, endpoint: None, path: None, max_tokens: default_expert_tokens() }
    }
}

impl ExpertSection {
    pub fn spec(&self) -> Result<ExpertSpec> {
        Ok(match self.kind {
            ExpertKind::None => ExpertSpec::None,
            ExpertKind::Oracle => ExpertSpec::Oracle,
            ExpertKind::Remote => ExpertSpec::Remote {
                endpoint: self.endpoint.clone().context("expert.kind = \"remote\" needs an [expert.endpoint] table")?,
                max_tokens: self.max_tokens,
            },
            ExpertKind::Local => ExpertSpec::Local {
                model: self.path.clone().context("expert.kind = \"local\" needs expert.path (a model directory)")?,
                adapter: None,
                max_tokens: self.max_tokens,
            },
        })
    }
}

/// Resolves `p` against the directory of the config file.
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    crate::inputs::toml_file(text, origin).context("invalid config")
}

// ---------------------------------------------------------------------------------------------
// `protege rl`.

/// One curriculum stage: a number of RL steps with its own task pool and reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSection {
    pub name: String,
    /// RL steps of this stage (stages run in order).
    pub steps: u64,
    /// Task suite (JSONL file or directory); relative to the config file.
    pub suite: PathBuf,
    /// Only these instance ids (all when empty).
    #[serde(default)]
    pub tasks: Vec<String>,
    #[serde(default)]
    pub reward: crate::reward::RewardConfig,
}

/// How rewards become advantages within a group of episodes of the same task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageMode {
    /// `(r − mean) / (std + 1e-6)`, std with Bessel's correction (GRPO).
    #[default]
    MeanStd,
    /// `r − mean` (no division by the std, as Dr. GRPO).
    Mean,
    /// Leave-one-out baseline: `r_i − mean_{j≠i} r_j`.
    Rloo,
}

/// How the policy tokens of a step weigh in the loss (see [`crate::train::grpo`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LossAgg {
    #[default]
    TokenMean,
    SeqMeanTokenSum,
    SeqMeanTokenMean,
}

/// `[grpo]`: the GRPO settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// Tasks sampled per RL step.
    pub tasks_per_step: usize,
    /// Episodes per task (the GRPO group).
    pub group_size: usize,
    pub seed: u64,
    /// "mean_std" (GRPO), "mean" (no std) or "rloo".
    pub advantage: AdvantageMode,
    /// "token-mean", "seq-mean-token-sum" or "seq-mean-token-mean".
    pub loss_agg: LossAgg,
    pub clip_low: f64,
    pub clip_high: f64,
    /// β of the KL penalty to the reference (the model RL starts from); 0 disables it.
    pub kl_beta: f64,
    /// Episodes ending with these statuses are left out of the loss (they still count in
    /// their group's statistics). Looping episodes usually end at the step limit: with
    /// "step_limit" here their penalty reaches the gradient only through their group's
    /// baseline; drop it from the list for a loop-focused stage.
    pub mask_exit: Vec<crate::agent::episode::ExitStatus>,
    /// Passes over each step's episodes, and optimiser steps per pass.
    pub ppo_epochs: usize,
    pub minibatches: usize,
    /// Tokens per training micro-batch.
    pub batch_tokens: usize,
    pub recompute: bool,
    /// Checkpoint every this many RL steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk, the newest (0: all). Full fine-tuning checkpoints hold the
    /// weights and both AdamW moments.
    pub keep_checkpoints: usize,
}

impl Default for GrpoSection {
    fn default() -> Self {
        use crate::agent::episode::ExitStatus;
        Self {
            tasks_per_step: 4,
            group_size: 6,
            seed: 0,
            advantage: Default::default(),
            loss_agg: Default::default(),
            clip_low: 0.2,
            clip_high: 0.28,
            kl_beta: 0.0,
            mask_exit: vec![ExitStatus::ContextLimit, ExitStatus::StepLimit, ExitStatus::Timeout],
            ppo_epochs: 1,
            minibatches: 1,
            batch_tokens: 16384,
            recompute: true,
            checkpoint_every: 1,
            keep_checkpoints: 3,
        }
    }
}

impl GrpoSection {
    /// The clipping range and the KL weight of the objective.
    fn validate_objective(&self) -> Result<()> {
        if !((0.0..1.0).contains(&self.clip_low) && self.clip_high >= 0.0 && self.clip_high.is_finite()) {
            bail!("clip_low must be in [0, 1) and clip_high >= 0");
        }
        if !(self.kl_beta >= 0.0 && self.kl_beta.is_finite()) {
            bail!("kl_beta must be >= 0");
        }
        Ok(())
    }
}

/// `[rollout]`: how RL's episodes run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Episodes in flight at once (each on its own thread; the model batches across them).
    pub concurrency: usize,
    /// Sampling temperature of the policy (the log-probs are of this tempered distribution).
    pub temperature: f32,
    /// Tokens of one reply.
    pub max_new_tokens: usize,
    /// KV-cache tokens shared by all episodes in flight (0: enough for every episode's full
    /// context).
    pub kv_cache_tokens: usize,
    /// Tokens of one forward step (bounds activation memory during prefill).
    pub max_step_tokens: usize,
    pub episode: EpisodeConfig,
    /// Limits of the agent's commands.
    pub limits: Limits,
    /// Limits of the grading test run.
    pub grade_limits: Limits,
    /// Files the agent's patch may not change when graded.
    pub protection: crate::tasks::protect::Protection,
    /// Where episodes run (overrides each task's `env.executor`).
    pub executor: Option<crate::executor::ExecutorKind>,
    /// Docker hosts and container limits.
    pub docker: crate::executor::docker::DockerConfig,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            temperature: 1.0,
            max_new_tokens: 512,
            kv_cache_tokens: 0,
            max_step_tokens: 2048,
            episode: EpisodeConfig::default(),
            limits: Limits::default(),
            grade_limits: Limits { timeout_s: 300.0, cpu_s: 600, ..Limits::default() },
            protection: Default::default(),
            executor: None,
            docker: Default::default(),
        }
    }
}

/// `protege rl --config FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlConfig {
    pub model: PolicyModelSection,
    #[serde(default)]
    pub grpo: GrpoSection,
    #[serde(default)]
    pub optim: OptimSection,
    /// Present: train a fresh LoRA on the (frozen) starting model. Absent: full fine-tuning.
    pub lora: Option<LoraConfig>,
    #[serde(default)]
    pub rollout: RolloutConfig,
    #[serde(default)]
    pub expert: ExpertSection,
    #[serde(rename = "stage")]
    pub stages: Vec<StageSection>,
    pub output: OutputSection,
}

impl RlConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: RlConfig = parse_toml(&text, &path.display().to_string())?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        cfg.validate().with_context(|| format!("invalid config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        self.model.path = resolve(base, &self.model.path);
        self.model.adapter = self.model.adapter.as_ref().map(|p| resolve(base, p));
        self.output.run_dir = resolve(base, &self.output.run_dir);
        self.expert.path = self.expert.path.as_ref().map(|p| resolve(base, p));
        for s in &mut self.stages {
            s.suite = resolve(base, &s.suite);
        }
    }

    pub fn total_steps(&self) -> u64 {
        self.stages.iter().map(|s| s.steps).sum()
    }

    /// The stage of RL step `step` (0-based) and its index.
    pub fn stage_at(&self, step: u64) -> (usize, &StageSection) {
        let mut end = 0;
        for (i, s) in self.stages.iter().enumerate() {
            end += s.steps;
            if step < end {
                return (i, s);
            }
        }
        let last = self.stages.len() - 1;
        (last, &self.stages[last])
    }

    pub fn validate(&self) -> Result<()> {
        let r = &self.grpo;
        if self.stages.is_empty() || self.total_steps() == 0 {
            bail!("at least one [[stage]] with steps > 0 is needed");
        }
        for s in &self.stages {
            s.reward.validate().with_context(|| format!("stage {:?}", s.name))?;
            if s.reward.judge == crate::reward::JudgeKind::Expert && self.expert.kind != ExpertKind::Remote {
                bail!(
                    "stage {:?}: judge = \"expert\" needs a model expert (expert.kind = \"remote\"); the {:?} expert cannot judge",
                    s.name,
                    self.expert.kind
                );
            }
        }
        if r.tasks_per_step == 0 || r.group_size == 0 || r.ppo_epochs == 0 || r.minibatches == 0 || r.batch_tokens == 0
        {
            bail!("grpo: tasks_per_step, group_size, ppo_epochs, minibatches and batch_tokens must be positive");
        }
        if r.group_size < 2 {
            bail!("grpo.group_size must be at least 2: advantages compare episodes of one task");
        }
        if r.minibatches > r.tasks_per_step * r.group_size {
            bail!(
                "grpo.minibatches ({}) exceeds the episodes per step ({})",
                r.minibatches,
                r.tasks_per_step * r.group_size
            );
        }
        r.validate_objective().context("grpo")?;
        let t = self.rollout.temperature;
        if !(t > 0.0 && t.is_finite()) {
            bail!("rollout.temperature must be positive (RL samples its episodes), got {t}");
        }
        if self.rollout.concurrency == 0 || self.rollout.max_new_tokens == 0 {
            bail!("rollout.concurrency and rollout.max_new_tokens must be positive");
        }
        self.optim.validate(self.total_steps())?;
        let kv = self.rollout.kv_cache_tokens;
        let one_episode = self.rollout.episode.context_tokens.min(self.model.context.unwrap_or(usize::MAX));
        if kv > 0 && kv < one_episode + crate::generate::BLOCK_SIZE {
            bail!(
                "rollout.kv_cache_tokens ({kv}) cannot hold one episode's context (rollout.episode.context_tokens = {}); \
                 raise it or set 0 (sized from the concurrency)",
                self.rollout.episode.context_tokens
            );
        }
        if let Some(l) = &self.lora {
            l.validate()?;
            if l.dropout > 0.0 {
                bail!("lora.dropout must be 0 for RL: dropout would make the policy's log-probs differ from the ones it sampled with");
            }
        }
        self.expert.spec()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// `protege synth`.

/// Who plays the agent during synthesis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// "remote" (a strong model over an OpenAI-compatible API, `[agent.endpoint]`), "local"
    /// (protege's engine on `path`) or "scripted" (the rule-based teacher that reads the gold
    /// patch: a stand-in for a strong model in demos and tests, labelled as such).
    pub kind: String,
    #[serde(default)]
    pub endpoint: Option<crate::agent::remote::Endpoint>,
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub context: Option<usize>,
    #[serde(default = "default_agent_temperature")]
    pub temperature: f32,
    #[serde(default = "default_agent_tokens")]
    pub max_new_tokens: usize,
}

fn default_agent_temperature() -> f32 {
    0.7
}

fn default_agent_tokens() -> usize {
    1024
}

/// Which episodes synthesis keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcceptSection {
    /// Keep only resolved episodes (rejection sampling).
    pub resolved: bool,
    /// Reject an episode with a run of one base command longer than this (0: no limit).
    pub max_loop_run: usize,
    /// Reject an episode with more expert calls than this (0: no limit).
    pub max_expert_calls: usize,
    /// Reject an episode with fewer expert calls than this.
    pub min_expert_calls: usize,
}

impl Default for AcceptSection {
    fn default() -> Self {
        Self { resolved: true, max_loop_run: 10, max_expert_calls: 0, min_expert_calls: 0 }
    }
}

/// `protege synth --config FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthConfig {
    pub agent: AgentSection,
    #[serde(default)]
    pub expert: ExpertSection,
    /// Task suite; relative to the config file.
    pub suite: PathBuf,
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Attempts per task.
    #[serde(default = "one_usize")]
    pub attempts: usize,
    /// Stop trying a task once this many of its episodes were accepted (0: run every attempt).
    #[serde(default = "one_usize")]
    pub keep_per_task: usize,
    #[serde(default = "two")]
    pub concurrency: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub accept: AcceptSection,
    #[serde(default)]
    pub episode: EpisodeConfig,
    /// Limits of the agent's commands.
    #[serde(default)]
    pub limits: Limits,
    /// Limits of the grading test run.
    #[serde(default = "grade_limits")]
    pub grade_limits: Limits,
    /// Files the agent's patch may not change when graded.
    #[serde(default)]
    pub protection: crate::tasks::protect::Protection,
    /// Where episodes run (overrides each task's `env.executor`).
    #[serde(default)]
    pub executor: Option<crate::executor::ExecutorKind>,
    /// Docker hosts and container limits.
    #[serde(default)]
    pub docker: crate::executor::docker::DockerConfig,
    pub output: OutputSection,
}

fn grade_limits() -> Limits {
    Limits { timeout_s: 300.0, cpu_s: 600, ..Default::default() }
}

fn one_usize() -> usize {
    1
}

fn two() -> usize {
    2
}

impl SynthConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: SynthConfig = parse_toml(&text, &path.display().to_string())?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        cfg.validate().with_context(|| format!("invalid config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        self.suite = resolve(base, &self.suite);
        self.output.run_dir = resolve(base, &self.output.run_dir);
        self.agent.path = self.agent.path.as_ref().map(|p| resolve(base, p));
        self.expert.path = self.expert.path.as_ref().map(|p| resolve(base, p));
    }

    pub fn validate(&self) -> Result<()> {
        match self.agent.kind.as_str() {
            "remote" => {
                let ep = self.agent.endpoint.as_ref().context("agent.kind = \"remote\" needs [agent.endpoint]")?;
                if ep.api != crate::agent::remote::Api::Openai {
                    bail!("agent.endpoint.api must be \"openai\" (the agent needs tool calling)");
                }
            }
            "local" => {
                self.agent.path.as_ref().context("agent.kind = \"local\" needs agent.path (a model directory)")?;
            }
            "scripted" => {}
            k => bail!("agent.kind must be \"remote\", \"local\" or \"scripted\", got {k:?}"),
        }
        if self.attempts == 0 || self.concurrency == 0 {
            bail!("attempts and concurrency must be positive");
        }
        self.expert.spec()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimiser_numbers_out_of_range_are_errors_naming_the_field() {
        let ok = OptimSection { warmup_steps: 10, ..Default::default() };
        ok.validate(10).unwrap();
        let bad = [
            (OptimSection { weight_decay: -5.0, ..ok.clone() }, "weight_decay"),
            (OptimSection { min_lr_ratio: 2.0, ..ok.clone() }, "min_lr_ratio"),
            (OptimSection { warmup_steps: 11, ..ok.clone() }, "warmup_steps"),
            (OptimSection { lr: f32::NAN, ..ok.clone() }, "optim.lr"),
            (OptimSection { beta2: 1.0, ..ok.clone() }, "beta2"),
            (OptimSection { max_grad_norm: -1.0, ..ok.clone() }, "max_grad_norm"),
        ];
        for (o, field) in bad {
            let e = o.validate(10).unwrap_err();
            assert!(format!("{e:#}").contains(field), "{e:#}");
        }
    }
}
