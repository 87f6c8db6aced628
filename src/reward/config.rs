//! The reward's constants, as a stage's `[stage.reward]` table sets them: the weights, the
//! penalties, the gates and who judges the expert calls.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::agent::loops::LoopConfig;

/// How per-call scores combine into one term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    #[default]
    Mean,
    Min,
}

impl Aggregate {
    pub(super) fn apply(self, xs: &[f64]) -> f64 {
        if xs.is_empty() {
            return 0.0;
        }
        match self {
            Aggregate::Mean => xs.iter().sum::<f64>() / xs.len() as f64,
            Aggregate::Min => xs.iter().copied().fold(f64::INFINITY, f64::min),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarrantConfig {
    /// A call whose warrant score is below this is unwarranted.
    pub threshold: f64,
    /// Reward of an unwarranted call (≤ 0).
    pub p_low: f64,
    pub aggregate: Aggregate,
}

impl Default for WarrantConfig {
    fn default() -> Self {
        Self { threshold: 0.5, p_low: -1.0, aggregate: Aggregate::Mean }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Added to R_expert when the episode made no expert call (stage II: −10).
    pub no_call_penalty: f64,
    /// Calls beyond this are penalised (0: no limit).
    pub max_calls: usize,
    /// Per call beyond `max_calls` (≤ 0).
    pub over_penalty: f64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self { no_call_penalty: 0.0, max_calls: 0, over_penalty: 0.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FollowConfig {
    /// A call whose follow-through score is below this was not followed.
    pub tau: f64,
    /// Reward of a call that was not followed (≤ 0).
    pub p_low: f64,
    pub aggregate: Aggregate,
    /// Leave the last call out (the episode may end before its advice can be acted on).
    pub exclude_last: bool,
}

impl Default for FollowConfig {
    fn default() -> Self {
        Self { tau: 0.5, p_low: -2.0, aggregate: Aggregate::Mean, exclude_last: true }
    }
}

/// `g_loop`: 1, then 0.5 once the longest run reaches `half_at`, 0 once it reaches `zero_at`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopGate {
    pub enabled: bool,
    pub half_at: usize,
    pub zero_at: usize,
}

impl Default for LoopGate {
    fn default() -> Self {
        Self { enabled: true, half_at: 11, zero_at: 16 }
    }
}

/// `g_follow`: 1, then 0.5 once the mean follow score falls below `half_below`, 0 below
/// `zero_below`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FollowGate {
    pub enabled: bool,
    pub half_below: f64,
    pub zero_below: f64,
}

impl Default for FollowGate {
    fn default() -> Self {
        Self { enabled: false, half_below: 0.5, zero_below: 0.25 }
    }
}

/// Who scores expert calls for warrant and follow-through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JudgeKind {
    /// Offline rules over the episode (see [`HeuristicJudge`]).
    #[default]
    Heuristic,
    /// The expert model itself, asked for a score per call (hidden from the agent).
    Expert,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    pub loops: LoopConfig,
    pub w_follow: f64,
    pub w_sim: f64,
    pub w_expert: f64,
    /// θ: an unresolved patch at least this similar to the gold patch escapes R_sim = −1.
    pub sim_threshold: f64,
    /// λ_b2b (≤ 0): R_b2b = max(−1, λ_b2b · back-to-back calls).
    pub b2b_lambda: f64,
    /// Per reply without a valid tool call (≤ 0).
    pub format_penalty: f64,
    /// R_format of an episode that ended on malformed replies (≤ 0; as bad as the worst loop
    /// by default, so that breaking the format is no escape from the loop penalty).
    pub format_exit: f64,
    /// Per call accepted in a non-canonical form (≤ 0): small, so that an accepted call
    /// still beats a refused one (`format_penalty`), but the `<tool_call>` block beats both.
    pub noncanonical_penalty: f64,
    /// R_tamper (≤ 0): added when the patch changed protected files.
    pub tampering_penalty: f64,
    pub warrant: WarrantConfig,
    pub quota: QuotaConfig,
    pub follow: FollowConfig,
    pub gate_loop: LoopGate,
    pub gate_follow: FollowGate,
    pub judge: JudgeKind,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            loops: LoopConfig::default(),
            w_follow: 0.2,
            w_sim: 0.5,
            w_expert: 0.0,
            sim_threshold: 0.5,
            b2b_lambda: -0.5,
            format_penalty: -0.5,
            format_exit: -10.0,
            noncanonical_penalty: -0.05,
            tampering_penalty: -1.0,
            warrant: WarrantConfig::default(),
            quota: QuotaConfig::default(),
            follow: FollowConfig::default(),
            gate_loop: LoopGate::default(),
            gate_follow: FollowGate::default(),
            judge: JudgeKind::Heuristic,
        }
    }
}

impl RewardConfig {
    pub fn validate(&self) -> Result<()> {
        let finite = [
            self.w_follow,
            self.w_sim,
            self.w_expert,
            self.sim_threshold,
            self.b2b_lambda,
            self.format_penalty,
            self.format_exit,
            self.noncanonical_penalty,
            self.tampering_penalty,
            self.warrant.threshold,
            self.warrant.p_low,
            self.quota.no_call_penalty,
            self.quota.over_penalty,
            self.follow.tau,
            self.follow.p_low,
            self.gate_follow.half_below,
            self.gate_follow.zero_below,
            self.loops.lambda,
            self.loops.floor,
        ];
        if finite.iter().any(|x| !x.is_finite()) {
            bail!("reward: every constant must be a finite number");
        }
        if self.b2b_lambda > 0.0
            || self.format_penalty > 0.0
            || self.format_exit > 0.0
            || self.noncanonical_penalty > 0.0
            || self.tampering_penalty > 0.0
            || self.warrant.p_low > 0.0
            || self.follow.p_low > 0.0
            || self.quota.no_call_penalty > 0.0
            || self.quota.over_penalty > 0.0
        {
            bail!("reward: b2b_lambda, format_penalty, format_exit, noncanonical_penalty, tampering_penalty, warrant.p_low, follow.p_low, quota.no_call_penalty and quota.over_penalty are penalties and must be <= 0");
        }
        if self.loops.floor > 0.0 || self.loops.lambda < 0.0 {
            bail!("reward.loops: floor must be <= 0 and lambda >= 0");
        }
        if !(0.0..=1.0).contains(&self.sim_threshold) {
            bail!("reward.sim_threshold must be in [0, 1], got {}", self.sim_threshold);
        }
        if self.gate_loop.half_at > self.gate_loop.zero_at {
            bail!(
                "reward.gate_loop: half_at ({}) must not exceed zero_at ({})",
                self.gate_loop.half_at,
                self.gate_loop.zero_at
            );
        }
        if self.gate_follow.zero_below > self.gate_follow.half_below {
            bail!("reward.gate_follow: zero_below must not exceed half_below");
        }
        Ok(())
    }
}
