//! `protege export`: a model written as an HF directory, optionally with a LoRA adapter merged.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::model::export::{export_checkpoint, ExportDtype, HfExportOptions};
use crate::model::hf_dir;

/// The element type `--dtype` names.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    Source,
    F32,
    Bf16,
    F16,
}

impl Dtype {
    /// `None` for `source`: the checkpoint's own dtype.
    fn export_dtype(self) -> Option<ExportDtype> {
        match self {
            Dtype::Source => None,
            Dtype::F32 => Some(ExportDtype::F32),
            Dtype::Bf16 => Some(ExportDtype::Bf16),
            Dtype::F16 => Some(ExportDtype::F16),
        }
    }
}

#[derive(Args)]
pub struct ExportArgs {
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
    #[arg(long, value_enum, default_value = "source")]
    dtype: Dtype,
    /// Largest safetensors shard (transformers' max_shard_size): bytes, or KB/MB/GB, KiB/MiB/GiB.
    #[arg(long, default_value = hf_dir::DEFAULT_MAX_SHARD_SIZE)]
    max_shard_size: String,
    /// Replace a non-empty --out.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let opts = HfExportOptions {
        dtype: a.dtype.export_dtype(),
        max_shard_bytes: hf_dir::parse_size(&a.max_shard_size).context("--max-shard-size")?,
        overwrite: a.overwrite,
    };
    hf_dir::check_destination(&a.out, a.overwrite)?;
    export_checkpoint(&a.model, a.adapter.as_deref(), &a.out, &opts)?;
    let files = std::fs::read_dir(&a.out)?.count();
    eprintln!(
        "export: wrote {} ({files} files{})",
        a.out.display(),
        if a.adapter.is_some() { ", adapter merged" } else { "" }
    );
    Ok(())
}
