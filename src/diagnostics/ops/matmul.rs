//! GEMMs (cuBLAS): the linear layer forward and backward, and the fused LoRA linear forward and
//! backward.

use super::{Bench, BenchShape, Ctx, OpFamily, BENCH_TOKENS, TOL_NORM, TOL_ONE_ROUNDING};
use crate::backend::{Backend, LoraRef, TrainBackend};
use crate::diagnostics::bench_gpu::{median_ms, time_ms, Row};
use crate::model::config::Qwen2Config;

/// A GEMM accumulates bf16 products in f32 and rounds once (the bias enters the f32 result
/// before that rounding): [`TOL_ONE_ROUNDING`]. The backward's `dx` likewise; `dW` and `db`
/// accumulate in f32 from bf16 inputs onto f32 gradients: [`TOL_ONE_ROUNDING`].
pub const TOL_LINEAR: f64 = TOL_ONE_ROUNDING;
/// The fused LoRA linear's output and `dx` add the adapter's branch, which goes through `xa`
/// (or `dxa`) rounded to bf16 before its second GEMM, to the base GEMM's: two roundings,
/// [`TOL_NORM`]; `dA` goes through the rounded `dxa` too: [`TOL_NORM`].
pub const TOL_LORA: f64 = TOL_NORM;
/// LoRA's `dB = dout^T · xa` reads the device's own (stored) `xa` and accumulates in f32: one
/// rounding, [`TOL_ONE_ROUNDING`].
pub const TOL_LORA_DB: f64 = TOL_ONE_ROUNDING;

/// The LoRA rank of the benchmark.
const BENCH_RANK: usize = 16;

pub struct Matmul;

/// A training case of the GEMM family.
#[derive(Debug, Clone, Copy)]
pub enum TrainCase {
    /// `linear_bwd` with `dx`, `dW` and `db` at (rows, k, n).
    LinearBwd(usize, usize, usize),
    /// The fused LoRA linear forward and backward at (rows, k, n, rank), with dropout
    /// (p, seed) on the adapter's input where given.
    Lora(usize, usize, usize, usize, Option<(f32, u64)>),
}

impl OpFamily for Matmul {
    const NAME: &'static str = "matmul";
    const SEED: u64 = 49;
    const TRAIN_SEED: u64 = 51;
    /// (rows, k, n, with a bias).
    type Case = (usize, usize, usize, bool);
    type TrainCase = TrainCase;

    fn cases(&self) -> Vec<Self::Case> {
        vec![(1, 64, 64, false), (7, 90, 30, true), (33, 128, 200, true), (130, 896, 1000, false), (3, 3584, 512, true)]
    }

    fn train_cases(&self) -> Vec<TrainCase> {
        use TrainCase::*;
        vec![
            LinearBwd(1, 7, 3),
            LinearBwd(5, 64, 48),
            LinearBwd(33, 100, 257),
            LinearBwd(130, 896, 128),
            Lora(5, 64, 48, 4, None),
            Lora(70, 896, 128, 16, Some((0.1, 9))),
        ]
    }

    fn check<B: Backend>(&self, t: &mut Ctx<'_, B>, &(rows, k, n, bias): &Self::Case) {
        let (dev, cpu) = (t.dev, t.cpu);
        let x = t.random(rows * k, 1.0);
        let w = t.random(n * k, 1.0 / (k as f32).sqrt());
        let b = t.random(n, 0.5);
        let ((dx, cx), (dw, cw), (db, cb)) = (t.both(&x), t.both(&w), t.both(&b));
        let (mut dout, mut cout) = (dev.zeros(rows * n), cpu.zeros(rows * n));
        dev.linear(&dx, &dw, bias.then_some(&db), &mut dout, rows, k, n);
        cpu.linear(&cx, &cw, bias.then_some(&cb), &mut cout, rows, k, n);
        t.add(
            "linear",
            format!("rows={rows} k={k} n={n}{}", if bias { " +bias" } else { "" }),
            t.err(&dout, &cout, rows * n),
            TOL_LINEAR,
        );
    }

    fn check_train<B: TrainBackend>(&self, t: &mut Ctx<'_, B>, case: &TrainCase) {
        match *case {
            TrainCase::LinearBwd(rows, k, n) => check_linear_bwd(t, rows, k, n),
            TrainCase::Lora(rows, k, n, r, dropout) => check_lora(t, rows, k, n, r, dropout),
        }
    }

    fn bench_shapes(&self, cfg: &Qwen2Config) -> Vec<BenchShape> {
        let (t, h, inter) = (BENCH_TOKENS, cfg.hidden_size, cfg.intermediate_size);
        let shape = format!("{t}x{h} @ {inter}x{h}^T");
        // Forward and dx GEMMs of the frozen base: 2·m·k·n each.
        let base_flops = 2.0 * 2.0 * (t * h * inter) as f64;
        // The adapter adds xa, out, dxa, dB, dA and dx's adapter term: 2·m·r·(3k + 3n).
        let lora_flops = base_flops + 2.0 * (t * BENCH_RANK * (3 * h + 3 * inter)) as f64;
        vec![
            BenchShape::new("linear", shape.clone(), Some(2.0 * (t * h * inter) as f64), None, "cuBLAS bf16"),
            // The LoRA rows at the gate/up shape.
            BenchShape::new(
                "linear_fwd_dx",
                shape.clone(),
                Some(base_flops),
                None,
                "frozen base alone: forward GEMM + dx GEMM (cuBLAS)",
            )
            .train(),
            // The note is the measured ratio to the base (see `bench_train`).
            BenchShape::new("lora_linear_fwd_bwd", format!("{shape}, r{BENCH_RANK}"), Some(lora_flops), None, "")
                .train(),
        ]
    }

    fn bench(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, t, h, inter) = (b.be, BENCH_TOKENS, b.cfg.hidden_size, b.cfg.intermediate_size);
        let x = be.random(t * h, 1.0, 10);
        let wg = be.random(inter * h, 0.02, 17);
        let mut act = be.zeros(t * inter);
        let ms = time_ms(be, b.iters, || be.linear(&x, &wg, None, &mut act, t, h, inter))?;
        Ok(vec![b.row("linear", ms)])
    }

    /// The fused LoRA linear, rank 16, no dropout, at the gate/up shape, against the frozen
    /// base's two GEMMs alone.
    fn bench_train(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, it) = (b.be, b.iters);
        let _r = be.range("bench lora_linear");
        let (m, k, n, rank) = (BENCH_TOKENS, b.cfg.hidden_size, b.cfg.intermediate_size, BENCH_RANK);
        let x = be.random(m * k, 1.0, 50);
        let w = be.random(n * k, 0.02, 51);
        let a = be.random(rank * k, 0.02, 52);
        let bm = be.random(n * rank, 0.02, 53);
        let dout = be.random(m * n, 1.0, 54);
        let (mut out, mut xa, mut dx) = (be.zeros(m * n), be.zeros(m * rank), be.zeros(m * k));
        let (mut da, mut db) = (be.zeros_f32(rank * k), be.zeros_f32(n * rank));
        let base_ms = median_ms(be, 1, it, || {
            be.linear(&x, &w, None, &mut out, m, k, n);
            be.linear_bwd(&dout, &x, &w, Some(&mut dx), None, None, m, k, n);
        })?;
        let mut rows = vec![b.row("linear_fwd_dx", base_ms)];
        let lora = LoraRef { a: &a, b: &bm, rank, scale: 2.0 };
        let lora_ms = median_ms(be, 1, it, || {
            be.lora_linear(&x, None, &w, None, lora, &mut out, &mut xa, m, k, n);
            be.lora_linear_bwd(&dout, &x, None, &xa, &w, lora, &mut dx, &mut da, &mut db, None, m, k, n);
        })?;
        let mut r = b.row("lora_linear_fwd_bwd", lora_ms);
        r.note = format!("{:.3}x the base alone (goal <= 1.15x); dA, dB in f32", lora_ms / base_ms);
        rows.push(r);
        Ok(rows)
    }
}

fn check_linear_bwd<B: TrainBackend>(t: &mut Ctx<'_, B>, rows: usize, k: usize, n: usize) {
    let (dev, cpu) = (t.dev, t.cpu);
    let (dout, x, w, b0) =
        (t.random(rows * n, 1.0), t.random(rows * k, 1.0), t.random(n * k, 0.5), t.random(n * k, 0.5));
    let ((dd, cd), (dx_, cx), (dw_, cw)) = (t.both(&dout), t.both(&x), t.both(&w));
    // Weight gradients accumulate: start both from the same non-zero values.
    let (mut ddw, mut cdw) = (dev.upload_f32_full(&b0), cpu.upload_f32_full(&b0));
    let (mut ddb, mut cdb) = (dev.upload_f32_full(&b0[..n]), cpu.upload_f32_full(&b0[..n]));
    let (mut ddx, mut cdx) = (dev.zeros(rows * k), cpu.zeros(rows * k));
    dev.linear_bwd(&dd, &dx_, &dw_, Some(&mut ddx), Some(&mut ddw), Some(&mut ddb), rows, k, n);
    cpu.linear_bwd(&cd, &cx, &cw, Some(&mut cdx), Some(&mut cdw), Some(&mut cdb), rows, k, n);
    let shape = format!("rows={rows} k={k} n={n}");
    t.add("backward", format!("linear dx {shape}"), t.err(&ddx, &cdx, rows * k), TOL_LINEAR);
    t.add("backward", format!("linear dw {shape}"), t.err(&ddw, &cdw, n * k), TOL_LINEAR);
    t.add("backward", format!("linear db {shape}"), t.err(&ddb, &cdb, n), TOL_LINEAR);
}

fn check_lora<B: TrainBackend>(
    t: &mut Ctx<'_, B>,
    rows: usize,
    k: usize,
    n: usize,
    r: usize,
    dropout: Option<(f32, u64)>,
) {
    let (dev, cpu) = (t.dev, t.cpu);
    let (x, w, bias) = (t.random(rows * k, 1.0), t.random(n * k, 0.1), t.random(n, 0.5));
    let (a, bm, g) = (t.random(r * k, 0.2), t.random(n * r, 0.2), t.random(rows * n, 1.0));
    let ((dx_, cx), (dw_, cw), (dbias, cbias)) = (t.both(&x), t.both(&w), t.both(&bias));
    let ((da, ca), (dbm, cbm), (dg, cg)) = (t.both(&a), t.both(&bm), t.both(&g));
    let (xd_dev, xd_cpu) = match dropout {
        Some((p, seed)) => {
            let (mut d, mut c) = (dev.zeros(rows * k), cpu.zeros(rows * k));
            dev.dropout(&dx_, &mut d, rows * k, p, seed);
            cpu.dropout(&cx, &mut c, rows * k, p, seed);
            (Some(d), Some(c))
        }
        None => (None, None),
    };
    let dl = LoraRef { a: &da, b: &dbm, rank: r, scale: 2.0 };
    let cl = LoraRef { a: &ca, b: &cbm, rank: r, scale: 2.0 };
    let (mut dout, mut cout) = (dev.zeros(rows * n), cpu.zeros(rows * n));
    let (mut dxa, mut cxa) = (dev.zeros(rows * r), cpu.zeros(rows * r));
    dev.lora_linear(&dx_, xd_dev.as_ref(), &dw_, Some(&dbias), dl, &mut dout, &mut dxa, rows, k, n);
    cpu.lora_linear(&cx, xd_cpu.as_ref(), &cw, Some(&cbias), cl, &mut cout, &mut cxa, rows, k, n);
    let shape = format!("rows={rows} k={k} n={n} r={r}{}", if dropout.is_some() { " dropout" } else { "" });
    t.add("lora", format!("fwd {shape}"), t.err(&dout, &cout, rows * n), TOL_LORA);
    // The backward reads the device's own xa, rounded as the device stored it.
    let cxa = cpu.upload_f32(&dev.to_f32(&dxa));
    let (mut ddx, mut cdx) = (dev.zeros(rows * k), cpu.zeros(rows * k));
    let (mut dga, mut cga) = (dev.zeros_f32(r * k), cpu.zeros_f32(r * k));
    let (mut dgb, mut cgb) = (dev.zeros_f32(n * r), cpu.zeros_f32(n * r));
    dev.lora_linear_bwd(&dg, &dx_, xd_dev.as_ref(), &dxa, &dw_, dl, &mut ddx, &mut dga, &mut dgb, dropout, rows, k, n);
    cpu.lora_linear_bwd(&cg, &cx, xd_cpu.as_ref(), &cxa, &cw, cl, &mut cdx, &mut cga, &mut cgb, dropout, rows, k, n);
    t.add("lora", format!("bwd dx {shape}"), t.err(&ddx, &cdx, rows * k), TOL_LORA);
    // dA goes through dxa, which the device rounds to bf16 first.
    t.add("lora", format!("bwd dA {shape}"), t.err(&dga, &cga, r * k), TOL_LORA);
    t.add("lora", format!("bwd dB {shape}"), t.err(&dgb, &cgb, n * r), TOL_LORA_DB);
}
