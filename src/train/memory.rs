//! What a training run will hold in memory, computed before the first step and printed, so a
//! user knows whether a model, batch and method fit (llm.c prints the same at start).

use crate::backend::TrainBackend;
use crate::model::Qwen2;

/// Bytes by purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Model weights in the backend's compute precision (adapters included).
    pub weights: u64,
    /// Gradients of the trained tensors (f32).
    pub grads: u64,
    /// AdamW moments, plus f32 master weights where the backend keeps them.
    pub optimizer: u64,
    /// Activations kept for the backward of one micro-batch, the peak of the backward's
    /// working set and the fused log-prob's chunk buffers.
    pub activations: u64,
    /// Trained values.
    pub trained_params: u64,
    /// Rows (tokens) per micro-batch the plan is for.
    pub rows: usize,
    /// The device's (free, total) memory, where known.
    pub device: Option<(u64, u64)>,
}

impl MemoryPlan {
    /// The plan for training `model` on micro-batches of `rows` tokens, with or without
    /// activation recomputation.
    pub fn new<B: TrainBackend>(be: &B, model: &Qwen2<B>, rows: usize, recompute: bool) -> Self {
        let c = &model.cfg;
        let a = be.compute_bytes() as u64;
        let (h, i, qd, kvd) = (c.hidden_size as u64, c.intermediate_size as u64, c.q_dim() as u64, c.kv_dim() as u64);
        let r = rows as u64;
        let trained: u64 = model.trainable().iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
        let lora: u64 = model
            .lora
            .as_ref()
            .map_or(0, |l| l.tensors(c).iter().map(|(_, s, _)| s.iter().product::<usize>() as u64).sum());
        let rank = model.lora.as_ref().map_or(0, |l| l.cfg.rank as u64);
        // One layer's saved activations (LayerActs in model/training.rs), per row.
        let layer_row = (4 * h + 2 * qd + 2 * kvd + 3 * i + 7 * rank) * a + c.num_heads as u64 * 4;
        let layers = c.num_layers as u64;
        let saved = if recompute { layers * h * a + layer_row } else { layers * layer_row };
        // The backward's gradient buffers (train_backward) and the final hidden states.
        let working = (4 * h + 3 * i + 2 * qd + 2 * kvd) * a + 3 * h * a;
        // The fused log-prob walks the vocabulary in chunks of about 2^25 logits.
        let chunk = (r * c.vocab_size as u64).min(1 << 25) * (4 + a);
        let master = if be.master_weights() { 4 } else { 0 };
        MemoryPlan {
            weights: c.num_params() as u64 * a + lora * a,
            grads: trained * 4,
            optimizer: trained * (8 + master),
            activations: r * (saved + working) + chunk,
            trained_params: trained,
            rows,
            device: be.memory_info(),
        }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.grads + self.optimizer + self.activations
    }
}

fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "weights {}, gradients {}, optimiser {}, activations {} ({} tokens per micro-batch) = {} for {:.1}M trained \
             values",
            gib(self.weights),
            gib(self.grads),
            gib(self.optimizer),
            gib(self.activations),
            self.rows,
            gib(self.total()),
            self.trained_params as f64 / 1e6
        )?;
        if let Some((free, total)) = self.device {
            write!(f, "; the device has {} free of {}", gib(free), gib(total))?;
            // The weights are on the device already when this is read.
            if self.total() - self.weights > free {
                write!(f, " — this will not fit: lower data.batch_tokens, use LoRA, or set train.recompute = true")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::lora::{Lora, LoraConfig, Target};
    use crate::model::{Qwen2, Qwen2Config};

    fn qwen7b() -> Qwen2Config {
        Qwen2Config {
            vocab_size: 152064,
            hidden_size: 3584,
            intermediate_size: 18944,
            num_layers: 28,
            num_heads: 28,
            num_kv_heads: 4,
            head_dim: 128,
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            tie_word_embeddings: false,
            dtype: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn recomputation_and_lora_shrink_the_plan() {
        let be = CpuBackend::new();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        let mut model = Qwen2::load(&be, &dir).unwrap();
        let cfg = model.cfg.clone();
        let full = MemoryPlan::new(&be, &model, 512, false);
        assert_eq!(full.trained_params, cfg.num_params() as u64);
        assert_eq!(full.grads, 4 * full.trained_params);
        assert_eq!(full.optimizer, 8 * full.trained_params, "the CPU keeps no master copy");
        let recomputed = MemoryPlan::new(&be, &model, 512, true);
        assert!(recomputed.activations < full.activations);
        let l = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            seed: 0,
            trainable_tokens: None,
        };
        model.lora = Some(Lora::init(&be, &model.cfg, &l).unwrap());
        let lora = MemoryPlan::new(&be, &model, 512, true);
        assert!(lora.trained_params < full.trained_params / 4);
        assert!(format!("{lora}").contains("trained values"));
        // The 7B shape in bf16: 15.2 GB of weights (the published size).
        let b = qwen7b();
        let weights = b.num_params() as f64 * 2.0 / 1e9;
        assert!((15.0..15.5).contains(&weights), "{weights}");
    }
}
