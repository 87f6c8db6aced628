//! The `protege` command line: parses arguments and calls one library function per command.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use protege::executor::ExecutorKind;

use protege::backend::cpu::CpuBackend;
use protege::backend::cuda::Device;
use protege::backend::{Backend, SamplingParams};
use protege::chat::{Conversation, Message};
use protege::check::{check_logits, Reference};
use protege::generate::{generate, Finish, GenOptions, Request, TextStream};
use protege::model::Qwen2;
use protege::tokenizer::Tokenizer;

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
    Generate(GenerateArgs),
    /// Compare the model's logits with a reference file; exits non-zero beyond tolerance.
    CheckLogits(CheckLogitsArgs),
    /// Measure prefill and decode throughput (tokens/s) of a model, or (--sft) one training step.
    Bench(BenchArgs),
    /// Supervised fine-tuning on trajectory files (loss on the agent's tokens only).
    Sft(SftArgs),
    /// Write a model as an HF directory like transformers' save_pretrained (sharded, the
    /// source's dtype by default, tokenizer files), with a PEFT LoRA adapter merged in (--merge).
    Export(ExportArgs),
    /// Run agent episodes on a task suite in the sandbox, grade them, write trajectories and a summary.
    Eval(Box<EvalArgs>),
    /// Task suites: validate, import, build, list, show, stats.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Grade predictions as the official SWE-bench harness does (per-instance logs and a
    /// report.json with its keys).
    Grade(GradeArgs),
    /// Docker executor housekeeping.
    #[command(subcommand)]
    Docker(DockerCommand),
    /// Serve a model over OpenAI-compatible /v1/chat/completions and Anthropic-compatible /v1/messages.
    Serve(ServeArgs),
    /// Expert-augmented trajectories: an agent works tasks with an expert that sees the gold
    /// patch; resolved episodes are kept (rejection sampling).
    Synth(ResumableArgs),
    /// Agentic RL (GRPO) with the SWE-Protégé reward and a curriculum of stages.
    Rl(RlArgs),
    /// The whole pipeline: synth -> sft -> rl -> eval -> report. With no --config, the embedded
    /// demo (configs/demo.toml: tiny model, bundled tasks, CPU).
    Train(TrainArgs),
    /// Plots (PNG) and a Markdown summary of a run directory.
    Report(ReportArgs),
    /// What this machine offers: CPU, memory, GPUs, CUDA driver, NVRTC and libraries.
    Info,
    /// Start the ranks of a data-parallel run on this machine, one per GPU, with torchrun's
    /// environment: `protege launch --gpus 8 -- sft --config run.toml`.
    Launch(LaunchArgs),
    /// Check a device backend against the CPU reference: every kernel over a sweep of shapes,
    /// whole-model logits and greedy decoding. Exits non-zero on any failure.
    Selftest(SelftestArgs),
}

#[derive(Args)]
struct LaunchArgs {
    /// Ranks (processes) on this machine; default: one per GPU.
    #[arg(long, visible_alias = "procs")]
    gpus: Option<usize>,
    /// Machines in the run.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This machine's index among them.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Address of the machine of rank 0.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port rank 0 listens on (default: a free one; required with several machines).
    #[arg(long)]
    master_port: Option<u16>,
    /// The protege command every rank runs, after `--`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct SelftestArgs {
    /// The backend under test (the CPU backend against itself checks only the harness).
    #[arg(long, default_value = "cuda")]
    device: Device,
    /// Directory with the fixture models (tiny, tiny-untied, odd) and their reference logits.
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// More model directories to compare with the CPU backend (e.g. the real 0.5B).
    #[arg(long)]
    model: Vec<PathBuf>,
    /// Also write every check as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Where episodes run and how the Docker executor reaches its hosts.
#[derive(Args, Clone, Default)]
struct ExecArgs {
    /// Run every task with this executor (default: each task's `env.executor`).
    #[arg(long, value_enum)]
    executor: Option<ExecutorKind>,
    /// A Docker host, `URL` or `URL=SLOTS` (unix://, tcp:// with DOCKER_TLS_VERIFY, ssh://);
    /// repeatable. Default: DOCKER_HOST or the local socket.
    #[arg(long = "docker-host")]
    docker_hosts: Vec<String>,
    /// Give the agent's containers a network (off by default).
    #[arg(long)]
    network: bool,
    /// Pull missing images (with progress) instead of failing.
    #[arg(long)]
    pull: bool,
    /// Grade with a network (the patch's code then runs with one; off by default except in
    /// `protege grade`, which grades as the harness does).
    #[arg(long, conflicts_with = "grade_offline")]
    grade_network: bool,
    /// Grade without a network (for `protege grade`).
    #[arg(long)]
    grade_offline: bool,
}

impl ExecArgs {
    fn docker(&self, mut base: protege::executor::docker::DockerConfig) -> protege::executor::docker::DockerConfig {
        if !self.docker_hosts.is_empty() {
            base.hosts = self.docker_hosts.clone();
        }
        base.network |= self.network;
        base.pull |= self.pull;
        base.grade_network = (base.grade_network || self.grade_network) && !self.grade_offline;
        base
    }
}

#[derive(Args)]
struct ResumableArgs {
    /// TOML config (every field documented in src/config.rs).
    #[arg(long)]
    config: PathBuf,
    /// Continue the run in the config's run directory from its last checkpoint.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

#[derive(Args)]
struct RlArgs {
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

#[derive(Args)]
struct TrainArgs {
    /// Pipeline config; the embedded demo when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the embedded demo config and exit.
    #[arg(long)]
    print_demo_config: bool,
}

#[derive(Args)]
struct ReportArgs {
    /// A run directory (of protege train, rl or sft).
    run_dir: PathBuf,
}

#[derive(Args)]
struct GradeArgs {
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

#[derive(Subcommand)]
enum DockerCommand {
    /// Remove containers that killed protege runs left (`--all`: every protege container).
    Gc {
        #[arg(long)]
        all: bool,
        #[arg(long = "docker-host")]
        docker_hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TasksCommand {
    /// Check every task in the sandbox: FAIL_TO_PASS fail before the fix, everything passes after
    /// it, PASS_TO_PASS pass before and after, in every run. Exits non-zero on any invalid task.
    Validate {
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
    },
    /// Import dataset rows (SWE-bench full/Lite/Verified, SWE-Gym, SWE-smith; JSONL or a JSON
    /// list) into a suite of docker tasks.
    Import {
        files: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        dataset: protege::swebench::import::Dataset,
        /// Image names: `{id}`, `{id_1776}` (SWE-bench's form), `{id_s}` (SWE-Gym's).
        #[arg(long)]
        image_template: Option<String>,
        /// Test command for rows with no eval script and no spec (SWE-smith's default: pytest -rA).
        #[arg(long)]
        test_cmd: Option<String>,
    },
    /// Synthesise tasks from PyPI packages: download the source, run its tests, inject bugs with
    /// mutation operators, keep those that the tests catch (SWE-smith style). Resumable.
    Build {
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
        #[arg(long, value_parser = ["openai", "anthropic"])]
        writer: Option<String>,
        #[arg(long, requires = "writer")]
        writer_url: Option<String>,
        #[arg(long, requires = "writer")]
        writer_model: Option<String>,
        #[arg(long, requires = "writer")]
        writer_key_env: Option<String>,
    },
    /// One line per task: split, files and lines the fix changes, test counts.
    List { suite: PathBuf },
    /// Everything about one task.
    Show { suite: PathBuf, id: String },
    /// Counts by package, operator and difficulty.
    Stats { suite: PathBuf },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback by default; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: std::net::SocketAddr,
    /// The model name the API reports.
    #[arg(long, default_value = "protege")]
    name: String,
    /// Context length in tokens, overriding config.json's max_position_embeddings.
    #[arg(long)]
    context: Option<usize>,
    /// cpu, cuda or cuda:N (default: cuda when a usable GPU is present, else cpu).
    #[arg(long)]
    device: Option<Device>,
    /// A PEFT LoRA adapter served unmerged under --name.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// More adapters on the same base, each under its own model name: NAME=DIR (repeatable),
    /// as vLLM's --lora-modules.
    #[arg(long = "lora-modules", value_parser = parse_lora_module, num_args = 1..)]
    lora_modules: Vec<(String, PathBuf)>,
    /// Tokens the KV cache holds for all requests in flight (default: the context, at least 32768).
    #[arg(long)]
    kv_cache_tokens: Option<usize>,
    /// Require this key (`Authorization: Bearer KEY` or `x-api-key: KEY`); default: the
    /// PROTEGE_API_KEY environment variable when set.
    #[arg(long, env = "PROTEGE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, default_value_t = protege::serve::DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Tokens a reply may have when a request gives no max_tokens (the KV cache is reserved
    /// for a request's whole length when it joins the batch).
    #[arg(long, default_value_t = protege::serve::DEFAULT_MAX_TOKENS)]
    default_max_tokens: usize,
}

fn parse_lora_module(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok((name.to_string(), PathBuf::from(dir))),
        _ => Err(format!("expected NAME=DIR, got {s:?}")),
    }
}

#[derive(Args)]
struct EvalArgs {
    /// Task suite: a JSONL file, or a directory holding tasks.jsonl.
    #[arg(long)]
    suite: PathBuf,
    /// Who plays the agent: `local` (protege's engine on --model), `replay` (--replay FILE) or
    /// `openai` (an OpenAI-compatible server: --policy-url, --policy-model).
    #[arg(long, value_parser = ["local", "replay", "openai"], default_value = "local")]
    policy: String,
    /// Base URL of the policy's server, e.g. http://127.0.0.1:8000/v1.
    #[arg(long, required_if_eq("policy", "openai"))]
    policy_url: Option<String>,
    #[arg(long, default_value = "default")]
    policy_model: String,
    /// Environment variable holding the policy server's API key.
    #[arg(long)]
    policy_key_env: Option<String>,
    /// HF model directory of the local policy.
    #[arg(long, required_if_eq("policy", "local"))]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter directory merged into the local policy's --model at load.
    #[arg(long, requires = "model")]
    adapter: Option<PathBuf>,
    /// Context length of the local policy in tokens, overriding config.json's
    /// max_position_embeddings.
    #[arg(long)]
    context: Option<usize>,
    /// Where the local policy runs: cpu, cuda or cuda:N (default: cuda when a usable GPU is
    /// present, else cpu).
    #[arg(long)]
    device: Option<Device>,
    /// Recorded replies for the replay policy: {"instance_id": ["reply", ...], ...}.
    #[arg(long, required_if_eq("policy", "replay"))]
    replay: Option<PathBuf>,
    /// The expert behind ask_expert: `none`, `oracle` (guidance from the gold patch), `openai`
    /// or `anthropic` (--expert-url, --expert-model, --expert-key-env), or `local` (--expert-model
    /// is then an HF model directory).
    #[arg(long, value_parser = ["none", "oracle", "openai", "anthropic", "local"], default_value = "oracle")]
    expert: String,
    /// Base URL of the expert's API, e.g. https://api.anthropic.com or http://127.0.0.1:8000/v1.
    #[arg(long)]
    expert_url: Option<String>,
    #[arg(long)]
    expert_model: Option<String>,
    /// With --expert local: a PEFT LoRA adapter merged into the expert's model.
    #[arg(long, requires = "expert_model")]
    expert_adapter: Option<PathBuf>,
    /// Environment variable holding the expert API's key (keys are never passed on the command line).
    #[arg(long)]
    expert_key_env: Option<String>,
    /// Expert price, USD per million input and output tokens: IN,OUT.
    #[arg(long, value_delimiter = ',', num_args = 2)]
    expert_price: Vec<f64>,
    /// Longest expert reply, tokens.
    #[arg(long, default_value_t = 1024)]
    expert_max_tokens: usize,
    /// Seconds an HTTP request may take before it is retried.
    #[arg(long, default_value_t = 120.0)]
    http_timeout: f64,
    /// HTTP attempts per request (retries on timeouts, 429 and 5xx).
    #[arg(long, default_value_t = 4)]
    http_tries: usize,
    /// Episodes run at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Output directory (trajectories.jsonl, predictions.jsonl, results.jsonl, summary.json,
    /// summary.md). One that already holds files is refused without --resume or --overwrite.
    #[arg(long)]
    out: PathBuf,
    /// Finish the evaluation in --out: its finished tasks are kept, the others run (it must be
    /// the same suite, policy, expert and seed).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace the evaluation in --out.
    #[arg(long)]
    overwrite: bool,
    /// Only these instance ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    #[arg(long, default_value_t = 75)]
    max_steps: usize,
    #[arg(long, default_value_t = 6)]
    expert_quota: usize,
    /// Context budget of an episode, tokens.
    #[arg(long, default_value_t = 32768)]
    context_tokens: usize,
    /// Seconds per command.
    #[arg(long, default_value_t = 60.0)]
    command_timeout: f64,
    /// Largest reply of the local policy, tokens.
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run commands as plain subprocesses even when bubblewrap works: NOT isolated (see the
    /// README's sandbox section for what that leaves open).
    #[arg(long)]
    no_sandbox: bool,
    /// Also protect these paths (gitignore-like globs) from the agent's patch when grading,
    /// beyond the defaults (tests, conftest.py, pytest/tox/setup.cfg/pyproject configuration,
    /// sitecustomize and .pth files). Repeatable.
    #[arg(long = "protect")]
    protect: Vec<String>,
    #[command(flatten)]
    exec: ExecArgs,
}

#[derive(Args)]
struct SftArgs {
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

#[derive(Args)]
struct ExportArgs {
    /// HF model directory (config.json, safetensors, tokenizer files).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to merge.
    #[arg(long, requires = "merge")]
    adapter: Option<PathBuf>,
    /// Merge --adapter into the weights (W + scale·BA), as peft's merge_and_unload.
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// Output directory; refused when it is not empty, unless --overwrite.
    #[arg(long)]
    out: PathBuf,
    /// Element type of the weights: source (the model's checkpoint's), f32, bf16 or f16.
    #[arg(long, default_value = "source", value_parser = ["source", "f32", "bf16", "f16"])]
    dtype: String,
    /// Largest safetensors shard (transformers' max_shard_size): bytes, or KB/MB/GB, KiB/MiB/GiB.
    #[arg(long, default_value = protege::model::hf_dir::DEFAULT_MAX_SHARD_SIZE)]
    max_shard_size: String,
    /// Replace a non-empty --out.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// HF model directory: prefill/decode tokens/s of this model (required on the CPU).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter merged into --model.
    #[arg(long, requires = "model")]
    adapter: Option<PathBuf>,
    /// cpu, cuda or cuda:N (default: cuda when a usable GPU is present, else cpu).
    #[arg(long)]
    device: Option<Device>,
    /// Prompt length processed in one prefill forward.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Greedy decode steps timed after the prompt.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Timed repetitions (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Time one SFT step (forward, backward, AdamW) over --prefill-tokens tokens instead:
    /// `full` fine-tuning or `lora` (all seven modules, rank --lora-rank).
    #[arg(long, value_parser = ["full", "lora"])]
    sft: Option<String>,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// With --sft: recompute each layer's activations in the backward.
    #[arg(long)]
    recompute: bool,
    /// On a GPU: iterations per timed kernel (after one warm-up).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// On a GPU: kernels only, without the 7B-shaped prefill and decode phases.
    #[arg(long)]
    kernels_only: bool,
    /// On a GPU: do not run the PyTorch comparison (tools/bench_gpu_torch.py).
    #[arg(long)]
    no_torch: bool,
    /// On a GPU: a short fixed workload with NVTX ranges, for nsys/ncu (no PyTorch, 2 iterations).
    #[arg(long)]
    profile: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// HF model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory, merged into --model at load.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// cpu, cuda or cuda:N (default: cuda when a usable GPU is present, else cpu).
    #[arg(long)]
    device: Option<Device>,
    /// A user message, rendered with the chat template (or tokenised as is with --raw).
    #[arg(long, conflicts_with = "messages", required_unless_present = "messages")]
    prompt: Option<String>,
    /// A JSON file: an array of messages, or {"messages": [...], "tools": [...]}.
    #[arg(long)]
    messages: Option<PathBuf>,
    /// Tokenise --prompt as it stands, without the chat template.
    #[arg(long, requires = "prompt")]
    raw: bool,
    /// System message placed before --prompt.
    #[arg(long, requires = "prompt", conflicts_with = "raw")]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop once the completion contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at the end-of-turn tokens.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
struct CheckLogitsArgs {
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory, merged into --model at load.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// cpu, cuda or cuda:N (default: cuda when a usable GPU is present, else cpu).
    #[arg(long)]
    device: Option<Device>,
    /// safetensors with input_ids (I64 [n]), logits (F32 [k, vocab]), optional positions (I64 [k]).
    #[arg(long)]
    reference: PathBuf,
    /// Absolute tolerance (default 1e-4 on the CPU, f32; the selftest's bf16 model tolerance on a GPU).
    #[arg(long)]
    atol: Option<f32>,
    /// Relative tolerance (default 1e-5 on the CPU; the bf16 model tolerance on a GPU).
    #[arg(long)]
    rtol: Option<f32>,
}

/// Runs `$body` with `$be` bound to the backend of `$device` (each backend gets its own
/// monomorphised copy of the body).
macro_rules! with_backend {
    ($device:expr, |$be:ident| $body:expr) => {{
        match $device.unwrap_or_else(protege::backend::cuda::default_device) {
            Device::Cpu => {
                let $be = CpuBackend::new();
                $body
            }
            Device::Cuda(n) => {
                let $be = protege::backend::cuda::CudaBackend::new(n)?;
                $body
            }
        }
    }};
}

/// Loads `dir`, with the PEFT `adapter` merged in when given.
fn load_model<B: Backend>(be: &B, dir: &std::path::Path, adapter: Option<&std::path::Path>) -> Result<Qwen2<B>> {
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

fn run_generate(a: GenerateArgs) -> Result<()> {
    let temperature_ok = a.temperature.is_finite() && a.temperature >= 0.0;
    if !temperature_ok || a.top_p.is_nan() || a.top_p <= 0.0 || a.top_p > 1.0 {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let tok = Tokenizer::from_dir(&a.model)?;
    let prompt = match (&a.prompt, &a.messages) {
        (Some(p), _) if a.raw => tok.encode(p)?,
        (Some(p), _) => {
            let mut msgs = vec![];
            if let Some(s) = &a.system {
                msgs.push(Message::system(s.clone()));
            }
            msgs.push(Message::user(p.clone()));
            tok.chat_prompt(&msgs, &[])?
        }
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            let conv = Conversation::parse(&text, &file.display().to_string()).context("invalid conversation file")?;
            tok.chat_prompt(&conv.messages, &conv.tools)?
        }
        (None, None) => bail!("give --prompt or --messages"),
    };
    with_backend!(a.device, |be| generate_on(&be, &a, &tok, prompt))
}

fn generate_on<B: Backend>(be: &B, a: &GenerateArgs, tok: &Tokenizer, prompt: Vec<u32>) -> Result<()> {
    let model = load_model(be, &a.model, a.adapter.as_deref())?;
    let req = Request {
        prompt,
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p },
        seed: a.seed,
        stop_tokens: if a.ignore_eos { vec![] } else { tok.stop_ids.clone() },
        stop_strings: a.stop.clone(),
        ..Request::greedy(vec![], 0)
    };
    let mut stream = TextStream::new(tok.clone());
    let stop_tokens = req.stop_tokens.clone();
    let mut out = std::io::stdout().lock();
    let mut io_err = None;
    let (done, stats) = generate(be, &model, std::slice::from_ref(&req), Some(tok), &GenOptions::default(), |_, t| {
        if stop_tokens.contains(&t) {
            return;
        }
        match stream.push(t) {
            Ok(delta) => {
                if let Err(e) = out.write_all(delta.as_bytes()).and_then(|_| out.flush()) {
                    io_err.get_or_insert(anyhow::Error::from(e));
                }
            }
            Err(e) => {
                io_err.get_or_insert(e);
            }
        }
    })?;
    if let Some(e) = io_err {
        return Err(e);
    }
    write!(out, "{}", stream.flush()?)?;
    writeln!(out)?;
    let finish = match &done[0].finish {
        Finish::Length => "length".to_string(),
        Finish::StopToken(t) => format!("stop token {t}"),
        Finish::StopString(s) => format!("stop string {s:?}"),
    };
    eprintln!(
        "prompt {} tokens at {:.1} tok/s; generated {} tokens at {:.1} tok/s ({finish})",
        stats.prefill_tokens,
        stats.prefill_tok_s(),
        done[0].tokens.len(),
        stats.decode_tok_s()
    );
    Ok(())
}

fn run_selftest(a: SelftestArgs) -> Result<bool> {
    use protege::selftest::train::{check_train_attention, run_train_checks};
    use protege::selftest::{check_attention, fixture_models, run_checks, Report};
    let cpu = CpuBackend::new();
    let mut rep = Report::default();
    let models = fixture_models(&a.fixtures).into_iter().chain(a.model.iter().cloned()).collect::<Vec<_>>();
    if models.is_empty() {
        bail!("no fixture models under {} (run from the repository root or pass --fixtures)", a.fixtures.display());
    }
    let start = Instant::now();
    match a.device {
        Device::Cpu => {
            println!("selftest: the CPU backend against itself (checks the harness, not a device)");
            run_checks(&cpu, &cpu, &models, &mut rep, "cpu")?;
            run_train_checks(&cpu, &cpu, &models, &mut rep, "cpu")?;
        }
        Device::Cuda(n) => {
            let dev = protege::backend::cuda::CudaBackend::new(n)?;
            println!("selftest: {} against the CPU backend", dev.name());
            if !dev.compiled_now.is_empty() {
                println!("compiled with NVRTC: {}", dev.compiled_now.join(", "));
            }
            run_checks(&dev, &cpu, &models, &mut rep, "fast")?;
            run_train_checks(&dev, &cpu, &models, &mut rep, "fast")?;
            // The generic attention kernels too, which the sweep's head dims 64/128 bypass.
            dev.set_attention_path(protege::backend::cuda::AttentionPath::Generic);
            check_attention(&dev, &cpu, &mut rep, "generic");
            check_train_attention(&dev, &cpu, &mut rep, "generic");
            dev.set_attention_path(protege::backend::cuda::AttentionPath::Auto);
        }
    }
    let failures = rep.failures();
    println!("selftest: {} checks, {} failed ({:.1} s)", rep.checks.len(), failures, start.elapsed().as_secs_f64());
    if let Some(path) = &a.json {
        protege::model::export::write_atomic(path, serde_json::to_string_pretty(&rep.checks)?.as_bytes())?;
    }
    Ok(failures == 0)
}

fn run_check_logits(a: CheckLogitsArgs) -> Result<bool> {
    let reference = Reference::load(&a.reference)?;
    let device = a.device.unwrap_or_else(protege::backend::cuda::default_device);
    let (atol, rtol) = match device {
        Device::Cpu => (a.atol.unwrap_or(1e-4), a.rtol.unwrap_or(1e-5)),
        Device::Cuda(_) => {
            (a.atol.unwrap_or(protege::selftest::MODEL_ATOL), a.rtol.unwrap_or(protege::selftest::MODEL_RTOL))
        }
    };
    let c = with_backend!(Some(device), |be| {
        println!("backend           {}", be.name());
        let model = load_model(&be, &a.model, a.adapter.as_deref())?;
        check_logits(&be, &model, &reference, atol, rtol)?
    });
    println!("input tokens      {}", reference.input_ids.len());
    println!("rows compared     {} x vocab {}", c.rows, c.vocab);
    println!("max abs error     {:.3e} (row {}, token {})", c.max_abs, c.max_abs_at.0, c.max_abs_at.1);
    println!("max rel error     {:.3e} (|ref| floored at 1)", c.max_rel);
    println!("mean abs error    {:.3e}", c.mean_abs);
    println!("argmax agreement  {}/{}", c.argmax_agree, c.rows);
    if c.passed() {
        println!("PASS (atol {atol:e}, rtol {rtol:e})");
    } else {
        println!("FAIL: {} values outside atol {atol:e} + rtol {rtol:e} * |ref|", c.violations);
    }
    Ok(c.passed())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    let device = a.device.unwrap_or_else(protege::backend::cuda::default_device);
    if let (Device::Cuda(n), None) = (device, &a.sft) {
        let be = protege::backend::cuda::CudaBackend::new(n)?;
        let opts = protege::bench_gpu::Options {
            iters: if a.profile { 2 } else { a.iters },
            torch: !a.no_torch && !a.profile,
            kernels_only: a.kernels_only,
            script: PathBuf::from("tools/bench_gpu_torch.py"),
        };
        if a.profile && !be.set_nvtx(true) {
            eprintln!("bench: libnvToolsExt not found, so the profile has no NVTX ranges");
        }
        let r = protege::bench_gpu::run(&be, &opts)?;
        print!("{}", protege::bench_gpu::table(&r));
        let mut json = serde_json::json!({ "gpu": r });
        if let Some(dir) = &a.model {
            let tok = Tokenizer::from_dir(dir)?;
            let prompt = protege::bench::bench_prompt(&tok, a.prefill_tokens)?;
            let model = load_model(&be, dir, a.adapter.as_deref())?;
            let m = protege::bench::bench_model(&be, &model, &prompt, a.decode_tokens, a.repeats)?;
            println!(
                "model {}: prefill {} tokens {:.0} tok/s, decode {:.1} tok/s",
                dir.display(),
                m.prefill_tokens,
                m.prefill_tok_s,
                m.decode_tok_s
            );
            json["model"] = serde_json::to_value(&m)?;
        }
        if let Some(path) = &a.json {
            protege::model::export::write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
        }
        return Ok(());
    }
    let model_dir = a.model.as_ref().context("--model is required for the CPU benchmark")?;
    let tok = Tokenizer::from_dir(model_dir)?;
    let prompt = protege::bench::bench_prompt(&tok, a.prefill_tokens)?;
    let json = if let Some(mode) = &a.sft {
        let rank = (mode == "lora").then_some(a.lora_rank);
        let r = with_backend!(Some(device), |be| {
            let mut model = load_model(&be, model_dir, a.adapter.as_deref())?;
            protege::bench::bench_sft_step(&be, &mut model, &prompt, rank, a.recompute, a.repeats)?
        });
        println!("backend  {}", r.backend);
        println!(
            "sft step {} over {} tokens ({} trained parameters): {:.2} s, {:.1} tok/s (loss {:.4} -> {:.4})",
            r.mode, r.seq_tokens, r.trainable_params, r.step_s, r.tokens_per_s, r.losses[0], r.losses[1]
        );
        let p = r.phases_s;
        println!(
            "phases   zero grads {:.2} s, forward {:.2} s, backward {:.2} s, optimiser {:.2} s",
            p[0], p[1], p[2], p[3]
        );
        serde_json::to_string_pretty(&r)?
    } else {
        let r = with_backend!(Some(device), |be| {
            let model = load_model(&be, model_dir, a.adapter.as_deref())?;
            protege::bench::bench_model(&be, &model, &prompt, a.decode_tokens, a.repeats)?
        });
        println!("backend  {}", r.backend);
        println!("prefill  {} tokens: {:.1} tok/s", r.prefill_tokens, r.prefill_tok_s);
        println!("decode   {} tokens: {:.2} tok/s", r.decode_tokens, r.decode_tok_s);
        serde_json::to_string_pretty(&r)?
    };
    if let Some(path) = &a.json {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Returns whether every task was valid (validate) or true.
fn run_tasks(c: TasksCommand) -> Result<bool> {
    use protege::agent::sandbox::{best_isolation, Isolation, Limits};
    use protege::tasks::{load_suite, validate};
    match c {
        TasksCommand::Import { files, out, dataset, image_template, test_cmd } => {
            let o = protege::swebench::import::ImportOptions { dataset, image_template, test_cmd };
            let n = protege::swebench::import::import(&files, &out, &o)?;
            eprintln!("tasks import: {n} docker tasks in {}", out.join("tasks.jsonl").display());
            Ok(true)
        }
        TasksCommand::Validate { suite, runs, concurrency, tasks, timeout, no_sandbox, protect, json, exec } => {
            let mut all = load_suite(&suite)?;
            if !tasks.is_empty() {
                all.retain(|t| tasks.contains(&t.instance_id));
                if all.len() != tasks.len() {
                    bail!("some of --tasks are not in {}", suite.display());
                }
            }
            let isolation = if no_sandbox { Isolation::Plain } else { best_isolation() };
            let limits = Limits { timeout_s: timeout, cpu_s: timeout.ceil() as u64 * 2, ..Default::default() };
            let mut protection = protege::tasks::protect::Protection::default();
            protection.paths.extend(protect);
            protection.validate()?;
            let suite_dir = if suite.is_dir() { suite.clone() } else { suite.parent().unwrap_or(&suite).to_path_buf() };
            let grader = protege::tasks::grade::Grader {
                hidden: vec![suite_dir.canonicalize()?],
                ..protege::tasks::grade::Grader::new(isolation, limits, protection)
            };
            let scratch = protege::agent::sandbox::scratch::Scratch::new("validate")?;
            let docker = exec.docker(protege::executor::docker::DockerConfig {
                limits,
                protection: grader.protection.clone(),
                grade_timeout_s: timeout.max(1800.0),
                ..Default::default()
            });
            let local = protege::executor::LocalExecutor { grader, limits, scratch: scratch.path().to_path_buf() };
            let executors = protege::executor::Executors::new(Some(local), Some(docker), exec.executor);
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
                protege::model::export::write_atomic(&path, serde_json::to_string_pretty(&results)?.as_bytes())?;
            }
            Ok(invalid == 0)
        }
        TasksCommand::Build {
            packages,
            sdists,
            out,
            max_fail_share,
            max_mutants,
            per_file,
            per_function,
            concurrency,
            timeout,
            seed,
            no_sandbox,
            writer,
            writer_url,
            writer_model,
            writer_key_env,
        } => {
            use protege::agent::remote::{Api, Endpoint};
            let writer = match writer {
                None => None,
                Some(api) => Some(Endpoint {
                    api: if api == "openai" { Api::Openai } else { Api::Anthropic },
                    base_url: writer_url.context("--writer needs --writer-url")?,
                    model: writer_model.context("--writer needs --writer-model")?,
                    api_key_env: writer_key_env,
                    pricing: Default::default(),
                    http: Default::default(),
                }),
            };
            let opts = protege::tasks::build::BuildOptions {
                packages,
                sdists,
                out: out.clone(),
                max_fail_share,
                max_mutants,
                per_file,
                per_function,
                concurrency,
                seed,
                limits: Limits {
                    timeout_s: timeout,
                    cpu_s: timeout.ceil() as u64 * 2,
                    output_bytes: 64 << 20,
                    ..Default::default()
                },
                isolation: if no_sandbox { Isolation::Plain } else { best_isolation() },
                writer,
            };
            let started = Instant::now();
            let (reports, n) = protege::tasks::build::build(&opts)?;
            println!(
                "| package | pytest | passing tests | mutants tried | valid | outcomes | error |\n|---|---|---|---|---|---|---|"
            );
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
            println!("\n{n} tasks in {} ({:.0} s)", out.join("tasks.jsonl").display(), started.elapsed().as_secs_f64());
            Ok(true)
        }
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

fn run_eval(a: EvalArgs) -> Result<()> {
    use protege::agent::episode::EpisodeConfig;
    use protege::agent::http::HttpConfig;
    use protege::agent::remote::{Api, Endpoint, Pricing};
    use protege::agent::sandbox::{Isolation, Limits};
    use protege::eval::{EvalOptions, ExpertSpec, PolicySpec};
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be >= 0");
    }
    let http = HttpConfig { timeout_s: a.http_timeout, max_tries: a.http_tries, ..Default::default() };
    let pricing = match a.expert_price[..] {
        [i, o] => Pricing { input_per_mtok: i, output_per_mtok: o },
        _ => Pricing::default(),
    };
    let expert = match a.expert.as_str() {
        "none" => ExpertSpec::None,
        "oracle" => ExpertSpec::Oracle,
        "local" => ExpertSpec::Local {
            model: a.expert_model.context("--expert local needs --expert-model DIR")?.into(),
            adapter: a.expert_adapter,
            max_tokens: a.expert_max_tokens,
        },
        api => ExpertSpec::Remote {
            endpoint: Endpoint {
                api: if api == "openai" { Api::Openai } else { Api::Anthropic },
                base_url: a.expert_url.context("a remote expert needs --expert-url")?,
                model: a.expert_model.context("a remote expert needs --expert-model")?,
                api_key_env: a.expert_key_env,
                pricing,
                http,
            },
            max_tokens: a.expert_max_tokens,
        },
    };
    let policy = match a.policy.as_str() {
        "openai" => PolicySpec::Openai {
            endpoint: Endpoint {
                api: Api::Openai,
                base_url: a.policy_url.context("--policy openai needs --policy-url")?,
                model: a.policy_model,
                api_key_env: a.policy_key_env,
                pricing: Pricing::default(),
                http,
            },
            sampling: SamplingParams { temperature: a.temperature, ..Default::default() },
            max_new_tokens: a.max_new_tokens,
        },
        "local" => PolicySpec::Local {
            model: a.model.context("--policy local needs --model")?,
            adapter: a.adapter,
            sampling: SamplingParams { temperature: a.temperature, ..Default::default() },
            max_new_tokens: a.max_new_tokens,
            context: a.context,
            device: a.device,
        },
        _ => PolicySpec::Replay(a.replay.context("--policy replay needs --replay")?),
    };
    let limits = Limits { timeout_s: a.command_timeout, ..Default::default() };
    let opts = EvalOptions {
        suite: a.suite,
        policy,
        expert,
        concurrency: a.concurrency,
        out: a.out,
        episode: EpisodeConfig {
            max_steps: a.max_steps,
            expert_quota: a.expert_quota,
            context_tokens: a.context_tokens,
            ..Default::default()
        },
        limits,
        grade_limits: Limits { timeout_s: 600.0, cpu_s: 600, ..limits },
        protection: {
            let mut p = protege::tasks::protect::Protection::default();
            p.paths.extend(a.protect);
            p
        },
        loops: Default::default(),
        only: a.tasks,
        seed: a.seed,
        isolation: a.no_sandbox.then_some(Isolation::Plain),
        executor: a.exec.executor,
        docker: a.exec.docker(Default::default()),
        label: None,
        existing_out: match (a.resume, a.overwrite) {
            (true, _) => protege::eval::ExistingOut::Resume,
            (false, true) => protege::eval::ExistingOut::Overwrite,
            (false, false) => protege::eval::ExistingOut::Refuse,
        },
    };
    let summary = protege::eval::run_eval(&opts)?;
    print!("{}", summary.markdown());
    eprintln!("eval: wrote {}", opts.out.display());
    Ok(())
}

fn run_sft(a: SftArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).with_context(|| format!("cannot read {}", a.config.display()))?;
    let cfg = protege::config::SftConfig::from_file(&a.config)?;
    let world = protege::train::dist::World::from_env()?;
    // A rank of a data-parallel run takes the GPU of its LOCAL_RANK.
    let device = a.device.unwrap_or_else(|| match protege::backend::cuda::default_device() {
        Device::Cuda(_) => Device::Cuda(world.local_rank % protege::backend::cuda::device_count().max(1)),
        d => d,
    });
    if a.resume {
        protege::train::checkpoint::check_resume_config(&cfg.output.run_dir, &text, a.accept_config_change)?;
    }
    let out = protege::train::sft::run_sft_on(device, &world, &cfg, &text, a.resume, None)?;
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

fn run_export(a: ExportArgs) -> Result<()> {
    use protege::model::export::{export_checkpoint, HfExportOptions};
    let opts = HfExportOptions {
        // `None`: the checkpoint's own dtype.
        dtype: if a.dtype == "source" { None } else { Some(a.dtype.parse()?) },
        max_shard_bytes: protege::model::hf_dir::parse_size(&a.max_shard_size).context("--max-shard-size")?,
        overwrite: a.overwrite,
    };
    protege::model::hf_dir::check_destination(&a.out, a.overwrite)?;
    export_checkpoint(&a.model, a.adapter.as_deref(), &a.out, &opts)?;
    let files = std::fs::read_dir(&a.out)?.count();
    eprintln!(
        "export: wrote {} ({files} files{})",
        a.out.display(),
        if a.adapter.is_some() { ", adapter merged" } else { "" }
    );
    Ok(())
}

fn run_grade(a: GradeArgs) -> Result<bool> {
    // A suite, or a dataset file imported on the fly.
    let tasks = match protege::tasks::load_suite(&a.suite) {
        Ok(t) => t,
        Err(suite_err) => {
            let rows = protege::swebench::import::read_rows(&a.suite).context(format!("{suite_err:#}"))?;
            let o = protege::swebench::import::ImportOptions::default();
            rows.iter()
                .map(|r| protege::swebench::import::row_to_task(r, &o))
                .collect::<Result<Vec<_>>>()
                .with_context(|| {
                    format!("{} is neither a protege suite ({suite_err:#}) nor dataset rows", a.suite.display())
                })?
        }
    };
    let predictions = protege::swebench::evaluate::read_predictions(&a.predictions)?;
    let protection = if a.no_protect {
        protege::tasks::protect::Protection { paths: vec![], test_files: false }
    } else {
        protege::tasks::protect::Protection::default()
    };
    let limits = protege::agent::sandbox::Limits { timeout_s: 1800.0, cpu_s: 3600, ..Default::default() };
    let scratch = protege::agent::sandbox::scratch::Scratch::new("grade")?;
    let isolation = protege::agent::sandbox::best_isolation();
    let grader = protege::tasks::grade::Grader::new(isolation, limits, protection.clone());
    let local = protege::executor::LocalExecutor { grader, limits, scratch: scratch.path().to_path_buf() };
    // As the harness: tests run with a network unless --grade-offline.
    let docker = a.exec.docker(protege::executor::docker::DockerConfig {
        limits,
        protection,
        grade_network: true,
        ..Default::default()
    });
    let executors = protege::executor::Executors::new(Some(local), Some(docker), a.exec.executor);
    let r = protege::swebench::evaluate::grade_predictions(&tasks, &predictions, &executors, a.workers, &a.out)?;
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

fn run_synth(a: ResumableArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).with_context(|| format!("cannot read {}", a.config.display()))?;
    let mut cfg = protege::config::SynthConfig::from_file(&a.config)?;
    cfg.executor = a.exec.executor.or(cfg.executor);
    cfg.docker = a.exec.docker(cfg.docker.clone());
    if cfg.agent.kind == "scripted" {
        eprintln!("synth: the agent is the {}", protege::agent::teacher::TEACHER_LABEL);
    }
    let s = protege::synth::run_synth(&cfg, &text, a.resume)?;
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

fn run_rl(a: RlArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).with_context(|| format!("cannot read {}", a.config.display()))?;
    let mut cfg = protege::config::RlConfig::from_file(&a.config)?;
    cfg.rollout.executor = a.exec.executor.or(cfg.rollout.executor);
    cfg.rollout.docker = a.exec.docker(cfg.rollout.docker.clone());
    let device = a.device.unwrap_or_else(protege::backend::cuda::default_device);
    if a.resume {
        protege::train::checkpoint::check_resume_config(&cfg.output.run_dir, &text, a.accept_config_change)?;
    }
    let out = protege::train::rl::run_rl_on(device, &cfg, &text, a.resume, None)?;
    eprintln!("rl: {} steps; run directory {}", out.last_step, out.run_dir.display());
    Ok(())
}

fn run_train(a: TrainArgs) -> Result<()> {
    if a.print_demo_config {
        print!("{}", protege::pipeline::DEMO_CONFIG);
        return Ok(());
    }
    let p = match &a.config {
        Some(c) => protege::pipeline::Pipeline::from_file(c)?,
        None => protege::pipeline::Pipeline::demo()?,
    };
    protege::pipeline::run_pipeline(&p)?;
    Ok(())
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

fn main() -> ExitCode {
    raise_open_file_limit();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            eprintln!("error: cannot set up {n} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Generate(a) => run_generate(a).map(|_| true),
        Command::CheckLogits(a) => run_check_logits(a),
        Command::Bench(a) => run_bench(a).map(|_| true),
        Command::Sft(a) => run_sft(a).map(|_| true),
        Command::Export(a) => run_export(a).map(|_| true),
        Command::Eval(a) => run_eval(*a).map(|_| true),
        Command::Tasks(c) => run_tasks(c),
        Command::Grade(a) => run_grade(a),
        Command::Docker(DockerCommand::Gc { all, docker_hosts }) => (|| {
            let cfg = protege::executor::docker::DockerConfig { hosts: docker_hosts, ..Default::default() };
            let d = protege::executor::docker::DockerExecutor::connect(cfg)?;
            let n = d.gc(all)?;
            eprintln!("docker gc: removed {n} container(s)");
            Ok(true)
        })(),
        Command::Serve(a) => protege::serve::run_serve(&protege::serve::ServeOptions {
            model: a.model,
            addr: a.addr,
            name: a.name,
            adapter: a.adapter,
            lora_modules: a.lora_modules,
            context: a.context,
            device: a.device,
            kv_cache_tokens: a.kv_cache_tokens,
            api_key: a.api_key,
            max_request_bytes: a.max_request_bytes,
            default_max_tokens: a.default_max_tokens,
        })
        .map(|_| true),
        Command::Synth(a) => run_synth(a).map(|_| true),
        Command::Rl(a) => run_rl(a).map(|_| true),
        Command::Train(a) => run_train(a).map(|_| true),
        Command::Report(a) => protege::report::write_report(&a.run_dir).map(|p| {
            eprintln!("report: {}", p.display());
            true
        }),
        Command::Info => {
            print!("{}", protege::info::report());
            Ok(true)
        }
        Command::Selftest(a) => run_selftest(a),
        Command::Launch(a) => {
            let procs = match a.gpus {
                Some(n) => n,
                None => match protege::backend::cuda::device_count() {
                    0 => {
                        eprintln!("error: no GPU found: say how many ranks to start with --gpus N");
                        return ExitCode::FAILURE;
                    }
                    n => n,
                },
            };
            protege::launch::launch(&protege::launch::LaunchOptions {
                procs,
                nnodes: a.nnodes,
                node_rank: a.node_rank,
                master_addr: a.master_addr,
                master_port: a.master_port,
                command: a.command,
            })
            .map(|_| true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Stopped by a signal: the shell's convention, 128 + the signal.
            match e.downcast_ref::<protege::interrupt::Interrupted>() {
                Some(i) if i.0 > 0 => ExitCode::from((128 + i.0) as u8),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
