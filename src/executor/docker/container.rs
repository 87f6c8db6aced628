//! One container: created from an instance image with an init process, network off unless
//! asked, memory/CPU/pids limits, no capabilities beyond what a root user editing files needs,
//! no new privileges, and labels naming the run; commands by exec; removed when dropped.
//!
//! PID 1 is a small shell init: it reaps orphans and ignores the signals a process inside may
//! send it (docker's own init, tini, exits when its one child dies, so an agent's `pkill sleep`
//! would stop the container); `docker rm -f` kills it at once.
//!
//! The agent's commands go to one long-lived bash per container (the runner, an exec with
//! stdin attached): starting an exec per command costs the engine ~60 ms here, a line to the
//! runner a few. Each command runs as `bash -c` in the work directory with the image's
//! environment activated as the harness does (the conda `testbed` env, captured once at start),
//! stdin from /dev/null, stdout and stderr as one ordered stream cut to head + tail, and ends
//! with a line holding a random nonce and its exit code. When a command ends, every process it
//! left behind is killed (all processes but init and the runner are stopped, then killed); on
//! its timeout a second exec does the same, so a whole process tree dies — an exec cannot be
//! killed through the API. A runner that dies is started again for the next command.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::hosts::{host_failure, Lease, Pool};
use super::Labels;
use crate::sandbox::output::HeadTail;
use crate::sandbox::{CmdOutput, PatchTooLarge, PathKind, Workspace};

/// The conda activation of the official images; harmless where it is missing.
const ACTIVATE: &str =
    "if [ -f /opt/miniconda3/bin/activate ]; then . /opt/miniconda3/bin/activate && conda activate testbed; fi";

/// git as protege runs it in a container: no fsmonitor or hooks (a repository's config could
/// name programs), no mode noise.
const SAFE_GIT: &str = "git -c core.fileMode=false -c core.fsmonitor=false -c core.hooksPath=/dev/null";

/// Capabilities kept: what root needs to own, edit and signal its own files and processes.
const CAPS: [&str; 7] = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID"];

/// PID 1: reaps every child (orphans included) while it waits; signals from inside are
/// ignored (SIGKILL cannot reach a namespace's init from inside).
const INIT: &str = "trap '' TERM INT HUP QUIT USR1 USR2; while :; do sleep 2147483647 & wait; done";

/// A shell snippet that kills every process of the container but init, `spare` and itself:
/// all are stopped first, so that nothing can fork while the list is walked (a fork bomb
/// included); `spare` is continued.
fn killer(spare: u32) -> String {
    let cont = if spare > 0 { format!("; kill -CONT {spare} 2>/dev/null") } else { String::new() };
    format!(
        "kill -STOP -1 2>/dev/null; for p in /proc/[0-9]*; do p=${{p#/proc/}}; case $p in 1|{spare}|$$) ;; *) kill -9 $p 2>/dev/null;; esac; done{cont}"
    )
}

/// The runner's loop: a header line `NONCE`, the command's lines, `NONCE` again; the command
/// runs, its leftovers are killed, `\nNONCE RC\n` ends its output.
fn runner_script(workdir: &str) -> String {
    format!(
        r#"exec 3>&1; echo "ready $$"
while IFS= read -r nonce; do
  cmd=""; while IFS= read -r line; do [ "$line" = "$nonce" ] && break; cmd+="$line"$'\n'; done
  ( cd {wd} 2>/dev/null; exec /bin/bash -c "$cmd" ) </dev/null >&3 2>&3
  rc=$?
  {kill}
  printf '\n%s %d\n' "$nonce" "$rc"
done"#,
        wd = crate::sandbox::shell_quote(workdir),
        kill = killer(0)
    )
}

/// The runner of one container: its pid, and the exec's streams.
struct Runner {
    pid: u32,
    output: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
    input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
}

/// How a container is made.
#[derive(Debug, Clone)]
pub struct Spec {
    pub image: String,
    pub workdir: String,
    pub network: bool,
    pub memory_mib: u64,
    pub cpus: f64,
    pub pids: i64,
    /// Largest file a process may write, MiB (0: no limit).
    pub file_mib: u64,
    /// How much the container's writable layer may grow, MiB (0: no limit).
    pub disk_mib: u64,
    pub labels: HashMap<String, String>,
}

/// A changed path with lines added and removed (`None` for binary files).
pub type Change = (String, Option<u64>, Option<u64>);

/// Raw result of one exec.
pub struct ExecOut {
    pub stdout: HeadTail,
    pub stderr: HeadTail,
    pub exit_code: Option<i64>,
    pub timed_out: bool,
    pub interrupted: bool,
    pub seconds: f64,
}

pub struct Container<'p> {
    pool: &'p Pool,
    lease: Option<Lease<'p>>,
    rt: &'p tokio::runtime::Runtime,
    pub id: String,
    pub workdir: String,
    /// The activated environment, `KEY=VALUE`.
    env: Vec<String>,
    /// The commit the agent's patch is taken against.
    pub base: String,
    /// The agent's shell (started on first use, again after it dies).
    runner: std::sync::Mutex<Option<Runner>>,
    pub timeout_s: f64,
    pub output_bytes: usize,
    /// Growth allowed to the writable layer, bytes (0: unchecked).
    disk_bytes: u64,
    /// The writable layer's size at the base.
    base_disk: u64,
}

impl<'p> Container<'p> {
    /// Creates and starts a container on a leased host.
    pub fn start(
        pool: &'p Pool,
        lease: Lease<'p>,
        rt: &'p tokio::runtime::Runtime,
        spec: &Spec,
        timeout_s: f64,
        output_bytes: usize,
    ) -> Result<Self> {
        let host = &pool.hosts[lease.host];
        let docker = host.docker.clone();
        let config = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), INIT.into()]),
            entrypoint: Some(vec![]),
            working_dir: Some(spec.workdir.clone()),
            labels: Some(spec.labels.clone()),
            network_disabled: Some(!spec.network),
            host_config: Some(HostConfig {
                init: Some(false),
                network_mode: Some(if spec.network { "bridge".into() } else { "none".into() }),
                memory: (spec.memory_mib > 0).then_some((spec.memory_mib << 20) as i64),
                memory_swap: (spec.memory_mib > 0).then_some((spec.memory_mib << 20) as i64),
                nano_cpus: (spec.cpus > 0.0).then_some((spec.cpus * 1e9) as i64),
                pids_limit: (spec.pids > 0).then_some(spec.pids),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(CAPS.iter().map(|c| c.to_string()).collect()),
                security_opt: Some(vec!["no-new-privileges".into()]),
                // Largest file a process may write (as locally); the container's whole writable
                // layer is checked after every command.
                ulimits: (spec.file_mib > 0).then(|| {
                    let bytes = (spec.file_mib << 20) as i64;
                    vec![bollard::models::ResourcesUlimits {
                        name: Some("fsize".into()),
                        soft: Some(bytes),
                        hard: Some(bytes),
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("protege-{}", spec.labels.get(Labels::EPISODE).cloned().unwrap_or_default());
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = rt.block_on(docker.create_container(Some(opts), config));
        let id = match created {
            Ok(c) => c.id,
            Err(e) => {
                if host_failure(&e) {
                    pool.take_out(lease.host, &e.to_string());
                }
                return Err(e)
                    .with_context(|| format!("cannot create a container from {} on {}", spec.image, host.spec.url));
            }
        };
        let mut c = Container {
            pool,
            lease: Some(lease),
            rt,
            id,
            workdir: spec.workdir.clone(),
            env: vec![],
            base: String::new(),
            runner: std::sync::Mutex::new(None),
            disk_bytes: spec.disk_mib << 20,
            base_disk: 0,
            timeout_s,
            output_bytes,
        };
        rt.block_on(docker.start_container(&c.id, None)).with_context(|| format!("cannot start container {name}"))?;
        // The activated environment, once: the activation costs more than most commands.
        let env =
            c.exec_raw(&["/bin/bash", "-c", &format!("{ACTIVATE} >/dev/null 2>&1; env -0")], None, 60.0, 1 << 20)?;
        let (text, _) = env.stdout.finish();
        c.env =
            text.split('\0').filter(|kv| kv.contains('=') && !kv.starts_with("_=")).map(|s| s.to_string()).collect();
        Ok(c)
    }

    fn docker(&self) -> &bollard::Docker {
        &self.pool.hosts[self.lease.as_ref().expect("leased").host].docker
    }

    /// Runs `cmd` (argv) with `stdin`, collecting stdout and stderr apart.
    pub fn exec_raw(&self, cmd: &[&str], stdin: Option<&[u8]>, timeout_s: f64, cap: usize) -> Result<ExecOut> {
        self.exec_with(cmd, stdin, timeout_s, cap, &[])
    }

    /// Runs `cmd` with `extra` (`KEY=VALUE`) over the activated environment.
    pub fn exec_env(&self, cmd: &[&str], extra: &[String], timeout_s: f64, cap: usize) -> Result<ExecOut> {
        self.exec_with(cmd, None, timeout_s, cap, extra)
    }

    /// A variable of the activated environment.
    pub fn env_var(&self, key: &str) -> Option<String> {
        self.env.iter().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(|v| v.to_string()))
    }

    fn exec_with(
        &self,
        cmd: &[&str],
        stdin: Option<&[u8]>,
        timeout_s: f64,
        cap: usize,
        extra_env: &[String],
    ) -> Result<ExecOut> {
        let docker = self.docker().clone();
        let started = Instant::now();
        let opts = CreateExecOptions {
            cmd: Some(cmd.iter().map(|s| s.to_string()).collect::<Vec<String>>()),
            env: Some(self.env.iter().chain(extra_env).cloned().collect()),
            attach_stdin: Some(stdin.is_some()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            working_dir: Some(self.workdir.clone()),
            ..Default::default()
        };
        let id = self.id.clone();
        let stdin = stdin.map(|s| s.to_vec());
        self.rt.block_on(async move {
            let exec = docker.create_exec(&id, opts).await.with_context(|| format!("exec in container {id}"))?;
            let started_exec = docker.start_exec(&exec.id, Some(StartExecOptions::default())).await?;
            let StartExecResults::Attached { mut output, mut input } = started_exec else {
                bail!("exec started detached");
            };
            if let Some(data) = stdin {
                input.write_all(&data).await?;
                input.shutdown().await?;
            }
            drop(input);
            let mut out = ExecOut {
                stdout: HeadTail::new(cap),
                stderr: HeadTail::new(cap),
                exit_code: None,
                timed_out: false,
                interrupted: false,
                seconds: 0.0,
            };
            let mut watch = Watch::new(timeout_s);
            loop {
                let tick = tokio::time::sleep(Duration::from_millis(200));
                tokio::select! {
                    item = output.next() => match item {
                        Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => out.stdout.push(&message),
                        Some(Ok(LogOutput::StdErr { message })) => out.stderr.push(&message),
                        Some(Ok(LogOutput::StdIn { .. })) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => break,
                    },
                    _ = tick => watch.check(&mut out, &docker, &id, 0).await,
                }
            }
            let info = docker.inspect_exec(&exec.id).await?;
            out.exit_code = info.exit_code;
            out.seconds = started.elapsed().as_secs_f64();
            Ok(out)
        })
    }

    /// Runs a shell script in the work directory, output merged; processes left behind die.
    pub fn shell(&self, script: &str, timeout_s: f64, cap: usize) -> Result<ExecOut> {
        // `$1` is the command; the wrapper outlives it only to kill what it left.
        let wrapper = format!("exec 2>&1 </dev/null; /bin/bash -c \"$1\"; rc=$?; {}; exit $rc", killer(0));
        self.exec_raw(&["/bin/bash", "-c", &wrapper, "protege", script], None, timeout_s, cap)
    }

    /// Starts the runner (an attached exec of bash) and waits for its `ready PID` line.
    async fn start_runner(docker: &bollard::Docker, id: &str, env: Vec<String>, workdir: &str) -> Result<Runner> {
        let opts = CreateExecOptions {
            cmd: Some(vec!["/bin/bash".to_string(), "-c".to_string(), runner_script(workdir)]),
            env: Some(env),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            working_dir: Some(workdir.to_string()),
            ..Default::default()
        };
        let exec = docker.create_exec(id, opts).await?;
        let StartExecResults::Attached { mut output, input } = docker.start_exec(&exec.id, None).await? else {
            bail!("the runner started detached");
        };
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            match tokio::time::timeout(Duration::from_secs(30), output.next()).await {
                Ok(Some(Ok(LogOutput::StdOut { message }))) => line.extend_from_slice(&message),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) | Err(_) => bail!("the container's shell did not start (is /bin/bash in the image?)"),
            }
        }
        let text = String::from_utf8_lossy(&line);
        let pid = text.trim().strip_prefix("ready ").and_then(|p| p.parse().ok()).context("the runner's first line")?;
        Ok(Runner { pid, output, input })
    }

    /// Runs `command` through the runner (see the module docs).
    fn run_in_runner(&self, command: &str) -> Result<ExecOut> {
        let mut guard = self.runner.lock().expect("lock");
        let docker = self.docker().clone();
        let (id, env, workdir) = (self.id.clone(), self.env.clone(), self.workdir.clone());
        let (timeout_s, cap) = (self.timeout_s, self.output_bytes);
        let started = Instant::now();
        self.rt.block_on(async move {
            if guard.is_none() {
                *guard = Some(Self::start_runner(&docker, &id, env, &workdir).await?);
            }
            let r = guard.as_mut().expect("runner");
            let nonce = format!("protege-{:016x}", rand::random::<u64>());
            let mut msg = format!("{nonce}\n{command}");
            if !command.ends_with('\n') {
                msg.push('\n');
            }
            msg += &format!("{nonce}\n");
            // A stopped runner must not hang the episode: the write has the command's deadline.
            let write = async {
                r.input.write_all(msg.as_bytes()).await?;
                r.input.flush().await
            };
            if tokio::time::timeout(Duration::from_secs_f64(timeout_s.max(1.0)), write).await.is_err() {
                kill_all(&docker, &id, 0).await;
                *guard = None;
                bail!("the container's shell did not take the command (stopped?); it was killed");
            }
            let marker = format!("\n{nonce} ");
            let keep = marker.len() + 24;
            let mut out = ExecOut {
                stdout: HeadTail::new(cap),
                stderr: HeadTail::new(1 << 12),
                exit_code: None,
                timed_out: false,
                interrupted: false,
                seconds: 0.0,
            };
            let mut pend: Vec<u8> = Vec::new();
            let mut watch = Watch::new(timeout_s);
            loop {
                let tick = tokio::time::sleep(Duration::from_millis(200));
                tokio::select! {
                    item = r.output.next() => match item {
                        Some(Ok(LogOutput::StdOut { message })) => {
                            pend.extend_from_slice(&message);
                            if let Some(at) = find(&pend, marker.as_bytes()) {
                                let rest = &pend[at + marker.len()..];
                                if let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                                    out.exit_code = std::str::from_utf8(&rest[..nl]).ok().and_then(|c| c.parse().ok());
                                    out.stdout.push(&pend[..at]);
                                    break;
                                }
                                continue;
                            }
                            if pend.len() > keep {
                                let cut = pend.len() - keep;
                                out.stdout.push(&pend[..cut]);
                                pend.drain(..cut);
                            }
                        }
                        Some(Ok(LogOutput::StdErr { message })) => out.stderr.push(&message),
                        Some(Ok(_)) => {}
                        // The runner died (killed by the command, or the container went): what came
                        // is the output; the next command starts a new runner.
                        Some(Err(_)) | None => {
                            out.stdout.push(&pend);
                            // What the command left must not outlive it (nor the next runner).
                            kill_all(&docker, &id, 0).await;
                            *guard = None;
                            break;
                        }
                    },
                    _ = tick => watch.check(&mut out, &docker, &id, r.pid).await,
                }
            }
            out.seconds = started.elapsed().as_secs_f64();
            Ok(out)
        })
    }

    /// Writes `data` to an absolute path in the container.
    pub fn put(&self, path: &str, data: &[u8]) -> Result<()> {
        let out = self.exec_raw(
            &["/bin/sh", "-c", "mkdir -p -- \"$(dirname -- \"$1\")\" && cat > \"$1\"", "sh", path],
            Some(data),
            60.0,
            1 << 16,
        )?;
        if out.exit_code != Some(0) {
            bail!("cannot write {path} in the container: {}", out.stderr.finish().0.trim());
        }
        Ok(())
    }

    fn rel(&self, rel: &Path) -> String {
        format!("{}/{}", self.workdir.trim_end_matches('/'), rel.display())
    }

    /// Records the commit the agent's patch is taken against (the image's HEAD, after the
    /// task's hidden base patch when it has one).
    pub fn record_base(&mut self, base_patch: Option<&str>) -> Result<()> {
        if let Some(p) = base_patch.filter(|p| !p.trim().is_empty()) {
            self.put("/tmp/.protege-base.diff", p.as_bytes())?;
            // The history starts over at the buggy tree: the fix is the bug's reverse, and the
            // clean file would be one `git show HEAD~1:FILE` (or an unreachable object) away.
            let script = "git apply /tmp/.protege-base.diff && rm -f /tmp/.protege-base.diff \
                && rm -rf .git && git init -q && git add -A \
                && git -c user.name=protege -c user.email=protege@localhost commit -qm base";
            let out = self.shell(script, 300.0, 1 << 16)?;
            if out.exit_code != Some(0) {
                bail!("the task's base patch does not apply in the image: {}", out.stdout.finish().0.trim());
            }
        }
        let out = self.exec_raw(&["/bin/sh", "-c", &format!("{SAFE_GIT} rev-parse HEAD")], None, 60.0, 1 << 12)?;
        let (sha, _) = out.stdout.finish();
        if out.exit_code != Some(0) || sha.trim().len() < 7 {
            bail!("{} is not a git repository in the image: {}", self.workdir, out.stderr.finish().0.trim());
        }
        self.base = sha.trim().to_string();
        if self.disk_bytes > 0 {
            self.base_disk = self.disk_used()?;
        }
        Ok(())
    }

    /// Bytes in the container's writable layer (what it wrote beyond its image).
    fn disk_used(&self) -> Result<u64> {
        let opts = bollard::query_parameters::InspectContainerOptions { size: true };
        let info = self.rt.block_on(self.docker().inspect_container(&self.id, Some(opts)))?;
        Ok(info.size_rw.unwrap_or(0).max(0) as u64)
    }

    /// Paths changed against the base (committed, staged, unstaged, untracked), with lines
    /// added and removed (`None` for binary files).
    pub fn changes(&self) -> Result<Vec<Change>> {
        let script = format!(
            "set -e; G='{SAFE_GIT}'; export GIT_INDEX_FILE=$(mktemp); cp .git/index \"$GIT_INDEX_FILE\" 2>/dev/null || true; \
             $G add -A >/dev/null; \
             $G -c core.quotepath=off diff --cached --numstat -z --no-renames {}; rm -f \"$GIT_INDEX_FILE\"",
            self.base
        );
        let out = self.exec_raw(&["/bin/bash", "-c", &script], None, 300.0, 64 << 20)?;
        let (text, _) = out.stdout.finish();
        if out.exit_code != Some(0) {
            bail!("git numstat in the container failed: {}", out.stderr.finish().0.trim());
        }
        Ok(text
            .split('\0')
            .filter(|r| !r.is_empty())
            .filter_map(|r| {
                let mut f = r.splitn(3, '\t');
                let (a, d, p) = (f.next()?, f.next()?, f.next()?);
                Some((p.to_string(), a.parse().ok(), d.parse().ok()))
            })
            .collect())
    }

    /// Puts `rel` back as at the base (removed when the base has no such path).
    pub fn restore(&self, rel: &str) -> Result<()> {
        let script = format!(
            "if {SAFE_GIT} cat-file -e \"$1:$2\" 2>/dev/null; then rm -rf -- \"$2\"; {SAFE_GIT} checkout -q \"$1\" -- \"$2\"; else rm -rf -- \"$2\"; fi"
        );
        let out = self.exec_raw(&["/bin/bash", "-c", &script, "restore", &self.base, rel], None, 60.0, 1 << 16)?;
        if out.exit_code != Some(0) {
            bail!("cannot restore {rel}: {}", out.stderr.finish().0.trim());
        }
        Ok(())
    }
}

/// A command's deadline and the run's stop request: on either, the command's processes are
/// killed once (sparing `spare`) and the output says why.
struct Watch {
    deadline: tokio::time::Instant,
    killed: bool,
}

impl Watch {
    fn new(timeout_s: f64) -> Self {
        Self { deadline: tokio::time::Instant::now() + Duration::from_secs_f64(timeout_s.max(0.001)), killed: false }
    }

    async fn check(&mut self, out: &mut ExecOut, docker: &bollard::Docker, id: &str, spare: u32) {
        let over = tokio::time::Instant::now() >= self.deadline;
        let stop = crate::interrupt::requested();
        if (over || stop) && !self.killed {
            out.timed_out = over;
            out.interrupted = stop && !over;
            self.killed = true;
            kill_all(docker, id, spare).await;
        }
    }
}

/// Where `needle` starts in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Kills every process in the container but its init, `spare` and the killer itself.
async fn kill_all(docker: &bollard::Docker, id: &str, spare: u32) {
    let opts = CreateExecOptions::<String> {
        cmd: Some(vec!["/bin/sh".into(), "-c".into(), killer(spare)]),
        user: Some("root".into()),
        ..Default::default()
    };
    if let Ok(e) = docker.create_exec(id, opts).await {
        let _ = docker.start_exec(&e.id, Some(StartExecOptions { detach: true, ..Default::default() })).await;
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let docker = self.docker().clone();
        let opts = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        let id = self.id.clone();
        if let Err(e) = self.rt.block_on(docker.remove_container(&id, Some(opts))) {
            eprintln!("could not remove container {id}: {e} (`protege docker gc` removes it)");
        }
        self.lease.take();
    }
}

impl Workspace for Container<'_> {
    fn workdir(&self) -> String {
        self.workdir.clone()
    }

    fn run(&self, command: &str) -> Result<CmdOutput> {
        let out = self.run_in_runner(command)?;
        // Anything written anywhere in the container lands on the host's disk: bounded as the
        // local work tree is (the episode ends `patch_too_large`).
        if self.disk_bytes > 0 {
            let grown = self.disk_used()?.saturating_sub(self.base_disk);
            if grown > self.disk_bytes {
                return Err(PatchTooLarge {
                    what: "bytes written in the container",
                    amount: grown,
                    limit: self.disk_bytes,
                }
                .into());
            }
        }
        let (output, dropped_bytes) = out.stdout.finish();
        Ok(CmdOutput {
            output,
            exit_code: if out.timed_out || out.interrupted { None } else { out.exit_code.map(|c| c as i32) },
            timed_out: out.timed_out,
            dropped_bytes,
            seconds: out.seconds,
            interrupted: out.interrupted,
        })
    }

    fn read(&self, rel: &Path) -> Result<Vec<u8>> {
        let path = self.rel(rel);
        let out = self.exec_raw(&["cat", "--", &path], None, 60.0, 64 << 20)?;
        if out.exit_code != Some(0) {
            bail!("cannot read {}: {}", rel.display(), out.stderr.finish().0.trim());
        }
        let (text, dropped) = out.stdout.finish();
        if dropped > 0 {
            bail!("{} is larger than 64 MiB", rel.display());
        }
        Ok(text.into_bytes())
    }

    fn write(&self, rel: &Path, data: &[u8]) -> Result<()> {
        self.put(&self.rel(rel), data)
    }

    fn kind(&self, rel: &Path) -> Result<PathKind> {
        let script = "if [ -d \"$1\" ]; then echo d; elif [ -e \"$1\" ]; then echo f; else echo m; fi";
        let out = self.exec_raw(&["/bin/sh", "-c", script, "sh", &self.rel(rel)], None, 60.0, 64)?;
        Ok(match out.stdout.finish().0.trim() {
            "d" => PathKind::Dir,
            "f" => PathKind::File,
            _ => PathKind::Missing,
        })
    }

    fn remove(&self, rel: &Path) -> Result<()> {
        let out = self.exec_raw(&["rm", "-f", "--", &self.rel(rel)], None, 60.0, 1 << 12)?;
        if out.exit_code != Some(0) {
            bail!("cannot remove {}: {}", rel.display(), out.stderr.finish().0.trim());
        }
        Ok(())
    }

    fn diff(&self, max_bytes: u64) -> Result<String> {
        // A private index: the agent's own staging area is left as it was; its git
        // configuration cannot run programs or reshape the diff.
        let script = format!(
            "set -e; G='{SAFE_GIT}'; export GIT_INDEX_FILE=$(mktemp); cp .git/index \"$GIT_INDEX_FILE\" 2>/dev/null || true; \
             $G add -A >/dev/null; \
             $G -c diff.noprefix=false -c diff.mnemonicPrefix=false diff --cached --binary --no-color --no-ext-diff --no-textconv {}; \
             rm -f \"$GIT_INDEX_FILE\"",
            self.base
        );
        let cap = (max_bytes as usize).saturating_add(1).min(usize::MAX / 4);
        let out = self.exec_raw(&["/bin/bash", "-c", &script], None, 300.0, cap.saturating_mul(2))?;
        let (text, dropped) = out.stdout.finish();
        if out.exit_code != Some(0) {
            bail!("git diff in the container failed: {}", out.stderr.finish().0.trim());
        }
        let size = (text.len() + dropped) as u64;
        if size > max_bytes {
            return Err(PatchTooLarge { what: "patch bytes", amount: size, limit: max_bytes }.into());
        }
        Ok(text)
    }
}
