//! Rotary position embedding, forward and backward (kernels/rope.cu).

use rand::Rng;

use super::{bench_step, packed, Bench, BenchShape, Ctx, OpFamily, BENCH_TOKENS, TOL_ONE_ROUNDING};
use crate::backend::{Backend, StepMeta, TrainBackend};
use crate::diagnostics::bench_gpu::{time_ms, Row};
use crate::model::config::Qwen2Config;

/// Each output is one f32 rotation (`x·cos ± y·sin`, the angle in f32 from positions up to 32k)
/// of bf16 inputs, rounded once; the backward is the inverse rotation: [`TOL_ONE_ROUNDING`].
pub const TOL: f64 = TOL_ONE_ROUNDING;

pub struct Rope;

impl OpFamily for Rope {
    const NAME: &'static str = "rope";
    const SEED: u64 = 45;
    const TRAIN_SEED: u64 = 47;
    /// (rows, heads, head dim, theta).
    type Case = (usize, usize, usize, f32);
    /// (rows, heads, head dim), theta 1e4.
    type TrainCase = (usize, usize, usize);

    fn cases(&self) -> Vec<Self::Case> {
        vec![(3, 2, 10, 1e4), (17, 9, 10, 1e6), (5, 4, 16, 1e4), (9, 28, 128, 1e6), (4, 14, 64, 1e4)]
    }

    fn train_cases(&self) -> Vec<Self::TrainCase> {
        vec![(3, 2, 16), (37, 28, 128), (5, 9, 10)]
    }

    fn check<B: Backend>(&self, t: &mut Ctx<'_, B>, &(rows, heads, hd, theta): &Self::Case) {
        let (dev, cpu) = (t.dev, t.cpu);
        let x = t.random(rows * heads * hd, 2.0);
        let meta = StepMeta {
            tokens: vec![0; rows],
            positions: (0..rows).map(|_| t.rng.gen_range(0..32_768u32)).collect(),
            slots: vec![0; rows],
            seqs: vec![],
            block_size: 16,
            logit_rows: vec![],
        };
        let (mut dx, mut cx) = t.both(&x);
        dev.rope(&mut dx, &dev.prepare(&meta), heads, hd, theta);
        cpu.rope(&mut cx, &cpu.prepare(&meta), heads, hd, theta);
        t.add_note(
            "rope",
            format!("rows={rows} heads={heads} head_dim={hd} theta={theta:e}"),
            t.err(&dx, &cx, x.len()),
            TOL,
            "positions up to 32k".into(),
        );
    }

    fn check_train<B: TrainBackend>(&self, t: &mut Ctx<'_, B>, &(rows, heads, hd): &Self::TrainCase) {
        let (dev, cpu) = (t.dev, t.cpu);
        let meta = packed(&[rows], 100, &mut t.rng);
        let (dm, cm) = (dev.prepare(&meta), cpu.prepare(&meta));
        let g = t.random(rows * heads * hd, 1.0);
        let (mut dg, mut cg) = t.both(&g);
        dev.rope_bwd(&mut dg, &dm, heads, hd, 10000.0);
        cpu.rope_bwd(&mut cg, &cm, heads, hd, 10000.0);
        let n = rows * heads * hd;
        t.add("backward", format!("rope rows={rows} h={heads} d={hd}"), t.err(&dg, &cg, n), TOL);
    }

    fn bench_shapes(&self, cfg: &Qwen2Config) -> Vec<BenchShape> {
        let (t, qd) = (BENCH_TOKENS, cfg.q_dim());
        // Reads and writes q in place (bf16).
        vec![BenchShape::new(
            "rope",
            format!("{t}x{}x{}", cfg.num_heads, cfg.head_dim),
            None,
            Some(4.0 * (t * qd) as f64),
            "q",
        )]
    }

    fn bench(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, cfg, t) = (b.be, b.cfg, BENCH_TOKENS);
        let dm = be.prepare(&bench_step(cfg, t));
        let mut q = be.random(t * cfg.q_dim(), 1.0, 14);
        let ms = time_ms(be, b.iters, || be.rope(&mut q, &dm, cfg.num_heads, cfg.head_dim, cfg.rope_theta))?;
        Ok(vec![b.row("rope", ms)])
    }
}
