//! Opt-in: the real Qwen2.5-Coder-0.5B-Instruct against transformers (float32).
//!
//! ```sh
//! tools/fetch_qwen25_coder_05b --convert       # the model, into ~/.cache/protege/models/...
//! tools/make_real_reference                    # transformers' logits and greedy tokens next to it
//! PROTEGE_QWEN05B=~/.cache/protege/models/qwen2.5-coder-0.5b-instruct \
//!     cargo test --release --test it real_model:: -- --ignored --nocapture
//! ```

/// The real GGUF against its converted directory (ignored by default) (a module here: one test binary less to link).
mod gguf_real;

use std::path::PathBuf;

use protege::backend::cpu::CpuBackend;
use protege::chat::Message;
use protege::diagnostics::check::{check_logits, Reference};
use protege::generate::{generate, GenOptions, Request};
use protege::model::Qwen2;
use protege::tokenizer::Tokenizer;

/// The prompt `tools/make_real_reference` uses.
const PROMPT: &str = "Write a Python function that checks whether a number is prime.";

/// Tolerances against transformers' float32 logits. Both sides compute in f32 from the same
/// bf16 weights; only summation order differs (blocked GEMM vs MKL, over 24 layers). Measured
/// on 2026-11-25: max abs error 6.2e-5 on the chat prompt (41 rows, logits up to ~30) and
/// 3.2e-5 on an 798-token prompt; the bound leaves a 3x margin for other CPUs' GEMM paths.
const ATOL: f32 = 2e-4;
const RTOL: f32 = 1e-5;

fn model_dir() -> PathBuf {
    let dir = std::env::var("PROTEGE_QWEN05B")
        .expect("set PROTEGE_QWEN05B to the model directory (tools/fetch_qwen25_coder_05b --convert)");
    PathBuf::from(dir)
}

fn greedy_reference(dir: &std::path::Path) -> (Vec<u32>, Vec<u32>) {
    let path = dir.join("protege-reference/greedy.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run tools/make_real_reference)", path.display())),
    )
    .unwrap();
    let ids = |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    (ids("prompt_ids"), ids("new_ids"))
}

#[test]
#[ignore = "needs the real model: set PROTEGE_QWEN05B (see the file header)"]
fn chat_template_ids_equal_transformers() {
    let dir = model_dir();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let (prompt_ids, _) = greedy_reference(&dir);
    assert_eq!(tok.apply_chat_template(&[Message::user(PROMPT)], &[], true).unwrap().ids, prompt_ids);
}

#[test]
#[ignore = "needs the real model: set PROTEGE_QWEN05B (see the file header)"]
fn logits_and_greedy_match_transformers() {
    let dir = model_dir();
    let be = CpuBackend::new();
    let model = Qwen2::load(&be, &dir).unwrap();
    for file in ["chat.safetensors", "long.safetensors"] {
        let reference = Reference::load(&dir.join("protege-reference").join(file)).unwrap();
        let c = check_logits(&be, &model, &reference, ATOL, RTOL).unwrap();
        println!(
            "{file}: {} tokens, {} rows: max abs {:.2e}, max rel {:.2e}, mean abs {:.2e}, argmax {}/{}",
            reference.input_ids.len(),
            c.rows,
            c.max_abs,
            c.max_rel,
            c.mean_abs,
            c.argmax_agree,
            c.rows
        );
        assert!(c.passed(), "{file}: {} logits outside tolerance", c.violations);
        assert_eq!(c.argmax_agree, c.rows);
    }
    let (prompt, want) = greedy_reference(&dir);
    assert_eq!(want.len(), 48);
    let (out, _) =
        generate(&be, &model, &[Request::greedy(prompt, want.len())], None, &GenOptions::default(), |_, _| {}).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    println!("greedy: {}", tok.decode(&out[0].tokens, false).unwrap());
    assert_eq!(out[0].tokens, want);
}
