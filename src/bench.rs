//! `protege bench`: prefill and decode throughput of a model, measured the way
//! `tools/bench_cpu_torch.py` measures PyTorch so the two can be compared in one run.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::backend::Backend;
use crate::generate::{generate, GenOptions, Request};
use crate::model::Qwen2;
use crate::tokenizer::Tokenizer;

/// Code that every prompt is cut from (repeated as needed), so runs are comparable.
pub const BENCH_TEXT: &str = include_str!("bench_prompt.py.txt");

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub backend: String,
    pub threads: usize,
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tokens: usize,
    pub decode_tok_s: f64,
    pub repeats: usize,
}

/// Exactly `n` token ids: the tokenised benchmark text, repeated and cut.
pub fn bench_prompt(tok: &Tokenizer, n: usize) -> Result<Vec<u32>> {
    let ids = tok.encode(BENCH_TEXT)?;
    if ids.is_empty() {
        bail!("the benchmark text tokenises to nothing");
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Prefill: one forward over `prompt` (median of `repeats` after a warm-up). Decode:
/// `decode_tokens` greedy steps after the prompt, one token per forward (median).
pub fn bench_model<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    prompt: &[u32],
    decode_tokens: usize,
    repeats: usize,
) -> Result<BenchResult> {
    let opts = GenOptions { max_step_tokens: prompt.len() };
    let run = |new_tokens: usize| {
        generate(be, model, &[Request::greedy(prompt.to_vec(), new_tokens)], None, &opts, |_, _| {})
    };
    run(1)?; // warm-up: page in the weights, grow the allocator
    let repeats = repeats.max(1);
    let mut prefill = vec![];
    let mut decode = vec![];
    for _ in 0..repeats {
        let (_, stats) = run(decode_tokens + 1)?;
        if stats.decode_tokens != decode_tokens {
            bail!("expected {decode_tokens} decode steps, ran {}", stats.decode_tokens);
        }
        prefill.push(stats.prefill_time);
        decode.push(stats.decode_time);
    }
    Ok(BenchResult {
        backend: be.name(),
        threads: rayon::current_num_threads(),
        prefill_tokens: prompt.len(),
        prefill_tok_s: prompt.len() as f64 / median(prefill).as_secs_f64(),
        decode_tokens,
        decode_tok_s: decode_tokens as f64 / median(decode).as_secs_f64().max(1e-9),
        repeats,
    })
}
