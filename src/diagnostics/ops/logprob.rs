//! The fused token log-prob `log_softmax(h·W^T)[target]` over the vocabulary in chunks, forward
//! and backward, without materialising the logits (kernels/logprob.cu and cuBLAS).

use rand::Rng;

use super::{Bench, BenchShape, Ctx, OpFamily, BENCH_TOKENS, TOL_F32, TOL_NORM};
use crate::backend::{Backend, TrainBackend};
use crate::diagnostics::bench_gpu::{host_uniform, median_ms, PoolPeak, Row, MIB};
use crate::model::config::Qwen2Config;

/// Log-probs and log-sum-exp: f32 throughout from bf16 inputs, [`TOL_F32`].
pub const TOL_LOGP: f64 = TOL_F32;
/// `dh` and `dW`: the logit gradient is rounded to bf16 before its GEMMs, whose results are
/// rounded (`dh`) or accumulated in f32 (`dW`): [`TOL_NORM`].
pub const TOL_GRAD: f64 = TOL_NORM;

/// The vocabulary of the benchmark (Qwen2.5's tokenizer; the 7B's head is padded to 152064).
const BENCH_VOCAB: usize = 151_936;

pub struct Logprob;

impl OpFamily for Logprob {
    const NAME: &'static str = "logprob";
    const SEED: u64 = 61;
    const TRAIN_SEED: u64 = 29;
    type Case = ();
    /// (rows, dim, vocab).
    type TrainCase = (usize, usize, usize);

    fn train_cases(&self) -> Vec<Self::TrainCase> {
        // 300 x 151936 logits span two vocabulary chunks on the GPU.
        vec![(5, 64, 1000), (300, 64, 151_936)]
    }

    fn check_train<B: TrainBackend>(&self, t: &mut Ctx<'_, B>, &(rows, dim, vocab): &Self::TrainCase) {
        let (dev, cpu) = (t.dev, t.cpu);
        let (h, w) = (t.random(rows * dim, 2.0), t.random(vocab * dim, 0.5));
        let targets: Vec<u32> = (0..rows).map(|_| t.rng.gen_range(0..vocab as u32)).collect();
        let dlogp: Vec<f32> = (0..rows).map(|i| if i % 3 == 0 { 0.0 } else { -1.0 / rows as f32 }).collect();
        let ((dh_, ch), (dw_, cw)) = (t.both(&h), t.both(&w));
        let (mut dlp, mut clp, mut dlse, mut clse) =
            (dev.zeros_f32(rows), cpu.zeros_f32(rows), dev.zeros_f32(rows), cpu.zeros_f32(rows));
        dev.token_logprobs(&dh_, &dw_, &targets, &mut dlp, &mut dlse, rows, dim, vocab);
        cpu.token_logprobs(&ch, &cw, &targets, &mut clp, &mut clse, rows, dim, vocab);
        let shape = format!("rows={rows} dim={dim} vocab={vocab}");
        t.add("logprob", format!("fwd logp {shape}"), t.err(&dlp, &clp, rows), TOL_LOGP);
        t.add("logprob", format!("fwd lse {shape}"), t.err(&dlse, &clse, rows), TOL_LOGP);
        let (dd, cd) = (dev.upload_f32_full(&dlogp), cpu.upload_f32_full(&dlogp));
        let (mut ddh, mut cdh) = (dev.zeros(rows * dim), cpu.zeros(rows * dim));
        let (mut ddw, mut cdw) = (dev.zeros_f32(vocab * dim), cpu.zeros_f32(vocab * dim));
        dev.token_logprobs_bwd(&dd, &dh_, &dw_, &targets, &dlse, &mut ddh, Some(&mut ddw), rows, dim, vocab);
        cpu.token_logprobs_bwd(&cd, &ch, &cw, &targets, &clse, &mut cdh, Some(&mut cdw), rows, dim, vocab);
        t.add("logprob", format!("bwd dh {shape}"), t.err(&ddh, &cdh, rows * dim), TOL_GRAD);
        t.add("logprob", format!("bwd dw {shape}"), t.err(&ddw, &cdw, vocab * dim), TOL_GRAD);
    }

    fn bench_shapes(&self, cfg: &Qwen2Config) -> Vec<BenchShape> {
        let (m, dim, vocab) = (BENCH_TOKENS, cfg.hidden_size, BENCH_VOCAB);
        let shape = format!("{m} x vocab {vocab}, dim {dim}");
        // One logits GEMM is 2·m·vocab·dim; the forward makes one, the backward recomputes the
        // logits and makes dh (and dW): 3 (4) in all.
        let gemm = 2.0 * (m * vocab * dim) as f64;
        let recomputed = "; FLOPs incl. the recomputed logits";
        vec![
            BenchShape::new(
                "token_logprobs_fwd_bwd",
                shape.clone(),
                Some(3.0 * gemm),
                None,
                &format!("dW skipped (LoRA); goal >= 1.5x torch and peak <= 10% of torch's{recomputed}"),
            )
            .train(),
            BenchShape::new(
                "token_logprobs_fwd_bwd_dw",
                shape,
                Some(4.0 * gemm),
                None,
                &format!("with the head's dW (into a persistent f32 gradient){recomputed}"),
            )
            .train(),
        ]
    }

    /// Forward + backward over the full vocabulary, without and with the head's dW: time and
    /// the peak memory of the pool.
    fn bench_train(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, it) = (b.be, b.iters);
        let _r = be.range("bench token_logprobs");
        let (m, dim, vocab) = (BENCH_TOKENS, b.cfg.hidden_size, BENCH_VOCAB);
        let hs = be.random(m * dim, 1.0, 60);
        let w = be.random(vocab * dim, 0.02, 61);
        let targets: Vec<u32> = (0..m as u32).map(|i| i.wrapping_mul(7919) % vocab as u32).collect();
        let dlogp = be.upload_f32_full(&host_uniform(m, 1.0 / m as f32, 62));
        let mut dw = be.zeros_f32(vocab * dim);
        let mut rows = vec![];
        for with_dw in [false, true] {
            // Outputs are allocated inside, so the peak counts them as PyTorch's counts its own.
            let mut step = || {
                let (mut logp, mut lse, mut dh) = (be.zeros_f32(m), be.zeros_f32(m), be.zeros(m * dim));
                be.token_logprobs(&hs, &w, &targets, &mut logp, &mut lse, m, dim, vocab);
                let dwo = if with_dw { Some(&mut dw) } else { None };
                be.token_logprobs_bwd(&dlogp, &hs, &w, &targets, &lse, &mut dh, dwo, m, dim, vocab);
            };
            step();
            let peak = PoolPeak::start(be)?;
            step();
            let peak = peak.finish(be)?;
            let ms = median_ms(be, 0, it.min(5), &mut step)?;
            let mut r = b.row(if with_dw { "token_logprobs_fwd_bwd_dw" } else { "token_logprobs_fwd_bwd" }, ms);
            r.peak_mib = peak.map(|b| b as f64 / MIB);
            rows.push(r);
        }
        Ok(rows)
    }
}
