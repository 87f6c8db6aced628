//! Which pytest runs a suite's tests: the interpreter a test command names, the pytest it
//! has, and — before any episode of eval, synth, RL or validation — that it has one.
//!
//! The system `python3` gets pytest installed for the user when it lacks it (announced, as
//! `protege train` always did); any other interpreter (a task's venv) is one error naming it
//! and the command that installs pytest there.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{bail, Result};

use super::grade::CANNOT_RUN;
use super::instance::TaskInstance;

/// The interpreter of a `[VAR=value ...] PYTHON -m pytest ...` command, or `None` when the
/// command runs pytest some other way (a script, `pytest` itself, a `cd` first).
pub fn interpreter(test_cmd: &str) -> Option<&str> {
    let words: Vec<&str> = test_cmd.split_whitespace().skip_while(|w| is_assignment(w)).collect();
    match words.as_slice() {
        [python, "-m", "pytest", ..] => Some(python),
        _ => None,
    }
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

/// What `python` says of pytest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// pytest's version.
    Installed(String),
    /// The interpreter runs but cannot import pytest.
    Missing,
    /// The interpreter does not run: why.
    NoInterpreter(String),
    /// Importing pytest fails otherwise: the error's last line.
    Broken(String),
}

/// Asks `python` for its pytest's version, from a fresh private directory: no conftest or
/// configuration is read, and nothing another user planted (a `/tmp/pytest.py`) is imported
/// (`-c` puts the working directory first on `sys.path`; protege often runs as root).
pub fn probe(python: &str) -> Probe {
    let Ok(private) = tempfile::tempdir() else {
        return Probe::Broken("cannot create a temporary directory to ask pytest its version from".into());
    };
    let out = Command::new(python)
        .args(["-c", "import sys; sys.path.pop(0); import pytest; print(pytest.__version__)"])
        .current_dir(private.path())
        .output();
    match out {
        Err(e) => Probe::NoInterpreter(e.to_string()),
        Ok(o) if o.status.success() => Probe::Installed(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => Probe::Missing,
        Ok(o) => Probe::Broken(String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").to_string()),
    }
}

/// The major version of `8.4.2`.
pub fn major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

/// What pytest prints when it cannot collect or run a suite at all.
const COLLECT_ERRORS: [&str; 5] = [
    "INTERNALERROR",
    "PluginValidationError",
    "unknown hook",
    "are declared in the hookimpl but can not be found in the hookspec",
    "ImportError while loading conftest",
];

/// Whether a pytest run that reported no passing test failed because pytest itself could not
/// collect or run the suite (its exit codes 2, 3 and 4; an internal error; a conftest or
/// plugin whose hooks this pytest rejects) rather than because tests failed.
pub fn cannot_collect(exit_code: Option<i32>, output: &str) -> bool {
    matches!(exit_code, Some(2..=4)) || COLLECT_ERRORS.iter().any(|s| output.contains(s))
}

/// What pytest said when it could not collect: the last line before the output's last that
/// names the error, and the last line.
pub fn collect_error(output: &str) -> String {
    let lines: Vec<&str> = output.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let Some((last, before)) = lines.split_last() else { return "no output".into() };
    let names = |l: &&&str| COLLECT_ERRORS.iter().chain(&["Interrupted:"]).any(|s| l.contains(s));
    match before.iter().rfind(names) {
        Some(n) => format!("{n} … {last}"),
        None => last.to_string(),
    }
}

/// The command that installs pytest for `python`.
fn install_command(python: &str) -> String {
    format!("{python} -m pip install --user pytest")
}

/// Installs pytest for the user's `python3` (announced); the same fallbacks as `.ci/run`.
fn install_for_user(python: &str) -> bool {
    eprintln!("grading needs pytest, which is not installed for `{python}`: running `{}`", install_command(python));
    for extra in [&[][..], &["--break-system-packages"][..]] {
        let ok = Command::new(python)
            .args(["-m", "pip", "install", "--quiet", "--user", "pytest"])
            .args(extra)
            .status()
            .is_ok_and(|s| s.success());
        if ok && matches!(probe(python), Probe::Installed(_)) {
            return true;
        }
    }
    false
}

/// Makes sure the system `python3` has pytest (installing it for the user when missing), as
/// `protege train` does before any stage that grades.
pub fn ensure_system() -> Result<()> {
    ensure_interpreter("python3", "python3 -m pytest", "")
}

fn ensure_interpreter(python: &str, test_cmd: &str, task: &str) -> Result<()> {
    match probe(python) {
        Probe::Installed(_) => Ok(()),
        Probe::NoInterpreter(why) => {
            bail!("{CANNOT_RUN}: its program was not found (`{test_cmd}`{task}: {why})")
        }
        Probe::Broken(why) => bail!("{CANNOT_RUN}: `{python}` cannot import pytest (`{test_cmd}`{task}): {why}"),
        Probe::Missing if python == "python3" && install_for_user(python) => Ok(()),
        Probe::Missing => bail!(
            "{CANNOT_RUN}: pytest is not installed for `{python}` (the interpreter of `{test_cmd}`{task}); install it \
             with `{}` and run again",
            if python == "python3" { install_command(python) } else { format!("{python} -m pip install pytest") }
        ),
    }
}

/// Makes sure every interpreter that `tasks` (the local ones: docker tasks bring their own)
/// run pytest with has it, before any episode: one line that names the interpreter and the
/// command to install pytest, not every grade failing the same way.
pub fn ensure(tasks: &[&TaskInstance]) -> Result<()> {
    let mut by_python: BTreeMap<&str, &TaskInstance> = BTreeMap::new();
    for t in tasks {
        if let Some(python) = interpreter(&t.env.test_cmd) {
            by_python.entry(python).or_insert(t);
        }
    }
    for (python, t) in by_python {
        ensure_interpreter(python, &t.env.test_cmd, &format!(", task {}", t.instance_id))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_interpreter_of_a_test_command() {
        assert_eq!(interpreter("python3 -m pytest -rA"), Some("python3"));
        assert_eq!(interpreter("PYTHONPATH=src:. /s/venvs/x/bin/python -m pytest -q"), Some("/s/venvs/x/bin/python"));
        assert_eq!(interpreter("pytest -q"), None);
        assert_eq!(interpreter("cd sub && python -m pytest"), None);
    }

    #[test]
    fn tells_a_suite_pytest_cannot_collect_from_failing_tests() {
        let hook = "pluggy._manager.PluginValidationError: Plugin 'tests/conftest.py' for hook \
                    'pytest_ignore_collect'\nArgument(s) {'path'} are declared in the hookimpl but can not be found \
                    in the hookspec";
        assert!(cannot_collect(Some(1), hook));
        let said = collect_error(&format!("    raise PluginValidationError(\n{hook}\n"));
        assert!(
            said.starts_with("pluggy._manager.PluginValidationError: Plugin") && said.contains("{'path'}"),
            "{said}"
        );
        assert!(cannot_collect(Some(4), "ImportError while loading conftest 'tests/conftest.py'."));
        assert!(cannot_collect(Some(3), "INTERNALERROR> Traceback"));
        assert!(!cannot_collect(Some(1), "FAILED tests/test_a.py::test_x - assert 1 == 2\n1 failed in 0.1s"));
        assert_eq!(major("8.4.2"), Some(8));
    }

    #[test]
    fn an_interpreter_without_pytest_is_one_line_with_the_command_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("python");
        std::fs::write(&python, "#!/bin/sh\necho \"$0: No module named pytest\" >&2\nexit 1\n").unwrap();
        std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let p = python.display().to_string();
        assert_eq!(probe(&p), Probe::Missing);
        let e = ensure_interpreter(&p, &format!("{p} -m pytest"), "").unwrap_err().to_string();
        assert!(e.starts_with(CANNOT_RUN) && e.contains(&format!("`{p} -m pip install pytest`")), "{e}");
        let e = ensure_interpreter("pyhton3", "pyhton3 -m pytest", "").unwrap_err().to_string();
        assert!(e.contains("its program was not found"), "{e}");
    }
}
