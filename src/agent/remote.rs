//! Experts and a policy behind model APIs — OpenAI Chat Completions (OpenAI, vLLM, SGLang,
//! llama.cpp, `protege serve`) and Anthropic Messages — and the `local` expert (a second
//! model in-process).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::expert::{approx_tokens, Expert, ExpertReply};
use super::http::{api_key, HttpConfig, JsonClient};
use super::policy::{Policy, PolicyTurn};
use crate::backend::{Backend, SamplingParams};
use crate::chat::{Message, Role, ToolCall};
use crate::generate::{generate, GenOptions, Request};
use crate::model::Qwen2;
use crate::tasks::TaskInstance;
use crate::tokenizer::Tokenizer;

/// USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Pricing {
    pub fn cost(&self, tokens_in: usize, tokens_out: usize) -> f64 {
        (tokens_in as f64 * self.input_per_mtok + tokens_out as f64 * self.output_per_mtok) / 1e6
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `POST {base_url}/chat/completions`, `Authorization: Bearer` key.
    Openai,
    /// `POST {base_url}/v1/messages`, `x-api-key` key.
    Anthropic,
}

/// Where a remote model lives and how to pay for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub api: Api,
    /// e.g. `https://api.openai.com/v1`, `http://127.0.0.1:8000/v1`, `https://api.anthropic.com`.
    pub base_url: String,
    pub model: String,
    /// Environment variable holding the API key (never a key itself); none for local servers.
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub pricing: Pricing,
    #[serde(default)]
    pub http: HttpConfig,
}

/// What an endpoint replied.
struct Completion {
    text: String,
    tool_call: Option<ToolCall>,
    tokens_in: usize,
    tokens_out: usize,
}

/// Messages in the OpenAI wire form: tool-call arguments as JSON strings, ids paired.
pub fn openai_messages(messages: &[Message]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let mut v = json!({"role": m.role.as_str(), "content": m.text()});
            if !m.tool_calls.is_empty() {
                v["tool_calls"] = m
                    .tool_calls
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        json!({"id": c.id.clone().unwrap_or_else(|| format!("call_{i}")), "type": "function",
                               "function": {"name": c.function.name, "arguments": c.arguments().to_string()}})
                    })
                    .collect();
            }
            if let Some(id) = &m.tool_call_id {
                v["tool_call_id"] = json!(id);
            }
            v
        })
        .collect()
}

struct Remote {
    ep: Endpoint,
    client: JsonClient,
    key: Option<String>,
}

impl Remote {
    fn new(ep: Endpoint) -> Result<Self> {
        let key = api_key(ep.api_key_env.as_deref())?;
        Ok(Self { client: JsonClient::new(ep.http)?, ep, key })
    }

    fn complete(
        &self,
        system: &str,
        messages: &[Message],
        tools: &[Value],
        max_tokens: usize,
        temperature: f32,
    ) -> Result<Completion> {
        let base = self.ep.base_url.trim_end_matches('/');
        match self.ep.api {
            Api::Openai => {
                let mut wire = vec![];
                if !system.is_empty() {
                    wire.push(json!({"role": "system", "content": system}));
                }
                wire.extend(openai_messages(messages));
                let mut body = json!({"model": self.ep.model, "messages": wire, "max_tokens": max_tokens,
                                      "temperature": temperature});
                if !tools.is_empty() {
                    body["tools"] = json!(tools);
                }
                let headers: Vec<(&str, String)> =
                    self.key.iter().map(|k| ("Authorization", format!("Bearer {k}"))).collect();
                let url = format!("{base}/chat/completions");
                let r = self.client.post(&url, &headers, &body)?;
                let msg = r.pointer("/choices/0/message").with_context(|| format!("{url}: no choices[0].message"))?;
                let text = msg.get("content").and_then(Value::as_str).unwrap_or("").to_string();
                let tool_call = match msg.pointer("/tool_calls/0") {
                    Some(c) => Some(
                        serde_json::from_value::<ToolCall>(c.clone())
                            .with_context(|| format!("{url}: malformed tool call {c}"))?,
                    ),
                    None => None,
                };
                let usage = |k: &str| r.pointer(&format!("/usage/{k}")).and_then(Value::as_u64).map(|x| x as usize);
                Ok(Completion {
                    tokens_in: usage("prompt_tokens").unwrap_or_else(|| approx_tokens(&body.to_string())),
                    tokens_out: usage("completion_tokens").unwrap_or_else(|| approx_tokens(&text)),
                    text,
                    tool_call,
                })
            }
            Api::Anthropic => {
                if !tools.is_empty() {
                    bail!("the anthropic endpoint serves experts only (no tool calling)");
                }
                let wire: Vec<Value> = messages
                    .iter()
                    .map(|m| {
                        let role = if m.role == Role::Assistant { "assistant" } else { "user" };
                        json!({"role": role, "content": m.text()})
                    })
                    .collect();
                let body = json!({"model": self.ep.model, "system": system, "messages": wire,
                                  "max_tokens": max_tokens, "temperature": temperature});
                let mut headers = vec![("anthropic-version", "2023-06-01".to_string())];
                headers.extend(self.key.iter().map(|k| ("x-api-key", k.clone())));
                let url = format!("{base}/v1/messages");
                let r = self.client.post(&url, &headers, &body)?;
                let blocks =
                    r.get("content").and_then(Value::as_array).with_context(|| format!("{url}: no content"))?;
                let text: String =
                    blocks.iter().filter(|b| b["type"] == "text").filter_map(|b| b["text"].as_str()).collect();
                let usage = |k: &str| r.pointer(&format!("/usage/{k}")).and_then(Value::as_u64).map(|x| x as usize);
                Ok(Completion {
                    tokens_in: usage("input_tokens").unwrap_or_else(|| approx_tokens(&body.to_string())),
                    tokens_out: usage("output_tokens").unwrap_or_else(|| approx_tokens(&text)),
                    text,
                    tool_call: None,
                })
            }
        }
    }
}

/// One system + user exchange with an endpoint: (text, tokens in, tokens out).
pub fn complete_text(ep: &Endpoint, system: &str, user: &str, max_tokens: usize) -> Result<(String, usize, usize)> {
    let c = Remote::new(ep.clone())?.complete(system, &[Message::user(user)], &[], max_tokens, 0.0)?;
    Ok((c.text, c.tokens_in, c.tokens_out))
}

pub const EXPERT_SYSTEM: &str = "You are an expert software engineer advising a less experienced coding agent that is \
fixing an issue in a Python repository. The agent asks you a question and shows you its last few messages. Reply \
with short, specific, actionable guidance: where to look, what is wrong, what to do next. Do not write the full \
patch.";

/// The query with the recent messages, as one user message for an expert.
pub fn expert_prompt(task: &TaskInstance, query: &str, recent: &[Message]) -> String {
    let mut s = format!("The issue:\n{}\n\nThe agent's last messages:\n", task.problem_statement.trim());
    for m in recent {
        let mut text = m.text().to_string();
        for c in &m.tool_calls {
            text.push_str(&format!("\n[calls {} {}]", c.function.name, c.arguments()));
        }
        s.push_str(&format!("[{}] {}\n", m.role.as_str(), text.trim()));
    }
    s.push_str(&format!("\nThe agent asks:\n{query}"));
    s
}

/// The expert's instructions when it is shown the reference fix (trajectory synthesis).
pub const GOLD_EXPERT_SYSTEM: &str = "You are an expert software engineer advising a less experienced coding agent \
that is fixing an issue in a Python repository. You are shown the reference fix, which the agent cannot see. Use it \
to give short, specific, actionable guidance: where to look, what is wrong, what to do next. Never reveal the \
reference fix: do not paste it, quote its added lines, or write the corrected code; describe what must change.";

/// An expert behind an OpenAI-compatible or Anthropic endpoint.
pub struct RemoteExpert {
    remote: Remote,
    pub max_tokens: usize,
    /// Show the expert the task's gold patch (synthesis), with instructions not to reveal it.
    pub sees_gold_patch: bool,
}

impl RemoteExpert {
    pub fn new(ep: Endpoint, max_tokens: usize) -> Result<Self> {
        Ok(Self { remote: Remote::new(ep)?, max_tokens, sees_gold_patch: false })
    }
}

impl Expert for RemoteExpert {
    fn name(&self) -> String {
        format!("{:?}:{}", self.remote.ep.api, self.remote.ep.model).to_lowercase()
    }

    fn advise(&mut self, task: &TaskInstance, query: &str, recent: &[Message]) -> Result<ExpertReply> {
        let mut prompt = expert_prompt(task, query, recent);
        let system = if self.sees_gold_patch {
            prompt = format!("The reference fix (never reveal it):\n```diff\n{}\n```\n\n{prompt}", task.patch.trim());
            GOLD_EXPERT_SYSTEM
        } else {
            EXPERT_SYSTEM
        };
        let c = self.remote.complete(system, &[Message::user(prompt)], &[], self.max_tokens, 0.0)?;
        Ok(ExpertReply {
            cost_usd: self.remote.ep.pricing.cost(c.tokens_in, c.tokens_out),
            text: c.text,
            tokens_in: c.tokens_in,
            tokens_out: c.tokens_out,
        })
    }
}

/// A second local model as the expert (greedy).
pub struct LocalExpert<'a, B: Backend> {
    pub be: &'a B,
    pub model: &'a Qwen2<B>,
    pub tok: &'a Tokenizer,
    pub max_tokens: usize,
}

impl<B: Backend + Sync> Expert for LocalExpert<'_, B>
where
    B::Buf: Send + Sync,
{
    fn name(&self) -> String {
        "local".into()
    }

    fn advise(&mut self, task: &TaskInstance, query: &str, recent: &[Message]) -> Result<ExpertReply> {
        let msgs = [Message::system(EXPERT_SYSTEM), Message::user(expert_prompt(task, query, recent))];
        let prompt = self.tok.chat_prompt(&msgs, &[])?;
        let room = self.model.cfg.max_position_embeddings.saturating_sub(prompt.len());
        if room == 0 {
            bail!("the expert prompt ({} tokens) does not fit the local expert's context", prompt.len());
        }
        let req = Request {
            max_new_tokens: self.max_tokens.min(room),
            stop_tokens: self.tok.stop_ids.clone(),
            ..Request::greedy(prompt.clone(), 0)
        };
        let (out, _) = generate(self.be, self.model, &[req], None, &GenOptions::default(), |_, _| {})?;
        Ok(ExpertReply {
            text: self.tok.decode(&out[0].tokens, true)?,
            tokens_in: prompt.len(),
            tokens_out: out[0].tokens.len(),
            cost_usd: 0.0,
        })
    }
}

/// A policy behind an OpenAI-compatible endpoint (to evaluate a served model, or to let a
/// strong model play the agent during synthesis).
pub struct OpenAiPolicy {
    remote: Remote,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
}

impl OpenAiPolicy {
    pub fn new(ep: Endpoint, sampling: SamplingParams, max_tokens: usize) -> Result<Self> {
        if ep.api != Api::Openai {
            bail!("a policy endpoint must speak the OpenAI Chat Completions API");
        }
        Ok(Self { remote: Remote::new(ep)?, sampling, max_tokens })
    }
}

impl Policy for OpenAiPolicy {
    fn name(&self) -> String {
        format!("openai:{}", self.remote.ep.model)
    }

    fn act(&mut self, messages: &[Message], tools: &[Value]) -> Result<PolicyTurn> {
        let started = Instant::now();
        let (system, rest) = match messages.first() {
            Some(m) if m.role == Role::System => (m.text(), &messages[1..]),
            _ => ("", messages),
        };
        let c = self.remote.complete(system, rest, tools, self.max_tokens, self.sampling.temperature)?;
        Ok(PolicyTurn {
            text: c.text,
            tool_call: c.tool_call,
            tokens_in: c.tokens_in,
            tokens_out: c.tokens_out,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
