//! The trajectory JSONL schema shared by the harness (which writes it), synthesis, SFT and RL.
//!
//! One JSON object per line:
//!
//! ```json
//! {"task_id": "pkg__fix-1", "resolved": true, "expert_calls": 1,
//!  "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
//!               {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
//!                 "function": {"name": "bash", "arguments": {"command": "ls"}}}]},
//!               {"role": "tool", "content": "..."}],
//!  "tools": [{"type": "function", "function": {...}}],
//!  "tokens": {"ids": [151644, ...], "source": "ppppaaaaoooeeaa"},
//!  "meta": {"exit_status": "submitted"}}
//! ```
//!
//! `messages` are OpenAI-style (system/user/assistant/tool, assistant `tool_calls`; arguments
//! may be an object or a JSON string). `tokens` is present when the policy was protege's own
//! engine: the exact ids of the episode and one source letter per id — `p` prompt, `a` the
//! policy's own tokens, `o` tool observations, `e` expert replies — so that training never
//! re-tokenises. `meta` is free-form (exit status, rewards, timings). Unknown top-level fields
//! are rejected so that a typo does not silently lose data.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::Message;

/// Who produced a token of an episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Prompt,
    Policy,
    Observation,
    Expert,
}

impl Source {
    pub fn letter(self) -> char {
        match self {
            Source::Prompt => 'p',
            Source::Policy => 'a',
            Source::Observation => 'o',
            Source::Expert => 'e',
        }
    }

    pub fn from_letter(c: char) -> Option<Self> {
        Some(match c {
            'p' => Source::Prompt,
            'a' => Source::Policy,
            'o' => Source::Observation,
            'e' => Source::Expert,
            _ => return None,
        })
    }
}

/// The exact tokens of an episode run by the local engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub ids: Vec<u32>,
    /// One [`Source`] letter per id.
    pub source: String,
}

impl TokenRecord {
    pub fn new(ids: Vec<u32>, sources: &[Source]) -> Self {
        Self { ids, source: sources.iter().map(|s| s.letter()).collect() }
    }

    pub fn sources(&self) -> Result<Vec<Source>> {
        self.source
            .chars()
            .enumerate()
            .map(|(i, c)| {
                Source::from_letter(c).ok_or_else(|| anyhow!("tokens.source[{i}] is {c:?}; expected one of p, a, o, e"))
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trajectory {
    pub task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<bool>,
    #[serde(default)]
    pub expert_calls: usize,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenRecord>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: serde_json::Map<String, Value>,
}

impl Trajectory {
    /// Checks what the schema cannot express.
    pub fn validate(&self) -> Result<()> {
        if self.task_id.trim().is_empty() {
            bail!("task_id is empty");
        }
        if self.messages.is_empty() {
            bail!("messages is empty");
        }
        for (i, m) in self.messages.iter().enumerate() {
            m.validate(i)?;
        }
        if let Some(t) = &self.tokens {
            let n = t.source.chars().count();
            if n != t.ids.len() {
                bail!("tokens.ids has {} entries but tokens.source has {n}", t.ids.len());
            }
            t.sources()?;
        }
        Ok(())
    }
}

impl Trajectory {
    /// The record as written, at most `max_bytes` of JSON: one over it keeps only its first
    /// two messages (system and task), no tokens and no patch, and says so in
    /// `meta.record_too_large` (`{"bytes": .., "limit": ..}`); training skips it (nothing to
    /// learn), reports still count it.
    pub fn bounded(self, max_bytes: usize) -> Trajectory {
        let bytes = serde_json::to_vec(&self).map_or(usize::MAX, |v| v.len());
        if bytes <= max_bytes {
            return self;
        }
        let mut t = self;
        t.messages.truncate(2);
        t.tokens = None;
        t.meta.remove("patch");
        t.meta.insert("record_too_large".into(), serde_json::json!({"bytes": bytes, "limit": max_bytes}));
        t
    }
}

/// Reads a trajectory file; every problem names the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Trajectory>> {
    let file = File::open(path).with_context(|| format!("cannot open trajectories {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read line", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let t: Trajectory = crate::inputs::json_line(&line, &path.display().to_string(), i + 1)?;
        t.validate().map_err(|e| anyhow!("{}:{}: {e:#}", path.display(), i + 1))?;
        out.push(t);
    }
    Ok(out)
}

/// Writes a whole trajectory file atomically (a temporary file renamed into place), so that
/// a crash never leaves a half-written file behind.
pub fn write_jsonl(path: &Path, trajectories: &[Trajectory]) -> Result<()> {
    crate::util::write_atomic_with(path, |f| {
        for t in trajectories {
            serde_json::to_writer(&mut *f, t)?;
            f.write_all(b"\n")?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Trajectory {
        serde_json::from_value(json!({
            "task_id": "t1", "resolved": true, "expert_calls": 1,
            "messages": [{"role": "user", "content": "fix it"},
                         {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
                          "function": {"name": "bash", "arguments": "{\"command\": \"ls\"}"}}]},
                         {"role": "tool", "content": "a.py"}],
            "tokens": {"ids": [1, 2, 3], "source": "pao"},
            "meta": {"exit_status": "submitted"}
        }))
        .unwrap()
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        write_jsonl(&path, &[sample(), sample()]).unwrap();
        assert_eq!(read_jsonl(&path).unwrap(), vec![sample(), sample()]);
        assert!(!path.with_extension("jsonl.tmp").exists());
        assert_eq!(
            sample().tokens.unwrap().sources().unwrap(),
            vec![Source::Prompt, Source::Policy, Source::Observation]
        );
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        let good = serde_json::to_string(&sample()).unwrap();
        let cases = [
            ("{not json", "bad.jsonl:2:"),
            (r#"{"task_id": "x", "messages": [{"role": "robot", "content": "hi"}]}"#, "unknown variant `robot`"),
            (
                r#"{"task_id": "x", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": " ", "arguments": {}}}]}]}"#,
                "no function name",
            ),
            (
                r#"{"task_id": "x", "messages": [{"role": "user", "content": "a"}], "tokens": {"ids": [1, 2], "source": "p"}}"#,
                "tokens.source has 1",
            ),
            (
                r#"{"task_id": "x", "messages": [{"role": "user", "content": "a"}], "tokens": {"ids": [1], "source": "z"}}"#,
                "expected one of p, a, o, e",
            ),
            (r#"{"task_id": "x", "mesages": []}"#, "unknown field `mesages`"),
            (r#"{"task_id": "x", "messages": []}"#, "messages is empty"),
        ];
        for (line, want) in cases {
            std::fs::write(&path, format!("{good}\n{line}\n")).unwrap();
            let e = format!("{:#}", read_jsonl(&path).unwrap_err());
            assert!(e.contains("bad.jsonl:2:") && e.contains(want), "{e} should mention {want}");
        }
    }
}
