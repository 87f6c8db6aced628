//! Qwen2 hyper-parameters from an HF `config.json`.
//!
//! Accepts both the transformers-4 form (top-level `rope_theta`, `torch_dtype`) and the
//! transformers-5 form (`rope_parameters: {rope_theta, rope_type}`, `dtype`). Anything the
//! model cannot honour (sliding window, rope scaling, another activation) is an error rather
//! than a silent approximation.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint says it was saved in (informational; tensors carry their own).
    pub dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The raw JSON, with every field we read; unknown fields are ignored because HF configs carry
/// many that do not affect inference (architectures, transformers_version, ...).
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

fn token_ids(v: &Option<serde_json::Value>, field: &str) -> Result<Vec<u32>> {
    let as_id = |x: &serde_json::Value| {
        x.as_u64()
            .map(|n| n as u32)
            .with_context(|| format!("`{field}` must be a token id or a list of token ids, got {x}"))
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(vec![]),
        Some(serde_json::Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

impl Qwen2Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
            .with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text, "config.json")
    }

    fn parse(text: &str, origin: &str) -> Result<Self> {
        let raw: RawConfig = crate::inputs::json_file(text, origin)?;
        if let Some(mt) = &raw.model_type {
            if mt != "qwen2" {
                bail!("model_type is {mt:?}; protege implements \"qwen2\" only");
            }
        }
        fn need(v: Option<usize>, field: &str) -> Result<usize> {
            match v {
                Some(0) => bail!("`{field}` must be positive, got 0"),
                Some(n) => Ok(n),
                None => bail!("missing required field `{field}`"),
            }
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = match raw.num_key_value_heads {
            Some(n) => need(Some(n), "num_key_value_heads")?,
            None => num_heads,
        };
        if num_heads % num_kv_heads != 0 {
            bail!("num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})");
        }
        let head_dim = match raw.head_dim {
            Some(d) => need(Some(d), "head_dim")?,
            None => {
                if hidden_size % num_heads != 0 {
                    bail!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) and no head_dim is given");
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            bail!("head_dim must be even for rotary embeddings, got {head_dim}");
        }
        // transformers 5 moved rope_theta into rope_parameters; transformers 4 keeps it on top.
        let (rope_theta, rope_type) = match (&raw.rope_parameters, raw.rope_theta) {
            (Some(p), top) => (p.rope_theta.or(top), p.rope_type.clone()),
            (None, top) => (top, None),
        };
        if let Some(t) = rope_type.as_deref() {
            if t != "default" {
                bail!("rope_parameters.rope_type {t:?} is not supported (only \"default\")");
            }
        }
        if let Some(s) = &raw.rope_scaling {
            if !s.is_null() {
                bail!("rope_scaling {s} is not supported");
            }
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported (Qwen2 uses \"silu\")");
            }
        }
        if raw.use_sliding_window == Some(true) {
            bail!("use_sliding_window = true is not supported");
        }
        let mut eos_token_ids = token_ids(&raw.eos_token_id, "eos_token_id")?;
        eos_token_ids.dedup();
        let bos_token_id = token_ids(&raw.bos_token_id, "bos_token_id")?.first().copied();
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        if let Some(id) = eos_token_ids.iter().chain(&bos_token_id).find(|&&id| id as usize >= vocab_size) {
            bail!("token id {id} (bos_token_id / eos_token_id) is outside the vocabulary (vocab_size = {vocab_size})");
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            bail!("rms_norm_eps must be a positive number, got {rms_norm_eps}");
        }
        if let Some(t) = rope_theta.filter(|t| !(t.is_finite() && *t > 0.0)) {
            bail!("rope_theta must be a positive number, got {t}");
        }
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32768),
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta: rope_theta.unwrap_or(10000.0) as f32,
            // Qwen2Config defaults to untied embeddings.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            dtype: raw.dtype.or(raw.torch_dtype),
            bos_token_id,
            eos_token_ids,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let attn = h * self.q_dim() + self.q_dim() + 2 * (h * self.kv_dim() + self.kv_dim()) + self.q_dim() * h;
        let layer = attn + 3 * h * i + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_layers * layer + h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","vocab_size":151936,
        "hidden_size":896,"intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,
        "num_key_value_heads":2,"max_position_embeddings":32768,"rms_norm_eps":1e-06,"rope_theta":1000000.0,
        "tie_word_embeddings":true,"torch_dtype":"bfloat16","hidden_act":"silu","use_sliding_window":false,
        "sliding_window":32768,"bos_token_id":151643,"eos_token_id":151645}"#;

    #[test]
    fn transformers4_form() {
        let c = Qwen2Config::from_json(V4).unwrap();
        assert_eq!((c.head_dim, c.kv_dim(), c.rope_theta), (64, 128, 1e6));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.eos_token_ids, vec![151645]);
        // Qwen2.5-0.5B has 494M parameters.
        assert_eq!(c.num_params() / 1_000_000, 494);
    }

    #[test]
    fn transformers5_form() {
        let text = V4
            .replace(r#""rope_theta":1000000.0"#, r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}"#)
            .replace("torch_dtype", "dtype");
        let c = Qwen2Config::from_json(&text).unwrap();
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = Qwen2Config::from_json(&V4.replace(r#""hidden_size":896,"#, "")).unwrap_err();
        assert!(format!("{e:#}").contains("hidden_size"), "{e:#}");
        let e = Qwen2Config::from_json(&V4.replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#))
            .unwrap_err();
        assert!(format!("{e:#}").contains("num_key_value_heads"), "{e:#}");
        let e = Qwen2Config::from_json(&V4.replace("\"silu\"", "\"gelu\"")).unwrap_err();
        assert!(format!("{e:#}").contains("hidden_act"), "{e:#}");
        let e = Qwen2Config::from_json(&V4.replace("\"qwen2\"", "\"llama\"")).unwrap_err();
        assert!(format!("{e:#}").contains("model_type"), "{e:#}");
        assert!(Qwen2Config::from_json("{not json").is_err());
        // Numbers that would run and print garbage.
        let e = Qwen2Config::from_json(&V4.replace(r#""rms_norm_eps":1e-06"#, r#""rms_norm_eps":-1"#)).unwrap_err();
        assert!(format!("{e:#}").contains("rms_norm_eps"), "{e:#}");
        let e =
            Qwen2Config::from_json(&V4.replace(r#""eos_token_id":151645"#, r#""eos_token_id":999999"#)).unwrap_err();
        assert!(format!("{e:#}").contains("outside the vocabulary"), "{e:#}");
    }
}
