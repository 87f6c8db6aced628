//! protege grades test logs as the official SWE-bench harness does. Every case of
//! `tests/fixtures/swebench_logs/cases.json` (a log, its parser, FAIL_TO_PASS / PASS_TO_PASS and
//! eval type) is graded by the `swebench` package's own functions (`tools/swebench_grade_logs.py`,
//! run in a venv under protege's cache that holds swebench 5.0.2 from PyPI) and by
//! `protege::swebench::grading`: the status maps (in order, or both invalid), the tests_status and
//! the verdicts must be equal. Without PyPI the test says so and skips.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use indexmap::IndexMap;
use protege::swebench::grading::{self, EvalType, TestsStatus};
use protege::swebench::parsers::PARSERS;
use serde::Deserialize;

/// The harness release the parsers and grading port.
const SWEBENCH: &str = "swebench==5.0.2";
/// `swebench.utils` imports unidiff at module level (the parser registry reaches it); the
/// package's other requirements (docker, modal, datasets, ...) are for modules never imported.
const DEPS: [&str; 1] = ["unidiff==1.0.1"];

#[derive(Deserialize)]
struct Case {
    name: String,
    parser: String,
    log: String,
    #[serde(rename = "FAIL_TO_PASS")]
    f2p: Vec<String>,
    #[serde(rename = "PASS_TO_PASS")]
    p2p: Vec<String>,
    eval_type: EvalType,
}

/// What the harness says about one case (see tools/swebench_grade_logs.py).
#[derive(Deserialize)]
struct Harness {
    status_map: Option<Vec<(String, String)>>,
    tests_status: Option<TestsStatus>,
    resolved: bool,
    #[serde(default)]
    raised: Option<String>,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn venv_dir() -> PathBuf {
    let cache = std::env::var_os("PROTEGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/protege"));
    cache.join("swebench-venv")
}

/// Whether `python` has exactly the pinned packages.
fn has_pins(python: &Path) -> bool {
    let probe = "import importlib.metadata as m, sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))";
    let names: Vec<&str> = [SWEBENCH].iter().chain(&DEPS).map(|p| p.split("==").next().unwrap()).collect();
    let Ok(out) = Command::new(python).arg("-c").arg(probe).args(&names).current_dir("/").output() else {
        return false;
    };
    let want: Vec<&str> = [SWEBENCH].into_iter().chain(DEPS).collect();
    out.status.success() && String::from_utf8_lossy(&out.stdout).split_whitespace().eq(want)
}

/// The venv's interpreter, created and filled on first use; `None` (with a loud message) when
/// python3 or PyPI is not available.
fn harness_python() -> Option<PathBuf> {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    if has_pins(&python) {
        return Some(python);
    }
    if !python.exists() {
        eprintln!("creating {}", venv.display());
        let created = Command::new("python3").args(["-m", "venv"]).arg(&venv).current_dir("/").output();
        if !created.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("SKIPPED: python3 -m venv {} failed: {created:?}", venv.display());
            return None;
        }
    }
    eprintln!("installing {SWEBENCH} {} into {}", DEPS.join(" "), venv.display());
    let pip = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", SWEBENCH])
        .args(DEPS)
        .current_dir("/")
        .output()
        .expect("running pip");
    if !pip.status.success() {
        eprintln!(
            "SKIPPED: pip could not install {SWEBENCH} from PyPI, so protege's grading was NOT compared with the harness:\n{}",
            String::from_utf8_lossy(&pip.stderr)
        );
        return None;
    }
    assert!(has_pins(&python), "{} lacks {SWEBENCH} {DEPS:?} after pip install", venv.display());
    Some(python)
}

type Verdict = (Option<Vec<(String, String)>>, Option<TestsStatus>, bool);

/// Protege's view of one case, in the harness's terms; `Err` where grading fails (as the
/// harness's raises).
fn protege(case: &Case, log: &str) -> Result<Verdict, String> {
    let sm = grading::logs_eval(&case.parser, log).map_err(|e| format!("{e:#}"))?;
    let report = grading::eval_report(&case.parser, log, &case.f2p, &case.p2p, case.eval_type).unwrap();
    let Some(sm) = sm else {
        assert!(report.tests_status.is_none() && !report.resolved, "{}: invalid log graded", case.name);
        return Ok((None, None, false));
    };
    let status = grading::tests_report(&sm, &case.f2p, &case.p2p, case.eval_type);
    let resolved = grading::resolved(&status);
    assert_eq!(
        (report.tests_status.as_ref(), report.resolved),
        (Some(&status), resolved),
        "{}: eval_report",
        case.name
    );
    Ok((Some(sm.into_iter().collect()), Some(status), resolved))
}

/// How protege's view differs from the harness's; empty when they agree.
fn diff(want: &Harness, got: Result<Verdict, String>) -> String {
    let (sm, status, resolved) = match (&want.raised, got) {
        (Some(_), Err(_)) => return String::new(),
        (Some(r), Ok(_)) => return format!("  the harness raised {r}; protege graded the log\n"),
        (None, Err(e)) => return format!("  protege failed ({e}); the harness graded the log\n"),
        (None, Ok(v)) => v,
    };
    let mut out = String::new();
    if sm != want.status_map {
        out += &format!("  status map:\n{}", map_diff(&want.status_map, &sm));
    }
    if status != want.tests_status {
        let json = |s: &Option<TestsStatus>| serde_json::to_string(s).unwrap();
        out += &format!("  tests_status:\n    harness {}\n    protege {}\n", json(&want.tests_status), json(&status));
    }
    if resolved != want.resolved {
        out += &format!("  resolved: harness {}, protege {resolved}\n", want.resolved);
    }
    out
}

/// A readable account of how two status maps differ.
fn map_diff(want: &Option<Vec<(String, String)>>, got: &Option<Vec<(String, String)>>) -> String {
    let (Some(want), Some(got)) = (want, got) else {
        return format!("    harness: {}\n    protege: {}\n", describe(want), describe(got));
    };
    let (w, g): (IndexMap<_, _>, IndexMap<_, _>) = (want.iter().cloned().collect(), got.iter().cloned().collect());
    let mut out = String::new();
    for (id, s) in &w {
        match g.get(id) {
            None => out += &format!("    only in the harness: {id:?} {s}\n"),
            Some(t) if t != s => out += &format!("    {id:?}: harness {s}, protege {t}\n"),
            _ => {}
        }
    }
    for (id, s) in g.iter().filter(|(id, _)| !w.contains_key(*id)) {
        out += &format!("    only in protege: {id:?} {s}\n");
    }
    if out.is_empty() {
        out = format!("    same statuses, different order:\n    harness {:?}\n    protege {:?}\n", w.keys(), g.keys());
    }
    out
}

fn describe(m: &Option<Vec<(String, String)>>) -> String {
    m.as_ref().map_or("invalid log (None)".into(), |m| format!("{} tests {m:?}", m.len()))
}

#[test]
fn grading_agrees_with_the_official_harness() {
    let Some(python) = harness_python() else { return };
    let manifest = root().join("tests/fixtures/swebench_logs/cases.json");
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    for p in PARSERS {
        assert!(cases.iter().any(|c| c.parser == p), "no case for {p}");
    }
    // The harness reads logs in the locale's encoding; the corpus is UTF-8.
    let out = Command::new(&python)
        .arg(root().join("tools/swebench_grade_logs.py"))
        .arg(&manifest)
        .env("PYTHONUTF8", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "swebench_grade_logs.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let harness: HashMap<String, Harness> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(harness.len(), cases.len(), "the harness graded another set of cases");

    let mut failures = vec![];
    for case in &cases {
        let log = std::fs::read_to_string(manifest.parent().unwrap().join(&case.log)).unwrap();
        let d = diff(&harness[&case.name], protege(case, &log));
        if !d.is_empty() {
            failures.push(format!("{} ({}, {}):\n{d}", case.name, case.parser, case.log));
        }
    }
    eprintln!("{} cases, {} parsers, {} disagreements", cases.len(), PARSERS.len(), failures.len());
    assert!(
        failures.is_empty(),
        "protege disagrees with swebench 5.0.2 on {} case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
