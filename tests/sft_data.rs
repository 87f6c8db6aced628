//! Trajectories to SFT examples: chat-template tokenisation with the assistant mask, recorded
//! token ids used as is, and the length policy.

mod common;

use common::fixture;
use protege::agent::trajectory::{Source, TokenRecord, Trajectory};
use protege::chat::Message;
use protege::tokenizer::Tokenizer;
use protege::train::data::{build_examples, Overlong};

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
    let chat = traj(
        vec![Message::user("hi"), Message::assistant("hello there"), Message::user("again"), Message::assistant("ok")],
        None,
    );
    let recorded = traj(
        vec![Message::user("x")],
        Some(TokenRecord::new(
            vec![5, 6, 7, 8, 9],
            &[Source::Prompt, Source::Policy, Source::Observation, Source::Expert, Source::Policy],
        )),
    );
    let (ex, stats) = build_examples(&[chat.clone(), recorded], &tok, 512, Overlong::Drop).unwrap();
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
        build_examples(&[traj(vec![Message::user("only a question")], None)], &tok, 512, Overlong::Drop).unwrap();
    assert_eq!(s.dropped_nothing_to_learn, 1);
}
