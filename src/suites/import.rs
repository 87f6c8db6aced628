//! `protege tasks import`: dataset rows into a suite of docker tasks.
//!
//! Reads SWE-bench (full, Lite, Verified; any split), SWE-Gym and SWE-smith rows from JSONL, a
//! JSON array, or Parquet as downloaded from the hub. Image names follow each dataset's scheme unless the row carries one (`image`
//! in SWE-bench 5.x rows, `image_name` in SWE-smith's) or `--image-template` overrides it.
//! The eval script is the row's (5.x) or generated from the spec table (4.x); SWE-smith's
//! `patch` introduces the bug, so it becomes the task's `env.base_patch` and its reverse the
//! gold patch.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::swebench::{check_parser, docker_id, grading, script, EvalType};
use crate::tasks::instance::{LocalEnv, TaskInstance};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Dataset {
    /// From the row: SWE-smith when it has `image_name`, else SWE-bench.
    #[default]
    Auto,
    Swebench,
    SweGym,
    SweSmith,
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub dataset: Dataset,
    /// `{id}` (the instance id), `{id_1776}` and `{id_s}` (the SWE-bench and SWE-Gym forms).
    pub image_template: Option<String>,
    /// Test command for rows with neither an eval script nor a spec (SWE-smith).
    pub test_cmd: Option<String>,
}

/// SWE-smith's rows carry no test patch or spec; their tests are the repository's own.
const SMITH_TEST_CMD: &str = "pytest -rA --tb=no -p no:cacheprovider";

fn str_field<'a>(row: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    row.get(key).and_then(|v| v.as_str())
}

/// Reads the rows of `path`: JSONL, or a JSON array of objects.
pub fn read_rows(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.starts_with(b"PAR1") {
        return read_parquet(path, bytes);
    }
    let text = String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8 text", path.display()))?;
    if text.trim_start().starts_with('[') {
        let rows: Vec<Map<String, Value>> = serde_json::from_str(&text)
            .with_context(|| format!("{}: expected a JSON array of rows", path.display()))?;
        return Ok(rows);
    }
    let mut rows = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Map<String, Value> = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: expected one JSON object per line", path.display(), i + 1))?;
        rows.push(row);
    }
    Ok(rows)
}

/// Rows of a Parquet file as the hub serves them (snappy or uncompressed columns).
fn read_parquet(path: &Path, bytes: Vec<u8>) -> Result<Vec<Map<String, Value>>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(bytes::Bytes::from(bytes))
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let mut rows = vec![];
    for (i, row) in reader.get_row_iter(None)?.enumerate() {
        let row = row.with_context(|| format!("{}: row {}", path.display(), i + 1))?;
        match row.to_json_value() {
            Value::Object(m) => rows.push(m),
            other => bail!("{}: row {} is not a record: {other}", path.display(), i + 1),
        }
    }
    Ok(rows)
}

/// Reverses a unified git diff (SWE-smith's bug-introducing patch into its fix).
pub fn reverse_patch(patch: &str) -> String {
    let mut out = String::with_capacity(patch.len());
    let lines: Vec<&str> = patch.split_inclusive('\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let body = l.trim_end_matches('\n');
        let nl = if l.ends_with('\n') { "\n" } else { "" };
        if let Some(rest) = body.strip_prefix("diff --git ") {
            // `a/X b/Y` → `a/Y b/X` (split at the ` b/` that leaves equal halves when names match).
            let swapped = match rest.rfind(" b/") {
                Some(k) => format!("a/{} b/{}", &rest[k + 3..], rest[..k].strip_prefix("a/").unwrap_or(&rest[..k])),
                None => rest.to_string(),
            };
            out += &format!("diff --git {swapped}{nl}");
        } else if body.starts_with("--- ") && i + 1 < lines.len() && lines[i + 1].starts_with("+++ ") {
            let old = &body[4..];
            let new = lines[i + 1].trim_end_matches('\n')[4..].to_string();
            let nl2 = if lines[i + 1].ends_with('\n') { "\n" } else { "" };
            let flip = |p: &str, to: char| -> String {
                if p == "/dev/null" {
                    p.into()
                } else {
                    format!("{to}/{}", p.get(2..).unwrap_or(p))
                }
            };
            out += &format!("--- {}{nl}+++ {}{nl2}", flip(&new, 'a'), flip(old, 'b'));
            i += 1;
        } else if let Some(rest) = body.strip_prefix("@@ -") {
            // `@@ -a,b +c,d @@ ctx` → `@@ -c,d +a,b @@ ctx`
            match rest.split_once(" +").and_then(|(a, r)| r.split_once(" @@").map(|(c, ctx)| (a, c, ctx))) {
                Some((a, c, ctx)) => out += &format!("@@ -{c} +{a} @@{ctx}{nl}"),
                None => out += l,
            }
        } else if let Some(r) = body.strip_prefix("new file mode ") {
            out += &format!("deleted file mode {r}{nl}");
        } else if let Some(r) = body.strip_prefix("deleted file mode ") {
            out += &format!("new file mode {r}{nl}");
        } else if let Some(r) = body.strip_prefix("old mode ") {
            out += &format!("new mode {r}{nl}");
        } else if let Some(r) = body.strip_prefix("new mode ") {
            out += &format!("old mode {r}{nl}");
        } else if let Some(r) = body.strip_prefix("rename from ") {
            out += &format!("rename to {r}{nl}");
        } else if let Some(r) = body.strip_prefix("rename to ") {
            out += &format!("rename from {r}{nl}");
        } else if let Some(r) = body.strip_prefix("index ") {
            let (hashes, mode) = r.split_once(' ').map(|(h, m)| (h, format!(" {m}"))).unwrap_or((r, String::new()));
            match hashes.split_once("..") {
                Some((a, b)) => out += &format!("index {b}..{a}{mode}{nl}"),
                None => out += l,
            }
        } else if let Some(r) = body.strip_prefix('+') {
            out += &format!("-{r}{nl}");
        } else if let Some(r) = body.strip_prefix('-') {
            out += &format!("+{r}{nl}");
        } else {
            out += l;
        }
        i += 1;
    }
    // Hunks list removals before additions; after the swap they must still do so.
    reorder_hunks(&out)
}

/// Within each run of changed lines, puts `-` lines before `+` lines (git apply accepts
/// either order, `patch` too; kept canonical for readers).
fn reorder_hunks(patch: &str) -> String {
    let mut out = String::with_capacity(patch.len());
    let (mut minus, mut plus) = (String::new(), String::new());
    let mut in_hunk = false;
    for l in patch.split_inclusive('\n') {
        if l.starts_with("@@ ") {
            in_hunk = true;
        } else if l.starts_with("diff --git ") {
            in_hunk = false;
        }
        if in_hunk && l.starts_with('-') && !l.starts_with("--- ") {
            minus += l;
            continue;
        }
        if in_hunk && l.starts_with('+') && !l.starts_with("+++ ") {
            plus += l;
            continue;
        }
        out += &minus;
        out += &plus;
        minus.clear();
        plus.clear();
        out += l;
    }
    out += &minus;
    out += &plus;
    out
}

/// Whether a row gets the generic pytest spec (no eval script, repo/version not in the table).
pub fn uses_generic_spec(row: &Map<String, Value>, o: &ImportOptions) -> bool {
    let version = row.get("version").map(|v| v.as_str().map(|s| s.to_string()).unwrap_or_else(|| v.to_string()));
    let repo = str_field(row, "repo").unwrap_or_default();
    str_field(row, "eval_script").is_none()
        && !row.contains_key("image_name")
        && o.dataset != Dataset::SweSmith
        && o.test_cmd.is_none()
        && version.as_deref().is_none_or(|v| script::spec(repo, v).is_err())
}

/// One dataset row as a docker task.
pub fn row_to_task(row: &Map<String, Value>, o: &ImportOptions) -> Result<TaskInstance> {
    let id = str_field(row, "instance_id").context("missing `instance_id`")?.to_string();
    let dataset = match o.dataset {
        Dataset::Auto if row.contains_key("image_name") => Dataset::SweSmith,
        Dataset::Auto => Dataset::Swebench,
        d => d,
    };
    let image = match (&o.image_template, str_field(row, "image"), str_field(row, "image_name")) {
        (Some(t), _, _) => t
            .replace("{id_1776}", &docker_id(&id, "_1776_"))
            .replace("{id_s}", &docker_id(&id, "_s_"))
            .replace("{id}", &id),
        (None, Some(img), _) => img.to_string(),
        (None, None, Some(img)) => img.to_string(),
        (None, None, None) => match dataset {
            Dataset::SweGym => format!("xingyaoww/sweb.eval.x86_64.{}", docker_id(&id, "_s_")),
            Dataset::SweSmith => bail!("SWE-smith row without `image_name` (or pass --image-template)"),
            _ => format!("swebench/sweb.eval.x86_64.{}:latest", docker_id(&id, "_1776_")),
        },
    };
    let repo = str_field(row, "repo").context("missing `repo`")?.to_string();
    let list = |key: &str| -> Result<Vec<String>> {
        match row.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::String(s)) => {
                serde_json::from_str(s).with_context(|| format!("`{key}`: a JSON string that is no list of test ids"))
            }
            Some(v) => {
                serde_json::from_value(v.clone()).with_context(|| format!("`{key}`: expected a list of test ids"))
            }
        }
    };
    let (f2p, p2p) = (list("FAIL_TO_PASS")?, list("PASS_TO_PASS")?);
    let patch = str_field(row, "patch").context("missing `patch`")?.to_string();
    let test_patch = str_field(row, "test_patch").unwrap_or_default().to_string();
    let base_commit = str_field(row, "base_commit").unwrap_or("HEAD").to_string();
    let version = row.get("version").map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let smith = dataset == Dataset::SweSmith;
    let (gold, base_patch) = if smith { (reverse_patch(&patch), Some(patch)) } else { (patch, None) };
    let eval_script = match str_field(row, "eval_script") {
        Some(s) => s.to_string(),
        None if smith || o.test_cmd.is_some() => {
            let cmd = o.test_cmd.as_deref().unwrap_or(SMITH_TEST_CMD);
            let files: std::collections::BTreeSet<&str> =
                f2p.iter().chain(&p2p).map(|t| t.split("::").next().unwrap_or(t)).collect();
            let files: Vec<&str> = files.into_iter().collect();
            format!(
                "#!/bin/bash\nset -uxo pipefail\nsource /opt/miniconda3/bin/activate\nconda activate testbed\ncd /testbed\n: '{}'\n{cmd} {}\n: '{}'\n",
                grading::START_TEST_OUTPUT,
                files.join(" "),
                grading::END_TEST_OUTPUT
            )
        }
        None => match version.as_deref().map(|v| script::spec(&repo, v)) {
            Some(Ok(spec)) => script::generate_with(spec, &repo, &base_commit, &test_patch),
            // Outside the table (SWE-Gym's repositories): the generic pytest spec, said by
            // `import` and checked by `tasks validate --executor docker`.
            _ => script::generate_with(&script::generic_spec(), &repo, &base_commit, &test_patch),
        },
    };
    let generic = uses_generic_spec(row, o);
    let log_parser = match str_field(row, "log_parser") {
        Some(p) => p.to_string(),
        None if smith || o.test_cmd.is_some() => "parse_log_pytest".into(),
        None if generic => "parse_log_pytest".into(),
        None => script::specs()
            .log_parsers
            .get(&repo)
            .cloned()
            .with_context(|| format!("no log parser known for {repo}; give the row a `log_parser`"))?,
    };
    check_parser(&log_parser)?;
    let eval_type = match str_field(row, "eval_type") {
        None => EvalType::PassAndFail,
        Some(t) => serde_json::from_value(Value::String(t.into()))
            .with_context(|| format!("`eval_type` {t:?}: expected pass_and_fail or fail_only"))?,
    };
    let mut extra = Map::new();
    for key in ["version", "created_at", "hints_text", "environment_setup_commit"] {
        if let Some(v) = row.get(key).filter(|v| !v.is_null()) {
            extra.insert(
                key.into(),
                if key == "version" { Value::String(version.clone().unwrap_or_default()) } else { v.clone() },
            );
        }
    }
    extra.insert("provenance".into(), Value::String(format!("{dataset:?}").to_lowercase()));
    Ok(TaskInstance {
        instance_id: id,
        repo,
        base_commit,
        problem_statement: str_field(row, "problem_statement").unwrap_or_default().to_string(),
        patch: gold,
        test_patch,
        fail_to_pass: f2p,
        pass_to_pass: p2p,
        env: LocalEnv {
            executor: Some(crate::executor::ExecutorKind::Docker),
            test_cmd: crate::tasks::instance::DEFAULT_TEST_CMD.into(),
            base_patch,
            image: Some(image),
            workdir: Some("/testbed".into()),
            eval_script: Some(eval_script),
            log_parser: Some(log_parser),
            eval_type: Some(eval_type),
            ..Default::default()
        },
        extra,
    })
}

/// Imports `files` into the suite `out/tasks.jsonl`; returns how many tasks were written.
pub fn import(files: &[PathBuf], out: &Path, o: &ImportOptions) -> Result<usize> {
    let mut lines = String::new();
    let mut seen = std::collections::HashSet::new();
    let mut n = 0;
    let mut generic = std::collections::BTreeSet::new();
    for f in files {
        for (i, row) in read_rows(f)?.iter().enumerate() {
            if uses_generic_spec(row, o) {
                generic.insert(str_field(row, "repo").unwrap_or("?").to_string());
            }
            let t = row_to_task(row, o).with_context(|| {
                format!("{} row {}: {:?}", f.display(), i + 1, str_field(row, "instance_id").unwrap_or("?"))
            })?;
            t.validate().with_context(|| format!("{} row {}: task {:?}", f.display(), i + 1, t.instance_id))?;
            if !seen.insert(t.instance_id.clone()) {
                bail!("{} row {}: duplicate instance_id {:?}", f.display(), i + 1, t.instance_id);
            }
            lines += &serde_json::to_string(&t)?;
            lines.push('\n');
            n += 1;
        }
    }
    if n == 0 {
        bail!("no rows in {files:?}");
    }
    if !generic.is_empty() {
        eprintln!(
            "tasks import: {} repositories are not in the SWE-bench spec table ({}); their eval scripts run `pytest -rA` on the test patch's files with parse_log_pytest: check them with `protege tasks validate --executor docker`",
            generic.len(),
            generic.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::util::write_atomic(&out.join("tasks.jsonl"), lines.as_bytes())?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parquet_rows_read_as_their_jsonl_twin() {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let pq = read_rows(&fx.join("swebench_rows.parquet")).unwrap();
        let js = read_rows(&fx.join("swebench_rows.jsonl")).unwrap();
        assert_eq!(pq, js);
        let o = ImportOptions::default();
        let t = row_to_task(&pq[0], &o).unwrap();
        assert_eq!(t.env.image.as_deref(), Some("swebench/sweb.eval.x86_64.psf_1776_requests-1963:latest"));
        assert_eq!(t.env.log_parser.as_deref(), Some("parse_log_pytest_options"));
        assert!(t.env.eval_script.as_deref().unwrap().contains("pytest -rA tests/test_m.py"));
        let gym = read_rows(&fx.join("swegym_rows.parquet")).unwrap();
        let t = row_to_task(&gym[0], &ImportOptions { dataset: Dataset::SweGym, ..o.clone() }).unwrap();
        assert_eq!(t.fail_to_pass, vec!["tests/test_m.py::test_new"]);
        assert_eq!(t.env.image.as_deref(), Some("xingyaoww/sweb.eval.x86_64.getmoto_s_moto-5752"));
        let bad = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(bad.path(), b"PAR1 not really").unwrap();
        assert!(format!("{:#}", read_rows(bad.path()).unwrap_err()).contains("not a readable Parquet file"));
    }

    #[test]
    fn reversing_twice_gives_the_patch_back() {
        let p = "diff --git a/x.py b/x.py\nindex 111..222 100644\n--- a/x.py\n+++ b/x.py\n@@ -1,3 +1,3 @@\n a\n-b\n+c\n d\ndiff --git a/n.py b/n.py\nnew file mode 100644\n--- /dev/null\n+++ b/n.py\n@@ -0,0 +1 @@\n+new\n";
        let r = reverse_patch(p);
        assert!(r.contains("@@ -1,3 +1,3 @@\n a\n-c\n+b\n d\n"), "{r}");
        assert!(r.contains("deleted file mode 100644\n--- a/n.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-new\n"), "{r}");
        assert!(r.contains("index 222..111 100644"));
        assert_eq!(reverse_patch(&r), p);
    }
}
