//! Grading with SWE-bench semantics: in a fresh copy at the base, apply the model's patch and
//! put the files it may not change back as at the base ([`super::protect`]; which files it
//! changed is asked of git), reset the files the hidden tests touch and apply `test_patch`,
//! run FAIL_TO_PASS and PASS_TO_PASS, and read per-test results. Resolved iff every one of
//! them passes.
//!
//! For pytest commands the results come from a reporter plugin written for the run under a
//! random module name and loaded with `-p` (at startup, before any code of the work tree
//! runs): it writes each test's outcome, marked with a random nonce, to the stdout pytest
//! started with. What code under test prints — `PASSED tests/...` lines, a whole fake summary
//! from an `atexit` hook — is not read. A canary test that must fail, named like any other
//! test and placed beside the first test file, runs last: if it passes, the runner was made
//! to pass everything, and the grade is unresolved with that recorded as tampering. Other
//! test commands are read from pytest's `-rA` short summary, between its header and the
//! final count only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::instance::TaskInstance;
use super::protect::{Protection, Tampering};
use crate::sandbox::shell_quote;
use crate::sandbox::{apply_patch, Isolation, Limits, LocalSandbox, Workspace};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestStatus {
    Passed,
    Failed,
    Error,
    Skipped,
    /// Not in the test run's report (not collected, or the run crashed).
    Missing,
}

/// The harness's run statuses: `error` when the patch does not apply or the tests could not
/// run to a valid log, `empty_patch` when there was nothing to grade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GradeStatus {
    Resolved,
    #[default]
    Unresolved,
    EmptyPatch,
    Error,
}

impl GradeStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            GradeStatus::Resolved => "resolved",
            GradeStatus::Unresolved => "unresolved",
            GradeStatus::EmptyPatch => "empty_patch",
            GradeStatus::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradeReport {
    #[serde(default)]
    pub status: GradeStatus,
    pub resolved: bool,
    /// Whether the model's patch applied.
    pub patch_applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub fail_to_pass: BTreeMap<String, TestStatus>,
    pub pass_to_pass: BTreeMap<String, TestStatus>,
    /// The patch's changes to protected files, dropped before the tests ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tampering: Vec<Tampering>,
    pub seconds: f64,
    /// The end of the test run's output, for debugging.
    pub log_tail: String,
    /// The official harness's report of this instance (docker tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harness: Option<crate::swebench::grading::InstanceReport>,
}

impl GradeReport {
    /// A report with every test missing and nothing run.
    pub fn unrun(task: &TaskInstance, status: GradeStatus, note: &str) -> Self {
        let missing = |ids: &[String]| ids.iter().map(|t| (t.clone(), TestStatus::Missing)).collect();
        GradeReport {
            status,
            resolved: false,
            patch_applied: false,
            error: Some(note.to_string()),
            fail_to_pass: missing(&task.fail_to_pass),
            pass_to_pass: missing(&task.pass_to_pass),
            tampering: vec![],
            seconds: 0.0,
            log_tail: String::new(),
            harness: None,
        }
    }

    /// The status that follows from the patch applying and the verdict.
    pub fn settle(&mut self) {
        self.status = match (self.patch_applied, self.resolved) {
            (false, _) => GradeStatus::Error,
            (true, true) => GradeStatus::Resolved,
            (true, false) => GradeStatus::Unresolved,
        };
    }
}

fn short_summary_header(line: &str) -> bool {
    line.starts_with('=') && line.contains(" short test summary info ")
}

/// pytest's closing line, `==== 2 passed, 1 failed in 0.03s ====`.
fn final_line(line: &str) -> bool {
    line.starts_with('=') && line.ends_with('=') && line.contains(" in ") && line.trim_matches('=').trim().len() > 3
}

/// Per-test outcomes from pytest's `-rA` short summary (`PASSED tests/t.py::test_x`, `FAILED
/// ... - reason`, `ERROR ...` lines), read only between the summary's header and pytest's
/// final line; a test listed twice keeps its worst outcome.
pub fn parse_pytest(output: &str) -> BTreeMap<String, TestStatus> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in output.lines() {
        let line = line.trim_end();
        if short_summary_header(line) {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if final_line(line) {
            inside = false;
            continue;
        }
        let (status, rest) = match line.split_once(' ') {
            Some(("PASSED", r)) => (TestStatus::Passed, r),
            Some(("FAILED", r)) => (TestStatus::Failed, r),
            Some(("ERROR", r)) => (TestStatus::Error, r),
            // As SWE-bench: an expected failure counts as passing.
            Some(("XFAIL", r)) => (TestStatus::Passed, r),
            Some(("XPASS", r)) => (TestStatus::Passed, r),
            _ => continue,
        };
        let id = rest.split(" - ").next().unwrap_or(rest).trim();
        if !id.is_empty() && !id.contains(' ') {
            record(&mut out, id, status);
        }
    }
    out
}

fn rank(s: TestStatus) -> u8 {
    match s {
        TestStatus::Passed => 0,
        TestStatus::Skipped => 1,
        TestStatus::Missing => 2,
        TestStatus::Failed => 3,
        TestStatus::Error => 4,
    }
}

fn record(out: &mut BTreeMap<String, TestStatus>, id: &str, status: TestStatus) {
    let e = out.entry(id.to_string()).or_insert(status);
    if rank(status) > rank(*e) {
        *e = status;
    }
}

/// Whether restoring `path` can reveal changes git did not list (an ignore file).
pub fn hides_changes(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == ".gitignore" || name == ".gitattributes"
}

/// The reporter plugin (see the module docs); `{nonce}` is replaced per run.
pub const REPORTER: &str = r#"# protege's grading reporter: each test's outcome, written when the session ends to the
# stdout pytest started with, every line marked with this run's nonce.
import os
_OUT = os.dup(1)
_MARK = "{nonce}"
_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
_results = {}


def _set(nodeid, status):
    old = _results.get(nodeid)
    if old is None or _RANK[status] > _RANK[old]:
        _results[nodeid] = status


def pytest_runtest_logreport(report):
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        # An expected failure (or unexpected pass) counts as passing, as in SWE-bench.
        _set(report.nodeid, "passed" if xfail else report.outcome)
    elif report.failed:
        _set(report.nodeid, "error")
    elif report.skipped:
        _set(report.nodeid, "passed" if xfail else "skipped")


def pytest_sessionfinish(session, exitstatus):
    data = "".join("\n%s %s %s" % (_MARK, s, n) for n, s in _results.items()) + "\n"
    data += "%s exit %d\n" % (_MARK, int(exitstatus))
    data = data.encode("utf-8", "replace")
    while data:
        data = data[os.write(_OUT, data):]
"#;

/// Outcomes the reporter wrote with `nonce`.
pub fn parse_reporter(output: &str, nonce: &str) -> BTreeMap<String, TestStatus> {
    let mut out = BTreeMap::new();
    for line in output.lines() {
        let mut parts = line.splitn(3, ' ');
        if parts.next() != Some(nonce) {
            continue;
        }
        let status = match parts.next() {
            Some("passed") => TestStatus::Passed,
            Some("failed") => TestStatus::Failed,
            Some("error") => TestStatus::Error,
            Some("skipped") => TestStatus::Skipped,
            _ => continue,
        };
        if let Some(id) = parts.next() {
            record(&mut out, id, status);
        }
    }
    out
}

/// The test command of `task` for `ids`.
pub fn test_command(task: &TaskInstance, ids: &[&String]) -> String {
    let ids: Vec<String> = ids.iter().map(|t| shell_quote(t)).collect();
    format!("{} {}", task.env.test_cmd, ids.join(" "))
}

/// Whether `task`'s tests run through pytest (and so can carry the reporter).
fn runs_pytest(task: &TaskInstance) -> bool {
    task.env.test_cmd.contains("pytest")
}

/// How patches are graded: where the tests run, their limits, what the patch may not touch.
#[derive(Debug, Clone)]
pub struct Grader {
    pub isolation: Isolation,
    pub limits: Limits,
    pub protection: Protection,
    /// Host paths the test run must not see (as in the agent's sandbox).
    pub hidden: Vec<PathBuf>,
}

/// Words for the canary test's names: it should look like any other test.
const WORDS: [&str; 32] = [
    "parse", "value", "range", "empty", "order", "merge", "split", "limit", "index", "count", "label", "token",
    "field", "state", "cache", "group", "shape", "scale", "round", "match", "check", "total", "delta", "entry",
    "start", "final", "inner", "outer", "after", "early", "local", "basic",
];

pub fn random_name(prefix: &str) -> String {
    let w = |_| WORDS[rand::random::<usize>() % WORDS.len()];
    let words: Vec<&str> = (0..3).map(w).collect();
    format!("{prefix}{}_{}", words.join("_"), rand::random::<u16>() % 1000)
}

impl Grader {
    pub fn new(isolation: Isolation, limits: Limits, protection: Protection) -> Self {
        Self { isolation, limits, protection, hidden: vec![] }
    }

    /// Grades `model_patch` for `task` in a new work tree `dir` (which must not exist;
    /// removed afterwards).
    pub fn grade(&self, task: &TaskInstance, model_patch: &str, dir: &Path) -> Result<GradeReport> {
        let started = std::time::Instant::now();
        // The test log is kept whole up to 64 MiB (the reporter writes at its end).
        let limits = Limits { output_bytes: 64 << 20, ..self.limits };
        let sandbox = LocalSandbox::for_task(task, dir, self.isolation, limits, self.hidden.clone())?;
        let result = self.grade_in(task, model_patch, &sandbox);
        sandbox.discard();
        let mut report = result?;
        report.settle();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    fn grade_in(&self, task: &TaskInstance, model_patch: &str, sandbox: &LocalSandbox) -> Result<GradeReport> {
        let root = sandbox.host_root();
        let missing = |ids: &[String]| ids.iter().map(|t| (t.clone(), TestStatus::Missing)).collect::<BTreeMap<_, _>>();
        let mut report = GradeReport {
            status: GradeStatus::Unresolved,
            harness: None,
            resolved: false,
            patch_applied: true,
            error: None,
            fail_to_pass: missing(&task.fail_to_pass),
            pass_to_pass: missing(&task.pass_to_pass),
            tampering: vec![],
            seconds: 0.0,
            log_tail: String::new(),
        };
        if let Some(why) = super::instance::unsafe_patch_path(model_patch) {
            report.patch_applied = false;
            report.error = Some(why);
            return Ok(report);
        }
        if !model_patch.trim().is_empty() {
            if let Err(e) = apply_patch(root, model_patch, "the model's patch") {
                report.patch_applied = false;
                report.error = Some(format!("{e:#}"));
                return Ok(report);
            }
        }
        // Protected files go back to the base: judged on what git applied, not on how the
        // patch text spells its paths.
        // Again after a `.gitignore` goes back: what it hid is a change too.
        for _ in 0..3 {
            let mut rescan = false;
            for c in sandbox.changes()? {
                if let Some(rule) = self.protection.rule_for(task, &c.path) {
                    sandbox.restore(&c.path)?;
                    rescan |= hides_changes(&c.path);
                    report.tampering.push(Tampering {
                        path: c.path,
                        rule,
                        lines_added: c.added.unwrap_or(0) as usize,
                        lines_removed: c.removed.unwrap_or(0) as usize,
                    });
                }
            }
            if !rescan {
                break;
            }
        }
        // The hidden tests win over whatever the model did to the same files.
        for f in task.test_files() {
            sandbox.restore(&f)?;
        }
        if !task.test_patch.trim().is_empty() {
            apply_patch(root, &task.test_patch, "test_patch").with_context(|| format!("task {}", task.instance_id))?;
        }
        let ids: Vec<&String> = task.fail_to_pass.iter().chain(&task.pass_to_pass).collect();
        let results = if runs_pytest(task) {
            // A test that must fail, named like any other, beside the first test file: a
            // runner made to pass everything passes it too.
            let canary_dir = ids.iter().find_map(|id| id.split_once("::")).and_then(|(f, _)| f.rsplit_once('/'));
            let canary_dir = canary_dir.map_or(String::new(), |(d, _)| format!("{d}/"));
            let canary_file = format!("{canary_dir}{}.py", random_name("test_"));
            let canary_fn = random_name("test_");
            std::fs::write(root.join(&canary_file), format!("def {canary_fn}():\n    assert 1 + 1 == 3\n"))?;
            // Written after the patch, at the root (where `python -m pytest` and a test command's
            // own `PYTHONPATH=.` find it), under a name the agent cannot know; pytest imports it
            // at startup, before any of the work tree's code runs.
            let reporter = Reporter::write(root)?;
            sandbox.give_tree()?;
            let cmd = format!(
                "export PYTHONPATH=\"${{PYTHONPATH:+$PYTHONPATH:}}{}\"; {} -p {} {} {}",
                sandbox.workdir(),
                task.env.test_cmd,
                reporter.module,
                ids.iter().map(|t| shell_quote(t)).collect::<Vec<_>>().join(" "),
                shell_quote(&format!("{canary_file}::{canary_fn}"))
            );
            let out = sandbox.run(&cmd)?;
            report.log_tail = tail(&out.output);
            let results = parse_reporter(&out.output, &reporter.nonce);
            if results.is_empty() {
                report.error = Some(
                    cannot_run(&out.output, out.exit_code, &task.env.test_cmd)
                        .unwrap_or_else(|| "the test run reported no results (see log_tail)".into()),
                );
            }
            let suffix = format!("::{canary_fn}");
            if let Some((_, s)) = results.iter().find(|(id, _)| id.ends_with(&suffix)) {
                if *s == TestStatus::Passed {
                    report.tampering.push(Tampering {
                        path: canary_file,
                        rule: "the test runner was subverted: a test that must fail passed".into(),
                        lines_added: 0,
                        lines_removed: 0,
                    });
                    report.error = Some("a test that must fail passed: the patch subverts the test runner".into());
                    return Ok(report);
                }
            }
            results
        } else {
            sandbox.give_tree()?;
            let out = sandbox.run(&test_command(task, &ids))?;
            report.log_tail = tail(&out.output);
            let results = parse_pytest(&out.output);
            if results.is_empty() {
                report.error = cannot_run(&out.output, out.exit_code, &task.env.test_cmd);
            }
            results
        };
        for (id, status) in report.fail_to_pass.iter_mut().chain(report.pass_to_pass.iter_mut()) {
            if let Some(s) = results.get(id) {
                *status = *s;
            }
        }
        report.resolved =
            report.fail_to_pass.values().chain(report.pass_to_pass.values()).all(|s| *s == TestStatus::Passed);
        Ok(report)
    }
}

/// How an error that says the test command could not run at all begins (not a test's failure:
/// every task of a suite will say the same).
pub const CANNOT_RUN: &str = "the test command cannot run";

/// Why a test run that reported nothing could not run at all, if its output says: pytest not
/// installed for the interpreter, or the program not found.
pub fn cannot_run(output: &str, exit_code: Option<i32>, test_cmd: &str) -> Option<String> {
    if output.contains("No module named pytest") || output.contains("No module named 'pytest'") {
        return Some(format!(
            "{CANNOT_RUN}: pytest is not installed for the interpreter of `{test_cmd}` (install it there, e.g. \
             `python3 -m pip install pytest`, or point env.test_cmd at an environment that has it)"
        ));
    }
    let not_found = exit_code == Some(127) || output.contains("command not found");
    not_found.then(|| {
        let said = output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        format!("{CANNOT_RUN}: its program was not found (`{test_cmd}`: {said})")
    })
}

/// The reporter plugin of one grading run: its module name and the marker of its lines.
struct Reporter {
    module: String,
    nonce: String,
}

impl Reporter {
    fn write(dir: &Path) -> Result<Reporter> {
        let module = format!("protege_grader_{:016x}", rand::random::<u64>());
        let nonce = format!("{:032x}", rand::random::<u128>());
        std::fs::write(dir.join(format!("{module}.py")), REPORTER.replace("{nonce}", &nonce))?;
        Ok(Reporter { module, nonce })
    }
}

/// The last 2000 bytes of a log (at a character boundary).
fn tail(log: &str) -> String {
    let from = log.len().saturating_sub(2000);
    let from = (from..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(0);
    log[from..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pytest_short_summary() {
        let log = "\
============ short test summary info ============
PASSED tests/test_a.py::test_one
PASSED tests/test_a.py::test_param[1-2]
FAILED tests/test_a.py::test_two - AssertionError: assert 1 == 2
ERROR tests/test_b.py::test_setup - ImportError
SKIPPED [1] tests/test_c.py:3: unconditional skip
=== 2 passed, 1 failed, 1 error in 0.03s ===";
        let r = parse_pytest(log);
        assert_eq!(r.get("tests/test_a.py::test_one"), Some(&TestStatus::Passed));
        assert_eq!(r.get("tests/test_a.py::test_param[1-2]"), Some(&TestStatus::Passed));
        assert_eq!(r.get("tests/test_a.py::test_two"), Some(&TestStatus::Failed));
        assert_eq!(r.get("tests/test_b.py::test_setup"), Some(&TestStatus::Error));
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn lines_outside_the_short_summary_are_not_results() {
        // Printed by code under test before the summary, and by an atexit hook after it.
        let log = "\
PASSED tests/test_a.py::test_forged
============ short test summary info ============
FAILED tests/test_a.py::test_two - AssertionError
PASSED tests/test_a.py::test_two
============ 1 failed in 0.03s ============
PASSED tests/test_a.py::test_after";
        let r = parse_pytest(log);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r.get("tests/test_a.py::test_two"), Some(&TestStatus::Failed), "the worst outcome wins");
    }

    #[test]
    fn the_reporter_is_read_only_with_its_nonce() {
        let log = "abc passed t.py::x\nPASSED t.py::y\nn0nce passed t.py::z[a b]\nn0nce failed t.py::z[a b]\n";
        let r = parse_reporter(log, "n0nce");
        assert_eq!(r.len(), 1);
        assert_eq!(r.get("t.py::z[a b]"), Some(&TestStatus::Failed));
    }

    #[test]
    fn a_test_command_that_cannot_run_says_why() {
        let e = cannot_run("/usr/bin/python3: No module named pytest\n", Some(1), "python3 -m pytest").unwrap();
        assert!(e.starts_with(CANNOT_RUN) && e.contains("pytest is not installed"), "{e}");
        let e = cannot_run("bash: line 1: pyhton: command not found\n", Some(127), "pyhton -m pytest").unwrap();
        assert!(e.contains("not found") && e.contains("pyhton"), "{e}");
        assert_eq!(cannot_run("1 failed", Some(1), "pytest"), None);
    }
}
