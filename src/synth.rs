//! `protege synth`: expert-augmented trajectories by rejection sampling.
//!
//! An agent policy (a strong model over an OpenAI-compatible API, protege's own engine, or the
//! labelled scripted teacher) works each task with `ask_expert` available; the expert sees the
//! gold patch and is told not to reveal it. Every attempt is graded in a fresh copy and kept
//! only when it passes the acceptance rules (resolved; no loop run above a threshold; expert
//! calls within bounds).
//!
//! The run directory holds `attempts.jsonl` (one line per attempt, appended as each finishes:
//! the verdict, the reason, statistics and the whole trajectory — this is also the resume log),
//! `trajectories.jsonl` (the accepted trajectories in the shared schema, what `protege sft`
//! reads; rewritten atomically) and `summary.json`.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::agent::episode::Episode;
use crate::agent::experts::{make_expert, prepare_expert, ExpertModel, ExpertSpec};
use crate::agent::loops::analyse;
use crate::agent::policy::{LocalPolicy, Policy};
use crate::agent::remote::OpenAiPolicy;
use crate::agent::teacher::{ScriptedTeacher, TEACHER_LABEL};
use crate::agent::trajectory::{write_jsonl, Trajectory};
use crate::backend::cpu::CpuBackend;
use crate::backend::SamplingParams;
use crate::config::SynthConfig;
use crate::eval::record_grade;
use crate::executor::docker::DockerConfig;
use crate::executor::{run_graded_episode, Executors, LocalExecutor};
use crate::model::Qwen2;
use crate::sandbox::best_isolation;
use crate::sandbox::scratch::Scratch;
use crate::tasks::grade::Grader;
use crate::tasks::{load_suite, TaskInstance};
use crate::tokenizer::Tokenizer;
use crate::util::write_atomic;

/// One line of `attempts.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub task_id: String,
    pub attempt: usize,
    pub accepted: bool,
    /// Why it was rejected (empty when accepted).
    pub reason: String,
    pub resolved: bool,
    pub exit_status: String,
    pub steps: usize,
    pub expert_calls: usize,
    pub longest_run: usize,
    pub policy_tokens: usize,
    pub expert_tokens: usize,
    pub cost_usd: f64,
    pub seconds: f64,
    pub trajectory: Trajectory,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SynthSummary {
    pub agent: String,
    pub expert: String,
    pub tasks: usize,
    pub attempts: usize,
    pub accepted: usize,
    pub accept_rate: f64,
    pub tasks_with_accepted: usize,
    pub resolve_rate: f64,
    pub rejected: BTreeMap<String, usize>,
    pub expert_calls_per_accepted: f64,
    pub steps_per_accepted: f64,
    pub policy_tokens: usize,
    pub expert_tokens: usize,
    pub cost_usd: f64,
    pub wall_s: f64,
}

/// Reads the attempts written so far (a torn last line, from a killed run, is dropped).
fn read_attempts(path: &Path) -> Result<Vec<Attempt>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = vec![];
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str::<Attempt>(l) {
            Ok(a) => out.push(a),
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => bail!("{}:{}: unreadable attempt: {e}", path.display(), i + 1),
        }
    }
    // Rewrite without the torn line so that appends start on a clean line.
    let mut clean = String::new();
    for a in &out {
        clean += &serde_json::to_string(a)?;
        clean.push('\n');
    }
    write_atomic(path, clean.as_bytes())?;
    Ok(out)
}

/// The policy of one attempt.
enum Agent {
    Scripted,
    Remote(crate::agent::remote::Endpoint, SamplingParams, usize),
    Local { be: CpuBackend, model: Box<Qwen2<CpuBackend>>, tok: Tokenizer, sampling: SamplingParams, max_new: usize },
}

fn verdict(cfg: &SynthConfig, ep: &Episode, resolved: bool, longest_run: usize, tampered: usize) -> Option<String> {
    let a = &cfg.accept;
    let calls = ep.expert_calls.len();
    if tampered > 0 {
        // A trajectory that edits the tests or their configuration teaches exactly that.
        return Some("changed protected files".into());
    }
    if a.resolved && !resolved {
        return Some("unresolved".into());
    }
    if a.max_loop_run > 0 && longest_run > a.max_loop_run {
        return Some("looping".into());
    }
    if a.max_expert_calls > 0 && calls > a.max_expert_calls {
        return Some("too many expert calls".into());
    }
    if calls < a.min_expert_calls {
        return Some("too few expert calls".into());
    }
    None
}

/// Runs (or, with `resume`, continues) the synthesis of `cfg`.
pub fn run_synth(cfg: &SynthConfig, config_text: &str, resume: bool) -> Result<SynthSummary> {
    let started = Instant::now();
    let run = cfg.output.run_dir.clone();
    let attempts_path = run.join("attempts.jsonl");
    if !resume && attempts_path.exists() {
        bail!(
            "{} already holds a synthesis run; pass --resume to continue it or choose another output.run_dir",
            run.display()
        );
    }
    std::fs::create_dir_all(&run).with_context(|| format!("cannot create {}", run.display()))?;
    write_atomic(&run.join("config.toml"), config_text.as_bytes())?;
    let mut tasks = load_suite(&cfg.suite)?;
    if !cfg.tasks.is_empty() {
        for id in &cfg.tasks {
            if !tasks.iter().any(|t| &t.instance_id == id) {
                bail!("task {id:?} is not in {}", cfg.suite.display());
            }
        }
        tasks.retain(|t| cfg.tasks.contains(&t.instance_id));
    }
    let previous = read_attempts(&attempts_path)?;
    let done: HashSet<(String, usize)> = previous.iter().map(|a| (a.task_id.clone(), a.attempt)).collect();
    let accepted_before: BTreeMap<String, usize> =
        previous.iter().filter(|a| a.accepted).fold(BTreeMap::new(), |mut m, a| {
            *m.entry(a.task_id.clone()).or_insert(0) += 1;
            m
        });
    if resume && !previous.is_empty() {
        eprintln!("synth: resuming after {} attempts", previous.len());
    }

    let ag = &cfg.agent;
    let sampling = SamplingParams { temperature: ag.temperature, top_k: 0, top_p: 1.0 };
    let (agent, agent_name) = match ag.kind.as_str() {
        "scripted" => (Agent::Scripted, TEACHER_LABEL.to_string()),
        "remote" => {
            let ep = ag.endpoint.clone().context("agent.endpoint")?;
            OpenAiPolicy::new(ep.clone(), sampling.clone(), ag.max_new_tokens)?;
            let name = format!("openai:{}@{}", ep.model, ep.base_url);
            (Agent::Remote(ep, sampling, ag.max_new_tokens), name)
        }
        _ => {
            let path = ag.path.clone().context("agent.path")?;
            let be = CpuBackend::new();
            let model = Qwen2::load_merged(&be, &path, None, ag.context)?;
            let tok = Tokenizer::from_dir(&path)?;
            let name = format!("local:{}", path.display());
            (Agent::Local { be, model: Box::new(model), tok, sampling, max_new: ag.max_new_tokens }, name)
        }
    };
    let expert_spec = cfg.expert.spec()?;
    let expert_model = prepare_expert(&expert_spec)?;
    let isolation = best_isolation();
    cfg.protection.validate()?;
    let _signals = crate::interrupt::watch();
    let scratch = Scratch::new("synth")?;
    let suite_dir =
        if cfg.suite.is_dir() { cfg.suite.clone() } else { cfg.suite.parent().unwrap_or(Path::new(".")).to_path_buf() };
    let hidden: Vec<PathBuf> =
        vec![std::fs::canonicalize(&suite_dir)?, std::fs::canonicalize(&run)?, scratch.path().to_path_buf()];
    let grader = Grader { hidden, ..Grader::new(isolation, cfg.grade_limits, cfg.protection.clone()) };
    let local = LocalExecutor { grader, limits: cfg.limits, scratch: scratch.path().to_path_buf() };
    let docker = DockerConfig { limits: cfg.limits, protection: cfg.protection.clone(), ..cfg.docker.clone() };
    let executors = Executors::new(Some(local), Some(docker), cfg.executor);
    executors.prepare(&tasks)?;

    // Attempt-major order, so that every task gets its first try before any gets a second.
    let jobs: Vec<(usize, usize)> = (0..cfg.attempts)
        .flat_map(|a| (0..tasks.len()).map(move |t| (t, a)))
        .filter(|(t, a)| !done.contains(&(tasks[*t].instance_id.clone(), *a)))
        .collect();
    let accepted = Mutex::new(accepted_before);
    let file = Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(&attempts_path)?);
    let new_attempts: Mutex<Vec<Attempt>> = Mutex::new(vec![]);
    let next = AtomicUsize::new(0);
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} attempts, ETA {eta} | {msg}").expect("template"),
    );
    let worker = || -> Result<()> {
        loop {
            if crate::interrupt::requested() {
                return Ok(());
            }
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(&(ti, attempt)) = jobs.get(i) else { return Ok(()) };
            let task = &tasks[ti];
            let have = accepted.lock().expect("lock").get(&task.instance_id).copied().unwrap_or(0);
            if cfg.keep_per_task > 0 && have >= cfg.keep_per_task {
                bar.inc(1);
                continue;
            }
            let a = attempt_one(
                cfg,
                task,
                attempt,
                ti,
                i,
                &agent,
                &agent_name,
                &expert_spec,
                expert_model.as_ref(),
                &executors,
            )
            .transpose();
            // Stopped by a signal: not recorded, so that a resumed run tries it again.
            let Some(a) = a else { continue };
            // An attempt that could not start (sandbox, setup, expert) is recorded; the others go on.
            let a = a.unwrap_or_else(|e| Attempt {
                task_id: task.instance_id.clone(),
                attempt,
                accepted: false,
                reason: format!("could not run: {e:#}"),
                resolved: false,
                exit_status: "error".into(),
                steps: 0,
                expert_calls: 0,
                longest_run: 0,
                policy_tokens: 0,
                expert_tokens: 0,
                cost_usd: 0.0,
                seconds: 0.0,
                trajectory: Trajectory {
                    task_id: task.instance_id.clone(),
                    resolved: Some(false),
                    expert_calls: 0,
                    messages: vec![crate::chat::Message::user(task.problem_statement.clone())],
                    tools: vec![],
                    tokens: None,
                    meta: Default::default(),
                },
            });
            if a.accepted {
                *accepted.lock().expect("lock").entry(task.instance_id.clone()).or_insert(0) += 1;
            }
            {
                let mut f = file.lock().expect("lock");
                f.write_all((serde_json::to_string(&a)? + "\n").as_bytes())?;
                f.flush()?;
            }
            let mut all = new_attempts.lock().expect("lock");
            all.push(a);
            let kept = all.iter().filter(|a| a.accepted).count();
            bar.set_message(format!("{kept}/{} accepted", all.len()));
            bar.inc(1);
        }
    };
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..cfg.concurrency).map(|_| s.spawn(worker)).collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("a synthesis worker panicked"))??;
        }
        Ok(())
    })?;
    bar.finish_and_clear();

    let mut all = previous;
    all.extend(new_attempts.into_inner().expect("lock"));
    all.sort_by(|a, b| (&a.task_id, a.attempt).cmp(&(&b.task_id, b.attempt)));
    let kept: Vec<Trajectory> = all.iter().filter(|a| a.accepted).map(|a| a.trajectory.clone()).collect();
    write_jsonl(&run.join("trajectories.jsonl"), &kept)?;
    let acc: Vec<&Attempt> = all.iter().filter(|a| a.accepted).collect();
    let mut rejected = BTreeMap::new();
    for a in all.iter().filter(|a| !a.accepted) {
        *rejected.entry(a.reason.clone()).or_insert(0) += 1;
    }
    let n = all.len().max(1) as f64;
    let summary = SynthSummary {
        agent: agent_name,
        expert: expert_spec.name(),
        tasks: tasks.len(),
        attempts: all.len(),
        accepted: acc.len(),
        accept_rate: acc.len() as f64 / n,
        tasks_with_accepted: acc.iter().map(|a| &a.task_id).collect::<HashSet<_>>().len(),
        resolve_rate: all.iter().filter(|a| a.resolved).count() as f64 / n,
        rejected,
        expert_calls_per_accepted: acc.iter().map(|a| a.expert_calls as f64).sum::<f64>() / acc.len().max(1) as f64,
        steps_per_accepted: acc.iter().map(|a| a.steps as f64).sum::<f64>() / acc.len().max(1) as f64,
        policy_tokens: all.iter().map(|a| a.policy_tokens).sum(),
        expert_tokens: all.iter().map(|a| a.expert_tokens).sum(),
        cost_usd: all.iter().map(|a| a.cost_usd).sum(),
        wall_s: started.elapsed().as_secs_f64(),
    };
    write_atomic(&run.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    crate::interrupt::check()?;
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn attempt_one(
    cfg: &SynthConfig,
    task: &TaskInstance,
    attempt: usize,
    task_index: usize,
    index: usize,
    agent: &Agent,
    agent_name: &str,
    expert_spec: &ExpertSpec,
    expert_model: Option<&ExpertModel>,
    executors: &Executors,
) -> Result<Option<Attempt>> {
    let started = Instant::now();
    // From the task and the attempt, so that a resumed run samples as an uninterrupted one.
    let seed = cfg.seed ^ ((attempt as u64) << 32) ^ task_index as u64;
    let mut policy: Box<dyn Policy + '_> = match agent {
        Agent::Scripted => Box::new(ScriptedTeacher::new(task)),
        Agent::Remote(ep, sampling, max_new) => Box::new(OpenAiPolicy::new(ep.clone(), sampling.clone(), *max_new)?),
        Agent::Local { be, model, tok, sampling, max_new } => {
            let mut p = LocalPolicy::new(be, model.as_ref(), tok, sampling.clone(), seed);
            p.max_new_tokens = *max_new;
            Box::new(p)
        }
    };
    let mut expert = make_expert(expert_spec, expert_model, true)?;
    let label = format!("{index}");
    let Some(g) = run_graded_episode(executors, task, &label, policy.as_mut(), expert.as_deref_mut(), &cfg.episode)?
    else {
        return Ok(None);
    };
    let (ep, graded) = (g.episode, g.grade);
    let loops = analyse(&ep.actions, &Default::default());
    let mut extra = serde_json::Map::new();
    extra.insert("agent".into(), json!(agent_name));
    extra.insert("expert_kind".into(), json!(expert_spec.name()));
    extra.insert("attempt".into(), json!(attempt));
    extra.insert("loops".into(), json!(loops));
    let (resolved, tampered) = record_grade(&mut extra, &graded);
    let reason = match (&graded, verdict(cfg, &ep, resolved, loops.longest_run, tampered)) {
        (Err(e), _) => Some(format!("grading failed: {e:#}")),
        (_, r) => r,
    };
    Ok(Some(Attempt {
        task_id: task.instance_id.clone(),
        attempt,
        accepted: reason.is_none(),
        reason: reason.unwrap_or_default(),
        resolved,
        exit_status: ep.exit_status.as_str().into(),
        steps: ep.actions.len(),
        expert_calls: ep.expert_calls.len(),
        longest_run: loops.longest_run,
        policy_tokens: ep.policy_tokens,
        expert_tokens: ep.expert_calls.iter().map(|c| c.tokens_out).sum(),
        cost_usd: ep.expert_calls.iter().map(|c| c.cost_usd).sum(),
        seconds: started.elapsed().as_secs_f64(),
        trajectory: ep.to_trajectory(Some(resolved), extra).bounded(cfg.episode.max_record_bytes),
    }))
}
