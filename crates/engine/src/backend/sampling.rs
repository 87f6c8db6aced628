//! Choosing the next token from a row of logits: greedy, temperature, top-k, top-p. The host
//! reference of the backends' `sample` op, and the random streams it draws from.

use rand::{Rng as _, SeedableRng};

use super::SamplingParams;

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
}
