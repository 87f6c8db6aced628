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
//!
//! The kernel rows are the op families' (see [`crate::diagnostics::ops`]: each family's file
//! declares its benchmark shapes with their FLOP/byte model and measures them); this file is
//! their driver, and holds the peaks, the timing helpers and the whole-model phases.
//!
//! Training (see the families' `bench_train` and [`bench_sft_step`]): the flash-attention training
//! forward and backward against SDPA's, the fused LoRA linear forward + backward against the
//! frozen base's GEMMs alone and against PyTorch's `F.linear` + LoRA branch, the fused log-prob
//! forward + backward (time and peak memory) against PyTorch's eager `log_softmax(h @ W^T)`, the
//! multi-tensor AdamW against `torch.optim.AdamW(fused=True)`, and one end-to-end LoRA SFT step
//! of the 7B-shaped model (tokens/s, MFU) against transformers + peft. The issue's goals are
//! checked in [`GpuBench::goals`]. Training rows are the median of synchronised repetitions
//! after a warm-up. `PROTEGE_BENCH_RECOMPUTE=0|1` forces the SFT step's activation
//! recomputation off or on (by default it is on only when the memory plan would not fit).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, SamplingParams};
use crate::diagnostics::ops::attention::{paged_meta, SeqSpec};
use crate::diagnostics::ops::{self, Bench, OpFamily, Visitor};
use crate::model::config::Qwen2Config;
use crate::model::lora::{Lora, LoraConfig, Target};
use crate::model::qwen2::{KvCache, Weights};
use crate::model::Qwen2;

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
    /// Peak device memory the op used beyond what was allocated before it, in MiB (the memory
    /// pool's high-water mark), where measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_mib: Option<f64>,
    /// PyTorch's (`max_memory_allocated` minus the baseline), in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_peak_mib: Option<f64>,
}

/// One of the issue's performance goals, checked against this run's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// The row the goal is about.
    pub row: String,
    /// What is compared, e.g. `torch_ms / ms`.
    pub metric: String,
    /// The measured value (`None` where the comparison did not run, e.g. without PyTorch).
    pub value: Option<f64>,
    /// The target, e.g. `>= 1.00`.
    pub target: String,
    pub met: Option<bool>,
}

/// The end-to-end LoRA SFT step of the 7B-shaped model.
#[derive(Debug, Clone, Serialize)]
pub struct SftStep {
    pub tokens: usize,
    pub lora_rank: usize,
    pub recompute: bool,
    /// Why recomputation is on or off.
    pub recompute_reason: String,
    pub trained_params: usize,
    pub ms: f64,
    /// Median (zero grads + forward, backward, grad norm + AdamW) in milliseconds.
    pub phases_ms: [f64; 3],
    pub tokens_per_s: f64,
    /// Model FLOPs of one step, by [`SftStep::flops_formula`].
    pub model_flops: f64,
    pub flops_formula: String,
    /// Share of the bf16 peak (`peak_bf16_tflops_used`) the model FLOPs reach, in percent.
    pub mfu_pct: f64,
    pub peak_bf16_tflops_used: f64,
    pub loss: f64,
    /// Peak device memory of a step beyond the model weights, in MiB.
    pub peak_mib: Option<f64>,
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
    pub sft: Option<SftStep>,
    pub goals: Vec<Goal>,
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
pub(crate) fn time_ms(be: &CudaBackend, iters: usize, mut f: impl FnMut()) -> Result<f64> {
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

/// The device's peaks: the bf16 tensor-core FLOP/s (compute-bound rows) and the measured
/// bandwidth (memory-bound rows).
pub struct Peaks {
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

pub(crate) fn row(
    name: &str,
    shape: String,
    ms: f64,
    flops: Option<f64>,
    bytes: Option<f64>,
    peaks: &Peaks,
    note: &str,
) -> Row {
    let tflops = flops.map(|f| f / (ms * 1e-3) / 1e12);
    let gbs = bytes.map(|b| b / (ms * 1e-3) / 1e9);
    let pct = match (tflops, gbs) {
        (Some(t), _) => peaks.compute(t),
        (None, Some(g)) => peaks.memory(g),
        _ => 0.0,
    };
    Row {
        name: name.into(),
        shape,
        ms,
        tflops,
        gbs,
        pct_peak: pct,
        torch_ms: None,
        ratio: None,
        note: note.into(),
        peak_mib: None,
        torch_peak_mib: None,
    }
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
    // Every op family's kernels, inference rows first, then training rows.
    for train in [false, true] {
        rows.extend(bench_families(be, &cfg, it, &peaks, train)?);
    }
    let mut sft = None;
    if !opts.kernels_only {
        let (r, s) = bench_phases(be, &cfg, it, &peaks)?;
        rows.extend(r);
        sft = s;
    }
    let mut torch = None;
    if opts.torch {
        // The PyTorch side is another process: give it the memory this one has cached.
        be.release_cached_memory()?;
        match run_torch(&opts.script, it, opts.kernels_only) {
            Ok(t) => {
                torch = Some(t.version);
                let num = |m: &serde_json::Map<String, serde_json::Value>, k: &str| m.get(k).and_then(|v| v.as_f64());
                for r in &mut rows {
                    if let Some(ms) = num(&t.ms, &r.name) {
                        r.torch_ms = Some(ms);
                        r.ratio = Some(ms / r.ms);
                    }
                    r.torch_peak_mib = num(&t.peak_mib, &r.name);
                    if let Some(n) = t.notes.get(&r.name).and_then(|v| v.as_str()) {
                        r.note =
                            if r.note.is_empty() { format!("torch: {n}") } else { format!("{}; torch: {n}", r.note) };
                    }
                }
            }
            Err(e) => eprintln!("bench: PyTorch comparison skipped: {e:#}"),
        }
    }
    let goals = goals(&rows, sft.as_ref());
    Ok(GpuBench {
        device: be.name(),
        arch: be.arch().to_string(),
        sms,
        peak_bf16_tflops_est: peak_est,
        cublas_gemm_tflops: gemm_tflops,
        measured_bandwidth_gbs: bw,
        torch,
        rows,
        sft,
        goals,
    })
}

/// The inference (or, with `train`, the training) rows of every op family of the registry
/// ([`crate::diagnostics::ops`]), in registry order; the memory pool's cache is released after
/// each family.
fn bench_families(be: &CudaBackend, cfg: &Qwen2Config, iters: usize, peaks: &Peaks, train: bool) -> Result<Vec<Row>> {
    struct Run<'a> {
        be: &'a CudaBackend,
        cfg: &'a Qwen2Config,
        iters: usize,
        peaks: &'a Peaks,
        train: bool,
        rows: Result<Vec<Row>>,
    }
    impl Visitor for Run<'_> {
        fn visit<F: OpFamily>(&mut self, family: &F) {
            let Ok(rows) = &mut self.rows else { return };
            let b = Bench {
                be: self.be,
                cfg: self.cfg,
                iters: self.iters,
                peaks: self.peaks,
                shapes: family.bench_shapes(self.cfg),
            };
            let got = if self.train { family.bench_train(&b) } else { family.bench(&b) };
            match got.and_then(|r| {
                self.be.release_cached_memory()?;
                Ok(r)
            }) {
                Ok(r) => rows.extend(r),
                Err(e) => self.rows = Err(e.context(format!("benchmarking the {} family", F::NAME))),
            }
        }
    }
    let mut run = Run { be, cfg, iters, peaks, train, rows: Ok(vec![]) };
    ops::registry(&mut run);
    run.rows
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

fn bench_phases(be: &CudaBackend, cfg: &Qwen2Config, it: usize, peaks: &Peaks) -> Result<(Vec<Row>, Option<SftStep>)> {
    let mut model = random_model(be, cfg)?;
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
        let mut rngs: Vec<_> = (0..batch as u64).map(crate::backend::sampling::seeded).collect();
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

    // Training: one LoRA SFT step of the same model (the KV caches above are gone).
    be.release_cached_memory()?;
    let sft = match bench_sft_step(be, &mut model, it, peaks) {
        Ok((r, s)) => {
            rows.push(r);
            Some(s)
        }
        Err(e) => {
            eprintln!("bench: the SFT step failed: {e:#}");
            None
        }
    };
    Ok((rows, sft))
}

/// Median milliseconds of `f` over `reps` runs (each synchronised) after `warm` warm-up runs.
pub(crate) fn median_ms(be: &CudaBackend, warm: usize, reps: usize, mut f: impl FnMut()) -> Result<f64> {
    for _ in 0..warm {
        f();
    }
    be.synchronize()?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f();
        be.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) const MIB: f64 = (1u64 << 20) as f64;

/// The device's default memory pool, which the backend's stream-ordered allocations come from
/// (see `keep_pool_memory` in backend/cuda/mod.rs).
fn default_pool(be: &CudaBackend) -> Option<cudarc::driver::sys::CUmemoryPool> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: valid out-pointer and device handle.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, be.context().cu_device()) };
    (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
}

fn pool_attr(pool: cudarc::driver::sys::CUmemoryPool, attr: cudarc::driver::sys::CUmemPool_attribute) -> Option<u64> {
    use cudarc::driver::sys;
    let mut v: u64 = 0;
    // SAFETY: the used-memory attributes are cuuint64_t values; `pool` is the device's default pool.
    let r = unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
}

/// Peak pool memory in use while something runs, beyond what was in use when it started:
/// [`PoolPeak::start`] reads the pool's current use and resets its high-water mark
/// (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`, which can only be reset to 0), [`PoolPeak::finish`]
/// synchronises and reads the mark.
pub(crate) struct PoolPeak {
    pool: Option<cudarc::driver::sys::CUmemoryPool>,
    before: u64,
}

impl PoolPeak {
    pub(crate) fn start(be: &CudaBackend) -> Result<Self> {
        use cudarc::driver::sys::{self, CUmemPool_attribute as A};
        be.synchronize()?;
        let Some(pool) = default_pool(be) else { return Ok(Self { pool: None, before: 0 }) };
        let Some(before) = pool_attr(pool, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT) else {
            return Ok(Self { pool: None, before: 0 });
        };
        let mut zero: u64 = 0;
        // SAFETY: resetting the high-water mark to 0 is the one write this attribute allows.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut std::ffi::c_void,
            )
        };
        Ok(Self { pool: (r == sys::CUresult::CUDA_SUCCESS).then_some(pool), before })
    }

    /// Peak bytes beyond the start, or `None` where the pool could not be read.
    pub(crate) fn finish(self, be: &CudaBackend) -> Result<Option<u64>> {
        be.synchronize()?;
        let Some(pool) = self.pool else { return Ok(None) };
        let high = pool_attr(pool, cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH);
        // A mark of 0 means nothing was allocated since the reset.
        Ok(high.map(|h| h.saturating_sub(self.before)))
    }
}

/// `n` host values uniform in `(-scale, scale)` (for f32 device buffers, which
/// [`CudaBackend::random`] does not make).
pub(crate) fn host_uniform(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    use rand::Rng;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// One LoRA SFT step (rank 16 on all seven modules, no dropout) of the 7B-shaped `model` over
/// one packed sequence of 8192 tokens: zero grads, forward, backward, global grad norm + AdamW.
/// MFU counts model FLOPs only (a recomputed forward is not counted).
fn bench_sft_step(
    be: &CudaBackend,
    model: &mut Qwen2<CudaBackend>,
    it: usize,
    peaks: &Peaks,
) -> Result<(Row, SftStep)> {
    let _r = be.range("bench sft_step");
    let cfg = model.cfg.clone();
    let (t, rank) = (8192usize, 16usize);
    let lcfg = LoraConfig {
        rank,
        alpha: 2.0 * rank as f32,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        seed: 0,
        trainable_tokens: None,
    };
    model.lora = Some(Lora::init(be, &cfg, &lcfg)?);
    let ids: Vec<u32> = (0..t as u32).map(|i| i.wrapping_mul(7919) % cfg.vocab_size as u32).collect();

    // Recompute only when the memory plan (weights are resident already) would not fit.
    be.release_cached_memory()?;
    let plan = crate::train::memory::MemoryPlan::new(be, model, t, false);
    let need = plan.total().saturating_sub(plan.weights);
    let free = be.memory_info().map_or(0, |(f, _)| f);
    let (recompute, reason) = match std::env::var("PROTEGE_BENCH_RECOMPUTE").ok().as_deref() {
        Some("1") => (true, "PROTEGE_BENCH_RECOMPUTE=1".to_string()),
        Some("0") => (false, "PROTEGE_BENCH_RECOMPUTE=0".to_string()),
        _ => {
            let on = need as f64 > 0.85 * free as f64;
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            (
                on,
                format!(
                    "the plan without recomputation needs {:.1} GiB beyond the weights, {:.1} GiB free",
                    gib(need),
                    gib(free)
                ),
            )
        }
    };
    eprintln!("bench: SFT step recompute = {recompute} ({reason})");

    // The step itself is the generic SFT step benchmark (forward, backward, clipping, AdamW with
    // f32 masters), here with the peak of the device's memory pool around it.
    let mark = PoolPeak::start(be)?;
    let r = crate::diagnostics::bench::bench_sft_step(be, model, &ids, Some(rank), recompute, it.clamp(1, 3))?;
    let peak = mark.finish(be)?;
    let trained = r.trainable_params;
    let ms = r.step_s * 1e3;
    let phase = |i: usize| r.phases_s[i] * 1e3;
    let loss = *r.losses.last().unwrap_or(&f64::NAN);

    let (l, hh, d) = (cfg.num_layers as f64, cfg.num_heads as f64, cfg.head_dim as f64);
    let n_w = (cfg.num_params() - cfg.vocab_size * cfg.hidden_size) as f64;
    let tf = t as f64;
    let attn_fwd = 2.0 * l * hh * d * tf * tf;
    let flops = 4.0 * n_w * tf + 6.0 * trained as f64 * tf + 3.0 * attn_fwd;
    let formula = format!(
        "4*N*T + 6*N_lora*T + 3*(2*L*H*d*T^2) with N = {n_w:.0} (every weight but the embedding; frozen: \
         forward 2NT + backward dx 2NT, no dW), N_lora = {trained}, T = {t} (one sequence), L = {}, H = {}, \
         d = {}; causal attention forward 2LHdT^2, backward 2x forward; recomputation not counted",
        cfg.num_layers, cfg.num_heads, cfg.head_dim
    );
    let mut r = row(
        "sft_step_7b_lora",
        format!("1 x {t} tokens, LoRA r{rank} all modules, recompute {}", if recompute { "on" } else { "off" }),
        ms,
        Some(flops),
        None,
        peaks,
        "",
    );
    r.peak_mib = peak.map(|b| b as f64 / MIB);
    r.note = format!(
        "MFU {:.1}% (goal >= 45%); {:.0} tokens/s; fwd {:.0} / bwd {:.0} / optim {:.1} ms; loss {:.3}",
        r.pct_peak,
        tf / (ms * 1e-3),
        phase(1),
        phase(2),
        phase(3),
        loss
    );
    let s = SftStep {
        tokens: t,
        lora_rank: rank,
        recompute,
        recompute_reason: reason,
        trained_params: trained,
        ms,
        phases_ms: [phase(0) + phase(1), phase(2), phase(3)],
        tokens_per_s: tf / (ms * 1e-3),
        model_flops: flops,
        flops_formula: formula,
        mfu_pct: r.pct_peak,
        peak_bf16_tflops_used: peaks.tflops,
        loss,
        peak_mib: r.peak_mib,
    };
    model.lora = None;
    Ok((r, s))
}

/// The issue's goals, checked against the rows (`None` values where a side did not run).
fn goals(rows: &[Row], sft: Option<&SftStep>) -> Vec<Goal> {
    let find = |n: &str| rows.iter().find(|r| r.name == n);
    let mut out = vec![];
    let mut add = |row: &str, metric: &str, value: Option<f64>, at_least: bool, target: f64| {
        let op = if at_least { ">=" } else { "<=" };
        out.push(Goal {
            row: row.into(),
            metric: metric.into(),
            value,
            target: format!("{op} {target}"),
            met: value.map(|v| if at_least { v >= target } else { v <= target }),
        });
    };
    add("attention_train_bwd", "SDPA backward ms / ms", find("attention_train_bwd").and_then(|r| r.ratio), true, 1.0);
    let lora = find("lora_linear_fwd_bwd").zip(find("linear_fwd_dx")).map(|(l, b)| l.ms / b.ms);
    add("lora_linear_fwd_bwd", "ms / linear_fwd_dx ms (LoRA total vs frozen base alone)", lora, false, 1.15);
    let lp = find("token_logprobs_fwd_bwd");
    add("token_logprobs_fwd_bwd", "torch eager ms / ms", lp.and_then(|r| r.ratio), true, 1.5);
    let mem = lp.and_then(|r| Some(r.peak_mib? / r.torch_peak_mib?));
    add("token_logprobs_fwd_bwd", "peak memory / torch eager peak memory", mem, false, 0.10);
    if let Some(s) = sft {
        add("sft_step_7b_lora", "MFU % of the bf16 peak estimate", Some(s.mfu_pct), true, 45.0);
    }
    out
}

/// What tools/bench_gpu_torch.py reports: maps of row name -> value.
struct TorchOut {
    version: String,
    ms: serde_json::Map<String, serde_json::Value>,
    /// Peak memory beyond the baseline, in MiB, for the rows that measure it.
    peak_mib: serde_json::Map<String, serde_json::Value>,
    /// What the PyTorch side ran, where it had a choice (SDPA variant, fused optimiser,
    /// gradient checkpointing).
    notes: serde_json::Map<String, serde_json::Value>,
}

/// Runs the PyTorch equivalents.
fn run_torch(script: &Path, iters: usize, kernels_only: bool) -> Result<TorchOut> {
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
    let map = |k: &str| v[k].as_object().cloned().unwrap_or_default();
    Ok(TorchOut { version, ms: map("ms"), peak_mib: map("peak_mib"), notes: map("notes") })
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
    let mem: Vec<&Row> = b.rows.iter().filter(|r| r.peak_mib.is_some() || r.torch_peak_mib.is_some()).collect();
    if !mem.is_empty() {
        s.push_str("\npeak device memory beyond the inputs (protege: memory-pool high-water mark; torch: max_memory_allocated - baseline)\n| op | MiB | torch MiB | share of torch |\n|---|---|---|---|\n");
        for r in mem {
            let share = r.peak_mib.zip(r.torch_peak_mib).map(|(a, t)| 100.0 * a / t);
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                r.name,
                f(r.peak_mib, 0),
                f(r.torch_peak_mib, 0),
                share.map_or("-".into(), |x| format!("{x:.1}%"))
            ));
        }
    }
    if let Some(t) = &b.sft {
        s.push_str(&format!(
            "\nSFT step: {} tokens, {:.0} tokens/s, MFU {:.1}% of {:.0} TFLOP/s, {:.1} TFLOP per step, recompute {} ({}); model FLOPs = {}\n",
            t.tokens,
            t.tokens_per_s,
            t.mfu_pct,
            t.peak_bf16_tflops_used,
            t.model_flops / 1e12,
            t.recompute,
            t.recompute_reason,
            t.flops_formula
        ));
    }
    if !b.goals.is_empty() {
        s.push_str("\ngoals\n| row | metric | value | target | met |\n|---|---|---|---|---|\n");
        for g in &b.goals {
            let met = match g.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "not measured",
            };
            s.push_str(&format!("| {} | {} | {} | {} | {met} |\n", g.row, g.metric, f(g.value, 3), g.target));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![5.0]), 5.0);
    }

    fn test_row(name: &str, ms: f64, torch_ms: Option<f64>) -> Row {
        let peaks = Peaks { tflops: 1000.0, bw_gbs: 3000.0 };
        let mut r = row(name, String::new(), ms, None, None, &peaks, "");
        r.torch_ms = torch_ms;
        r.ratio = torch_ms.map(|t| t / ms);
        r
    }

    #[test]
    fn goals_are_checked_and_printed() {
        let mut lp = test_row("token_logprobs_fwd_bwd", 10.0, Some(20.0));
        lp.peak_mib = Some(500.0);
        lp.torch_peak_mib = Some(20_000.0);
        let rows = vec![
            test_row("attention_train_bwd", 2.0, Some(1.8)),
            test_row("linear_fwd_dx", 4.0, None),
            test_row("lora_linear_fwd_bwd", 4.4, Some(6.0)),
            lp,
        ];
        let g = goals(&rows, None);
        let by = |i: usize| (g[i].row.as_str(), g[i].met);
        assert_eq!(g.len(), 4);
        assert_eq!(by(0), ("attention_train_bwd", Some(false)));
        assert_eq!(by(1), ("lora_linear_fwd_bwd", Some(true)));
        assert_eq!(by(2), ("token_logprobs_fwd_bwd", Some(true)));
        assert_eq!(by(3), ("token_logprobs_fwd_bwd", Some(true)));
        assert!((g[3].value.unwrap() - 0.025).abs() < 1e-12);
        // Without PyTorch the ratios are unknown, not failed.
        let bare: Vec<Row> = rows
            .iter()
            .cloned()
            .map(|mut r| {
                r.torch_ms = None;
                r.ratio = None;
                r.torch_peak_mib = None;
                r
            })
            .collect();
        let g = goals(&bare, None);
        assert_eq!(g.iter().map(|g| g.met).collect::<Vec<_>>(), vec![None, Some(true), None, None]);

        let b = GpuBench {
            device: "test".into(),
            arch: "sm_90".into(),
            sms: 132,
            peak_bf16_tflops_est: 1000.0,
            cublas_gemm_tflops: 700.0,
            measured_bandwidth_gbs: 3000.0,
            torch: None,
            goals: goals(&bare, None),
            rows: bare,
            sft: None,
        };
        let t = table(&b);
        assert!(t.contains("| attention_train_bwd | SDPA backward ms / ms | - | >= 1 | not measured |"), "{t}");
        assert!(t.contains("| token_logprobs_fwd_bwd | 500 | - | - |"), "{t}");
        let json = serde_json::to_value(&b).unwrap();
        assert!(json["rows"][0].get("peak_mib").is_none(), "unmeasured peaks are left out");
        assert_eq!(json["rows"][3]["peak_mib"], 500.0);
    }
}
