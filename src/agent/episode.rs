//! One episode: the agent works a task in its sandbox until it submits or a limit ends it.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::expert::{cap_reply, Expert};
use super::loops::Action;
use super::policy::{ContextFull, Policy, EXPERT_TOOL};
use super::toolcall::CallForm;
use super::tools::{compact_tool_specs, parse_tool_call, tool_specs, Editor, Request};
use super::trajectory::{TokenRecord, Trajectory};
use crate::chat::Message;
use crate::sandbox::output::cap_text;
use crate::sandbox::Workspace;
use crate::tasks::TaskInstance;

/// How an episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Submitted,
    StepLimit,
    ContextLimit,
    FormatErrors,
    ExpertQuota,
    Timeout,
    /// The work tree's changes were over `max_patch_bytes`: nothing to grade.
    PatchTooLarge,
    /// The run was asked to stop (a signal) before the episode ended: not a result.
    Interrupted,
    Error,
}

impl ExitStatus {
    pub const ALL: [ExitStatus; 9] = [
        ExitStatus::Submitted,
        ExitStatus::StepLimit,
        ExitStatus::ContextLimit,
        ExitStatus::FormatErrors,
        ExitStatus::ExpertQuota,
        ExitStatus::Timeout,
        ExitStatus::PatchTooLarge,
        ExitStatus::Interrupted,
        ExitStatus::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExitStatus::Submitted => "submitted",
            ExitStatus::StepLimit => "step_limit",
            ExitStatus::ContextLimit => "context_limit",
            ExitStatus::FormatErrors => "format_errors",
            ExitStatus::ExpertQuota => "expert_quota",
            ExitStatus::Timeout => "timeout",
            ExitStatus::PatchTooLarge => "patch_too_large",
            ExitStatus::Interrupted => "interrupted",
            ExitStatus::Error => "error",
        }
    }
}

/// Limits and expert settings of an episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EpisodeConfig {
    /// Tool calls before the episode ends (`step_limit`).
    pub max_steps: usize,
    /// Expert calls allowed; one more ends the episode (`expert_quota`).
    pub expert_quota: usize,
    /// Context tokens (exact for the local policy, ~4 characters per token otherwise).
    pub context_tokens: usize,
    /// Consecutive replies without a valid tool call before the episode ends.
    pub max_format_errors: usize,
    /// Messages of the episode the expert sees with the query.
    pub expert_context_messages: usize,
    /// Characters of an expert reply kept.
    pub expert_reply_chars: usize,
    /// Wall-clock seconds for the whole episode (`timeout`).
    pub episode_timeout_s: f64,
    /// Characters of one tool observation kept (head and tail, with a marker).
    pub observation_chars: usize,
    /// One-line tool descriptions and a short system prompt, for small models with short
    /// contexts.
    pub compact_prompt: bool,
    /// Largest patch (the work tree's diff) an episode may yield; beyond it the episode ends
    /// `patch_too_large` with nothing to grade.
    pub max_patch_bytes: u64,
    /// Largest trajectory record written for an episode (see [`super::trajectory::Trajectory::bounded`]).
    pub max_record_bytes: usize,
}

impl Default for EpisodeConfig {
    fn default() -> Self {
        Self {
            max_steps: 75,
            expert_quota: 6,
            context_tokens: 32768,
            max_format_errors: 3,
            expert_context_messages: 5,
            expert_reply_chars: 4000,
            episode_timeout_s: 1800.0,
            observation_chars: 16000,
            compact_prompt: false,
            max_patch_bytes: 1 << 20,
            max_record_bytes: 16 << 20,
        }
    }
}

/// One `ask_expert` call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertCall {
    /// Index (from 0) of the action that asked.
    pub step: usize,
    pub query: String,
    pub reply: String,
    pub tokens_in: usize,
    pub tokens_out: usize,
    pub cost_usd: f64,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where an episode's time went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub model_s: f64,
    pub command_s: f64,
    pub expert_s: f64,
    pub total_s: f64,
    /// What the harness itself took: total minus model, command and expert time.
    pub harness_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    pub task_id: String,
    pub exit_status: ExitStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub messages: Vec<Message>,
    pub tools: Vec<Value>,
    pub actions: Vec<Action>,
    pub expert_calls: Vec<ExpertCall>,
    /// The work tree's diff at the end (graded whatever the exit status).
    pub patch: String,
    pub policy_tokens: usize,
    /// Replies of the policy (steps plus replies without a valid tool call).
    pub turns: usize,
    pub format_errors: usize,
    /// Per reply, the form its tool call was written in (`None`: no valid call, or a structured
    /// call from an API policy): small models often leave the canonical `<tool_call>` form.
    #[serde(default)]
    pub reply_forms: Vec<Option<CallForm>>,
    pub timing: Timing,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenRecord>,
}

pub fn system_prompt(workdir: &str) -> String {
    format!(
        "You are an autonomous software engineer. You fix bugs in the Python repository at {workdir} by \
         running commands and editing files through your tools, one tool call per reply. Think briefly, then \
         call exactly one tool. When you are stuck or unsure how to proceed, ask the expert (ask_expert) a \
         specific question and follow its advice; do not ask by reflex. When the fix is done, call submit."
    )
}

/// The system prompt of [`EpisodeConfig::compact_prompt`].
pub fn compact_system_prompt(workdir: &str) -> String {
    format!(
        "Fix the bug in the repository at {workdir}. Call one tool per reply; ask_expert when stuck; submit when done."
    )
}

pub fn task_prompt(task: &TaskInstance, workdir: &str) -> String {
    format!(
        "The repository at {workdir} has this issue:\n\n<issue>\n{}\n</issue>\n\nChange the non-test source \
         files so that the issue is resolved. Find the relevant code, reproduce the problem, fix it, check the \
         fix, then submit.",
        task.problem_statement.trim()
    )
}

fn approx_context(messages: &[Message], tools: &[Value]) -> usize {
    let chars: usize = messages.iter().map(|m| m.text().len() + m.tool_calls.len() * 64).sum::<usize>()
        + tools.iter().map(|t| t.to_string().len()).sum::<usize>();
    chars / 4
}

/// Runs one episode of `task` in `exec`.
pub fn run_episode<'p, 'e>(
    task: &TaskInstance,
    exec: &dyn Workspace,
    policy: &mut (dyn Policy + 'p),
    mut expert: Option<&mut (dyn Expert + 'e)>,
    cfg: &EpisodeConfig,
) -> Episode {
    let started = Instant::now();
    let workdir = exec.workdir();
    let mut tools = if cfg.compact_prompt { compact_tool_specs() } else { tool_specs(&workdir) };
    if expert.is_none() {
        tools.retain(|t| t["function"]["name"] != EXPERT_TOOL);
    }
    let mut ep = Episode {
        task_id: task.instance_id.clone(),
        exit_status: ExitStatus::StepLimit,
        error: None,
        messages: vec![
            Message::system(if cfg.compact_prompt { compact_system_prompt(&workdir) } else { system_prompt(&workdir) }),
            Message::user(task_prompt(task, &workdir)),
        ],
        tools,
        actions: vec![],
        expert_calls: vec![],
        patch: String::new(),
        policy_tokens: 0,
        turns: 0,
        format_errors: 0,
        reply_forms: vec![],
        timing: Timing::default(),
        tokens: None,
    };
    let mut editor = Editor::default();
    let mut consecutive_errors = 0;
    let status = loop {
        if ep.actions.len() >= cfg.max_steps {
            break ExitStatus::StepLimit;
        }
        if started.elapsed().as_secs_f64() > cfg.episode_timeout_s {
            break ExitStatus::Timeout;
        }
        if crate::interrupt::requested() {
            break ExitStatus::Interrupted;
        }
        let used = policy.context_tokens().unwrap_or_else(|| approx_context(&ep.messages, &ep.tools));
        let budget = policy.max_context().map_or(cfg.context_tokens, |m| m.min(cfg.context_tokens));
        if used >= budget {
            break ExitStatus::ContextLimit;
        }
        let turn = match policy.act(&ep.messages, &ep.tools) {
            Ok(t) => t,
            Err(e) if e.downcast_ref::<ContextFull>().is_some() => break ExitStatus::ContextLimit,
            Err(e) => {
                ep.error = Some(format!("policy: {e:#}"));
                break ExitStatus::Error;
            }
        };
        ep.timing.model_s += turn.seconds;
        ep.turns += 1;
        ep.policy_tokens += turn.tokens_out;
        let parsed = match turn.tool_call.clone() {
            Some(call) => Ok((turn.text.clone(), call, None)),
            None => parse_tool_call(&turn.text, &ep.tools).map(|(t, c, form)| (t, c, Some(form))),
        };
        let checked = parsed.and_then(|(t, c, form)| Request::from_call(&c).map(|r| (t, c, r, form)));
        ep.reply_forms.push(checked.as_ref().ok().and_then(|x| x.3));
        let (thought, call, request) = match checked {
            Ok((t, c, r, _)) => (t, c, r),
            Err(message) => {
                ep.format_errors += 1;
                consecutive_errors += 1;
                ep.messages.push(Message::assistant(turn.text));
                ep.messages.push(Message::user(message));
                if consecutive_errors >= cfg.max_format_errors {
                    break ExitStatus::FormatErrors;
                }
                continue;
            }
        };
        consecutive_errors = 0;
        let mut call = call;
        // OpenAI-style servers pair each tool result with its call.
        let call_id = call.id.get_or_insert_with(|| format!("call_{}", ep.actions.len())).clone();
        let mut reply = Message::assistant(thought);
        reply.tool_calls = vec![call];
        ep.messages.push(reply);
        ep.actions.push(request.action());
        let observation = match &request {
            Request::Submit => break ExitStatus::Submitted,
            Request::Bash(command) => match exec.run(command) {
                Ok(out) if out.interrupted => break ExitStatus::Interrupted,
                Ok(out) => {
                    ep.timing.command_s += out.seconds;
                    // One cut, one marker with the true count of bytes cut.
                    let mut text = out.shown(cfg.observation_chars);
                    if text.trim().is_empty() {
                        text = "(no output)".into();
                    }
                    match out.exit_code {
                        Some(0) => {}
                        Some(c) => text.push_str(&format!("\n[exit code {c}]")),
                        None if !out.timed_out => text.push_str("\n[killed by a signal]"),
                        None => {}
                    }
                    Message::tool(text)
                }
                Err(e) if e.downcast_ref::<crate::sandbox::PatchTooLarge>().is_some() => {
                    ep.error = Some(format!("{e:#}"));
                    break ExitStatus::PatchTooLarge;
                }
                Err(e) => {
                    ep.error = Some(format!("executor: {e:#}"));
                    break ExitStatus::Error;
                }
            },
            Request::Editor(args) => match editor.run(exec, args) {
                Ok(Ok(text)) | Ok(Err(text)) => Message::tool(cap_text(&text, cfg.observation_chars)),
                Err(e) => {
                    ep.error = Some(format!("editor: {e:#}"));
                    break ExitStatus::Error;
                }
            },
            Request::AskExpert(query) => {
                let Some(ex) = expert.as_deref_mut() else {
                    let mut m = Message::tool("No expert is available in this episode.");
                    m.tool_call_id = Some(call_id);
                    ep.messages.push(m);
                    continue;
                };
                if ep.expert_calls.len() >= cfg.expert_quota {
                    break ExitStatus::ExpertQuota;
                }
                let recent_from = ep.messages.len().saturating_sub(cfg.expert_context_messages + 1);
                let recent = &ep.messages[recent_from..ep.messages.len() - 1];
                let t0 = Instant::now();
                let result = ex.advise(task, query, recent);
                let seconds = t0.elapsed().as_secs_f64();
                ep.timing.expert_s += seconds;
                let step = ep.actions.len() - 1;
                let (text, call) = match result {
                    Ok(r) => {
                        let text = cap_reply(&r.text, cfg.expert_reply_chars);
                        let call = ExpertCall {
                            step,
                            query: query.clone(),
                            reply: text.clone(),
                            tokens_in: r.tokens_in,
                            tokens_out: r.tokens_out,
                            cost_usd: r.cost_usd,
                            seconds,
                            error: None,
                        };
                        (text, call)
                    }
                    Err(e) => {
                        let call = ExpertCall {
                            step,
                            query: query.clone(),
                            reply: String::new(),
                            tokens_in: 0,
                            tokens_out: 0,
                            cost_usd: 0.0,
                            seconds,
                            error: Some(format!("{e:#}")),
                        };
                        (format!("The expert is unavailable ({e:#}). Continue on your own."), call)
                    }
                };
                ep.expert_calls.push(call);
                let mut m = Message::tool(text);
                m.name = Some(EXPERT_TOOL.into());
                m
            }
        };
        let mut observation = observation;
        observation.tool_call_id = Some(call_id);
        ep.messages.push(observation);
    };
    ep.exit_status = status;
    let diff = match status {
        ExitStatus::PatchTooLarge => Ok(String::new()),
        _ => exec.diff(cfg.max_patch_bytes),
    };
    match diff {
        Ok(p) => ep.patch = p,
        Err(e) if e.downcast_ref::<crate::sandbox::PatchTooLarge>().is_some() => {
            ep.exit_status = ExitStatus::PatchTooLarge;
            ep.error = Some(format!("{e:#}"));
        }
        Err(e) => {
            ep.error.get_or_insert(format!("diff: {e:#}"));
        }
    }
    ep.tokens = policy.token_record();
    let t = &mut ep.timing;
    t.total_s = started.elapsed().as_secs_f64();
    t.harness_s = (t.total_s - t.model_s - t.command_s - t.expert_s).max(0.0);
    ep
}

impl Episode {
    /// How many calls were written in each form.
    pub fn call_form_counts(&self) -> BTreeMap<CallForm, usize> {
        let mut counts = BTreeMap::new();
        for form in self.reply_forms.iter().flatten() {
            *counts.entry(*form).or_default() += 1;
        }
        counts
    }

    /// Calls accepted in a form other than the canonical `<tool_call>` block.
    pub fn noncanonical_calls(&self) -> usize {
        self.reply_forms.iter().flatten().filter(|f| !f.is_canonical()).count()
    }

    /// The shared trajectory record; `extra` goes into `meta` (grading, rewards).
    pub fn to_trajectory(&self, resolved: Option<bool>, extra: serde_json::Map<String, Value>) -> Trajectory {
        let mut meta = serde_json::Map::new();
        meta.insert("exit_status".into(), json!(self.exit_status));
        if let Some(e) = &self.error {
            meta.insert("error".into(), json!(e));
        }
        meta.insert("steps".into(), json!(self.actions.len()));
        meta.insert("actions".into(), json!(self.actions));
        meta.insert("expert".into(), json!(self.expert_calls));
        meta.insert("patch".into(), json!(self.patch));
        meta.insert("policy_tokens".into(), json!(self.policy_tokens));
        meta.insert("turns".into(), json!(self.turns));
        meta.insert("format_errors".into(), json!(self.format_errors));
        meta.insert("call_forms".into(), json!(self.call_form_counts()));
        meta.insert("reply_forms".into(), json!(self.reply_forms));
        meta.insert("timing".into(), json!(self.timing));
        meta.extend(extra);
        Trajectory {
            task_id: self.task_id.clone(),
            resolved,
            expert_calls: self.expert_calls.len(),
            messages: self.messages.clone(),
            tools: self.tools.clone(),
            tokens: self.tokens.clone(),
            meta,
        }
    }
}
