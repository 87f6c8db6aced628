//! The `protege` command line: one module per command, each holding its arguments beside a
//! `run` that calls the library. `main.rs` only calls [`main`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check_logits;
mod common;
mod docker;
mod eval;
mod export;
mod generate;
mod grade;
mod info;
mod launch;
mod report;
mod rl;
mod selftest;
mod serve;
mod sft;
mod synth;
mod tasks;
mod train;

#[derive(Parser)]
#[command(
    name = "protege",
    version,
    about = "Post-train a small Qwen2 into a software-engineering agent that knows when to ask an expert"
)]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion and stream it to stdout (tokens/s go to stderr).
    Generate(generate::GenerateArgs),
    /// Compare the model's logits with a reference file; exits non-zero beyond tolerance.
    CheckLogits(check_logits::CheckLogitsArgs),
    /// Measure prefill and decode throughput (tokens/s) of a model, or (--sft) one training step.
    Bench(bench::BenchArgs),
    /// Supervised fine-tuning on trajectory files (loss on the agent's tokens only).
    Sft(sft::SftArgs),
    /// Write a model as an HF directory like transformers' save_pretrained (sharded, the
    /// source's dtype by default, tokenizer files), with a PEFT LoRA adapter merged in (--merge).
    Export(export::ExportArgs),
    /// Run agent episodes on a task suite in the sandbox, grade them, write trajectories and a summary.
    Eval(Box<eval::EvalArgs>),
    /// Task suites: validate, import, build, list, show, stats.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// Grade predictions as the official SWE-bench harness does (per-instance logs and a
    /// report.json with its keys).
    Grade(grade::GradeArgs),
    /// Docker executor housekeeping.
    #[command(subcommand)]
    Docker(docker::DockerCommand),
    /// Serve a model over OpenAI-compatible /v1/chat/completions and Anthropic-compatible /v1/messages.
    Serve(serve::ServeArgs),
    /// Expert-augmented trajectories: an agent works tasks with an expert that sees the gold
    /// patch; resolved episodes are kept (rejection sampling).
    Synth(synth::ResumableArgs),
    /// Agentic RL (GRPO) with the SWE-Protégé reward and a curriculum of stages.
    Rl(rl::RlArgs),
    /// The whole pipeline: synth -> sft -> rl -> eval -> report. With no --config, the embedded
    /// demo (configs/demo.toml: tiny model, bundled tasks, CPU).
    Train(train::TrainArgs),
    /// Plots (PNG) and a Markdown summary of a run directory.
    Report(report::ReportArgs),
    /// What this machine offers: CPU, memory, GPUs, CUDA driver, NVRTC and libraries.
    Info,
    /// Start the ranks of a data-parallel run on this machine, one per GPU, with torchrun's
    /// environment: `protege launch --gpus 8 -- sft --config run.toml`.
    Launch(launch::LaunchArgs),
    /// Check a device backend against the CPU reference: every kernel over a sweep of shapes,
    /// whole-model logits and greedy decoding. Exits non-zero on any failure.
    Selftest(selftest::SelftestArgs),
}

impl Command {
    /// Runs the command; `Ok(false)` is a completed run that found a failure (exit status 1).
    fn run(self) -> anyhow::Result<bool> {
        match self {
            Command::Generate(a) => generate::run(a).map(|_| true),
            Command::CheckLogits(a) => check_logits::run(a),
            Command::Bench(a) => bench::run(a).map(|_| true),
            Command::Sft(a) => sft::run(a).map(|_| true),
            Command::Export(a) => export::run(a).map(|_| true),
            Command::Eval(a) => eval::run(*a).map(|_| true),
            Command::Tasks(c) => tasks::run(c),
            Command::Grade(a) => grade::run(a),
            Command::Docker(c) => docker::run(c).map(|_| true),
            Command::Serve(a) => serve::run(a).map(|_| true),
            Command::Synth(a) => synth::run(a).map(|_| true),
            Command::Rl(a) => rl::run(a).map(|_| true),
            Command::Train(a) => train::run(a).map(|_| true),
            Command::Report(a) => report::run(a).map(|_| true),
            Command::Info => info::run().map(|_| true),
            Command::Launch(a) => launch::run(a).map(|_| true),
            Command::Selftest(a) => selftest::run(a),
        }
    }
}

/// The open-file limit raised to its hard limit: deep work trees are removed with one
/// descriptor per level, and many sandboxes run at once.
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The whole program: parses the command line, sets up the thread pool, runs the command and
/// turns its outcome into the exit status (1 on failure; 128 + the signal when interrupted).
pub fn main() -> ExitCode {
    raise_open_file_limit();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            eprintln!("error: cannot set up {n} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    match cli.command.run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Stopped by a signal: the shell's convention, 128 + the signal.
            match e.downcast_ref::<crate::interrupt::Interrupted>() {
                Some(i) if i.0 > 0 => ExitCode::from((128 + i.0) as u8),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn names<E: clap::ValueEnum>() -> Vec<String> {
        E::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| p.get_name().to_string()).collect()
    }

    /// The closed sets accept the spellings (in the order) they always have.
    #[test]
    fn value_enums_keep_their_spellings() {
        assert_eq!(names::<export::Dtype>(), ["source", "f32", "bf16", "f16"]);
        assert_eq!(names::<bench::SftMode>(), ["full", "lora"]);
        assert_eq!(names::<eval::PolicyKind>(), ["local", "replay", "openai"]);
        assert_eq!(names::<eval::ExpertKind>(), ["none", "oracle", "openai", "anthropic", "local"]);
        assert_eq!(names::<tasks::WriterApi>(), ["openai", "anthropic"]);
    }

    #[test]
    fn command_lines_parse() {
        let cli = Cli::try_parse_from(["protege", "export", "--model", "m", "--out", "o"]).unwrap();
        assert!(matches!(cli.command, Command::Export(_)));
        let cli = Cli::try_parse_from(["protege", "--threads", "3", "selftest", "--device", "cuda:1"]).unwrap();
        assert_eq!(cli.threads, Some(3));
        assert!(Cli::try_parse_from(["protege", "export", "--model", "m", "--out", "o", "--dtype", "BF16"]).is_err());
    }
}
