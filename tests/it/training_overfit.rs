//! The tiny model memorises a handful of chat trajectories (loss on assistant tokens only).

use std::time::Instant;

use crate::common::{fixture, load};
use protege::chat::{Message, ToolCall};
use protege::model::training::Grads;
use protege::model::training::TrainBatch;
use protege::tokenizer::Tokenizer;
use protege::train::{Decay, OptimConfig, Optimizer, Schedule};
use serde_json::json;

fn conversations() -> Vec<Vec<Message>> {
    let mut call = Message::assistant("Let me look.");
    call.tool_calls = vec![ToolCall::new("bash", json!({"command": "ls src"}))];
    vec![
        vec![
            Message::user("Fix the failing test."),
            call,
            Message::tool("main.py util.py"),
            Message::assistant("Done."),
        ],
        vec![Message::user("What is 2 + 2?"), Message::assistant("4")],
        vec![
            Message::system("Be brief."),
            Message::user("Name a sorting algorithm."),
            Message::assistant("Merge sort."),
        ],
    ]
}

#[test]
fn overfits_a_handful_of_trajectories() {
    let (be, mut model) = load("tiny");
    let tok = Tokenizer::from_dir(&fixture("tiny")).unwrap();
    let seqs: Vec<(Vec<u32>, Vec<bool>)> = conversations()
        .iter()
        .map(|c| {
            let enc = tok.apply_chat_template(c, &[], false).unwrap();
            let mask = enc.assistant_mask();
            (enc.ids, mask)
        })
        .collect();
    let batch = TrainBatch::pack(&seqs).unwrap();
    let n = batch.trained_rows() as f32;
    assert!(n > 10.0 && (n as usize) < batch.rows() / 2, "assistant tokens are a minority: {n} of {}", batch.rows());
    let dlogp = batch.nll_dlogp(n);
    let cfg = OptimConfig {
        schedule: Schedule { lr: 1e-2, warmup_steps: 5, total_steps: 200, decay: Decay::Constant, min_lr_ratio: 0.0 },
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
    };
    let mut opt = Optimizer::new(&be, model.trainable(), cfg);
    let started = Instant::now();
    let mut losses = vec![];
    for _ in 0..200 {
        let (logp, trace) = model.train_forward(&be, &batch, false).unwrap();
        let loss = batch.nll(&logp, n) as f32;
        losses.push(loss);
        if loss < 0.05 {
            break;
        }
        let mut grads = Grads::zeros_for(&be, &model);
        model.train_backward(&be, &batch, trace, &dlogp, &mut grads).unwrap();
        let cfg = model.cfg.clone();
        opt.step(&be, model.trainable_mut(), grads.tensors(&cfg)).unwrap();
    }
    let last = *losses.last().unwrap();
    println!("loss {:.3} -> {last:.4} in {} steps, {:.2}s", losses[0], losses.len(), started.elapsed().as_secs_f64());
    assert!(last < 0.05, "loss only fell to {last} (from {})", losses[0]);
}
