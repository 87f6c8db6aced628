//! Task instances: SWE-bench's fields plus what a docker-free local task needs.
//!
//! A suite is a JSONL file (or a directory holding `tasks.jsonl`), one instance per line:
//!
//! ```json
//! {"instance_id": "calc__off-by-one-1", "repo": "calc", "base_commit": "base",
//!  "problem_statement": "...", "patch": "diff --git ...", "test_patch": "diff --git ...",
//!  "FAIL_TO_PASS": ["tests/test_calc.py::test_range"], "PASS_TO_PASS": ["tests/test_calc.py::test_add"],
//!  "env": {"repo_path": "repos/calc", "setup": [], "test_cmd": "python3 -m pytest -rA -p no:cacheprovider"}}
//! ```
//!
//! `FAIL_TO_PASS`/`PASS_TO_PASS` may also be JSON strings holding a list, as in the SWE-bench
//! dataset. `env.repo_path` (relative to the suite file) is the repository snapshot at
//! `base_commit`: a plain directory the harness copies for every episode. `env.setup` are shell
//! commands run in a fresh copy before anything else (e.g. building an extension); `env.test_cmd`
//! runs the tests, with the test ids appended. Other SWE-bench fields (`version`, `created_at`,
//! `hints_text`, ...) are kept in `extra`. Generated tasks (`protege tasks build`) share one
//! clean snapshot per package and carry their bug as `env.base_patch`; their `test_patch` is
//! empty because the failing tests are the package's own.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::sandbox::{Isolation, Limits, LocalSandbox};

pub const DEFAULT_TEST_CMD: &str = "python3 -m pytest -rA -p no:cacheprovider";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalEnv {
    /// Where episodes run: `local` (a snapshot in the bubblewrap sandbox, the default) or
    /// `docker` (the instance's image). `--executor` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorKind>,
    /// The repository snapshot, relative to the suite file (absolute once loaded); local
    /// tasks only.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub repo_path: PathBuf,
    #[serde(default)]
    pub setup: Vec<String>,
    #[serde(default = "default_test_cmd")]
    pub test_cmd: String,
    /// A diff applied to the snapshot to form the base (generated tasks share one clean
    /// snapshot per package and carry their bug here). Never shown to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_patch: Option<String>,
    /// A Python environment the tests need (relative to the suite file; absolute once loaded),
    /// made visible read-only in the sandbox; `{venv}` in `test_cmd` stands for its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub venv: Option<PathBuf>,
    /// Docker tasks: the instance image (`swebench/sweb.eval.x86_64.<id>`), the repository's
    /// directory in it, the harness's eval script, the log parser's registry name and the
    /// eval type, as SWE-bench 5.x rows carry them ([`crate::swebench`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_script: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_parser: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_type: Option<crate::swebench::EvalType>,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl LocalEnv {
    /// Where this task's episodes run when nothing overrides it.
    pub fn executor(&self) -> ExecutorKind {
        self.executor.unwrap_or(ExecutorKind::Local)
    }

    /// The repository's directory inside a docker task's image.
    pub fn workdir(&self) -> &str {
        self.workdir.as_deref().unwrap_or("/testbed")
    }
}

fn default_test_cmd() -> String {
    DEFAULT_TEST_CMD.into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInstance {
    pub instance_id: String,
    pub repo: String,
    pub base_commit: String,
    pub problem_statement: String,
    /// The gold patch (never shown to the agent; the oracle expert reads it).
    pub patch: String,
    /// The hidden tests, applied only when grading.
    pub test_patch: String,
    #[serde(rename = "FAIL_TO_PASS", deserialize_with = "fail_to_pass")]
    pub fail_to_pass: Vec<String>,
    #[serde(rename = "PASS_TO_PASS", deserialize_with = "pass_to_pass", default)]
    pub pass_to_pass: Vec<String>,
    pub env: LocalEnv,
    /// Other fields of the instance, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

fn fail_to_pass<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    list_or_json_string(d, "FAIL_TO_PASS")
}

fn pass_to_pass<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    list_or_json_string(d, "PASS_TO_PASS")
}

/// A list of test ids as SWE-bench rows give them: a list, or a JSON string of one; an error
/// names `field` and what it holds.
fn list_or_json_string<'de, D: Deserializer<'de>>(d: D, field: &str) -> std::result::Result<Vec<String>, D::Error> {
    use serde::de::Error;
    let expected = format!("{field} must be a list of test ids, or a JSON string holding one");
    match Value::deserialize(d)? {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!("{expected}; the list holds {other}, not a string"))),
            })
            .collect(),
        Value::String(t) => {
            serde_json::from_str(&t).map_err(|e| D::Error::custom(format!("{expected}: the string {e}")))
        }
        other => Err(D::Error::custom(format!("{expected}, got {other}"))),
    }
}

/// The SWE-bench fields that may appear in `extra`; anything else is probably a typo.
const KNOWN_EXTRA: [&str; 8] =
    ["version", "created_at", "hints_text", "environment_setup_commit", "split", "difficulty", "provenance", "notes"];

impl TaskInstance {
    /// Checks what the types cannot, naming the field.
    pub fn validate(&self) -> Result<()> {
        let nonempty = [
            ("instance_id", &self.instance_id),
            ("repo", &self.repo),
            ("base_commit", &self.base_commit),
            ("problem_statement", &self.problem_statement),
            ("patch", &self.patch),
        ];
        for (name, v) in nonempty {
            if v.trim().is_empty() {
                bail!("`{name}` is empty");
            }
        }
        // Ids name files and containers: letters, digits, `.`, `_`, `-`, not starting with a dot.
        if self.instance_id.starts_with('.')
            || !self.instance_id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            bail!(
                "`instance_id` {:?} may hold only letters, digits, `.`, `_` and `-`, and not start with `.`",
                self.instance_id
            );
        }
        // `test_patch` may be empty: tasks whose failing tests are already in the repository.
        let test_patch = Some(&self.test_patch).filter(|p| !p.trim().is_empty());
        let base_patch = self.env.base_patch.as_ref().filter(|p| !p.trim().is_empty());
        let diffs = [("patch", Some(&self.patch)), ("test_patch", test_patch), ("env.base_patch", base_patch)];
        for (name, p) in diffs.into_iter().filter_map(|(n, p)| p.map(|p| (n, p))) {
            if !p.contains("\n+++ ") && !p.starts_with("+++ ") {
                bail!("`{name}` is not a unified diff (no `+++` file header)");
            }
        }
        if self.fail_to_pass.is_empty() {
            bail!("`FAIL_TO_PASS` is empty: a task needs at least one test that the fix makes pass");
        }
        for t in self.fail_to_pass.iter().chain(&self.pass_to_pass) {
            if t.trim().is_empty() || t.contains(char::is_whitespace) {
                bail!("test id {t:?} is empty or contains whitespace");
            }
        }
        if let Some(k) = self.extra.keys().find(|k| !KNOWN_EXTRA.contains(&k.as_str())) {
            bail!("unknown field `{k}` (expected SWE-bench fields, `env`, or one of {KNOWN_EXTRA:?})");
        }
        if self.env.executor() == ExecutorKind::Local && !self.env.repo_path.is_dir() {
            bail!("`env.repo_path` {} is not a directory", self.env.repo_path.display());
        }
        if self.env.executor() == ExecutorKind::Docker {
            for (name, v) in [("env.image", &self.env.image), ("env.eval_script", &self.env.eval_script)] {
                if v.as_deref().is_none_or(|v| v.trim().is_empty()) {
                    bail!("`{name}` is missing: a docker task needs its image and eval script (`protege tasks import` writes both)");
                }
            }
            crate::swebench::check_parser(self.env.log_parser.as_deref().unwrap_or_default())
                .context("`env.log_parser`")?;
        }
        if self.env.test_cmd.trim().is_empty() {
            bail!("`env.test_cmd` is empty");
        }
        Ok(())
    }

    /// The files the hidden tests touch (from `test_patch`'s headers).
    pub fn test_files(&self) -> Vec<String> {
        patch_files(&self.test_patch)
    }
}

/// The paths a unified diff writes (its `+++ b/...` headers; `/dev/null` skipped).
pub fn patch_files(diff: &str) -> Vec<String> {
    diff.lines()
        .filter_map(|l| l.strip_prefix("+++ "))
        .map(|p| p.split('\t').next().unwrap_or(p).trim())
        .filter(|p| *p != "/dev/null")
        .map(|p| p.strip_prefix("b/").unwrap_or(p).to_string())
        .collect()
}

/// Why a patch may not be applied by tools that trust its paths (`patch`), or `None`: a path
/// in any header (`diff --git`, `---`/`+++`, `Index:`, rename/copy from/to) that is absolute,
/// climbs with `..`, or enters `.git` (any case) — `git apply` refuses these, GNU `patch`
/// writes `.git/config` (and with it code that every later git command runs).
pub fn unsafe_patch_path(patch: &str) -> Option<String> {
    let bad = |p: &str| {
        let p = p.split('\t').next().unwrap_or(p).trim().trim_matches('"');
        if p == "/dev/null" || p.is_empty() {
            return false;
        }
        let p = p.strip_prefix("a/").or_else(|| p.strip_prefix("b/")).unwrap_or(p);
        p.starts_with('/') || p.split('/').any(|c| c == ".." || c.eq_ignore_ascii_case(".git"))
    };
    for line in patch.lines() {
        let paths: Vec<&str> = if let Some(r) = line.strip_prefix("diff --git ") {
            r.split(' ').collect()
        } else if let Some(r) = ["--- ", "+++ ", "Index: ", "rename from ", "rename to ", "copy from ", "copy to "]
            .iter()
            .find_map(|h| line.strip_prefix(h))
        {
            vec![r]
        } else {
            continue;
        };
        if let Some(p) = paths.into_iter().find(|p| bad(p)) {
            return Some(format!("the patch writes outside the repository or into .git: {p:?}"));
        }
    }
    None
}

/// Loads a suite: a JSONL file, or a directory holding `tasks.jsonl`. Every instance is
/// validated; an error names the file, the line and the field.
pub fn load_suite(path: &Path) -> Result<Vec<TaskInstance>> {
    let file = if path.is_dir() { path.join("tasks.jsonl") } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read task suite {}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut out = vec![];
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", file.display(), i + 1);
        let mut t: TaskInstance =
            crate::inputs::json_line(line, &file.display().to_string(), i + 1).context("not a task instance")?;
        if t.env.repo_path.is_relative() && !t.env.repo_path.as_os_str().is_empty() {
            t.env.repo_path = base.join(&t.env.repo_path);
        }
        if let Some(v) = t.env.venv.take() {
            let v = if v.is_relative() { base.join(v) } else { v };
            let v = v.canonicalize().with_context(|| format!("{}: `env.venv` {} does not exist", at(), v.display()))?;
            t.env.test_cmd = t.env.test_cmd.replace("{venv}", &v.display().to_string());
            t.env.venv = Some(v);
        }
        t.validate().with_context(|| format!("{}: task {:?}", at(), t.instance_id))?;
        if !seen.insert(t.instance_id.clone()) {
            bail!("{}: duplicate instance_id {:?}", at(), t.instance_id);
        }
        out.push(t);
    }
    if out.is_empty() {
        bail!("task suite {} holds no tasks", file.display());
    }
    Ok(out)
}

/// Where a task's episodes run and its patches are graded (`env.executor`); the executors
/// themselves are [`crate::executor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// The bubblewrap sandbox on the task's snapshot.
    #[default]
    Local,
    /// The instance's Docker image, through the Docker Engine API.
    Docker,
}

impl ExecutorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Docker => "docker",
        }
    }
}

/// A task's own sandbox constructor lives with the task, so the sandbox knows nothing of tasks.
impl LocalSandbox {
    /// The work tree of a task: its snapshot, its `base_patch` (generated tasks) and setup.
    pub fn for_task(
        task: &TaskInstance,
        root: &Path,
        isolation: Isolation,
        limits: Limits,
        hidden: Vec<PathBuf>,
    ) -> Result<Self> {
        let e = &task.env;
        LocalSandbox::create_with_venv(
            &e.repo_path,
            e.base_patch.as_deref(),
            root,
            isolation,
            limits,
            hidden,
            &e.setup,
            e.venv.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lists_in_the_wrong_shape_name_the_field() {
        let row = |f2p: &str| format!(r#"{{"instance_id": "a", "patch": "", "FAIL_TO_PASS": {f2p}, "env": {{}}}}"#);
        let err = |f2p: &str| serde_json::from_str::<TaskInstance>(&row(f2p)).unwrap_err().to_string();
        let e = err("5");
        assert!(e.contains("FAIL_TO_PASS must be a list of test ids") && e.contains("got 5"), "{e}");
        // Read from a suite file, the file, line, column and field lead the message.
        let e = crate::inputs::json_line::<TaskInstance>(&row("5"), "tasks.jsonl", 3).unwrap_err().to_string();
        assert!(e.starts_with("tasks.jsonl:3:") && e.contains("field `FAIL_TO_PASS`: FAIL_TO_PASS must be"), "{e}");
        assert!(err("[1]").contains("holds 1, not a string"), "{}", err("[1]"));
        assert!(err(r#""not json""#).contains("FAIL_TO_PASS"), "{}", err(r#""not json""#));
    }
}
