//! Where episodes run and patches are graded, behind one trait, and the one function that
//! plays and grades an episode for eval, synth and RL rollouts.
//!
//! - [`LocalExecutor`]: the bubblewrap sandbox on a copy of the task's snapshot; grading by
//!   [`crate::tasks::grade::Grader`].
//! - [`docker::DockerExecutor`]: a container per episode from the instance's image, on one
//!   Docker host or many; grading as the official SWE-bench harness.
//!
//! A task names its executor in `env.executor` (local by default); `--executor` overrides it
//! for a whole run ([`Executors`]).

pub mod docker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::agent::episode::{run_episode, Episode, EpisodeConfig, ExitStatus};
use crate::agent::expert::Expert;
use crate::agent::policy::Policy;
use crate::sandbox::{Limits, LocalSandbox, Workspace};
use crate::tasks::grade::{GradeReport, GradeStatus, Grader};
use crate::tasks::TaskInstance;

pub use crate::tasks::instance::ExecutorKind;

/// Makes episode environments and grades patches.
pub trait Executor: Send + Sync {
    /// A fresh environment for one episode of `task`, at its base; removed when dropped.
    /// `label` names it (unique within the run).
    fn create(&self, task: &TaskInstance, label: &str) -> Result<Box<dyn Workspace + '_>>;
    /// Grades `patch` for `task` in a fresh environment. An `Err` is a failure of the
    /// machinery (the report says when the patch or the tests are at fault).
    fn grade(&self, task: &TaskInstance, patch: &str, label: &str) -> Result<GradeReport>;
}

/// The bubblewrap sandbox's executor.
pub struct LocalExecutor {
    pub grader: Grader,
    /// Limits of the agent's commands (the grader has its own).
    pub limits: Limits,
    /// Where work trees go (a [`crate::sandbox::scratch::Scratch`]).
    pub scratch: PathBuf,
}

impl Executor for LocalExecutor {
    fn create(&self, task: &TaskInstance, label: &str) -> Result<Box<dyn Workspace + '_>> {
        let work = self.scratch.join(format!("ep-{label}"));
        // The agent's sandbox hides what the grader's does.
        let sb = LocalSandbox::for_task(task, &work, self.grader.isolation, self.limits, self.grader.hidden.clone())
            .with_context(|| format!("task {}", task.instance_id))?;
        Ok(Box::new(sb))
    }

    fn grade(&self, task: &TaskInstance, patch: &str, label: &str) -> Result<GradeReport> {
        self.grader.grade(task, patch, &self.scratch.join(format!("grade-{label}")))
    }
}

/// The executors of one run: each task goes to its own (`env.executor`) unless `forced`.
/// The Docker one is connected on first use, so a local suite never needs a daemon.
pub struct Executors {
    pub local: Option<LocalExecutor>,
    pub docker: Option<docker::DockerConfig>,
    pub forced: Option<ExecutorKind>,
    docker_exec: OnceLock<std::result::Result<docker::DockerExecutor, String>>,
}

impl Executors {
    pub fn new(
        local: Option<LocalExecutor>,
        docker: Option<docker::DockerConfig>,
        forced: Option<ExecutorKind>,
    ) -> Self {
        Self { local, docker, forced, docker_exec: OnceLock::new() }
    }

    pub fn kind_for(&self, task: &TaskInstance) -> ExecutorKind {
        self.forced.unwrap_or_else(|| task.env.executor())
    }

    /// The Docker executor, connected now if it is not yet.
    pub fn docker(&self) -> Result<&docker::DockerExecutor> {
        let e = self.docker_exec.get_or_init(|| {
            let cfg = self.docker.clone().unwrap_or_default();
            docker::DockerExecutor::connect(cfg).map_err(|e| format!("{e:#}"))
        });
        e.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn pick(&self, task: &TaskInstance) -> Result<&dyn Executor> {
        match self.kind_for(task) {
            ExecutorKind::Local => {
                if task.env.repo_path.as_os_str().is_empty() {
                    bail!(
                        "task {} has no local snapshot (`env.repo_path`): run it with --executor docker",
                        task.instance_id
                    );
                }
                Ok(self.local.as_ref().context("no local executor in this run")? as &dyn Executor)
            }
            ExecutorKind::Docker => {
                if task.env.image.is_none() {
                    bail!(
                        "task {} has no image (`env.image`): import it with `protege tasks import` or run it with --executor local",
                        task.instance_id
                    );
                }
                Ok(self.docker()? as &dyn Executor)
            }
        }
    }

    /// Connects what `tasks` need before any episode, so that a missing daemon, image or
    /// pytest is one clear error at the start.
    pub fn prepare(&self, tasks: &[TaskInstance]) -> Result<()> {
        let local: Vec<&TaskInstance> = tasks.iter().filter(|t| self.kind_for(t) == ExecutorKind::Local).collect();
        crate::tasks::pytest::ensure(&local)?;
        let docker: Vec<&TaskInstance> = tasks.iter().filter(|t| self.kind_for(t) == ExecutorKind::Docker).collect();
        if docker.is_empty() {
            return Ok(());
        }
        let d = self.docker()?;
        d.ensure_images(&docker)
    }
}

impl Executor for Executors {
    fn create(&self, task: &TaskInstance, label: &str) -> Result<Box<dyn Workspace + '_>> {
        self.pick(task)?.create(task, label)
    }

    fn grade(&self, task: &TaskInstance, patch: &str, label: &str) -> Result<GradeReport> {
        self.pick(task)?.grade(task, patch, label)
    }
}

/// An episode and its grade.
pub struct Graded {
    pub episode: Episode,
    /// `Err`: grading failed, or the episode ended `patch_too_large` (not graded).
    pub grade: Result<GradeReport>,
}

/// Labels for episodes and gradings, unique within the process.
pub fn next_label(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::SeqCst))
}

/// The one path of a graded episode: an environment for `task`, the policy (with its expert)
/// acting in it, the environment removed, the patch graded in a fresh one. An empty patch is
/// not run (the harness's `empty_patch`: it cannot resolve a validated task). `Ok(None)`:
/// the run was stopped by a signal before a result.
pub fn run_graded_episode(
    exec: &dyn Executor,
    task: &TaskInstance,
    label: &str,
    policy: &mut dyn Policy,
    expert: Option<&mut (dyn Expert + '_)>,
    cfg: &EpisodeConfig,
) -> Result<Option<Graded>> {
    let ws = exec.create(task, label)?;
    let episode = run_episode(task, ws.as_ref(), policy, expert, cfg);
    drop(ws);
    if episode.exit_status == ExitStatus::Interrupted {
        return Ok(None);
    }
    let grade = match episode.exit_status {
        ExitStatus::PatchTooLarge => Err(anyhow::anyhow!("not graded: {}", episode.error.clone().unwrap_or_default())),
        _ if episode.patch.trim().is_empty() => {
            Ok(GradeReport::unrun(task, GradeStatus::EmptyPatch, "empty patch: not run"))
        }
        _ => exec.grade(task, &episode.patch, label),
    };
    if crate::interrupt::requested() && grade.is_err() {
        return Ok(None);
    }
    Ok(Some(Graded { episode, grade }))
}

/// The directory a suite lives in (hidden from every sandbox).
pub fn suite_dir(suite: &Path) -> Result<PathBuf> {
    let dir = if suite.is_dir() { suite.to_path_buf() } else { suite.parent().unwrap_or(Path::new(".")).to_path_buf() };
    std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))
}
