//! `protege rl`: agentic RL (GRPO) from a TOML config.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::common::ExecArgs;
use crate::backend::{default_device, Device};

#[derive(Args)]
pub struct RlArgs {
    /// TOML config (every field documented in src/config.rs).
    #[arg(long)]
    config: PathBuf,
    /// Continue the run in the config's run directory from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// With --resume: continue although the config differs from the run's config.toml
    /// (otherwise refused, naming every changed setting).
    #[arg(long, requires = "resume")]
    accept_config_change: bool,
    /// cpu, cuda or cuda:N for rollouts and updates (default: cuda when a usable GPU is present).
    #[arg(long)]
    device: Option<Device>,
    #[command(flatten)]
    exec: ExecArgs,
}

pub fn run(a: RlArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).with_context(|| format!("cannot read {}", a.config.display()))?;
    let mut cfg = crate::config::RlConfig::from_file(&a.config)?;
    cfg.rollout.executor = a.exec.executor.or(cfg.rollout.executor);
    cfg.rollout.docker = a.exec.docker(cfg.rollout.docker.clone());
    let device = a.device.unwrap_or_else(default_device);
    if a.resume {
        crate::train::checkpoint::check_resume_config(&cfg.output.run_dir, &text, a.accept_config_change)?;
    }
    let out = crate::train::rl::run_rl_on(device, &cfg, &text, a.resume, None)?;
    eprintln!("rl: {} steps; run directory {}", out.last_step, out.run_dir.display());
    Ok(())
}
