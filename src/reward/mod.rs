//! The SWE-Protégé trajectory reward. Every constant comes from [`RewardConfig`]; every
//! component is returned in a [`RewardBreakdown`] so that it can be logged.
//!
//! ```text
//! R_total  = R_loop + R_format + R_tamper + w_follow * R_follow + g_loop * g_follow * R_other
//! R_other  = R_correct + w_sim * R_sim + w_expert * R_expert
//! R_expert = R_warrant + R_b2b + R_quota
//! ```
//!
//! - `R_loop`: the loop detector's penalty (runs of one base command, [`crate::agent::loops`]).
//! - `R_format`: `format_exit` when the episode ended on malformed replies (no valid tool
//!   call, `max_format_errors` times in a row), else `format_penalty` per malformed reply:
//!   protege's addition. The paper's formula has no such term, and without it an episode that
//!   ends early on malformed replies scores above one that loops, so RL on a weak policy learns
//!   to break its format; set both to 0 for the paper's reward. Plus `noncanonical_penalty` per
//!   call the harness accepted in a form other than the `<tool_call>` block (bare JSON, a
//!   fence, `<function=…>`; [`crate::agent::toolcall`]): the tolerant parser keeps small
//!   models' episodes going, and this term still teaches the canonical form.
//! - `R_tamper`: `tampering_penalty` when the patch changed protected files (the task's tests,
//!   `conftest.py`, test configuration; [`crate::tasks::protect`]). Those changes are dropped
//!   before grading, so they cannot earn `R_correct`; the penalty keeps RL from learning to
//!   try. Outside the gates, like `R_loop`: a correct fix does not excuse it.
//! - `R_correct` ∈ {0, 1}: the hidden tests pass (graded in a fresh copy).
//! - `R_sim`: for an unresolved episode, 0 when its patch is at least `sim_threshold` similar to
//!   the gold patch, else −1 (0 for resolved episodes).
//! - `R_warrant`: per expert call, `warrant.p_low` when the judge's warrant score `u_i` is below
//!   `warrant.threshold`, else 0; aggregated by mean or min.
//! - `R_b2b = max(−1, b2b_lambda · n)`, `n` the expert calls made right after another one.
//! - `R_quota`: `quota.no_call_penalty` when the episode made no expert call, plus
//!   `quota.over_penalty` per call beyond `quota.max_calls`.
//! - `R_follow`: per expert call (the last one excluded when `follow.exclude_last`, as the
//!   episode may end before it can be followed), the judge's follow-through score `f_i` when
//!   `f_i ≥ follow.tau`, else `follow.p_low`; aggregated by mean or min; 0 without such calls.
//! - Gates: `g_loop` is 0 / 0.5 / 1 as the longest run reaches `gate_loop.zero_at` /
//!   `gate_loop.half_at` / neither; `g_follow` is 0 / 0.5 / 1 as the mean follow score falls
//!   below `gate_follow.zero_below` / `gate_follow.half_below` / neither. A disabled gate is 1.
//!   The gates keep a correct patch from hiding looping or ignored advice.

use serde::{Deserialize, Serialize};

use crate::agent::episode::Episode;
use crate::agent::loops::analyse;
use crate::tasks::TaskInstance;

mod config;
mod judges;
mod similarity;
#[cfg(test)]
mod tests;

pub use config::{Aggregate, FollowConfig, FollowGate, JudgeKind, LoopGate, QuotaConfig, RewardConfig, WarrantConfig};
pub use judges::{
    advice_targets, parse_score, steps, CallScore, ExpertJudge, HeuristicJudge, Judge, JudgeOutput, Step, JUDGE_SYSTEM,
};
pub use similarity::patch_similarity;

/// Every component of one episode's reward.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardBreakdown {
    pub total: f64,
    pub r_loop: f64,
    pub r_format: f64,
    #[serde(default)]
    pub r_tamper: f64,
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
    pub similarity: f64,
    pub longest_run: usize,
    pub looping: bool,
    pub expert_calls: usize,
    pub back_to_back: usize,
    pub calls: Vec<CallScore>,
}

/// What the reward needs to know about an episode.
pub struct Outcome<'a> {
    pub actions: &'a [crate::agent::loops::Action],
    pub patch: &'a str,
    pub gold_patch: &'a str,
    pub resolved: bool,
    /// Replies without a valid tool call.
    pub format_errors: usize,
    /// The episode ended on them.
    pub format_exit: bool,
    /// Calls accepted in a form other than the canonical `<tool_call>` block.
    pub noncanonical_calls: usize,
    /// Protected files the patch changed (dropped before grading).
    pub tampered: usize,
}

impl<'a> Outcome<'a> {
    pub fn of(ep: &'a Episode, task: &'a TaskInstance, resolved: bool) -> Self {
        Self {
            actions: &ep.actions,
            patch: &ep.patch,
            gold_patch: &task.patch,
            resolved,
            format_errors: ep.format_errors,
            format_exit: ep.exit_status == crate::agent::episode::ExitStatus::FormatErrors,
            noncanonical_calls: ep.noncanonical_calls(),
            tampered: 0,
        }
    }
}

/// R_total and its components, given the judge's per-call scores.
pub fn reward(cfg: &RewardConfig, o: &Outcome, calls: &[CallScore]) -> RewardBreakdown {
    use crate::agent::loops::Action;
    let loops = analyse(o.actions, &cfg.loops);
    let n_calls = o.actions.iter().filter(|a| **a == Action::AskExpert).count();
    let back_to_back = o.actions.windows(2).filter(|w| w[0] == Action::AskExpert && w[1] == Action::AskExpert).count();

    let r_correct = if o.resolved { 1.0 } else { 0.0 };
    let similarity = patch_similarity(o.patch, o.gold_patch);
    let r_sim = if o.resolved || similarity >= cfg.sim_threshold { 0.0 } else { -1.0 };

    let warrant: Vec<f64> =
        calls.iter().map(|c| if c.warrant < cfg.warrant.threshold { cfg.warrant.p_low } else { 0.0 }).collect();
    let r_warrant = cfg.warrant.aggregate.apply(&warrant);
    let r_b2b = (cfg.b2b_lambda * back_to_back as f64).max(-1.0);
    let mut r_quota = if n_calls == 0 { cfg.quota.no_call_penalty } else { 0.0 };
    if cfg.quota.max_calls > 0 {
        r_quota += cfg.quota.over_penalty * n_calls.saturating_sub(cfg.quota.max_calls) as f64;
    }
    let r_expert = r_warrant + r_b2b + r_quota;

    let judged = if cfg.follow.exclude_last && !calls.is_empty() { &calls[..calls.len() - 1] } else { calls };
    let follow: Vec<f64> =
        judged.iter().map(|c| if c.follow < cfg.follow.tau { cfg.follow.p_low } else { c.follow }).collect();
    let r_follow = cfg.follow.aggregate.apply(&follow);

    let g_loop = match cfg.gate_loop {
        g if !g.enabled => 1.0,
        g if loops.longest_run >= g.zero_at => 0.0,
        g if loops.longest_run >= g.half_at => 0.5,
        _ => 1.0,
    };
    let mean_follow =
        if judged.is_empty() { None } else { Some(judged.iter().map(|c| c.follow).sum::<f64>() / judged.len() as f64) };
    let g_follow = match (cfg.gate_follow, mean_follow) {
        (g, Some(f)) if g.enabled && f < g.zero_below => 0.0,
        (g, Some(f)) if g.enabled && f < g.half_below => 0.5,
        _ => 1.0,
    };
    let r_other = r_correct + cfg.w_sim * r_sim + cfg.w_expert * r_expert;
    let r_format = if o.format_exit {
        cfg.format_exit
    } else {
        cfg.format_penalty * o.format_errors as f64 + cfg.noncanonical_penalty * o.noncanonical_calls as f64
    };
    let r_tamper = if o.tampered > 0 { cfg.tampering_penalty } else { 0.0 };
    RewardBreakdown {
        total: loops.penalty + r_format + r_tamper + cfg.w_follow * r_follow + g_loop * g_follow * r_other,
        r_loop: loops.penalty,
        r_format,
        r_tamper,
        r_follow,
        r_other,
        r_correct,
        r_sim,
        r_expert,
        r_warrant,
        r_b2b,
        r_quota,
        g_loop,
        g_follow,
        similarity,
        longest_run: loops.longest_run,
        looping: loops.looping,
        expert_calls: n_calls,
        back_to_back,
        calls: calls.to_vec(),
    }
}
