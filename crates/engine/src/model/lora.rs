//! LoRA adapters: `y = x W^T + b + scale * (x A^T) B^T` on chosen linear modules, with PEFT's
//! initialisation (A Kaiming-uniform, B zero), tensor names and merge/unmerge.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::token_rows::{TokenRows, TrainableTokens};
use super::Qwen2Config;
use crate::backend::Backend;

/// A linear module of a Qwen2 layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    #[serde(alias = "q_proj", alias = "self_attn.q_proj")]
    Q,
    #[serde(alias = "k_proj", alias = "self_attn.k_proj")]
    K,
    #[serde(alias = "v_proj", alias = "self_attn.v_proj")]
    V,
    #[serde(alias = "o_proj", alias = "self_attn.o_proj")]
    O,
    #[serde(alias = "gate_proj", alias = "mlp.gate_proj")]
    Gate,
    #[serde(alias = "up_proj", alias = "mlp.up_proj")]
    Up,
    #[serde(alias = "down_proj", alias = "mlp.down_proj")]
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// The module's name inside a layer, as in HF and PEFT.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// PEFT's `target_modules` entry.
    pub fn peft_name(self) -> &'static str {
        self.module().rsplit('.').next().unwrap()
    }

    /// (in, out) features.
    pub fn dims(self, c: &Qwen2Config) -> (usize, usize) {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        match self {
            Target::Q => (h, c.q_dim()),
            Target::K | Target::V => (h, c.kv_dim()),
            Target::O => (c.q_dim(), h),
            Target::Gate | Target::Up => (h, i),
            Target::Down => (i, h),
        }
    }

    pub fn index(self) -> usize {
        Target::ALL.iter().position(|&t| t == self).unwrap()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(alias = "r")]
    pub rank: usize,
    #[serde(alias = "lora_alpha")]
    pub alpha: f32,
    /// Dropout probability on the adapter's input during training (PEFT's `lora_dropout`);
    /// never applied at evaluation or generation.
    #[serde(default, alias = "lora_dropout")]
    pub dropout: f32,
    /// The adapted modules: our short names (`q`, `gate`), PEFT's (`q_proj`, `gate_proj`,
    /// also as `self_attn.q_proj`), or PEFT's `"all-linear"` (every linear module of a layer;
    /// the LM head is never adapted).
    #[serde(alias = "target_modules", deserialize_with = "deserialize_targets")]
    pub targets: Vec<Target>,
    /// Seed of the A initialisation.
    #[serde(default)]
    pub seed: u64,
    /// Tokens whose embedding rows (and LM-head rows, when untied) are trained with the adapters
    /// (PEFT's `trainable_token_indices`): `"auto"` (the chat template's tokens whose rows the
    /// base never trained) or a list of token strings and ids. Resolved when training starts
    /// (`train::untrained::attach_training_adapters`); [`Lora::init`] leaves it to that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_tokens: Option<TrainableTokens>,
}

/// A list of module names, or PEFT's `"all-linear"` (a lone name is accepted as a list of one).
fn deserialize_targets<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<Target>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Targets {
        One(String),
        Many(Vec<String>),
    }
    let names = match Targets::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected a list of module names or \"all-linear\""))?
    {
        Targets::One(s) if s == "all-linear" => return Ok(Target::ALL.to_vec()),
        Targets::One(s) => vec![s],
        Targets::Many(v) => v,
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let t = Target::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(&name)).map_err(
            |_| {
                serde::de::Error::custom(format!(
                    "unknown module {name:?}: expected \"all-linear\" or names among q, k, v, o, gate, up, down \
                     (PEFT's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj also work)"
                ))
            },
        )?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("lora.rank must be positive");
        }
        if self.targets.is_empty() {
            bail!("lora.targets is empty: name at least one of q, k, v, o, gate, up, down");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora.dropout {} must be in [0, 1)", self.dropout);
        }
        Ok(())
    }

    /// `alpha / rank`, PEFT's scaling.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// One adapter: `a: [rank, in]`, `b: [out, rank]`.
pub struct LoraPair<B: Backend> {
    pub a: B::Buf,
    pub b: B::Buf,
}

/// The adapters of a model: per layer, one optional pair per [`Target`], and the trained
/// token rows if any.
pub struct Lora<B: Backend> {
    pub cfg: LoraConfig,
    pub layers: Vec<[Option<LoraPair<B>>; 7]>,
    /// Embedding / LM-head rows trained with the adapters (see [`super::token_rows`]).
    pub tokens: Option<TokenRows<B>>,
}

impl<B: Backend> Lora<B> {
    /// Builds every adapter tensor with `make(peft_name, shape)`.
    pub fn try_from_fn(
        model: &Qwen2Config,
        cfg: &LoraConfig,
        mut make: impl FnMut(&str, &[usize]) -> Result<B::Buf>,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut layers = Vec::with_capacity(model.num_layers);
        for l in 0..model.num_layers {
            let mut slots: [Option<LoraPair<B>>; 7] = Default::default();
            for t in Target::ALL {
                if cfg.targets.contains(&t) {
                    let (i, o) = t.dims(model);
                    let (na, nb) = peft_names(l, t);
                    slots[t.index()] = Some(LoraPair { a: make(&na, &[cfg.rank, i])?, b: make(&nb, &[o, cfg.rank])? });
                }
            }
            layers.push(slots);
        }
        Ok(Self { cfg: cfg.clone(), layers, tokens: None })
    }

    /// Adapters on some modules only (`layers[l][t.index()]`), e.g. a PEFT adapter with
    /// `layers_to_transform`.
    pub fn from_layers(cfg: LoraConfig, layers: Vec<[Option<LoraPair<B>>; 7]>) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg, layers, tokens: None })
    }

    /// PEFT's initialisation: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (Kaiming-uniform with a = sqrt(5)),
    /// `B = 0`, so the adapted model starts equal to the base.
    pub fn init(be: &B, model: &Qwen2Config, cfg: &LoraConfig) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        Self::try_from_fn(model, cfg, |name, shape| {
            let n = shape.iter().product();
            if name.contains("lora_A") {
                let bound = 1.0 / (shape[1] as f32).sqrt();
                Ok(be.upload_f32(&(0..n).map(|_| rng.gen_range(-bound..bound)).collect::<Vec<_>>()))
            } else {
                Ok(be.zeros(n))
            }
        })
    }

    /// Zero-filled f32 adapters of the same shape (gradients).
    pub fn zeros_like(&self, be: &B, model: &Qwen2Config) -> Self {
        let mut z = Self::try_from_fn(model, &self.cfg, |_, shape| Ok(be.zeros_f32(shape.iter().product())))
            .expect("allocation");
        z.tokens = self.tokens.as_ref().map(|t| t.zeros_like(be, model.hidden_size));
        z
    }

    pub fn pair(&self, layer: usize, t: Target) -> Option<&LoraPair<B>> {
        self.layers[layer][t.index()].as_ref()
    }

    /// Every tensor with its PEFT name and shape: the layers' adapters, then the token rows.
    pub fn tensors(&self, model: &Qwen2Config) -> Vec<(String, Vec<usize>, &B::Buf)> {
        let mut out = vec![];
        for (l, slots) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &slots[t.index()] {
                    let (i, o) = t.dims(model);
                    let (na, nb) = peft_names(l, t);
                    out.push((na, vec![self.cfg.rank, i], &p.a));
                    out.push((nb, vec![o, self.cfg.rank], &p.b));
                }
            }
        }
        if let Some(t) = &self.tokens {
            out.extend(t.tensors(model.hidden_size));
        }
        out
    }

    /// As [`Lora::tensors`], mutable.
    pub fn tensors_mut(&mut self, model: &Qwen2Config) -> Vec<(String, Vec<usize>, &mut B::Buf)> {
        let rank = self.cfg.rank;
        let mut out = vec![];
        for (l, slots) in self.layers.iter_mut().enumerate() {
            for (t, slot) in Target::ALL.into_iter().zip(slots.iter_mut()) {
                if let Some(p) = slot {
                    let (i, o) = t.dims(model);
                    let (na, nb) = peft_names(l, t);
                    out.push((na, vec![rank, i], &mut p.a));
                    out.push((nb, vec![o, rank], &mut p.b));
                }
            }
        }
        if let Some(t) = &mut self.tokens {
            out.extend(t.tensors_mut(model.hidden_size));
        }
        out
    }
}

/// The dropout seed of module `t` of layer `l` within a step whose seed is `step_seed`.
pub fn module_dropout_seed(step_seed: u64, l: usize, t: Target) -> u64 {
    step_seed.wrapping_add(((l * Target::ALL.len() + t.index()) as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// PEFT's tensor names in `adapter_model.safetensors` for layer `l`, module `t`.
pub fn peft_names(l: usize, t: Target) -> (String, String) {
    let base = format!("base_model.model.model.layers.{l}.{}", t.module());
    (format!("{base}.lora_A.weight"), format!("{base}.lora_B.weight"))
}

/// `w += scale * b a`, the merge of one adapter into its weight, on the host in f32:
/// `w: [out, in]`, `a: [rank, in]`, `b: [out, rank]`.
pub fn add_delta(w: &mut [f32], a: &[f32], b: &[f32], (inp, out, rank): (usize, usize, usize), scale: f32) {
    use crate::backend::cpu::{as_is, mm};
    mm(w, as_is(b), as_is(a), out, inp, rank, true, scale, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(targets: &str) -> Result<LoraConfig, toml::de::Error> {
        toml::from_str(&format!("rank = 4\nalpha = 8\n{targets}"))
    }

    #[test]
    fn peft_module_names_and_all_linear_are_accepted() {
        let short = parse(r#"targets = ["q", "v"]"#).unwrap();
        assert_eq!(short.targets, vec![Target::Q, Target::V]);
        let peft = parse(r#"target_modules = ["q_proj", "self_attn.v_proj", "down_proj"]"#).unwrap();
        assert_eq!(peft.targets, vec![Target::Q, Target::V, Target::Down]);
        assert_eq!(parse(r#"targets = "all-linear""#).unwrap().targets, Target::ALL.to_vec());
        assert_eq!(parse(r#"targets = "o_proj""#).unwrap().targets, vec![Target::O]);
        let aliases: LoraConfig =
            toml::from_str("r = 8\nlora_alpha = 16\nlora_dropout = 0.05\ntarget_modules = \"all-linear\"").unwrap();
        assert_eq!((aliases.rank, aliases.alpha, aliases.dropout), (8, 16.0, 0.05));
    }

    #[test]
    fn unknown_module_names_are_named() {
        let e = parse(r#"targets = ["q_proj", "lm_head"]"#).unwrap_err().to_string();
        assert!(e.contains("\"lm_head\"") && e.contains("all-linear") && e.contains("q_proj"), "{e}");
        let e = parse("targets = 3").unwrap_err().to_string();
        assert!(e.contains("list of module names"), "{e}");
    }
}
