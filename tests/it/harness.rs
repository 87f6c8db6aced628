//! The agent harness end to end: the sandbox's guarantees, the editor's confinement, grading,
//! a replay agent that follows the oracle expert, `protege eval`, and a local-model episode.

use std::path::Path;
use std::time::Duration;

use crate::common::fixture;
use protege::agent::episode::{run_episode, EpisodeConfig, ExitStatus};
use protege::agent::expert::{Expert, Oracle};
use protege::agent::policy::{LocalPolicy, Replay};
use protege::agent::tools::Editor;
use protege::sandbox::{bubblewrap_works, Isolation, Limits, LocalSandbox, Workspace};
use protege::tasks::grade::Grader;
use protege::tasks::{load_suite, TaskInstance};
use serde_json::json;

fn suite() -> Vec<TaskInstance> {
    load_suite(&fixture("tasks")).unwrap()
}

fn task(id: &str) -> TaskInstance {
    suite().into_iter().find(|t| t.instance_id == id).unwrap()
}

fn limits(timeout_s: f64) -> Limits {
    Limits { timeout_s, ..Default::default() }
}

/// A fresh sandbox of the calc repository; `None` (with a message) when bubblewrap is asked
/// for but cannot run on this machine.
fn sandbox(dir: &Path, isolation: Isolation, timeout_s: f64) -> Option<LocalSandbox> {
    if isolation == Isolation::Bubblewrap && !bubblewrap_works() {
        eprintln!("SKIPPED: bubblewrap is not installed or cannot create namespaces here");
        return None;
    }
    let t = task("calc__clamp-above");
    Some(
        LocalSandbox::create(
            &t.env.repo_path,
            &dir.join("work"),
            isolation,
            limits(timeout_s),
            vec![fixture("tasks")],
            &[],
        )
        .unwrap(),
    )
}

fn has_pytest() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-m", "pytest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: pytest is not installed (pip install pytest; .ci/run does)");
    }
    ok
}

#[test]
fn the_sandbox_isolates_commands() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(dir.path(), Isolation::Bubblewrap, 10.0) else { return };
    assert_eq!(sb.workdir(), "/repo");
    let run = |c: &str| sb.run(c).unwrap();
    // The work tree is writable, and its files are there.
    let out = run("echo hi > new.txt && cat new.txt && ls calc");
    assert_eq!(out.exit_code, Some(0), "{}", out.output);
    assert!(out.output.contains("hi") && out.output.contains("ops.py"));
    assert!(sb.host_root().join("new.txt").exists());
    // No network.
    let out = run("python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), timeout=3)'");
    assert_ne!(out.exit_code, Some(0), "network connect should fail: {}", out.output);
    assert!(out.output.contains("Network is unreachable") || out.output.contains("Errno"), "{}", out.output);
    // Nothing outside the work tree and /tmp is writable; /tmp is private.
    for target in ["/etc/protege-test", "/usr/protege-test", &format!("{}/escape", dir.path().display())] {
        let out = run(&format!("echo x > {target}"));
        assert_ne!(out.exit_code, Some(0), "writing {target} should fail");
    }
    assert!(!dir.path().join("escape").exists());
    assert_eq!(run("echo x > /tmp/private && cat /tmp/private").exit_code, Some(0));
    // The hidden suite (with the test patches) cannot be read.
    let hidden = fixture("tasks/tasks.jsonl");
    let out = run(&format!("cat {}", hidden.display()));
    assert_ne!(out.exit_code, Some(0), "hidden tests readable: {}", out.output);
    // Secrets in the environment do not reach commands.
    std::env::set_var("PROTEGE_TEST_API_KEY", "sk-secret");
    assert!(!run("env").output.contains("sk-secret"));
}

fn check_limits(isolation: Isolation) {
    let dir = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(dir.path(), isolation, 1.5) else { return };
    // A sleeping command is killed at the timeout.
    let out = sb.run("sleep 1000").unwrap();
    assert!(out.timed_out && out.seconds < 5.0, "{out:?}");
    assert!(out.output.contains("timed out"));
    // So is a tree of busy processes, children included: none lives on to leave a mark.
    let out = sb.run("for i in $(seq 1 64); do (sleep 2.5; touch late-$i) & done; while true; do :; done").unwrap();
    assert!(out.timed_out, "{out:?}");
    std::thread::sleep(Duration::from_secs(3));
    let late: Vec<_> = std::fs::read_dir(sb.host_root())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("late"))
        .collect();
    assert!(late.is_empty(), "{} background processes survived the timeout ({isolation:?})", late.len());
    // 10 MB of output is cut to head + tail with a marker.
    let out = sb.run("head -c 10000000 /dev/zero | tr '\\0' a; echo END").unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(out.output.len() < 20_000, "{} bytes kept", out.output.len());
    assert!(out.output.contains("bytes of output truncated") && out.output.trim_end().ends_with("END"));
    assert!(out.dropped_bytes > 9_900_000);
    // The memory limit (4 GiB of address space by default).
    let out = sb.run("python3 -c 'x = bytearray(6 << 30)'").unwrap();
    assert_ne!(out.exit_code, Some(0), "a 6 GiB allocation should fail: {}", out.output);
    assert!(out.output.contains("MemoryError"), "{}", out.output);
}

/// A real fork bomb, where the process limit applies (not as root: the kernel exempts root,
/// and an unbounded bomb would starve the machine before the timeout).
#[test]
fn a_fork_bomb_is_contained() {
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("SKIPPED: running as root, where RLIMIT_NPROC does not apply; the bounded process-tree test covers the timeout kill");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let isolation = if bubblewrap_works() { Isolation::Bubblewrap } else { Isolation::Plain };
    let limits = Limits { timeout_s: 3.0, max_processes: 256, ..Default::default() };
    let t = task("calc__clamp-above");
    let sb = LocalSandbox::create(&t.env.repo_path, &dir.path().join("work"), isolation, limits, vec![], &[]).unwrap();
    let out = sb.run(":(){ :|:& };:; sleep 100").unwrap();
    assert!(out.timed_out || out.exit_code.is_some(), "{out:?}");
    assert!(out.seconds < 10.0);
    // The machine still starts processes.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sb.run("echo alive").unwrap().output.trim(), "alive");
}

#[test]
fn limits_hold_under_bubblewrap() {
    check_limits(Isolation::Bubblewrap);
}

#[test]
fn limits_hold_for_plain_subprocesses() {
    check_limits(Isolation::Plain);
}

#[test]
fn the_editor_is_confined_to_the_work_tree_and_can_undo() {
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path(), Isolation::Plain, 10.0).unwrap();
    let root = sb.workdir();
    let mut ed = Editor::default();
    let mut edit = |args: serde_json::Value| ed.run(&sb, &args).unwrap();
    for bad in ["../../etc/passwd", "calc/../../x", "/etc/passwd"] {
        let r = edit(json!({"command": "view", "path": bad}));
        assert!(r.as_ref().is_err_and(|e| e.starts_with("Refused")), "{bad}: {r:?}");
    }
    std::os::unix::fs::symlink("/etc", sb.host_root().join("link")).unwrap();
    assert!(edit(json!({"command": "view", "path": "link/passwd"})).is_err());
    assert!(edit(json!({"command": "create", "path": "link/x", "file_text": "x"})).is_err());
    std::fs::remove_file(sb.host_root().join("link")).unwrap();

    let view = edit(json!({"command": "view", "path": format!("{root}/calc/ops.py"), "view_range": [5, 6]})).unwrap();
    assert!(view.contains("     5\t    if x > hi:\n     6\t        return lo\n"), "{view}");
    let r =
        edit(json!({"command": "str_replace", "path": "calc/ops.py", "old_str": "return lo", "new_str": "return hi"}));
    assert!(r.unwrap_err().contains("occurs 2 times"));
    let r = edit(
        json!({"command": "str_replace", "path": "calc/ops.py", "old_str": "        return lo\n    return x", "new_str": "        return hi\n    return x"}),
    );
    assert!(r.unwrap().contains("has been edited"));
    assert!(std::fs::read_to_string(sb.host_root().join("calc/ops.py")).unwrap().contains("return hi"));
    edit(json!({"command": "insert", "path": "calc/ops.py", "insert_line": 0, "new_str": "# top"})).unwrap();
    assert!(std::fs::read_to_string(sb.host_root().join("calc/ops.py")).unwrap().starts_with("# top\ndef clamp"));
    edit(json!({"command": "undo_edit", "path": "calc/ops.py"})).unwrap();
    edit(json!({"command": "undo_edit", "path": "calc/ops.py"})).unwrap();
    assert!(sb.diff(1 << 20).unwrap().is_empty(), "two undos restore the base");
    assert!(edit(json!({"command": "create", "path": "calc/ops.py", "file_text": ""}))
        .unwrap_err()
        .contains("already exists"));
    edit(json!({"command": "create", "path": "notes/todo.md", "file_text": "fix clamp\n"})).unwrap();
    assert!(sb.diff(1 << 20).unwrap().contains("+++ b/notes/todo.md"));
    let listing = edit(json!({"command": "view", "path": "."})).unwrap();
    assert!(listing.contains("calc/ops.py"), "{listing}");
    // Undoing a create deletes the file.
    edit(json!({"command": "undo_edit", "path": "notes/todo.md"})).unwrap();
    assert!(!sb.host_root().join("notes/todo.md").exists());
    // A dangling symlink to a host path cannot be used to create that file.
    let outside = dir.path().join("outside.txt");
    std::os::unix::fs::symlink(&outside, sb.host_root().join("dangling")).unwrap();
    let r = edit(json!({"command": "create", "path": "dangling", "file_text": "x"}));
    assert!(r.as_ref().is_err_and(|e| e.contains("dangling")), "{r:?}");
    assert!(!outside.exists());
    std::fs::remove_file(sb.host_root().join("dangling")).unwrap();
    // A FIFO is refused instead of blocking the harness.
    assert_eq!(sb.run("mkfifo pipe").unwrap().exit_code, Some(0));
    let r = edit(json!({"command": "view", "path": "pipe"}));
    assert!(r.is_err(), "{r:?}");
    std::fs::remove_file(sb.host_root().join("pipe")).unwrap();
    // Line endings survive an insert.
    std::fs::write(sb.host_root().join("dos.txt"), "a\r\nb\r\n").unwrap();
    edit(json!({"command": "insert", "path": "dos.txt", "insert_line": 1, "new_str": "x"})).unwrap();
    assert_eq!(std::fs::read_to_string(sb.host_root().join("dos.txt")).unwrap(), "a\r\nx\r\nb\r\n");
}

/// The agent controls the work tree's `.git` (config, hooks, filters): none of it may run on
/// the host when the harness takes the diff.
#[test]
fn the_agents_git_config_never_runs_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path(), Isolation::Plain, 10.0).unwrap();
    let marker = dir.path().join("pwned");
    let script = format!(
        "git config filter.x.clean 'touch {m}; cat' && git config core.fsmonitor 'touch {m}' && \
         printf '#!/bin/sh\\ntouch {m}\\n' > .git/hooks/pre-commit && chmod +x .git/hooks/pre-commit && \
         echo '* filter=x' > .gitattributes && echo changed >> calc/ops.py",
        m = marker.display()
    );
    let out = sb.run(&script).unwrap();
    assert_eq!(out.exit_code, Some(0), "{}", out.output);
    // The agent's own git works (and may run its own filter inside its command: that is its business).
    let _ = std::fs::remove_file(&marker);
    let diff = sb.diff(1 << 20).unwrap();
    assert!(diff.contains("+changed") && diff.contains(".gitattributes"), "{diff}");
    assert!(!diff.contains(".git/"), "the agent's repository is not part of the patch");
    assert!(!marker.exists(), "a filter, hook or fsmonitor of the agent ran on the host");
}

fn fix_replies(root: &str) -> Vec<String> {
    vec![
        Replay::call("Let me ask for a pointer.", "ask_expert", json!({"query": "Where is the clamp bug?"})),
        Replay::call(
            "The expert says `lo` should be `hi` in the upper branch.",
            "str_replace_editor",
            json!({"command": "str_replace", "path": format!("{root}/calc/ops.py"),
                   "old_str": "    if x > hi:\n        return lo", "new_str": "    if x > hi:\n        return hi"}),
        ),
        Replay::call(
            "Check.",
            "bash",
            json!({"command": "python3 -c 'from calc.ops import clamp; print(clamp(42, 0, 10))'"}),
        ),
        Replay::call("Done.", "submit", json!({})),
    ]
}

#[test]
fn a_replay_agent_following_the_oracle_resolves_a_task_and_a_wrong_patch_does_not() {
    if !has_pytest() {
        return;
    }
    let t = task("calc__clamp-above");
    let isolation = if bubblewrap_works() { Isolation::Bubblewrap } else { Isolation::Plain };
    let dir = tempfile::tempdir().unwrap();
    let sb = LocalSandbox::create(
        &t.env.repo_path,
        &dir.path().join("work"),
        isolation,
        limits(30.0),
        vec![fixture("tasks")],
        &[],
    )
    .unwrap();
    let mut policy = Replay::new(fix_replies(&sb.workdir()));
    let mut oracle = Oracle;
    let ep = run_episode(&t, &sb, &mut policy, Some(&mut oracle as &mut dyn Expert), &EpisodeConfig::default());
    assert_eq!(ep.exit_status, ExitStatus::Submitted, "{:?}", ep.error);
    assert_eq!(ep.expert_calls.len(), 1);
    assert!(ep.expert_calls[0].reply.contains("The `lo` there should be `hi`"), "{}", ep.expert_calls[0].reply);
    assert_eq!(ep.messages[3].name.as_deref(), Some("ask_expert"), "the expert's reply is marked");
    assert!(ep.messages.iter().any(|m| m.text().trim() == "10"), "the check ran in the sandbox");
    assert!(ep.patch.contains("+        return hi"), "{}", ep.patch);
    let report = Grader::new(isolation, limits(120.0), Default::default())
        .grade(&t, &ep.patch, &dir.path().join("grade"))
        .unwrap();
    assert!(report.resolved, "{report:#?}");
    assert!(!dir.path().join("grade").exists(), "grading cleans up");
    assert!(!dir.path().join("grade.harness-git").exists(), "grading cleans up its harness repository");

    // The same episode without the fix: unresolved, the hidden test named as failing.
    let wrong = ep.patch.replace("return hi", "return x");
    let report =
        Grader::new(isolation, limits(120.0), Default::default()).grade(&t, &wrong, &dir.path().join("grade")).unwrap();
    assert!(!report.resolved);
    assert_eq!(
        report.fail_to_pass["tests/test_clamp_above.py::test_clamp_above"],
        protege::tasks::grade::TestStatus::Failed
    );
    // No patch at all, and a patch that does not apply.
    assert!(
        !Grader::new(isolation, limits(120.0), Default::default())
            .grade(&t, "", &dir.path().join("grade"))
            .unwrap()
            .resolved
    );
    let broken = Grader::new(isolation, limits(120.0), Default::default())
        .grade(&t, "--- a/nope.py\n+++ b/nope.py\n@@ -1 +1 @@\n-a\n+b\n", &dir.path().join("grade"))
        .unwrap();
    assert!(!broken.resolved && !broken.patch_applied);
}

#[test]
fn limits_end_episodes_with_named_statuses() {
    let t = task("calc__clamp-above");
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path(), Isolation::Plain, 10.0).unwrap();
    let cfg = EpisodeConfig { max_steps: 2, expert_quota: 1, ..Default::default() };
    let ls = || Replay::call("", "bash", json!({"command": "ls"}));
    let run = |replies: Vec<String>, cfg: &EpisodeConfig| {
        let mut oracle = Oracle;
        run_episode(&t, &sb, &mut Replay::new(replies), Some(&mut oracle as &mut dyn Expert), cfg)
    };
    assert_eq!(run(vec![ls(), ls(), ls()], &cfg).exit_status, ExitStatus::StepLimit);
    let bad = vec![
        "no call".to_string(),
        "<tool_call>{oops</tool_call>".into(),
        "<tool_call>{\"name\": \"rm\"}</tool_call>".into(),
    ];
    let ep = run(bad, &cfg);
    assert_eq!((ep.exit_status, ep.format_errors), (ExitStatus::FormatErrors, 3));
    assert!(ep.messages[3].text().contains("has no tool call") && ep.messages[5].text().contains("not valid JSON"));
    let ask = || Replay::call("", "ask_expert", json!({"query": "help"}));
    assert_eq!(run(vec![ask(), ask()], &cfg).exit_status, ExitStatus::ExpertQuota);
    let ep = run(vec![], &cfg);
    assert_eq!(ep.exit_status, ExitStatus::Error);
    assert!(ep.error.unwrap().contains("no more recorded replies"));
    let tight = EpisodeConfig { context_tokens: 10, ..cfg.clone() };
    assert_eq!(run(vec![ls()], &tight).exit_status, ExitStatus::ContextLimit);
    let quick = EpisodeConfig { episode_timeout_s: 0.0, ..cfg };
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(run(vec![ls()], &quick).exit_status, ExitStatus::Timeout);
}

#[test]
fn an_agent_writing_bare_json_calls_works_its_task_and_the_forms_are_recorded() {
    let t = task("calc__clamp-above");
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path(), Isolation::Plain, 10.0).unwrap();
    // What Qwen2.5-Coder-0.5B writes: the call object alone or after a thought, no tags.
    let look = r#"{"name": "bash", "arguments": {"command": "cat calc/ops.py"}}"#;
    let replies = vec![
        format!("{look}\n{}", r#"{"name": "submit", "arguments": {}}"#),
        look.to_string(),
        r#"The upper branch returns lo. {"name": "str_replace_editor", "arguments": {"command": "str_replace",
            "path": "calc/ops.py", "old_str": "    if x > hi:\n        return lo",
            "new_str": "    if x > hi:\n        return hi"}}"#
            .to_string(),
        "<function=bash>\n<parameter=command>\nls calc\n</parameter>\n</function>".into(),
        Replay::call("Done.", "submit", json!({})),
    ];
    let ep = run_episode(&t, &sb, &mut Replay::new(replies), None, &EpisodeConfig::default());
    assert_eq!((ep.exit_status, ep.format_errors), (ExitStatus::Submitted, 1), "{:?}", ep.error);
    // Two different calls in one reply are refused, and the model is told why.
    assert!(ep.messages[3].text().contains("not clear what to run"), "{}", ep.messages[3].text());
    assert!(ep.messages.iter().any(|m| m.text().contains("return lo")), "cat ran");
    assert_eq!(ep.messages[6].text(), "The upper branch returns lo.");
    assert!(ep.patch.contains("+        return hi"), "{}", ep.patch);
    use protege::agent::toolcall::CallForm::{BareJson, FunctionTag, Tagged};
    assert_eq!(ep.reply_forms, vec![None, Some(BareJson), Some(BareJson), Some(FunctionTag), Some(Tagged)]);
    let meta = ep.to_trajectory(Some(true), Default::default()).meta;
    assert_eq!(meta["call_forms"], json!({"tagged": 1, "bare_json": 2, "function_tag": 1}));
    assert_eq!(meta["reply_forms"][1], "bare_json");
    // The reward still teaches the canonical form.
    assert_eq!(protege::reward::Outcome::of(&ep, &t, true).noncanonical_calls, 3);
}

#[test]
fn protege_eval_runs_a_suite_and_writes_trajectories_and_a_summary() {
    if !has_pytest() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Without bubblewrap the work tree's path is not known in advance: use relative paths.
    let path_root = if bubblewrap_works() { "/repo" } else { "." };
    let replies = json!({
        "calc__clamp-above": fix_replies(path_root),
        "calc__running-total-first": [
            // The suite (gold patches, clean snapshots) must not be readable from the sandbox.
            Replay::call("Peek.", "bash", json!({"command": format!("ls {}/repos", fixture("tasks").display())})),
            Replay::call("Give up.", "submit", json!({})),
        ],
    });
    let replay = dir.path().join("replay.json");
    std::fs::write(&replay, replies.to_string()).unwrap();
    let out = dir.path().join("out");
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["eval", "--suite", fixture("tasks").to_str().unwrap(), "--policy", "replay", "--replay"])
        .arg(&replay)
        .args(["--expert", "oracle", "--concurrency", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["tasks"], 2);
    assert_eq!(summary["resolved"], 1);
    assert_eq!(summary["pass_at_1"], 0.5);
    assert_eq!(summary["expert_calls_per_task"], 0.5);
    assert_eq!(summary["exit_statuses"]["submitted"], 2);
    assert!(std::fs::read_to_string(out.join("summary.md")).unwrap().contains("| resolved (Pass@1) | 1 (50.0%) |"));
    let lines: Vec<protege::agent::trajectory::Trajectory> = std::fs::read_to_string(out.join("trajectories.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let solved = lines.iter().find(|t| t.task_id == "calc__clamp-above").unwrap();
    assert_eq!((solved.resolved, solved.expert_calls), (Some(true), 1));
    assert_eq!(solved.meta["grade"]["resolved"], true);
    assert_eq!(solved.meta["exit_status"], "submitted");
    if bubblewrap_works() {
        let peek = lines.iter().find(|t| t.task_id == "calc__running-total-first").unwrap();
        let listing = peek.messages[3].text();
        assert!(!listing.contains("calc"), "the suite is visible in the sandbox: {listing}");
    }
    // The trajectories are valid SFT input.
    for t in &lines {
        t.validate().unwrap();
    }

    // A second eval into the same --out is refused; --resume keeps the finished tasks and
    // runs only the missing one; another policy cannot resume it; --overwrite starts again.
    let eval = |extra: &[&str], replay: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_protege"))
            .args(["eval", "--suite", fixture("tasks").to_str().unwrap(), "--policy", "replay", "--replay"])
            .arg(replay)
            .args(["--expert", "oracle", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let before = std::fs::read_to_string(out.join("summary.json")).unwrap();
    let again = eval(&[], &replay);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains("is not empty") && err.contains("--resume"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("summary.json")).unwrap(), before, "the first results were touched");
    // Forget the unsolved task as if the run had been killed before it finished (its result
    // line gone; its trajectory line stays and must be dropped).
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let kept: String = results.lines().filter(|l| l.contains("calc__clamp-above")).map(|l| format!("{l}\n")).collect();
    std::fs::write(out.join("results.jsonl"), kept).unwrap();
    let resumed = eval(&["--resume"], &replay);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success() && err.contains("1 of 2 tasks already done"), "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!((summary["tasks"].as_u64(), summary["resolved"].as_u64()), (Some(2), Some(1)));
    let trajectories = std::fs::read_to_string(out.join("trajectories.jsonl")).unwrap();
    assert_eq!(trajectories.lines().count(), 2, "one line per task after a resume");
    assert_eq!(std::fs::read_to_string(out.join("predictions.jsonl")).unwrap().lines().count(), 2);
    let other = dir.path().join("other.json");
    std::fs::write(&other, replies.to_string()).unwrap();
    let mismatch = eval(&["--resume"], &other);
    let err = String::from_utf8_lossy(&mismatch.stderr);
    assert!(!mismatch.status.success() && err.contains("cannot resume") && err.contains("policy replay:"), "{err}");
    let fresh = eval(&["--overwrite", "--tasks", "calc__clamp-above"], &other);
    assert!(fresh.status.success(), "{}", String::from_utf8_lossy(&fresh.stderr));
    assert_eq!(std::fs::read_to_string(out.join("trajectories.jsonl")).unwrap().lines().count(), 1);
}

#[test]
fn a_local_model_runs_an_episode_with_consistent_tokens() {
    use protege::agent::trajectory::Source;
    let (be, mut model) = crate::common::load("tiny");
    // The fixture declares a short context; RoPE has no such limit, and the prompt needs more.
    model.cfg.max_position_embeddings = 8192;
    let tok = protege::tokenizer::Tokenizer::from_dir(&fixture("tiny")).unwrap();
    let t = task("calc__clamp-above");
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path(), Isolation::Plain, 10.0).unwrap();
    let sampling = protege::backend::SamplingParams { temperature: 1.0, ..Default::default() };
    let mut policy = LocalPolicy::new(&be, &model, &tok, sampling, 5);
    policy.max_new_tokens = 24;
    let cfg = EpisodeConfig { max_steps: 5, ..Default::default() };
    let ep = run_episode(&t, &sb, &mut policy, None, &cfg);
    assert_eq!(ep.exit_status, ExitStatus::FormatErrors, "{:?}", ep.error);
    let rec = ep.tokens.clone().expect("the local policy records tokens");
    let sources = rec.sources().unwrap();
    assert_eq!(sources.len(), rec.ids.len());
    // The prompt is the chat template's rendering of the first two messages.
    let prompt = tok.chat_text(&ep.messages[..2], &ep.tools, true).unwrap();
    let n_prompt = sources.iter().take_while(|s| **s == Source::Prompt).count();
    assert_eq!(rec.ids[..n_prompt], tok.encode(&prompt).unwrap()[..]);
    // Each run of policy tokens is exactly what became an assistant message.
    let mut spans = vec![];
    let mut i = 0;
    while i < sources.len() {
        let j = (i..sources.len()).find(|&j| sources[j] != sources[i]).unwrap_or(sources.len());
        spans.push((sources[i], i, j));
        i = j;
    }
    let policy_spans: Vec<_> = spans.iter().filter(|s| s.0 == Source::Policy).collect();
    let assistant: Vec<_> = ep.messages.iter().filter(|m| m.role == protege::chat::Role::Assistant).collect();
    assert_eq!(policy_spans.len(), assistant.len());
    for ((_, a, b), m) in policy_spans.iter().zip(&assistant) {
        assert_eq!(tok.decode(&rec.ids[*a..*b], true).unwrap(), m.text());
    }
    assert_eq!(policy_spans.iter().map(|(_, a, b)| b - a).sum::<usize>(), ep.policy_tokens);
    // The whole record decodes to the conversation in the template's layout. Assistant
    // messages hold the reply without special tokens (the ids keep them all).
    let text = tok.decode(&rec.ids, false).unwrap();
    let plain = tok.decode(&rec.ids, true).unwrap();
    for m in &ep.messages[1..] {
        let whole = if m.role == protege::chat::Role::Assistant { &plain } else { &text };
        assert!(whole.contains(m.text()), "{:?} missing", m.text());
    }
    assert_eq!(text.matches("<|im_start|>assistant\n").count(), assistant.len());
}

/// A generated task's bug is its `env.base_patch`: the episode's work tree (not only grading)
/// must start from it.
#[test]
fn episodes_start_from_the_base_patch() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = task("calc__clamp-above");
    t.env.base_patch = Some(
        "diff --git a/BUG.txt b/BUG.txt\nnew file mode 100644\n--- /dev/null\n+++ b/BUG.txt\n@@ -0,0 +1 @@\n+injected\n".into(),
    );
    t.extra.clear();
    let suite = dir.path().join("suite.jsonl");
    std::fs::write(&suite, serde_json::to_string(&t).unwrap() + "\n").unwrap();
    let replay = dir.path().join("replay.json");
    let replies = json!({"calc__clamp-above": [
        Replay::call("", "bash", json!({"command": "cat BUG.txt"})),
        Replay::call("", "submit", json!({})),
    ]});
    std::fs::write(&replay, replies.to_string()).unwrap();
    let out = dir.path().join("out");
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["eval", "--suite", suite.to_str().unwrap(), "--policy", "replay", "--replay", replay.to_str().unwrap()])
        .args(["--expert", "none", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let line = std::fs::read_to_string(out.join("trajectories.jsonl")).unwrap();
    let traj: protege::agent::trajectory::Trajectory = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(traj.messages[3].text().trim(), "injected", "{:?}", traj.messages[3]);
    assert!(!traj.meta["patch"].as_str().unwrap().contains("BUG.txt"), "the base is not part of the agent's patch");
}

#[test]
fn a_work_tree_that_grows_past_its_limits_ends_the_episode() {
    let dir = tempfile::tempdir().unwrap();
    let isolation = if bubblewrap_works() { Isolation::Bubblewrap } else { Isolation::Plain };
    let t = task("calc__clamp-above");
    let small = Limits { work_tree_mib: 1, work_tree_files: 50, ..limits(20.0) };
    let make = |name: &str| {
        LocalSandbox::create(&t.env.repo_path, &dir.path().join(name), isolation, small, vec![], &[]).unwrap()
    };
    // Bytes: 2 MB in one file.
    let sb = make("bytes");
    assert!(sb.run("head -c 500000 /dev/zero > ok.bin").is_ok(), "under the limit");
    let err = sb.run("head -c 2000000 /dev/zero > big.bin").unwrap_err();
    let over = err.downcast_ref::<protege::sandbox::PatchTooLarge>().expect("a PatchTooLarge");
    assert!(over.amount > 1 << 20 && over.to_string().contains("new bytes"), "{over}");
    // The diff refuses too, before adding anything to the harness repository.
    assert!(sb.diff(1 << 30).unwrap_err().downcast_ref::<protege::sandbox::PatchTooLarge>().is_some());
    // Files: 60 empty ones.
    let sb = make("files");
    let err = sb.run("mkdir d && for i in $(seq 1 60); do : > d/$i; done").unwrap_err();
    assert!(err.to_string().contains("new files and directories"), "{err}");
    // An episode ends with a named status.
    let sb = make("episode");
    let mut policy = Replay::new(vec![
        Replay::call("Fill.", "bash", json!({"command": "head -c 3000000 /dev/zero > big.bin"})),
        Replay::call("Done.", "submit", json!({})),
    ]);
    let ep = run_episode(&t, &sb, &mut policy, None, &EpisodeConfig::default());
    assert_eq!(ep.exit_status, ExitStatus::PatchTooLarge);
    assert!(ep.patch.is_empty() && ep.error.unwrap().contains("new bytes"));
}
