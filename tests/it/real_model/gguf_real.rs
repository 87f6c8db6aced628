//! Opt-in: the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (Q4_K, Q5_0, Q6_K, Q8_0 and F32
//! tensors) read directly, against the HF directory that gguf-py converts it to.
//!
//! ```sh
//! tools/fetch_qwen25_coder_05b --convert     # the GGUF, and its HF conversion
//! PROTEGE_QWEN05B_GGUF=~/.cache/protege/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
//! PROTEGE_QWEN05B=~/.cache/protege/models/qwen2.5-coder-0.5b-instruct \
//!     cargo test --release --test it real_model::gguf_real:: -- --ignored --nocapture
//! ```

use std::path::PathBuf;

use protege::backend::cpu::CpuBackend;
use protege::chat::Message;
use protege::diagnostics::check::compare;
use protege::generate::prompt_logits;
use protege::model::gguf::Gguf;
use protege::model::{param_shapes, Checkpoint, Qwen2};
use protege::tokenizer::Tokenizer;

fn env_path(var: &str) -> PathBuf {
    let p = std::env::var(var).unwrap_or_else(|_| panic!("set {var} (see the file header)"));
    PathBuf::from(shellexpand(&p))
}

fn shellexpand(p: &str) -> String {
    match p.strip_prefix("~/") {
        Some(rest) => format!("{}/{rest}", std::env::var("HOME").unwrap()),
        None => p.to_string(),
    }
}

/// Every tensor, dequantised by protege and rounded to bf16, equals gguf-py's conversion
/// (dequantised to f32 by numpy, rounded to bf16 by torch) bit for bit.
#[test]
#[ignore = "needs the real GGUF and its conversion (see the file header)"]
fn weights_equal_gguf_py_conversion() {
    let g = Gguf::open(&env_path("PROTEGE_QWEN05B_GGUF")).unwrap();
    let dir = env_path("PROTEGE_QWEN05B");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let cfg = g.qwen2_config().unwrap();
    let start = std::time::Instant::now();
    let mut types = std::collections::BTreeMap::new();
    for (name, shape) in param_shapes(&cfg) {
        let ours = g.hf_tensor(&name, &shape).unwrap();
        let theirs = ckpt.get(&name, &shape).unwrap();
        assert_eq!(theirs.dtype, protege::backend::DType::BF16);
        let mismatches = ours
            .iter()
            .zip(theirs.bytes.chunks_exact(2))
            .filter(|(v, b)| half::bf16::from_f32(**v).to_bits() != u16::from_le_bytes([b[0], b[1]]))
            .count();
        assert_eq!(mismatches, 0, "{name}: {mismatches} of {} values differ", ours.len());
        let ty = g.tensor(&protege::model::gguf::gguf_name(&name).unwrap()).unwrap().ty.name;
        *types.entry(ty).or_insert(0usize) += 1;
    }
    println!("{types:?} tensors equal after bf16 rounding ({:.1} s)", start.elapsed().as_secs_f64());
}

/// The GGUF tokenizer against the conversion's tokenizer.json (from another package, checked
/// there against the GGUF's tokens and merges). Decoding with `skip_special_tokens` differs
/// by design: llama.cpp's converter marks `<|fim_prefix|>`, `<|repo_name|>` and the like
/// control tokens (they look special) where Qwen's tokenizer.json has them non-special, and
/// the GGUF keeps no other record, so they are skipped as llama.cpp skips them.
#[test]
#[ignore = "needs the real GGUF and its conversion (see the file header)"]
fn tokenizer_equals_tokenizer_json() {
    let ours = Tokenizer::from_dir(&env_path("PROTEGE_QWEN05B_GGUF")).unwrap();
    let hf = Tokenizer::from_dir(&env_path("PROTEGE_QWEN05B")).unwrap();
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/model/gguf.rs")).unwrap();
    let corpus = [
        source.as_str(),
        "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, emoji 🤖🦀, e\u{301}",
        "   spaces\t\ttabs\r\n\r\n\n  \u{a0}\u{3000} 12345 3.14159 1,000,000 I'll DON'T",
        "<|im_start|>user\nhi<|im_end|>\n<tool_call>\n{}\n</tool_call><|fim_prefix|>x<|endoftext|>",
    ];
    for text in corpus {
        let ids = ours.encode(text).unwrap();
        assert_eq!(ids, hf.encode(text).unwrap(), "{:?}", &text[..text.len().min(40)]);
        assert_eq!(ours.decode(&ids, false).unwrap(), hf.decode(&ids, false).unwrap());
    }
    assert_eq!(ours.vocab_size(), hf.vocab_size());
    assert_eq!(ours.added_tokens(), hf.added_tokens());
    assert_eq!(ours.stop_ids, hf.stop_ids);
    let msgs = [Message::user("Write a Python function that checks whether a number is prime.")];
    assert_eq!(
        ours.apply_chat_template(&msgs, &[], true).unwrap().ids,
        hf.apply_chat_template(&msgs, &[], true).unwrap().ids
    );
    println!("{} tokens in the vocabulary; corpus encodings equal", ours.vocab_size());
}

/// Logits of the GGUF (f32 dequantised weights) against the conversion (the same weights
/// rounded to bf16): the difference is bf16's rounding alone.
#[test]
#[ignore = "needs the real GGUF and its conversion (see the file header)"]
fn logits_match_the_conversion() {
    let be = CpuBackend::new();
    let (gguf, dir) = (env_path("PROTEGE_QWEN05B_GGUF"), env_path("PROTEGE_QWEN05B"));
    let start = std::time::Instant::now();
    let ours = Qwen2::load(&be, &gguf).unwrap();
    println!("loaded {} in {:.1} s", gguf.display(), start.elapsed().as_secs_f64());
    let hf = Qwen2::load(&be, &dir).unwrap();
    assert_eq!(ours.cfg.vocab_size, hf.cfg.vocab_size);
    assert_eq!(ours.cfg.max_position_embeddings, hf.cfg.max_position_embeddings);
    let tok = Tokenizer::from_dir(&gguf).unwrap();
    let msgs = [Message::user("Write a Python function that checks whether a number is prime.")];
    let ids = tok.apply_chat_template(&msgs, &[], true).unwrap().ids;
    let a = prompt_logits(&be, &ours, &ids, None).unwrap();
    let b = prompt_logits(&be, &hf, &ids, None).unwrap();
    let c = compare(&a, &b, hf.cfg.vocab_size, ATOL, 0.0);
    println!(
        "{} tokens: max abs {:.3e}, mean abs {:.3e}, argmax {}/{}",
        ids.len(),
        c.max_abs,
        c.mean_abs,
        c.argmax_agree,
        c.rows
    );
    assert!(c.passed(), "max abs {:.3e} at {:?}", c.max_abs, c.max_abs_at);
}

/// Bound on |GGUF - bf16 conversion| logits. Measured on 2026-12-03 (41-token chat prompt,
/// CPU): max abs 0.125, mean abs 0.012, argmax equal on 41/41 rows; 4x margin.
const ATOL: f32 = 0.5;
