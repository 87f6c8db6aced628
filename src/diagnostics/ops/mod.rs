//! The op registry: one file per op family declares everything the diagnostics know about its
//! ops — the shapes the selftest runs ([`OpFamily::cases`], [`OpFamily::train_cases`]), the
//! tolerances and their derivations (each file's `TOL_*` constants), the comparison itself
//! ([`OpFamily::check`], [`OpFamily::check_train`]), and the GPU benchmark shapes with their
//! FLOP/byte model ([`OpFamily::bench_shapes`], measured by [`OpFamily::bench`] and
//! [`OpFamily::bench_train`]).
//!
//! `protege selftest` ([`crate::diagnostics::selftest`]) and `protege bench --device cuda`
//! ([`crate::diagnostics::bench_gpu`]) are drivers over [`registry`]: they loop over the
//! families and know no op. A new op touches its family's file (and its kernel and `Backend`
//! method); a new family adds one line to [`registry`].
//!
//! Errors are normalised by the largest reference magnitude of the output
//! (`max|dev - cpu| / max|cpu|`), and the tolerances follow from bf16 (8 significant bits, unit
//! roundoff 2^-9 ≈ 0.002) and the number of roundings an op makes; the shared bases are below,
//! and each family derives its own from them.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, SeqSlice, StepMeta, TrainBackend};
use crate::diagnostics::bench_gpu::{Peaks, Row};
use crate::diagnostics::selftest::{both, norm_err, random, Report};
use crate::model::config::Qwen2Config;

pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod logprob;
pub mod matmul;
pub mod norm;
pub mod optimizer;
pub mod rope;
pub mod sampling;
pub mod softmax;

/// One rounding of an f32 result to bf16 (embedding, copy, add, scale, SwiGLU, RoPE, kv store,
/// GEMM with f32 accumulation, gather): a relative error of at most 2^-9 of the value, so
/// 1e-2 of the largest value leaves a margin of five for the f32 arithmetic before it.
pub const TOL_ONE_ROUNDING: f64 = 1e-2;
/// Two roundings, or one of a value that a reduction amplifies (RMSNorm's normalised value
/// rounded and then scaled and rounded again; softmax's probabilities): 1.5e-2.
pub const TOL_NORM: f64 = 1.5e-2;
/// Attention: probabilities rounded to bf16 before the P·V product, and the output rounded:
/// 2e-2.
pub const TOL_ATTENTION: f64 = 2e-2;
/// f32 throughout from bf16 inputs (log-probs, log-sum-exp): only f32 summation order
/// differs, 1e-3.
pub const TOL_F32: f64 = 1e-3;

/// An op family: its cases, tolerances, checks and benchmarks. Every method has a default that
/// does nothing, so a family implements only the parts it has.
pub trait OpFamily {
    /// The family's name (its file).
    const NAME: &'static str;
    /// The seed of the random inputs of [`OpFamily::cases`], one stream through all of them.
    const SEED: u64;
    /// The seed of the random inputs of [`OpFamily::train_cases`].
    const TRAIN_SEED: u64;
    /// One inference case (a shape).
    type Case: std::fmt::Debug;
    /// One training case (a shape of a backward or training op).
    type TrainCase: std::fmt::Debug;

    /// The inference cases, in report order.
    fn cases(&self) -> Vec<Self::Case> {
        vec![]
    }

    /// The training cases, in report order.
    fn train_cases(&self) -> Vec<Self::TrainCase> {
        vec![]
    }

    /// Runs one inference case on both backends and reports its checks.
    fn check<B: Backend>(&self, _t: &mut Ctx<'_, B>, _case: &Self::Case) {}

    /// Runs one training case on both backends and reports its checks.
    fn check_train<B: TrainBackend>(&self, _t: &mut Ctx<'_, B>, _case: &Self::TrainCase) {}

    /// The benchmark rows at the shapes of `cfg` (the 7B): name, shape, FLOP and byte counts,
    /// note. Inference rows first, then training rows (`BenchShape::train`).
    fn bench_shapes(&self, _cfg: &Qwen2Config) -> Vec<BenchShape> {
        vec![]
    }

    /// Measures the inference rows of [`OpFamily::bench_shapes`] on the GPU.
    fn bench(&self, _b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        Ok(vec![])
    }

    /// Measures the training rows of [`OpFamily::bench_shapes`] on the GPU.
    fn bench_train(&self, _b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        Ok(vec![])
    }
}

/// What a driver does with each family of the [`registry`] (the trait's methods are generic
/// over the backend, so the registry hands the families to a visitor instead of returning a
/// list of trait objects).
pub trait Visitor {
    fn visit<F: OpFamily>(&mut self, family: &F);
}

/// Every op family, in report order. A new family: one line here.
pub fn registry(v: &mut impl Visitor) {
    v.visit(&elementwise::Elementwise);
    v.visit(&norm::Norm);
    v.visit(&rope::Rope);
    v.visit(&matmul::Matmul);
    v.visit(&embedding::Embedding);
    v.visit(&softmax::Softmax);
    v.visit(&attention::Attention);
    v.visit(&logprob::Logprob);
    v.visit(&sampling::Sampling);
    v.visit(&optimizer::Optimizer);
}

/// The families' names, in registry order. (For the tests: the drivers visit the registry.)
#[cfg(test)]
pub fn names() -> Vec<&'static str> {
    struct Names(Vec<&'static str>);
    impl Visitor for Names {
        fn visit<F: OpFamily>(&mut self, _: &F) {
            self.0.push(F::NAME);
        }
    }
    let mut n = Names(vec![]);
    registry(&mut n);
    n.0
}

/// Every family's benchmark rows at the shapes of `cfg`, in registry order. (For the tests: the drivers visit the registry.)
#[cfg(test)]
pub fn bench_shapes(cfg: &Qwen2Config) -> Vec<BenchShape> {
    struct Shapes<'a>(&'a Qwen2Config, Vec<BenchShape>);
    impl Visitor for Shapes<'_> {
        fn visit<F: OpFamily>(&mut self, f: &F) {
            let s = f.bench_shapes(self.0);
            self.1.extend(s);
        }
    }
    let mut s = Shapes(cfg, vec![]);
    registry(&mut s);
    s.1
}

/// A family's check context: both backends, the family's random stream, the report, and the
/// label of the device path under test (it names the attention checks: "fast", "generic").
pub struct Ctx<'a, B: Backend> {
    pub dev: &'a B,
    pub cpu: &'a CpuBackend,
    pub rng: ChaCha8Rng,
    pub rep: &'a mut Report,
    pub label: &'a str,
}

impl<'a, B: Backend> Ctx<'a, B> {
    pub fn new(dev: &'a B, cpu: &'a CpuBackend, seed: u64, rep: &'a mut Report, label: &'a str) -> Self {
        Self { dev, cpu, rng: ChaCha8Rng::seed_from_u64(seed), rep, label }
    }

    /// `n` values uniform in `(-scale, scale)`, rounded to bf16.
    pub fn random(&mut self, n: usize, scale: f32) -> Vec<f32> {
        random(&mut self.rng, n, scale)
    }

    /// Both backends' copies of one host array.
    pub fn both(&self, v: &[f32]) -> (B::Buf, Vec<f32>) {
        both(self.dev, self.cpu, v)
    }

    /// The normalised error of the device's `d` against the CPU's `c` over `n` values.
    pub fn err(&self, d: &B::Buf, c: &[f32], n: usize) -> f64 {
        norm_err(&self.dev.to_f32(d), c, n)
    }

    /// Reports one check.
    pub fn add(&mut self, group: &str, name: String, err: f64, tol: f64) {
        self.rep.add(group, name, err, tol, String::new());
    }

    /// Reports one check with a note.
    pub fn add_note(&mut self, group: &str, name: String, err: f64, tol: f64, note: String) {
        self.rep.add(group, name, err, tol, note);
    }
}

/// One benchmark row's declaration: what runs, and how much work it is.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchShape {
    pub name: &'static str,
    pub shape: String,
    /// FLOPs of one run (compute-bound rows: the share of the tensor-core peak).
    pub flops: Option<f64>,
    /// Bytes moved by one run (memory-bound rows: the share of the measured bandwidth).
    pub bytes: Option<f64>,
    pub note: String,
    /// A training row (measured by [`OpFamily::bench_train`]).
    pub train: bool,
}

impl BenchShape {
    pub fn new(name: &'static str, shape: String, flops: Option<f64>, bytes: Option<f64>, note: &str) -> Self {
        Self { name, shape, flops, bytes, note: note.into(), train: false }
    }

    /// The same, as a training row.
    pub fn train(mut self) -> Self {
        self.train = true;
        self
    }
}

/// A family's benchmark context: the GPU, the 7B shape, the iterations, the peaks, and the
/// family's own [`BenchShape`]s, which [`Bench::row`] turns into rows.
pub struct Bench<'a> {
    pub be: &'a CudaBackend,
    pub cfg: &'a Qwen2Config,
    pub iters: usize,
    pub peaks: &'a Peaks,
    pub shapes: Vec<BenchShape>,
}

impl Bench<'_> {
    /// The row `name` of this family's shapes, measured at `ms`.
    pub fn row(&self, name: &str, ms: f64) -> Row {
        let s = self
            .shapes
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("bench row {name} is not among its family's bench_shapes"));
        crate::diagnostics::bench_gpu::row(s.name, s.shape.clone(), ms, s.flops, s.bytes, self.peaks, &s.note)
    }
}

/// The step the single-sequence kernel benchmarks run: `t` consecutive tokens (`i·7919 mod
/// vocab`) at positions and cache slots `0..t`.
pub fn bench_step(cfg: &Qwen2Config, t: usize) -> StepMeta {
    StepMeta {
        tokens: (0..t as u32).map(|i| (i * 7919) % cfg.vocab_size as u32).collect(),
        positions: (0..t as u32).collect(),
        slots: (0..t as u32).collect(),
        seqs: vec![],
        block_size: 16,
        logit_rows: vec![],
    }
}

/// A training batch of packed sequences of the given lengths with random tokens.
pub fn packed(lengths: &[usize], vocab: usize, rng: &mut impl rand::Rng) -> StepMeta {
    let mut meta = StepMeta::default();
    for &n in lengths {
        let row_start = meta.tokens.len();
        meta.seqs.push(SeqSlice { row_start, n_new: n, n_ctx: n, block_table: vec![] });
        meta.tokens.extend((0..n).map(|_| rng.gen_range(0..vocab as u32)));
        meta.positions.extend(0..n as u32);
    }
    meta
}

/// The tokens of the single-sequence kernel benchmarks.
pub const BENCH_TOKENS: usize = 8192;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::bench_gpu::QWEN25_7B;

    #[test]
    fn every_family_is_registered_once() {
        let n = names();
        assert_eq!(
            n,
            [
                "elementwise",
                "norm",
                "rope",
                "matmul",
                "embedding",
                "softmax",
                "attention",
                "logprob",
                "sampling",
                "optimizer"
            ]
        );
    }

    /// The rows (names, shapes, FLOP and byte counts) of `protege bench --device cuda`, as they
    /// were before the registry: the PyTorch side (tools/bench_gpu_torch.py) and the goals
    /// match rows by these names.
    #[test]
    fn bench_rows_keep_their_names_shapes_and_work() {
        let cfg = Qwen2Config::from_json(QWEN25_7B).unwrap();
        let shapes = bench_shapes(&cfg);
        // (name, shape, FLOPs, bytes, training row)
        type Work<'a> = (&'a str, &'a str, Option<f64>, Option<f64>, bool);
        let got: Vec<Work> = shapes.iter().map(|s| (s.name, s.shape.as_str(), s.flops, s.bytes, s.train)).collect();
        let (t, h, inter) = (8192f64, 3584f64, 18944f64);
        // The weights of 4 of the 7B's 28 layers.
        let adamw_1b = 4 * (cfg.num_params() - 2 * cfg.vocab_size * cfg.hidden_size - cfg.hidden_size) / 28;
        let adamw_1b_shape = format!("48 tensors, {:.1}M values", adamw_1b as f64 / 1e6);
        let want: Vec<Work> = vec![
            ("add", "8192x3584", None, Some(6.0 * t * h), false),
            ("swiglu", "8192x18944", None, Some(6.0 * t * inter), false),
            ("rmsnorm", "8192x3584", None, Some(4.0 * t * h), false),
            ("rope", "8192x28x128", None, Some(4.0 * t * 3584.0), false),
            ("linear", "8192x3584 @ 18944x3584^T", Some(2.0 * t * h * inter), None, false),
            ("linear_fwd_dx", "8192x3584 @ 18944x3584^T", Some(4.0 * t * h * inter), None, true),
            (
                "lora_linear_fwd_bwd",
                "8192x3584 @ 18944x3584^T, r16",
                Some(4.0 * t * h * inter + 2.0 * t * 16.0 * (3.0 * h + 3.0 * inter)),
                None,
                true,
            ),
            ("embedding", "8192 of 152064x3584", None, Some(4.0 * t * h), false),
            ("kv_store", "8192x512", None, Some(8.0 * t * 512.0), false),
            (
                "flash_attention",
                "4x4096, 28q/4kv heads x 128, causal",
                Some(4.0 * 28.0 * 2.0 * 4096.0 * 4096.0 * 128.0),
                None,
                false,
            ),
            ("decode_attention", "64 x ctx 4096, 28q/4kv heads x 128", None, Some(4.0 * 64.0 * 4096.0 * 512.0), false),
            (
                "attention_train_fwd",
                "4x4096 packed, 28q/4kv heads x 128, causal",
                Some(4.0 * 28.0 * 2.0 * 4096.0 * 4096.0 * 128.0),
                None,
                true,
            ),
            (
                "attention_train_bwd",
                "4x4096 packed, 28q/4kv heads x 128, causal",
                Some(2.5 * 4.0 * 28.0 * 2.0 * 4096.0 * 4096.0 * 128.0),
                None,
                true,
            ),
            (
                "token_logprobs_fwd_bwd",
                "8192 x vocab 151936, dim 3584",
                Some(3.0 * 2.0 * t * 151_936.0 * h),
                None,
                true,
            ),
            (
                "token_logprobs_fwd_bwd_dw",
                "8192 x vocab 151936, dim 3584",
                Some(4.0 * 2.0 * t * 151_936.0 * h),
                None,
                true,
            ),
            ("sample_greedy", "64x152064", None, Some(2.0 * 64.0 * 152_064.0), false),
            ("sample_top_p", "64x152064", None, Some(2.0 * 64.0 * 152_064.0), false),
            ("adamw_lora_7b", "392 tensors, 40.4M values", None, Some(30.0 * 40_370_176.0), true),
            ("adamw_1b", &adamw_1b_shape, None, Some(30.0 * adamw_1b as f64), true),
        ];
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.0, g.1, g.4), (w.0, w.1, w.4));
            let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs(),
                (None, None) => true,
                _ => false,
            };
            assert!(close(g.2, w.2) && close(g.3, w.3), "{g:?} vs {w:?}");
        }
        let note = |n: &str| shapes.iter().find(|s| s.name == n).unwrap().note.clone();
        assert_eq!(note("add"), "residual");
        assert_eq!(note("rope"), "q");
        assert_eq!(note("flash_attention"), "paged cache");
        assert_eq!(
            note("token_logprobs_fwd_bwd"),
            "dW skipped (LoRA); goal >= 1.5x torch and peak <= 10% of torch's; FLOPs incl. the recomputed logits"
        );
        assert_eq!(
            note("adamw_1b"),
            "the weights of 4 layers of the 7B; bf16 params + f32 master/grad/moments (30 B/value)"
        );
    }
}
