//! `protege eval`: episodes of a task suite in parallel, graded, summarised.
//!
//! Writes to the output directory: `predictions.jsonl` (the SWE-bench harness's format, for
//! `protege grade` or the official harness), `trajectories.jsonl` (the shared schema; `meta` holds the
//! exit status, actions, expert calls, patch, timing, loop report and grade), `summary.json` and
//! `summary.md`. Metrics: Pass@1 (resolved / tasks), the share of the policy's replies that were
//! valid tool calls and the episodes with at least one, expert calls per task, expert share of
//! tokens (expert reply tokens / (expert reply + policy tokens)), steps per task, looping rate
//! (a run of one base command longer than 10), cost per task, exit statuses, and the harness
//! overhead per policy turn (episode time outside the model, commands and expert). A policy that
//! never made a valid tool call gets a warning, and "n/a" for its rates of behaviour (looping,
//! expert use, steps, tampering), which would describe nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::agent::episode::{EpisodeConfig, ExitStatus};
use crate::agent::experts::{make_expert, prepare_expert, ExpertModel};
use crate::agent::loops::{analyse, LoopConfig};
use crate::agent::policy::{LocalPolicy, Policy, Replay};
use crate::agent::remote::{Endpoint, OpenAiPolicy};
use crate::backend::Device;
use crate::backend::SamplingParams;
use crate::executor::docker::DockerConfig;
use crate::executor::{run_graded_episode, ExecutorKind, Executors, LocalExecutor};
use crate::generate::engine::EngineClient;
use crate::generate::loaded::{load_on, LoadedModel};
use crate::generate::GenOptions;
use crate::sandbox::scratch::Scratch;
use crate::sandbox::{best_isolation, Isolation, Limits};
use crate::tasks::grade::{GradeReport, Grader};
use crate::tasks::protect::Protection;
use crate::tasks::{load_suite, TaskInstance};
use crate::tokenizer::Tokenizer;
use crate::util::write_atomic;

mod compare;
mod outdir;
/// The expert of an eval is named by the same spec as everywhere else.
pub use crate::agent::experts::ExpertSpec;
pub use compare::comparison;
pub use outdir::ExistingOut;
use outdir::Identity;

/// Which policy plays the agent.
#[derive(Debug, Clone)]
pub enum PolicySpec {
    /// Protege's engine on an HF model directory (`context` overrides its length). Episodes
    /// share one batching engine.
    Local {
        model: PathBuf,
        adapter: Option<PathBuf>,
        sampling: SamplingParams,
        max_new_tokens: usize,
        context: Option<usize>,
        /// Where the model runs (`None`: a GPU when one is usable, else the CPU).
        device: Option<Device>,
    },
    /// Recorded replies: a JSON object mapping instance ids to lists of reply texts.
    Replay(PathBuf),
    /// A model behind an OpenAI-compatible server.
    Openai { endpoint: Endpoint, sampling: SamplingParams, max_new_tokens: usize },
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub suite: PathBuf,
    pub policy: PolicySpec,
    pub expert: ExpertSpec,
    pub concurrency: usize,
    pub out: PathBuf,
    pub episode: EpisodeConfig,
    pub limits: Limits,
    /// Limits of the grading test run.
    pub grade_limits: Limits,
    /// Files the agent's patch may not change when graded.
    pub protection: Protection,
    pub loops: LoopConfig,
    /// Only these instance ids (all when empty).
    pub only: Vec<String>,
    pub seed: u64,
    pub isolation: Option<Isolation>,
    /// Overrides each task's executor.
    pub executor: Option<ExecutorKind>,
    /// Settings of the Docker executor (hosts, limits, network).
    pub docker: DockerConfig,
    /// How to name the evaluated model to people (default: from the policy; `protege train`
    /// names a trained model by its run directory and base).
    pub label: Option<String>,
    /// What to do when `out` already holds results.
    pub existing_out: ExistingOut,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    pub task_id: String,
    pub resolved: bool,
    pub exit_status: ExitStatus,
    pub steps: usize,
    pub turns: usize,
    pub expert_calls: usize,
    pub expert_tokens: usize,
    pub policy_tokens: usize,
    pub cost_usd: f64,
    pub looping: bool,
    pub longest_run: usize,
    pub episode_s: f64,
    pub harness_s: f64,
    /// Protected files the patch changed (dropped before grading).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tampered: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl TaskResult {
    fn failed(task_id: &str, error: String) -> Self {
        TaskResult {
            task_id: task_id.into(),
            resolved: false,
            exit_status: ExitStatus::Error,
            steps: 0,
            turns: 0,
            expert_calls: 0,
            expert_tokens: 0,
            policy_tokens: 0,
            cost_usd: 0.0,
            looping: false,
            longest_run: 0,
            episode_s: 0.0,
            harness_s: 0.0,
            tampered: 0,
            error: Some(error),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub suite: String,
    pub policy: String,
    /// The evaluated model as people should read it (empty in older files: the policy).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    pub expert: String,
    pub isolation: Isolation,
    pub tasks: usize,
    pub resolved: usize,
    pub pass_at_1: f64,
    pub expert_calls_per_task: f64,
    pub expert_token_share: f64,
    pub steps_per_task: f64,
    pub looping_rate: f64,
    /// Share of tasks whose patch changed protected files (tests, test configuration).
    #[serde(default)]
    pub tampering_rate: f64,
    pub cost_per_task_usd: f64,
    pub exit_statuses: BTreeMap<String, usize>,
    /// Harness time per policy turn, milliseconds (episode time outside the model, the
    /// commands and the expert).
    pub harness_ms_per_turn: f64,
    pub wall_s: f64,
    /// The run was stopped by a signal: `results` holds the episodes that finished.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    pub results: Vec<TaskResult>,
}

/// Shown instead of a behaviour rate of a policy that never made a valid tool call.
pub const NO_ACTION: &str = "n/a (no valid action)";

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

impl Summary {
    pub(crate) fn new(
        suite: &Path,
        policy: String,
        expert: String,
        isolation: Isolation,
        results: Vec<TaskResult>,
        wall_s: f64,
    ) -> Self {
        let n = results.len();
        let f = |x: usize| x as f64;
        let mut exit_statuses = BTreeMap::new();
        for r in &results {
            *exit_statuses.entry(r.exit_status.as_str().to_string()).or_insert(0) += 1;
        }
        let expert_tokens: usize = results.iter().map(|r| r.expert_tokens).sum();
        let policy_tokens: usize = results.iter().map(|r| r.policy_tokens).sum();
        let turns: usize = results.iter().map(|r| r.turns).sum();
        Summary {
            suite: suite.display().to_string(),
            policy,
            label: String::new(),
            expert,
            isolation,
            tasks: n,
            resolved: results.iter().filter(|r| r.resolved).count(),
            pass_at_1: mean(results.iter().map(|r| f(r.resolved as usize))),
            expert_calls_per_task: mean(results.iter().map(|r| f(r.expert_calls))),
            expert_token_share: f(expert_tokens) / f(expert_tokens + policy_tokens).max(1.0),
            steps_per_task: mean(results.iter().map(|r| f(r.steps))),
            looping_rate: mean(results.iter().map(|r| f(r.looping as usize))),
            tampering_rate: mean(results.iter().map(|r| f((r.tampered > 0) as usize))),
            cost_per_task_usd: mean(results.iter().map(|r| r.cost_usd)),
            exit_statuses,
            harness_ms_per_turn: 1000.0 * results.iter().map(|r| r.harness_s).sum::<f64>() / f(turns).max(1.0),
            wall_s,
            interrupted: false,
            results,
        }
    }

    /// The evaluated model as people should read it.
    pub fn model_label(&self) -> &str {
        if self.label.is_empty() {
            &self.policy
        } else {
            &self.label
        }
    }

    /// (replies that were a valid tool call, all replies of the policy). Every valid call is
    /// an action (a step); a reply without one is a format error.
    pub fn valid_calls(&self) -> (usize, usize) {
        (self.results.iter().map(|r| r.steps).sum(), self.results.iter().map(|r| r.turns).sum())
    }

    /// Episodes with at least one valid tool call.
    pub fn acting_episodes(&self) -> usize {
        self.results.iter().filter(|r| r.steps > 0).count()
    }

    /// The policy never made a valid tool call: its behaviour rates (looping, expert use,
    /// steps) measure nothing.
    pub fn never_acted(&self) -> bool {
        self.valid_calls().0 == 0
    }

    /// The exit statuses in a line: "12 format_errors, 2 step_limit".
    pub fn exit_line(&self) -> String {
        let mut v: Vec<(&String, &usize)> = self.exit_statuses.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
    }

    /// What a reader must know before reading the rates: the policy never acted, or acted in
    /// fewer than half of its episodes.
    pub fn warning(&self) -> Option<String> {
        let (valid, replies) = self.valid_calls();
        let acting = self.acting_episodes();
        if !self.never_acted() {
            return (acting * 2 < self.tasks).then(|| {
                format!(
                    "NOTE: only {acting} of {} episodes of `{}` made a valid tool call ({valid} of {replies} replies; {}); \
                     its rates of behaviour rest on those few.",
                    self.tasks,
                    self.model_label(),
                    self.exit_line()
                )
            });
        }
        let what = if self.tasks == 0 {
            "finished no episode".to_string()
        } else if replies == 0 {
            format!("never replied in its {} episodes ({})", self.tasks, self.exit_line())
        } else {
            format!(
                "never made a valid tool call: none of its {replies} replies in {} episodes was one ({})",
                self.tasks,
                self.exit_line()
            )
        };
        Some(format!(
            "WARNING: `{}` {what}. Its looping, expert-use, step and tampering rates measure nothing and are shown \
             as {NO_ACTION}; they are not an improvement.",
            self.model_label()
        ))
    }

    /// The rows that say how the policy behaved, each beside the share of valid tool calls; a
    /// policy that never acted gets [`NO_ACTION`] instead of rates.
    pub fn behaviour_rows(&self) -> Vec<(&'static str, String)> {
        let (valid, replies) = self.valid_calls();
        let na = self.never_acted();
        let rate = |x: f64| if na { NO_ACTION.to_string() } else { format!("{:.1}%", 100.0 * x) };
        let num = |x: f64, digits: usize| if na { NO_ACTION.to_string() } else { format!("{x:.digits$}") };
        let valid_share = if replies == 0 {
            "none (no replies)".to_string()
        } else {
            format!("{:.1}% ({valid} of {replies} replies)", 100.0 * valid as f64 / replies as f64)
        };
        vec![
            ("valid tool calls", valid_share),
            ("episodes with a valid call", format!("{} of {}", self.acting_episodes(), self.tasks)),
            ("expert calls / task", num(self.expert_calls_per_task, 2)),
            ("expert share of tokens", rate(self.expert_token_share)),
            ("steps / task", num(self.steps_per_task, 1)),
            ("looping trajectories", rate(self.looping_rate)),
            ("patches touching protected files", rate(self.tampering_rate)),
        ]
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# protege eval\n\nmodel `{}`\n\nsuite `{}`, policy `{}`, expert `{}`, sandbox {:?}\n\n",
            self.model_label(),
            self.suite,
            self.policy,
            self.expert,
            self.isolation
        );
        if self.interrupted {
            s += "**Interrupted**: these are the episodes that finished before the run was stopped.\n\n";
        }
        if let Some(w) = self.warning() {
            s += &format!("**{w}**\n\n");
        }
        s += "| metric | value |\n|---|---|\n";
        let mut rows = vec![
            ("tasks", format!("{}", self.tasks)),
            ("resolved (Pass@1)", format!("{} ({:.1}%)", self.resolved, 100.0 * self.pass_at_1)),
        ];
        rows.extend(self.behaviour_rows());
        rows.extend([
            ("exit statuses", self.exit_line()),
            ("cost / task", format!("${:.4}", self.cost_per_task_usd)),
            ("harness overhead / turn", format!("{:.1} ms", self.harness_ms_per_turn)),
            ("wall time", format!("{:.1} s", self.wall_s)),
        ]);
        for (k, v) in rows {
            s += &format!("| {k} | {v} |\n");
        }
        s += "\n| exit status | episodes |\n|---|---|\n";
        for (k, v) in &self.exit_statuses {
            s += &format!("| {k} | {v} |\n");
        }
        s += "\n| task | resolved | exit | valid calls / replies | expert calls | longest run |\n|---|---|---|---|---|---|\n";
        for r in &self.results {
            s += &format!(
                "| {} | {} | {} | {} / {} | {} | {} |\n",
                r.task_id,
                if r.resolved { "yes" } else { "no" },
                r.exit_status.as_str(),
                r.steps,
                r.turns,
                r.expert_calls,
                r.longest_run
            );
        }
        s
    }
}

enum Engine {
    Local { model: Box<dyn LoadedModel>, tok: Tokenizer, sampling: SamplingParams, max_new_tokens: usize },
    Replay(BTreeMap<String, Vec<String>>),
    Openai { endpoint: Endpoint, sampling: SamplingParams, max_new_tokens: usize },
}

/// Runs the evaluation and writes its files; returns the summary.
pub fn run_eval(o: &EvalOptions) -> Result<Summary> {
    let started = std::time::Instant::now();
    outdir::check(&o.out, o.existing_out)?;
    let mut tasks = load_suite(&o.suite)?;
    if !o.only.is_empty() {
        for id in &o.only {
            if !tasks.iter().any(|t| &t.instance_id == id) {
                bail!("task {id:?} is not in {}", o.suite.display());
            }
        }
        tasks.retain(|t| o.only.contains(&t.instance_id));
    }
    let (engine, policy_name) = match &o.policy {
        PolicySpec::Local { model, adapter, sampling, max_new_tokens, context, device } => {
            let m = load_on(*device, model, adapter.as_deref(), *context)?;
            let tok = Tokenizer::from_dir(model)?;
            let engine = Engine::Local { model: m, tok, sampling: sampling.clone(), max_new_tokens: *max_new_tokens };
            let with_adapter = adapter.as_ref().map(|a| format!(" + adapter {}", a.display())).unwrap_or_default();
            (engine, format!("local:{}{with_adapter}", model.display()))
        }
        PolicySpec::Replay(file) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            let map: BTreeMap<String, Vec<String>> = crate::inputs::json_file(&text, &file.display().to_string())
                .context("expected a JSON object mapping instance ids to lists of replies")?;
            (Engine::Replay(map), format!("replay:{}", file.display()))
        }
        PolicySpec::Openai { endpoint, sampling, max_new_tokens } => {
            // Fail early on a missing key rather than in every episode.
            OpenAiPolicy::new(endpoint.clone(), sampling.clone(), *max_new_tokens)?;
            let name = format!("openai:{}@{}", endpoint.model, endpoint.base_url);
            (
                Engine::Openai {
                    endpoint: endpoint.clone(),
                    sampling: sampling.clone(),
                    max_new_tokens: *max_new_tokens,
                },
                name,
            )
        }
    };
    let expert_model = prepare_expert(&o.expert)?;
    let isolation = o.isolation.unwrap_or_else(best_isolation);
    o.protection.validate()?;
    let model_paths: Vec<&Path> = match &o.policy {
        PolicySpec::Local { model, adapter, .. } => {
            std::iter::once(model.as_path()).chain(adapter.as_deref()).collect()
        }
        _ => vec![],
    };
    let identity = Identity {
        suite: std::fs::canonicalize(&o.suite).unwrap_or_else(|_| o.suite.clone()),
        policy: policy_name.clone(),
        expert: o.expert.name(),
        seed: o.seed,
        settings: format!(
            "{:?}",
            (&o.policy, &o.episode, &o.limits, &o.grade_limits, &o.protection, &o.loops, &o.executor)
        ),
        model_files: outdir::fingerprint(&model_paths),
    };
    let mut files = outdir::open(&o.out, o.existing_out, &identity)?;
    // Results of tasks outside this run's selection (`--tasks`) stay on disk but out of its summary.
    files.done.retain(|r| tasks.iter().any(|t| t.instance_id == r.task_id));
    if !files.done.is_empty() {
        eprintln!("eval: resuming {}: {} of {} tasks already done", o.out.display(), files.done.len(), tasks.len());
    }
    let tasks: Vec<TaskInstance> =
        tasks.into_iter().filter(|t| !files.done.iter().any(|r| r.task_id == t.instance_id)).collect();
    // A signal stops the run cleanly: work trees removed, finished episodes summarised.
    let _signals = crate::interrupt::watch();
    let scratch = Scratch::new("eval")?;
    let suite_dir = std::fs::canonicalize(if o.suite.is_dir() {
        o.suite.clone()
    } else {
        o.suite.parent().unwrap_or(Path::new(".")).to_path_buf()
    })?;
    // Never visible in a sandbox: the whole suite (gold and test patches, clean snapshots),
    // the run's outputs, other episodes. A task's venv is shown by its sandbox.
    let hidden = vec![suite_dir, std::fs::canonicalize(&o.out)?, scratch.path().to_path_buf()];
    let grader = Grader { hidden, ..Grader::new(isolation, o.grade_limits, o.protection.clone()) };
    let local = LocalExecutor { grader, limits: o.limits, scratch: scratch.path().to_path_buf() };
    let docker = DockerConfig { limits: o.limits, protection: o.protection.clone(), ..o.docker.clone() };
    let executors = Executors::new(Some(local), Some(docker), o.executor);
    executors.prepare(&tasks)?;

    // Trajectories, the harness's predictions (for `protege grade` or the official harness) and
    // the finished tasks' results, in that order per task (see `outdir`).
    let outdir::OutFiles { trajectories, predictions, results: results_file, done } = files;
    let out_files = Mutex::new((trajectories, predictions, results_file));
    let next = AtomicUsize::new(0);
    let results = Mutex::new(done);
    let bar = indicatif::ProgressBar::new(tasks.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tasks, ETA {eta} | {msg}").expect("template"),
    );
    let worker = |client: Option<&EngineClient>| -> Result<()> {
        loop {
            if crate::interrupt::requested() {
                return Ok(());
            }
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(task) = tasks.get(i) else { return Ok(()) };
            let result = match run_one(o, task, i, &engine, client, expert_model.as_ref(), &executors, &policy_name) {
                Ok(Some((result, line, prediction))) => {
                    let mut files = out_files.lock().expect("lock");
                    let (traj, pred, res) = &mut *files;
                    traj.write_all(line.as_bytes())?;
                    traj.flush()?;
                    pred.write_all(prediction.as_bytes())?;
                    pred.flush()?;
                    res.write_all(format!("{}\n", serde_json::to_string(&result)?).as_bytes())?;
                    res.flush()?;
                    result
                }
                // Stopped by a signal: not a result.
                Ok(None) => continue,
                // The task could not even start (sandbox, setup): recorded, the others go on.
                Err(e) => TaskResult::failed(&task.instance_id, format!("{e:#}")),
            };
            let mut rs = results.lock().expect("lock");
            rs.push(result);
            let solved = rs.iter().filter(|r| r.resolved).count();
            bar.set_message(format!("{solved}/{} resolved", rs.len()));
            bar.inc(1);
        }
    };
    let workers = |client: Option<EngineClient>| {
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = (0..o.concurrency.max(1))
                .map(|_| {
                    let c = client.clone();
                    let worker = &worker;
                    s.spawn(move || worker(c.as_ref()))
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("an episode worker panicked"))??;
            }
            Ok(())
        })
    };
    match &engine {
        // Local episodes share one batching engine on this thread.
        Engine::Local { model, .. } => {
            let ctx = model.cfg().max_position_embeddings.min(o.episode.context_tokens.max(1));
            let capacity = o.concurrency.max(1) * ctx;
            let opts = GenOptions { max_step_tokens: 2048 };
            let mut outcome = None;
            model.serve_while(capacity, &opts, ctx, Box::new(|c| outcome = Some(workers(Some(c)))))?;
            outcome.context("the evaluation workers did not run")??;
        }
        _ => workers(None)?,
    }
    bar.finish_and_clear();
    let mut results = results.into_inner().expect("lock");
    results.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    let mut summary =
        Summary::new(&o.suite, policy_name, o.expert.name(), isolation, results, started.elapsed().as_secs_f64());
    summary.label = o.label.clone().unwrap_or_else(|| policy_label(&o.policy));
    summary.interrupted = crate::interrupt::requested();
    write_atomic(&o.out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    write_atomic(&o.out.join("summary.md"), summary.markdown().as_bytes())?;
    crate::interrupt::check()?;
    Ok(summary)
}

/// How people should read the policy's name: an adapter by its own path, with its base named.
fn policy_label(p: &PolicySpec) -> String {
    match p {
        PolicySpec::Local { model, adapter: Some(a), .. } => {
            format!("adapter {} on base {}", a.display(), model.display())
        }
        PolicySpec::Local { model, adapter: None, .. } => model.display().to_string(),
        PolicySpec::Replay(f) => format!("replay of {}", f.display()),
        PolicySpec::Openai { endpoint, .. } => format!("{} at {}", endpoint.model, endpoint.base_url),
    }
}

/// Puts a grade in a trajectory's `meta`: `grade` (the report, or its error) and `tampering`
/// when the patch touched protected files. Returns whether it resolved and how many protected
/// files it touched.
pub fn record_grade(
    extra: &mut serde_json::Map<String, serde_json::Value>,
    grade: &Result<GradeReport>,
) -> (bool, usize) {
    match grade {
        Ok(g) => {
            extra.insert("grade".into(), json!(g));
            if !g.tampering.is_empty() {
                extra.insert("tampering".into(), json!(g.tampering));
            }
            (g.resolved, g.tampering.len())
        }
        Err(e) => {
            extra.insert("grade".into(), json!({"error": format!("{e:#}")}));
            (false, 0)
        }
    }
}

/// One task: episode, grade, trajectory line (`None`: the run was stopped during it).
#[allow(clippy::too_many_arguments)]
fn run_one(
    o: &EvalOptions,
    task: &TaskInstance,
    index: usize,
    engine: &Engine,
    client: Option<&EngineClient>,
    expert_model: Option<&ExpertModel>,
    executors: &Executors,
    policy_name: &str,
) -> Result<Option<(TaskResult, String, String)>> {
    let mut policy: Box<dyn Policy + '_> = match engine {
        Engine::Local { tok, sampling, max_new_tokens, .. } => {
            let seed = o.seed.wrapping_add(index as u64 * 7919);
            // Local episodes always run against the shared batching engine.
            let c = client.context("a local policy runs only through the shared engine")?;
            let mut p = LocalPolicy::with_generator(Box::new(c.handle()), tok, sampling.clone(), seed);
            p.max_new_tokens = *max_new_tokens;
            Box::new(p)
        }
        Engine::Replay(map) => Box::new(Replay::new(map.get(&task.instance_id).cloned().unwrap_or_default())),
        Engine::Openai { endpoint, sampling, max_new_tokens } => {
            Box::new(OpenAiPolicy::new(endpoint.clone(), sampling.clone(), *max_new_tokens)?)
        }
    };
    let mut expert = make_expert(&o.expert, expert_model, false)?;
    let label = format!("{index}");
    let Some(graded) = run_graded_episode(executors, task, &label, policy.as_mut(), expert.as_deref_mut(), &o.episode)?
    else {
        return Ok(None);
    };
    let (ep, grade) = (graded.episode, graded.grade);
    // Not graded (over the limit): no prediction either.
    let traj_patch = if ep.exit_status == ExitStatus::PatchTooLarge { String::new() } else { ep.patch.clone() };
    let loops = analyse(&ep.actions, &o.loops);
    let mut extra = serde_json::Map::new();
    extra.insert("loops".into(), json!(loops));
    let (resolved, tampered) = record_grade(&mut extra, &grade);
    let grade_error = grade.as_ref().err().map(|e| format!("grading: {e:#}"));
    let traj = ep.to_trajectory(Some(resolved), extra).bounded(o.episode.max_record_bytes);
    let result = TaskResult {
        task_id: task.instance_id.clone(),
        resolved,
        exit_status: ep.exit_status,
        steps: ep.actions.len(),
        turns: ep.turns,
        expert_calls: ep.expert_calls.len(),
        expert_tokens: ep.expert_calls.iter().map(|c| c.tokens_out).sum(),
        policy_tokens: ep.policy_tokens,
        cost_usd: ep.expert_calls.iter().map(|c| c.cost_usd).sum(),
        looping: loops.looping,
        longest_run: loops.longest_run,
        episode_s: ep.timing.total_s,
        harness_s: ep.timing.harness_s,
        tampered,
        error: ep.error.clone().or(grade_error),
    };
    let prediction =
        json!({"instance_id": task.instance_id, "model_name_or_path": policy_name, "model_patch": traj_patch});
    Ok(Some((result, serde_json::to_string(&traj)? + "\n", prediction.to_string() + "\n")))
}
