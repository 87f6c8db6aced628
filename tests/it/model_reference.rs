//! The Qwen2 forward pass against transformers' float32 logits (fixtures made by
//! `tools/make_fixtures.py`), and the KV-cache paths against full recomputation.

/// GGUF files loaded directly (a module here: one test binary less to link).
mod gguf;

use crate::common::{fixture, load, max_abs_diff, Tensors, MODELS};
use protege::backend::{cache_slot, Backend, SeqSlice, StepMeta};
use protege::generate::{generate, prompt_logits, GenOptions, Request, BLOCK_SIZE};
use protege::model::KvCache;

/// Tolerance against transformers in f32 (the acceptance bound).
const ATOL: f32 = 1e-4;

#[test]
fn prefill_logits_match_transformers() {
    for name in MODELS {
        let (be, model) = load(name);
        let r = Tensors::open(&fixture(&format!("{name}/reference.safetensors")));
        let ids = r.u32s("input_ids");
        let (want, shape) = r.f32s("logits");
        assert_eq!(shape, vec![ids.len(), model.cfg.vocab_size]);
        let got = prompt_logits(&be, &model, &ids, None).unwrap();
        let err = max_abs_diff(&got, &want);
        println!("{name}: prefill max abs error {err:.2e} over {} logits", want.len());
        assert!(err <= ATOL, "{name}: max abs error {err}");

        let r = Tensors::open(&fixture(&format!("{name}/reference_positions.safetensors")));
        let positions = r.u32s("positions");
        let (want, _) = r.f32s("logits");
        let got = prompt_logits(&be, &model, &r.u32s("input_ids"), Some(&positions)).unwrap();
        assert!(max_abs_diff(&got, &want) <= ATOL, "{name}: selected positions");
    }
}

/// Feeds `tokens` to one sequence one step at a time after prefilling `prefill` of them;
/// returns the last-row logits of every step.
fn incremental_logits(name: &str, tokens: &[u32], prefill: usize) -> Vec<Vec<f32>> {
    let (be, model) = load(name);
    let mut cache = KvCache::new(&be, &model.cfg, tokens.len(), BLOCK_SIZE);
    let mut blocks = vec![];
    let mut out = vec![];
    let mut done = 0;
    while done < tokens.len() {
        let n_new = if done == 0 { prefill } else { 1 };
        while blocks.len() * BLOCK_SIZE < done + n_new {
            blocks.push(cache.alloc_block().unwrap());
        }
        let meta = StepMeta {
            tokens: tokens[done..done + n_new].to_vec(),
            positions: (done as u32..(done + n_new) as u32).collect(),
            slots: (done..done + n_new).map(|p| cache_slot(&blocks, p, BLOCK_SIZE)).collect(),
            seqs: vec![SeqSlice { row_start: 0, n_new, n_ctx: done + n_new, block_table: blocks.clone() }],
            block_size: BLOCK_SIZE,
            logit_rows: vec![n_new as u32 - 1],
        };
        out.push(be.to_f32(&model.forward(&be, &meta, &mut cache).unwrap()));
        done += n_new;
    }
    out
}

#[test]
fn kv_cache_decode_matches_transformers_and_full_recompute() {
    for name in MODELS {
        let r = Tensors::open(&fixture(&format!("{name}/decode.safetensors")));
        let ids = r.u32s("input_ids");
        let p = r.i64s("prompt_len")[0] as usize;
        let (want, shape) = r.f32s("logits");
        let vocab = shape[1];
        assert_eq!(shape[0], ids.len() - p + 1);
        let steps = incremental_logits(name, &ids, p);
        assert_eq!(steps.len(), shape[0]);
        for (j, got) in steps.iter().enumerate() {
            let err = max_abs_diff(got, &want[j * vocab..(j + 1) * vocab]);
            assert!(err <= ATOL, "{name}: decode step {j}: max abs error {err}");
        }
        // The same positions from one full forward (no cache reuse).
        let (be, model) = load(name);
        let rows: Vec<u32> = (p as u32 - 1..ids.len() as u32).collect();
        let full = prompt_logits(&be, &model, &ids, Some(&rows)).unwrap();
        let err = max_abs_diff(&steps.concat(), &full);
        println!("{name}: cached decode vs full recompute max abs diff {err:.2e}");
        // Not bit-identical: decode rows take the matrix-vector kernel, prefill takes gemm.
        assert!(err <= 5e-5, "{name}: cached decode differs from recompute by {err}");
    }
}

fn greedy_cases(name: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    let text = std::fs::read_to_string(fixture(&format!("{name}/greedy.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids =
        |x: &serde_json::Value| x.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect::<Vec<_>>();
    v["cases"].as_array().unwrap().iter().map(|c| (ids(&c["prompt_ids"]), ids(&c["new_ids"]))).collect()
}

#[test]
fn greedy_continuations_match_transformers_alone_batched_and_chunked() {
    for name in MODELS {
        let (be, model) = load(name);
        let cases = greedy_cases(name);
        let reqs: Vec<Request> = cases.iter().map(|(p, want)| Request::greedy(p.clone(), want.len())).collect();
        // One at a time.
        for (req, (_, want)) in reqs.iter().zip(&cases) {
            let (out, _) =
                generate(&be, &model, std::slice::from_ref(req), None, &GenOptions::default(), |_, _| {}).unwrap();
            assert_eq!(&out[0].tokens, want, "{name}: greedy alone");
        }
        // All together (mixed prompt lengths in every step), and with prompts split into
        // chunks of 5 tokens so that prefill and decode rows share steps.
        for max_step_tokens in [512, 5] {
            let mut streamed = vec![vec![]; reqs.len()];
            let (out, stats) =
                generate(&be, &model, &reqs, None, &GenOptions { max_step_tokens }, |i, t| streamed[i].push(t))
                    .unwrap();
            for (i, (_, want)) in cases.iter().enumerate() {
                assert_eq!(&out[i].tokens, want, "{name}: greedy batched (step budget {max_step_tokens}) case {i}");
                assert_eq!(&streamed[i], want, "{name}: streamed tokens");
            }
            assert_eq!(stats.prefill_tokens, cases.iter().map(|c| c.0.len()).sum::<usize>());
        }
    }
}

#[test]
#[allow(clippy::needless_range_loop)]
fn batched_decode_logits_equal_one_by_one() {
    // Three sequences of different lengths decoded in the same steps: every row's logits must
    // equal the logits of that sequence decoded alone.
    let name = "odd";
    let (be, model) = load(name);
    let prompts: Vec<Vec<u32>> = vec![(1..4).collect(), (10..27).collect(), (100..109).collect()];
    let extra = 6;
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let tokens: Vec<u32> = p.iter().copied().chain(200..200 + extra as u32).collect();
            incremental_logits(name, &tokens, p.len())
        })
        .collect();
    let mut cache = KvCache::new(&be, &model.cfg, 256, BLOCK_SIZE);
    let mut tables: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
    let mut lens = vec![0usize; prompts.len()];
    for step in 0..=extra {
        let mut meta = StepMeta { block_size: BLOCK_SIZE, ..Default::default() };
        for (s, p) in prompts.iter().enumerate() {
            let toks: Vec<u32> = if step == 0 { p.clone() } else { vec![200 + step as u32 - 1] };
            while tables[s].len() * BLOCK_SIZE < lens[s] + toks.len() {
                tables[s].push(cache.alloc_block().unwrap());
            }
            let row_start = meta.rows();
            for (j, &t) in toks.iter().enumerate() {
                let pos = lens[s] + j;
                meta.tokens.push(t);
                meta.positions.push(pos as u32);
                meta.slots.push(cache_slot(&tables[s], pos, BLOCK_SIZE));
            }
            lens[s] += toks.len();
            meta.seqs.push(SeqSlice { row_start, n_new: toks.len(), n_ctx: lens[s], block_table: tables[s].clone() });
            meta.logit_rows.push((row_start + toks.len() - 1) as u32);
        }
        let logits = be.to_f32(&model.forward(&be, &meta, &mut cache).unwrap());
        let v = model.cfg.vocab_size;
        for s in 0..prompts.len() {
            let err = max_abs_diff(&logits[s * v..(s + 1) * v], &alone[s][step]);
            assert!(err <= 1e-5, "sequence {s} step {step}: batched differs from alone by {err}");
        }
    }
}

#[test]
fn sampling_is_seeded_and_stops() {
    let (be, model) = load("tiny");
    let prompt: Vec<u32> = (5..20).collect();
    let req = |seed| Request {
        sampling: protege::backend::SamplingParams { temperature: 1.0, top_k: 50, top_p: 0.9 },
        seed,
        ..Request::greedy(prompt.clone(), 20)
    };
    let run = |r: Request| generate(&be, &model, &[r], None, &GenOptions::default(), |_, _| {}).unwrap().0.remove(0);
    assert_eq!(run(req(1)).tokens, run(req(1)).tokens, "same seed, same tokens");
    assert_ne!(run(req(1)).tokens, run(req(2)).tokens, "different seeds should differ");
    // A stop token ends generation right after it is produced.
    let first = run(req(1)).tokens;
    let stop = first[3];
    let out = run(Request { stop_tokens: vec![stop], ..req(1) });
    let at = first.iter().position(|&t| t == stop).unwrap();
    assert_eq!(out.tokens, first[..=at].to_vec());
    assert_eq!(out.finish, protege::generate::Finish::StopToken(stop));
}

#[test]
fn stop_strings_end_generation_once_the_text_contains_them() {
    let (be, model) = load("tiny");
    let tok = protege::tokenizer::Tokenizer::from_dir(&fixture("tiny")).unwrap();
    let prompt = tok.encode("def add(a, b):").unwrap();
    let run = |stop: Vec<String>| {
        let req = Request { stop_strings: stop, ..Request::greedy(prompt.clone(), 24) };
        generate(&be, &model, &[req], Some(&tok), &GenOptions::default(), |_, _| {}).unwrap().0.remove(0)
    };
    let free = run(vec![]);
    let text = tok.decode(&free.tokens, false).unwrap();
    // A stop string made of characters from the middle of the free-running text.
    let mid = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[mid..].chars().take(2).collect();
    let out = run(vec!["never-appears".into(), stop.clone()]);
    assert_eq!(out.finish, protege::generate::Finish::StopString(stop.clone()));
    let got = tok.decode(&out.tokens, false).unwrap();
    assert!(got.contains(&stop) && free.tokens.starts_with(&out.tokens), "{got:?} vs {text:?}");
    assert!(out.tokens.len() < free.tokens.len());
    // Without a tokenizer, stop strings are an error rather than silently ignored.
    let req = Request { stop_strings: vec!["x".into()], ..Request::greedy(prompt.clone(), 4) };
    assert!(generate(&be, &model, &[req], None, &GenOptions::default(), |_, _| {}).is_err());
}

#[test]
fn multi_turn_sessions_reuse_their_cache_and_generate_the_same() {
    // A session's second turn extends the first turn's prompt and reply: it prefills only the
    // new tokens and continues exactly as a fresh request for the whole prompt would.
    use protege::generate::Batcher;
    let (be, model) = load("tiny");
    let cases = greedy_cases("tiny");
    let (prompt, _) = &cases[0];
    let run = |b: &mut Batcher<'_, _>, r: Request, session: Option<u64>| {
        let id = b.admit_session(r, session).unwrap();
        loop {
            if let Some((_, c)) = b.step(|_, _, _| {}).unwrap().into_iter().find(|(i, _)| *i == id) {
                return c.tokens;
            }
        }
    };
    let mut b = Batcher::new(&be, &model, None, 1024, &GenOptions::default());
    let first = run(&mut b, Request::greedy(prompt.clone(), 6), Some(7));
    // Turn two: the reply and an "observation" appended.
    let second_prompt: Vec<u32> = prompt.iter().chain(&first).chain(&[5, 6, 7, 8]).copied().collect();
    let reused_before = b.stats.reused_tokens;
    let second = run(&mut b, Request::greedy(second_prompt.clone(), 8), Some(7));
    assert_eq!(b.stats.reused_tokens - reused_before, prompt.len() + first.len() - 1);
    let mut fresh = Batcher::new(&be, &model, None, 1024, &GenOptions::default());
    assert_eq!(second, run(&mut fresh, Request::greedy(second_prompt.clone(), 8), None));
    // A prompt that does not extend the parked cache starts over; releasing frees the blocks.
    let other: Vec<u32> = second_prompt.iter().rev().copied().collect();
    let before = b.stats.reused_tokens;
    run(&mut b, Request::greedy(other, 2), Some(7));
    assert_eq!(b.stats.reused_tokens, before);
    b.release_session(7);
    assert!(b.has_room(&Request::greedy(vec![1; 1000], 24)));
    // A small cache evicts parked sessions to admit new work.
    let mut small = Batcher::new(&be, &model, None, 64, &GenOptions::default());
    run(&mut small, Request::greedy(vec![3; 40], 4), Some(1));
    assert!(small.has_room(&Request::greedy(vec![4; 50], 4)));
    run(&mut small, Request::greedy(vec![4; 50], 4), Some(2));
}
