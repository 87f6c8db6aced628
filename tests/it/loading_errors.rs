//! Every broken checkpoint gives an error that names the file or tensor and the expectation.

use std::path::Path;

use crate::common::fixture;
use protege::backend::cpu::CpuBackend;
use protege::model::Qwen2;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A copy of the tiny fixture whose weights pass through `edit` (name, dtype, shape, bytes).
fn tiny_with(edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny"), dir.path());
    let bytes = std::fs::read(fixture("tiny/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match Qwen2::load(&CpuBackend::new(), dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} should mention {p:?}");
    }
}

#[test]
fn missing_tensor() {
    let dir = tiny_with(|t| t.retain(|(n, ..)| n != "model.layers.1.mlp.up_proj.weight"));
    assert_mentions(&load_err(dir.path()), &["model.layers.1.mlp.up_proj.weight", "missing", "[160, 64]"]);
}

#[test]
fn wrong_shape() {
    let dir = tiny_with(|t| {
        let e = t.iter_mut().find(|(n, ..)| n == "model.layers.0.self_attn.k_proj.weight").unwrap();
        e.2 = vec![16, 128];
    });
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "k_proj.weight", "[16, 128]", "expected [32, 64]"]);
}

#[test]
fn unsupported_dtype() {
    let dir = tiny_with(|t| {
        let e = t.iter_mut().find(|(n, ..)| n == "model.norm.weight").unwrap();
        e.1 = Dtype::I32;
    });
    assert_mentions(&load_err(dir.path()), &["model.norm.weight", "I32", "expected BF16, F16 or F32"]);
}

#[test]
fn truncated_and_corrupt_files() {
    let dir = tiny_with(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "truncated or corrupt"]);
    let mut garbage = bytes.clone();
    garbage[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&path, &garbage).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "not a valid safetensors"]);
    std::fs::remove_file(&path).unwrap();
    assert_mentions(&load_err(dir.path()), &["expected model.safetensors or model.safetensors.index.json"]);
}

#[test]
fn untied_config_without_lm_head() {
    let dir = tiny_with(|_| {});
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false");
    std::fs::write(&cfg, text).unwrap();
    assert_mentions(&load_err(dir.path()), &["lm_head.weight", "missing"]);
}

#[test]
fn broken_config_and_shards() {
    let dir = tiny_with(|_| {});
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"qwen2\", \"hidden_size\": 64}").unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "missing required field `num_attention_heads`"]);

    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-untied"), dir.path());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shard = index["weight_map"].as_object().unwrap().values().next().unwrap().as_str().unwrap().to_string();
    std::fs::remove_file(dir.path().join(&shard)).unwrap();
    assert_mentions(&load_err(dir.path()), &[&shard, "cannot open"]);
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"weights\": 1}").unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors.index.json", "weight_map"]);
}

#[test]
fn non_finite_weights() {
    // NaN in one element of a layer's weight (f32 fixture): refused at load, naming the tensor,
    // instead of a model that prints `!!!` and exits 0.
    let dir = tiny_with(|ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.layers.1.mlp.up_proj.weight").unwrap();
        t.3[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert_mentions(&load_err(dir.path()), &["model.layers.1.mlp.up_proj.weight", "non-finite", "element 10"]);
}
