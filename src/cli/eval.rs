//! `protege eval`: agent episodes on a task suite, graded, with trajectories and a summary.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use super::common::ExecArgs;
use crate::agent::episode::EpisodeConfig;
use crate::agent::http::HttpConfig;
use crate::agent::remote::{Api, Endpoint, Pricing};
use crate::backend::{Device, SamplingParams};
use crate::eval::{EvalOptions, ExistingOut, ExpertSpec, PolicySpec};
use crate::sandbox::{Isolation, Limits};

/// Who plays the agent (`--policy`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyKind {
    Local,
    Replay,
    Openai,
}

/// Who answers `ask_expert` (`--expert`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExpertKind {
    None,
    Oracle,
    Openai,
    Anthropic,
    Local,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Task suite: a JSONL file, or a directory holding tasks.jsonl.
    #[arg(long)]
    suite: PathBuf,
    /// Who plays the agent: `local` (protege's engine on --model), `replay` (--replay FILE) or
    /// `openai` (an OpenAI-compatible server: --policy-url, --policy-model).
    #[arg(long, value_enum, default_value = "local")]
    policy: PolicyKind,
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
    #[arg(long, value_enum, default_value = "oracle")]
    expert: ExpertKind,
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

pub fn run(a: EvalArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be >= 0");
    }
    let http = HttpConfig { timeout_s: a.http_timeout, max_tries: a.http_tries, ..Default::default() };
    let pricing = match a.expert_price[..] {
        [i, o] => Pricing { input_per_mtok: i, output_per_mtok: o },
        _ => Pricing::default(),
    };
    let expert = match a.expert {
        ExpertKind::None => ExpertSpec::None,
        ExpertKind::Oracle => ExpertSpec::Oracle,
        ExpertKind::Local => ExpertSpec::Local {
            model: a.expert_model.context("--expert local needs --expert-model DIR")?.into(),
            adapter: a.expert_adapter,
            max_tokens: a.expert_max_tokens,
        },
        ExpertKind::Openai | ExpertKind::Anthropic => ExpertSpec::Remote {
            endpoint: Endpoint {
                api: if a.expert == ExpertKind::Openai { Api::Openai } else { Api::Anthropic },
                base_url: a.expert_url.context("a remote expert needs --expert-url")?,
                model: a.expert_model.context("a remote expert needs --expert-model")?,
                api_key_env: a.expert_key_env,
                pricing,
                http,
            },
            max_tokens: a.expert_max_tokens,
        },
    };
    let policy = match a.policy {
        PolicyKind::Openai => PolicySpec::Openai {
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
        PolicyKind::Local => PolicySpec::Local {
            model: a.model.context("--policy local needs --model")?,
            adapter: a.adapter,
            sampling: SamplingParams { temperature: a.temperature, ..Default::default() },
            max_new_tokens: a.max_new_tokens,
            context: a.context,
            device: a.device,
        },
        PolicyKind::Replay => PolicySpec::Replay(a.replay.context("--policy replay needs --replay")?),
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
            let mut p = crate::tasks::protect::Protection::default();
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
            (true, _) => ExistingOut::Resume,
            (false, true) => ExistingOut::Overwrite,
            (false, false) => ExistingOut::Refuse,
        },
    };
    let summary = crate::eval::run_eval(&opts)?;
    print!("{}", summary.markdown());
    eprintln!("eval: wrote {}", opts.out.display());
    Ok(())
}
