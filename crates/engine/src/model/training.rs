//! The training forward and backward pass of Qwen2, written once over the [`Backend`] trait
//! (llm.c style: every op has an explicit backward, no autograd).
//!
//! A [`TrainBatch`] packs whole sequences one after another (no padding, no attention across
//! sequences). The forward returns `log p(target)` for every row; the caller turns that into a
//! loss (SFT: masked mean; RL: the clipped policy objective) and hands `d loss / d logp` to the
//! backward, which accumulates parameter gradients. With `recompute`, only each layer's input
//! is kept and the layer is recomputed during the backward (activation checkpointing).

use anyhow::{bail, Result};

use super::lora::{Lora, Target};
use super::{Qwen2, Weights};
use crate::backend::{LoraRef, SeqSlice, StepMeta, TrainBackend};

/// Sequences packed for training.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// Token ids, positions and sequence boundaries (`n_ctx == n_new`, no KV cache).
    pub meta: StepMeta,
    /// The token each row predicts (the next token of its sequence; 0 on the last row).
    pub targets: Vec<u32>,
    /// Whether each row's prediction counts (its target is a trained token).
    pub trained: Vec<bool>,
    /// Seed of this batch's LoRA dropout masks; `None` (the default) applies no dropout, as
    /// for evaluation.
    pub dropout_seed: Option<u64>,
    /// Sampling temperature `T` the log-probs are of: `log softmax(logits / T)` (RL scores the
    /// tokens under the distribution they were sampled from). 1 for SFT.
    pub temperature: f32,
}

impl TrainBatch {
    /// Packs `(token ids, trained)` sequences, where `trained[t]` says whether token `t` is
    /// learned (e.g. produced by the assistant). Row `t` predicts token `t + 1`.
    pub fn pack(seqs: &[(Vec<u32>, Vec<bool>)]) -> Result<Self> {
        let mut b = TrainBatch {
            meta: StepMeta::default(),
            targets: vec![],
            trained: vec![],
            dropout_seed: None,
            temperature: 1.0,
        };
        for (i, (ids, mask)) in seqs.iter().enumerate() {
            if ids.len() != mask.len() {
                bail!("sequence {i}: {} tokens but {} mask entries", ids.len(), mask.len());
            }
            if ids.is_empty() {
                bail!("sequence {i} is empty");
            }
            let row_start = b.meta.tokens.len();
            b.meta.seqs.push(SeqSlice { row_start, n_new: ids.len(), n_ctx: ids.len(), block_table: vec![] });
            b.meta.tokens.extend_from_slice(ids);
            b.meta.positions.extend(0..ids.len() as u32);
            b.targets.extend(ids[1..].iter().copied().chain([0]));
            b.trained.extend(mask[1..].iter().copied().chain([false]));
        }
        Ok(b)
    }

    pub fn rows(&self) -> usize {
        self.meta.tokens.len()
    }

    /// Rows whose prediction is trained.
    pub fn trained_rows(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }

    /// The negative log-likelihood of the trained rows divided by `denom` (the token mean when
    /// `denom` is [`TrainBatch::trained_rows`]), for per-row `logp`.
    pub fn nll(&self, logp: &[f32], denom: f32) -> f64 {
        -logp.iter().zip(&self.trained).filter(|(_, &m)| m).map(|(&l, _)| l as f64).sum::<f64>() / denom as f64
    }

    /// `d nll / d logp` for [`TrainBatch::nll`]: `-1/denom` on trained rows, 0 elsewhere.
    pub fn nll_dlogp(&self, denom: f32) -> Vec<f32> {
        self.trained.iter().map(|&m| if m { -1.0 / denom } else { 0.0 }).collect()
    }
}

/// Where gradients go: every parameter (full fine-tuning), or only the adapters and their
/// trained token rows (LoRA, base frozen).
pub enum Grads<B: TrainBackend> {
    Full(Weights<B>),
    Lora(Lora<B>),
}

impl<B: TrainBackend> Grads<B> {
    /// Zeroed gradients for what `model` trains: its adapters when it has them, else everything.
    pub fn zeros_for(be: &B, model: &Qwen2<B>) -> Self {
        match &model.lora {
            Some(l) => Grads::Lora(l.zeros_like(be, &model.cfg)),
            None => Grads::Full(Weights::zeros(be, &model.cfg)),
        }
    }

    /// Sets every gradient to zero in place (reusing the buffers between steps avoids
    /// re-faulting gigabytes of fresh memory).
    pub fn zero(&mut self, be: &B, cfg: &super::Qwen2Config) {
        for g in self.tensors_mut(cfg) {
            let n = be.len(g);
            be.zero(g, n);
        }
    }

    /// Every gradient tensor, in [`Qwen2::trainable`] order.
    pub fn tensors(&self, cfg: &super::Qwen2Config) -> Vec<&B::Buf> {
        match self {
            Grads::Full(w) => w.tensors().into_iter().map(|(_, b)| b).collect(),
            Grads::Lora(l) => l.tensors(cfg).into_iter().map(|(_, _, b)| b).collect(),
        }
    }

    /// The positions of layer `l`'s tensors in [`Grads::tensors`] (the rest — embedding, final
    /// norm, head — are outside every layer's range).
    pub fn layer_range(&self, l: usize) -> std::ops::Range<usize> {
        match self {
            // embed, then each layer's LAYER_TENSORS, then final norm and head.
            Grads::Full(w) => {
                let per = w.layers.first().map_or(0, |x| x.bufs().len());
                1 + l * per..1 + (l + 1) * per
            }
            Grads::Lora(lo) => {
                let count = |layer: &[Option<super::lora::LoraPair<B>>; 7]| 2 * layer.iter().flatten().count();
                let start: usize = lo.layers[..l].iter().map(count).sum();
                start..start + count(&lo.layers[l])
            }
        }
    }

    /// As [`Grads::tensors`], mutable.
    pub fn tensors_mut(&mut self, cfg: &super::Qwen2Config) -> Vec<&mut B::Buf> {
        match self {
            Grads::Full(w) => w.tensors_mut().into_iter().map(|(_, b)| b).collect(),
            Grads::Lora(l) => l.tensors_mut(cfg).into_iter().map(|(_, _, b)| b).collect(),
        }
    }
}

impl<B: TrainBackend> Qwen2<B> {
    /// Name and shape of every trained tensor: the adapters when present, else all weights.
    pub fn trainable(&self) -> Vec<(String, Vec<usize>)> {
        match &self.lora {
            Some(l) => l.tensors(&self.cfg).into_iter().map(|(n, s, _)| (n, s)).collect(),
            None => super::param_shapes(&self.cfg),
        }
    }

    /// The trained tensors themselves, in [`Qwen2::trainable`] order.
    pub fn trainable_tensors(&self) -> Vec<&B::Buf> {
        match &self.lora {
            Some(l) => l.tensors(&self.cfg).into_iter().map(|(_, _, b)| b).collect(),
            None => self.w.tensors().into_iter().map(|(_, b)| b).collect(),
        }
    }

    /// As [`Qwen2::trainable_tensors`], mutable.
    pub fn trainable_mut(&mut self) -> Vec<&mut B::Buf> {
        match &mut self.lora {
            Some(l) => l.tensors_mut(&self.cfg).into_iter().map(|(_, _, b)| b).collect(),
            None => self.w.tensors_mut().into_iter().map(|(_, b)| b).collect(),
        }
    }
}

fn full<B: TrainBackend>(g: &mut Grads<B>) -> Option<&mut Weights<B>> {
    match g {
        Grads::Full(w) => Some(w),
        Grads::Lora(_) => None,
    }
}

/// What one layer's backward needs from its forward.
struct LayerActs<B: TrainBackend> {
    x_in: B::Buf,
    n1: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    x_mid: B::Buf,
    n2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    act: B::Buf,
    /// Each adapted module's `x A^T`, by [`Target::index`].
    xa: [Option<B::Buf>; 7],
}

/// Saved state between [`Qwen2::train_forward`] and [`Qwen2::train_backward`].
pub struct Trace<B: TrainBackend> {
    /// Per layer: everything, or (with recomputation) only the layer input.
    layers: Vec<Result<LayerActs<B>, B::Buf>>,
    x_final: B::Buf,
    hidden: B::Buf,
    lse: B::Buf,
}

impl<B: TrainBackend> Qwen2<B> {
    fn layer_forward(
        &self,
        be: &B,
        l: usize,
        x_in: B::Buf,
        meta: &B::Meta,
        rows: usize,
        dropout: Option<u64>,
    ) -> (LayerActs<B>, B::Buf) {
        let c = &self.cfg;
        let w = &self.w.layers[l];
        let (h, inter, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let mut a = LayerActs {
            n1: be.zeros(rows * h),
            q: be.zeros(rows * qd),
            k: be.zeros(rows * kvd),
            v: be.zeros(rows * kvd),
            attn: be.zeros(rows * qd),
            lse: be.zeros_f32(rows * c.num_heads),
            x_mid: be.zeros(rows * h),
            n2: be.zeros(rows * h),
            gate: be.zeros(rows * inter),
            up: be.zeros(rows * inter),
            act: be.zeros(rows * inter),
            xa: Default::default(),
            x_in,
        };
        be.rmsnorm(&a.x_in, &w.input_norm, &mut a.n1, rows, h, c.rms_norm_eps);
        a.xa[0] = self.linear_fwd(be, l, Target::Q, &a.n1, &mut a.q, rows, dropout);
        a.xa[1] = self.linear_fwd(be, l, Target::K, &a.n1, &mut a.k, rows, dropout);
        a.xa[2] = self.linear_fwd(be, l, Target::V, &a.n1, &mut a.v, rows, dropout);
        be.rope(&mut a.q, meta, c.num_heads, c.head_dim, c.rope_theta);
        be.rope(&mut a.k, meta, c.num_kv_heads, c.head_dim, c.rope_theta);
        be.attention_train(&a.q, &a.k, &a.v, &mut a.attn, &mut a.lse, meta, c.num_heads, c.num_kv_heads, c.head_dim);
        a.xa[3] = self.linear_fwd(be, l, Target::O, &a.attn, &mut a.x_mid, rows, dropout);
        be.add_assign(&mut a.x_mid, &a.x_in, rows * h);
        be.rmsnorm(&a.x_mid, &w.post_norm, &mut a.n2, rows, h, c.rms_norm_eps);
        a.xa[4] = self.linear_fwd(be, l, Target::Gate, &a.n2, &mut a.gate, rows, dropout);
        a.xa[5] = self.linear_fwd(be, l, Target::Up, &a.n2, &mut a.up, rows, dropout);
        be.swiglu(&a.gate, &a.up, &mut a.act, rows * inter);
        let mut x_out = be.zeros(rows * h);
        a.xa[6] = self.linear_fwd(be, l, Target::Down, &a.act, &mut x_out, rows, dropout);
        be.add_assign(&mut x_out, &a.x_mid, rows * h);
        (a, x_out)
    }

    /// Forward pass for training: `log p(target)` of every row (host copy) and the trace the
    /// backward needs.
    pub fn train_forward(&self, be: &B, batch: &TrainBatch, recompute: bool) -> Result<(Vec<f32>, Trace<B>)> {
        let c = &self.cfg;
        let rows = batch.rows();
        if let Some(&t) = batch.meta.tokens.iter().chain(&batch.targets).find(|&&t| t as usize >= c.vocab_size) {
            bail!("token id {t} is out of range for vocab_size {}", c.vocab_size);
        }
        if let Some(s) = batch.meta.seqs.iter().find(|s| s.n_new > c.max_position_embeddings) {
            bail!("a sequence of {} tokens exceeds max_position_embeddings {}", s.n_new, c.max_position_embeddings);
        }
        let meta = be.prepare(&batch.meta);
        let h = c.hidden_size;
        let mut x = be.zeros(rows * h);
        be.embedding(&self.w.embed, &meta, &mut x, h);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let (acts, x_out) = self.layer_forward(be, l, x, &meta, rows, batch.dropout_seed);
            layers.push(if recompute { Err(acts.x_in) } else { Ok(acts) });
            x = x_out;
        }
        if !(batch.temperature > 0.0 && batch.temperature.is_finite()) {
            bail!("temperature must be positive, got {}", batch.temperature);
        }
        let mut hidden = be.zeros(rows * h);
        be.rmsnorm(&x, &self.w.final_norm, &mut hidden, rows, h, c.rms_norm_eps);
        // logits / T = (hidden / T) W^T: the head sees the scaled hidden state.
        if batch.temperature != 1.0 {
            be.scale(&mut hidden, 1.0 / batch.temperature, rows * h);
        }
        let (mut logp, mut lse) = (be.zeros_f32(rows), be.zeros_f32(rows));
        be.token_logprobs(&hidden, self.w.head(), &batch.targets, &mut logp, &mut lse, rows, h, c.vocab_size);
        Ok((be.to_f32(&logp), Trace { layers, x_final: x, hidden, lse }))
    }

    /// Backward pass: accumulates into `grads` the gradient of a loss whose derivative with
    /// respect to each row's `log p(target)` is `dlogp` (zero for rows that do not count).
    pub fn train_backward(
        &self,
        be: &B,
        batch: &TrainBatch,
        trace: Trace<B>,
        dlogp: &[f32],
        grads: &mut Grads<B>,
    ) -> Result<()> {
        self.train_backward_with(be, batch, trace, dlogp, grads, &mut |_, _| Ok(()))
    }

    /// As [`Qwen2::train_backward`], calling `on_layer(l, grads)` as soon as layer `l`'s
    /// gradients are complete (layers finish last to first), e.g. to start their all-reduce
    /// while the earlier layers' backward runs ([`Grads::layer_range`] names them).
    pub fn train_backward_with(
        &self,
        be: &B,
        batch: &TrainBatch,
        trace: Trace<B>,
        dlogp: &[f32],
        grads: &mut Grads<B>,
        on_layer: &mut dyn FnMut(usize, &mut Grads<B>) -> Result<()>,
    ) -> Result<()> {
        let c = &self.cfg;
        match (&*grads, &self.lora) {
            (Grads::Full(_), Some(_)) => bail!("the model has LoRA adapters: train them (Grads::Lora), not the base"),
            (Grads::Lora(_), None) => bail!("LoRA gradients requested but the model has no adapters"),
            _ => {}
        }
        let rows = batch.rows();
        if dlogp.len() != rows {
            bail!("dlogp has {} rows, the batch {rows}", dlogp.len());
        }
        let dlogp_host = dlogp;
        let meta = be.prepare(&batch.meta);
        let (h, inter, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let Trace { layers, x_final, hidden, lse } = trace;

        // Head and final norm. A tied head's gradient lands in the embedding's.
        let mut dhidden = be.zeros(rows * h);
        let dlogp = be.upload_f32_full(dlogp);
        let dhead = match grads {
            Grads::Full(g) => Some(g.lm_head.as_mut().unwrap_or(&mut g.embed)),
            Grads::Lora(_) => None,
        };
        be.token_logprobs_bwd(
            &dlogp,
            &hidden,
            self.w.head(),
            &batch.targets,
            &lse,
            &mut dhidden,
            dhead,
            rows,
            h,
            c.vocab_size,
        );
        if let Grads::Lora(g) = grads {
            self.head_rows_backward(be, batch, &hidden, &lse, dlogp_host, g);
        }
        if batch.temperature != 1.0 {
            be.scale(&mut dhidden, 1.0 / batch.temperature, rows * h);
        }
        let mut dx = be.zeros(rows * h);
        be.rmsnorm_bwd(
            &dhidden,
            &x_final,
            &self.w.final_norm,
            &mut dx,
            full(grads).map(|g| &mut g.final_norm),
            rows,
            h,
            c.rms_norm_eps,
        );
        drop((dhidden, x_final, hidden, lse));

        let mut dn = be.zeros(rows * h);
        let mut tmp = be.zeros(rows * h);
        let mut dmid = be.zeros(rows * h);
        let mut dact = be.zeros(rows * inter);
        let mut dgate = be.zeros(rows * inter);
        let mut dup = be.zeros(rows * inter);
        let mut dattn = be.zeros(rows * qd);
        let mut dq = be.zeros(rows * qd);
        let mut dk = be.zeros(rows * kvd);
        let mut dv = be.zeros(rows * kvd);
        for (l, saved) in layers.into_iter().enumerate().rev() {
            let a = match saved {
                Ok(a) => a,
                Err(x_in) => self.layer_forward(be, l, x_in, &meta, rows, batch.dropout_seed).0,
            };
            let w = &self.w.layers[l];
            // MLP: x_out = x_mid + down(silu(gate(n2)) * up(n2)), n2 = norm(x_mid).
            self.linear_back(be, l, Target::Down, &a.act, &a.xa, &dx, &mut dact, grads, rows, batch.dropout_seed);
            be.swiglu_bwd(&dact, &a.gate, &a.up, &mut dgate, &mut dup, rows * inter);
            self.linear_back(be, l, Target::Gate, &a.n2, &a.xa, &dgate, &mut dn, grads, rows, batch.dropout_seed);
            self.linear_back(be, l, Target::Up, &a.n2, &a.xa, &dup, &mut tmp, grads, rows, batch.dropout_seed);
            be.add_assign(&mut dn, &tmp, rows * h);
            be.rmsnorm_bwd(
                &dn,
                &a.x_mid,
                &w.post_norm,
                &mut dmid,
                full(grads).map(|g| &mut g.layers[l].post_norm),
                rows,
                h,
                c.rms_norm_eps,
            );
            be.add_assign(&mut dmid, &dx, rows * h);
            // Attention: x_mid = x_in + o(attn(rope(q(n1)), rope(k(n1)), v(n1))), n1 = norm(x_in).
            self.linear_back(be, l, Target::O, &a.attn, &a.xa, &dmid, &mut dattn, grads, rows, batch.dropout_seed);
            be.attention_train_bwd(
                &a.q,
                &a.k,
                &a.v,
                &a.attn,
                &a.lse,
                &dattn,
                &mut dq,
                &mut dk,
                &mut dv,
                &meta,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
            );
            be.rope_bwd(&mut dq, &meta, c.num_heads, c.head_dim, c.rope_theta);
            be.rope_bwd(&mut dk, &meta, c.num_kv_heads, c.head_dim, c.rope_theta);
            self.linear_back(be, l, Target::Q, &a.n1, &a.xa, &dq, &mut dn, grads, rows, batch.dropout_seed);
            self.linear_back(be, l, Target::K, &a.n1, &a.xa, &dk, &mut tmp, grads, rows, batch.dropout_seed);
            be.add_assign(&mut dn, &tmp, rows * h);
            self.linear_back(be, l, Target::V, &a.n1, &a.xa, &dv, &mut tmp, grads, rows, batch.dropout_seed);
            be.add_assign(&mut dn, &tmp, rows * h);
            be.rmsnorm_bwd(
                &dn,
                &a.x_in,
                &w.input_norm,
                &mut dx,
                full(grads).map(|g| &mut g.layers[l].input_norm),
                rows,
                h,
                c.rms_norm_eps,
            );
            be.add_assign(&mut dx, &dmid, rows * h);
            on_layer(l, grads)?;
        }
        match grads {
            Grads::Full(g) => be.embedding_bwd(&dx, &meta, &mut g.embed, h),
            Grads::Lora(g) => self.embed_rows_backward(be, batch, &dx, g),
        }
        Ok(())
    }

    /// The gradient of the trained LM-head rows (tied: the embedding's), accumulated into
    /// `grads`' token rows. For the row of token `j`: `sum_r dlogp_r (1[target_r = j] - p_r(j)) h_r`,
    /// from `p_r(j) = exp(h_r . w_j - lse_r)`, for these few rows only (the whole head's
    /// gradient would cost a vocabulary-wide product).
    fn head_rows_backward(
        &self,
        be: &B,
        batch: &TrainBatch,
        hidden: &B::Buf,
        lse: &B::Buf,
        dlogp: &[f32],
        grads: &mut Lora<B>,
    ) {
        let tied = self.cfg.tie_word_embeddings;
        let trained = self.lora.as_ref().and_then(|l| l.tokens.as_ref()).and_then(|t| t.head_rows(tied));
        let (Some(set), Some(g)) = (trained, grads.tokens.as_mut().and_then(|t| t.head_rows_mut(tied))) else {
            return;
        };
        let (rows, h, n) = (batch.rows(), self.cfg.hidden_size, set.ids.len());
        let mut logits = be.zeros(rows * n);
        be.linear(hidden, &set.rows, None, &mut logits, rows, h, n);
        let (logits, lse) = (be.to_f32(&logits), be.to_f32(lse));
        let mut coef = vec![0f32; rows * n];
        for r in (0..rows).filter(|&r| dlogp[r] != 0.0) {
            for (j, &id) in set.ids.iter().enumerate() {
                let p = (logits[r * n + j] - lse[r]).exp();
                let hit = if batch.targets[r] == id { 1.0 } else { 0.0 };
                coef[r * n + j] = dlogp[r] * (hit - p);
            }
        }
        be.linear_bwd(&be.upload_f32(&coef), hidden, &set.rows, None, Some(&mut g.rows), None, rows, h, n);
    }

    /// The gradient of the trained embedding rows: the input gradient `dx` of the rows whose
    /// token is one of them, accumulated into `grads`' token rows.
    fn embed_rows_backward(&self, be: &B, batch: &TrainBatch, dx: &B::Buf, grads: &mut Lora<B>) {
        let trained = self.lora.as_ref().and_then(|l| l.tokens.as_ref());
        let (Some(t), Some(g)) = (trained, grads.tokens.as_mut()) else { return };
        let (mut picked_rows, mut slots) = (vec![], vec![]);
        for (r, tok) in batch.meta.tokens.iter().enumerate() {
            if let Some(j) = t.embed.ids.iter().position(|id| id == tok) {
                picked_rows.push(r as u32);
                slots.push(j as u32);
            }
        }
        if picked_rows.is_empty() {
            return;
        }
        let h = self.cfg.hidden_size;
        let mut picked = be.zeros(picked_rows.len() * h);
        be.copy_rows(dx, &picked_rows, &mut picked, &(0..picked_rows.len() as u32).collect::<Vec<_>>(), h);
        let meta = be.prepare(&StepMeta { positions: vec![0; slots.len()], tokens: slots, ..Default::default() });
        be.embedding_bwd(&picked, &meta, &mut g.embed.rows, h);
    }

    /// Backward of [`Qwen2::linear_fwd`]: `dx` (overwritten) and the gradients of what is
    /// trained — the base weight and bias, or the adapter.
    fn linear_back(
        &self,
        be: &B,
        l: usize,
        t: Target,
        x: &B::Buf,
        xa: &[Option<B::Buf>; 7],
        dout: &B::Buf,
        dx: &mut B::Buf,
        grads: &mut Grads<B>,
        rows: usize,
        dropout: Option<u64>,
    ) {
        let (k, n) = t.dims(&self.cfg);
        let (w, _) = self.w.layers[l].linear(t);
        match grads {
            Grads::Full(g) => {
                let (dw, db) = g.layers[l].linear_mut(t);
                be.linear_bwd(dout, x, w, Some(dx), Some(dw), db, rows, k, n);
            }
            Grads::Lora(g) => {
                let adapter = self.lora.as_ref().and_then(|lo| Some((lo, lo.pair(l, t)?)));
                let (Some((lora, pair)), Some(xa), Some(gp)) =
                    (adapter, xa[t.index()].as_ref(), g.layers[l][t.index()].as_mut())
                else {
                    return be.linear_bwd(dout, x, w, Some(dx), None, None, rows, k, n);
                };
                let xd = self.lora_dropout(be, l, t, x, rows, dropout);
                let seed = super::lora::module_dropout_seed(dropout.unwrap_or_default(), l, t);
                let lr = LoraRef { a: &pair.a, b: &pair.b, rank: lora.cfg.rank, scale: lora.cfg.scale() };
                let drop = xd.as_ref().map(|_| (lora.cfg.dropout, seed));
                be.lora_linear_bwd(dout, x, xd.as_ref(), xa, w, lr, dx, &mut gp.a, &mut gp.b, drop, rows, k, n);
            }
        }
    }
}
