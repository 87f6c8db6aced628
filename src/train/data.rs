//! SFT examples from trajectories: token ids plus which tokens are learned, the policy for
//! sequences over `max_seq_len`, and packed batches.
//!
//! A trajectory with recorded `tokens` (a local-policy episode) is used as recorded and only its
//! policy tokens (`a`) are learned. Otherwise its messages are rendered with the chat template
//! and only the assistant's tokens are learned (prompts, tool outputs and expert replies, which
//! arrive as tool messages, are masked).

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::agent::trajectory::{Source, Trajectory};
use crate::tokenizer::Tokenizer;

/// What to do with a sequence longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Skip it.
    Drop,
    /// Cut it after the last complete assistant turn that fits; drop it if none fits.
    #[default]
    TruncateAtTurn,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub task_id: String,
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

/// How many trajectories each length policy touched (logged by the trainer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    pub kept: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    pub dropped_nothing_to_learn: usize,
}

/// Token ids and learned-token mask of one trajectory.
pub fn tokenize(t: &Trajectory, tok: &Tokenizer) -> Result<(Vec<u32>, Vec<bool>)> {
    if let Some(rec) = &t.tokens {
        let trained = rec.sources()?.into_iter().map(|s| s == Source::Policy).collect();
        return Ok((rec.ids.clone(), trained));
    }
    let enc = tok.apply_chat_template(&t.messages, &t.tools, false)?;
    let mask = enc.assistant_mask();
    Ok((enc.ids, mask))
}

/// Applies the length policy; `None` when the example is dropped.
fn fit(ids: Vec<u32>, trained: Vec<bool>, max_len: usize, policy: Overlong) -> Option<(Vec<u32>, Vec<bool>, bool)> {
    if ids.len() <= max_len {
        return Some((ids, trained, false));
    }
    if policy == Overlong::Drop {
        return None;
    }
    // The end of an assistant turn: a learned token followed by one that is not.
    let cut = (1..=max_len).rev().find(|&i| trained[i - 1] && !trained.get(i).copied().unwrap_or(false))?;
    Some((ids[..cut].to_vec(), trained[..cut].to_vec(), true))
}

/// Builds the examples of `trajectories`.
pub fn build_examples(
    trajectories: &[Trajectory],
    tok: &Tokenizer,
    max_len: usize,
    policy: Overlong,
) -> Result<(Vec<Example>, DataStats)> {
    let mut stats = DataStats::default();
    let mut out = vec![];
    for t in trajectories {
        let (ids, trained) = tokenize(t, tok)?;
        let Some((ids, trained, cut)) = fit(ids, trained, max_len, policy) else {
            stats.dropped_too_long += 1;
            continue;
        };
        // Row t predicts token t + 1, so a learned first token teaches nothing.
        if !trained.iter().skip(1).any(|&m| m) {
            stats.dropped_nothing_to_learn += 1;
            continue;
        }
        stats.truncated += cut as usize;
        stats.kept += 1;
        out.push(Example { task_id: t.task_id.clone(), ids, trained });
    }
    Ok((out, stats))
}

/// Groups examples into batches of at most `max_batch_tokens` tokens (an example longer than
/// that is a batch of its own). Examples are sorted by length so that batches hold similar
/// lengths, then the batch order is shuffled with `seed`.
pub fn pack_batches(examples: &[Example], max_batch_tokens: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| (examples[i].ids.len(), i));
    let mut batches: Vec<Vec<usize>> = vec![];
    let mut tokens = 0;
    for i in order {
        let n = examples[i].ids.len();
        match batches.last_mut() {
            Some(b) if tokens + n <= max_batch_tokens => {
                b.push(i);
                tokens += n;
            }
            _ => {
                batches.push(vec![i]);
                tokens = n;
            }
        }
    }
    batches.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_assistant_turns() {
        let trained = vec![false, false, true, true, false, false, true, true, true, false];
        let ids: Vec<u32> = (0..10).collect();
        // Fits: untouched.
        assert!(!fit(ids.clone(), trained.clone(), 10, Overlong::Drop).unwrap().2);
        assert!(fit(ids.clone(), trained.clone(), 9, Overlong::Drop).is_none());
        // max 8 cuts inside the second turn: back to the end of the first (after index 3).
        let (i, m, cut) = fit(ids.clone(), trained.clone(), 8, Overlong::TruncateAtTurn).unwrap();
        assert!(cut);
        assert_eq!(i, vec![0, 1, 2, 3]);
        assert_eq!(m, vec![false, false, true, true]);
        assert_eq!(fit(ids.clone(), trained.clone(), 9, Overlong::TruncateAtTurn).unwrap().0.len(), 9);
        assert!(fit(ids, trained, 3, Overlong::TruncateAtTurn).is_none());
    }

    #[test]
    fn batches_respect_the_token_budget_and_cover_everything() {
        let examples: Vec<Example> = [5usize, 9, 3, 12, 4, 7]
            .iter()
            .map(|&n| Example { task_id: "t".into(), ids: vec![0; n], trained: vec![true; n] })
            .collect();
        let batches = pack_batches(&examples, 12, 1);
        let mut seen: Vec<usize> = batches.concat();
        seen.sort();
        assert_eq!(seen, (0..6).collect::<Vec<_>>());
        for b in &batches {
            let total: usize = b.iter().map(|&i| examples[i].ids.len()).sum();
            assert!(total <= 12 || b.len() == 1);
        }
        assert_eq!(batches, pack_batches(&examples, 12, 1), "deterministic for a seed");
    }
}
