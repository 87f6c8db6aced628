//! The end of a finished training run (SFT or RL): `model/`, an HF directory as
//! `save_pretrained` writes it (LoRA adapters merged, the source's dtype, sharded, with its
//! tokenizer files and the context override in `config.json`), and, with LoRA, `adapter/`
//! (PEFT), which later stages load cheaply. On a bf16 device both are written from the
//! optimiser's f32 master copies, not their bf16 rounding (the merge is done on the host, in f32).

use std::path::Path;

use anyhow::Result;

use crate::backend::{Backend, TrainBackend};
use crate::model::export::{export_hf, export_peft, with_masters, HfExportOptions};
use crate::model::Qwen2;

/// Writes `run/adapter` (with LoRA) and then `run/model` from `model`, trained from `source`,
/// with its trained tensors replaced by `masters` where there are any.
pub fn export_trained<B: TrainBackend>(
    be: &B,
    model: &mut Qwen2<B>,
    masters: &mut [B::Buf],
    source: &Path,
    run: &Path,
) -> Result<()> {
    with_masters(model, masters, |m| {
        if m.lora.is_some() {
            export_peft(be, m, &source.display().to_string(), &run.join("adapter"))?;
        }
        export_final(be, m, source, &run.join("model"))
    })
}

/// Writes the trained model as an HF directory like `save_pretrained` (its LoRA adapters merged,
/// the source's dtype, sharded, with the tokenizer files of `source`), replacing `out` at once.
pub fn export_final<B: Backend>(be: &B, model: &Qwen2<B>, source: &Path, out: &Path) -> Result<()> {
    let opts = HfExportOptions { overwrite: true, ..Default::default() };
    export_hf(be, model, model.lora.as_ref(), source, out, &opts)
}
