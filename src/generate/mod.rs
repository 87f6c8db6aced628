//! Generation: a step scheduler over the paged KV cache.
//!
//! Every step packs, for each unfinished sequence, either its next chunk of prompt tokens or
//! its last sampled token, so prefill, chunked prefill and batched decode of sequences of
//! different lengths all run through one [`Qwen2::forward`]. A sequence samples once its
//! prompt is fully in the cache.

pub mod sampling;
pub mod stream;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::backend::{cache_slot, Backend, SamplingParams, SeqSlice, StepMeta};
use crate::model::{KvCache, Qwen2};
use crate::tokenizer::Tokenizer;
use sampling::Rng;
pub use stream::TextStream;

/// Tokens per KV-cache block.
pub const BLOCK_SIZE: usize = 16;

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Generation ends after any of these tokens (which is kept in the output).
    pub stop_tokens: Vec<u32>,
    /// Generation ends once the decoded completion contains any of these strings.
    pub stop_strings: Vec<String>,
}

impl Request {
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::default(),
            seed: 0,
            stop_tokens: vec![],
            stop_strings: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Length,
    StopToken(u32),
    StopString(String),
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

/// Time and tokens spent in prompt processing versus decoding.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prefill_tokens: usize,
    pub prefill_time: Duration,
    pub decode_tokens: usize,
    pub decode_time: Duration,
}

impl GenStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

pub struct GenOptions {
    /// Upper bound on the tokens of one forward step (bounds activation memory).
    pub max_step_tokens: usize,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self { max_step_tokens: 512 }
    }
}

struct Seq {
    blocks: Vec<u32>,
    /// Tokens already in the KV cache.
    cached: usize,
    /// Tokens to feed next: the rest of the prompt, or the last sampled token.
    pending: Vec<u32>,
    generated: Vec<u32>,
    rng: Rng,
    finish: Option<Finish>,
    text: Option<TextStream>,
}

/// Generates completions for `requests` together. `on_token(request, token)` is called for
/// every sampled token as soon as it is known. Stop strings need a tokenizer.
pub fn generate<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    requests: &[Request],
    tokenizer: Option<&Tokenizer>,
    opts: &GenOptions,
    mut on_token: impl FnMut(usize, u32),
) -> Result<(Vec<Completion>, GenStats)> {
    let cfg = &model.cfg;
    let mut capacity = 0;
    for (i, r) in requests.iter().enumerate() {
        if r.prompt.is_empty() {
            bail!("request {i} has an empty prompt");
        }
        let total = r.prompt.len() + r.max_new_tokens;
        if total > cfg.max_position_embeddings {
            bail!(
                "request {i}: prompt ({}) + max_new_tokens ({}) exceeds the model's max_position_embeddings ({})",
                r.prompt.len(),
                r.max_new_tokens,
                cfg.max_position_embeddings
            );
        }
        if !r.stop_strings.is_empty() && tokenizer.is_none() {
            bail!("request {i} has stop strings but no tokenizer was given");
        }
        capacity += total.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    }
    let mut cache = KvCache::new(be, cfg, capacity, BLOCK_SIZE);
    let mut seqs: Vec<Seq> = requests
        .iter()
        .map(|r| Seq {
            blocks: vec![],
            cached: 0,
            pending: r.prompt.clone(),
            generated: vec![],
            rng: sampling::seeded(r.seed),
            finish: (r.max_new_tokens == 0).then_some(Finish::Length),
            text: (!r.stop_strings.is_empty()).then(|| TextStream::new(tokenizer.unwrap().clone())),
        })
        .collect();
    let mut stats = GenStats::default();
    let budget = opts.max_step_tokens.max(1);

    loop {
        // Decoding sequences go first so that a long prompt never stalls them.
        let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].finish.is_none()).collect();
        if order.is_empty() {
            break;
        }
        order.sort_by_key(|&i| seqs[i].pending.len() > 1);
        let mut meta = StepMeta { block_size: BLOCK_SIZE, ..Default::default() };
        let mut samplers: Vec<usize> = vec![];
        let mut prompt_rows = 0;
        for i in order {
            let left = budget - meta.rows();
            if left == 0 {
                break;
            }
            let s = &mut seqs[i];
            let take = s.pending.len().min(left);
            while s.blocks.len() * BLOCK_SIZE < s.cached + take {
                s.blocks.push(cache.alloc_block()?);
            }
            let row_start = meta.rows();
            for (j, &t) in s.pending[..take].iter().enumerate() {
                let pos = s.cached + j;
                meta.tokens.push(t);
                meta.positions.push(pos as u32);
                meta.slots.push(cache_slot(&s.blocks, pos, BLOCK_SIZE));
            }
            if s.generated.is_empty() {
                prompt_rows += take;
            }
            meta.seqs.push(SeqSlice { row_start, n_new: take, n_ctx: s.cached + take, block_table: s.blocks.clone() });
            s.cached += take;
            s.pending.drain(..take);
            if s.pending.is_empty() {
                meta.logit_rows.push((row_start + take - 1) as u32);
                samplers.push(i);
            }
        }
        let started = Instant::now();
        let logits = model.forward(be, &meta, &mut cache)?;
        let params: Vec<SamplingParams> = samplers.iter().map(|&i| requests[i].sampling.clone()).collect();
        let mut rngs: Vec<Rng> = samplers.iter().map(|&i| seqs[i].rng.clone()).collect();
        let next = be.sample(&logits, cfg.vocab_size, &params, &mut rngs);
        let elapsed = started.elapsed();
        if prompt_rows > 0 {
            stats.prefill_tokens += prompt_rows;
            stats.prefill_time += elapsed;
        } else {
            stats.decode_tokens += meta.rows();
            stats.decode_time += elapsed;
        }
        for ((&i, tok), rng) in samplers.iter().zip(next).zip(rngs) {
            let (req, s) = (&requests[i], &mut seqs[i]);
            s.rng = rng;
            s.generated.push(tok);
            on_token(i, tok);
            if req.stop_tokens.contains(&tok) {
                s.finish = Some(Finish::StopToken(tok));
            } else if let Some(stream) = s.text.as_mut() {
                stream.push(tok)?;
                if let Some(stop) = req.stop_strings.iter().find(|st| stream.text().contains(st.as_str())) {
                    s.finish = Some(Finish::StopString(stop.clone()));
                }
            }
            if s.finish.is_none() && s.generated.len() >= req.max_new_tokens {
                s.finish = Some(Finish::Length);
            }
            if s.finish.is_some() {
                cache.release(&s.blocks);
                s.blocks.clear();
            } else {
                s.pending.push(tok);
            }
        }
    }
    let out = seqs
        .into_iter()
        .map(|s| Completion { tokens: s.generated, finish: s.finish.unwrap_or(Finish::Length) })
        .collect();
    Ok((out, stats))
}

/// Logits of every position of `tokens` (or of `rows` only), in one prefill.
pub fn prompt_logits<B: Backend>(be: &B, model: &Qwen2<B>, tokens: &[u32], rows: Option<&[u32]>) -> Result<Vec<f32>> {
    let n = tokens.len();
    if n == 0 {
        bail!("no input tokens");
    }
    let mut cache = KvCache::new(be, &model.cfg, n, BLOCK_SIZE);
    let blocks = (0..n.div_ceil(BLOCK_SIZE)).map(|_| cache.alloc_block()).collect::<Result<Vec<_>>>()?;
    let logit_rows: Vec<u32> = match rows {
        Some(r) => {
            if let Some(&bad) = r.iter().find(|&&p| p as usize >= n) {
                bail!("position {bad} is outside the {n} input tokens");
            }
            r.to_vec()
        }
        None => (0..n as u32).collect(),
    };
    let meta = StepMeta {
        tokens: tokens.to_vec(),
        positions: (0..n as u32).collect(),
        slots: (0..n).map(|p| cache_slot(&blocks, p, BLOCK_SIZE)).collect(),
        seqs: vec![SeqSlice { row_start: 0, n_new: n, n_ctx: n, block_table: blocks }],
        block_size: BLOCK_SIZE,
        logit_rows,
    };
    Ok(be.to_f32(&model.forward(be, &meta, &mut cache)?))
}
