//! `protege selftest`: a device backend checked against the CPU reference (kernels over a sweep
//! of shapes, whole-model logits, greedy decoding, training kernels).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{AttentionPath, CudaBackend};
use crate::backend::{Backend, Device};
use crate::diagnostics::selftest::train::{check_train_attention, run_train_checks};
use crate::diagnostics::selftest::{check_attention, fixture_models, run_checks, Report};

#[derive(Args)]
pub struct SelftestArgs {
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

/// Returns whether every check passed.
pub fn run(a: SelftestArgs) -> Result<bool> {
    let cpu = CpuBackend::new();
    let mut rep = Report::default();
    let models = fixture_models(&a.fixtures).into_iter().chain(a.model.iter().cloned()).collect::<Vec<_>>();
    if models.is_empty() {
        bail!("no fixture models under {} (run from the repository root or pass --fixtures)", a.fixtures.display());
    }
    let start = Instant::now();
    // Not `with_backend!`: the CPU checks only the harness, and a GPU also checks its generic
    // attention kernels.
    match a.device {
        Device::Cpu => {
            println!("selftest: the CPU backend against itself (checks the harness, not a device)");
            run_checks(&cpu, &cpu, &models, &mut rep, "cpu")?;
            run_train_checks(&cpu, &cpu, &models, &mut rep, "cpu")?;
        }
        Device::Cuda(n) => {
            let dev = CudaBackend::new(n)?;
            println!("selftest: {} against the CPU backend", dev.name());
            if !dev.compiled_now.is_empty() {
                println!("compiled with NVRTC: {}", dev.compiled_now.join(", "));
            }
            run_checks(&dev, &cpu, &models, &mut rep, "fast")?;
            run_train_checks(&dev, &cpu, &models, &mut rep, "fast")?;
            // The generic attention kernels too, which the sweep's head dims 64/128 bypass.
            dev.set_attention_path(AttentionPath::Generic);
            check_attention(&dev, &cpu, &mut rep, "generic");
            check_train_attention(&dev, &cpu, &mut rep, "generic");
            dev.set_attention_path(AttentionPath::Auto);
        }
    }
    let failures = rep.failures();
    println!("selftest: {} checks, {} failed ({:.1} s)", rep.checks.len(), failures, start.elapsed().as_secs_f64());
    if let Some(path) = &a.json {
        crate::util::write_atomic(path, serde_json::to_string_pretty(&rep.checks)?.as_bytes())?;
    }
    Ok(failures == 0)
}
