//! Reading GGUF files (llama.cpp's format): the header, metadata and tensor index parsed and
//! validated up front, the tensor data memory-mapped and dequantised to f32 on request.
//!
//! Layout (little-endian, versions 2 and 3): magic `GGUF`, version u32, tensor count u64,
//! metadata count u64, the metadata key/values, the tensor infos (name, n_dims, `ne[n_dims]`,
//! type, offset), then the data section at the next multiple of `general.alignment` (32 by
//! default); tensor offsets are relative to it. `ne[0]` is the fastest-varying dimension, so
//! the row-major shape is `ne` reversed (an HF `[out, in]` weight has `ne = [in, out]`).
//!
//! The dequantisers follow ggml's reference C (`ggml-quants.c`: `dequantize_row_q4_0`, `q5_0`,
//! `q8_0`, `q4_K`, `q5_K`, `q6_K`, `get_scale_min_k4`) operation for operation, so they give
//! the same f32 values bit for bit (tested against gguf-py's numpy port).
//!
//! Every failure names the file and says what was expected.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;

/// A model given as a file (rather than an HF directory) is read as GGUF.
pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The GGUF type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }
}

/// A ggml tensor type: its id, name, and block layout (elements per block, bytes per block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block_elems: usize,
    pub block_bytes: usize,
}

/// ggml's type table (`ggml.c` `type_traits`, as gguf-py 0.19's `GGML_QUANT_SIZES`): every
/// type is known so that a file parses and only an unsupported tensor is refused, by name.
const GGML_TYPES: [(u32, &str, usize, usize); 34] = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

/// The types [`dequantize`] reads.
pub const SUPPORTED: [&str; 9] = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES.iter().find(|t| t.0 == id).map(|&(id, name, block_elems, block_bytes)| Self {
            id,
            name,
            block_elems,
            block_bytes,
        })
    }

    pub fn by_name(name: &str) -> Option<Self> {
        GGML_TYPES.iter().find(|t| t.1 == name).and_then(|t| Self::from_id(t.0))
    }
}

/// One tensor of the index.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// `ne`: fastest-varying dimension first, as stored.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub start: usize,
    pub nbytes: usize,
}

impl TensorInfo {
    /// The row-major shape (slowest dimension first): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An opened GGUF file: mapped, header and index parsed and checked.
pub struct Gguf {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

/// Reads little-endian fields, every read bounds-checked against the file.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

/// Nested arrays deeper than this are refused (none of llama.cpp's keys nest at all).
const MAX_ARRAY_DEPTH: usize = 4;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            anyhow!(
                "{} is truncated: {what} at byte {} needs {n} bytes, but the file has {} bytes",
                self.path.display(),
                self.pos,
                self.bytes.len()
            )
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_item_bytes` each, refused when the rest of the file
    /// could not hold them (so a corrupt count cannot make us allocate without bound).
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            bail!(
                "{}: {what} at byte {at} is {n}, more than the {left} bytes left in the file can hold \
                 (corrupt or truncated file)",
                self.path.display()
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(&format!("the length of {what}"), 1)?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| anyhow!("{}: {what} at byte {at} is not valid UTF-8", self.path.display()))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{}: {what} is a bool of value {b}, expected 0 or 1", self.path.display()),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("{}: {what} nests arrays deeper than {MAX_ARRAY_DEPTH}", self.path.display());
                }
                let item_ty = self.u32(&format!("the item type of {what}"))?;
                // Strings take 8 bytes at least (their length), other items one.
                let n = self.count(&format!("the length of {what}"), if item_ty == 8 { 8 } else { 1 })?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(item_ty, &format!("{what}[{i}]"), depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => bail!("{}: {what} has value type {t}, expected a GGUF type 0..=12", self.path.display()),
        })
    }
}

/// ggml's limit on tensor dimensions.
const MAX_DIMS: usize = 4;

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only; a file modified while we run is a user error that at
        // worst yields wrong numbers, as with any reader of mapped weights.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let (version, metadata, tensors) = parse(&mmap, path)?;
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Self { path: path.to_path_buf(), mmap, version, metadata, tensors, index })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The model's chat template (`tokenizer.chat_template`, Jinja), when the file has one.
    pub fn chat_template(&self) -> Option<String> {
        self.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string)
    }

    fn key<'s, T>(&'s self, key: &str, expected: &str, read: impl Fn(&'s Value) -> Option<T>) -> Result<T> {
        let file = self.path.display();
        let v = self.get(key).ok_or_else(|| anyhow!("{file}: metadata key {key} is missing (expected {expected})"))?;
        read(v).ok_or_else(|| anyhow!("{file}: metadata key {key} is a {}, expected {expected}", v.type_name()))
    }

    /// A required non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.key(key, "a non-negative integer", Value::as_u64)
    }

    /// A required float.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.key(key, "a float", Value::as_f64)
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.key(key, "a string", Value::as_str)
    }

    /// A required array of strings.
    pub fn get_strs(&self, key: &str) -> Result<Vec<&str>> {
        self.key(key, "an array of strings", |v| match v {
            Value::Array(a) => a.iter().map(Value::as_str).collect(),
            _ => None,
        })
    }

    /// A required array of integers.
    pub fn get_ints(&self, key: &str) -> Result<Vec<i64>> {
        self.key(key, "an array of integers", |v| match v {
            Value::Array(a) => a.iter().map(Value::as_i64).collect(),
            _ => None,
        })
    }

    /// The raw bytes of `t`'s data (in range: checked when the file was opened).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.start..t.start + t.nbytes]
    }

    /// Tensor `name` as f32 values in row-major order of [`TensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| anyhow!("{}: no tensor {name}", self.path.display()))?;
        dequantize(t.ty, self.data(t), t.numel()).with_context(|| format!("{}: tensor {name}", self.path.display()))
    }
}

fn parse(bytes: &[u8], path: &Path) -> Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>)> {
    let file = path.display();
    let mut r = Reader { bytes, pos: 0, path };
    let magic = r.take(4, "the magic number")?;
    if magic != b"GGUF" {
        bail!("{file} is not a GGUF file: it starts with {magic:?}, expected the magic \"GGUF\"");
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        bail!("{file}: GGUF version {version} is not supported (expected 2 or 3, little-endian)");
    }
    // A tensor info takes 8 + 4 + 8 + 4 + 8 bytes at least; a key/value 8 + 4 + 1.
    let n_tensors = r.count("the tensor count", 32)?;
    let n_kv = r.count("the metadata count", 13)?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("the value type of {key}"))?;
        let value = r.value(ty, &format!("metadata {key}"), 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!("{file}: metadata key {key} appears twice");
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as usize,
        Some(v) => bail!("{file}: general.alignment is {v:?}, expected a uint32 power of two"),
    };
    let mut infos = Vec::with_capacity(n_tensors);
    let mut seen = HashMap::new();
    for i in 0..n_tensors {
        let name = r.string(&format!("the name of tensor #{i}"))?;
        if seen.insert(name.clone(), i).is_some() {
            bail!("{file}: tensor {name} appears twice in the tensor index");
        }
        let n_dims = r.u32(&format!("the dimension count of tensor {name}"))? as usize;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            bail!("{file}: tensor {name} has {n_dims} dimensions, expected 1 to {MAX_DIMS}");
        }
        let mut dims = Vec::with_capacity(n_dims);
        for d in 0..n_dims {
            let ne = r.u64(&format!("dimension {d} of tensor {name}"))?;
            if ne == 0 || ne > i64::MAX as u64 {
                bail!("{file}: tensor {name} has dimension {d} of size {ne}, expected a positive size");
            }
            dims.push(ne as usize);
        }
        let ty_id = r.u32(&format!("the type of tensor {name}"))?;
        let ty = GgmlType::from_id(ty_id)
            .ok_or_else(|| anyhow!("{file}: tensor {name} has unknown ggml type id {ty_id}"))?;
        let offset = r.u64(&format!("the data offset of tensor {name}"))?;
        infos.push((name, dims, ty, offset));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(n_tensors);
    for (name, dims, ty, offset) in infos {
        let shape_err = || anyhow!("{file}: tensor {name} with dimensions {dims:?} has too many elements");
        let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(shape_err)?;
        if !dims[0].is_multiple_of(ty.block_elems) {
            bail!(
                "{file}: tensor {name} of type {} has {} elements per row, expected a multiple of its block size {}",
                ty.name,
                dims[0],
                ty.block_elems
            );
        }
        let nbytes = (numel / ty.block_elems).checked_mul(ty.block_bytes).ok_or_else(shape_err)?;
        if !offset.is_multiple_of(alignment as u64) {
            bail!("{file}: tensor {name} has data offset {offset}, expected a multiple of the alignment {alignment}");
        }
        let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
        let end = start.and_then(|s| s.checked_add(nbytes));
        let Some((start, end)) = start.zip(end).filter(|&(_, e)| e <= bytes.len()) else {
            bail!(
                "{file}: tensor {name} ({} {dims:?}, {nbytes} bytes at data offset {offset}) ends past the end of \
                 the file ({} bytes): the file is truncated or corrupt",
                ty.name,
                bytes.len()
            );
        };
        debug_assert!(end > start);
        tensors.push(TensorInfo { name, dims, ty, start, nbytes });
    }
    // Tensors may not share bytes: a small crafted file could otherwise declare a model of any
    // size by pointing every tensor at the same data.
    let mut by_start: Vec<&TensorInfo> = tensors.iter().collect();
    by_start.sort_by_key(|t| t.start);
    for w in by_start.windows(2) {
        if w[0].start + w[0].nbytes > w[1].start {
            bail!("{file}: the data of tensors {} and {} overlap: the file is corrupt", w[0].name, w[1].name);
        }
    }
    Ok((version, metadata, tensors))
}

// ---------------------------------------------------------------- Qwen2

/// GGUF names of a layer's tensors (after `blk.N.`) and their HF names (after `model.layers.N.`).
const LAYER_NAMES: [(&str, &str); 12] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The GGUF name of the HF tensor `hf` (`model.layers.3.mlp.up_proj.weight` ->
/// `blk.3.ffn_up.weight`).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some(&(g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    LAYER_NAMES.iter().find(|(_, h)| *h == suffix).map(|(g, _)| format!("blk.{layer}.{g}"))
}

impl Gguf {
    /// An HF `config.json` for the Qwen2 model this file holds, from its `qwen2.*` metadata;
    /// [`Qwen2Config::from_json`](super::Qwen2Config::from_json) validates it.
    pub fn hf_config(&self) -> Result<serde_json::Value> {
        let file = self.path.display();
        let arch = self.get_str("general.architecture")?;
        if arch != "qwen2" {
            bail!("{file}: general.architecture is {arch:?}; protege implements \"qwen2\" only");
        }
        let n = |key: &str| self.get_u64(&format!("qwen2.{key}"));
        let tokens = self.get_strs("tokenizer.ggml.tokens")?;
        let optional_id = |key: &str| -> Result<serde_json::Value> {
            Ok(match self.get(key) {
                None => serde_json::Value::Null,
                Some(_) => self.get_u64(key)?.into(),
            })
        };
        let mut config = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "vocab_size": tokens.len(),
            "hidden_size": n("embedding_length")?,
            "intermediate_size": n("feed_forward_length")?,
            "num_hidden_layers": n("block_count")?,
            "num_attention_heads": n("attention.head_count")?,
            "num_key_value_heads": n("attention.head_count_kv")?,
            "max_position_embeddings": n("context_length")?,
            "rms_norm_eps": self.get_f64("qwen2.attention.layer_norm_rms_epsilon")?,
            "rope_theta": self.get_f64("qwen2.rope.freq_base")?,
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "use_sliding_window": false,
            "bos_token_id": optional_id("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": optional_id("tokenizer.ggml.eos_token_id")?,
        });
        if self.get("qwen2.attention.key_length").is_some() {
            config["head_dim"] = n("attention.key_length")?.into();
        }
        // Scaled RoPE is refused by the config check rather than silently ignored.
        if let Some(kind) = self.get("qwen2.rope.scaling.type") {
            if kind.as_str() != Some("none") {
                let kind = kind.as_str().unwrap_or(kind.type_name()).to_string();
                config["rope_scaling"] = serde_json::json!({ "type": kind });
            }
        }
        Ok(config)
    }

    /// The tokenizer and generation files of an HF directory of this model:
    /// `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
    /// `generation_config.json`.
    pub fn hf_companion_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let tok = super::gguf_tokenizer::tokenizer(self)?;
        let tokenizer_json =
            tok.to_string(true).map_err(|e| anyhow!("{}: cannot write the tokenizer: {e}", self.path.display()))?;
        let piece = |key: &str| -> Result<serde_json::Value> {
            Ok(match self.get(key) {
                None => serde_json::Value::Null,
                Some(_) => tok.id_to_token(self.get_u64(key)? as u32).into(),
            })
        };
        let id = |key: &str| self.get(key).and_then(Value::as_u64);
        let tokenizer_config = serde_json::json!({
            "tokenizer_class": "Qwen2Tokenizer",
            "add_bos_token": false,
            "bos_token": null,
            "eos_token": piece("tokenizer.ggml.eos_token_id")?,
            "pad_token": piece("tokenizer.ggml.padding_token_id")?,
            "unk_token": null,
            "clean_up_tokenization_spaces": false,
            "errors": "replace",
            "split_special_tokens": false,
            "model_max_length": self.get_u64("qwen2.context_length")?,
            "chat_template": self.chat_template(),
        });
        let generation_config = serde_json::json!({
            "bos_token_id": id("tokenizer.ggml.bos_token_id"),
            "eos_token_id": id("tokenizer.ggml.eos_token_id"),
            "pad_token_id": id("tokenizer.ggml.padding_token_id"),
        });
        let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON values serialise");
        Ok(vec![
            ("tokenizer.json", tokenizer_json.into_bytes()),
            ("tokenizer_config.json", pretty(&tokenizer_config)),
            ("generation_config.json", pretty(&generation_config)),
        ])
    }

    /// The model's hyper-parameters, checked.
    pub fn qwen2_config(&self) -> Result<super::Qwen2Config> {
        let config = super::Qwen2Config::from_json(&self.hf_config()?.to_string()).with_context(|| {
            format!("invalid Qwen2 config in the metadata of {} (qwen2.* keys)", self.path.display())
        })?;
        self.check_dims_against_tensors(&config)?;
        // Every tensor must be one the model reads: ignoring weights would give a different model.
        let expected: std::collections::HashSet<String> =
            super::param_shapes(&config).iter().filter_map(|(hf, _)| gguf_name(hf)).collect();
        if let Some(t) = self.tensors.iter().find(|t| !expected.contains(&t.name)) {
            bail!(
                "{}: tensor {} is not part of a Qwen2 model with {} layers{}",
                self.path.display(),
                t.name,
                config.num_layers,
                if config.tie_word_embeddings { " and tied embeddings" } else { "" }
            );
        }
        Ok(config)
    }

    /// The metadata's sizes agree with the tensors the file holds (before anything is sized by
    /// them: a hostile file could declare 2^40 layers or heads).
    fn check_dims_against_tensors(&self, c: &super::Qwen2Config) -> Result<()> {
        let file = self.path.display();
        let dims = |name: &str| -> Result<&[usize]> {
            Ok(&self.tensor(name).ok_or_else(|| anyhow!("{file}: tensor {name} is missing"))?.dims)
        };
        let q_dim = c.num_heads.checked_mul(c.head_dim);
        let kv_dim = c.num_kv_heads.checked_mul(c.head_dim);
        let expect = [
            ("token_embd.weight", Some(c.hidden_size), Some(c.vocab_size), "embedding_length and the token list"),
            ("blk.0.attn_q.weight", Some(c.hidden_size), q_dim, "attention.head_count × the head size"),
            ("blk.0.attn_k.weight", Some(c.hidden_size), kv_dim, "attention.head_count_kv × the head size"),
            ("blk.0.ffn_up.weight", Some(c.hidden_size), Some(c.intermediate_size), "feed_forward_length"),
        ];
        for (name, d0, d1, keys) in expect {
            let d = dims(name)?;
            if d.len() != 2 || Some(d[0]) != d0 || Some(d[1]) != d1 {
                bail!("{file}: tensor {name} has dimensions {d:?}, but the metadata ({keys}) says [{d0:?}, {d1:?}]");
            }
        }
        let layers = self.tensors.iter().filter(|t| t.name.ends_with(".attn_norm.weight")).count();
        if layers != c.num_layers {
            bail!("{file}: qwen2.block_count is {}, but the file holds {layers} layers", c.num_layers);
        }
        Ok(())
    }

    /// The HF tensor `hf` (which must have `shape`) as f32, dequantised.
    pub fn hf_tensor(&self, hf: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let file = self.path.display();
        let name = gguf_name(hf).ok_or_else(|| anyhow!("{hf} is not a Qwen2 tensor name"))?;
        let t =
            self.tensor(&name).ok_or_else(|| anyhow!("{file}: tensor {name} ({hf}, shape {shape:?}) is missing"))?;
        if t.shape() != shape {
            bail!(
                "{file}: tensor {name} has shape {:?} (ne {:?}), expected {shape:?} for {hf} (from the qwen2.* metadata)",
                t.shape(),
                t.dims
            );
        }
        let values = self.dequantize(&name)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "{file}: tensor {name} ({}) holds a non-finite value at element {i}: the weights are corrupt",
                t.ty.name
            );
        }
        Ok(values)
    }
}

// ---------------------------------------------------------------- dequantisation

fn f16(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// `n` values of type `ty` from `bytes` (whole blocks, `bytes.len()` matching `n`).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let block: fn(&[u8], &mut [f32]) = match ty.name {
        "F32" => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        "F16" => |b, y| y[0] = f16(b),
        "BF16" => |b, y| y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        "Q8_0" => q8_0,
        "Q4_0" => q4_0,
        "Q5_0" => q5_0,
        "Q4_K" => q4_k,
        "Q5_K" => q5_k,
        "Q6_K" => q6_k,
        other => bail!("type {other} is not supported (protege dequantises {})", SUPPORTED.join(", ")),
    };
    if !n.is_multiple_of(ty.block_elems) || bytes.len() != n / ty.block_elems * ty.block_bytes {
        bail!("{} bytes of {} do not hold {n} values", bytes.len(), ty.name);
    }
    let mut out = vec![0f32; n];
    // Blocks are independent; chunks of many blocks keep rayon's overhead small.
    let per_task = 1024;
    out.par_chunks_mut(ty.block_elems * per_task).zip(bytes.par_chunks(ty.block_bytes * per_task)).for_each(
        |(ys, bs)| {
            for (y, b) in ys.chunks_exact_mut(ty.block_elems).zip(bs.chunks_exact(ty.block_bytes)) {
                block(b, y);
            }
        },
    );
    Ok(out)
}

/// `block_q8_0`: f16 d, int8 qs[32]; y = qs * d.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// `block_q4_0`: f16 d, qs[16]; element j from the low nibble of qs[j], j + 16 from the high
/// nibble, each minus 8, times d.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q5_0`: f16 d, qh (32 high bits, u32 LE), qs[16]; as Q4_0 with a fifth bit, minus 16.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((q & 0x0F) as u32 | xh0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) as u32 | xh1) as i32 - 16) as f32 * d;
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the 12 packed
/// bytes `q`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// `block_q4_K`: f16 d, f16 dmin, scales[12], qs[128]; 8 sub-blocks of 32, each
/// `d * sc * q - dmin * m`, low nibbles of 32 bytes then their high nibbles.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16(&b[0..2]), f16(&b[2..4]));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (j, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc, m) = scale_min_k4(2 * j, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * j + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `block_q5_K`: f16 d, f16 dmin, scales[12], qh[32], qs[128]; as Q4_K with a fifth bit from
/// qh (bit 2j for the low nibbles of chunk j, bit 2j + 1 for the high).
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16(&b[0..2]), f16(&b[2..4]));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (j, (ql, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let (sc, m) = scale_min_k4(2 * j, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * j + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// `block_q6_K`: ql[128], qh[64], int8 scales[16], f16 d; two halves of 128, each value
/// `d * scale * (6-bit q - 32)`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16(&b[208..210]);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| sc[is + k] as i8 as f32;
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(name: &str) -> GgmlType {
        GgmlType::by_name(name).unwrap()
    }

    #[test]
    fn q8_0_block_by_hand() {
        // d = 0.5 (f16 0x3800), qs = -2, 0, 3, then zeros.
        let mut b = vec![0x00, 0x38, 0xFE, 0x00, 0x03];
        b.resize(34, 0);
        let y = dequantize(ty("Q8_0"), &b, 32).unwrap();
        assert_eq!(&y[..4], &[-1.0, 0.0, 1.5, 0.0]);
    }

    #[test]
    fn q4_0_nibble_order() {
        // d = 1; qs[0] = 0x9A: element 0 is 0xA - 8 = 2, element 16 is 0x9 - 8 = 1.
        let mut b = vec![0x00, 0x3C, 0x9A];
        b.resize(18, 0x88);
        let y = dequantize(ty("Q4_0"), &b, 32).unwrap();
        assert_eq!((y[0], y[16], y[1]), (2.0, 1.0, 0.0));
    }

    #[test]
    fn scale_min_k4_unpacks_the_high_bits() {
        let q = [0xC1, 0x02, 0x03, 0x04, 0x45, 0x06, 0x07, 0x08, 0x2B, 0x00, 0x00, 0x00];
        assert_eq!(scale_min_k4(0, &q), (1, 5));
        // j = 4: d = (q[8] & 0xF) | (q[0] >> 6) << 4 = 0xB | 0x30; m = q[8] >> 4 | (q[4] >> 6) << 4.
        assert_eq!(scale_min_k4(4, &q), (0x3B, 0x12));
    }

    #[test]
    fn unsupported_and_mismatched() {
        let e = dequantize(ty("Q2_K"), &[0; 84], 256).unwrap_err();
        assert!(e.to_string().contains("Q2_K"), "{e}");
        assert!(dequantize(ty("Q8_0"), &[0; 33], 32).is_err());
    }
}
