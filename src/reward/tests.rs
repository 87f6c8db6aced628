//! The reward formula and the heuristic judge on hand-made episodes.

use serde_json::json;

use super::*;
use crate::agent::loops::Action;
use crate::chat::{Message, ToolCall};

const GOLD: &str = "--- a/calc/ops.py\n+++ b/calc/ops.py\n@@ -10,3 +10,3 @@ def clamp(x, lo, hi):\n-    if x >= hi:\n+    if x > hi:\n";
const OTHER: &str = "--- a/calc/io.py\n+++ b/calc/io.py\n@@ -1,1 +1,1 @@\n-print('a')\n+sys.stdout.write(\"b\")\n";

fn bash(c: &str) -> Action {
    Action::Bash { command: c.into() }
}

fn call(step: usize, warrant: f64, follow: f64) -> CallScore {
    CallScore { step, warrant, follow, note: None }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// An episode with these actions and patch against GOLD, with no format errors.
fn outcome<'a>(actions: &'a [Action], patch: &'a str, resolved: bool) -> Outcome<'a> {
    Outcome {
        actions,
        patch,
        gold_patch: GOLD,
        resolved,
        format_errors: 0,
        format_exit: false,
        noncanonical_calls: 0,
        tampered: 0,
    }
}

fn stage2() -> RewardConfig {
    RewardConfig {
        w_follow: 2.0,
        w_sim: 0.5,
        w_expert: 0.3,
        quota: QuotaConfig { no_call_penalty: -10.0, ..Default::default() },
        gate_follow: FollowGate { enabled: true, half_below: 0.5, zero_below: 0.25 },
        ..Default::default()
    }
}

#[test]
fn resolved_clean_episode_earns_one() {
    let acts = [bash("ls"), bash("cat a.py"), Action::Submit];
    let r = reward(&RewardConfig::default(), &outcome(&acts, GOLD, true), &[]);
    assert_eq!(
        (r.total, r.r_loop, r.r_follow, r.r_other, r.r_correct, r.r_sim, r.g_loop, r.g_follow),
        (1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0)
    );
    assert!(close(r.similarity, 1.0));
}

#[test]
fn a_correct_patch_cannot_hide_looping() {
    // 20 x ls: R_loop = -0.5 * (20 - 15 + 1) = -3; the run reaches zero_at 16, so g_loop = 0.
    let acts = [vec![bash("ls"); 20], vec![Action::Submit]].concat();
    let o = outcome(&acts, GOLD, true);
    let r = reward(&RewardConfig::default(), &o, &[]);
    assert_eq!((r.r_loop, r.g_loop, r.total, r.longest_run, r.looping), (-3.0, 0.0, -3.0, 20, true));
    // A run of 12 is free of penalty (below k1) but halves R_other (half_at 11).
    let acts = [vec![bash("ls"); 12], vec![Action::Submit]].concat();
    let r = reward(&RewardConfig::default(), &Outcome { actions: &acts, ..o }, &[]);
    assert_eq!((r.r_loop, r.g_loop, r.total), (0.0, 0.5, 0.5));
    // With the gate off the correct patch counts in full.
    let cfg = RewardConfig { gate_loop: LoopGate { enabled: false, ..Default::default() }, ..Default::default() };
    let r = reward(&cfg, &Outcome { actions: &acts, ..o }, &[]);
    assert_eq!(r.total, 1.0);
}

#[test]
fn similarity_term_for_unresolved_patches() {
    let acts = [bash("ls"), Action::Submit];
    let cfg = RewardConfig::default();
    // Far from the gold patch: R_sim = -1, R_other = 0.5 * -1.
    let r = reward(&cfg, &outcome(&acts, OTHER, false), &[]);
    assert_eq!((r.r_correct, r.r_sim, r.r_other, r.total), (0.0, -1.0, -0.5, -0.5));
    assert!(r.similarity < 0.5, "{}", r.similarity);
    // The right change that failed for another reason is similar enough: no R_sim penalty.
    let r = reward(&cfg, &outcome(&acts, GOLD, false), &[]);
    assert_eq!((r.r_sim, r.total), (0.0, 0.0));
    // No patch at all is dissimilar.
    let r = reward(&cfg, &outcome(&acts, "", false), &[]);
    assert_eq!(r.r_sim, -1.0);
}

#[test]
fn expert_terms_follow_the_formula() {
    let cfg = stage2();
    // ls, ask, ask (back to back), edit, ask, submit.
    let acts = [
        bash("ls"),
        Action::AskExpert,
        Action::AskExpert,
        bash("sed -i s/a/b/ x.py"),
        Action::AskExpert,
        Action::Submit,
    ];
    let calls = [call(1, 0.2, 0.2), call(2, 1.0, 0.9), call(4, 1.0, 0.7)];
    let r = reward(&cfg, &outcome(&acts, GOLD, true), &calls);
    // R_warrant: mean(-1, 0, 0) = -1/3; R_b2b = max(-1, -0.5 * 1); no quota term.
    assert!(close(r.r_warrant, -1.0 / 3.0), "{}", r.r_warrant);
    assert_eq!((r.back_to_back, r.r_b2b, r.r_quota, r.expert_calls), (1, -0.5, 0.0, 3));
    assert!(close(r.r_expert, -1.0 / 3.0 - 0.5));
    // R_follow over all but the last call: mean(-2 (0.2 < tau), 0.9) = -0.55.
    assert!(close(r.r_follow, -0.55), "{}", r.r_follow);
    // g_follow: mean follow of the judged calls 0.55 >= 0.5 -> 1.
    assert_eq!(r.g_follow, 1.0);
    let r_other = 1.0 + 0.3 * (-1.0 / 3.0 - 0.5);
    assert!(close(r.r_other, r_other));
    assert!(close(r.total, 0.0 + 2.0 * -0.55 + r_other), "{}", r.total);
    // min aggregation takes the worst call.
    let cfg_min = RewardConfig {
        warrant: WarrantConfig { aggregate: Aggregate::Min, ..Default::default() },
        follow: FollowConfig { aggregate: Aggregate::Min, ..Default::default() },
        ..stage2()
    };
    let r = reward(&cfg_min, &outcome(&acts, GOLD, true), &calls);
    assert_eq!((r.r_warrant, r.r_follow), (-1.0, -2.0));
    // Five back-to-back calls are capped at -1.
    let acts = [vec![Action::AskExpert; 6], vec![Action::Submit]].concat();
    let r = reward(&cfg, &outcome(&acts, GOLD, true), &[]);
    assert_eq!(r.r_b2b, -1.0);
}

#[test]
fn follow_gate_and_the_no_call_penalty() {
    let cfg = stage2();
    let acts = [bash("ls"), Action::AskExpert, bash("ls -la"), Action::AskExpert, Action::Submit];
    let o = outcome(&acts, GOLD, true);
    // Judged calls (all but the last) followed at 0.4: half gate; at 0.1: closed.
    let r = reward(&cfg, &o, &[call(1, 1.0, 0.4), call(3, 1.0, 1.0)]);
    assert_eq!((r.g_follow, r.r_follow), (0.5, -2.0));
    assert!(close(r.total, 2.0 * -2.0 + 0.5 * 1.0), "{}", r.total);
    let r = reward(&cfg, &o, &[call(1, 1.0, 0.1), call(3, 1.0, 1.0)]);
    assert_eq!(r.g_follow, 0.0);
    assert!(close(r.total, -4.0));
    // Stage II expects a call: -10 inside R_expert, weighted by w_expert.
    let acts = [bash("ls"), Action::Submit];
    let r = reward(&cfg, &Outcome { actions: &acts, ..o }, &[]);
    assert_eq!((r.r_quota, r.r_expert), (-10.0, -10.0));
    assert!(close(r.total, 1.0 + 0.3 * -10.0));
    // Calls over a quota cost over_penalty each.
    let cfg_q =
        RewardConfig { quota: QuotaConfig { max_calls: 1, over_penalty: -0.25, ..Default::default() }, ..stage2() };
    let r = reward(&cfg_q, &o, &[call(1, 1.0, 1.0), call(3, 1.0, 1.0)]);
    assert_eq!(r.r_quota, -0.25);
}

fn assistant(name: &str, args: serde_json::Value) -> Message {
    let mut m = Message::assistant("");
    m.tool_calls = vec![ToolCall::new(name, args)];
    m
}

fn tool(text: &str) -> Message {
    Message::tool(text)
}

fn judged(messages: &[Message]) -> Vec<CallScore> {
    let task: TaskInstance = serde_json::from_value(json!({
        "instance_id": "t", "repo": "r", "base_commit": "b", "problem_statement": "p", "patch": GOLD,
        "test_patch": "", "FAIL_TO_PASS": ["a"], "PASS_TO_PASS": [], "env": {"repo_path": "."}
    }))
    .unwrap();
    HeuristicJudge::default().judge(&task, messages).unwrap().calls
}

const ADVICE: &str = "Look at `calc/ops.py`, in `def clamp(x, lo, hi):`, around line 12. The `>=` there should be `>`.";

#[test]
fn heuristic_judge_scores_warrant_and_follow_through() {
    let head = vec![Message::system("s"), Message::user("u")];
    // Explored without trouble, asked, then edited the named file: warrant 0.25, follow 1.
    let m = [
        head.clone(),
        vec![
            assistant("bash", json!({"command": "ls"})),
            tool("calc tests"),
            assistant("ask_expert", json!({"query": "where?"})),
            tool(ADVICE),
            assistant(
                "str_replace_editor",
                json!({"command": "str_replace", "path": "/repo/calc/ops.py", "old_str": "a", "new_str": "b"}),
            ),
            tool("edited"),
            assistant("submit", json!({})),
        ],
    ]
    .concat();
    assert_eq!(judged(&m), vec![call(1, 0.25, 1.0)]);
    // Asked first thing (0), then only looked at the named function (0.5).
    let m = [
        head.clone(),
        vec![
            assistant("ask_expert", json!({"query": "help"})),
            tool(ADVICE),
            assistant("bash", json!({"command": "grep -n clamp calc/ops.py"})),
            tool("12: def clamp"),
        ],
    ]
    .concat();
    assert_eq!(judged(&m), vec![call(0, 0.0, 0.5)]);
    // Asked after a failing command (1), then did something unrelated (0); a second call
    // right after the first is unwarranted; submitting right after advice follows nothing.
    let m = [
        head,
        vec![
            assistant("bash", json!({"command": "python -m pytest"})),
            tool("1 failed\n[exit code 1]"),
            assistant("ask_expert", json!({"query": "why?"})),
            tool(ADVICE),
            assistant("bash", json!({"command": "pwd"})),
            tool("/repo"),
            assistant("ask_expert", json!({"query": "again?"})),
            tool(ADVICE),
            assistant("ask_expert", json!({"query": "and again?"})),
            tool(ADVICE),
            assistant("submit", json!({})),
        ],
    ]
    .concat();
    assert_eq!(judged(&m), vec![call(1, 1.0, 0.0), call(3, 0.25, 0.0), call(4, 0.0, 0.0)]);
}

#[test]
fn tampering_costs_even_a_resolved_episode() {
    let acts = [bash("ls"), Action::Submit];
    let clean = reward(&RewardConfig::default(), &outcome(&acts, GOLD, true), &[]);
    let tampered = Outcome { tampered: 2, ..outcome(&acts, GOLD, true) };
    let r = reward(&RewardConfig::default(), &tampered, &[]);
    assert_eq!((r.r_tamper, r.total), (-1.0, clean.total - 1.0));
    let off = RewardConfig { tampering_penalty: 0.0, ..Default::default() };
    assert_eq!(reward(&off, &tampered, &[]).total, clean.total);
    assert!(RewardConfig { tampering_penalty: 0.5, ..Default::default() }.validate().is_err());
}

#[test]
fn malformed_replies_cost_and_ending_on_them_costs_the_most() {
    let acts = [bash("ls")];
    let o = |n, exit| Outcome {
        actions: &acts,
        patch: "",
        gold_patch: GOLD,
        resolved: false,
        format_errors: n,
        format_exit: exit,
        noncanonical_calls: 0,
        tampered: 0,
    };
    let cfg = RewardConfig { w_sim: 0.0, ..Default::default() };
    assert_eq!(reward(&cfg, &o(0, false), &[]).r_format, 0.0);
    assert_eq!((reward(&cfg, &o(2, false), &[]).r_format, reward(&cfg, &o(2, false), &[]).total), (-1.0, -1.0));
    // Ending the episode on malformed replies is as bad as the worst loop.
    assert_eq!(reward(&cfg, &o(3, true), &[]).r_format, -10.0);
    let paper = RewardConfig { format_penalty: 0.0, format_exit: 0.0, ..cfg };
    assert_eq!(reward(&paper, &o(3, true), &[]).total, 0.0);
}

#[test]
fn calls_outside_the_canonical_form_cost_a_little() {
    let acts = [bash("ls"), bash("cat a.py"), Action::Submit];
    let canonical = reward(&RewardConfig::default(), &outcome(&acts, GOLD, true), &[]);
    let bare = Outcome { noncanonical_calls: 2, ..outcome(&acts, GOLD, true) };
    let r = reward(&RewardConfig::default(), &bare, &[]);
    assert!(close(r.r_format, -0.1) && close(r.total, canonical.total - 0.1), "{r:?}");
    // An accepted call still beats a refused one; ending on refusals is not made worse.
    let cfg = RewardConfig::default();
    assert!(cfg.noncanonical_penalty > cfg.format_penalty);
    let ended = Outcome { format_errors: 3, format_exit: true, ..bare };
    assert_eq!(reward(&cfg, &ended, &[]).r_format, cfg.format_exit);
    let off = RewardConfig { noncanonical_penalty: 0.0, ..Default::default() };
    assert_eq!(reward(&off, &bare, &[]).total, canonical.total);
    assert!(RewardConfig { noncanonical_penalty: 0.1, ..Default::default() }.validate().is_err());
    // Configurations written before the term existed still load, with the default.
    let old: RewardConfig = toml::from_str("format_penalty = -0.5\nformat_exit = -10.0").unwrap();
    assert_eq!(old.noncanonical_penalty, -0.05);
}

#[test]
fn helpers() {
    assert_eq!(
        advice_targets(ADVICE),
        (vec!["calc/ops.py".to_string()], vec!["clamp".to_string(), ">=".to_string(), ">".to_string()])
    );
    assert_eq!(parse_score("{\"score\": 0.75, \"reason\": \"ok\"}"), Some(0.75));
    assert_eq!(parse_score("{\"reason\": \"a score of 1 is too high\", \"score\": 0.25}"), Some(0.25));
    assert_eq!(parse_score("score: .5"), Some(0.5));
    assert_eq!(parse_score("I cannot tell."), None);
    assert_eq!(parse_score("Score: 1."), Some(1.0));
    assert_eq!(parse_score("I'd say 3"), Some(1.0));
    assert_eq!(parse_score("no idea"), None);
    assert!(close(patch_similarity(GOLD, GOLD), 1.0));
    assert!(patch_similarity(GOLD, OTHER) < 0.3);
    assert_eq!(patch_similarity("", GOLD), 0.0);
    let mut bad = RewardConfig { b2b_lambda: 0.5, ..Default::default() };
    assert!(bad.validate().is_err());
    bad.b2b_lambda = -0.5;
    bad.gate_loop.half_at = 20;
    assert!(bad.validate().is_err());
    assert!(RewardConfig::default().validate().is_ok() && stage2().validate().is_ok());
}
