//! One cgroup per sandbox: a memory limit over all processes of its commands together (their
//! private `/tmp` included) and a process limit, which per-process rlimits cannot give
//! (RLIMIT_AS is per process; RLIMIT_NPROC is per user and shared by every sandbox).
//!
//! Created as `protege-<pid>-<n>` below protege's own cgroup when the machine allows it:
//! cgroup v1 `memory`/`pids` hierarchies (each used when present), or cgroup v2 when the
//! controllers can be enabled below protege's cgroup (not when that cgroup holds processes
//! itself, v2's "no internal processes" rule: run protege in a delegated cgroup then, e.g.
//! `systemd-run --scope -p Delegate=yes protege ...`). Where neither works the sandbox runs
//! without and [`support`] says why. Cgroups left by a killed run are removed by the next one.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Where protege can create sandbox cgroups on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// cgroup v1: the parent directory in each hierarchy used (`memory`, `pids`).
    V1 { memory: Option<PathBuf>, pids: Option<PathBuf> },
    /// cgroup v2: the parent directory (memory and pids enabled below it).
    V2 { parent: PathBuf },
    /// Why there are none.
    Unavailable(String),
}

impl Support {
    pub fn describe(&self) -> String {
        match self {
            Support::V1 { memory, pids } => format!(
                "cgroup v1 per sandbox: memory {}, pids {}",
                memory.as_ref().map_or("unavailable".into(), |p| format!("below {}", p.display())),
                pids.as_ref().map_or("unavailable".into(), |p| format!("below {}", p.display()))
            ),
            Support::V2 { parent } => format!("cgroup v2 per sandbox below {} (memory, pids)", parent.display()),
            Support::Unavailable(why) => format!("no cgroup limits ({why})"),
        }
    }
}

/// Probed once per process (and stale cgroups of dead runs removed then).
pub fn support() -> &'static Support {
    static SUPPORT: OnceLock<Support> = OnceLock::new();
    SUPPORT.get_or_init(|| {
        let s = probe();
        for parent in parents(&s) {
            sweep_stale(parent);
        }
        s
    })
}

fn parents(s: &Support) -> Vec<&Path> {
    match s {
        Support::V1 { memory, pids } => memory.iter().chain(pids).map(PathBuf::as_path).collect(),
        Support::V2 { parent } => vec![parent.as_path()],
        Support::Unavailable(_) => vec![],
    }
}

/// `(mount point, fstype, super options)` of every cgroup mount.
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let opts = r.nth(1).unwrap_or("").to_string();
            fstype.starts_with("cgroup").then(|| (PathBuf::from(unescape_mountinfo(mount_point)), fstype, opts))
        })
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// A probe cgroup can be made and removed in `parent`.
fn writable(parent: &Path) -> bool {
    let probe = parent.join(format!("protege-probe-{}", std::process::id()));
    let ok = std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    ok
}

fn probe() -> Support {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = cgroup_mounts();
    let v1_parent = |controller: &str| -> Option<PathBuf> {
        let line = own.lines().find(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|x| x == controller)))?;
        let rel = line.splitn(3, ':').nth(2)?.trim_start_matches('/');
        let (mount, _, _) = mounts.iter().find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == controller))?;
        let parent = mount.join(rel);
        writable(&parent).then_some(parent)
    };
    let (memory, pids) = (v1_parent("memory"), v1_parent("pids"));
    if memory.is_some() || pids.is_some() {
        return Support::V1 { memory, pids };
    }
    let v1_mounted = mounts.iter().any(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == "memory" || x == "pids"));
    let v1_note = if v1_mounted { "cgroup v1 memory/pids are mounted but not writable here; " } else { "" };
    let Some(rel) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Support::Unavailable(format!("{v1_note}no cgroup v2"));
    };
    let Some((mount, _, _)) = mounts.iter().find(|(_, t, _)| t == "cgroup2") else {
        return Support::Unavailable(format!("{v1_note}cgroup v2 is not mounted"));
    };
    let parent = mount.join(rel.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
    if !(controllers.split_whitespace().any(|c| c == "memory") && controllers.split_whitespace().any(|c| c == "pids")) {
        return Support::Unavailable(format!(
            "{v1_note}cgroup v2 {} does not offer the memory and pids controllers (it has: {:?})",
            parent.display(),
            controllers.trim()
        ));
    }
    let enabled = std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
    let has = |c: &str| enabled.split_whitespace().any(|x| x == c);
    if !(has("memory") && has("pids")) {
        if let Err(e) = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +pids") {
            return Support::Unavailable(format!(
                "cannot enable memory and pids below cgroup v2 {} ({e}); run protege in a delegated cgroup of its \
                 own, e.g. systemd-run --scope -p Delegate=yes",
                parent.display()
            ));
        }
    }
    if !writable(&parent) {
        return Support::Unavailable(format!("cannot create cgroups below {}", parent.display()));
    }
    Support::V2 { parent }
}

/// Removes `protege-<pid>-*` cgroups of processes that no longer exist.
fn sweep_stale(parent: &Path) {
    for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("protege-").and_then(|r| r.split('-').next()).and_then(|p| p.parse().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            let dir = e.path();
            kill_members(&dir);
            remove_when_empty(&dir);
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// SIGKILLs every process in the cgroup directory `dir` until none is left (bounded).
fn kill_members(dir: &Path) {
    if dir.join("cgroup.kill").exists() && std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for _ in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            return;
        }
        for p in pids {
            // SAFETY: plain kill(2) of a process of this sandbox.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn remove_when_empty(dir: &Path) {
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The cgroup(s) of one sandbox; removed (processes killed) on drop.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    /// The `cgroup.procs` files a command writes itself into, before it drops privileges.
    procs: Vec<CString>,
    /// The file whose `oom_kill` counter tells that the memory limit killed something.
    events: Option<PathBuf>,
}

impl Cgroup {
    /// A cgroup limited to `memory_bytes` (0: no limit) and `pids` processes (0: no limit), or
    /// `None` when the machine offers none (see [`support`]).
    pub fn create(memory_bytes: u64, pids: u64) -> std::io::Result<Option<Cgroup>> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("protege-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut cg = Cgroup { dirs: vec![], procs: vec![], events: None };
        let mut add = |parent: &Path| -> std::io::Result<PathBuf> {
            let dir = parent.join(&name);
            std::fs::create_dir(&dir)?;
            cg.procs.push(CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes())?);
            cg.dirs.push(dir.clone());
            Ok(dir)
        };
        match support() {
            Support::Unavailable(_) => return Ok(None),
            Support::V1 { memory, pids: pids_parent } => {
                if let Some(p) = memory {
                    let dir = add(p)?;
                    if memory_bytes > 0 {
                        std::fs::write(dir.join("memory.limit_in_bytes"), memory_bytes.to_string())?;
                        // Swap counts too where the kernel accounts it.
                        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), memory_bytes.to_string());
                    }
                    cg.events = Some(dir.join("memory.oom_control"));
                }
                if let Some(p) = pids_parent {
                    let dir = add(p)?;
                    if pids > 0 {
                        std::fs::write(dir.join("pids.max"), pids.to_string())?;
                    }
                }
            }
            Support::V2 { parent } => {
                let dir = add(parent)?;
                if memory_bytes > 0 {
                    std::fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
                    let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                }
                if pids > 0 {
                    std::fs::write(dir.join("pids.max"), pids.to_string())?;
                }
                cg.events = Some(dir.join("memory.events"));
            }
        }
        Ok(Some(cg))
    }

    /// The `cgroup.procs` files a new process writes `0` into to join.
    pub fn procs_files(&self) -> &[CString] {
        &self.procs
    }

    /// Processes the memory limit has killed so far.
    pub fn oom_kills(&self) -> u64 {
        let Some(f) = &self.events else { return 0 };
        let text = std::fs::read_to_string(f).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }

    /// Kills every process still in the cgroup.
    pub fn kill_all(&self) {
        for d in &self.dirs {
            kill_members(d);
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        for d in &self.dirs {
            remove_when_empty(d);
        }
    }
}

/// Writes `0` into each `cgroup.procs` file: moves the calling process into the cgroups.
/// Async-signal-safe (open/write/close only): called between fork and exec.
pub fn join_self(procs: &[CString]) -> std::io::Result<()> {
    for p in procs {
        // SAFETY: plain syscalls on a NUL-terminated path made before the fork.
        unsafe {
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if !ok {
                return Err(err);
            }
        }
    }
    Ok(())
}
