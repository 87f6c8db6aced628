//! Exports: the PEFT adapter and the full HF directory protege writes load in peft /
//! transformers with the same logits as protege's (references made from these exports by
//! `tools/check_exports.py` and committed, so CI needs no torch).
//!
//! To regenerate: `PROTEGE_KEEP_EXPORTS=/tmp/exp cargo test --test exports`, then
//! `python3 tools/check_exports.py --base tests/fixtures/odd --adapter /tmp/exp/adapter
//!  --full /tmp/exp/full --ids-from tests/fixtures/odd/reference.safetensors
//!  --out-dir tests/fixtures/odd/exports`.

mod common;

use common::{fixture, load, max_abs_diff, Tensors};
use protege::backend::Backend;
use protege::generate::prompt_logits;
use protege::model::export::{export_hf, export_peft, load_peft, ExportDtype};
use protege::model::lora::{Lora, LoraConfig, Target};
use protege::model::Qwen2;

/// The odd fixture with the PEFT fixture's (non-zero) adapters attached.
fn adapted() -> (protege::backend::cpu::CpuBackend, Qwen2<protege::backend::cpu::CpuBackend>) {
    let (be, mut model) = load("odd");
    let t = Tensors::open(&fixture("odd/lora_grads.safetensors"));
    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: Target::ALL.to_vec(), seed: 0 };
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
    export_hf(&be, &model, &fixture("odd"), &out.join("full"), ExportDtype::F32).unwrap();
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
