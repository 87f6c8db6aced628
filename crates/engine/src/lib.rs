//! protege's engine: the Qwen2 model written once over the `Backend` op set, the CPU reference
//! backend and the CUDA one (kernels embedded, compiled by NVRTC at run time), generation (KV
//! cache, sampling, continuous batching), the tokenizer and chat templates.
//!
//! It knows nothing of agents, tasks, training runs or servers: no async runtime, no HTTP, no
//! plotting. The `protege` crate builds the applications on top of it.

pub mod backend;
pub mod chat;
pub mod chat_template;
pub mod generate;
pub mod inputs;
pub mod model;
pub mod tokenizer;
pub mod util;
