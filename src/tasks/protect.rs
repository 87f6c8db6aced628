//! Files the agent must not control when its patch is graded: the task's test files and what
//! decides how tests run (every `conftest.py`, pytest/tox/setup.cfg/pyproject configuration,
//! `sitecustomize`/`usercustomize`/`.pth` files, modules at the root that would shadow the test
//! runner). Before the hidden tests run, the patch's changes to them are dropped — the files
//! stay as at the base — and recorded as tampering, which the reward can penalise.
//!
//! Which paths the patch changed is asked of git after applying it, so no spelling of a path
//! in the patch text can slip past. The list is configurable (`[protection]` in run configs).
//! What no list can stop: code under test runs in the test process, so a source module the
//! tests import can patch the test runner; the grader's canary test catches a runner made to
//! pass everything (see [`super::grade`]).

use serde::{Deserialize, Serialize};

use super::instance::{patch_files, TaskInstance};

/// Paths whose changes are dropped before grading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Protection {
    /// gitignore-like globs: `*` and `?` within a path segment, `**` for any number of
    /// segments; a pattern without `/` matches the file name at any depth, one starting with
    /// `/` is anchored at the repository root.
    pub paths: Vec<String>,
    /// Also the task's test files (those `test_patch` writes and those FAIL_TO_PASS and
    /// PASS_TO_PASS name) and the `__init__.py` beside them.
    pub test_files: bool,
}

/// The default protected globs: test configuration, what Python or pytest load on their own
/// (site customisation, `.pth`, installed distributions' entry points, bytecode), and
/// modules at the root that would shadow pytest or what it imports (the work tree is first
/// on `sys.path` under `python -m pytest`).
pub const DEFAULT_PROTECTED: [&str; 31] = [
    // What git ignores is invisible to the changes graders look at.
    ".gitignore",
    ".gitattributes",
    "conftest.py",
    "pytest.ini",
    ".pytest.ini",
    "pytest.toml",
    ".pytest.toml",
    "tox.ini",
    "setup.cfg",
    "pyproject.toml",
    "sitecustomize.py",
    "usercustomize.py",
    "*.pth",
    "*.dist-info",
    "*.egg-info",
    "*.egg-link",
    "__pycache__",
    "*.pyc",
    "/*.so",
    "/pytest.py",
    "/pytest/**",
    "/_pytest.py",
    "/_pytest/**",
    "/py.py",
    "/pluggy.py",
    "/pluggy/**",
    "/iniconfig.py",
    "/iniconfig/**",
    "/packaging/**",
    "/pygments/**",
    "/exceptiongroup/**",
];

impl Default for Protection {
    fn default() -> Self {
        Self { paths: DEFAULT_PROTECTED.iter().map(|s| s.to_string()).collect(), test_files: true }
    }
}

/// One dropped file of a patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tampering {
    pub path: String,
    /// The glob that matched, or `test file of the task`.
    pub rule: String,
    pub lines_added: usize,
    pub lines_removed: usize,
}

impl Protection {
    pub fn validate(&self) -> anyhow::Result<()> {
        for p in &self.paths {
            if p.trim().is_empty() || p.trim() == "/" {
                anyhow::bail!("protection.paths: {p:?} is not a path pattern");
            }
        }
        Ok(())
    }

    /// The rule protecting `path` for `task`, if any.
    pub fn rule_for(&self, task: &TaskInstance, path: &str) -> Option<String> {
        let path = path.trim_start_matches("./");
        if self.test_files && task_test_paths(task).iter().any(|t| t == path) {
            return Some("test file of the task".into());
        }
        self.paths.iter().find(|p| glob_matches(p, path)).cloned()
    }
}

/// The task's test files: what `test_patch` writes, the files FAIL_TO_PASS and PASS_TO_PASS
/// name (`path::test`), and the `__init__.py` in each of their directories.
pub fn task_test_paths(task: &TaskInstance) -> Vec<String> {
    let mut files: Vec<String> = patch_files(&task.test_patch);
    for id in task.fail_to_pass.iter().chain(&task.pass_to_pass) {
        if let Some((file, _)) = id.split_once("::") {
            files.push(file.to_string());
        }
    }
    let inits: Vec<String> = files
        .iter()
        .map(|f| match f.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/__init__.py"),
            None => "__init__.py".into(),
        })
        .collect();
    files.extend(inits);
    files.sort();
    files.dedup();
    files
}

/// Whether the gitignore-like `pattern` matches the repository path `path`.
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    let path: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let anchored = pattern.starts_with('/') || pattern.trim_end_matches('/').contains('/');
    let pat: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    if pat.is_empty() {
        return false;
    }
    if anchored {
        match_segments(&pat, &path)
    } else {
        // A bare name matches the last segment, or any directory on the way (its contents).
        path.iter().any(|seg| segment_matches(pat[0], seg))
    }
}

fn match_segments(pat: &[&str], path: &[&str]) -> bool {
    match (pat.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => match_segments(&pat[1..], path) || (!path.is_empty() && match_segments(pat, &path[1..])),
        (Some(p), Some(s)) => segment_matches(p, s) && match_segments(&pat[1..], &path[1..]),
        _ => false,
    }
}

/// `*` and `?` within one path segment.
fn segment_matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskInstance {
        serde_json::from_value(serde_json::json!({
            "instance_id": "t", "repo": "r", "base_commit": "b", "problem_statement": "p", "patch": "x",
            "test_patch": "diff --git a/tests/test_new.py b/tests/test_new.py\n--- /dev/null\n+++ b/tests/test_new.py\n@@ -0,0 +1 @@\n+x\n",
            "FAIL_TO_PASS": ["tests/test_new.py::test_a"], "PASS_TO_PASS": ["tests/test_old.py::test_b"],
            "env": {"repo_path": "."}
        }))
        .unwrap()
    }

    #[test]
    fn globs_match_like_gitignore() {
        assert!(glob_matches("conftest.py", "conftest.py"));
        assert!(glob_matches("conftest.py", "pkg/tests/conftest.py"));
        assert!(!glob_matches("conftest.py", "pkg/my_conftest.py"));
        assert!(glob_matches("*.pth", "lib/evil.pth"));
        assert!(glob_matches("/pytest/**", "pytest/__main__.py"));
        assert!(!glob_matches("/pytest/**", "src/pytest/__main__.py"));
        assert!(glob_matches("/pytest.py", "pytest.py"));
        assert!(!glob_matches("/pytest.py", "src/pytest.py"));
        assert!(glob_matches("docs/**/*.md", "docs/a/b/c.md"));
        assert!(glob_matches("docs/**/*.md", "docs/c.md"));
        assert!(!glob_matches("docs/**/*.md", "src/c.md"));
        assert!(glob_matches("te?t_*.py", "a/test_x.py"));
    }

    #[test]
    fn rules_cover_configuration_shadows_and_the_tasks_own_tests() {
        let p = Protection::default();
        let t = task();
        for (path, protected) in [
            ("calc/ops.py", false),
            ("conftest.py", true),
            ("pkg/tests/conftest.py", true),
            ("tests/test_old.py", true),
            ("tests/test_new.py", true),
            ("tests/__init__.py", true),
            ("tests/test_other.py", false),
            ("evil-0.1.dist-info/entry_points.txt", true),
            ("calc/__pycache__/ops.cpython-311.pyc", true),
            ("pytest.pyc", true),
            ("pytest/__main__.py", true),
            ("src/_pytest/main.py", false),
            ("pluggy.py", true),
            ("sub/pytest.toml", true),
            ("./setup.cfg", true),
            ("docs/setup.rst", false),
        ] {
            assert_eq!(p.rule_for(&t, path).is_some(), protected, "{path}");
        }
        assert_eq!(p.rule_for(&t, "tests/test_old.py").unwrap(), "test file of the task");
        let none = Protection { paths: vec![], test_files: false };
        assert!(none.rule_for(&t, "conftest.py").is_none() && none.rule_for(&t, "tests/test_old.py").is_none());
    }
}
