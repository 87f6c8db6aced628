//! The official harness's verdict on a test log (`swebench/harness/grading.py`, 5.0.2): whether
//! the log is valid, each FAIL_TO_PASS / PASS_TO_PASS test's outcome, and resolved or not.
//!
//! - Invalid (status error): the log holds a patch-apply / reset failure, errored or timed-out
//!   tests, or lacks the start/end markers; or no test result parses and nothing shows that a
//!   suite ran; or the recorded test exit code is non-zero while no test shows FAILED/ERROR
//!   (a log printing its own `PASSED` lines).
//! - Results are read between the markers, the whole log when nothing parses there.
//! - A FAIL_TO_PASS test succeeds on PASSED or XFAIL and fails when missing, FAILED, ERROR or
//!   SKIPPED; a PASS_TO_PASS test also succeeds on SKIPPED. An id truncated inside its
//!   parameters (more `[` than `]`) matches by prefix when the candidates agree.
//! - `pass_and_fail`: resolved iff every F2P and every P2P test succeeds; `fail_only`: a test
//!   fails only when the log says FAILED.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::parsers::{parse_log, StatusMap, ERROR, FAILED, PASSED, SKIPPED, XFAIL};

pub const APPLY_PATCH_FAIL: &str = ">>>>> Patch Apply Failed";
pub const APPLY_PATCH_PASS: &str = ">>>>> Applied Patch";
pub const RESET_FAILED: &str = ">>>>> Reset Failed";
pub const TESTS_ERROR: &str = ">>>>> Tests Errored";
pub const TESTS_TIMEOUT: &str = ">>>>> Tests Timed Out";
pub const START_TEST_OUTPUT: &str = ">>>>> Start Test Output";
pub const END_TEST_OUTPUT: &str = ">>>>> End Test Output";
pub const TEST_EXIT_CODE: &str = ">>>>> Test Exit Code";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EvalType {
    #[default]
    PassAndFail,
    FailOnly,
}

/// Successes and failures of one list of tests, as the harness's `tests_status` holds them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcomes {
    pub success: Vec<String>,
    pub failure: Vec<String>,
}

impl Outcomes {
    /// Share that succeeded; 1 for an empty list (as the harness).
    fn rate(&self) -> f64 {
        let n = self.success.len() + self.failure.len();
        if n == 0 {
            1.0
        } else {
            self.success.len() as f64 / n as f64
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TestsStatus {
    #[serde(rename = "FAIL_TO_PASS")]
    pub fail_to_pass: Outcomes,
    #[serde(rename = "PASS_TO_PASS")]
    pub pass_to_pass: Outcomes,
    #[serde(rename = "FAIL_TO_FAIL")]
    pub fail_to_fail: Outcomes,
    #[serde(rename = "PASS_TO_FAIL")]
    pub pass_to_fail: Outcomes,
}

/// The statuses the log shows, or `None` when the log is invalid (see the module docs).
/// Errs for an unknown parser, and where the harness's parser raises (it then writes no report:
/// an error instance).
pub fn logs_eval(parser: &str, content: &str) -> anyhow::Result<Option<StatusMap>> {
    // The harness reads the log back from a file in text mode, where `\r\n` and `\r` end lines.
    let content = &content.replace("\r\n", "\n").replace('\r', "\n");
    if [APPLY_PATCH_FAIL, RESET_FAILED, TESTS_ERROR, TESTS_TIMEOUT].iter().any(|c| content.contains(c)) {
        return Ok(None);
    }
    if !(content.contains(START_TEST_OUTPUT) && content.contains(END_TEST_OUTPUT)) {
        return Ok(None);
    }
    // Python's `content.split(START)[1].split(END)[0]`.
    let after = content.split(START_TEST_OUTPUT).nth(1).unwrap_or("");
    let sliced = after.split(END_TEST_OUTPUT).next().unwrap_or("");
    let mut map = parse_log(parser, sliced)?;
    if map.is_empty() {
        map = parse_log(parser, content)?;
    }
    if map.is_empty() && !suite_ran().is_match(content) {
        return Ok(None);
    }
    let exit_code = test_exit_code(content);
    if exit_code.is_some_and(|c| c != 0) && !map.is_empty() && !map.values().any(|s| s == FAILED || s == ERROR) {
        return Ok(None);
    }
    Ok(Some(map))
}

/// Evidence that a test runner ran, for a log whose statuses parse to nothing. Python's `\s`
/// also matches `\x1c`..`\x1f`, and its `\w` is letters, numbers and `_` (no marks).
fn suite_ran() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"(?m)Executed [1-9]\d* of \d+|TOTAL: [1-9]\d* (?:SUCCESS|FAILED)|[1-9]\d* passing|Tests:[\s\x1C-\x1F]+[1-9]\d*|Test Suites:[\s\x1C-\x1F]+(?:\d+ [\p{L}\p{N}_]+, )*[1-9]\d* total|^# tests [1-9]\d*|[1-9]\d* specs?, \d+ failures?|': ok$",
        )
        .expect("regex")
    })
}

/// The test command's exit status the eval script recorded after the end marker, read as
/// Python's `int()` reads it: `\d` is any Unicode decimal digit (these come in runs of ten from
/// 0, so a digit's value is its distance from its run's start, mod 10); saturating.
pub fn test_exit_code(content: &str) -> Option<i64> {
    static RE: OnceLock<Regex> = OnceLock::new();
    static DIGIT: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(&format!(r"{}:[\s\x1C-\x1F]*(-?)(\d+)", regex::escape(TEST_EXIT_CODE))).expect("regex")
    });
    let digit = DIGIT.get_or_init(|| Regex::new(r"^\d$").expect("regex"));
    let is_digit =
        |c: Option<u32>| c.and_then(char::from_u32).is_some_and(|c| digit.is_match(c.encode_utf8(&mut [0; 4])));
    let c = re.captures(content)?;
    let value = c[2].chars().fold(0i64, |n, d| {
        let d = (1..).take_while(|i| is_digit((d as u32).checked_sub(*i))).count() % 10;
        n.saturating_mul(10).saturating_add(d as i64)
    });
    Some(if c[1].is_empty() { value } else { -value })
}

/// The status-map key for a test id, tolerating ids truncated inside their parameters.
fn resolve<'m>(case: &str, sm: &'m StatusMap) -> Option<&'m str> {
    if let Some((k, _)) = sm.get_key_value(case) {
        return Some(k);
    }
    if case.matches('[').count() > case.matches(']').count() {
        let matches: Vec<&String> = sm.keys().filter(|k| k.starts_with(case)).collect();
        let passing = |k: &String| matches!(sm[k].as_str(), PASSED | XFAIL);
        if let Some(first) = matches.first() {
            if matches.iter().all(|k| passing(k) == passing(first)) {
                return Some(first.as_str());
            }
        }
    }
    None
}

fn passed(case: &str, sm: &StatusMap) -> bool {
    resolve(case, sm).is_some_and(|k| matches!(sm[k].as_str(), PASSED | XFAIL))
}

fn maintained(case: &str, sm: &StatusMap) -> bool {
    passed(case, sm) || resolve(case, sm).is_some_and(|k| sm[k] == SKIPPED)
}

fn failed(case: &str, sm: &StatusMap) -> bool {
    resolve(case, sm).is_none_or(|k| matches!(sm[k].as_str(), FAILED | ERROR | SKIPPED))
}

/// Sorts the FAIL_TO_PASS and PASS_TO_PASS tests into successes and failures. A test that is
/// neither (a status word that is no status) is in neither list, as in the harness.
pub fn tests_report(sm: &StatusMap, f2p: &[String], p2p: &[String], eval_type: EvalType) -> TestsStatus {
    let mut out = TestsStatus::default();
    let sort = |tests: &[String], into: &mut Outcomes, ok: &dyn Fn(&str) -> bool| {
        for t in tests {
            match eval_type {
                EvalType::PassAndFail => {
                    if ok(t) {
                        into.success.push(t.clone());
                    } else if failed(t, sm) {
                        into.failure.push(t.clone());
                    }
                }
                EvalType::FailOnly => {
                    if sm.get(t.as_str()).is_some_and(|s| s == FAILED) {
                        into.failure.push(t.clone());
                    } else {
                        into.success.push(t.clone());
                    }
                }
            }
        }
    };
    sort(f2p, &mut out.fail_to_pass, &|t| passed(t, sm));
    sort(p2p, &mut out.pass_to_pass, &|t| maintained(t, sm));
    out
}

/// Resolved iff every FAIL_TO_PASS and PASS_TO_PASS test succeeded (`RESOLVED_FULL`).
pub fn resolved(status: &TestsStatus) -> bool {
    status.fail_to_pass.rate() == 1.0 && status.pass_to_pass.rate() == 1.0
}

/// One instance's verdict, the harness's `report.json` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    #[serde(rename = "patch_is_None")]
    pub patch_is_none: bool,
    pub patch_exists: bool,
    pub patch_successfully_applied: bool,
    pub resolved: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests_status: Option<TestsStatus>,
}

/// The harness's `get_eval_report` for a log (the patch existed and applied).
pub fn eval_report(
    parser: &str,
    log: &str,
    f2p: &[String],
    p2p: &[String],
    eval_type: EvalType,
) -> anyhow::Result<InstanceReport> {
    let mut r = InstanceReport { patch_exists: true, ..Default::default() };
    let Some(sm) = logs_eval(parser, log)? else { return Ok(r) };
    r.patch_successfully_applied = true;
    let status = tests_report(&sm, f2p, p2p, eval_type);
    r.resolved = resolved(&status);
    r.tests_status = Some(status);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    fn log(body: &str, code: i32) -> String {
        format!("+ : '{START_TEST_OUTPUT}'\n{body}\n+ : '{END_TEST_OUTPUT}'\n{TEST_EXIT_CODE}: {code}\n")
    }

    #[test]
    fn verdicts_follow_the_harness_rules() {
        let f2p = v(&["t.py::a", "t.py::b[x-"]);
        let p2p = v(&["t.py::c"]);
        let ok = log("PASSED t.py::a\nPASSED t.py::b[x-1]\nSKIPPED t.py::c", 0);
        assert!(eval_report("parse_log_pytest", &ok, &f2p, &p2p, EvalType::PassAndFail).unwrap().resolved);
        // A skipped F2P test is not a resolution.
        let skipped = log("SKIPPED t.py::a\nPASSED t.py::b[x-1]\nPASSED t.py::c", 0);
        let r = eval_report("parse_log_pytest", &skipped, &f2p, &p2p, EvalType::PassAndFail).unwrap();
        assert!(!r.resolved && r.patch_successfully_applied);
        // A non-zero exit with no failure shown is an invalid log.
        let lying = log("PASSED t.py::a\nPASSED t.py::b[x-1]\nPASSED t.py::c", 1);
        assert!(
            !eval_report("parse_log_pytest", &lying, &f2p, &p2p, EvalType::PassAndFail)
                .unwrap()
                .patch_successfully_applied
        );
        // No markers: invalid.
        assert!(logs_eval("parse_log_pytest", "PASSED t.py::a").unwrap().is_none());
        // Read as the harness reads its file: `\r` ends a line.
        let cr = log("collecting ...\rPASSED t.py::a\r\nPASSED t.py::b[x-1]\r\nPASSED t.py::c", 0);
        assert!(eval_report("parse_log_pytest", &cr, &f2p, &p2p, EvalType::PassAndFail).unwrap().resolved);
        // Python's int() reads any decimal digits.
        assert_eq!(test_exit_code(">>>>> Test Exit Code: \u{0661}\u{1D7D8}"), Some(10));
        assert_eq!(test_exit_code(">>>>> Test Exit Code: -99999999999999999999"), Some(-i64::MAX));
        // fail_only: missing tests succeed.
        let r = eval_report("parse_log_pytest", &log("FAILED t.py::c", 1), &f2p, &p2p, EvalType::FailOnly).unwrap();
        assert_eq!(r.tests_status.unwrap().pass_to_pass.failure, v(&["t.py::c"]));
    }
}
