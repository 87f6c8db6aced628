//! AdamW over a model's parameters, with global-norm gradient clipping and a schedule.
//!
//! Weight decay applies to matrices only (not to biases and norm weights), as the usual
//! fine-tuning recipes (and transformers' Trainer) do.

use serde::{Deserialize, Serialize};

use super::schedule::Schedule;
use crate::backend::{AdamW, Backend};
use crate::model::{param_shapes, Qwen2Config, Weights};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub schedule: Schedule,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this value; `None` disables.
    pub max_grad_norm: Option<f32>,
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub step: u64,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
}

pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    /// First and second moments, shaped like the parameters.
    pub m: Weights<B>,
    pub v: Weights<B>,
    /// Steps taken so far.
    pub step: u64,
    decays: Vec<bool>,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(be: &B, model_cfg: &Qwen2Config, cfg: OptimConfig) -> Self {
        let decays = param_shapes(model_cfg).iter().map(|(_, shape)| shape.len() >= 2).collect();
        Self { cfg, m: Weights::zeros(be, model_cfg), v: Weights::zeros(be, model_cfg), step: 0, decays }
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(be: &B, grads: &Weights<B>, shapes: &[(String, Vec<usize>)]) -> f32 {
        let sq: f64 =
            grads.tensors().iter().zip(shapes).map(|((_, g), (_, s))| be.sum_squares(g, s.iter().product())).sum();
        sq.sqrt() as f32
    }

    /// Clips `grads` (in place), then updates `params`. Gradients are left for the caller to
    /// zero, so that they can be inspected.
    pub fn step(
        &mut self,
        be: &B,
        model_cfg: &Qwen2Config,
        params: &mut Weights<B>,
        grads: &mut Weights<B>,
    ) -> StepReport {
        let shapes = param_shapes(model_cfg);
        let grad_norm = Self::grad_norm(be, grads, &shapes);
        if let Some(max) = self.cfg.max_grad_norm {
            // torch.nn.utils.clip_grad_norm_
            let coef = max / (grad_norm + 1e-6);
            if coef < 1.0 {
                for ((_, g), (_, s)) in grads.tensors_mut().into_iter().zip(&shapes) {
                    be.scale(g, coef, s.iter().product());
                }
            }
        }
        self.step += 1;
        let lr = self.cfg.schedule.lr_at(self.step);
        let (mut ps, gs) = (params.tensors_mut(), grads.tensors());
        let (mut ms, mut vs) = (self.m.tensors_mut(), self.v.tensors_mut());
        for (i, (_, shape)) in shapes.iter().enumerate() {
            let hp = AdamW {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if self.decays[i] { self.cfg.weight_decay } else { 0.0 },
            };
            be.adamw(ps[i].1, gs[i].1, ms[i].1, vs[i].1, shape.iter().product(), &hp, self.step);
        }
        StepReport { step: self.step, lr, grad_norm }
    }
}
