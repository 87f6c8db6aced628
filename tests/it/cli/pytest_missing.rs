//! A machine whose `python3` lacks pytest (and cannot install it): every command that grades
//! says so up front in one line that names the interpreter and the command to install it,
//! before any episode, instead of grading every task as "cannot run".

use std::path::Path;
use std::process::Command;

use crate::common::fixture;

/// A directory with a `python3` that has no pytest and no pip to install it with (any call
/// that names pytest fails as a missing module does); anything else goes to the real one.
fn python_without_pytest(dir: &Path) -> String {
    let real = Command::new("sh").args(["-c", "command -v python3"]).output().unwrap();
    let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
    let shim = dir.join("python3");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\ncase \"$*\" in *pytest*) echo \"$0: No module named pytest\" >&2; exit 1;; esac\nexec {real} \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{}:{path}", dir.display())
}

fn run(path: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_protege")).env("PATH", path).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn eval_and_validate_say_once_that_pytest_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = python_without_pytest(dir.path());
    let suite = fixture("tasks");
    let replay = dir.path().join("replay.json");
    std::fs::write(&replay, "{}").unwrap();
    let out = dir.path().join("eval");
    let commands: [Vec<&str>; 2] = [
        vec!["tasks", "validate", suite.to_str().unwrap(), "--runs", "1"],
        vec![
            "eval",
            "--suite",
            suite.to_str().unwrap(),
            "--policy",
            "replay",
            "--replay",
            replay.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    ];
    for args in commands {
        let (ok, err) = run(&path, &args);
        assert!(!ok, "{args:?}: {err}");
        let said = "the test command cannot run: pytest is not installed for `python3`";
        assert_eq!(err.matches(said).count(), 1, "{args:?}: {err}");
        assert!(err.contains("`python3 -m pip install --user pytest`"), "{args:?}: {err}");
        // It tried to install it first, as `protege train` does.
        assert!(err.contains("grading needs pytest, which is not installed for `python3`: running"), "{err}");
        assert!(!err.contains("Missing"), "{args:?}: {err}");
        let episodes = std::fs::read_to_string(out.join("trajectories.jsonl")).unwrap_or_default();
        assert!(episodes.is_empty(), "no episode ran: {episodes}");
    }
}
