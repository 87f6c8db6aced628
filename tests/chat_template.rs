//! The Qwen2.5 chat template against transformers' `apply_chat_template` (fixture), and the
//! per-token role mask.

mod common;

use common::fixture;
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
