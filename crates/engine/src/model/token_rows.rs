//! Trained token rows: the embedding rows (and, with an untied head, the LM-head rows) of a few
//! chosen tokens, trained beside the LoRA adapters as PEFT's `trainable_token_indices` does.
//! LoRA cannot move a row of the embedding or of the head, so a token whose rows the base never
//! trained (a template tag that only fine-tuning data contains) stays unlearnable without them.
//!
//! The trained rows replace the base's rows (PEFT's semantics: the adapter stores the new rows,
//! not a difference). While adapters that carry rows are attached ([`Qwen2::attach_lora`]), the
//! rows are written into the base weights, so the forward passes need no change; the base's own
//! rows are kept aside and put back by [`Qwen2::detach_lora`]. After the optimiser changes the
//! rows, [`Qwen2::sync_token_rows`] writes them in again.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::lora::Lora;
use super::{Checkpoint, Qwen2, Qwen2Config};
use crate::backend::Backend;

/// PEFT's tensor name of the trained embedding rows, `[n, hidden]` (also the head's when tied).
pub const EMBED_ROWS: &str = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
/// PEFT's tensor name of the trained rows of an untied LM head, `[n, hidden]`.
pub const HEAD_ROWS: &str = "base_model.model.lm_head.token_adapter.trainable_tokens_delta";

/// `lora.trainable_tokens`: which tokens' rows to train with the adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawTokens", into = "RawTokens")]
pub enum TrainableTokens {
    /// The chat template's tokens whose rows are untrained (see `train::untrained`).
    Auto,
    /// These tokens.
    List(Vec<TokenRef>),
}

/// A token named in `lora.trainable_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a token string such as \"<tool_call>\" or a token id")]
pub enum TokenRef {
    Id(u32),
    Text(String),
}

/// The TOML form of [`TrainableTokens`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "\"auto\" or a list of token strings and ids, e.g. [\"<tool_call>\", \"</tool_call>\"] or [151657, 151658]"
)]
enum RawTokens {
    Word(String),
    List(Vec<TokenRef>),
}

impl TryFrom<RawTokens> for TrainableTokens {
    type Error = String;
    fn try_from(raw: RawTokens) -> Result<Self, String> {
        match raw {
            RawTokens::Word(w) if w == "auto" => Ok(TrainableTokens::Auto),
            RawTokens::Word(w) => Err(format!("expected \"auto\" or a list of tokens, got {w:?}")),
            RawTokens::List(l) if l.is_empty() => {
                Err("the list is empty: name some tokens, or remove the field".into())
            }
            RawTokens::List(l) => Ok(TrainableTokens::List(l)),
        }
    }
}

impl From<TrainableTokens> for RawTokens {
    fn from(t: TrainableTokens) -> Self {
        match t {
            TrainableTokens::Auto => RawTokens::Word("auto".into()),
            TrainableTokens::List(l) => RawTokens::List(l),
        }
    }
}

impl TrainableTokens {
    /// The token ids, without repeats, in the order named. `untrained` is what `"auto"` means:
    /// the template tokens whose rows were found untrained. `token_to_id` is the tokenizer's
    /// lookup of one token's text (the model knows no tokenizer).
    pub fn resolve(
        &self,
        token_to_id: impl Fn(&str) -> Option<u32>,
        vocab_size: usize,
        untrained: &[u32],
    ) -> Result<Vec<u32>> {
        let ids: Vec<u32> = match self {
            TrainableTokens::Auto => untrained.to_vec(),
            TrainableTokens::List(refs) => refs
                .iter()
                .map(|r| match r {
                    TokenRef::Id(id) => Ok(*id),
                    TokenRef::Text(t) => token_to_id(t).with_context(|| {
                        format!(
                            "lora.trainable_tokens: {t:?} is not a token of the tokenizer (name one token, e.g. \
                             \"<tool_call>\", or its id)"
                        )
                    }),
                })
                .collect::<Result<_>>()?,
        };
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            bail!("lora.trainable_tokens: token id {bad} is out of range (the model's vocab_size is {vocab_size})");
        }
        let mut seen = std::collections::HashSet::new();
        Ok(ids.into_iter().filter(|id| seen.insert(*id)).collect())
    }
}

/// Trained rows of one matrix.
pub struct RowSet<B: Backend> {
    /// The token ids, one per row.
    pub ids: Vec<u32>,
    /// The trained values, `[ids.len(), hidden]`.
    pub rows: B::Buf,
    /// The base's values of these rows while attached (host copy, put back on detach).
    original: Vec<f32>,
}

impl<B: Backend> RowSet<B> {
    pub fn new(ids: Vec<u32>, rows: B::Buf) -> Self {
        Self { ids, rows, original: vec![] }
    }
}

/// The trained token rows of a set of adapters.
pub struct TokenRows<B: Backend> {
    /// Rows of the embedding; with tied embeddings also the LM head's.
    pub embed: RowSet<B>,
    /// Rows of an untied LM head (`None` when tied, or when only the embedding's rows are trained).
    pub head: Option<RowSet<B>>,
}

impl<B: Backend> TokenRows<B> {
    /// Rows `ids` of `model`'s embedding and, when untied, of its head, starting from the
    /// model's current values (PEFT's initialisation).
    pub fn from_model(be: &B, model: &Qwen2<B>, ids: &[u32]) -> Self {
        let h = model.cfg.hidden_size;
        let set = |table: &B::Buf| RowSet::new(ids.to_vec(), gather_rows(be, table, ids, h));
        TokenRows { embed: set(&model.w.embed), head: model.w.lm_head.as_ref().map(set) }
    }

    /// Zero-filled f32 rows of the same shapes (gradients).
    pub fn zeros_like(&self, be: &B, hidden: usize) -> Self {
        let zeros = |s: &RowSet<B>| RowSet::new(s.ids.clone(), be.zeros_f32(s.ids.len() * hidden));
        TokenRows { embed: zeros(&self.embed), head: self.head.as_ref().map(zeros) }
    }

    /// The rows the LM head reads: its own, or the embedding's when tied.
    pub fn head_rows(&self, tied: bool) -> Option<&RowSet<B>> {
        if tied {
            Some(&self.embed)
        } else {
            self.head.as_ref()
        }
    }

    /// As [`TokenRows::head_rows`], mutable.
    pub fn head_rows_mut(&mut self, tied: bool) -> Option<&mut RowSet<B>> {
        if tied {
            Some(&mut self.embed)
        } else {
            self.head.as_mut()
        }
    }

    /// Every tensor with its PEFT name and shape.
    pub fn tensors(&self, hidden: usize) -> Vec<(String, Vec<usize>, &B::Buf)> {
        let mut out = vec![(EMBED_ROWS.to_string(), vec![self.embed.ids.len(), hidden], &self.embed.rows)];
        if let Some(s) = &self.head {
            out.push((HEAD_ROWS.to_string(), vec![s.ids.len(), hidden], &s.rows));
        }
        out
    }

    /// As [`TokenRows::tensors`], mutable.
    pub fn tensors_mut(&mut self, hidden: usize) -> Vec<(String, Vec<usize>, &mut B::Buf)> {
        let mut out = vec![(EMBED_ROWS.to_string(), vec![self.embed.ids.len(), hidden], &mut self.embed.rows)];
        if let Some(s) = &mut self.head {
            out.push((HEAD_ROWS.to_string(), vec![s.ids.len(), hidden], &mut s.rows));
        }
        out
    }
}

impl<B: Backend> TokenRows<B> {
    /// PEFT's `adapter_config.json` field `trainable_token_indices` for these rows, by module.
    /// peft ties a tied head's rows to the embedding's (they are stored once).
    pub fn peft_indices(&self) -> Value {
        let mut v = json!({ "embed_tokens": self.embed.ids });
        if let Some(h) = &self.head {
            v["lm_head"] = json!(h.ids);
        }
        v
    }

    /// The token rows of the PEFT adapter whose config is `cfg_path` and tensors `ckpt`, for a
    /// model of config `model`; `None` when it has no `trainable_token_indices`. peft's forms:
    /// a list (the embedding's rows; a tied head follows) or a dict by module name.
    pub fn from_peft(be: &B, model: &Qwen2Config, cfg_path: &Path, ckpt: &Checkpoint) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
        let field = "`trainable_token_indices`";
        let ids = |x: &Value| -> Result<Vec<u32>> {
            let ids: Vec<u32> = serde_json::from_value(x.clone())
                .with_context(|| format!("{}: {field} must list token ids", cfg_path.display()))?;
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= model.vocab_size) {
                bail!(
                    "{}: {field}: token id {bad} is out of range (vocab_size {})",
                    cfg_path.display(),
                    model.vocab_size
                );
            }
            Ok(ids)
        };
        let (embed, head) = match v.get("trainable_token_indices") {
            None | Some(Value::Null) => return Ok(None),
            Some(list @ Value::Array(_)) => (ids(list)?, None),
            Some(Value::Object(by_module)) => {
                let (mut embed, mut head) = (None, None);
                for (module, list) in by_module {
                    match module.rsplit('.').next() {
                        Some("embed_tokens") => embed = Some(ids(list)?),
                        Some("lm_head") => head = Some(ids(list)?),
                        _ => bail!(
                            "{}: {field} names {module:?}; only embed_tokens and lm_head rows are supported",
                            cfg_path.display()
                        ),
                    }
                }
                let embed = embed.with_context(|| {
                    format!(
                        "{}: {field} trains lm_head rows without embed_tokens rows: not supported",
                        cfg_path.display()
                    )
                })?;
                match head {
                    // peft ties a tied head to the embedding's rows when the indices agree.
                    Some(h) if model.tie_word_embeddings && h != embed => bail!(
                        "{}: {field} names different rows for embed_tokens and lm_head, which this model ties",
                        cfg_path.display()
                    ),
                    Some(_) if model.tie_word_embeddings => (embed, None),
                    h => (embed, h),
                }
            }
            Some(_) => bail!("{}: {field} must be a list of token ids or a dict of them by module", cfg_path.display()),
        };
        if embed.is_empty() {
            return Ok(None);
        }
        let read = |name: &str, ids: Vec<u32>| -> Result<RowSet<B>> {
            // A raw state dict keeps the adapter's name after the tensor's (`...delta.default`).
            let stored = ckpt
                .names()
                .find(|n| *n == name || n.strip_prefix(name).is_some_and(|rest| rest.matches('.').count() == 1))
                .with_context(|| {
                    format!("{}: {field} is set but the adapter has no tensor {name}", cfg_path.display())
                })?
                .to_string();
            let rows = be.upload(&ckpt.get(&stored, &[ids.len(), model.hidden_size])?)?;
            Ok(RowSet::new(ids, rows))
        };
        let embed = read(EMBED_ROWS, embed)?;
        let head = head.map(|ids| read(HEAD_ROWS, ids)).transpose()?;
        Ok(Some(TokenRows { embed, head }))
    }
}

impl<B: Backend> TokenRows<B> {
    /// Writes the rows into `w`, the host values of the base tensor `name`
    /// (`model.embed_tokens.weight`, or an untied `lm_head.weight`; others are left alone): the
    /// merge of the rows, for an export of adapters not attached to the model.
    pub fn merge_into(&self, be: &B, name: &str, w: &mut [f32], hidden: usize) {
        let set = match name {
            "model.embed_tokens.weight" => Some(&self.embed),
            "lm_head.weight" => self.head.as_ref(),
            _ => None,
        };
        let Some(set) = set else { return };
        let rows = be.to_f32(&set.rows);
        for (j, &id) in set.ids.iter().enumerate() {
            let id = id as usize;
            w[id * hidden..(id + 1) * hidden].copy_from_slice(&rows[j * hidden..(j + 1) * hidden]);
        }
    }
}

/// Rows `ids` of `table` (`[vocab, dim]`) as a `[ids.len(), dim]` buffer.
pub fn gather_rows<B: Backend>(be: &B, table: &B::Buf, ids: &[u32], dim: usize) -> B::Buf {
    let mut out = be.zeros(ids.len() * dim);
    be.copy_rows(table, ids, &mut out, &(0..ids.len() as u32).collect::<Vec<_>>(), dim);
    out
}

/// Writes `rows` (`[ids.len(), dim]`) into rows `ids` of `table`.
fn scatter_rows<B: Backend>(be: &B, rows: &B::Buf, table: &mut B::Buf, ids: &[u32], dim: usize) {
    be.copy_rows(rows, &(0..ids.len() as u32).collect::<Vec<_>>(), table, ids, dim);
}

impl<B: Backend> Qwen2<B> {
    /// Attaches `lora`, writing its token rows (if any) into the base weights and keeping the
    /// base's values to put back on [`Qwen2::detach_lora`].
    pub fn attach_lora(&mut self, be: &B, mut lora: Lora<B>) {
        if let Some(t) = &mut lora.tokens {
            t.embed.original.clear();
            if let Some(s) = &mut t.head {
                s.original.clear();
            }
        }
        self.lora = Some(lora);
        self.sync_token_rows(be);
    }

    /// Detaches the adapters, putting the base's own token rows back: the model is the base again.
    pub fn detach_lora(&mut self, be: &B) -> Option<Lora<B>> {
        let lora = self.lora.take()?;
        let h = self.cfg.hidden_size;
        if let Some(t) = &lora.tokens {
            // Rows never written in (no original kept) are still the base's.
            let put_back = |set: &RowSet<B>, table: &mut B::Buf| {
                if !set.original.is_empty() {
                    scatter_rows(be, &be.upload_f32(&set.original), table, &set.ids, h);
                }
            };
            put_back(&t.embed, &mut self.w.embed);
            if let (Some(set), Some(head)) = (&t.head, &mut self.w.lm_head) {
                put_back(set, head);
            }
        }
        Some(lora)
    }

    /// Writes the attached adapters' token rows into the base weights (after an optimiser step
    /// or a checkpoint changed them), first keeping the base's values where not yet kept;
    /// nothing to do without rows.
    pub fn sync_token_rows(&mut self, be: &B) {
        let h = self.cfg.hidden_size;
        let Some(t) = self.lora.as_mut().and_then(|l| l.tokens.as_mut()) else { return };
        let write_in = |set: &mut RowSet<B>, table: &mut B::Buf| {
            if set.original.is_empty() {
                set.original = be.to_f32(&gather_rows(be, table, &set.ids, h));
            }
            scatter_rows(be, &set.rows, table, &set.ids, h);
        };
        write_in(&mut t.embed, &mut self.w.embed);
        if let (Some(set), Some(head)) = (&mut t.head, &mut self.w.lm_head) {
            write_in(set, head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_tokens_read_and_write_as_toml() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Section {
            trainable_tokens: TrainableTokens,
        }
        for (text, want) in [
            ("trainable_tokens = \"auto\"", TrainableTokens::Auto),
            (
                "trainable_tokens = [\"<tool_call>\", 151658]",
                TrainableTokens::List(vec![TokenRef::Text("<tool_call>".into()), TokenRef::Id(151658)]),
            ),
        ] {
            let s: Section = toml::from_str(text).unwrap();
            assert_eq!(s.trainable_tokens, want);
            assert_eq!(toml::from_str::<Section>(&toml::to_string(&s).unwrap()).unwrap(), s);
        }
        for (bad, said) in [
            ("\"all\"", "expected \"auto\" or a list of tokens, got \"all\""),
            ("[]", "the list is empty"),
            ("[1.5]", "\"auto\" or a list of token strings and ids"),
        ] {
            let e = toml::from_str::<Section>(&format!("trainable_tokens = {bad}")).unwrap_err().to_string();
            assert!(e.contains(said) && e.contains("trainable_tokens"), "{bad}: {e}");
        }
    }
}
