//! On-device sampling (kernels/sampling.cu): greedy, temperature, top-k and top-p.

use super::{Bench, BenchShape, Ctx, OpFamily};
use crate::backend::{Backend, SamplingParams};
use crate::diagnostics::bench_gpu::{time_ms, Row};
use crate::diagnostics::selftest::bf16_round;
use crate::model::config::Qwen2Config;

/// Greedy must pick the CPU's argmax exactly (a count of differing rows, tolerance 0), and
/// top-k/top-p must restrict the support exactly (a count of draws outside it).
pub const TOL_EXACT: f64 = 0.0;
/// Sampled frequencies against the softmax distribution over 4096 draws: the standard error of
/// a frequency near 0.4 is `sqrt(0.4·0.6/4096)` ≈ 0.0077, so 0.03 is about four of them.
pub const TOL_FREQUENCY: f64 = 0.03;

/// The draws of the distribution cases.
const DRAWS: usize = 4096;

/// A sampling case.
#[derive(Debug, Clone)]
pub enum Case {
    /// Greedy over `rows` random rows of `vocab` logits.
    Greedy { rows: usize, vocab: usize },
    /// `p = [0.1, 0.3, 0.2, 0.4]` (logits ln p) drawn 4096 times with different seeds: the
    /// draws must stay in `support` and follow the distribution restricted to it.
    Draws { name: &'static str, params: SamplingParams, support: Vec<usize> },
}

pub struct Sampling;

impl OpFamily for Sampling {
    const NAME: &'static str = "sampling";
    const SEED: u64 = 5;
    const TRAIN_SEED: u64 = 63;
    type Case = Case;
    type TrainCase = ();

    fn cases(&self) -> Vec<Case> {
        let p = |top_k, top_p| SamplingParams { temperature: 1.0, top_k, top_p };
        vec![
            Case::Greedy { rows: 5, vocab: 455 },
            Case::Greedy { rows: 4, vocab: 151_936 },
            Case::Draws { name: "temperature 1", params: p(0, 1.0), support: vec![0, 1, 2, 3] },
            Case::Draws { name: "top-k 2", params: p(2, 1.0), support: vec![1, 3] },
            Case::Draws { name: "top-p 0.65", params: p(0, 0.65), support: vec![1, 3] },
        ]
    }

    fn check<B: Backend>(&self, t: &mut Ctx<'_, B>, case: &Case) {
        let dev = t.dev;
        match case {
            &Case::Greedy { rows, vocab } => {
                let logits = t.random(rows * vocab, 10.0);
                let want: Vec<u32> = logits.chunks(vocab).map(crate::backend::sampling::argmax).collect();
                let params = vec![SamplingParams::default(); rows];
                let mut rngs: Vec<_> = (0..rows).map(|i| crate::backend::sampling::seeded(i as u64)).collect();
                let got = dev.sample(&dev.upload_f32(&logits), vocab, &params, &mut rngs);
                let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                t.add_note(
                    "sampling",
                    format!("greedy rows={rows} vocab={vocab}"),
                    wrong as f64,
                    TOL_EXACT,
                    "rows that differ from argmax".into(),
                );
            }
            Case::Draws { name, params, support } => {
                let probs = [0.1f32, 0.3, 0.2, 0.4];
                let row: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
                let logits: Vec<f32> = (0..DRAWS).flat_map(|_| row.iter().copied()).collect();
                let dl = dev.upload_f32(&logits);
                let bf_row = bf16_round(&row);
                let exact: Vec<f64> = {
                    let m = bf_row.iter().fold(f32::MIN, |a, &b| a.max(b));
                    let e: Vec<f64> = bf_row.iter().map(|&x| ((x - m) as f64).exp()).collect();
                    let z: f64 = e.iter().sum();
                    e.iter().map(|x| x / z).collect()
                };
                let params = vec![params.clone(); DRAWS];
                let mut rngs: Vec<_> = (0..DRAWS).map(|i| crate::backend::sampling::seeded(1000 + i as u64)).collect();
                let got = dev.sample(&dl, 4, &params, &mut rngs);
                let outside = got.iter().filter(|t| !support.contains(&(**t as usize))).count();
                t.add_note(
                    "sampling",
                    format!("{name}: support"),
                    outside as f64,
                    TOL_EXACT,
                    format!("draws outside {support:?}"),
                );
                let z: f64 = support.iter().map(|&i| exact[i]).sum();
                let worst = support
                    .iter()
                    .map(|&i| {
                        let f = got.iter().filter(|&&t| t as usize == i).count() as f64 / DRAWS as f64;
                        (f - exact[i] / z).abs()
                    })
                    .fold(0.0, f64::max);
                t.add_note("sampling", format!("{name}: frequencies"), worst, TOL_FREQUENCY, format!("{DRAWS} draws"));
            }
        }
    }

    fn bench_shapes(&self, cfg: &Qwen2Config) -> Vec<BenchShape> {
        // Reads 64 rows of bf16 logits.
        let bytes = Some(2.0 * (64 * cfg.vocab_size) as f64);
        let note = "includes the copy of 64 ids to the host";
        ["sample_greedy", "sample_top_p"]
            .map(|name| BenchShape::new(name, format!("64x{}", cfg.vocab_size), None, bytes, note))
            .to_vec()
    }

    /// Sampling over 64 rows of the full vocabulary.
    fn bench(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, cfg) = (b.be, b.cfg);
        let logits = be.random(64 * cfg.vocab_size, 10.0, 26);
        let mut rows = vec![];
        for (name, p) in [
            ("sample_greedy", SamplingParams::default()),
            ("sample_top_p", SamplingParams { temperature: 0.7, top_k: 0, top_p: 0.95 }),
        ] {
            let params = vec![p; 64];
            let mut rngs: Vec<_> = (0..64).map(crate::backend::sampling::seeded).collect();
            let ms = time_ms(be, b.iters, || {
                be.sample(&logits, cfg.vocab_size, &params, &mut rngs);
            })?;
            rows.push(b.row(name, ms));
        }
        Ok(rows)
    }
}
