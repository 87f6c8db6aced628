//! GGUF in: dequantisation against gguf-py, the tiny model as GGUF against the same values as
//! an HF checkpoint, its tokenizer from metadata against tokenizer.json, and corrupt files.
//! Fixtures: tests/fixtures/gguf (tools/make_gguf_fixtures.py).

use std::path::{Path, PathBuf};

use crate::common::{fixture, Tensors};
use protege::backend::cpu::CpuBackend;
use protege::backend::Backend;
use protege::diagnostics::check::{check_logits, Reference};
use protege::generate::prompt_logits;
use protege::model::gguf::{Gguf, SUPPORTED};
use protege::model::Qwen2;
use protege::tokenizer::Tokenizer;

fn tiny_gguf() -> PathBuf {
    fixture("gguf/tiny.gguf")
}

/// Every supported type dequantises to gguf-py's values bit for bit (same f32 operations in
/// the same order as ggml's reference C, so no tolerance).
#[test]
fn dequantisation_equals_gguf_py_bit_for_bit() {
    let g = Gguf::open(&fixture("gguf/quants.gguf")).unwrap();
    let reference = Tensors::open(&fixture("gguf/quants.safetensors"));
    let mut types: Vec<&str> = vec![];
    for t in g.tensors() {
        let ours = g.dequantize(&t.name).unwrap();
        let (want, shape) = reference.f32s(&t.name);
        assert_eq!(t.shape(), shape, "{}: shape", t.name);
        assert_eq!(ours.len(), want.len(), "{}", t.name);
        let bad = ours.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(i) = bad {
            panic!("{} ({}): element {i} is {} , gguf-py gives {}", t.name, t.ty.name, ours[i], want[i]);
        }
        assert!(ours.iter().any(|v| *v != 0.0), "{}: all zero, the fixture tests nothing", t.name);
        types.push(t.ty.name);
    }
    types.sort();
    let mut supported = SUPPORTED.to_vec();
    supported.sort();
    assert_eq!(types, supported, "the fixture must cover every supported type");
}

/// An HF model directory whose weights are tiny.gguf's values as gguf-py dequantises them.
fn dequantised_hf_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(fixture("gguf/tiny_dequant.safetensors"), dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn tiny_gguf_loads_as_the_same_model() {
    let be = CpuBackend::new();
    let ours = Qwen2::load(&be, &tiny_gguf()).unwrap();
    let hf_dir = dequantised_hf_dir();
    let hf = Qwen2::load(&be, hf_dir.path()).unwrap();
    let tiny = Qwen2::load(&be, &fixture("tiny")).unwrap();

    // The config from metadata is tiny's config.json (less the informational dtype).
    let mut want = tiny.cfg.clone();
    want.dtype = None;
    assert_eq!(ours.cfg, want);

    // Every weight equals the gguf-py dequantisation exactly.
    for ((name, a), (_, b)) in ours.w.tensors().into_iter().zip(hf.w.tensors()) {
        let (a, b) = (be.to_f32(a), be.to_f32(b));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs from gguf-py");
    }
    // The f32 tensors of the GGUF are tiny's own values (a name-mapping check independent of
    // gguf-py): input_layernorm of layer 0 and o_proj of layer 0 are stored as F32.
    for name in ["model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.o_proj.weight"] {
        let pick = |m: &Qwen2<CpuBackend>| {
            m.w.tensors().into_iter().find(|(n, _)| n == name).map(|(_, b)| be.to_f32(b)).unwrap()
        };
        assert_eq!(pick(&ours), pick(&tiny), "{name}");
    }

    // Same weights, same forward: identical logits (tolerance 0).
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 455).collect();
    let a = prompt_logits(&be, &ours, &ids, None).unwrap();
    let b = prompt_logits(&be, &hf, &ids, None).unwrap();
    assert_eq!(crate::common::max_abs_diff(&a, &b), 0.0);

    // Against transformers' float32 logits of the unquantised tiny model the difference is the
    // storage rounding (F16/BF16/Q8_0, relative 3e-4 to 4e-3 per weight) of 20 of its 26
    // tensors, amplified by two layers of random weights. Measured on the 40 x 456 reference
    // logits (|logit| up to 7.7, mean 1.3): max abs 0.24, mean abs 0.021, argmax agreeing on
    // 39 of 40 rows. The bounds allow 2x; a transposed or swapped tensor gives mean errors of
    // order 1.
    let reference = Reference::load(&fixture("tiny/reference.safetensors")).unwrap();
    let c = check_logits(&be, &ours, &reference, 0.5, 0.0).unwrap();
    println!(
        "tiny.gguf vs transformers (tiny, f32): max abs {:.3e}, mean abs {:.3e}, argmax {}/{}",
        c.max_abs, c.mean_abs, c.argmax_agree, c.rows
    );
    assert!(c.passed(), "max abs {:.3e} at {:?}", c.max_abs, c.max_abs_at);
    assert!(c.mean_abs < 0.05, "mean abs {:.3e}", c.mean_abs);
    assert!(c.argmax_agree >= c.rows * 9 / 10, "argmax agrees on {}/{} rows", c.argmax_agree, c.rows);
}

#[test]
fn tokenizer_from_metadata_equals_tokenizer_json() {
    let ours = Tokenizer::from_dir(&tiny_gguf()).unwrap();
    let hf = Tokenizer::from_dir(&fixture("tiny")).unwrap();
    let corpus = [
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n",
        "fn main() { let x: Vec<u8> = vec![0x1F, 255]; println!(\"{x:?}\"); }\r\n",
        "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, emoji 🤖🦀 and e\u{301} (NFC)",
        "   leading spaces, trailing spaces   \t\t\ttabs\n\n\n  \n\u{a0}nbsp\u{3000}ideographic",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<tool_call>\n{\"name\": \"run\", \"arguments\": {\"cmd\": \"ls -la\"}}\n</tool_call><|endoftext|>",
        "a<|im_end|>b<|im_start|><|im_start|>x</tool_call>y",
        "12345 3.14159 -0.5e-10 1,000,000 2024-06-01 v1.2.3 #42 $19.99 100%",
        "I'll we've they're it's don't IT'S WE'LL 'quoted' \"double\"",
        "",
        " ",
        "\n",
    ];
    for text in corpus {
        let (a, b) = (ours.encode(text).unwrap(), hf.encode(text).unwrap());
        assert_eq!(a, b, "{text:?}");
        assert_eq!(ours.decode(&a, false).unwrap(), hf.decode(&b, false).unwrap(), "{text:?}");
        assert_eq!(ours.decode(&a, true).unwrap(), hf.decode(&b, true).unwrap(), "{text:?}");
    }
    assert_eq!(ours.vocab_size(), hf.vocab_size());
    assert_eq!(ours.added_tokens(), hf.added_tokens());
    assert_eq!(ours.stop_ids, hf.stop_ids);
    assert_eq!(ours.used_ids(), hf.used_ids());
    for id in 0..hf.vocab_size() as u32 {
        assert_eq!(ours.token_bytes(id), hf.token_bytes(id), "token {id}");
    }
}

#[test]
fn chat_template_is_exposed() {
    let g = Gguf::open(&tiny_gguf()).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny/tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(g.chat_template().as_deref(), config["chat_template"].as_str());
    // The tokenizer of the GGUF renders with that template (not the built-in one), as the
    // model directory's does: the same text, ids and assistant tokens.
    let ours = Tokenizer::from_dir(&tiny_gguf()).unwrap();
    assert!(ours.chat_template().origin().contains("tokenizer.chat_template"), "{}", ours.chat_template().origin());
    let hf = Tokenizer::from_dir(&fixture("tiny")).unwrap();
    use protege::chat::Message;
    let messages =
        [Message::system("Be brief."), Message::user("hi"), Message::assistant("hello"), Message::user("bye")];
    for gen in [false, true] {
        let (a, b) = (
            ours.apply_chat_template(&messages, &[], gen).unwrap(),
            hf.apply_chat_template(&messages, &[], gen).unwrap(),
        );
        assert_eq!((a.text.as_str(), &a.ids, a.assistant_mask()), (b.text.as_str(), &b.ids, b.assistant_mask()));
    }
    assert_eq!(ours.stop_ids, hf.stop_ids);
}

// ---------------------------------------------------------------- corrupt files

/// A GGUF v3 file written field by field, to corrupt one field at a time.
struct Writer {
    version: u32,
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
    data: Vec<u8>,
}

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

impl Writer {
    /// One F32 tensor `x` of 4 values, and an architecture.
    fn valid() -> Self {
        let data = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            version: 3,
            kv: vec![("general.architecture".into(), 8, string("test"))],
            tensors: vec![("x".into(), vec![4], 0, 0)],
            data,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            out.extend(string(k));
            out.extend(ty.to_le_bytes());
            out.extend(v);
        }
        for (name, dims, ty, offset) in &self.tensors {
            out.extend(string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend(&self.data);
        out
    }
}

/// The error opening `bytes` as a GGUF file (which must contain `want` and the file name).
fn open_error(dir: &Path, name: &str, bytes: &[u8], want: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let e = match Gguf::open(&path) {
        Ok(_) => panic!("{name}: opened without error"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains(&path.display().to_string()), "{name}: the error does not name the file: {e}");
    assert!(e.contains(want), "{name}: expected {want:?} in: {e}");
    e
}

#[test]
fn corrupt_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let valid = Writer::valid();
    Gguf::open(&{
        let p = d.join("valid.gguf");
        std::fs::write(&p, valid.bytes()).unwrap();
        p
    })
    .expect("the valid file opens");

    let mut bytes = valid.bytes();
    bytes[..4].copy_from_slice(b"GGUX");
    open_error(d, "magic.gguf", &bytes, "is not a GGUF file");
    open_error(d, "empty.gguf", b"", "truncated");
    open_error(d, "v1.gguf", &Writer { version: 1, ..Writer::valid() }.bytes(), "version 1 is not supported");
    let full = valid.bytes();
    open_error(d, "header.gguf", &full[..20], "truncated");
    open_error(d, "kv.gguf", &full[..40], "truncated");
    open_error(d, "data.gguf", &full[..full.len() - 4], "ends past the end of the file");

    let with = |f: &dyn Fn(&mut Writer)| {
        let mut w = Writer::valid();
        f(&mut w);
        w.bytes()
    };
    open_error(d, "offset.gguf", &with(&|w| w.tensors[0].3 = 4096), "ends past the end of the file");
    open_error(d, "aligned.gguf", &with(&|w| w.tensors[0].3 = 4), "multiple of the alignment 32");
    open_error(d, "type.gguf", &with(&|w| w.tensors[0].2 = 99), "tensor x has unknown ggml type id 99");
    open_error(d, "dims.gguf", &with(&|w| w.tensors[0].1 = vec![1; 5]), "tensor x has 5 dimensions");
    open_error(d, "zero.gguf", &with(&|w| w.tensors[0].1 = vec![4, 0]), "dimension 1 of size 0");
    open_error(d, "dup.gguf", &with(&|w| w.tensors.push(w.tensors[0].clone())), "tensor x appears twice");
    open_error(d, "dupkey.gguf", &with(&|w| w.kv.push(w.kv[0].clone())), "general.architecture appears twice");
    // Q8_0 needs rows of whole 32-element blocks.
    open_error(d, "block.gguf", &with(&|w| w.tensors[0].2 = 8), "expected a multiple of its block size 32");
    // A string length no file of this size can hold.
    let huge = with(&|w| w.kv[0].2 = u64::MAX.to_le_bytes().to_vec());
    open_error(d, "strlen.gguf", &huge, "more than the");
    open_error(d, "valuetype.gguf", &with(&|w| w.kv[0].1 = 13), "value type 13");

    // Truncations of the real fixture, anywhere, never panic and name the file.
    let tiny = std::fs::read(tiny_gguf()).unwrap();
    for cut in [0, 3, 7, 23, 100, 5000, tiny.len() / 2, tiny.len() - 1] {
        let e = open_error(d, &format!("tiny-{cut}.gguf"), &tiny[..cut], "");
        assert!(e.contains("truncated") || e.contains("past the end"), "cut at {cut}: {e}");
    }
}

#[test]
fn unsupported_types_and_bad_models_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A known but unsupported type opens; reading it names the tensor and the type.
    let mut w = Writer::valid();
    w.tensors[0] = ("blk.0.attn_q.weight".into(), vec![256], 10, 0);
    w.data = vec![0; 84];
    let path = d.join("q2k.gguf");
    std::fs::write(&path, w.bytes()).unwrap();
    let e = format!("{:#}", Gguf::open(&path).unwrap().dequantize("blk.0.attn_q.weight").unwrap_err());
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("Q2_K") && e.contains("q2k.gguf"), "{e}");

    // Not a Qwen2 model.
    let be = CpuBackend::new();
    let load_error = |name: &str, w: &Writer| {
        let path = d.join(name);
        std::fs::write(&path, w.bytes()).unwrap();
        let e = format!("{:#}", Qwen2::load(&be, &path).err().expect("loads"));
        assert!(e.contains(&path.display().to_string()), "{e}");
        e
    };
    let e = load_error("arch.gguf", &Writer::valid());
    assert!(e.contains("general.architecture is \"test\""), "{e}");

    // A Qwen2 header lacking a key, then lacking tensors.
    let u32kv = |k: &str, v: u32| (k.to_string(), 4u32, v.to_le_bytes().to_vec());
    let f32kv = |k: &str, v: f32| (k.to_string(), 6u32, v.to_le_bytes().to_vec());
    let mut tokens = 8u32.to_le_bytes().to_vec();
    tokens.extend(2u64.to_le_bytes());
    tokens.extend(string("a"));
    tokens.extend(string("b"));
    let mut w = Writer::valid();
    w.kv = vec![
        ("general.architecture".into(), 8, string("qwen2")),
        u32kv("qwen2.embedding_length", 32),
        u32kv("qwen2.feed_forward_length", 32),
        u32kv("qwen2.attention.head_count", 1),
        u32kv("qwen2.attention.head_count_kv", 1),
        u32kv("qwen2.context_length", 16),
        f32kv("qwen2.attention.layer_norm_rms_epsilon", 1e-6),
        f32kv("qwen2.rope.freq_base", 1e4),
        ("tokenizer.ggml.tokens".into(), 9, tokens),
    ];
    w.tensors = vec![("token_embd.weight".into(), vec![32, 2], 0, 0)];
    w.data = vec![0; 256];
    let e = load_error("nolayers.gguf", &w);
    assert!(e.contains("qwen2.block_count is missing"), "{e}");
    w.kv.push(u32kv("qwen2.block_count", 1));
    let e = load_error("notensors.gguf", &w);
    assert!(e.contains("tensor blk.0.") && e.contains("is missing"), "{e}");
    // Two tensors on the same bytes (a small file declaring a huge model) are refused.
    let saved = w.tensors.clone();
    w.tensors.push(("output_norm.weight".into(), vec![32], 0, 0));
    let e = load_error("overlap.gguf", &w);
    assert!(e.contains("overlap"), "{e}");
    w.tensors = saved;
    w.kv[1] = f32kv("qwen2.embedding_length", 32.0);
    let e = load_error("kvtype.gguf", &w);
    assert!(e.contains("qwen2.embedding_length is a float32, expected a non-negative integer"), "{e}");

    // A file that is not GGUF at all, given as --model.
    let e = format!("{:#}", Qwen2::load(&be, &fixture("tiny/config.json")).err().expect("loads"));
    assert!(e.contains("config.json is not a GGUF file"), "{e}");
    let e = format!("{:#}", Tokenizer::from_dir(&fixture("tiny/config.json")).err().expect("loads"));
    assert!(e.contains("config.json is not a GGUF file"), "{e}");
}

/// `protege export` (and SFT/RL's final export) from a GGUF base: an HF directory with the
/// dequantised weights, a config.json from the metadata and the tokenizer files, which loads
/// back as the same model and tokenizer.
#[test]
fn exports_to_an_hf_directory() {
    use protege::model::export::{export_checkpoint, ExportDtype, HfExportOptions};
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    let opts = HfExportOptions { dtype: Some(ExportDtype::F32), ..Default::default() };
    export_checkpoint(&tiny_gguf(), None, &dir, &opts).unwrap();
    let be = CpuBackend::new();
    let (ours, exported) = (Qwen2::load(&be, &tiny_gguf()).unwrap(), Qwen2::load(&be, &dir).unwrap());
    let mut want = ours.cfg.clone();
    want.dtype = Some("float32".into());
    assert_eq!(exported.cfg, want);
    for ((name, a), (_, b)) in ours.w.tensors().into_iter().zip(exported.w.tensors()) {
        assert_eq!(be.to_f32(a), be.to_f32(b), "{name}");
    }
    let (tok, hf) = (Tokenizer::from_dir(&dir).unwrap(), Tokenizer::from_dir(&fixture("tiny")).unwrap());
    let text = "<|im_start|>user\ndef f(x): return x ** 2  # 日本 🤖<|im_end|>\n<tool_call>";
    assert_eq!(tok.encode(text).unwrap(), hf.encode(text).unwrap());
    assert_eq!(tok.added_tokens(), hf.added_tokens());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["chat_template"].as_str(), Gguf::open(&tiny_gguf()).unwrap().chat_template().as_deref());
    assert_eq!(config["eos_token"], "<|im_end|>");
}
