//! `protege check-logits`: the model's logits against a reference file, within tolerances.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::common::load_model;
use crate::backend::{default_device, Backend, Device};
use crate::diagnostics::check::{check_logits, Reference};
use crate::diagnostics::selftest::{MODEL_ATOL, MODEL_RTOL};

#[derive(Args)]
pub struct CheckLogitsArgs {
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

/// Returns whether every value is within tolerance.
pub fn run(a: CheckLogitsArgs) -> Result<bool> {
    let reference = Reference::load(&a.reference)?;
    let device = a.device.unwrap_or_else(default_device);
    let (atol, rtol) = match device {
        Device::Cpu => (a.atol.unwrap_or(1e-4), a.rtol.unwrap_or(1e-5)),
        Device::Cuda(_) => (a.atol.unwrap_or(MODEL_ATOL), a.rtol.unwrap_or(MODEL_RTOL)),
    };
    let c = crate::with_backend!(device, |be| {
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
