//! Trajectories to SFT examples: chat-template tokenisation with the assistant mask, recorded
//! token ids used as is, and the length policy.

use crate::common::fixture;
use protege::agent::trajectory::{Source, TokenRecord, Trajectory};
use protege::chat::Message;
use protege::tokenizer::Tokenizer;
use protege::train::data::{build_examples, read_rows, Overlong, SftRow};

fn traj(messages: Vec<Message>, tokens: Option<TokenRecord>) -> Trajectory {
    Trajectory {
        task_id: "t".into(),
        resolved: Some(true),
        expert_calls: 0,
        messages,
        tools: vec![],
        tokens,
        meta: Default::default(),
    }
}

#[test]
fn examples_learn_only_the_agents_tokens() {
    let tok = Tokenizer::from_dir(&fixture("tiny")).unwrap();
    let chat: SftRow = traj(
        vec![Message::user("hi"), Message::assistant("hello there"), Message::user("again"), Message::assistant("ok")],
        None,
    )
    .into();
    let recorded = traj(
        vec![Message::user("x")],
        Some(TokenRecord::new(
            vec![5, 6, 7, 8, 9],
            &[Source::Prompt, Source::Policy, Source::Observation, Source::Expert, Source::Policy],
        )),
    );
    let (ex, stats) = build_examples(&[chat.clone(), recorded.into()], &tok, 512, Overlong::Drop).unwrap();
    assert_eq!(stats.kept, 2);
    let learned: String = ex[0]
        .ids
        .iter()
        .zip(&ex[0].trained)
        .filter(|(_, &m)| m)
        .map(|(&i, _)| tok.decode(&[i], false).unwrap())
        .collect();
    assert_eq!(learned, "hello there<|im_end|>ok<|im_end|>");
    assert_eq!(ex[1].ids, vec![5, 6, 7, 8, 9]);
    assert_eq!(ex[1].trained, vec![false, true, false, false, true]);

    // Too long: dropped, or cut after the first assistant turn.
    let n = ex[0].ids.len();
    let first_turn_end = ex[0].trained.iter().position(|&m| m).unwrap()
        + ex[0].trained.iter().skip_while(|&&m| !m).take_while(|&&m| m).count();
    let (_, s) = build_examples(std::slice::from_ref(&chat), &tok, n - 1, Overlong::Drop).unwrap();
    assert_eq!((s.kept, s.dropped_too_long), (0, 1));
    // n - 1 only loses the final newline after the last <|im_end|>: both turns stay whole.
    let (cut, s) = build_examples(std::slice::from_ref(&chat), &tok, n - 1, Overlong::TruncateAtTurn).unwrap();
    assert_eq!((s.kept, s.truncated, cut[0].ids.len()), (1, 1, n - 1));
    // A limit inside the second turn goes back to the end of the first.
    let (cut, _) =
        build_examples(std::slice::from_ref(&chat), &tok, first_turn_end + 3, Overlong::TruncateAtTurn).unwrap();
    assert_eq!(cut[0].ids.len(), first_turn_end);
    assert_eq!(tok.decode(&cut[0].ids[first_turn_end - 1..], false).unwrap(), "<|im_end|>");
    // Nothing to learn: dropped and counted.
    let (_, s) =
        build_examples(&[traj(vec![Message::user("only a question")], None).into()], &tok, 512, Overlong::Drop)
            .unwrap();
    assert_eq!(s.dropped_nothing_to_learn, 1);
}

/// The learned tokens of an example, decoded.
fn learned(tok: &Tokenizer, ids: &[u32], trained: &[bool]) -> String {
    ids.iter().zip(trained).filter(|(_, &m)| m).map(|(&i, _)| tok.decode(&[i], false).unwrap()).collect()
}

#[test]
fn trl_rows_are_read_and_masked_as_trl_does() {
    let tok = Tokenizer::from_dir(&fixture("tiny")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trl.jsonl");
    let tool = r#"{"type": "function", "function": {"name": "bash", "description": "run", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}"#;
    let rows = [
        // Conversational, with tools and a column TRL would ignore.
        format!(
            r#"{{"messages": [{{"role": "user", "content": "list"}}, {{"role": "assistant", "content": "ok", "tool_calls": [{{"type": "function", "function": {{"name": "bash", "arguments": "{{\"command\": \"ls\"}}"}}}}]}}, {{"role": "tool", "content": "a.py"}}, {{"role": "assistant", "content": "done"}}], "tools": [{tool}], "source": "hub"}}"#
        ),
        // Conversational prompt/completion: the few-shot answer in the prompt is not learned.
        r#"{"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}], "completion": [{"role": "assistant", "content": "6"}]}"#.to_string(),
        // Standard prompt/completion and language modelling.
        r#"{"prompt": "The sky is", "completion": " blue."}"#.to_string(),
        r#"{"text": "hello world"}"#.to_string(),
    ];
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    let rows = read_rows(&path, 1 << 20).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].id(), format!("{}:1", path.display()));
    let (ex, stats) = build_examples(&rows, &tok, 4096, Overlong::Drop).unwrap();
    assert_eq!(stats.kept, 4);
    let text0 = tok.decode(&ex[0].ids, false).unwrap();
    assert!(text0.contains("<tools>") && text0.contains("\"name\": \"bash\""), "tools rendered: {text0}");
    assert_eq!(
        learned(&tok, &ex[0].ids, &ex[0].trained),
        "ok\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls\"}}\n</tool_call><|im_end|>done<|im_end|>"
    );
    assert_eq!(learned(&tok, &ex[1].ids, &ex[1].trained), "6<|im_end|>");
    assert!(tok.decode(&ex[1].ids, false).unwrap().contains("<|im_start|>assistant\n4<|im_end|>"));
    assert_eq!(learned(&tok, &ex[2].ids, &ex[2].trained), " blue.<|im_end|>");
    assert_eq!(tok.decode(&ex[2].ids, false).unwrap(), "The sky is blue.<|im_end|>");
    assert_eq!(learned(&tok, &ex[3].ids, &ex[3].trained), "hello world<|im_end|>");
}

#[test]
fn bad_sft_rows_name_the_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let good = r#"{"text": "fine"}"#;
    let cases = [
        (
            r#"{"task_id": "t", "messages": [{"role": "user", "content": "x"}], "tokens": {"ids": [1, 999999], "source": "pa"}}"#,
            "tokens.ids[1] is 999999, outside the model's vocabulary of 1000",
        ),
        (r#"{"messages": [{"role": "user", "content": 5}]}"#, "field `messages[0].content`"),
        (r#"{"messages": [{"role": "robot", "content": "hi"}]}"#, "unknown variant `robot`"),
        (r#"{"prompt": "only"}"#, "prompt-only rows are for RL"),
        (r#"{"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}"#, "both be strings"),
        (
            r#"{"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]}"#,
            "no assistant message",
        ),
        (r#"{"question": "x", "answer": "y"}"#, "found the keys `question`, `answer`"),
        (r#"{"task_id": "t", "mesages": []}"#, "unknown field `mesages`"),
        (r#"[1, 2]"#, "expected a JSON object"),
        (r#"{"text": "cut"#, "cut short"),
    ];
    for (line, want) in cases {
        std::fs::write(&path, format!("{good}\n{line}\n")).unwrap();
        let e = format!("{:#}", read_rows(&path, 1000).unwrap_err());
        assert!(e.contains("bad.jsonl:2") && e.contains(want), "{e} should mention {want}");
    }
}
