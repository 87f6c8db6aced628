//! Token rows the base model never trained, found and reported when training starts, and the
//! adapters that train them.
//!
//! A model's embedding and LM head have a row per id up to `vocab_size`, often more ids than the
//! tokenizer has (Qwen2.5: 151665 to 151935 belong to no token). No data ever trains those
//! padding rows, so they show what an untrained row of this model looks like. A token missing
//! from the pretraining data keeps such a row too: in Qwen2.5-Coder-0.5B the (tied) rows of
//! `<tool_call>` and `</tool_call>` equal the padding row 151665. Fine-tuning must train those
//! rows, which LoRA alone cannot: the adapters leave the rows as they are, and a model whose
//! row for a tag is a padding row writes some other token where the tag belongs.
//!
//! The rule: a row `x` is untrained when it lies within 1% of one of the padding rows `p`
//! (relative Euclidean distance, `|x - p| <= 0.01 |p|`: for rows of one norm, a cosine above
//! 0.99995). Bit-identical rows, the usual case, pass at distance 0; a trained row is far off
//! (`<|im_start|>`'s row in Qwen2.5-Coder-0.5B has cosine 0.93 with the padding row, a
//! distance of about 37%). A model without padding rows gives no reference: nothing is said.
//! The candidates are the tokenizer's added tokens and the chat template's markup that is a
//! single token ([`TEMPLATE_TOKENS`]).

use anyhow::Result;

use crate::backend::Backend;
use crate::model::lora::{Lora, LoraConfig};
use crate::model::token_rows::{gather_rows, TokenRows, TrainableTokens};
use crate::model::Qwen2;
use crate::tokenizer::{Tokenizer, TEMPLATE_TOKENS};

/// Largest relative distance from a padding row at which a row counts as untrained.
const SAME_ROW: f64 = 0.01;
/// Padding rows compared against at most (the first ones; they are alike).
const MAX_PADDING_ROWS: usize = 4096;

/// A token whose embedding or LM-head row is untrained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UntrainedToken {
    pub id: u32,
    pub token: String,
    /// Its embedding row is untrained (tied embeddings: its one row, the head's too).
    pub embed: bool,
    /// Its LM-head row is untrained (untied heads only).
    pub head: bool,
    /// The chat template writes it.
    pub template: bool,
}

/// What [`find_untrained`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UntrainedRows {
    /// The ids no tokenizer entry uses, whose rows are the reference.
    pub padding: Vec<u32>,
    pub tied: bool,
    pub tokens: Vec<UntrainedToken>,
}

impl UntrainedRows {
    /// The chat template's tokens with an untrained row: what `trainable_tokens = "auto"` trains.
    pub fn template_ids(&self) -> Vec<u32> {
        self.tokens.iter().filter(|t| t.template).map(|t| t.id).collect()
    }
}

/// The added and template tokens of `tok` whose rows in `model` are untrained (see the module
/// documentation for the rule).
pub fn find_untrained<B: Backend>(be: &B, model: &Qwen2<B>, tok: &Tokenizer) -> UntrainedRows {
    let (vocab, h) = (model.cfg.vocab_size, model.cfg.hidden_size);
    let used = tok.used_ids();
    let padding: Vec<u32> = (0..vocab as u32).filter(|id| !used.contains(id)).collect();
    let tied = model.w.lm_head.is_none();
    let mut found = UntrainedRows { padding, tied, tokens: vec![] };
    let mut candidates: Vec<(u32, String)> = tok.added_tokens();
    for t in TEMPLATE_TOKENS {
        if let Some(id) = tok.token_to_id(t) {
            candidates.push((id, t.to_string()));
        }
    }
    candidates.sort();
    candidates.dedup_by_key(|c| c.0);
    candidates.retain(|(id, _)| (*id as usize) < vocab);
    if found.padding.is_empty() || candidates.is_empty() {
        return found;
    }
    let ids: Vec<u32> = candidates.iter().map(|c| c.0).collect();
    let reference = &found.padding[..found.padding.len().min(MAX_PADDING_ROWS)];
    let untrained_in = |table: &B::Buf| {
        let rows = be.to_f32(&gather_rows(be, table, &ids, h));
        let pads = be.to_f32(&gather_rows(be, table, reference, h));
        rows.chunks(h).map(|x| pads.chunks(h).any(|p| near(x, p))).collect::<Vec<bool>>()
    };
    let embed = untrained_in(&model.w.embed);
    let head = match &model.w.lm_head {
        Some(w) => untrained_in(w),
        None => vec![false; ids.len()],
    };
    for (i, (id, token)) in candidates.into_iter().enumerate() {
        if embed[i] || head[i] {
            let template = TEMPLATE_TOKENS.contains(&token.as_str());
            found.tokens.push(UntrainedToken { id, token, embed: embed[i], head: head[i], template });
        }
    }
    found
}

/// `|x - p| <= SAME_ROW |p|`.
fn near(x: &[f32], p: &[f32]) -> bool {
    let (mut d2, mut p2) = (0f64, 0f64);
    for (&a, &b) in x.iter().zip(p) {
        d2 += (a as f64 - b as f64).powi(2);
        p2 += (b as f64).powi(2);
    }
    d2 <= SAME_ROW * SAME_ROW * p2
}

/// `ids` as ranges: "455", "151665-151935".
fn id_ranges(ids: &[u32]) -> String {
    let mut parts: Vec<String> = vec![];
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { ids[i].to_string() } else { format!("{}-{}", ids[i], ids[j]) });
        i = j + 1;
    }
    if parts.len() > 4 {
        let n = parts.len();
        parts.truncate(4);
        parts.push(format!("... ({n} ranges)"));
    }
    parts.join(", ")
}

/// `<tool_call> (151657)`, and which of its rows are untrained when the head is untied:
/// `<tool_call> (151657: LM head)`.
fn describe(t: &UntrainedToken, tied: bool) -> String {
    let rows = match (tied, t.embed, t.head) {
        (true, _, _) => return format!("{} ({})", t.token, t.id),
        (false, true, true) => "embedding and LM head",
        (false, true, false) => "embedding",
        (false, false, _) => "LM head",
    };
    format!("{} ({}: {rows})", t.token, t.id)
}

/// What to say at the start of a `stage` run ("sft", "rl") about `found`, given what the run
/// trains: `lora` (`None`: full fine-tuning) with the token rows `trained`. `None`: nothing.
pub fn report(found: &UntrainedRows, lora: Option<&LoraConfig>, trained: &[u32], stage: &str) -> Option<String> {
    let untaught: Vec<&UntrainedToken> = found.tokens.iter().filter(|t| !trained.contains(&t.id)).collect();
    let (template, other): (Vec<&UntrainedToken>, Vec<&UntrainedToken>) = untaught.iter().partition(|t| t.template);
    let mut lines = vec![];
    let list = |ts: &[&UntrainedToken]| ts.iter().map(|t| describe(t, found.tied)).collect::<Vec<_>>().join(", ");
    let rows = if found.tied { "embedding rows (tied: their LM-head rows too)" } else { "rows" };
    let reference = format!("identical to a row of the padding ids no token uses ({})", id_ranges(&found.padding));
    if !template.is_empty() {
        match lora {
            None => lines.push(format!(
                "{stage}: note: the chat template's tokens {} have untrained {rows},\n  {reference}; full \
                 fine-tuning trains them.",
                list(&template)
            )),
            Some(l) => {
                // The config line that trains them: the tokens already named, then these.
                let mut names: Vec<String> = match &l.trainable_tokens {
                    Some(TrainableTokens::List(refs)) => refs
                        .iter()
                        .map(|r| match r {
                            crate::model::token_rows::TokenRef::Id(id) => id.to_string(),
                            crate::model::token_rows::TokenRef::Text(s) => toml_string(s),
                        })
                        .collect(),
                    _ => vec![],
                };
                names.extend(template.iter().map(|t| toml_string(&t.token)));
                lines.push(format!(
                    "{stage}: WARNING: the chat template's tokens {} have untrained {rows},\n  {reference}.\n  \
                     LoRA leaves these rows as they are, so the model cannot learn to read or write these tokens:\n  \
                     it writes another token where they belong. Train the rows with the adapters; in [lora], set\n    \
                     trainable_tokens = [{}]\n  (or trainable_tokens = \"auto\"), or fine-tune fully.",
                    list(&template),
                    names.join(", ")
                ));
            }
        }
    }
    if !other.is_empty() {
        let shown: Vec<&UntrainedToken> = other.iter().take(6).copied().collect();
        let more =
            if other.len() > shown.len() { format!(" and {} more", other.len() - shown.len()) } else { "".into() };
        lines.push(format!(
            "{stage}: note: added tokens the chat template does not write have untrained {rows} too: {}{more}",
            list(&shown)
        ));
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// `s` as a TOML basic string (JSON's escapes are TOML's).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// Looks for untrained token rows in `model` and attaches fresh adapters per `lora` (`None`:
/// full fine-tuning, nothing to attach) with the token rows it asks for (`"auto"`: the template
/// tokens found untrained). With `verbose` (the process that reports), says on stderr what it
/// found and which rows it trains.
pub fn attach_training_adapters<B: Backend>(
    be: &B,
    model: &mut Qwen2<B>,
    tok: &Tokenizer,
    lora: Option<&LoraConfig>,
    stage: &str,
    verbose: bool,
) -> Result<()> {
    let found = find_untrained(be, model, tok);
    let mut trained = vec![];
    if let Some(l) = lora {
        let mut adapters = Lora::init(be, &model.cfg, l)?;
        if let Some(asked) = &l.trainable_tokens {
            trained = asked.resolve(|t| tok.token_to_id(t), model.cfg.vocab_size, &found.template_ids())?;
            if verbose {
                eprintln!("{}", trained_rows_line(tok, &trained, found.tied, stage));
            }
            if !trained.is_empty() {
                adapters.tokens = Some(TokenRows::from_model(be, model, &trained));
            }
        }
        model.attach_lora(be, adapters);
    }
    if let Some(msg) = report(&found, lora, &trained, stage).filter(|_| verbose) {
        eprintln!("{msg}");
    }
    Ok(())
}

/// Which token rows the adapters train.
fn trained_rows_line(tok: &Tokenizer, ids: &[u32], tied: bool, stage: &str) -> String {
    if ids.is_empty() {
        return format!("{stage}: lora.trainable_tokens = \"auto\": no template token has untrained rows to train");
    }
    let names: Vec<String> =
        ids.iter().map(|&id| format!("{} ({id})", tok.id_to_token(id).unwrap_or_else(|| "?".into()))).collect();
    let rows = if tied { "(tied) embedding rows" } else { "embedding and LM-head rows" };
    format!("{stage}: training the {rows} of {} with the adapters", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u32, s: &str, template: bool) -> UntrainedToken {
        UntrainedToken { id, token: s.into(), embed: true, head: false, template }
    }

    #[test]
    fn rows_within_one_percent_of_a_padding_row_are_untrained() {
        let p = [3.0, 4.0]; // |p| = 5
        assert!(near(&p, &p));
        assert!(near(&[3.03, 4.0], &p));
        assert!(!near(&[3.06, 4.0], &p));
        assert!(!near(&[4.0, 3.0], &p), "same norm, other direction");
        assert!(near(&[0.0, 0.0], &[0.0, 0.0]), "zero rows are identical");
        assert!(!near(&[1e-3, 0.0], &[0.0, 0.0]));
    }

    #[test]
    fn ranges_are_compact() {
        assert_eq!(id_ranges(&[455]), "455");
        assert_eq!(id_ranges(&[3, 4, 5, 9, 11, 12]), "3-5, 9, 11-12");
        assert_eq!(id_ranges(&[1, 3, 5, 7, 9]), "1, 3, 5, 7, ... (5 ranges)");
    }

    #[test]
    fn the_report_names_the_tokens_and_the_config_line() {
        let found = UntrainedRows {
            padding: (151665..151936).collect(),
            tied: true,
            tokens: vec![
                token(151657, "<tool_call>", true),
                token(151658, "</tool_call>", true),
                token(151662, "<|fim_pad|>", false),
            ],
        };
        let lora: LoraConfig = toml::from_str("rank = 8\nalpha = 16.0\ntargets = [\"q\"]").unwrap();
        let msg = report(&found, Some(&lora), &[], "sft").unwrap();
        assert!(msg.contains("WARNING"), "{msg}");
        assert!(
            msg.contains("tokens <tool_call> (151657), </tool_call> (151658) have untrained embedding rows"),
            "{msg}"
        );
        assert!(msg.contains("padding ids no token uses (151665-151935)"), "{msg}");
        assert!(msg.contains("\n    trainable_tokens = [\"<tool_call>\", \"</tool_call>\"]\n"), "{msg}");
        assert!(msg.contains("<|fim_pad|> (151662"), "{msg}");
        // Training them silences the warning; full fine-tuning gets a note.
        let msg = report(&found, Some(&lora), &[151657, 151658], "sft").unwrap();
        assert!(!msg.contains("WARNING") && msg.contains("<|fim_pad|>"), "{msg}");
        let msg = report(&found, None, &[], "rl").unwrap();
        assert!(msg.starts_with("rl: note:") && msg.contains("full fine-tuning trains them"), "{msg}");
        // Tokens already named are kept in the suggested line.
        let named: LoraConfig =
            toml::from_str("rank = 8\nalpha = 16.0\ntargets = [\"q\"]\ntrainable_tokens = [\"<tool_call>\", 7]")
                .unwrap();
        let msg = report(&found, Some(&named), &[151657], "sft").unwrap();
        assert!(msg.contains("trainable_tokens = [\"<tool_call>\", 7, \"</tool_call>\"]"), "{msg}");
        // Untied: which of a token's rows are untrained.
        let head_only = UntrainedToken { head: true, embed: false, ..token(9, "<tool_call>", true) };
        assert_eq!(describe(&head_only, false), "<tool_call> (9: LM head)");
        let nothing = UntrainedRows { padding: vec![], tied: true, tokens: vec![] };
        assert_eq!(report(&nothing, Some(&lora), &[], "sft"), None);
    }
}
