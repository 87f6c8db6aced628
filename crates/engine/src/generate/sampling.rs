//! Per-request token post-processing on the host: log-probabilities as OpenAI reports them and
//! OpenAI's presence/frequency penalties and logit bias. (Sampling itself, and its random
//! streams, are the backend's: [`crate::backend::sampling`].)

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
