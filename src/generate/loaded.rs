//! A model loaded on some device, behind one object: the server and the evaluation harness
//! hold whichever backend `--device` chose without being generic over it.

use anyhow::{Context, Result};

use super::{generate, Completion, GenOptions, GenStats, Request};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{default_device, CudaBackend, Device};
use crate::backend::Backend;
use crate::model::{Qwen2, Qwen2Config};
use crate::tokenizer::Tokenizer;
use crate::train::rollout::{serve_while, EngineClient, EngineStats};

pub trait LoadedModel: Send + Sync {
    fn cfg(&self) -> &Qwen2Config;
    /// The backend's description (device, precision).
    fn backend_name(&self) -> String;
    /// [`generate`] on this model.
    fn generate(
        &self,
        requests: &[Request],
        tokenizer: Option<&Tokenizer>,
        opts: &GenOptions,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<(Vec<Completion>, GenStats)>;
    /// [`serve_while`] on this model: a batching engine on this thread serves the clients
    /// `work` hands out until `work` returns.
    fn serve_while(
        &self,
        capacity_tokens: usize,
        opts: &GenOptions,
        max_context: usize,
        work: Box<dyn FnOnce(EngineClient) + Send + '_>,
    ) -> Result<EngineStats>;
}

pub struct Loaded<B: Backend> {
    pub be: B,
    pub model: Qwen2<B>,
}

impl<B: Backend> LoadedModel for Loaded<B> {
    fn cfg(&self) -> &Qwen2Config {
        &self.model.cfg
    }

    fn backend_name(&self) -> String {
        self.be.name()
    }

    fn generate(
        &self,
        requests: &[Request],
        tokenizer: Option<&Tokenizer>,
        opts: &GenOptions,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<(Vec<Completion>, GenStats)> {
        generate(&self.be, &self.model, requests, tokenizer, opts, on_token)
    }

    fn serve_while(
        &self,
        capacity_tokens: usize,
        opts: &GenOptions,
        max_context: usize,
        work: Box<dyn FnOnce(EngineClient) + Send + '_>,
    ) -> Result<EngineStats> {
        serve_while(&self.be, &self.model, capacity_tokens, opts, max_context, |_| {}, work).map(|(_, stats)| stats)
    }
}

/// Loads `dir` (plus an optional PEFT adapter merged in, and a context override) on `device`
/// (`None`: the default, a GPU when one is usable).
pub fn load_on(
    device: Option<Device>,
    dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
    context: Option<usize>,
) -> Result<Box<dyn LoadedModel>> {
    let load = |what: &str| format!("loading {} on {what}", dir.display());
    Ok(match device.unwrap_or_else(default_device) {
        Device::Cpu => {
            let be = CpuBackend::new();
            let model = Qwen2::load_merged(&be, dir, adapter, context).with_context(|| load("the CPU"))?;
            Box::new(Loaded { be, model })
        }
        Device::Cuda(n) => {
            let be = CudaBackend::new(n)?;
            let model = Qwen2::load_merged(&be, dir, adapter, context).with_context(|| load(&be.name()))?;
            Box::new(Loaded { be, model })
        }
    })
}
