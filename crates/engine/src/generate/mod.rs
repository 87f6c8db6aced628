//! Generation: a step scheduler over the paged KV cache.
//!
//! Every step packs, for each unfinished sequence, either its next chunk of prompt tokens or
//! its last sampled token, so prefill, chunked prefill and batched decode of sequences of
//! different lengths all run through one [`Qwen2::forward`]. A sequence samples once its
//! prompt is fully in the cache.

pub mod engine;
pub mod loaded;
pub mod sampling;
pub mod stream;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::backend::sampling::{self as draw, Rng};
use crate::backend::{cache_slot, Backend, SamplingParams, SeqSlice, StepMeta};
use crate::model::{KvCache, Lora, Qwen2};
use crate::tokenizer::Tokenizer;
pub use sampling::{Penalties, TokenLogprob};
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
    /// Report each sampled token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    pub penalties: Penalties,
    /// Which of the batcher's adapters applies ([`Batcher::with_adapters`]); `None`: the
    /// model's own (`model.lora`, if any).
    pub adapter: Option<usize>,
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
            logprobs: None,
            penalties: Penalties::default(),
            adapter: None,
        }
    }

    /// Whether sampling needs the logits on the host (log-probabilities, penalties).
    fn needs_host_logits(&self) -> bool {
        self.logprobs.is_some() || !self.penalties.is_none()
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
    /// One per token when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprob>,
}

/// Time and tokens spent in prompt processing versus decoding.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prefill_tokens: usize,
    pub prefill_time: Duration,
    pub decode_tokens: usize,
    pub decode_time: Duration,
    /// Prompt tokens whose cache a session's earlier turn had already computed.
    pub reused_tokens: usize,
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
    req: Request,
    /// The multi-turn session this sequence belongs to (its cache is kept when it finishes).
    session: Option<u64>,
    blocks: Vec<u32>,
    /// Tokens already in the KV cache.
    cached: usize,
    /// Tokens to feed next: the rest of the prompt, or the last sampled token.
    pending: Vec<u32>,
    generated: Vec<u32>,
    rng: Rng,
    finish: Option<Finish>,
    text: Option<TextStream>,
    logprobs: Vec<TokenLogprob>,
}

impl Seq {
    /// Cache blocks this sequence may still need beyond those it holds.
    fn blocks_to_come(&self) -> usize {
        let total = (self.req.prompt.len() + self.req.max_new_tokens).div_ceil(BLOCK_SIZE);
        total.saturating_sub(self.blocks.len())
    }
}

/// The KV cache of a finished turn, kept for the session's next request.
struct Parked {
    blocks: Vec<u32>,
    /// The tokens whose keys and values the blocks hold.
    tokens: Vec<u32>,
    /// For least-recently-used eviction.
    last_used: u64,
}

/// A continuous-batching generator: requests join ([`Batcher::admit`]) whenever the KV cache
/// has room for all of their tokens, and every [`Batcher::step`] runs one forward over all
/// live sequences (decoding ones first, then prompt chunks up to the step's token budget).
///
/// Multi-turn sessions (an agent episode: each turn's prompt is the previous prompt, the
/// reply and the new observations) keep their cache between turns, so a turn only prefills
/// what is new ([`Batcher::admit_session`]). Parked caches are evicted, least recently used
/// first, when a request needs their room.
pub struct Batcher<'a, B: Backend> {
    be: &'a B,
    model: &'a Qwen2<B>,
    tokenizer: Option<&'a Tokenizer>,
    cache: KvCache<B>,
    seqs: Vec<Option<Seq>>,
    parked: std::collections::HashMap<u64, Parked>,
    clock: u64,
    budget: usize,
    /// Adapters requests may name ([`Request::adapter`]), applied unmerged.
    adapters: &'a [Lora<B>],
    pub stats: GenStats,
}

impl<'a, B: Backend> Batcher<'a, B> {
    /// A batcher whose KV cache holds `capacity_tokens` tokens (prompt + new tokens of every
    /// live request together).
    pub fn new(
        be: &'a B,
        model: &'a Qwen2<B>,
        tokenizer: Option<&'a Tokenizer>,
        capacity_tokens: usize,
        opts: &GenOptions,
    ) -> Self {
        Self {
            be,
            model,
            tokenizer,
            cache: KvCache::new(be, &model.cfg, capacity_tokens, BLOCK_SIZE),
            seqs: vec![],
            parked: Default::default(),
            clock: 0,
            budget: opts.max_step_tokens.max(1),
            adapters: &[],
            stats: GenStats::default(),
        }
    }

    /// Lets requests choose one of `adapters` (several LoRA adapters on one base, unmerged:
    /// each step runs one forward per adapter in use).
    pub fn with_adapters(mut self, adapters: &'a [Lora<B>]) -> Self {
        self.adapters = adapters;
        self
    }

    /// Blocks of `session`'s parked cache that `r` can reuse (its prompt extends their tokens).
    fn reusable(&self, r: &Request, session: Option<u64>) -> usize {
        match session.and_then(|s| self.parked.get(&s)) {
            Some(p) if p.tokens.len() < r.prompt.len() && r.prompt.starts_with(&p.tokens) => p.blocks.len(),
            _ => 0,
        }
    }

    /// Drops a session's parked cache (the episode ended).
    pub fn release_session(&mut self, session: u64) {
        if let Some(p) = self.parked.remove(&session) {
            self.cache.release(&p.blocks);
        }
    }

    /// Evicts parked caches other than `keep`'s, oldest first, until `need` blocks are free
    /// beyond what live sequences are promised. Returns whether that much is free.
    fn make_room(&mut self, need: usize, keep: Option<u64>) -> bool {
        loop {
            let promised: usize = self.seqs.iter().flatten().map(Seq::blocks_to_come).sum();
            if self.cache.free_blocks() >= promised + need {
                return true;
            }
            let victim =
                self.parked.iter().filter(|(&s, _)| Some(s) != keep).min_by_key(|(_, p)| p.last_used).map(|(&s, _)| s);
            match victim {
                Some(s) => self.release_session(s),
                None => return false,
            }
        }
    }

    /// Cache blocks a request needs over its life.
    pub fn blocks_needed(r: &Request) -> usize {
        (r.prompt.len() + r.max_new_tokens).div_ceil(BLOCK_SIZE)
    }

    fn check(&self, r: &Request) -> Result<()> {
        let cfg = &self.model.cfg;
        if r.prompt.is_empty() {
            bail!("empty prompt");
        }
        let total = r.prompt.len() + r.max_new_tokens;
        if total > cfg.max_position_embeddings {
            bail!(
                "prompt ({}) + max_new_tokens ({}) exceeds the model's max_position_embeddings ({})",
                r.prompt.len(),
                r.max_new_tokens,
                cfg.max_position_embeddings
            );
        }
        if !r.stop_strings.is_empty() && self.tokenizer.is_none() {
            bail!("stop strings need a tokenizer");
        }
        if let Some(a) = r.adapter.filter(|&a| a >= self.adapters.len()) {
            bail!("adapter {a} does not exist ({} loaded)", self.adapters.len());
        }
        if Self::blocks_needed(r) > self.cache.capacity_blocks() {
            bail!(
                "a request of {total} tokens does not fit the KV cache of {} tokens",
                self.cache.capacity_blocks() * BLOCK_SIZE
            );
        }
        Ok(())
    }

    /// Whether `r` fits beside the live sequences (counting the blocks they will still need,
    /// and parked caches that could be evicted).
    pub fn has_room(&self, r: &Request) -> bool {
        self.has_room_session(r, None)
    }

    pub fn has_room_session(&self, r: &Request, session: Option<u64>) -> bool {
        let promised: usize = self.seqs.iter().flatten().map(Seq::blocks_to_come).sum();
        let reuse = self.reusable(r, session);
        // Parked caches can be evicted; the session's own is either reused or released.
        let evictable: usize =
            self.parked.iter().filter(|(&s, _)| Some(s) != session || reuse == 0).map(|(_, p)| p.blocks.len()).sum();
        let need = Self::blocks_needed(r) - reuse;
        self.cache.free_blocks() + evictable >= promised + need
    }

    /// Starts `r`; returns its id (ids are reused once a sequence finishes). Fails when the
    /// request is invalid or there is no room now ([`Batcher::has_room`]).
    pub fn admit(&mut self, r: Request) -> Result<usize> {
        self.admit_session(r, None)
    }

    /// [`Batcher::admit`] for a turn of `session`: when its prompt extends the session's
    /// parked cache, only the new tokens are prefilled.
    pub fn admit_session(&mut self, r: Request, session: Option<u64>) -> Result<usize> {
        self.check(&r)?;
        let reuse = self.reusable(&r, session);
        let (blocks, cached) = match session.and_then(|s| self.parked.remove(&s)) {
            Some(p) if reuse > 0 => (p.blocks, p.tokens.len()),
            Some(p) => {
                self.cache.release(&p.blocks);
                (vec![], 0)
            }
            None => (vec![], 0),
        };
        if !self.make_room(Self::blocks_needed(&r) - blocks.len(), session) {
            self.cache.release(&blocks);
            bail!("no room in the KV cache now");
        }
        self.stats.reused_tokens += cached;
        let seq = Seq {
            session,
            blocks,
            cached,
            pending: r.prompt[cached..].to_vec(),
            generated: vec![],
            rng: draw::seeded(r.seed),
            finish: (r.max_new_tokens == 0).then_some(Finish::Length),
            text: (!r.stop_strings.is_empty()).then(|| TextStream::new(self.tokenizer.expect("checked").clone())),
            logprobs: vec![],
            req: r,
        };
        let id = match self.seqs.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.seqs.push(None);
                self.seqs.len() - 1
            }
        };
        self.seqs[id] = Some(seq);
        Ok(id)
    }

    /// A finished sequence's cache: parked for its session's next turn, or freed.
    fn retire(&mut self, s: &Seq) {
        match s.session {
            Some(id) => {
                // Every token but the last sampled one went through the model.
                let mut tokens = s.req.prompt.clone();
                tokens.extend(&s.generated[..s.generated.len().saturating_sub(1)]);
                tokens.truncate(s.cached);
                self.clock += 1;
                let old = self.parked.insert(id, Parked { blocks: s.blocks.clone(), tokens, last_used: self.clock });
                if let Some(p) = old {
                    self.cache.release(&p.blocks);
                }
            }
            None => self.cache.release(&s.blocks),
        }
    }

    /// KV-cache blocks in all, and free now (parked caches count as used).
    pub fn capacity_blocks(&self) -> usize {
        self.cache.capacity_blocks()
    }
    pub fn free_blocks(&self) -> usize {
        self.cache.free_blocks()
    }

    /// Sequences admitted and not yet returned.
    pub fn live(&self) -> usize {
        self.seqs.iter().flatten().count()
    }

    /// Stops sequence `id` now (its client went away); its cache is freed, not parked.
    /// Returns whether it was live.
    pub fn cancel(&mut self, id: usize) -> bool {
        match self.seqs.get_mut(id).and_then(Option::take) {
            Some(s) => {
                self.cache.release(&s.blocks);
                true
            }
            None => false,
        }
    }

    /// One step over the live sequences: one forward per adapter in use. `on_token(id, token,
    /// logprob)` sees every sampled token (with its log-probability when the request asked);
    /// the sequences that finished are returned (and leave the batcher).
    pub fn step(
        &mut self,
        mut on_token: impl FnMut(usize, u32, Option<&TokenLogprob>),
    ) -> Result<Vec<(usize, Completion)>> {
        let mut done = vec![];
        // Requests with nothing to generate finish without a forward.
        for (i, slot) in self.seqs.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|s| s.finish.is_some()) {
                let s = slot.take().expect("checked");
                done.push((i, s));
            }
        }
        let mut done: Vec<(usize, Completion)> = done
            .into_iter()
            .map(|(i, s)| {
                self.retire(&s);
                (i, Completion { tokens: s.generated, finish: s.finish.expect("checked"), logprobs: s.logprobs })
            })
            .collect();
        // Decoding sequences go first so that a long prompt never stalls them.
        let mut order: Vec<usize> = (0..self.seqs.len()).filter(|&i| self.seqs[i].is_some()).collect();
        order.sort_by_key(|&i| self.seqs[i].as_ref().expect("live").pending.len() > 1);
        // One step plan per adapter (the step's token budget is shared).
        let mut plans: Vec<(Option<usize>, StepMeta, Vec<usize>, usize)> = vec![];
        let mut rows = 0;
        for i in order {
            let left = self.budget - rows;
            if left == 0 {
                break;
            }
            let s = self.seqs[i].as_mut().expect("live");
            let adapter = s.req.adapter;
            let p = match plans.iter().position(|p| p.0 == adapter) {
                Some(p) => p,
                None => {
                    plans.push((adapter, StepMeta { block_size: BLOCK_SIZE, ..Default::default() }, vec![], 0));
                    plans.len() - 1
                }
            };
            let (_, meta, samplers, prompt_rows) = &mut plans[p];
            let take = s.pending.len().min(left);
            while s.blocks.len() * BLOCK_SIZE < s.cached + take {
                s.blocks.push(self.cache.alloc_block()?);
            }
            let row_start = meta.rows();
            for (j, &t) in s.pending[..take].iter().enumerate() {
                let pos = s.cached + j;
                meta.tokens.push(t);
                meta.positions.push(pos as u32);
                meta.slots.push(cache_slot(&s.blocks, pos, BLOCK_SIZE));
            }
            if s.generated.is_empty() {
                *prompt_rows += take;
            }
            meta.seqs.push(SeqSlice { row_start, n_new: take, n_ctx: s.cached + take, block_table: s.blocks.clone() });
            s.cached += take;
            s.pending.drain(..take);
            if s.pending.is_empty() {
                meta.logit_rows.push((row_start + take - 1) as u32);
                samplers.push(i);
            }
            rows += take;
        }
        for (adapter, meta, samplers, prompt_rows) in plans {
            let started = Instant::now();
            let lora = match adapter {
                Some(a) => Some(&self.adapters[a]),
                None => self.model.lora.as_ref(),
            };
            let logits = self.model.forward_with(self.be, &meta, &mut self.cache, lora)?;
            let sampled = self.sample(&logits, &samplers);
            let elapsed = started.elapsed();
            if prompt_rows > 0 {
                self.stats.prefill_tokens += prompt_rows;
                self.stats.prefill_time += elapsed;
            } else {
                self.stats.decode_tokens += meta.rows();
                self.stats.decode_time += elapsed;
            }
            for (&i, (tok, rng, logprob)) in samplers.iter().zip(sampled) {
                let s = self.seqs[i].as_mut().expect("live");
                s.rng = rng;
                s.generated.push(tok);
                on_token(i, tok, logprob.as_ref());
                s.logprobs.extend(logprob);
                if s.req.stop_tokens.contains(&tok) {
                    s.finish = Some(Finish::StopToken(tok));
                } else if let Some(stream) = s.text.as_mut() {
                    let delta = stream.push(tok)?;
                    if let Some(stop) = new_stop(stream.text(), delta.len(), &s.req.stop_strings) {
                        s.finish = Some(Finish::StopString(stop.clone()));
                    }
                }
                if s.finish.is_none() && s.generated.len() >= s.req.max_new_tokens {
                    s.finish = Some(Finish::Length);
                }
                if s.finish.is_some() {
                    let s = self.seqs[i].take().expect("live");
                    self.retire(&s);
                    let c = Completion { tokens: s.generated, finish: s.finish.expect("set"), logprobs: s.logprobs };
                    done.push((i, c));
                } else {
                    s.pending.push(tok);
                }
            }
        }
        Ok(done)
    }

    /// Samples the next token of each of `samplers` from its row of `logits` on the device; the
    /// rows that need the logits on the host (log-probabilities, penalties) are then sampled
    /// there, so one such request does not move the whole batch to the host sampler.
    fn sample(&self, logits: &B::Buf, samplers: &[usize]) -> Vec<(u32, Rng, Option<TokenLogprob>)> {
        let vocab = self.model.cfg.vocab_size;
        let live = |i: usize| self.seqs[i].as_ref().expect("live");
        let mut rngs: Vec<Rng> = samplers.iter().map(|&i| live(i).rng.clone()).collect();
        let on_host = samplers.iter().any(|&i| live(i).req.needs_host_logits());
        // The host rows sample from their streams as they were before the device draw.
        let before = if on_host { rngs.clone() } else { vec![] };
        let params: Vec<SamplingParams> = samplers.iter().map(|&i| live(i).req.sampling.clone()).collect();
        let next = self.be.sample(logits, vocab, &params, &mut rngs);
        let mut out: Vec<(u32, Rng, Option<TokenLogprob>)> =
            next.into_iter().zip(rngs).map(|(t, rng)| (t, rng, None)).collect();
        if !on_host {
            return out;
        }
        let host = self.be.to_f32(logits);
        for (r, (&i, rng)) in samplers.iter().zip(before).enumerate() {
            let s = live(i);
            if !s.req.needs_host_logits() {
                continue;
            }
            let mut rng = rng;
            let raw = &host[r * vocab..(r + 1) * vocab];
            let tok = if s.req.penalties.is_none() {
                draw::sample_row(raw, &s.req.sampling, &mut rng)
            } else {
                let mut row = raw.to_vec();
                s.req.penalties.apply(&mut row, &s.generated);
                draw::sample_row(&row, &s.req.sampling, &mut rng)
            };
            let lp = s.req.logprobs.map(|n| sampling::token_logprob(raw, tok, n));
            out[r] = (tok, rng, lp);
        }
        out
    }
}

/// The stop string that ends `text` now that its last `added` bytes arrived: only matches that
/// reach into the new bytes are looked for (earlier text was checked before), and of those the
/// one that starts first.
fn new_stop<'s>(text: &str, added: usize, stops: &'s [String]) -> Option<&'s String> {
    if added == 0 {
        return None;
    }
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let mut from = text.len().saturating_sub(added + longest);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let tail = &text[from..];
    stops.iter().filter_map(|st| tail.find(st.as_str()).map(|at| (at, st))).min_by_key(|(at, _)| *at).map(|(_, st)| st)
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
    let capacity: usize = requests.iter().map(|r| Batcher::<B>::blocks_needed(r) * BLOCK_SIZE).sum();
    let mut batcher = Batcher::new(be, model, tokenizer, capacity, opts);
    let mut ids = vec![];
    for (i, r) in requests.iter().enumerate() {
        ids.push(batcher.admit(r.clone()).map_err(|e| anyhow::anyhow!("request {i}: {e:#}"))?);
    }
    // Ids are handed out in order while nothing has finished, so id i is request i.
    debug_assert!(ids.iter().enumerate().all(|(i, &id)| i == id));
    let mut out: Vec<Option<Completion>> = vec![None; requests.len()];
    while batcher.live() > 0 {
        for (i, c) in batcher.step(|i, t, _| on_token(i, t))? {
            out[i] = Some(c);
        }
    }
    let stats = batcher.stats.clone();
    Ok((out.into_iter().map(|c| c.expect("every request finishes")).collect(), stats))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_is_looked_for_where_the_new_text_reaches() {
        let stops = vec!["\n\n".to_string(), ".".to_string()];
        // ".\n\n" arrived at once: "." starts first.
        assert_eq!(new_stop("ab.\n\n", 3, &stops).map(String::as_str), Some("."));
        // A stop completed by the new byte, begun before it.
        assert_eq!(new_stop("ab\n\n", 1, &stops).map(String::as_str), Some("\n\n"));
        assert_eq!(new_stop("ab\n\nc", 0, &stops), None);
        assert_eq!(new_stop("éé", 2, &["x".to_string()]), None);
    }
}
