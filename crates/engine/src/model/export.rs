//! Writing models out: a full HF directory (config + safetensors shards + tokenizer) that
//! transformers loads, with LoRA adapters merged in, and LoRA adapters in PEFT's format
//! (`adapter_config.json` + `adapter_model.safetensors`) that `peft` loads onto the base model;
//! and reading PEFT LoRA adapters back. Every file is written to a temporary name and renamed,
//! so an interrupted export never leaves a half-written file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use super::hf_dir::{parse_size, write_hf_dir, LazyTensor, Values, DEFAULT_MAX_SHARD_SIZE};
use super::lora::{Lora, LoraConfig, LoraPair, Target};
use super::peft::{AdapterTensors, PeftLoraConfig};
use super::token_rows::TokenRows;
use super::{param_shapes, Checkpoint, Qwen2, Qwen2Config};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, DType, TrainBackend};
use crate::util::write_atomic;

/// Element type of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl ExportDtype {
    /// The dtype of a checkpoint's tensors.
    pub fn of(d: DType) -> Self {
        match d {
            DType::F32 => ExportDtype::F32,
            DType::BF16 => ExportDtype::Bf16,
            DType::F16 => ExportDtype::F16,
        }
    }

    /// The dtype of the checkpoint in `dir` (that of its embedding, as the model's).
    pub fn of_checkpoint(dir: &Path) -> Result<Self> {
        // A GGUF's quantised types have no HF counterpart: bf16, as HF models are published.
        if super::gguf::is_gguf(dir) {
            return Ok(ExportDtype::Bf16);
        }
        Ok(Self::of(Checkpoint::open(dir)?.dtype_of("model.embed_tokens.weight")?))
    }

    /// Its name in config.json (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::F16 => "float16",
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            ExportDtype::F32 => Dtype::F32,
            ExportDtype::Bf16 => Dtype::BF16,
            ExportDtype::F16 => Dtype::F16,
        }
    }

    pub fn size(self) -> usize {
        match self {
            ExportDtype::F32 => 4,
            ExportDtype::Bf16 | ExportDtype::F16 => 2,
        }
    }

    /// Little-endian bytes of `v` in this dtype (rounded to nearest even, as torch's `.to()`).
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            ExportDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ExportDtype::Bf16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
            ExportDtype::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        }
    }
}

impl std::str::FromStr for ExportDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" | "float32" => ExportDtype::F32,
            "bf16" | "bfloat16" => ExportDtype::Bf16,
            "f16" | "float16" => ExportDtype::F16,
            _ => bail!("unknown dtype {s:?} (f32, bf16 or f16)"),
        })
    }
}

/// Serialises named f32 tensors as safetensors in `dtype`, atomically.
pub fn write_safetensors(path: &Path, tensors: Vec<(String, Vec<usize>, Vec<f32>)>, dtype: ExportDtype) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, s, v)| (n, s, dtype.encode(&v))).collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(dtype.safetensors(), s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    let data = safetensors::serialize(views, metadata)?;
    write_atomic(path, &data)
}

/// How [`export_hf`] writes a model directory.
#[derive(Debug, Clone)]
pub struct HfExportOptions {
    /// `None`: the source checkpoint's dtype, as `save_pretrained` keeps the loaded one.
    pub dtype: Option<ExportDtype>,
    /// Largest safetensors shard, bytes (transformers' `max_shard_size`).
    pub max_shard_bytes: u64,
    /// Replace a non-empty output directory.
    pub overwrite: bool,
}

impl Default for HfExportOptions {
    fn default() -> Self {
        Self { dtype: None, max_shard_bytes: parse_size(DEFAULT_MAX_SHARD_SIZE).unwrap(), overwrite: false }
    }
}

/// Writes `model`, with `lora` merged in (`W + scale·BA`, in f32 on the host, one tensor at a
/// time: the model is left as it is), as an HF directory like transformers' `save_pretrained`
/// (see [`super::hf_dir`]). `source` is the directory the model was loaded from: its config
/// (with the dtype and the context length updated) and tokenizer files are carried over, and
/// its dtype is the default. Tied embeddings stay tied (no `lm_head.weight`).
pub fn export_hf<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    lora: Option<&Lora<B>>,
    source: &Path,
    out: &Path,
    opts: &HfExportOptions,
) -> Result<()> {
    let weights = model
        .w
        .tensors()
        .into_iter()
        .zip(param_shapes(&model.cfg))
        .map(|((name, buf), (_, shape))| (name, shape, Box::new(move || be.to_f32(buf)) as Values))
        .collect();
    write_merged(be, &model.cfg, weights, lora, source, out, opts)
}

/// [`export_hf`] of the model in `source` with the PEFT adapter in `adapter` merged in, read
/// from the memory-mapped checkpoint one tensor at a time as each shard is written: no copy of
/// the model is ever held in memory (`protege export`).
pub fn export_checkpoint(source: &Path, adapter: Option<&Path>, out: &Path, opts: &HfExportOptions) -> Result<()> {
    let be = CpuBackend::new();
    if super::gguf::is_gguf(source) {
        // A GGUF is dequantised as it loads, so the model is held in memory (in f32) meanwhile.
        let model = Qwen2::load(&be, source)?;
        let lora = match adapter {
            Some(a) => Some(
                load_peft_for(&be, &model.cfg, a)
                    .with_context(|| format!("cannot load the adapter {} for {}", a.display(), source.display()))?,
            ),
            None => None,
        };
        return export_hf(&be, &model, lora.as_ref(), source, out, opts);
    }
    let cfg = Qwen2Config::from_file(&source.join("config.json"))?;
    let ckpt = Checkpoint::open(source)?;
    let shapes = param_shapes(&cfg);
    // Every tensor's presence, shape and dtype, before anything is written.
    for (name, shape) in &shapes {
        ckpt.get(name, shape)?;
    }
    let lora = match adapter {
        Some(a) => Some(
            load_peft_for(&be, &cfg, a)
                .with_context(|| format!("cannot load the adapter {} for {}", a.display(), source.display()))?,
        ),
        None => None,
    };
    let (be, ckpt) = (&be, &ckpt);
    let weights = shapes
        .into_iter()
        .map(|(name, shape)| {
            let (n, s) = (name.clone(), shape.clone());
            let read = move || be.upload(&ckpt.get(&n, &s).expect("checked above")).expect("checked above");
            (name, shape, Box::new(read) as Values)
        })
        .collect();
    write_merged(be, &cfg, weights, lora.as_ref(), source, out, opts)
}

/// Writes `weights` (HF name, shape, f32 values when asked) with `lora` merged into each as
/// its shard is written; the rest as [`export_hf`].
fn write_merged<'a, B: Backend>(
    be: &'a B,
    cfg: &'a Qwen2Config,
    weights: Vec<(String, Vec<usize>, Values<'a>)>,
    lora: Option<&'a Lora<B>>,
    source: &Path,
    out: &Path,
    opts: &HfExportOptions,
) -> Result<()> {
    let dtype = match opts.dtype {
        Some(d) => d,
        None => ExportDtype::of_checkpoint(source)?,
    };
    // The layer and module of each linear weight, by HF name.
    let linear: HashMap<String, (usize, Target)> = (0..cfg.num_layers)
        .flat_map(|l| Target::ALL.map(|t| (format!("model.layers.{l}.{}.weight", t.module()), (l, t))))
        .collect();
    let tensors: Vec<LazyTensor> = weights
        .into_iter()
        .map(|(name, shape, read)| {
            let adapter = lora.and_then(|lora| {
                let &(l, t) = linear.get(&name)?;
                let (i, o) = t.dims(cfg);
                Some((lora.pair(l, t)?, (i, o, lora.cfg.rank), lora.cfg.scale()))
            });
            let rows = lora.and_then(|l| l.tokens.as_ref());
            let tensor = name.clone();
            let values = move || {
                let mut w = read();
                if let Some((pair, dims, scale)) = adapter {
                    super::lora::add_delta(&mut w, &be.to_f32(&pair.a), &be.to_f32(&pair.b), dims, scale);
                }
                // Trained token rows replace the base's (already so when the adapters are attached).
                if let Some(rows) = rows {
                    rows.merge_into(be, &tensor, &mut w, cfg.hidden_size);
                }
                w
            };
            LazyTensor { name, shape, dtype, values: Box::new(values) }
        })
        .collect();
    let mut config: serde_json::Value = if super::gguf::is_gguf(source) {
        super::gguf::Gguf::open(source)?.hf_config()?
    } else {
        let cfg_path = source.join("config.json");
        serde_json::from_str(
            &std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?
    };
    let mut named = false;
    for key in ["torch_dtype", "dtype"] {
        if config.get(key).is_some() {
            config[key] = json!(dtype.torch_name());
            named = true;
        }
    }
    if !named {
        config["torch_dtype"] = json!(dtype.torch_name());
    }
    // A context override is part of the model (e.g. the length a policy was trained at).
    config["max_position_embeddings"] = json!(cfg.max_position_embeddings);
    write_hf_dir(&tensors, &config, source, out, opts.max_shard_bytes, opts.overwrite)
}

/// Writes `lora` in PEFT's format. `base` is recorded as `base_model_name_or_path`.
pub fn export_peft<B: Backend>(be: &B, model: &Qwen2<B>, base: &str, out: &Path) -> Result<()> {
    let lora = model.lora.as_ref().context("the model has no LoRA adapters to export")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let tensors = lora.tensors(&model.cfg).into_iter().map(|(n, s, b)| (n, s, be.to_f32(b))).collect();
    write_safetensors(&out.join("adapter_model.safetensors"), tensors, ExportDtype::F32)?;
    let c = &lora.cfg;
    let mut config = json!({
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
    if let Some(rows) = &lora.tokens {
        config["trainable_token_indices"] = rows.peft_indices();
    }
    write_atomic(&out.join("adapter_config.json"), serde_json::to_string_pretty(&config)?.as_bytes())
}

/// Reads a PEFT LoRA adapter directory for `model`'s shapes.
pub fn load_peft<B: Backend>(be: &B, model: &Qwen2<B>, dir: &Path) -> Result<Lora<B>> {
    load_peft_for(be, &model.cfg, dir)
}

/// [`load_peft`] for a model of configuration `model` (which need not be loaded).
pub fn load_peft_for<B: Backend>(be: &B, model: &Qwen2Config, dir: &Path) -> Result<Lora<B>> {
    let cfg_path = dir.join("adapter_config.json");
    let peft = PeftLoraConfig::from_file(&cfg_path, model.num_layers)?;
    let file = "adapter_model.safetensors";
    let path = dir.join(file);
    if !path.exists() {
        if dir.join("adapter_model.bin").exists() {
            bail!(
                "{}: only adapter_model.safetensors is read (adapter_model.bin is a pickle); re-save the adapter with \
                   safe_serialization=True",
                dir.display()
            );
        }
        bail!("no {file} in {}", dir.display());
    }
    let ckpt = Checkpoint::open_files(dir, &[file.to_string()])?;
    let mut names = AdapterTensors::new(&path, ckpt.names())?;
    let cfg = LoraConfig {
        rank: peft.rank,
        alpha: peft.alpha,
        // Dropout only matters for training; the adapter's weights are what is loaded.
        dropout: 0.0,
        targets: peft.targets(),
        seed: 0,
        trainable_tokens: None,
    };
    let mut layers = Vec::with_capacity(model.num_layers);
    for (l, targets) in peft.adapted.iter().enumerate() {
        let mut slots: [Option<LoraPair<B>>; 7] = Default::default();
        for &t in targets {
            let (i, o) = t.dims(model);
            let (na, nb) = super::lora::peft_names(l, t);
            let mut read = |name: &str, shape: &[usize]| -> Result<B::Buf> {
                let stored = names.take(name).with_context(|| {
                    format!("{}: no tensor {name} (adapter_config.json selects {}.{})", path.display(), l, t.module())
                })?;
                let host = ckpt.get(&stored, shape).with_context(|| {
                    format!("{}: the adapter does not fit this model (r = {})", cfg_path.display(), peft.rank)
                })?;
                be.upload(&host)
            };
            slots[t.index()] = Some(LoraPair { a: read(&na, &[peft.rank, i])?, b: read(&nb, &[o, peft.rank])? });
        }
        layers.push(slots);
    }
    names.check_all_taken(&path)?;
    let mut lora = Lora::from_layers(cfg, layers)?;
    // Token rows go into the base weights when the adapter is attached (Qwen2::attach_lora).
    lora.tokens = TokenRows::from_peft(be, model, &cfg_path, &ckpt)?;
    Ok(lora)
}

/// Runs `f` (an export) with the trained tensors replaced by their f32 `masters` where there
/// are any (a bf16 device), so that it writes the masters rather than their bf16 rounding; the
/// model gets its own tensors back afterwards. Only for reading the tensors: device ops
/// expect bf16 parameters.
pub fn with_masters<B: TrainBackend>(
    model: &mut Qwen2<B>,
    masters: &mut [B::Buf],
    f: impl FnOnce(&mut Qwen2<B>) -> Result<()>,
) -> Result<()> {
    let swap = |model: &mut Qwen2<B>, masters: &mut [B::Buf]| {
        for (p, m) in model.trainable_mut().into_iter().zip(masters.iter_mut()) {
            std::mem::swap(p, m);
        }
    };
    swap(model, masters);
    let r = f(model);
    swap(model, masters);
    r
}
