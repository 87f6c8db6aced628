//! Gradients of the masked cross-entropy on a packed batch against PyTorch autograd
//! (fixtures made by `tools/make_grad_fixtures.py`), with and without recomputation.

mod common;

use common::{fixture, load, Tensors};
use protege::backend::Backend;
use protege::model::training::TrainBatch;
use protege::model::Weights;

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
            let loss: f32 =
                -logp.iter().zip(&batch.trained).filter(|(_, &m)| m).map(|(l, _)| l).sum::<f32>() / n_trained;
            assert!((loss - t.f32s("loss").0[0]).abs() < 1e-5, "{name}: loss {loss}");
            for (r, (a, b)) in logp.iter().zip(&want_logp).enumerate() {
                if batch.targets[r] != 0 || *b != 0.0 {
                    assert!((a - b).abs() < 1e-4, "{name}: logp row {r}: {a} vs {b}");
                }
            }
            let dlogp: Vec<f32> = batch.trained.iter().map(|&m| if m { -1.0 / n_trained } else { 0.0 }).collect();
            let mut grads = Weights::zeros(&be, &model.cfg);
            model.train_backward(&be, &batch, trace, &dlogp, &mut grads).unwrap();
            let mut worst = 0f32;
            for (pname, g) in grads.tensors() {
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
        let dlogp: Vec<f32> = b.trained.iter().map(|&m| if m { -1.0 / n } else { 0.0 }).collect();
        let mut grads = Weights::zeros(&be, &model.cfg);
        model.train_backward(&be, b, trace, &dlogp, &mut grads).unwrap();
        grads.tensors().into_iter().map(|(n, g)| (n, be.to_f32(g))).collect::<Vec<_>>()
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
