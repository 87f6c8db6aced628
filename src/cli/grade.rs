//! `protege grade`: predictions graded as the official SWE-bench harness does.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::common::ExecArgs;
use crate::executor::docker::DockerConfig;
use crate::executor::{Executors, LocalExecutor};
use crate::sandbox::{best_isolation, scratch::Scratch, Limits};
use crate::suites::{evaluate, import};
use crate::tasks::protect::Protection;

#[derive(Args)]
pub struct GradeArgs {
    /// A protege suite, or a dataset file (JSONL/JSON rows of SWE-bench, SWE-Gym, SWE-smith).
    #[arg(long)]
    suite: PathBuf,
    /// Predictions: {"instance_id", "model_name_or_path", "model_patch"} per line.
    #[arg(long)]
    predictions: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Drop no file from patches (exactly the harness; by default changes to tests and test
    /// configuration are put back before the tests run, and reported).
    #[arg(long)]
    no_protect: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

pub fn run(a: GradeArgs) -> Result<bool> {
    // A suite, or a dataset file imported on the fly.
    let tasks = match crate::tasks::load_suite(&a.suite) {
        Ok(t) => t,
        Err(suite_err) => {
            let rows = import::read_rows(&a.suite).context(format!("{suite_err:#}"))?;
            let o = import::ImportOptions::default();
            rows.iter().map(|r| import::row_to_task(r, &o)).collect::<Result<Vec<_>>>().with_context(|| {
                format!("{} is neither a protege suite ({suite_err:#}) nor dataset rows", a.suite.display())
            })?
        }
    };
    let predictions = evaluate::read_predictions(&a.predictions)?;
    let protection = if a.no_protect { Protection { paths: vec![], test_files: false } } else { Protection::default() };
    let limits = Limits { timeout_s: 1800.0, cpu_s: 3600, ..Default::default() };
    let scratch = Scratch::new("grade")?;
    let isolation = best_isolation();
    let grader = crate::tasks::grade::Grader::new(isolation, limits, protection.clone());
    let local = LocalExecutor { grader, limits, scratch: scratch.path().to_path_buf() };
    // As the harness: tests run with a network unless --grade-offline.
    let docker = a.exec.docker(DockerConfig { limits, protection, grade_network: true, ..Default::default() });
    let executors = Executors::new(Some(local), Some(docker), a.exec.executor);
    let r = evaluate::grade_predictions(&tasks, &predictions, &executors, a.workers, &a.out)?;
    println!(
        "resolved {} / submitted {} (unresolved {}, empty patch {}, error {}; {} instances in the suite); report: {}",
        r.resolved_instances,
        r.submitted_instances,
        r.unresolved_instances,
        r.empty_patch_instances,
        r.error_instances,
        r.total_instances,
        a.out.join("report.json").display()
    );
    Ok(true)
}
