//! `protege tasks`: task suites — validate, import, build, list, show, stats.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use super::common::ExecArgs;
use crate::agent::remote::{Api, Endpoint};
use crate::sandbox::{best_isolation, Isolation, Limits};
use crate::suites::{build, import, validate};
use crate::tasks::load_suite;

#[derive(Subcommand)]
pub enum TasksCommand {
    /// Check every task in the sandbox: FAIL_TO_PASS fail before the fix, everything passes after
    /// it, PASS_TO_PASS pass before and after, in every run. Exits non-zero on any invalid task.
    Validate(ValidateArgs),
    /// Import dataset rows (SWE-bench full/Lite/Verified, SWE-Gym, SWE-smith; JSONL or a JSON
    /// list) into a suite of docker tasks.
    Import(ImportArgs),
    /// Synthesise tasks from PyPI packages: download the source, run its tests, inject bugs with
    /// mutation operators, keep those that the tests catch (SWE-smith style). Resumable.
    Build(BuildArgs),
    /// One line per task: split, files and lines the fix changes, test counts.
    List { suite: PathBuf },
    /// Everything about one task.
    Show { suite: PathBuf, id: String },
    /// Counts by package, operator and difficulty.
    Stats { suite: PathBuf },
}

#[derive(Args)]
pub struct ValidateArgs {
    /// A suite: a JSONL file, or a directory holding tasks.jsonl.
    suite: PathBuf,
    /// Repetitions per task (flaky tests show up as invalid).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Only these instance ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Seconds for one test run.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Run tests as plain subprocesses even when bubblewrap works (not isolated).
    #[arg(long)]
    no_sandbox: bool,
    /// Also protect these paths from patches when grading (as `eval --protect`); a gold
    /// patch that changes a protected file makes its task invalid. Repeatable.
    #[arg(long = "protect")]
    protect: Vec<String>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    exec: ExecArgs,
}

#[derive(Args)]
pub struct ImportArgs {
    files: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    dataset: import::Dataset,
    /// Image names: `{id}`, `{id_1776}` (SWE-bench's form), `{id_s}` (SWE-Gym's).
    #[arg(long)]
    image_template: Option<String>,
    /// Test command for rows with no eval script and no spec (SWE-smith's default: pytest -rA).
    #[arg(long)]
    test_cmd: Option<String>,
}

/// The API of the model that writes problem statements (`--writer`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WriterApi {
    Openai,
    Anthropic,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Packages as NAME==VERSION (repeatable).
    #[arg(long = "pypi", required_unless_present = "sdists", num_args = 1..)]
    packages: Vec<String>,
    /// Local source distributions (NAME-VERSION.tar.gz, .zip) or source directories.
    #[arg(long = "sdist", num_args = 1..)]
    sdists: Vec<PathBuf>,
    /// Output suite directory (tasks.jsonl, repos/, .work/); keep it out of git.
    #[arg(long)]
    out: PathBuf,
    /// Drop a mutant that fails more than this share of the passing tests.
    #[arg(long, default_value_t = 0.2)]
    max_fail_share: f64,
    /// Mutants tried per package.
    #[arg(long, default_value_t = 200)]
    max_mutants: usize,
    /// Mutants tried per source file and per function (diversity caps).
    #[arg(long, default_value_t = 150)]
    per_file: usize,
    #[arg(long, default_value_t = 3)]
    per_function: usize,
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Seconds for one run of a package's test suite.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    no_sandbox: bool,
    /// A model that writes the problem statements: `openai` or `anthropic` (with
    /// --writer-url, --writer-model, --writer-key-env); default: a template.
    #[arg(long, value_enum)]
    writer: Option<WriterApi>,
    #[arg(long, requires = "writer")]
    writer_url: Option<String>,
    #[arg(long, requires = "writer")]
    writer_model: Option<String>,
    #[arg(long, requires = "writer")]
    writer_key_env: Option<String>,
}

/// Returns whether every task was valid (validate) or true.
pub fn run(c: TasksCommand) -> Result<bool> {
    match c {
        TasksCommand::Validate(a) => run_validate(a),
        TasksCommand::Import(a) => {
            let o =
                import::ImportOptions { dataset: a.dataset, image_template: a.image_template, test_cmd: a.test_cmd };
            let n = import::import(&a.files, &a.out, &o)?;
            eprintln!("tasks import: {n} docker tasks in {}", a.out.join("tasks.jsonl").display());
            Ok(true)
        }
        TasksCommand::Build(a) => run_build(a).map(|_| true),
        TasksCommand::List { suite } => {
            print!("{}", validate::list(&load_suite(&suite)?));
            Ok(true)
        }
        TasksCommand::Stats { suite } => {
            print!("{}", validate::stats(&load_suite(&suite)?));
            Ok(true)
        }
        TasksCommand::Show { suite, id } => {
            let all = load_suite(&suite)?;
            let t = all
                .iter()
                .find(|t| t.instance_id == id)
                .with_context(|| format!("no task {id:?} in {}", suite.display()))?;
            println!("{}", serde_json::to_string_pretty(t)?);
            Ok(true)
        }
    }
}

/// Returns whether every task was valid.
fn run_validate(a: ValidateArgs) -> Result<bool> {
    let ValidateArgs { suite, runs, concurrency, tasks, timeout, no_sandbox, protect, json, exec } = a;
    let mut all = load_suite(&suite)?;
    if !tasks.is_empty() {
        all.retain(|t| tasks.contains(&t.instance_id));
        if all.len() != tasks.len() {
            bail!("some of --tasks are not in {}", suite.display());
        }
    }
    let isolation = if no_sandbox { Isolation::Plain } else { best_isolation() };
    let limits = Limits { timeout_s: timeout, cpu_s: timeout.ceil() as u64 * 2, ..Default::default() };
    let mut protection = crate::tasks::protect::Protection::default();
    protection.paths.extend(protect);
    protection.validate()?;
    let suite_dir = if suite.is_dir() { suite.clone() } else { suite.parent().unwrap_or(&suite).to_path_buf() };
    let grader = crate::tasks::grade::Grader {
        hidden: vec![suite_dir.canonicalize()?],
        ..crate::tasks::grade::Grader::new(isolation, limits, protection)
    };
    let scratch = crate::sandbox::scratch::Scratch::new("validate")?;
    let docker = exec.docker(crate::executor::docker::DockerConfig {
        limits,
        protection: grader.protection.clone(),
        grade_timeout_s: timeout.max(1800.0),
        ..Default::default()
    });
    let local = crate::executor::LocalExecutor { grader, limits, scratch: scratch.path().to_path_buf() };
    let executors = crate::executor::Executors::new(Some(local), Some(docker), exec.executor);
    executors.prepare(&all)?;
    let results = validate::validate_suite(&all, &executors, runs, concurrency)?;
    println!("| task | valid | seconds | problems |\n|---|---|---|---|");
    for v in &results {
        println!(
            "| {} | {} | {:.1} | {} |",
            v.instance_id,
            if v.valid { "yes" } else { "NO" },
            v.seconds,
            v.problems.join("; ")
        );
    }
    let invalid = results.iter().filter(|v| !v.valid).count();
    println!(
        "\n{} of {} tasks valid ({runs} runs each, sandbox {isolation:?})",
        results.len() - invalid,
        results.len()
    );
    if let Some(path) = json {
        crate::util::write_atomic(&path, serde_json::to_string_pretty(&results)?.as_bytes())?;
    }
    Ok(invalid == 0)
}

fn run_build(a: BuildArgs) -> Result<()> {
    let writer = match a.writer {
        None => None,
        Some(api) => Some(Endpoint {
            api: match api {
                WriterApi::Openai => Api::Openai,
                WriterApi::Anthropic => Api::Anthropic,
            },
            base_url: a.writer_url.context("--writer needs --writer-url")?,
            model: a.writer_model.context("--writer needs --writer-model")?,
            api_key_env: a.writer_key_env,
            pricing: Default::default(),
            http: Default::default(),
        }),
    };
    let opts = build::BuildOptions {
        packages: a.packages,
        sdists: a.sdists,
        out: a.out.clone(),
        max_fail_share: a.max_fail_share,
        max_mutants: a.max_mutants,
        per_file: a.per_file,
        per_function: a.per_function,
        concurrency: a.concurrency,
        seed: a.seed,
        limits: Limits {
            timeout_s: a.timeout,
            cpu_s: a.timeout.ceil() as u64 * 2,
            output_bytes: 64 << 20,
            ..Default::default()
        },
        isolation: if a.no_sandbox { Isolation::Plain } else { best_isolation() },
        writer,
    };
    let started = Instant::now();
    let (reports, n) = build::build(&opts)?;
    println!("| package | pytest | passing tests | mutants tried | valid | outcomes | error |\n|---|---|---|---|---|---|---|");
    for r in &reports {
        println!(
            "| {} | {} | {} | {} | {} | {:?} | {} |",
            r.package,
            r.pytest,
            r.passing_tests,
            r.tried,
            r.valid,
            r.by_status,
            r.error.as_deref().unwrap_or("").lines().next().unwrap_or("")
        );
    }
    println!("\n{n} tasks in {} ({:.0} s)", a.out.join("tasks.jsonl").display(), started.elapsed().as_secs_f64());
    Ok(())
}
