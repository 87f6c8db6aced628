//! Pieces several commands share: the executor flags and model loading.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use crate::backend::Backend;
use crate::executor::docker::DockerConfig;
use crate::executor::ExecutorKind;
use crate::model::Qwen2;

/// Where episodes run and how the Docker executor reaches its hosts.
#[derive(Args, Clone, Default)]
pub struct ExecArgs {
    /// Run every task with this executor (default: each task's `env.executor`).
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorKind>,
    /// A Docker host, `URL` or `URL=SLOTS` (unix://, tcp:// with DOCKER_TLS_VERIFY, ssh://);
    /// repeatable. Default: DOCKER_HOST or the local socket.
    #[arg(long = "docker-host")]
    pub docker_hosts: Vec<String>,
    /// Give the agent's containers a network (off by default).
    #[arg(long)]
    pub network: bool,
    /// Pull missing images (with progress) instead of failing.
    #[arg(long)]
    pub pull: bool,
    /// Grade with a network (the patch's code then runs with one; off by default except in
    /// `protege grade`, which grades as the harness does).
    #[arg(long, conflicts_with = "grade_offline")]
    pub grade_network: bool,
    /// Grade without a network (for `protege grade`).
    #[arg(long)]
    pub grade_offline: bool,
}

impl ExecArgs {
    /// `base` with these flags applied: hosts replace its hosts, the switches add to its own.
    pub fn docker(&self, mut base: DockerConfig) -> DockerConfig {
        if !self.docker_hosts.is_empty() {
            base.hosts = self.docker_hosts.clone();
        }
        base.network |= self.network;
        base.pull |= self.pull;
        base.grade_network = (base.grade_network || self.grade_network) && !self.grade_offline;
        base
    }
}

/// Loads `dir`, with the PEFT `adapter` merged in when given, and says so on stderr.
pub fn load_model<B: Backend>(be: &B, dir: &Path, adapter: Option<&Path>) -> Result<Qwen2<B>> {
    let t = Instant::now();
    let model =
        Qwen2::load_merged(be, dir, adapter, None).with_context(|| format!("loading model from {}", dir.display()))?;
    let c = &model.cfg;
    eprintln!(
        "loaded {}{} ({:.1}M params, {} layers, hidden {}, heads {}/{}) on {} in {:.1}s",
        dir.display(),
        adapter.map(|a| format!(" + adapter {}", a.display())).unwrap_or_default(),
        c.num_params() as f64 / 1e6,
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        be.name(),
        t.elapsed().as_secs_f64()
    );
    Ok(model)
}
