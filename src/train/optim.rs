//! AdamW over the trained tensors (all weights, or LoRA adapters), with global-norm gradient
//! clipping and a learning-rate schedule.
//!
//! Weight decay applies to matrices only (not to biases and norm weights), as the usual
//! fine-tuning recipes (and transformers' Trainer) do.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::schedule::Schedule;
use crate::backend::{AdamW, AdamWTensor, TrainBackend};
use crate::config::OptimSection;

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

impl OptimConfig {
    /// The optimiser a run config's `[optim]` table describes, for a run of `total_steps`
    /// optimiser steps (the schedule's length); `max_grad_norm = 0` turns clipping off.
    pub fn from_section(o: &OptimSection, total_steps: u64) -> Self {
        OptimConfig {
            schedule: Schedule {
                lr: o.lr,
                warmup_steps: o.warmup_steps,
                total_steps,
                decay: o.decay,
                min_lr_ratio: o.min_lr_ratio,
            },
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            max_grad_norm: (o.max_grad_norm > 0.0).then_some(o.max_grad_norm),
        }
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub step: u64,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
}

pub struct Optimizer<B: TrainBackend> {
    pub cfg: OptimConfig,
    /// Name and shape of every trained tensor, in the order `step` receives them.
    pub shapes: Vec<(String, Vec<usize>)>,
    /// First and second moments, one per trained tensor.
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    /// f32 master copies of the parameters where the backend computes in lower precision
    /// (made at the first step, or restored from a checkpoint); empty otherwise.
    pub master: Vec<B::Buf>,
    /// Steps taken so far.
    pub step: u64,
    /// With the state sharded across data-parallel ranks (ZeRO-1).
    pub shard: Option<Shard>,
}

/// How the optimiser state is split across ranks: a rank keeps moments and master copies only
/// for the tensors it owns (the others hold one-value placeholders) and updates only those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// The owning rank of each trained tensor.
    pub owners: Vec<usize>,
    pub rank: usize,
    pub world: usize,
}

impl<B: TrainBackend> Optimizer<B> {
    pub fn new(be: &B, shapes: Vec<(String, Vec<usize>)>, cfg: OptimConfig) -> Self {
        let zeros = || shapes.iter().map(|(_, s)| be.zeros_f32(s.iter().product())).collect::<Vec<_>>();
        Self { cfg, m: zeros(), v: zeros(), master: vec![], shapes, step: 0, shard: None }
    }

    /// Shards the state across `world` ranks (ZeRO-1, see [`crate::train::dist::shard_owners`]),
    /// freeing the moments of the tensors other ranks own.
    pub fn shard(&mut self, be: &B, rank: usize, world: usize) {
        if world <= 1 {
            return;
        }
        let sizes: Vec<usize> = self.shapes.iter().map(|(_, s)| s.iter().product()).collect();
        let owners = super::dist::shard_owners(&sizes, world);
        for (i, &o) in owners.iter().enumerate() {
            if o != rank {
                self.m[i] = be.zeros_f32(1);
                self.v[i] = be.zeros_f32(1);
            }
        }
        self.shard = Some(Shard { owners, rank, world });
    }

    /// Whether this rank updates tensor `i`.
    pub fn owns(&self, i: usize) -> bool {
        self.shard.as_ref().is_none_or(|s| s.owners[i] == s.rank)
    }

    /// The rank that updates tensor `i`.
    pub fn owner(&self, i: usize) -> usize {
        self.shard.as_ref().map_or(0, |s| s.owners[i])
    }

    /// Clips `grads` in place (global norm), then updates `params`; both in `shapes` order.
    pub fn step(&mut self, be: &B, params: Vec<&mut B::Buf>, grads: Vec<&B::Buf>) -> Result<StepReport> {
        if params.len() != self.shapes.len() || grads.len() != self.shapes.len() {
            bail!(
                "optimiser expects {} tensors, got {} parameters and {} gradients",
                self.shapes.len(),
                params.len(),
                grads.len()
            );
        }
        let numel: Vec<usize> = self.shapes.iter().map(|(_, s)| s.iter().product()).collect();
        let sums: Vec<(&B::Buf, usize)> = grads.iter().copied().zip(numel.iter().copied()).collect();
        let grad_norm = be.sum_squares_all(&sums).sqrt() as f32;
        if !grad_norm.is_finite() {
            bail!("gradient norm is {grad_norm}: refusing to update the weights");
        }
        // As torch.nn.utils.clip_grad_norm_; the coefficient is applied inside the update.
        let grad_scale = match self.cfg.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        if self.master.is_empty() && be.master_weights() {
            let owns: Vec<bool> = (0..params.len()).map(|i| self.owns(i)).collect();
            self.master = params
                .iter()
                .zip(owns)
                .map(|(p, own)| if own { be.upload_f32_full(&be.to_f32(p)) } else { be.zeros_f32(1) })
                .collect();
        }
        let owns: Vec<bool> = (0..params.len()).map(|i| self.owns(i)).collect();
        self.step += 1;
        let lr = self.cfg.schedule.lr_at(self.step);
        let hp = AdamW {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
        };
        let masters = self.master.iter_mut().map(Some).chain(std::iter::repeat_with(|| None));
        let mut tensors: Vec<AdamWTensor<B>> = params
            .into_iter()
            .zip(grads)
            .zip(masters)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .enumerate()
            .filter(|(i, _)| owns[*i])
            .map(|(i, (((param, grad), master), (m, v)))| AdamWTensor {
                param,
                master,
                grad,
                m,
                v,
                n: numel[i],
                decay: self.shapes[i].1.len() >= 2,
            })
            .collect();
        be.adamw(&mut tensors, &hp, grad_scale, self.step);
        Ok(StepReport { step: self.step, lr, grad_norm })
    }
}
