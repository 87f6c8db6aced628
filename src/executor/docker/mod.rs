//! The Docker executor: episodes in containers of the instances' own images, on one Docker
//! host or many, through the Docker Engine API (bollard; the API version is negotiated, so a
//! 1.41 daemon works). Grading follows the official SWE-bench harness ([`grade`]).
//!
//! Containers carry the labels `protege=1`, `protege.owner=<hostname>:<pid>`,
//! `protege.run`, `protege.episode` and `protege.task`. They are removed when their episode
//! ends, on errors and on Ctrl-C/SIGTERM (commands are killed, then the containers go); what
//! a killed protege left (its owner process gone) is removed when the next run starts, and
//! `protege docker gc` removes it on demand.

pub mod container;
pub mod grade;
pub mod hosts;

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use bollard::query_parameters::{
    CreateImageOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::sandbox::{Limits, Workspace};
use crate::tasks::grade::GradeReport;
use crate::tasks::protect::Protection;
use crate::tasks::TaskInstance;
use container::{Container, Spec};
use hosts::{Host, HostSpec, Pool};

/// Label names.
pub struct Labels;
impl Labels {
    pub const PROTEGE: &'static str = "protege";
    pub const OWNER: &'static str = "protege.owner";
    pub const RUN: &'static str = "protege.run";
    pub const EPISODE: &'static str = "protege.episode";
    pub const TASK: &'static str = "protege.task";
}

/// The `[docker]` settings of a run (and the flags that override them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Docker hosts, `URL` or `URL=SLOTS` (`unix:///var/run/docker.sock`, `tcp://h:2376`,
    /// `ssh://user@h`); empty: `DOCKER_HOST` or the local socket, one slot per CPU.
    pub hosts: Vec<String>,
    /// Network for the agent's containers (off: `--network none`).
    pub network: bool,
    /// Network while grading: off (the patch's code runs as root for up to `grade_timeout_s`);
    /// `protege grade` turns it on, as the harness grades.
    pub grade_network: bool,
    /// Memory of one container, MiB (0: no limit).
    pub memory_mib: u64,
    /// CPUs of one container (0: no limit).
    pub cpus: f64,
    /// Processes of one container (0: no limit).
    pub pids: i64,
    /// Seconds the eval script may run (the harness's default).
    pub grade_timeout_s: f64,
    /// Pull missing images (with progress) instead of failing with the `docker pull` to run.
    pub pull: bool,
    /// Limits of the agent's commands (timeout, output); from the run's sandbox settings.
    #[serde(skip)]
    pub limits: Limits,
    /// What a patch may not change when graded.
    #[serde(skip)]
    pub protection: Protection,
    /// Names this run in the containers' labels.
    #[serde(skip)]
    pub run: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            hosts: vec![],
            network: false,
            grade_network: false,
            memory_mib: 8192,
            cpus: 2.0,
            pids: 4096,
            grade_timeout_s: 1800.0,
            pull: false,
            limits: Limits::default(),
            protection: Protection::default(),
            run: String::new(),
        }
    }
}

fn owner() -> String {
    format!("{}:{}", hostname(), std::process::id())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

pub struct DockerExecutor {
    pub cfg: DockerConfig,
    pub pool: Pool,
    rt: tokio::runtime::Runtime,
}

impl DockerExecutor {
    /// Connects every host (negotiating the API version), takes out those that do not answer,
    /// and removes containers that killed protege runs left on them.
    pub fn connect(mut cfg: DockerConfig) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("docker")
            .build()
            .context("cannot start the Docker client's runtime")?;
        let specs: Vec<HostSpec> = if cfg.hosts.is_empty() {
            vec![hosts::default_host()]
        } else {
            cfg.hosts.iter().map(|h| h.parse()).collect::<Result<_>>()?
        };
        if cfg.run.is_empty() {
            cfg.run = format!(
                "{}-{}",
                owner().replace(':', "-"),
                std::time::UNIX_EPOCH.elapsed().unwrap_or_default().as_secs()
            );
        }
        let mut hosts = vec![];
        let mut errors = vec![];
        for spec in specs {
            let docker = match hosts::connect(&spec) {
                Ok(d) => d,
                Err(e) => {
                    errors.push(format!("{:#}", e));
                    continue;
                }
            };
            match rt.block_on(async { docker.negotiate_version().await }) {
                Ok(docker) => {
                    hosts.push(Host { spec, docker });
                }
                Err(e) => errors.push(format!("{}: {e}", spec.url)),
            }
        }
        if hosts.is_empty() {
            bail!(
                "no Docker daemon answers ({}); start one (`dockerd`, or `systemctl start docker`) or name hosts with --docker-host",
                errors.join("; ")
            );
        }
        for e in &errors {
            eprintln!("docker host left out: {e}");
        }
        let exec = DockerExecutor { cfg, pool: Pool::new(hosts), rt };
        let removed = exec.gc(false)?;
        if removed > 0 {
            eprintln!("removed {removed} container(s) left by earlier protege runs that were killed");
        }
        Ok(exec)
    }

    /// Removes protege's containers whose owner process is gone (`all`: every protege
    /// container, other live runs' included). Returns how many went.
    pub fn gc(&self, all: bool) -> Result<usize> {
        let here = hostname();
        let mut n = 0;
        for host in &self.pool.hosts {
            let filters = HashMap::from([("label".to_string(), vec![format!("{}=1", Labels::PROTEGE)])]);
            let opts = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
            let list =
                self.rt.block_on(host.docker.list_containers(Some(opts))).with_context(|| host.spec.url.clone())?;
            for c in list {
                let labels = c.labels.unwrap_or_default();
                let owner = labels.get(Labels::OWNER).cloned().unwrap_or_default();
                let alive = match owner.rsplit_once(':') {
                    // EPERM: the process exists (another user's).
                    Some((h, pid)) if h == here => pid.parse::<i32>().is_ok_and(|p| {
                        let r = unsafe { libc::kill(p, 0) };
                        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
                    }),
                    // Another machine's run: only `all` touches it.
                    _ => true,
                };
                if all || !alive {
                    let id = c.id.unwrap_or_default();
                    let opts = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
                    if self.rt.block_on(host.docker.remove_container(&id, Some(opts))).is_ok() {
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Checks that every task's image is on every host that is up (pulling it with `pull`),
    /// and prints their disk use.
    pub fn ensure_images(&self, tasks: &[&TaskInstance]) -> Result<()> {
        let mut images: Vec<&str> = tasks.iter().filter_map(|t| t.env.image.as_deref()).collect();
        images.sort();
        images.dedup();
        for &h in &self.pool.up() {
            let host = &self.pool.hosts[h];
            let mut bytes = 0i64;
            let mut missing = vec![];
            for img in &images {
                match self.rt.block_on(host.docker.inspect_image(img)) {
                    Ok(i) => bytes += i.size.unwrap_or(0),
                    Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                        missing.push(*img)
                    }
                    Err(e) => return Err(e).with_context(|| format!("inspecting {img} on {}", host.spec.url)),
                }
            }
            if !missing.is_empty() && self.cfg.pull {
                for img in &missing {
                    self.pull(host, img)?;
                }
                missing.clear();
            }
            if !missing.is_empty() {
                let shown: Vec<&str> = missing.iter().take(5).copied().collect();
                bail!(
                    "{} of {} images are not on {}: run `docker pull {}`{} (or pass --pull)",
                    missing.len(),
                    images.len(),
                    host.spec.url,
                    shown.join("` `docker pull "),
                    if missing.len() > 5 { " and the rest" } else { "" }
                );
            }
            eprintln!(
                "docker {}: {} image(s), {:.1} GiB on disk",
                host.spec.url,
                images.len(),
                bytes as f64 / (1u64 << 30) as f64
            );
        }
        Ok(())
    }

    fn pull(&self, host: &Host, image: &str) -> Result<()> {
        eprintln!("pulling {image} on {}", host.spec.url);
        let opts = CreateImageOptionsBuilder::default().from_image(image).build();
        self.rt.block_on(async {
            let mut s = host.docker.create_image(Some(opts), None, None);
            let mut last = String::new();
            while let Some(item) = s.next().await {
                let info = item.with_context(|| format!("pulling {image}"))?;
                let pd = info.progress_detail.unwrap_or_default();
                let line = format!(
                    "{} {} {}/{}",
                    info.id.unwrap_or_default(),
                    info.status.unwrap_or_default(),
                    pd.current.unwrap_or(0) >> 20,
                    pd.total.unwrap_or(0) >> 20
                );
                if line != last {
                    eprint!("\r  {}\x1b[K", line.chars().take(100).collect::<String>());
                    last = line;
                }
            }
            eprintln!();
            anyhow::Ok(())
        })
    }

    /// A container for `task` on the least-loaded host; a host that fails is taken out and
    /// another tried.
    pub fn container(&self, task: &TaskInstance, label: &str, network: bool, timeout_s: f64) -> Result<Container<'_>> {
        let spec = Spec {
            image: task.env.image.clone().context("the task has no `env.image`")?,
            workdir: task.env.workdir().to_string(),
            network,
            memory_mib: self.cfg.memory_mib,
            cpus: self.cfg.cpus,
            pids: self.cfg.pids,
            file_mib: self.cfg.limits.file_mib,
            disk_mib: self.cfg.limits.work_tree_mib,
            labels: HashMap::from([
                (Labels::PROTEGE.to_string(), "1".to_string()),
                (Labels::OWNER.to_string(), owner()),
                (Labels::RUN.to_string(), self.cfg.run.clone()),
                (Labels::EPISODE.to_string(), format!("{}-{label}", self.cfg.run)),
                (Labels::TASK.to_string(), task.instance_id.clone()),
            ]),
        };
        loop {
            let lease = self.pool.acquire()?;
            let host = lease.host;
            match Container::start(&self.pool, lease, &self.rt, &spec, timeout_s, self.cfg.limits.output_bytes) {
                Ok(c) => return Ok(c),
                Err(e) if !self.pool.up().contains(&host) => eprintln!("{e:#}"),
                Err(e) => return Err(e),
            }
        }
    }
}

impl super::Executor for DockerExecutor {
    fn create(&self, task: &TaskInstance, label: &str) -> Result<Box<dyn Workspace + '_>> {
        let mut c = self.container(task, label, self.cfg.network, self.cfg.limits.timeout_s)?;
        c.record_base(task.env.base_patch.as_deref())?;
        Ok(Box::new(c))
    }

    fn grade(&self, task: &TaskInstance, patch: &str, label: &str) -> Result<GradeReport> {
        Ok(grade::grade(self, task, patch, &format!("grade-{label}"))?.report)
    }
}
