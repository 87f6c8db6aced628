//! Where an episode's commands run: a fresh copy of the task's repository in a bubblewrap
//! sandbox when bubblewrap works here, else as plain subprocesses with the same limits and a
//! loud warning of what is then unprotected.
//!
//! The sandbox is a security boundary (an RL-trained agent learns whatever it allows):
//! - least privilege ([`launch`]): no capability, no-new-privileges, its own user, mount, PID,
//!   network, IPC and UTS namespaces, no further user namespaces, and — when protege runs as
//!   root — an unprivileged host user, so that nothing inside owns a host inode;
//! - an empty world ([`world`]): the system's runtime directories read-only, the task's work
//!   tree at `/repo`, its venv, a private `/tmp` — never the project checkout, the home
//!   directory, the run directory or the suite;
//! - bounded resources: a wall-clock timeout that kills the command's whole process tree,
//!   per-process CPU, address-space and file-size rlimits, a per-sandbox cgroup memory and
//!   process limit where the machine offers one ([`cgroup`]), a size-limited `/tmp`, output
//!   cut to head + tail with a marker that counts the bytes cut ([`output`]), and a cap on
//!   the patch the work tree yields.
//!
//! [`Workspace`] is what the tools see, so that another executor (SWE-bench images) can stand in.

pub mod cgroup;
pub mod launch;
pub mod output;
pub mod scratch;
pub mod world;

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
    /// Memory of all of a sandbox's processes together (its `/tmp` included), MiB, through its
    /// cgroup where the machine offers one; 0: no such limit.
    pub total_memory_mib: u64,
    /// Largest file a command may write, MiB.
    pub file_mib: u64,
    /// Size of the sandbox's private `/tmp` (and `/dev/shm`), MiB.
    pub tmp_mib: u64,
    /// How much the work tree may grow beyond the base, MiB, and by how many files and
    /// directories; checked after every command (a command over it ends the episode
    /// `patch_too_large`).
    pub work_tree_mib: u64,
    pub work_tree_files: u64,
    /// Bytes of output kept (half from the head, half from the tail).
    pub output_bytes: usize,
    /// Processes: of the sandbox together through its cgroup where the machine offers one,
    /// and of its user (RLIMIT_NPROC, which the kernel does not apply to root).
    pub max_processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_s: 60.0,
            cpu_s: 120,
            memory_mib: 4096,
            total_memory_mib: 8192,
            file_mib: 256,
            tmp_mib: 1024,
            work_tree_mib: 1024,
            work_tree_files: 100_000,
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
    /// Killed because the run was asked to stop (see [`crate::interrupt`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

impl CmdOutput {
    /// The output shown in at most `max_chars` characters, with one marker that counts every
    /// byte cut (by the collector and here).
    pub fn shown(&self, max_chars: usize) -> String {
        let (head, tail) = output::split_at_marker(&self.output, self.dropped_bytes);
        output::clip(head, tail, self.dropped_bytes, max_chars)
    }
}

/// The work tree's changes are over a limit (the patch's size, or the tree's growth in bytes
/// or files): the episode ends and nothing is graded.
#[derive(Debug, thiserror::Error)]
#[error("the work tree's {what} come to {amount}, over the limit of {limit}")]
pub struct PatchTooLarge {
    pub what: &'static str,
    pub amount: u64,
    pub limit: u64,
}

/// Runs commands and edits files in one episode's work tree.
pub trait Workspace: Send + Sync {
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
    /// The work tree's changes against the task's base, as a git patch of at most `max_bytes`
    /// bytes ([`PatchTooLarge`] otherwise).
    fn diff(&self, max_bytes: u64) -> Result<String>;
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

/// Whether the bubblewrap sandbox works here (installed, namespaces allowed, the whole
/// launch tried once).
pub fn bubblewrap_works() -> bool {
    launch::bubblewrap().is_ok()
}

/// What plain subprocesses (`--no-sandbox`, or no working bubblewrap) do not protect.
pub const PLAIN_WARNING: &str = "agent commands run as plain subprocesses, as the user running protege (root \
     included), with its network, its capabilities and read and write access to everything it can reach: the \
     home directory, the project checkout, the suite's hidden tests and gold patches, sockets in /run. Only the \
     time, CPU, memory, file-size and output limits hold, and the process-group kill at the timeout (a command \
     that calls setsid escapes it). Use this only with agents you trust on machines you can lose.";

/// The best isolation available, warning loudly (once) when it is not bubblewrap.
pub fn best_isolation() -> Isolation {
    static WARNED: OnceLock<()> = OnceLock::new();
    match launch::bubblewrap() {
        Ok(_) => Isolation::Bubblewrap,
        Err(why) => {
            WARNED.get_or_init(|| {
                eprintln!(
                    "WARNING: no sandbox: {why}. {PLAIN_WARNING} Install bubblewrap (Debian/Ubuntu: apt-get install \
                     bubblewrap) on a kernel that allows user namespaces for real isolation."
                )
            });
            Isolation::Plain
        }
    }
}

/// What `protege info` says about the sandbox on this machine.
pub fn describe() -> String {
    let mut s = String::new();
    match launch::bubblewrap() {
        Ok(bw) => {
            s += &format!("bubblewrap: {} ({})\n", bw.version, bw.path.display());
            s += &format!(
                "  commands run as uid {} inside (no capabilities), {} on the host\n",
                world::SANDBOX_ID,
                if bw.staged {
                    format!("an unprivileged uid of its own from {} up", launch::sandbox_uid_base())
                } else {
                    // SAFETY: getuid cannot fail.
                    format!("uid {} (protege's own)", unsafe { libc::getuid() })
                }
            );
            s += &format!(
                "  nested user namespaces: {}\n",
                if bw.disable_userns { "disabled" } else { "not disabled (bubblewrap < 0.8)" }
            );
            s += &format!(
                "  private /tmp size limit: {}\n",
                if bw.tmpfs_size { "yes" } else { "no (bubblewrap without --size)" }
            );
        }
        Err(why) => s += &format!("bubblewrap: unusable ({why}); {PLAIN_WARNING}\n"),
    }
    s += &format!("  {}\n", cgroup::support().describe());
    s
}

/// A work tree on this machine: a copy of a repository snapshot committed as the base.
pub struct LocalSandbox {
    root: PathBuf,
    /// The harness's own repository of the work tree (outside it).
    harness_git: PathBuf,
    isolation: Isolation,
    limits: Limits,
    /// The bubblewrap command line of this sandbox (`None` for plain subprocesses).
    launcher: Option<launch::Launcher>,
    cgroup: Option<cgroup::Cgroup>,
    /// Host uid that owns the work tree (commands run as it), when protege runs as root.
    owner: Option<launch::HostUid>,
    /// Bytes, and files and directories, in the work tree at the base (after setup).
    base_size: TreeSize,
    /// The task's venv (read-only): first on commands' PATH, so that the agent's `python3 -m
    /// pytest` is the pytest the task's tests were built with, as the grader's is.
    venv: Option<PathBuf>,
}

impl Drop for LocalSandbox {
    fn drop(&mut self) {
        discard(&self.root);
    }
}

/// Files beside a work tree: its harness repository and its sandbox's `/etc` files.
fn sibling(root: &Path, suffix: &str) -> PathBuf {
    let mut name = root.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    root.with_file_name(name)
}

impl LocalSandbox {
    /// Copies `snapshot` into `root` (which must not exist), runs the task's `setup` commands
    /// in the sandbox, and records the result as the base twice: in a repository inside the work
    /// tree for the agent's own `git` use, and in a harness repository beside it (never visible
    /// in the sandbox) that [`Workspace::diff`] reads, so that nothing the agent does to its
    /// `.git` (hooks, filters, config) runs on the host. `hidden` are host paths that must
    /// never be visible in the sandbox (checked against everything it shows).
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

    /// [`LocalSandbox::create_with`] for a task with its own Python environment: `venv` is shown
    /// read-only (added to the visible paths here, so it can never be on PATH without being
    /// mounted read-only) and its `bin/` goes first on the agent's PATH.
    #[allow(clippy::too_many_arguments)]
    pub fn create_with_venv(
        snapshot: &Path,
        base_patch: Option<&str>,
        root: &Path,
        isolation: Isolation,
        limits: Limits,
        hidden: Vec<PathBuf>,
        setup: &[String],
        venv: Option<PathBuf>,
    ) -> Result<Self> {
        let visible = venv.iter().cloned().collect();
        let mut sandbox = Self::create_with(snapshot, base_patch, root, isolation, limits, hidden, setup, visible)?;
        sandbox.venv = venv;
        Ok(sandbox)
    }

    /// [`LocalSandbox::create`] with a base patch and host directories shown read-only.
    #[allow(clippy::too_many_arguments)]
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
        let etc_dir = sibling(&root, ".etc");
        let mut sandbox = Self {
            harness_git: sibling(&root, ".harness-git"),
            root,
            isolation,
            limits,
            launcher: None,
            cgroup: None,
            owner: None,
            base_size: TreeSize::default(),
            venv: None,
        };
        sandbox.cgroup = cgroup::Cgroup::create(limits.total_memory_mib << 20, limits.max_processes)
            .context("cannot create the sandbox's cgroup")?;
        if isolation == Isolation::Bubblewrap {
            let bw = launch::bubblewrap().as_ref().map_err(|e| anyhow::anyhow!("bubblewrap: {e}"))?;
            let world = world::World::build(&world::WorldSpec {
                work_tree: &sandbox.root,
                visible: &visible,
                hidden: &hidden,
                etc_dir: &etc_dir,
                tmp_bytes: Some(limits.tmp_mib << 20),
            });
            std::fs::create_dir_all(&etc_dir)?;
            world::World::write_etc(&etc_dir, &world.home)?;
            if bw.staged {
                let uid = launch::HostUid::allocate()?;
                launch::give_to(&sandbox.root, uid.get())?;
                sandbox.owner = Some(uid);
            }
            let drop_to = sandbox.owner.as_ref().map(launch::HostUid::get);
            sandbox.launcher = Some(launch::Launcher::new(bw, &world, sandbox.cgroup.as_ref(), drop_to)?);
        }
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
        if let Some(uid) = &sandbox.owner {
            // The agent's own repository is the agent's.
            launch::give_to(&sandbox.root.join(".git"), uid.get())?;
        }
        sandbox.base_size = tree_size(&sandbox.root, u64::MAX);
        Ok(sandbox)
    }

    /// The paths the work tree changed against the base, as git sees them (a rename is a
    /// deletion and an addition; mode and link changes count), with their line counts (`None`
    /// for binary files).
    pub fn changes(&self) -> Result<Vec<Change>> {
        self.harness_git(&["add", "-A"])?;
        let numstat = self.harness_git(&["diff", "--cached", "--numstat", "--no-renames", "-z", "HEAD"])?;
        let mut out = vec![];
        for rec in numstat.split('\0').filter(|r| !r.is_empty()) {
            let mut f = rec.splitn(3, '\t');
            if let (Some(a), Some(r), Some(path)) = (f.next(), f.next(), f.next()) {
                out.push(Change { path: path.to_string(), added: a.parse().ok(), removed: r.parse().ok() });
            }
        }
        Ok(out)
    }

    /// Puts `rel` back as it is at the base (removes it when the base has none), following no
    /// link the agent made on the way: a link or file where a directory of the path belongs is
    /// removed itself, never what it points to.
    pub fn restore(&self, rel: &str) -> Result<()> {
        let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
        if parts.is_empty() || parts.contains(&"..") {
            bail!("{rel:?} is not a path inside the work tree");
        }
        let mut p = self.root.clone();
        for part in &parts[..parts.len() - 1] {
            p.push(part);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => {
                    std::fs::remove_file(&p)?;
                    break;
                }
                Err(_) => break,
            }
        }
        let rel = parts.join("/");
        let full = self.root.join(&rel);
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {
                remove_tree(&full);
            }
            Ok(_) => std::fs::remove_file(&full)?,
            Err(_) => {}
        }
        if self.harness_git(&["cat-file", "-e", &format!("HEAD:{rel}")]).is_ok() {
            self.harness_git(&["checkout", "HEAD", "--", &rel])?;
            self.give(&full)?;
        }
        Ok(())
    }

    /// Gives the whole work tree to the sandbox's user (after the harness wrote in it as root).
    pub fn give_tree(&self) -> Result<()> {
        if let Some(uid) = &self.owner {
            launch::give_to(&self.root, uid.get())?;
        }
        Ok(())
    }

    /// git on the harness repository (work tree = the sandbox's), with every hook, filter and
    /// monitor the work tree could name switched off.
    fn harness_command(&self) -> Command {
        let mut c = git_command(&self.root);
        c.arg(format!("--git-dir={}", self.harness_git.display()))
            .arg(format!("--work-tree={}", self.root.display()))
            .args(["-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null"]);
        c
    }

    /// Runs [`Self::harness_command`] with `args`, returning stdout; an error carries stderr.
    fn harness_git(&self, args: &[&str]) -> Result<String> {
        output_of(self.harness_command().args(args), &self.root, args)
    }

    /// Deletes the work tree and what is beside it, and the sandbox's cgroup.
    /// Removes the work tree (as dropping does).
    pub fn discard(self) {}

    pub fn host_root(&self) -> &Path {
        &self.root
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Hands a path the harness wrote (as root) in the work tree to the sandbox's user.
    pub fn give(&self, path: &Path) -> Result<()> {
        if let Some(id) = self.owner.as_ref().map(launch::HostUid::get) {
            let mut p = Some(path);
            while let Some(q) = p.filter(|q| q.starts_with(&self.root) && *q != self.root) {
                std::os::unix::fs::lchown(q, Some(id), Some(id))?;
                p = q.parent();
            }
        }
        Ok(())
    }

    fn command(&self, script: &str) -> Command {
        let mut cmd = match &self.launcher {
            Some(l) => l.command(script),
            None => {
                let mut c = Command::new("bash");
                c.current_dir(&self.root).arg("-c").arg(script);
                let procs = self.cgroup.as_ref().map(|c| c.procs_files().to_vec()).unwrap_or_default();
                let parent = std::process::id() as libc::pid_t;
                // SAFETY: only open/write/close/prctl between fork and exec.
                unsafe {
                    c.pre_exec(move || {
                        launch::close_inherited_fds();
                        cgroup::join_self(&procs)?;
                        launch::die_with_parent(parent)
                    });
                }
                c
            }
        };
        // Only an allowlist of the environment reaches commands (no API keys or tokens).
        let keep: Vec<(std::ffi::OsString, std::ffi::OsString)> =
            std::env::vars_os().filter(|(k, _)| ENV_ALLOWED.contains(&k.to_string_lossy().as_ref())).collect();
        let set: Vec<(std::ffi::OsString, std::ffi::OsString)> =
            cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))).collect();
        cmd.env_clear();
        cmd.envs(keep).envs(set);
        if let Some(venv) = &self.venv {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let dirs = std::iter::once(venv.join("bin")).chain(std::env::split_paths(&path));
            if let Ok(path) = std::env::join_paths(dirs) {
                cmd.env("PATH", path).env("VIRTUAL_ENV", venv);
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

/// One path the work tree changed against its base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub added: Option<u64>,
    pub removed: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct TreeSize {
    bytes: u64,
    entries: u64,
}

/// Bytes in the regular files under `dir` and its entries (links not followed), counting
/// stopped once `max_entries` is passed.
fn tree_size(dir: &Path, max_entries: u64) -> TreeSize {
    let mut size = TreeSize::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            size.entries += 1;
            if size.entries > max_entries {
                return size;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => size.bytes += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    size
}

impl LocalSandbox {
    /// [`PatchTooLarge`] when the work tree grew past `work_tree_mib` or `work_tree_files`.
    fn check_growth(&self) -> Result<()> {
        let max_entries = self.base_size.entries.saturating_add(self.limits.work_tree_files);
        let now = tree_size(&self.root, max_entries);
        if now.entries > max_entries {
            let what = "new files and directories";
            return Err(PatchTooLarge {
                what,
                amount: now.entries - self.base_size.entries,
                limit: self.limits.work_tree_files,
            }
            .into());
        }
        let grown = now.bytes.saturating_sub(self.base_size.bytes);
        if grown > self.limits.work_tree_mib << 20 {
            return Err(
                PatchTooLarge { what: "new bytes", amount: grown, limit: self.limits.work_tree_mib << 20 }.into()
            );
        }
        Ok(())
    }
}

impl Workspace for LocalSandbox {
    fn workdir(&self) -> String {
        match self.isolation {
            Isolation::Bubblewrap => SANDBOX_REPO.into(),
            Isolation::Plain => self.root.display().to_string(),
        }
    }

    fn run(&self, command: &str) -> Result<CmdOutput> {
        let oom_before = self.cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let mut out = run_limited(self.command(command), &self.limits)?;
        if let Some(cg) = &self.cgroup {
            // Nothing of a command outlives it.
            cg.kill_all();
            if cg.oom_kills() > oom_before {
                out.output.push_str(&format!(
                    "\n[killed: the sandbox's memory limit of {} MiB was reached]",
                    self.limits.total_memory_mib
                ));
            }
        }
        self.check_growth()?;
        Ok(out)
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
        std::fs::write(&path, data)?;
        self.give(&path)
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

    fn diff(&self, max_bytes: u64) -> Result<String> {
        // A tree past its growth limits is not even added to the harness repository.
        self.check_growth()?;
        self.harness_git(&["add", "-A"])?;
        let mut child = self
            .harness_command()
            .args(["diff", "--cached", "--binary", "--no-color", "--no-ext-diff", "--no-textconv", "HEAD"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run git diff")?;
        // Read what fits, count the rest.
        let mut kept = vec![];
        let mut total: u64 = 0;
        let mut stdout = child.stdout.take().expect("piped");
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = stdout.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total <= max_bytes {
                kept.extend_from_slice(&buf[..n]);
            }
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("git diff: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        if total > max_bytes {
            return Err(PatchTooLarge { what: "patch bytes", amount: total, limit: max_bytes }.into());
        }
        Ok(String::from_utf8_lossy(&kept).into_owned())
    }

    fn remove(&self, rel: &Path) -> Result<()> {
        Ok(std::fs::remove_file(self.confine(rel)?)?)
    }
}

/// `git` for the harness: no system config, no prompts, and every directory trusted (work
/// trees belong to the sandbox's user when protege runs as root).
fn git_command(dir: &Path) -> Command {
    let mut c = Command::new("git");
    // No system or user config: nothing of the host's (a filter driver such as git-lfs named
    // by the agent's .gitattributes) runs on the agent's files.
    c.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_LITERAL_PATHSPECS", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["-c", "safe.directory=*"])
        .stdin(Stdio::null());
    c
}

/// Runs `git args` in `dir`, returning stdout; an error carries stderr.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    output_of(git_command(dir).args(args), dir, args)
}

fn output_of(cmd: &mut Command, dir: &Path, args: &[&str]) -> Result<String> {
    let out = cmd.output().context("cannot run git (is it installed?)")?;
    if !out.status.success() {
        bail!("git {} in {}: {}", args.join(" "), dir.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes a work tree at `root` and what is beside it (its harness repository and sandbox
/// files), if they exist.
pub fn discard(root: &Path) {
    remove_tree(root);
    remove_tree(&sibling(root, ".harness-git"));
    remove_tree(&sibling(root, ".etc"));
}

/// Removes a directory tree the agent may have shaped: links are not followed, and a tree
/// too deep for one descriptor per level (`remove_dir_all` fails with EMFILE on thousands of
/// nested directories) goes through `rm -rf --one-file-system`. Returns whether it is gone.
pub fn remove_tree(path: &Path) -> bool {
    if std::fs::symlink_metadata(path).is_err() || std::fs::remove_dir_all(path).is_ok() {
        return true;
    }
    let _ = Command::new("rm")
        .args(["-rf", "--one-file-system", "--"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    std::fs::symlink_metadata(path).is_err()
}

/// Applies a unified diff in `dir` with `git apply` (works outside a repository too).
pub fn apply_patch(dir: &Path, patch: &str, what: &str) -> Result<()> {
    use std::io::Write;
    let mut child = git_command(dir)
        .args(["apply", "--whitespace=nowarn", "--recount", "-"])
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
        let mut acc = output::HeadTail::new(cap);
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
    let mut interrupted = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            // Commands are stateless: background jobs they left behind die with them.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            break s;
        }
        interrupted = crate::interrupt::requested();
        if started.elapsed() >= timeout || interrupted {
            timed_out = !interrupted;
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
    if interrupted {
        output.push_str("\n[command killed: the run was asked to stop]");
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(CmdOutput {
        output,
        exit_code: status.code().filter(|_| status.signal().is_none()),
        timed_out,
        dropped_bytes: dropped,
        seconds: started.elapsed().as_secs_f64(),
        interrupted,
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

/// Single-quotes a string for bash.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
