//! Writing models out: a full HF directory (config + safetensors + tokenizer) that
//! transformers loads, and LoRA adapters in PEFT's format (`adapter_config.json` +
//! `adapter_model.safetensors`) that `peft` loads onto the base model. Every file is written to
//! a temporary name and renamed, so an interrupted export never leaves a half-written file.

use std::path::Path;

use anyhow::{bail, Context, Result};
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use super::lora::{Lora, LoraConfig, Target};
use super::{Checkpoint, Qwen2};
use crate::backend::Backend;

/// Element type of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    F32,
    Bf16,
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        // On disk before the rename, so that a crash leaves the old file or the new one.
        f.sync_all().with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))
}

/// Serialises named f32 tensors as safetensors in `dtype`, atomically.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    dtype: ExportDtype,
) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| {
            let b = match dtype {
                ExportDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ExportDtype::Bf16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
            };
            (n, s, b)
        })
        .collect();
    let st_dtype = match dtype {
        ExportDtype::F32 => Dtype::F32,
        ExportDtype::Bf16 => Dtype::BF16,
    };
    let views = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(st_dtype, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    let data = safetensors::serialize(views, metadata)?;
    write_atomic(path, &data)
}

/// Writes `model` (adapters merged in first, if any, on a copy of the weights' values) as an HF
/// directory. `source` is the directory it was loaded from: its config and tokenizer files are
/// carried over, with `dtype` updated.
pub fn export_hf<B: Backend>(be: &B, model: &Qwen2<B>, source: &Path, out: &Path, dtype: ExportDtype) -> Result<()> {
    if model.lora.is_some() {
        bail!("merge the LoRA adapters (Qwen2::merge_lora) before exporting a full model");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let shapes = super::param_shapes(&model.cfg);
    let tensors = model.w.tensors().into_iter().zip(shapes).map(|((n, b), (_, s))| (n, s, be.to_f32(b))).collect();
    write_safetensors(&out.join("model.safetensors"), tensors, dtype)?;
    let cfg_path = source.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?,
    )?;
    let name = match dtype {
        ExportDtype::F32 => "float32",
        ExportDtype::Bf16 => "bfloat16",
    };
    for key in ["torch_dtype", "dtype"] {
        if cfg.get(key).is_some() {
            cfg[key] = json!(name);
        }
    }
    write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        if source.join(f).exists() {
            std::fs::copy(source.join(f), out.join(f)).with_context(|| format!("cannot copy {f}"))?;
        }
    }
    Ok(())
}

/// Writes `lora` in PEFT's format. `base` is recorded as `base_model_name_or_path`.
pub fn export_peft<B: Backend>(be: &B, model: &Qwen2<B>, base: &str, out: &Path) -> Result<()> {
    let lora = model.lora.as_ref().context("the model has no LoRA adapters to export")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let tensors = lora.tensors(&model.cfg).into_iter().map(|(n, s, b)| (n, s, be.to_f32(b))).collect();
    write_safetensors(&out.join("adapter_model.safetensors"), tensors, ExportDtype::F32)?;
    let c = &lora.cfg;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": c.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "modules_to_save": null,
        "init_lora_weights": true,
    });
    write_atomic(&out.join("adapter_config.json"), serde_json::to_string_pretty(&config)?.as_bytes())
}

/// Reads a PEFT LoRA adapter directory for `model`'s shapes.
pub fn load_peft<B: Backend>(be: &B, model: &Qwen2<B>, dir: &Path) -> Result<Lora<B>> {
    let cfg_path = dir.join("adapter_config.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    let field = |k: &str| v.get(k).with_context(|| format!("{}: missing `{k}`", cfg_path.display()));
    if field("peft_type")?.as_str() != Some("LORA") {
        bail!("{}: peft_type must be \"LORA\"", cfg_path.display());
    }
    if v.get("use_rslora").and_then(|x| x.as_bool()) == Some(true)
        || v.get("use_dora").and_then(|x| x.as_bool()) == Some(true)
    {
        bail!("{}: rsLoRA and DoRA adapters are not supported", cfg_path.display());
    }
    let modules: Vec<String> = serde_json::from_value(field("target_modules")?.clone())
        .with_context(|| format!("{}: target_modules must be a list of module names", cfg_path.display()))?;
    let targets = modules
        .iter()
        .map(|m| {
            Target::ALL
                .into_iter()
                .find(|t| t.peft_name() == m)
                .with_context(|| format!("{}: unknown target module {m:?}", cfg_path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = LoraConfig {
        rank: field("r")?.as_u64().context("`r` must be an integer")? as usize,
        alpha: field("lora_alpha")?.as_f64().context("`lora_alpha` must be a number")? as f32,
        // Dropout only matters for training; the adapter's weights are what is loaded.
        dropout: 0.0,
        targets,
        seed: 0,
    };
    let ckpt = Checkpoint::open_files(dir, &["adapter_model.safetensors".to_string()])?;
    Lora::try_from_fn(&model.cfg, &cfg, |name, shape| be.upload(&ckpt.get(name, shape)?))
}
