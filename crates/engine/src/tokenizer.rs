//! The tokenizer (`tokenizer.json` through the `tokenizers` crate) and the model's chat
//! template ([`crate::chat_template`]: the model directory's own Jinja template, or Qwen2.5's
//! when it has none), with every token of a rendered conversation attributed to the message
//! (and role) it came from.
//!
//! The per-token role mask marks what the assistant produced: after its generation prompt
//! (`<|im_start|>assistant\n`), its content, its tool calls and the closing end-of-turn token
//! (`<|im_end|>`); the newline the template writes after that is the template's.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use crate::chat::{Message, Role};
use crate::chat_template::{ChatTemplate, MessageSpan, QWEN25};

/// Who a piece of the rendered conversation belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    /// Template scaffolding: `<|im_start|>user\n`, the tools block, separators.
    Template,
    /// The body of a message with this role.
    Body(Role),
}

/// A rendered conversation with the owner of every byte range.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: String,
    /// Consecutive, covering `text`: (end byte, owner).
    spans: Vec<(usize, TokenRole)>,
    /// Where each message lies in `text`.
    pub messages: Vec<MessageSpan>,
}

impl Rendered {
    /// `text` whose message bodies (`messages[i].body`, in order) belong to their messages'
    /// roles and the rest to the template.
    fn new(text: String, messages: Vec<MessageSpan>, roles: impl Iterator<Item = Role>) -> Self {
        let mut spans: Vec<(usize, TokenRole)> = vec![];
        let mut push = |end: usize, role: TokenRole| {
            if end <= spans.last().map_or(0, |s| s.0) {
                return;
            }
            match spans.last_mut() {
                Some((e, r)) if *r == role => *e = end,
                _ => spans.push((end, role)),
            }
        };
        for (m, role) in messages.iter().zip(roles) {
            if !m.body.is_empty() {
                push(m.body.start, TokenRole::Template);
                push(m.body.end, TokenRole::Body(role));
            }
        }
        push(text.len(), TokenRole::Template);
        Self { text, spans, messages }
    }

    /// Owner of the byte at `offset`.
    pub fn role_at(&self, offset: usize) -> TokenRole {
        let i = self.spans.partition_point(|(end, _)| *end <= offset);
        self.spans.get(i).or(self.spans.last()).map(|s| s.1).unwrap_or(TokenRole::Template)
    }

    /// The byte ranges of `text` and their owners, in order.
    pub fn spans(&self) -> impl Iterator<Item = (Range<usize>, TokenRole)> + '_ {
        let starts = std::iter::once(0).chain(self.spans.iter().map(|s| s.0));
        starts.zip(&self.spans).map(|(start, &(end, role))| (start..end, role))
    }
}

/// Token ids of a conversation and the owner of each token.
#[derive(Debug, Clone)]
pub struct ChatEncoding {
    pub text: String,
    pub ids: Vec<u32>,
    pub roles: Vec<TokenRole>,
}

impl ChatEncoding {
    /// True for tokens the assistant produced (what SFT trains on).
    pub fn assistant_mask(&self) -> Vec<bool> {
        self.roles.iter().map(|r| *r == TokenRole::Body(Role::Assistant)).collect()
    }
}

/// Markup the template writes that a tokenizer may hold as single (added) tokens: what a model
/// must have trained rows for to read and write conversations.
pub const TEMPLATE_TOKENS: [&str; 8] = [
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<tools>",
    "</tools>",
];

/// Qwen2.5's template, compiled once: the template of tokenizers whose directory has none.
static BUILT_IN: LazyLock<Arc<ChatTemplate>> = LazyLock::new(|| {
    Arc::new(ChatTemplate::new(QWEN25, "the built-in Qwen2.5 chat template").expect("the built-in template compiles"))
});

/// `tokenizer.json`, the chat template and the special tokens generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// Tokens that end an assistant turn (`<|im_end|>`, `<|endoftext|>` and the
    /// `eos_token` of `tokenizer_config.json`, when the tokenizer has them).
    pub stop_ids: Vec<u32>,
    template: Arc<ChatTemplate>,
}

impl Tokenizer {
    /// `tokenizer.json` at `path`, with the chat template of its directory
    /// ([`ChatTemplate::from_dir`]: `chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template`). A directory without a template keeps the built-in Qwen2.5 template
    /// (noted once on stderr).
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("tokenizer file {} does not exist", path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;
        let tok = Self::from_tokenizers(inner);
        let dir = path.parent().unwrap_or(Path::new("."));
        match ChatTemplate::from_dir(dir)? {
            Some(template) => Ok(tok.with_template(template)),
            None => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    eprintln!(
                        "note: {} has no chat template (chat_template.jinja or tokenizer_config.json's \
                         chat_template); using Qwen2.5's",
                        dir.display()
                    )
                });
                Ok(tok)
            }
        }
    }

    /// Wraps a built `tokenizers` tokenizer, with Qwen2.5's chat template.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        let stop_ids = ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| inner.token_to_id(t)).collect();
        Self { inner: Arc::new(inner), stop_ids, template: BUILT_IN.clone() }
    }

    /// This tokenizer with the chat template `source` (Jinja, as a model's `chat_template`):
    /// an error names the template's line when it does not compile. The special tokens the
    /// template sees stay those of the current template.
    pub fn with_chat_template(self, source: &str) -> Result<Self> {
        let special = self.template.special_tokens().to_vec();
        Ok(self.with_template(ChatTemplate::new(source, "the model's chat template")?.with_special_tokens(special)))
    }

    fn with_template(mut self, template: ChatTemplate) -> Self {
        let eos = template.special_tokens().iter().find(|(k, _)| k == "eos_token");
        if let Some(id) = eos.and_then(|(_, t)| self.inner.token_to_id(t)) {
            if !self.stop_ids.contains(&id) {
                self.stop_ids.push(id);
            }
        }
        self.template = Arc::new(template);
        self
    }

    /// The chat template in use.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The tokenizer of an HF model directory, or of a GGUF file ([`Tokenizer::from_gguf`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if crate::model::gguf::is_gguf(dir) {
            return Self::from_gguf(dir);
        }
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let g = crate::model::gguf::Gguf::open(path)?;
        let tok = Self::from_tokenizers(crate::model::gguf_tokenizer::tokenizer(&g)?);
        let Some(source) = g.chat_template() else { return Ok(tok) };
        // The template's special tokens, as tokenizer_config.json would name them.
        let mut special = vec![];
        for (key, name) in [
            ("tokenizer.ggml.bos_token_id", "bos_token"),
            ("tokenizer.ggml.eos_token_id", "eos_token"),
            ("tokenizer.ggml.padding_token_id", "pad_token"),
        ] {
            if g.get(key).is_some() {
                let id = g.get_u64(key)?;
                let token = u32::try_from(id)
                    .ok()
                    .and_then(|id| tok.id_to_token(id))
                    .ok_or_else(|| anyhow!("{}: `{key}` is {id}, not a token of its vocabulary", path.display()))?;
                special.push((name.to_string(), token));
            }
        }
        let origin = format!("{} (tokenizer.chat_template)", path.display());
        Ok(tok.with_template(ChatTemplate::new(&source, &origin)?.with_special_tokens(special)))
    }

    /// Token ids of `text` as it stands (special tokens in the text are recognised; nothing
    /// is added around it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_raw(text)?.get_ids().to_vec())
    }

    /// Token ids of `text` with the byte offset each token starts at.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Vec<(u32, usize)>> {
        let enc = self.encode_raw(text)?;
        Ok(enc.get_ids().iter().zip(enc.get_offsets()).map(|(&id, &(start, _))| (id, start)).collect())
    }

    fn encode_raw(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.inner.encode(text, false).map_err(|e| anyhow!("tokenisation failed: {e}"))
    }

    /// The id of `token` when it is exactly one token (an added token such as `<tool_call>`, or a
    /// vocabulary entry).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token whose id is `id`, as the tokenizer writes it (`<tool_call>`, `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Every id some tokenizer entry (vocabulary or added token) uses.
    pub fn used_ids(&self) -> std::collections::BTreeSet<u32> {
        self.inner.get_vocab(true).into_values().collect()
    }

    /// The added tokens (special or not) with their ids, in id order.
    pub fn added_tokens(&self) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> =
            self.inner.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.content)).collect();
        v.sort();
        v
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// Tokens the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The bytes token `id` stands for: a byte-level BPE piece mapped back through GPT-2's
    /// byte-to-character table, an added token as written. Used for `logprobs` (a token may be
    /// part of a UTF-8 character, which decoding it alone would hide).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else { return vec![] };
        if self.inner.get_added_tokens_decoder().contains_key(&id) {
            return piece.into_bytes();
        }
        piece.chars().map(|c| byte_of_bpe_char(c).unwrap_or(b'?')).collect()
    }

    /// The chat template's rendering of a conversation (one rendering, no attribution: for
    /// prompts).
    pub fn chat_text(&self, messages: &[Message], tools: &[Value], add_generation_prompt: bool) -> Result<String> {
        for (i, m) in messages.iter().enumerate() {
            m.validate(i)?;
        }
        self.template.render(messages, tools, add_generation_prompt)
    }

    /// The token ids of a conversation's prompt: its rendering with the generation prompt.
    pub fn chat_prompt(&self, messages: &[Message], tools: &[Value]) -> Result<Vec<u32>> {
        self.encode(&self.chat_text(messages, tools, true)?)
    }

    /// Renders a conversation and attributes every byte to the template or a message's body
    /// (see [`crate::chat_template`]).
    pub fn render_chat(&self, messages: &[Message], tools: &[Value], add_generation_prompt: bool) -> Result<Rendered> {
        self.render_chat_from(messages, tools, add_generation_prompt, 0)
    }

    /// [`Tokenizer::render_chat`] that attributes only `messages[first..]` (the text of earlier
    /// messages is the template's): a few renderings instead of one per message.
    pub fn render_chat_from(
        &self,
        messages: &[Message],
        tools: &[Value],
        add_generation_prompt: bool,
        first: usize,
    ) -> Result<Rendered> {
        for (i, m) in messages.iter().enumerate() {
            m.validate(i)?;
        }
        let added: Vec<String> = self.added_tokens().into_iter().map(|(_, t)| t).collect();
        let (text, spans) = self.template.render_attributed(
            messages,
            tools,
            add_generation_prompt,
            first,
            &self.end_of_turn_tokens(),
            &added,
        )?;
        Ok(Rendered::new(text, spans, messages.iter().map(|m| m.role)))
    }

    /// The text of the tokens that end an assistant turn ([`Tokenizer::stop_ids`]).
    pub fn end_of_turn_tokens(&self) -> Vec<String> {
        self.stop_ids.iter().filter_map(|&id| self.inner.id_to_token(id)).collect()
    }

    /// Renders and tokenises a conversation, attributing every token.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        tools: &[Value],
        add_generation_prompt: bool,
    ) -> Result<ChatEncoding> {
        let rendered = self.render_chat(messages, tools, add_generation_prompt)?;
        let enc = self.encode_raw(&rendered.text)?;
        let roles = enc.get_offsets().iter().map(|&(start, _)| rendered.role_at(start)).collect();
        Ok(ChatEncoding { ids: enc.get_ids().to_vec(), roles, text: rendered.text })
    }
}

/// The byte GPT-2's byte-level BPE writes as `c`: printable Latin-1 bytes stand for
/// themselves, the rest (controls, space, 0x7f-0xa0, 0xad) were shifted to U+0100 onwards in
/// byte order.
fn byte_of_bpe_char(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let u = c as u32;
    if printable(u) {
        return Some(u as u8);
    }
    let shifted = u.checked_sub(256)?;
    (0u32..256).filter(|&b| !printable(b)).nth(shifted as usize).map(|b| b as u8)
}
