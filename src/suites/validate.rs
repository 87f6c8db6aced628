//! `protege tasks validate|list|show|stats`: checking a suite's instances and describing them.
//!
//! A task is valid when, in the sandbox and in every one of `runs` repetitions (flakiness):
//! with only `test_patch` applied, every FAIL_TO_PASS test fails and every PASS_TO_PASS test
//! passes; with `patch` and `test_patch`, all of them pass.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::executor::Executor;
use crate::tasks::grade::{TestStatus, CANNOT_RUN};
use crate::tasks::instance::{patch_files, TaskInstance};

#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    pub instance_id: String,
    pub valid: bool,
    /// What is wrong, one line each (empty when valid).
    pub problems: Vec<String>,
    pub seconds: f64,
}

fn check_run(task: &TaskInstance, exec: &dyn Executor, run: usize) -> Vec<String> {
    let mut problems = vec![];
    let tag = |what: &str| format!("run {}: {what}", run + 1);
    let label = |what: &str| crate::executor::next_label(&format!("validate-{what}-"));
    match exec.grade(task, "", &label("before")) {
        // Not the task's fault: one line, not a list of missing tests.
        Ok(before) if before.error.as_deref().is_some_and(|e| e.starts_with(CANNOT_RUN)) => {
            problems.push(tag(before.error.as_deref().unwrap_or_default()));
            return problems;
        }
        // The harness's verdict (docker tasks): the empty patch must not resolve.
        Ok(before) if before.harness.is_some() => {
            if before.resolved {
                problems.push(tag("the task resolves without any patch"));
            }
        }
        Ok(before) => {
            for (t, s) in &before.fail_to_pass {
                if *s == TestStatus::Passed {
                    problems.push(tag(&format!("FAIL_TO_PASS {t} passes before the fix")));
                }
            }
            for (t, s) in &before.pass_to_pass {
                if *s != TestStatus::Passed {
                    problems.push(tag(&format!("PASS_TO_PASS {t} is {s:?} before the fix")));
                }
            }
        }
        Err(e) => problems.push(tag(&format!("before the fix: {e:#}"))),
    }
    match exec.grade(task, &task.patch, &label("after")) {
        // Not the task's fault: one line, not a list of missing tests.
        Ok(after) if after.error.as_deref().is_some_and(|e| e.starts_with(CANNOT_RUN)) => {
            problems.push(tag(after.error.as_deref().unwrap_or_default()))
        }
        Ok(after) if !after.tampering.is_empty() => {
            let files: Vec<String> = after.tampering.iter().map(|t| format!("{} ({})", t.path, t.rule)).collect();
            problems.push(tag(&format!(
                "the gold patch changes protected files, which grading drops: {}; adjust [protection] for this suite",
                files.join(", ")
            )))
        }
        Ok(after) if !after.patch_applied => {
            problems.push(tag(&format!("the gold patch does not apply: {}", after.error.unwrap_or_default())))
        }
        Ok(after) if after.harness.is_some() => {
            if !after.resolved {
                let failing: Vec<String> = after
                    .fail_to_pass
                    .iter()
                    .chain(&after.pass_to_pass)
                    .filter(|(_, s)| **s != TestStatus::Passed && **s != TestStatus::Skipped)
                    .map(|(t, s)| format!("{t} ({s:?})"))
                    .collect();
                problems.push(tag(&format!(
                    "the gold patch does not resolve the task{}: {}",
                    after.error.map(|e| format!(" ({e})")).unwrap_or_default(),
                    failing.join(", ")
                )));
            }
        }
        Ok(after) => {
            for (t, s) in after.fail_to_pass.iter().chain(&after.pass_to_pass) {
                if *s != TestStatus::Passed {
                    problems.push(tag(&format!("{t} is {s:?} after the fix")));
                }
            }
        }
        Err(e) => problems.push(tag(&format!("after the fix: {e:#}"))),
    }
    problems
}

/// Validates one task `runs` times.
pub fn validate_task(task: &TaskInstance, exec: &dyn Executor, runs: usize) -> Validation {
    let started = std::time::Instant::now();
    let mut problems = vec![];
    for run in 0..runs.max(1) {
        if crate::interrupt::requested() {
            problems.push("not checked: the run was stopped".into());
            break;
        }
        problems.extend(check_run(task, exec, run));
    }
    Validation {
        instance_id: task.instance_id.clone(),
        valid: problems.is_empty(),
        problems,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Validates every task, `concurrency` at a time, with a progress bar; results in suite order.
pub fn validate_suite(
    tasks: &[TaskInstance],
    exec: &dyn Executor,
    runs: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Validation>> {
    let _signals = crate::interrupt::watch();
    let next = AtomicUsize::new(0);
    let out = Mutex::new(BTreeMap::new());
    let bar = indicatif::ProgressBar::new(tasks.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tasks, ETA {eta} | {msg}").expect("template"),
    );
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(t) = tasks.get(i) else { return };
                let v = validate_task(t, exec, runs);
                let mut o = out.lock().expect("lock");
                o.insert(i, v);
                bar.set_message(format!("{} invalid", o.values().filter(|v| !v.valid).count()));
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    crate::interrupt::check()?;
    let vals: Vec<Validation> = out.into_inner().expect("lock").into_values().collect();
    // Every task failing because the tests cannot run at all is one problem of the machine.
    let cannot_run = |v: &Validation| v.problems.iter().find_map(|p| p.find(CANNOT_RUN).map(|i| p[i..].to_string()));
    if let (false, Some(first)) = (vals.is_empty(), vals.first().and_then(cannot_run)) {
        if vals.iter().all(|v| cannot_run(v).is_some()) {
            anyhow::bail!("{first}");
        }
    }
    Ok(vals)
}

/// Lines and files a patch changes.
pub fn patch_size(patch: &str) -> (usize, usize) {
    let lines = patch
        .lines()
        .filter(|l| (l.starts_with('+') && !l.starts_with("+++")) || (l.starts_with('-') && !l.starts_with("---")))
        .count();
    (lines, patch_files(patch).len())
}

fn field<'a>(t: &'a TaskInstance, path: &str) -> Option<&'a str> {
    let mut parts = path.split('.');
    let mut v = t.extra.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    v.as_str()
}

/// One line per task: id, split, files and lines the fix changes, tests.
pub fn list(tasks: &[TaskInstance]) -> String {
    let mut s = format!("{:48} {:6} {:>5} {:>5} {:>4} {:>4}\n", "instance_id", "split", "files", "lines", "F2P", "P2P");
    for t in tasks {
        let (lines, files) = patch_size(&t.patch);
        s += &format!(
            "{:48} {:6} {:>5} {:>5} {:>4} {:>4}\n",
            t.instance_id,
            field(t, "split").unwrap_or("-"),
            files,
            lines,
            t.fail_to_pass.len(),
            t.pass_to_pass.len()
        );
    }
    s
}

/// Counts by package, mutation operator (generated tasks) and difficulty.
pub fn stats(tasks: &[TaskInstance]) -> String {
    let mut by_repo: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_op: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_lines: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_files: BTreeMap<usize, usize> = BTreeMap::new();
    let mut runtime: BTreeMap<String, f64> = BTreeMap::new();
    for t in tasks {
        if let Some(secs) = t.extra.get("provenance").and_then(|p| p.get("test_seconds")).and_then(|v| v.as_f64()) {
            runtime.insert(t.repo.clone(), secs);
        }
        *by_repo.entry(t.repo.clone()).or_default() += 1;
        *by_op.entry(field(t, "provenance.operator").unwrap_or("hand-written").to_string()).or_default() += 1;
        let (lines, files) = patch_size(&t.patch);
        let bucket = match lines {
            0..=2 => "1-2 lines",
            3..=6 => "3-6 lines",
            7..=20 => "7-20 lines",
            _ => "over 20 lines",
        };
        *by_lines.entry(bucket).or_default() += 1;
        *by_files.entry(files).or_default() += 1;
    }
    let mut s = format!("{} tasks\n", tasks.len());
    let mut table = |title: &str, rows: Vec<(String, usize)>| {
        s += &format!("\n| {title} | tasks |\n|---|---|\n");
        for (k, v) in rows {
            s += &format!("| {k} | {v} |\n");
        }
    };
    table("package", by_repo.into_iter().collect());
    table("operator", by_op.into_iter().collect());
    table("lines changed by the fix", by_lines.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    table("files changed by the fix", by_files.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    if !runtime.is_empty() {
        s += "\n| package | test suite seconds (baseline run) |\n|---|---|\n";
        for (k, v) in runtime {
            s += &format!("| {k} | {v:.1} |\n");
        }
    }
    s
}
