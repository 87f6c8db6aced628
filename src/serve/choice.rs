//! One generation request as both APIs ask for it ([`Gen`]), and one choice's text as it
//! streams ([`ChoiceText`]): what can be sent now, what must wait (a stop string that may be
//! forming, a tool call that may be starting), and the final reply with its tool calls.

use serde_json::Value;

use super::http::{Api, ApiError};
use super::App;
use crate::agent::toolcall::{coerce_arguments, hold_from, parse_reply, ParsedCall};
use crate::backend::SamplingParams;
use crate::chat::Message;
use crate::generate::{Completion, Finish, Penalties, Request, TextStream, TokenLogprob};
use crate::tokenizer::Tokenizer;

/// What a chat request asks the engine for.
pub struct Gen {
    pub prompt: Vec<u32>,
    /// The reply's forced beginning (a tool call, for `tool_choice`), already in the prompt.
    pub prefix: String,
    pub n: usize,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub penalties: Penalties,
    pub adapter: Option<usize>,
    /// Whether replies are read for tool calls.
    pub tools: bool,
    /// The tools offered (OpenAI-shaped), to type `<parameter=…>` arguments.
    pub tool_specs: Vec<Value>,
    /// At most one tool call per reply (`parallel_tool_calls: false`, Anthropic's
    /// `disable_parallel_tool_use`).
    pub single_call: bool,
}

impl Gen {
    /// One engine request per choice (choice i samples with seed + i).
    pub fn requests(&self, tok: &Tokenizer) -> Vec<Request> {
        (0..self.n)
            .map(|i| Request {
                prompt: self.prompt.clone(),
                max_new_tokens: self.max_tokens,
                sampling: self.sampling.clone(),
                seed: self.seed.wrapping_add(i as u64),
                stop_tokens: tok.stop_ids.clone(),
                stop_strings: self.stop.clone(),
                logprobs: self.logprobs,
                penalties: self.penalties.clone(),
                adapter: self.adapter,
            })
            .collect()
    }
}

/// The prompt of `messages` (with `tools` and the reply's forced `prefix`), and how many tokens
/// the reply may have: `max_tokens` when given (an error when it does not fit the context or the
/// KV cache), else the server's default within what the context leaves.
pub fn encode(
    app: &App,
    api: Api,
    messages: &[Message],
    tools: &[Value],
    prefix: &str,
    max_tokens: Option<usize>,
) -> Result<(Vec<u32>, usize), ApiError> {
    let mut prompt =
        app.tok.chat_prompt(messages, tools).map_err(|e| ApiError::bad(api, "messages", format!("{e:#}")))?;
    if !prefix.is_empty() {
        prompt.extend(app.tok.encode(prefix).map_err(|e| ApiError::server(api, &e))?);
    }
    let room = app.context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::bad(
            api,
            "messages",
            format!("the prompt has {} tokens; the model's context is {} tokens", prompt.len(), app.context),
        ));
    }
    if let Some(m) = max_tokens.filter(|&m| m > 0 && prompt.len() + m > app.kv_capacity) {
        return Err(ApiError::bad(
            api,
            "max_tokens",
            format!(
                "the prompt ({} tokens) plus max_tokens ({m}) exceeds the server's KV cache of {} tokens \
                 (--kv-cache-tokens)",
                prompt.len(),
                app.kv_capacity
            ),
        ));
    }
    match max_tokens {
        Some(0) => Err(ApiError::bad(api, "max_tokens", "max_tokens must be at least 1")),
        Some(m) if m > room => Err(ApiError::bad(
            api,
            "max_tokens",
            format!(
                "the prompt ({} tokens) plus max_tokens ({m}) exceeds the model's context of {} tokens",
                prompt.len(),
                app.context
            ),
        )),
        Some(m) => Ok((prompt, m)),
        None => {
            let m = room.min(app.default_max_tokens).min(app.kv_capacity.saturating_sub(prompt.len()));
            if m == 0 {
                return Err(ApiError::bad(
                    api,
                    "messages",
                    "the prompt fills the server's KV cache (--kv-cache-tokens)",
                ));
            }
            Ok((prompt, m))
        }
    }
}

/// A number field within `range` (inclusive), or `default` when absent or null.
pub fn number(api: Api, body: &Value, key: &str, default: f64, range: (f64, f64)) -> Result<f64, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if x >= range.0 && x <= range.1 => Ok(x),
            _ => Err(ApiError::bad(api, key, format!("{key} must be a number in [{}, {}], got {v}", range.0, range.1))),
        },
    }
}

/// A non-negative integer field, or `None` when absent or null.
pub fn count(api: Api, body: &Value, key: &str) -> Result<Option<usize>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| ApiError::bad(api, key, format!("{key} must be a non-negative integer, got {v}"))),
    }
}

/// Stop strings: a string or a list of up to 16 non-empty strings.
pub fn stop_strings(api: Api, body: &Value, key: &str) -> Result<Vec<String>, ApiError> {
    let stops: Vec<String> = match body.get(key) {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| ApiError::bad(api, key, format!("{key} must be a string or a list of strings")))?,
    };
    if stops.len() > 16 || stops.iter().any(|s| s.is_empty() || s.len() > 1000) {
        return Err(ApiError::bad(api, key, format!("{key}: at most 16 non-empty strings of at most 1000 bytes")));
    }
    Ok(stops)
}

/// Sampling fields shared by both APIs: `temperature` (default 1), `top_p`, `top_k`, `seed`.
pub fn sampling(api: Api, body: &Value) -> Result<(SamplingParams, u64), ApiError> {
    let temperature = number(api, body, "temperature", 1.0, (0.0, 2.0))? as f32;
    let top_p = number(api, body, "top_p", 1.0, (0.0, 1.0))? as f32;
    if top_p == 0.0 {
        return Err(ApiError::bad(api, "top_p", "top_p must be above 0"));
    }
    let top_k = match body.get("top_k") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_i64() {
            Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            _ => return Err(ApiError::bad(api, "top_k", format!("top_k must be a positive integer, got {v}"))),
        },
    };
    let seed = match body.get("seed") {
        None | Some(Value::Null) => super::fresh_seed(),
        Some(v) => v
            .as_i64()
            .map(|s| s as u64)
            .ok_or_else(|| ApiError::bad(api, "seed", format!("seed must be an integer, got {v}")))?,
    };
    Ok((SamplingParams { temperature, top_k, top_p }, seed))
}

/// The end of a choice.
pub struct Reply {
    /// Content not sent yet (streaming), at the end of `content`.
    pub rest: String,
    /// The reply's text without its tool calls.
    pub content: String,
    pub calls: Vec<ParsedCall>,
    pub finish: Finish,
    pub tokens: usize,
}

/// One choice's text as its tokens arrive.
pub struct ChoiceText {
    stream: TextStream,
    /// The reply so far: the forced prefix, then the generated text.
    text: String,
    prefix_len: usize,
    stop: Vec<String>,
    tools: bool,
    tool_specs: Vec<Value>,
    single_call: bool,
    stop_ids: Vec<u32>,
    /// Bytes of `text` already sent.
    sent: usize,
    /// Log-probabilities not yet sent with a chunk.
    pub logprobs: Vec<TokenLogprob>,
}

/// Where the earliest of `stops` starts in `text` at or after `from`.
fn earliest_stop(text: &str, from: usize, stops: &[String]) -> Option<usize> {
    let mut from = from.min(text.len());
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops.iter().filter_map(|s| text[from..].find(s.as_str())).min().map(|at| from + at)
}

impl ChoiceText {
    pub fn new(tok: &Tokenizer, g: &Gen) -> Self {
        Self {
            stream: TextStream::new(tok.clone()),
            text: g.prefix.clone(),
            prefix_len: g.prefix.len(),
            stop: g.stop.clone(),
            tools: g.tools,
            tool_specs: g.tool_specs.clone(),
            single_call: g.single_call,
            stop_ids: tok.stop_ids.clone(),
            sent: 0,
            logprobs: vec![],
        }
    }

    /// Takes a sampled token (a whole reply is read at the end: nothing to release).
    pub fn feed(&mut self, token: u32) {
        if !self.stop_ids.contains(&token) {
            if let Ok(delta) = self.stream.push(token) {
                self.text.push_str(&delta);
            }
        }
    }

    /// Takes a sampled token; returns the text that can be sent now. Only text after what was
    /// sent is searched: a stop string or a call never starts in text already released.
    pub fn push(&mut self, token: u32, logprob: Option<TokenLogprob>) -> String {
        self.logprobs.extend(logprob);
        let before = self.text.len();
        self.feed(token);
        if self.text.len() == before {
            return String::new();
        }
        let text = &self.text;
        let mut cut = text.len();
        if let Some(longest) = self.stop.iter().map(String::len).max() {
            cut = match earliest_stop(text, self.sent.max(self.prefix_len), &self.stop) {
                Some(at) => at,
                // A stop string may be forming in the last bytes.
                None => text.len().saturating_sub(longest - 1).max(self.sent),
            };
        }
        if self.tools {
            if let Some(at) = hold_from(&text[self.sent..]) {
                cut = cut.min(self.sent + at);
            }
        }
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut <= self.sent {
            return String::new();
        }
        let delta = text[self.sent..cut].to_string();
        self.sent = cut;
        delta
    }

    /// The choice is complete: its text without a stop string, split into content and tool calls.
    pub fn finish(&mut self, c: &Completion) -> Reply {
        if let Ok(rest) = self.stream.flush() {
            self.text.push_str(&rest);
        }
        let mut text = std::mem::take(&mut self.text);
        if let Finish::StopString(_) = &c.finish {
            // The earliest stop in the generated text (never in the forced prefix).
            if let Some(at) = earliest_stop(&text, self.prefix_len, &self.stop) {
                text.truncate(at);
            }
        }
        let (content, mut calls) = match self.tools.then(|| parse_reply(&text)) {
            Some(Ok(p)) if !p.calls.is_empty() => (p.content, p.calls),
            // No call, or one written wrongly: the text is the reply, as vLLM does.
            _ => (text, vec![]),
        };
        if self.single_call {
            calls.truncate(1);
        }
        for c in &mut calls {
            coerce_arguments(c, &self.tool_specs);
        }
        let rest = content.get(self.sent..).unwrap_or("").to_string();
        self.sent = self.sent.max(content.len());
        Reply { rest, content, calls, finish: c.finish.clone(), tokens: c.tokens.len() }
    }
}

/// The forced beginning of a reply that must call a tool (`name`: that one).
pub fn forced_call_prefix(name: Option<&str>) -> String {
    match name {
        Some(n) => format!("<tool_call>\n{{\"name\": {}, \"arguments\": ", serde_json::to_string(n).expect("a string")),
        None => "<tool_call>\n{\"name\": \"".into(),
    }
}

/// The names of OpenAI-shaped tool specs (`{"type": "function", "function": {"name", ...}}`).
pub fn tool_names(tools: &[Value]) -> Vec<&str> {
    tools.iter().filter_map(|t| t.pointer("/function/name").and_then(Value::as_str)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_stop_after_a_point_wins() {
        let stops = vec!["\n\n".to_string(), ".".to_string()];
        assert_eq!(earliest_stop("a.\n\nb", 0, &stops), Some(1));
        // The forced prefix (here 3 bytes holding a stop) is not searched.
        assert_eq!(earliest_stop(".\n\nabc", 3, &stops), None);
        assert_eq!(earliest_stop("é.", 1, &stops), Some(2));
    }

    #[test]
    fn forced_prefixes_open_a_call() {
        assert_eq!(forced_call_prefix(Some("bash")), "<tool_call>\n{\"name\": \"bash\", \"arguments\": ");
        assert!(forced_call_prefix(None).ends_with("\"name\": \""));
    }
}
