//! What both APIs share over HTTP: errors in each API's own JSON shape, the API key, request
//! counting, `/health`, `/v1/models`, Prometheus `/metrics`, and preparing a request (parse,
//! template, tokenise) off the async runtime.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::App;

/// Which API a path belongs to: errors take its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    pub fn of_path(path: &str) -> Api {
        if path.starts_with("/v1/messages") {
            Api::Anthropic
        } else {
            Api::OpenAi
        }
    }
}

/// An error answer: its status, a message and, for OpenAI, the parameter at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub api: Api,
}

impl ApiError {
    pub fn new(api: Api, status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, api }
    }

    /// 400 about `param`.
    pub fn bad(api: Api, param: &str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param.into()), api }
    }

    /// 400 for a field protege does not implement (instead of silently ignoring it).
    pub fn unsupported(api: Api, param: &str, why: &str) -> Self {
        Self::bad(api, param, format!("`{param}` is not supported by protege serve{why}"))
    }

    fn openai_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The error's JSON body (also what an error event in a stream carries).
    pub fn body(&self) -> Value {
        match self.api {
            Api::OpenAi => json!({"error": {"message": self.message, "type": self.openai_type(),
                                            "param": self.param, "code": self.status.as_u16().to_string()}}),
            Api::Anthropic => {
                json!({"type": "error", "error": {"type": self.anthropic_type(), "message": self.message}})
            }
        }
    }

    pub fn server(api: Api, e: &anyhow::Error) -> Self {
        Self::new(api, StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }

    /// A body that could not be read (too large, cut off) as this API's error.
    pub fn from_rejection(api: Api, r: BytesRejection) -> Self {
        Self::new(api, r.status(), r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Responses by route and status, for `/metrics`.
#[derive(Default)]
pub struct Counters {
    by_route: Mutex<BTreeMap<(String, u16), u64>>,
}

/// Checks the API key (`/health` and `/metrics` stay open, as vLLM's) and counts responses.
pub async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let open = path == "/health" || path == "/metrics";
    if let (Some(key), false) = (&app.api_key, open) {
        let h = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let given = h("x-api-key").or_else(|| h("authorization").and_then(|v| v.strip_prefix("Bearer ")));
        if !given.is_some_and(|g| same_secret(g.trim(), key)) {
            let api = Api::of_path(&path);
            let e = ApiError::new(api, StatusCode::UNAUTHORIZED, "missing or invalid API key");
            return e.into_response();
        }
    }
    let route = match path.as_str() {
        "/v1/chat/completions" | "/v1/messages" | "/v1/models" | "/health" | "/metrics" => path,
        p if p.starts_with("/v1/models/") => "/v1/models/{id}".into(),
        _ => "other".into(),
    };
    let resp = next.run(req).await;
    let mut by = app.http.by_route.lock().unwrap_or_else(|e| e.into_inner());
    *by.entry((route, resp.status().as_u16())).or_default() += 1;
    resp
}

/// Compares a presented key with the server's in time that does not depend on where they differ.
fn same_secret(given: &str, key: &str) -> bool {
    given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

pub async fn not_found(req: Request) -> ApiError {
    let path = req.uri().path();
    ApiError::new(Api::of_path(path), StatusCode::NOT_FOUND, format!("no route {} {path}", req.method()))
}

pub async fn method_not_allowed(req: Request) -> ApiError {
    let path = req.uri().path();
    let msg = format!("{} is not allowed on {path}", req.method());
    ApiError::new(Api::of_path(path), StatusCode::METHOD_NOT_ALLOWED, msg)
}

/// 200 while the generation engine runs, 503 once it has stopped.
pub async fn health(State(app): State<Arc<App>>) -> Response {
    if app.engine_alive.load(Ordering::SeqCst) {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        ApiError::new(Api::OpenAi, StatusCode::SERVICE_UNAVAILABLE, "the generation engine has stopped").into_response()
    }
}

fn model_object(app: &App, m: &super::ServedModel) -> Value {
    let parent = m.adapter.map(|_| json!(app.models[0].root));
    json!({"id": m.name, "object": "model", "created": app.created, "owned_by": "protege",
           "root": m.root, "parent": parent, "max_model_len": app.context})
}

pub async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": app.models.iter().map(|m| model_object(&app, m)).collect::<Vec<_>>()}))
}

pub async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.models.iter().find(|m| m.name == id) {
        Some(m) => Json(model_object(&app, m)).into_response(),
        None => ApiError::new(Api::OpenAi, StatusCode::NOT_FOUND, format!("the model `{id}` does not exist"))
            .into_response(),
    }
}

/// Prometheus text format.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    use std::fmt::Write;
    let m = &app.metrics;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    metric("protege_requests_running", "gauge", "Sequences in the running batch.", load(&m.running));
    metric("protege_requests_waiting", "gauge", "Sequences waiting for room in the KV cache.", load(&m.waiting));
    metric("protege_kv_cache_usage_ratio", "gauge", "Share of KV-cache blocks in use.", load(&m.kv_usage_ppm) / 1e6);
    metric("protege_prompt_tokens_total", "counter", "Prompt tokens admitted.", load(&m.prompt_tokens));
    metric("protege_generation_tokens_total", "counter", "Tokens generated.", load(&m.generated_tokens));
    metric("protege_sequences_finished_total", "counter", "Sequences that ran to the end.", load(&m.finished));
    metric(
        "protege_sequences_cancelled_total",
        "counter",
        "Sequences stopped because their client went away.",
        load(&m.cancelled),
    );
    metric("protege_sequences_failed_total", "counter", "Sequences that ended in an error.", load(&m.failed));
    metric("protege_forward_steps_total", "counter", "Batched forward steps.", load(&m.forward_steps));
    for (name, help, h) in [
        ("protege_time_to_first_token_seconds", "From arrival to the first token.", &m.time_to_first_token),
        ("protege_e2e_request_latency_seconds", "From arrival to the last token.", &m.request_latency),
    ] {
        let (buckets, sum, count) = h.snapshot();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in h.bounds.iter().zip(buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}");
    }
    let _ = writeln!(
        out,
        "# HELP protege_http_responses_total HTTP responses by route and status.\n# TYPE protege_http_responses_total counter"
    );
    for ((route, status), n) in app.http.by_route.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(out, "protege_http_responses_total{{route=\"{route}\",status=\"{status}\"}} {n}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Runs `parse` (JSON, validation, chat template, tokenisation) on a blocking thread, a bounded
/// number at a time, so that large prompts never stall the async runtime.
pub async fn prepare<T: Send + 'static>(
    app: &Arc<App>,
    api: Api,
    body: Result<Bytes, BytesRejection>,
    parse: impl FnOnce(&App, Value) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let body = body.map_err(|r| ApiError::from_rejection(api, r))?;
    // Held by the blocking task itself: a client that hangs up does not free the slot early.
    let permit = app
        .preparing
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::server(api, &anyhow::anyhow!("shutting down")))?;
    let app = app.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(api, StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::new(api, StatusCode::BAD_REQUEST, "the body must be a JSON object"));
        }
        parse(&app, v)
    })
    .await
    .map_err(|e| ApiError::server(api, &anyhow::anyhow!("preparing the request failed: {e}")))?
}

/// Rejects any key of `obj` outside `known`, naming it (`where_` says where it was found).
pub fn only_fields(api: Api, obj: &Value, known: &[&str], where_: &str) -> Result<(), ApiError> {
    if let Some(map) = obj.as_object() {
        if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
            let param = if where_.is_empty() { k.clone() } else { format!("{where_}.{k}") };
            return Err(ApiError::unsupported(api, &param, ""));
        }
    }
    Ok(())
}
