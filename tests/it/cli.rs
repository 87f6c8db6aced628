//! The `protege` binary end to end on the fixture models.

/// A machine without pytest (a module here: one test binary less to link).
mod pytest_missing;

use std::process::Command;

use crate::common::{fixture, MODELS};

fn protege(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_protege")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn help_lists_the_working_commands() {
    let (ok, out, _) = protege(&["--help"]);
    assert!(ok);
    for cmd in ["generate", "check-logits", "export"] {
        assert!(out.contains(cmd), "{out}");
    }
}

#[test]
fn check_logits_passes_on_fixtures_and_fails_on_a_perturbed_reference() {
    for name in MODELS {
        for file in ["reference.safetensors", "reference_positions.safetensors"] {
            let model = fixture(name);
            let reference = fixture(&format!("{name}/{file}"));
            let (ok, out, err) = protege(&[
                "check-logits",
                "--model",
                model.to_str().unwrap(),
                "--reference",
                reference.to_str().unwrap(),
            ]);
            assert!(ok, "{name}/{file}: {out}{err}");
            assert!(out.contains("PASS") && out.contains("argmax agreement"), "{out}");
        }
    }
    // Nudge one logit by 1e-3: beyond the default tolerance.
    let bytes = std::fs::read(fixture("tiny/reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let logits = st.tensor("logits").unwrap();
    let mut data = logits.data().to_vec();
    let v = f32::from_le_bytes(data[40..44].try_into().unwrap()) + 1e-3;
    data[40..44].copy_from_slice(&v.to_le_bytes());
    let perturbed =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, logits.shape().to_vec(), &data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.safetensors");
    safetensors::serialize_to_file(vec![("input_ids", ids), ("logits", perturbed)], None, &path).unwrap();
    let model = fixture("tiny");
    let (ok, out, _) =
        protege(&["check-logits", "--model", model.to_str().unwrap(), "--reference", path.to_str().unwrap()]);
    assert!(!ok && out.contains("FAIL: 1 values"), "{out}");
    // A looser tolerance accepts it.
    let (ok, _, _) = protege(&[
        "check-logits",
        "--model",
        model.to_str().unwrap(),
        "--reference",
        path.to_str().unwrap(),
        "--atol",
        "2e-3",
    ]);
    assert!(ok);
    // Not a reference file at all.
    let (ok, _, err) = protege(&[
        "check-logits",
        "--model",
        model.to_str().unwrap(),
        "--reference",
        model.join("config.json").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not a valid safetensors"), "{err}");
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let model = fixture("tiny");
    let m = model.to_str().unwrap();
    let (ok, out, err) =
        protege(&["generate", "--model", m, "--prompt", "def add(a, b):", "--max-new-tokens", "12", "--ignore-eos"]);
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty());
    assert!(err.contains("tok/s") && err.contains("generated 12 tokens"), "{err}");
    // Greedy is deterministic; seeded sampling too.
    let again =
        protege(&["generate", "--model", m, "--prompt", "def add(a, b):", "--max-new-tokens", "12", "--ignore-eos"]);
    assert_eq!(out, again.1);
    let sample = |seed: &str| {
        protege(&[
            "generate",
            "--model",
            m,
            "--raw",
            "--prompt",
            "import os",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--ignore-eos",
        ])
        .1
    };
    assert_eq!(sample("3"), sample("3"));

    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conv.json");
    std::fs::write(&conv, r#"{"messages": [{"role": "user", "content": "run ls"}], "tools": [{"type": "function", "function": {"name": "bash"}}]}"#).unwrap();
    let (ok, _, err) =
        protege(&["generate", "--model", m, "--messages", conv.to_str().unwrap(), "--max-new-tokens", "4"]);
    assert!(ok, "{err}");
    std::fs::write(&conv, r#"[{"role": "wizard", "content": "hi"}]"#).unwrap();
    let (ok, _, err) = protege(&["generate", "--model", m, "--messages", conv.to_str().unwrap()]);
    assert!(!ok && err.contains("conv.json"), "{err}");
    let (ok, _, err) = protege(&["generate", "--model", m, "--prompt", "x", "--max-new-tokens", "600"]);
    assert!(!ok && err.contains("max_position_embeddings"), "{err}");
}

/// The logits of `model` on the tiny reference's input ids, as a check-logits reference file.
fn reference_of(model: &std::path::Path, out: &std::path::Path) {
    let be = protege::backend::cpu::CpuBackend::new();
    let m = protege::model::Qwen2::load(&be, model).unwrap();
    let ids = crate::common::Tensors::open(&fixture("tiny/reference.safetensors")).i64s("input_ids");
    let tokens: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let logits = protege::generate::prompt_logits(&be, &m, &tokens, None).unwrap();
    let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let logit_bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = |d, s: Vec<usize>, b| safetensors::tensor::TensorView::new(d, s, b).unwrap();
    let views = vec![
        ("input_ids", view(safetensors::Dtype::I64, vec![ids.len()], &id_bytes)),
        ("logits", view(safetensors::Dtype::F32, vec![ids.len(), m.cfg.vocab_size], &logit_bytes)),
    ];
    safetensors::serialize_to_file(views, None, out).unwrap();
}

#[test]
fn adapter_flag_gives_the_merged_exports_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let tiny = fixture("tiny");
    let tiny = tiny.to_str().unwrap();
    crate::common::write_random_adapter("tiny", &dir.path().join("adapter"));
    let adapter = p("adapter");

    // export --merge: sharded as asked, refusing to write over a non-empty directory.
    let (ok, _, err) = protege(&["export", "--model", tiny, "--adapter", &adapter, "--out", &p("merged")]);
    assert!(!ok && err.contains("--merge"), "{err}");
    let export = ["export", "--model", tiny, "--adapter", &adapter, "--merge", "--max-shard-size", "100KB"];
    let (ok, _, err) = protege(&[&export[..], &["--out", &p("merged")]].concat());
    assert!(ok, "{err}");
    let index = std::fs::read_to_string(dir.path().join("merged/model.safetensors.index.json")).unwrap();
    assert!(index.contains("model-00001-of-") && index.contains("total_size"), "{index}");
    let (ok, _, err) = protege(&[&export[..], &["--out", &p("merged")]].concat());
    assert!(!ok && err.contains("not empty") && err.contains("--overwrite"), "{err}");
    let (ok, _, err) = protege(&[&export[..], &["--out", &p("merged"), "--overwrite", "--dtype", "bf16"]].concat());
    assert!(ok, "{err}");
    let config = std::fs::read_to_string(dir.path().join("merged/config.json")).unwrap();
    assert!(config.contains("\"dtype\": \"bfloat16\""), "{config}");
    let (ok, _, err) = protege(&[&export[..], &["--out", &p("merged"), "--overwrite"]].concat());
    assert!(ok, "{err}");
    let merged = p("merged");

    // generate: the same greedy text, which the adapter changed.
    let generate = |extra: &[&str]| {
        let args =
            ["generate", "--device", "cpu", "--prompt", "def add(a, b):", "--max-new-tokens", "16", "--ignore-eos"];
        let (ok, out, err) = protege(&[&args[..], extra].concat());
        assert!(ok, "{err}");
        out
    };
    let with_adapter = generate(&["--model", tiny, "--adapter", &adapter]);
    assert_eq!(with_adapter, generate(&["--model", &merged]));
    assert_ne!(with_adapter, generate(&["--model", tiny]));

    // check-logits: the merged model's logits are the adapter's, not the base's.
    reference_of(&dir.path().join("merged"), &dir.path().join("ref.safetensors"));
    let check = |extra: &[&str]| {
        let args = ["check-logits", "--device", "cpu", "--reference", &p("ref.safetensors"), "--atol", "1e-5"];
        protege(&[&args[..], extra].concat())
    };
    let (ok, out, err) = check(&["--model", tiny, "--adapter", &adapter]);
    assert!(ok && out.contains("PASS"), "{out}{err}");
    let (ok, out, _) = check(&["--model", tiny]);
    assert!(!ok && out.contains("FAIL"), "{out}");
    // An adapter that is not one: a clear error naming the file.
    let (ok, _, err) = check(&["--model", tiny, "--adapter", tiny]);
    assert!(!ok && err.contains("adapter_config.json"), "{err}");

    // eval with the local policy: every token the policy chose is the merged model's greedy
    // choice (the prompts of two runs differ, in their work-tree paths, so their episodes cannot
    // be compared directly).
    let suite = fixture("tasks");
    let args = [
        "eval",
        "--suite",
        suite.to_str().unwrap(),
        "--policy",
        "local",
        "--device",
        "cpu",
        "--expert",
        "none",
        "--tasks",
        "calc__clamp-above",
        "--max-steps",
        "2",
        "--max-new-tokens",
        "24",
        "--context",
        "4096",
        "--no-sandbox",
        "--model",
        tiny,
        "--adapter",
        &adapter,
        "--out",
    ];
    let (ok, _, err) = protege(&[&args[..], &[&p("eval-adapter")]].concat());
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(dir.path().join("eval-adapter/trajectories.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["tokens"]["ids"].clone()).unwrap();
    let source: Vec<char> = v["tokens"]["source"].as_str().unwrap().chars().collect();
    let greedy_agreement = |model: &str| {
        let be = protege::backend::cpu::CpuBackend::new();
        let m = protege::model::Qwen2::load_merged(&be, std::path::Path::new(model), None, Some(4096)).unwrap();
        let logits = protege::generate::prompt_logits(&be, &m, &ids, None).unwrap();
        let vocab = m.cfg.vocab_size;
        let argmax = |row: &[f32]| (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
        let chosen: Vec<usize> = (1..ids.len()).filter(|&i| source[i] == 'a').collect();
        assert!(chosen.len() >= 24, "the policy replied: {source:?}");
        chosen.iter().filter(|&&i| argmax(&logits[(i - 1) * vocab..i * vocab]) == ids[i]).count() as f64
            / chosen.len() as f64
    };
    assert_eq!(greedy_agreement(&merged), 1.0);
    assert!(greedy_agreement(tiny) < 0.9, "the adapter changes the policy's choices");
    let summary = std::fs::read_to_string(dir.path().join("eval-adapter/summary.json")).unwrap();
    assert!(summary.contains("adapter"), "the policy's name says an adapter was merged: {summary}");
}

/// A suite whose test command cannot run at all (its interpreter does not exist) is one clear
/// error from `tasks validate`, not every task invalid with every test "Missing".
#[test]
fn validate_says_once_that_the_test_command_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("cp").arg("-r").arg(fixture("tasks")).arg(dir.path().join("suite")).status().unwrap();
    assert!(status.success());
    let path = dir.path().join("suite/tasks.jsonl");
    let rows: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut t: serde_json::Value = serde_json::from_str(l).unwrap();
            t["env"]["test_cmd"] = serde_json::json!("pyhton3 -m pytest -q");
            t.to_string()
        })
        .collect();
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    let (ok, _, err) = protege(&["tasks", "validate", dir.path().join("suite").to_str().unwrap(), "--runs", "1"]);
    assert!(!ok, "{err}");
    assert!(err.contains("the test command cannot run: its program was not found"), "{err}");
    assert!(err.contains("pyhton3"), "{err}");
    assert!(!err.contains("Missing"), "{err}");
}
