//! SFT examples from rows: token ids plus which tokens are learned, the policy for sequences
//! over `max_seq_len`, and packed batches.
//!
//! A row is one of:
//! - a trajectory (protege's schema, with `task_id`). With recorded `tokens` (a local-policy
//!   episode) it is used as recorded and only its policy tokens (`a`) are learned; otherwise
//!   its messages are rendered with the chat template and only the assistant's tokens are
//!   learned (prompts, tool outputs and expert replies, which arrive as tool messages, are
//!   masked);
//! - TRL's conversational rows: `{"messages": [...], "tools": [...]}` (as a trajectory without
//!   tokens: the assistant's turns learned, as TRL's `assistant_only_loss=True`; TRL's default
//!   learns every token), and `{"prompt": [...], "completion": [...]}` (the completion's
//!   assistant turns learned; TRL's `completion_only_loss` would learn tool messages in a
//!   completion too, which are not the model's words);
//! - TRL's standard rows: `{"prompt": "...", "completion": "..."}` (no template; as TRL, the
//!   end-of-sequence token appended to the completion, the prompt and the whole tokenised, the
//!   tokens after the prompt's learned) and `{"text": "..."}` (every token learned).
//!
//! TRL ignores a dataset's other columns, and so do these rows; a trajectory is strict.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;
use serde_json::Value;

use crate::agent::trajectory::{Source, Trajectory};
use crate::chat::{Message, Role};
/// The `data.overlong` setting of an SFT config, which this module applies.
pub use crate::config::Overlong;
use crate::tokenizer::Tokenizer;

/// One SFT row (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub enum SftRow {
    Trajectory(Trajectory),
    /// TRL's conversational prompt/completion.
    ChatCompletion {
        id: String,
        prompt: Vec<Message>,
        completion: Vec<Message>,
        tools: Vec<Value>,
    },
    /// TRL's standard prompt/completion; `{"text"}` rows have an empty prompt. An end-of-sequence
    /// token follows the completion (as TRL appends `eos_token`).
    TextCompletion {
        id: String,
        prompt: String,
        completion: String,
    },
}

impl From<Trajectory> for SftRow {
    fn from(t: Trajectory) -> Self {
        SftRow::Trajectory(t)
    }
}

impl SftRow {
    /// The task id, or `file:line` for rows that have none.
    pub fn id(&self) -> &str {
        match self {
            SftRow::Trajectory(t) => &t.task_id,
            SftRow::ChatCompletion { id, .. } | SftRow::TextCompletion { id, .. } => id,
        }
    }
}

/// Reads an SFT data file: JSONL of any row kind (a file may mix them). Every problem names
/// the file and line; recorded token ids must be below `vocab_size` (the model's).
pub fn read_rows(path: &Path, vocab_size: usize) -> Result<Vec<SftRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read SFT data {}", path.display()))?;
    let origin = path.display().to_string();
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{origin}:{}", i + 1);
        let v: Value = crate::inputs::json_line(line, &origin, i + 1)?;
        let row = parse_row(v, at.clone()).with_context(|| at.clone())?;
        if let SftRow::Trajectory(t) = &row {
            if let Some(rec) = &t.tokens {
                if let Some((j, id)) = rec.ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab_size) {
                    bail!("{at}: tokens.ids[{j}] is {id}, outside the model's vocabulary of {vocab_size} tokens (was this trajectory recorded with another model?)");
                }
            }
        }
        out.push(row);
    }
    Ok(out)
}

/// TRL's conversational row; other columns are ignored, as TRL does.
#[derive(Deserialize)]
struct TrlConversation {
    messages: Vec<Message>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
}

/// TRL's conversational prompt/completion row.
#[derive(Deserialize)]
struct TrlChatCompletion {
    prompt: Vec<Message>,
    completion: Vec<Message>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
}

/// One row; errors leave the location to the caller.
fn parse_row(v: Value, id: String) -> Result<SftRow> {
    let Value::Object(obj) = &v else {
        bail!("expected a JSON object (a trajectory, or a TRL row with \"messages\", \"prompt\"/\"completion\" or \"text\")")
    };
    let has = |k: &str| obj.contains_key(k);
    let check = |key: &str, messages: &[Message]| -> Result<()> {
        for (i, m) in messages.iter().enumerate() {
            m.validate(i).with_context(|| format!("field `{key}`"))?;
        }
        Ok(())
    };
    if has("task_id") || has("tokens") {
        let t: Trajectory = crate::inputs::json_value(v, "")?;
        t.validate()?;
        return Ok(SftRow::Trajectory(t));
    }
    if has("messages") {
        let row: TrlConversation = crate::inputs::json_value(v, "")?;
        check("messages", &row.messages)?;
        if row.messages.is_empty() {
            bail!("messages is empty");
        }
        let t = Trajectory {
            task_id: id,
            resolved: None,
            expert_calls: 0,
            messages: row.messages,
            tools: row.tools.unwrap_or_default(),
            tokens: None,
            meta: Default::default(),
        };
        return Ok(SftRow::Trajectory(t));
    }
    match (obj.get("prompt"), obj.get("completion")) {
        (Some(Value::String(p)), Some(Value::String(c))) => {
            Ok(SftRow::TextCompletion { id, prompt: p.clone(), completion: c.clone() })
        }
        (Some(Value::Array(_)), Some(Value::Array(_))) => {
            let row: TrlChatCompletion = crate::inputs::json_value(v, "")?;
            check("prompt", &row.prompt)?;
            check("completion", &row.completion)?;
            if !row.completion.iter().any(|m| m.role == Role::Assistant) {
                bail!("field `completion` has no assistant message: there is nothing to learn");
            }
            Ok(SftRow::ChatCompletion {
                id,
                prompt: row.prompt,
                completion: row.completion,
                tools: row.tools.unwrap_or_default(),
            })
        }
        (Some(_), Some(_)) => bail!(
            "`prompt` and `completion` must both be strings (standard) or both lists of messages (conversational)"
        ),
        (Some(_), None) => bail!("a `prompt` without a `completion` (prompt-only rows are for RL, not SFT)"),
        (None, Some(_)) => bail!("a `completion` without a `prompt`"),
        (None, None) => match obj.get("text") {
            Some(Value::String(t)) => Ok(SftRow::TextCompletion { id, prompt: String::new(), completion: t.clone() }),
            Some(_) => bail!("field `text` must be a string"),
            None => bail!(
                "not an SFT row: expected a trajectory (`task_id`, `messages`), a TRL conversational row (`messages`, optional `tools`), a prompt/completion row, or a `text` row; found the keys {}",
                obj.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub task_id: String,
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

/// How many trajectories each length policy touched (logged by the trainer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    pub kept: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    pub dropped_nothing_to_learn: usize,
}

/// Token ids and learned-token mask of one trajectory.
pub fn tokenize(t: &Trajectory, tok: &Tokenizer) -> Result<(Vec<u32>, Vec<bool>)> {
    if let Some(rec) = &t.tokens {
        let trained = rec.sources()?.into_iter().map(|s| s == Source::Policy).collect();
        return Ok((rec.ids.clone(), trained));
    }
    let enc = tok.apply_chat_template(&t.messages, &t.tools, false)?;
    let mask = enc.assistant_mask();
    Ok((enc.ids, mask))
}

/// Token ids and learned-token mask of one row.
pub fn tokenize_row(row: &SftRow, tok: &Tokenizer) -> Result<(Vec<u32>, Vec<bool>)> {
    match row {
        SftRow::Trajectory(t) => tokenize(t, tok),
        SftRow::ChatCompletion { prompt, completion, tools, .. } => {
            // As TRL: the prompt as a generation prompt, then the whole conversation; what the
            // completion adds is learned where the assistant wrote it.
            let head = tok.apply_chat_template(prompt, tools, true)?;
            let all: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
            let enc = tok.apply_chat_template(&all, tools, false)?;
            if !enc.ids.starts_with(&head.ids) {
                bail!("the chat template renders the prompt differently once the completion follows; cannot tell the completion's tokens apart");
            }
            let mut mask = enc.assistant_mask();
            mask[..head.ids.len()].iter_mut().for_each(|m| *m = false);
            Ok((enc.ids, mask))
        }
        SftRow::TextCompletion { prompt, completion, .. } => {
            // As TRL: the end-of-sequence token appended to the completion's text, then the
            // prompt and prompt + completion tokenised; what follows the prompt's tokens is
            // learned (TRL warns where the two tokenisations disagree at the seam).
            let eos = tok
                .chat_template()
                .special_tokens()
                .iter()
                .find(|(k, _)| k == "eos_token")
                .map(|(_, t)| t.clone())
                .or_else(|| tok.stop_ids.first().and_then(|&id| tok.id_to_token(id)))
                .context("the tokenizer has no end-of-sequence token to end the completion with")?;
            let completion = if completion.ends_with(&eos) { completion.clone() } else { format!("{completion}{eos}") };
            let n_prompt = tok.encode(prompt)?.len();
            let ids = tok.encode(&format!("{prompt}{completion}"))?;
            let mask = (0..ids.len()).map(|i| i >= n_prompt).collect();
            Ok((ids, mask))
        }
    }
}

/// Applies the length policy; `None` when the example is dropped.
fn fit(ids: Vec<u32>, trained: Vec<bool>, max_len: usize, policy: Overlong) -> Option<(Vec<u32>, Vec<bool>, bool)> {
    if ids.len() <= max_len {
        return Some((ids, trained, false));
    }
    if policy == Overlong::Drop {
        return None;
    }
    // The end of an assistant turn: a learned token followed by one that is not.
    let cut = (1..=max_len).rev().find(|&i| trained[i - 1] && !trained.get(i).copied().unwrap_or(false))?;
    Some((ids[..cut].to_vec(), trained[..cut].to_vec(), true))
}

/// Builds the examples of `rows`.
pub fn build_examples(
    rows: &[SftRow],
    tok: &Tokenizer,
    max_len: usize,
    policy: Overlong,
) -> Result<(Vec<Example>, DataStats)> {
    let mut stats = DataStats::default();
    let mut out = vec![];
    for row in rows {
        let (ids, trained) = tokenize_row(row, tok).with_context(|| format!("SFT row {}", row.id()))?;
        let Some((ids, trained, cut)) = fit(ids, trained, max_len, policy) else {
            stats.dropped_too_long += 1;
            continue;
        };
        // Row t predicts token t + 1, so a learned first token teaches nothing.
        if !trained.iter().skip(1).any(|&m| m) {
            stats.dropped_nothing_to_learn += 1;
            continue;
        }
        stats.truncated += cut as usize;
        stats.kept += 1;
        out.push(Example { task_id: row.id().to_string(), ids, trained });
    }
    Ok((out, stats))
}

/// Groups examples into batches of at most `max_batch_tokens` tokens (an example longer than
/// that is a batch of its own). Examples are sorted by length so that batches hold similar
/// lengths, then the batch order is shuffled with `seed`.
pub fn pack_batches(examples: &[Example], max_batch_tokens: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| (examples[i].ids.len(), i));
    let mut batches: Vec<Vec<usize>> = vec![];
    let mut tokens = 0;
    for i in order {
        let n = examples[i].ids.len();
        match batches.last_mut() {
            Some(b) if tokens + n <= max_batch_tokens => {
                b.push(i);
                tokens += n;
            }
            _ => {
                batches.push(vec![i]);
                tokens = n;
            }
        }
    }
    batches.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_assistant_turns() {
        let trained = vec![false, false, true, true, false, false, true, true, true, false];
        let ids: Vec<u32> = (0..10).collect();
        // Fits: untouched.
        assert!(!fit(ids.clone(), trained.clone(), 10, Overlong::Drop).unwrap().2);
        assert!(fit(ids.clone(), trained.clone(), 9, Overlong::Drop).is_none());
        // max 8 cuts inside the second turn: back to the end of the first (after index 3).
        let (i, m, cut) = fit(ids.clone(), trained.clone(), 8, Overlong::TruncateAtTurn).unwrap();
        assert!(cut);
        assert_eq!(i, vec![0, 1, 2, 3]);
        assert_eq!(m, vec![false, false, true, true]);
        assert_eq!(fit(ids.clone(), trained.clone(), 9, Overlong::TruncateAtTurn).unwrap().0.len(), 9);
        assert!(fit(ids, trained, 3, Overlong::TruncateAtTurn).is_none());
    }

    #[test]
    fn batches_respect_the_token_budget_and_cover_everything() {
        let examples: Vec<Example> = [5usize, 9, 3, 12, 4, 7]
            .iter()
            .map(|&n| Example { task_id: "t".into(), ids: vec![0; n], trained: vec![true; n] })
            .collect();
        let batches = pack_batches(&examples, 12, 1);
        let mut seen: Vec<usize> = batches.concat();
        seen.sort();
        assert_eq!(seen, (0..6).collect::<Vec<_>>());
        for b in &batches {
            let total: usize = b.iter().map(|&i| examples[i].ids.len()).sum();
            assert!(total <= 12 || b.len() == 1);
        }
        assert_eq!(batches, pack_batches(&examples, 12, 1), "deterministic for a seed");
    }
}
