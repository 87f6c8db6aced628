//! Small file helpers every layer uses: writes that never leave a half-written file behind.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, renamed into place,
/// so a crash leaves the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// As [`write_atomic`], with the contents written by `fill` through a buffered writer (large
/// files need not be held in memory).
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    // `name.ext.tmp`: files that differ only in their extension never share a temporary.
    let mut name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?.to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    {
        let file = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        fill(&mut w).with_context(|| format!("cannot write {}", tmp.display()))?;
        let file =
            w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", tmp.display()))?;
        // On disk before the rename, so that a crash leaves the old file or the new one.
        file.sync_all().with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic_with(&path, |w| Ok(w.write_all(b"two")?)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A failing writer leaves the old file untouched.
        assert!(write_atomic_with(&path, |_| anyhow::bail!("disk full")).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
    }
}
