//! Row gathers (kernels/embedding.cu): the embedding lookup and its backward (a scatter-add),
//! and the gather of the rows whose logits a step computes.

use rand::Rng;

use super::{bench_step, packed, Bench, BenchShape, Ctx, OpFamily, BENCH_TOKENS, TOL_ONE_ROUNDING};
use crate::backend::{Backend, StepMeta, TrainBackend};
use crate::diagnostics::bench_gpu::{time_ms, Row};
use crate::model::config::Qwen2Config;

/// The lookup and the gather copy bf16 rows unchanged: exact.
pub const TOL_GATHER: f64 = 0.0;
/// The backward adds bf16 row gradients into an f32 table (repeated tokens add up, in any
/// order): f32 sums of bf16 values, [`TOL_ONE_ROUNDING`].
pub const TOL_BWD: f64 = TOL_ONE_ROUNDING;

pub struct Embedding;

/// An inference case of the gather family.
#[derive(Debug, Clone, Copy)]
pub enum Case {
    /// The lookup of `rows` random tokens in a (vocab, dim) table.
    Lookup { vocab: usize, dim: usize, rows: usize },
    /// The gather of `rows` rows of `dim` values, in reverse order.
    Gather { rows: usize, dim: usize },
}

impl OpFamily for Embedding {
    const NAME: &'static str = "embedding";
    const SEED: u64 = 53;
    const TRAIN_SEED: u64 = 55;
    type Case = Case;
    /// (rows, dim, vocab) of the backward.
    type TrainCase = (usize, usize, usize);

    fn cases(&self) -> Vec<Case> {
        let gathers = [(1, 10), (5, 64), (33, 90), (3, 896), (2, 3584)].map(|(rows, dim)| Case::Gather { rows, dim });
        let lookups = [(455, 64, 9), (151_936, 896, 3)].map(|(vocab, dim, rows)| Case::Lookup { vocab, dim, rows });
        gathers.into_iter().chain(lookups).collect()
    }

    fn train_cases(&self) -> Vec<Self::TrainCase> {
        // Repeated tokens (300 rows of a vocabulary of 17): their gradients must add up.
        vec![(300, 96, 17)]
    }

    fn check<B: Backend>(&self, t: &mut Ctx<'_, B>, case: &Case) {
        let (dev, cpu) = (t.dev, t.cpu);
        match *case {
            Case::Gather { rows, dim } => {
                let x = t.random(rows * dim, 3.0);
                let (dx, cx) = t.both(&x);
                let (mut dout, mut cout) = (dev.zeros(rows * dim), cpu.zeros(rows * dim));
                let meta = StepMeta { logit_rows: (0..rows as u32).rev().collect(), ..Default::default() };
                dev.gather_logit_rows(&dx, &dev.prepare(&meta), &mut dout, dim);
                cpu.gather_logit_rows(&cx, &cpu.prepare(&meta), &mut cout, dim);
                t.add("gather", format!("rows={rows} dim={dim}"), t.err(&dout, &cout, rows * dim), TOL_GATHER);
            }
            Case::Lookup { vocab, dim, rows } => {
                let table = t.random(vocab * dim, 1.0);
                let meta = StepMeta {
                    tokens: (0..rows).map(|_| t.rng.gen_range(0..vocab as u32)).collect(),
                    positions: vec![0; rows],
                    slots: vec![0; rows],
                    seqs: vec![],
                    block_size: 16,
                    logit_rows: vec![],
                };
                let (dt, ct) = t.both(&table);
                let (mut dout, mut cout) = (dev.zeros(rows * dim), cpu.zeros(rows * dim));
                dev.embedding(&dt, &dev.prepare(&meta), &mut dout, dim);
                cpu.embedding(&ct, &cpu.prepare(&meta), &mut cout, dim);
                t.add(
                    "embedding",
                    format!("vocab={vocab} dim={dim} rows={rows}"),
                    t.err(&dout, &cout, rows * dim),
                    TOL_GATHER,
                );
            }
        }
    }

    fn check_train<B: TrainBackend>(&self, t: &mut Ctx<'_, B>, &(rows, dim, vocab): &Self::TrainCase) {
        let (dev, cpu) = (t.dev, t.cpu);
        let meta = packed(&[rows], vocab, &mut t.rng);
        let (dm, cm) = (dev.prepare(&meta), cpu.prepare(&meta));
        let g = t.random(rows * dim, 1.0);
        let (dg, cg) = t.both(&g);
        let (mut dt, mut ct) = (dev.zeros_f32(vocab * dim), cpu.zeros_f32(vocab * dim));
        dev.embedding_bwd(&dg, &dm, &mut dt, dim);
        cpu.embedding_bwd(&cg, &cm, &mut ct, dim);
        t.add("backward", format!("embedding rows={rows} vocab={vocab}"), t.err(&dt, &ct, vocab * dim), TOL_BWD);
    }

    fn bench_shapes(&self, cfg: &Qwen2Config) -> Vec<BenchShape> {
        let (t, h) = (BENCH_TOKENS, cfg.hidden_size);
        // Reads and writes one bf16 row per token.
        vec![BenchShape::new(
            "embedding",
            format!("{t} of {}x{h}", cfg.vocab_size),
            None,
            Some(4.0 * (t * h) as f64),
            "",
        )]
    }

    fn bench(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, cfg, t, h) = (b.be, b.cfg, BENCH_TOKENS, b.cfg.hidden_size);
        let table = be.random(cfg.vocab_size * h, 1.0, 13);
        let dm = be.prepare(&bench_step(cfg, t));
        let mut out = be.zeros(t * h);
        let ms = time_ms(be, b.iters, || be.embedding(&table, &dm, &mut out, h))?;
        Ok(vec![b.row("embedding", ms)])
    }
}
