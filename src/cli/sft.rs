//! `protege sft`: supervised fine-tuning from a TOML config, one rank of a data-parallel run
//! when started by `protege launch`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::backend::{default_device, Device};

#[derive(Args)]
pub struct SftArgs {
    /// TOML run configuration (see src/config.rs for every field).
    #[arg(long)]
    config: PathBuf,
    /// Continue the run in the config's output.run_dir from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// With --resume: continue although the config differs from the run's config.toml
    /// (otherwise refused, naming every changed setting).
    #[arg(long, requires = "resume")]
    accept_config_change: bool,
    /// cpu, cuda or cuda:N (default: cuda when a usable GPU is present, else cpu).
    #[arg(long)]
    device: Option<Device>,
}

pub fn run(a: SftArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).with_context(|| format!("cannot read {}", a.config.display()))?;
    let cfg = crate::config::SftConfig::from_file(&a.config)?;
    let world = crate::train::dist::World::from_env()?;
    // A rank of a data-parallel run takes the GPU of its LOCAL_RANK.
    let device = a.device.unwrap_or_else(|| match default_device() {
        Device::Cuda(_) => Device::Cuda(world.local_rank % crate::backend::cuda::device_count().max(1)),
        d => d,
    });
    if a.resume {
        crate::train::checkpoint::check_resume_config(&cfg.output.run_dir, &text, a.accept_config_change)?;
    }
    let out = crate::train::sft::run_sft_on(device, &world, &cfg, &text, a.resume, None)?;
    if !world.is_main() {
        return Ok(());
    }
    if let Some(m) = out.metrics.last() {
        eprintln!(
            "sft: step {} loss {:.4}{}",
            m.step,
            m.loss,
            m.eval_loss.map(|e| format!(", eval loss {e:.4}")).unwrap_or_default()
        );
    }
    eprintln!("sft: run directory {}", out.run_dir.display());
    Ok(())
}
