//! Grading with SWE-bench semantics: in a fresh copy at the base, apply the model's patch,
//! reset the files the hidden tests touch and apply `test_patch`, run FAIL_TO_PASS and
//! PASS_TO_PASS, and parse per-test results. Resolved iff every one of them passes.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::instance::TaskInstance;
use crate::agent::sandbox::{apply_patch, Executor, Isolation, Limits, LocalSandbox};
use crate::agent::tools::shell_quote;

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradeReport {
    pub resolved: bool,
    /// Whether the model's patch applied.
    pub patch_applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub fail_to_pass: BTreeMap<String, TestStatus>,
    pub pass_to_pass: BTreeMap<String, TestStatus>,
    pub seconds: f64,
    /// The end of the test run's output, for debugging.
    pub log_tail: String,
}

/// Per-test outcomes from pytest's `-rA` short summary (`PASSED tests/t.py::test_x`, `FAILED
/// ... - reason`, `ERROR ...`, `SKIPPED [1] ...` lines).
pub fn parse_pytest(output: &str) -> BTreeMap<String, TestStatus> {
    let mut out = BTreeMap::new();
    for line in output.lines() {
        let line = line.trim();
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
            out.insert(id.to_string(), status);
        }
    }
    out
}

/// The test command of `task` for `ids`.
pub fn test_command(task: &TaskInstance, ids: &[&String]) -> String {
    let ids: Vec<String> = ids.iter().map(|t| shell_quote(t)).collect();
    format!("{} {}", task.env.test_cmd, ids.join(" "))
}

/// Grades `model_patch` for `task` in a new work tree `dir` (which must not exist; removed
/// afterwards).
pub fn grade(
    task: &TaskInstance,
    model_patch: &str,
    dir: &Path,
    isolation: Isolation,
    limits: &Limits,
) -> Result<GradeReport> {
    let started = std::time::Instant::now();
    // The whole test log is parsed: no truncation of the grading run's output.
    let limits = Limits { output_bytes: 256 << 20, ..*limits };
    let sandbox = LocalSandbox::for_task(task, dir, isolation, limits, vec![])?;
    let result = grade_in(task, model_patch, &sandbox);
    sandbox.discard();
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn grade_in(task: &TaskInstance, model_patch: &str, sandbox: &LocalSandbox) -> Result<GradeReport> {
    let root = sandbox.host_root();
    let missing = |ids: &[String]| ids.iter().map(|t| (t.clone(), TestStatus::Missing)).collect::<BTreeMap<_, _>>();
    let mut report = GradeReport {
        resolved: false,
        patch_applied: true,
        error: None,
        fail_to_pass: missing(&task.fail_to_pass),
        pass_to_pass: missing(&task.pass_to_pass),
        seconds: 0.0,
        log_tail: String::new(),
    };
    if !model_patch.trim().is_empty() {
        if let Err(e) = apply_patch(root, model_patch, "the model's patch") {
            report.patch_applied = false;
            report.error = Some(format!("{e:#}"));
            return Ok(report);
        }
    }
    // The hidden tests win over whatever the model did to the same files.
    for f in task.test_files() {
        let tracked = crate::agent::sandbox::git(root, &["ls-files", "--error-unmatch", &f]).is_ok();
        if tracked {
            crate::agent::sandbox::git(root, &["checkout", "HEAD", "--", &f])?;
        } else {
            let _ = std::fs::remove_file(root.join(&f));
        }
    }
    if !task.test_patch.trim().is_empty() {
        apply_patch(root, &task.test_patch, "test_patch").with_context(|| format!("task {}", task.instance_id))?;
    }
    let ids: Vec<&String> = task.fail_to_pass.iter().chain(&task.pass_to_pass).collect();
    let out = sandbox.run(&test_command(task, &ids))?;
    let results = parse_pytest(&out.output);
    for (id, status) in report.fail_to_pass.iter_mut().chain(report.pass_to_pass.iter_mut()) {
        if let Some(s) = results.get(id) {
            *status = *s;
        }
    }
    report.resolved =
        report.fail_to_pass.values().chain(report.pass_to_pass.values()).all(|s| *s == TestStatus::Passed);
    let tail_from = out.output.len().saturating_sub(2000);
    let tail_from = (tail_from..out.output.len()).find(|&i| out.output.is_char_boundary(i)).unwrap_or(0);
    report.log_tail = out.output[tail_from..].to_string();
    Ok(report)
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
}
