//! Eval scripts as the official harness runs them: the row's `eval_script` (SWE-bench 5.x), or
//! one generated as the 4.x harness does (`harness/test_spec/python.py`) from the repo/version
//! spec table protege ships (`data/swebench/specs.json`, made by
//! `tools/make_swebench_specs.py` from the `swebench` 4.1.0 package). Before it runs, the 5.x
//! harness makes the script record the test command's exit status after the end marker
//! ([`runnable`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::Deserialize;

use super::grading::{END_TEST_OUTPUT, START_TEST_OUTPUT, TEST_EXIT_CODE};

const HEREDOC: &str = "EOF_114329324912";
const EXIT_VAR: &str = "SWEBENCH_TEST_EXIT_CODE";
/// Files of a test patch that are not test directives.
const NON_TEST_EXTS: [&str; 11] =
    [".json", ".png", "csv", ".txt", ".md", ".jpg", ".jpeg", ".pkl", ".yml", ".yaml", ".toml"];

#[derive(Debug, Deserialize)]
pub struct Spec {
    pub test_cmd: String,
    #[serde(default)]
    pub install: Option<String>,
    #[serde(default)]
    pub eval_commands: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct SpecTable {
    pub source: String,
    /// Repository → the registry name of its log parser.
    pub log_parsers: BTreeMap<String, String>,
    /// Repository → version → spec.
    pub specs: BTreeMap<String, BTreeMap<String, Spec>>,
}

pub fn specs() -> &'static SpecTable {
    static T: OnceLock<SpecTable> = OnceLock::new();
    T.get_or_init(|| {
        serde_json::from_str(include_str!("../../data/swebench/specs.json")).expect("data/swebench/specs.json parses")
    })
}

/// The spec of `repo` at `version`, or an error naming what the table has.
pub fn spec(repo: &str, version: &str) -> Result<&'static Spec> {
    let t = specs();
    let Some(versions) = t.specs.get(repo) else {
        bail!(
            "no SWE-bench spec for repository {repo:?} (the table from {} has {:?}); give the row an `eval_script`",
            t.source,
            t.specs.keys().collect::<Vec<_>>()
        )
    };
    versions.get(version).with_context(|| {
        format!("no SWE-bench spec for {repo} version {version:?} (known: {:?})", versions.keys().collect::<Vec<_>>())
    })
}

/// The files a patch modifies that existed before it (unidiff's `source_file` under `a/`).
pub fn modified_files(patch: &str) -> Vec<String> {
    patch
        .lines()
        .filter_map(|l| l.strip_prefix("--- "))
        .map(|p| p.split('\t').next().unwrap_or(p))
        .filter(|p| *p != "/dev/null")
        .filter_map(|p| p.strip_prefix("a/"))
        .map(|p| p.to_string())
        .collect()
}

/// The test directives of a test patch (`diff --git a/.* b/(.*)`, non-test files dropped;
/// Django's as dotted modules).
pub fn test_directives(repo: &str, test_patch: &str) -> Vec<String> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"diff --git a/.* b/(.*)").expect("regex"));
    let files = re
        .captures_iter(test_patch)
        .map(|c| c[1].to_string())
        .filter(|d| !NON_TEST_EXTS.iter().any(|e| d.ends_with(e)));
    if repo == "swe-bench/humaneval" {
        return vec!["test.py".into()];
    }
    if repo != "django/django" {
        return files.collect();
    }
    files
        .map(|d| {
            let d = d.strip_suffix(".py").unwrap_or(&d);
            let d = d.strip_prefix("tests/").unwrap_or(d);
            d.replace('/', ".")
        })
        .collect()
}

/// The 4.x harness's eval script for an instance without one.
pub fn generate(repo: &str, version: &str, base_commit: &str, test_patch: &str) -> Result<String> {
    Ok(generate_with(spec(repo, version)?, repo, base_commit, test_patch))
}

/// What repositories outside the table get (SWE-Gym's and SWE-smith's are pytest projects):
/// `pytest -rA` on the test patch's files, no install step.
pub fn generic_spec() -> Spec {
    Spec { test_cmd: "pytest -rA".into(), install: None, eval_commands: vec![] }
}

/// The 4.x harness's eval script from `spec`.
pub fn generate_with(spec: &Spec, repo: &str, base_commit: &str, test_patch: &str) -> String {
    let reset = format!("git checkout {base_commit} {}", modified_files(test_patch).join(" "));
    let test_command =
        std::iter::once(spec.test_cmd.clone()).chain(test_directives(repo, test_patch)).collect::<Vec<_>>();
    let (env, dir) = ("testbed", "/testbed");
    let mut lines: Vec<String> =
        vec!["source /opt/miniconda3/bin/activate".into(), format!("conda activate {env}"), format!("cd {dir}")];
    lines.extend(spec.eval_commands.iter().cloned());
    lines.extend([
        format!("git config --global --add safe.directory {dir}"),
        format!("cd {dir}"),
        "git status".into(),
        "git show".into(),
        format!("git -c core.fileMode=false diff {base_commit}"),
        "source /opt/miniconda3/bin/activate".into(),
        format!("conda activate {env}"),
    ]);
    lines.extend(spec.install.iter().cloned());
    lines.extend([
        reset.clone(),
        format!("git apply -v - <<'{HEREDOC}'\n{test_patch}\n{HEREDOC}"),
        format!(": '{START_TEST_OUTPUT}'"),
        test_command.join(" "),
        format!(": '{END_TEST_OUTPUT}'"),
        reset,
    ]);
    with_header(&lines)
}

fn with_header(lines: &[String]) -> String {
    let mut all = vec!["#!/bin/bash".to_string(), "set -uxo pipefail".to_string()];
    all.extend(lines.iter().cloned());
    all.join("\n") + "\n"
}

/// The script the 5.x harness runs for `eval_script`: header lines stripped and put back, the
/// test command's `$?` saved just before the end marker and echoed after it.
pub fn runnable(eval_script: &str) -> String {
    let mut lines: Vec<String> = eval_script
        .trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
        .split('\n')
        .filter(|l| *l != "#!/bin/bash" && *l != "set -uxo pipefail")
        .map(|l| l.to_string())
        .collect();
    if let Some(i) = lines.iter().position(|l| l.contains(END_TEST_OUTPUT)) {
        let end = lines[i].clone();
        lines.splice(i..=i, [format!("{EXIT_VAR}=$?"), end, format!("echo \"{TEST_EXIT_CODE}: ${EXIT_VAR}\"")]);
    }
    with_header(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_PATCH: &str = "diff --git a/tests/test_x.py b/tests/test_x.py\n--- a/tests/test_x.py\n+++ b/tests/test_x.py\n@@ -1 +1,2 @@\n x\n+y\ndiff --git a/tests/data.json b/tests/data.json\nnew file mode 100644\n--- /dev/null\n+++ b/tests/data.json\n@@ -0,0 +1 @@\n+{}\n";

    #[test]
    fn generated_script_has_the_harness_shape() {
        let s = generate("pytest-dev/pytest", "5.4", "abc123", TEST_PATCH).unwrap();
        assert!(s.starts_with("#!/bin/bash\nset -uxo pipefail\nsource /opt/miniconda3/bin/activate\n"));
        assert!(s.contains("\ngit checkout abc123 tests/test_x.py\ngit apply -v - <<'EOF_114329324912'\n"));
        assert!(s.contains("\n: '>>>>> Start Test Output'\npytest -rA tests/test_x.py\n: '>>>>> End Test Output'\n"));
        let r = runnable(&s);
        assert!(r.contains("\nSWEBENCH_TEST_EXIT_CODE=$?\n: '>>>>> End Test Output'\necho \">>>>> Test Exit Code: $SWEBENCH_TEST_EXIT_CODE\"\n"));
        assert_eq!(test_directives("django/django", "diff --git a/tests/a/b.py b/tests/a/b.py\n"), vec!["a.b"]);
        assert!(generate("nobody/nothing", "1.0", "x", TEST_PATCH).is_err());
    }
}
