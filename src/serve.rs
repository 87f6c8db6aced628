//! `protege serve`: the local engine behind an OpenAI-compatible `/v1/chat/completions` (tool
//! calls in the Qwen2.5 `<tool_call>` format become OpenAI `tool_calls`; streaming as
//! server-sent events) and an Anthropic-compatible `/v1/messages`, on tokio + axum.
//! Requests are generated one at a time (the CPU engine uses every core for one).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use crate::backend::cuda::Device;
use crate::backend::SamplingParams;
use crate::chat::{Message, Role};
use crate::generate::loaded::{load_on, LoadedModel};
use crate::generate::{Finish, GenOptions, Request, TextStream};
use crate::tokenizer::Tokenizer;

pub struct ServeOptions {
    pub model: PathBuf,
    pub addr: SocketAddr,
    /// The model name the API reports and accepts (any name is accepted in requests).
    pub name: String,
    /// Overrides the context length of config.json (`max_position_embeddings`).
    pub context: Option<usize>,
    /// Where the model runs (`None`: a GPU when one is usable, else the CPU).
    pub device: Option<Device>,
}

struct Engine {
    model: Box<dyn LoadedModel>,
    tok: Tokenizer,
    name: String,
    /// One generation at a time.
    gate: std::sync::Mutex<()>,
}

/// A request error: HTTP 400 with a message naming the field.
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.0, "type": "invalid_request_error"}});
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    }
}

fn server_error(e: anyhow::Error) -> Response {
    let body = json!({"error": {"message": format!("{e:#}"), "type": "server_error"}});
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}

/// Text of an OpenAI/Anthropic `content`: a string, or a list of `{"type": "text", "text"}`.
fn content_text(v: Option<&Value>, field: &str) -> Result<String, BadRequest> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err(BadRequest(format!("{field}: only text content parts are supported, got {p}"))),
            })
            .collect(),
        Some(other) => Err(BadRequest(format!("{field} must be a string or a list of text parts, got {other}"))),
    }
}

/// What a chat request asks for, in engine terms.
struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    seed: u64,
    stop: Vec<String>,
    stream: bool,
}

fn job(
    engine: &Engine,
    body: &Value,
    messages: &[Message],
    tools: &[Value],
    default_max: usize,
) -> Result<Job, BadRequest> {
    let enc =
        engine.tok.apply_chat_template(messages, tools, true).map_err(|e| BadRequest(format!("messages: {e:#}")))?;
    let max = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .map(|v| v.as_u64().ok_or_else(|| BadRequest("max_tokens must be a positive integer".into())))
        .transpose()?
        .map_or(default_max, |v| v as usize);
    let room = engine.model.cfg().max_position_embeddings.saturating_sub(enc.ids.len());
    if room == 0 {
        return Err(BadRequest(format!(
            "the prompt has {} tokens; the model's context is {}",
            enc.ids.len(),
            engine.model.cfg().max_position_embeddings
        )));
    }
    let num = |k: &str, d: f64| -> Result<f64, BadRequest> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => v.as_f64().ok_or_else(|| BadRequest(format!("{k} must be a number"))),
        }
    };
    let temperature = num("temperature", 1.0)?;
    let top_p = num("top_p", 1.0)?;
    if !((0.0..=2.0).contains(&temperature) && top_p > 0.0 && top_p <= 1.0) {
        return Err(BadRequest("temperature must be in [0, 2] and top_p in (0, 1]".into()));
    }
    let stop = match body.get("stop").or_else(|| body.get("stop_sequences")) {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| BadRequest("stop must be a string or a list of strings".into()))?,
    };
    Ok(Job {
        prompt: enc.ids,
        max_tokens: max.min(room).max(1),
        sampling: SamplingParams { temperature: temperature as f32, top_k: 0, top_p: top_p as f32 },
        // Without a seed, every request samples differently (as OpenAI's API does).
        seed: body.get("seed").and_then(Value::as_u64).unwrap_or_else(fresh_seed),
        stop,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// Runs a job, calling `on_text` with each new piece of text; returns the completion's text
/// (without the stop token), its token count and how it ended.
fn run_job(engine: &Engine, job: &Job, mut on_text: impl FnMut(&str)) -> Result<(String, usize, Finish)> {
    let _one = engine.gate.lock().unwrap_or_else(|e| e.into_inner());
    let req = Request {
        prompt: job.prompt.clone(),
        max_new_tokens: job.max_tokens,
        sampling: job.sampling.clone(),
        seed: job.seed,
        stop_tokens: engine.tok.stop_ids.clone(),
        stop_strings: job.stop.clone(),
    };
    let mut stream = TextStream::new(engine.tok.clone());
    let stops = engine.tok.stop_ids.clone();
    let (out, _) = engine.model.generate(&[req], Some(&engine.tok), &GenOptions::default(), &mut |_, t| {
        if !stops.contains(&t) {
            if let Ok(delta) = stream.push(t) {
                if !delta.is_empty() {
                    on_text(&delta);
                }
            }
        }
    })?;
    if let Ok(rest) = stream.flush() {
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    let c = &out[0];
    let mut text = stream.text().to_string();
    if let Finish::StopString(s) = &c.finish {
        if let Some(i) = text.find(s.as_str()) {
            text.truncate(i);
        }
    }
    Ok((text, c.tokens.len(), c.finish.clone()))
}

/// Splits a reply into its text and OpenAI tool calls (`<tool_call>{json}</tool_call>` blocks).
pub fn split_tool_calls(text: &str) -> (String, Vec<Value>) {
    let mut calls = vec![];
    let content = match text.find("<tool_call>") {
        Some(i) => text[..i].trim_end().to_string(),
        None => return (text.to_string(), calls),
    };
    for (n, block) in text.split("<tool_call>").skip(1).enumerate() {
        let body = block.split("</tool_call>").next().unwrap_or(block).trim();
        if let Ok(v) = serde_json::from_str::<Value>(body) {
            if let Some(name) = v.get("name").and_then(Value::as_str) {
                let args = v.get("arguments").cloned().unwrap_or(json!({}));
                let args = if args.is_string() { args.as_str().unwrap_or("{}").to_string() } else { args.to_string() };
                calls.push(json!({"id": format!("call_{n}"), "type": "function",
                                  "function": {"name": name, "arguments": args}}));
            }
        }
    }
    if calls.is_empty() {
        (text.to_string(), calls)
    } else {
        (content, calls)
    }
}

fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn sse(rx: tokio::sync::mpsc::Receiver<String>) -> Response {
    let stream = ReceiverStream::new(rx);
    let body = Body::from_stream(tokio_stream::StreamExt::map(stream, Ok::<_, std::convert::Infallible>));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .expect("valid response")
}

async fn chat_completions(State(engine): State<Arc<Engine>>, Json(body): Json<Value>) -> Response {
    let parsed = (|| -> Result<(Job, bool), BadRequest> {
        let raw =
            body.get("messages").and_then(Value::as_array).ok_or(BadRequest("messages: expected a list".into()))?;
        let mut messages = vec![];
        for (i, m) in raw.iter().enumerate() {
            let mut m = m.clone();
            let text = content_text(m.get("content"), &format!("messages[{i}].content"))?;
            m["content"] = json!(text);
            let msg: Message = serde_json::from_value(m).map_err(|e| BadRequest(format!("messages[{i}]: {e}")))?;
            messages.push(msg);
        }
        let tools: Vec<Value> = match body.get("tools") {
            None | Some(Value::Null) => vec![],
            Some(t) => serde_json::from_value(t.clone()).map_err(|_| BadRequest("tools: expected a list".into()))?,
        };
        Ok((job(&engine, &body, &messages, &tools, 512)?, !tools.is_empty()))
    })();
    let (job, has_tools) = match parsed {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let (id, created, model) = (format!("chatcmpl-{}", now()), now(), engine.name.clone());
    let prompt_tokens = job.prompt.len();
    if !job.stream {
        let e = engine.clone();
        let result = tokio::task::spawn_blocking(move || run_job(&e, &job, |_| {})).await;
        let (text, n, finish) = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return server_error(e),
            Err(e) => return server_error(anyhow::anyhow!("generation task failed: {e}")),
        };
        let (content, calls) = if has_tools { split_tool_calls(&text) } else { (text, vec![]) };
        let finish_reason = match finish {
            _ if !calls.is_empty() => "tool_calls",
            Finish::Length => "length",
            _ => "stop",
        };
        let mut message = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            message["tool_calls"] = json!(calls);
        }
        return Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n},
        }))
        .into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let e = engine.clone();
    tokio::task::spawn_blocking(move || {
        let chunk = |delta: Value, finish: Value| {
            let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            format!("data: {c}\n\n")
        };
        let _ = tx.blocking_send(chunk(json!({"role": "assistant", "content": ""}), Value::Null));
        // With tools, the reply is held back until its tool calls can be parsed; with stop
        // strings, until the stop string is cut off.
        let hold = has_tools || !job.stop.is_empty();
        let result = run_job(&e, &job, |d| {
            if !hold {
                let _ = tx.blocking_send(chunk(json!({"content": d}), Value::Null));
            }
        });
        match result {
            Ok((text, _, finish)) => {
                let mut finish_reason = if finish == Finish::Length { "length" } else { "stop" };
                if hold {
                    let (content, calls) = if has_tools { split_tool_calls(&text) } else { (text, vec![]) };
                    let mut delta = json!({"content": content});
                    if !calls.is_empty() {
                        finish_reason = "tool_calls";
                        delta["tool_calls"] = json!(calls
                            .iter()
                            .enumerate()
                            .map(|(i, c)| {
                                let mut c = c.clone();
                                c["index"] = json!(i);
                                c
                            })
                            .collect::<Vec<_>>());
                    }
                    let _ = tx.blocking_send(chunk(delta, Value::Null));
                }
                let _ = tx.blocking_send(chunk(json!({}), json!(finish_reason)));
            }
            Err(err) => {
                let _ = tx.blocking_send(format!("data: {}\n\n", json!({"error": {"message": format!("{err:#}")}})));
            }
        }
        let _ = tx.blocking_send("data: [DONE]\n\n".into());
    });
    sse(rx)
}

async fn messages_api(State(engine): State<Arc<Engine>>, Json(body): Json<Value>) -> Response {
    let parsed = (|| -> Result<Job, BadRequest> {
        let raw =
            body.get("messages").and_then(Value::as_array).ok_or(BadRequest("messages: expected a list".into()))?;
        if body.get("max_tokens").and_then(Value::as_u64).is_none() {
            return Err(BadRequest("max_tokens: required, a positive integer".into()));
        }
        let mut messages = vec![];
        let system = content_text(body.get("system"), "system")?;
        if !system.is_empty() {
            messages.push(Message::system(system));
        }
        for (i, m) in raw.iter().enumerate() {
            let text = content_text(m.get("content"), &format!("messages[{i}].content"))?;
            let role = match m.get("role").and_then(Value::as_str) {
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                other => {
                    return Err(BadRequest(format!("messages[{i}].role must be user or assistant, got {other:?}")))
                }
            };
            messages.push(Message::new(role, text));
        }
        job(&engine, &body, &messages, &[], 512)
    })();
    let job = match parsed {
        Ok(j) => j,
        Err(e) => return e.into_response(),
    };
    let (id, model, input_tokens) = (format!("msg_{}", now()), engine.name.clone(), job.prompt.len());
    let stop_reason = |f: &Finish| match f {
        Finish::Length => "max_tokens",
        Finish::StopString(_) => "stop_sequence",
        Finish::StopToken(_) => "end_turn",
    };
    if !job.stream {
        let e = engine.clone();
        let (text, n, finish) = match tokio::task::spawn_blocking(move || run_job(&e, &job, |_| {})).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return server_error(e),
            Err(e) => return server_error(anyhow::anyhow!("generation task failed: {e}")),
        };
        return Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason(&finish),
            "stop_sequence": match &finish { Finish::StopString(s) => json!(s), _ => Value::Null },
            "usage": {"input_tokens": input_tokens, "output_tokens": n},
        }))
        .into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let e = engine.clone();
    tokio::task::spawn_blocking(move || {
        let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        let start = json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": Value::Null, "usage": {"input_tokens": input_tokens, "output_tokens": 0}}});
        let _ = tx.blocking_send(event("message_start", start));
        let _ = tx.blocking_send(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ));
        let hold = !job.stop.is_empty();
        let delta = |d: &str| {
            let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}});
            event("content_block_delta", delta)
        };
        let result = run_job(&e, &job, |d| {
            if !hold {
                let _ = tx.blocking_send(delta(d));
            }
        });
        if let (true, Ok((text, _, _))) = (hold, &result) {
            let _ = tx.blocking_send(delta(text));
        }
        let _ = tx.blocking_send(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
        match result {
            Ok((_, n, finish)) => {
                let delta = json!({"type": "message_delta", "delta": {"stop_reason": stop_reason(&finish)},
                                   "usage": {"output_tokens": n}});
                let _ = tx.blocking_send(event("message_delta", delta));
                let _ = tx.blocking_send(event("message_stop", json!({"type": "message_stop"})));
            }
            Err(err) => {
                let _ = tx.blocking_send(event(
                    "error",
                    json!({"type": "error", "error": {"type": "api_error", "message": format!("{err:#}")}}),
                ));
            }
        }
    });
    sse(rx)
}

async fn models(State(engine): State<Arc<Engine>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "protege"}]}))
}

/// Loads the model and serves until the process ends. Prints `listening on http://ADDR` to
/// stderr once the socket is bound (port 0 picks a free one).
pub fn run_serve(o: &ServeOptions) -> Result<()> {
    let model = load_on(o.device, &o.model, None, o.context)?;
    eprintln!("protege serve: {} on {}", o.model.display(), model.backend_name());
    let tok = Tokenizer::from_dir(&o.model)?;
    let engine = Arc::new(Engine { model, tok, name: o.name.clone(), gate: Default::default() });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(messages_api))
        .route("/v1/models", get(models))
        .with_state(engine);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(o.addr).await.with_context(|| format!("cannot listen on {}", o.addr))?;
        eprintln!("protege serve: listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app).await.context("server error")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_are_split_from_the_text() {
        let (c, calls) = split_tool_calls(
            "Let me look.\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls\"}}\n</tool_call>",
        );
        assert_eq!(c, "Let me look.");
        assert_eq!(calls[0]["function"]["name"], "bash");
        assert_eq!(calls[0]["function"]["arguments"], "{\"command\":\"ls\"}");
        let (c, calls) = split_tool_calls("<tool_call>not json</tool_call>");
        assert!(calls.is_empty() && c.contains("not json"));
    }
}
