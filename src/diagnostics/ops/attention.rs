//! Attention: the paged KV cache store (kernels/kv_cache.cu), attention over the paged cache
//! (prefill, chunked prefill and decode rows in one step: kernels/flash_attn.cu,
//! decode_attn.cu, attention_generic.cu), and the training attention forward with its
//! log-sum-exp and backward (flash_attn_train.cu, attention_train_generic.cu).
//!
//! The checks are named by the driver's label, the device path under test ("fast": the
//! tensor-core kernels where the head dim allows; "generic": the generic kernels).

use rand::{Rng, SeedableRng};

use super::{bench_step, packed, Bench, BenchShape, Ctx, OpFamily, BENCH_TOKENS, TOL_ATTENTION, TOL_F32};
use crate::backend::{cache_slot, Backend, SeqSlice, StepMeta, TrainBackend};
use crate::diagnostics::bench_gpu::{median_ms, time_ms, Row};
use crate::model::config::Qwen2Config;
use crate::model::training::TrainBatch;

/// The store copies bf16 rows into their cache slots: exact.
pub const TOL_KV_STORE: f64 = 0.0;
/// Probabilities rounded to bf16 before the P·V product, output rounded: [`TOL_ATTENTION`];
/// the training forward's out likewise.
pub const TOL: f64 = TOL_ATTENTION;
/// The training forward's log-sum-exp is f32 throughout: [`TOL_F32`].
pub const TOL_LSE: f64 = TOL_F32;
/// The backward: `dS = P (dP - D)` is rounded to bf16 before the dQ/dK products and `dP - D`
/// cancels (a lane-level emulation of the kernels measured at most 7e-3): 3e-2.
pub const TOL_GRAD: f64 = 3e-2;

/// One sequence of an attention case: `n_new` new rows after `n_ctx - n_new` cached ones.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpec {
    pub n_new: usize,
    pub n_ctx: usize,
}

/// A packed step over a paged cache with shuffled blocks.
pub fn paged_meta(seqs: &[SeqSpec], block_size: usize, rng: &mut impl Rng) -> (StepMeta, usize) {
    let total_blocks: usize = seqs.iter().map(|s| s.n_ctx.div_ceil(block_size)).sum();
    let mut pool: Vec<u32> = (0..total_blocks as u32).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, rng.gen_range(0..=i));
    }
    let mut meta = StepMeta { block_size, ..Default::default() };
    let mut next = 0;
    for s in seqs {
        let nb = s.n_ctx.div_ceil(block_size);
        let table = pool[next..next + nb].to_vec();
        next += nb;
        let row_start = meta.tokens.len();
        for i in 0..s.n_new {
            let pos = s.n_ctx - s.n_new + i;
            meta.tokens.push(0);
            meta.positions.push(pos as u32);
            meta.slots.push(cache_slot(&table, pos, block_size));
        }
        meta.seqs.push(SeqSlice { row_start, n_new: s.n_new, n_ctx: s.n_ctx, block_table: table });
    }
    (meta, total_blocks * block_size)
}

/// The head shapes of every case: (heads, kv heads, head dim). Odd ones (10) and GQA ratios of
/// 1 to 7, and the tensor-core kernels' head dims (64, 128).
const HEADS: [(usize, usize, usize); 6] = [(4, 2, 16), (9, 3, 10), (8, 8, 64), (14, 2, 64), (28, 4, 128), (12, 2, 128)];

/// The attention cases of the sweep: (heads, kv heads, head dim, sequences).
pub fn attention_cases() -> Vec<(usize, usize, usize, Vec<SeqSpec>)> {
    let s = |n_new, n_ctx| SeqSpec { n_new, n_ctx };
    let mut cases = vec![];
    for (heads, kv, hd) in HEADS {
        // Prefill of mixed lengths (not multiples of the 64-row tile), chunked prefill over an
        // existing cache, and decode rows of several context lengths, all in one step.
        cases.push((heads, kv, hd, vec![s(1, 1), s(37, 37), s(64, 64), s(130, 130)]));
        cases.push((heads, kv, hd, vec![s(50, 300), s(1, 63), s(1, 1000), s(1, 5), s(65, 65)]));
        cases.push((heads, kv, hd, vec![s(1, 2049), s(1, 17), s(1, 700)]));
    }
    cases
}

pub struct Attention;

impl OpFamily for Attention {
    const NAME: &'static str = "attention";
    const SEED: u64 = 11;
    const TRAIN_SEED: u64 = 23;
    type Case = (usize, usize, usize, Vec<SeqSpec>);
    /// (heads, kv heads, head dim, packed sequence lengths).
    type TrainCase = (usize, usize, usize, Vec<usize>);

    fn cases(&self) -> Vec<Self::Case> {
        attention_cases()
    }

    fn train_cases(&self) -> Vec<Self::TrainCase> {
        HEADS
            .into_iter()
            .flat_map(|(h, kv, d)| [vec![1usize, 37, 64, 130], vec![65, 1, 5, 200]].map(|l| (h, kv, d, l)))
            .collect()
    }

    /// kv_store then attention over the paged cache.
    fn check<B: Backend>(&self, t: &mut Ctx<'_, B>, (heads, kv, hd, seqs): &Self::Case) {
        let (dev, cpu, label) = (t.dev, t.cpu, t.label);
        let (heads, kv, hd) = (*heads, *kv, *hd);
        let (meta, slots) = paged_meta(seqs, 16, &mut t.rng);
        let rows = meta.rows();
        let (qd, kvd) = (heads * hd, kv * hd);
        // A random cache (the positions this step writes are overwritten by kv_store).
        let kc = t.random(slots * kvd, 1.5);
        let vc = t.random(slots * kvd, 1.5);
        let q = t.random(rows * qd, 1.5);
        let k = t.random(rows * kvd, 1.5);
        let v = t.random(rows * kvd, 1.5);
        let (dm, cm) = (dev.prepare(&meta), cpu.prepare(&meta));
        let (mut dkc, mut ckc) = t.both(&kc);
        let (mut dvc, mut cvc) = t.both(&vc);
        let ((dk, ck), (dv, cv)) = (t.both(&k), t.both(&v));
        dev.kv_store(&dk, &dv, &mut dkc, &mut dvc, &dm, kvd);
        cpu.kv_store(&ck, &cv, &mut ckc, &mut cvc, &cm, kvd);
        let shape = format!(
            "{label} h={heads} kv={kv} d={hd} seqs={}",
            seqs.iter().map(|s| format!("{}/{}", s.n_new, s.n_ctx)).collect::<Vec<_>>().join(",")
        );
        let e = t.err(&dkc, &ckc, slots * kvd).max(t.err(&dvc, &cvc, slots * kvd));
        t.add("kv_store", shape.clone(), e, TOL_KV_STORE);
        let (dq, cq) = t.both(&q);
        let (mut dout, mut cout) = (dev.zeros(rows * qd), cpu.zeros(rows * qd));
        dev.attention(&dq, &dkc, &dvc, &mut dout, &dm, heads, kv, hd);
        cpu.attention(&cq, &ckc, &cvc, &mut cout, &cm, heads, kv, hd);
        t.add("attention", shape, t.err(&dout, &cout, rows * qd), TOL);
    }

    /// The training forward (out and log-sum-exp) and backward over a packed batch.
    fn check_train<B: TrainBackend>(&self, t: &mut Ctx<'_, B>, (heads, kv, hd, lengths): &Self::TrainCase) {
        let (dev, cpu, label) = (t.dev, t.cpu, t.label);
        let (heads, kv, hd) = (*heads, *kv, *hd);
        let meta = packed(lengths, 100, &mut t.rng);
        let rows = meta.rows();
        let (qd, kvd) = (heads * hd, kv * hd);
        let (dm, cm) = (dev.prepare(&meta), cpu.prepare(&meta));
        let (q, k, v, g) =
            (t.random(rows * qd, 1.5), t.random(rows * kvd, 1.5), t.random(rows * kvd, 1.5), t.random(rows * qd, 1.0));
        let ((dq, cq), (dk, ck), (dv, cv), (dg, cg)) = (t.both(&q), t.both(&k), t.both(&v), t.both(&g));
        let (mut dout, mut cout) = (dev.zeros(rows * qd), cpu.zeros(rows * qd));
        let (mut dlse, mut clse) = (dev.zeros_f32(rows * heads), cpu.zeros_f32(rows * heads));
        dev.attention_train(&dq, &dk, &dv, &mut dout, &mut dlse, &dm, heads, kv, hd);
        cpu.attention_train(&cq, &ck, &cv, &mut cout, &mut clse, &cm, heads, kv, hd);
        let shape = format!(
            "{label} h={heads} kv={kv} d={hd} seqs={}",
            lengths.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
        );
        t.add("attn train", format!("fwd out {shape}"), t.err(&dout, &cout, rows * qd), TOL);
        t.add("attn train", format!("fwd lse {shape}"), t.err(&dlse, &clse, rows * heads), TOL_LSE);
        // The backward reads the forward's own output (as in training); the CPU gets the
        // device's rounding of it so that both differentiate the same function values.
        let out_host = dev.to_f32(&dout);
        let cout = cpu.upload_f32(&out_host);
        let (mut ddq, mut cdq) = (dev.zeros(rows * qd), cpu.zeros(rows * qd));
        let (mut ddk, mut cdk) = (dev.zeros(rows * kvd), cpu.zeros(rows * kvd));
        let (mut ddv, mut cdv) = (dev.zeros(rows * kvd), cpu.zeros(rows * kvd));
        dev.attention_train_bwd(&dq, &dk, &dv, &dout, &dlse, &dg, &mut ddq, &mut ddk, &mut ddv, &dm, heads, kv, hd);
        cpu.attention_train_bwd(&cq, &ck, &cv, &cout, &clse, &cg, &mut cdq, &mut cdk, &mut cdv, &cm, heads, kv, hd);
        let e = [t.err(&ddq, &cdq, rows * qd), t.err(&ddk, &cdk, rows * kvd), t.err(&ddv, &cdv, rows * kvd)];
        let note = format!("dq {:.1e} dk {:.1e} dv {:.1e}", e[0], e[1], e[2]);
        t.add_note("attn train", format!("bwd {shape}"), e[0].max(e[1]).max(e[2]), TOL_GRAD, note);
    }

    fn bench_shapes(&self, cfg: &Qwen2Config) -> Vec<BenchShape> {
        let (t, kvd, hd) = (BENCH_TOKENS, cfg.kv_dim(), cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
        // Per sequence and head, full attention is 4·T²·d FLOPs (QK^T and PV); causal, half.
        let flash_flops = 4.0 * heads as f64 * 2.0 * (4096f64 * 4096.0) * hd as f64;
        // Decode reads the K and V cache of every sequence once (bf16).
        let decode_bytes = 2.0 * 2.0 * (64 * 4096 * kvd) as f64;
        // Training: per sequence and head, causal attention is 2·T²·d FLOPs forward (QK^T and
        // PV, half of 4·T²·d); the backward is 2.5x (recomputed S, dP, dV, dQ, dK:
        // FlashAttention-2's count).
        let (n_seq, s) = (4usize, 4096usize);
        let train_flops = n_seq as f64 * heads as f64 * 2.0 * (s as f64).powi(2) * hd as f64;
        let train_shape = format!("{n_seq}x{s} packed, {heads}q/{kv_heads}kv heads x {hd}, causal");
        vec![
            // Reads k and v rows, writes them into the caches (bf16).
            BenchShape::new("kv_store", format!("{t}x{kvd}"), None, Some(8.0 * (t * kvd) as f64), ""),
            BenchShape::new(
                "flash_attention",
                format!("4x4096, {heads}q/{kv_heads}kv heads x {hd}, causal"),
                Some(flash_flops),
                None,
                "paged cache",
            ),
            BenchShape::new(
                "decode_attention",
                format!("64 x ctx 4096, {heads}q/{kv_heads}kv heads x {hd}"),
                None,
                Some(decode_bytes),
                "one layer",
            ),
            BenchShape::new("attention_train_fwd", train_shape.clone(), Some(train_flops), None, "with log-sum-exp")
                .train(),
            BenchShape::new(
                "attention_train_bwd",
                train_shape,
                Some(2.5 * train_flops),
                None,
                "goal >= 1.0x SDPA backward; FLOPs 2.5x forward (incl. recompute)",
            )
            .train(),
        ]
    }

    /// kv_store over the kernel benchmarks' step; flash attention over 4 x 4096 (causal, the
    /// 7B's heads); decode attention of 64 sequences with 4096 tokens of context, one new row
    /// each.
    fn bench(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, cfg, it, t) = (b.be, b.cfg, b.iters, BENCH_TOKENS);
        let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let mut rows = vec![];
        let dm = be.prepare(&bench_step(cfg, t));
        let (k, v) = (be.random(t * kvd, 1.0, 18), be.random(t * kvd, 1.0, 19));
        let (mut kc, mut vc) = (be.zeros(t * kvd), be.zeros(t * kvd));
        let ms = time_ms(be, it, || be.kv_store(&k, &v, &mut kc, &mut vc, &dm, kvd))?;
        rows.push(b.row("kv_store", ms));
        drop((k, v, kc, vc));

        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let seqs = vec![SeqSpec { n_new: 4096, n_ctx: 4096 }; 4];
        let (meta, slots) = paged_meta(&seqs, 16, &mut rng);
        let dm = be.prepare(&meta);
        let rows_n = meta.rows();
        let (q, kc, vc) =
            (be.random(rows_n * qd, 1.0, 20), be.random(slots * kvd, 1.0, 21), be.random(slots * kvd, 1.0, 22));
        let mut o = be.zeros(rows_n * qd);
        let ms = time_ms(be, it, || be.attention(&q, &kc, &vc, &mut o, &dm, cfg.num_heads, cfg.num_kv_heads, hd))?;
        rows.push(b.row("flash_attention", ms));
        drop((q, kc, vc, o));

        let seqs = vec![SeqSpec { n_new: 1, n_ctx: 4096 }; 64];
        let (meta, slots) = paged_meta(&seqs, 16, &mut rng);
        let dm = be.prepare(&meta);
        let (q, kc, vc) =
            (be.random(64 * qd, 1.0, 23), be.random(slots * kvd, 1.0, 24), be.random(slots * kvd, 1.0, 25));
        let mut o = be.zeros(64 * qd);
        let ms = time_ms(be, it, || be.attention(&q, &kc, &vc, &mut o, &dm, cfg.num_heads, cfg.num_kv_heads, hd))?;
        rows.push(b.row("decode_attention", ms));
        Ok(rows)
    }

    /// Flash attention for training: 4 packed sequences of 4096, causal, the 7B's heads.
    fn bench_train(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let (be, cfg, it) = (b.be, b.cfg, b.iters);
        let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
        let _r = be.range("bench attention_train");
        let (n_seq, s) = (4usize, 4096usize);
        let seqs: Vec<(Vec<u32>, Vec<bool>)> = (0..n_seq).map(|_| (vec![1u32; s], vec![true; s])).collect();
        let meta = TrainBatch::pack(&seqs)?.meta;
        let dm = be.prepare(&meta);
        let n = n_seq * s;
        let (q, k, v) = (be.random(n * qd, 1.0, 40), be.random(n * kvd, 1.0, 41), be.random(n * kvd, 1.0, 42));
        let dout = be.random(n * qd, 1.0, 43);
        let mut out = be.zeros(n * qd);
        let mut lse = be.zeros_f32(n * heads);
        let fwd_ms = median_ms(be, 1, it, || {
            be.attention_train(&q, &k, &v, &mut out, &mut lse, &dm, heads, kv_heads, hd);
        })?;
        let mut rows = vec![b.row("attention_train_fwd", fwd_ms)];
        let (mut dq, mut dk, mut dv) = (be.zeros(n * qd), be.zeros(n * kvd), be.zeros(n * kvd));
        let bwd_ms = median_ms(be, 1, it, || {
            be.attention_train_bwd(&q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv, &dm, heads, kv_heads, hd);
        })?;
        rows.push(b.row("attention_train_bwd", bwd_ms));
        Ok(rows)
    }
}
