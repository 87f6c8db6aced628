//! `protege generate`: one completion streamed to stdout, its speed on stderr.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::common::load_model;
use crate::backend::{default_device, Backend, Device, SamplingParams};
use crate::chat::{Conversation, Message};
use crate::generate::{generate, Finish, GenOptions, Request, TextStream};
use crate::tokenizer::Tokenizer;

#[derive(Args)]
pub struct GenerateArgs {
    /// HF model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory, merged into --model at load.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// cpu, cuda or cuda:N (default: cuda when a usable GPU is present, else cpu).
    #[arg(long)]
    device: Option<Device>,
    /// A user message, rendered with the chat template (or tokenised as is with --raw).
    #[arg(long, conflicts_with = "messages", required_unless_present = "messages")]
    prompt: Option<String>,
    /// A JSON file: an array of messages, or {"messages": [...], "tools": [...]}.
    #[arg(long)]
    messages: Option<PathBuf>,
    /// Tokenise --prompt as it stands, without the chat template.
    #[arg(long, requires = "prompt")]
    raw: bool,
    /// System message placed before --prompt.
    #[arg(long, requires = "prompt", conflicts_with = "raw")]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop once the completion contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at the end-of-turn tokens.
    #[arg(long)]
    ignore_eos: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let temperature_ok = a.temperature.is_finite() && a.temperature >= 0.0;
    if !temperature_ok || a.top_p.is_nan() || a.top_p <= 0.0 || a.top_p > 1.0 {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let tok = Tokenizer::from_dir(&a.model)?;
    let prompt = match (&a.prompt, &a.messages) {
        (Some(p), _) if a.raw => tok.encode(p)?,
        (Some(p), _) => {
            let mut msgs = vec![];
            if let Some(s) = &a.system {
                msgs.push(Message::system(s.clone()));
            }
            msgs.push(Message::user(p.clone()));
            tok.chat_prompt(&msgs, &[])?
        }
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            let conv = Conversation::parse(&text, &file.display().to_string()).context("invalid conversation file")?;
            tok.chat_prompt(&conv.messages, &conv.tools)?
        }
        (None, None) => bail!("give --prompt or --messages"),
    };
    let device = a.device.unwrap_or_else(default_device);
    crate::with_backend!(device, |be| generate_on(&be, &a, &tok, prompt))
}

fn generate_on<B: Backend>(be: &B, a: &GenerateArgs, tok: &Tokenizer, prompt: Vec<u32>) -> Result<()> {
    let model = load_model(be, &a.model, a.adapter.as_deref())?;
    let req = Request {
        prompt,
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p },
        seed: a.seed,
        stop_tokens: if a.ignore_eos { vec![] } else { tok.stop_ids.clone() },
        stop_strings: a.stop.clone(),
        ..Request::greedy(vec![], 0)
    };
    let mut stream = TextStream::new(tok.clone());
    let stop_tokens = req.stop_tokens.clone();
    let mut out = std::io::stdout().lock();
    let mut io_err = None;
    let (done, stats) = generate(be, &model, std::slice::from_ref(&req), Some(tok), &GenOptions::default(), |_, t| {
        if stop_tokens.contains(&t) {
            return;
        }
        match stream.push(t) {
            Ok(delta) => {
                if let Err(e) = out.write_all(delta.as_bytes()).and_then(|_| out.flush()) {
                    io_err.get_or_insert(anyhow::Error::from(e));
                }
            }
            Err(e) => {
                io_err.get_or_insert(e);
            }
        }
    })?;
    if let Some(e) = io_err {
        return Err(e);
    }
    write!(out, "{}", stream.flush()?)?;
    writeln!(out)?;
    let finish = match &done[0].finish {
        Finish::Length => "length".to_string(),
        Finish::StopToken(t) => format!("stop token {t}"),
        Finish::StopString(s) => format!("stop string {s:?}"),
    };
    eprintln!(
        "prompt {} tokens at {:.1} tok/s; generated {} tokens at {:.1} tok/s ({finish})",
        stats.prefill_tokens,
        stats.prefill_tok_s(),
        done[0].tokens.len(),
        stats.decode_tok_s()
    );
    Ok(())
}
