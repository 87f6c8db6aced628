//! The Docker executor's costs, side by side with the local bubblewrap sandbox in one run:
//! episode start (container created, started, environment captured, base recorded) on a
//! cached image, per-command overhead (`true`, 50 times), and N episodes at once, each
//! running 10 commands, with the errors counted.
//!
//! `cargo bench --bench docker_executor -- [CONCURRENT]` (default 8). Needs a Docker daemon
//! and `tools/docker_fixture.sh` (builds the image once).

use std::path::Path;
use std::time::Instant;

use protege::executor::docker::{DockerConfig, DockerExecutor};
use protege::executor::Executor;
use protege::sandbox::{best_isolation, Limits, LocalSandbox, Workspace};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() {
    let concurrent: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(8);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut task = protege::tasks::load_suite(&root.join("data/tasks/test.jsonl")).unwrap().remove(0);
    let image = "protege-bench-docker:latest";
    let st = std::process::Command::new(root.join("tools/docker_fixture.sh"))
        .args(["instance", image])
        .arg(&task.env.repo_path)
        .output()
        .expect("tools/docker_fixture.sh");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let local_task = task.clone();
    task.env.executor = Some(protege::executor::ExecutorKind::Docker);
    task.env.image = Some(image.into());
    task.env.eval_script = Some("#!/bin/bash\n".into());
    task.env.log_parser = Some("parse_log_pytest".into());

    let exec = DockerExecutor::connect(DockerConfig::default()).expect("a Docker daemon");
    let scratch = protege::sandbox::scratch::Scratch::new("bench").unwrap();

    // Episode start.
    let mut starts = vec![];
    let mut local_starts = vec![];
    for i in 0..5 {
        let t = Instant::now();
        let ws = exec.create(&task, &format!("start-{i}")).unwrap();
        starts.push(t.elapsed().as_secs_f64());
        drop(ws);
        let t = Instant::now();
        let sb = LocalSandbox::for_task(
            &local_task,
            &scratch.path().join(format!("s{i}")),
            best_isolation(),
            Limits::default(),
            vec![],
        )
        .unwrap();
        local_starts.push(t.elapsed().as_secs_f64());
        drop(sb);
    }
    // Per-command overhead.
    let ws = exec.create(&task, "cmd").unwrap();
    let sb =
        LocalSandbox::for_task(&local_task, &scratch.path().join("cmd"), best_isolation(), Limits::default(), vec![])
            .unwrap();
    let time = |w: &dyn Workspace| {
        (0..50)
            .map(|_| {
                let t = Instant::now();
                w.run("true").unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect::<Vec<_>>()
    };
    let docker_cmd = median(time(ws.as_ref()));
    // The floor: one bare exec of `true` through the API (create, start, attach, inspect).
    let c = exec.container(&task, "floor", false, 60.0).unwrap();
    let floor = median(
        (0..50)
            .map(|_| {
                let t = Instant::now();
                c.exec_raw(&["true"], None, 60.0, 1024).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    drop(c);
    let local_cmd = median(time(&sb));
    drop(ws);
    drop(sb);
    // Concurrent episodes.
    let t = Instant::now();
    let errors = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for i in 0..concurrent {
            let (exec, task, errors) = (&exec, &task, &errors);
            s.spawn(move || {
                let r = (|| -> anyhow::Result<()> {
                    let ws = exec.create(task, &format!("par-{i}"))?;
                    for _ in 0..10 {
                        let o = ws.run("python3 -c 'print(sum(range(100000)))' && ls")?;
                        anyhow::ensure!(o.exit_code == Some(0), "{}", o.output);
                    }
                    ws.diff(1 << 20)?;
                    Ok(())
                })();
                if let Err(e) = r {
                    eprintln!("episode {i}: {e:#}");
                    errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let par = t.elapsed().as_secs_f64();
    println!("| measure | docker | local (bubblewrap) | ratio |\n|---|---|---|---|");
    println!(
        "| episode start (median of 5) | {:.0} ms | {:.0} ms | {:.1}x |",
        1e3 * median(starts.clone()),
        1e3 * median(local_starts.clone()),
        median(starts) / median(local_starts)
    );
    println!(
        "| command `true` (median of 50) | {:.1} ms | {:.1} ms | {:.1}x |",
        1e3 * docker_cmd,
        1e3 * local_cmd,
        docker_cmd / local_cmd
    );
    println!("| bare exec of `true` through the API (the floor) | {:.1} ms | | |", 1e3 * floor);
    println!(
        "| {concurrent} episodes x 10 commands at once | {par:.1} s, {} errors | | |",
        errors.load(std::sync::atomic::Ordering::SeqCst)
    );
}
