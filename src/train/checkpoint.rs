//! Training checkpoints shared by SFT and RL: the trained tensors, the optimiser's moments
//! and a small JSON state, written under a temporary name and renamed into place, with
//! `checkpoints/latest` naming the newest; and the metrics file cut back to a checkpoint on
//! resume.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::dist::World;
use super::Optimizer;
use crate::backend::{Backend, TrainBackend};
use crate::model::export::{write_safetensors, ExportDtype};
use crate::model::{Checkpoint, Qwen2};
use crate::util::write_atomic;

pub fn checkpoint_dir(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step}"))
}

/// Saves what `model` trains, the optimiser's moments and `state` as `checkpoints/step-{step}`.
pub fn save<B: TrainBackend, S: Serialize>(
    be: &B,
    run: &Path,
    model: &Qwen2<B>,
    opt: &Optimizer<B>,
    step: u64,
    state: &S,
) -> Result<()> {
    let dir = checkpoint_dir(run, step);
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let names = model.trainable();
    let named = |prefix: &str, bufs: Vec<&B::Buf>| {
        names.iter().zip(bufs).map(|((n, s), b)| (format!("{prefix}{n}"), s.clone(), be.to_f32(b))).collect::<Vec<_>>()
    };
    // The optimiser's f32 master copies, where it keeps them, are the parameters' true values.
    let params = if opt.master.is_empty() { model.trainable_tensors() } else { opt.master.iter().collect() };
    write_safetensors(&tmp.join("trainable.safetensors"), named("", params), ExportDtype::F32)?;
    let mut moments = named("m.", opt.m.iter().collect());
    moments.extend(named("v.", opt.v.iter().collect()));
    write_safetensors(&tmp.join("optimizer.safetensors"), moments, ExportDtype::F32)?;
    write_atomic(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("cannot move {} into place", tmp.display()))?;
    write_atomic(&run.join("checkpoints").join("latest"), format!("step-{step}\n").as_bytes())
}

/// The file of rank `rank`'s optimiser shard in a checkpoint of a `world`-rank run.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("optimizer.rank{rank}-of-{world}.safetensors")
}

/// As [`save`], for rank `world.rank` of a data-parallel run: every rank writes its optimiser
/// shard (moments and master copies of the tensors it owns), rank 0 the trained tensors (the
/// same on every rank) and the state, with `barrier` between the phases so the checkpoint moves
/// into place only when complete. One rank: [`save`].
#[allow(clippy::too_many_arguments)]
pub fn save_ranked<B: TrainBackend, S: Serialize>(
    be: &B,
    run: &Path,
    model: &Qwen2<B>,
    opt: &Optimizer<B>,
    step: u64,
    state: &S,
    world: &World,
    barrier: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    if world.size == 1 {
        return save(be, run, model, opt, step, state);
    }
    let dir = checkpoint_dir(run, step);
    let tmp = dir.with_extension("tmp");
    if world.is_main() {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    }
    barrier()?;
    let mut shard = vec![];
    for (i, (n, s)) in model.trainable().iter().enumerate() {
        if opt.owns(i) {
            shard.push((format!("m.{n}"), s.clone(), be.to_f32(&opt.m[i])));
            shard.push((format!("v.{n}"), s.clone(), be.to_f32(&opt.v[i])));
            if let Some(master) = opt.master.get(i) {
                shard.push((format!("master.{n}"), s.clone(), be.to_f32(master)));
            }
        }
    }
    write_safetensors(&tmp.join(shard_file(world.rank, world.size)), shard, ExportDtype::F32)?;
    barrier()?;
    if world.is_main() {
        let named = model
            .trainable()
            .into_iter()
            .zip(model.trainable_tensors())
            .map(|((n, s), b)| (n, s, be.to_f32(b)))
            .collect::<Vec<_>>();
        write_safetensors(&tmp.join("trainable.safetensors"), named, ExportDtype::F32)?;
        write_atomic(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&tmp, &dir).with_context(|| format!("cannot move {} into place", tmp.display()))?;
        write_atomic(&run.join("checkpoints").join("latest"), format!("step-{step}\n").as_bytes())?;
    }
    barrier()
}

/// Removes all but the newest `keep` checkpoints (0 keeps everything).
pub fn prune(run: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let dir = run.join("checkpoints");
    let mut steps: Vec<u64> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    for s in steps.iter().rev().skip(keep) {
        std::fs::remove_dir_all(checkpoint_dir(run, *s))?;
    }
    Ok(())
}

/// Restores the newest checkpoint into `model` and `opt` and returns its state.
pub fn load<B: TrainBackend, S: DeserializeOwned>(
    be: &B,
    run: &Path,
    model: &mut Qwen2<B>,
    opt: &mut Optimizer<B>,
) -> Result<S> {
    let latest = run.join("checkpoints").join("latest");
    let name = std::fs::read_to_string(&latest)
        .with_context(|| format!("cannot resume: no checkpoint ({} is missing)", latest.display()))?;
    let dir = run.join("checkpoints").join(name.trim());
    let state: S = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state.json"))
            .with_context(|| format!("cannot read {}/state.json", dir.display()))?,
    )
    .with_context(|| format!("{}/state.json is corrupt", dir.display()))?;
    let names = model.trainable();
    let params = Checkpoint::open_files(&dir, &["trainable.safetensors".to_string()])?;
    let host = crate::backend::cpu::CpuBackend::new();
    opt.master.clear();
    let (moments_file, sharded) = match &opt.shard {
        Some(s) => (shard_file(s.rank, s.world), true),
        None => ("optimizer.safetensors".to_string(), false),
    };
    if !dir.join(&moments_file).is_file() {
        bail!(
            "cannot resume from {}: it has no {moments_file} — it was written by a run with a different number of \
             data-parallel ranks; resume with the same number",
            dir.display()
        );
    }
    let moments = Checkpoint::open_files(&dir, &[moments_file])?;
    for (i, ((n, s), buf)) in names.iter().zip(model.trainable_mut()).enumerate() {
        let t = params.get(n, s)?;
        *buf = be.upload(&t)?;
        let owned = opt.owns(i);
        if be.master_weights() {
            // The master's full precision, not the rounding `buf` holds.
            opt.master.push(match (owned, sharded) {
                (false, _) => be.zeros_f32(1),
                // A shard from a run without master copies (the CPU) holds none: the parameter is exact.
                (true, true) => match moments.get(&format!("master.{n}"), s) {
                    Ok(m) => be.upload_f32_full(&host.upload(&m)?),
                    Err(_) => be.upload_f32_full(&host.upload(&t)?),
                },
                (true, false) => be.upload_f32_full(&host.upload(&t)?),
            });
        }
        if owned {
            opt.m[i] = be.upload_f32_full(&host.upload(&moments.get(&format!("m.{n}"), s)?)?);
            opt.v[i] = be.upload_f32_full(&host.upload(&moments.get(&format!("v.{n}"), s)?)?);
        }
    }
    // Trained token rows live in the base weights too.
    model.sync_token_rows(be);
    Ok(state)
}

/// Keeps the metrics lines whose `step` is at most `step` (dropping what a killed run wrote after
/// its last checkpoint, including a half-written last line) and returns them. The kept lines stay
/// byte for byte as written (re-serialising could change a float's last digit); the file is
/// rewritten only when something is dropped. Any other unreadable line is an error rather than
/// silently lost history.
pub fn cut_metrics<M: DeserializeOwned>(path: &Path, step: u64) -> Result<Vec<M>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path)?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut kept = vec![];
    let mut kept_text = String::with_capacity(text.len());
    for (i, line) in lines.iter().enumerate() {
        let complete = line.ends_with('\n');
        let parsed = serde_json::from_str::<Value>(line).map_err(anyhow::Error::from).and_then(|v| {
            let s = v.get("step").and_then(Value::as_u64).context("no step field")?;
            Ok((s, serde_json::from_value::<M>(v)?))
        });
        match parsed {
            Ok((s, m)) if s <= step && complete => {
                kept.push(m);
                kept_text.push_str(line);
            }
            Ok(_) => {}
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => bail!("{}:{}: unreadable metrics line: {e}", path.display(), i + 1),
        }
    }
    if kept_text.len() != text.len() {
        write_atomic(path, kept_text.as_bytes())?;
    }
    Ok(kept)
}

/// The settings that differ between a run's `config.toml` and `new_text`, as dotted keys with
/// their old and new values (`(absent)` for a key on one side only).
pub fn config_changes(old_text: &str, new_text: &str) -> Result<Vec<String>> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let parse = |text: &str, what: &str| -> Result<std::collections::BTreeMap<String, String>> {
        let v: toml::Value = toml::from_str(text).with_context(|| format!("cannot parse the {what} config"))?;
        let mut out = Default::default();
        flatten("", &v, &mut out);
        Ok(out)
    };
    let (old, new) = (parse(old_text, "run's")?, parse(new_text, "new")?);
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let absent = "(absent)".to_string();
    Ok(keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| format!("{k}: {} -> {}", old.get(k).unwrap_or(&absent), new.get(k).unwrap_or(&absent)))
        .collect())
}

/// Before resuming the run in `run_dir`: refuses a config that differs from the one the run
/// started with (a changed learning rate or step count would silently make another run),
/// naming every changed setting, unless `accept` says to continue with the new one.
pub fn check_resume_config(run_dir: &Path, new_text: &str, accept: bool) -> Result<()> {
    let path = run_dir.join("config.toml");
    let Ok(old) = std::fs::read_to_string(&path) else { return Ok(()) };
    let changes = config_changes(&old, new_text)?;
    if changes.is_empty() || accept {
        if !changes.is_empty() {
            eprintln!("resuming with a changed config (accepted): {}", changes.join("; "));
        }
        return Ok(());
    }
    bail!(
        "{} holds the config this run started with, and the new one differs:\n  {}\npass --accept-config-change to \
         continue with the new settings, or restore them",
        path.display(),
        changes.join("\n  ")
    )
}

#[cfg(test)]
mod config_change_tests {
    use super::*;

    #[test]
    fn changed_settings_are_named_with_both_values() {
        let old = "[optim]\nlr = 0.01\n[train]\nsteps = 6\n";
        let new = "[optim]\nlr = 0.02\n[train]\nsteps = 6\nseed = 1\n";
        assert_eq!(config_changes(old, new).unwrap(), vec!["optim.lr: 0.01 -> 0.02", "train.seed: (absent) -> 1"]);
        // Comments, spacing and order are not changes.
        assert!(config_changes("[train]\nsteps = 6 # six\n", "[train]\n\nsteps=6\n").unwrap().is_empty());
    }
}
