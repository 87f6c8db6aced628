//! An evaluation stopped by a signal: with SIGTERM it kills the running command, removes
//! every work tree and cgroup, writes the summary of the episodes that finished and exits
//! 128 + 15; with SIGKILL nothing of its sandboxes outlives it, and the next run removes
//! the work trees and cgroups it left.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fixture;
use protege::agent::policy::Replay;
use protege::agent::sandbox::cgroup::{support, Support};
use serde_json::json;

fn replies(sleep_marker: &str) -> serde_json::Value {
    json!({
        "calc__clamp-above": [Replay::call("Done.", "submit", json!({}))],
        "calc__running-total-first": [
            Replay::call("Wait.", "bash", json!({"command": format!("touch /repo/.started && sleep {sleep_marker}")})),
            Replay::call("Done.", "submit", json!({})),
        ],
    })
}

fn start(dir: &Path, tmp: &Path, sleep_marker: &str) -> std::process::Child {
    let replay = dir.join("replay.json");
    std::fs::write(&replay, replies(sleep_marker).to_string()).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["eval", "--suite", fixture("tasks").to_str().unwrap(), "--policy", "replay", "--replay"])
        .arg(&replay)
        .args(["--expert", "none", "--concurrency", "1", "--command-timeout", "120", "--out"])
        .arg(dir.join("out"))
        .env("TMPDIR", tmp)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the first task is written and the second one's command runs (past
/// bubblewrap's setup: a SIGKILL during those milliseconds can orphan that one command, which
/// the next run's cgroup sweep kills).
fn wait_for_the_sleep(dir: &Path, tmp: &Path, sleep_marker: &str) {
    let started = Instant::now();
    loop {
        let first_done =
            std::fs::read_to_string(dir.join("out/trajectories.jsonl")).is_ok_and(|t| t.lines().count() == 1);
        let running = work_dirs(tmp)
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .any(|e| e.path().join(".started").exists());
        if first_done && running && !processes_with(sleep_marker).is_empty() {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the eval never reached its second task");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pids whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&format!("sleep {marker}")))
        })
        .collect()
}

fn work_dirs(tmp: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(tmp.join(format!("protege-work-{}", unsafe { libc::getuid() })))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// This machine's sandbox cgroups of process `pid`.
fn cgroups_of(pid: u32) -> Vec<PathBuf> {
    let parents: Vec<PathBuf> = match support() {
        Support::V1 { memory, pids } => memory.iter().chain(pids).cloned().collect(),
        Support::V2 { parent } => vec![parent.clone()],
        Support::Unavailable(_) => vec![],
    };
    parents
        .iter()
        .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("protege-{pid}-")))
        .collect()
}

fn gone_within(what: impl Fn() -> bool, secs: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// An eval in its own directories, past its first task and into its second one's command.
fn running_eval(tag: &str) -> (tempfile::TempDir, PathBuf, String, std::process::Child) {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let marker = format!("{}.{tag}", 100 + std::process::id() % 100);
    let child = start(dir.path(), &tmp, &marker);
    wait_for_the_sleep(dir.path(), &tmp, &marker);
    (dir, tmp, marker, child)
}

#[test]
fn a_stopped_eval_cleans_up_and_a_killed_one_is_cleaned_up_by_the_next() {
    if !protege::agent::sandbox::bubblewrap_works() {
        eprintln!("SKIPPED: bubblewrap is not usable here (.ci/run installs it)");
        return;
    }
    // SIGTERM: a clean stop.
    let (dir, tmp, marker, mut child) = running_eval("25");
    let pid = child.id();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?} to stop", t.elapsed());
    assert_eq!(status.code(), Some(128 + 15), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/summary.json")).unwrap()).unwrap();
    assert_eq!((summary["tasks"].as_u64(), summary["interrupted"].as_bool()), (Some(1), Some(true)), "{summary}");
    assert_eq!(summary["results"][0]["task_id"], "calc__clamp-above");
    assert!(std::fs::read_to_string(dir.path().join("out/summary.md")).unwrap().contains("Interrupted"));
    assert!(work_dirs(&tmp).is_empty(), "work trees left: {:?}", work_dirs(&tmp));
    assert!(gone_within(|| processes_with(&marker).is_empty(), 5), "the sandboxed command survived");
    assert!(cgroups_of(pid).is_empty(), "cgroups left: {:?}", cgroups_of(pid));

    // SIGKILL: nothing can run in the killed process; its sandbox dies with it, and the next
    // run removes what it left.
    let (dir, tmp, marker, mut child) = running_eval("75");
    let pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(gone_within(|| processes_with(&marker).is_empty(), 5), "the sandboxed command outlived protege");
    assert!(!work_dirs(&tmp).is_empty(), "a killed run cannot clean up; this test expects its leftovers");
    if !matches!(support(), Support::Unavailable(_)) {
        assert!(!cgroups_of(pid).is_empty(), "a killed run cannot remove its cgroups; this test expects them");
    }
    let replay = dir.path().join("quick.json");
    std::fs::write(&replay, json!({"calc__clamp-above": [Replay::call("Done.", "submit", json!({}))]}).to_string())
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["eval", "--suite", fixture("tasks").to_str().unwrap(), "--policy", "replay", "--replay"])
        .arg(&replay)
        .args(["--expert", "none", "--tasks", "calc__clamp-above", "--out"])
        .arg(dir.path().join("out2"))
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(work_dirs(&tmp).is_empty(), "stale work trees not removed: {:?}", work_dirs(&tmp));
    assert!(cgroups_of(pid).is_empty(), "stale cgroups not removed: {:?}", cgroups_of(pid));
}
