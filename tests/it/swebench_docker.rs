//! SWE-bench in Docker: the Docker executor end to end (named to run after the RL learning test,
//! which the daemon's disk work would slow and perturb), on images built here (`tools/docker_fixture.sh`: a
//! debootstrapped Debian with a stand-in conda, `/testbed` a git repository with the official
//! images' extra empty commit). Needs a Docker daemon (`.ci/run` installs and starts one as
//! root); skips with a loud message where none answers.
//!
//! - SWE-bench 5.x rows of a repository protege has not seen: `tasks import`, `tasks validate
//!   --executor docker` (gold resolves, empty does not), `grade` of gold, empty, wrong and
//!   tampering predictions with the harness's verdicts and report keys; no container left.
//! - An agent's container as an attacker sees it: no network, no host paths, hidden tests
//!   absent, limits, a fork bomb contained, a background `sleep` killed with its command, a
//!   timeout that kills the whole tree, the patch against the image's HEAD.
//! - A `kill -9` of a running eval: its containers are removed at the next start.

use std::path::{Path, PathBuf};
use std::process::Command;

use protege::executor::docker::{DockerConfig, DockerExecutor};
use protege::executor::Executor;

/// The tests share the daemon and count its containers: one at a time.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn docker_ready() -> bool {
    let ok = Command::new("docker").arg("version").output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        eprintln!("\n!!! SKIPPED: no Docker daemon answers (`.ci/run` starts one as root) !!!\n");
    }
    ok
}

fn protege() -> Command {
    Command::new(env!("CARGO_BIN_EXE_protege"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Builds image `name` from `dir` (as /testbed); returns the base commit.
fn image(name: &str, dir: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/docker_fixture.sh");
    run_ok(Command::new(script).args(["instance", name]).arg(dir)).trim().lines().last().unwrap().to_string()
}

fn protege_containers() -> Vec<String> {
    let out = Command::new("docker").args(["ps", "-aq", "--filter", "label=protege=1"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(|s| s.to_string()).collect()
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A repository protege has not seen: `geometry`, whose `area` of a rectangle is wrong.
fn geometry_repo(dir: &Path) {
    write(
        dir,
        "geometry/__init__.py",
        "def area(w, h):\n    return w + h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n",
    );
    write(
        dir,
        "tests/test_perimeter.py",
        "from geometry import perimeter\n\n\ndef test_perimeter():\n    assert perimeter(2, 3) == 10\n",
    );
}

const GOLD: &str = "diff --git a/geometry/__init__.py b/geometry/__init__.py\n--- a/geometry/__init__.py\n+++ b/geometry/__init__.py\n@@ -1,5 +1,5 @@\n def area(w, h):\n-    return w + h\n+    return w * h\n \n \n def perimeter(w, h):\n";
const WRONG: &str = "diff --git a/geometry/__init__.py b/geometry/__init__.py\n--- a/geometry/__init__.py\n+++ b/geometry/__init__.py\n@@ -1,5 +1,5 @@\n def area(w, h):\n-    return w + h\n+    return w * h + 1\n \n \n def perimeter(w, h):\n";
const TEST_PATCH: &str = "diff --git a/tests/test_area.py b/tests/test_area.py\nnew file mode 100644\n--- /dev/null\n+++ b/tests/test_area.py\n@@ -0,0 +1,9 @@\n+from geometry import area\n+\n+\n+def test_area():\n+    assert area(2, 3) == 6\n+\n+\n+def test_area_square():\n+    assert area(4, 4) == 16\n";
/// Makes every test pass by adding a conftest hook (the harness itself does not stop it).
const TAMPER: &str = "diff --git a/tests/conftest.py b/tests/conftest.py\nnew file mode 100644\n--- /dev/null\n+++ b/tests/conftest.py\n@@ -0,0 +1,6 @@\n+import pytest\n+\n+@pytest.hookimpl(hookwrapper=True)\n+def pytest_runtest_makereport(item, call):\n+    outcome = yield\n+    outcome.get_result().outcome = \"passed\"\n";

/// A SWE-bench 5.x row: the eval script in the harness's shape.
fn row(id: &str, image: &str, base: &str) -> serde_json::Value {
    let eval_script = format!(
        "#!/bin/bash\nset -uxo pipefail\nsource /opt/miniconda3/bin/activate\nconda activate testbed\ncd /testbed\ngit config --global --add safe.directory /testbed\ncd /testbed\ngit status\ngit show\ngit -c core.fileMode=false diff {base}\nsource /opt/miniconda3/bin/activate\nconda activate testbed\ngit checkout {base} \ngit apply -v - <<'EOF_114329324912'\n{TEST_PATCH}\nEOF_114329324912\n: '>>>>> Start Test Output'\npytest -rA tests/test_area.py tests/test_perimeter.py\n: '>>>>> End Test Output'\ngit checkout {base} \n"
    );
    serde_json::json!({
        "instance_id": id, "repo": "acme/geometry", "base_commit": base, "patch": GOLD, "test_patch": TEST_PATCH,
        "problem_statement": "area() adds instead of multiplying", "hints_text": "", "created_at": "2026-01-01",
        "version": "1.0", "environment_setup_commit": base,
        "FAIL_TO_PASS": "[\"tests/test_area.py::test_area\", \"tests/test_area.py::test_area_square\"]",
        "PASS_TO_PASS": "[\"tests/test_perimeter.py::test_perimeter\"]",
        "image": image, "eval_script": eval_script, "log_parser": "parse_log_pytest", "eval_type": "pass_and_fail",
    })
}

fn geometry_suite(tmp: &Path, ids: &[&str]) -> PathBuf {
    let repo = tmp.join("repo");
    geometry_repo(&repo);
    let base = image("protege-test-geometry:latest", &repo);
    let rows: String = ids.iter().map(|id| row(id, "protege-test-geometry:latest", &base).to_string() + "\n").collect();
    std::fs::write(tmp.join("rows.jsonl"), rows).unwrap();
    let suite = tmp.join("suite");
    run_ok(protege().args(["tasks", "import"]).arg(tmp.join("rows.jsonl")).arg("--out").arg(&suite));
    suite
}

#[test]
fn swebench_rows_import_validate_and_grade_as_the_harness() {
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ids = ["acme__geometry-1", "acme__geometry-2", "acme__geometry-3", "acme__geometry-4", "acme__geometry-5"];
    let suite = geometry_suite(tmp.path(), &ids);
    let out = run_ok(protege().args(["tasks", "validate"]).arg(&suite).args([
        "--executor",
        "docker",
        "--runs",
        "1",
        "--tasks",
        ids[0],
    ]));
    assert!(out.contains("| acme__geometry-1 | yes |"), "{out}");

    let preds: String = [
        (ids[0], Some(GOLD)),
        (ids[1], Some("")),
        (ids[2], Some(WRONG)),
        (ids[3], Some(TAMPER)),
        (ids[4], Some("not a diff\n")),
    ]
    .iter()
    .map(|(id, p)| {
        serde_json::json!({"instance_id": id, "model_name_or_path": "test", "model_patch": p}).to_string() + "\n"
    })
    .collect();
    std::fs::write(tmp.path().join("preds.jsonl"), preds).unwrap();
    let out_dir = tmp.path().join("graded");
    run_ok(
        protege()
            .args(["grade", "--suite"])
            .arg(&suite)
            .arg("--predictions")
            .arg(tmp.path().join("preds.jsonl"))
            .arg("--out")
            .arg(&out_dir),
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["resolved_ids"], serde_json::json!([ids[0]]), "{report:#}");
    assert_eq!(report["empty_patch_ids"], serde_json::json!([ids[1]]));
    assert_eq!(report["unresolved_ids"], serde_json::json!([ids[2], ids[3]]));
    assert_eq!(report["error_ids"], serde_json::json!([ids[4]]));
    assert_eq!(report["tampering_ids"], serde_json::json!([ids[3]]));
    let log = std::fs::read_to_string(out_dir.join("logs").join(ids[0]).join("test_output.txt")).unwrap();
    assert!(log.contains(">>>>> Test Exit Code: 0"), "{log}");
    let inst: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("logs").join(ids[2]).join("report.json")).unwrap())
            .unwrap();
    assert_eq!(inst[ids[2]]["tests_status"]["FAIL_TO_PASS"]["failure"].as_array().unwrap().len(), 2, "{inst:#}");
    assert!(protege_containers().is_empty(), "containers left: {:?}", protege_containers());
}

#[test]
fn the_agents_container_holds_an_attacker() {
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let suite = geometry_suite(tmp.path(), &["acme__geometry-9"]);
    let task = protege::tasks::load_suite(&suite).unwrap().remove(0);
    let mut cfg = DockerConfig { pids: 256, memory_mib: 512, ..Default::default() };
    cfg.limits.timeout_s = 5.0;
    cfg.limits.file_mib = 20;
    cfg.limits.work_tree_mib = 50;
    let exec = DockerExecutor::connect(cfg).unwrap();
    let ws = exec.create(&task, "attack").unwrap();
    let run = |c: &str| ws.run(c).unwrap();

    // The activated environment of the official images.
    assert!(run("echo $CONDA_DEFAULT_ENV; which python").output.contains("testbed"));
    // No network: only loopback, and nothing reaches out.
    let net =
        run("python3 -c \"import socket; socket.create_connection(('10.0.0.1', 80), 2)\" 2>&1; cat /proc/net/dev");
    assert!(net.output.contains("unreachable") || net.output.contains("Errno"), "{}", net.output);
    assert!(!net.output.contains("eth0"), "{}", net.output);
    // No host paths: the checkout, the docker socket, the host's root.
    let host = run("ls /work /var/run/docker.sock /run/docker.sock 2>&1; ls /");
    assert!(!host.output.contains("Cargo.toml") && host.output.matches("No such file").count() == 3, "{}", host.output);
    // The hidden tests are not in the container.
    assert!(run("ls tests").output.trim() == "test_perimeter.py");
    // A background process dies with its command.
    run("sleep 1000 & echo started");
    let alive = |pat: &str| run(&format!("ps -eo args | grep -v grep | grep -c '{pat}'")).output.trim() != "0";
    assert!(!alive("sleep 1000"), "a background sleep survived its command");
    // A timeout kills the whole tree, children included.
    let t = run("(sleep 100; echo never) & sleep 100");
    assert!(t.timed_out && t.exit_code.is_none());
    assert!(!alive("sleep 100"), "a child of a timed-out command survived");
    // A fork bomb is contained by the pids limit; the container goes on.
    let bomb = run("bomb() { bomb | bomb & }; bomb; sleep 3");
    assert!(bomb.timed_out || bomb.exit_code.is_some());
    assert_eq!(run("echo alive").output.trim(), "alive");
    // Killing everything it can reach (init ignores it; the shell that runs commands is
    // started again) does not end the episode.
    run("kill -9 -1; pkill -9 sleep; kill -TERM 1");
    assert_eq!(run("echo still here").output.trim(), "still here");
    let r = run("kill -9 $PPID; echo gone");
    assert!(r.exit_code.is_none() || r.output.contains("gone"));
    assert_eq!(run("echo back").output.trim(), "back");
    // What a command leaves when it kills the shell dies with it too.
    run("nohup sh -c 'while :; do echo x >> /tmp/s; sleep 0.1; done' >/dev/null 2>&1 & sleep 0.3; kill -9 $PPID");
    let a = run("sleep 0.5; wc -l < /tmp/s").output;
    let b = run("sleep 0.5; wc -l < /tmp/s").output;
    assert_eq!(a, b, "a process outlived the shell it killed");
    // The command's stdin is not the runner's channel.
    assert_eq!(run("cat; echo rc=$?").output.trim(), "rc=0");
    // No capability to change the world around it.
    assert!(run("mknod /tmp/x c 1 3 2>&1; echo rc=$?").output.contains("rc=1"));
    // The patch is taken against the image's HEAD, whatever the agent commits.
    run("sed -i 's/w + h/w * h/' geometry/__init__.py && git -c user.name=a -c user.email=a@b commit -qam x");
    let diff = ws.diff(1 << 20).unwrap();
    assert!(diff.contains("+    return w * h"), "{diff}");
    // Disk: one file is capped (RLIMIT_FSIZE), and writing past the container's allowance
    // anywhere ends the episode as `patch_too_large`.
    let big = run("dd if=/dev/zero of=/tmp/big bs=1M count=30 2>&1; ls -l /tmp/big");
    assert!(big.output.contains(&(20u64 << 20).to_string()), "{}", big.output);
    let e = ws
        .run("rm /tmp/big; for i in 1 2 3; do dd if=/dev/zero of=/root/f$i bs=1M count=19 2>/dev/null; done")
        .unwrap_err();
    assert!(e.downcast_ref::<protege::sandbox::PatchTooLarge>().is_some(), "{e:#}");
    drop(ws);
    assert!(protege_containers().is_empty());
}

/// A docker eval whose one episode runs `sleep 600`, once its container is up.
fn sleeping_eval(tmp: &Path, id: &str) -> (std::process::Child, std::time::Instant) {
    let suite = geometry_suite(tmp, &[id]);
    let call = r#"<tool_call>{"name": "bash", "arguments": {"command": "sleep 600"}}</tool_call>"#;
    std::fs::write(tmp.join("replay.json"), serde_json::json!({ id: [call] }).to_string()).unwrap();
    let child = protege()
        .args(["eval", "--policy", "replay", "--executor", "docker", "--command-timeout", "900"])
        .arg("--replay")
        .arg(tmp.join("replay.json"))
        .arg("--suite")
        .arg(&suite)
        .arg("--out")
        .arg(tmp.join("eval"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while protege_containers().is_empty() {
        assert!(started.elapsed().as_secs() < 60, "no container appeared");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    (child, started)
}

#[test]
fn a_killed_run_leaves_nothing_after_the_next_start() {
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, _) = sleeping_eval(tmp.path(), "acme__geometry-7");
    child.kill().unwrap(); // SIGKILL: nothing of protege's runs after it
    child.wait().unwrap();
    assert!(!protege_containers().is_empty(), "the container should outlive a SIGKILLed run");
    let out = run_ok(protege().args(["docker", "gc"]));
    assert!(out.contains("removed"), "{out}");
    assert!(protege_containers().is_empty(), "left: {:?}", protege_containers());
}

/// The bundled suite as docker tasks: one image per package snapshot (the bug is each task's
/// hidden base patch, folded into HEAD at start), eval scripts in the harness's shape.
fn bundled_docker_suite(tmp: &Path) -> (PathBuf, Vec<protege::tasks::TaskInstance>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tasks");
    let mut tasks = protege::tasks::load_suite(&root.join("train.jsonl")).unwrap();
    tasks.extend(protege::tasks::load_suite(&root.join("test.jsonl")).unwrap());
    let mut bases = std::collections::BTreeMap::new();
    let mut lines = String::new();
    for t in &tasks {
        let pkg = t.env.repo_path.file_name().unwrap().to_string_lossy().to_string();
        let image_name = format!("protege-test-bundled-{pkg}:latest");
        let base = bases.entry(pkg).or_insert_with(|| image(&image_name, &t.env.repo_path)).clone();
        let mut files: Vec<&str> =
            t.fail_to_pass.iter().chain(&t.pass_to_pass).map(|id| id.split("::").next().unwrap()).collect();
        files.sort();
        files.dedup();
        // The hidden tests are new files: nothing to reset (a bare `git checkout BASE` would
        // leave the task's bug, which is folded into HEAD).
        let touched = protege::swebench::script::modified_files(&t.test_patch).join(" ");
        let reset = if touched.is_empty() { String::new() } else { format!("git checkout {base} {touched}") };
        let eval_script = format!(
            "#!/bin/bash\nset -uxo pipefail\nsource /opt/miniconda3/bin/activate\nconda activate testbed\ncd /testbed\n{reset}\ngit apply -v - <<'EOF_114329324912'\n{}\nEOF_114329324912\n: '>>>>> Start Test Output'\npytest -rA -p no:cacheprovider {}\n: '>>>>> End Test Output'\n{reset}\n",
            t.test_patch,
            files.join(" ")
        );
        let mut d = t.clone();
        d.env.executor = Some(protege::executor::ExecutorKind::Docker);
        d.env.image = Some(image_name);
        d.env.eval_script = Some(eval_script);
        d.env.log_parser = Some("parse_log_pytest".into());
        d.env.eval_type = Some(protege::swebench::EvalType::PassAndFail);
        lines += &(serde_json::to_string(&d).unwrap() + "\n");
    }
    let suite = tmp.join("bundled-docker");
    std::fs::create_dir_all(&suite).unwrap();
    std::fs::write(suite.join("tasks.jsonl"), lines).unwrap();
    (suite, tasks)
}

#[test]
fn the_bundled_suite_runs_in_docker_as_locally() {
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (suite, tasks) = bundled_docker_suite(tmp.path());
    // The harness's gold run on all 40: the gold patch resolves, no patch does not.
    let out = run_ok(protege().args(["tasks", "validate"]).arg(&suite).args(["--runs", "1", "--concurrency", "4"]));
    assert!(out.contains("40 of 40 tasks valid"), "{out}");

    // The bug is the base: no diff shows it and no history holds the clean file.
    let dtask = protege::tasks::load_suite(&suite).unwrap().remove(0);
    let exec = DockerExecutor::connect(DockerConfig::default()).unwrap();
    let ws = exec.create(&dtask, "history").unwrap();
    assert_eq!(ws.run("git log --oneline | wc -l").unwrap().output.trim(), "1");
    assert_eq!(ws.run("git status --porcelain; git diff HEAD").unwrap().output.trim(), "");
    assert_eq!(ws.run("git fsck --unreachable --no-reflogs 2>&1 | wc -l").unwrap().output.trim(), "0");
    assert_eq!(ws.diff(1 << 20).unwrap(), "");
    drop(ws);
    drop(exec);

    // Replayed episodes grade the same under both executors: the gold fix, a wrong edit, nothing.
    let mut replay = serde_json::Map::new();
    let picked: Vec<&protege::tasks::TaskInstance> = tasks.iter().step_by(7).collect();
    for (i, t) in picked.iter().enumerate() {
        let apply =
            serde_json::json!({"name": "bash", "arguments": {"command": format!("git apply <<'EOF'\n{}EOF", t.patch)}});
        let wrong = serde_json::json!({"name": "bash", "arguments": {"command": "echo '# touched' >> README.md; ls"}});
        let submit = serde_json::json!({"name": "submit", "arguments": {}});
        let calls = match i % 3 {
            0 => vec![apply, submit],
            1 => vec![wrong, submit],
            _ => vec![submit],
        };
        let replies: Vec<String> = calls.iter().map(|c| format!("<tool_call>{c}</tool_call>")).collect();
        replay.insert(t.instance_id.clone(), serde_json::json!(replies));
    }
    std::fs::write(tmp.path().join("replay.json"), serde_json::Value::Object(replay).to_string()).unwrap();
    let only: Vec<String> = picked.iter().map(|t| t.instance_id.clone()).collect();
    let mut verdicts = vec![];
    for exec in ["local", "docker"] {
        let out_dir = tmp.path().join(format!("eval-{exec}"));
        run_ok(
            protege()
                .args([
                    "eval",
                    "--policy",
                    "replay",
                    "--executor",
                    exec,
                    "--concurrency",
                    "2",
                    "--tasks",
                    &only.join(","),
                ])
                .arg("--replay")
                .arg(tmp.path().join("replay.json"))
                .arg("--suite")
                .arg(suite.join("tasks.jsonl"))
                .arg("--out")
                .arg(&out_dir),
        );
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
        let v: Vec<(String, bool)> = s["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["task_id"].as_str().unwrap().to_string(), r["resolved"].as_bool().unwrap()))
            .collect();
        let preds = std::fs::read_to_string(out_dir.join("predictions.jsonl")).unwrap();
        assert_eq!(preds.lines().count(), picked.len(), "{preds}");
        verdicts.push(v);
    }
    if verdicts[0] != verdicts[1] {
        // What each executor's grading said about the episodes they disagree on.
        let differ: Vec<&String> =
            verdicts[0].iter().zip(&verdicts[1]).filter(|(a, b)| a != b).map(|(a, _)| &a.0).collect();
        for exec in ["local", "docker"] {
            let trajectories = std::fs::read_to_string(tmp.path().join(format!("eval-{exec}/trajectories.jsonl")));
            for line in trajectories.unwrap_or_default().lines() {
                let t: serde_json::Value = serde_json::from_str(line).unwrap();
                if differ.iter().any(|id| t["task_id"] == id.as_str()) {
                    eprintln!(
                        "{exec} {}: exit {} grade {}",
                        t["task_id"], t["meta"]["exit_status"], t["meta"]["grade"]
                    );
                }
            }
        }
    }
    assert_eq!(verdicts[0], verdicts[1], "local and docker grade the same episodes differently");
    let resolved = verdicts[0].iter().filter(|(_, r)| *r).count();
    assert_eq!(resolved, picked.iter().enumerate().filter(|(i, _)| i % 3 == 0).count(), "{:?}", verdicts[0]);
    assert!(protege_containers().is_empty(), "left: {:?}", protege_containers());
}

#[test]
fn a_terminated_run_removes_its_containers() {
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, started) = sleeping_eval(tmp.path(), "acme__geometry-8");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    assert!(started.elapsed().as_secs() < 60);
    assert!(protege_containers().is_empty(), "left: {:?}", protege_containers());
}

/// A second "host": a unix socket that forwards to the local daemon, and can be killed.
struct Proxy {
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl Proxy {
    fn start(path: PathBuf) -> Proxy {
        use std::os::unix::net::{UnixListener, UnixStream};
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let (s, c) = (stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let daemon = UnixStream::connect("/var/run/docker.sock").unwrap();
                        c.lock().unwrap().extend([client.try_clone().unwrap(), daemon.try_clone().unwrap()]);
                        let (mut c1, mut d1) = (client.try_clone().unwrap(), daemon.try_clone().unwrap());
                        let (mut c2, mut d2) = (client, daemon);
                        // Each direction ends with a half-close, as a TCP proxy passes one on.
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut c1, &mut d1);
                            d1.shutdown(std::net::Shutdown::Write).ok();
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut d2, &mut c2);
                            c2.shutdown(std::net::Shutdown::Write).ok();
                        });
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        });
        Proxy { path, stop, conns }
    }

    /// The host dies: no new connections, the open ones cut.
    fn kill(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        std::fs::remove_file(&self.path).ok();
        for s in self.conns.lock().unwrap().iter() {
            s.shutdown(std::net::Shutdown::Both).ok();
        }
    }
}

#[test]
fn episodes_spread_over_hosts_and_a_dead_host_is_taken_out() {
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let suite = geometry_suite(tmp.path(), &["acme__geometry-6"]);
    let task = protege::tasks::load_suite(&suite).unwrap().remove(0);
    let proxy = Proxy::start(tmp.path().join("docker.sock"));
    let cfg = DockerConfig {
        hosts: vec![
            format!("unix://{}=1", proxy.path.display()),
            "unix:///var/run/docker.sock=1".into(),
            // Nothing listens here: left out at the start with a message.
            "tcp://127.0.0.1:9=2".into(),
        ],
        ..Default::default()
    };
    let exec = DockerExecutor::connect(cfg).unwrap();
    assert_eq!(exec.pool.up(), vec![0, 1]);
    // One slot each: two episodes at once run on both hosts.
    let a = exec.create(&task, "host-a").unwrap();
    let b = exec.create(&task, "host-b").unwrap();
    assert_eq!(a.run("echo a").unwrap().output.trim(), "a");
    assert_eq!(b.run("echo b").unwrap().output.trim(), "b");
    drop((a, b));
    // The first host dies: the next episode tries it, takes it out, and runs on the other.
    proxy.kill();
    for i in 0..3 {
        let ws = exec.create(&task, &format!("after-{i}")).unwrap();
        assert_eq!(ws.run("echo ok").unwrap().output.trim(), "ok");
    }
    assert_eq!(exec.pool.up(), vec![1]);
    drop(exec);
    assert!(protege_containers().is_empty(), "left: {:?}", protege_containers());
}
