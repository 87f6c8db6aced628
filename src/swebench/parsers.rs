//! The official harness's Python log parsers (`swebench/harness/log_parsers/python.py`, 5.0.2),
//! by their registry names. Each maps test ids to the status word the log shows. Ported line
//! for line with Python's semantics where they differ from Rust's: `str.split()` splits on
//! Python's whitespace (which includes `\x1c`..`\x1f`), `str.strip()` likewise, and a status
//! map keeps the order in which tests were first seen (truncated ids resolve by prefix in that
//! order). Statuses stay the raw words the log printed: a word that is no status (`PASSEDx`)
//! counts neither as a pass nor as a failure, as in the harness.
//! `tests/it/swebench_parity.rs` checks every parser against the package itself.

use std::sync::OnceLock;

use anyhow::{bail, Result};
use indexmap::IndexMap;
use regex::Regex;

/// Test id → status word, in first-seen order.
pub type StatusMap = IndexMap<String, String>;

pub const PASSED: &str = "PASSED";
pub const FAILED: &str = "FAILED";
pub const SKIPPED: &str = "SKIPPED";
pub const ERROR: &str = "ERROR";
pub const XFAIL: &str = "XFAIL";
/// In the order of the harness's `TestStatus` enum.
const STATUSES: [&str; 5] = [FAILED, PASSED, SKIPPED, ERROR, XFAIL];

/// The parsers' registry names (SWE-bench 5.x rows name one in `log_parser`).
pub const PARSERS: [&str; 20] = [
    "parse_log_pytest",
    "parse_log_pytest_options",
    "parse_log_django",
    "parse_log_pytest_v2",
    "parse_log_seaborn",
    "parse_log_sympy",
    "parse_log_matplotlib",
    "parse_log_astroid",
    "parse_log_flask",
    "parse_log_marshmallow",
    "parse_log_pvlib",
    "parse_log_pyvista",
    "parse_log_sqlfluff",
    "parse_log_xarray",
    "parse_log_pydicom",
    "parse_log_requests",
    "parse_log_pylint",
    "parse_log_astropy",
    "parse_log_scikit",
    "parse_log_sphinx",
];

/// Checks a parser name (rows of other languages name parsers protege does not have).
pub fn check_parser(name: &str) -> Result<()> {
    if !PARSERS.contains(&name) {
        bail!("unknown log parser {name:?}: protege has the harness's Python parsers {PARSERS:?}");
    }
    Ok(())
}

/// Parses a test log with the parser of that registry name; errs where the harness's parser
/// raises.
pub fn parse_log(name: &str, log: &str) -> Result<StatusMap> {
    check_parser(name)?;
    Ok(match name {
        "parse_log_pytest_options" | "parse_log_pydicom" | "parse_log_requests" | "parse_log_pylint" => {
            pytest_options(log)
        }
        "parse_log_django" => django(log)?,
        "parse_log_pytest_v2" | "parse_log_astropy" | "parse_log_scikit" | "parse_log_sphinx" => pytest_v2(log),
        "parse_log_seaborn" => seaborn(log),
        "parse_log_sympy" => sympy(log),
        "parse_log_matplotlib" => matplotlib(log),
        _ => pytest(log),
    })
}

/// Python's `str.isspace()` for one character.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `str.split()` with no argument.
fn py_split(s: &str) -> Vec<&str> {
    s.split(py_space).filter(|t| !t.is_empty()).collect()
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

fn starts_with_status(line: &str) -> bool {
    STATUSES.iter().any(|s| line.starts_with(s))
}

/// pytest's `SKIPPED [N] path:line: reason` summary, where `[N]` is a count, not a test.
fn is_skip_summary(status: &str, name: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    status == SKIPPED && RE.get_or_init(|| Regex::new(r"^\[\d+\]$").expect("regex")).is_match(name)
}

fn set(map: &mut StatusMap, test: &str, status: &str) {
    map.insert(test.to_string(), status.to_string());
}

fn pytest(log: &str) -> StatusMap {
    pytest_lines(log.split('\n').map(std::borrow::Cow::Borrowed))
}

fn pytest_lines<'a>(lines: impl Iterator<Item = std::borrow::Cow<'a, str>>) -> StatusMap {
    let mut map = StatusMap::new();
    for line in lines {
        if !starts_with_status(&line) {
            continue;
        }
        let line = if line.starts_with(FAILED) { line.replace(" - ", " ") } else { line.into_owned() };
        let t = py_split(&line);
        if t.len() <= 1 || is_skip_summary(t[0], t[1]) {
            continue;
        }
        set(&mut map, t[1], t[0]);
    }
    map
}

fn matplotlib(log: &str) -> StatusMap {
    pytest_lines(
        log.split('\n')
            .map(|l| std::borrow::Cow::Owned(l.replace("MouseButton.LEFT", "1").replace("MouseButton.RIGHT", "3"))),
    )
}

fn pytest_options(log: &str) -> StatusMap {
    let mut map = StatusMap::new();
    for line in log.split('\n') {
        if !starts_with_status(line) {
            continue;
        }
        let line = if line.starts_with(FAILED) { line.replace(" - ", " ") } else { line.to_string() };
        let t = py_split(&line);
        if t.len() <= 1 || is_skip_summary(t[0], t[1]) {
            continue;
        }
        set(&mut map, &option_name(t[1]), t[0]);
    }
    map
}

/// `(.*?)\[(.*)\]` searched in a test id: the text before the first `[` that has a `]` after
/// it, and the option up to the last `]` (what follows is dropped); a path option keeps only
/// its last component.
fn option_name(id: &str) -> String {
    let (Some(open), Some(close)) = (id.find('['), id.rfind(']')) else { return id.to_string() };
    if close < open {
        return id.to_string();
    }
    let (main, mut option) = (&id[..open], id[open + 1..close].to_string());
    if option.starts_with('/') && !option.starts_with("//") && !option.contains('*') {
        option = format!("/{}", option.rsplit('/').next().unwrap_or(""));
    }
    format!("{main}[{option}]")
}

fn pytest_v2(log: &str) -> StatusMap {
    static COLOR: OnceLock<Regex> = OnceLock::new();
    let color = COLOR.get_or_init(|| Regex::new(r"\[(\d+)m").expect("regex"));
    let mut map = StatusMap::new();
    for line in log.split('\n') {
        let line = color.replace_all(line, "");
        let line: String = line.chars().filter(|c| !('\x01'..='\x1f').contains(c)).collect();
        if starts_with_status(&line) {
            let line = if line.starts_with(FAILED) { line.split(" - ").next().unwrap_or("") } else { &line };
            let t = py_split(line);
            if t.len() >= 2 && !is_skip_summary(t[0], t[1]) {
                set(&mut map, &t[1..].join(" "), t[0]);
            }
        } else if STATUSES.iter().any(|s| line.ends_with(s)) {
            let t = py_split(&line);
            if t.len() >= 2 {
                set(&mut map, &t[..t.len() - 1].join(" "), t[t.len() - 1]);
            }
        }
    }
    map
}

fn seaborn(log: &str) -> StatusMap {
    let mut map = StatusMap::new();
    for line in log.split('\n') {
        let parts = py_split(line);
        if parts.len() < 2 {
            continue;
        }
        if line.starts_with(FAILED) {
            set(&mut map, parts[1], FAILED);
        } else if line.contains(" PASSED ") {
            if parts[1] == PASSED {
                set(&mut map, parts[0], PASSED);
            }
        } else if line.starts_with(PASSED) {
            set(&mut map, parts[1], PASSED);
        }
    }
    map
}

fn sympy(log: &str) -> StatusMap {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"(_*) (.*)\.py:(.*) (_*)").expect("regex"));
    let mut map = StatusMap::new();
    for c in re.captures_iter(log) {
        set(&mut map, &format!("{}.py:{}", &c[2], &c[3]), FAILED);
    }
    for line in log.split('\n') {
        let line = py_strip(line);
        if !line.starts_with("test_") {
            continue;
        }
        let first = py_split(line)[0];
        if line.ends_with(" E") {
            set(&mut map, first, ERROR);
        }
        if line.ends_with(" F") {
            set(&mut map, first, FAILED);
        }
        if line.ends_with(" ok") {
            set(&mut map, first, PASSED);
        }
    }
    map
}

/// The test a django `FAIL:` / `ERROR:` header names: its second word. The harness's
/// `line.split()[1]` raises IndexError on a one-word line (`ERROR:root:oops` from a logger).
fn header_test(line: &str) -> Result<&str> {
    match py_split(line).get(1) {
        Some(t) => Ok(t),
        None => bail!("the harness's django parser raises IndexError on the line {line:?}: no report"),
    }
}

fn django(log: &str) -> Result<StatusMap> {
    let mut map = StatusMap::new();
    let mut prev_test: Option<String> = None;
    for line in log.split('\n') {
        let mut line = py_strip(line).to_string();
        if line.contains("--version is equivalent to version") {
            set(&mut map, "--version is equivalent to version", PASSED);
        }
        if let Some((head, _)) = line.split_once(" ... ") {
            prev_test = Some(head.to_string());
        }
        for suffix in [" ... ok", " ... OK", " ...  OK"] {
            if line.ends_with(suffix) {
                // The harness's fix for django__django-7188 (a migration line before the test).
                if py_strip(&line).starts_with("Applying sites.0002_alter_domain_unique...test_no_migrations") {
                    line = py_strip(line.split_once("...").map(|(_, r)| r).unwrap_or(&line)).to_string();
                }
                let test = line.rsplit_once(suffix).map(|(t, _)| t).unwrap_or(&line).to_string();
                set(&mut map, &test, PASSED);
                break;
            }
        }
        if let Some((test, _)) = line.split_once(" ... skipped") {
            set(&mut map, test, SKIPPED);
        }
        if line.ends_with(" ... FAIL") {
            set(&mut map, line.split(" ... FAIL").next().unwrap_or(""), FAILED);
        }
        if line.starts_with("FAIL:") {
            set(&mut map, header_test(&line)?, FAILED);
        }
        if line.ends_with(" ... ERROR") {
            set(&mut map, line.split(" ... ERROR").next().unwrap_or(""), ERROR);
        }
        if line.starts_with("ERROR:") {
            set(&mut map, header_test(&line)?, ERROR);
        }
        if line.trim_start_matches(py_space).starts_with("ok") {
            if let Some(t) = &prev_test {
                set(&mut map, t, PASSED);
            }
        }
    }
    // Django's logger sometimes prints a long message between a test's "..." and its "ok".
    // Python's `\s` also matches `\x1c`..`\x1f`.
    static PATTERNS: OnceLock<Vec<Regex>> = OnceLock::new();
    let patterns = PATTERNS.get_or_init(|| {
        [
            r"(?m)^(.*?)[\s\x1C-\x1F]\.\.\.[\s\x1C-\x1F]Testing\ against\ Django\ installed\ in\ ((?s:.*?))\ silenced\)\.\nok$",
            r"(?m)^(.*?)[\s\x1C-\x1F]\.\.\.[\s\x1C-\x1F]Internal\ Server\ Error:\ /(.*)/\nok$",
            r"(?m)^(.*?)[\s\x1C-\x1F]\.\.\.[\s\x1C-\x1F]System check identified no issues \(0 silenced\)\nok$",
        ]
        .iter()
        .map(|p| Regex::new(p).expect("regex"))
        .collect()
    });
    for re in patterns {
        for c in re.captures_iter(log) {
            set(&mut map, &c[1], PASSED);
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pytest_reads_the_short_summary_and_skips_counts() {
        let log = "PASSED tests/t.py::test_a\nFAILED tests/t.py::test_b - assert 1 == 2\nSKIPPED [1] tests/t.py:3: no\nXFAIL tests/t.py::test_c\nPASSEDx y\n";
        let m = parse_log("parse_log_pytest", log).unwrap();
        assert_eq!(m["tests/t.py::test_a"], "PASSED");
        assert_eq!(m["tests/t.py::test_b"], "FAILED");
        assert_eq!(m["tests/t.py::test_c"], "XFAIL");
        assert_eq!(m["y"], "PASSEDx");
        assert!(!m.contains_key("[1]"));
    }

    #[test]
    fn options_keep_the_last_path_component() {
        assert_eq!(option_name("t.py::test[/a/b/c]"), "t.py::test[/c]");
        assert_eq!(option_name("t.py::test[//a/b]"), "t.py::test[//a/b]");
        assert_eq!(option_name("t.py::test[a]x"), "t.py::test[a]");
        assert_eq!(option_name("t.py::test]["), "t.py::test][");
    }

    #[test]
    fn django_and_sympy_shapes() {
        let log = "test_a (m.T) ... ok\ntest_b (m.T) ... FAIL\ntest_c (m.T) ... skipped 'x'\ntest_d (m.T) ... Testing against Django installed in '/x' silenced).\nok\n";
        let m = parse_log("parse_log_django", log).unwrap();
        assert_eq!(m["test_a (m.T)"], "PASSED");
        assert_eq!(m["test_b (m.T)"], "FAILED");
        assert_eq!(m["test_c (m.T)"], "SKIPPED");
        assert_eq!(m["test_d (m.T)"], "PASSED");
        let m = parse_log("parse_log_sympy", "test_x ok\ntest_y F\ntest_z E\n").unwrap();
        assert_eq!((m["test_x"].as_str(), m["test_y"].as_str(), m["test_z"].as_str()), ("PASSED", "FAILED", "ERROR"));
        assert!(parse_log("parse_log_jest", "").is_err());
        // The harness raises on a one-word `ERROR:` line (a logger's), so protege errs too.
        assert!(parse_log("parse_log_django", "test_a (m.T) ... ok\nERROR:root:oops\n").is_err());
    }
}
