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

    if let Some(why) = crate::tasks::instance::unsafe_patch_path(patch) {
        log += &format!("{APPLY_PATCH_FAIL}:\n{why}\n");
        report.error = Some(format!("{APPLY_PATCH_FAIL}: {why}"));
        report.harness = Some(InstanceReport { patch_exists: true, ..Default::default() });
        return done(report, log, String::new());
    }
    // What of .git a patch could change (its config runs programs in every git command).
    let git_state = |c: &super::container::Container| -> Result<String> {
        let out = c.shell("tar -C .git -cf - config HEAD hooks info 2>/dev/null | sha256sum", 60.0, 1 << 12)?;
        Ok(out.stdout.finish().0)
    };
    let git_before = git_state(&c)?;
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
    if git_state(&c)? != git_before {
        let why = "the patch changed the repository's .git (config, hooks or info)";
        log += &format!("{APPLY_PATCH_FAIL}:\n{why}\n");
        report.error = Some(format!("{APPLY_PATCH_FAIL}: {why}"));
        report.harness = Some(InstanceReport { patch_exists: true, ..Default::default() });
        return done(report, log, String::new());
    }
    report.patch_applied = true;

    // Protected files go back to the base: judged on what the tree holds, not the patch text;
    // again after an ignore file goes back (what it hid is a change too).
    for _ in 0..3 {
        let mut rescan = false;
        for (path, added, removed) in c.changes()? {
            if let Some(rule) = exec.cfg.protection.rule_for(task, &path) {
                c.restore(&path)?;
                rescan |= crate::tasks::grade::hides_changes(&path);
                log += &format!("protected file restored: {path} ({rule})\n");
                report.tampering.push(Tampering {
                    path,
                    rule,
                    lines_added: added.unwrap_or(0) as usize,
                    lines_removed: removed.unwrap_or(0) as usize,
                });
            }
        }
        if !rescan {
            break;
        }
    }

    // pytest's own report of each test, marked with a nonce and loaded by a module written
    // after the patch under a random name: code under test can print `PASSED` lines and a
    // fake exit code into the log (the harness believes them), not into this report.
    let nonce = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
    let module = crate::tasks::grade::random_name("protege_grader_");
    let plugin_dir = format!("/tmp/{}", crate::tasks::grade::random_name("p"));
    c.put(&format!("{plugin_dir}/{module}.py"), crate::tasks::grade::REPORTER.replace("{nonce}", &nonce).as_bytes())?;
    let addopts = c.env_var("PYTEST_ADDOPTS").map(|v| format!("{v} ")).unwrap_or_default();
    let pythonpath = c.env_var("PYTHONPATH").map(|v| format!(":{v}")).unwrap_or_default();
    let extra_env =
        vec![format!("PYTEST_ADDOPTS={addopts}-p {module}"), format!("PYTHONPATH={plugin_dir}{pythonpath}")];

    c.put("/eval.sh", eval_script.as_bytes())?;
    let out =
        c.exec_env(&["/bin/bash", "-c", "/bin/bash /eval.sh 2>&1"], &extra_env, exec.cfg.grade_timeout_s, LOG_BYTES)?;
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
    // A log the harness's parser cannot read is the patch's doing: an error, as the harness.
    let (harness, sm) = match (
        grading::eval_report(&parser, &test_output, &task.fail_to_pass, &task.pass_to_pass, eval_type),
        grading::logs_eval(&parser, &test_output),
    ) {
        (Ok(h), Ok(sm)) => (h, sm),
        (Err(e), _) | (_, Err(e)) => {
            report.error = Some(format!("the test log cannot be graded: {e:#}"));
            report.status = GradeStatus::Error;
            return done(report, log, test_output);
        }
    };
    let forged = forged_log(&test_output, &nonce, sm.as_ref(), task);
    if let Some(why) = &forged {
        log += &format!("tampering: {why}\n");
        report.tampering.push(Tampering {
            path: "(test log)".into(),
            rule: why.clone(),
            lines_added: 0,
            lines_removed: 0,
        });
    }
    if let Some(sm) = sm {
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
    report.resolved = harness.resolved && forged.is_none();
    report.status = if report.resolved { GradeStatus::Resolved } else { GradeStatus::Unresolved };
    report.harness = Some(harness);
    done(report, log, test_output)
}

/// Where the log and pytest's own report (lines marked with `nonce`) disagree: a FAIL_TO_PASS
/// or PASS_TO_PASS test the log shows passing that pytest failed, or a zero exit code in the
/// log against pytest's non-zero one. `None` when they agree or pytest wrote no report (not a
/// pytest run, or one that never finished a session).
fn forged_log(log: &str, nonce: &str, sm: Option<&crate::swebench::StatusMap>, task: &TaskInstance) -> Option<String> {
    let reported = crate::tasks::grade::parse_reporter(log, nonce);
    let exit =
        log.lines().rev().find_map(|l| l.strip_prefix(nonce)?.strip_prefix(" exit ")?.trim().parse::<i64>().ok());
    let sm = sm?;
    for t in task.fail_to_pass.iter().chain(&task.pass_to_pass) {
        let shown = sm.get(t.as_str()).is_some_and(|s| s == parsers::PASSED || s == parsers::XFAIL);
        let failed = matches!(reported.get(t), Some(TestStatus::Failed) | Some(TestStatus::Error));
        if shown && failed {
            return Some(format!("the test log shows {t} passing; pytest's own report says it failed"));
        }
    }
    match (grading::test_exit_code(log), exit) {
        (Some(0), Some(e)) if e != 0 => Some(format!("the test log records exit code 0; pytest exited with {e}")),
        _ => None,
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().rev().take(40).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}
