//! The judges of expert calls: for each `ask_expert` call of an episode, was asking warranted
//! (u_i) and was the advice followed (f_i)? [`HeuristicJudge`] answers from the episode's
//! actions alone; [`ExpertJudge`] asks the expert model, falling back to the heuristic.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::policy::EXPERT_TOOL;
use crate::agent::remote::{complete_text, Endpoint};
use crate::chat::{Message, Role};
use crate::tasks::TaskInstance;

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
