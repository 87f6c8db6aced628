//! Grading as the official SWE-bench harness (`run_evaluation.run_instance`, 5.0.2), in a
//! fresh container: the model patch applied by the first of `git apply --verbose`, `--3way`,
//! `--reject`, `patch --batch --forward --fuzz=5 -p1 -i` that works, the tree reset between
//! tries (`git checkout -- . ; git clean -fd`), a reverse check when all fail; then — protege's
//! addition — files the patch may not change put back as at the base; the eval script run with
//! `/bin/bash` (stdout and stderr as one stream), its log read by the instance's parser, and
//! the verdict of [`crate::swebench::grading`].

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;

use super::DockerExecutor;
use crate::swebench::grading::{self, InstanceReport, APPLY_PATCH_FAIL, APPLY_PATCH_PASS};
use crate::swebench::{parsers, script, EvalType};
use crate::tasks::grade::{GradeReport, GradeStatus, TestStatus};
use crate::tasks::protect::Tampering;
use crate::tasks::TaskInstance;

const APPLY_CMDS: [&str; 4] = [
    "git apply --verbose",
    "git apply --verbose --3way",
    "git apply --verbose --reject",
    "patch --batch --forward --fuzz=5 -p1 -i",
];
const PATCH_FILE: &str = "/tmp/patch.diff";
/// The whole test log is kept up to this size (head and tail beyond it).
const LOG_BYTES: usize = 64 << 20;

/// A grading's report and the files the harness writes beside it.
pub struct Graded {
    pub report: GradeReport,
    /// The harness's `run_instance.log` in short: what was applied, how.
    pub instance_log: String,
    /// The eval script as run.
    pub eval_script: String,
    /// The eval script's output (`test_output.txt`).
    pub test_output: String,
}

fn status_of(word: Option<&String>) -> TestStatus {
    match word.map(|s| s.as_str()) {
        Some(parsers::PASSED) | Some(parsers::XFAIL) => TestStatus::Passed,
        Some(parsers::FAILED) => TestStatus::Failed,
        Some(parsers::ERROR) => TestStatus::Error,
        Some(parsers::SKIPPED) => TestStatus::Skipped,
        _ => TestStatus::Missing,
    }
}

/// Grades `patch` for `task` in a fresh container.
pub fn grade(exec: &DockerExecutor, task: &TaskInstance, patch: &str, label: &str) -> Result<Graded> {
    let started = Instant::now();
    let mut report = GradeReport::unrun(task, GradeStatus::Error, "");
    report.error = None;
    let mut log = String::new();
    let eval_script = script::runnable(task.env.eval_script.as_deref().unwrap_or_default());
    let parser = task.env.log_parser.clone().unwrap_or_else(|| "parse_log_pytest".into());
    let eval_type = task.env.eval_type.unwrap_or(EvalType::PassAndFail);
    let mut c = exec.container(task, label, exec.cfg.grade_network, exec.cfg.grade_timeout_s)?;
    c.record_base(task.env.base_patch.as_deref())?;
    let done = |mut report: GradeReport, log: String, test_output: String| {
        report.seconds = started.elapsed().as_secs_f64();
        Ok(Graded { report, instance_log: log, eval_script: eval_script.clone(), test_output })
    };

    // No patch (validation's "before" run, the harness's --no-patch mode): tests only.
    let mut applied = patch.trim().is_empty();
    if !applied {
        c.put(PATCH_FILE, patch.as_bytes())?;
    }
    let mut last = String::new();
    for (i, cmd) in APPLY_CMDS.iter().enumerate().filter(|_| !patch.trim().is_empty()) {
        if applied {
            break;
        }
        if i > 0 {
            c.shell("git checkout -- . ; git clean -fd", 300.0, 1 << 16)?;
        }
        let out = c.shell(&format!("{cmd} {PATCH_FILE}"), 300.0, 1 << 20)?;
        last = out.stdout.finish().0;
        if out.exit_code == Some(0) {
            log += &format!("{APPLY_PATCH_PASS}:\n{last}\n");
            applied = true;
            break;
        }
        log += &format!("Failed to apply patch to container: {cmd}\n");
    }
    if !applied && !patch.trim().is_empty() {
        let out = c.shell(&format!("git apply --check --reverse {PATCH_FILE}"), 300.0, 1 << 16)?;
        if out.exit_code == Some(0) {
            log += &format!("{APPLY_PATCH_PASS}: verified already applied\n");
            applied = true;
        }
    }
    if !applied {
        log += &format!("{APPLY_PATCH_FAIL}:\n{last}\n");
        report.error = Some(format!("{APPLY_PATCH_FAIL}:\n{}", last.chars().take(2000).collect::<String>()));
        report.harness = Some(InstanceReport { patch_exists: true, ..Default::default() });
        return done(report, log, String::new());
    }
    report.patch_applied = true;

    // Protected files go back to the base: judged on what the tree holds, not the patch text.
    for (path, added, removed) in c.changes()? {
        if let Some(rule) = exec.cfg.protection.rule_for(task, &path) {
            c.restore(&path)?;
            log += &format!("protected file restored: {path} ({rule})\n");
            report.tampering.push(Tampering {
                path,
                rule,
                lines_added: added.unwrap_or(0) as usize,
                lines_removed: removed.unwrap_or(0) as usize,
            });
        }
    }

    c.put("/eval.sh", eval_script.as_bytes())?;
    let out = c.exec_raw(&["/bin/bash", "-c", "/bin/bash /eval.sh 2>&1"], None, exec.cfg.grade_timeout_s, LOG_BYTES)?;
    let (mut test_output, _) = out.stdout.finish();
    if out.timed_out {
        test_output += &format!("\n\nTimeout error: {} seconds exceeded.", exec.cfg.grade_timeout_s);
        report.error = Some(format!("Test timed out after {} seconds.", exec.cfg.grade_timeout_s));
        report.log_tail = tail(&test_output);
        return done(report, log, test_output);
    }
    if out.interrupted {
        anyhow::bail!("interrupted");
    }
    report.log_tail = tail(&test_output);
    let harness = grading::eval_report(&parser, &test_output, &task.fail_to_pass, &task.pass_to_pass, eval_type)?;
    if let Some(sm) = grading::logs_eval(&parser, &test_output)? {
        let fill = |tests: &mut BTreeMap<String, TestStatus>| {
            for (id, s) in tests.iter_mut() {
                *s = status_of(sm.get(id.as_str()));
            }
        };
        fill(&mut report.fail_to_pass);
        fill(&mut report.pass_to_pass);
    } else {
        report.error = Some("invalid test log: no valid test results between the markers (see log_tail)".into());
    }
    report.resolved = harness.resolved;
    report.status = if harness.resolved { GradeStatus::Resolved } else { GradeStatus::Unresolved };
    report.harness = Some(harness);
    done(report, log, test_output)
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().rev().take(40).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}
