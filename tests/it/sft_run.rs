//! `protege sft` end to end on the tiny model: a run directory with metrics, checkpoints and an
//! export; an interrupted run resumed gives the same metrics as an uninterrupted one.

/// TensorBoard event files of sft and rl runs (a module here: one test binary less to link).
mod tensorboard;

use std::path::Path;

use crate::common::fixture;
use protege::agent::trajectory::{write_jsonl, Trajectory};
use protege::chat::{Message, ToolCall};
use protege::config::SftConfig;
use protege::train::sft::run_sft;
use serde_json::json;

fn trajectories() -> Vec<Trajectory> {
    (0..8)
        .map(|i| {
            let mut call = Message::assistant(format!("Looking at file {i}."));
            call.tool_calls = vec![ToolCall::new("bash", json!({"command": format!("cat f{i}.py")}))];
            Trajectory {
                task_id: format!("task-{i}"),
                resolved: Some(true),
                expert_calls: 0,
                messages: vec![
                    Message::user(format!("Fix bug number {i}.")),
                    call,
                    Message::tool(format!("def f{i}(): return {i}")),
                    Message::assistant(format!("Fixed f{i}.")),
                ],
                tools: vec![],
                tokens: None,
                meta: Default::default(),
            }
        })
        .collect()
}

fn config(dir: &Path, lora: bool) -> (SftConfig, String) {
    config_with_steps(dir, lora, 6, 2)
}

fn config_with_steps(dir: &Path, lora: bool, steps: u64, checkpoint_every: u64) -> (SftConfig, String) {
    write_jsonl(&dir.join("train.jsonl"), &trajectories()).unwrap();
    let lora =
        if lora { "[lora]\nrank = 4\nalpha = 8.0\ndropout = 0.1\ntargets = [\"q\", \"v\", \"down\"]\n" } else { "" };
    let text = format!(
        r#"[model]
path = "{}"
[data]
train = ["train.jsonl"]
eval_fraction = 0.25
max_seq_len = 256
batch_tokens = 200
[train]
steps = {steps}
grad_accum = 2
seed = 3
checkpoint_every = {checkpoint_every}
eval_every = 3
[optim]
lr = 0.01
warmup_steps = 2
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
    std::fs::write(&path, &text).unwrap();
    (SftConfig::from_file(&path).unwrap(), text)
}

#[test]
fn resumed_run_matches_an_uninterrupted_one() {
    for lora in [false, true] {
        let a = tempfile::tempdir().unwrap();
        let (cfg, text) = config(a.path(), lora);
        let full = run_sft(&cfg, &text, false, None).unwrap();
        assert_eq!(full.last_step, 6);
        assert!(full.metrics[5].loss < full.metrics[0].loss, "loss should fall: {:?}", full.metrics);
        assert!(full.metrics[2].eval_loss.is_some() && full.metrics[1].eval_loss.is_none());
        let run = a.path().join("run");
        for f in ["config.toml", "metrics.jsonl", "checkpoints/latest", "checkpoints/step-6/state.json"] {
            assert!(run.join(f).exists(), "{f} missing");
        }
        assert!(run.join("model/model.safetensors").exists() && run.join("model/tokenizer.json").exists());
        assert_eq!(run.join("adapter/adapter_config.json").exists(), lora);
        if lora {
            // The merged model/ is the base with adapter/ merged in (the tiny model is f32, so exactly).
            let be = protege::backend::cpu::CpuBackend::new();
            let ids: Vec<u32> = (0..20).map(|i| (i * 31 + 7) % 450).collect();
            let logits = |dir: &Path, adapter: Option<&Path>| {
                let m = protege::model::Qwen2::load_merged(&be, dir, adapter, None).unwrap();
                protege::generate::prompt_logits(&be, &m, &ids, None).unwrap()
            };
            let merged = logits(&run.join("model"), None);
            assert_eq!(merged, logits(&fixture("tiny"), Some(&run.join("adapter"))));
            assert_ne!(merged, logits(&fixture("tiny"), None));
        }

        // Interrupted after 3 steps (the newest checkpoint is step 2), then resumed.
        let b = tempfile::tempdir().unwrap();
        let (cfg, text) = config(b.path(), lora);
        assert_eq!(run_sft(&cfg, &text, false, Some(3)).unwrap().last_step, 3);
        assert!(run_sft(&cfg, &text, false, None).is_err(), "refuses to overwrite a run without --resume");
        let resumed = run_sft(&cfg, &text, true, None).unwrap();
        let strip = |m: &[protege::train::sft::StepMetrics]| {
            m.iter().map(|m| (m.step, m.loss, m.eval_loss, m.lr, m.grad_norm, m.tokens)).collect::<Vec<_>>()
        };
        assert_eq!(strip(&resumed.metrics), strip(&full.metrics), "lora {lora}");
        let lines = std::fs::read_to_string(b.path().join("run/metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 6, "no duplicated or lost steps");
    }
}

/// The acceptance test of resume: `protege sft` killed (SIGKILL, possibly mid-checkpoint) and
/// started again with `--resume` writes the same metrics as an uninterrupted run.
#[test]
fn a_killed_process_resumes_with_identical_metrics() {
    use std::process::Command;
    let (steps, every) = (30, 3);
    let a = tempfile::tempdir().unwrap();
    let (cfg, text) = config_with_steps(a.path(), true, steps, every);
    let full = run_sft(&cfg, &text, false, None).unwrap();

    let b = tempfile::tempdir().unwrap();
    config_with_steps(b.path(), true, steps, every);
    let conf = b.path().join("sft.toml");
    let metrics = b.path().join("run/metrics.jsonl");
    let lines = || std::fs::read_to_string(&metrics).map(|t| t.lines().count()).unwrap_or(0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["sft", "--config", conf.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while lines() < 8 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(started.elapsed().as_secs() < 300, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = lines();
    let before = std::fs::read_to_string(&metrics).unwrap();
    assert!(killed_at < steps as usize, "killed mid-way (at {killed_at} steps)");

    let out = Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["sft", "--config", conf.to_str().unwrap(), "--resume"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed: Vec<protege::train::sft::StepMetrics> =
        std::fs::read_to_string(&metrics).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let strip = |m: &[protege::train::sft::StepMetrics]| {
        m.iter().map(|m| (m.step, m.loss, m.eval_loss, m.lr, m.grad_norm, m.tokens)).collect::<Vec<_>>()
    };
    assert_eq!(strip(&resumed), strip(&full.metrics), "killed after {killed_at} steps");
    // The lines before the checkpoint it resumed from are kept byte for byte.
    let kept = (killed_at / every as usize).saturating_sub(1) * every as usize;
    let after = std::fs::read_to_string(&metrics).unwrap();
    let head = |t: &str| t.lines().take(kept).map(|l| format!("{l}\n")).collect::<String>();
    assert_eq!(head(&after), head(&before), "metrics lines before the checkpoint were rewritten");
    let adapter = |d: &Path| std::fs::read(d.join("run/adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(a.path()), adapter(b.path()), "the same final adapter");
}

#[test]
fn trl_rows_and_peft_names_train() {
    let dir = tempfile::tempdir().unwrap();
    let (_, text) = config_with_steps(dir.path(), true, 2, 2);
    let rows: Vec<String> = (0..6)
        .map(|i| match i % 3 {
            0 => json!({"messages": [{"role": "user", "content": format!("Fix bug {i}.")},
                                     {"role": "assistant", "content": format!("Fixed {i}.")}],
                        "source": "hub"})
            .to_string(),
            1 => json!({"prompt": [{"role": "user", "content": format!("Say {i}.")}],
                        "completion": [{"role": "assistant", "content": format!("{i}")}]})
            .to_string(),
            _ => json!({"prompt": format!("Count to {i}:"), "completion": " 1 2 3"}).to_string(),
        })
        .collect();
    std::fs::write(dir.path().join("train.jsonl"), rows.join("\n")).unwrap();
    let text = text.replace("targets = [\"q\", \"v\", \"down\"]", "target_modules = \"all-linear\"");
    let text = text.replace("rank = 4\nalpha = 8.0", "r = 4\nlora_alpha = 8.0");
    let path = dir.path().join("sft.toml");
    std::fs::write(&path, &text).unwrap();
    let cfg = SftConfig::from_file(&path).unwrap();
    assert_eq!(cfg.lora.as_ref().unwrap().targets.len(), 7, "all-linear is every linear module of a layer");
    let out = run_sft(&cfg, &text, false, None).unwrap();
    assert_eq!(out.metrics.len(), 2);
    assert!(out.metrics.iter().all(|m| m.loss.is_finite() && m.tokens > 0));
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["target_modules"].as_array().map(|a| a.len()), Some(7), "{adapter}");
}

#[test]
fn config_typos_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (_, text) = config(dir.path(), false);
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, text.replace("grad_accum", "grad_acum")).unwrap();
    let e = format!("{:#}", SftConfig::from_file(&path).unwrap_err());
    assert!(e.contains("typo.toml") && e.contains("grad_acum"), "{e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["sft", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!dir.path().join("run").exists(), "nothing written for a bad config");
}

#[test]
fn a_nan_loss_stops_the_run_with_a_clear_error() {
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().unwrap();
    // A copy of the tiny model whose final norm weights are the largest finite float: the logits
    // overflow (NaN weights themselves are refused at load).
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(fixture("tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let bytes = std::fs::read(fixture("tiny/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    for t in tensors.iter_mut().filter(|t| t.0 == "model.norm.weight") {
        t.3 = t.3.chunks(4).flat_map(|_| f32::MAX.to_le_bytes()).collect();
    }
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &model.join("model.safetensors")).unwrap();
    let (mut cfg, text) = config(dir.path(), false);
    cfg.model.path = model;
    let e = format!("{:#}", run_sft(&cfg, &text, false, None).err().expect("NaN loss must stop the run"));
    assert!(e.contains("loss is NaN at step 1") && e.contains("checkpoints"), "{e}");
}
