//! Training: SFT data, optimiser, learning-rate schedules (the SFT and GRPO loops follow).

pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod export;
pub mod grpo;
pub mod memory;
pub mod optim;
pub mod rl;
pub mod rollout;
pub mod schedule;
pub mod sft;
pub mod untrained;

pub use optim::{OptimConfig, Optimizer, Shard, StepReport};
pub use schedule::{Decay, Schedule};
