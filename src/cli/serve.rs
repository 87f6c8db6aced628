//! `protege serve`: a model behind OpenAI- and Anthropic-compatible HTTP endpoints.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::backend::Device;
use crate::serve::{run_serve, ServeOptions, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TOKENS};

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback by default; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// The model name the API reports.
    #[arg(long, default_value = "protege")]
    name: String,
    /// Context length in tokens, overriding config.json's max_position_embeddings.
    #[arg(long)]
    context: Option<usize>,
    /// cpu, cuda or cuda:N (default: cuda when a usable GPU is present, else cpu).
    #[arg(long)]
    device: Option<Device>,
    /// A PEFT LoRA adapter served unmerged under --name.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// More adapters on the same base, each under its own model name: NAME=DIR (repeatable),
    /// as vLLM's --lora-modules.
    #[arg(long = "lora-modules", value_parser = parse_lora_module, num_args = 1..)]
    lora_modules: Vec<(String, PathBuf)>,
    /// Tokens the KV cache holds for all requests in flight (default: the context, at least 32768).
    #[arg(long)]
    kv_cache_tokens: Option<usize>,
    /// Require this key (`Authorization: Bearer KEY` or `x-api-key: KEY`); default: the
    /// PROTEGE_API_KEY environment variable when set.
    #[arg(long, env = "PROTEGE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Tokens a reply may have when a request gives no max_tokens (the KV cache is reserved
    /// for a request's whole length when it joins the batch).
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    default_max_tokens: usize,
}

fn parse_lora_module(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok((name.to_string(), PathBuf::from(dir))),
        _ => Err(format!("expected NAME=DIR, got {s:?}")),
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    run_serve(&ServeOptions {
        model: a.model,
        addr: a.addr,
        name: a.name,
        adapter: a.adapter,
        lora_modules: a.lora_modules,
        context: a.context,
        device: a.device,
        kv_cache_tokens: a.kv_cache_tokens,
        api_key: a.api_key,
        max_request_bytes: a.max_request_bytes,
        default_max_tokens: a.default_max_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_modules_are_name_equals_dir() {
        assert_eq!(parse_lora_module("a=/x/y").unwrap(), ("a".to_string(), PathBuf::from("/x/y")));
        for bad in ["a", "=dir", "a=", ""] {
            assert!(parse_lora_module(bad).unwrap_err().contains("expected NAME=DIR"), "{bad}");
        }
    }
}
