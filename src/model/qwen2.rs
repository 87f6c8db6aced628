//! Qwen2 forward pass over a [`Backend`], with a paged KV cache.
//!
//! The tokens of all sequences in a step are packed into one `[rows, hidden]` activation, so
//! prefill, chunked prefill and batched decode of sequences of different lengths are the same
//! code: only the [`StepMeta`] differs.

use std::path::Path;

use anyhow::{bail, Context, Result};

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

pub struct Qwen2<B: Backend> {
    pub cfg: Qwen2Config,
    pub embed: B::Buf,
    pub layers: Vec<LayerWeights<B>>,
    pub final_norm: B::Buf,
    /// `None` when the embeddings are tied: the output projection reuses `embed`.
    pub lm_head: Option<B::Buf>,
}

impl<B: Backend> Qwen2<B> {
    /// Loads `config.json` and the safetensors weights of an HF model directory.
    pub fn load(backend: &B, dir: &Path) -> Result<Self> {
        let cfg = Qwen2Config::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(backend, cfg, &ckpt)
    }

    pub fn from_checkpoint(backend: &B, cfg: Qwen2Config, ckpt: &Checkpoint) -> Result<Self> {
        let load = |name: &str, shape: &[usize]| -> Result<B::Buf> {
            let t = ckpt.get(name, shape)?;
            backend.upload(&t).with_context(|| format!("loading tensor {name}"))
        };
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(LayerWeights {
                    input_norm: load(&format!("{p}.input_layernorm.weight"), &[h])?,
                    q: load(&format!("{p}.self_attn.q_proj.weight"), &[qd, h])?,
                    q_bias: load(&format!("{p}.self_attn.q_proj.bias"), &[qd])?,
                    k: load(&format!("{p}.self_attn.k_proj.weight"), &[kvd, h])?,
                    k_bias: load(&format!("{p}.self_attn.k_proj.bias"), &[kvd])?,
                    v: load(&format!("{p}.self_attn.v_proj.weight"), &[kvd, h])?,
                    v_bias: load(&format!("{p}.self_attn.v_proj.bias"), &[kvd])?,
                    o: load(&format!("{p}.self_attn.o_proj.weight"), &[h, qd])?,
                    post_norm: load(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    gate: load(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?,
                    up: load(&format!("{p}.mlp.up_proj.weight"), &[i, h])?,
                    down: load(&format!("{p}.mlp.down_proj.weight"), &[h, i])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(load("lm_head.weight", &[v, h])?) };
        Ok(Self {
            embed: load("model.embed_tokens.weight", &[v, h])?,
            final_norm: load("model.norm.weight", &[h])?,
            layers,
            lm_head,
            cfg,
        })
    }

    /// Runs one step: stores the new tokens' keys/values in `cache` and returns the logits of
    /// `meta.logit_rows`, `[logit_rows.len(), vocab]`.
    pub fn forward(&self, be: &B, meta: &StepMeta, cache: &mut KvCache<B>) -> Result<B::Buf> {
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

        be.embedding(&self.embed, &dev, &mut x, h);
        for (l, w) in self.layers.iter().enumerate() {
            be.rmsnorm(&x, &w.input_norm, &mut normed, rows, h, c.rms_norm_eps);
            be.linear(&normed, &w.q, Some(&w.q_bias), &mut q, rows, h, qd);
            be.linear(&normed, &w.k, Some(&w.k_bias), &mut k, rows, h, kvd);
            be.linear(&normed, &w.v, Some(&w.v_bias), &mut v, rows, h, kvd);
            be.rope(&mut q, &dev, c.num_heads, c.head_dim, c.rope_theta);
            be.rope(&mut k, &dev, c.num_kv_heads, c.head_dim, c.rope_theta);
            let (k_cache, v_cache) = cache.layer_mut(l);
            be.kv_store(&k, &v, k_cache, v_cache, &dev, kvd);
            let (k_cache, v_cache) = cache.layer(l);
            be.attention(&q, k_cache, v_cache, &mut attn, &dev, c.num_heads, c.num_kv_heads, c.head_dim);
            be.linear(&attn, &w.o, None, &mut proj, rows, qd, h);
            be.add_assign(&mut x, &proj, rows * h);

            be.rmsnorm(&x, &w.post_norm, &mut normed, rows, h, c.rms_norm_eps);
            be.linear(&normed, &w.gate, None, &mut gate, rows, h, inter);
            be.linear(&normed, &w.up, None, &mut up, rows, h, inter);
            be.swiglu(&gate, &up, &mut act, rows * inter);
            be.linear(&act, &w.down, None, &mut proj, rows, inter, h);
            be.add_assign(&mut x, &proj, rows * h);
        }
        let n_out = meta.logit_rows.len();
        let mut last = be.zeros(n_out * h);
        be.gather_rows(&x, &meta.logit_rows, &mut last, h);
        let mut last_normed = be.zeros(n_out * h);
        be.rmsnorm(&last, &self.final_norm, &mut last_normed, n_out, h, c.rms_norm_eps);
        let mut logits = be.zeros(n_out * c.vocab_size);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
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

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn alloc_block(&mut self) -> Result<u32> {
        self.free.pop().with_context(|| {
            format!("KV cache is full ({} blocks of {} tokens); raise its capacity", self.num_blocks, self.block_size)
        })
    }

    pub fn release(&mut self, blocks: &[u32]) {
        self.free.extend_from_slice(blocks);
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
