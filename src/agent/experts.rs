//! Which expert a run uses, and building it: [`ExpertSpec`] names the expert (from a config's
//! `[expert]` table or the command line), [`prepare_expert`] loads what it needs once per run
//! (a local expert's model; a remote expert's key is checked), and [`make_expert`] gives each
//! episode its own expert. Eval, synthesis and RL all build their experts here.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::expert::{Expert, Oracle};
use super::remote::{Endpoint, LocalExpert, RemoteExpert};
use crate::backend::cpu::CpuBackend;
use crate::model::Qwen2;
use crate::tokenizer::Tokenizer;

/// Who answers `ask_expert`.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertSpec {
    None,
    Oracle,
    /// An OpenAI-compatible or Anthropic endpoint; replies up to `max_tokens`.
    Remote {
        endpoint: Endpoint,
        max_tokens: usize,
    },
    /// A second model in-process (with a PEFT adapter merged in when given).
    Local {
        model: PathBuf,
        adapter: Option<PathBuf>,
        max_tokens: usize,
    },
}

impl ExpertSpec {
    pub fn name(&self) -> String {
        match self {
            ExpertSpec::None => "none".into(),
            ExpertSpec::Oracle => "oracle".into(),
            ExpertSpec::Remote { endpoint, .. } => format!("{:?}:{}", endpoint.api, endpoint.model).to_lowercase(),
            ExpertSpec::Local { model, .. } => format!("local:{}", model.display()),
        }
    }
}

/// A loaded local expert model.
pub struct ExpertModel {
    be: CpuBackend,
    model: Qwen2<CpuBackend>,
    tok: Tokenizer,
    max_tokens: usize,
}

/// Loads what `spec` needs once per run (the local expert's model) and checks a remote
/// expert's key, so that a bad setting fails before any episode.
pub fn prepare_expert(spec: &ExpertSpec) -> Result<Option<ExpertModel>> {
    match spec {
        ExpertSpec::Local { model, adapter, max_tokens } => {
            let be = CpuBackend::new();
            let m = Qwen2::load_merged(&be, model, adapter.as_deref(), None)?;
            Ok(Some(ExpertModel { be, model: m, tok: Tokenizer::from_dir(model)?, max_tokens: *max_tokens }))
        }
        ExpertSpec::Remote { endpoint, max_tokens } => {
            RemoteExpert::new(endpoint.clone(), *max_tokens)?;
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// The expert of one episode. `sees_gold_patch` shows a remote expert the task's gold patch
/// (trajectory synthesis); the oracle always reads it.
pub fn make_expert<'m>(
    spec: &ExpertSpec,
    loaded: Option<&'m ExpertModel>,
    sees_gold_patch: bool,
) -> Result<Option<Box<dyn Expert + 'm>>> {
    Ok(match (spec, loaded) {
        (ExpertSpec::None, _) => None,
        (ExpertSpec::Oracle, _) => Some(Box::new(Oracle)),
        (ExpertSpec::Remote { endpoint, max_tokens }, _) => {
            let mut e = RemoteExpert::new(endpoint.clone(), *max_tokens)?;
            e.sees_gold_patch = sees_gold_patch;
            Some(Box::new(e))
        }
        (ExpertSpec::Local { .. }, Some(m)) => {
            Some(Box::new(LocalExpert { be: &m.be, model: &m.model, tok: &m.tok, max_tokens: m.max_tokens }))
        }
        (ExpertSpec::Local { .. }, None) => bail!("the local expert model is not loaded"),
    })
}
