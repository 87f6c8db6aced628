//! Policies choose the agent's next message. `local` runs protege's own engine token-in /
//! token-out: it keeps the exact ids of the episode (prompt, its own samples, appended
//! observations and expert replies) with a per-token source, so RL never re-tokenises.
//! `replay` plays recorded replies (tests, demos).

use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::Value;

use super::trajectory::{Source, TokenRecord};
use crate::backend::{Backend, SamplingParams};
use crate::chat::{Message, Role, ToolCall};
use crate::generate::{generate, Completion, GenOptions, Request};
use crate::model::Qwen2;
use crate::tokenizer::Tokenizer;

/// Where a local policy's tokens come from: the model directly, or a shared batching engine
/// that generates for many episodes at once ([`crate::generate::engine::EngineHandle`]).
pub trait TokenGenerator: Send {
    fn generate(&mut self, req: Request) -> Result<Completion>;
    /// The model's context length.
    fn max_context(&self) -> usize;
}

/// Generates with a model on this thread, one request at a time.
pub struct DirectGenerator<'a, B: Backend> {
    pub be: &'a B,
    pub model: &'a Qwen2<B>,
}

impl<B: Backend + Sync> TokenGenerator for DirectGenerator<'_, B>
where
    B::Buf: Send + Sync,
{
    fn generate(&mut self, req: Request) -> Result<Completion> {
        let (mut out, _) = generate(self.be, self.model, &[req], None, &GenOptions::default(), |_, _| {})?;
        Ok(out.remove(0))
    }

    fn max_context(&self) -> usize {
        self.model.cfg.max_position_embeddings
    }
}

/// The name a tool message carries when it holds an expert's reply (its tokens are `e`).
pub const EXPERT_TOOL: &str = "ask_expert";

/// The episode no longer fits the policy's context (the episode ends with `context_limit`).
#[derive(Debug)]
pub struct ContextFull {
    pub tokens: usize,
    pub max: usize,
}

impl std::fmt::Display for ContextFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the episode's {} tokens fill the model's context of {}", self.tokens, self.max)
    }
}

impl std::error::Error for ContextFull {}

/// One reply of a policy.
#[derive(Debug, Clone, Default)]
pub struct PolicyTurn {
    /// The reply's text as produced (with the `<tool_call>` block for text-format policies).
    pub text: String,
    /// A structured call, for policies whose API returns one (OpenAI tool calls).
    pub tool_call: Option<ToolCall>,
    pub tokens_in: usize,
    pub tokens_out: usize,
    /// Seconds spent in the model.
    pub seconds: f64,
}

pub trait Policy: Send {
    fn name(&self) -> String;
    /// The next assistant reply to `messages` (system, user, then alternating assistant and
    /// tool messages), with `tools` offered.
    fn act(&mut self, messages: &[Message], tools: &[Value]) -> Result<PolicyTurn>;
    /// Tokens in the context after the last reply, when the policy counts them exactly.
    fn context_tokens(&self) -> Option<usize> {
        None
    }
    /// The most tokens the policy's context can hold, when it is known.
    fn max_context(&self) -> Option<usize> {
        None
    }
    /// The exact token record of the episode (local policies).
    fn token_record(&self) -> Option<TokenRecord> {
        None
    }
}

/// Plays a fixed list of replies, then fails.
pub struct Replay {
    replies: std::vec::IntoIter<String>,
}

impl Replay {
    pub fn new(replies: Vec<String>) -> Self {
        Self { replies: replies.into_iter() }
    }

    /// A reply that calls `name` with `args` in the Qwen2.5 format.
    pub fn call(thought: &str, name: &str, args: Value) -> String {
        format!("{thought}\n<tool_call>\n{}\n</tool_call>", serde_json::json!({"name": name, "arguments": args}))
    }
}

impl Policy for Replay {
    fn name(&self) -> String {
        "replay".into()
    }

    fn act(&mut self, _: &[Message], _: &[Value]) -> Result<PolicyTurn> {
        match self.replies.next() {
            Some(text) => {
                Ok(PolicyTurn { tokens_out: super::expert::approx_tokens(&text), text, ..Default::default() })
            }
            None => bail!("the replay policy has no more recorded replies"),
        }
    }
}

/// Protege's own engine as the policy.
pub struct LocalPolicy<'a> {
    generator: Box<dyn TokenGenerator + 'a>,
    tok: &'a Tokenizer,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub max_new_tokens: usize,
    ids: Vec<u32>,
    sources: Vec<Source>,
    /// Messages already in `ids`.
    consumed: usize,
    turns: u64,
}

impl<'a> LocalPolicy<'a> {
    pub fn new<B: Backend + Sync>(
        be: &'a B,
        model: &'a Qwen2<B>,
        tok: &'a Tokenizer,
        sampling: SamplingParams,
        seed: u64,
    ) -> Self
    where
        B::Buf: Send + Sync,
    {
        Self::with_generator(Box::new(DirectGenerator { be, model }), tok, sampling, seed)
    }

    pub fn with_generator(
        generator: Box<dyn TokenGenerator + 'a>,
        tok: &'a Tokenizer,
        sampling: SamplingParams,
        seed: u64,
    ) -> Self {
        Self {
            generator,
            tok,
            sampling,
            seed,
            max_new_tokens: 1024,
            ids: vec![],
            sources: vec![],
            consumed: 0,
            turns: 0,
        }
    }

    fn append(&mut self, text: &str, source: Source) -> Result<()> {
        let ids = self.tok.encode(text)?;
        self.sources.extend(std::iter::repeat_n(source, ids.len()));
        self.ids.extend(ids);
        Ok(())
    }

    /// Appends the messages that arrived since the last reply: tool results (`o`, or `e` for
    /// the expert's), closing the last assistant turn and opening the next, exactly as the
    /// chat template renders them (the text after the reply's body in the rendering of the
    /// whole conversation with its generation prompt).
    fn append_new_messages(&mut self, messages: &[Message], tools: &[Value]) -> Result<()> {
        let reply = self.consumed - 1;
        if messages.len() <= self.consumed {
            bail!("no new message since the last reply");
        }
        for (i, m) in messages.iter().enumerate().skip(self.consumed) {
            if !matches!(m.role, Role::Tool | Role::User) {
                bail!("message {i} has role {}: only tool and user messages may follow a reply", m.role.as_str());
            }
        }
        let r = self.tok.render_chat_from(messages, tools, true, reply)?;
        let at = r.messages[reply].body.end;
        // A reply cut by the token limit did not close its turn: close it as the template does.
        if !self.ids.last().is_some_and(|id| self.tok.stop_ids.contains(id)) {
            let written = &r.text[..at];
            if let Some(end) = self.tok.end_of_turn_tokens().into_iter().find(|t| written.ends_with(t.as_str())) {
                self.append(&end, Source::Observation)?;
            }
        }
        // One tokenisation of the rest (it starts after a special token, so its ids are those of
        // the whole rendering), each token sourced by the message whose part it starts in.
        let rest = &r.text[at..];
        let ends: Vec<(usize, Source)> = r.messages[reply..]
            .iter()
            .zip(&messages[reply..])
            .enumerate()
            .map(|(i, (span, m))| {
                let expert = i > 0 && m.name.as_deref() == Some(EXPERT_TOOL);
                (span.part.end.saturating_sub(at), if expert { Source::Expert } else { Source::Observation })
            })
            .collect();
        for (id, start) in self.tok.encode_with_offsets(rest)? {
            // Past the last message: the generation prompt.
            let source = ends.iter().find(|(end, _)| start < *end).map_or(Source::Observation, |e| e.1);
            self.ids.push(id);
            self.sources.push(source);
        }
        Ok(())
    }
}

impl Policy for LocalPolicy<'_> {
    fn name(&self) -> String {
        "local".into()
    }

    fn act(&mut self, messages: &[Message], tools: &[Value]) -> Result<PolicyTurn> {
        if self.ids.is_empty() {
            let text = self.tok.chat_text(messages, tools, true)?;
            self.append(&text, Source::Prompt)?;
        } else {
            // The last consumed message is our own reply: skip it.
            self.append_new_messages(messages, tools)?;
        }
        let started = Instant::now();
        let max = self.generator.max_context();
        let room = max.saturating_sub(self.ids.len());
        if room == 0 {
            return Err(ContextFull { tokens: self.ids.len(), max }.into());
        }
        let req = Request {
            prompt: self.ids.clone(),
            max_new_tokens: self.max_new_tokens.min(room),
            sampling: self.sampling.clone(),
            seed: self.seed.wrapping_add(self.turns),
            stop_tokens: self.tok.stop_ids.clone(),
            ..Request::greedy(vec![], 0)
        };
        let completion = self.generator.generate(req)?;
        let tokens_in = self.ids.len();
        self.sources.extend(std::iter::repeat_n(Source::Policy, completion.tokens.len()));
        self.ids.extend(&completion.tokens);
        self.consumed = messages.len() + 1;
        self.turns += 1;
        Ok(PolicyTurn {
            text: self.tok.decode(&completion.tokens, true)?,
            tool_call: None,
            tokens_in,
            tokens_out: completion.tokens.len(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn context_tokens(&self) -> Option<usize> {
        Some(self.ids.len())
    }

    fn max_context(&self) -> Option<usize> {
        Some(self.generator.max_context())
    }

    fn token_record(&self) -> Option<TokenRecord> {
        Some(TokenRecord::new(self.ids.clone(), &self.sources))
    }
}
/// Episodes that share the colocated engine generate through their session's handle.
impl TokenGenerator for crate::generate::engine::EngineHandle {
    fn generate(&mut self, req: Request) -> Result<Completion> {
        crate::generate::engine::EngineHandle::generate(self, req)
    }

    fn max_context(&self) -> usize {
        crate::generate::engine::EngineHandle::max_context(self)
    }
}
