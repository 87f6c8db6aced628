//! `protege selftest`: a device backend against the CPU reference backend.
//!
//! Every op runs on the same inputs on both backends over a sweep of shapes (odd sizes, GQA
//! ratios, lengths that are not multiples of the kernels' tiles, paged caches with shuffled
//! blocks). Inputs are rounded to bf16 on the host first, so both backends see identical values
//! and the difference measures only the device's arithmetic. Then whole models: logits against
//! the transformers fixtures and against the CPU backend, and greedy decoding against the CPU.
//!
//! Errors are normalised by the largest reference magnitude of the output
//! (`max|dev - cpu| / max|cpu|`), and the tolerances follow from bf16 (8 significant bits,
//! unit roundoff 2^-9 ≈ 0.002) and the number of roundings an op makes:
//! - one rounding of an f32 result (embedding, copy, add, scale, SwiGLU, RoPE, kv store, GEMM with
//!   f32 accumulation, gather): 1e-2;
//! - RMSNorm (normalised value rounded, then scaled and rounded again) and softmax: 1.5e-2;
//! - attention (probabilities rounded to bf16 before the P·V product, output rounded): 2e-2;
//! - whole-model logits (bf16 weights and activations through every layer): per element
//!   |dev - ref| <= 1.0 + 0.05·|ref|, mean |dev - ref| <= 0.15, and every row whose argmax differs
//!   from the reference's must be a near-tie (the reference's logits of the two tokens within
//!   1.0). Calibrated on transformers' own bf16 run against its f32 run on the same 97-token
//!   input: max |d| 0.37 / 0.40 / 0.59 / 0.75, mean 0.033 / 0.033 / 0.061 / 0.051, argmax agreement
//!   96.9% / 93.8% / 93.8% / 96.9% for the tiny, tiny-untied, odd and real 0.5B models.
//!
//! Sampling: greedy must equal the CPU's argmax exactly; temperature sampling must follow the
//! softmax distribution (frequencies within 0.03 over 4096 draws) and top-k/top-p must restrict
//! the support exactly.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};

use crate::backend::cpu::CpuBackend;
use crate::backend::{cache_slot, Backend, SamplingParams, SeqSlice, StepMeta};
use crate::generate::{generate, GenOptions, Request};
use crate::model::Qwen2;

#[cfg(test)]
mod emulated;
pub mod train;

/// One comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub group: String,
    pub name: String,
    /// Normalised error (or, for counts, the observed value).
    pub err: f64,
    pub tol: f64,
    pub passed: bool,
    pub note: String,
}

/// Collects checks and prints each as it completes.
#[derive(Default)]
pub struct Report {
    pub checks: Vec<Check>,
    pub quiet: bool,
}

impl Report {
    fn add(&mut self, group: &str, name: String, err: f64, tol: f64, note: String) {
        let passed = err.is_finite() && err <= tol;
        self.push(Check { group: group.into(), name, err, tol, passed, note });
    }

    fn push(&mut self, c: Check) {
        if !self.quiet {
            println!(
                "{:4} {:10} {:58} err {:9.3e}  tol {:8.1e}  {}",
                if c.passed { "ok" } else { "FAIL" },
                c.group,
                c.name,
                c.err,
                c.tol,
                c.note
            );
        }
        self.checks.push(c);
    }

    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.passed).count()
    }
}

const TOL_ONE_ROUNDING: f64 = 1e-2;
const TOL_NORM: f64 = 1.5e-2;
const TOL_ATTENTION: f64 = 2e-2;
/// Whole-model logits in bf16: `|dev - ref| <= MODEL_ATOL + MODEL_RTOL * |ref|` per element.
pub const MODEL_ATOL: f32 = 1.0;
pub const MODEL_RTOL: f32 = 0.05;
/// Whole-model logits in bf16: bound on the mean absolute difference.
const MODEL_MEAN_ABS: f64 = 0.15;

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    bf16_round(&(0..n).map(|_| rng.gen_range(-scale..scale)).collect::<Vec<_>>())
}

/// `max|a - b| / max|b|` over the first `n` values.
fn norm_err(a: &[f32], b: &[f32], n: usize) -> f64 {
    let mut d = 0.0f64;
    let mut m = 1e-6f64;
    for (&x, &y) in a[..n].iter().zip(&b[..n]) {
        let e = (x as f64 - y as f64).abs();
        d = if e.is_nan() { f64::NAN } else { d.max(e) };
        m = m.max((y as f64).abs());
    }
    d / m
}

/// Both backends' copies of one host array.
fn both<B: Backend>(dev: &B, cpu: &CpuBackend, v: &[f32]) -> (B::Buf, Vec<f32>) {
    (dev.upload_f32(v), cpu.upload_f32(v))
}

/// Elementwise, normalisation, RoPE, GEMM, embedding and softmax ops over a sweep of shapes.
pub fn check_ops<B: Backend>(dev: &B, cpu: &CpuBackend, rep: &mut Report) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for &n in &[1usize, 7, 1000, 65_537] {
        let (a, b) = (random(&mut rng, n, 2.0), random(&mut rng, n, 2.0));
        let (mut da, mut ca) = both(dev, cpu, &a);
        let (db, cb) = both(dev, cpu, &b);
        let (mut dout, mut cout) = (dev.zeros(n), cpu.zeros(n));
        dev.swiglu(&da, &db, &mut dout, n);
        cpu.swiglu(&ca, &cb, &mut cout, n);
        rep.add(
            "elementwise",
            format!("swiglu n={n}"),
            norm_err(&dev.to_f32(&dout), &cout, n),
            TOL_ONE_ROUNDING,
            String::new(),
        );
        dev.dropout(&da, &mut dout, n, 0.3, 99);
        cpu.dropout(&ca, &mut cout, n, 0.3, 99);
        rep.add(
            "elementwise",
            format!("dropout p=0.3 n={n}"),
            norm_err(&dev.to_f32(&dout), &cout, n),
            TOL_ONE_ROUNDING,
            String::new(),
        );
        dev.scale(&mut da, 0.37, n);
        cpu.scale(&mut ca, 0.37, n);
        dev.add_assign(&mut da, &db, n);
        cpu.add_assign(&mut ca, &cb, n);
        rep.add(
            "elementwise",
            format!("scale+add n={n}"),
            norm_err(&dev.to_f32(&da), &ca, n),
            TOL_ONE_ROUNDING,
            String::new(),
        );
        dev.copy(&db, &mut da, n);
        dev.zero(&mut da, n / 2);
        let mut want = b.clone();
        want[..n / 2].iter_mut().for_each(|x| *x = 0.0);
        rep.add("elementwise", format!("copy+zero n={n}"), norm_err(&dev.to_f32(&da), &want, n), 0.0, String::new());
        // Rows of 1 and 7 values (trained token rows): the last row of `b` into the first of `a`
        // and the first into the last.
        for dim in [1, 7].into_iter().filter(|&d| n >= 2 * d) {
            let last = (n / dim - 1) as u32;
            dev.copy_rows(&db, &[last, 0], &mut da, &[0, last], dim);
            let l = last as usize * dim;
            want[..dim].copy_from_slice(&b[l..l + dim]);
            want[l..l + dim].copy_from_slice(&b[..dim]);
            rep.add(
                "elementwise",
                format!("copy_rows n={n} dim={dim}"),
                norm_err(&dev.to_f32(&da), &want, n),
                0.0,
                String::new(),
            );
        }
    }
    for &(rows, dim) in &[(1usize, 10usize), (5, 64), (33, 90), (3, 896), (2, 3584)] {
        let x = random(&mut rng, rows * dim, 3.0);
        let w = random(&mut rng, dim, 1.5);
        let (dx, cx) = both(dev, cpu, &x);
        let (dw, cw) = both(dev, cpu, &w);
        let (mut dout, mut cout) = (dev.zeros(rows * dim), cpu.zeros(rows * dim));
        dev.rmsnorm(&dx, &dw, &mut dout, rows, dim, 1e-6);
        cpu.rmsnorm(&cx, &cw, &mut cout, rows, dim, 1e-6);
        rep.add(
            "rmsnorm",
            format!("rows={rows} dim={dim}"),
            norm_err(&dev.to_f32(&dout), &cout, rows * dim),
            TOL_NORM,
            String::new(),
        );
        let meta = StepMeta { logit_rows: (0..rows as u32).rev().collect(), ..Default::default() };
        dev.gather_logit_rows(&dx, &dev.prepare(&meta), &mut dout, dim);
        cpu.gather_logit_rows(&cx, &cpu.prepare(&meta), &mut cout, dim);
        rep.add(
            "gather",
            format!("rows={rows} dim={dim}"),
            norm_err(&dev.to_f32(&dout), &cout, rows * dim),
            0.0,
            String::new(),
        );
    }
    for &(rows, heads, hd, theta) in
        &[(3usize, 2usize, 10usize, 1e4f32), (17, 9, 10, 1e6), (5, 4, 16, 1e4), (9, 28, 128, 1e6), (4, 14, 64, 1e4)]
    {
        let x = random(&mut rng, rows * heads * hd, 2.0);
        let meta = StepMeta {
            tokens: vec![0; rows],
            positions: (0..rows).map(|_| rng.gen_range(0..32_768u32)).collect(),
            slots: vec![0; rows],
            seqs: vec![],
            block_size: 16,
            logit_rows: vec![],
        };
        let (mut dx, mut cx) = both(dev, cpu, &x);
        dev.rope(&mut dx, &dev.prepare(&meta), heads, hd, theta);
        cpu.rope(&mut cx, &cpu.prepare(&meta), heads, hd, theta);
        rep.add(
            "rope",
            format!("rows={rows} heads={heads} head_dim={hd} theta={theta:e}"),
            norm_err(&dev.to_f32(&dx), &cx, x.len()),
            TOL_ONE_ROUNDING,
            "positions up to 32k".into(),
        );
    }
    for &(rows, k, n, bias) in &[
        (1usize, 64usize, 64usize, false),
        (7, 90, 30, true),
        (33, 128, 200, true),
        (130, 896, 1000, false),
        (3, 3584, 512, true),
    ] {
        let x = random(&mut rng, rows * k, 1.0);
        let w = random(&mut rng, n * k, 1.0 / (k as f32).sqrt());
        let b = random(&mut rng, n, 0.5);
        let (dx, cx) = both(dev, cpu, &x);
        let (dw, cw) = both(dev, cpu, &w);
        let (db, cb) = both(dev, cpu, &b);
        let (mut dout, mut cout) = (dev.zeros(rows * n), cpu.zeros(rows * n));
        dev.linear(&dx, &dw, bias.then_some(&db), &mut dout, rows, k, n);
        cpu.linear(&cx, &cw, bias.then_some(&cb), &mut cout, rows, k, n);
        rep.add(
            "linear",
            format!("rows={rows} k={k} n={n}{}", if bias { " +bias" } else { "" }),
            norm_err(&dev.to_f32(&dout), &cout, rows * n),
            TOL_ONE_ROUNDING,
            String::new(),
        );
    }
    for &(vocab, dim, rows) in &[(455usize, 64usize, 9usize), (151_936, 896, 3)] {
        let table = random(&mut rng, vocab * dim, 1.0);
        let meta = StepMeta {
            tokens: (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect(),
            positions: vec![0; rows],
            slots: vec![0; rows],
            seqs: vec![],
            block_size: 16,
            logit_rows: vec![],
        };
        let (dt, ct) = both(dev, cpu, &table);
        let (mut dout, mut cout) = (dev.zeros(rows * dim), cpu.zeros(rows * dim));
        dev.embedding(&dt, &dev.prepare(&meta), &mut dout, dim);
        cpu.embedding(&ct, &cpu.prepare(&meta), &mut cout, dim);
        rep.add(
            "embedding",
            format!("vocab={vocab} dim={dim} rows={rows}"),
            norm_err(&dev.to_f32(&dout), &cout, rows * dim),
            0.0,
            String::new(),
        );
        let logits = random(&mut rng, rows * vocab, 8.0);
        for log in [false, true] {
            let (mut dl, mut cl) = both(dev, cpu, &logits);
            if log {
                dev.log_softmax(&mut dl, rows, vocab);
                cpu.log_softmax(&mut cl, rows, vocab);
            } else {
                dev.softmax(&mut dl, rows, vocab);
                cpu.softmax(&mut cl, rows, vocab);
            }
            rep.add(
                "softmax",
                format!("{} rows={rows} cols={vocab}", if log { "log_softmax" } else { "softmax" }),
                norm_err(&dev.to_f32(&dl), &cl, rows * vocab),
                TOL_NORM,
                String::new(),
            );
        }
    }
}

/// One sequence of an attention case: `n_new` new rows after `n_ctx - n_new` cached ones.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpec {
    pub n_new: usize,
    pub n_ctx: usize,
}

/// A packed step over a paged cache with shuffled blocks.
pub fn paged_meta(seqs: &[SeqSpec], block_size: usize, rng: &mut impl Rng) -> (StepMeta, usize) {
    let total_blocks: usize = seqs.iter().map(|s| s.n_ctx.div_ceil(block_size)).sum();
    let mut pool: Vec<u32> = (0..total_blocks as u32).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, rng.gen_range(0..=i));
    }
    let mut meta = StepMeta { block_size, ..Default::default() };
    let mut next = 0;
    for s in seqs {
        let nb = s.n_ctx.div_ceil(block_size);
        let table = pool[next..next + nb].to_vec();
        next += nb;
        let row_start = meta.tokens.len();
        for i in 0..s.n_new {
            let pos = s.n_ctx - s.n_new + i;
            meta.tokens.push(0);
            meta.positions.push(pos as u32);
            meta.slots.push(cache_slot(&table, pos, block_size));
        }
        meta.seqs.push(SeqSlice { row_start, n_new: s.n_new, n_ctx: s.n_ctx, block_table: table });
    }
    (meta, total_blocks * block_size)
}

/// The attention cases of the sweep: (heads, kv heads, head dim, sequences).
pub fn attention_cases() -> Vec<(usize, usize, usize, Vec<SeqSpec>)> {
    let s = |n_new, n_ctx| SeqSpec { n_new, n_ctx };
    let mut cases = vec![];
    for &(heads, kv, hd) in
        &[(4usize, 2usize, 16usize), (9, 3, 10), (8, 8, 64), (14, 2, 64), (28, 4, 128), (12, 2, 128)]
    {
        // Prefill of mixed lengths (not multiples of the 64-row tile), chunked prefill over an
        // existing cache, and decode rows of several context lengths, all in one step.
        cases.push((heads, kv, hd, vec![s(1, 1), s(37, 37), s(64, 64), s(130, 130)]));
        cases.push((heads, kv, hd, vec![s(50, 300), s(1, 63), s(1, 1000), s(1, 5), s(65, 65)]));
        cases.push((heads, kv, hd, vec![s(1, 2049), s(1, 17), s(1, 700)]));
    }
    cases
}

/// kv_store then attention over the paged cache, device against CPU.
pub fn check_attention<B: Backend>(dev: &B, cpu: &CpuBackend, rep: &mut Report, label: &str) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (heads, kv, hd, seqs) in attention_cases() {
        let (meta, slots) = paged_meta(&seqs, 16, &mut rng);
        let rows = meta.rows();
        let (qd, kvd) = (heads * hd, kv * hd);
        // A random cache (the positions this step writes are overwritten by kv_store).
        let kc = random(&mut rng, slots * kvd, 1.5);
        let vc = random(&mut rng, slots * kvd, 1.5);
        let q = random(&mut rng, rows * qd, 1.5);
        let k = random(&mut rng, rows * kvd, 1.5);
        let v = random(&mut rng, rows * kvd, 1.5);
        let (dm, cm) = (dev.prepare(&meta), cpu.prepare(&meta));
        let (mut dkc, mut ckc) = both(dev, cpu, &kc);
        let (mut dvc, mut cvc) = both(dev, cpu, &vc);
        let (dk, ck) = both(dev, cpu, &k);
        let (dv, cv) = both(dev, cpu, &v);
        dev.kv_store(&dk, &dv, &mut dkc, &mut dvc, &dm, kvd);
        cpu.kv_store(&ck, &cv, &mut ckc, &mut cvc, &cm, kvd);
        let shape = format!(
            "{label} h={heads} kv={kv} d={hd} seqs={}",
            seqs.iter().map(|s| format!("{}/{}", s.n_new, s.n_ctx)).collect::<Vec<_>>().join(",")
        );
        rep.add(
            "kv_store",
            shape.clone(),
            norm_err(&dev.to_f32(&dkc), &ckc, slots * kvd).max(norm_err(&dev.to_f32(&dvc), &cvc, slots * kvd)),
            0.0,
            String::new(),
        );
        let (dq, cq) = both(dev, cpu, &q);
        let (mut dout, mut cout) = (dev.zeros(rows * qd), cpu.zeros(rows * qd));
        dev.attention(&dq, &dkc, &dvc, &mut dout, &dm, heads, kv, hd);
        cpu.attention(&cq, &ckc, &cvc, &mut cout, &cm, heads, kv, hd);
        rep.add("attention", shape, norm_err(&dev.to_f32(&dout), &cout, rows * qd), TOL_ATTENTION, String::new());
    }
}

/// On-device sampling: greedy exactly, the sampled distribution, top-k/top-p support.
pub fn check_sampling<B: Backend>(dev: &B, rep: &mut Report) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for &(rows, vocab) in &[(5usize, 455usize), (4, 151_936)] {
        let logits = random(&mut rng, rows * vocab, 10.0);
        let want: Vec<u32> = logits.chunks(vocab).map(crate::generate::sampling::argmax).collect();
        let params = vec![SamplingParams::default(); rows];
        let mut rngs: Vec<_> = (0..rows).map(|i| crate::generate::sampling::seeded(i as u64)).collect();
        let got = dev.sample(&dev.upload_f32(&logits), vocab, &params, &mut rngs);
        let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        rep.add(
            "sampling",
            format!("greedy rows={rows} vocab={vocab}"),
            wrong as f64,
            0.0,
            "rows that differ from argmax".into(),
        );
    }
    // p = [0.1, 0.3, 0.2, 0.4] for logits ln p; the same row 4096 times with different seeds.
    let probs = [0.1f32, 0.3, 0.2, 0.4];
    let row: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let draws = 4096;
    let logits: Vec<f32> = (0..draws).flat_map(|_| row.iter().copied()).collect();
    let dl = dev.upload_f32(&logits);
    let bf_row = bf16_round(&row);
    let exact: Vec<f64> = {
        let m = bf_row.iter().fold(f32::MIN, |a, &b| a.max(b));
        let e: Vec<f64> = bf_row.iter().map(|&x| ((x - m) as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    };
    let cases: [(&str, SamplingParams, Vec<usize>); 3] = [
        ("temperature 1", SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0 }, vec![0, 1, 2, 3]),
        ("top-k 2", SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0 }, vec![1, 3]),
        ("top-p 0.65", SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.65 }, vec![1, 3]),
    ];
    for (name, p, support) in cases {
        let params = vec![p.clone(); draws];
        let mut rngs: Vec<_> = (0..draws).map(|i| crate::generate::sampling::seeded(1000 + i as u64)).collect();
        let got = dev.sample(&dl, 4, &params, &mut rngs);
        let outside = got.iter().filter(|t| !support.contains(&(**t as usize))).count();
        rep.add("sampling", format!("{name}: support"), outside as f64, 0.0, format!("draws outside {support:?}"));
        let z: f64 = support.iter().map(|&i| exact[i]).sum();
        let worst = support
            .iter()
            .map(|&i| {
                let f = got.iter().filter(|&&t| t as usize == i).count() as f64 / draws as f64;
                (f - exact[i] / z).abs()
            })
            .fold(0.0, f64::max);
        rep.add("sampling", format!("{name}: frequencies"), worst, 0.03, format!("{draws} draws"));
    }
}

/// A fixture model: its logits against transformers' and the CPU's, and greedy continuations.
pub fn check_model<B: Backend>(dev: &B, cpu: &CpuBackend, dir: &Path, rep: &mut Report) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dm = Qwen2::load(dev, dir).with_context(|| format!("loading {} on the device", dir.display()))?;
    let cm = Qwen2::load(cpu, dir).with_context(|| format!("loading {} on the CPU", dir.display()))?;
    for file in ["reference.safetensors", "reference_positions.safetensors"] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let reference = crate::check::Reference::load(&path)?;
        let ours = crate::generate::prompt_logits(dev, &dm, &reference.input_ids, Some(&reference.positions))?;
        model_logits_check(
            rep,
            format!("{name}: logits vs transformers ({file})"),
            &ours,
            &reference.logits,
            reference.vocab,
        );
    }
    // Against the CPU backend on a prompt of every kind of token.
    let vocab = dm.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..97u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let ours = crate::generate::prompt_logits(dev, &dm, &ids, None)?;
    let theirs = crate::generate::prompt_logits(cpu, &cm, &ids, None)?;
    model_logits_check(
        rep,
        format!("{name}: logits vs the CPU backend (97 tokens)"),
        &ours,
        &theirs,
        dm.cfg.vocab_size,
    );

    // Greedy: the same continuation as the CPU, batched with mixed prompt lengths.
    let prompts: Vec<Vec<u32>> = [3usize, 11, 40].iter().map(|&n| ids[..n].to_vec()).collect();
    let reqs: Vec<Request> = prompts.iter().map(|p| Request::greedy(p.clone(), 24)).collect();
    let (dout, _) = generate(dev, &dm, &reqs, None, &GenOptions::default(), |_, _| {})?;
    let (cout, _) = generate(cpu, &cm, &reqs, None, &GenOptions::default(), |_, _| {})?;
    for (i, (d, c)) in dout.iter().zip(&cout).enumerate() {
        let first_diff = d.tokens.iter().zip(&c.tokens).position(|(a, b)| a != b);
        let (err, note) = match first_diff {
            None => (0.0, format!("{} tokens equal", c.tokens.len())),
            Some(at) => {
                // Diverging where the CPU's top two logits are within bf16 noise is not a bug.
                let mut prefix = prompts[i].clone();
                prefix.extend_from_slice(&c.tokens[..at]);
                let l = crate::generate::prompt_logits(cpu, &cm, &prefix, Some(&[prefix.len() as u32 - 1]))?;
                let margin = (l[c.tokens[at] as usize] - l[d.tokens[at] as usize]).abs();
                let tie = margin <= MODEL_ATOL;
                (if tie { 0.0 } else { 1.0 }, format!("diverges at token {at}; CPU logit margin there {margin:.3e}"))
            }
        };
        rep.add("greedy", format!("{name}: prompt of {} tokens, 24 new", prompts[i].len()), err, 0.0, note);
    }
    Ok(())
}

/// Whole-model logits against a reference, with the bf16 criteria above.
fn model_logits_check(rep: &mut Report, what: String, ours: &[f32], reference: &[f32], vocab: usize) {
    let c = crate::check::compare(ours, reference, vocab, MODEL_ATOL, MODEL_RTOL);
    let argmax = crate::generate::sampling::argmax;
    let mut unexplained = 0;
    for (a, b) in ours.chunks(vocab).zip(reference.chunks(vocab)) {
        let (i, j) = (argmax(a) as usize, argmax(b) as usize);
        if i != j && (b[j] - b[i]).abs() > MODEL_ATOL {
            unexplained += 1;
        }
    }
    let passed = c.passed() && c.mean_abs <= MODEL_MEAN_ABS && unexplained == 0;
    rep.push(Check {
        group: "model".into(),
        name: what,
        err: c.max_abs as f64,
        tol: MODEL_ATOL as f64,
        passed,
        note: format!(
            "mean abs {:.3e} (<= {MODEL_MEAN_ABS}), {} values beyond {MODEL_ATOL} + {MODEL_RTOL}|ref|, argmax {}/{} ({unexplained} not near-ties)",
            c.mean_abs, c.violations, c.argmax_agree, c.rows
        ),
    });
}

/// Every check on `dev`: ops, attention (labelled `label`), sampling, then each model.
pub fn run_checks<B: Backend>(
    dev: &B,
    cpu: &CpuBackend,
    models: &[PathBuf],
    rep: &mut Report,
    label: &str,
) -> Result<()> {
    check_ops(dev, cpu, rep);
    check_attention(dev, cpu, rep, label);
    check_sampling(dev, rep);
    for m in models {
        check_model(dev, cpu, m, rep)?;
    }
    Ok(())
}

/// The fixture models under `fixtures` that have reference logits.
pub fn fixture_models(fixtures: &Path) -> Vec<PathBuf> {
    ["tiny", "tiny-untied", "odd"]
        .iter()
        .map(|n| fixtures.join(n))
        .filter(|d| {
            d.join("config.json").is_file()
                && (d.join("model.safetensors").is_file() || d.join("model.safetensors.index.json").is_file())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! The selftest must fail a backend that is wrong: the CPU backend with one deliberate
    //! fault at a time.
    use super::*;
    use crate::backend::HostTensor;

    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        None,
        /// RoPE with the wrong base frequency.
        RopeTheta,
        /// Attention that drops the oldest key of every long sequence.
        AttentionWindow,
        /// Greedy sampling that picks the second best token.
        Sampling,
        /// rmsnorm without its epsilon, and with an error of 3% on every output.
        Norm,
    }

    struct Faulty(CpuBackend, Fault);

    impl Backend for Faulty {
        type Buf = Vec<f32>;
        type Meta = StepMeta;
        fn name(&self) -> String {
            "faulty cpu".into()
        }
        fn zeros(&self, n: usize) -> Vec<f32> {
            self.0.zeros(n)
        }
        fn upload_f32(&self, d: &[f32]) -> Vec<f32> {
            self.0.upload_f32(d)
        }
        fn write_f32(&self, dst: &mut Vec<f32>, d: &[f32]) {
            self.0.write_f32(dst, d)
        }
        fn upload(&self, t: &HostTensor) -> Result<Vec<f32>> {
            self.0.upload(t)
        }
        fn to_f32(&self, b: &Vec<f32>) -> Vec<f32> {
            self.0.to_f32(b)
        }
        fn prepare(&self, m: &StepMeta) -> StepMeta {
            m.clone()
        }
        fn embedding(&self, t: &Vec<f32>, m: &StepMeta, o: &mut Vec<f32>, d: usize) {
            self.0.embedding(t, m, o, d)
        }
        fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, o: &mut Vec<f32>, r: usize, d: usize, eps: f32) {
            self.0.rmsnorm(x, w, o, r, d, eps);
            if self.1 == Fault::Norm {
                o[..r * d].iter_mut().for_each(|v| *v *= 1.03);
            }
        }
        fn linear(
            &self,
            x: &Vec<f32>,
            w: &Vec<f32>,
            b: Option<&Vec<f32>>,
            o: &mut Vec<f32>,
            r: usize,
            k: usize,
            n: usize,
        ) {
            self.0.linear(x, w, b, o, r, k, n)
        }
        fn rope(&self, x: &mut Vec<f32>, m: &StepMeta, h: usize, d: usize, theta: f32) {
            let theta = if self.1 == Fault::RopeTheta { theta * 1.01 } else { theta };
            self.0.rope(x, m, h, d, theta)
        }
        fn kv_store(&self, k: &Vec<f32>, v: &Vec<f32>, kc: &mut Vec<f32>, vc: &mut Vec<f32>, m: &StepMeta, d: usize) {
            self.0.kv_store(k, v, kc, vc, m, d)
        }
        fn attention(
            &self,
            q: &Vec<f32>,
            kc: &Vec<f32>,
            vc: &Vec<f32>,
            o: &mut Vec<f32>,
            m: &StepMeta,
            h: usize,
            kv: usize,
            d: usize,
        ) {
            if self.1 != Fault::AttentionWindow {
                return self.0.attention(q, kc, vc, o, m, h, kv, d);
            }
            // Zero the first key's value slot of long sequences: their outputs drift.
            let mut vc = vc.clone();
            for s in m.seqs.iter().filter(|s| s.n_ctx > 100) {
                let slot = cache_slot(&s.block_table, 0, m.block_size) as usize;
                vc[slot * kv * d..(slot + 1) * kv * d].iter_mut().for_each(|v| *v = 50.0);
            }
            self.0.attention(q, kc, &vc, o, m, h, kv, d)
        }
        fn swiglu(&self, g: &Vec<f32>, u: &Vec<f32>, o: &mut Vec<f32>, n: usize) {
            self.0.swiglu(g, u, o, n)
        }
        fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>, n: usize) {
            self.0.add_assign(x, y, n)
        }
        fn gather_logit_rows(&self, x: &Vec<f32>, m: &StepMeta, o: &mut Vec<f32>, d: usize) {
            self.0.gather_logit_rows(x, m, o, d)
        }
        fn softmax(&self, x: &mut Vec<f32>, r: usize, c: usize) {
            self.0.softmax(x, r, c)
        }
        fn log_softmax(&self, x: &mut Vec<f32>, r: usize, c: usize) {
            self.0.log_softmax(x, r, c)
        }
        fn len(&self, x: &Vec<f32>) -> usize {
            x.len()
        }
        fn zero(&self, x: &mut Vec<f32>, n: usize) {
            self.0.zero(x, n)
        }
        fn scale(&self, x: &mut Vec<f32>, s: f32, n: usize) {
            self.0.scale(x, s, n)
        }
        fn copy(&self, s: &Vec<f32>, d: &mut Vec<f32>, n: usize) {
            self.0.copy(s, d, n)
        }
        fn dropout(&self, x: &Vec<f32>, o: &mut Vec<f32>, n: usize, p: f32, seed: u64) {
            self.0.dropout(x, o, n, p, seed)
        }
        fn sample(
            &self,
            l: &Vec<f32>,
            vocab: usize,
            p: &[SamplingParams],
            r: &mut [crate::generate::sampling::Rng],
        ) -> Vec<u32> {
            let mut out = self.0.sample(l, vocab, p, r);
            if self.1 == Fault::Sampling {
                for (i, t) in out.iter_mut().enumerate() {
                    let row = &l[i * vocab..(i + 1) * vocab];
                    let mut second = (0, f32::MIN);
                    for (j, &v) in row.iter().enumerate() {
                        if j != *t as usize && v > second.1 {
                            second = (j, v);
                        }
                    }
                    *t = second.0 as u32;
                }
            }
            out
        }
    }

    /// The failing checks of `parts` ("ops", "attention", "sampling", "models") on a backend
    /// with `fault`.
    fn failures(fault: Fault, parts: &[&str]) -> Vec<String> {
        let cpu = CpuBackend::new();
        let dev = Faulty(CpuBackend::new(), fault);
        let mut rep = Report { quiet: true, ..Default::default() };
        if parts.contains(&"ops") {
            check_ops(&dev, &cpu, &mut rep);
        }
        if parts.contains(&"attention") {
            check_attention(&dev, &cpu, &mut rep, "faulty");
        }
        if parts.contains(&"sampling") {
            check_sampling(&dev, &mut rep);
        }
        if parts.contains(&"models") {
            let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
            for m in fixture_models(&fixtures) {
                check_model(&dev, &cpu, &m, &mut rep).unwrap();
            }
        }
        assert!(!rep.checks.is_empty());
        rep.checks.iter().filter(|c| !c.passed).map(|c| format!("{} {}", c.group, c.name)).collect()
    }

    #[test]
    fn an_exact_backend_passes_and_each_fault_is_caught() {
        assert_eq!(fixture_models(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")).len(), 3);
        assert!(failures(Fault::None, &["ops", "attention", "sampling", "models"]).is_empty());
        let f = failures(Fault::RopeTheta, &["ops", "models"]);
        assert!(f.iter().any(|c| c.starts_with("rope")), "{f:?}");
        let f = failures(Fault::AttentionWindow, &["ops", "attention"]);
        assert!(f.iter().any(|c| c.starts_with("attention")), "{f:?}");
        assert!(!f.iter().any(|c| c.starts_with("rope")), "{f:?}");
        let f = failures(Fault::Sampling, &["sampling"]);
        assert!(f.iter().any(|c| c.starts_with("sampling greedy")), "{f:?}");
        let f = failures(Fault::Norm, &["ops"]);
        assert!(f.iter().any(|c| c.starts_with("rmsnorm")), "{f:?}");
    }
}
