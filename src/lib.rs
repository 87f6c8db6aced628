//! protege: post-train a small Qwen2 into a software-engineering agent.
//!
//! This crate is the engine (model, backends, generation, tokenizer) and the CLI's library
//! half; `main.rs` only parses arguments and calls into it.

pub mod agent;
pub mod backend;
pub mod bench;
pub mod bench_gpu;
pub mod chat;
pub mod chat_template;
pub mod check;
pub mod config;
pub mod eval;
pub mod executor;
pub mod generate;
pub mod info;
pub mod inputs;
pub mod interrupt;
pub mod launch;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod reward;
pub mod selftest;
pub mod serve;
pub mod swebench;
pub mod synth;
pub mod tasks;
pub mod tensorboard;
pub mod tokenizer;
pub mod train;
