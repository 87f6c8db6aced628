//! Reading an HF checkpoint: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`, memory-mapped so that loading never copies the file.
//!
//! Every failure names the file and tensor and says what was expected.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::backend::{DType, HostTensor};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// An opened checkpoint: shards mapped, headers parsed, tensor names indexed.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name -> index into `shards`
    index: HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

fn parse(shard: &Shard) -> Result<SafeTensors<'_>> {
    SafeTensors::deserialize(&shard.mmap).map_err(|e| {
        anyhow!("{} is not a valid safetensors file ({e}); it may be truncated or corrupt", shard.path.display())
    })
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if single.exists() {
            vec!["model.safetensors".into()]
        } else if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let idx: ShardIndex = crate::inputs::json_file(&text, &index_path.display().to_string())
                .context("not a valid shard index (expected {\"weight_map\": {tensor: file}})")?;
            let mut files: Vec<String> = idx.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            files
        } else {
            bail!("no weights in {}: expected model.safetensors or model.safetensors.index.json", dir.display());
        };
        Self::open_files(dir, &files)
    }

    /// Opens the given safetensors files of `dir` as one checkpoint.
    pub fn open_files(dir: &Path, files: &[String]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for (i, name) in files.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).with_context(|| format!("cannot open weight file {}", path.display()))?;
            // SAFETY: the map is read-only; a checkpoint modified while we run is a user error that
            // at worst yields wrong numbers, as with any reader of safetensors.
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let shard = Shard { path, mmap };
            for tensor in parse(&shard)?.names() {
                if let Some(prev) = index.insert(tensor.to_string(), i) {
                    bail!("tensor {tensor} appears in both {} and {}", files[prev], name);
                }
            }
            shards.push(shard);
        }
        Ok(Self { dir: dir.to_path_buf(), shards, index })
    }

    /// Every tensor name in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The element type of tensor `name` (without checking its shape).
    pub fn dtype_of(&self, name: &str) -> Result<DType> {
        let &i = self.index.get(name).ok_or_else(|| anyhow!("no tensor {name} in {}", self.dir.display()))?;
        let shard = &self.shards[i];
        let view = parse(shard)?
            .tensor(name)
            .with_context(|| format!("{}: cannot read tensor {name}", shard.path.display()))?;
        float_dtype(view.dtype(), &shard.path, name)
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor<'_>> {
        let &i = self.index.get(name).ok_or_else(|| {
            anyhow!("tensor {name} (expected shape {shape:?}) is missing from the checkpoint in {}", self.dir.display())
        })?;
        let shard = &self.shards[i];
        let st = parse(shard)?;
        let view = st.tensor(name).with_context(|| format!("{}: cannot read tensor {name}", shard.path.display()))?;
        let file = shard.path.display();
        if view.shape() != shape {
            bail!("{file}: tensor {name} has shape {:?}, expected {shape:?} (from config.json)", view.shape());
        }
        let dtype = float_dtype(view.dtype(), &shard.path, name)?;
        let t = HostTensor { dtype, shape: shape.to_vec(), bytes: view.data() };
        if let Some(i) = t.first_non_finite() {
            bail!(
                "{file}: tensor {name} holds a non-finite value (NaN or ±inf) at element {i}: the weights are corrupt"
            );
        }
        Ok(t)
    }
}

fn float_dtype(d: Dtype, file: &Path, name: &str) -> Result<DType> {
    Ok(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => bail!("{}: tensor {name} has dtype {other:?}; expected BF16, F16 or F32", file.display()),
    })
}
