//! The TensorBoard event files of a run, read back with TensorBoard's own reader (the
//! `tensorboard` package, pinned, installed from PyPI into a venv this test makes): every
//! scalar of `metrics.jsonl` at its step, once, also after an interrupted run was resumed (SFT
//! and RL); and
//! TensorBoard's purge of orphaned steps on a `SessionLog` START.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::fixture;
use protege::config::{RlConfig, SftConfig};
use protege::tensorboard::EventWriter;
use protege::train::rl::run_rl;
use protege::train::sft::run_sft;
use serde_json::Value;

const TENSORBOARD: &str = "tensorboard==2.20.0";

fn cache() -> PathBuf {
    std::env::var_os("PROTEGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/protege"))
}

/// A venv with the pinned TensorBoard, made on first use; `None` (the test skips, saying why)
/// only when pip cannot install it.
fn tensorboard_python() -> Option<PathBuf> {
    let venv = cache().join("tensorboard-venv");
    let python = venv.join("bin/python");
    let version = TENSORBOARD.split("==").nth(1).unwrap();
    let has = || {
        Command::new(&python)
            .args(["-c", "import tensorboard; print(tensorboard.__version__)"])
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == version)
    };
    if has() {
        return Some(python);
    }
    if !python.exists() {
        let out = Command::new("python3").args(["-m", "venv"]).arg(&venv).output().expect("python3");
        assert!(out.status.success(), "python3 -m venv {}: {}", venv.display(), String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", TENSORBOARD])
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "SKIPPED: pip could not install {TENSORBOARD} into {}: {}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    assert!(has(), "the venv lacks {TENSORBOARD} after installing it");
    Some(python)
}

/// Every scalar TensorBoard's `EventAccumulator` reads from `dir`: tag → [(step, value, wall time)].
fn read_with_tensorboard(python: &Path, dir: &Path) -> serde_json::Map<String, Value> {
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value, e.wall_time] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
    let out = Command::new(python).args(["-c", script]).arg(dir).output().unwrap();
    assert!(out.status.success(), "EventAccumulator: {}", String::from_utf8_lossy(&out.stderr));
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Object(m) => m,
        v => panic!("not an object: {v}"),
    }
}

fn config(dir: &Path) -> (SftConfig, String) {
    // configs/sft-tiny.toml, shorter.
    let text = format!(
        r#"[model]
path = "{}"
[data]
train = ["{}"]
eval_fraction = 0.2
max_seq_len = 512
batch_tokens = 1024
[train]
steps = 6
seed = 0
eval_every = 2
checkpoint_every = 2
[optim]
lr = 2e-2
warmup_steps = 2
decay = "cosine"
min_lr_ratio = 0.1
beta1 = 0.9
beta2 = 0.999
eps = 1e-8
weight_decay = 0.0
max_grad_norm = 1.0
[lora]
rank = 4
alpha = 8.0
targets = ["q", "v"]
[output]
run_dir = "run"
"#,
        fixture("tiny").display(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/trajectories/demo.jsonl").display()
    );
    let path = dir.join("sft.toml");
    std::fs::write(&path, &text).unwrap();
    (SftConfig::from_file(&path).unwrap(), text)
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn sft_events_hold_every_scalar_of_metrics_jsonl_once_also_after_a_resume() {
    let Some(python) = tensorboard_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (cfg, text) = config(dir.path());
    let started = now();
    // Killed after step 3, one step past its last checkpoint (step 2) ...
    run_sft(&cfg, &text, false, Some(3)).unwrap();
    let run = dir.path().join("run");
    let before = read_with_tensorboard(&python, &run);
    let steps: Vec<u64> = before["sft/loss"].as_array().unwrap().iter().map(|e| e[0].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3], "a live reader sees each step as it is written");
    // ... and resumed: step 3 is redone; TensorBoard must not show the first run's step 3.
    run_sft(&cfg, &text, true, None).unwrap();
    let ended = now();

    let files = protege::tensorboard::event_files(&run).unwrap();
    assert_eq!(files.len(), 2, "the resumed run writes a second file: {files:?}");
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        let parts: Vec<&str> = name.split('.').collect();
        assert!(
            name.starts_with("events.out.tfevents.") && name.ends_with(&format!(".{}.protege", std::process::id()))
        );
        assert!(parts[3].len() == 10 && parts[3].parse::<u64>().is_ok(), "{name}");
    }

    let tb = read_with_tensorboard(&python, &run);
    let (lines, expected_tags) = compare(&tb, &run.join("metrics.jsonl"), "sft");
    assert_eq!(lines.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    assert!(expected_tags.contains_key("sft/eval_loss") && expected_tags.contains_key("sft/grad_norm"));
    // Wall times are the steps' own, in order.
    let times: Vec<f64> = tb["sft/loss"].as_array().unwrap().iter().map(|e| e[2].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(times[0] >= started - 1.0 && times[5] <= ended + 1.0, "{times:?} outside [{started}, {ended}]");
}

/// Checks that TensorBoard's scalars `tb` are exactly the numbers of `metrics` (each under
/// `prefix/key`, nested objects as `prefix/key/sub`, a missing exit status as 0) at their steps;
/// returns the metrics lines and the number of points per tag.
fn compare(
    tb: &serde_json::Map<String, Value>,
    metrics: &Path,
    prefix: &str,
) -> (Vec<Value>, std::collections::BTreeMap<String, usize>) {
    let lines: Vec<Value> =
        std::fs::read_to_string(metrics).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut expected_tags = std::collections::BTreeMap::new();
    let mut compared = 0;
    for line in &lines {
        let step = line["step"].as_u64().unwrap();
        let mut numbers = vec![];
        for (key, v) in line.as_object().unwrap() {
            match v {
                Value::Number(n) if key != "step" => numbers.push((format!("{prefix}/{key}"), n.as_f64().unwrap())),
                Value::Object(m) => {
                    for (sub, n) in m {
                        numbers.push((format!("{prefix}/{key}/{sub}"), n.as_f64().unwrap()));
                    }
                }
                _ => {}
            }
        }
        for (tag, v) in numbers {
            *expected_tags.entry(tag.clone()).or_insert(0) += 1;
            let events = tb.get(&tag).unwrap_or_else(|| panic!("TensorBoard has no {tag}: {tb:?}"));
            let at: Vec<&Value> = events.as_array().unwrap().iter().filter(|e| e[0].as_u64() == Some(step)).collect();
            assert_eq!(at.len(), 1, "{tag} at step {step}: {events}");
            assert_eq!(at[0][1].as_f64().unwrap() as f32, v as f32, "{tag} at step {step}");
            compared += 1;
        }
    }
    // Nothing TensorBoard shows that metrics.jsonl does not: no tag, no step more (exit
    // statuses that no episode ended with are 0 in TensorBoard, absent in metrics.jsonl).
    for (tag, events) in tb {
        let events = events.as_array().unwrap();
        match expected_tags.get(tag) {
            Some(n) => assert_eq!(events.len(), *n, "{tag}: {events:?}"),
            None => {
                assert!(tag.starts_with(&format!("{prefix}/exit/")), "{tag} is not in {}", metrics.display());
                assert!(events.iter().all(|e| e[1].as_f64() == Some(0.0)) && events.len() == lines.len(), "{tag}");
            }
        }
    }
    eprintln!("{prefix}: compared {compared} scalars over {} tags with TensorBoard's reader", expected_tags.len());
    (lines, expected_tags)
}

/// Without cutting old files, TensorBoard's own purge on the START of a new file drops the
/// orphaned steps, as for a TensorFlow job restarted from a checkpoint.
#[test]
fn tensorboard_drops_orphaned_steps_on_session_start() {
    let Some(python) = tensorboard_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut first = EventWriter::new_file(dir.path(), 1).unwrap();
    for s in 1..=5 {
        first.scalars(s, &[("rl/reward".into(), s as f64)]).unwrap();
    }
    let mut second = EventWriter::new_file(dir.path(), 3).unwrap();
    assert!(second.path() > first.path());
    for s in 3..=4 {
        second.scalars(s, &[("rl/reward".into(), 10.0 * s as f64)]).unwrap();
    }
    let tb = read_with_tensorboard(&python, dir.path());
    let got: Vec<(u64, f64)> =
        tb["rl/reward"].as_array().unwrap().iter().map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap())).collect();
    assert_eq!(got, [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]);
}

/// An RL config on the loopy fixture policy and the small fixture suite (as tests/it/rl_run.rs).
fn rl_config(dir: &Path) -> (RlConfig, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"
[model]
path = "{model}"
context = 2048
[grpo]
tasks_per_step = 1
group_size = 2
seed = 3
batch_tokens = 8192
checkpoint_every = 1
kl_beta = 0.01
[lora]
rank = 4
alpha = 8.0
targets = ["q", "v"]
[optim]
lr = 1e-3
warmup_steps = 0
decay = "constant"
min_lr_ratio = 1.0
beta1 = 0.9
beta2 = 0.99
eps = 1e-8
weight_decay = 0.0
max_grad_norm = 1.0
[rollout]
concurrency = 2
temperature = 1.0
max_new_tokens = 40
[rollout.episode]
max_steps = 4
context_tokens = 2048
observation_chars = 200
compact_prompt = true
[expert]
kind = "oracle"
[[stage]]
name = "I"
steps = 2
suite = "{suite}"
[output]
run_dir = "run"
"#,
        model = root.join("tests/fixtures/loopy").display(),
        suite = root.join("tests/fixtures/tasks").display(),
    );
    let path = dir.join("rl.toml");
    std::fs::write(&path, &text).unwrap();
    (RlConfig::from_file(&path).unwrap(), text)
}

#[test]
fn rl_events_hold_every_scalar_of_metrics_jsonl() {
    let pytest = Command::new("python3").args(["-m", "pytest", "--version"]).output();
    if !pytest.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: grading needs pytest, which is not installed (pip install pytest; .ci/run does)");
        return;
    }
    let Some(python) = tensorboard_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (cfg, text) = rl_config(dir.path());
    run_rl(&cfg, &text, false, Some(1)).unwrap();
    run_rl(&cfg, &text, true, None).unwrap();
    let run = dir.path().join("run");
    assert_eq!(protege::tensorboard::event_files(&run).unwrap().len(), 2);
    let tb = read_with_tensorboard(&python, &run);
    let (lines, tags) = compare(&tb, &run.join("metrics.jsonl"), "rl");
    assert_eq!(lines.len(), 2);
    for tag in ["rl/reward", "rl/r_loop", "rl/r_format", "rl/kl", "rl/grad_norm", "rl/lr", "rl/looping_rate"] {
        assert!(tags.contains_key(tag), "{tag}: {tags:?}");
    }
    assert!(tb.contains_key("rl/exit/format_errors") && tb.contains_key("rl/exit/submitted"), "{:?}", tb.keys());
}
