//! Experts answer the agent's `ask_expert` queries. Every expert sees the query plus the last
//! K messages of the episode; its reply is capped; tokens and cost are recorded per call.
//!
//! This module holds the trait and the `oracle` expert, which knows the task's gold patch and
//! gives natural-language guidance — which file and function, what is wrong, how to fix it —
//! without pasting the patch. It is deterministic: tests, demos and synthesis use it.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::tasks::TaskInstance;

/// What one expert call returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertReply {
    pub text: String,
    pub tokens_in: usize,
    pub tokens_out: usize,
    pub cost_usd: f64,
}

pub trait Expert: Send {
    /// The name recorded in trajectories.
    fn name(&self) -> String;
    /// Answers `query`; `recent` are the last K messages of the episode.
    fn advise(&mut self, task: &TaskInstance, query: &str, recent: &[Message]) -> Result<ExpertReply>;
}

/// A rough token count for text that no tokenizer measured (about 4 characters per token).
pub fn approx_tokens(text: &str) -> usize {
    text.len().div_ceil(4)
}

/// Cuts a reply to `max_chars` characters at a character boundary, saying so.
pub fn cap_reply(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}\n[expert reply truncated]", &text[..i]),
        None => text.to_string(),
    }
}

/// The gold-patch oracle.
pub struct Oracle;

/// One hunk of a unified diff.
#[derive(Debug, Clone, PartialEq)]
struct Hunk {
    file: String,
    /// The enclosing function or class git prints after the `@@` header.
    context: String,
    /// First line of the hunk in the old file.
    old_start: usize,
    removed: Vec<String>,
    added: Vec<String>,
    /// The line number (old file) of the first removed line, or where lines are added.
    change_line: usize,
}

fn parse_hunks(diff: &str) -> Vec<Hunk> {
    let mut hunks: Vec<Hunk> = vec![];
    let mut file = String::new();
    let mut line = 0usize;
    let mut seen_change = false;
    for l in diff.lines() {
        if let Some(p) = l.strip_prefix("+++ ") {
            file = p.split('\t').next().unwrap_or(p).trim().trim_start_matches("b/").to_string();
        } else if l.starts_with("--- ") || l.starts_with("diff --git") || l.starts_with("index ") {
        } else if let Some(rest) = l.strip_prefix("@@ ") {
            let (ranges, context) = rest.split_once(" @@").unwrap_or((rest, ""));
            let old_start = ranges
                .split_whitespace()
                .next()
                .and_then(|r| r.trim_start_matches('-').split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            line = old_start;
            seen_change = false;
            hunks.push(Hunk {
                file: file.clone(),
                context: context.trim().to_string(),
                old_start,
                removed: vec![],
                added: vec![],
                change_line: old_start,
            });
        } else if let Some(h) = hunks.last_mut() {
            if let Some(r) = l.strip_prefix('-') {
                if !seen_change {
                    h.change_line = line;
                    seen_change = true;
                }
                h.removed.push(r.to_string());
                line += 1;
            } else if let Some(a) = l.strip_prefix('+') {
                if !seen_change {
                    h.change_line = line;
                    seen_change = true;
                }
                h.added.push(a.to_string());
            } else {
                line += 1;
            }
        }
    }
    hunks
}

/// Splits code into identifiers, numbers, strings and operator runs.
fn code_tokens(s: &str) -> Vec<String> {
    let mut out = vec![];
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        } else if c.is_alphanumeric() || c == '_' {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.') {
                i += 1;
            }
        } else if c == '"' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += 1;
            }
            i = (i + 1).min(chars.len());
        } else if "()[]{},:".contains(c) {
            i += 1;
        } else {
            while i < chars.len()
                && !chars[i].is_alphanumeric()
                && !chars[i].is_whitespace()
                && !"()[]{},:_\"'".contains(chars[i])
            {
                i += 1;
            }
        }
        out.push(chars[start..i].iter().collect());
    }
    out
}

/// The tokens only in `a` and only in `b` (multiset difference, in order).
fn token_difference(a: &[String], b: &[String]) -> (Vec<String>, Vec<String>) {
    let mut only_b: Vec<String> = b.to_vec();
    let mut only_a = vec![];
    for t in a {
        match only_b.iter().position(|x| x == t) {
            Some(p) => {
                only_b.remove(p);
            }
            None => only_a.push(t.clone()),
        }
    }
    (only_a, only_b)
}

fn quoted(tokens: &[String]) -> String {
    tokens.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
}

impl Oracle {
    /// The guidance for a gold patch, hunk by hunk.
    pub fn guidance(patch: &str) -> String {
        let hunks = parse_hunks(patch);
        if hunks.is_empty() {
            return "I cannot see where the problem is; re-read the problem statement and reproduce it first.".into();
        }
        let mut out = vec![];
        for h in &hunks {
            let place = if h.context.is_empty() {
                format!("`{}` around line {}", h.file, h.change_line)
            } else {
                format!("`{}`, in `{}`, around line {}", h.file, h.context, h.change_line)
            };
            let removed: Vec<String> = h.removed.iter().filter(|l| !l.trim().is_empty()).cloned().collect();
            let added: Vec<String> = h.added.iter().filter(|l| !l.trim().is_empty()).cloned().collect();
            let mut s = format!("Look at {place}.");
            if removed.is_empty() {
                let (_, new) = token_difference(&[], &added.iter().flat_map(|l| code_tokens(l)).collect::<Vec<_>>());
                let mut names: Vec<String> = new
                    .into_iter()
                    .filter(|t| t.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_'))
                    .collect();
                names.dedup();
                names.truncate(6);
                s += &format!(
                    " Something is missing there: the fix adds {} new line(s){}.",
                    added.len(),
                    if names.is_empty() { String::new() } else { format!(" that involve {}", quoted(&names)) }
                );
            } else {
                let old_tokens: Vec<String> = removed.iter().flat_map(|l| code_tokens(l)).collect();
                let new_tokens: Vec<String> = added.iter().flat_map(|l| code_tokens(l)).collect();
                let (gone, new) = token_difference(&old_tokens, &new_tokens);
                let current = removed.iter().map(|l| format!("    {}", l.trim())).collect::<Vec<_>>().join("\n");
                s += &format!(" This code is wrong:\n{current}\n");
                s += &match (gone.len(), new.len()) {
                    (0, 0) => "Only its layout needs to change.".to_string(),
                    (_, 0) => format!("It should not use {} there; remove that part.", quoted(&gone)),
                    (0, _) => {
                        // Name what is missing (identifiers only, a few), never the new code itself.
                        let mut names: Vec<String> = new
                            .iter()
                            .filter(|t| t.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_'))
                            .cloned()
                            .collect();
                        names.dedup();
                        names.truncate(4);
                        if names.is_empty() {
                            "Something is missing from it.".to_string()
                        } else {
                            format!("It is missing something involving {}.", quoted(&names))
                        }
                    }
                    (1, 1) => format!("The {} there should be {}.", quoted(&gone), quoted(&new)),
                    _ if added.is_empty() => "Those lines should be removed.".to_string(),
                    _ => format!(
                        "It should use {} instead of {}.",
                        quoted(&new[..new.len().min(8)]),
                        quoted(&gone[..gone.len().min(8)])
                    ),
                };
            }
            out.push(s);
        }
        out.push("Make that change, run the relevant tests to confirm, then submit.".into());
        out.join("\n\n")
    }
}

impl Expert for Oracle {
    fn name(&self) -> String {
        "oracle".into()
    }

    fn advise(&mut self, task: &TaskInstance, query: &str, recent: &[Message]) -> Result<ExpertReply> {
        let text = Self::guidance(&task.patch);
        let seen: usize = recent.iter().map(|m| approx_tokens(m.text())).sum();
        Ok(ExpertReply {
            tokens_in: approx_tokens(query) + seen,
            tokens_out: approx_tokens(&text),
            text,
            cost_usd: 0.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATCH: &str = "diff --git a/calc/ops.py b/calc/ops.py
--- a/calc/ops.py
+++ b/calc/ops.py
@@ -10,7 +10,7 @@ def clamp(x, lo, hi):
     if x < lo:
         return lo
-    if x >= hi:
+    if x > hi:
         return hi
     return x
@@ -20,3 +20,5 @@ def mean(xs):
     total = sum(xs)
+    if not xs:
+        raise ValueError(\"mean of empty list\")
     return total / len(xs)
";

    #[test]
    fn guidance_names_place_and_change_without_pasting_the_patch() {
        let g = Oracle::guidance(PATCH);
        assert!(g.contains("`calc/ops.py`, in `def clamp(x, lo, hi):`, around line 12"), "{g}");
        assert!(g.contains("The `>=` there should be `>`."), "{g}");
        assert!(
            g.contains("in `def mean(xs):`") && g.contains("adds 2 new line(s)") && g.contains("`ValueError`"),
            "{g}"
        );
        for added in PATCH.lines().filter(|l| l.starts_with('+') && !l.starts_with("+++")) {
            assert!(!g.contains(added[1..].trim()), "pastes {added:?}: {g}");
        }
    }

    #[test]
    fn replies_are_capped() {
        assert_eq!(cap_reply("abcdef", 3), "abc\n[expert reply truncated]");
        assert_eq!(cap_reply("abc", 3), "abc");
    }
}
