//! `protege serve` on loopback with the tiny model, used by the real clients: the OpenAI and
//! Anthropic expert clients and the OpenAI policy. Failure paths (HTTP 500, a server that never
//! answers) use a minimal scripted HTTP server on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::fixture;
use protege::agent::expert::Expert;
use protege::agent::http::HttpConfig;
use protege::agent::policy::Policy;
use protege::agent::remote::{Api, Endpoint, OpenAiPolicy, Pricing, RemoteExpert};
use protege::backend::SamplingParams;
use protege::chat::Message;
use serde_json::{json, Value};

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

fn serve() -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_protege"))
        .args([
            "serve",
            "--model",
            fixture("tiny").to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--name",
            "tiny",
            "--context",
            "8192",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("serve exited before listening").unwrap();
        if let Some(addr) = line.strip_prefix("protege serve: listening on ") {
            break addr.trim().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Server { child, url }
}

fn endpoint(api: Api, base_url: String) -> Endpoint {
    Endpoint {
        api,
        base_url,
        model: "tiny".into(),
        api_key_env: None,
        pricing: Pricing { input_per_mtok: 1.0, output_per_mtok: 2.0 },
        http: HttpConfig { timeout_s: 60.0, max_tries: 2, backoff_s: 0.05 },
    }
}

fn post(url: &str, body: Value) -> (u16, String) {
    let r = reqwest::blocking::Client::new().post(url).json(&body).send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

fn task() -> protege::tasks::TaskInstance {
    protege::tasks::load_suite(&fixture("tasks")).unwrap().remove(0)
}

#[test]
fn openai_and_anthropic_clients_work_against_protege_serve() {
    let s = serve();
    let v1 = format!("{}/v1", s.url);
    // Chat completions, greedy: the same text streamed and not.
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "def add(a, b):"}],
                      "max_tokens": 12, "temperature": 0});
    let (status, text) = post(&format!("{v1}/chat/completions"), body.clone());
    assert_eq!(status, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["usage"]["completion_tokens"], 12);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let full = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, sse) = post(&format!("{v1}/chat/completions"), streamed);
    assert_eq!(status, 200);
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    let deltas: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(deltas, full);

    // Anthropic messages, streamed and not.
    let body = json!({"model": "tiny", "max_tokens": 8, "system": "Be brief.", "temperature": 0,
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]});
    let (status, text) = post(&format!("{}/v1/messages", s.url), body.clone());
    assert_eq!(status, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((r["type"].as_str(), r["stop_reason"].as_str()), (Some("message"), Some("max_tokens")));
    assert_eq!(r["usage"]["output_tokens"], 8);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, sse) = post(&format!("{}/v1/messages", s.url), streamed);
    for ev in ["message_start", "content_block_delta", "message_delta", "message_stop"] {
        assert!(sse.contains(&format!("event: {ev}")), "{ev} missing: {sse}");
    }

    // Bad requests are 400s that say what is wrong.
    let (status, text) = post(&format!("{v1}/chat/completions"), json!({"model": "tiny"}));
    assert_eq!(status, 400);
    assert!(text.contains("messages"), "{text}");
    let (status, text) = post(&format!("{}/v1/messages", s.url), json!({"messages": []}));
    assert_eq!(status, 400);
    assert!(text.contains("max_tokens"), "{text}");

    // The expert clients.
    for (api, base) in [(Api::Openai, v1.clone()), (Api::Anthropic, s.url.clone())] {
        let mut expert = RemoteExpert::new(endpoint(api, base), 8).unwrap();
        let r = expert.advise(&task(), "Where is the bug?", &[Message::user("hi")]).unwrap();
        assert_eq!(r.tokens_out, 8, "{api:?}");
        assert!(r.tokens_in > 20, "{api:?}: the prompt's token count comes from the server's usage");
        assert!((r.cost_usd - (r.tokens_in as f64 + 2.0 * r.tokens_out as f64) / 1e6).abs() < 1e-12);
    }

    // The OpenAI policy, with tools, runs an episode against the served tiny model.
    let mut policy =
        OpenAiPolicy::new(endpoint(Api::Openai, v1), SamplingParams { temperature: 0.0, ..Default::default() }, 16)
            .unwrap();
    let tools = protege::agent::tools::tool_specs("/repo");
    let turn = policy.act(&[Message::system("You fix bugs."), Message::user("Fix it.")], &tools).unwrap();
    assert_eq!(turn.tokens_out, 16);
    assert!(turn.tokens_in > 100, "tools are in the prompt");
}

/// A loopback HTTP server that answers each request with the next scripted reply (`None`:
/// never answer). It records the requests' headers and bodies.
fn scripted(replies: Vec<Option<(u16, String)>>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(vec![]));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut replies = replies.into_iter();
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut head, mut len) = (String::new(), 0usize);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            log.lock().unwrap().push(format!("{head}\r\n{}", String::from_utf8_lossy(&body)));
            match replies.next().flatten() {
                Some((status, body)) => {
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes());
                }
                None => {
                    // Hold the connection open without answering.
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(30));
                        drop(stream);
                    });
                }
            }
        }
    });
    (url, seen)
}

#[test]
fn http_errors_are_retried_then_reported_and_keys_stay_secret() {
    std::env::set_var("PROTEGE_TEST_EXPERT_KEY", "sk-test-secret-123");
    let ok = json!({"choices": [{"message": {"role": "assistant", "content": "Look at clamp()."}}],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 4}})
    .to_string();
    // A 500, then an answer: the retry succeeds.
    let (url, seen) = scripted(vec![Some((500, "{\"error\": \"boom\"}".into())), Some((200, ok))]);
    let mut ep = endpoint(Api::Openai, url);
    ep.api_key_env = Some("PROTEGE_TEST_EXPERT_KEY".into());
    let mut expert = RemoteExpert::new(ep.clone(), 64).unwrap();
    let r = expert.advise(&task(), "help", &[]).unwrap();
    assert_eq!((r.text.as_str(), r.tokens_in, r.tokens_out), ("Look at clamp().", 30, 4));
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 2);
    assert!(heads[1].to_ascii_lowercase().contains("authorization: bearer sk-test-secret-123"), "the key is sent");

    // Always 500: a clear error after the last try, without the key.
    let (url, _) = scripted(vec![Some((500, "{\"error\": \"boom\"}".into())); 3]);
    let mut failing = RemoteExpert::new(Endpoint { base_url: url, ..ep.clone() }, 64).unwrap();
    let e = format!("{:#}", failing.advise(&task(), "help", &[]).unwrap_err());
    assert!(e.contains("failed after 2 tries") && e.contains("HTTP 500") && e.contains("boom"), "{e}");
    assert!(!e.contains("sk-test-secret"), "{e}");

    // A server that never answers: each try times out.
    let (url, _) = scripted(vec![None, None]);
    let slow =
        Endpoint { base_url: url, http: HttpConfig { timeout_s: 0.5, max_tries: 2, backoff_s: 0.05 }, ..ep.clone() };
    let started = Instant::now();
    let e = format!("{:#}", RemoteExpert::new(slow, 64).unwrap().advise(&task(), "help", &[]).unwrap_err());
    assert!(e.contains("no reply within"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A 4xx is not retried.
    let (url, seen) = scripted(vec![Some((401, "{\"error\": \"bad key\"}".into())), Some((200, "{}".into()))]);
    let e = format!(
        "{:#}",
        RemoteExpert::new(Endpoint { base_url: url, ..ep.clone() }, 64).unwrap().advise(&task(), "q", &[]).unwrap_err()
    );
    assert!(e.contains("refused") && e.contains("401"), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // A missing key variable is an error naming the variable.
    let e = RemoteExpert::new(Endpoint { api_key_env: Some("PROTEGE_NO_SUCH_KEY".into()), ..ep.clone() }, 64)
        .err()
        .unwrap();
    assert!(e.to_string().contains("PROTEGE_NO_SUCH_KEY"));

    // In an episode the failure is recorded and the agent goes on.
    let (url, _) = scripted(vec![Some((503, "{}".into())); 2]);
    let mut failing = RemoteExpert::new(Endpoint { base_url: url, ..ep }, 64).unwrap();
    let t = task();
    let dir = tempfile::tempdir().unwrap();
    let sb = protege::sandbox::LocalSandbox::create(
        &t.env.repo_path,
        &dir.path().join("w"),
        protege::sandbox::Isolation::Plain,
        Default::default(),
        vec![],
        &[],
    )
    .unwrap();
    use protege::agent::policy::Replay;
    let mut policy = Replay::new(vec![
        Replay::call("", "ask_expert", json!({"query": "help"})),
        Replay::call("", "submit", json!({})),
    ]);
    let ep = protege::agent::episode::run_episode(&t, &sb, &mut policy, Some(&mut failing), &Default::default());
    assert_eq!(ep.exit_status, protege::agent::episode::ExitStatus::Submitted);
    assert!(ep.expert_calls[0].error.as_deref().unwrap().contains("HTTP 503"));
    assert!(ep.messages[3].text().contains("The expert is unavailable"));
    let line = serde_json::to_string(&ep.to_trajectory(None, Default::default())).unwrap();
    assert!(!line.contains("sk-test-secret"));
}

#[test]
fn the_expert_judge_and_the_gold_patch_expert_over_http() {
    use protege::chat::{Message, ToolCall};
    use protege::reward::{ExpertJudge, HeuristicJudge, Judge};
    let reply = |text: &str| {
        json!({"choices": [{"message": {"role": "assistant", "content": text}}],
               "usage": {"prompt_tokens": 100, "completion_tokens": 10}})
        .to_string()
    };
    // The warrant question gets a readable score, the follow-through question does not.
    let (url, seen) = scripted(vec![
        Some((200, reply("{\"score\": 0.9, \"reason\": \"it was stuck\"}"))),
        Some((200, reply("I cannot tell."))),
    ]);
    let mut judge =
        ExpertJudge { endpoint: endpoint(Api::Openai, url), context_messages: 5, fallback: HeuristicJudge::default() };
    let call = |name: &str, args: Value| {
        let mut m = Message::assistant("");
        m.tool_calls = vec![ToolCall::new(name, args)];
        m
    };
    let messages = vec![
        Message::system("s"),
        Message::user("fix clamp"),
        call("bash", json!({"command": "python -m pytest"})),
        Message::tool("1 failed [exit code 1]"),
        call("ask_expert", json!({"query": "why does clamp fail?"})),
        Message::tool("Look at `calc/ops.py`, in `def clamp(x, lo, hi):`."),
        call(
            "str_replace_editor",
            json!({"command": "str_replace", "path": "calc/ops.py", "old_str": "a", "new_str": "b"}),
        ),
        Message::tool("edited"),
    ];
    let out = judge.judge(&task(), &messages).unwrap();
    assert_eq!(out.calls.len(), 1);
    let c = &out.calls[0];
    // 0.9 from the model; the unreadable follow-through falls back to the heuristic (an edit of
    // the named file: 1) and says so.
    assert_eq!((c.step, c.warrant, c.follow), (1, 0.9, 1.0));
    assert!(c.note.as_deref().unwrap().contains("heuristic"));
    assert_eq!((out.tokens_in, out.tokens_out), (200, 20));
    assert!((out.cost_usd - (200.0 * 1.0 + 20.0 * 2.0) / 1e6).abs() < 1e-12);
    let asked = seen.lock().unwrap().clone();
    assert!(asked[0].contains("why does clamp fail?") && asked[0].contains("Was asking warranted?"), "{}", asked[0]);
    assert!(asked[1].contains("calc/ops.py") && asked[1].contains("follow the advice"), "{}", asked[1]);

    // During synthesis a model expert sees the gold patch, with the instruction not to reveal it.
    let (url, seen) = scripted(vec![Some((200, reply("Look at the comparison in clamp.")))]);
    let mut expert = RemoteExpert::new(endpoint(Api::Openai, url), 64).unwrap();
    expert.sees_gold_patch = true;
    let t = task();
    expert.advise(&t, "help", &[]).unwrap();
    let body = seen.lock().unwrap()[0].clone();
    let first_added = t.patch.lines().find(|l| l.starts_with('+') && !l.starts_with("+++")).unwrap();
    assert!(body.contains("Never reveal the reference fix"), "{body}");
    // As it appears inside the JSON request.
    let escaped = serde_json::to_string(first_added[1..].trim()).unwrap();
    assert!(body.contains(&escaped[1..escaped.len() - 1]), "the patch is in the prompt: {body}");
}
