//! Elementwise ops (kernels/elementwise.cu): SwiGLU forward and backward, dropout, scale, the
//! residual add, copy, zero and row copies.

use super::{Bench, BenchShape, Ctx, OpFamily, BENCH_TOKENS, TOL_ONE_ROUNDING};
use crate::backend::{Backend, TrainBackend};
use crate::diagnostics::bench_gpu::{time_ms, Row};
use crate::model::config::Qwen2Config;

/// SwiGLU (silu(g)·u), dropout (x / (1 - p) or 0), `x·s + y`, and SwiGLU's backward (each
/// gradient one f32 expression of bf16 inputs): one rounding of an f32 result,
/// [`TOL_ONE_ROUNDING`].
pub const TOL: f64 = TOL_ONE_ROUNDING;
/// copy, zero and copy_rows move bf16 values unchanged: exact.
pub const TOL_COPY: f64 = 0.0;

pub struct Elementwise;

impl OpFamily for Elementwise {
    const NAME: &'static str = "elementwise";
    const SEED: u64 = 7;
    const TRAIN_SEED: u64 = 41;
    /// The number of values.
    type Case = usize;
    type TrainCase = usize;

    fn cases(&self) -> Vec<usize> {
        vec![1, 7, 1000, 65_537]
    }

    fn train_cases(&self) -> Vec<usize> {
        vec![1, 1000, 65_537]
    }

    fn check<B: Backend>(&self, t: &mut Ctx<'_, B>, &n: &usize) {
        let (dev, cpu) = (t.dev, t.cpu);
        let (a, b) = (t.random(n, 2.0), t.random(n, 2.0));
        let (mut da, mut ca) = t.both(&a);
        let (db, cb) = t.both(&b);
        let (mut dout, mut cout) = (dev.zeros(n), cpu.zeros(n));
        dev.swiglu(&da, &db, &mut dout, n);
        cpu.swiglu(&ca, &cb, &mut cout, n);
        t.add("elementwise", format!("swiglu n={n}"), t.err(&dout, &cout, n), TOL);
        dev.dropout(&da, &mut dout, n, 0.3, 99);
        cpu.dropout(&ca, &mut cout, n, 0.3, 99);
        t.add("elementwise", format!("dropout p=0.3 n={n}"), t.err(&dout, &cout, n), TOL);
        dev.scale(&mut da, 0.37, n);
        cpu.scale(&mut ca, 0.37, n);
        dev.add_assign(&mut da, &db, n);
        cpu.add_assign(&mut ca, &cb, n);
        t.add("elementwise", format!("scale+add n={n}"), t.err(&da, &ca, n), TOL);
        dev.copy(&db, &mut da, n);
        dev.zero(&mut da, n / 2);
        let mut want = b.clone();
        want[..n / 2].iter_mut().for_each(|x| *x = 0.0);
        t.add("elementwise", format!("copy+zero n={n}"), t.err(&da, &want, n), TOL_COPY);
        // Rows of 1 and 7 values (trained token rows): the last row of `b` into the first of `a`
        // and the first into the last.
        for dim in [1, 7].into_iter().filter(|&d| n >= 2 * d) {
            let last = (n / dim - 1) as u32;
            dev.copy_rows(&db, &[last, 0], &mut da, &[0, last], dim);
            let l = last as usize * dim;
            want[..dim].copy_from_slice(&b[l..l + dim]);
            want[l..l + dim].copy_from_slice(&b[..dim]);
            t.add("elementwise", format!("copy_rows n={n} dim={dim}"), t.err(&da, &want, n), TOL_COPY);
        }
    }

    fn check_train<B: TrainBackend>(&self, t: &mut Ctx<'_, B>, &n: &usize) {
        let (dev, cpu) = (t.dev, t.cpu);
        let (d, ga, u) = (t.random(n, 1.0), t.random(n, 3.0), t.random(n, 2.0));
        let ((dd, cd), (dga, cga), (du, cu)) = (t.both(&d), t.both(&ga), t.both(&u));
        let (mut dgg, mut cgg, mut dgu, mut cgu) = (dev.zeros(n), cpu.zeros(n), dev.zeros(n), cpu.zeros(n));
        dev.swiglu_bwd(&dd, &dga, &du, &mut dgg, &mut dgu, n);
        cpu.swiglu_bwd(&cd, &cga, &cu, &mut cgg, &mut cgu, n);
        let e = t.err(&dgg, &cgg, n).max(t.err(&dgu, &cgu, n));
        t.add("backward", format!("swiglu n={n}"), e, TOL);
    }

    fn bench_shapes(&self, cfg: &Qwen2Config) -> Vec<BenchShape> {
        let (t, h, inter) = (BENCH_TOKENS, cfg.hidden_size, cfg.intermediate_size);
        vec![
            // Reads x and y, writes y (bf16).
            BenchShape::new("add", format!("{t}x{h}"), None, Some(6.0 * (t * h) as f64), "residual"),
            // Reads gate and up, writes the product (bf16).
            BenchShape::new("swiglu", format!("{t}x{inter}"), None, Some(6.0 * (t * inter) as f64), ""),
        ]
    }

    fn bench(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, it) = (b.be, b.iters);
        let (t, h, inter) = (BENCH_TOKENS, b.cfg.hidden_size, b.cfg.intermediate_size);
        let mut rows = vec![];
        let x = be.random(t * h, 1.0, 10);
        let mut y = be.random(t * h, 1.0, 12);
        let ms = time_ms(be, it, || be.add_assign(&mut y, &x, t * h))?;
        rows.push(b.row("add", ms));
        drop((x, y));
        let (gate, up) = (be.random(t * inter, 2.0, 15), be.random(t * inter, 1.0, 16));
        let mut act = be.zeros(t * inter);
        let ms = time_ms(be, it, || be.swiglu(&gate, &up, &mut act, t * inter))?;
        rows.push(b.row("swiglu", ms));
        Ok(rows)
    }
}
