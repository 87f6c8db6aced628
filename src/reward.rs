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

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::episode::Episode;
use crate::agent::loops::{analyse, LoopConfig};
use crate::agent::policy::EXPERT_TOOL;
use crate::agent::remote::{complete_text, Endpoint};
use crate::chat::{Message, Role};
use crate::tasks::TaskInstance;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    #[default]
    Mean,
    Min,
}

impl Aggregate {
    fn apply(self, xs: &[f64]) -> f64 {
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

// ---------------------------------------------------------------------------------------------
// The episode as the judges see it.

/// One tool call of an episode and what came back.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub tool: String,
    pub args: Value,
    pub observation: String,
    /// Index of the assistant message that made the call.
    pub message: usize,
}

/// The tool calls of an episode's messages, in order.
pub fn steps(messages: &[Message]) -> Vec<Step> {
    let mut out = vec![];
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        for c in &m.tool_calls {
            let observation = match messages.get(i + 1) {
                Some(next) if next.role == Role::Tool => next.text().to_string(),
                _ => String::new(),
            };
            out.push(Step { tool: c.function.name.clone(), args: c.arguments(), observation, message: i });
        }
    }
    out
}

/// One judged expert call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallScore {
    /// Index of the call among the episode's steps.
    pub step: usize,
    /// Warrant u_i ∈ [0, 1].
    pub warrant: f64,
    /// Follow-through f_i ∈ [0, 1].
    pub follow: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

pub trait Judge: Send {
    fn name(&self) -> String;
    /// Scores every expert call of the episode (in order).
    fn judge(&mut self, task: &TaskInstance, messages: &[Message]) -> Result<JudgeOutput>;
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeOutput {
    pub calls: Vec<CallScore>,
    pub tokens_in: usize,
    pub tokens_out: usize,
    pub cost_usd: f64,
}

/// Offline judge.
///
/// Warrant: a call as the very first action, or right after another expert call, scores 0.
/// Otherwise it scores 1 when the actions since the last call (or the start) show the agent
/// stalled — a command that failed (non-zero exit, an editor error), a repeated base command, or
/// at least `stall_steps` actions without an edit — and 0.25 when it asked after some
/// exploration without such a sign.
///
/// Follow-through: the files, functions and code the advice names in backticks are its targets.
/// Editing a named file (or, when it names none, any file) after the call scores 1; only
/// looking at or running what it names scores 0.5; nothing related before the next call or the
/// end scores 0. Submitting right away without an edit scores 0.
#[derive(Debug, Clone)]
pub struct HeuristicJudge {
    pub stall_steps: usize,
}

impl Default for HeuristicJudge {
    fn default() -> Self {
        Self { stall_steps: 6 }
    }
}

fn is_edit(s: &Step) -> bool {
    match s.tool.as_str() {
        "str_replace_editor" => {
            matches!(s.args.get("command").and_then(Value::as_str), Some("str_replace" | "insert" | "create"))
        }
        "bash" => {
            let c = s.args.get("command").and_then(Value::as_str).unwrap_or("");
            // In-place edits, patches, and output redirected into a source file.
            let into_source = c
                .split('>')
                .skip(1)
                .any(|rest| rest.trim_start_matches('>').split_whitespace().next().is_some_and(|f| f.ends_with(".py")));
            c.contains("sed -i") || c.contains("patch ") || into_source
        }
        _ => false,
    }
}

fn failed(s: &Step) -> bool {
    let o = &s.observation;
    o.contains("[exit code ")
        || o.contains("Traceback (most recent call last)")
        || o.starts_with("Error")
        || o.contains("No replacement was performed")
        || o.contains("did not appear")
}

fn step_text(s: &Step) -> String {
    match s.tool.as_str() {
        "bash" => s.args.get("command").and_then(Value::as_str).unwrap_or("").to_string(),
        _ => s.args.to_string(),
    }
}

/// Backticked spans of an advice text, split into file-like names and other code.
pub fn advice_targets(advice: &str) -> (Vec<String>, Vec<String>) {
    let (mut files, mut code) = (vec![], vec![]);
    let mut parts = advice.split('`');
    parts.next();
    while let (Some(inside), _) = (parts.next(), parts.next()) {
        let t = inside.trim();
        if t.is_empty() || t.len() > 200 {
            continue;
        }
        let last = t.rsplit('/').next().unwrap_or(t);
        if t.ends_with(".py")
            || (t.contains('/') && !t.contains(' '))
            || (last.contains('.') && last.len() > 3 && !t.contains(' ') && !t.contains('('))
        {
            files.push(t.trim_start_matches("./").to_string());
        } else {
            // `def name(args):` names a function: its name is what the agent would touch.
            let name = t
                .strip_prefix("def ")
                .or_else(|| t.strip_prefix("class "))
                .map(|r| r.split(['(', ':']).next().unwrap_or(r).trim());
            code.push(name.unwrap_or(t).to_string());
        }
    }
    (files, code)
}

impl HeuristicJudge {
    fn warrant(&self, steps: &[Step], i: usize) -> f64 {
        let prev_call = steps[..i].iter().rposition(|s| s.tool == EXPERT_TOOL);
        if i == 0 || prev_call == Some(i - 1) {
            return 0.0;
        }
        let since = &steps[prev_call.map_or(0, |p| p + 1)..i];
        let stalled = since.iter().any(failed)
            || since.windows(2).any(|w| step_text(&w[0]) == step_text(&w[1]))
            || (since.len() >= self.stall_steps && !since.iter().any(is_edit));
        if stalled {
            1.0
        } else {
            0.25
        }
    }

    fn follow(&self, steps: &[Step], i: usize) -> f64 {
        let next_call = steps[i + 1..].iter().position(|s| s.tool == EXPERT_TOOL).map_or(steps.len(), |p| i + 1 + p);
        let after = &steps[i + 1..next_call];
        let (files, code) = advice_targets(&steps[i].observation);
        let Some(first) = after.first() else { return 0.0 };
        if first.tool == "submit" {
            return 0.0;
        }
        let mentions = |s: &Step, names: &[String]| {
            let text = step_text(s);
            let path = s.args.get("path").and_then(Value::as_str).unwrap_or("");
            let rel = path.trim_start_matches("/repo/").trim_start_matches("./");
            names.iter().any(|n| {
                text.contains(n.as_str())
                    || (!rel.is_empty() && !n.is_empty() && (path.ends_with(n.as_str()) || n.ends_with(rel)))
            })
        };
        let edited = |s: &Step| is_edit(s) && (files.is_empty() || mentions(s, &files));
        if after.iter().any(edited) {
            return 1.0;
        }
        let all: Vec<String> = files.iter().chain(&code).cloned().collect();
        if after.iter().any(|s| mentions(s, &all)) || (all.is_empty() && !after.is_empty()) {
            0.5
        } else {
            0.0
        }
    }
}

impl Judge for HeuristicJudge {
    fn name(&self) -> String {
        "heuristic".into()
    }

    fn judge(&mut self, _task: &TaskInstance, messages: &[Message]) -> Result<JudgeOutput> {
        let st = steps(messages);
        let calls = (0..st.len())
            .filter(|&i| st[i].tool == EXPERT_TOOL)
            .map(|i| CallScore { step: i, warrant: self.warrant(&st, i), follow: self.follow(&st, i), note: None })
            .collect();
        Ok(JudgeOutput { calls, ..Default::default() })
    }
}

pub const JUDGE_SYSTEM: &str = "You review how a coding agent collaborates with an expert adviser while fixing an \
issue. Answer with one JSON object {\"score\": S, \"reason\": \"...\"} where S is a number from 0 to 1.";

/// The expert model as the judge: two questions per call, answered with a score in [0, 1].
/// A reply without a readable score falls back to the heuristic score (noted in the output).
pub struct ExpertJudge {
    pub endpoint: Endpoint,
    pub context_messages: usize,
    pub fallback: HeuristicJudge,
}

/// The judge's score in [0, 1]: the `score` of the reply's JSON object, else the first number
/// after the word "score" (or in the text), clamped.
pub fn parse_score(text: &str) -> Option<f64> {
    if let (Some(a), Some(b)) = (text.find('{'), text.rfind('}')) {
        if let Ok(v) = serde_json::from_str::<Value>(&text[a..=b]) {
            if let Some(x) = v.get("score").and_then(Value::as_f64) {
                return Some(x.clamp(0.0, 1.0));
            }
        }
    }
    let from = text.find("score").map_or(text, |i| &text[i + 5..]);
    // The first digit, with a decimal point just before it (".5").
    let digit = from.find(|c: char| c.is_ascii_digit())?;
    let start = if digit > 0 && from.as_bytes()[digit - 1] == b'.' { digit - 1 } else { digit };
    let num: String = from[start..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let num = if num.starts_with('.') { format!("0{num}") } else { num };
    num.trim_end_matches('.').parse::<f64>().ok().map(|x| x.clamp(0.0, 1.0))
}

fn render_steps(steps: &[Step], max_chars: usize) -> String {
    let mut s = String::new();
    for st in steps {
        let obs: String = st.observation.chars().take(max_chars).collect();
        s += &format!("- {} {}\n  -> {}\n", st.tool, st.args, obs.replace('\n', "\n     "));
    }
    s
}

impl Judge for ExpertJudge {
    fn name(&self) -> String {
        format!("expert:{}", self.endpoint.model)
    }

    fn judge(&mut self, task: &TaskInstance, messages: &[Message]) -> Result<JudgeOutput> {
        let st = steps(messages);
        let mut out = JudgeOutput::default();
        for i in (0..st.len()).filter(|&i| st[i].tool == EXPERT_TOOL) {
            let query = st[i].args.get("query").and_then(Value::as_str).unwrap_or("");
            let m = st[i].message;
            let recent = &messages[m.saturating_sub(self.context_messages)..m];
            let recent_text: String = recent
                .iter()
                .map(|m| format!("[{}] {}\n", m.role.as_str(), m.text().chars().take(1500).collect::<String>()))
                .collect();
            let warrant_q = format!(
                "The issue:\n{}\n\nThe agent's last messages:\n{recent_text}\nThe agent now asks the expert:\n{query}\n\n\
                 Was asking warranted? 1 = the agent was stalled or genuinely uncertain and the question is specific; \
                 0 = it could clearly have proceeded on its own, or asked by reflex.",
                task.problem_statement.trim()
            );
            let next = st[i + 1..].iter().position(|s| s.tool == EXPERT_TOOL).map_or(st.len(), |p| i + 1 + p);
            let follow_q = format!(
                "The expert advised:\n{}\n\nThe agent's actions after that advice:\n{}\n\
                 How well did the agent follow the advice? 1 = it acted on it fully; 0 = it ignored it.",
                st[i].observation,
                render_steps(&st[i + 1..next], 600)
            );
            let mut score = |q: &str| -> Result<Option<f64>> {
                let (text, tin, tout) = complete_text(&self.endpoint, JUDGE_SYSTEM, q, 200)?;
                out.tokens_in += tin;
                out.tokens_out += tout;
                out.cost_usd += self.endpoint.pricing.cost(tin, tout);
                Ok(parse_score(&text))
            };
            let (w, f) = (score(&warrant_q)?, score(&follow_q)?);
            let note = (w.is_none() || f.is_none()).then(|| "unreadable judge reply: heuristic score used".to_string());
            out.calls.push(CallScore {
                step: i,
                warrant: w.unwrap_or_else(|| self.fallback.warrant(&st, i)),
                follow: f.unwrap_or_else(|| self.fallback.follow(&st, i)),
                note,
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Patch similarity.

/// Tokens of the changed lines of a unified diff, with the file each belongs to.
fn changed_tokens(patch: &str) -> Vec<String> {
    let mut out = vec![];
    for l in patch.lines() {
        if l.starts_with("+++") || l.starts_with("---") {
            out.push(
                l.trim_start_matches(['+', '-', ' ']).trim_start_matches("a/").trim_start_matches("b/").to_string(),
            );
            continue;
        }
        let Some(body) = l.strip_prefix('+').map(|b| ("+", b)).or_else(|| l.strip_prefix('-').map(|b| ("-", b))) else {
            continue;
        };
        for w in body.1.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()) {
            out.push(format!("{}{w}", body.0));
        }
        for c in body.1.chars().filter(|c| !c.is_alphanumeric() && *c != '_' && !c.is_whitespace()) {
            out.push(format!("{}{c}", body.0));
        }
    }
    out
}

/// Similarity of two patches in [0, 1]: `2·LCS / (|a| + |b|)` over the tokens of their changed
/// lines (difflib's ratio, on tokens). Each side is cut to 4000 tokens.
pub fn patch_similarity(a: &str, b: &str) -> f64 {
    let (mut x, mut y) = (changed_tokens(a), changed_tokens(b));
    x.truncate(4000);
    y.truncate(4000);
    if x.is_empty() || y.is_empty() {
        return if x.is_empty() && y.is_empty() { 1.0 } else { 0.0 };
    }
    let mut prev = vec![0u32; y.len() + 1];
    let mut cur = vec![0u32; y.len() + 1];
    for xi in &x {
        for (j, yj) in y.iter().enumerate() {
            cur[j + 1] = if xi == yj { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    2.0 * prev[y.len()] as f64 / (x.len() + y.len()) as f64
}

// ---------------------------------------------------------------------------------------------
// The reward.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::loops::Action;
    use crate::chat::ToolCall;
    use serde_json::json;

    const GOLD: &str = "--- a/calc/ops.py\n+++ b/calc/ops.py\n@@ -10,3 +10,3 @@ def clamp(x, lo, hi):\n-    if x >= hi:\n+    if x > hi:\n";
    const OTHER: &str = "--- a/calc/io.py\n+++ b/calc/io.py\n@@ -1,1 +1,1 @@\n-print('a')\n+sys.stdout.write(\"b\")\n";

    fn bash(c: &str) -> Action {
        Action::Bash { command: c.into() }
    }

    fn call(step: usize, warrant: f64, follow: f64) -> CallScore {
        CallScore { step, warrant, follow, note: None }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// An episode with these actions and patch against GOLD, with no format errors.
    fn outcome<'a>(actions: &'a [Action], patch: &'a str, resolved: bool) -> Outcome<'a> {
        Outcome {
            actions,
            patch,
            gold_patch: GOLD,
            resolved,
            format_errors: 0,
            format_exit: false,
            noncanonical_calls: 0,
            tampered: 0,
        }
    }

    fn stage2() -> RewardConfig {
        RewardConfig {
            w_follow: 2.0,
            w_sim: 0.5,
            w_expert: 0.3,
            quota: QuotaConfig { no_call_penalty: -10.0, ..Default::default() },
            gate_follow: FollowGate { enabled: true, half_below: 0.5, zero_below: 0.25 },
            ..Default::default()
        }
    }

    #[test]
    fn resolved_clean_episode_earns_one() {
        let acts = [bash("ls"), bash("cat a.py"), Action::Submit];
        let r = reward(&RewardConfig::default(), &outcome(&acts, GOLD, true), &[]);
        assert_eq!(
            (r.total, r.r_loop, r.r_follow, r.r_other, r.r_correct, r.r_sim, r.g_loop, r.g_follow),
            (1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0)
        );
        assert!(close(r.similarity, 1.0));
    }

    #[test]
    fn a_correct_patch_cannot_hide_looping() {
        // 20 x ls: R_loop = -0.5 * (20 - 15 + 1) = -3; the run reaches zero_at 16, so g_loop = 0.
        let acts = [vec![bash("ls"); 20], vec![Action::Submit]].concat();
        let o = outcome(&acts, GOLD, true);
        let r = reward(&RewardConfig::default(), &o, &[]);
        assert_eq!((r.r_loop, r.g_loop, r.total, r.longest_run, r.looping), (-3.0, 0.0, -3.0, 20, true));
        // A run of 12 is free of penalty (below k1) but halves R_other (half_at 11).
        let acts = [vec![bash("ls"); 12], vec![Action::Submit]].concat();
        let r = reward(&RewardConfig::default(), &Outcome { actions: &acts, ..o }, &[]);
        assert_eq!((r.r_loop, r.g_loop, r.total), (0.0, 0.5, 0.5));
        // With the gate off the correct patch counts in full.
        let cfg = RewardConfig { gate_loop: LoopGate { enabled: false, ..Default::default() }, ..Default::default() };
        let r = reward(&cfg, &Outcome { actions: &acts, ..o }, &[]);
        assert_eq!(r.total, 1.0);
    }

    #[test]
    fn similarity_term_for_unresolved_patches() {
        let acts = [bash("ls"), Action::Submit];
        let cfg = RewardConfig::default();
        // Far from the gold patch: R_sim = -1, R_other = 0.5 * -1.
        let r = reward(&cfg, &outcome(&acts, OTHER, false), &[]);
        assert_eq!((r.r_correct, r.r_sim, r.r_other, r.total), (0.0, -1.0, -0.5, -0.5));
        assert!(r.similarity < 0.5, "{}", r.similarity);
        // The right change that failed for another reason is similar enough: no R_sim penalty.
        let r = reward(&cfg, &outcome(&acts, GOLD, false), &[]);
        assert_eq!((r.r_sim, r.total), (0.0, 0.0));
        // No patch at all is dissimilar.
        let r = reward(&cfg, &outcome(&acts, "", false), &[]);
        assert_eq!(r.r_sim, -1.0);
    }

    #[test]
    fn expert_terms_follow_the_formula() {
        let cfg = stage2();
        // ls, ask, ask (back to back), edit, ask, submit.
        let acts = [
            bash("ls"),
            Action::AskExpert,
            Action::AskExpert,
            bash("sed -i s/a/b/ x.py"),
            Action::AskExpert,
            Action::Submit,
        ];
        let calls = [call(1, 0.2, 0.2), call(2, 1.0, 0.9), call(4, 1.0, 0.7)];
        let r = reward(&cfg, &outcome(&acts, GOLD, true), &calls);
        // R_warrant: mean(-1, 0, 0) = -1/3; R_b2b = max(-1, -0.5 * 1); no quota term.
        assert!(close(r.r_warrant, -1.0 / 3.0), "{}", r.r_warrant);
        assert_eq!((r.back_to_back, r.r_b2b, r.r_quota, r.expert_calls), (1, -0.5, 0.0, 3));
        assert!(close(r.r_expert, -1.0 / 3.0 - 0.5));
        // R_follow over all but the last call: mean(-2 (0.2 < tau), 0.9) = -0.55.
        assert!(close(r.r_follow, -0.55), "{}", r.r_follow);
        // g_follow: mean follow of the judged calls 0.55 >= 0.5 -> 1.
        assert_eq!(r.g_follow, 1.0);
        let r_other = 1.0 + 0.3 * (-1.0 / 3.0 - 0.5);
        assert!(close(r.r_other, r_other));
        assert!(close(r.total, 0.0 + 2.0 * -0.55 + r_other), "{}", r.total);
        // min aggregation takes the worst call.
        let cfg_min = RewardConfig {
            warrant: WarrantConfig { aggregate: Aggregate::Min, ..Default::default() },
            follow: FollowConfig { aggregate: Aggregate::Min, ..Default::default() },
            ..stage2()
        };
        let r = reward(&cfg_min, &outcome(&acts, GOLD, true), &calls);
        assert_eq!((r.r_warrant, r.r_follow), (-1.0, -2.0));
        // Five back-to-back calls are capped at -1.
        let acts = [vec![Action::AskExpert; 6], vec![Action::Submit]].concat();
        let r = reward(&cfg, &outcome(&acts, GOLD, true), &[]);
        assert_eq!(r.r_b2b, -1.0);
    }

    #[test]
    fn follow_gate_and_the_no_call_penalty() {
        let cfg = stage2();
        let acts = [bash("ls"), Action::AskExpert, bash("ls -la"), Action::AskExpert, Action::Submit];
        let o = outcome(&acts, GOLD, true);
        // Judged calls (all but the last) followed at 0.4: half gate; at 0.1: closed.
        let r = reward(&cfg, &o, &[call(1, 1.0, 0.4), call(3, 1.0, 1.0)]);
        assert_eq!((r.g_follow, r.r_follow), (0.5, -2.0));
        assert!(close(r.total, 2.0 * -2.0 + 0.5 * 1.0), "{}", r.total);
        let r = reward(&cfg, &o, &[call(1, 1.0, 0.1), call(3, 1.0, 1.0)]);
        assert_eq!(r.g_follow, 0.0);
        assert!(close(r.total, -4.0));
        // Stage II expects a call: -10 inside R_expert, weighted by w_expert.
        let acts = [bash("ls"), Action::Submit];
        let r = reward(&cfg, &Outcome { actions: &acts, ..o }, &[]);
        assert_eq!((r.r_quota, r.r_expert), (-10.0, -10.0));
        assert!(close(r.total, 1.0 + 0.3 * -10.0));
        // Calls over a quota cost over_penalty each.
        let cfg_q =
            RewardConfig { quota: QuotaConfig { max_calls: 1, over_penalty: -0.25, ..Default::default() }, ..stage2() };
        let r = reward(&cfg_q, &o, &[call(1, 1.0, 1.0), call(3, 1.0, 1.0)]);
        assert_eq!(r.r_quota, -0.25);
    }

    fn assistant(name: &str, args: serde_json::Value) -> Message {
        let mut m = Message::assistant("");
        m.tool_calls = vec![ToolCall::new(name, args)];
        m
    }

    fn tool(text: &str) -> Message {
        Message::tool(text)
    }

    fn judged(messages: &[Message]) -> Vec<CallScore> {
        let task: TaskInstance = serde_json::from_value(json!({
            "instance_id": "t", "repo": "r", "base_commit": "b", "problem_statement": "p", "patch": GOLD,
            "test_patch": "", "FAIL_TO_PASS": ["a"], "PASS_TO_PASS": [], "env": {"repo_path": "."}
        }))
        .unwrap();
        HeuristicJudge::default().judge(&task, messages).unwrap().calls
    }

    const ADVICE: &str =
        "Look at `calc/ops.py`, in `def clamp(x, lo, hi):`, around line 12. The `>=` there should be `>`.";

    #[test]
    fn heuristic_judge_scores_warrant_and_follow_through() {
        let head = vec![Message::system("s"), Message::user("u")];
        // Explored without trouble, asked, then edited the named file: warrant 0.25, follow 1.
        let m = [
            head.clone(),
            vec![
                assistant("bash", json!({"command": "ls"})),
                tool("calc tests"),
                assistant("ask_expert", json!({"query": "where?"})),
                tool(ADVICE),
                assistant(
                    "str_replace_editor",
                    json!({"command": "str_replace", "path": "/repo/calc/ops.py", "old_str": "a", "new_str": "b"}),
                ),
                tool("edited"),
                assistant("submit", json!({})),
            ],
        ]
        .concat();
        assert_eq!(judged(&m), vec![call(1, 0.25, 1.0)]);
        // Asked first thing (0), then only looked at the named function (0.5).
        let m = [
            head.clone(),
            vec![
                assistant("ask_expert", json!({"query": "help"})),
                tool(ADVICE),
                assistant("bash", json!({"command": "grep -n clamp calc/ops.py"})),
                tool("12: def clamp"),
            ],
        ]
        .concat();
        assert_eq!(judged(&m), vec![call(0, 0.0, 0.5)]);
        // Asked after a failing command (1), then did something unrelated (0); a second call
        // right after the first is unwarranted; submitting right after advice follows nothing.
        let m = [
            head,
            vec![
                assistant("bash", json!({"command": "python -m pytest"})),
                tool("1 failed\n[exit code 1]"),
                assistant("ask_expert", json!({"query": "why?"})),
                tool(ADVICE),
                assistant("bash", json!({"command": "pwd"})),
                tool("/repo"),
                assistant("ask_expert", json!({"query": "again?"})),
                tool(ADVICE),
                assistant("ask_expert", json!({"query": "and again?"})),
                tool(ADVICE),
                assistant("submit", json!({})),
            ],
        ]
        .concat();
        assert_eq!(judged(&m), vec![call(1, 1.0, 0.0), call(3, 0.25, 0.0), call(4, 0.0, 0.0)]);
    }

    #[test]
    fn tampering_costs_even_a_resolved_episode() {
        let acts = [bash("ls"), Action::Submit];
        let clean = reward(&RewardConfig::default(), &outcome(&acts, GOLD, true), &[]);
        let tampered = Outcome { tampered: 2, ..outcome(&acts, GOLD, true) };
        let r = reward(&RewardConfig::default(), &tampered, &[]);
        assert_eq!((r.r_tamper, r.total), (-1.0, clean.total - 1.0));
        let off = RewardConfig { tampering_penalty: 0.0, ..Default::default() };
        assert_eq!(reward(&off, &tampered, &[]).total, clean.total);
        assert!(RewardConfig { tampering_penalty: 0.5, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn malformed_replies_cost_and_ending_on_them_costs_the_most() {
        let acts = [bash("ls")];
        let o = |n, exit| Outcome {
            actions: &acts,
            patch: "",
            gold_patch: GOLD,
            resolved: false,
            format_errors: n,
            format_exit: exit,
            noncanonical_calls: 0,
            tampered: 0,
        };
        let cfg = RewardConfig { w_sim: 0.0, ..Default::default() };
        assert_eq!(reward(&cfg, &o(0, false), &[]).r_format, 0.0);
        assert_eq!((reward(&cfg, &o(2, false), &[]).r_format, reward(&cfg, &o(2, false), &[]).total), (-1.0, -1.0));
        // Ending the episode on malformed replies is as bad as the worst loop.
        assert_eq!(reward(&cfg, &o(3, true), &[]).r_format, -10.0);
        let paper = RewardConfig { format_penalty: 0.0, format_exit: 0.0, ..cfg };
        assert_eq!(reward(&paper, &o(3, true), &[]).total, 0.0);
    }

    #[test]
    fn calls_outside_the_canonical_form_cost_a_little() {
        let acts = [bash("ls"), bash("cat a.py"), Action::Submit];
        let canonical = reward(&RewardConfig::default(), &outcome(&acts, GOLD, true), &[]);
        let bare = Outcome { noncanonical_calls: 2, ..outcome(&acts, GOLD, true) };
        let r = reward(&RewardConfig::default(), &bare, &[]);
        assert!(close(r.r_format, -0.1) && close(r.total, canonical.total - 0.1), "{r:?}");
        // An accepted call still beats a refused one; ending on refusals is not made worse.
        let cfg = RewardConfig::default();
        assert!(cfg.noncanonical_penalty > cfg.format_penalty);
        let ended = Outcome { format_errors: 3, format_exit: true, ..bare };
        assert_eq!(reward(&cfg, &ended, &[]).r_format, cfg.format_exit);
        let off = RewardConfig { noncanonical_penalty: 0.0, ..Default::default() };
        assert_eq!(reward(&off, &bare, &[]).total, canonical.total);
        assert!(RewardConfig { noncanonical_penalty: 0.1, ..Default::default() }.validate().is_err());
        // Configurations written before the term existed still load, with the default.
        let old: RewardConfig = toml::from_str("format_penalty = -0.5\nformat_exit = -10.0").unwrap();
        assert_eq!(old.noncanonical_penalty, -0.05);
    }

    #[test]
    fn helpers() {
        assert_eq!(
            advice_targets(ADVICE),
            (vec!["calc/ops.py".to_string()], vec!["clamp".to_string(), ">=".to_string(), ">".to_string()])
        );
        assert_eq!(parse_score("{\"score\": 0.75, \"reason\": \"ok\"}"), Some(0.75));
        assert_eq!(parse_score("{\"reason\": \"a score of 1 is too high\", \"score\": 0.25}"), Some(0.25));
        assert_eq!(parse_score("score: .5"), Some(0.5));
        assert_eq!(parse_score("I cannot tell."), None);
        assert_eq!(parse_score("Score: 1."), Some(1.0));
        assert_eq!(parse_score("I'd say 3"), Some(1.0));
        assert_eq!(parse_score("no idea"), None);
        assert!(close(patch_similarity(GOLD, GOLD), 1.0));
        assert!(patch_similarity(GOLD, OTHER) < 0.3);
        assert_eq!(patch_similarity("", GOLD), 0.0);
        let mut bad = RewardConfig { b2b_lambda: 0.5, ..Default::default() };
        assert!(bad.validate().is_err());
        bad.b2b_lambda = -0.5;
        bad.gate_loop.half_at = 20;
        assert!(bad.validate().is_err());
        assert!(RewardConfig::default().validate().is_ok() && stage2().validate().is_ok());
    }
}
