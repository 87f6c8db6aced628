//! Incremental detokenisation: turns a growing list of token ids into text deltas without
//! ever emitting half of a multi-byte character (byte-level BPE tokens can split one).

use anyhow::Result;

use crate::tokenizer::Tokenizer;

#[derive(Clone)]
pub struct TextStream {
    tok: Tokenizer,
    ids: Vec<u32>,
    /// Start of the window re-decoded for context (a token's text can depend on its left
    /// neighbour, e.g. a leading space).
    prefix: usize,
    /// Tokens up to here are already emitted.
    read: usize,
    text: String,
}

impl TextStream {
    pub fn new(tok: Tokenizer) -> Self {
        Self { tok, ids: vec![], prefix: 0, read: 0, text: String::new() }
    }

    /// Adds a token; returns the newly complete text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read], false)?;
        let now = self.tok.decode(&self.ids[self.prefix..], false)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let delta = now[before.len()..].to_string();
            self.text.push_str(&delta);
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Text that is not yet emitted because it ends inside a character; call at the end.
    pub fn flush(&mut self) -> Result<String> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read], false)?;
        let now = self.tok.decode(&self.ids[self.prefix..], false)?;
        let delta = now.get(before.len()..).unwrap_or("").to_string();
        self.text.push_str(&delta);
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }

    /// Everything emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}
