//! `protege tasks build` on a real PyPI package (the package registry is the one network the
//! tests may use; without it the test says so and skips): valid tasks that `validate` accepts,
//! a resumed build that redoes nothing, and a package that cannot be downloaded reported while
//! the build goes on.

use std::process::Command;

fn protege(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_protege")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn pypi_reachable() -> bool {
    let ok = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d"])
        .arg(std::env::temp_dir().join("protege-pypi-probe"))
        .arg("inflection==0.5.1")
        .output()
        .is_ok_and(|o| o.status.success());
    let pytest = Command::new("python3").args(["-m", "pytest", "--version"]).output().is_ok_and(|o| o.status.success());
    if !ok || !pytest {
        eprintln!("SKIPPED: PyPI (pip download) or pytest is not available here");
    }
    ok && pytest
}

#[test]
fn builds_valid_tasks_from_a_pypi_package_and_resumes() {
    if !pypi_reachable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("suite");
    let o = out.to_str().unwrap();
    let (ok, log) = protege(&[
        "tasks",
        "build",
        "--pypi",
        "inflection==0.5.1",
        "no-such-package-protege==0.0.1",
        "--out",
        o,
        "--max-mutants",
        "8",
    ]);
    assert!(ok, "{log}");
    assert!(log.contains("no-such-package-protege==0.0.1") && log.contains("pip could not download"), "{log}");
    let tasks = |p: &std::path::Path| std::fs::read_to_string(p.join("tasks.jsonl")).unwrap().lines().count();
    let first = tasks(&out);
    assert!(first >= 2, "{first} tasks from 8 mutants: {log}");
    let tried = |p: &std::path::Path| {
        std::fs::read_to_string(p.join(".work/inflection-0.5.1/results.jsonl")).unwrap().lines().count()
    };
    assert_eq!(tried(&out), 8);

    // Interrupted builds resume: raising the budget tries only the new mutants.
    let (ok, log) = protege(&["tasks", "build", "--pypi", "inflection==0.5.1", "--out", o, "--max-mutants", "12"]);
    assert!(ok, "{log}");
    assert_eq!(tried(&out), 12, "the first 8 were not tried again");
    assert!(tasks(&out) >= first);
    let ids: Vec<String> = std::fs::read_to_string(out.join("tasks.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["instance_id"].as_str().unwrap().to_string())
        .collect();
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no duplicated tasks");

    // A model writes the problem statements when one is configured (here the tiny model behind
    // protege serve: gibberish, but every task gets its own, cached for resumed builds).
    let mut serve = Command::new(env!("CARGO_BIN_EXE_protege"))
        .args([
            "serve",
            "--model",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny"),
            "--addr",
            "127.0.0.1:0",
            "--context",
            "8192",
            "--name",
            "tiny",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(serve.stderr.take().unwrap()));
    let url = loop {
        let l = lines.next().unwrap().unwrap();
        if let Some(a) = l.strip_prefix("protege serve: listening on ") {
            break format!("{}/v1", a.trim());
        }
    };
    let (ok, log) = protege(&[
        "tasks",
        "build",
        "--pypi",
        "inflection==0.5.1",
        "--out",
        o,
        "--max-mutants",
        "12",
        "--writer",
        "openai",
        "--writer-url",
        &url,
        "--writer-model",
        "tiny",
    ]);
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(ok, "{log}");
    let written = std::fs::read_to_string(out.join(".work/inflection-0.5.1/statements.jsonl")).unwrap().lines().count();
    assert_eq!(written, ids.len(), "one written statement per task");

    // Every generated task is valid in the sandbox.
    let (ok, log) = protege(&["tasks", "validate", o, "--runs", "1"]);
    assert!(ok, "{log}");
    assert!(log.contains(&format!("{} of {} tasks valid", ids.len(), ids.len())), "{log}");
}

/// A tiny package whose `tests/conftest.py` implements `pytest_ignore_collect(path, config)`:
/// the `py.path` hook argument that pytest 9 removed (boltons 24.0.0 has the same conftest).
fn old_conftest_sdist(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("oldhooks-0.1");
    let files = [
        ("setup.py", "from setuptools import setup\nsetup(name='oldhooks', version='0.1', packages=['oldhooks'])\n"),
        (
            "oldhooks/__init__.py",
            "def add(a, b):\n    return a + b\n\n\ndef clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    \
             if x > hi:\n        return hi\n    return x\n\n\ndef is_even(n):\n    return n % 2 == 0\n\n\n\
             def count_words(s):\n    return len(s.split())\n\n\ndef mean(xs):\n    return sum(xs) / len(xs)\n",
        ),
        (
            "tests/conftest.py",
            "def pytest_ignore_collect(path, config):\n    return path.basename.endswith('_py2.py')\n",
        ),
        (
            "tests/test_oldhooks.py",
            "from oldhooks import add, clamp, is_even, count_words, mean\n\n\n\
             def test_add():\n    assert add(2, 3) == 5\n\n\ndef test_add_negative():\n    assert add(-2, 1) == -1\n\n\n\
             def test_clamp_low():\n    assert clamp(-5, 0, 10) == 0\n\n\ndef test_clamp_high():\n    assert clamp(50, 0, 10) == 10\n\n\n\
             def test_clamp_inside():\n    assert clamp(5, 0, 10) == 5\n\n\ndef test_is_even():\n    assert is_even(4)\n\n\n\
             def test_is_odd():\n    assert not is_even(7)\n\n\ndef test_count_words():\n    assert count_words('a b  c') == 3\n\n\n\
             def test_mean():\n    assert mean([1, 2, 3, 6]) == 3\n\n\ndef test_mean_one():\n    assert mean([4]) == 4\n",
        ),
    ];
    for (path, text) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let sdist = dir.join("oldhooks-0.1.tar.gz");
    let ok = Command::new("tar").arg("-czf").arg(&sdist).arg("-C").arg(dir).arg("oldhooks-0.1").status().unwrap();
    assert!(ok.success());
    std::fs::remove_dir_all(&root).unwrap();
    sdist
}

/// Tests that the newest pytest cannot collect run with an older one (installed from PyPI into
/// the suite's venvs), recorded in every task and used when the tasks are validated.
#[test]
fn a_package_that_needs_an_older_pytest_gets_one() {
    if !pypi_reachable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sdist = old_conftest_sdist(dir.path());
    let out = dir.path().join("suite");
    let o = out.to_str().unwrap();
    let (ok, log) = protege(&["tasks", "build", "--sdist", sdist.to_str().unwrap(), "--out", o, "--max-mutants", "10"]);
    assert!(ok, "{log}");
    let tasks: Vec<serde_json::Value> = std::fs::read_to_string(out.join("tasks.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!tasks.is_empty(), "no tasks: {log}");
    let system = Command::new("python3").args(["-c", "import pytest; print(pytest.__version__)"]).output().unwrap();
    let system_major: u32 = String::from_utf8_lossy(&system.stdout).split('.').next().unwrap().parse().unwrap();
    for t in &tasks {
        let version = t["provenance"]["pytest"].as_str().unwrap();
        let major: u32 = version.split('.').next().unwrap().parse().unwrap();
        assert!(major < 9, "pytest {version} recorded: {t}");
        assert!(log.contains(&format!("| {} | {version}", sdist.display())), "the report names it: {log}");
        if system_major >= 9 {
            // The system's pytest could not collect the tests: a venv of pytest 8 ran them.
            assert!(log.contains("trying pytest 8.x"), "{log}");
            assert_eq!(t["env"]["venv"], "venvs/oldhooks-0.1-pytest8", "{t}");
            assert_eq!(t["provenance"]["venv"], "venvs/oldhooks-0.1-pytest8", "{t}");
            assert!(t["env"]["test_cmd"].as_str().unwrap().contains("{venv}/bin/python -m pytest"), "{t}");
        }
    }
    let (ok, log) = protege(&["tasks", "validate", o, "--runs", "1"]);
    assert!(ok, "{log}");
    assert!(log.contains(&format!("{} of {} tasks valid", tasks.len(), tasks.len())), "{log}");
    // The agent's own `python3 -m pytest` in an episode is the task's pytest too (its venv is
    // first on PATH, read-only).
    use protege::sandbox::{best_isolation, Limits, LocalSandbox, Workspace};
    let suite = protege::tasks::load_suite(&out).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let sb = LocalSandbox::for_task(&suite[0], &scratch.path().join("ep"), best_isolation(), Limits::default(), vec![])
        .unwrap();
    let v = sb.run("python3 -m pytest --version").unwrap();
    let recorded = tasks[0]["provenance"]["pytest"].as_str().unwrap();
    assert!(v.output.contains(&format!("pytest {recorded}")), "{} (recorded {recorded})", v.output);
    let w = sb.run("touch \"$VIRTUAL_ENV/bin/planted\" && echo wrote").unwrap();
    assert!(
        !w.output.contains("wrote") || best_isolation() == protege::sandbox::Isolation::Plain,
        "the venv is writable: {}",
        w.output
    );
    sb.discard();
}
