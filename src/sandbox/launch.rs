//! Starting a command in the sandbox with bubblewrap, with no privilege left inside.
//!
//! bubblewrap gives the command its own user, mount, PID, network, IPC and UTS namespaces,
//! drops every capability (bounding set included), sets no-new-privileges and, from 0.8,
//! forbids further user namespaces. Which host user the command *is* matters too: a process
//! mapped to host root keeps root's ownership of host inodes without any capability — it can
//! write root-owned sysctls under `/proc/sys` and chmod the host's `/dev/null`. So when
//! protege runs as root, commands run as an unprivileged host user ([`HostUid`], one per sandbox):
//! between fork and exec the launcher, still root, enters a private mount namespace, binds
//! every host directory the sandbox shows under a fresh tmpfs at `/tmp/s<N>` (so that the
//! unprivileged user can reach them wherever they live, e.g. under a `0700` `/root`), joins
//! the sandbox's cgroups, drops to that user and only then runs bubblewrap from those
//! staged paths. The work tree is owned by that user. Run as another user, protege runs
//! bubblewrap as itself.

use std::ffi::{CString, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result};

use super::cgroup;
use super::world::{Mount, World, HOSTNAME, SANDBOX_ID};

/// The first host uid (and gid) commands run as when protege runs as root;
/// `PROTEGE_SANDBOX_UID` overrides it.
pub fn sandbox_uid_base() -> u32 {
    std::env::var("PROTEGE_SANDBOX_UID").ok().and_then(|v| v.parse().ok()).filter(|&u| u != 0).unwrap_or(64_646)
}

/// How many host uids sandboxes of one protege process use at most at once.
const UID_POOL: u32 = 1024;

/// The host uid of one live sandbox (protege as root): each sandbox has its own, so that a
/// limit the kernel counts per user (RLIMIT_NPROC) is that sandbox's alone and one sandbox
/// cannot exhaust another's. Returned to the pool when dropped.
#[derive(Debug)]
pub struct HostUid(u32);

static IN_USE: std::sync::Mutex<std::collections::BTreeSet<u32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

impl HostUid {
    pub fn allocate() -> anyhow::Result<HostUid> {
        let base = sandbox_uid_base();
        let mut used = IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        let id = (base..base.saturating_add(UID_POOL))
            .find(|u| !used.contains(u))
            .ok_or_else(|| anyhow::anyhow!("more than {UID_POOL} sandboxes at once"))?;
        used.insert(id);
        Ok(HostUid(id))
    }

    pub fn get(&self) -> u32 {
        self.0
    }
}

impl Drop for HostUid {
    fn drop(&mut self) {
        IN_USE.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.0);
    }
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// What the bubblewrap found here can do; probed once.
#[derive(Debug, Clone)]
pub struct Bubblewrap {
    pub path: PathBuf,
    pub version: String,
    /// `--disable-userns` (0.8): no user namespace can be made inside.
    pub disable_userns: bool,
    /// `--size` for tmpfs mounts.
    pub tmpfs_size: bool,
    /// Commands run as a [`HostUid`] from staged paths (protege runs as root).
    pub staged: bool,
}

/// The usable bubblewrap, or why there is none.
pub fn bubblewrap() -> &'static std::result::Result<Bubblewrap, String> {
    static BWRAP: OnceLock<std::result::Result<Bubblewrap, String>> = OnceLock::new();
    BWRAP.get_or_init(probe)
}

fn probe() -> std::result::Result<Bubblewrap, String> {
    let path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("bwrap"))
        .find(|p| p.is_file())
        .ok_or("bubblewrap (bwrap) is not installed")?;
    let out =
        Command::new(&path).arg("--version").output().map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let flag_works = |flags: &[&str]| {
        Command::new(&path)
            .args(["--unshare-user", "--ro-bind", "/", "/"])
            .args(flags)
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let disable_userns = flag_works(&["--disable-userns"]);
    let tmpfs_size = flag_works(&["--size", "65536", "--tmpfs", "/tmp"]);
    let bw = Bubblewrap { path, version, disable_userns, tmpfs_size, staged: running_as_root() };
    // The real thing, once: an empty work tree and the world every command gets.
    let dir = tempfile::Builder::new().prefix("protege-probe-").tempdir().map_err(|e| e.to_string())?;
    let work = dir.path().join("work");
    let etc = dir.path().join("etc");
    let setup = || -> std::io::Result<()> {
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&etc)?;
        World::write_etc(&etc, &super::world::home_dir())?;
        Ok(())
    };
    setup().map_err(|e| format!("cannot prepare a probe sandbox: {e}"))?;
    let uid = match bw.staged {
        true => Some(HostUid::allocate().map_err(|e| e.to_string())?),
        false => None,
    };
    if let Some(u) = &uid {
        give_to(dir.path(), u.get()).map_err(|e| format!("cannot prepare a probe sandbox: {e}"))?;
    }
    let world = World::build(&super::world::WorldSpec {
        work_tree: &work,
        visible: &[],
        hidden: &[],
        etc_dir: &etc,
        tmp_bytes: Some(1 << 20),
    });
    let launcher = Launcher::new(&bw, &world, None, uid.as_ref().map(HostUid::get)).map_err(|e| format!("{e:#}"))?;
    let mut cmd = launcher.command("test \"$(id -u)\" = 1000 && touch /repo/ok");
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot start bubblewrap: {e}"))?;
    if !out.status.success() || !work.join("ok").exists() {
        return Err(format!(
            "bubblewrap cannot create the sandbox here ({}): {}",
            bw.version,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(bw)
}

/// Gives `path` (recursively, links not followed) to host uid and gid `id`.
pub fn give_to(path: &Path, id: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(id), Some(id))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for e in std::fs::read_dir(path)? {
            give_to(&e?.path(), id)?;
        }
    }
    Ok(())
}

/// One host path bound through the staging area.
#[derive(Clone)]
struct Staged {
    /// The host path.
    source: CString,
    /// `/tmp/s<N>` in the launcher's private mount namespace.
    target: CString,
    is_dir: bool,
}

/// A sandbox's bubblewrap command line and how to launch it; built once per sandbox.
pub struct Launcher {
    bwrap: PathBuf,
    args: Vec<OsString>,
    staged: Vec<Staged>,
    /// Drop to this host uid/gid after staging (protege runs as root).
    drop_to: Option<u32>,
    cgroup_procs: Vec<CString>,
    home: PathBuf,
}

/// Host paths bubblewrap can reach as any user: system directories and `/etc` entries.
fn reachable_by_anyone(p: &Path) -> bool {
    super::world::SYSTEM_DIRS.iter().chain(&["/etc", "/dev/null"]).any(|s| p.starts_with(s))
}

impl Launcher {
    /// `drop_to`: the host uid commands run as (protege as root: staged, then dropped to it).
    pub fn new(
        bw: &Bubblewrap,
        world: &World,
        cgroup: Option<&cgroup::Cgroup>,
        drop_to: Option<u32>,
    ) -> Result<Launcher> {
        let id = SANDBOX_ID.to_string();
        let mut args: Vec<OsString> = vec![];
        let mut push = |xs: &[&str]| args.extend(xs.iter().map(OsString::from));
        push(&["--unshare-user", "--uid", &id, "--gid", &id]);
        if bw.disable_userns {
            push(&["--disable-userns"]);
        }
        push(&["--cap-drop", "ALL", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]);
        push(&["--unshare-cgroup-try", "--hostname", HOSTNAME, "--die-with-parent", "--new-session"]);
        let mut staged: Vec<Staged> = vec![];
        let mut source_of = |p: &Path| -> Result<OsString> {
            if !bw.staged || reachable_by_anyone(p) {
                return Ok(p.as_os_str().to_owned());
            }
            let is_dir = std::fs::metadata(p).with_context(|| format!("{} is not there", p.display()))?.is_dir();
            let target = format!("/tmp/s{}", staged.len());
            staged.push(Staged {
                source: CString::new(p.as_os_str().as_encoded_bytes())?,
                target: CString::new(target.clone())?,
                is_dir,
            });
            Ok(target.into())
        };
        let mut mount_args: Vec<OsString> = vec![];
        for m in &world.mounts {
            match m {
                Mount::ReadOnly { source, dest } => {
                    mount_args.extend(["--ro-bind".into(), source_of(source)?, dest.into()]);
                }
                Mount::Writable { source, dest } => {
                    mount_args.extend(["--bind".into(), source_of(source)?, dest.into()]);
                }
                Mount::Symlink { target, at } => mount_args.extend(["--symlink".into(), target.into(), at.into()]),
                Mount::Tmpfs { at, bytes } => {
                    if let (Some(b), true) = (bytes, bw.tmpfs_size) {
                        mount_args.extend(["--size".into(), b.to_string().into()]);
                    }
                    mount_args.extend(["--tmpfs".into(), at.into()]);
                }
                Mount::EmptyFile { at } => mount_args.extend(["--ro-bind".into(), "/dev/null".into(), at.into()]),
            }
        }
        // /dev and /proc first: the world's mounts include /dev/shm.
        args.extend(["--dev", "/dev", "--proc", "/proc"].map(OsString::from));
        args.extend(mount_args);
        // The root itself (where /etc's entries and the mount points live) and /dev's own tmpfs
        // (not its device nodes, /dev/pts or /dev/shm, mounts of their own) are read-only.
        args.extend(["--remount-ro", "/", "--remount-ro", "/dev", "--chdir", super::SANDBOX_REPO].map(OsString::from));
        Ok(Launcher {
            bwrap: bw.path.clone(),
            args,
            staged,
            drop_to,
            cgroup_procs: cgroup.map(|c| c.procs_files().to_vec()).unwrap_or_default(),
            home: world.home.clone(),
        })
    }

    /// `bash -c script` in the sandbox (environment still to be set by the caller).
    pub fn command(&self, script: &str) -> Command {
        let mut c = Command::new(&self.bwrap);
        c.args(&self.args).args(["--", "bash", "-c", script]);
        c.env("HOME", &self.home).env("USER", "agent").env("LOGNAME", "agent").env("TMPDIR", "/tmp");
        let procs = self.cgroup_procs.clone();
        let stage = self.staged.clone();
        let mut fds: Vec<libc::c_int> = vec![-1; stage.len()];
        let drop_to = self.drop_to;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec only raw syscalls on data prepared before the fork.
        unsafe {
            c.pre_exec(move || {
                close_inherited_fds();
                cgroup::join_self(&procs)?;
                if let Some(id) = drop_to {
                    stage_and_drop(&stage, &mut fds, id)?;
                }
                die_with_parent(parent)
            });
        }
        c
    }
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// In the forked child, as root: a private mount namespace; each source opened there (a
/// descriptor of the parent's namespace cannot be bound into this one); a tmpfs on `/tmp`;
/// each source bound at its `/tmp/s<N>` through `/proc/self/fd`; then the unprivileged
/// uid/gid for good. Async-signal-safe: raw syscalls on buffers made before the fork.
fn stage_and_drop(stage: &[Staged], fds: &mut [libc::c_int], id: u32) -> std::io::Result<()> {
    // SAFETY: raw syscalls with NUL-terminated strings made before the fork.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        for (s, fd) in stage.iter().zip(fds.iter_mut()) {
            *fd = libc::open(s.source.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
            check(*fd)?;
        }
        check(libc::mount(
            c"tmpfs".as_ptr(),
            c"/tmp".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0755,size=65536".as_ptr().cast(),
        ))?;
        for (s, fd) in stage.iter().zip(fds.iter()) {
            if s.is_dir {
                check(libc::mkdir(s.target.as_ptr(), 0o755))?;
            } else {
                let f = libc::open(s.target.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                check(f)?;
                libc::close(f);
            }
            let mut path = [0u8; 32];
            fd_path(*fd, &mut path);
            check(libc::mount(
                path.as_ptr().cast(),
                s.target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
        }
        // Thread-directed syscalls (not glibc's process-wide wrappers): the child has one thread.
        check(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) as libc::c_int)?;
        check(libc::syscall(libc::SYS_setresgid, id, id, id) as libc::c_int)?;
        check(libc::syscall(libc::SYS_setresuid, id, id, id) as libc::c_int)?;
    }
    Ok(())
}

/// SIGKILL when protege dies, from before bubblewrap runs (its own `--die-with-parent` comes
/// later, and a protege killed in between would leave an orphan running the command). Set
/// after the last credential change, which would clear it; if protege is already gone, the
/// command does not start. Async-signal-safe.
pub fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl and getppid are plain syscalls.
    unsafe {
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0))?;
        if libc::getppid() != parent {
            // protege is gone: the command must not start (no allocation after fork).
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// Marks every descriptor above stderr close-on-exec: whatever protege inherited (a directory
/// descriptor from its launcher is a way out of any mount namespace) or opened without
/// close-on-exec never reaches a command. Async-signal-safe.
pub fn close_inherited_fds() {
    // SAFETY: close_range (Linux 5.11) or fcntl on each descriptor: plain syscalls.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) == 0 {
            return;
        }
        let mut lim: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 { lim.rlim_cur.min(1 << 20) } else { 4096 };
        for fd in 3..max as libc::c_int {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// `/proc/self/fd/<fd>` NUL-terminated into `buf`, without allocating.
fn fd_path(fd: libc::c_int, buf: &mut [u8; 32]) {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let (mut n, mut len) = (fd.max(0) as u32, 0);
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
}

#[cfg(test)]
mod tests {
    #[test]
    fn fd_paths_are_formatted_without_allocation() {
        for (fd, want) in [(0, "/proc/self/fd/0"), (7, "/proc/self/fd/7"), (1234567, "/proc/self/fd/1234567")] {
            let mut buf = [0u8; 32];
            super::fd_path(fd, &mut buf);
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..end]).unwrap(), want);
        }
    }
}
