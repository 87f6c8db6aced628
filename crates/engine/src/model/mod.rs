//! The Qwen2 model: hyper-parameters, checkpoint reading, and the forward pass written once
//! over the [`Backend`](crate::backend::Backend) trait.

pub mod checkpoint;
pub mod config;
pub mod export;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hf_dir;
pub mod lora;
pub mod peft;
pub mod qwen2;
pub mod token_rows;
pub mod training;

pub use checkpoint::Checkpoint;
pub use config::Qwen2Config;
pub use lora::Lora;
pub use qwen2::{param_shapes, KvCache, Qwen2, Weights};
