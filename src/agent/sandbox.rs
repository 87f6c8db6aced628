//! Where an episode's commands run: a fresh copy of the task's repository, under bubblewrap
//! when it works on this machine (no network, only the work tree and a private /tmp writable,
//! everything else read-only, the hidden paths masked), else as a plain subprocess with the
//! same limits and a loud warning.
//!
//! Every command gets a wall-clock timeout that kills its whole process tree (bubblewrap: the
//! command's PID namespace dies with it; plain: its process group), CPU-time, address-space and
//! file-size limits, and its merged stdout/stderr is cut to a head and a tail with a marker.
//! [`Executor`] is what the tools see, so a docker executor (SWE-bench images) can stand in.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Environment variables commands inherit; everything else is dropped.
const ENV_ALLOWED: [&str; 14] = [
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "PYENV_ROOT",
    "PYENV_VERSION",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "PYTHONPATH",
];

/// Where the work tree appears inside the bubblewrap sandbox.
pub const SANDBOX_REPO: &str = "/repo";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock seconds per command.
    pub timeout_s: f64,
    /// CPU seconds per process.
    pub cpu_s: u64,
    /// Address space per process, MiB.
    pub memory_mib: u64,
    /// Largest file a command may write, MiB.
    pub file_mib: u64,
    /// Bytes of output kept (half from the head, half from the tail).
    pub output_bytes: usize,
    /// Processes of the user (RLIMIT_NPROC): stops a fork bomb early. The kernel does not
    /// apply it to root, where the timeout alone ends one.
    pub max_processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_s: 60.0,
            cpu_s: 120,
            memory_mib: 4096,
            file_mib: 256,
            output_bytes: 16 * 1024,
            max_processes: 4096,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CmdOutput {
    /// Merged stdout and stderr, truncated to the limit with a marker in the middle.
    pub output: String,
    /// `None` when killed by a signal (the timeout included).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Output bytes dropped by the truncation.
    pub dropped_bytes: usize,
    pub seconds: f64,
}

/// Runs commands and edits files in one episode's work tree.
pub trait Executor: Send + Sync {
    /// The work tree's path as commands (and so the agent) see it.
    fn workdir(&self) -> String;
    /// Runs `bash -c command` in the work tree.
    fn run(&self, command: &str) -> Result<CmdOutput>;
    /// Reads a file given relative to the work tree (already confined by the caller).
    fn read(&self, rel: &Path) -> Result<Vec<u8>>;
    /// Writes a file relative to the work tree, creating parent directories.
    fn write(&self, rel: &Path, data: &[u8]) -> Result<()>;
    /// Whether `rel` is a directory, a file, or missing.
    fn kind(&self, rel: &Path) -> Result<PathKind>;
    /// Deletes a file relative to the work tree.
    fn remove(&self, rel: &Path) -> Result<()>;
    /// The work tree's changes against the task's base, as a git patch.
    fn diff(&self) -> Result<String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Dir,
    File,
    Missing,
}

/// How commands are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    Bubblewrap,
    Plain,
}

/// Whether bubblewrap runs here (installed and allowed to create namespaces); probed once.
pub fn bubblewrap_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        Command::new("bwrap")
            .args(["--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "--die-with-parent", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The best isolation available, warning loudly (once) when it is not bubblewrap.
pub fn best_isolation() -> Isolation {
    static WARNED: OnceLock<()> = OnceLock::new();
    if bubblewrap_works() {
        return Isolation::Bubblewrap;
    }
    WARNED.get_or_init(|| {
        eprintln!(
            "WARNING: bubblewrap (bwrap) is not available or cannot create namespaces here: agent commands run \
             as plain subprocesses WITH network access and read access to the whole machine, hidden tests \
             included. Install bubblewrap (Debian: apt-get install bubblewrap) for real isolation."
        )
    });
    Isolation::Plain
}

/// A work tree on this machine: a copy of a repository snapshot committed as the base.
pub struct LocalSandbox {
    root: PathBuf,
    /// The harness's own repository of the work tree (outside it).
    harness_git: PathBuf,
    isolation: Isolation,
    limits: Limits,
    /// Host paths masked inside the sandbox (the task suite, other episodes, run outputs).
    hidden: Vec<PathBuf>,
    /// Host paths made visible read-only even where a mask covers them (a task's venv).
    pub visible: Vec<PathBuf>,
}

impl LocalSandbox {
    /// Copies `snapshot` into `root` (which must not exist), runs the task's `setup` commands
    /// in the sandbox, and records the result as the base twice: in a repository inside the work
    /// tree for the agent's own `git` use, and in a harness repository beside it (never visible
    /// in the sandbox) that [`Executor::diff`] reads, so that nothing the agent does to its
    /// `.git` (hooks, filters, config) runs on the host.
    pub fn create(
        snapshot: &Path,
        root: &Path,
        isolation: Isolation,
        limits: Limits,
        hidden: Vec<PathBuf>,
        setup: &[String],
    ) -> Result<Self> {
        Self::create_with(snapshot, None, root, isolation, limits, hidden, setup, vec![])
    }

    /// The work tree of a task: its snapshot, its `base_patch` (generated tasks) and setup.
    pub fn for_task(
        task: &crate::tasks::TaskInstance,
        root: &Path,
        isolation: Isolation,
        limits: Limits,
        hidden: Vec<PathBuf>,
    ) -> Result<Self> {
        let e = &task.env;
        let visible = e.venv.iter().cloned().collect();
        Self::create_with(&e.repo_path, e.base_patch.as_deref(), root, isolation, limits, hidden, &e.setup, visible)
    }

    /// [`LocalSandbox::create`] with a base patch and paths kept visible.
    pub fn create_with(
        snapshot: &Path,
        base_patch: Option<&str>,
        root: &Path,
        isolation: Isolation,
        limits: Limits,
        hidden: Vec<PathBuf>,
        setup: &[String],
        visible: Vec<PathBuf>,
    ) -> Result<Self> {
        if root.exists() {
            bail!("work tree {} already exists", root.display());
        }
        copy_tree(snapshot, root).with_context(|| format!("copying {} to {}", snapshot.display(), root.display()))?;
        if root.join(".git").exists() {
            std::fs::remove_dir_all(root.join(".git"))?;
        }
        if let Some(p) = base_patch.filter(|p| !p.trim().is_empty()) {
            apply_patch(root, p, "the task's base_patch")?;
        }
        let root = root.canonicalize()?;
        let harness_git = harness_git_dir(&root);
        let sandbox = Self { root, harness_git, isolation, limits, hidden, visible };
        for c in setup {
            let out = sandbox.run(c)?;
            if out.exit_code != Some(0) {
                bail!("setup command {c:?} failed:\n{}", out.output);
            }
        }
        let commit = [
            "-c",
            "user.name=protege",
            "-c",
            "user.email=protege@localhost",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "base",
        ];
        git(&sandbox.root, &["init", "-q"])?;
        git(&sandbox.root, &["add", "-A"])?;
        git(&sandbox.root, &commit)?;
        sandbox.harness_git(&["init", "-q"])?;
        sandbox.harness_git(&["add", "-A"])?;
        sandbox.harness_git(&commit)?;
        Ok(sandbox)
    }

    /// Runs git on the harness repository (work tree = the sandbox's), with every hook, filter
    /// and monitor the work tree could name switched off.
    fn harness_git(&self, args: &[&str]) -> Result<String> {
        let git_dir = format!("--git-dir={}", self.harness_git.display());
        let work_tree = format!("--work-tree={}", self.root.display());
        let mut all =
            vec![git_dir.as_str(), work_tree.as_str(), "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null"];
        all.extend_from_slice(args);
        git(&self.root, &all)
    }

    /// Deletes the work tree and the harness repository beside it.
    pub fn discard(self) {
        discard(&self.root);
    }

    pub fn host_root(&self) -> &Path {
        &self.root
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    fn command(&self, script: &str) -> Command {
        let mut cmd = match self.isolation {
            Isolation::Plain => {
                let mut c = Command::new("bash");
                c.current_dir(&self.root);
                c
            }
            Isolation::Bubblewrap => {
                let mut c = Command::new("bwrap");
                // An empty root with the host's top-level directories read-only, so that the
                // work tree can sit at a fixed path.
                for e in std::fs::read_dir("/").into_iter().flatten().flatten() {
                    let p = e.path();
                    let name = p.to_string_lossy().to_string();
                    if ["/proc", "/dev", "/tmp", "/sys", "/repo"].contains(&name.as_str()) {
                        continue;
                    }
                    match std::fs::read_link(&p) {
                        Ok(target) => c.arg("--symlink").arg(target).arg(&p),
                        Err(_) => c.arg("--ro-bind").arg(&p).arg(&p),
                    };
                }
                c.args(["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]);
                // /run holds sockets (docker, dbus) that read-only does not protect; the home
                // directory holds credentials. Only the tool directories on PATH stay visible.
                if Path::new("/run").is_dir() {
                    c.args(["--tmpfs", "/run"]);
                }
                if let Some(home) =
                    std::env::var_os("HOME").map(PathBuf::from).filter(|h| h.is_dir() && h != Path::new("/"))
                {
                    c.arg("--tmpfs").arg(&home);
                    for keep in home_tool_dirs(&home) {
                        c.arg("--ro-bind").arg(&keep).arg(&keep);
                    }
                }
                for h in &self.hidden {
                    if h.is_dir() && !h.starts_with("/tmp") {
                        c.arg("--tmpfs").arg(h);
                    } else if h.is_file() {
                        c.arg("--ro-bind").arg("/dev/null").arg(h);
                    }
                }
                for v in &self.visible {
                    c.arg("--ro-bind").arg(v).arg(v);
                }
                c.arg("--bind").arg(&self.root).arg(SANDBOX_REPO);
                c.args(["--chdir", SANDBOX_REPO, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]);
                c.args(["--die-with-parent", "--new-session", "--", "bash"]);
                c
            }
        };
        cmd.arg("-c").arg(script);
        // Only an allowlist of the environment reaches commands (no API keys or tokens).
        cmd.env_clear();
        for (k, v) in std::env::vars_os() {
            if ENV_ALLOWED.contains(&k.to_string_lossy().as_ref()) {
                cmd.env(k, v);
            }
        }
        cmd.env("PAGER", "cat").env("GIT_PAGER", "cat").env("TERM", "dumb").env("PYTHONDONTWRITEBYTECODE", "1");
        cmd
    }

    fn confine(&self, rel: &Path) -> Result<PathBuf> {
        let joined = self.root.join(rel);
        // The deepest existing ancestor (a dangling symlink counts as existing) must resolve
        // inside the work tree: no escape through symlinks.
        let mut probe = joined.as_path();
        while probe.symlink_metadata().is_err() {
            probe = probe.parent().context("path has no existing ancestor")?;
        }
        let resolved = probe.canonicalize().map_err(|_| anyhow::anyhow!("{} is a dangling symlink", rel.display()))?;
        if !resolved.starts_with(&self.root) {
            bail!("{} leaves the work tree", rel.display());
        }
        Ok(joined)
    }
}

/// Largest file the editor reads.
pub const MAX_EDITOR_FILE: u64 = 8 << 20;

impl Executor for LocalSandbox {
    fn workdir(&self) -> String {
        match self.isolation {
            Isolation::Bubblewrap => SANDBOX_REPO.into(),
            Isolation::Plain => self.root.display().to_string(),
        }
    }

    fn run(&self, command: &str) -> Result<CmdOutput> {
        run_limited(self.command(command), &self.limits)
    }

    fn read(&self, rel: &Path) -> Result<Vec<u8>> {
        let path = self.confine(rel)?;
        let meta = std::fs::metadata(&path)?;
        if !meta.is_file() {
            bail!("{} is not a regular file", rel.display());
        }
        if meta.len() > MAX_EDITOR_FILE {
            bail!("{} has {} bytes; the editor reads files up to {MAX_EDITOR_FILE}", rel.display(), meta.len());
        }
        Ok(std::fs::read(path)?)
    }

    fn write(&self, rel: &Path, data: &[u8]) -> Result<()> {
        let path = self.confine(rel)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(std::fs::write(path, data)?)
    }

    fn kind(&self, rel: &Path) -> Result<PathKind> {
        let p = self.confine(rel)?;
        Ok(match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => PathKind::Dir,
            Ok(m) if m.is_file() => PathKind::File,
            Ok(_) => bail!("{} is not a regular file or directory", rel.display()),
            Err(_) if p.symlink_metadata().is_ok() => bail!("{} is a dangling symlink", rel.display()),
            Err(_) => PathKind::Missing,
        })
    }

    fn diff(&self) -> Result<String> {
        self.harness_git(&["add", "-A"])?;
        self.harness_git(&["diff", "--cached", "--binary", "--no-color", "--no-ext-diff", "--no-textconv", "HEAD"])
    }

    fn remove(&self, rel: &Path) -> Result<()> {
        Ok(std::fs::remove_file(self.confine(rel)?)?)
    }
}

/// The top-level directories under `home` that PATH, PYENV_ROOT or VIRTUAL_ENV point into
/// (e.g. `~/.pyenv`, `~/.local`, `~/.cargo`), and Python's user packages (`~/.local/lib`,
/// where `pip install --user pytest` goes): kept visible when the home directory is masked.
fn home_tool_dirs(home: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec![];
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    candidates
        .extend(["PYENV_ROOT", "VIRTUAL_ENV", "CONDA_PREFIX"].iter().filter_map(std::env::var_os).map(PathBuf::from));
    for c in candidates {
        if let Ok(rest) = c.strip_prefix(home) {
            if let Some(first) = rest.components().next() {
                let d = home.join(first);
                if d.is_dir() && !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
        }
    }
    let user_lib =
        std::env::var_os("PYTHONUSERBASE").map(PathBuf::from).unwrap_or_else(|| home.join(".local")).join("lib");
    if user_lib.is_dir() && user_lib.starts_with(home) && !dirs.iter().any(|d| user_lib.starts_with(d)) {
        dirs.push(user_lib);
    }
    dirs
}

/// Runs `git args` in `dir`, returning stdout; an error carries stderr.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .output()
        .context("cannot run git (is it installed?)")?;
    if !out.status.success() {
        bail!("git {} in {}: {}", args.join(" "), dir.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The harness repository of the work tree `root`: a sibling, never inside the sandbox.
fn harness_git_dir(root: &Path) -> PathBuf {
    let mut name = root.file_name().unwrap_or_default().to_os_string();
    name.push(".harness-git");
    root.with_file_name(name)
}

/// Deletes a work tree at `root` and its harness repository, if they exist (also what a
/// crashed run left behind).
pub fn discard(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::remove_dir_all(harness_git_dir(root));
}

/// Applies a unified diff in `dir` with `git apply` (works outside a repository too).
pub fn apply_patch(dir: &Path, patch: &str, what: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("git")
        .args(["apply", "--whitespace=nowarn", "--recount", "-"])
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run git apply")?;
    child.stdin.take().expect("stdin").write_all(patch.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{what} does not apply: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Copies a directory tree (files, directories, symlinks as links).
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let ty = e.file_type()?;
        if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if ty.is_dir() {
            copy_tree(&from, &to)?;
        } else {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

/// Keeps the first and last `cap / 2` bytes of a stream and counts the rest.
struct HeadTail {
    cap: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    dropped: usize,
}

impl HeadTail {
    fn push(&mut self, mut data: &[u8]) {
        let half = self.cap / 2;
        let take = data.len().min(half.saturating_sub(self.head.len()));
        self.head.extend_from_slice(&data[..take]);
        data = &data[take..];
        self.tail.extend(data);
        let over = self.tail.len().saturating_sub(self.cap - half);
        self.tail.drain(..over);
        self.dropped += over;
    }

    fn finish(self) -> (String, usize) {
        let mut bytes = self.head;
        if self.dropped == 0 {
            bytes.extend(self.tail);
            return (String::from_utf8_lossy(&bytes).into_owned(), 0);
        }
        let head = String::from_utf8_lossy(&bytes).into_owned();
        let tail = String::from_utf8_lossy(&self.tail.into_iter().collect::<Vec<_>>()).into_owned();
        {
            (format!("{head}\n[... {} bytes of output truncated ...]\n{tail}", self.dropped), self.dropped)
        }
    }
}

/// Spawns `cmd` with the limits, collects its merged output and kills its process tree at
/// the timeout.
pub fn run_limited(mut cmd: Command, limits: &Limits) -> Result<CmdOutput> {
    let (reader, writer) = std::io::pipe()?;
    cmd.stdin(Stdio::null()).stdout(writer.try_clone()?).stderr(writer);
    cmd.process_group(0);
    let l = *limits;
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let set = |res, v: u64| {
                let r = libc::rlimit { rlim_cur: v as libc::rlim_t, rlim_max: v as libc::rlim_t };
                libc::setrlimit(res, &r);
            };
            set(libc::RLIMIT_CPU, l.cpu_s);
            set(libc::RLIMIT_AS, l.memory_mib << 20);
            set(libc::RLIMIT_FSIZE, l.file_mib << 20);
            set(libc::RLIMIT_CORE, 0);
            set(libc::RLIMIT_NPROC, l.max_processes);
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start the command")?;
    drop(cmd); // closes our copies of the pipe's write end
    let cap = limits.output_bytes.max(2);
    let collector = std::thread::spawn(move || {
        let mut acc = HeadTail { cap, head: vec![], tail: Default::default(), dropped: 0 };
        let mut reader = reader;
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            acc.push(&buf[..n]);
        }
        acc.finish()
    });
    let timeout = Duration::from_secs_f64(limits.timeout_s.max(0.001));
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            // Commands are stateless: background jobs they left behind die with them.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            break s;
        }
        if started.elapsed() >= timeout {
            timed_out = true;
            // The process group (plain) and the process itself (bubblewrap: its PID namespace
            // and everything in it die with it).
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.kill();
            let status = child.wait()?;
            // Processes forked while the first signal was delivered join the group too.
            for _ in 0..3 {
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // A process that escaped the group may still hold the pipe: do not wait for it forever.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !collector.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (mut output, dropped) =
        if collector.is_finished() { collector.join().expect("collector") } else { (String::new(), 0) };
    if timed_out {
        output.push_str(&format!("\n[command timed out after {:.0} s and was killed]", limits.timeout_s));
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(CmdOutput {
        output,
        exit_code: status.code().filter(|_| status.signal().is_none()),
        timed_out,
        dropped_bytes: dropped,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Resolves a path the agent gave (absolute under `workdir`, or relative to it) to a path
/// relative to the work tree, refusing anything that leaves it.
pub fn agent_path(workdir: &str, given: &str) -> Result<PathBuf> {
    let given = given.trim();
    if given.is_empty() {
        bail!("path is empty");
    }
    let p = Path::new(given);
    let rel = if p.is_absolute() {
        p.strip_prefix(workdir).map_err(|_| anyhow::anyhow!("{given} is outside the repository {workdir}"))?
    } else {
        p
    };
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    bail!("{given} leaves the repository {workdir}");
                }
            }
            Component::RootDir | Component::Prefix(_) => bail!("{given} is not a path inside {workdir}"),
        }
    }
    Ok(out)
}
