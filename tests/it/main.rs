//! The integration tests that need no machine of their own, in one binary: each file here
//! used to be a test binary of its own, linking the whole crate once per file (most of CI's
//! time went to compiling and linking). Run one file's tests with
//! `cargo test --test it FILE::` (e.g. `cargo test --test it sft_run::`). Binaries still on
//! their own, each for a reason that holds only for a process of its own: cuda_kernels (sets
//! process-wide environment variables the others read: the cache and library directories),
//! rl_learning (minutes of RL whose measured baseline must not share the CPU with other tests),
//! sandbox_attacks (removes every work tree and cgroup a killed run left, which would include
//! those of tests running beside it) and serve_sdk (a timed load test).

#[path = "../common/mod.rs"]
mod common;

mod bundled_suite;
mod chat_template;
mod cli;
mod exports;
mod grpo_reference;
mod harness;
mod layers;
mod loading_errors;
mod model_reference;
mod real_model;
mod rl_run;
mod serve;
mod sft_data;
mod sft_data_parallel;
mod sft_run;
mod swebench_docker;
mod swebench_parity;
mod tasks_build;
mod trainable_tokens;
mod training_grads;
mod training_overfit;
