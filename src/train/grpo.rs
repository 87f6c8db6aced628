//! GRPO, separate from the loop that drives it ([`super::rl`]): group-relative advantages, the
//! clipped policy-gradient objective with a KL penalty as a loss and its derivative with respect
//! to each row's `log p(token)` (which [`crate::model::Qwen2::train_backward`] takes), and the
//! pass that accumulates its gradient over an episode's recorded tokens ([`policy_gradient`]).
//!
//! Per policy token `t` of an episode with advantage `A`:
//!
//! ```text
//! r_t   = exp(logp_t − old_logp_t)
//! pg_t  = max(−A·r_t, −A·clip(r_t, 1 − ε_low, 1 + ε_high))      (asymmetric clipping)
//! kl_t  = exp(ref_t − logp_t) − (ref_t − logp_t) − 1               (k3 estimator, ≥ 0)
//! loss  = Σ_t w_t · (pg_t + β·kl_t)
//! ```
//!
//! The weights `w_t` aggregate: `token_mean` gives every policy token of the step the same
//! weight (1 / all policy tokens), `seq_mean_token_sum` sums within an episode and averages
//! episodes, `seq_mean_token_mean` averages within and then across episodes.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::backend::TrainBackend;
use crate::model::training::{Grads, TrainBatch};
use crate::model::Qwen2;

/// The `grpo.advantage` and `grpo.loss_agg` settings of an RL config, which this module applies.
pub use crate::config::{AdvantageMode, LossAgg};

/// Advantages of `rewards`, where `groups` partitions their indices. A group of one gets 0.
pub fn advantages(rewards: &[f64], groups: &[Vec<usize>], mode: AdvantageMode) -> Vec<f64> {
    let mut adv = vec![0.0; rewards.len()];
    for g in groups {
        let n = g.len();
        if n < 2 {
            continue;
        }
        let mean = g.iter().map(|&i| rewards[i]).sum::<f64>() / n as f64;
        let var = g.iter().map(|&i| (rewards[i] - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        for &i in g {
            adv[i] = match mode {
                AdvantageMode::MeanStd => (rewards[i] - mean) / (var.sqrt() + 1e-6),
                AdvantageMode::Mean => rewards[i] - mean,
                AdvantageMode::Rloo => (rewards[i] - mean) * n as f64 / (n - 1) as f64,
            };
        }
    }
    adv
}

/// Per-row loss weights for sequences with `policy_tokens[s]` policy tokens each (0 for a
/// masked-out sequence): the weight of one policy token of sequence `s`.
pub fn token_weights(policy_tokens: &[usize], agg: LossAgg) -> Vec<f64> {
    let total: usize = policy_tokens.iter().sum();
    let seqs = policy_tokens.iter().filter(|&&n| n > 0).count();
    policy_tokens
        .iter()
        .map(|&n| match agg {
            _ if n == 0 => 0.0,
            LossAgg::TokenMean => 1.0 / total as f64,
            LossAgg::SeqMeanTokenSum => 1.0 / seqs as f64,
            LossAgg::SeqMeanTokenMean => 1.0 / (seqs * n) as f64,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgConfig {
    pub clip_low: f64,
    pub clip_high: f64,
    /// β of the KL penalty to the reference (0 disables it and its forward pass).
    pub kl_beta: f64,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self { clip_low: 0.2, clip_high: 0.28, kl_beta: 0.0 }
    }
}

/// The rows of a packed batch as the objective sees them.
pub struct PgRows<'a> {
    /// `log p(target)` under the current parameters.
    pub logp: &'a [f32],
    /// Under the parameters that generated the episodes.
    pub old_logp: &'a [f32],
    /// Under the reference; `None` when β = 0.
    pub ref_logp: Option<&'a [f32]>,
    /// The advantage of each row's episode.
    pub adv: &'a [f64],
    /// Each row's loss weight (0 for rows that are not policy tokens or are masked out).
    pub weight: &'a [f64],
}

/// Sums over a batch, for logging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PgStats {
    pub loss: f64,
    pub pg_loss: f64,
    pub kl_loss: f64,
    /// Rows that count (non-zero weight).
    pub tokens: usize,
    pub clipped_low: usize,
    pub clipped_high: usize,
    pub ratio_sum: f64,
    pub kl_sum: f64,
    /// Σ −logp of the counted rows: its mean estimates the policy's entropy at the sampled
    /// tokens (E[−log p(x)] = H).
    pub neg_logp_sum: f64,
}

impl PgStats {
    pub fn add(&mut self, o: &PgStats) {
        self.loss += o.loss;
        self.pg_loss += o.pg_loss;
        self.kl_loss += o.kl_loss;
        self.tokens += o.tokens;
        self.clipped_low += o.clipped_low;
        self.clipped_high += o.clipped_high;
        self.ratio_sum += o.ratio_sum;
        self.kl_sum += o.kl_sum;
        self.neg_logp_sum += o.neg_logp_sum;
    }

    fn per_token(&self, x: f64) -> f64 {
        x / self.tokens.max(1) as f64
    }
    pub fn clip_frac(&self) -> f64 {
        self.per_token((self.clipped_low + self.clipped_high) as f64)
    }
    pub fn kl(&self) -> f64 {
        self.per_token(self.kl_sum)
    }
    pub fn ratio(&self) -> f64 {
        self.per_token(self.ratio_sum)
    }
    pub fn entropy(&self) -> f64 {
        self.per_token(self.neg_logp_sum)
    }
}

/// The loss of `rows` and its derivative with respect to each row's `logp`.
pub fn policy_loss(cfg: &PgConfig, rows: &PgRows) -> Result<(Vec<f32>, PgStats)> {
    let n = rows.logp.len();
    if rows.old_logp.len() != n || rows.adv.len() != n || rows.weight.len() != n {
        bail!("policy_loss: rows disagree in length");
    }
    if cfg.kl_beta > 0.0 && rows.ref_logp.is_none_or(|r| r.len() != n) {
        bail!("policy_loss: kl_beta > 0 needs reference log-probs for every row");
    }
    let mut dlogp = vec![0f32; n];
    let mut s = PgStats::default();
    #[allow(clippy::needless_range_loop)] // t indexes five parallel arrays
    for t in 0..n {
        let w = rows.weight[t];
        if w == 0.0 {
            continue;
        }
        let (logp, a) = (rows.logp[t] as f64, rows.adv[t]);
        let ratio = (logp - rows.old_logp[t] as f64).exp();
        let clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high);
        let (unclipped_loss, clipped_loss) = (-a * ratio, -a * clipped);
        let mut d = 0.0;
        let pg = if unclipped_loss >= clipped_loss {
            d += -a * ratio;
            unclipped_loss
        } else {
            if ratio > 1.0 {
                s.clipped_high += 1;
            } else {
                s.clipped_low += 1;
            }
            clipped_loss
        };
        let mut kl = 0.0;
        if cfg.kl_beta > 0.0 {
            let diff = rows.ref_logp.expect("checked")[t] as f64 - logp;
            kl = diff.exp() - diff - 1.0;
            d += cfg.kl_beta * (1.0 - diff.exp());
        }
        dlogp[t] = (w * d) as f32;
        s.pg_loss += w * pg;
        s.kl_loss += w * cfg.kl_beta * kl;
        s.tokens += 1;
        s.ratio_sum += ratio;
        s.kl_sum += kl;
        s.neg_logp_sum -= logp;
    }
    s.loss = s.pg_loss + s.kl_loss;
    Ok((dlogp, s))
}

// ---------------------------------------------------------------------------------------------
// The objective over whole sequences: packed into micro-batches, through the model and back.

/// A training sequence: one episode's recorded tokens.
pub struct PolicySeq {
    pub ids: Vec<u32>,
    /// Whether each token is the policy's own (its prediction is trained).
    pub trained: Vec<bool>,
    pub adv: f64,
    /// Policy tokens that are predicted (all but a first token).
    pub policy_tokens: usize,
    /// Per row `log p` under the behaviour policy; `None`: the current parameters (one
    /// optimiser step per batch of episodes, so the ratio starts at 1).
    pub old_logp: Option<Vec<f32>>,
    /// Per row `log p` under the reference (needed when β > 0).
    pub ref_logp: Option<Vec<f32>>,
}

impl PolicySeq {
    pub fn new(ids: Vec<u32>, trained: Vec<bool>, adv: f64) -> Self {
        let policy_tokens = trained.iter().skip(1).filter(|&&m| m).count();
        Self { ids, trained, adv, policy_tokens, old_logp: None, ref_logp: None }
    }
}

/// Accumulates into `grads` the gradient of the clipped objective over `seqs`, whose tokens
/// weigh `weights[i]` each ([`token_weights`]), in micro-batches of at most
/// `batch_tokens`; returns the objective's statistics.
#[allow(clippy::too_many_arguments)]
pub fn policy_gradient<B: TrainBackend>(
    be: &B,
    model: &Qwen2<B>,
    seqs: &[&PolicySeq],
    weights: &[f64],
    pg: &PgConfig,
    temperature: f32,
    batch_tokens: usize,
    recompute: bool,
    grads: &mut Grads<B>,
) -> Result<PgStats> {
    if pg.kl_beta > 0.0 && seqs.iter().any(|s| s.ref_logp.is_none()) {
        bail!("kl_beta > 0 needs the reference log-probs of every sequence");
    }
    let mut stats = PgStats::default();
    for micro in micro_batches(seqs, batch_tokens) {
        let batch = pack(seqs, &micro, temperature)?;
        let (logp, trace) = model.train_forward(be, &batch, recompute)?;
        let rows = batch.rows();
        let (mut old, mut reference, mut row_adv, mut row_w) =
            (vec![0f32; rows], vec![0f32; rows], vec![0f64; rows], vec![0f64; rows]);
        for (k, &j) in micro.iter().enumerate() {
            let s = &batch.meta.seqs[k];
            let seq = seqs[j];
            for r in s.row_start..s.row_start + s.n_new {
                let local = r - s.row_start;
                old[r] = seq.old_logp.as_ref().map_or(logp[r], |o| o[local]);
                reference[r] = seq.ref_logp.as_ref().map_or(0.0, |o| o[local]);
                row_adv[r] = seq.adv;
                row_w[r] = if batch.trained[r] { weights[j] } else { 0.0 };
            }
        }
        let rows_in = PgRows {
            logp: &logp,
            old_logp: &old,
            ref_logp: (pg.kl_beta > 0.0).then_some(&reference[..]),
            adv: &row_adv,
            weight: &row_w,
        };
        let (dlogp, st) = policy_loss(pg, &rows_in)?;
        if !st.loss.is_finite() {
            bail!("the RL loss is {}", st.loss);
        }
        stats.add(&st);
        model.train_backward(be, &batch, trace, &dlogp, grads)?;
    }
    Ok(stats)
}

/// Groups sequences into micro-batches of at most `max_tokens` (a longer one goes alone).
fn micro_batches(seqs: &[&PolicySeq], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    let mut tokens = 0;
    for (i, s) in seqs.iter().enumerate() {
        match out.last_mut() {
            Some(b) if tokens + s.ids.len() <= max_tokens => {
                b.push(i);
                tokens += s.ids.len();
            }
            _ => {
                out.push(vec![i]);
                tokens = s.ids.len();
            }
        }
    }
    out
}

fn pack(seqs: &[&PolicySeq], idx: &[usize], temperature: f32) -> Result<TrainBatch> {
    let parts: Vec<(Vec<u32>, Vec<bool>)> =
        idx.iter().map(|&i| (seqs[i].ids.clone(), seqs[i].trained.clone())).collect();
    let mut b = TrainBatch::pack(&parts)?;
    b.temperature = temperature;
    Ok(b)
}

/// `log p` of every row of every sequence under `model` (no backward), in `batch_tokens`
/// micro-batches: the behaviour policy's before an update, or the reference's.
pub fn sequence_logp<B: TrainBackend>(
    be: &B,
    model: &Qwen2<B>,
    seqs: &[&PolicySeq],
    batch_tokens: usize,
    t: f32,
) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![vec![]; seqs.len()];
    for mb in micro_batches(seqs, batch_tokens) {
        let batch = pack(seqs, &mb, t)?;
        let (logp, _) = model.train_forward(be, &batch, true)?;
        for (k, &i) in mb.iter().enumerate() {
            let s = &batch.meta.seqs[k];
            out[i] = logp[s.row_start..s.row_start + s.n_new].to_vec();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_by_mode() {
        let r = [1.0, 0.0, 0.0, 1.0, 5.0];
        let groups = vec![vec![0, 1, 2, 3], vec![4]];
        let a = advantages(&r, &groups, AdvantageMode::MeanStd);
        // mean 0.5, sample std sqrt(1/3).
        let z = 0.5 / (1.0f64 / 3.0).sqrt();
        assert!((a[0] - z).abs() < 1e-5 && (a[1] + z).abs() < 1e-5 && a[4] == 0.0, "{a:?}");
        assert_eq!(advantages(&r, &groups, AdvantageMode::Mean)[..4], [0.5, -0.5, -0.5, 0.5]);
        // Leave-one-out: 1 - mean(0, 0, 1) = 2/3.
        let l = advantages(&r, &groups, AdvantageMode::Rloo);
        assert!((l[0] - 2.0 / 3.0).abs() < 1e-12 && (l[1] + 2.0 / 3.0).abs() < 1e-12);
        // Equal rewards: no signal, no NaN.
        assert_eq!(advantages(&[2.0, 2.0], &[vec![0, 1]], AdvantageMode::MeanStd), vec![0.0, 0.0]);
    }

    #[test]
    fn weights_by_aggregation() {
        let n = [2usize, 0, 6];
        assert_eq!(token_weights(&n, LossAgg::TokenMean), vec![0.125, 0.0, 0.125]);
        assert_eq!(token_weights(&n, LossAgg::SeqMeanTokenSum), vec![0.5, 0.0, 0.5]);
        assert_eq!(token_weights(&n, LossAgg::SeqMeanTokenMean), vec![0.25, 0.0, 1.0 / 12.0]);
    }

    /// The derivative matches central differences of the loss, inside and outside the clip
    /// range, for positive and negative advantages, with the KL term.
    #[test]
    fn derivative_matches_finite_differences() {
        let cfg = PgConfig { clip_low: 0.2, clip_high: 0.28, kl_beta: 0.1 };
        let old = [-1.0f32, -2.0, -0.5, -3.0, -1.5, -0.7];
        let logp = [-1.1f32, -1.5, -0.9, -3.05, -1.0, -0.7];
        let reference = [-1.2f32, -1.9, -0.6, -2.9, -1.4, -0.8];
        let adv = [1.0, 1.0, -1.0, -0.5, -2.0, 0.0];
        let weight = [0.2, 0.2, 0.2, 0.2, 0.2, 0.0];
        let loss = |lp: &[f32]| {
            let rows = PgRows { logp: lp, old_logp: &old, ref_logp: Some(&reference), adv: &adv, weight: &weight };
            policy_loss(&cfg, &rows).unwrap()
        };
        let (d, stats) = loss(&logp);
        assert_eq!(stats.tokens, 5);
        // Row 1: ratio e^0.5 > 1.28 with A > 0 is clipped; row 4: e^0.5 with A < 0 is not.
        assert_eq!((stats.clipped_high, stats.clipped_low), (1, 1));
        // A clipped row keeps only the KL term's derivative.
        let want = 0.2 * 0.1 * (1.0 - (-1.9f64 + 1.5).exp());
        assert!((d[1] as f64 - want).abs() < 1e-7, "{} vs {want}", d[1]);
        for t in 0..6 {
            let h = 1e-3f32;
            let (mut up, mut down) = (logp, logp);
            up[t] += h;
            down[t] -= h;
            let fd = (loss(&up).1.loss - loss(&down).1.loss) / (2.0 * h as f64);
            assert!((fd - d[t] as f64).abs() < 1e-4, "row {t}: fd {fd} vs {}", d[t]);
        }
    }
}
