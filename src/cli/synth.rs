//! `protege synth`: expert-augmented trajectories by rejection sampling.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::common::ExecArgs;

#[derive(Args)]
pub struct ResumableArgs {
    /// TOML config (every field documented in src/config.rs).
    #[arg(long)]
    config: PathBuf,
    /// Continue the run in the config's run directory from its last checkpoint.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

pub fn run(a: ResumableArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).with_context(|| format!("cannot read {}", a.config.display()))?;
    let mut cfg = crate::config::SynthConfig::from_file(&a.config)?;
    cfg.executor = a.exec.executor.or(cfg.executor);
    cfg.docker = a.exec.docker(cfg.docker.clone());
    if cfg.agent.kind == "scripted" {
        eprintln!("synth: the agent is the {}", crate::agent::teacher::TEACHER_LABEL);
    }
    let s = crate::synth::run_synth(&cfg, &text, a.resume)?;
    eprintln!(
        "synth: {} of {} attempts accepted ({:.0}%) over {} tasks; {:.2} expert calls and {:.1} steps per accepted \
         trajectory; {} policy and {} expert tokens; ${:.4}; rejected: {:?}",
        s.accepted,
        s.attempts,
        100.0 * s.accept_rate,
        s.tasks,
        s.expert_calls_per_accepted,
        s.steps_per_accepted,
        s.policy_tokens,
        s.expert_tokens,
        s.cost_usd,
        s.rejected
    );
    eprintln!("synth: {}", cfg.output.run_dir.join("trajectories.jsonl").display());
    Ok(())
}
