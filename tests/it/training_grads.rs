//! Gradients of the masked cross-entropy on a packed batch against PyTorch autograd
//! (fixtures made by `tools/make_grad_fixtures.py`), with and without recomputation.

use crate::common::{fixture, load, Tensors};
use protege::backend::Backend;
use protege::model::training::Grads;
use protege::model::training::TrainBatch;

/// Every gradient element within this relative error (f32 against f32, different summation
/// orders), measured against the tensor's largest magnitude so tiny entries do not dominate.
const RTOL: f32 = 1e-4;

fn batch_from(t: &Tensors) -> TrainBatch {
    let ids = t.u32s("input_ids");
    let trained = t.i64s("trained");
    let mut seqs = vec![];
    let mut at = 0;
    for n in t.i64s("seq_lens") {
        let n = n as usize;
        seqs.push((ids[at..at + n].to_vec(), trained[at..at + n].iter().map(|&x| x != 0).collect()));
        at += n;
    }
    TrainBatch::pack(&seqs).unwrap()
}

#[test]
fn full_gradients_match_pytorch() {
    for name in ["tiny", "odd"] {
        let (be, model) = load(name);
        let t = Tensors::open(&fixture(&format!("{name}/grads.safetensors")));
        let batch = batch_from(&t);
        let n_trained = batch.trained_rows() as f32;
        for recompute in [false, true] {
            let (logp, trace) = model.train_forward(&be, &batch, recompute).unwrap();
            let (want_logp, _) = t.f32s("logp");
            let loss = batch.nll(&logp, n_trained) as f32;
            assert!((loss - t.f32s("loss").0[0]).abs() < 1e-5, "{name}: loss {loss}");
            for (r, (a, b)) in logp.iter().zip(&want_logp).enumerate() {
                if batch.targets[r] != 0 || *b != 0.0 {
                    assert!((a - b).abs() < 1e-4, "{name}: logp row {r}: {a} vs {b}");
                }
            }
            let dlogp = batch.nll_dlogp(n_trained);
            let mut grads = Grads::zeros_for(&be, &model);
            model.train_backward(&be, &batch, trace, &dlogp, &mut grads).unwrap();
            let mut worst = 0f32;
            for ((pname, _), g) in model.trainable().into_iter().zip(grads.tensors(&model.cfg)) {
                let (want, _) = t.f32s(&format!("grad.{pname}"));
                let got = be.to_f32(g);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                worst = worst.max(err);
                assert!(err <= RTOL, "{name} (recompute {recompute}): {pname}: relative error {err:.2e}");
            }
            println!("{name} (recompute {recompute}): worst relative gradient error {worst:.2e}");
        }
    }
}

#[test]
fn masked_targets_do_not_affect_gradients() {
    // Changing what the masked rows "predict" leaves every gradient bit-identical: only the
    // trained rows reach the loss.
    let (be, model) = load("tiny");
    let t = Tensors::open(&fixture("tiny/grads.safetensors"));
    let batch = batch_from(&t);
    let grads_of = |b: &TrainBatch| {
        let (_, trace) = model.train_forward(&be, b, false).unwrap();
        let n = b.trained_rows() as f32;
        let dlogp = b.nll_dlogp(n);
        let mut grads = Grads::zeros_for(&be, &model);
        model.train_backward(&be, b, trace, &dlogp, &mut grads).unwrap();
        grads.tensors(&model.cfg).into_iter().map(|g| be.to_f32(g)).collect::<Vec<_>>()
    };
    let mut other = batch.clone();
    let vocab = model.cfg.vocab_size as u32;
    for (target, &trained) in other.targets.iter_mut().zip(&batch.trained) {
        if !trained {
            *target = (*target + 7) % vocab;
        }
    }
    assert_ne!(other.targets, batch.targets);
    assert_eq!(grads_of(&batch), grads_of(&other));
}

#[test]
fn adamw_steps_match_torch_optim() {
    use protege::train::{Decay, OptimConfig, Optimizer, Schedule};
    for name in ["tiny", "odd"] {
        let (be, mut model) = load(name);
        let t = Tensors::open(&fixture(&format!("{name}/grads.safetensors")));
        let batch = batch_from(&t);
        let n = batch.trained_rows() as f32;
        let dlogp = batch.nll_dlogp(n);
        // The hyper-parameters of tools/make_grad_fixtures.py.
        let cfg = OptimConfig {
            schedule: Schedule { lr: 1e-2, warmup_steps: 0, total_steps: 3, decay: Decay::Constant, min_lr_ratio: 0.0 },
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-3,
            weight_decay: 0.1,
            max_grad_norm: Some(1.0),
        };
        let mut opt = Optimizer::new(&be, model.trainable(), cfg);
        let (want_losses, _) = t.f32s("adamw_loss");
        for want_loss in want_losses {
            let (logp, trace) = model.train_forward(&be, &batch, false).unwrap();
            let loss = batch.nll(&logp, n) as f32;
            assert!((loss - want_loss).abs() < 1e-4 * want_loss.abs(), "{name}: loss {loss} vs {want_loss}");
            let mut grads = Grads::zeros_for(&be, &model);
            model.train_backward(&be, &batch, trace, &dlogp, &mut grads).unwrap();
            let cfg = model.cfg.clone();
            let report = opt.step(&be, model.trainable_mut(), grads.tensors(&cfg)).unwrap();
            assert!(report.grad_norm > 1.0, "the fixture is meant to exercise clipping");
        }
        for (pname, p) in model.w.tensors() {
            let (want, _) = t.f32s(&format!("adamw.{pname}"));
            let err = be.to_f32(p).iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "{name}: {pname} after 3 AdamW steps differs by {err:.2e}");
        }
    }
}

#[test]
fn lora_gradients_match_peft() {
    use protege::model::lora::{Lora, LoraConfig, Target};
    for name in ["tiny", "odd"] {
        let (be, mut model) = load(name);
        let t = Tensors::open(&fixture(&format!("{name}/lora_grads.safetensors")));
        // tools/make_grad_fixtures.py: r 4, alpha 8, all seven modules, no dropout.
        let cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            seed: 0,
            trainable_tokens: None,
        };
        let lora = Lora::try_from_fn(&model.cfg, &cfg, |n, shape| {
            let (data, got) = t.f32s(&format!("lora.{n}"));
            assert_eq!(got, shape, "{n}");
            Ok(be.upload_f32(&data))
        })
        .unwrap();
        model.lora = Some(lora);
        let batch = batch_from(&Tensors::open(&fixture(&format!("{name}/grads.safetensors"))));
        let n = batch.trained_rows() as f32;
        let (logp, trace) = model.train_forward(&be, &batch, false).unwrap();
        let loss = batch.nll(&logp, n) as f32;
        assert!((loss - t.f32s("lora_loss").0[0]).abs() < 1e-5, "{name}: LoRA loss {loss}");
        let dlogp = batch.nll_dlogp(n);
        let mut grads = Grads::zeros_for(&be, &model);
        model.train_backward(&be, &batch, trace, &dlogp, &mut grads).unwrap();
        let mut worst = 0f32;
        for ((pname, _), g) in model.trainable().into_iter().zip(grads.tensors(&model.cfg)) {
            let (want, _) = t.f32s(&format!("lora_grad.{pname}"));
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let err = be.to_f32(g).iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            worst = worst.max(err);
            assert!(err <= RTOL, "{name}: {pname}: relative error {err:.2e}");
        }
        println!("{name}: LoRA worst relative gradient error {worst:.2e}");
    }
}

#[test]
fn lora_init_is_identity_and_merge_unmerge_round_trips() {
    use protege::generate::prompt_logits;
    use protege::model::lora::{Lora, LoraConfig, Target};
    let (be, mut model) = load("odd");
    let ids: Vec<u32> = (3..40).collect();
    let base = prompt_logits(&be, &model, &ids, None).unwrap();
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        seed: 3,
        trainable_tokens: None,
    };
    model.lora = Some(Lora::init(&be, &model.cfg, &cfg).unwrap());
    // PEFT initialisation: B = 0, so the adapted model equals the base.
    assert_eq!(prompt_logits(&be, &model, &ids, None).unwrap(), base);
    // Non-zero adapters (the PEFT fixture's), then merge: same logits without adapters.
    let t = Tensors::open(&fixture("odd/lora_grads.safetensors"));
    model.lora =
        Some(Lora::try_from_fn(&model.cfg, &cfg, |n, _| Ok(be.upload_f32(&t.f32s(&format!("lora.{n}")).0))).unwrap());
    let adapted = prompt_logits(&be, &model, &ids, None).unwrap();
    assert!(crate::common::max_abs_diff(&adapted, &base) > 1e-2, "the adapters should change the logits");
    let lora = model.merge_lora_keep(&be).unwrap();
    let merged = prompt_logits(&be, &model, &ids, None).unwrap();
    assert!(
        crate::common::max_abs_diff(&merged, &adapted) < 1e-4,
        "merged differs by {}",
        crate::common::max_abs_diff(&merged, &adapted)
    );
    model.unmerge_lora(&be, lora).unwrap();
    assert!(crate::common::max_abs_diff(&prompt_logits(&be, &model, &ids, None).unwrap(), &adapted) < 1e-4);
    model.lora.take();
    assert!(
        crate::common::max_abs_diff(&prompt_logits(&be, &model, &ids, None).unwrap(), &base) < 1e-4,
        "unmerge restores the base"
    );
    // A configuration the model cannot honour is an error, not a silent no-op.
    let bad = LoraConfig { dropout: 1.0, ..cfg.clone() };
    assert!(Lora::init(&be, &model.cfg, &bad).is_err());
    assert!(Lora::init(&be, &model.cfg, &LoraConfig { targets: vec![], ..cfg }).is_err());
}

/// LoRA dropout: with a batch seed the adapters see a masked input (different loss), the
/// gradients are those of that masked function (central finite differences), and without a seed
/// (evaluation) the model is the undropped one.
#[test]
fn lora_dropout_gradients_match_finite_differences() {
    use protege::model::lora::{Lora, LoraConfig, Target};
    let (be, mut model) = load("odd");
    let t = Tensors::open(&fixture("odd/lora_grads.safetensors"));
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.3,
        targets: Target::ALL.to_vec(),
        seed: 0,
        trainable_tokens: None,
    };
    model.lora =
        Some(Lora::try_from_fn(&model.cfg, &cfg, |n, _| Ok(be.upload_f32(&t.f32s(&format!("lora.{n}")).0))).unwrap());
    let mut batch = batch_from(&Tensors::open(&fixture("odd/grads.safetensors")));
    let n = batch.trained_rows() as f32;
    let loss = |model: &protege::model::Qwen2<_>, batch: &TrainBatch| {
        let (logp, _) = model.train_forward(&be, batch, false).unwrap();
        batch.nll(&logp, n)
    };
    let undropped = loss(&model, &batch);
    batch.dropout_seed = Some(11);
    let dropped = loss(&model, &batch);
    assert!((dropped - undropped).abs() > 1e-4, "dropout should change the loss: {dropped} vs {undropped}");
    assert_eq!(loss(&model, &batch), dropped, "the masks are a function of the seed");

    for recompute in [false, true] {
        let (logp, trace) = model.train_forward(&be, &batch, recompute).unwrap();
        assert_eq!(batch.nll(&logp, n), dropped);
        let mut grads = Grads::zeros_for(&be, &model);
        model.train_backward(&be, &batch, trace, &batch.nll_dlogp(n), &mut grads).unwrap();
        let grads: Vec<Vec<f32>> = grads.tensors(&model.cfg).into_iter().map(|g| be.to_f32(g)).collect();
        // Check the largest entries of a few tensors (A and B of an early and a late module).
        for ti in [0, 1, grads.len() - 2, grads.len() - 1] {
            let g = &grads[ti];
            let i = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
            let eps = 1e-2f32;
            let original = be.to_f32(model.trainable_tensors()[ti]);
            let set = |d: f32, model: &mut protege::model::Qwen2<_>| {
                let mut host = original.clone();
                host[i] += d;
                *model.trainable_mut()[ti] = be.upload_f32(&host);
            };
            set(eps, &mut model);
            let up = loss(&model, &batch);
            set(-eps, &mut model);
            let down = loss(&model, &batch);
            set(0.0, &mut model);
            let fd = ((up - down) / (2.0 * eps as f64)) as f32;
            let err = (fd - g[i]).abs() / g[i].abs();
            assert!(err < 2e-2, "tensor {ti} entry {i}: analytic {} vs finite difference {fd}", g[i]);
        }
    }
}
