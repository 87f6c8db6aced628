//! `protege grade`: the harness's job for anyone's predictions. Reads predictions
//! (`{"instance_id", "model_name_or_path", "model_patch"}` per line, or a JSON list), grades
//! each against its task, and writes per-instance logs (`logs/<id>/patch.diff`, `eval.sh`,
//! `test_output.txt`, `run_instance.log`, `report.json`) and a `report.json` with the
//! harness's keys and counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::executor::{ExecutorKind, Executors};
use crate::tasks::grade::{GradeReport, GradeStatus};
use crate::tasks::TaskInstance;
use crate::util::write_atomic;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    pub instance_id: String,
    #[serde(default)]
    pub model_name_or_path: Option<String>,
    pub model_patch: Option<String>,
}

/// Reads predictions: JSONL, or a JSON list (as the harness accepts).
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        return crate::inputs::json_file(&text, &path.display().to_string())
            .context("expected a list of {instance_id, model_name_or_path, model_patch}");
    }
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        out.push(
            crate::inputs::json_line(line, &path.display().to_string(), i + 1)
                .context("expected {\"instance_id\", \"model_name_or_path\", \"model_patch\"}")?,
        );
    }
    Ok(out)
}

/// The run report, with the harness's keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunReport {
    pub total_instances: usize,
    pub submitted_instances: usize,
    pub completed_instances: usize,
    pub resolved_instances: usize,
    pub unresolved_instances: usize,
    pub empty_patch_instances: usize,
    pub error_instances: usize,
    pub completed_ids: Vec<String>,
    pub incomplete_ids: Vec<String>,
    pub empty_patch_ids: Vec<String>,
    pub submitted_ids: Vec<String>,
    pub resolved_ids: Vec<String>,
    pub unresolved_ids: Vec<String>,
    pub error_ids: Vec<String>,
    /// Patches whose changes to protected files were dropped (protege's addition).
    pub tampering_ids: Vec<String>,
    pub schema_version: u32,
}

/// Grades `predictions` for `tasks` with `workers` at a time; writes `out`.
pub fn grade_predictions(
    tasks: &[TaskInstance],
    predictions: &[Prediction],
    exec: &Executors,
    workers: usize,
    out: &Path,
) -> Result<RunReport> {
    let by_id: BTreeMap<&str, &TaskInstance> = tasks.iter().map(|t| (t.instance_id.as_str(), t)).collect();
    let mut seen = BTreeSet::new();
    for p in predictions {
        if !by_id.contains_key(p.instance_id.as_str()) {
            bail!("prediction for {:?}, which is not in the suite", p.instance_id);
        }
        if !seen.insert(p.instance_id.clone()) {
            bail!("two predictions for {:?}", p.instance_id);
        }
    }
    let selected: Vec<&TaskInstance> = predictions.iter().map(|p| by_id[p.instance_id.as_str()]).collect();
    let owned: Vec<TaskInstance> = selected.iter().map(|t| (*t).clone()).collect();
    exec.prepare(&owned)?;
    std::fs::create_dir_all(out.join("logs")).with_context(|| format!("cannot create {}", out.display()))?;
    let _signals = crate::interrupt::watch();
    let results: Mutex<BTreeMap<String, GradeStatus>> = Mutex::new(BTreeMap::new());
    let tampered = Mutex::new(vec![]);
    let next = AtomicUsize::new(0);
    let bar = indicatif::ProgressBar::new(predictions.len() as u64);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                if crate::interrupt::requested() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(p) = predictions.get(i) else { return };
                let task = by_id[p.instance_id.as_str()];
                let status = match grade_one(task, p, exec, &out.join("logs").join(&p.instance_id)) {
                    Ok(Some(r)) => {
                        if !r.tampering.is_empty() {
                            tampered.lock().expect("lock").push(p.instance_id.clone());
                        }
                        r.status
                    }
                    Ok(None) => GradeStatus::EmptyPatch,
                    Err(e) => {
                        if crate::interrupt::requested() {
                            return;
                        }
                        bar.println(format!("{}: {e:#}", p.instance_id));
                        GradeStatus::Error
                    }
                };
                results.lock().expect("lock").insert(p.instance_id.clone(), status);
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    crate::interrupt::check()?;
    let results = results.into_inner().expect("lock");
    let ids =
        |s: GradeStatus| -> Vec<String> { results.iter().filter(|(_, v)| **v == s).map(|(k, _)| k.clone()).collect() };
    let mut r = RunReport {
        total_instances: tasks.len(),
        submitted_instances: predictions.len(),
        resolved_ids: ids(GradeStatus::Resolved),
        unresolved_ids: ids(GradeStatus::Unresolved),
        empty_patch_ids: ids(GradeStatus::EmptyPatch),
        error_ids: ids(GradeStatus::Error),
        submitted_ids: seen.iter().cloned().collect(),
        incomplete_ids: tasks
            .iter()
            .filter(|t| !seen.contains(&t.instance_id))
            .map(|t| t.instance_id.clone())
            .collect(),
        tampering_ids: {
            let mut t = tampered.into_inner().expect("lock");
            t.sort();
            t
        },
        schema_version: 2,
        ..Default::default()
    };
    r.completed_ids = r.resolved_ids.iter().chain(&r.unresolved_ids).cloned().collect();
    r.completed_ids.sort();
    r.completed_instances = r.completed_ids.len();
    r.resolved_instances = r.resolved_ids.len();
    r.unresolved_instances = r.unresolved_ids.len();
    r.empty_patch_instances = r.empty_patch_ids.len();
    r.error_instances = r.error_ids.len();
    write_atomic(&out.join("report.json"), serde_json::to_string_pretty(&r)?.as_bytes())?;
    Ok(r)
}

/// Grades one prediction into `dir`; `None` for an empty patch (not run, as the harness).
fn grade_one(task: &TaskInstance, p: &Prediction, exec: &Executors, dir: &Path) -> Result<Option<GradeReport>> {
    let patch = p.model_patch.clone().unwrap_or_default();
    if patch.is_empty() {
        return Ok(None);
    }
    std::fs::create_dir_all(dir)?;
    write_atomic(&dir.join("patch.diff"), patch.as_bytes())?;
    let label = crate::executor::next_label("grade-");
    let report = if exec.kind_for(task) == ExecutorKind::Docker {
        let g = crate::executor::docker::grade::grade(exec.docker()?, task, &patch, &label)?;
        write_atomic(&dir.join("eval.sh"), g.eval_script.as_bytes())?;
        write_atomic(&dir.join("test_output.txt"), g.test_output.as_bytes())?;
        write_atomic(&dir.join("run_instance.log"), g.instance_log.as_bytes())?;
        g.report
    } else {
        use crate::executor::Executor;
        let r = exec.grade(task, &patch, &label)?;
        write_atomic(&dir.join("test_output.txt"), r.log_tail.as_bytes())?;
        r
    };
    let harness = report.harness.clone().unwrap_or_default();
    let entry = json!({ &p.instance_id: {
        "patch_is_None": p.model_patch.is_none(),
        "patch_exists": true,
        "patch_successfully_applied": report.patch_applied && (report.harness.is_none() || harness.patch_successfully_applied),
        "resolved": report.resolved,
        "tests_status": harness.tests_status,
        "protege": {"status": report.status, "tampering": report.tampering, "error": report.error, "seconds": report.seconds},
    }});
    write_atomic(&dir.join("report.json"), serde_json::to_string_pretty(&entry)?.as_bytes())?;
    Ok(Some(report))
}
