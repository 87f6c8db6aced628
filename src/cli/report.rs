//! `protege report`: plots and a Markdown summary of a run directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct ReportArgs {
    /// A run directory (of protege train, rl or sft).
    run_dir: PathBuf,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let p = crate::report::write_report(&a.run_dir)?;
    eprintln!("report: {}", p.display());
    Ok(())
}
