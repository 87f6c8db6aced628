//! `protege serve`: the local engine behind an OpenAI-compatible `/v1/chat/completions` and an
//! Anthropic-compatible `/v1/messages`, on tokio + axum.
//!
//! Requests run together on the continuous batcher ([`crate::generate::engine`]) on a thread of
//! its own; a request whose client goes away stops at the next step. Parsing, the chat template
//! and tokenisation run off the async runtime. Several LoRA adapters can be served unmerged on
//! one base (`--lora-modules name=DIR`, as vLLM). Tool calls are read with the agent harness's
//! parser ([`crate::agent::toolcall`]), whatever form the model wrote them in.

mod anthropic;
mod choice;
mod http;
mod openai;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};

use anyhow::{bail, Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::backend::Device;
use crate::generate::engine::{EngineMetrics, Job, Msg, Sink};
use crate::generate::loaded::load_on;
use crate::generate::{Completion, GenOptions, Request, TokenLogprob};
use crate::tokenizer::Tokenizer;
pub use http::Api;

pub struct ServeOptions {
    pub model: PathBuf,
    pub addr: SocketAddr,
    /// The name requests use for the base model (or for the base with `adapter`).
    pub name: String,
    /// A PEFT adapter served (unmerged) under `name`.
    pub adapter: Option<PathBuf>,
    /// More adapters, each under its own name (`NAME=DIR`).
    pub lora_modules: Vec<(String, PathBuf)>,
    /// Overrides the context length of config.json (`max_position_embeddings`).
    pub context: Option<usize>,
    /// Where the model runs (`None`: a GPU when one is usable, else the CPU).
    pub device: Option<Device>,
    /// Tokens the KV cache holds, all requests in flight together.
    pub kv_cache_tokens: Option<usize>,
    /// Requests must carry this key (`Authorization: Bearer KEY` or `x-api-key: KEY`).
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_request_bytes: usize,
    /// Tokens a reply may have when the request does not say (the KV cache is reserved for a
    /// request's whole length when it joins the batch, so "the rest of the context" would let
    /// one request hold the cache alone).
    pub default_max_tokens: usize,
}

pub const DEFAULT_MAX_TOKENS: usize = 4096;

/// How often a stream that has nothing to send writes a keep-alive (an SSE comment, Anthropic's
/// `ping`), so that a client that went away is noticed.
const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

pub const DEFAULT_MAX_REQUEST_BYTES: usize = 8 << 20;

/// A name requests can ask for.
pub(crate) struct ServedModel {
    pub name: String,
    /// The adapter it applies, `None` for the base.
    pub adapter: Option<usize>,
    /// Where its weights came from (`root` of `/v1/models`).
    pub root: String,
}

/// What every handler shares.
pub(crate) struct App {
    jobs: mpsc::Sender<Msg>,
    pub tok: Tokenizer,
    pub models: Vec<ServedModel>,
    /// Tokens of prompt plus completion one request may use.
    pub context: usize,
    /// Tokens the KV cache holds (a request beyond it can never run).
    pub kv_capacity: usize,
    pub default_max_tokens: usize,
    pub api_key: Option<String>,
    pub metrics: Arc<EngineMetrics>,
    pub http: http::Counters,
    /// Bounds how many requests are parsed and tokenised at once (each holds its text).
    pub preparing: Arc<tokio::sync::Semaphore>,
    pub engine_alive: Arc<AtomicBool>,
    pub created: u64,
}

impl App {
    /// The served model `name` asks for (the first one when the request names none).
    pub fn model(&self, name: Option<&str>) -> Option<&ServedModel> {
        match name {
            None => self.models.first(),
            Some(n) => self.models.iter().find(|m| m.name == n),
        }
    }

    /// Sends one job per request to the engine; events arrive tagged with the request's index.
    pub fn submit(&self, api: Api, reqs: Vec<Request>) -> Result<UnboundedReceiver<(usize, Event)>, http::ApiError> {
        let (tx, rx) = unbounded_channel();
        for (choice, req) in reqs.into_iter().enumerate() {
            let sink = Box::new(ChannelSink { choice, tx: tx.clone() });
            if self.jobs.send(Msg::Run(Job { req, session: None, sink })).is_err() {
                let status = axum::http::StatusCode::SERVICE_UNAVAILABLE;
                return Err(http::ApiError::new(api, status, "the generation engine has stopped"));
            }
        }
        Ok(rx)
    }
}

/// What the engine tells a handler about one of its requests.
pub(crate) enum Event {
    Token(u32, Option<TokenLogprob>),
    Done(Result<Completion>),
}

type StreamTx = tokio::sync::mpsc::Sender<Result<String, std::convert::Infallible>>;

/// The next engine event for a stream (`Some(None)`: the engine is gone), or `None` once the
/// client has hung up. While waiting it writes `keepalive` every [`PING_EVERY`]: a client that
/// leaves while nothing is sent (held text, a queued job) is only noticed by writing.
pub(crate) async fn next_event(
    tx: &StreamTx,
    rx: &mut UnboundedReceiver<(usize, Event)>,
    ping: &mut tokio::time::Interval,
    keepalive: &str,
) -> Option<Option<(usize, Event)>> {
    loop {
        tokio::select! {
            biased;
            _ = tx.closed() => return None,
            _ = ping.tick() => {
                if tx.send(Ok(keepalive.to_string())).await.is_err() {
                    return None;
                }
            }
            next = rx.recv() => return Some(next),
        }
    }
}

/// A job's line back to its handler; the handler dropping its receiver (the client went away)
/// is what cancels the job.
struct ChannelSink {
    choice: usize,
    tx: UnboundedSender<(usize, Event)>,
}

impl Sink for ChannelSink {
    fn token(&mut self, token: u32, logprob: Option<&TokenLogprob>) -> bool {
        self.tx.send((self.choice, Event::Token(token, logprob.cloned()))).is_ok()
    }
    fn closed(&self) -> bool {
        self.tx.is_closed()
    }
    fn finish(self: Box<Self>, result: Result<Completion>) {
        let _ = self.tx.send((self.choice, Event::Done(result)));
    }
}

/// A random id with `prefix` (`chatcmpl-`, `msg_`, `call_`...): 24 hex digits, unique in practice.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}{:024x}", rand::random::<u128>() >> 32)
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A seed for a request that gives none: every request samples differently, as OpenAI's do.
pub(crate) fn fresh_seed() -> u64 {
    rand::random()
}

/// Loads the model (and adapters), starts the engine and serves until SIGINT/SIGTERM. Prints
/// `listening on http://ADDR` to stderr once the socket is bound (port 0 picks a free one).
pub fn run_serve(o: &ServeOptions) -> Result<()> {
    let mut model = load_on(o.device, &o.model, None, o.context)?;
    let tok = Tokenizer::from_dir(&o.model)?;
    let mut models = vec![];
    let base_root = o.model.display().to_string();
    match &o.adapter {
        Some(dir) => {
            let i = model.load_adapter(dir, o.lora_modules.is_empty())?;
            models.push(ServedModel { name: o.name.clone(), adapter: Some(i), root: dir.display().to_string() });
        }
        None => models.push(ServedModel { name: o.name.clone(), adapter: None, root: base_root }),
    }
    for (name, dir) in &o.lora_modules {
        if models.iter().any(|m| &m.name == name) {
            bail!("--lora-modules: the name {name:?} is used twice");
        }
        let i = model.load_adapter(dir, false)?;
        models.push(ServedModel { name: name.clone(), adapter: Some(i), root: dir.display().to_string() });
    }
    let context = model.cfg().max_position_embeddings;
    let capacity = o.kv_cache_tokens.unwrap_or(context.max(32_768));
    if capacity < 16 {
        bail!("--kv-cache-tokens must be at least 16");
    }
    eprintln!(
        "protege serve: {} on {}; {} (KV cache {capacity} tokens, context {context})",
        o.model.display(),
        model.backend_name(),
        models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    let metrics = Arc::new(EngineMetrics::default());
    let engine_alive = Arc::new(AtomicBool::new(true));
    let (jobs, rx) = mpsc::channel::<Msg>();
    let app = Arc::new(App {
        jobs,
        tok: tok.clone(),
        models,
        context,
        kv_capacity: capacity,
        default_max_tokens: o.default_max_tokens.max(1),
        api_key: o.api_key.clone(),
        metrics: metrics.clone(),
        http: Default::default(),
        preparing: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()).max(2),
        )),
        engine_alive: engine_alive.clone(),
        created: unix_now(),
    });
    let router = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages_api))
        .route("/v1/models", get(http::models))
        .route("/v1/models/{*id}", get(http::model))
        .route("/health", get(http::health))
        .route("/metrics", get(http::metrics))
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(app.clone(), http::guard))
        .layer(DefaultBodyLimit::max(o.max_request_bytes))
        .with_state(app.clone());
    std::thread::scope(|s| {
        let engine = s.spawn(|| {
            // Marks the engine stopped however it ends, a panic included (/health then says 503).
            struct Stopped<'a>(&'a AtomicBool);
            impl Drop for Stopped<'_> {
                fn drop(&mut self) {
                    self.0.store(false, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _stopped = Stopped(&engine_alive);
            if let Err(e) = model.run_engine(&tok, capacity, &GenOptions::default(), rx, &metrics) {
                eprintln!("protege serve: the generation engine stopped: {e:#}");
            }
        });
        let served = (|| -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(o.addr)
                    .await
                    .with_context(|| format!("cannot listen on {}", o.addr))?;
                eprintln!("protege serve: listening on http://{}", listener.local_addr()?);
                axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await.context("server error")
            })
        })();
        // The engine stops once the last handle to its queue is gone.
        drop(app);
        let _ = engine.join();
        served
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    eprintln!("protege serve: shutting down");
}
