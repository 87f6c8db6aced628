//! The tokenizer (`tokenizer.json` through the `tokenizers` crate) and the Qwen2.5 ChatML
//! chat template with tools, rendered natively so that every character is attributed to the
//! message (and role) it came from.
//!
//! The rendering reproduces transformers' `apply_chat_template` with the Qwen2.5 template
//! byte for byte (checked against a fixture made by transformers). The per-token role mask
//! marks what the assistant produced: after `<|im_start|>assistant\n`, its content, its tool
//! calls and the closing `<|im_end|>`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::chat::{python_json, Message, Role};

pub const DEFAULT_SYSTEM: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
const TOOLS_HEADER: &str = "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const TOOLS_FOOTER: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n";

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
}

impl Rendered {
    fn push(&mut self, s: &str, role: TokenRole) {
        if s.is_empty() {
            return;
        }
        self.text.push_str(s);
        match self.spans.last_mut() {
            Some((end, r)) if *r == role => *end = self.text.len(),
            _ => self.spans.push((self.text.len(), role)),
        }
    }

    /// Owner of the byte at `offset`.
    pub fn role_at(&self, offset: usize) -> TokenRole {
        let i = self.spans.partition_point(|(end, _)| *end <= offset);
        self.spans.get(i).or(self.spans.last()).map(|s| s.1).unwrap_or(TokenRole::Template)
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

/// Renders `messages` with the Qwen2.5 template.
pub fn render_qwen25(messages: &[Message], tools: &[Value], add_generation_prompt: bool) -> Result<Rendered> {
    use TokenRole::{Body, Template};
    let mut r = Rendered { text: String::new(), spans: vec![] };
    for (i, m) in messages.iter().enumerate() {
        m.validate(i)?;
    }
    let first_is_system = messages.first().map(|m| m.role == Role::System).unwrap_or(false);
    let system_text = if first_is_system { messages[0].text() } else { DEFAULT_SYSTEM };
    let system_role = if first_is_system { Body(Role::System) } else { Template };
    r.push("<|im_start|>system\n", Template);
    r.push(system_text, system_role);
    if tools.is_empty() {
        r.push("<|im_end|>\n", Template);
    } else {
        r.push(TOOLS_HEADER, Template);
        for t in tools {
            r.push("\n", Template);
            r.push(&python_json(t), Template);
        }
        r.push(TOOLS_FOOTER, Template);
    }
    for (i, m) in messages.iter().enumerate() {
        let a = Body(Role::Assistant);
        match m.role {
            Role::System if i == 0 => {}
            Role::User | Role::System => {
                r.push(&format!("<|im_start|>{}\n", m.role.as_str()), Template);
                r.push(m.text(), Body(m.role));
                r.push("<|im_end|>\n", Template);
            }
            Role::Assistant if m.tool_calls.is_empty() => {
                r.push("<|im_start|>assistant\n", Template);
                r.push(m.text(), a);
                r.push("<|im_end|>", a);
                r.push("\n", Template);
            }
            Role::Assistant => {
                // The template writes "\n" before the content (when non-empty) and before each
                // call; the first of those is what a generation prompt ends with.
                r.push("<|im_start|>assistant\n", Template);
                let mut first = true;
                let mut sep = |r: &mut Rendered| {
                    if !std::mem::take(&mut first) {
                        r.push("\n", a);
                    }
                };
                if !m.text().is_empty() {
                    sep(&mut r);
                    r.push(m.text(), a);
                }
                for c in &m.tool_calls {
                    sep(&mut r);
                    let call = format!(
                        "<tool_call>\n{{\"name\": \"{}\", \"arguments\": {}}}\n</tool_call>",
                        c.function.name,
                        python_json(&c.arguments())
                    );
                    r.push(&call, a);
                }
                r.push("<|im_end|>", a);
                r.push("\n", Template);
            }
            Role::Tool => {
                if i == 0 || messages[i - 1].role != Role::Tool {
                    r.push("<|im_start|>user", Template);
                }
                r.push("\n<tool_response>\n", Template);
                r.push(m.text(), Body(Role::Tool));
                r.push("\n</tool_response>", Template);
                if i + 1 == messages.len() || messages[i + 1].role != Role::Tool {
                    r.push("<|im_end|>\n", Template);
                }
            }
        }
    }
    if add_generation_prompt {
        r.push("<|im_start|>assistant\n", Template);
    }
    Ok(r)
}

/// `tokenizer.json` plus the special tokens generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// Tokens that end an assistant turn (`<|im_end|>`, `<|endoftext|>` when present).
    pub stop_ids: Vec<u32>,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("tokenizer file {} does not exist", path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;
        let stop_ids = ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| inner.token_to_id(t)).collect();
        Ok(Self { inner: Arc::new(inner), stop_ids })
    }

    /// The tokenizer of an HF model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Token ids of `text` as it stands (special tokens in the text are recognised; nothing
    /// is added around it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_raw(text)?.get_ids().to_vec())
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

    /// Renders and tokenises a conversation, attributing every token.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        tools: &[Value],
        add_generation_prompt: bool,
    ) -> Result<ChatEncoding> {
        let rendered = render_qwen25(messages, tools, add_generation_prompt).context("rendering the chat template")?;
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
