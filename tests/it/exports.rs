//! Exports: the PEFT adapter and the full HF directory protege writes load in peft /
//! transformers with the same logits as protege's (references made from these exports by
//! `tools/check_exports.py` and committed, so CI needs no torch).
//!
//! To regenerate: `PROTEGE_KEEP_EXPORTS=/tmp/exp cargo test --test it exports::`, then
//! `python3 tools/check_exports.py --base tests/fixtures/odd --adapter /tmp/exp/adapter
//!  --full /tmp/exp/full --ids-from tests/fixtures/odd/reference.safetensors
//!  --out-dir tests/fixtures/odd/exports`.

use std::path::Path;

use crate::common::{fixture, load, max_abs_diff, Tensors};
use protege::backend::Backend;
use protege::generate::prompt_logits;
use protege::model::export::{export_checkpoint, export_hf, export_peft, load_peft, ExportDtype, HfExportOptions};
use protege::model::lora::{Lora, LoraConfig, Target};
use protege::model::Qwen2;

/// The odd fixture with the PEFT fixture's (non-zero) adapters attached.
fn adapted() -> (protege::backend::cpu::CpuBackend, Qwen2<protege::backend::cpu::CpuBackend>) {
    let (be, mut model) = load("odd");
    let t = Tensors::open(&fixture("odd/lora_grads.safetensors"));
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        seed: 0,
        trainable_tokens: None,
    };
    model.lora =
        Some(Lora::try_from_fn(&model.cfg, &cfg, |n, _| Ok(be.upload_f32(&t.f32s(&format!("lora.{n}")).0))).unwrap());
    (be, model)
}

#[test]
fn peft_adapter_and_full_export_match_peft_and_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::env::var("PROTEGE_KEEP_EXPORTS").map(std::path::PathBuf::from).unwrap_or(dir.path().to_path_buf());
    let (be, mut model) = adapted();
    let ids = Tensors::open(&fixture("odd/reference.safetensors")).u32s("input_ids");
    let ours = prompt_logits(&be, &model, &ids, None).unwrap();

    export_peft(&be, &model, "tests/fixtures/odd", &out.join("adapter")).unwrap();
    let back = load_peft(&be, &model, &out.join("adapter")).unwrap();
    for ((n, _, a), (_, _, b)) in
        back.tensors(&model.cfg).into_iter().zip(model.lora.as_ref().unwrap().tensors(&model.cfg))
    {
        assert_eq!(be.to_f32(a), be.to_f32(b), "{n} changed in the round trip");
    }
    let (peft, _) = Tensors::open(&fixture("odd/exports/peft_logits.safetensors")).f32s("logits");
    let err = max_abs_diff(&ours, &peft);
    assert!(err < 1e-4, "protege vs peft on the exported adapter: {err}");

    model.merge_lora(&be).unwrap();
    let f32_export = HfExportOptions { dtype: Some(ExportDtype::F32), ..Default::default() };
    export_hf(&be, &model, None, &fixture("odd"), &out.join("full"), &f32_export).unwrap();
    let reloaded = Qwen2::load(&be, &out.join("full")).unwrap();
    let again = prompt_logits(&be, &reloaded, &ids, None).unwrap();
    assert!(max_abs_diff(&again, &ours) < 1e-4);
    let (hf, _) = Tensors::open(&fixture("odd/exports/full_logits.safetensors")).f32s("logits");
    let err = max_abs_diff(&again, &hf);
    assert!(err < 1e-4, "protege vs transformers on the exported model: {err}");
    assert!(out.join("full/tokenizer.json").exists());
}

#[test]
fn bad_adapter_directories_are_clear_errors() {
    let (be, model) = adapted();
    let dir = tempfile::tempdir().unwrap();
    export_peft(&be, &model, "base", dir.path()).unwrap();
    let cfg = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"q_proj\"", "\"qkv_proj\"")).unwrap();
    let e = format!("{:#}", load_peft(&be, &model, dir.path()).err().unwrap());
    assert!(e.contains("unknown target module \"qkv_proj\""), "{e}");
    std::fs::write(&cfg, text.replace("\"r\": 4", "\"r\": 8")).unwrap();
    let e = format!("{:#}", load_peft(&be, &model, dir.path()).err().unwrap());
    assert!(e.contains("lora_A.weight") && e.contains("expected [8,"), "{e}");
    std::fs::remove_file(dir.path().join("adapter_model.safetensors")).unwrap();
    std::fs::write(&cfg, &text).unwrap();
    assert!(load_peft(&be, &model, dir.path()).is_err());
}

/// The fixture `name` with a random adapter (also written as PEFT to `dir`).
fn random_adapter(
    name: &str,
    dir: &Path,
) -> (
    protege::backend::cpu::CpuBackend,
    Qwen2<protege::backend::cpu::CpuBackend>,
    Lora<protege::backend::cpu::CpuBackend>,
) {
    crate::common::write_random_adapter(name, dir);
    let (be, model) = load(name);
    let lora = load_peft(&be, &model, dir).unwrap();
    (be, model, lora)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn merged_export_is_sharded_like_save_pretrained_in_the_source_dtype() {
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 450).collect();
    for (name, dtype, st_dtype) in [
        ("tiny", "float32", safetensors::Dtype::F32),
        ("tiny-untied", "bfloat16", safetensors::Dtype::BF16),
        ("odd", "float16", safetensors::Dtype::F16),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (be, model, lora) = random_adapter(name, &dir.path().join("adapter"));
        let merged = Qwen2::load_merged(&be, &fixture(name), Some(&dir.path().join("adapter")), None).unwrap();
        let want = prompt_logits(&be, &merged, &ids, None).unwrap();
        assert!(
            max_abs_diff(&want, &prompt_logits(&be, &model, &ids, None).unwrap()) > 1e-2,
            "{name}: the adapter matters"
        );

        let out = dir.path().join("merged");
        let opts = HfExportOptions { max_shard_bytes: 60_000, ..Default::default() };
        export_hf(&be, &model, Some(&lora), &fixture(name), &out, &opts).unwrap();
        // Streamed from the checkpoint (`protege export`), the same bytes.
        let streamed = dir.path().join("streamed");
        export_checkpoint(&fixture(name), Some(&dir.path().join("adapter")), &streamed, &opts).unwrap();
        let files = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
            v.sort();
            v
        };
        assert_eq!(files(&out), files(&streamed));
        for f in files(&out) {
            assert_eq!(std::fs::read(out.join(&f)).unwrap(), std::fs::read(streamed.join(&f)).unwrap(), "{f:?}");
        }
        // Shards and index as transformers writes them.
        let index = read_json(&out.join("model.safetensors.index.json"));
        let map = index["weight_map"].as_object().unwrap();
        let files: std::collections::BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
        assert!(files.len() > 2, "{name}: {files:?}");
        for (i, f) in files.iter().enumerate() {
            assert_eq!(*f, format!("model-{:05}-of-{:05}.safetensors", i + 1, files.len()));
        }
        assert!(!out.join("model.safetensors").exists());
        let mut total = 0;
        for f in &files {
            let bytes = std::fs::read(out.join(f)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (n, t) in st.tensors() {
                assert_eq!(t.dtype(), st_dtype, "{name}: {n} keeps the source dtype");
                assert_eq!(map[&n], *f);
                total += t.data().len();
            }
            // Over the limit only when one tensor alone is larger.
            assert!(bytes.len() < 60_000 + 4096 || st.len() == 1, "{name}: {f} is {} bytes", bytes.len());
        }
        assert_eq!(index["metadata"]["total_size"], total);
        assert_eq!(map.contains_key("lm_head.weight"), !model.cfg.tie_word_embeddings, "{name}: tied stays tied");
        assert_eq!(map.len(), protege::model::param_shapes(&model.cfg).len());
        // config.json: the source's, dtype named as before.
        let cfg = read_json(&out.join("config.json"));
        let src = read_json(&fixture(&format!("{name}/config.json")));
        for key in ["dtype", "torch_dtype"] {
            assert_eq!(cfg.get(key).is_some(), src.get(key).is_some());
            if let Some(v) = cfg.get(key) {
                assert_eq!(v, dtype);
            }
        }
        assert_eq!(cfg["tie_word_embeddings"], src["tie_word_embeddings"]);
        for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(fixture(&format!("{name}/{f}"))).unwrap());
        }

        // Every weight is the merged f32 weight rounded once to the source dtype.
        let back = Qwen2::load(&be, &out).unwrap();
        for ((n, a), (_, b)) in back.w.tensors().into_iter().zip(merged.w.tensors()) {
            let rounded: Vec<f32> = match st_dtype {
                safetensors::Dtype::BF16 => be.to_f32(b).iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect(),
                safetensors::Dtype::F16 => be.to_f32(b).iter().map(|x| half::f16::from_f32(*x).to_f32()).collect(),
                _ => be.to_f32(b),
            };
            assert_eq!(be.to_f32(a), rounded, "{name}: {n}");
        }
        // In f32 the merged export has the adapter's logits exactly.
        let f32_out = dir.path().join("merged-f32");
        let opts = HfExportOptions { dtype: Some(ExportDtype::F32), ..Default::default() };
        export_hf(&be, &model, Some(&lora), &fixture(name), &f32_out, &opts).unwrap();
        assert!(f32_out.join("model.safetensors").exists() && !f32_out.join("model.safetensors.index.json").exists());
        let got = prompt_logits(&be, &Qwen2::load(&be, &f32_out).unwrap(), &ids, None).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{name}");
    }
}

#[test]
fn export_refuses_a_non_empty_directory_unless_overwriting() {
    let (be, model) = load("tiny");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = export_hf(&be, &model, None, &fixture("tiny"), &out, &HfExportOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("is not empty; pass --overwrite"), "{e:#}");
    assert!(out.join("keep.txt").exists());
    let opts = HfExportOptions { overwrite: true, ..Default::default() };
    export_hf(&be, &model, None, &fixture("tiny"), &out, &opts).unwrap();
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").exists());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("out")], "no temporary directory is left");
}

/// Rewrites the adapter in `dir` as a raw state dict would name it (`lora_A.default.weight`).
fn add_default_infix(dir: &Path) {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            (
                n.replace(".lora_A.weight", ".lora_A.default.weight")
                    .replace(".lora_B.weight", ".lora_B.default.weight"),
                t,
            )
        })
        .collect();
    let data = safetensors::serialize(renamed, None).unwrap();
    std::fs::write(&path, data).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut v = read_json(&path);
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn peft_adapters_with_the_default_infix_rslora_and_layer_selection_load() {
    let ids: Vec<u32> = (0..16).map(|i| (i * 29 + 3) % 450).collect();
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let (be, model, _) = random_adapter("tiny", &adapter);
    let logits = |a: &Path| {
        prompt_logits(&be, &Qwen2::load_merged(&be, &fixture("tiny"), Some(a), None).unwrap(), &ids, None).unwrap()
    };
    let want = logits(&adapter);

    // A raw state dict's names, rsLoRA (scale alpha / sqrt(r): alpha 4 at r 4 is alpha 8 without)
    // and target_modules as peft's shorthand: the same adapter.
    add_default_infix(&adapter);
    edit_config(&adapter, |v| {
        v["use_rslora"] = true.into();
        v["lora_alpha"] = 4.into();
        v["target_modules"] = "all-linear".into();
    });
    assert_eq!(max_abs_diff(&logits(&adapter), &want), 0.0);

    // layers_to_transform leaves layer 1's tensors unused: refused, naming one.
    edit_config(&adapter, |v| v["layers_to_transform"] = serde_json::json!([0]));
    let e = format!("{:#}", load_peft(&be, &model, &adapter).err().unwrap());
    assert!(e.contains("layers.1.") && e.contains("is not used"), "{e}");

    // Unsupported variants are refused naming the file and field.
    for (k, x) in [("use_dora", serde_json::json!(true)), ("modules_to_save", serde_json::json!(["lm_head"]))] {
        edit_config(&adapter, |v| {
            v["layers_to_transform"] = serde_json::Value::Null;
            v[k] = x.clone();
        });
        let e = format!("{:#}", load_peft(&be, &model, &adapter).err().unwrap());
        assert!(e.contains("adapter_config.json") && e.contains(&format!("`{k}`")), "{e}");
        edit_config(&adapter, |v| v[k] = serde_json::Value::Null);
    }
    // An adapter of another model's shapes: a clear error naming the tensor.
    let (_, odd) = load("odd");
    let e = format!("{:#}", load_peft(&be, &odd, &adapter).err().unwrap());
    assert!(e.contains("does not fit") && e.contains("lora_A.default.weight"), "{e}");
}
