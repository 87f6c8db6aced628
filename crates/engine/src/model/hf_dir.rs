//! Writing an HF model directory the way transformers' `save_pretrained` does: the weights in
//! safetensors shards of at most a given size (`model-00001-of-00003.safetensors` ... with
//! `model.safetensors.index.json`, or one `model.safetensors`), `config.json`, and the
//! tokenizer and generation files of the directory the model came from.
//!
//! Each tensor's bytes are made only when its shard is written, so a model is never held twice.
//! The directory is built under a temporary name beside the destination and renamed into
//! place at the end: the destination is never half-written.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::View;
use serde_json::json;

use super::export::ExportDtype;
use crate::util::write_atomic;

/// transformers' default `max_shard_size`.
pub const DEFAULT_MAX_SHARD_SIZE: &str = "5GB";

/// The files of a model directory besides its weights and config that a copy must keep.
const COMPANION_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Makes a tensor's f32 values when they are needed.
pub type Values<'a> = Box<dyn Fn() -> Vec<f32> + 'a>;

/// One tensor to write; `values` runs when its shard is written.
pub struct LazyTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: ExportDtype,
    pub values: Values<'a>,
}

impl LazyTensor<'_> {
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

impl View for &LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.dtype.encode(&(self.values)()))
    }

    fn data_len(&self) -> usize {
        self.bytes() as usize
    }
}

/// A size as transformers' `max_shard_size` takes it: bytes, or a number with a unit
/// (`KB`/`MB`/`GB`/`TB` are powers of 1000, `KiB`/`MiB`/`GiB`/`TiB` of 1024), e.g. `5GB`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), &t[split..]);
    let multiplier: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        _ => bail!("size {s:?}: unknown unit {unit:?} (use bytes, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"),
    };
    let value: f64 = number.parse().with_context(|| format!("size {s:?} is not a number with a unit, e.g. 5GB"))?;
    if !(value.is_finite() && value > 0.0) {
        bail!("size {s:?} must be positive");
    }
    Ok((value * multiplier as f64) as u64)
}

/// Groups tensors of `sizes` bytes into shards as huggingface_hub's
/// `split_state_dict_into_shards_factory` does: in order, a new shard when the next tensor
/// would overflow the current one; a tensor larger than the limit alone in a shard of its own.
fn plan_shards(sizes: &[u64], max_bytes: u64) -> Vec<Vec<usize>> {
    let (mut shards, mut current, mut current_size) = (vec![], vec![], 0);
    for (i, &size) in sizes.iter().enumerate() {
        if size > max_bytes {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max_bytes && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes the weights as shards of at most `max_shard_bytes` into `dir`, with the index when
/// there is more than one shard.
fn write_weights(dir: &Path, tensors: &[LazyTensor], max_shard_bytes: u64) -> Result<()> {
    let sizes: Vec<u64> = tensors.iter().map(LazyTensor::bytes).collect();
    let shards = plan_shards(&sizes, max_shard_bytes);
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (s, members) in shards.iter().enumerate() {
        let file =
            if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", s + 1) };
        let metadata = Some([("format".to_string(), "pt".to_string())].into());
        let views = members.iter().map(|&i| (tensors[i].name.as_str(), &tensors[i]));
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, metadata, &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        sync(&path)?;
        for &i in members {
            weight_map.insert(tensors[i].name.clone(), file.clone());
        }
    }
    if n > 1 {
        let params: usize = tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
        let index = json!({
            "metadata": {"total_parameters": params, "total_size": sizes.iter().sum::<u64>()},
            "weight_map": weight_map,
        });
        write_atomic(&dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
    }
    Ok(())
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", path.display()))
}

/// Writes a model directory at `out`: `tensors` (in state-dict order) sharded at
/// `max_shard_bytes`, `config` as config.json, and the companion files of `source`. A
/// non-empty `out` is refused unless `overwrite`.
pub fn write_hf_dir(
    tensors: &[LazyTensor],
    config: &serde_json::Value,
    source: &Path,
    out: &Path,
    max_shard_bytes: u64,
    overwrite: bool,
) -> Result<()> {
    replace_dir(out, overwrite, |tmp| {
        write_weights(tmp, tensors, max_shard_bytes)?;
        write_atomic(&tmp.join("config.json"), serde_json::to_string_pretty(config)?.as_bytes())?;
        for f in COMPANION_FILES {
            let from = source.join(f);
            if from.exists() {
                std::fs::copy(&from, tmp.join(f)).with_context(|| format!("cannot copy {}", from.display()))?;
                sync(&tmp.join(f))?;
            }
        }
        // A GGUF source carries its tokenizer and template in metadata: written out as files.
        if super::gguf::is_gguf(source) {
            for (f, bytes) in super::gguf::Gguf::open(source)?.hf_companion_files()? {
                write_atomic(&tmp.join(f), &bytes)?;
            }
        }
        Ok(())
    })
}

/// Whether `out` may be written (refused: a file, or a non-empty directory without
/// `overwrite`); returns whether it holds anything. Checked again when writing; callers check
/// first to fail before long work.
pub fn check_destination(out: &Path, overwrite: bool) -> Result<bool> {
    if out.exists() && !out.is_dir() {
        bail!("{} exists and is not a directory", out.display());
    }
    let non_empty = out.exists()
        && std::fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))?.next().is_some();
    if non_empty && !overwrite {
        bail!("{} is not empty; pass --overwrite to replace it", out.display());
    }
    Ok(non_empty)
}

/// Builds a directory with `fill` under a temporary name beside `out`, then renames it to
/// `out`, so that `out` holds the old contents or all of the new ones. A non-empty `out` is
/// refused unless `overwrite`.
pub fn replace_dir(out: &Path, overwrite: bool, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let non_empty = check_destination(out, overwrite)?;
    let name = out.file_name().with_context(|| format!("{} has no directory name", out.display()))?.to_string_lossy();
    let sibling = |suffix: &str| -> PathBuf { out.with_file_name(format!(".{name}.{suffix}")) };
    let (tmp, old) = (sibling("partial"), sibling("old"));
    for leftover in [&tmp, &old] {
        // From an export that was killed.
        if leftover.exists() {
            std::fs::remove_dir_all(leftover).with_context(|| format!("cannot remove {}", leftover.display()))?;
        }
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync(&tmp)?;
    if non_empty {
        std::fs::rename(out, &old).with_context(|| format!("cannot move {} aside", out.display()))?;
    }
    // An empty directory at `out` is replaced by the rename itself.
    std::fs::rename(&tmp, out).with_context(|| format!("cannot move {} into place", tmp.display()))?;
    if non_empty {
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("1.5 kb").unwrap(), 1500);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5XB").unwrap_err().to_string().contains("unknown unit"));
        assert!(parse_size("GB").is_err() && parse_size("0MB").is_err() && parse_size("-1KB").is_err());
    }

    #[test]
    fn shards_split_like_huggingface_hub() {
        assert_eq!(plan_shards(&[4, 4, 4], 10), vec![vec![0, 1], vec![2]]);
        assert_eq!(plan_shards(&[4, 4, 4], 100), vec![vec![0, 1, 2]]);
        // An oversized tensor gets a shard of its own, placed when it is met.
        assert_eq!(plan_shards(&[4, 30, 4, 4], 10), vec![vec![1], vec![0, 2], vec![3]]);
        assert_eq!(plan_shards(&[30], 10), vec![vec![0]]);
    }

    #[test]
    fn replace_dir_refuses_non_empty_and_never_leaves_partial_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        replace_dir(&out, false, |d| Ok(std::fs::write(d.join("a"), "1")?)).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("a")).unwrap(), "1");
        let e = replace_dir(&out, false, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("--overwrite"), "{e}");
        // A failing fill leaves the old contents.
        assert!(replace_dir(&out, true, |_| bail!("boom")).is_err());
        assert_eq!(std::fs::read_to_string(out.join("a")).unwrap(), "1");
        replace_dir(&out, true, |d| Ok(std::fs::write(d.join("b"), "2")?)).unwrap();
        assert!(!out.join("a").exists() && out.join("b").exists());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out")], "no temporary directory is left");
        // An empty directory is not "non-empty".
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        replace_dir(&empty, false, |d| Ok(std::fs::write(d.join("c"), "3")?)).unwrap();
        assert!(empty.join("c").exists());
    }
}
