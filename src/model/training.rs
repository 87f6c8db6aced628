//! The training forward and backward pass of Qwen2, written once over the [`Backend`] trait
//! (llm.c style: every op has an explicit backward, no autograd).
//!
//! A [`TrainBatch`] packs whole sequences one after another (no padding, no attention across
//! sequences). The forward returns `log p(target)` for every row; the caller turns that into a
//! loss (SFT: masked mean; RL: the clipped policy objective) and hands `d loss / d logp` to the
//! backward, which accumulates parameter gradients. With `recompute`, only each layer's input
//! is kept and the layer is recomputed during the backward (activation checkpointing).

use anyhow::{bail, Result};

use super::{Qwen2, Weights};
use crate::backend::{Backend, SeqSlice, StepMeta};

/// Sequences packed for training.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// Token ids, positions and sequence boundaries (`n_ctx == n_new`, no KV cache).
    pub meta: StepMeta,
    /// The token each row predicts (the next token of its sequence; 0 on the last row).
    pub targets: Vec<u32>,
    /// Whether each row's prediction counts (its target is a trained token).
    pub trained: Vec<bool>,
}

impl TrainBatch {
    /// Packs `(token ids, trained)` sequences, where `trained[t]` says whether token `t` is
    /// learned (e.g. produced by the assistant). Row `t` predicts token `t + 1`.
    pub fn pack(seqs: &[(Vec<u32>, Vec<bool>)]) -> Result<Self> {
        let mut b = TrainBatch { meta: StepMeta::default(), targets: vec![], trained: vec![] };
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
}

/// What one layer's backward needs from its forward.
struct LayerActs<B: Backend> {
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
}

/// Saved state between [`Qwen2::train_forward`] and [`Qwen2::train_backward`].
pub struct Trace<B: Backend> {
    /// Per layer: everything, or (with recomputation) only the layer input.
    layers: Vec<Result<LayerActs<B>, B::Buf>>,
    x_final: B::Buf,
    hidden: B::Buf,
    lse: B::Buf,
}

impl<B: Backend> Qwen2<B> {
    fn layer_forward(&self, be: &B, l: usize, x_in: B::Buf, meta: &B::Meta, rows: usize) -> (LayerActs<B>, B::Buf) {
        let c = &self.cfg;
        let w = &self.w.layers[l];
        let (h, inter, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let mut a = LayerActs {
            n1: be.zeros(rows * h),
            q: be.zeros(rows * qd),
            k: be.zeros(rows * kvd),
            v: be.zeros(rows * kvd),
            attn: be.zeros(rows * qd),
            lse: be.zeros(rows * c.num_heads),
            x_mid: be.zeros(rows * h),
            n2: be.zeros(rows * h),
            gate: be.zeros(rows * inter),
            up: be.zeros(rows * inter),
            act: be.zeros(rows * inter),
            x_in,
        };
        be.rmsnorm(&a.x_in, &w.input_norm, &mut a.n1, rows, h, c.rms_norm_eps);
        be.linear(&a.n1, &w.q, Some(&w.q_bias), &mut a.q, rows, h, qd);
        be.linear(&a.n1, &w.k, Some(&w.k_bias), &mut a.k, rows, h, kvd);
        be.linear(&a.n1, &w.v, Some(&w.v_bias), &mut a.v, rows, h, kvd);
        be.rope(&mut a.q, meta, c.num_heads, c.head_dim, c.rope_theta);
        be.rope(&mut a.k, meta, c.num_kv_heads, c.head_dim, c.rope_theta);
        be.attention_train(&a.q, &a.k, &a.v, &mut a.attn, &mut a.lse, meta, c.num_heads, c.num_kv_heads, c.head_dim);
        be.linear(&a.attn, &w.o, None, &mut a.x_mid, rows, qd, h);
        be.add_assign(&mut a.x_mid, &a.x_in, rows * h);
        be.rmsnorm(&a.x_mid, &w.post_norm, &mut a.n2, rows, h, c.rms_norm_eps);
        be.linear(&a.n2, &w.gate, None, &mut a.gate, rows, h, inter);
        be.linear(&a.n2, &w.up, None, &mut a.up, rows, h, inter);
        be.swiglu(&a.gate, &a.up, &mut a.act, rows * inter);
        let mut x_out = be.zeros(rows * h);
        be.linear(&a.act, &w.down, None, &mut x_out, rows, inter, h);
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
            let (acts, x_out) = self.layer_forward(be, l, x, &meta, rows);
            layers.push(if recompute { Err(acts.x_in) } else { Ok(acts) });
            x = x_out;
        }
        let mut hidden = be.zeros(rows * h);
        be.rmsnorm(&x, &self.w.final_norm, &mut hidden, rows, h, c.rms_norm_eps);
        let (mut logp, mut lse) = (be.zeros(rows), be.zeros(rows));
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
        grads: &mut Weights<B>,
    ) -> Result<()> {
        let c = &self.cfg;
        let rows = batch.rows();
        if dlogp.len() != rows {
            bail!("dlogp has {} rows, the batch {rows}", dlogp.len());
        }
        let meta = be.prepare(&batch.meta);
        let (h, inter, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let Trace { layers, x_final, hidden, lse } = trace;

        // Head and final norm. A tied head's gradient lands in the embedding's.
        let mut dhidden = be.zeros(rows * h);
        let dlogp = be.upload_f32(dlogp);
        let dhead = match grads.lm_head.as_mut() {
            Some(g) => g,
            None => &mut grads.embed,
        };
        be.token_logprobs_bwd(
            &dlogp,
            &hidden,
            self.w.head(),
            &batch.targets,
            &lse,
            &mut dhidden,
            Some(dhead),
            rows,
            h,
            c.vocab_size,
        );
        let mut dx = be.zeros(rows * h);
        be.rmsnorm_bwd(
            &dhidden,
            &x_final,
            &self.w.final_norm,
            &mut dx,
            Some(&mut grads.final_norm),
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
                Err(x_in) => self.layer_forward(be, l, x_in, &meta, rows).0,
            };
            let (w, g) = (&self.w.layers[l], &mut grads.layers[l]);
            // MLP: x_out = x_mid + down(silu(gate(n2)) * up(n2)), n2 = norm(x_mid).
            be.linear_bwd(&dx, &a.act, &w.down, Some(&mut dact), Some(&mut g.down), None, rows, inter, h);
            be.swiglu_bwd(&dact, &a.gate, &a.up, &mut dgate, &mut dup, rows * inter);
            be.linear_bwd(&dgate, &a.n2, &w.gate, Some(&mut dn), Some(&mut g.gate), None, rows, h, inter);
            be.linear_bwd(&dup, &a.n2, &w.up, Some(&mut tmp), Some(&mut g.up), None, rows, h, inter);
            be.add_assign(&mut dn, &tmp, rows * h);
            be.rmsnorm_bwd(&dn, &a.x_mid, &w.post_norm, &mut dmid, Some(&mut g.post_norm), rows, h, c.rms_norm_eps);
            be.add_assign(&mut dmid, &dx, rows * h);
            // Attention: x_mid = x_in + o(attn(rope(q(n1)), rope(k(n1)), v(n1))), n1 = norm(x_in).
            be.linear_bwd(&dmid, &a.attn, &w.o, Some(&mut dattn), Some(&mut g.o), None, rows, qd, h);
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
            be.linear_bwd(&dq, &a.n1, &w.q, Some(&mut dn), Some(&mut g.q), Some(&mut g.q_bias), rows, h, qd);
            be.linear_bwd(&dk, &a.n1, &w.k, Some(&mut tmp), Some(&mut g.k), Some(&mut g.k_bias), rows, h, kvd);
            be.add_assign(&mut dn, &tmp, rows * h);
            be.linear_bwd(&dv, &a.n1, &w.v, Some(&mut tmp), Some(&mut g.v), Some(&mut g.v_bias), rows, h, kvd);
            be.add_assign(&mut dn, &tmp, rows * h);
            be.rmsnorm_bwd(&dn, &a.x_in, &w.input_norm, &mut dx, Some(&mut g.input_norm), rows, h, c.rms_norm_eps);
            be.add_assign(&mut dx, &dmid, rows * h);
        }
        be.embedding_bwd(&dx, &meta, &mut grads.embed, h);
        Ok(())
    }
}
