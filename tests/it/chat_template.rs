//! The Qwen2.5 chat template against transformers' `apply_chat_template` (fixture), and the
//! per-token role mask.

use crate::common::fixture;
use protege::chat::{Conversation, Message, Role, ToolCall};
use protege::tokenizer::{TokenRole, Tokenizer};
use serde_json::{json, Value};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixture("tokenizer")).unwrap()
}

#[test]
fn token_ids_equal_transformers() {
    let tok = tokenizer();
    let text = std::fs::read_to_string(fixture("chat_template.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let conv: Conversation =
            serde_json::from_value(json!({"messages": c["messages"], "tools": if c["tools"].is_null() { json!([]) } else { c["tools"].clone() }}))
                .unwrap();
        let enc = tok
            .apply_chat_template(&conv.messages, &conv.tools, c["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(enc.text, c["text"].as_str().unwrap(), "{name}: rendered text");
        let want: Vec<u32> = c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(enc.ids, want, "{name}: token ids");
        assert_eq!(enc.roles.len(), enc.ids.len());
    }
}

#[test]
fn role_mask_marks_what_the_assistant_produced() {
    let tok = tokenizer();
    let mut call = Message::assistant("");
    call.content = None;
    call.tool_calls = vec![ToolCall::new("bash", json!({"command": "ls"}))];
    let msgs = vec![
        Message::system("sys"),
        Message::user("list files"),
        call,
        Message::tool("a.py b.py"),
        Message::assistant("Two files."),
    ];
    let enc =
        tok.apply_chat_template(&msgs, &[json!({"type": "function", "function": {"name": "bash"}})], false).unwrap();
    let mask = enc.assistant_mask();
    let assistant: String =
        enc.ids.iter().zip(&mask).filter(|(_, &m)| m).map(|(&id, _)| tok.decode(&[id], false).unwrap()).collect();
    assert_eq!(
        assistant,
        "<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls\"}}\n</tool_call><|im_end|>Two files.<|im_end|>"
    );
    let tool_text: String = enc
        .ids
        .iter()
        .zip(&enc.roles)
        .filter(|(_, &r)| r == TokenRole::Body(Role::Tool))
        .map(|(&id, _)| tok.decode(&[id], false).unwrap())
        .collect();
    assert_eq!(tool_text, "a.py b.py");
    // Decoding all ids gives the rendered text back.
    assert_eq!(tok.decode(&enc.ids, false).unwrap(), enc.text);
}

#[test]
fn generation_prompt_and_errors() {
    let tok = tokenizer();
    let enc = tok.apply_chat_template(&[Message::user("hi")], &[], true).unwrap();
    assert!(enc.text.ends_with("<|im_start|>assistant\n"));
    assert!(enc.assistant_mask().iter().all(|m| !m));
    let mut bad = Message::user("x");
    bad.tool_calls = vec![ToolCall::new("bash", json!({}))];
    let e = tok.apply_chat_template(&[bad], &[], true).unwrap_err();
    assert!(format!("{e:#}").contains("only assistant messages"), "{e:#}");
    assert!(Tokenizer::from_file(&fixture("nope/tokenizer.json")).is_err());
}

/// Qwen2.5's template as protege rendered it natively before templates came from the model
/// directory: the oracle for the roles the Jinja path gives.
mod native {
    use protege::chat::{python_json, Message, Role};
    use protege::tokenizer::TokenRole::{self, Body, Template};
    use serde_json::Value;

    const SYSTEM: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
    const TOOLS_HEADER: &str = "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>";
    const TOOLS_FOOTER: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n";

    /// The rendering as (text, owner) pieces.
    pub fn render(messages: &[Message], tools: &[Value], add_generation_prompt: bool) -> Vec<(String, TokenRole)> {
        let mut r: Vec<(String, TokenRole)> = vec![];
        let mut push = |s: &str, role: TokenRole| r.push((s.to_string(), role));
        let first_is_system = messages.first().is_some_and(|m| m.role == Role::System);
        push("<|im_start|>system\n", Template);
        if first_is_system {
            push(messages[0].text(), Body(Role::System));
        } else {
            push(SYSTEM, Template);
        }
        if tools.is_empty() {
            push("<|im_end|>\n", Template);
        } else {
            push(TOOLS_HEADER, Template);
            for t in tools {
                push("\n", Template);
                push(&python_json(t), Template);
            }
            push(TOOLS_FOOTER, Template);
        }
        let a = Body(Role::Assistant);
        for (i, m) in messages.iter().enumerate() {
            match m.role {
                Role::System if i == 0 => {}
                Role::User | Role::System => {
                    push(&format!("<|im_start|>{}\n", m.role.as_str()), Template);
                    push(m.text(), Body(m.role));
                    push("<|im_end|>\n", Template);
                }
                Role::Assistant => {
                    push("<|im_start|>assistant\n", Template);
                    let mut pieces: Vec<String> = vec![];
                    if !m.text().is_empty() {
                        pieces.push(m.text().to_string());
                    }
                    for c in &m.tool_calls {
                        pieces.push(format!(
                            "<tool_call>\n{{\"name\": \"{}\", \"arguments\": {}}}\n</tool_call>",
                            c.function.name,
                            python_json(&c.arguments())
                        ));
                    }
                    // Without tool calls the content follows the header directly; with them the
                    // template writes "\n" before the content and each call, the first of which
                    // is the generation prompt's.
                    push(&pieces.join("\n"), a);
                    push("<|im_end|>", a);
                    push("\n", Template);
                }
                Role::Tool => {
                    if i == 0 || messages[i - 1].role != Role::Tool {
                        push("<|im_start|>user", Template);
                    }
                    push("\n<tool_response>\n", Template);
                    push(m.text(), Body(Role::Tool));
                    push("\n</tool_response>", Template);
                    if i + 1 == messages.len() || messages[i + 1].role != Role::Tool {
                        push("<|im_end|>\n", Template);
                    }
                }
            }
        }
        if add_generation_prompt {
            push("<|im_start|>assistant\n", Template);
        }
        r
    }
}

/// The owner of each token by the native renderer, from each token's bytes.
fn native_roles(
    tok: &Tokenizer,
    ids: &[u32],
    messages: &[Message],
    tools: &[Value],
    gen: bool,
) -> (String, Vec<TokenRole>) {
    let pieces = native::render(messages, tools, gen);
    let text: String = pieces.iter().map(|p| p.0.as_str()).collect();
    let mut ends = vec![];
    let mut end = 0;
    for (s, role) in &pieces {
        end += s.len();
        ends.push((end, *role));
    }
    let mut offset = 0;
    let roles = ids
        .iter()
        .map(|&id| {
            let start = offset;
            offset += tok.token_bytes(id).len();
            ends[ends.partition_point(|(e, _)| *e <= start).min(ends.len() - 1)].1
        })
        .collect();
    (text, roles)
}

fn cases(file: &str, key: Option<&str>) -> Vec<(String, Conversation, bool, String, Vec<u32>)> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap();
    let list = match key {
        Some(k) => v[k].as_array().unwrap().clone(),
        None => v["cases"].as_array().unwrap().clone(),
    };
    list.iter()
        .map(|c| {
            let tools = if c["tools"].is_null() { json!([]) } else { c["tools"].clone() };
            let conv: Conversation =
                serde_json::from_value(json!({"messages": c["messages"], "tools": tools})).unwrap();
            let ids = c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let gen = c["add_generation_prompt"].as_bool().unwrap();
            (c["name"].as_str().unwrap().to_string(), conv, gen, c["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

/// The model directory's Qwen2.5 template (Jinja) gives the native renderer's text, ids and
/// per-token roles on every transformers case.
#[test]
fn the_qwen25_template_gives_the_native_roles() {
    let tok = tokenizer();
    for (name, conv, gen, text, ids) in cases("chat_template.json", None) {
        let enc = tok.apply_chat_template(&conv.messages, &conv.tools, gen).unwrap();
        assert_eq!(enc.text, text, "{name}");
        assert_eq!(enc.ids, ids, "{name}");
        let (native_text, roles) = native_roles(&tok, &enc.ids, &conv.messages, &conv.tools, gen);
        assert_eq!(native_text, text, "{name}: the native oracle");
        assert_eq!(enc.roles, roles, "{name}: roles");
    }
}

/// Runs of consecutive assistant tokens, decoded.
fn assistant_runs(tok: &Tokenizer, ids: &[u32], mask: &[bool]) -> Vec<String> {
    let mut runs = vec![];
    let mut i = 0;
    while i < ids.len() {
        let j = (i..ids.len()).find(|&j| mask[j] != mask[i]).unwrap_or(ids.len());
        if mask[i] {
            runs.push(tok.decode(&ids[i..j], false).unwrap());
        }
        i = j;
    }
    runs
}

/// A model directory whose template is not Qwen2.5's renders with its own, as transformers
/// does (fixture from tools/make_chat_template_fixtures.py), and the assistant's tokens are
/// still found.
#[test]
fn other_templates_render_as_transformers_does() {
    for dir in ["chat_other", "chat_qwen3"] {
        let tok = Tokenizer::from_dir(&fixture(dir)).unwrap();
        for (name, conv, gen, text, ids) in cases("chat_templates.json", Some(dir)) {
            assert_eq!(tok.chat_text(&conv.messages, &conv.tools, gen).unwrap(), text, "{dir} {name}");
            let enc = tok.apply_chat_template(&conv.messages, &conv.tools, gen).unwrap();
            assert_eq!(enc.text, text, "{dir} {name}");
            assert_eq!(enc.ids, ids, "{dir} {name}");
            let runs = assistant_runs(&tok, &enc.ids, &enc.assistant_mask());
            let replies = conv.messages.iter().filter(|m| m.role == Role::Assistant).count();
            assert_eq!(runs.len(), replies, "{dir} {name}: {runs:?}");
            assert!(runs.iter().all(|r| r.ends_with("<|im_end|>")), "{dir} {name}: {runs:?}");
            let want: &[&str] = match (dir, name.as_str()) {
                ("chat_other", "tools_round") => &[
                    "Listing.\n<tool_call>{\"name\":\"bash\",\"args\":{\"command\":\"ls -la\",\"n\":2}}</tool_call><|im_end|>",
                    "\n<tool_call>{\"name\":\"bash\",\"args\":{\"command\":\"cat a.py\"}}</tool_call><|im_end|>",
                    "Two files; a.py prints 1.<|im_end|>",
                ],
                ("chat_qwen3", "tools_round") => &[
                    "Listing.\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls -la\", \"n\": 2}}\n</tool_call><|im_end|>",
                    "<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"cat a.py\"}}\n</tool_call><|im_end|>",
                    "<think>\n\n</think>\n\nTwo files; a.py prints 1.<|im_end|>",
                ],
                ("chat_qwen3", "reasoning_in_history") => &["4.<|im_end|>", "<think>\n\n</think>\n\n12.<|im_end|>"],
                _ => &[],
            };
            if !want.is_empty() {
                assert_eq!(runs, want, "{dir} {name}");
            }
            let user: Vec<String> = enc
                .ids
                .iter()
                .zip(&enc.roles)
                .filter(|(_, &r)| r == TokenRole::Body(Role::User))
                .map(|(&id, _)| tok.decode(&[id], false).unwrap())
                .collect();
            let users: Vec<&str> = conv.messages.iter().filter(|m| m.role == Role::User).map(|m| m.text()).collect();
            assert_eq!(user.concat(), users.concat(), "{dir} {name}");
        }
    }
}

/// Writes a model directory holding the test tokenizer and `files`.
fn model_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tokenizer/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn bad_templates_are_errors_that_name_the_file() {
    let config = json!({"chat_template": "{% for m in messages %}\n{{ m.content }\n{% endfor %}"}).to_string();
    let dir = model_dir(&[("tokenizer_config.json", &config)]);
    let e = format!("{:#}", Tokenizer::from_dir(dir.path()).err().unwrap());
    let file = dir.path().join("tokenizer_config.json");
    assert!(
        e.contains(&format!("{} (chat_template): the chat template does not compile: line 2", file.display())),
        "{e}"
    );
    assert!(e.contains("{{ m.content }"), "{e}");

    let dir = model_dir(&[("chat_template.jinja", "{{ raise_exception('System role not supported') }}")]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let e = format!("{:#}", tok.apply_chat_template(&[Message::user("hi")], &[], true).unwrap_err());
    let file = dir.path().join("chat_template.jinja");
    assert!(e.contains(&file.display().to_string()) && e.contains("System role not supported"), "{e}");

    let config = json!({"chat_template": [{"name": "tool_use", "template": "x"}]}).to_string();
    let dir = model_dir(&[("tokenizer_config.json", &config)]);
    let e = format!("{:#}", Tokenizer::from_dir(dir.path()).err().unwrap());
    assert!(e.contains("none named \"default\""), "{e}");

    let e = format!("{:#}", tokenizer().with_chat_template("{% if %}").err().unwrap());
    assert!(e.contains("the model's chat template: the chat template does not compile: line 1"), "{e}");
}

/// A directory without a template renders with Qwen2.5's; `with_chat_template` replaces it.
#[test]
fn without_a_template_qwen25_is_used() {
    let dir = model_dir(&[]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    for (name, conv, gen, text, ids) in cases("chat_template.json", None) {
        let enc = tok.apply_chat_template(&conv.messages, &conv.tools, gen).unwrap();
        assert_eq!((enc.text, enc.ids), (text, ids), "{name}");
    }
    let tok = tok
        .with_chat_template("{% for m in messages %}[{{ m.role }}] {{ m.content }}<|im_end|>\n{% endfor %}")
        .unwrap();
    let enc = tok.apply_chat_template(&[Message::user("hi"), Message::assistant("yo")], &[], false).unwrap();
    assert_eq!(enc.text, "[user] hi<|im_end|>\n[assistant] yo<|im_end|>\n");
    assert_eq!(assistant_runs(&tok, &enc.ids, &enc.assistant_mask()), ["[assistant] yo<|im_end|>"]);
}

/// A long agent conversation (75 steps): the Jinja path's roles equal the native renderer's,
/// and what each costs (printed; `--nocapture`).
#[test]
fn long_conversations_attribute_like_native() {
    let tok = tokenizer();
    let tools = vec![
        json!({"type": "function", "function": {"name": "bash", "description": "Run a shell command.",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}),
        json!({"type": "function", "function": {"name": "submit", "description": "Submit the fix.",
            "parameters": {"type": "object", "properties": {}}}}),
    ];
    let mut msgs = vec![
        Message::system("You fix bugs in Python repositories."),
        Message::user("Fix the failing test in calc.py."),
    ];
    for step in 0..75 {
        let mut reply = Message::assistant(format!("Step {step}: I will look at the code around line {}.", step * 7));
        reply.tool_calls =
            vec![ToolCall::new("bash", json!({"command": format!("sed -n {},{}p calc.py", step, step + 40)}))];
        msgs.push(reply);
        let output: String =
            (0..40).map(|i| format!("{:4}  value_{step}_{i} = compute(x, y) + {i}\n", step + i)).collect();
        msgs.push(Message::tool(output));
    }
    msgs.push(Message::assistant("Done."));
    let time = |f: &dyn Fn()| {
        let start = std::time::Instant::now();
        for _ in 0..3 {
            f();
        }
        start.elapsed().as_secs_f64() / 3.0 * 1e3
    };
    let native_ms = time(&|| {
        native::render(&msgs, &tools, false);
    });
    let jinja_ms = time(&|| {
        tok.chat_text(&msgs, &tools, false).unwrap();
    });
    let attributed_ms = time(&|| {
        tok.render_chat(&msgs, &tools, false).unwrap();
    });
    let text = tok.chat_text(&msgs, &tools, false).unwrap();
    let encode_ms = time(&|| {
        tok.encode(&text).unwrap();
    });
    let enc = tok.apply_chat_template(&msgs, &tools, false).unwrap();
    println!(
        "{} messages, {} bytes, {} tokens: native render {native_ms:.2} ms, Jinja render {jinja_ms:.2} ms, \
         Jinja render with attribution {attributed_ms:.1} ms, tokenisation {encode_ms:.1} ms",
        msgs.len(),
        text.len(),
        enc.ids.len()
    );
    let (native_text, roles) = native_roles(&tok, &enc.ids, &msgs, &tools, false);
    assert_eq!(native_text, enc.text);
    assert_eq!(enc.roles, roles);
}

/// Replies with fixed token lists.
struct Scripted(Vec<Vec<u32>>);

impl protege::agent::policy::TokenGenerator for Scripted {
    fn generate(&mut self, _: protege::generate::Request) -> anyhow::Result<protege::generate::Completion> {
        let tokens = self.0.remove(0);
        Ok(protege::generate::Completion { tokens, finish: protege::generate::Finish::Length, logprobs: vec![] })
    }

    fn max_context(&self) -> usize {
        1 << 20
    }
}

/// The local policy's token record (prompt, replies, appended observations) is the model's own
/// template's rendering, whatever the template, also after a reply cut without its `<|im_end|>`.
#[test]
fn the_local_policy_follows_the_models_template() {
    use protege::agent::policy::{LocalPolicy, Policy};
    for dir in ["tokenizer", "chat_other", "chat_qwen3"] {
        let tok = Tokenizer::from_dir(&fixture(dir)).unwrap();
        let end = tok.token_to_id("<|im_end|>").unwrap();
        let first = tok.encode("Listing.").unwrap();
        let second = [tok.encode("Done.").unwrap(), vec![end]].concat();
        let script = Scripted(vec![first.clone(), second.clone()]);
        let mut policy = LocalPolicy::with_generator(Box::new(script), &tok, Default::default(), 0);
        let tools = vec![json!({"type": "function", "function": {"name": "bash"}})];
        let mut msgs = vec![Message::system("You fix bugs."), Message::user("List the files.")];
        policy.act(&msgs, &tools).unwrap();
        msgs.push(Message::assistant("Listing."));
        msgs.push(Message::tool("a.py"));
        msgs.push(Message::tool("b.py"));
        policy.act(&msgs, &tools).unwrap();
        let rec = policy.token_record().unwrap();
        let want = [tok.encode(&tok.chat_text(&msgs, &tools, true).unwrap()).unwrap(), second].concat();
        assert_eq!(tok.decode(&rec.ids, false).unwrap(), tok.decode(&want, false).unwrap(), "{dir}");
        assert_eq!(rec.ids, want, "{dir}");
    }
}
