//! Choosing the next token from a row of logits: greedy, temperature, top-k, top-p.

use rand::{Rng as _, SeedableRng};

use crate::backend::SamplingParams;

/// A seeded, portable random stream (ChaCha8 gives the same numbers on every platform).
pub type Rng = rand_chacha::ChaCha8Rng;

pub fn seeded(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

/// Index of the largest logit; the first one on ties (as `torch.argmax`). NaNs never win.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

pub fn sample_row(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature <= 0.0 || p.top_k == 1 {
        return argmax(logits);
    }
    // Candidates sorted by logit, best first; top-k trims before sorting the rest.
    let mut idx: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
    if idx.is_empty() {
        return argmax(logits);
    }
    let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
        idx.truncate(p.top_k);
    }
    idx.sort_unstable_by(by_logit_desc);
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i as usize] - max) / p.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (j, &q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut r = rng.gen::<f32>() * total;
    for (j, &q) in probs.iter().enumerate() {
        r -= q;
        if r <= 0.0 {
            return idx[j];
        }
    }
    idx[probs.len() - 1]
}

/// The log-probability of a sampled token under the model's raw distribution (log-softmax of
/// the logits, before temperature and penalties, as vLLM reports by default), with the most
/// likely alternatives when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `n` most likely tokens, best first.
    pub top: Vec<(u32, f32)>,
}

/// [`TokenLogprob`] of `token` in a row of logits, with its `top_n` best alternatives.
pub fn token_logprob(logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
    let max = logits.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().filter(|v| v.is_finite()).map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let lp = |t: u32| logits[t as usize] - lse;
    let mut idx: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
    let n = top_n.min(idx.len());
    let by_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_desc);
    }
    idx.truncate(n);
    idx.sort_unstable_by(by_desc);
    TokenLogprob { token, logprob: lp(token), top: idx.into_iter().map(|t| (t, lp(t))).collect() }
}

/// OpenAI's penalties and logit bias, applied to a row of logits before sampling:
/// `logit[j] -= count[j] * frequency + (count[j] > 0) * presence` over the tokens generated so far,
/// then `logit[j] += bias[j]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Penalties {
    pub presence: f32,
    pub frequency: f32,
    pub logit_bias: Vec<(u32, f32)>,
}

impl Penalties {
    pub fn is_none(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0 && self.logit_bias.is_empty()
    }

    pub fn apply(&self, logits: &mut [f32], generated: &[u32]) {
        if self.presence != 0.0 || self.frequency != 0.0 {
            let mut counts: std::collections::HashMap<u32, u32> = Default::default();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= c as f32 * self.frequency + self.presence;
                }
            }
        }
        for &(t, b) in &self.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p }
    }

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        assert_eq!(sample_row(&[0.0, 2.0, 1.0], &params(0.0, 0, 1.0), &mut seeded(0)), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0, 5.0, 4.9, -1.0, 4.8];
        let mut rng = seeded(7);
        for _ in 0..200 {
            let t = sample_row(&logits, &params(1.0, 2, 1.0), &mut rng);
            assert!(t == 1 || t == 2, "top-k 2 sampled {t}");
            // probabilities ~ [.35, .32, .29, ...]: top-p 0.5 keeps the first two.
            let t = sample_row(&logits, &params(1.0, 0, 0.5), &mut rng);
            assert!(t == 1 || t == 2, "top-p sampled {t}");
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut rng = seeded(1);
        let n = 4000;
        let ones = (0..n).filter(|_| sample_row(&logits, &params(1.0, 0, 1.0), &mut rng) == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.03, "frequency {frac}");
        let draw = |seed| {
            let mut rng = seeded(seed);
            (0..32).map(|_| sample_row(&[0.0, 0.1, 0.2, 0.3], &params(1.0, 0, 1.0), &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        // A high temperature flattens the distribution towards uniform.
        let mut rng = seeded(2);
        let ones = (0..n).filter(|_| sample_row(&logits, &params(100.0, 0, 1.0), &mut rng) == 1).count();
        assert!((ones as f64 / n as f64 - 0.5).abs() < 0.04);
    }

    #[test]
    fn logprobs_are_log_softmax_with_the_best_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let lp = token_logprob(&logits, 2, 2);
        let lse = (1f32.exp() + 3f32.exp() + 2f32.exp()).ln();
        assert!((lp.logprob - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[0].1 - (3.0 - lse)).abs() < 1e-6);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
    }

    #[test]
    fn penalties_follow_openai() {
        let p = Penalties { presence: 0.5, frequency: 0.25, logit_bias: vec![(0, 10.0)] };
        let mut logits = [0.0f32; 3];
        p.apply(&mut logits, &[1, 1, 2]);
        assert_eq!(logits, [10.0, -1.0, -0.75]);
        assert!(Penalties::default().is_none());
    }
}
