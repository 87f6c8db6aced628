//! The GRPO objective and its gradients on the tiny model against PyTorch autograd (fixture
//! made by `tools/make_grpo_fixtures.py`): group advantages, temperature-scaled log-probs,
//! asymmetric clipping on both sides, the KL term, and the three loss aggregations, in one
//! micro-batch and split over several.

use crate::common::{fixture, load, Tensors};
use protege::backend::Backend;
use protege::model::training::Grads;
use protege::train::grpo::{advantages, token_weights, AdvantageMode, LossAgg, PgConfig};
use protege::train::rl::{policy_gradient, PolicySeq};

/// Relative to each tensor's largest gradient (f32 against f32, different summation orders).
const RTOL: f32 = 1e-4;

#[test]
fn grpo_loss_and_gradients_match_pytorch() {
    let (be, model) = load("tiny");
    let t = Tensors::open(&fixture("tiny/grpo.safetensors"));
    let ids = t.u32s("input_ids");
    let policy = t.i64s("policy");
    let (old, _) = t.f32s("old_logp");
    let (reference, _) = t.f32s("ref_logp");
    let (want_logp, _) = t.f32s("logp");
    let temperature = t.f32s("temperature").0[0];
    let h = t.f32s("hyper").0;
    let pg = PgConfig { clip_low: h[0] as f64, clip_high: h[1] as f64, kl_beta: h[2] as f64 };
    let rewards: Vec<f64> = t.f32s("rewards").0.iter().map(|&r| r as f64).collect();
    let group = t.i64s("group");
    let groups: Vec<Vec<usize>> = (0..2).map(|g| (0..group.len()).filter(|&i| group[i] == g).collect()).collect();
    let adv = advantages(&rewards, &groups, AdvantageMode::MeanStd);
    for (a, b) in adv.iter().zip(&t.f32s("adv").0) {
        assert!((*a as f32 - b).abs() < 1e-5, "advantage {a} vs {b}");
    }
    let mut seqs = vec![];
    let mut at = 0;
    for n in t.i64s("seq_lens") {
        let n = n as usize;
        let mut s = PolicySeq::new(
            ids[at..at + n].to_vec(),
            policy[at..at + n].iter().map(|&p| p != 0).collect(),
            adv[seqs.len()],
        );
        s.old_logp = Some(old[at..at + n].to_vec());
        s.ref_logp = Some(reference[at..at + n].to_vec());
        seqs.push(s);
        at += n;
    }
    let refs: Vec<&PolicySeq> = seqs.iter().collect();
    let counts: Vec<usize> = seqs.iter().map(|s| s.policy_tokens).collect();
    let mut clipped = 0;
    for (agg, name) in [
        (LossAgg::TokenMean, "token-mean"),
        (LossAgg::SeqMeanTokenSum, "seq-mean-token-sum"),
        (LossAgg::SeqMeanTokenMean, "seq-mean-token-mean"),
    ] {
        let weights = token_weights(&counts, agg);
        // One micro-batch, then micro-batches of at most 40 tokens (gradients accumulate).
        for batch_tokens in [1 << 20, 40] {
            let mut grads = Grads::zeros_for(&be, &model);
            let st = policy_gradient(&be, &model, &refs, &weights, &pg, temperature, batch_tokens, false, &mut grads)
                .unwrap();
            let want_loss = t.f32s(&format!("loss.{name}")).0[0];
            assert!((st.loss as f32 - want_loss).abs() < 1e-5, "{name}: loss {} vs {want_loss}", st.loss);
            clipped = st.clipped_low.min(st.clipped_high);
            let mut worst = 0f32;
            let mut compared = 0;
            for ((pname, _), g) in model.trainable().into_iter().zip(grads.tensors(&model.cfg)) {
                let key = format!("grad.{name}.{pname}");
                if !t.has(&key) {
                    continue;
                }
                let (want, _) = t.f32s(&key);
                let got = be.to_f32(g);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                worst = worst.max(err);
                compared += 1;
                assert!(
                    err <= RTOL,
                    "{name} ({batch_tokens} tokens per micro-batch): {pname}: relative error {err:.2e}"
                );
            }
            assert!(compared >= 3, "{name}: only {compared} gradients compared");
            println!("{name}, {batch_tokens} tokens per micro-batch: loss {:.6}, worst relative gradient error {worst:.2e} over {compared} tensors", st.loss);
        }
    }
    assert!(clipped > 0, "the fixture should clip on both sides");
    // The temperature-scaled log-probs themselves.
    let batch = protege::model::training::TrainBatch::pack(
        &seqs.iter().map(|s| (s.ids.clone(), s.trained.clone())).collect::<Vec<_>>(),
    )
    .map(|mut b| {
        b.temperature = temperature;
        b
    })
    .unwrap();
    let (logp, _) = model.train_forward(&be, &batch, true).unwrap();
    for (r, (a, b)) in logp.iter().zip(&want_logp).enumerate() {
        if *b != 0.0 {
            assert!((a - b).abs() < 1e-4, "logp row {r}: {a} vs {b}");
        }
    }
}
