//! A model loaded on some device, behind one object: the server and the evaluation harness
//! hold whichever backend `--device` chose without being generic over it.

use anyhow::{Context, Result};

use super::engine::{serve_while, EngineClient, EngineMetrics, EngineStats, Msg, OnError};
use super::{generate, Completion, GenOptions, GenStats, Request};
use crate::backend::Backend;
use crate::backend::{default_device, Device};
use crate::model::{Lora, Qwen2, Qwen2Config};
use crate::tokenizer::Tokenizer;

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
    /// Loads a PEFT adapter to be applied unmerged by requests that name its index (returned).
    /// An adapter with trained token rows (`trainable_token_indices`) changes the base's
    /// embedding, so it is only accepted as the `sole` adapter of this model.
    fn load_adapter(&mut self, dir: &std::path::Path, sole: bool) -> Result<usize>;
    /// [`super::engine::run`] on this model and its loaded adapters, until `jobs` closes.
    fn run_engine(
        &self,
        tokenizer: &Tokenizer,
        capacity_tokens: usize,
        opts: &GenOptions,
        jobs: std::sync::mpsc::Receiver<Msg>,
        metrics: &EngineMetrics,
    ) -> Result<()>;
}

pub struct Loaded<B: Backend> {
    pub be: B,
    pub model: Qwen2<B>,
    /// Adapters served unmerged beside the base ([`LoadedModel::load_adapter`]).
    pub adapters: Vec<Lora<B>>,
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

    fn load_adapter(&mut self, dir: &std::path::Path, sole: bool) -> Result<usize> {
        let mut lora = crate::model::export::load_peft(&self.be, &self.model, dir)
            .with_context(|| format!("cannot load the adapter {}", dir.display()))?;
        if lora.tokens.is_some() {
            if !sole || !self.adapters.is_empty() {
                anyhow::bail!(
                    "the adapter {} trains token rows (trainable_token_indices), which live in the shared \
                     embedding and would change every model served beside it: serve it alone (--adapter) or \
                     merge it (protege export --merge)",
                    dir.display()
                );
            }
            // Its rows go into the base weights (which nothing else uses now); the LoRA
            // matrices stay unmerged.
            self.model.attach_lora(&self.be, lora);
            lora = self.model.lora.take().expect("just attached");
        }
        self.adapters.push(lora);
        Ok(self.adapters.len() - 1)
    }

    fn run_engine(
        &self,
        tokenizer: &Tokenizer,
        capacity_tokens: usize,
        opts: &GenOptions,
        jobs: std::sync::mpsc::Receiver<Msg>,
        metrics: &EngineMetrics,
    ) -> Result<()> {
        let (be, model, adapters) = (&self.be, &self.model, &self.adapters);
        super::engine::run(
            be,
            model,
            Some(tokenizer),
            adapters,
            capacity_tokens,
            opts,
            jobs,
            metrics,
            OnError::Continue,
            |_| {},
        )
        .map(|_| ())
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
    let device = device.unwrap_or_else(default_device);
    Ok(crate::with_backend!(device, |be| {
        let model = Qwen2::load_merged(&be, dir, adapter, context).with_context(|| load(&be.name()))?;
        Box::new(Loaded { be, model, adapters: vec![] }) as Box<dyn LoadedModel>
    }))
}
