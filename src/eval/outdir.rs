//! `eval --out DIR`: a directory that already holds results is refused unless the user says to
//! resume it (finished tasks kept, the rest run) or to overwrite it, so that a second eval never
//! silently replaces the first one's results.
//!
//! Files: `eval.json` (what was evaluated: suite, policy, expert, seed), `results.jsonl` (one
//! [`TaskResult`] per finished task, written after its trajectory and prediction lines, so a
//! task counts as finished only once all three are on disk), `trajectories.jsonl`,
//! `predictions.jsonl`, and at the end `summary.json` / `summary.md`.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::TaskResult;
use crate::util::write_atomic;

/// What to do with an `--out` that already holds files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExistingOut {
    /// Refuse (the default).
    #[default]
    Refuse,
    /// Remove the previous eval's files and start again.
    Overwrite,
    /// Keep the finished tasks of the same evaluation and run the others.
    Resume,
}

/// What an eval directory was made by; a resumed eval must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub suite: PathBuf,
    pub policy: String,
    pub expert: String,
    pub seed: u64,
    /// The episode, limit, grading, sampling and loop settings, as written by `Debug`.
    pub settings: String,
    /// Names, sizes and modification times of the local model's (and adapter's) files: a
    /// model retrained in place is another model.
    pub model_files: String,
}

/// [`Identity::model_files`] of these directories (or files).
pub fn fingerprint(paths: &[&Path]) -> String {
    let mut parts = vec![];
    for p in paths {
        let files: Vec<PathBuf> = match std::fs::read_dir(p) {
            Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(_) => vec![p.to_path_buf()],
        };
        for f in files {
            if let Ok(m) = std::fs::metadata(&f) {
                let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                parts.push(format!("{name}:{}:{}", m.len(), mtime.map_or(0, |d| d.as_secs())));
            }
        }
    }
    parts.sort();
    parts.join(",")
}

/// Where two `Debug` strings first differ, shortly.
fn first_difference(old: &str, new: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.split(", ").collect(), new.split(", ").collect());
    match a.iter().zip(&b).find(|(x, y)| x != y) {
        Some((x, y)) => format!("{x} (now {y})"),
        None => format!("{} settings (now {})", a.len(), b.len()),
    }
}

/// The files an eval writes (and `Overwrite` removes).
const FILES: [&str; 6] =
    ["eval.json", "results.jsonl", "trajectories.jsonl", "predictions.jsonl", "summary.json", "summary.md"];

/// Called first, before anything slow: refuses a non-empty `out` unless told otherwise.
pub fn check(out: &Path, mode: ExistingOut) -> Result<()> {
    let entries: Vec<String> = match std::fs::read_dir(out) {
        Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            bail!("--out {} is a file, not a directory", out.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read --out {}", out.display())),
    };
    if entries.is_empty() {
        return Ok(());
    }
    match mode {
        ExistingOut::Refuse => bail!(
            "--out {} is not empty (it holds {}): pass --resume to finish that evaluation or --overwrite to replace it",
            out.display(),
            summarise(&entries)
        ),
        ExistingOut::Overwrite => {
            let foreign: Vec<&String> = entries.iter().filter(|e| !FILES.contains(&e.as_str())).collect();
            if !foreign.is_empty() {
                bail!(
                    "--out {} holds files an eval does not write ({}); --overwrite only replaces an eval's own results: choose another directory",
                    out.display(),
                    summarise(&foreign.into_iter().cloned().collect::<Vec<_>>())
                );
            }
            Ok(())
        }
        ExistingOut::Resume => Ok(()),
    }
}

fn summarise(entries: &[String]) -> String {
    let mut v: Vec<&str> = entries.iter().map(|s| s.as_str()).collect();
    v.sort();
    let more = v.len().saturating_sub(4);
    v.truncate(4);
    let list = v.join(", ");
    if more > 0 {
        format!("{list} and {more} more")
    } else {
        list
    }
}

/// The output files, ready to append to, and the tasks a resumed eval already finished.
pub struct OutFiles {
    pub trajectories: File,
    pub predictions: File,
    pub results: File,
    pub done: Vec<TaskResult>,
}

/// Opens `out` for this evaluation: fresh (after [`check`]), or resumed — then `eval.json` must
/// name the same evaluation, finished tasks are read from `results.jsonl`, and the lines of
/// unfinished tasks (a run killed between files) are dropped from the other files.
pub fn open(out: &Path, mode: ExistingOut, id: &Identity) -> Result<OutFiles> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let id_path = out.join("eval.json");
    let mut done = vec![];
    let has_results = ["results.jsonl", "trajectories.jsonl", "summary.json"].iter().any(|f| out.join(f).exists());
    if mode == ExistingOut::Resume && !id_path.exists() && has_results {
        bail!(
            "cannot resume {}: it has no eval.json saying what it evaluated (made by an older protege?); use --overwrite or another --out",
            out.display()
        );
    }
    if mode == ExistingOut::Resume && id_path.exists() {
        let text = std::fs::read_to_string(&id_path).with_context(|| format!("cannot read {}", id_path.display()))?;
        let was: Identity = crate::inputs::json_file(&text, &id_path.display().to_string())?;
        let mut changed = vec![];
        if was.suite != id.suite {
            changed.push(format!("suite {} (now {})", was.suite.display(), id.suite.display()));
        }
        if was.policy != id.policy {
            changed.push(format!("policy {} (now {})", was.policy, id.policy));
        }
        if was.expert != id.expert {
            changed.push(format!("expert {} (now {})", was.expert, id.expert));
        }
        if was.seed != id.seed {
            changed.push(format!("seed {} (now {})", was.seed, id.seed));
        }
        if was.settings != id.settings {
            changed.push(format!("other settings: {}", first_difference(&was.settings, &id.settings)));
        }
        if was.model_files != id.model_files {
            changed.push("the model's files (changed since)".to_string());
        }
        if !changed.is_empty() {
            bail!(
                "cannot resume {}: it evaluated {}; use another --out or --overwrite",
                out.display(),
                changed.join(", ")
            );
        }
        done = read_results(&out.join("results.jsonl"))?;
        let ids: BTreeSet<&str> = done.iter().map(|r| r.task_id.as_str()).collect();
        // A torn last line (a kill mid-write) would otherwise be appended to.
        keep_lines_of(&out.join("results.jsonl"), "task_id", &ids)?;
        keep_lines_of(&out.join("trajectories.jsonl"), "task_id", &ids)?;
        keep_lines_of(&out.join("predictions.jsonl"), "instance_id", &ids)?;
        // The summary is rewritten at the end.
        for f in ["summary.json", "summary.md"] {
            let _ = std::fs::remove_file(out.join(f));
        }
    } else {
        for f in FILES {
            match std::fs::remove_file(out.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", out.join(f).display()))
                }
                _ => {}
            }
        }
    }
    write_atomic(&id_path, serde_json::to_string_pretty(id)?.as_bytes())?;
    let append = |name: &str| {
        let p = out.join(name);
        OpenOptions::new().create(true).append(true).open(&p).with_context(|| format!("cannot open {}", p.display()))
    };
    Ok(OutFiles {
        trajectories: append("trajectories.jsonl")?,
        predictions: append("predictions.jsonl")?,
        results: append("results.jsonl")?,
        done,
    })
}

/// A JSONL file's text (empty when there is none) and the part of it made of complete lines:
/// a last line cut short by a kill is not one.
fn complete_lines(path: &Path) -> Result<(String, usize)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    Ok((text, end))
}

/// Finished tasks (complete lines only).
fn read_results(path: &Path) -> Result<Vec<TaskResult>> {
    let (text, end) = complete_lines(path)?;
    let complete = &text[..end];
    let mut out: Vec<TaskResult> = vec![];
    for (i, line) in complete.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let r: TaskResult = crate::inputs::json_line(line, &path.display().to_string(), i + 1)?;
        if !out.iter().any(|o| o.task_id == r.task_id) {
            out.push(r);
        }
    }
    Ok(out)
}

/// Rewrites a JSONL file keeping the complete lines whose `key` is in `ids` (first one each).
fn keep_lines_of(path: &Path, key: &str, ids: &BTreeSet<&str>) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let (text, end) = complete_lines(path)?;
    let complete = &text[..end];
    let mut seen = BTreeSet::new();
    let mut kept = String::new();
    for line in complete.lines() {
        let id = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get(key).and_then(|x| x.as_str()).map(str::to_string));
        if let Some(id) = id {
            if ids.contains(id.as_str()) && seen.insert(id) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    if kept.len() != text.len() {
        write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_empty_out_is_refused_unless_told() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("eval");
        check(&out, ExistingOut::Refuse).unwrap();
        std::fs::create_dir(&out).unwrap();
        check(&out, ExistingOut::Refuse).unwrap();
        std::fs::write(out.join("summary.json"), "{}").unwrap();
        let e = check(&out, ExistingOut::Refuse).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("summary.json") && e.contains("--resume"), "{e}");
        check(&out, ExistingOut::Overwrite).unwrap();
        check(&out, ExistingOut::Resume).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = check(&out, ExistingOut::Overwrite).unwrap_err().to_string();
        assert!(e.contains("notes.txt"), "{e}");
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(check(&file, ExistingOut::Resume).unwrap_err().to_string().contains("is a file"));
    }
}
