//! `protege train`: the whole pipeline (synth, sft, rl, eval, report) from one config, or the
//! embedded demo.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::pipeline::{run_pipeline, Pipeline, DEMO_CONFIG};

#[derive(Args)]
pub struct TrainArgs {
    /// Pipeline config; the embedded demo when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the embedded demo config and exit.
    #[arg(long)]
    print_demo_config: bool,
}

pub fn run(a: TrainArgs) -> Result<()> {
    if a.print_demo_config {
        print!("{DEMO_CONFIG}");
        return Ok(());
    }
    let p = match &a.config {
        Some(c) => Pipeline::from_file(c)?,
        None => Pipeline::demo()?,
    };
    run_pipeline(&p)?;
    Ok(())
}
