//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, built as the
//! `tokenizers::Tokenizer` that Qwen2's `tokenizer.json` defines: byte-level BPE over the
//! token list and merges, NFC, Qwen2's pre-tokenizer regex, and the control / user-defined
//! tokens as added tokens (special when control), each at its GGUF id.

use anyhow::{anyhow, bail, Result};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::gguf::Gguf;

/// Qwen2's pre-tokenizer split (`tokenizer.json`'s; llama.cpp's `qwen2` pre-type spells the
/// case-insensitive contractions out, which matches the same text).
pub const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i64 = 1;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const UNUSED: i64 = 5;

/// Builds the tokenizer of `g`.
pub fn tokenizer(g: &Gguf) -> Result<tokenizers::Tokenizer> {
    let file = g.path().display();
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!("{file}: tokenizer.ggml.model is {model:?}; protege reads byte-level BPE (\"gpt2\") tokenizers only");
    }
    let pre = g.get_str("tokenizer.ggml.pre")?;
    if pre != "qwen2" {
        bail!("{file}: tokenizer.ggml.pre is {pre:?}; protege knows the \"qwen2\" pre-tokenizer only");
    }
    let tokens = g.get_strs("tokenizer.ggml.tokens")?;
    let types = g.get_ints("tokenizer.ggml.token_type")?;
    if types.len() != tokens.len() {
        bail!(
            "{file}: tokenizer.ggml.token_type has {} entries, expected one per token ({})",
            types.len(),
            tokens.len()
        );
    }
    // Every used token goes into the BPE vocabulary at its id; the added ones are then also
    // registered as added tokens, which keep the id the vocabulary gives them.
    let mut vocab = Vocab::default();
    let mut added = vec![];
    for (id, (&token, &ty)) in tokens.iter().zip(&types).enumerate() {
        match ty {
            NORMAL => {}
            CONTROL | USER_DEFINED => {
                added.push(AddedToken::from(token, ty == CONTROL).normalized(false));
            }
            UNUSED => continue,
            other => bail!(
                "{file}: token {id} ({token:?}) has type {other}; expected normal (1), control (3), \
                 user-defined (4) or unused (5) for a byte-level BPE tokenizer"
            ),
        }
        if let Some(prev) = vocab.insert(token.to_string(), id as u32) {
            bail!("{file}: token {token:?} appears twice in tokenizer.ggml.tokens (ids {prev} and {id})");
        }
    }
    let merges = g
        .get_strs("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => Ok((a.to_string(), b.to_string())),
            _ => Err(anyhow!("{file}: tokenizer.ggml.merges[{i}] is {m:?}, expected two tokens separated by a space")),
        })
        .collect::<Result<Vec<_>>>()?;
    for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"] {
        if g.get(key).is_some() && g.get_u64(key)? >= tokens.len() as u64 {
            bail!("{file}: {key} is {}, outside the {} tokens", g.get_u64(key)?, tokens.len());
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("{file}: the BPE vocabulary and merges are inconsistent: {e}"))?;
    let split = Split::new(SplitPattern::Regex(QWEN2_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow!("the Qwen2 pre-tokenizer regex does not compile: {e}"))?;
    // add_prefix_space, trim_offsets, use_regex: all off, as in Qwen2's tokenizer.json.
    let byte_level = ByteLevel::new(false, false, false);
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(Some(NFC))
        .with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    tok.add_tokens(&added);
    Ok(tok)
}
