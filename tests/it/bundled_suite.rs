//! The bundled task suite (data/tasks, made by tools/make_bundled_suite.py): its shape, and
//! every task valid in the sandbox (FAIL_TO_PASS fail before the fix, everything passes after).

use std::collections::BTreeSet;
use std::path::Path;

use protege::sandbox::{best_isolation, Limits};
use protege::suites::validate::validate_suite;
use protege::tasks::grade::Grader;
use protege::tasks::load_suite;

fn suite(split: &str) -> Vec<protege::tasks::TaskInstance> {
    load_suite(&Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("data/tasks/{split}.jsonl"))).unwrap()
}

#[test]
fn the_suite_has_40_tasks_over_8_packages_with_a_held_out_split() {
    let (train, test) = (suite("train"), suite("test"));
    assert!(train.len() + test.len() >= 40, "{} tasks", train.len() + test.len());
    let packages: BTreeSet<_> = train.iter().chain(&test).map(|t| t.repo.clone()).collect();
    assert!(packages.len() >= 8, "{packages:?}");
    let train_ids: BTreeSet<_> = train.iter().map(|t| &t.instance_id).collect();
    assert!(test.iter().all(|t| !train_ids.contains(&t.instance_id)));
    assert!(test.len() >= 8, "a real held-out split");
    for t in train.iter().chain(&test) {
        // The bug report never names the hidden tests.
        for id in &t.fail_to_pass {
            let func = id.rsplit("::").next().unwrap();
            assert!(!t.problem_statement.contains(func), "{}: names {func}", t.instance_id);
        }
        assert!(
            t.test_files().iter().all(|f| !t.env.repo_path.join(f).exists()),
            "{}: hidden test in the snapshot",
            t.instance_id
        );
    }
    let multi_file =
        train.iter().chain(&test).filter(|t| protege::suites::validate::patch_size(&t.patch).1 > 1).count();
    assert!(multi_file >= 4, "{multi_file} multi-file tasks");
}

#[test]
fn every_bundled_task_is_valid() {
    if !std::process::Command::new("python3")
        .args(["-m", "pytest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: pytest is not installed (.ci/run installs it)");
        return;
    }
    let tasks: Vec<_> = suite("train").into_iter().chain(suite("test")).collect();
    let scratch = protege::sandbox::scratch::Scratch::new("test-validate").unwrap();
    let limits = Limits { timeout_s: 120.0, ..Default::default() };
    let local = protege::executor::LocalExecutor {
        grader: Grader::new(best_isolation(), limits, Default::default()),
        limits,
        scratch: scratch.path().to_path_buf(),
    };
    let results = validate_suite(&tasks, &local, 1, 2).unwrap();
    let invalid: Vec<_> =
        results.iter().filter(|v| !v.valid).map(|v| format!("{}: {:?}", v.instance_id, v.problems)).collect();
    assert!(invalid.is_empty(), "{invalid:#?}");
}
