//! `protege tasks build --pypi NAME==VERSION ...`: SWE-smith-style task synthesis from real
//! packages. For each package: download its source distribution with pip, unpack it, run its
//! test suite (the baseline), generate mutants of its own source with tree-sitter, and keep a
//! mutant when it makes at least one test fail and at most a configurable share — twice the same
//! way (flaky ones are dropped). FAIL_TO_PASS and PASS_TO_PASS come from the two runs; the gold
//! patch is the reverse of the mutation; the problem statement comes from the observed failure.
//!
//! Packages come from PyPI (`--pypi NAME==VERSION`) or from a local source distribution or
//! directory (`--sdist PATH`).
//!
//! The tests run with a pytest the package supports: the one its declared test requirements
//! give (the system's when they name none); when that pytest cannot collect or run them at
//! all (a conftest hook it no longer accepts, an internal error — not failing tests), each
//! older major in turn, in a venv of its own. Each task records the pytest and venv used in
//! its provenance, and its `env.test_cmd` runs that pytest wherever the task is graded.
//!
//! Output directory: `tasks.jsonl` (every valid task of every package), `repos/<pkg>-<ver>/`
//! (one clean snapshot per package; each task's bug is its `env.base_patch`), `venvs/<pkg>-<ver>/`
//! (when its tests need more than the system's pytest: its dependencies and test extras) or
//! `venvs/<pkg>-<ver>-pytest<major>/` (an older pytest, with them), and `.work/` (the
//! downloads and `results.jsonl` per package: one line per tried mutant, so an interrupted build
//! resumes where it stopped and never duplicates a task).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::mutate::{mutants, Mutant};
use crate::sandbox::{copy_tree, discard, git, Isolation, Limits, LocalSandbox, Workspace};
use crate::tasks::grade::{parse_pytest, TestStatus};
use crate::tasks::instance::{LocalEnv, TaskInstance};
use crate::tasks::pytest::{self, Probe};
use crate::util::write_atomic;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// `NAME==VERSION` specs.
    pub packages: Vec<String>,
    /// Local source distributions (`.tar.gz`, `.zip`) or source directories.
    pub sdists: Vec<PathBuf>,
    pub out: PathBuf,
    /// A mutant that fails more than this share of the passing tests is dropped.
    pub max_fail_share: f64,
    /// Mutants tried per package.
    pub max_mutants: usize,
    pub per_file: usize,
    pub per_function: usize,
    pub concurrency: usize,
    pub seed: u64,
    /// Limits of one test-suite run.
    pub limits: Limits,
    pub isolation: Isolation,
    /// A model that writes each task's problem statement (from the failure and the hidden fix);
    /// without one, statements come from a template over the observed failure.
    pub writer: Option<crate::agent::remote::Endpoint>,
}

const WRITER_SYSTEM: &str = "You write bug reports for open-source Python libraries, the way a user who hit the bug \
would: a one-line title, then the symptom, a minimal reproduction (a short code snippet and the wrong output), and \
the expected behaviour. You are shown the failing test output and the fix so that the report is accurate, but the \
report must not reveal the fix, the changed line, or the names of tests.";

/// A written problem statement, cached in `statements.jsonl` so a resumed build asks once.
fn written_statement(o: &BuildOptions, work: &Path, key: &str, prompt: &str) -> Option<String> {
    let ep = o.writer.as_ref()?;
    let cache = work.join("statements.jsonl");
    if let Ok(text) = std::fs::read_to_string(&cache) {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if v["key"] == key {
                    return v["statement"].as_str().map(str::to_string);
                }
            }
        }
    }
    match crate::agent::remote::complete_text(ep, WRITER_SYSTEM, prompt, 600) {
        Ok((text, _, _)) if !text.trim().is_empty() => {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&cache) {
                let _ = writeln!(f, "{}", json!({"key": key, "statement": text}));
            }
            Some(text)
        }
        Ok(_) => None,
        Err(e) => {
            eprintln!("tasks build: the statement writer failed ({e:#}); using the template");
            None
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Baseline {
    passing: Vec<String>,
    /// With `{venv}` for the venv's path when there is one.
    test_cmd: String,
    #[serde(default)]
    venv: Option<PathBuf>,
    /// The version of the pytest the tests run with.
    #[serde(default)]
    pytest: String,
    seconds: f64,
}

impl Baseline {
    fn command(&self) -> String {
        match &self.venv {
            Some(v) => self.test_cmd.replace("{venv}", &v.display().to_string()),
            None => self.test_cmd.clone(),
        }
    }

    /// The venv as the suite names it (`venvs/<name>`).
    fn suite_venv(&self) -> Option<PathBuf> {
        let name = self.venv.as_ref()?.file_name()?;
        Some(PathBuf::from("venvs").join(name))
    }

    /// `8.4.2` or `8.4.2 (venvs/x-pytest8)`.
    fn pytest_label(&self) -> String {
        match self.suite_venv() {
            Some(v) => format!("{} ({})", self.pytest, v.display()),
            None => self.pytest.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tried {
    key: String,
    mutant: Mutant,
    /// valid, survived (no test failed), too_many, flaky, timeout, broken
    status: String,
    failing: Vec<String>,
    /// The first assertion lines of the first failing test.
    excerpt: String,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PackageReport {
    pub package: String,
    pub error: Option<String>,
    pub passing_tests: usize,
    /// The pytest the tests ran with: its version, and its venv when not the system's.
    pub pytest: String,
    pub tried: usize,
    pub valid: usize,
    pub by_status: BTreeMap<String, usize>,
}

fn pip_download(spec: &str, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let existing = |dir: &Path| -> Option<PathBuf> {
        std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
            let n = p.to_string_lossy();
            n.ends_with(".tar.gz") || n.ends_with(".zip") || n.ends_with(".tar.bz2")
        })
    };
    if let Some(p) = existing(dir) {
        return Ok(p);
    }
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps", "-d"])
        .arg(dir)
        .arg(spec)
        .output()
        .context("cannot run python3 -m pip")?;
    if !out.status.success() {
        bail!("pip could not download the source of {spec}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    existing(dir).with_context(|| format!("pip downloaded no source archive for {spec}"))
}

fn unpack(archive: &Path, into: &Path) -> Result<PathBuf> {
    if into.exists() {
        std::fs::remove_dir_all(into)?;
    }
    std::fs::create_dir_all(into)?;
    let name = archive.to_string_lossy();
    let ok = if name.ends_with(".zip") {
        Command::new("python3").args(["-m", "zipfile", "-e"]).arg(archive).arg(into).status()?.success()
    } else {
        Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(into).status()?.success()
    };
    if !ok {
        bail!("cannot unpack {}", archive.display());
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(into)?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        _ => Ok(into.to_path_buf()),
    }
}

fn is_test_path(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    let file = parts.last().copied().unwrap_or("");
    parts.iter().any(|p| *p == "tests" || *p == "test" || *p == "testing")
        || file.starts_with("test_")
        || file.ends_with("_test.py")
        || file == "conftest.py"
}

/// Source files that mutants may touch: the package's own modules, not tests, docs or setup.
fn source_files(root: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().to_string();
            let name = e.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                let skip = name.starts_with('.')
                    || ["docs", "doc", "examples", "benchmarks", "bench", "build", "dist", "__pycache__"]
                        .contains(&name.as_str())
                    || name.ends_with(".egg-info");
                if !skip {
                    stack.push(p);
                }
            } else if name.ends_with(".py")
                && !is_test_path(&rel)
                && !["setup.py", "conftest.py", "noxfile.py"].contains(&name.as_str())
            {
                out.push(rel);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn test_cmd(root: &Path, python: &str) -> String {
    // src layouts import from src/; addopts of the project (coverage plugins...) are dropped.
    let path = if root.join("src").is_dir() { "src:." } else { "." };
    format!("PYTHONPATH={path} {python} -m pytest -rA -p no:cacheprovider -o addopts= -q")
}

/// What the package's tests need besides pytest: its declared dependencies and test extras
/// (pyproject.toml, setup.cfg) and test requirement files.
const FIND_REQUIREMENTS: &str = r##"
import configparser, os, sys
root = sys.argv[1]
reqs = []
try:
    import tomllib
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        p = tomllib.load(f).get("project", {})
    reqs += p.get("dependencies", [])
    for k, v in p.get("optional-dependencies", {}).items():
        if k in ("test", "tests", "testing"):
            reqs += v
except Exception:
    pass
c = configparser.ConfigParser()
try:
    c.read(os.path.join(root, "setup.cfg"))
    reqs += [l for l in c.get("options", "install_requires", fallback="").splitlines() if l.strip()]
    for k in ("test", "tests", "testing"):
        reqs += [l for l in c.get("options.extras_require", k, fallback="").splitlines() if l.strip()]
except Exception:
    pass
for name in ("requirements-test.txt", "requirements_test.txt", "test-requirements.txt", "test_requirements.txt", "requirements/test.txt", "requirements/tests.txt"):
    try:
        with open(os.path.join(root, name)) as f:
            reqs += [l.strip() for l in f if l.strip() and not l.startswith(("#", "-"))]
    except OSError:
        pass
skip = ("tox", "flake8", "mypy", "black", "ruff", "pylint", "sphinx")
print("\n".join(sorted({r.split(";")[0].strip() for r in reqs if r.strip() and not r.lower().startswith(skip)})))
"##;

/// The package's test requirements ([`FIND_REQUIREMENTS`]); empty when the system `python3`
/// with pytest is enough.
fn test_requirements(src: &Path) -> Result<Vec<String>> {
    let out = Command::new("python3").arg("-c").arg(FIND_REQUIREMENTS).arg(src).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect())
}

/// A venv with `reqs` installed (system site packages give it the system's pytest unless
/// `reqs` name another; pip's cache keeps downloads for the next build).
fn make_venv(venv: &Path, reqs: &[String]) -> Result<PathBuf> {
    let python = venv.join("bin/python");
    if !python.exists() {
        let ok = Command::new("python3").args(["-m", "venv", "--system-site-packages"]).arg(venv).status()?.success();
        if !ok {
            bail!("cannot create a venv at {} for its test requirements {reqs:?}", venv.display());
        }
    }
    let out = Command::new(&python).args(["-m", "pip", "install", "--quiet"]).args(reqs).output()?;
    if !out.status.success() {
        bail!("cannot install {reqs:?} into {}: {}", venv.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(venv.canonicalize()?)
}

fn excerpt(log: &str, test: &str) -> String {
    // pytest prints "E   ..." lines under each failure; take the first few after the test's header.
    let short = test.rsplit("::").next().unwrap_or(test);
    let start = log.find(&format!("_ {short} ")).or_else(|| log.find(short)).unwrap_or(0);
    log[start..].lines().filter(|l| l.starts_with("E ")).take(6).collect::<Vec<_>>().join("\n")
}

fn run_suite(sb: &LocalSandbox, cmd: &str) -> Result<(BTreeMap<String, TestStatus>, String, bool)> {
    let out = sb.run(cmd)?;
    Ok((parse_pytest(&out.output), out.output, out.timed_out))
}

/// Builds the tasks of every package (one after another; mutants of a package in parallel).
pub fn build(o: &BuildOptions) -> Result<(Vec<PackageReport>, usize)> {
    std::fs::create_dir_all(o.out.join("repos"))?;
    let mut reports = vec![];
    let sources =
        o.packages.iter().map(|p| Source::Pypi(p.clone())).chain(o.sdists.iter().map(|p| Source::Local(p.clone())));
    for source in sources {
        let label = source.label();
        let report = match build_package(o, &source) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("tasks build: {label}: {e:#} (skipped; the build goes on)");
                PackageReport { package: label, error: Some(format!("{e:#}")), ..Default::default() }
            }
        };
        reports.push(report);
    }
    let n = write_tasks(o)?;
    Ok((reports, n))
}

fn slug(spec: &str) -> Result<(String, String)> {
    let (name, version) = spec.split_once("==").with_context(|| format!("{spec:?}: expected NAME==VERSION"))?;
    if name.is_empty() || version.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("{spec:?}: expected NAME==VERSION");
    }
    Ok((name.to_lowercase().replace('_', "-"), version.to_string()))
}

/// Where a package's source comes from.
#[derive(Debug, Clone)]
enum Source {
    /// `NAME==VERSION`, downloaded with pip.
    Pypi(String),
    /// A source distribution (`.tar.gz`, `.tar.bz2`, `.zip`) or a source directory.
    Local(PathBuf),
}

impl Source {
    fn label(&self) -> String {
        match self {
            Source::Pypi(spec) => spec.clone(),
            Source::Local(p) => p.display().to_string(),
        }
    }

    /// The package's id (`name-version`): names its snapshot, venv and tasks.
    fn id(&self) -> Result<String> {
        match self {
            Source::Pypi(spec) => slug(spec).map(|(name, version)| format!("{name}-{version}")),
            Source::Local(p) => {
                let file = p.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
                let stem =
                    [".tar.gz", ".tgz", ".tar.bz2", ".zip"].iter().fold(file.as_str(), |f, e| f.trim_end_matches(e));
                if stem.is_empty()
                    || stem.starts_with('.')
                    || !stem.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    bail!(
                        "--sdist {}: expected a source distribution or directory named like NAME-VERSION.tar.gz \
                         (letters, digits, `.`, `_`, `-`)",
                        p.display()
                    );
                }
                Ok(stem.replace('_', "-"))
            }
        }
    }

    /// The unpacked source, under `work`.
    fn fetch(&self, work: &Path) -> Result<PathBuf> {
        match self {
            Source::Pypi(spec) => unpack(&pip_download(spec, &work.join("download"))?, &work.join("unpacked")),
            Source::Local(p) if p.is_dir() => Ok(p.clone()),
            Source::Local(p) if p.is_file() => unpack(p, &work.join("unpacked")),
            Source::Local(p) => bail!("--sdist {}: no such file or directory", p.display()),
        }
    }
}

/// The oldest pytest major tried when newer ones cannot collect a package's tests.
const OLDEST_PYTEST: u32 = 6;

/// Runs the package's tests once, clean, with a pytest that can collect them: the one its
/// declared test requirements give (the system's when they name none); when that one cannot
/// collect or run them at all, each older major in turn (`venvs/<id>-pytest<major>`, with
/// its requirements and `pytest<major+1>`; a pin of theirs that excludes it ends the search).
fn run_baseline(o: &BuildOptions, id: &str, snapshot: &Path, work: &Path) -> Result<Baseline> {
    let reqs = test_requirements(snapshot)?;
    let venvs = o.out.join("venvs");
    let mut venv = if reqs.is_empty() { None } else { Some(make_venv(&venvs.join(id), &reqs)?) };
    let mut rejected: Vec<String> = vec![];
    let mut tried_major: Option<u32> = None;
    loop {
        let python = venv.as_ref().map_or("python3".to_string(), |v| v.join("bin/python").display().to_string());
        let version = match pytest::probe(&python) {
            Probe::Installed(v) => v,
            // A venv has the system's site packages: pytest for the user's python3 serves both.
            Probe::Missing => {
                bail!("pytest is not installed for `{python}`; install it (`python3 -m pip install --user pytest`)")
            }
            Probe::NoInterpreter(why) | Probe::Broken(why) => bail!("`{python}` cannot import pytest: {why}"),
        };
        // Each try must be an older pytest than the last, or the search would never end (a
        // PYTHONPATH that shadows the venv's pytest, say).
        if let (Some(tried), Some(now)) = (tried_major, pytest::major(&version)) {
            if now >= tried {
                bail!(
                    "{}; the venv made for an older pytest still runs pytest {version} (is PYTHONPATH shadowing it?)",
                    rejected.join("; ")
                );
            }
        }
        tried_major = pytest::major(&version);
        let cmd = test_cmd(snapshot, if venv.is_some() { "{venv}/bin/python" } else { "python3" });
        let b = Baseline { passing: vec![], test_cmd: cmd, venv: venv.clone(), pytest: version.clone(), seconds: 0.0 };
        let visible: Vec<PathBuf> = b.venv.iter().cloned().collect();
        let run_dir = work.join("baseline-run");
        discard(&run_dir);
        let sb = LocalSandbox::create_with(snapshot, None, &run_dir, o.isolation, o.limits, vec![], &[], visible)?;
        let started = std::time::Instant::now();
        let out = sb.run(&b.command());
        sb.discard();
        let out = out?;
        let seconds = started.elapsed().as_secs_f64();
        let (log, timed_out) = (out.output, out.timed_out);
        let passing: Vec<String> =
            parse_pytest(&log).into_iter().filter(|(_, s)| *s == TestStatus::Passed).map(|(t, _)| t).collect();
        if passing.is_empty() && !timed_out && pytest::cannot_collect(out.exit_code, &log) {
            rejected.push(format!("pytest {version} cannot collect them ({})", pytest::collect_error(&log)));
            let older = pytest::major(&version).and_then(|m| m.checked_sub(1)).filter(|m| *m >= OLDEST_PYTEST);
            let Some(older) = older else { bail!("{}", rejected.join("; ")) };
            eprintln!("tasks build: {id}: {}; trying pytest {older}.x", rejected.last().map_or("", |r| r.as_str()));
            let with_pytest = [reqs.clone(), vec![format!("pytest<{}", older + 1)]].concat();
            // A venv of a pytest that could not collect them is of no further use.
            if let Some(v) = venv.as_ref().filter(|v| v.file_name().is_some_and(|n| n != id)) {
                discard(v);
            }
            match make_venv(&venvs.join(format!("{id}-pytest{older}")), &with_pytest) {
                Ok(v) => venv = Some(v),
                Err(e) => bail!("{}; no pytest {older}.x to try instead: {e:#}", rejected.join("; ")),
            }
            continue;
        }
        if passing.is_empty() && !timed_out && (log.contains("no tests ran") || log.contains("collected 0 items")) {
            bail!("pytest found no tests in its source distribution");
        }
        if passing.is_empty() || timed_out {
            let tail: String =
                log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            bail!(
                "its tests cannot run here with pytest {version} ({} passing{}):\n{tail}",
                passing.len(),
                if timed_out { ", timed out" } else { "" }
            );
        }
        return Ok(Baseline { passing, seconds, ..b });
    }
}

fn build_package(o: &BuildOptions, source: &Source) -> Result<PackageReport> {
    let id = source.id()?;
    let work = o.out.join(".work").join(&id);
    let snapshot = o.out.join("repos").join(&id);
    let baseline_path = work.join("baseline.json");
    std::fs::create_dir_all(&work)?;
    let mut report = PackageReport { package: source.label(), ..Default::default() };

    if !baseline_path.exists() {
        let src = source.fetch(&work)?;
        if snapshot.exists() {
            std::fs::remove_dir_all(&snapshot)?;
        }
        copy_tree(&src, &snapshot)?;
        let b = run_baseline(o, &id, &snapshot, &work)?;
        write_atomic(&baseline_path, serde_json::to_string(&b)?.as_bytes())?;
    }
    let baseline: Baseline = serde_json::from_str(&std::fs::read_to_string(&baseline_path)?)
        .with_context(|| format!("{} is corrupt", baseline_path.display()))?;
    report.passing_tests = baseline.passing.len();
    report.pytest = baseline.pytest_label();
    // A mutant that loops forever should not hold a worker for the full limit: ten times the
    // baseline run, at least 20 s.
    let limits = Limits { timeout_s: o.limits.timeout_s.min((baseline.seconds * 10.0).max(20.0)), ..o.limits };

    // Candidate mutants, capped per file and function for diversity, in a seeded order.
    let mut candidates = vec![];
    for file in source_files(&snapshot) {
        let Ok(text) = std::fs::read_to_string(snapshot.join(&file)) else { continue };
        let mut ms = mutants(&text, &file);
        ms.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(o.seed ^ file.len() as u64));
        let mut per_fn: BTreeMap<String, usize> = BTreeMap::new();
        let mut kept = 0;
        for m in ms {
            let c = per_fn.entry(m.function.clone()).or_default();
            if *c >= o.per_function || kept >= o.per_file {
                continue;
            }
            *c += 1;
            kept += 1;
            candidates.push(m);
        }
    }
    candidates.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(o.seed));
    candidates.truncate(o.max_mutants);

    // Resume: mutants already tried are skipped.
    let results_path = work.join("results.jsonl");
    let mut done: HashSet<String> = HashSet::new();
    if let Ok(text) = std::fs::read_to_string(&results_path) {
        for line in text.lines() {
            if let Ok(t) = serde_json::from_str::<Tried>(line) {
                done.insert(t.key);
            }
        }
    }
    let todo: Vec<&Mutant> = candidates.iter().filter(|m| !done.contains(&m.key())).collect();
    let results_file = Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(&results_path)?);
    let passing: BTreeSet<String> = baseline.passing.iter().cloned().collect();
    let next = AtomicUsize::new(0);
    let bar = indicatif::ProgressBar::new(todo.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} mutants of {msg}, ETA {eta}").expect("template"),
    );
    bar.set_message(id.clone());
    let errors = Mutex::new(vec![]);
    std::thread::scope(|s| {
        for w in 0..o.concurrency.max(1) {
            let (todo, next, bar, errors, results_file, passing, baseline, snapshot, work) =
                (&todo, &next, &bar, &errors, &results_file, &passing, &baseline, &snapshot, &work);
            s.spawn(move || {
                let dir = work.join(format!("worker-{w}"));
                discard(&dir);
                let visible = baseline.venv.iter().cloned().collect();
                let sb =
                    match LocalSandbox::create_with(snapshot, None, &dir, o.isolation, limits, vec![], &[], visible) {
                        Ok(sb) => sb,
                        Err(e) => return errors.lock().expect("lock").push(format!("{e:#}")),
                    };
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(m) = todo.get(i) else { break };
                    match try_mutant(&sb, m, passing, &baseline.command(), o.max_fail_share) {
                        Ok(t) => {
                            let mut f = results_file.lock().expect("lock");
                            let _ = writeln!(f, "{}", serde_json::to_string(&t).unwrap_or_default());
                            let _ = f.flush();
                        }
                        Err(e) => errors.lock().expect("lock").push(format!("{}: {e:#}", m.key())),
                    }
                    bar.inc(1);
                }
                sb.discard();
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = errors.into_inner().expect("lock").first() {
        eprintln!("tasks build: {id}: some mutants could not be tried, e.g. {e}");
    }
    for line in std::fs::read_to_string(&results_path)?.lines() {
        if let Ok(t) = serde_json::from_str::<Tried>(line) {
            report.tried += 1;
            *report.by_status.entry(t.status.clone()).or_default() += 1;
            report.valid += (t.status == "valid") as usize;
        }
    }
    Ok(report)
}

/// Applies `m` in the worker's tree, runs the suite (twice when it qualifies), restores the file.
fn try_mutant(sb: &LocalSandbox, m: &Mutant, passing: &BTreeSet<String>, cmd: &str, share: f64) -> Result<Tried> {
    let path = sb.host_root().join(&m.file);
    let original = std::fs::read_to_string(&path)?;
    std::fs::write(&path, m.apply(&original))?;
    let outcome = (|| -> Result<Tried> {
        let mut tried =
            Tried { key: m.key(), mutant: m.clone(), status: String::new(), failing: vec![], excerpt: String::new() };
        let (r1, log, timed_out) = run_suite(sb, cmd)?;
        if timed_out {
            tried.status = "timeout".into();
            return Ok(tried);
        }
        let failing: Vec<String> =
            passing.iter().filter(|t| r1.get(*t) != Some(&TestStatus::Passed)).cloned().collect();
        tried.status = if failing.is_empty() {
            "survived".into()
        } else if failing.len() as f64 > share * passing.len() as f64 {
            "too_many".into()
        } else {
            let (r2, _, _) = run_suite(sb, cmd)?;
            let again: Vec<String> =
                passing.iter().filter(|t| r2.get(*t) != Some(&TestStatus::Passed)).cloned().collect();
            if again == failing {
                "valid".into()
            } else {
                "flaky".into()
            }
        };
        tried.excerpt = failing.first().map(|t| excerpt(&log, t)).unwrap_or_default();
        tried.failing = failing;
        Ok(tried)
    })();
    std::fs::write(&path, original)?;
    outcome
}

/// Unified diffs `from -> to` of one file, with git's a/ b/ headers.
fn file_diff(rel: &str, from: &str, to: &str) -> Result<String> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap_or(root))?;
    std::fs::write(&p, from)?;
    git(root, &["init", "-q"])?;
    git(root, &["add", "-A"])?;
    git(root, &["-c", "user.name=protege", "-c", "user.email=protege@localhost", "commit", "-q", "-m", "a"])?;
    std::fs::write(&p, to)?;
    git(root, &["diff", "--no-color"])
}

/// Gathers every package's valid mutants into `tasks.jsonl` (deduplicated by instance id).
fn write_tasks(o: &BuildOptions) -> Result<usize> {
    let mut tasks: BTreeMap<String, TaskInstance> = BTreeMap::new();
    let work = o.out.join(".work");
    for entry in std::fs::read_dir(&work).into_iter().flatten().flatten() {
        let id = entry.file_name().to_string_lossy().to_string();
        let snapshot = o.out.join("repos").join(&id);
        let Ok(b) = std::fs::read_to_string(entry.path().join("baseline.json")) else { continue };
        let baseline: Baseline = serde_json::from_str(&b)?;
        let Ok(results) = std::fs::read_to_string(entry.path().join("results.jsonl")) else { continue };
        for line in results.lines() {
            let Ok(t) = serde_json::from_str::<Tried>(line) else { continue };
            if t.status != "valid" {
                continue;
            }
            let m = &t.mutant;
            let correct = std::fs::read_to_string(snapshot.join(&m.file))?;
            let buggy = m.apply(&correct);
            let hash = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                m.key().hash(&mut h);
                h.finish()
            };
            let instance_id = format!("{id}__{}-{:08x}", m.operator.replace('_', "-"), hash as u32);
            let module = m.file.trim_end_matches(".py").trim_end_matches("/__init__").replace('/', ".");
            let first = t.failing.first().cloned().unwrap_or_default();
            let problem = format!(
                "`{}` in `{module}` behaves incorrectly\n\nSince a recent change, {} of the package's tests fail. For \
                 example:\n\n    python3 -m pytest {first}\n\nfails with:\n\n{}\n\nExpected: `{}` behaves as documented and the \
                 test suite passes.\n",
                m.function,
                t.failing.len(),
                if t.excerpt.is_empty() { "    (no assertion message)".to_string() } else { t.excerpt.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n") },
                m.function
            );
            let gold = file_diff(&m.file, &buggy, &correct)?;
            let prompt = format!(
                "Library: {id}. Module `{module}`, function `{}`.\n\nFailing test output:\n{}\n\nThe fix (do not reveal it):\n{gold}",
                m.function, t.excerpt
            );
            let problem = written_statement(o, &entry.path(), &t.key, &prompt).unwrap_or(problem);
            let failing: BTreeSet<&String> = t.failing.iter().collect();
            let mut extra = serde_json::Map::new();
            extra.insert(
                "provenance".into(),
                json!({"package": id, "operator": m.operator, "file": m.file, "line": m.line, "function": m.function,
                       "test_seconds": baseline.seconds, "pytest": baseline.pytest, "venv": baseline.suite_venv()}),
            );
            tasks.insert(
                instance_id.clone(),
                TaskInstance {
                    instance_id,
                    repo: format!("pypi/{id}"),
                    base_commit: id.clone(),
                    problem_statement: problem,
                    patch: gold,
                    test_patch: String::new(),
                    fail_to_pass: t.failing.clone(),
                    pass_to_pass: baseline.passing.iter().filter(|p| !failing.contains(p)).cloned().collect(),
                    env: LocalEnv {
                        repo_path: PathBuf::from("repos").join(&id),
                        setup: vec![],
                        test_cmd: baseline.test_cmd.clone(),
                        base_patch: Some(file_diff(&m.file, &correct, &buggy)?),
                        venv: baseline.suite_venv(),
                        ..Default::default()
                    },
                    extra,
                },
            );
        }
    }
    let mut out = String::new();
    for t in tasks.values() {
        out.push_str(&serde_json::to_string(t)?);
        out.push('\n');
    }
    write_atomic(&o.out.join("tasks.jsonl"), out.as_bytes())?;
    Ok(tasks.len())
}
