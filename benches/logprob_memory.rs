//! Peak memory and time of the loss step: fused chunked log-prob (forward + backward) against
//! the unfused path that materialises `[tokens, vocab]` logits.
//!
//! `cargo bench --bench logprob_memory -- [TOKENS [VOCAB [DIM]]]` (default 4096 151936 896,
//! the Qwen2.5-0.5B head). Allocations are counted by a global allocator that tracks the peak
//! of live bytes above the level at the start of each measurement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use protege::backend::cpu::CpuBackend;
use protege::backend::{Backend, TrainBackend};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result, the peak of extra live bytes during it, and seconds.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, f64) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let t = Instant::now();
    let out = f();
    let secs = t.elapsed().as_secs_f64();
    (out, PEAK.load(Relaxed) - base, secs)
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let tokens = args.first().copied().unwrap_or(4096);
    let vocab = args.get(1).copied().unwrap_or(151_936);
    let dim = args.get(2).copied().unwrap_or(896);
    let be = CpuBackend::new();
    let h: Vec<f32> = (0..tokens * dim).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
    let w: Vec<f32> = (0..vocab * dim).map(|i| ((i * 104_729 % 1000) as f32 - 500.0) * 1e-4).collect();
    let targets: Vec<u32> = (0..tokens as u32).map(|i| (i * 31) % vocab as u32).collect();
    let dlogp = vec![-1.0 / tokens as f32; tokens];
    let mut dw = vec![0f32; vocab * dim];
    let logits_bytes = tokens * vocab * 4;
    println!(
        "tokens {tokens}, vocab {vocab}, dim {dim}: full logits would be {:.1} MiB",
        logits_bytes as f64 / 1048576.0
    );

    let (fused_logp, fused_peak, fused_s) = measure(|| {
        let (mut logp, mut lse) = (be.zeros(tokens), be.zeros(tokens));
        be.token_logprobs(&h, &w, &targets, &mut logp, &mut lse, tokens, dim, vocab);
        let mut dh = be.zeros(tokens * dim);
        be.token_logprobs_bwd(
            &be.upload_f32(&dlogp),
            &h,
            &w,
            &targets,
            &lse,
            &mut dh,
            Some(&mut dw),
            tokens,
            dim,
            vocab,
        );
        logp
    });

    let (unfused_logp, unfused_peak, unfused_s) = measure(|| {
        let mut logits = be.zeros(tokens * vocab);
        be.linear(&h, &w, None, &mut logits, tokens, dim, vocab);
        be.log_softmax(&mut logits, tokens, vocab);
        let logp: Vec<f32> = targets.iter().enumerate().map(|(r, &t)| logits[r * vocab + t as usize]).collect();
        // d logits = dlogp * (onehot - softmax), then dh = dlogits @ w and dw += dlogits^T @ h.
        for (r, row) in logits.chunks_mut(vocab).enumerate() {
            row.iter_mut().for_each(|z| *z = -dlogp[r] * z.exp());
            row[targets[r] as usize] += dlogp[r];
        }
        let mut dh = be.zeros(tokens * dim);
        be.linear_bwd(&logits, &h, &w, Some(&mut dh), Some(&mut dw), None, tokens, dim, vocab);
        logp
    });

    let max_diff = fused_logp.iter().zip(&unfused_logp).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let mib = |b: usize| b as f64 / 1048576.0;
    println!("{:<10} {:>14} {:>10}", "", "peak MiB", "seconds");
    println!("{:<10} {:>14.1} {:>10.2}", "fused", mib(fused_peak), fused_s);
    println!("{:<10} {:>14.1} {:>10.2}", "unfused", mib(unfused_peak), unfused_s);
    println!(
        "fused peak = {:.4} of the logits ({:.1}x less than unfused); max |logp difference| {max_diff:.2e}",
        fused_peak as f64 / logits_bytes as f64,
        unfused_peak as f64 / fused_peak.max(1) as f64
    );
}
