//! `protege bench --device cuda`: every kernel and the two inference phases (prefill, decode
//! step) of a randomly initialised Qwen2.5-7B-shaped model on the GPU, with time, achieved
//! TFLOP/s or GB/s and the share of the device's peak; when PyTorch is importable, the PyTorch
//! equivalents run in the same invocation (`tools/bench_gpu_torch.py`: SDPA, eager ops, the
//! transformers model) and each row gets the ratio (PyTorch time / protege time: > 1 means
//! protege is faster).
//!
//! Peaks: memory bandwidth is measured (a device-to-device copy); the bf16 tensor-core peak is
//! the spec estimate SMs × boost clock × dense bf16 FLOP per SM per clock, and cuBLAS's own
//! 8192³ GEMM is reported beside it as the practical ceiling.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, SamplingParams, StepMeta};
use crate::model::config::Qwen2Config;
use crate::model::qwen2::{KvCache, Weights};
use crate::model::Qwen2;
use crate::selftest::{paged_meta, SeqSpec};

/// The Qwen2.5-7B shape (config.json of Qwen/Qwen2.5-7B-Instruct).
pub const QWEN25_7B: &str = r#"{"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
 "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
 "num_key_value_heads": 4, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
 "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}"#;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub shape: String,
    pub ms: f64,
    pub tflops: Option<f64>,
    pub gbs: Option<f64>,
    /// Share of the relevant peak (tensor-core FLOP/s or measured bandwidth), in percent.
    pub pct_peak: f64,
    pub torch_ms: Option<f64>,
    /// `torch_ms / ms`: above 1, protege is faster.
    pub ratio: Option<f64>,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuBench {
    pub device: String,
    pub arch: String,
    pub sms: usize,
    pub peak_bf16_tflops_est: f64,
    pub cublas_gemm_tflops: f64,
    pub measured_bandwidth_gbs: f64,
    pub torch: Option<String>,
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub iters: usize,
    /// Also run tools/bench_gpu_torch.py when PyTorch with CUDA is importable.
    pub torch: bool,
    /// Skip the 7B model phases (kernels only).
    pub kernels_only: bool,
    pub script: std::path::PathBuf,
}

/// Mean milliseconds of `f` over `iters` runs after one warm-up.
fn time_ms(be: &CudaBackend, iters: usize, mut f: impl FnMut()) -> Result<f64> {
    f();
    be.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters.max(1) {
        f();
    }
    be.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64)
}

/// Dense bf16 tensor-core FLOP per SM per clock by architecture (spec sheets).
fn flop_per_sm_clock(arch: &str) -> f64 {
    match arch {
        "sm_90" | "sm_90a" | "sm_100" => 4096.0,
        "sm_80" => 2048.0,
        _ => 1024.0, // sm_86 / sm_89 class
    }
}

struct Peaks {
    tflops: f64,
    bw_gbs: f64,
}

impl Peaks {
    fn compute(&self, tflops: f64) -> f64 {
        100.0 * tflops / self.tflops
    }
    fn memory(&self, gbs: f64) -> f64 {
        100.0 * gbs / self.bw_gbs
    }
}

fn row(name: &str, shape: String, ms: f64, flops: Option<f64>, bytes: Option<f64>, peaks: &Peaks, note: &str) -> Row {
    let tflops = flops.map(|f| f / (ms * 1e-3) / 1e12);
    let gbs = bytes.map(|b| b / (ms * 1e-3) / 1e9);
    let pct = match (tflops, gbs) {
        (Some(t), _) => peaks.compute(t),
        (None, Some(g)) => peaks.memory(g),
        _ => 0.0,
    };
    Row { name: name.into(), shape, ms, tflops, gbs, pct_peak: pct, torch_ms: None, ratio: None, note: note.into() }
}

pub fn run(be: &CudaBackend, opts: &Options) -> Result<GpuBench> {
    let it = opts.iters;
    // Measured bandwidth: copy 2 GiB (read + write).
    let n_copy = 1usize << 30; // bf16 values = 2 GiB
    let src = be.random(n_copy, 1.0, 1);
    let mut dst = be.zeros(n_copy);
    let copy_ms = time_ms(be, it, || be.copy(&src, &mut dst, n_copy))?;
    drop((src, dst));
    let bw = 2.0 * 2.0 * n_copy as f64 / (copy_ms * 1e-3) / 1e9;
    let clock_khz =
        be.context().attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE).unwrap_or(0)
            as f64;
    let sms = be
        .context()
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .unwrap_or(1) as usize;
    let peak_est = sms as f64 * clock_khz * 1e3 * flop_per_sm_clock(be.arch()) / 1e12;
    // cuBLAS 8192^3 as the practical ceiling.
    let g = 8192;
    let (a, b) = (be.random(g * g, 0.05, 2), be.random(g * g, 0.05, 3));
    let mut c = be.zeros(g * g);
    let gemm_ms = time_ms(be, it, || be.linear(&a, &b, None, &mut c, g, g, g))?;
    drop((a, b, c));
    let gemm_tflops = 2.0 * (g as f64).powi(3) / (gemm_ms * 1e-3) / 1e12;
    let peaks = Peaks { tflops: peak_est.max(gemm_tflops), bw_gbs: bw };
    let mut rows = vec![row(
        "cublas_gemm",
        format!("{g}x{g}x{g}"),
        gemm_ms,
        Some(2.0 * (g as f64).powi(3)),
        None,
        &peaks,
        "practical peak",
    )];
    rows.push(row(
        "device_copy",
        "2 GiB".into(),
        copy_ms,
        None,
        Some(4.0 * n_copy as f64),
        &peaks,
        "defines the bandwidth peak",
    ));

    let cfg = Qwen2Config::from_json(QWEN25_7B)?;
    rows.extend(bench_kernels(be, &cfg, it, &peaks)?);
    if !opts.kernels_only {
        rows.extend(bench_phases(be, &cfg, it, &peaks)?);
    }
    let mut torch = None;
    if opts.torch {
        // The PyTorch side is another process: give it the memory this one has cached.
        be.release_cached_memory()?;
        match run_torch(&opts.script, it, opts.kernels_only) {
            Ok((version, times)) => {
                torch = Some(version);
                for r in &mut rows {
                    if let Some(t) = times.get(&r.name).and_then(|v| v.as_f64()) {
                        r.torch_ms = Some(t);
                        r.ratio = Some(t / r.ms);
                    }
                }
            }
            Err(e) => eprintln!("bench: PyTorch comparison skipped: {e:#}"),
        }
    }
    Ok(GpuBench {
        device: be.name(),
        arch: be.arch().to_string(),
        sms,
        peak_bf16_tflops_est: peak_est,
        cublas_gemm_tflops: gemm_tflops,
        measured_bandwidth_gbs: bw,
        torch,
        rows,
    })
}

fn bench_kernels(be: &CudaBackend, cfg: &Qwen2Config, it: usize, peaks: &Peaks) -> Result<Vec<Row>> {
    let (h, inter, qd, kvd, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    let t = 8192usize;
    let mut rows = vec![];
    let x = be.random(t * h, 1.0, 10);
    let w = be.random(h, 1.0, 11);
    let mut out = be.zeros(t * h);
    let ms = time_ms(be, it, || be.rmsnorm(&x, &w, &mut out, t, h, 1e-6))?;
    rows.push(row("rmsnorm", format!("{t}x{h}"), ms, None, Some(4.0 * (t * h) as f64), peaks, ""));
    let mut y = be.random(t * h, 1.0, 12);
    let ms = time_ms(be, it, || be.add_assign(&mut y, &x, t * h))?;
    rows.push(row("add", format!("{t}x{h}"), ms, None, Some(6.0 * (t * h) as f64), peaks, "residual"));
    let table = be.random(cfg.vocab_size * h, 1.0, 13);
    let meta = StepMeta {
        tokens: (0..t as u32).map(|i| (i * 7919) % cfg.vocab_size as u32).collect(),
        positions: (0..t as u32).collect(),
        slots: (0..t as u32).collect(),
        seqs: vec![],
        block_size: 16,
        logit_rows: vec![],
    };
    let dm = be.prepare(&meta);
    let ms = time_ms(be, it, || be.embedding(&table, &dm, &mut out, h))?;
    rows.push(row(
        "embedding",
        format!("{t} of {}x{h}", cfg.vocab_size),
        ms,
        None,
        Some(4.0 * (t * h) as f64),
        peaks,
        "",
    ));
    drop(table);
    let mut q = be.random(t * qd, 1.0, 14);
    let ms = time_ms(be, it, || be.rope(&mut q, &dm, cfg.num_heads, hd, cfg.rope_theta))?;
    rows.push(row("rope", format!("{t}x{}x{hd}", cfg.num_heads), ms, None, Some(4.0 * (t * qd) as f64), peaks, "q"));
    let (gate, up) = (be.random(t * inter, 2.0, 15), be.random(t * inter, 1.0, 16));
    let mut act = be.zeros(t * inter);
    let ms = time_ms(be, it, || be.swiglu(&gate, &up, &mut act, t * inter))?;
    rows.push(row("swiglu", format!("{t}x{inter}"), ms, None, Some(6.0 * (t * inter) as f64), peaks, ""));
    let wg = be.random(inter * h, 0.02, 17);
    let ms = time_ms(be, it, || be.linear(&x, &wg, None, &mut act, t, h, inter))?;
    rows.push(row(
        "linear",
        format!("{t}x{h} @ {inter}x{h}^T"),
        ms,
        Some(2.0 * (t * h * inter) as f64),
        None,
        peaks,
        "cuBLAS bf16",
    ));
    drop((gate, up, act, wg, q));
    let (k, v) = (be.random(t * kvd, 1.0, 18), be.random(t * kvd, 1.0, 19));
    let (mut kc, mut vc) = (be.zeros(t * kvd), be.zeros(t * kvd));
    let ms = time_ms(be, it, || be.kv_store(&k, &v, &mut kc, &mut vc, &dm, kvd))?;
    rows.push(row("kv_store", format!("{t}x{kvd}"), ms, None, Some(8.0 * (t * kvd) as f64), peaks, ""));
    drop((k, v, kc, vc, x, y, out));

    // Flash attention: batch 4 x 4096, causal, 28/4 heads of 128.
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let seqs = vec![SeqSpec { n_new: 4096, n_ctx: 4096 }; 4];
    let (meta, slots) = paged_meta(&seqs, 16, &mut rng);
    let dm = be.prepare(&meta);
    let rows_n = meta.rows();
    let (q, kc, vc) =
        (be.random(rows_n * qd, 1.0, 20), be.random(slots * kvd, 1.0, 21), be.random(slots * kvd, 1.0, 22));
    let mut o = be.zeros(rows_n * qd);
    let ms = time_ms(be, it, || be.attention(&q, &kc, &vc, &mut o, &dm, cfg.num_heads, cfg.num_kv_heads, hd))?;
    // Per sequence and head, full attention is 4·T²·d FLOPs (QK^T and PV); causal, half.
    let flops = 4.0 * cfg.num_heads as f64 * 2.0 * (4096f64 * 4096.0) * hd as f64;
    rows.push(row(
        "flash_attention",
        format!("4x4096, {}q/{}kv heads x {hd}, causal", cfg.num_heads, cfg.num_kv_heads),
        ms,
        Some(flops),
        None,
        peaks,
        "paged cache",
    ));
    drop((q, kc, vc, o));

    // Decode attention: 64 sequences with 4096 tokens of context, one new row each.
    let seqs = vec![SeqSpec { n_new: 1, n_ctx: 4096 }; 64];
    let (meta, slots) = paged_meta(&seqs, 16, &mut rng);
    let dm = be.prepare(&meta);
    let (q, kc, vc) = (be.random(64 * qd, 1.0, 23), be.random(slots * kvd, 1.0, 24), be.random(slots * kvd, 1.0, 25));
    let mut o = be.zeros(64 * qd);
    let ms = time_ms(be, it, || be.attention(&q, &kc, &vc, &mut o, &dm, cfg.num_heads, cfg.num_kv_heads, hd))?;
    let bytes = 2.0 * 2.0 * (64 * 4096 * kvd) as f64;
    rows.push(row(
        "decode_attention",
        format!("64 x ctx 4096, {}q/{}kv heads x {hd}", cfg.num_heads, cfg.num_kv_heads),
        ms,
        None,
        Some(bytes),
        peaks,
        "one layer",
    ));
    drop((q, kc, vc, o));

    // Sampling over 64 rows of the full vocabulary.
    let logits = be.random(64 * cfg.vocab_size, 10.0, 26);
    for (name, p) in [
        ("sample_greedy", SamplingParams::default()),
        ("sample_top_p", SamplingParams { temperature: 0.7, top_k: 0, top_p: 0.95 }),
    ] {
        let params = vec![p; 64];
        let mut rngs: Vec<_> = (0..64).map(crate::generate::sampling::seeded).collect();
        let ms = time_ms(be, it, || {
            be.sample(&logits, cfg.vocab_size, &params, &mut rngs);
        })?;
        rows.push(row(
            name,
            format!("64x{}", cfg.vocab_size),
            ms,
            None,
            Some(2.0 * (64 * cfg.vocab_size) as f64),
            peaks,
            "includes the copy of 64 ids to the host",
        ));
    }
    Ok(rows)
}

/// A 7B-shaped model with random weights made on the device.
fn random_model(be: &CudaBackend, cfg: &Qwen2Config) -> Result<Qwen2<CudaBackend>> {
    let mut seed = 100;
    let w: Weights<CudaBackend> = Weights::try_from_fn(cfg, |name, shape| {
        seed += 1;
        let n: usize = shape.iter().product();
        let scale = if name.contains("norm") { 1.0 } else { 0.02 };
        Ok(be.random(n, scale, seed))
    })?;
    Ok(Qwen2 { cfg: cfg.clone(), w, lora: None })
}

fn bench_phases(be: &CudaBackend, cfg: &Qwen2Config, it: usize, peaks: &Peaks) -> Result<Vec<Row>> {
    let model = random_model(be, cfg)?;
    let mut rows = vec![];
    let params_body =
        (cfg.num_params() - cfg.vocab_size * cfg.hidden_size * if cfg.tie_word_embeddings { 1 } else { 2 }) as f64;
    let weight_bytes = 2.0 * cfg.num_params() as f64;
    let (layers, heads, hd) = (cfg.num_layers as f64, cfg.num_heads as f64, cfg.head_dim as f64);

    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(2);
    // Prefill: one sequence of 8192 tokens, logits of the last row.
    let t = 8192usize;
    {
        let (mut meta, slots) = paged_meta(&[SeqSpec { n_new: t, n_ctx: t }], 16, &mut rng);
        meta.logit_rows = vec![t as u32 - 1];
        let mut cache = KvCache::new(be, cfg, slots, 16);
        let _r = be.range("prefill");
        let ms = time_ms(be, it.min(5), || {
            model.forward(be, &meta, &mut cache).expect("prefill forward");
        })?;
        let flops = 2.0 * params_body * t as f64
            + 4.0 * layers * heads * hd * (t as f64 * t as f64) / 2.0
            + 2.0 * (cfg.hidden_size * cfg.vocab_size) as f64;
        let mut r = row("prefill_7b", format!("1 x {t} tokens"), ms, Some(flops), None, peaks, "");
        r.note = format!("MFU {:.1}% of the estimated peak; {:.0} tokens/s", r.pct_peak, t as f64 / (ms * 1e-3));
        rows.push(r);
    }

    // Decode: 64 sequences with 4096 tokens of context each, one new token per sequence.
    let (batch, ctx) = (64usize, 4096usize);
    {
        let (mut meta, slots) = paged_meta(&vec![SeqSpec { n_new: 1, n_ctx: ctx }; batch], 16, &mut rng);
        meta.logit_rows = (0..batch as u32).collect();
        let mut cache = KvCache::new(be, cfg, slots, 16);
        let params = vec![SamplingParams::default(); batch];
        let mut rngs: Vec<_> = (0..batch as u64).map(crate::generate::sampling::seeded).collect();
        let _r = be.range("decode");
        let ms = time_ms(be, it, || {
            let logits = model.forward(be, &meta, &mut cache).expect("decode forward");
            be.sample(&logits, cfg.vocab_size, &params, &mut rngs);
        })?;
        let kv_bytes = 2.0 * 2.0 * (batch * ctx * cfg.kv_dim() * cfg.num_layers) as f64;
        let bound_ms = (weight_bytes + kv_bytes) / (peaks.bw_gbs * 1e9) * 1e3;
        let mut r =
            row("decode_step_7b", format!("{batch} x ctx {ctx}"), ms, None, Some(weight_bytes + kv_bytes), peaks, "");
        r.note = format!(
            "{:.2}x the bandwidth bound ({bound_ms:.2} ms: {:.1} GB weights + {:.1} GB KV); {:.0} tokens/s",
            ms / bound_ms,
            weight_bytes / 1e9,
            kv_bytes / 1e9,
            batch as f64 / (ms * 1e-3)
        );
        rows.push(r);
    }
    Ok(rows)
}

/// Runs the PyTorch equivalents; returns torch's version and a map of row name -> ms.
fn run_torch(
    script: &Path,
    iters: usize,
    kernels_only: bool,
) -> Result<(String, serde_json::Map<String, serde_json::Value>)> {
    if !script.is_file() {
        anyhow::bail!("{} not found (run from the repository root)", script.display());
    }
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script).arg("--iters").arg(iters.to_string());
    if kernels_only {
        cmd.arg("--kernels-only");
    }
    let out = cmd.output().context("running python3")?;
    if !out.status.success() {
        anyhow::bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("the PyTorch bench printed no JSON")?;
    let version = v["torch"].as_str().unwrap_or("?").to_string();
    if let Some(errs) = v["errors"].as_object() {
        for (k, e) in errs {
            eprintln!("bench: PyTorch {k}: {e}");
        }
    }
    Ok((version, v["ms"].as_object().cloned().unwrap_or_default()))
}

/// The table `protege bench --device cuda` prints.
pub fn table(b: &GpuBench) -> String {
    let mut s = format!(
        "device {} ({}, {} SMs); bf16 peak (est.) {:.0} TFLOP/s, cuBLAS 8192^3 {:.0} TFLOP/s; measured bandwidth {:.0} GB/s; torch {}\n",
        b.device,
        b.arch,
        b.sms,
        b.peak_bf16_tflops_est,
        b.cublas_gemm_tflops,
        b.measured_bandwidth_gbs,
        b.torch.as_deref().unwrap_or("not run")
    );
    s.push_str("| op | shape | ms | TFLOP/s | GB/s | % peak | torch ms | ratio | note |\n|---|---|---|---|---|---|---|---|---|\n");
    let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    for r in &b.rows {
        s.push_str(&format!(
            "| {} | {} | {:.3} | {} | {} | {:.1} | {} | {} | {} |\n",
            r.name,
            r.shape,
            r.ms,
            f(r.tflops, 1),
            f(r.gbs, 0),
            r.pct_peak,
            f(r.torch_ms, 3),
            f(r.ratio, 2),
            r.note
        ));
    }
    s
}
