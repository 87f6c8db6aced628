//! Data-parallel SFT for real, on the CPU: `protege launch --gpus 2 -- sft` (two processes,
//! gradients summed over TCP, optimiser state sharded ZeRO-1) must train exactly as one process
//! that accumulates the same micro-batches (grad_accum doubled): the same losses, gradient norms
//! and final adapter, bit for bit (full fine-tuning: to f32 rounding); resuming from the sharded checkpoint continues exactly as an
//! unsharded resume does; a resume with another number of ranks is refused clearly.

use std::path::Path;
use std::process::Command;

use crate::common::fixture;
use protege::agent::trajectory::{write_jsonl, Trajectory};
use protege::chat::{Message, ToolCall};
use serde_json::{json, Value};

fn trajectories() -> Vec<Trajectory> {
    (0..12)
        .map(|i| {
            let mut call = Message::assistant(format!("Looking at module {i}."));
            call.tool_calls = vec![ToolCall::new("bash", json!({"command": format!("grep -n bug m{i}.py")}))];
            Trajectory {
                task_id: format!("task-{i}"),
                resolved: Some(true),
                expert_calls: 0,
                messages: vec![
                    Message::user(format!("Fix issue {i} in m{i}.py.")),
                    call,
                    Message::tool(format!("{i}: x = {i} + 1")),
                    Message::assistant(format!("Changed line {i}.")),
                ],
                tools: vec![],
                tokens: None,
                meta: Default::default(),
            }
        })
        .collect()
}

fn write_config(dir: &Path, grad_accum: usize, steps: u64, lora: bool) -> std::path::PathBuf {
    write_jsonl(&dir.join("train.jsonl"), &trajectories()).unwrap();
    let lora =
        if lora { "[lora]\nrank = 4\nalpha = 8.0\ndropout = 0.1\ntargets = [\"q\", \"v\", \"down\"]\n" } else { "" };
    let text = format!(
        r#"[model]
path = "{}"
[data]
train = ["train.jsonl"]
eval_fraction = 0.0
max_seq_len = 256
batch_tokens = 160
[train]
steps = {steps}
grad_accum = {grad_accum}
seed = 5
checkpoint_every = 2
[optim]
lr = 0.01
warmup_steps = 1
decay = "cosine"
min_lr_ratio = 0.1
beta1 = 0.9
beta2 = 0.99
eps = 1e-8
weight_decay = 0.01
max_grad_norm = 1.0
{lora}[output]
run_dir = "run"
"#,
        fixture("tiny").display()
    );
    let path = dir.join("sft.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn protege(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_protege")).args(args).current_dir(dir).output().unwrap()
}

/// (step, loss, grad_norm, tokens, lr) of every metrics line.
fn curve(run: &Path) -> Vec<(u64, f64, f64, u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
                v["tokens"].as_u64().unwrap(),
                v["lr"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_ranks_train_exactly_as_one_process_with_twice_the_accumulation() {
    for lora in [true, false] {
        let single = tempfile::tempdir().unwrap();
        let cfg = write_config(single.path(), 2, 4, lora);
        let out = protege(single.path(), &["sft", "--config", cfg.to_str().unwrap(), "--device", "cpu"]);
        ok(&out, "single sft");
        // Not on a terminal (a batch job's log): one plain line per step.
        let err = String::from_utf8_lossy(&out.stderr);
        for step in 1..=4 {
            assert!(err.contains(&format!("sft: step {step}/4: loss ")), "{err}");
        }

        let dp = tempfile::tempdir().unwrap();
        let cfg = write_config(dp.path(), 1, 4, lora);
        let out = protege(
            dp.path(),
            &["launch", "--gpus", "2", "--", "sft", "--config", cfg.to_str().unwrap(), "--device", "cpu"],
        );
        ok(&out, "launch --gpus 2 sft");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("rank 1 of 2"), "{err}");

        let (a, b) = (curve(&single.path().join("run")), curve(&dp.path().join("run")));
        assert_eq!(a.len(), 4);
        if lora {
            assert_eq!(a, b, "two ranks must reproduce the single process bit for bit");
        } else {
            // Full fine-tuning accumulates norm gradients row by row onto what the earlier
            // micro-batch left (one process) or onto zero (each rank), so the additions happen in
            // another order: equal to f32 rounding, not bit for bit.
            for (x, y) in a.iter().zip(&b) {
                assert_eq!((x.0, x.3, x.4), (y.0, y.3, y.4));
                assert!((x.1 - y.1).abs() <= 1e-5 * x.1.abs(), "loss {} vs {}", x.1, y.1);
                assert!((x.2 - y.2).abs() <= 1e-5 * x.2.abs(), "grad norm {} vs {}", x.2, y.2);
            }
        }
        // The checkpoint holds one optimiser shard per rank.
        let ck = dp.path().join("run/checkpoints/step-4");
        for r in 0..2 {
            assert!(ck.join(format!("optimizer.rank{r}-of-2.safetensors")).is_file());
        }
        if lora {
            let export = "run/adapter/adapter_model.safetensors";
            assert_eq!(
                std::fs::read(single.path().join(export)).unwrap(),
                std::fs::read(dp.path().join(export)).unwrap(),
                "the exported adapters differ"
            );
        }
    }
}

#[test]
fn a_sharded_run_resumes_as_an_unsharded_one_and_refuses_other_rank_counts() {
    // Two steps, then two more from the checkpoint, once with one process (grad_accum 2) and
    // once with two ranks (sharded optimiser state): the resumed steps must agree bit for bit.
    let single = tempfile::tempdir().unwrap();
    let c2 = write_config(single.path(), 2, 2, true);
    ok(&protege(single.path(), &["sft", "--config", c2.to_str().unwrap()]), "single, first half");
    let c4 = write_config(single.path(), 2, 4, true);
    // Resuming with another step count is refused, naming it, unless accepted.
    let refused = protege(single.path(), &["sft", "--config", c4.to_str().unwrap(), "--resume"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("train.steps: 2 -> 4") && err.contains("--accept-config-change"), "{err}");
    let extend = ["--resume", "--accept-config-change"];
    ok(&protege(single.path(), &[&["sft", "--config", c4.to_str().unwrap()][..], &extend].concat()), "single, resumed");

    let dp = tempfile::tempdir().unwrap();
    let c2 = write_config(dp.path(), 1, 2, true);
    ok(
        &protege(dp.path(), &["launch", "--gpus", "2", "--", "sft", "--config", c2.to_str().unwrap()]),
        "two ranks, first half",
    );
    let c4 = write_config(dp.path(), 1, 4, true);
    let one = protege(dp.path(), &[&["sft", "--config", c4.to_str().unwrap()][..], &extend].concat());
    assert!(!one.status.success(), "a one-rank resume of a two-rank checkpoint must fail");
    let err = String::from_utf8_lossy(&one.stderr);
    assert!(err.contains("different number of data-parallel ranks"), "{err}");
    ok(
        &protege(
            dp.path(),
            &[&["launch", "--gpus", "2", "--", "sft", "--config", c4.to_str().unwrap()][..], &extend].concat(),
        ),
        "two ranks, resumed",
    );
    let (a, b) = (curve(&single.path().join("run")), curve(&dp.path().join("run")));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
}

#[test]
fn a_failing_rank_stops_the_launch_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = protege(dir.path(), &["launch", "--gpus", "2", "--", "sft", "--config", "missing.toml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed") && err.contains("rank"), "{err}");
    assert!(err.contains("missing.toml"), "the rank's own error is shown: {err}");
}
