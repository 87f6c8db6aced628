//! Anthropic Messages: `POST /v1/messages`, plain and streamed, with tools both ways (`tools`
//! and `tool_choice` in; `tool_use` blocks out; `tool_use` / `tool_result` history in).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::choice::{self, ChoiceText, Gen, Reply};
use super::http::{only_fields, prepare, Api, ApiError};
use super::{new_id, App, Event};
use crate::chat::{Message, Role, ToolCall};
use crate::generate::{Finish, Penalties};

const API: Api = Api::Anthropic;

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "metadata",
];

struct Ask {
    gen: Gen,
    model: String,
    stream: bool,
}

/// The text of a string or a list of text blocks.
fn text_blocks(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.iter().enumerate() {
                let here = format!("{at}[{j}]");
                if b.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(ApiError::unsupported(API, &here, ": only text blocks are, here"));
                }
                only_fields(API, b, &["type", "text", "cache_control", "citations"], &here)?;
                out.push_str(b.get("text").and_then(Value::as_str).unwrap_or(""));
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        other => Err(ApiError::bad(API, at, format!("{at} must be a string or a list of text blocks, got {other}"))),
    }
}

/// Anthropic's history as chat messages: `tool_result` blocks become tool messages, an
/// assistant's `tool_use` blocks its tool calls.
fn messages(body: &Value) -> Result<Vec<Message>, ApiError> {
    let mut out = vec![];
    let system = text_blocks(body.get("system").unwrap_or(&Value::Null), "system")?;
    if !system.is_empty() {
        out.push(Message::system(system));
    }
    let raw = body.get("messages").and_then(Value::as_array).ok_or(ApiError::bad(
        API,
        "messages",
        "messages: expected a list",
    ))?;
    if raw.is_empty() {
        return Err(ApiError::bad(API, "messages", "messages must not be empty"));
    }
    for (i, m) in raw.iter().enumerate() {
        let at = format!("messages[{i}]");
        only_fields(API, m, &["role", "content"], &at)?;
        let role = match m.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => {
                return Err(ApiError::bad(
                    API,
                    &format!("{at}.role"),
                    format!("{at}.role must be user or assistant, got {other:?}"),
                ))
            }
        };
        let blocks = match m.get("content") {
            Some(Value::String(s)) => {
                out.push(Message::new(role, s.clone()));
                continue;
            }
            Some(Value::Array(b)) => b,
            _ => {
                return Err(ApiError::bad(
                    API,
                    &format!("{at}.content"),
                    "content must be a string or a list of blocks",
                ))
            }
        };
        let (mut text, mut calls) = (String::new(), vec![]);
        for (j, b) in blocks.iter().enumerate() {
            let here = format!("{at}.content[{j}]");
            match (b.get("type").and_then(Value::as_str), role) {
                (Some("text"), _) => {
                    only_fields(API, b, &["type", "text", "cache_control", "citations"], &here)?;
                    text.push_str(b.get("text").and_then(Value::as_str).unwrap_or(""));
                }
                (Some("tool_use"), Role::Assistant) => {
                    only_fields(API, b, &["type", "id", "name", "input", "cache_control"], &here)?;
                    let name = b.get("name").and_then(Value::as_str).ok_or(ApiError::bad(
                        API,
                        &here,
                        "tool_use needs a name",
                    ))?;
                    let mut call = ToolCall::new(name, b.get("input").cloned().unwrap_or(json!({})));
                    call.id = b.get("id").and_then(Value::as_str).map(str::to_string);
                    calls.push(call);
                }
                (Some("tool_result"), Role::User) => {
                    only_fields(API, b, &["type", "tool_use_id", "content", "is_error", "cache_control"], &here)?;
                    let content = text_blocks(b.get("content").unwrap_or(&Value::Null), &format!("{here}.content"))?;
                    let mut msg = Message::tool(content);
                    msg.tool_call_id = b.get("tool_use_id").and_then(Value::as_str).map(str::to_string);
                    out.push(msg);
                }
                (kind, _) => {
                    let why = format!(
                        ": {} blocks in {} messages are not",
                        kind.unwrap_or("untyped"),
                        if role == Role::User { "user" } else { "assistant" }
                    );
                    return Err(ApiError::unsupported(API, &here, &why));
                }
            }
        }
        if role == Role::Assistant || !text.is_empty() {
            let mut msg = Message::new(role, text);
            msg.tool_calls = calls;
            out.push(msg);
        }
    }
    Ok(out)
}

/// Anthropic tools as the OpenAI-shaped specs the chat template renders.
fn tools(body: &Value) -> Result<Vec<Value>, ApiError> {
    let list = match body.get("tools") {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(l)) => l,
        Some(_) => return Err(ApiError::bad(API, "tools", "tools must be a list")),
    };
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("tools[{i}]");
            if t.get("type").and_then(Value::as_str).is_some_and(|k| k != "custom") {
                return Err(ApiError::unsupported(
                    API,
                    &format!("{at}.type"),
                    ": server tools are not; only custom tools are",
                ));
            }
            only_fields(API, t, &["type", "name", "description", "input_schema", "cache_control"], &at)?;
            let name = t.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
            let name = name.ok_or(ApiError::bad(API, &format!("{at}.name"), "every tool needs a name"))?;
            let schema = t.get("input_schema").ok_or(ApiError::bad(
                API,
                &format!("{at}.input_schema"),
                "every tool needs an input_schema",
            ))?;
            let mut f = json!({"name": name});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            f["parameters"] = schema.clone();
            Ok(json!({"type": "function", "function": f}))
        })
        .collect()
}

/// `tool_choice`: (read replies for calls, forced reply prefix, one call at most).
fn tool_choice(body: &Value, tools: &[Value]) -> Result<(bool, String, bool), ApiError> {
    let has = !tools.is_empty();
    let Some(c) = body.get("tool_choice").filter(|v| !v.is_null()) else { return Ok((has, String::new(), false)) };
    only_fields(API, c, &["type", "name", "disable_parallel_tool_use"], "tool_choice")?;
    let single = c.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true);
    let need = |what| {
        if has {
            Ok(())
        } else {
            Err(ApiError::bad(API, "tool_choice", format!("tool_choice {what} needs tools")))
        }
    };
    match c.get("type").and_then(Value::as_str) {
        Some("auto") => Ok((has, String::new(), single)),
        Some("none") => Ok((false, String::new(), single)),
        Some("any") => need("any").map(|_| (true, choice::forced_call_prefix(None), single)),
        Some("tool") => {
            need("tool")?;
            let name = c.get("name").and_then(Value::as_str).ok_or(ApiError::bad(
                API,
                "tool_choice.name",
                "tool_choice tool needs a name",
            ))?;
            if !choice::tool_names(tools).contains(&name) {
                return Err(ApiError::bad(
                    API,
                    "tool_choice.name",
                    format!("tool_choice names {name:?}, which is not in tools"),
                ));
            }
            Ok((true, choice::forced_call_prefix(Some(name)), single))
        }
        other => Err(ApiError::bad(API, "tool_choice.type", format!("unknown tool_choice type {other:?}"))),
    }
}

fn parse(app: &App, body: Value) -> Result<Ask, ApiError> {
    only_fields(API, &body, FIELDS, "")?;
    let model_name = body.get("model").and_then(Value::as_str);
    let model = app.model(model_name).ok_or_else(|| {
        ApiError::new(API, StatusCode::NOT_FOUND, format!("model: `{}` does not exist", model_name.unwrap_or("")))
    })?;
    let max = choice::count(API, &body, "max_tokens")?.ok_or(ApiError::bad(
        API,
        "max_tokens",
        "max_tokens: required, a positive integer",
    ))?;
    let msgs = messages(&body)?;
    let tool_specs = tools(&body)?;
    let (read_tools, prefix, single_call) = tool_choice(&body, &tool_specs)?;
    if body.get("temperature").and_then(Value::as_f64).is_some_and(|t| t > 1.0) {
        return Err(ApiError::bad(API, "temperature", "temperature must be in [0, 1]"));
    }
    let (sampling, seed) = choice::sampling(API, &body)?;
    let (prompt, max_tokens) = choice::encode(app, API, &msgs, &tool_specs, &prefix, Some(max))?;
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or(ApiError::bad(API, "stream", "stream must be a boolean"))?,
    };
    let gen = Gen {
        prompt,
        prefix,
        n: 1,
        max_tokens,
        sampling,
        seed,
        stop: choice::stop_strings(API, &body, "stop_sequences")?,
        logprobs: None,
        penalties: Penalties::default(),
        adapter: model.adapter,
        tools: read_tools,
        tool_specs,
        single_call,
    };
    Ok(Ask { gen, model: model.name.clone(), stream })
}

fn stop_reason(r: &Reply) -> (&'static str, Value) {
    match &r.finish {
        _ if !r.calls.is_empty() => ("tool_use", Value::Null),
        Finish::Length => ("max_tokens", Value::Null),
        Finish::StopString(s) => ("stop_sequence", json!(s)),
        Finish::StopToken(_) => ("end_turn", Value::Null),
    }
}

fn tool_use_blocks(r: &Reply) -> Vec<Value> {
    r.calls
        .iter()
        .map(|c| json!({"type": "tool_use", "id": new_id("toolu_"), "name": c.name, "input": c.arguments}))
        .collect()
}

pub async fn messages_api(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let ask = match prepare(&app, API, body, parse).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let rx = match app.submit(API, ask.gen.requests(&app.tok)) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    if ask.stream {
        streamed(app, ask, rx)
    } else {
        whole(app, ask, rx).await
    }
}

async fn whole(app: Arc<App>, ask: Ask, mut rx: UnboundedReceiver<(usize, Event)>) -> Response {
    let mut text = ChoiceText::new(&app.tok, &ask.gen);
    let r = loop {
        match rx.recv().await {
            Some((_, Event::Token(t, _))) => text.feed(t),
            Some((_, Event::Done(Ok(c)))) => break text.finish(&c),
            Some((_, Event::Done(Err(e)))) => return ApiError::server(API, &e).into_response(),
            None => {
                return ApiError::new(API, StatusCode::SERVICE_UNAVAILABLE, "the generation engine stopped")
                    .into_response()
            }
        }
    };
    let mut content = vec![];
    if !r.content.is_empty() {
        content.push(json!({"type": "text", "text": r.content}));
    }
    content.extend(tool_use_blocks(&r));
    let (reason, seq) = stop_reason(&r);
    Json(json!({
        "id": new_id("msg_"), "type": "message", "role": "assistant", "model": ask.model, "content": content,
        "stop_reason": reason, "stop_sequence": seq,
        "usage": {"input_tokens": ask.gen.prompt.len(), "output_tokens": r.tokens},
    }))
    .into_response()
}

fn streamed(app: Arc<App>, ask: Ask, mut rx: UnboundedReceiver<(usize, Event)>) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<Result<String, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let event = |name: &str, data: Value| Ok(format!("event: {name}\ndata: {data}\n\n"));
        let start = json!({"type": "message_start", "message": {"id": new_id("msg_"), "type": "message",
            "role": "assistant", "model": ask.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": ask.gen.prompt.len(), "output_tokens": 0}}});
        if tx.send(event("message_start", start)).await.is_err() {
            return;
        }
        let mut text = ChoiceText::new(&app.tok, &ask.gen);
        // The text block opens with the first text; tool_use blocks follow it.
        let mut blocks = 0;
        let text_delta = |d: &str| {
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": d}}),
            )
        };
        let open_text =
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
        let mut ping = tokio::time::interval(super::PING_EVERY);
        let keepalive = event("ping", json!({"type": "ping"})).expect("infallible");
        let r = loop {
            let Some(next) = super::next_event(&tx, &mut rx, &mut ping, &keepalive).await else { return };
            match next {
                Some((_, Event::Token(t, _))) => {
                    let d = text.push(t, None);
                    if d.is_empty() {
                        continue;
                    }
                    if blocks == 0 {
                        blocks = 1;
                        if tx.send(event("content_block_start", open_text.clone())).await.is_err() {
                            return;
                        }
                    }
                    if tx.send(text_delta(&d)).await.is_err() {
                        return;
                    }
                }
                Some((_, Event::Done(Ok(c)))) => break text.finish(&c),
                Some((_, Event::Done(Err(e)))) => {
                    let _ = tx.send(event("error", ApiError::server(API, &e).body())).await;
                    return;
                }
                None => {
                    let e = anyhow::anyhow!("the generation engine stopped");
                    let _ = tx.send(event("error", ApiError::server(API, &e).body())).await;
                    return;
                }
            }
        };
        let mut events = vec![];
        if !r.rest.is_empty() {
            if blocks == 0 {
                blocks = 1;
                events.push(event("content_block_start", open_text));
            }
            events.push(text_delta(&r.rest));
        }
        if blocks == 1 {
            events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
        }
        for b in tool_use_blocks(&r) {
            let mut head = b.clone();
            head["input"] = json!({});
            events.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": blocks, "content_block": head}),
            ));
            let partial = json!({"type": "input_json_delta", "partial_json": b["input"].to_string()});
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": blocks, "delta": partial}),
            ));
            events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": blocks})));
            blocks += 1;
        }
        let (reason, seq) = stop_reason(&r);
        events.push(event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                                                 "usage": {"output_tokens": r.tokens}}),
        ));
        events.push(event("message_stop", json!({"type": "message_stop"})));
        for e in events {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    });
    super::openai::sse(out)
}
