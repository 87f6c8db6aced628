//! `protege rl` and `protege train` as a user runs them: a run killed mid-step resumes with
//! no duplicated or lost steps, and the whole pipeline runs end to end on small settings,
//! writes its stage outputs and report, and skips finished stages when run again.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An RL config on the loopy fixture policy and the small fixture suite.
fn rl_config(dir: &Path, steps: u64) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "{model}"
context = 2048
[grpo]
tasks_per_step = 1
group_size = 3
seed = 3
batch_tokens = 8192
checkpoint_every = 1
kl_beta = 0.01
[lora]
rank = 4
alpha = 8.0
targets = ["q", "v", "down"]
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
concurrency = 3
temperature = 1.0
max_new_tokens = 40
[rollout.episode]
max_steps = 5
context_tokens = 2048
observation_chars = 200
compact_prompt = true
[expert]
kind = "oracle"
[[stage]]
name = "I"
steps = {half}
suite = "{suite}"
[stage.reward]
loops = {{ k1 = 2, k2 = 2, lambda = 0.5, floor = -10.0, looping_run = 3 }}
[[stage]]
name = "II"
steps = {rest}
suite = "{suite}"
[stage.reward]
w_follow = 2.0
w_expert = 0.3
quota = {{ no_call_penalty = -10.0 }}
gate_follow = {{ enabled = true }}
[output]
run_dir = "run"
"#,
        model = root().join("tests/fixtures/loopy").display(),
        suite = root().join("tests/fixtures/tasks").display(),
        half = steps / 2,
        rest = steps - steps / 2,
    );
    let path = dir.join("rl.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn has_pytest() -> bool {
    let ok = Command::new("python3").args(["-m", "pytest", "--version"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: pytest is not installed (pip install pytest; .ci/run does)");
    }
    ok
}

fn metric_steps(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_killed_rl_run_resumes_without_duplicated_or_lost_steps() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 6;
    let conf = rl_config(dir.path(), steps);
    let metrics = dir.path().join("run/metrics.jsonl");
    // What a run killed while writing its first checkpoint leaves: it starts over.
    std::fs::create_dir_all(dir.path().join("run/checkpoints/step-1.tmp")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["rl", "--config", conf.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // Kill it in the middle of a step: a moment after the second step's line appeared.
    while metric_steps(&metrics).len() < 2 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(started.elapsed().as_secs() < 600, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(700));
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = metric_steps(&metrics).len();
    assert!(killed_at < steps as usize, "killed mid-way (after {killed_at} steps)");

    // Starting again without --resume refuses to overwrite the run.
    let out =
        Command::new(env!("CARGO_BIN_EXE_protege")).args(["rl", "--config", conf.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));

    let out = Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["rl", "--config", conf.to_str().unwrap(), "--resume"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resumed after step"), "{err}");
    assert_eq!(metric_steps(&metrics), (1..=steps).collect::<Vec<_>>(), "killed after {killed_at} steps");
    let run = dir.path().join("run");
    for s in 1..=steps {
        let t = protege::agent::trajectory::read_jsonl(&run.join(format!("rollouts/step-{s}.jsonl"))).unwrap();
        assert_eq!(t.len(), 3, "step {s}: one group of three episodes");
        assert!(t.iter().all(|t| t.meta.contains_key("reward") && t.meta.contains_key("advantage")));
    }
    // The stages are logged by name and the final policy is exported.
    let stages: Vec<String> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["stage"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stages, ["I", "I", "I", "II", "II", "II"]);
    assert!(run.join("model/config.json").exists() && run.join("model/model.safetensors").exists());
    assert!(run.join("adapter/adapter_config.json").exists(), "the LoRA adapter is exported too");
    // model/ is the start model with adapter/ merged in.
    let be = protege::backend::cpu::CpuBackend::new();
    let ids: Vec<u32> = (0..20).map(|i| (i * 31 + 7) % 450).collect();
    let logits = |dir: &Path, adapter: Option<&Path>| {
        let m = protege::model::Qwen2::load_merged(&be, dir, adapter, None).unwrap();
        protege::generate::prompt_logits(&be, &m, &ids, None).unwrap()
    };
    let start = root().join("tests/fixtures/loopy");
    assert_eq!(logits(&run.join("model"), None), logits(&start, Some(&run.join("adapter"))));
    let kept = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("step-"));
    assert_eq!(kept.count(), 3, "only the newest keep_checkpoints = 3 checkpoints stay");
    // The report draws the curves.
    let out = Command::new(env!("CARGO_BIN_EXE_protege")).args(["report", run.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains("## RL") && md.contains("rl_reward.png"), "{md}");
    for png in ["rl_reward", "rl_behaviour", "rl_expert", "rl_optim", "rl_time"] {
        let bytes = std::fs::read(run.join(format!("report/{png}.png"))).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5000, "{png}.png");
    }
}

#[test]
fn synthesis_resumes_where_it_stopped() {
    if !has_pytest() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("synth.toml");
    std::fs::write(
        &conf,
        format!(
            r#"
suite = "{suite}"
attempts = 2
keep_per_task = 0
concurrency = 2
[agent]
kind = "scripted"
[expert]
kind = "oracle"
[output]
run_dir = "run"
"#,
            suite = root().join("tests/fixtures/tasks").display()
        ),
    )
    .unwrap();
    let synth = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_protege"))
            .args(["synth", "--config", conf.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        err
    };
    let err = synth(&[]);
    assert!(err.contains("4 of 4 attempts accepted"), "{err}");
    let attempts = dir.path().join("run/attempts.jsonl");
    // A killed run: the last attempt half-written.
    let text = std::fs::read_to_string(&attempts).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&attempts, format!("{}\n{}", lines[..3].join("\n"), &lines[3][..40])).unwrap();
    let err = synth(&["--resume"]);
    assert!(err.contains("resuming after 3 attempts") && err.contains("4 of 4 attempts accepted"), "{err}");
    let kept = protege::agent::trajectory::read_jsonl(&dir.path().join("run/trajectories.jsonl")).unwrap();
    assert_eq!(kept.len(), 4);
    assert!(kept.iter().all(|t| t.meta["agent"].as_str().unwrap().contains("scripted teacher")));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/summary.json")).unwrap()).unwrap();
    assert_eq!((summary["attempts"].as_u64(), summary["accept_rate"].as_f64()), (Some(4), Some(1.0)));
    assert_eq!(summary["expert_calls_per_accepted"].as_f64(), Some(1.0));
}

#[test]
fn bad_rl_configs_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let conf = rl_config(dir.path(), 2);
    let text = std::fs::read_to_string(&conf).unwrap();
    let cases = [
        (text.replace("group_size = 3", "group_size = 1"), "group_size must be at least 2"),
        (text.replace("temperature = 1.0", "temperature = 0.0"), "rollout.temperature must be positive"),
        (text.replace("[grpo]", "[grpo]\ncliplow = 0.1"), "unknown field `cliplow`"),
        (text.replace("w_follow = 2.0", "w_follow = 2.0\nb2b_lambda = 0.5"), "must be <= 0"),
        (
            text.replace("gate_follow = { enabled = true }", "judge = \"expert\""),
            "judge = \"expert\" needs a model expert",
        ),
    ];
    for (bad, want) in cases {
        std::fs::write(&conf, bad).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_protege"))
            .args(["rl", "--config", conf.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "want {want:?}: {err}");
        assert!(err.contains("rl.toml"), "the error names the file: {err}");
        assert!(!dir.path().join("run").exists(), "nothing written");
    }
}

/// The pipeline on the small fixture suite with small settings: every stage runs, the eval
/// table compares the models before and after, and a second run skips every stage.
#[test]
fn protege_train_runs_every_stage_and_skips_finished_ones() {
    // Synthesis keeps only graded, resolved episodes: grading needs pytest.
    if !has_pytest() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let demo = std::fs::read_to_string(root().join("configs/demo.toml")).unwrap();
    let fixtures = root().join("tests/fixtures");
    // The demo's own config, scaled down and pointed at the fixture suite.
    let text = demo
        .replace("dir = \"../runs/demo\"", &format!("dir = \"{}\"", dir.path().join("run").display()))
        .replace("model = \"../tests/fixtures/loopy\"", &format!("model = \"{}\"", fixtures.join("loopy").display()))
        .replace("\"../data/tasks/train.jsonl\"", &format!("\"{}\"", fixtures.join("tasks").display()))
        .replace("\"../data/tasks/test.jsonl\"", &format!("\"{}\"", fixtures.join("tasks").display()))
        .replace("\nsteps = 20\n", "\nsteps = 2\n")
        .replace("\nwarmup_steps = 3\n", "\nwarmup_steps = 1\n")
        .replace("\nsteps = 8\n", "\nsteps = 1\n")
        .replace("\nsteps = 4\n", "\nsteps = 1\n")
        .replace("max_steps = 12", "max_steps = 3")
        .replace("max_new_tokens = 128", "max_new_tokens = 24")
        .replace("group_size = 6", "group_size = 2")
        .replace("tasks_per_step = 4", "tasks_per_step = 1");
    let conf = dir.path().join("train.toml");
    std::fs::write(&conf, &text).unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_protege"))
            .args(["train", "--config", conf.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("SCRIPTED TEACHER"), "the scripted stand-in is labelled: {err}");
    for line in [
        "| Pass@1 |",
        "| expert calls / task |",
        "| expert share of tokens |",
        "| steps / task |",
        "| looping trajectories |",
    ] {
        assert!(err.contains(line), "the eval table has {line}: {err}");
    }
    let r = dir.path().join("run");
    for f in [
        "synth/trajectories.jsonl",
        "synth/summary.json",
        "sft/adapter/adapter_config.json",
        "rl/metrics.jsonl",
        "rl/model/model.safetensors",
        "eval/base/summary.json",
        "eval/final/summary.json",
        "eval/comparison.md",
        "report.md",
        "report/sft_loss.png",
        "report/rl_reward.png",
    ] {
        assert!(r.join(f).exists(), "{f} missing; {err}");
    }
    // Synthesis kept the teacher's resolved episodes (both fixture tasks).
    let kept = protege::agent::trajectory::read_jsonl(&r.join("synth/trajectories.jsonl")).unwrap();
    assert_eq!(kept.len(), 2);
    assert!(kept.iter().all(|t| t.resolved == Some(true) && t.expert_calls == 1));
    // Everything is done: a second run skips every stage and prints the same table.
    let again = run(&[]);
    let err2 = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err2}");
    assert_eq!(err2.matches("done (skipped)").count(), 5, "{err2}");
}

#[test]
fn the_embedded_demo_config_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_protege")).args(["train", "--print-demo-config"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(root().join("configs/demo.toml")).unwrap()
    );
    let p =
        protege::pipeline::Pipeline::parse(protege::pipeline::DEMO_CONFIG, &root().join("configs/demo.toml")).unwrap();
    assert!(p.synth.is_some() && p.sft.is_some() && p.eval.is_some());
    assert_eq!(p.rl.unwrap().stages.len(), 2);
    // The real recipe parses and validates too (its paths need not exist to parse).
    let path = root().join("configs/qwen2.5-coder-7b.toml");
    let p = protege::pipeline::Pipeline::from_file(&path).unwrap();
    assert_eq!(p.run.device.as_deref(), Some("cuda"), "the 7B recipe trains on the GPU");
    let rl = p.rl.unwrap();
    assert_eq!((rl.grpo.group_size, rl.grpo.clip_low, rl.grpo.clip_high), (6, 0.2, 0.28));
    assert_eq!(rl.stages[1].reward.quota.no_call_penalty, -10.0);
}
