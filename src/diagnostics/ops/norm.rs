//! RMSNorm forward and backward (kernels/rmsnorm.cu).

use super::{Bench, BenchShape, Ctx, OpFamily, BENCH_TOKENS, TOL_NORM};
use crate::backend::{Backend, TrainBackend};
use crate::diagnostics::bench_gpu::{time_ms, Row};
use crate::model::config::Qwen2Config;

/// As Qwen2RMSNorm in bf16, the forward rounds the normalised value, then scales it by the
/// weight and rounds again: two roundings, [`TOL_NORM`]. The backward's `dx` is one rounding of
/// an f32 expression whose terms cancel (`w·g - x·mean(x·w·g)/rms²`), and `dw` an f32 sum over
/// rows of bf16 products: [`TOL_NORM`] as the forward.
pub const TOL: f64 = TOL_NORM;

pub struct Norm;

impl OpFamily for Norm {
    const NAME: &'static str = "norm";
    const SEED: u64 = 43;
    const TRAIN_SEED: u64 = 21;
    /// (rows, dim).
    type Case = (usize, usize);
    type TrainCase = (usize, usize);

    fn cases(&self) -> Vec<(usize, usize)> {
        vec![(1, 10), (5, 64), (33, 90), (3, 896), (2, 3584)]
    }

    fn train_cases(&self) -> Vec<(usize, usize)> {
        vec![(1, 7), (5, 64), (33, 1000), (17, 3584)]
    }

    fn check<B: Backend>(&self, t: &mut Ctx<'_, B>, &(rows, dim): &(usize, usize)) {
        let (dev, cpu) = (t.dev, t.cpu);
        let x = t.random(rows * dim, 3.0);
        let w = t.random(dim, 1.5);
        let ((dx, cx), (dw, cw)) = (t.both(&x), t.both(&w));
        let (mut dout, mut cout) = (dev.zeros(rows * dim), cpu.zeros(rows * dim));
        dev.rmsnorm(&dx, &dw, &mut dout, rows, dim, 1e-6);
        cpu.rmsnorm(&cx, &cw, &mut cout, rows, dim, 1e-6);
        t.add("rmsnorm", format!("rows={rows} dim={dim}"), t.err(&dout, &cout, rows * dim), TOL);
    }

    fn check_train<B: TrainBackend>(&self, t: &mut Ctx<'_, B>, &(rows, dim): &(usize, usize)) {
        let (dev, cpu) = (t.dev, t.cpu);
        let (x, w, g) = (t.random(rows * dim, 2.0), t.random(dim, 1.5), t.random(rows * dim, 1.0));
        let ((dx_, cx), (dw_, cw), (dg, cg)) = (t.both(&x), t.both(&w), t.both(&g));
        let (mut ddx, mut cdx) = (dev.zeros(rows * dim), cpu.zeros(rows * dim));
        let (mut ddw, mut cdw) = (dev.zeros_f32(dim), cpu.zeros_f32(dim));
        dev.rmsnorm_bwd(&dg, &dx_, &dw_, &mut ddx, Some(&mut ddw), rows, dim, 1e-6);
        cpu.rmsnorm_bwd(&cg, &cx, &cw, &mut cdx, Some(&mut cdw), rows, dim, 1e-6);
        let shape = format!("rows={rows} dim={dim}");
        t.add("backward", format!("rmsnorm dx {shape}"), t.err(&ddx, &cdx, rows * dim), TOL);
        t.add("backward", format!("rmsnorm dw {shape}"), t.err(&ddw, &cdw, dim), TOL);
    }

    fn bench_shapes(&self, cfg: &Qwen2Config) -> Vec<BenchShape> {
        let (t, h) = (BENCH_TOKENS, cfg.hidden_size);
        // Reads x, writes out (bf16); the weight is negligible.
        vec![BenchShape::new("rmsnorm", format!("{t}x{h}"), None, Some(4.0 * (t * h) as f64), "")]
    }

    fn bench(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, t, h) = (b.be, BENCH_TOKENS, b.cfg.hidden_size);
        let x = be.random(t * h, 1.0, 10);
        let w = be.random(h, 1.0, 11);
        let mut out = be.zeros(t * h);
        let ms = time_ms(be, b.iters, || be.rmsnorm(&x, &w, &mut out, t, h, 1e-6))?;
        Ok(vec![b.row("rmsnorm", ms)])
    }
}
