//! OpenAI Chat Completions: `POST /v1/chat/completions`, plain and streamed (server-sent
//! events), with `n`, log-probabilities, tools and `tool_choice`, penalties and logit bias.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::choice::{self, ChoiceText, Gen, Reply};
use super::http::{only_fields, prepare, Api, ApiError};
use super::{new_id, unix_now, App, Event};
use crate::agent::toolcall::ParsedCall;
use crate::chat::{Message, Role};
use crate::generate::{Finish, Penalties, TokenLogprob};
use crate::tokenizer::Tokenizer;

const API: Api = Api::OpenAi;

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "user",
    "metadata",
];

/// A parsed request.
struct Chat {
    gen: Gen,
    model: String,
    stream: bool,
    include_usage: bool,
}

fn text_content(v: Option<&Value>, field: &str) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::unsupported(
                            API,
                            &format!("{field}[{j}]"),
                            &format!(": only text parts are, got {}", kind.unwrap_or("a part without a type")),
                        ))
                    }
                }
            }
            Ok(Some(out))
        }
        Some(other) => {
            Err(ApiError::bad(API, field, format!("{field} must be a string or a list of text parts, got {other}")))
        }
    }
}

fn messages(body: &Value) -> Result<Vec<Message>, ApiError> {
    let raw = body.get("messages").and_then(Value::as_array).ok_or(ApiError::bad(
        API,
        "messages",
        "messages: expected a list",
    ))?;
    if raw.is_empty() {
        return Err(ApiError::bad(API, "messages", "messages must not be empty"));
    }
    let mut out = vec![];
    for (i, m) in raw.iter().enumerate() {
        let at = format!("messages[{i}]");
        only_fields(API, m, &["role", "content", "name", "tool_calls", "tool_call_id", "refusal"], &at)?;
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("tool") => Role::Tool,
            other => {
                return Err(ApiError::bad(
                    API,
                    &format!("{at}.role"),
                    format!("{at}.role must be system, developer, user, assistant or tool, got {other:?}"),
                ))
            }
        };
        let mut msg = Message::new(role, "");
        msg.content = text_content(m.get("content"), &format!("{at}.content"))?;
        if let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) {
            msg.tool_calls = serde_json::from_value(calls.clone())
                .map_err(|e| ApiError::bad(API, &format!("{at}.tool_calls"), format!("{at}.tool_calls: {e}")))?;
        }
        msg.tool_call_id = m.get("tool_call_id").and_then(Value::as_str).map(str::to_string);
        msg.name = m.get("name").and_then(Value::as_str).map(str::to_string);
        msg.validate(i).map_err(|e| ApiError::bad(API, &at, format!("{e:#}")))?;
        out.push(msg);
    }
    Ok(out)
}

fn tools(body: &Value) -> Result<Vec<Value>, ApiError> {
    let list = match body.get("tools") {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(l)) => l,
        Some(_) => return Err(ApiError::bad(API, "tools", "tools must be a list")),
    };
    for (i, t) in list.iter().enumerate() {
        let at = format!("tools[{i}]");
        only_fields(API, t, &["type", "function"], &at)?;
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::unsupported(API, &format!("{at}.type"), ": only \"function\" tools are"));
        }
        let f = t.get("function").ok_or(ApiError::bad(
            API,
            &format!("{at}.function"),
            "a function tool needs `function`",
        ))?;
        only_fields(API, f, &["name", "description", "parameters", "strict"], &format!("{at}.function"))?;
        if f.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(ApiError::bad(API, &format!("{at}.function.name"), "every function needs a name"));
        }
        if f.get("strict").and_then(Value::as_bool) == Some(true) {
            return Err(ApiError::unsupported(
                API,
                &format!("{at}.function.strict"),
                ": arguments are not constrained to the schema (use strict: false)",
            ));
        }
    }
    Ok(list.clone())
}

/// `tool_choice`: whether replies are read for calls, and the reply's forced beginning.
fn tool_choice(body: &Value, tools: &[Value]) -> Result<(bool, String), ApiError> {
    let has = !tools.is_empty();
    let need_tools = |what: &str| ApiError::bad(API, "tool_choice", format!("tool_choice {what} needs tools"));
    match body.get("tool_choice") {
        None | Some(Value::Null) => Ok((has, String::new())),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok((has, String::new())),
            "none" => Ok((false, String::new())),
            "required" if has => Ok((true, choice::forced_call_prefix(None))),
            "required" => Err(need_tools("\"required\"")),
            other => Err(ApiError::bad(API, "tool_choice", format!("unknown tool_choice {other:?}"))),
        },
        Some(v) => {
            let name = v.pointer("/function/name").and_then(Value::as_str).filter(|_| v["type"] == "function");
            let Some(name) = name else {
                return Err(ApiError::bad(
                    API,
                    "tool_choice",
                    "expected {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ));
            };
            if !choice::tool_names(tools).contains(&name) {
                return Err(ApiError::bad(
                    API,
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not in tools"),
                ));
            }
            if !has {
                return Err(need_tools("naming a function"));
            }
            Ok((true, choice::forced_call_prefix(Some(name))))
        }
    }
}

fn logit_bias(body: &Value, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = body.get("logit_bias").filter(|v| !v.is_null()) else { return Ok(vec![]) };
    let map = map.as_object().ok_or(ApiError::bad(API, "logit_bias", "logit_bias must map token ids to numbers"))?;
    map.iter()
        .map(|(k, v)| match (k.parse::<u32>(), v.as_f64()) {
            (Ok(t), Some(b)) if (t as usize) < vocab && (-100.0..=100.0).contains(&b) => Ok((t, b as f32)),
            _ => Err(ApiError::bad(
                API,
                "logit_bias",
                format!("logit_bias: {k}: {v} is not a token id with a bias in [-100, 100]"),
            )),
        })
        .collect()
}

fn parse(app: &App, body: Value) -> Result<Chat, ApiError> {
    only_fields(API, &body, FIELDS, "")?;
    let model_name = body.get("model").and_then(Value::as_str);
    let model = app.model(model_name).ok_or_else(|| {
        ApiError::new(API, StatusCode::NOT_FOUND, format!("the model `{}` does not exist", model_name.unwrap_or("")))
    })?;
    if let Some(f) = body.get("response_format").filter(|v| !v.is_null()) {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::unsupported(API, "response_format", ": only {\"type\": \"text\"} is"));
        }
    }
    let msgs = messages(&body)?;
    let tool_specs = tools(&body)?;
    let (read_tools, prefix) = tool_choice(&body, &tool_specs)?;
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or(ApiError::bad(API, "stream", "stream must be a boolean"))?,
    };
    let include_usage = match body.get("stream_options").filter(|v| !v.is_null()) {
        None => false,
        Some(_) if !stream => return Err(ApiError::bad(API, "stream_options", "stream_options needs stream: true")),
        Some(o) => {
            only_fields(API, o, &["include_usage"], "stream_options")?;
            o.get("include_usage").and_then(Value::as_bool).unwrap_or(false)
        }
    };
    let n = choice::count(API, &body, "n")?.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::bad(API, "n", "n must be between 1 and 16"));
    }
    let logprobs = match body.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or(ApiError::bad(API, "logprobs", "logprobs must be a boolean"))?,
    };
    let top = choice::count(API, &body, "top_logprobs")?;
    if top.is_some_and(|t| t > 20) {
        return Err(ApiError::bad(API, "top_logprobs", "top_logprobs must be between 0 and 20"));
    }
    if top.is_some() && !logprobs {
        return Err(ApiError::bad(API, "top_logprobs", "top_logprobs needs logprobs: true"));
    }
    let (sampling, seed) = choice::sampling(API, &body)?;
    let penalties = Penalties {
        presence: choice::number(API, &body, "presence_penalty", 0.0, (-2.0, 2.0))? as f32,
        frequency: choice::number(API, &body, "frequency_penalty", 0.0, (-2.0, 2.0))? as f32,
        logit_bias: logit_bias(&body, app.tok.vocab_size())?,
    };
    let max = match choice::count(API, &body, "max_completion_tokens")? {
        Some(m) => Some(m),
        None => choice::count(API, &body, "max_tokens")?,
    };
    let (prompt, max_tokens) = choice::encode(app, API, &msgs, &tool_specs, &prefix, max)?;
    let single_call = body.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false);
    let gen = Gen {
        prompt,
        prefix,
        n,
        max_tokens,
        sampling,
        seed,
        stop: choice::stop_strings(API, &body, "stop")?,
        logprobs: logprobs.then_some(top.unwrap_or(0)),
        penalties,
        adapter: model.adapter,
        tools: read_tools,
        tool_specs,
        single_call,
    };
    Ok(Chat { gen, model: model.name.clone(), stream, include_usage })
}

fn logprob_entry(tok: &Tokenizer, t: u32, lp: f32) -> Value {
    let bytes = tok.token_bytes(t);
    json!({"token": String::from_utf8_lossy(&bytes), "logprob": lp, "bytes": bytes})
}

/// OpenAI's `logprobs` object of some tokens.
fn logprobs_json(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = logprob_entry(tok, l.token, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(t, p)| logprob_entry(tok, t, p)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

fn calls_json(calls: &[ParsedCall], streamed: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({"id": new_id("call_"), "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments.to_string()}});
            if streamed {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

fn finish_reason(r: &Reply) -> &'static str {
    match r.finish {
        _ if !r.calls.is_empty() => "tool_calls",
        Finish::Length => "length",
        _ => "stop",
    }
}

pub async fn chat_completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let chat = match prepare(&app, API, body, parse).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let rx = match app.submit(API, chat.gen.requests(&app.tok)) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    if chat.stream {
        streamed(app, chat, rx)
    } else {
        whole(app, chat, rx).await
    }
}

async fn whole(app: Arc<App>, chat: Chat, mut rx: UnboundedReceiver<(usize, Event)>) -> Response {
    let g = &chat.gen;
    let mut texts: Vec<ChoiceText> = (0..g.n).map(|_| ChoiceText::new(&app.tok, g)).collect();
    let mut replies: Vec<Option<(Reply, Vec<TokenLogprob>)>> = (0..g.n).map(|_| None).collect();
    while replies.iter().any(Option::is_none) {
        let Some((i, ev)) = rx.recv().await else {
            return ApiError::new(API, StatusCode::SERVICE_UNAVAILABLE, "the generation engine stopped")
                .into_response();
        };
        match ev {
            Event::Token(t, _) => texts[i].feed(t),
            Event::Done(Ok(c)) => replies[i] = Some((texts[i].finish(&c), c.logprobs)),
            Event::Done(Err(e)) => return ApiError::server(API, &e).into_response(),
        }
    }
    let mut completion = 0;
    let choices: Vec<Value> = replies
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, (r, lps))| {
            completion += r.tokens;
            let content = if r.content.is_empty() && !r.calls.is_empty() { Value::Null } else { json!(r.content) };
            let mut message = json!({"role": "assistant", "content": content, "refusal": null});
            if !r.calls.is_empty() {
                message["tool_calls"] = json!(calls_json(&r.calls, false));
            }
            let logprobs = if g.logprobs.is_some() { logprobs_json(&app.tok, &lps) } else { Value::Null };
            json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish_reason(&r)})
        })
        .collect();
    let prompt = g.prompt.len();
    Json(json!({
        "id": new_id("chatcmpl-"), "object": "chat.completion", "created": unix_now(), "model": chat.model,
        "choices": choices, "system_fingerprint": null,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }))
    .into_response()
}

/// Server-sent events: content as it is known to be content, tool calls as deltas once parsed,
/// then the finish reason per choice, the usage chunk when asked, and `[DONE]`. The client
/// going away drops the receiver, which cancels the generation.
fn streamed(app: Arc<App>, chat: Chat, mut rx: UnboundedReceiver<(usize, Event)>) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<Result<String, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let g = &chat.gen;
        let (id, created) = (new_id("chatcmpl-"), unix_now());
        let with_usage = chat.include_usage;
        let chunk = |i: usize, delta: Value, logprobs: Value, finish: Value| {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                "system_fingerprint": null,
                "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]});
            if with_usage {
                c["usage"] = Value::Null;
            }
            Ok(format!("data: {c}\n\n"))
        };
        let lp = |text: &mut ChoiceText| {
            if g.logprobs.is_some() {
                logprobs_json(&app.tok, &std::mem::take(&mut text.logprobs))
            } else {
                Value::Null
            }
        };
        let mut texts: Vec<ChoiceText> = (0..g.n).map(|_| ChoiceText::new(&app.tok, g)).collect();
        for i in 0..g.n {
            if tx.send(chunk(i, json!({"role": "assistant", "content": ""}), Value::Null, Value::Null)).await.is_err() {
                return;
            }
        }
        let (mut left, mut completion) = (g.n, 0);
        let mut ping = tokio::time::interval(super::PING_EVERY);
        while left > 0 {
            let Some(next) = super::next_event(&tx, &mut rx, &mut ping, ": ping\n\n").await else { return };
            let Some((i, ev)) = next else {
                let e = anyhow::anyhow!("the generation engine stopped");
                let _ = tx.send(Ok(format!("data: {}\n\n", ApiError::server(API, &e).body()))).await;
                return;
            };
            let sent = match ev {
                Event::Token(t, l) => {
                    let d = texts[i].push(t, l);
                    if d.is_empty() {
                        continue;
                    }
                    let logprobs = lp(&mut texts[i]);
                    tx.send(chunk(i, json!({"content": d}), logprobs, Value::Null)).await
                }
                Event::Done(Ok(c)) => {
                    left -= 1;
                    let r = texts[i].finish(&c);
                    completion += r.tokens;
                    if !r.rest.is_empty() || !texts[i].logprobs.is_empty() {
                        let logprobs = lp(&mut texts[i]);
                        if tx.send(chunk(i, json!({"content": r.rest}), logprobs, Value::Null)).await.is_err() {
                            return;
                        }
                    }
                    for call in calls_json(&r.calls, true) {
                        // The call's head (id, name), then its arguments, as OpenAI streams them.
                        let mut head = call.clone();
                        head["function"]["arguments"] = json!("");
                        let args =
                            json!({"index": call["index"], "function": {"arguments": call["function"]["arguments"]}});
                        for d in [head, args] {
                            if tx.send(chunk(i, json!({"tool_calls": [d]}), Value::Null, Value::Null)).await.is_err() {
                                return;
                            }
                        }
                    }
                    tx.send(chunk(i, json!({}), Value::Null, json!(finish_reason(&r)))).await
                }
                Event::Done(Err(e)) => {
                    let _ = tx.send(Ok(format!("data: {}\n\n", ApiError::server(API, &e).body()))).await;
                    return;
                }
            };
            if sent.is_err() {
                return;
            }
        }
        if with_usage {
            let prompt = g.prompt.len();
            let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                "system_fingerprint": null, "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}});
            let _ = tx.send(Ok(format!("data: {c}\n\n"))).await;
        }
        let _ = tx.send(Ok("data: [DONE]\n\n".into())).await;
    });
    sse(out)
}

pub(super) fn sse(rx: tokio::sync::mpsc::Receiver<Result<String, std::convert::Infallible>>) -> Response {
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .expect("valid response")
}
