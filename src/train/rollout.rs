//! Colocated rollouts: many agent episodes at once against the one copy of the weights that
//! training updates.
//!
//! Each episode runs on a worker thread (sandbox, tools, expert, grading, judging), and asks a
//! shared [`EngineHandle`] for its next reply. The engine ([`crate::generate::engine`]), on the
//! calling thread, keeps a continuous batch: every forward step decodes for all episodes that
//! are waiting on the model, and a new request joins as soon as the KV cache has room, so one
//! episode's tool calls overlap the others' generation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::agent::episode::{Episode, ExitStatus};
use crate::agent::expert::Expert;
use crate::agent::policy::LocalPolicy;
use crate::backend::{Backend, SamplingParams};
use crate::config::RolloutConfig;
use crate::executor::run_graded_episode;
use crate::generate::engine::{serve_while, EngineClient, EngineHandle, EngineStats};
use crate::generate::GenOptions;
use crate::model::Qwen2;
use crate::reward::{reward, Judge, JudgeOutput, Outcome, RewardBreakdown, RewardConfig};
use crate::tasks::TaskInstance;
use crate::tokenizer::Tokenizer;

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
