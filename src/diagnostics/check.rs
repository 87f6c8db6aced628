//! `protege check-logits`: the model's logits against a reference file.
//!
//! Reference format (safetensors): `input_ids` I64 `[n]`, `logits` F32 `[k, vocab]`, and
//! optionally `positions` I64 `[k]` — the rows of the full `[n, vocab]` logits that `logits`
//! holds (absent: all `n`).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafeTensors};

use crate::backend::Backend;
use crate::generate::prompt_logits;
use crate::model::Qwen2;

pub struct Reference {
    pub input_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub logits: Vec<f32>,
    pub vocab: usize,
}

fn i64s(st: &SafeTensors, name: &str, file: &Path) -> Result<Option<Vec<i64>>> {
    let t = match st.tensor(name) {
        Ok(t) => t,
        Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
        Err(e) => bail!("{}: cannot read {name}: {e}", file.display()),
    };
    if t.dtype() != Dtype::I64 || t.shape().len() != 1 {
        bail!("{}: {name} must be I64 [n], found {:?} {:?}", file.display(), t.dtype(), t.shape());
    }
    Ok(Some(t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()))
}

impl Reference {
    pub fn load(file: &Path) -> Result<Self> {
        let bytes = std::fs::read(file).with_context(|| format!("cannot read reference {}", file.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", file.display()))?;
        let ids = i64s(&st, "input_ids", file)?
            .ok_or_else(|| anyhow!("{}: missing tensor input_ids (I64 [n])", file.display()))?;
        let n = ids.len();
        let to_u32 = |v: i64, what: &str| {
            u32::try_from(v).map_err(|_| anyhow!("{}: {what} value {v} is out of range", file.display()))
        };
        let input_ids = ids.iter().map(|&v| to_u32(v, "input_ids")).collect::<Result<Vec<_>>>()?;
        let positions = match i64s(&st, "positions", file)? {
            Some(p) => p.iter().map(|&v| to_u32(v, "positions")).collect::<Result<Vec<_>>>()?,
            None => (0..n as u32).collect(),
        };
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= n) {
            bail!("{}: position {p} is outside the {n} input ids", file.display());
        }
        let t = st
            .tensor("logits")
            .map_err(|e| anyhow!("{}: missing tensor logits (F32 [k, vocab]): {e}", file.display()))?;
        if t.dtype() != Dtype::F32 || t.shape().len() != 2 || t.shape()[0] != positions.len() {
            bail!(
                "{}: logits must be F32 [{}, vocab], found {:?} {:?}",
                file.display(),
                positions.len(),
                t.dtype(),
                t.shape()
            );
        }
        let vocab = t.shape()[1];
        let logits = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        Ok(Self { input_ids, positions, logits, vocab })
    }
}

#[derive(Debug, Clone)]
pub struct Comparison {
    pub rows: usize,
    pub vocab: usize,
    pub max_abs: f32,
    pub max_abs_at: (usize, usize),
    pub max_rel: f32,
    pub mean_abs: f64,
    pub argmax_agree: usize,
    /// Elements outside `atol + rtol * |reference|`.
    pub violations: usize,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.violations == 0
    }
}

/// Compares `ours` with `reference` (both `[rows, vocab]`) like `numpy.allclose`.
pub fn compare(ours: &[f32], reference: &[f32], vocab: usize, atol: f32, rtol: f32) -> Comparison {
    assert_eq!(ours.len(), reference.len());
    let rows = ours.len() / vocab;
    let mut c = Comparison {
        rows,
        vocab,
        max_abs: 0.0,
        max_abs_at: (0, 0),
        max_rel: 0.0,
        mean_abs: 0.0,
        argmax_agree: 0,
        violations: 0,
    };
    for r in 0..rows {
        let (a, b) = (&ours[r * vocab..(r + 1) * vocab], &reference[r * vocab..(r + 1) * vocab]);
        for (j, (&x, &y)) in a.iter().zip(b).enumerate() {
            let d = (x - y).abs();
            // NaN anywhere is a violation, never a silent pass.
            if d.is_nan() || d > atol + rtol * y.abs() {
                c.violations += 1;
            }
            if d > c.max_abs || d.is_nan() {
                c.max_abs = d;
                c.max_abs_at = (r, j);
            }
            // Relative to the reference magnitude, floored at 1 so near-zero logits do not dominate.
            c.max_rel = c.max_rel.max(d / y.abs().max(1.0));
            c.mean_abs += d as f64;
        }
        if crate::backend::sampling::argmax(a) == crate::backend::sampling::argmax(b) {
            c.argmax_agree += 1;
        }
    }
    c.mean_abs /= ours.len().max(1) as f64;
    c
}

/// Runs the model on the reference input and compares.
pub fn check_logits<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    reference: &Reference,
    atol: f32,
    rtol: f32,
) -> Result<Comparison> {
    if reference.vocab != model.cfg.vocab_size {
        bail!("reference logits have vocab {}, the model has vocab_size {}", reference.vocab, model.cfg.vocab_size);
    }
    let ours = prompt_logits(be, model, &reference.input_ids, Some(&reference.positions))?;
    Ok(compare(&ours, &reference.logits, reference.vocab, atol, rtol))
}
