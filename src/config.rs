//! Run configuration files (TOML). Every field is documented here; unknown fields are errors
//! so that a typo fails before any work is done.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::lora::LoraConfig;
use crate::train::data::Overlong;
use crate::train::schedule::Decay;

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
        let mut cfg: SftConfig = toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
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
        let o = &self.optim;
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !positive(o.lr) || !positive(o.eps) || !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            bail!("optim: lr and eps must be positive, beta1 and beta2 in [0, 1)");
        }
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        Ok(())
    }
}
