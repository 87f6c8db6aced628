//! `protege serve` against real clients: the official `openai` and `anthropic` Python SDKs
//! (pinned, installed from PyPI into a venv this test makes) on the tiny model and on a LoRA
//! adapter trained here to answer with a tool call written as bare JSON, served unmerged;
//! a loopback load test where half the clients hang up mid-generation; and the unmerged
//! adapter checked against the merged model.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::fixture;
use protege::backend::cpu::CpuBackend;
use protege::config::SftConfig;
use protege::generate::{Batcher, GenOptions, Request};
use protege::model::Qwen2;
use serde_json::{json, Value};

const SDKS: [&str; 2] = ["openai==3.60.0", "anthropic==2.16.0"];
const KEY: &str = "sk-test-key";

fn cache() -> PathBuf {
    std::env::var_os("PROTEGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/protege"))
}

/// A venv with the pinned SDKs, made on first use.
fn sdk_python() -> PathBuf {
    let venv = cache().join("sdk-venv");
    let python = venv.join("bin/python");
    let probe = "import importlib.metadata as m, sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))";
    let has = || {
        Command::new(&python)
            .args(["-c", probe, "openai", "anthropic"])
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).split_whitespace().eq(SDKS))
    };
    if has() {
        return python;
    }
    if !python.exists() {
        let out = Command::new("python3").args(["-m", "venv"]).arg(&venv).output().expect("python3");
        assert!(out.status.success(), "python3 -m venv {}: {}", venv.display(), String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(SDKS)
        .output()
        .unwrap();
    assert!(out.status.success(), "pip install {SDKS:?}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(has(), "the SDK venv lacks {SDKS:?} after installing them");
    python
}

const TOOLS: &str = r#"[{"type": "function", "function": {"name": "bash", "description": "Run a command",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}]"#;

/// A LoRA adapter (and its merged model) trained on the tiny model to answer "List the files."
/// with `{"name": "bash", "arguments": {"command": "ls"}}` — no tags, the way real small models
/// write calls. Trained once per test binary.
fn adapted() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| train_adapter(40, ""))
}

/// LoRA SFT of the tiny model on the bare-JSON reply for `steps` steps (`lora_extra`: more
/// `[lora]` lines); returns the run directory.
fn train_adapter(steps: u64, lora_extra: &str) -> PathBuf {
    {
        let dir = tempfile::tempdir().unwrap().keep();
        let call = r#"{"name": "bash", "arguments": {"command": "ls"}}"#;
        let tools: Value = serde_json::from_str(TOOLS).unwrap();
        let rows: Vec<String> = (0..8)
            .map(|i| {
                json!({"task_id": format!("t{i}"), "resolved": true, "expert_calls": 0, "tools": tools, "meta": {},
                       "messages": [{"role": "user", "content": "List the files."},
                                    {"role": "assistant", "content": call}]})
                .to_string()
            })
            .collect();
        std::fs::write(dir.join("train.jsonl"), rows.join("\n") + "\n").unwrap();
        let text = format!(
            r#"[model]
path = "{}"
context = 2048
[data]
train = ["train.jsonl"]
eval_fraction = 0.0
max_seq_len = 2048
batch_tokens = 4096
[train]
steps = {steps}
grad_accum = 1
seed = 3
checkpoint_every = 100
eval_every = 100
[optim]
lr = 0.02
warmup_steps = 2
decay = "cosine"
min_lr_ratio = 0.1
beta1 = 0.9
beta2 = 0.99
eps = 1e-8
weight_decay = 0.0
max_grad_norm = 1.0
[lora]
rank = 8
alpha = 16.0
targets = ["q", "k", "v", "o", "gate", "up", "down"]
{lora_extra}
[output]
run_dir = "run"
"#,
            fixture("tiny").display()
        );
        std::fs::write(dir.join("sft.toml"), &text).unwrap();
        let cfg = SftConfig::from_file(&dir.join("sft.toml")).unwrap();
        let out = protege::train::sft::run_sft(&cfg, &text, false, None).unwrap();
        assert!(
            steps < 40 || out.metrics.last().unwrap().loss < 0.1,
            "the adapter did not learn its reply: {:?}",
            out.metrics.last()
        );
        dir.join("run")
    }
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_protege"));
    cmd.args(["serve", "--model", fixture("tiny").to_str().unwrap(), "--addr", "127.0.0.1:0", "--name", "tiny"])
        .args(["--context", "4096"])
        .args(extra);
    serve_with(&mut cmd)
}

/// Starts `cmd` (a `protege serve`) and waits until it listens.
fn serve_with(cmd: &mut Command) -> Server {
    let mut child = cmd.env_remove("PROTEGE_API_KEY").stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("serve exited before listening").unwrap();
        if let Some(addr) = line.strip_prefix("protege serve: listening on ") {
            break addr.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server { child, url }
}

#[test]
fn the_official_sdks_work_against_protege_serve() {
    let python = sdk_python();
    let adapter = adapted().join("adapter");
    let server = serve(&["--api-key", KEY, "--lora-modules", &format!("adapted={}", adapter.display())]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/check_sdks.py");
    let out = Command::new(&python).arg(&script).args([&server.url, KEY, "adapted"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().lines().last().is_some_and(|l| l.starts_with("ok ")),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", stdout.trim_end().lines().last().unwrap());
}

fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::blocking::get(format!("{url}/metrics")).unwrap().text().unwrap();
    let line =
        text.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_else(|| panic!("{name}: {text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Posts a chat request on a raw socket and hangs up after reading the first bytes of the reply.
fn hang_up(addr: &str, stream: bool, held: bool) {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Write a long story."}],
                          "max_tokens": 3000, "temperature": 1.0, "stream": stream});
    if held {
        // A forced tool call: the whole reply is held back until it ends, nothing is written.
        body["tools"] = serde_json::from_str(TOOLS).unwrap();
        body["tool_choice"] = json!("required");
    }
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    if stream {
        let mut first = [0u8; 64];
        let _ = s.read(&mut first);
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(s);
}

#[test]
fn clients_that_hang_up_stop_their_generation_and_the_rest_are_served() {
    let server = serve(&[]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let url = server.url.clone();
    // 24 clients that hang up (12 streaming, 12 waiting for a whole reply) beside 24 that stay.
    let quitters: Vec<_> = (0..24)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || hang_up(&addr, i % 2 == 0, i % 4 == 0))
        })
        .collect();
    let stayers: Vec<_> = (0..24)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "tiny", "messages": [{"role": "user", "content": format!("Say {i}.")}],
                                  "max_tokens": 16, "temperature": 1.0, "seed": i, "stream": i % 3 == 0});
                let r = reqwest::blocking::Client::new()
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .unwrap();
                assert_eq!(r.status(), 200);
                let text = r.text().unwrap();
                if i % 3 == 0 {
                    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                } else {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
                    assert!(n == 16 || v["choices"][0]["finish_reason"] == "stop", "{v}");
                }
            })
        })
        .collect();
    for t in quitters.into_iter().chain(stayers) {
        t.join().unwrap();
    }
    // Every abandoned generation stops within moments (3000 tokens each would take minutes).
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&url, "protege_requests_running") > 0.0 || metric(&url, "protege_requests_waiting") > 0.0 {
        assert!(Instant::now() < deadline, "generation goes on after the clients left");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A client that left before its request reached the engine never started one.
    let cancelled = metric(&url, "protege_sequences_cancelled_total");
    assert!((12.0..=24.0).contains(&cancelled), "{cancelled} generations cancelled");
    let generated = metric(&url, "protege_generation_tokens_total");
    assert!(generated < 24.0 * 16.0 + 24.0 * 400.0, "{generated} tokens generated");
    // A short request after the storm is answered at once.
    let started = Instant::now();
    let r = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2), "the short request waited {:?}", started.elapsed());
}

#[test]
fn errors_have_each_apis_shape_and_large_bodies_are_refused() {
    let server = serve(&["--max-request-bytes", "4096"]);
    let client = reqwest::blocking::Client::new();
    let post = |path: &str, body: String| {
        let r = client.post(format!("{}{path}", server.url)).body(body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(10_000)}]}).to_string();
    let (status, body) = post("/v1/chat/completions", big.clone());
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    let (status, body) = post("/v1/messages", big);
    assert_eq!((status, body["type"].as_str()), (413, Some("error")), "{body}");
    assert_eq!(body["error"]["type"], "request_too_large");
    let (status, body) = post("/v1/chat/completions", "not json".into());
    assert_eq!((status, body["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{body}");
    let (status, body) = post("/v1/messages", json!({"messages": [], "max_tokens": 4}).to_string());
    assert_eq!((status, body["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{body}");
    let (status, body) = post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}],
        "presence_penalty": 5})
        .to_string(),
    );
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("presence_penalty")), "{body}");
    let r = client.get(format!("{}/v1/chat/completions", server.url)).send().unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.json::<Value>().unwrap()["error"]["message"].is_string());
    let r = client.get(format!("{}/v1/models/nope", server.url)).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.json::<Value>().unwrap()["error"]["type"], "not_found_error");
}

/// The adapter applied unmerged (one base, adapters chosen per request, in one batch) gives the
/// logits of the merged model, and requests without it those of the base.
#[test]
fn unmerged_adapters_in_one_batch_match_the_merged_model() {
    let run = adapted();
    let be = CpuBackend::new();
    let base = Qwen2::load_merged(&be, &fixture("tiny"), None, Some(2048)).unwrap();
    let merged = Qwen2::load_merged(&be, &fixture("tiny"), Some(&run.join("adapter")), Some(2048)).unwrap();
    let adapter = protege::model::export::load_peft(&be, &base, &run.join("adapter")).unwrap();
    let adapters = [adapter];
    let prompt: Vec<u32> = (1..60).map(|i| (i * 7 % 400) as u32).collect();
    let logprobs = |model: &Qwen2<CpuBackend>,
                    adapters: &[protege::model::Lora<CpuBackend>],
                    which: Vec<Option<usize>>| {
        let mut b = Batcher::new(&be, model, None, 4096, &GenOptions::default()).with_adapters(adapters);
        let ids: Vec<usize> = which
            .iter()
            .map(|&a| b.admit(Request { logprobs: Some(5), adapter: a, ..Request::greedy(prompt.clone(), 8) }).unwrap())
            .collect();
        let mut out = vec![vec![]; ids.len()];
        while b.live() > 0 {
            for (id, c) in b.step(|_, _, _| {}).unwrap() {
                out[ids.iter().position(|&i| i == id).unwrap()] = c.logprobs;
            }
        }
        out
    };
    let mixed = logprobs(&base, &adapters, vec![None, Some(0), None, Some(0)]);
    let want_base = logprobs(&base, &[], vec![None]).remove(0);
    let want_merged = logprobs(&merged, &[], vec![None]).remove(0);
    let close = |a: &[protege::generate::TokenLogprob], b: &[protege::generate::TokenLogprob]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x.token == y.token && x.top.iter().zip(&y.top).all(|(p, q)| p.0 == q.0 && (p.1 - q.1).abs() < 1e-4)
            })
    };
    assert!(close(&mixed[0], &want_base) && close(&mixed[2], &want_base), "base rows differ");
    assert!(
        close(&mixed[1], &want_merged) && close(&mixed[3], &want_merged),
        "adapter rows differ from the merged model"
    );
    assert!(!close(&want_base, &want_merged), "the adapter changes nothing: the test would prove nothing");
}

/// Greedy tokens and their log-probabilities from a server.
fn greedy(url: &str, model: &str) -> Vec<(String, f64)> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "List the files."}],
                      "max_tokens": 12, "temperature": 0, "logprobs": true});
    let v: Value = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap_or_else(|| panic!("{v}"));
    content.iter().map(|t| (t["token"].as_str().unwrap().to_string(), t["logprob"].as_f64().unwrap())).collect()
}

/// An adapter that trains token rows changes the shared embedding: served alone its rows are
/// written into the base (same replies as the merged model); beside other models it is refused.
#[test]
fn adapters_with_trained_token_rows_are_served_alone_or_refused() {
    let run = train_adapter(6, "trainable_tokens = [\"<|im_end|>\"]");
    let adapter = run.join("adapter");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert!(!cfg["trainable_token_indices"].is_null(), "{cfg}");
    let out = Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["serve", "--model", fixture("tiny").to_str().unwrap(), "--addr", "127.0.0.1:0", "--context", "4096"])
        .arg("--lora-modules")
        .arg(format!("rows={}", adapter.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("trainable_token_indices"), "{err}");
    let unmerged = serve(&["--adapter", adapter.to_str().unwrap()]);
    let got = greedy(&unmerged.url, "tiny");
    drop(unmerged);
    let mut merged = Command::new(env!("CARGO_BIN_EXE_protege"));
    merged.args(["serve", "--model", run.join("model").to_str().unwrap(), "--addr", "127.0.0.1:0", "--name", "tiny"]);
    let merged = serve_with(merged.args(["--context", "4096"]));
    let want = greedy(&merged.url, "tiny");
    assert_eq!(got.len(), want.len());
    for ((a, p), (b, q)) in got.iter().zip(&want) {
        assert!(a == b && (p - q).abs() < 1e-4, "{got:?} vs {want:?}");
    }
}
