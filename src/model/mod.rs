//! The Qwen2 model: hyper-parameters, checkpoint reading, and the forward pass written once
//! over the [`Backend`](crate::backend::Backend) trait.

pub mod checkpoint;
pub mod config;
pub mod export;
pub mod lora;
pub mod qwen2;
pub mod training;

pub use checkpoint::Checkpoint;
pub use config::Qwen2Config;
pub use qwen2::{param_shapes, KvCache, Qwen2, Weights};
