//! A request engine over the continuous batcher, for the server and for colocated rollouts:
//! jobs arrive on a channel from any thread, join the running batch as soon as the KV cache has
//! room, stream their tokens to a [`Sink`], and stop the moment their client goes away. A job
//! may belong to a multi-turn session (an agent episode) whose KV cache is kept between turns.
//!
//! [`serve_while`] runs the engine on the calling thread while other threads use it through
//! blocking [`EngineHandle`]s (one session each): how rollouts and evaluation share one copy of
//! the weights.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, Result};

use super::{Batcher, Completion, GenOptions, Request, TokenLogprob};
use crate::backend::Backend;
use crate::model::{Lora, Qwen2};
use crate::tokenizer::Tokenizer;

/// Where a job's tokens go: a client connection.
pub trait Sink: Send {
    /// A sampled token; returns false when the client is gone (the job is then cancelled).
    fn token(&mut self, token: u32, logprob: Option<&TokenLogprob>) -> bool;
    /// Whether the client is gone (checked before every step, also while the job waits).
    fn closed(&self) -> bool;
    fn finish(self: Box<Self>, result: Result<Completion>);
}

pub struct Job {
    pub req: Request,
    /// The session whose cached turns `req`'s prompt extends.
    pub session: Option<u64>,
    pub sink: Box<dyn Sink>,
}

pub enum Msg {
    Run(Job),
    /// The session ended: its parked cache can go.
    Release(u64),
}

/// What a failing forward step does: fail the jobs in flight and go on (a server), or fail
/// every job and stop the engine (rollouts: the device is probably gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Continue,
    Stop,
}

/// What the engine did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct EngineStats {
    /// Seconds in forward passes and sampling.
    pub busy_s: f64,
    pub forward_steps: usize,
    /// Prompt tokens prefilled.
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt tokens not recomputed because the session's earlier turn had them cached.
    pub reused_tokens: usize,
    /// Most sequences in one batch.
    pub max_batch: usize,
}

/// What the engine is doing, for `/metrics` (read from any thread).
#[derive(Default)]
pub struct EngineMetrics {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub forward_steps: AtomicU64,
    /// Used KV-cache blocks, in millionths of the capacity.
    pub kv_usage_ppm: AtomicU64,
    /// Seconds from arrival to the first token, and to the end.
    pub time_to_first_token: Histogram,
    pub request_latency: Histogram,
}

/// A Prometheus histogram with fixed buckets (seconds).
pub struct Histogram {
    pub bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Default for Histogram {
    fn default() -> Self {
        const BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
        Self { bounds: BOUNDS, inner: Mutex::new((vec![0; BOUNDS.len()], 0.0, 0)) }
    }
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                h.0[i] += 1;
            }
        }
        h.1 += v;
        h.2 += 1;
    }

    /// (cumulative count per bound, sum, count).
    pub fn snapshot(&self) -> (Vec<u64>, f64, u64) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Live {
    sink: Box<dyn Sink>,
    arrived: Instant,
    first_token: bool,
}

/// Serves `jobs` until every sender is gone. `adapters` are the LoRA adapters requests may name
/// ([`Request::adapter`]). A request that can never fit, or is invalid, is answered with its
/// error; a failing forward step is handled as `on_error` says. `on_step` sees the totals after
/// every step.
#[allow(clippy::too_many_arguments)]
pub fn run<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    tokenizer: Option<&Tokenizer>,
    adapters: &[Lora<B>],
    capacity_tokens: usize,
    opts: &GenOptions,
    jobs: mpsc::Receiver<Msg>,
    metrics: &EngineMetrics,
    on_error: OnError,
    mut on_step: impl FnMut(&EngineStats),
) -> Result<EngineStats> {
    let mut batcher = Batcher::new(be, model, tokenizer, capacity_tokens, opts).with_adapters(adapters);
    let capacity_blocks = batcher.capacity_blocks().max(1);
    let mut queue: VecDeque<(Job, Instant)> = VecDeque::new();
    let mut live: HashMap<usize, Live> = HashMap::new();
    let mut stats = EngineStats::default();
    let mut open = true;
    let count = |c: &AtomicU64, n: usize| c.fetch_add(n as u64, Ordering::Relaxed);
    let take = |m: Msg, queue: &mut VecDeque<(Job, Instant)>, batcher: &mut Batcher<B>| match m {
        Msg::Run(j) => queue.push_back((j, Instant::now())),
        Msg::Release(s) => batcher.release_session(s),
    };
    loop {
        metrics.running.store(live.len() as u64, Ordering::Relaxed);
        metrics.waiting.store(queue.len() as u64, Ordering::Relaxed);
        // Block only when there is nothing to do.
        if live.is_empty() && queue.is_empty() {
            if !open {
                return Ok(stats);
            }
            match jobs.recv() {
                Ok(m) => take(m, &mut queue, &mut batcher),
                Err(_) => return Ok(stats),
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(m) => take(m, &mut queue, &mut batcher),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Clients that went away: waiting jobs are dropped, running ones stopped.
        queue.retain(|(j, _)| {
            let gone = j.sink.closed();
            if gone {
                count(&metrics.cancelled, 1);
            }
            !gone
        });
        let gone: Vec<usize> = live.iter().filter(|(_, l)| l.sink.closed()).map(|(&id, _)| id).collect();
        for id in gone {
            batcher.cancel(id);
            live.remove(&id);
            count(&metrics.cancelled, 1);
        }
        // Admit in arrival order while there is room; one that never fits is tried alone.
        while let Some((j, _)) = queue.front() {
            if !batcher.has_room_session(&j.req, j.session) && batcher.live() > 0 {
                break;
            }
            let (j, arrived) = queue.pop_front().expect("front");
            let prompt = j.req.prompt.len();
            match batcher.admit_session(j.req, j.session) {
                Ok(id) => {
                    count(&metrics.prompt_tokens, prompt);
                    live.insert(id, Live { sink: j.sink, arrived, first_token: true });
                }
                Err(e) => {
                    count(&metrics.failed, 1);
                    j.sink.finish(Err(e));
                }
            }
        }
        if live.is_empty() {
            continue;
        }
        metrics.running.store(live.len() as u64, Ordering::Relaxed);
        metrics.waiting.store(queue.len() as u64, Ordering::Relaxed);
        stats.max_batch = stats.max_batch.max(live.len());
        let started = Instant::now();
        let mut hung_up = vec![];
        let mut sampled = 0;
        let result = batcher.step(|id, token, logprob| {
            sampled += 1;
            if let Some(l) = live.get_mut(&id) {
                if l.first_token {
                    l.first_token = false;
                    metrics.time_to_first_token.observe(l.arrived.elapsed().as_secs_f64());
                }
                if !l.sink.token(token, logprob) {
                    hung_up.push(id);
                }
            }
        });
        count(&metrics.forward_steps, 1);
        count(&metrics.generated_tokens, sampled);
        match result {
            Ok(done) => {
                for (id, c) in done {
                    if let Some(l) = live.remove(&id) {
                        metrics.request_latency.observe(l.arrived.elapsed().as_secs_f64());
                        count(&metrics.finished, 1);
                        l.sink.finish(Ok(c));
                    }
                }
                for id in hung_up {
                    if live.remove(&id).is_some() {
                        batcher.cancel(id);
                        count(&metrics.cancelled, 1);
                    }
                }
            }
            Err(e) => {
                for (id, l) in live.drain() {
                    batcher.cancel(id);
                    count(&metrics.failed, 1);
                    l.sink.finish(Err(anyhow!("generation failed: {e:#}")));
                }
                if on_error == OnError::Stop {
                    for (j, _) in queue.drain(..) {
                        j.sink.finish(Err(anyhow!("generation failed: {e:#}")));
                    }
                    return Err(e.context("generation engine"));
                }
                eprintln!("generation engine: a step failed: {e:#}");
            }
        }
        stats.busy_s += started.elapsed().as_secs_f64();
        stats.forward_steps += 1;
        stats.prompt_tokens = batcher.stats.prefill_tokens;
        stats.generated_tokens += sampled;
        stats.reused_tokens = batcher.stats.reused_tokens;
        on_step(&stats);
        let used = capacity_blocks - batcher.free_blocks().min(capacity_blocks);
        metrics.kv_usage_ppm.store((used as u64 * 1_000_000) / capacity_blocks as u64, Ordering::Relaxed);
    }
}

/// A blocking line to the engine: one session, whose KV cache is kept between turns.
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
    max_context: usize,
    session: u64,
}

/// Hands a finished job back to the thread blocked on it.
struct Reply(mpsc::Sender<Result<Completion>>);

impl Sink for Reply {
    fn token(&mut self, _: u32, _: Option<&TokenLogprob>) -> bool {
        true
    }
    fn closed(&self) -> bool {
        false
    }
    fn finish(self: Box<Self>, result: Result<Completion>) {
        let _ = self.0.send(result);
    }
}

impl EngineHandle {
    /// Generates `req` as the session's next turn, waiting for the whole completion.
    pub fn generate(&mut self, req: Request) -> Result<Completion> {
        let (reply, rx) = mpsc::channel();
        let job = Job { req, session: Some(self.session), sink: Box::new(Reply(reply)) };
        self.tx.send(Msg::Run(job)).map_err(|_| anyhow!("the generation engine has stopped"))?;
        rx.recv().map_err(|_| anyhow!("the generation engine stopped before replying"))?
    }

    /// Tokens of prompt plus completion one request may use.
    pub fn max_context(&self) -> usize {
        self.max_context
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Release(self.session));
    }
}

/// Hands out [`EngineHandle`]s; the engine stops once the client and every handle are gone.
#[derive(Clone)]
pub struct EngineClient {
    tx: mpsc::Sender<Msg>,
    max_context: usize,
    sessions: std::sync::Arc<AtomicU64>,
}

impl EngineClient {
    pub fn handle(&self) -> EngineHandle {
        let session = self.sessions.fetch_add(1, Ordering::SeqCst);
        EngineHandle { tx: self.tx.clone(), max_context: self.max_context, session }
    }
}

/// Runs `work` on another thread with a client of an engine that serves on this thread until
/// `work` returns and drops every handle. A failing step stops the engine (and fails `work`'s
/// requests).
pub fn serve_while<B: Backend, R: Send>(
    be: &B,
    model: &Qwen2<B>,
    capacity_tokens: usize,
    opts: &GenOptions,
    max_context: usize,
    on_step: impl FnMut(&EngineStats),
    work: impl FnOnce(EngineClient) -> R + Send,
) -> Result<(R, EngineStats)> {
    let (tx, rx) = mpsc::channel::<Msg>();
    let client = EngineClient { tx, max_context, sessions: Default::default() };
    let metrics = EngineMetrics::default();
    std::thread::scope(|s| {
        let h = s.spawn(move || work(client));
        let stats = run(be, model, None, &[], capacity_tokens, opts, rx, &metrics, OnError::Stop, on_step);
        let r = h.join().map_err(|_| anyhow!("a worker of the generation engine panicked"))?;
        Ok((r, stats?))
    })
}
