//! protege: post-train a small Qwen2 into a software-engineering agent.
//!
//! The engine (model, backends and kernels, generation, tokenizer, chat templates) is the
//! `protege-engine` crate, re-exported here under its own module names; this crate holds the
//! applications on top of it (agent harness, tasks, training, eval, serving, the pipeline)
//! and the command line ([`cli`]: each command's arguments beside the call into the library;
//! `main.rs` only hands over to it). `tools/check_layers.py` keeps the modules in layers.

pub use protege_engine::{backend, chat, chat_template, generate, inputs, model, tokenizer, util, with_backend};

pub mod agent;
pub mod cli;
pub mod config;
pub mod diagnostics;
pub mod eval;
pub mod executor;
pub mod interrupt;
pub mod launch;
pub mod pipeline;
pub mod report;
pub mod reward;
pub mod sandbox;
pub mod serve;
pub mod suites;
pub mod swebench;
pub mod synth;
pub mod tasks;
pub mod tensorboard;
pub mod train;
