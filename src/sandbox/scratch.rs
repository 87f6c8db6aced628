//! Where a run keeps its work trees: `$TMPDIR/protege-work-<uid>/<kind>-<pid>-<n>/`, locked (an
//! `flock` on its `.lock`) for as long as the run holds it and removed when dropped — on an
//! error, a panic or an interrupt (see [`crate::interrupt`]) alike. A directory left by a run
//! that could not clean up (SIGKILL, a crash, a power cut) is removed by the next run that
//! starts: its lock is free.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

pub struct Scratch {
    dir: PathBuf,
    _lock: File,
}

/// `$TMPDIR/protege-work-<uid>`, private to its owner.
pub fn base_dir() -> PathBuf {
    // SAFETY: getuid cannot fail.
    std::env::temp_dir().join(format!("protege-work-{}", unsafe { libc::getuid() }))
}

/// Creates `base` (0700) or checks that the existing one is a directory of ours that nobody
/// else can write: a shared /tmp must not let another user prepare it.
fn private_dir(base: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::create_dir(base) {
        Ok(()) => std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o700))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", base.display())),
    }
    let meta = std::fs::symlink_metadata(base)?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "{} is not a private directory of uid {uid} (a symlink, another owner, or writable by others); remove it",
            base.display()
        );
    }
    Ok(())
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock on an open descriptor.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl Scratch {
    /// A new locked scratch directory; removes what killed runs left first.
    pub fn new(kind: &str) -> Result<Scratch> {
        let base = base_dir();
        if let Some(parent) = base.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        private_dir(&base)?;
        sweep(&base);
        for n in 0..1000u32 {
            let dir = base.join(format!("{kind}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    let lock = File::create(dir.join(".lock"))?;
                    if !try_lock(&lock) {
                        anyhow::bail!("cannot lock {}", dir.display());
                    }
                    return Ok(Scratch { dir: dir.canonicalize()?, _lock: lock });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
            }
        }
        anyhow::bail!("cannot create a scratch directory in {}", base.display())
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        super::remove_tree(&self.dir);
    }
}

/// Removes every scratch directory in `base` whose lock is free (its run is gone). One
/// without a lock file yet is being made, unless it is over a minute old.
pub fn sweep(base: &Path) {
    for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let dir = e.path();
        let stale = match File::open(dir.join(".lock")) {
            Ok(f) => try_lock(&f),
            Err(_) => e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60)),
        };
        if stale {
            super::remove_tree(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_scratch_survives_a_sweep_and_a_released_one_is_removed() {
        let a = Scratch::new("test").unwrap();
        std::fs::write(a.path().join("x"), "1").unwrap();
        sweep(&base_dir());
        assert!(a.path().join("x").exists(), "a live run's directory was swept");
        // A killed run: its directory is there, its lock is not held by anyone.
        let dead = base_dir().join(format!("test-dead-{}", std::process::id()));
        std::fs::create_dir_all(&dead).unwrap();
        File::create(dead.join(".lock")).unwrap();
        sweep(&base_dir());
        assert!(!dead.exists());
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
    }
}
