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
//! - whole-model logits: |dev - ref| <= 0.1 + 0.05·|ref| per element, argmax agreement >= 90%
//!   of rows (bf16 activations through every layer; provisional until measured on hardware).
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
/// Whole-model logits: `|dev - ref| <= MODEL_ATOL + MODEL_RTOL * |ref|`.
pub const MODEL_ATOL: f32 = 0.1;
pub const MODEL_RTOL: f32 = 0.05;
const MODEL_ARGMAX_AGREE: f64 = 0.9;

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
        let idx: Vec<u32> = (0..rows as u32).rev().collect();
        dev.gather_rows(&dx, &idx, &mut dout, dim);
        cpu.gather_rows(&cx, &idx, &mut cout, dim);
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
    let model_check = |rep: &mut Report, what: String, c: crate::check::Comparison| {
        let agree = c.argmax_agree as f64 / c.rows.max(1) as f64;
        let note = format!("max abs {:.3e}, argmax {}/{}", c.max_abs, c.argmax_agree, c.rows);
        let passed = c.passed() && agree >= MODEL_ARGMAX_AGREE;
        rep.push(Check {
            group: "model".into(),
            name: what,
            err: c.violations as f64,
            tol: 0.0,
            passed,
            note: format!("{note} (|d| <= {MODEL_ATOL} + {MODEL_RTOL}|ref|, values outside counted)"),
        });
    };
    for file in ["reference.safetensors", "reference_positions.safetensors"] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let reference = crate::check::Reference::load(&path)?;
        let c = crate::check::check_logits(dev, &dm, &reference, MODEL_ATOL, MODEL_RTOL)?;
        model_check(rep, format!("{name}: logits vs transformers ({file})"), c);
    }
    // Against the CPU backend on a prompt of every kind of token.
    let vocab = dm.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..97u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let ours = crate::generate::prompt_logits(dev, &dm, &ids, None)?;
    let theirs = crate::generate::prompt_logits(cpu, &cm, &ids, None)?;
    let c = crate::check::compare(&ours, &theirs, dm.cfg.vocab_size, MODEL_ATOL, MODEL_RTOL);
    model_check(rep, format!("{name}: logits vs the CPU backend (97 tokens)"), c);

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

/// The fixture models under `fixtures` that have reference logits.
pub fn fixture_models(fixtures: &Path) -> Vec<PathBuf> {
    ["tiny", "tiny-untied", "odd"]
        .iter()
        .map(|n| fixtures.join(n))
        .filter(|d| d.join("config.json").is_file() && d.join("model.safetensors").is_file())
        .collect()
}
