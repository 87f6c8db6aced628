//! TensorBoard event files: every scalar a training stage logs, per step, for
//! `tensorboard --logdir runs/` (or `wandb sync --sync-tensorboard`).
//!
//! The format is small enough to write here: a file of TFRecords (u64 LE length, masked CRC-32C
//! of the length, the data, masked CRC-32C of the data), each an `Event` protobuf — wall time
//! (field 1), step (2), and either the file version `brain.Event:2` (3, the first record), a
//! `Summary` of `{tag, simple_value}` values (5) or a `SessionLog` (7).
//!
//! A stage writes `events.out.tfevents.<secs>.<host>.<pid>.protege` into its run directory, one
//! record per step, flushed as it is written. A fresh run removes the event files of an earlier
//! one; a resumed run cuts the old files back to the checkpoint's step (as `metrics.jsonl` is
//! cut) and starts a new file with a `SessionLog` START at the step it continues from, which
//! also makes TensorBoard's own purge drop anything later in older files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::util::write_atomic;

const PREFIX: &str = "events.out.tfevents.";
const SUFFIX: &str = ".protege";

/// CRC-32C (Castagnoli), bitwise-reflected, table driven.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// What an event carries besides its time and step.
enum Payload<'a> {
    FileVersion,
    Scalars(&'a [(String, f64)]),
    SessionStart,
}

fn event(wall_time: f64, step: u64, payload: Payload) -> Vec<u8> {
    let mut e = vec![0x09]; // field 1, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint
    varint(&mut e, step);
    match payload {
        Payload::FileVersion => bytes_field(&mut e, 3, b"brain.Event:2"),
        Payload::Scalars(values) => {
            let mut summary = vec![];
            for (tag, v) in values {
                let mut value = vec![];
                bytes_field(&mut value, 1, tag.as_bytes());
                value.push(0x15); // field 2, 32-bit
                value.extend_from_slice(&(*v as f32).to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut e, 5, &summary);
        }
        // SessionLog { status: START (1) }
        Payload::SessionStart => bytes_field(&mut e, 7, &[0x08, 0x01]),
    }
    e
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or fails.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap_or(0)]).into()
    } else {
        String::new()
    };
    let name: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// This crate's event files in `dir`, oldest first (TensorBoard reads them in name order).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    if dir.is_dir() {
        for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(PREFIX) && name.ends_with(SUFFIX) {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The records of an event file: (step, the record's bytes). Stops at a torn or corrupt record
/// (the end of a killed run's file).
fn read_records(path: &Path) -> Result<Vec<(u64, Vec<u8>)>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = vec![];
    let mut at = 0;
    while at + 12 <= data.len() {
        let len_bytes = &data[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().expect("4 bytes"));
        let end = at.saturating_add(12).saturating_add(len).saturating_add(4);
        if crc != masked_crc(len_bytes) || end > data.len() {
            break;
        }
        let body = &data[at + 12..at + 12 + len];
        if u32::from_le_bytes(data[end - 4..end].try_into().expect("4 bytes")) != masked_crc(body) {
            break;
        }
        out.push((event_step(body), data[at..end].to_vec()));
        at = end;
    }
    Ok(out)
}

/// The step (field 2) of an encoded `Event`, 0 when absent.
fn event_step(e: &[u8]) -> u64 {
    let mut at = 0;
    let read_varint = |at: &mut usize| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *e.get(*at)?;
            *at += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    };
    while at < e.len() {
        let Some(key) = read_varint(&mut at) else { return 0 };
        match (key >> 3, key & 7) {
            (2, 0) => return read_varint(&mut at).unwrap_or(0),
            (_, 0) => {
                read_varint(&mut at);
            }
            (_, 1) => at += 8,
            (_, 5) => at += 4,
            (_, 2) => {
                let Some(n) = read_varint(&mut at) else { return 0 };
                at = at.saturating_add(n as usize);
            }
            _ => return 0,
        }
    }
    0
}

/// The numbers of a metrics line as TensorBoard scalars: `prefix/key` for each numeric field
/// (`step` is the step, not a scalar), `prefix/key/sub` for those of a nested object
/// (the exit statuses); strings and absent values are left out.
pub fn scalars_of(prefix: &str, v: &Value) -> Vec<(String, f64)> {
    let mut out = vec![];
    if let Value::Object(m) = v {
        for (k, x) in m {
            match x {
                Value::Number(n) if k != "step" => out.extend(n.as_f64().map(|f| (format!("{prefix}/{k}"), f))),
                Value::Object(_) => out.extend(scalars_of(&format!("{prefix}/{k}"), x)),
                _ => {}
            }
        }
    }
    out
}

/// An event file being written.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// The event file of a stage in `dir`: a fresh run (`resumed_at` = `None`) removes the
    /// event files of an earlier run there; a run resumed after step `s` cuts the existing
    /// files to steps up to `s` and marks the new file's start at `s + 1`.
    pub fn for_run(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        for f in event_files(dir)? {
            match resumed_at {
                None => std::fs::remove_file(&f).with_context(|| format!("cannot remove {}", f.display()))?,
                Some(s) => cut(&f, s)?,
            }
        }
        Self::new_file(dir, resumed_at.map_or(1, |s| s + 1))
    }

    /// A new event file in `dir`, named to sort after the ones there, starting with the file
    /// version and a `SessionLog` START at `first_step` (TensorBoard drops what earlier files
    /// hold at or after it). Leaves other files alone.
    pub fn new_file(dir: &Path, first_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut secs = now() as u64;
        for f in event_files(dir)? {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let older = name[PREFIX.len()..].split('.').next().and_then(|s| s.parse::<u64>().ok());
            secs = secs.max(older.map_or(0, |o| o + 1));
        }
        let path = dir.join(format!("{PREFIX}{secs:010}.{}.{}{SUFFIX}", hostname(), std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = Self { file, path };
        let t = now();
        let mut head = record(&event(t, 0, Payload::FileVersion));
        head.extend(record(&event(t, first_step, Payload::SessionStart)));
        w.write(&head)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event with every scalar of `step`, written at once and flushed.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let r = record(&event(now(), step, Payload::Scalars(values)));
        self.write(&r)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Rewrites an event file without its records after `step` (and a torn last record); the file
/// version record (step 0) stays.
fn cut(path: &Path, step: u64) -> Result<()> {
    let before = std::fs::metadata(path)?.len() as usize;
    let kept: Vec<u8> = read_records(path)?.into_iter().filter(|(s, _)| *s <= step).flat_map(|(_, r)| r).collect();
    if kept.len() != before {
        write_atomic(path, &kept)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn records_round_trip_and_cutting_keeps_earlier_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::for_run(dir.path(), None).unwrap();
        for s in 1..=5 {
            w.scalars(s, &[("sft/loss".into(), s as f64)]).unwrap();
        }
        let path = w.path().to_path_buf();
        drop(w);
        // A torn last record, as a killed run leaves.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&record(&event(0.0, 6, Payload::Scalars(&[])))[..10]).unwrap();
        let steps: Vec<u64> = read_records(&path).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(steps, [0, 1, 1, 2, 3, 4, 5]);

        let w2 = EventWriter::for_run(dir.path(), Some(3)).unwrap();
        let steps: Vec<u64> = read_records(&path).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(steps, [0, 1, 1, 2, 3]);
        assert!(w2.path() > path.as_path(), "the new file sorts after the old one");
        let steps: Vec<u64> = read_records(w2.path()).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(steps, [0, 4]);
        // A fresh run starts over.
        drop(w2);
        let w3 = EventWriter::for_run(dir.path(), None).unwrap();
        assert_eq!(event_files(dir.path()).unwrap(), [w3.path().to_path_buf()]);
    }

    #[test]
    fn metrics_become_prefixed_scalars() {
        let v = serde_json::json!({"step": 3, "stage": "a", "loss": 0.5, "eval_loss": null, "exit": {"submitted": 2}});
        assert_eq!(scalars_of("rl", &v), [("rl/loss".to_string(), 0.5), ("rl/exit/submitted".to_string(), 2.0)]);
    }
}
