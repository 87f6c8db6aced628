//! `protege bench`: prefill and decode throughput of a model, one SFT step (--sft), or on a GPU
//! the kernel benchmarks.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use super::common::load_model;
use crate::backend::{default_device, Device};
use crate::diagnostics::{bench, bench_gpu};
use crate::tokenizer::Tokenizer;

/// What `--sft` fine-tunes in the timed step.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SftMode {
    Full,
    Lora,
}

#[derive(Args)]
pub struct BenchArgs {
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
    #[arg(long, value_enum)]
    sft: Option<SftMode>,
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

pub fn run(a: BenchArgs) -> Result<()> {
    let device = a.device.unwrap_or_else(default_device);
    // On a GPU without --sft: the kernel benchmarks, which need the CUDA backend itself.
    if let (Device::Cuda(n), None) = (device, a.sft) {
        return run_gpu(&a, n);
    }
    let model_dir = a.model.as_ref().context("--model is required for the CPU benchmark")?;
    let tok = Tokenizer::from_dir(model_dir)?;
    let prompt = bench::bench_prompt(&tok, a.prefill_tokens)?;
    let json = if let Some(mode) = a.sft {
        let rank = (mode == SftMode::Lora).then_some(a.lora_rank);
        let r = crate::with_backend!(device, |be| {
            let mut model = load_model(&be, model_dir, a.adapter.as_deref())?;
            bench::bench_sft_step(&be, &mut model, &prompt, rank, a.recompute, a.repeats)?
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
        let r = crate::with_backend!(device, |be| {
            let model = load_model(&be, model_dir, a.adapter.as_deref())?;
            bench::bench_model(&be, &model, &prompt, a.decode_tokens, a.repeats)?
        });
        println!("backend  {}", r.backend);
        println!("prefill  {} tokens: {:.1} tok/s", r.prefill_tokens, r.prefill_tok_s);
        println!("decode   {} tokens: {:.2} tok/s", r.decode_tokens, r.decode_tok_s);
        serde_json::to_string_pretty(&r)?
    };
    if let Some(path) = &a.json {
        crate::util::write_atomic(path, json.as_bytes())?;
    }
    Ok(())
}

/// The GPU kernel benchmarks on CUDA device `n`, then the model's throughput when --model is given.
fn run_gpu(a: &BenchArgs, n: usize) -> Result<()> {
    let be = crate::backend::cuda::CudaBackend::new(n)?;
    let opts = bench_gpu::Options {
        iters: if a.profile { 2 } else { a.iters },
        torch: !a.no_torch && !a.profile,
        kernels_only: a.kernels_only,
        script: PathBuf::from("tools/bench_gpu_torch.py"),
    };
    if a.profile && !be.set_nvtx(true) {
        eprintln!("bench: libnvToolsExt not found, so the profile has no NVTX ranges");
    }
    let r = bench_gpu::run(&be, &opts)?;
    print!("{}", bench_gpu::table(&r));
    let mut json = serde_json::json!({ "gpu": r });
    if let Some(dir) = &a.model {
        let tok = Tokenizer::from_dir(dir)?;
        let prompt = bench::bench_prompt(&tok, a.prefill_tokens)?;
        let model = load_model(&be, dir, a.adapter.as_deref())?;
        let m = bench::bench_model(&be, &model, &prompt, a.decode_tokens, a.repeats)?;
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
        crate::util::write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    }
    Ok(())
}
