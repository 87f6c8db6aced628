//! What a bubblewrap sandbox shows: an empty root holding the system's runtime directories
//! (read-only), an allowlist of `/etc` with a `passwd`/`group`/`hosts` of its own, the tools on
//! PATH with their libraries (interpreters, the Python user site), the task's venv, the work
//! tree at `/repo`, a private `/tmp` and an empty home — nothing else. No `/run`, `/var`,
//! `/sys`, `/home`, `/root` or `/mnt` of the host, so no socket, credential or checkout of the
//! host is there to find.
//!
//! Paths that must never be seen (the task suite, the run directory, other episodes, the
//! project checkout) are checked against everything shown: a directory shown inside one of
//! them is dropped, and one of them inside a directory shown is covered by an empty tmpfs.
//! Inside the sandbox nothing holds a capability, so such a cover cannot be unmounted.

use std::path::{Path, PathBuf};

/// Directories of the host shown read-only when they exist (as themselves, or as the same
/// symlink on merged-/usr systems). Not `/opt` or the whole of `/nix`: they can hold sockets
/// (`/nix/var/nix/daemon-socket`) and data, which read-only does not protect; tools there are
/// shown through PATH like any other.
pub const SYSTEM_DIRS: [&str; 8] = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/nix/store"];

/// Entries of the host's `/etc` shown read-only: what the dynamic loader, locales, time
/// zones, TLS roots, `file`, Python and Debian's alternatives read. Never `shadow`, `ssh`,
/// `sudoers`, `pip.conf` (index credentials), `ssl/private`, machine ids or service configs.
const ETC_ALLOWED: [&str; 27] = [
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "fonts",
    "gai.conf",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "lsb-release",
    "magic",
    "magic.mime",
    "mime.types",
    "mtab",
    "nsswitch.conf",
    "os-release",
    "protocols",
    "services",
    "shells",
    "ssl/certs",
    "ssl/openssl.cnf",
    "terminfo",
    "timezone",
];

/// The uid and gid commands have inside the sandbox (never 0: they hold no capability).
pub const SANDBOX_ID: u32 = 1000;

/// The sandbox's hostname.
pub const HOSTNAME: &str = "sandbox";

/// One step of building the sandbox's root, in order (later ones cover earlier ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// A host directory or file shown read-only at `dest`.
    ReadOnly { source: PathBuf, dest: PathBuf },
    /// A host directory shown writable at `dest` (the work tree).
    Writable { source: PathBuf, dest: PathBuf },
    /// A symlink at `at` pointing to `target`.
    Symlink { target: PathBuf, at: PathBuf },
    /// An empty tmpfs of at most `bytes` (a private directory, or the cover of a hidden one).
    Tmpfs { at: PathBuf, bytes: Option<u64> },
    /// An empty read-only file covering a hidden one.
    EmptyFile { at: PathBuf },
}

/// Everything one sandbox shows, in mount order.
#[derive(Debug, Clone)]
pub struct World {
    pub mounts: Vec<Mount>,
    /// The home directory commands get (an empty tmpfs but for the tool directories in it).
    pub home: PathBuf,
}

/// What [`World::build`] needs to know about one sandbox.
pub struct WorldSpec<'a> {
    /// The work tree, shown writable at [`super::SANDBOX_REPO`].
    pub work_tree: &'a Path,
    /// Extra host directories shown read-only at their own paths (a task's venv).
    pub visible: &'a [PathBuf],
    /// Host paths that must never be visible.
    pub hidden: &'a [PathBuf],
    /// The directory holding this sandbox's own `/etc/passwd`, `group`, `hosts` and `hostname`.
    pub etc_dir: &'a Path,
    /// Size of the private `/tmp`, bytes (`None`: the kernel's default, half the memory).
    pub tmp_bytes: Option<u64>,
}

impl World {
    pub fn build(spec: &WorldSpec) -> World {
        let hidden = hidden_paths(spec.hidden);
        let home = home_dir();
        let mut mounts = vec![];
        for dir in SYSTEM_DIRS.iter().map(Path::new) {
            match std::fs::read_link(dir) {
                Ok(target) => mounts.push(Mount::Symlink { target, at: dir.into() }),
                Err(_) if dir.is_dir() => mounts.push(Mount::ReadOnly { source: dir.into(), dest: dir.into() }),
                Err(_) => {}
            }
        }
        for name in ETC_ALLOWED.iter().map(|n| n.to_string()).chain(python_etc_entries()) {
            let p = Path::new("/etc").join(&name);
            match std::fs::read_link(&p) {
                Ok(target) => mounts.push(Mount::Symlink { target, at: p }),
                Err(_) if p.exists() => mounts.push(Mount::ReadOnly { source: p.clone(), dest: p }),
                Err(_) => {}
            }
        }
        mounts.push(Mount::Tmpfs { at: home.clone(), bytes: Some(64 << 20) });
        // Before the tool directories and venvs: one of them may live under /tmp.
        mounts.push(Mount::Tmpfs { at: "/tmp".into(), bytes: spec.tmp_bytes });
        mounts.push(Mount::Tmpfs { at: "/dev/shm".into(), bytes: spec.tmp_bytes });
        mounts.push(Mount::Symlink { target: "../tmp".into(), at: "/var/tmp".into() });
        for dir in tool_dirs(&home, spec.visible) {
            mounts.push(Mount::ReadOnly { source: dir.clone(), dest: dir });
        }
        // Nothing the machine provides may sit inside a hidden path (the task's own venv and
        // work tree may: a suite keeps its venvs beside its tasks).
        mounts.retain(|m| match m {
            Mount::ReadOnly { source, .. } => !hidden.iter().any(|h| source.starts_with(h)),
            _ => true,
        });
        for v in spec.visible {
            mounts.push(Mount::ReadOnly { source: v.clone(), dest: v.clone() });
        }
        // The sandbox's own /etc files live beside its work tree (in the hidden scratch area).
        for name in ["passwd", "group", "hosts", "hostname"] {
            mounts.push(Mount::ReadOnly { source: spec.etc_dir.join(name), dest: Path::new("/etc").join(name) });
        }
        // A hidden path inside anything shown is covered.
        let shown: Vec<PathBuf> = mounts
            .iter()
            .filter_map(|m| match m {
                Mount::ReadOnly { dest, .. } => Some(dest.clone()),
                _ => None,
            })
            .collect();
        for h in &hidden {
            if shown.iter().any(|s| h.starts_with(s) && h != s) {
                if h.is_dir() {
                    mounts.push(Mount::Tmpfs { at: h.clone(), bytes: Some(4096) });
                } else if h.exists() {
                    mounts.push(Mount::EmptyFile { at: h.clone() });
                }
            }
        }
        mounts.push(Mount::Writable { source: spec.work_tree.to_path_buf(), dest: PathBuf::from(super::SANDBOX_REPO) });
        World { mounts, home }
    }

    /// The sandbox's own `/etc` files, written into `dir` (which must exist).
    pub fn write_etc(dir: &Path, home: &Path) -> std::io::Result<()> {
        let id = SANDBOX_ID;
        let home = home.display();
        std::fs::write(
            dir.join("passwd"),
            format!(
                "root:x:0:0:root:/root:/bin/bash\nagent:x:{id}:{id}:agent:{home}:/bin/bash\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        )?;
        std::fs::write(dir.join("group"), format!("root:x:0:\nagent:x:{id}:\nnogroup:x:65534:\n"))?;
        std::fs::write(dir.join("hosts"), format!("127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost\n"))?;
        std::fs::write(dir.join("hostname"), format!("{HOSTNAME}\n"))?;
        Ok(())
    }
}

/// The home directory commands see: the host's `$HOME` path (so that tools installed under
/// it find themselves), or `/home/agent`.
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|h| h.is_absolute() && h != Path::new("/") && !SYSTEM_DIRS.iter().any(|s| h.starts_with(s)))
        .unwrap_or_else(|| PathBuf::from("/home/agent"))
}

/// `/etc/python3`, `/etc/python3.11`, ...: Debian's Python reads its sitecustomize there.
fn python_etc_entries() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/etc")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("python"))
        .collect();
    out.sort();
    out
}

/// The paths never shown: the caller's, the project checkout commands are started from (the
/// working directory, unless it is `/`, the home directory or a system directory), each made
/// absolute and canonical.
fn hidden_paths(given: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = given.iter().map(|p| p.canonicalize().unwrap_or_else(|_| p.clone())).collect();
    if let Ok(cwd) = std::env::current_dir() {
        let home = home_dir();
        let systemish = cwd == Path::new("/")
            || cwd == home
            || SYSTEM_DIRS.iter().any(|s| Path::new(s) == cwd || Path::new(s).starts_with(&cwd));
        if !systemish {
            out.push(cwd.canonicalize().unwrap_or(cwd));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Directories outside the system ones that commands need to run the tools on PATH:
/// - every PATH entry that is not under a system directory, and for `X/bin` also `X/lib`
///   (a prefix's libraries: `~/.local/lib` holds `pip install --user` packages);
/// - the whole pyenv root when PATH runs through its shims (they call `pyenv`), and the
///   active virtualenv / conda prefix;
/// - Python's user site (`$PYTHONUSERBASE` or `~/.local`, its `lib`);
/// - for each venv, the interpreter prefix its `pyvenv.cfg` names (`home = .../bin`).
///
/// Never the home directory itself or anything but these subdirectories of it, so that
/// credentials there (`~/.ssh`, `~/.cargo/credentials.toml`, `~/.netrc`, ...) stay out.
pub fn tool_dirs(home: &Path, venvs: &[PathBuf]) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = vec![];
    let path_entries: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    let system = |p: &Path| SYSTEM_DIRS.iter().any(|s| p.starts_with(s));
    for e in path_entries.iter().filter(|e| e.is_absolute() && !system(e)) {
        candidates.push(e.clone());
        if e.file_name().is_some_and(|n| n == "bin") {
            if let Some(prefix) = e.parent() {
                candidates.push(prefix.join("lib"));
            }
        }
        // pyenv's shims exec `$PYENV_ROOT/libexec/pyenv`, which needs the versions beside it.
        for root in e.ancestors().skip(1) {
            if root.join("libexec/pyenv").is_file() {
                candidates.push(root.to_path_buf());
                break;
            }
        }
    }
    for var in ["PYENV_ROOT", "VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_absolute()) {
            candidates.push(v);
        }
    }
    let user_base = std::env::var_os("PYTHONUSERBASE").map(PathBuf::from).unwrap_or_else(|| home.join(".local"));
    candidates.push(user_base.join("lib"));
    for v in venvs {
        if let Some(base) = venv_base_prefix(v) {
            candidates.push(base);
        }
    }
    let mut out: Vec<PathBuf> = vec![];
    for c in candidates {
        let Ok(c) = c.canonicalize() else { continue };
        // A directory that holds the home directory (or is it) would show all of it.
        if !c.is_dir() || system(&c) || home.starts_with(&c) || c == Path::new("/") {
            continue;
        }
        if !out.contains(&c) {
            out.push(c);
        }
    }
    // A directory inside another one shown is already there.
    let all = out.clone();
    out.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
    out
}

/// The interpreter prefix a venv was made from (`home = /x/bin` in its `pyvenv.cfg` → `/x`).
fn venv_base_prefix(venv: &Path) -> Option<PathBuf> {
    let cfg = std::fs::read_to_string(venv.join("pyvenv.cfg")).ok()?;
    let home = cfg.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "home").then(|| PathBuf::from(v.trim()))
    })?;
    let prefix = if home.file_name().is_some_and(|n| n == "bin") { home.parent()?.to_path_buf() } else { home };
    Some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_paths_inside_shown_directories_are_covered_and_shown_ones_inside_hidden_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let venv = root.join("venv");
        let secret = venv.join("secret");
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let work = root.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let spec = WorldSpec {
            work_tree: &work,
            visible: std::slice::from_ref(&venv),
            hidden: std::slice::from_ref(&secret),
            etc_dir: &root.join("etc"),
            tmp_bytes: Some(1 << 20),
        };
        let w = World::build(&spec);
        assert!(w.mounts.contains(&Mount::ReadOnly { source: venv.clone(), dest: venv.clone() }));
        assert!(w.mounts.contains(&Mount::Tmpfs { at: secret.clone(), bytes: Some(4096) }), "{:#?}", w.mounts);
        // The task's venv inside a hidden directory (a suite keeps its venvs) is still the
        // task's; what is hidden inside it stays covered.
        let spec = WorldSpec { hidden: &[root.clone(), secret.clone()], ..spec };
        let w = World::build(&spec);
        assert!(w.mounts.contains(&Mount::ReadOnly { source: venv.clone(), dest: venv.clone() }));
        assert!(w.mounts.contains(&Mount::Tmpfs { at: secret.clone(), bytes: Some(4096) }));
        // The sandbox's own /etc files are shown even though they sit in a hidden directory.
        assert!(w.mounts.contains(&Mount::ReadOnly { source: root.join("etc/passwd"), dest: "/etc/passwd".into() }));
        // Whatever is hidden, the work tree is the task's and is shown writable.
        assert!(w.mounts.iter().any(|m| matches!(m, Mount::Writable { source, .. } if *source == work)));
    }

    #[test]
    fn tool_dirs_never_include_the_home_directory_itself() {
        let home = home_dir();
        for d in tool_dirs(&home, &[]) {
            assert!(!home.starts_with(&d), "{} would show all of {}", d.display(), home.display());
            assert!(d != Path::new("/"));
        }
    }
}
