//! Qwen2 forward pass over a [`Backend`], with a paged KV cache.
//!
//! The tokens of all sequences in a step are packed into one `[rows, hidden]` activation, so
//! prefill, chunked prefill and batched decode of sequences of different lengths are the same
//! code: only the [`StepMeta`] differs.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::lora::{Lora, Target};
use super::{Checkpoint, Qwen2Config};
use crate::backend::{Backend, StepMeta};

pub struct LayerWeights<B: Backend> {
    pub input_norm: B::Buf,
    pub q: B::Buf,
    pub q_bias: B::Buf,
    pub k: B::Buf,
    pub k_bias: B::Buf,
    pub v: B::Buf,
    pub v_bias: B::Buf,
    pub o: B::Buf,
    pub post_norm: B::Buf,
    pub gate: B::Buf,
    pub up: B::Buf,
    pub down: B::Buf,
}

/// Every parameter of the model; also the shape of its gradients.
pub struct Weights<B: Backend> {
    pub embed: B::Buf,
    pub layers: Vec<LayerWeights<B>>,
    pub final_norm: B::Buf,
    /// `None` when the embeddings are tied: the output projection reuses `embed`.
    pub lm_head: Option<B::Buf>,
}

impl<B: Backend> LayerWeights<B> {
    /// The weight and bias of a linear module.
    pub fn linear(&self, t: Target) -> (&B::Buf, Option<&B::Buf>) {
        match t {
            Target::Q => (&self.q, Some(&self.q_bias)),
            Target::K => (&self.k, Some(&self.k_bias)),
            Target::V => (&self.v, Some(&self.v_bias)),
            Target::O => (&self.o, None),
            Target::Gate => (&self.gate, None),
            Target::Up => (&self.up, None),
            Target::Down => (&self.down, None),
        }
    }

    /// As [`LayerWeights::linear`], mutable.
    pub fn linear_mut(&mut self, t: Target) -> (&mut B::Buf, Option<&mut B::Buf>) {
        match t {
            Target::Q => (&mut self.q, Some(&mut self.q_bias)),
            Target::K => (&mut self.k, Some(&mut self.k_bias)),
            Target::V => (&mut self.v, Some(&mut self.v_bias)),
            Target::O => (&mut self.o, None),
            Target::Gate => (&mut self.gate, None),
            Target::Up => (&mut self.up, None),
            Target::Down => (&mut self.down, None),
        }
    }

    /// The tensors in [`LAYER_TENSORS`] order.
    pub(crate) fn bufs(&self) -> [&B::Buf; 12] {
        [
            &self.input_norm,
            &self.q,
            &self.q_bias,
            &self.k,
            &self.k_bias,
            &self.v,
            &self.v_bias,
            &self.o,
            &self.post_norm,
            &self.gate,
            &self.up,
            &self.down,
        ]
    }

    /// As [`LayerWeights::bufs`], mutable.
    fn bufs_mut(&mut self) -> [&mut B::Buf; 12] {
        [
            &mut self.input_norm,
            &mut self.q,
            &mut self.q_bias,
            &mut self.k,
            &mut self.k_bias,
            &mut self.v,
            &mut self.v_bias,
            &mut self.o,
            &mut self.post_norm,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// HF names of a layer's tensors (after `model.layers.N.`), in [`LayerWeights::bufs`] order.
const LAYER_TENSORS: [&str; 12] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

impl<B: Backend> Weights<B> {
    /// Builds every tensor with `make(hf_name, shape)`, in [`param_shapes`] order.
    pub fn try_from_fn(cfg: &Qwen2Config, mut make: impl FnMut(&str, &[usize]) -> Result<B::Buf>) -> Result<Self> {
        let shapes = param_shapes(cfg);
        let mut it = shapes.iter();
        let mut next = || -> Result<B::Buf> {
            let (name, shape) = it.next().expect("one tensor per shape");
            make(name, shape)
        };
        let embed = next()?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            layers.push(LayerWeights {
                input_norm: next()?,
                q: next()?,
                q_bias: next()?,
                k: next()?,
                k_bias: next()?,
                v: next()?,
                v_bias: next()?,
                o: next()?,
                post_norm: next()?,
                gate: next()?,
                up: next()?,
                down: next()?,
            });
        }
        let final_norm = next()?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(next()?) };
        Ok(Self { embed, layers, final_norm, lm_head })
    }

    /// Zero-filled f32 tensors of every parameter's shape (gradients).
    pub fn zeros(be: &B, cfg: &Qwen2Config) -> Self {
        Self::try_from_fn(cfg, |_, shape| Ok(be.zeros_f32(shape.iter().product()))).expect("allocation cannot fail")
    }

    /// The output projection: `lm_head`, or the embedding when tied.
    pub fn head(&self) -> &B::Buf {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every tensor with its HF name, in [`param_shapes`] order.
    pub fn tensors(&self) -> Vec<(String, &B::Buf)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (l, layer) in self.layers.iter().enumerate() {
            out.extend(LAYER_TENSORS.iter().zip(layer.bufs()).map(|(n, b)| (format!("model.layers.{l}.{n}"), b)));
        }
        out.push(("model.norm.weight".into(), &self.final_norm));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        out
    }

    /// As [`Weights::tensors`], mutable.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut B::Buf)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &mut self.embed)];
        for (l, layer) in self.layers.iter_mut().enumerate() {
            out.extend(LAYER_TENSORS.iter().zip(layer.bufs_mut()).map(|(n, b)| (format!("model.layers.{l}.{n}"), b)));
        }
        out.push(("model.norm.weight".into(), &mut self.final_norm));
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        out
    }
}

/// HF name and shape of every parameter, in a fixed order.
pub fn param_shapes(cfg: &Qwen2Config) -> Vec<(String, Vec<usize>)> {
    let (h, i, v, qd, kvd) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.q_dim(), cfg.kv_dim());
    // In LAYER_TENSORS order.
    let layer: [Vec<usize>; 12] = [
        vec![h],
        vec![qd, h],
        vec![qd],
        vec![kvd, h],
        vec![kvd],
        vec![kvd, h],
        vec![kvd],
        vec![h, qd],
        vec![h],
        vec![i, h],
        vec![i, h],
        vec![h, i],
    ];
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_layers {
        out.extend(LAYER_TENSORS.iter().zip(&layer).map(|(n, s)| (format!("model.layers.{l}.{n}"), s.clone())));
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    out
}

pub struct Qwen2<B: Backend> {
    pub cfg: Qwen2Config,
    pub w: Weights<B>,
    /// Adapters applied on top of the (then frozen) base weights.
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> Qwen2<B> {
    /// Loads `config.json` and the safetensors weights of an HF model directory, or a GGUF
    /// file (its tensors dequantised to f32).
    pub fn load(backend: &B, dir: &Path) -> Result<Self> {
        if super::gguf::is_gguf(dir) {
            return Self::from_gguf(backend, &super::gguf::Gguf::open(dir)?);
        }
        let cfg = Qwen2Config::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(backend, cfg, &ckpt)
    }

    /// [`Qwen2::load`], then a PEFT adapter merged into the weights (e.g. an SFT result) and a
    /// context override (RoPE positions extend beyond config.json's length).
    pub fn load_merged(backend: &B, dir: &Path, adapter: Option<&Path>, context: Option<usize>) -> Result<Self> {
        let mut model = Self::load(backend, dir)?;
        if let Some(a) = adapter {
            let lora = super::export::load_peft(backend, &model, a)
                .with_context(|| format!("cannot load the adapter {} for {}", a.display(), dir.display()))?;
            // Attaching writes the adapter's trained token rows (if any) into the weights.
            model.attach_lora(backend, lora);
            model.merge_lora(backend)?;
        }
        if let Some(n) = context {
            if n == 0 {
                bail!("the context override must be positive");
            }
            model.cfg.max_position_embeddings = n;
        }
        Ok(model)
    }

    /// The Qwen2 model a GGUF file holds.
    pub fn from_gguf(backend: &B, g: &super::gguf::Gguf) -> Result<Self> {
        let cfg = g.qwen2_config()?;
        let w = Weights::try_from_fn(&cfg, |name, shape| {
            let values = g.hf_tensor(name, shape)?;
            let t = crate::backend::HostTensor {
                dtype: crate::backend::DType::F32,
                shape: shape.to_vec(),
                bytes: bytemuck::cast_slice(&values),
            };
            backend.upload(&t).with_context(|| format!("loading tensor {name}"))
        })?;
        Ok(Self { cfg, w, lora: None })
    }

    pub fn from_checkpoint(backend: &B, cfg: Qwen2Config, ckpt: &Checkpoint) -> Result<Self> {
        let w = Weights::try_from_fn(&cfg, |name, shape| {
            let t = ckpt.get(name, shape)?;
            backend.upload(&t).with_context(|| format!("loading tensor {name}"))
        })?;
        Ok(Self { cfg, w, lora: None })
    }

    /// `out = x W^T (+ b)` for module `t` of layer `l`, plus its adapter when there is one;
    /// returns the adapter's `x A^T` (what its backward needs). With `dropout_seed` (training)
    /// the adapter sees `x` through LoRA dropout.
    pub fn linear_fwd(
        &self,
        be: &B,
        l: usize,
        t: Target,
        x: &B::Buf,
        out: &mut B::Buf,
        rows: usize,
        dropout_seed: Option<u64>,
    ) -> Option<B::Buf> {
        self.linear_with(be, l, t, x, out, rows, dropout_seed, self.lora.as_ref())
    }

    /// [`Qwen2::linear_fwd`] with the adapters `lora` (not necessarily the model's own).
    #[allow(clippy::too_many_arguments)]
    fn linear_with(
        &self,
        be: &B,
        l: usize,
        t: Target,
        x: &B::Buf,
        out: &mut B::Buf,
        rows: usize,
        dropout_seed: Option<u64>,
        lora: Option<&Lora<B>>,
    ) -> Option<B::Buf> {
        let (k, n) = t.dims(&self.cfg);
        let (w, b) = self.w.layers[l].linear(t);
        let Some((lora, pair)) = lora.and_then(|lo| Some((lo, lo.pair(l, t)?))) else {
            be.linear(x, w, b, out, rows, k, n);
            return None;
        };
        let r = lora.cfg.rank;
        let mut xa = be.zeros(rows * r);
        let xd = self.lora_dropout(be, l, t, x, rows, dropout_seed);
        let adapter = crate::backend::LoraRef { a: &pair.a, b: &pair.b, rank: r, scale: lora.cfg.scale() };
        be.lora_linear(x, xd.as_ref(), w, b, adapter, out, &mut xa, rows, k, n);
        Some(xa)
    }

    /// The adapter input of module `t` after LoRA dropout, or `None` when no dropout applies.
    pub(crate) fn lora_dropout(
        &self,
        be: &B,
        l: usize,
        t: Target,
        x: &B::Buf,
        rows: usize,
        seed: Option<u64>,
    ) -> Option<B::Buf> {
        let p = self.lora.as_ref()?.cfg.dropout;
        let seed = seed.filter(|_| p > 0.0)?;
        let n = rows * t.dims(&self.cfg).0;
        let mut xd = be.zeros(n);
        be.dropout(x, &mut xd, n, p, super::lora::module_dropout_seed(seed, l, t));
        Some(xd)
    }

    /// Runs one step: stores the new tokens' keys/values in `cache` and returns the logits of
    /// `meta.logit_rows`, `[logit_rows.len(), vocab]`.
    pub fn forward(&self, be: &B, meta: &StepMeta, cache: &mut KvCache<B>) -> Result<B::Buf> {
        self.forward_with(be, meta, cache, self.lora.as_ref())
    }

    /// [`Qwen2::forward`] with the adapters `lora` applied unmerged (the model's own are not
    /// used): how one base serves several adapters.
    pub fn forward_with(
        &self,
        be: &B,
        meta: &StepMeta,
        cache: &mut KvCache<B>,
        lora: Option<&Lora<B>>,
    ) -> Result<B::Buf> {
        let c = &self.cfg;
        let rows = meta.rows();
        if meta.positions.len() != rows || meta.slots.len() != rows {
            bail!(
                "step metadata is inconsistent: {rows} tokens, {} positions, {} slots",
                meta.positions.len(),
                meta.slots.len()
            );
        }
        if let Some(&t) = meta.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            bail!("token id {t} is out of range for vocab_size {}", c.vocab_size);
        }
        if let Some(&p) = meta.positions.iter().max() {
            if p as usize >= c.max_position_embeddings {
                bail!("position {p} exceeds max_position_embeddings {}", c.max_position_embeddings);
            }
        }
        let dev = be.prepare(meta);
        let (h, inter, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());

        let mut x = be.zeros(rows * h);
        let mut normed = be.zeros(rows * h);
        let mut q = be.zeros(rows * qd);
        let mut k = be.zeros(rows * kvd);
        let mut v = be.zeros(rows * kvd);
        let mut attn = be.zeros(rows * qd);
        let mut proj = be.zeros(rows * h);
        let mut gate = be.zeros(rows * inter);
        let mut up = be.zeros(rows * inter);
        let mut act = be.zeros(rows * inter);

        be.embedding(&self.w.embed, &dev, &mut x, h);
        for (l, w) in self.w.layers.iter().enumerate() {
            be.rmsnorm(&x, &w.input_norm, &mut normed, rows, h, c.rms_norm_eps);
            self.linear_with(be, l, Target::Q, &normed, &mut q, rows, None, lora);
            self.linear_with(be, l, Target::K, &normed, &mut k, rows, None, lora);
            self.linear_with(be, l, Target::V, &normed, &mut v, rows, None, lora);
            be.rope(&mut q, &dev, c.num_heads, c.head_dim, c.rope_theta);
            be.rope(&mut k, &dev, c.num_kv_heads, c.head_dim, c.rope_theta);
            let (k_cache, v_cache) = cache.layer_mut(l);
            be.kv_store(&k, &v, k_cache, v_cache, &dev, kvd);
            let (k_cache, v_cache) = cache.layer(l);
            be.attention(&q, k_cache, v_cache, &mut attn, &dev, c.num_heads, c.num_kv_heads, c.head_dim);
            self.linear_with(be, l, Target::O, &attn, &mut proj, rows, None, lora);
            be.add_assign(&mut x, &proj, rows * h);

            be.rmsnorm(&x, &w.post_norm, &mut normed, rows, h, c.rms_norm_eps);
            self.linear_with(be, l, Target::Gate, &normed, &mut gate, rows, None, lora);
            self.linear_with(be, l, Target::Up, &normed, &mut up, rows, None, lora);
            be.swiglu(&gate, &up, &mut act, rows * inter);
            self.linear_with(be, l, Target::Down, &act, &mut proj, rows, None, lora);
            be.add_assign(&mut x, &proj, rows * h);
        }
        let n_out = meta.logit_rows.len();
        let mut last = be.zeros(n_out * h);
        be.gather_logit_rows(&x, &dev, &mut last, h);
        let mut last_normed = be.zeros(n_out * h);
        be.rmsnorm(&last, &self.w.final_norm, &mut last_normed, n_out, h, c.rms_norm_eps);
        let mut logits = be.zeros(n_out * c.vocab_size);
        let head = self.w.head();
        be.linear(&last_normed, head, None, &mut logits, n_out, h, c.vocab_size);
        Ok(logits)
    }
}

/// Keys and values of every layer in fixed-size blocks, shared by many sequences.
pub struct KvCache<B: Backend> {
    pub block_size: usize,
    num_blocks: usize,
    layers: Vec<(B::Buf, B::Buf)>,
    free: Vec<u32>,
}

impl<B: Backend> KvCache<B> {
    /// A cache able to hold `capacity_tokens` tokens in blocks of `block_size`.
    pub fn new(be: &B, cfg: &Qwen2Config, capacity_tokens: usize, block_size: usize) -> Self {
        let num_blocks = capacity_tokens.div_ceil(block_size).max(1);
        let n = num_blocks * block_size * cfg.kv_dim();
        let layers = (0..cfg.num_layers).map(|_| (be.zeros(n), be.zeros(n))).collect();
        Self { block_size, num_blocks, layers, free: (0..num_blocks as u32).rev().collect() }
    }

    pub fn alloc_block(&mut self) -> Result<u32> {
        self.free.pop().with_context(|| {
            format!("KV cache is full ({} blocks of {} tokens); raise its capacity", self.num_blocks, self.block_size)
        })
    }

    pub fn release(&mut self, blocks: &[u32]) {
        self.free.extend_from_slice(blocks);
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn capacity_blocks(&self) -> usize {
        self.num_blocks
    }

    fn layer(&self, l: usize) -> (&B::Buf, &B::Buf) {
        let (k, v) = &self.layers[l];
        (k, v)
    }

    fn layer_mut(&mut self, l: usize) -> (&mut B::Buf, &mut B::Buf) {
        let (k, v) = &mut self.layers[l];
        (k, v)
    }
}

impl<B: Backend> Qwen2<B> {
    /// Folds the adapters into the base weights (`W += scale * B A`) and drops them: the
    /// result is a plain model with the same outputs, for export or faster inference.
    pub fn merge_lora(&mut self, be: &B) -> Result<()> {
        self.fold_lora(be, 1.0)?;
        self.lora = None;
        Ok(())
    }

    /// Folds the adapters into the base weights but keeps them, so that
    /// [`Qwen2::unmerge_lora`] can restore the base; meanwhile the forward must not apply the
    /// adapters again, so they are moved to the returned value.
    pub fn merge_lora_keep(&mut self, be: &B) -> Result<Lora<B>> {
        self.fold_lora(be, 1.0)?;
        self.lora.take().context("the model has no LoRA adapters")
    }

    /// Subtracts adapters merged by [`Qwen2::merge_lora_keep`] and re-attaches them.
    pub fn unmerge_lora(&mut self, be: &B, lora: Lora<B>) -> Result<()> {
        self.lora = Some(lora);
        self.fold_lora(be, -1.0)
    }

    fn fold_lora(&mut self, be: &B, sign: f32) -> Result<()> {
        let lora = self.lora.as_ref().context("the model has no LoRA adapters")?;
        let (r, scale) = (lora.cfg.rank, lora.cfg.scale() * sign);
        for (l, slots) in lora.layers.iter().enumerate() {
            for t in Target::ALL {
                let Some(pair) = &slots[t.index()] else { continue };
                let (k, n) = t.dims(&self.cfg);
                let (w, _) = self.w.layers[l].linear_mut(t);
                let mut host = be.to_f32(w);
                let (a, b) = (be.to_f32(&pair.a), be.to_f32(&pair.b));
                super::lora::add_delta(&mut host, &a, &b, (k, n, r), scale);
                *w = be.upload_f32(&host);
            }
        }
        Ok(())
    }
}
