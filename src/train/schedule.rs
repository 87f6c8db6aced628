//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay.

use serde::{Deserialize, Serialize};

/// The `optim.decay` setting of a run config.
pub use crate::config::Decay;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
    /// Floor of the decay as a fraction of `lr` (cosine and linear).
    pub min_lr_ratio: f32,
}

impl Schedule {
    /// Learning rate of optimiser step `step` (counted from 1), as transformers' schedulers:
    /// `lr * step / warmup` during warmup, then the decay over the remaining steps.
    pub fn lr_at(&self, step: u64) -> f32 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return self.lr * step as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f32 / span as f32).min(1.0);
        let floor = self.min_lr_ratio.clamp(0.0, 1.0);
        let factor = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - progress,
            Decay::Cosine => 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()),
        };
        self.lr * (floor + (1.0 - floor) * factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule { lr: 1.0, warmup_steps: 4, total_steps: 14, decay: Decay::Cosine, min_lr_ratio: 0.0 };
        assert_eq!(s.lr_at(1), 0.25);
        assert_eq!(s.lr_at(4), 1.0);
        assert!((s.lr_at(9) - 0.5).abs() < 1e-6); // half way through the cosine
        assert!(s.lr_at(14).abs() < 1e-6);
        assert!(s.lr_at(100).abs() < 1e-6);
        let lin = Schedule { decay: Decay::Linear, min_lr_ratio: 0.1, ..s };
        assert!((lin.lr_at(9) - (0.1 + 0.9 * 0.5)).abs() < 1e-6);
        let c = Schedule { decay: Decay::Constant, warmup_steps: 0, ..s };
        assert_eq!(c.lr_at(1), 1.0);
        assert_eq!(c.lr_at(1000), 1.0);
    }
}
