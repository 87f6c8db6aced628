//! Checking and measuring a machine and a backend: `protege selftest` (every kernel and the
//! whole model against the CPU reference), `bench` (throughput, and the GPU kernel/phase
//! benches beside PyTorch), `check-logits` (a model against reference logits) and `info`.

pub mod bench;
pub mod bench_gpu;
pub mod check;
pub mod info;
pub mod ops;
pub mod selftest;
