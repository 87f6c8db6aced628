//! `protege bench`: prefill and decode throughput of a model, and the time of one SFT step,
//! measured the way `tools/bench_cpu_torch.py` and `tools/bench_sft_torch.py` measure PyTorch
//! so the two can be compared in one run.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::backend::{Backend, TrainBackend};
use crate::generate::{generate, GenOptions, Request};
use crate::model::lora::{Lora, LoraConfig, Target};
use crate::model::training::{Grads, TrainBatch};
use crate::model::Qwen2;
use crate::tokenizer::Tokenizer;
use crate::train::{OptimConfig, Optimizer, Schedule};

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

#[derive(Debug, Serialize)]
pub struct SftBenchResult {
    pub backend: String,
    pub threads: usize,
    /// `full`, or `lora-r{rank}` (all seven modules, alpha = 2 rank).
    pub mode: String,
    pub seq_tokens: usize,
    pub trainable_params: usize,
    /// Median seconds of one step: forward, backward, gradient clipping and AdamW.
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub repeats: usize,
    /// The loss of the first and last timed step (a sanity check that it trains).
    pub losses: Vec<f64>,
    /// Median seconds of each phase: zeroed gradients, forward, backward, optimiser.
    pub phases_s: [f64; 4],
}

/// One SFT step over a single sequence of `prompt` (every token trained, as `labels = ids` in
/// transformers), timed end to end: fresh zero gradients, forward with the fused loss,
/// backward, global-norm clipping to 1.0 and an AdamW update (lr 1e-5, weight decay 0.01).
/// `lora_rank` attaches fresh adapters on all seven modules; `None` trains every weight.
pub fn bench_sft_step<B: TrainBackend>(
    be: &B,
    model: &mut Qwen2<B>,
    prompt: &[u32],
    lora_rank: Option<usize>,
    recompute: bool,
    repeats: usize,
) -> Result<SftBenchResult> {
    if let Some(rank) = lora_rank {
        let cfg = LoraConfig {
            rank,
            alpha: 2.0 * rank as f32,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            seed: 0,
            trainable_tokens: None,
        };
        model.lora = Some(Lora::init(be, &model.cfg, &cfg)?);
    }
    let batch = TrainBatch::pack(&[(prompt.to_vec(), vec![true; prompt.len()])])?;
    let denom = batch.trained_rows().max(1) as f32;
    let cfg = OptimConfig {
        schedule: Schedule {
            lr: 1e-5,
            warmup_steps: 0,
            total_steps: 1,
            decay: crate::train::Decay::Constant,
            min_lr_ratio: 1.0,
        },
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
    };
    let shapes = model.trainable();
    let trainable_params = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let mut opt = Optimizer::new(be, shapes, cfg);
    let mut grads = Grads::zeros_for(be, model);
    let mut step = || -> Result<(Vec<Duration>, f64)> {
        let mut marks = vec![std::time::Instant::now()];
        grads.zero(be, &model.cfg);
        be.sync();
        marks.push(std::time::Instant::now());
        let (logp, trace) = model.train_forward(be, &batch, recompute)?;
        let loss = batch.nll(&logp, denom);
        marks.push(std::time::Instant::now());
        model.train_backward(be, &batch, trace, &batch.nll_dlogp(denom), &mut grads)?;
        be.sync();
        marks.push(std::time::Instant::now());
        let model_cfg = model.cfg.clone();
        opt.step(be, model.trainable_mut(), grads.tensors(&model_cfg))?;
        be.sync();
        marks.push(std::time::Instant::now());
        let mut times: Vec<Duration> = marks.windows(2).map(|w| w[1] - w[0]).collect();
        times.insert(0, marks[4] - marks[0]);
        Ok((times, loss))
    };
    step()?; // warm-up: page in the weights, allocate the optimiser moments
    let repeats = repeats.max(1);
    let (mut times, mut losses) = (vec![], vec![]);
    for _ in 0..repeats {
        let (t, loss) = step()?;
        times.push(t);
        losses.push(loss);
    }
    let phase = |i: usize| median(times.iter().map(|t| t[i]).collect()).as_secs_f64();
    let step_s = phase(0);
    Ok(SftBenchResult {
        backend: be.name(),
        threads: rayon::current_num_threads(),
        mode: lora_rank.map(|r| format!("lora-r{r}")).unwrap_or_else(|| "full".into()),
        seq_tokens: prompt.len(),
        trainable_params,
        step_s,
        tokens_per_s: prompt.len() as f64 / step_s,
        repeats,
        losses: vec![losses[0], *losses.last().unwrap()],
        phases_s: [phase(1), phase(2), phase(3), phase(4)],
    })
}
