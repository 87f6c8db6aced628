//! Files the agent must not control when its patch is graded: the task's test files and what
//! decides how tests run (every `conftest.py`, pytest/tox/setup.cfg/pyproject configuration,
//! `sitecustomize`/`usercustomize`/`.pth` files, modules at the root that would shadow the test
//! runner). Before the hidden tests run, the patch's changes to them are dropped — the files
//! stay as at the base — and recorded as tampering, which the reward can penalise.
//!
//! The list is configurable (`[protection]` in run configs). What it cannot stop: code under
//! test runs in the test process, so a source module the tests import can still patch the
//! test runner at import time; the grader reads results through a per-run plugin (see
//! [`super::grade`]) rather than the log, so printing fake results does not help.

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

/// The default protected globs.
pub const DEFAULT_PROTECTED: [&str; 14] = [
    "conftest.py",
    "pytest.ini",
    ".pytest.ini",
    "tox.ini",
    "setup.cfg",
    "pyproject.toml",
    "sitecustomize.py",
    "usercustomize.py",
    "*.pth",
    "/pytest.py",
    "/pytest/**",
    "/_pytest/**",
    "/py.py",
    "/pluggy/**",
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

    /// `patch` without its changes to protected files, and what was dropped.
    pub fn filter(&self, task: &TaskInstance, patch: &str) -> (String, Vec<Tampering>) {
        let mut kept = String::new();
        let mut dropped = vec![];
        for section in split_patch(patch) {
            let rule = section.paths.iter().find_map(|p| self.rule_for(task, p).map(|r| (p.clone(), r)));
            match rule {
                Some((path, rule)) => {
                    let (lines_added, lines_removed) = count_lines(section.text);
                    dropped.push(Tampering { path, rule, lines_added, lines_removed });
                }
                None => kept.push_str(section.text),
            }
        }
        (kept, dropped)
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

/// One file's part of a patch.
pub struct FileDiff<'a> {
    pub text: &'a str,
    /// Every path it names (old and new, for renames and copies).
    pub paths: Vec<String>,
}

/// Splits a patch into per-file sections: at `diff --git` lines for git patches, else at
/// `--- `/`+++ ` header pairs. Text before the first section is dropped.
pub fn split_patch(patch: &str) -> Vec<FileDiff<'_>> {
    let lines: Vec<(usize, &str)> = line_starts(patch);
    let git = lines.iter().any(|(_, l)| l.starts_with("diff --git "));
    let starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(i, (_, l))| {
            if git {
                l.starts_with("diff --git ")
            } else {
                l.starts_with("--- ") && lines.get(i + 1).is_some_and(|(_, n)| n.starts_with("+++ "))
            }
        })
        .map(|(_, (at, _))| *at)
        .collect();
    let mut out = vec![];
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(patch.len());
        let text = &patch[start..end];
        out.push(FileDiff { text, paths: section_paths(text) });
    }
    out
}

fn line_starts(text: &str) -> Vec<(usize, &str)> {
    let mut out = vec![];
    let mut at = 0;
    for l in text.split_inclusive('\n') {
        out.push((at, l.trim_end_matches(['\n', '\r'])));
        at += l.len();
    }
    out
}

/// The paths a per-file section names, without `a/`/`b/` prefixes.
fn section_paths(text: &str) -> Vec<String> {
    let mut paths = vec![];
    let mut add = |p: String| {
        let p = p.strip_prefix("a/").or_else(|| p.strip_prefix("b/")).map(str::to_string).unwrap_or(p);
        if p != "/dev/null" && !p.is_empty() && !paths.contains(&p) {
            paths.push(p);
        }
    };
    let mut in_hunk = false;
    for l in text.lines() {
        if l.starts_with("@@") {
            in_hunk = true;
        }
        if let Some(rest) = l.strip_prefix("diff --git ") {
            for p in git_header_paths(rest) {
                add(p);
            }
            in_hunk = false;
            continue;
        }
        if in_hunk {
            continue;
        }
        for prefix in ["--- ", "+++ ", "rename from ", "rename to ", "copy from ", "copy to "] {
            if let Some(rest) = l.strip_prefix(prefix) {
                let name = rest.split('\t').next().unwrap_or(rest);
                let name = if name.starts_with('"') { unquote(name).0 } else { name.trim_end().to_string() };
                let keep_prefix = prefix.starts_with("rename") || prefix.starts_with("copy");
                add(if keep_prefix { format!("a/{name}") } else { name });
            }
        }
    }
    paths
}

/// The two names of `diff --git a/X b/Y` (quoted or not; unquoted names with spaces are
/// split where the two halves agree).
fn git_header_paths(rest: &str) -> Vec<String> {
    if rest.starts_with('"') {
        let (a, used) = unquote(rest);
        let b = rest[used..].trim_start();
        let b = if b.starts_with('"') { unquote(b).0 } else { b.to_string() };
        return vec![a, b];
    }
    // `a/P b/P` for the same P: the split in the middle.
    if rest.len() >= 5 && (rest.len() - 1).is_multiple_of(2) {
        let half = (rest.len() - 1) / 2;
        if rest.is_char_boundary(half) && rest.is_char_boundary(half + 1) {
            let (a, b) = (&rest[..half], &rest[half + 1..]);
            if a.get(2..) == b.get(2..) && a.starts_with("a/") && b.starts_with("b/") {
                return vec![a.to_string(), b.to_string()];
            }
        }
    }
    match rest.find(" b/") {
        Some(i) => vec![rest[..i].to_string(), rest[i + 1..].to_string()],
        None => vec![rest.to_string()],
    }
}

/// A C-style quoted name (git's `core.quotePath`) at the start of `s`: the name and the bytes
/// of `s` it used.
fn unquote(s: &str) -> (String, usize) {
    let b = s.as_bytes();
    let mut out: Vec<u8> = vec![];
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'"' => return (String::from_utf8_lossy(&out).into_owned(), i + 1),
            b'\\' if i + 1 < b.len() => {
                let c = b[i + 1];
                match c {
                    b'0'..=b'7' if i + 3 < b.len() => {
                        let oct =
                            std::str::from_utf8(&b[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok());
                        out.push(oct.unwrap_or(b'?'));
                        i += 4;
                        continue;
                    }
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'a' => out.push(7),
                    b'b' => out.push(8),
                    b'f' => out.push(12),
                    b'v' => out.push(11),
                    other => out.push(other),
                }
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), b.len())
}

fn count_lines(section: &str) -> (usize, usize) {
    let mut added = 0;
    let mut removed = 0;
    let mut in_hunk = false;
    for l in section.lines() {
        if l.starts_with("@@") {
            in_hunk = true;
        } else if in_hunk && l.starts_with('+') {
            added += 1;
        } else if in_hunk && l.starts_with('-') {
            removed += 1;
        }
    }
    (added, removed)
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
    fn protected_sections_are_dropped_and_recorded_and_the_rest_applies_as_before() {
        let patch = "diff --git a/calc/ops.py b/calc/ops.py\nindex 1..2 100644\n--- a/calc/ops.py\n+++ b/calc/ops.py\n@@ -1 +1 @@\n-a\n+b\n\
diff --git a/conftest.py b/conftest.py\nnew file mode 100644\n--- /dev/null\n+++ b/conftest.py\n@@ -0,0 +1,2 @@\n+import pytest\n+x = 1\n\
diff --git a/tests/test_old.py b/tests/test_old.py\n--- a/tests/test_old.py\n+++ b/tests/test_old.py\n@@ -1 +1 @@\n-assert f()\n+assert True\n\
diff --git a/my dir/file.py b/my dir/file.py\n--- a/my dir/file.py\n+++ b/my dir/file.py\n@@ -1 +1 @@\n-1\n+2\n\
diff --git a/src/x.py b/tests/__init__.py\nsimilarity index 100%\nrename from src/x.py\nrename to tests/__init__.py\n";
        let (kept, dropped) = Protection::default().filter(&task(), patch);
        assert!(kept.contains("calc/ops.py") && kept.contains("my dir/file.py"));
        assert!(!kept.contains("conftest") && !kept.contains("test_old") && !kept.contains("rename"));
        let paths: Vec<&str> = dropped.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, ["conftest.py", "tests/test_old.py", "tests/__init__.py"]);
        assert_eq!((dropped[0].lines_added, dropped[0].lines_removed), (2, 0));
        assert_eq!(dropped[1].rule, "test file of the task");
        // Quoted names (non-ASCII, tabs) are unquoted before matching.
        let quoted = "diff --git \"a/sub/conftest.py\" \"b/sub/conftest.py\"\n--- \"a/sub/conftest.py\"\n+++ \"b/sub/conftest.py\"\n@@ -1 +1 @@\n-a\n+b\n";
        let (kept, dropped) = Protection::default().filter(&task(), quoted);
        assert!(kept.is_empty() && dropped.len() == 1);
        // A plain unified diff (no git headers).
        let plain = "--- a/setup.cfg\n+++ b/setup.cfg\n@@ -1 +1 @@\n-a\n+b\n--- a/calc/x.py\n+++ b/calc/x.py\n@@ -1 +1 @@\n-a\n+b\n";
        let (kept, dropped) = Protection::default().filter(&task(), plain);
        assert!(kept.starts_with("--- a/calc/x.py") && dropped[0].path == "setup.cfg");
    }
}
