//! The optimiser (kernels/optimizer.cu): the global gradient norm over many tensors and the
//! multi-tensor AdamW, whose f32 master weights (where the backend keeps them) round to the
//! bf16 parameters.

use super::{Bench, BenchShape, Ctx, OpFamily, TOL_ONE_ROUNDING};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, CudaBuf};
use crate::backend::{AdamW, AdamWTensor, Backend, TrainBackend};
use crate::diagnostics::bench_gpu::{host_uniform, median_ms, Row};
use crate::diagnostics::selftest::norm_err;
use crate::model::config::Qwen2Config;
use crate::model::lora::Target;

/// The global gradient norm: a sum of squares of f32 gradients, in f64 on the host from f32
/// partial sums on the device; only summation order differs: relative 1e-5.
pub const TOL_GRAD_NORM: f64 = 1e-5;
/// AdamW's update (parameter minus start after 3 steps) with f32 state on both sides: the
/// same f32 expression in another order, relative to the update's size: 1e-4.
pub const TOL_ADAMW: f64 = 1e-4;
/// The device's bf16 parameter is the rounding of its f32 master: [`TOL_ONE_ROUNDING`].
pub const TOL_BF16_PARAMS: f64 = TOL_ONE_ROUNDING;

/// AdamW hyper-parameters of every optimiser row (as `protege bench --sft` and
/// tools/bench_sft_torch.py).
const BENCH_ADAMW: AdamW = AdamW { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };

pub struct Optimizer;

impl OpFamily for Optimizer {
    const NAME: &'static str = "optimizer";
    const SEED: u64 = 65;
    const TRAIN_SEED: u64 = 31;
    type Case = ();
    /// The sizes of the tensors one optimiser step updates.
    type TrainCase = Vec<usize>;

    fn train_cases(&self) -> Vec<Vec<usize>> {
        vec![vec![3, 65_536, 70_001, 1]]
    }

    /// The global gradient norm and three multi-tensor AdamW steps (decay on and off,
    /// clipping).
    fn check_train<B: TrainBackend>(&self, t: &mut Ctx<'_, B>, sizes: &Vec<usize>) {
        let (dev, cpu) = (t.dev, t.cpu);
        let params: Vec<Vec<f32>> = sizes.iter().map(|&n| t.random(n, 1.0)).collect();
        let mut dp: Vec<B::Buf> = params.iter().map(|p| dev.upload_f32(p)).collect();
        let mut cp: Vec<Vec<f32>> = params.clone();
        let mut dmaster: Vec<B::Buf> = params.iter().map(|p| dev.upload_f32_full(p)).collect();
        let mut dm: Vec<B::Buf> = sizes.iter().map(|&n| dev.zeros_f32(n)).collect();
        let mut dv: Vec<B::Buf> = sizes.iter().map(|&n| dev.zeros_f32(n)).collect();
        let mut cm: Vec<Vec<f32>> = sizes.iter().map(|&n| cpu.zeros_f32(n)).collect();
        let mut cv: Vec<Vec<f32>> = sizes.iter().map(|&n| cpu.zeros_f32(n)).collect();
        let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let (mut norm_err_max, mut update_err) = (0f64, 0f64);
        for step in 1..=3u64 {
            let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| t.random(n, 0.1)).collect();
            let dg: Vec<B::Buf> = grads.iter().map(|g| dev.upload_f32_full(g)).collect();
            let cg: Vec<Vec<f32>> = grads.clone();
            let dsq = dev.sum_squares_all(&dg.iter().zip(sizes.iter().copied()).collect::<Vec<_>>());
            let csq = cpu.sum_squares_all(&cg.iter().zip(sizes.iter().copied()).collect::<Vec<_>>());
            norm_err_max = norm_err_max.max((dsq - csq).abs() / csq);
            let grad_scale = if step == 2 { 0.5 } else { 1.0 };
            let mut dt: Vec<AdamWTensor<B>> = dp
                .iter_mut()
                .zip(dmaster.iter_mut())
                .zip(dg.iter())
                .zip(dm.iter_mut().zip(dv.iter_mut()))
                .enumerate()
                .map(|(i, (((param, master), grad), (m, v)))| AdamWTensor {
                    param,
                    master: dev.master_weights().then_some(master),
                    grad,
                    m,
                    v,
                    n: sizes[i],
                    decay: i % 2 == 1,
                })
                .collect();
            dev.adamw(&mut dt, &hp, grad_scale, step);
            let mut ct: Vec<AdamWTensor<CpuBackend>> = cp
                .iter_mut()
                .zip(cg.iter())
                .zip(cm.iter_mut().zip(cv.iter_mut()))
                .enumerate()
                .map(|(i, ((param, grad), (m, v)))| AdamWTensor {
                    param,
                    master: None,
                    grad,
                    m,
                    v,
                    n: sizes[i],
                    decay: i % 2 == 1,
                })
                .collect();
            cpu.adamw(&mut ct, &hp, grad_scale, step);
        }
        for (i, n) in sizes.iter().enumerate() {
            // Compare the updates (param - start): the step is small against the parameter.
            let d: Vec<f32> = dev
                .to_f32(master_or_param(dev, &dmaster[i], &dp[i]))
                .iter()
                .zip(&params[i])
                .map(|(a, b)| a - b)
                .collect();
            let c: Vec<f32> = cp[i].iter().zip(&params[i]).map(|(a, b)| a - b).collect();
            update_err = update_err.max(norm_err(&d, &c, *n));
        }
        let k = sizes.len();
        t.add("optimizer", format!("global gradient norm, {k} tensors"), norm_err_max, TOL_GRAD_NORM);
        t.add("optimizer", "adamw 3 steps (decay, clipping), f32 state".into(), update_err, TOL_ADAMW);
        let bf: f64 = (0..k).map(|i| t.err(&dp[i], &cp[i], sizes[i])).fold(0.0, f64::max);
        t.add("optimizer", "adamw bf16 parameters".into(), bf, TOL_BF16_PARAMS);
    }

    fn bench_shapes(&self, cfg: &Qwen2Config) -> Vec<BenchShape> {
        adamw_benches(cfg)
            .into_iter()
            .map(|(name, shapes, what)| {
                let numel: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
                // Reads master, grad, m, v (f32); writes master, m, v (f32) and the bf16
                // parameter.
                let bytes = 30.0 * numel as f64;
                BenchShape::new(
                    name,
                    format!("{} tensors, {:.1}M values", shapes.len(), numel as f64 / 1e6),
                    None,
                    Some(bytes),
                    &format!("{what}; bf16 params + f32 master/grad/moments (30 B/value)"),
                )
                .train()
            })
            .collect()
    }

    /// Multi-tensor AdamW with f32 masters over each of [`adamw_benches`].
    fn bench_train(&self, b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
        let be = b.be;
        let mut rows = vec![];
        for (name, shapes, _) in adamw_benches(b.cfg) {
            let _r = be.range(&format!("bench {name}"));
            let numel: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
            let largest = numel.iter().copied().max().unwrap_or(1);
            let src = be.upload_f32_full(&host_uniform(largest, 1e-3, 70));
            let f32_like = |i: usize| {
                let mut b = be.zeros_f32(numel[i]);
                be.copy(&src, &mut b, numel[i]);
                b
            };
            let mut params: Vec<CudaBuf> =
                numel.iter().enumerate().map(|(i, &n)| be.random(n, 0.02, 80 + i as u64)).collect();
            let mut master: Vec<CudaBuf> = (0..numel.len()).map(f32_like).collect();
            let grads: Vec<CudaBuf> = (0..numel.len()).map(f32_like).collect();
            let mut m: Vec<CudaBuf> = numel.iter().map(|&n| be.zeros_f32(n)).collect();
            let mut v: Vec<CudaBuf> = numel.iter().map(|&n| be.zeros_f32(n)).collect();
            drop(src);
            let mut step = 0u64;
            let ms = median_ms(be, 1, b.iters, || {
                step += 1;
                let mut tensors: Vec<AdamWTensor<CudaBackend>> = params
                    .iter_mut()
                    .zip(master.iter_mut())
                    .zip(grads.iter())
                    .zip(m.iter_mut().zip(v.iter_mut()))
                    .enumerate()
                    .map(|(i, (((param, master), grad), (m, v)))| AdamWTensor {
                        param,
                        master: Some(master),
                        grad,
                        m,
                        v,
                        n: numel[i],
                        decay: shapes[i].len() >= 2,
                    })
                    .collect();
                be.adamw(&mut tensors, &BENCH_ADAMW, 1.0, step);
            })?;
            rows.push(b.row(name, ms));
        }
        Ok(rows)
    }
}

/// The master copy where the backend keeps one, else the parameter itself.
fn master_or_param<'a, B: TrainBackend>(dev: &B, master: &'a B::Buf, param: &'a B::Buf) -> &'a B::Buf {
    if dev.master_weights() {
        master
    } else {
        param
    }
}

/// The optimiser benchmarks: (row, tensor shapes, what they are). The adapters of a rank-16
/// LoRA on all modules of the 7B, and the weights of 4 of its layers (0.93B values).
fn adamw_benches(cfg: &Qwen2Config) -> [(&'static str, Vec<Vec<usize>>, &'static str); 2] {
    [
        ("adamw_lora_7b", lora_adapter_shapes(cfg, 16), "rank-16 LoRA, 7 modules x 28 layers"),
        ("adamw_1b", layer_weight_shapes(cfg, 4), "the weights of 4 layers of the 7B"),
    ]
}

/// The adapter shapes of a rank-`rank` LoRA on all seven modules of every layer, in
/// [`crate::model::lora::Lora::tensors`] order: `A [rank, in]`, `B [out, rank]`
/// (tools/bench_gpu_torch.py `lora_shapes` lists the same).
fn lora_adapter_shapes(cfg: &Qwen2Config, rank: usize) -> Vec<Vec<usize>> {
    (0..cfg.num_layers)
        .flat_map(move |_| {
            Target::ALL.into_iter().flat_map(move |t| {
                let (i, o) = t.dims(cfg);
                [vec![rank, i], vec![o, rank]]
            })
        })
        .collect()
}

/// Every weight of the first `layers` layers (tools/bench_gpu_torch.py `layer_shapes`).
fn layer_weight_shapes(cfg: &Qwen2Config, layers: usize) -> Vec<Vec<usize>> {
    let in_layers = |name: &str| {
        name.strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok())
            .is_some_and(|l| l < layers)
    };
    crate::model::param_shapes(cfg).into_iter().filter(|(n, _)| in_layers(n)).map(|(_, s)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::bench_gpu::QWEN25_7B;

    fn numel(shapes: &[Vec<usize>]) -> usize {
        shapes.iter().map(|s| s.iter().product::<usize>()).sum()
    }

    #[test]
    fn optimiser_shapes_match_the_pytorch_side() {
        // tools/bench_gpu_torch.py builds the same lists: 392 adapters of 40.4M values, and the
        // 48 tensors of 4 layers (0.93B values).
        let c = Qwen2Config::from_json(QWEN25_7B).unwrap();
        let lora = lora_adapter_shapes(&c, 16);
        assert_eq!((lora.len(), numel(&lora)), (392, 40_370_176));
        assert_eq!(lora[0], vec![16, 3584]);
        assert_eq!(lora[13], vec![3584, 16]);
        let big = layer_weight_shapes(&c, 4);
        assert_eq!(big.len(), 48);
        assert_eq!(numel(&big), 4 * (c.num_params() - 2 * c.vocab_size * c.hidden_size - c.hidden_size) / 28);
        assert_eq!(big[1], vec![3584, 3584]);
    }
}
