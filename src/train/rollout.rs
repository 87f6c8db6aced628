//! Colocated rollouts: many agent episodes at once against the one copy of the weights that
//! training updates.
//!
//! Each episode runs on a worker thread (sandbox, tools, expert, grading, judging), and asks a
//! shared [`EngineHandle`] for its next reply. The engine, on the calling thread, keeps a
//! continuous batch ([`Batcher`]): every forward step decodes for all episodes that are waiting
//! on the model, and a new request joins as soon as the KV cache has room, so one episode's
//! tool calls overlap the others' generation.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

use crate::agent::episode::{Episode, EpisodeConfig, ExitStatus};
use crate::agent::expert::Expert;
use crate::agent::policy::{LocalPolicy, TokenGenerator};
use crate::agent::sandbox::Limits;
use crate::backend::{Backend, SamplingParams};
use crate::executor::run_graded_episode;
use crate::generate::{Batcher, Completion, GenOptions, Request};
use crate::model::Qwen2;
use crate::reward::{reward, Judge, JudgeOutput, Outcome, RewardBreakdown, RewardConfig};
use crate::tasks::TaskInstance;
use crate::tokenizer::Tokenizer;

struct Job {
    req: Request,
    session: u64,
    reply: mpsc::Sender<Result<Completion>>,
}

enum Msg {
    Generate(Job),
    /// The session ended: its parked cache can go.
    Release(u64),
}

/// An episode's line to the shared engine: one session, whose KV cache is kept between turns.
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
    max_context: usize,
    session: u64,
}

impl TokenGenerator for EngineHandle {
    fn generate(&mut self, req: Request) -> Result<Completion> {
        let (reply, rx) = mpsc::channel();
        let job = Job { req, session: self.session, reply };
        self.tx.send(Msg::Generate(job)).map_err(|_| anyhow!("the generation engine has stopped"))?;
        rx.recv().map_err(|_| anyhow!("the generation engine stopped before replying"))?
    }

    fn max_context(&self) -> usize {
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
    sessions: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl EngineClient {
    pub fn handle(&self) -> EngineHandle {
        let session = self.sessions.fetch_add(1, Ordering::SeqCst);
        EngineHandle { tx: self.tx.clone(), max_context: self.max_context, session }
    }
}

/// Runs `work` on another thread with a client of a batching engine that serves on this
/// thread until `work` returns and drops every handle.
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
    std::thread::scope(|s| {
        let h = s.spawn(move || work(client));
        let stats = serve(be, model, rx, capacity_tokens, opts, on_step);
        let r = h.join().map_err(|_| anyhow!("a rollout worker panicked"))?;
        Ok((r, stats?))
    })
}

/// What the engine did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineStats {
    /// Seconds in forward passes and sampling.
    pub busy_s: f64,
    pub forward_steps: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt tokens not recomputed because the session's earlier turn had them cached.
    pub reused_tokens: usize,
    /// Most sequences in one batch.
    pub max_batch: usize,
}

/// Serves generation requests until every handle is dropped. A request that can never fit is
/// answered with an error; a failing forward pass fails every waiting request and the engine.
fn serve<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    rx: mpsc::Receiver<Msg>,
    capacity_tokens: usize,
    opts: &GenOptions,
    mut on_step: impl FnMut(&EngineStats),
) -> Result<EngineStats> {
    let mut batcher = Batcher::new(be, model, None, capacity_tokens, opts);
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut waiting: HashMap<usize, mpsc::Sender<Result<Completion>>> = HashMap::new();
    let mut stats = EngineStats::default();
    let mut open = true;
    loop {
        // Block only when there is nothing to do.
        if batcher.live() == 0 && queue.is_empty() {
            if !open {
                break;
            }
            match rx.recv() {
                Ok(Msg::Generate(j)) => queue.push_back(j),
                Ok(Msg::Release(s)) => batcher.release_session(s),
                Err(_) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Msg::Generate(j)) => queue.push_back(j),
                Ok(Msg::Release(s)) => batcher.release_session(s),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Admit in arrival order while there is room.
        while let Some(j) = queue.front() {
            if batcher.has_room_session(&j.req, Some(j.session)) {
                let j = queue.pop_front().expect("front");
                match batcher.admit_session(j.req, Some(j.session)) {
                    Ok(id) => {
                        waiting.insert(id, j.reply);
                    }
                    Err(e) => {
                        let _ = j.reply.send(Err(e));
                    }
                }
            } else if batcher.live() == 0 {
                // Never fits, even alone.
                let j = queue.pop_front().expect("front");
                match batcher.admit_session(j.req, Some(j.session)) {
                    Ok(id) => {
                        waiting.insert(id, j.reply);
                    }
                    Err(e) => {
                        let _ = j.reply.send(Err(e));
                    }
                }
            } else {
                break;
            }
        }
        if batcher.live() == 0 {
            continue;
        }
        stats.max_batch = stats.max_batch.max(batcher.live());
        let started = Instant::now();
        let mut sampled = 0;
        match batcher.step(|_, _| sampled += 1) {
            Ok(done) => {
                for (id, c) in done {
                    if let Some(reply) = waiting.remove(&id) {
                        let _ = reply.send(Ok(c));
                    }
                }
            }
            Err(e) => {
                for (_, reply) in waiting.drain() {
                    let _ = reply.send(Err(anyhow!("generation failed: {e:#}")));
                }
                for j in queue.drain(..) {
                    let _ = j.reply.send(Err(anyhow!("generation failed: {e:#}")));
                }
                return Err(e.context("generation engine"));
            }
        }
        stats.busy_s += started.elapsed().as_secs_f64();
        stats.forward_steps += 1;
        stats.prompt_tokens = batcher.stats.prefill_tokens;
        stats.generated_tokens += sampled;
        stats.reused_tokens = batcher.stats.reused_tokens;
        on_step(&stats);
    }
    Ok(stats)
}

/// How rollouts run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Episodes in flight at once (each on its own thread; the model batches across them).
    pub concurrency: usize,
    /// Sampling temperature of the policy (the log-probs are of this tempered distribution).
    pub temperature: f32,
    /// Tokens of one reply.
    pub max_new_tokens: usize,
    /// KV-cache tokens shared by all episodes in flight (0: enough for every episode's full
    /// context).
    pub kv_cache_tokens: usize,
    /// Tokens of one forward step (bounds activation memory during prefill).
    pub max_step_tokens: usize,
    pub episode: EpisodeConfig,
    /// Limits of the agent's commands.
    pub limits: Limits,
    /// Limits of the grading test run.
    pub grade_limits: Limits,
    /// Files the agent's patch may not change when graded.
    pub protection: crate::tasks::protect::Protection,
    /// Where episodes run (overrides each task's `env.executor`).
    pub executor: Option<crate::executor::ExecutorKind>,
    /// Docker hosts and container limits.
    pub docker: crate::executor::docker::DockerConfig,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            temperature: 1.0,
            max_new_tokens: 512,
            kv_cache_tokens: 0,
            max_step_tokens: 2048,
            episode: EpisodeConfig::default(),
            limits: Limits::default(),
            grade_limits: Limits { timeout_s: 300.0, cpu_s: 600, ..Limits::default() },
            protection: Default::default(),
            executor: None,
            docker: Default::default(),
        }
    }
}

/// One episode to run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RolloutJob {
    /// Index of the task in the task list.
    pub task: usize,
    /// Episodes with the same group are compared with each other (GRPO).
    pub group: usize,
    pub seed: u64,
}

/// A finished, graded and rewarded episode.
pub struct Rollout {
    pub job: RolloutJob,
    pub episode: Episode,
    pub resolved: bool,
    pub grade: serde_json::Value,
    pub judge: JudgeOutput,
    pub reward: RewardBreakdown,
    /// Seconds of this episode's commands plus its grading run.
    pub tools_s: f64,
    /// Set when the episode could not run or be graded (it is left out of training).
    pub error: Option<String>,
}

/// Totals of one batch of rollouts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RolloutStats {
    pub wall_s: f64,
    pub engine: EngineStats,
    /// Σ over episodes of command and grading seconds (they overlap each other and generation).
    pub tools_s: f64,
    pub expert_s: f64,
}

/// Everything episodes share.
pub struct RolloutEnv<'a> {
    pub tasks: &'a [TaskInstance],
    pub tok: &'a Tokenizer,
    pub cfg: &'a RolloutConfig,
    pub reward: &'a RewardConfig,
    /// A fresh expert for an episode (`None`: no expert tool).
    pub expert: &'a (dyn Fn() -> Result<Option<Box<dyn Expert + 'a>>> + Sync),
    pub judge: &'a (dyn Fn() -> Box<dyn Judge> + Sync),
    /// Where episodes run and are graded.
    pub exec: &'a crate::executor::Executors,
    /// The RL step (names the episodes' environments).
    pub step: u64,
}

fn run_one(env: &RolloutEnv, job: RolloutJob, index: usize, handle: EngineHandle) -> Rollout {
    let task = &env.tasks[job.task];
    let sampling = SamplingParams { temperature: env.cfg.temperature, top_k: 0, top_p: 1.0 };
    let mut policy = LocalPolicy::with_generator(Box::new(handle), env.tok, sampling, job.seed);
    policy.max_new_tokens = env.cfg.max_new_tokens;
    let failed = |episode: Episode, e: String| Rollout {
        job,
        episode,
        resolved: false,
        grade: serde_json::Value::Null,
        judge: JudgeOutput::default(),
        reward: RewardBreakdown::default(),
        tools_s: 0.0,
        error: Some(e),
    };
    let empty = || Episode {
        task_id: task.instance_id.clone(),
        exit_status: crate::agent::episode::ExitStatus::Error,
        error: None,
        messages: vec![],
        tools: vec![],
        actions: vec![],
        expert_calls: vec![],
        patch: String::new(),
        policy_tokens: 0,
        turns: 0,
        format_errors: 0,
        reply_forms: vec![],
        timing: Default::default(),
        tokens: None,
    };
    let mut expert = match (env.expert)() {
        Ok(e) => e,
        Err(e) => return failed(empty(), format!("expert: {e:#}")),
    };
    let label = format!("s{}-{index}", env.step);
    let graded = match run_graded_episode(env.exec, task, &label, &mut policy, expert.as_deref_mut(), &env.cfg.episode)
    {
        Ok(Some(g)) => g,
        Ok(None) => return failed(empty(), "interrupted".into()),
        Err(e) => return failed(empty(), format!("environment: {e:#}")),
    };
    let episode = graded.episode;
    if let Some(e) = episode.error.clone().filter(|_| episode.exit_status == ExitStatus::Error) {
        return failed(episode, e);
    }
    // A patch over the limit is not graded (it resolves nothing); a grading failure leaves
    // the episode out of training.
    let (resolved, grade_json, grade_s, tampered) = match (&graded.grade, episode.exit_status) {
        (Err(e), ExitStatus::PatchTooLarge) => {
            (false, serde_json::json!({"resolved": false, "note": format!("{e:#}")}), 0.0, 0)
        }
        (Err(e), _) => return failed(episode, format!("grading: {e:#}")),
        (Ok(g), _) => (g.resolved, serde_json::json!(g), g.seconds, g.tampering.len()),
    };
    let judge = match (env.judge)().judge(task, &episode.messages) {
        Ok(j) => j,
        Err(e) => return failed(episode, format!("judge: {e:#}")),
    };
    let outcome = Outcome { tampered, ..Outcome::of(&episode, task, resolved) };
    let reward = reward(env.reward, &outcome, &judge.calls);
    Rollout {
        job,
        tools_s: episode.timing.command_s + grade_s,
        episode,
        resolved,
        grade: grade_json,
        judge,
        reward,
        error: None,
    }
}

/// Runs `jobs` with the model as the policy; returns the rollouts in job order.
pub fn run_rollouts<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    env: &RolloutEnv,
    jobs: &[RolloutJob],
    mut progress: impl FnMut(usize, &EngineStats),
) -> Result<(Vec<Rollout>, RolloutStats)> {
    let started = Instant::now();
    let cfg = env.cfg;
    let max_context = model.cfg.max_position_embeddings.min(cfg.episode.context_tokens.max(1));
    let workers = cfg.concurrency.clamp(1, jobs.len().max(1));
    let capacity = if cfg.kv_cache_tokens > 0 { cfg.kv_cache_tokens } else { workers * max_context };
    let opts = GenOptions { max_step_tokens: cfg.max_step_tokens };
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Rollout>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    let work = |client: EngineClient| {
        std::thread::scope(|s| {
            for _ in 0..workers {
                let client = client.clone();
                let (next, done, results) = (&next, &done, &results);
                s.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&job) = jobs.get(i) else { return };
                    let r = run_one(env, job, i, client.handle());
                    results.lock().expect("lock")[i] = Some(r);
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        })
    };
    let ((), engine) =
        serve_while(be, model, capacity, &opts, max_context, |st| progress(done.load(Ordering::SeqCst), st), work)?;
    let rollouts: Vec<Rollout> =
        results.into_inner().expect("lock").into_iter().map(|r| r.expect("every job ran")).collect();
    let stats = RolloutStats {
        wall_s: started.elapsed().as_secs_f64(),
        tools_s: rollouts.iter().map(|r| r.tools_s).sum(),
        expert_s: rollouts.iter().map(|r| r.episode.timing.expert_s).sum(),
        engine,
    };
    Ok((rollouts, stats))
}
