//! The integration tests that need no machine of their own, in one binary: each file here
//! used to be a test binary of its own, linking the whole crate once per file (most of CI's
//! time went to compiling and linking). Run one file's tests with
//! `cargo test --test it FILE::` (e.g. `cargo test --test it sft_run::`). Binaries still on
//! their own: cuda_kernels (sets process-wide environment variables), rl_learning (minutes of
//! RL), sandbox_attacks (watches the machine's processes and cgroups), serve_sdk (a timed load
//! test), swebench_docker and swebench_parity (docker and the harness's venv), tasks_build
//! (PyPI).

#[path = "../common/mod.rs"]
mod common;

mod bundled_suite;
mod chat_template;
mod cli;
mod exports;
mod grpo_reference;
mod harness;
mod loading_errors;
mod model_reference;
mod real_model;
mod rl_run;
mod serve;
mod sft_data;
mod sft_data_parallel;
mod sft_run;
mod trainable_tokens;
mod training_grads;
mod training_overfit;
