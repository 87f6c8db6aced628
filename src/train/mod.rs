//! Training: optimiser, learning-rate schedules (SFT and GRPO loops follow).

pub mod optim;
pub mod schedule;

pub use optim::{OptimConfig, Optimizer, StepReport};
pub use schedule::{Decay, Schedule};
