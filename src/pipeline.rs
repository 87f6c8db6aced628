//! `protege train`: the whole method as stages of one run directory —
//! synth → sft → rl → eval (before and after) → report.
//!
//! Each stage's table in the config is the stage's own config (`protege synth|sft|rl`)
//! without what the pipeline wires in: the base model, the run directories, and the files one
//! stage hands the next. A stage whose output exists is skipped; one that was interrupted is
//! resumed from its checkpoints. With no config, the embedded `configs/demo.toml` runs: the
//! tiny test model, the bundled suite, the oracle expert and the scripted teacher, on the CPU.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::agent::episode::EpisodeConfig;
use crate::backend::Device;
use crate::backend::SamplingParams;
use crate::config::{ExpertSection, RlConfig, SftConfig, SynthConfig};
use crate::eval::{comparison, run_eval, EvalOptions, ExistingOut, PolicySpec, Summary};
use crate::sandbox::Limits;
use crate::train::dist::World;
use crate::util::write_atomic;

/// The embedded default: `protege train` with no arguments.
pub const DEMO_CONFIG: &str = include_str!("../configs/demo.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The run directory (relative to the config file).
    pub dir: PathBuf,
    /// The model to post-train: an HF directory (relative to the config file).
    pub model: PathBuf,
    /// Context length override for every stage (small test models).
    #[serde(default)]
    pub context: Option<usize>,
    /// Stages to run, in this order: any of "synth", "sft", "rl", "eval".
    #[serde(default = "all_stages")]
    pub stages: Vec<String>,
    /// Printed at the start: what is scripted or simplified in this run.
    #[serde(default)]
    pub note: Option<String>,
    /// Where SFT, RL and the local policy of eval run: "cpu" (the default), "cuda" or "cuda:N".
    #[serde(default)]
    pub device: Option<String>,
    /// Where every stage's episodes run (`local` or `docker`; default: each task's own).
    #[serde(default)]
    pub executor: Option<crate::executor::ExecutorKind>,
    /// Docker hosts and container limits for every stage.
    #[serde(default)]
    pub docker: Option<crate::executor::docker::DockerConfig>,
}

fn all_stages() -> Vec<String> {
    ["synth", "sft", "rl", "eval"].iter().map(|s| s.to_string()).collect()
}

/// `[eval]`: evaluation of the models before and after training on a held-out suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    pub suite: PathBuf,
    /// Which models: "base" (before training), "sft", "final" (after RL).
    #[serde(default = "default_eval_models")]
    pub models: Vec<String>,
    #[serde(default)]
    pub expert: ExpertSection,
    #[serde(default = "one")]
    pub concurrency: usize,
    /// 0 is greedy.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub episode: EpisodeConfig,
    #[serde(default)]
    pub limits: Limits,
    /// Files the agent's patch may not change when graded.
    #[serde(default)]
    pub protection: crate::tasks::protect::Protection,
    #[serde(default)]
    pub seed: u64,
}

fn default_eval_models() -> Vec<String> {
    vec!["base".into(), "final".into()]
}

fn one() -> usize {
    1
}

fn default_new_tokens() -> usize {
    512
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub run: RunSection,
    #[serde(default)]
    pub synth: Option<toml::Table>,
    #[serde(default)]
    pub sft: Option<toml::Table>,
    #[serde(default)]
    pub rl: Option<toml::Table>,
    #[serde(default)]
    pub eval: Option<EvalSection>,
}

/// Sets `table.section.key = value`, refusing a value the user set (the pipeline owns it).
fn inject(table: &mut toml::Table, stage: &str, section: &str, key: &str, value: toml::Value) -> Result<()> {
    let sec = table.entry(section).or_insert_with(|| toml::Value::Table(Default::default()));
    let sec = sec.as_table_mut().with_context(|| format!("[{stage}.{section}] must be a table"))?;
    if sec.contains_key(key) {
        bail!("[{stage}.{section}] {key} is set by protege train; remove it");
    }
    sec.insert(key.into(), value);
    Ok(())
}

fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

fn parse_stage<T: serde::de::DeserializeOwned>(table: toml::Table, stage: &str) -> Result<T> {
    toml::Value::Table(table).try_into().with_context(|| format!("invalid [{stage}] table"))
}

/// A loaded pipeline with every stage's config resolved and checked up front.
pub struct Pipeline {
    pub text: String,
    pub run: RunSection,
    pub dir: PathBuf,
    pub synth: Option<SynthConfig>,
    pub sft: Option<SftConfig>,
    pub rl: Option<RlConfig>,
    pub eval: Option<EvalSection>,
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl Pipeline {
    /// Parses `text` as if it were the file `origin` (relative paths resolve against its
    /// directory).
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let cfg: TrainConfig =
            crate::inputs::toml_file(text, &origin.display().to_string()).context("invalid config")?;
        // Absolute, so that stage configs can resolve their own relative paths again safely.
        let base = std::env::current_dir()?.join(origin.parent().unwrap_or(Path::new(".")));
        let mut run = cfg.run;
        run.model = resolve(&base, &run.model);
        let dir = resolve(&base, &run.dir);
        for s in &run.stages {
            if !["synth", "sft", "rl", "eval"].contains(&s.as_str()) {
                bail!("run.stages: unknown stage {s:?} (synth, sft, rl, eval)");
            }
        }
        if let Some(d) = &run.device {
            d.parse::<Device>().context("run.device")?;
        }
        let synth = stage_table(&run, "synth", cfg.synth)?.map(|t| synth_config(t, &run, &dir, &base)).transpose()?;
        let sft =
            stage_table(&run, "sft", cfg.sft)?.map(|t| sft_config(t, &run, &dir, &base, synth.as_ref())).transpose()?;
        let rl = stage_table(&run, "rl", cfg.rl)?.map(|t| rl_config(t, &run, &dir, &base, sft.as_ref())).transpose()?;
        let eval = stage_table(&run, "eval", cfg.eval)?.map(|e| eval_section(e, &base)).transpose()?;
        Ok(Self { text: text.to_string(), run, dir, synth, sft, rl, eval })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// The embedded demo, resolved as if it were `./configs/demo.toml`.
    pub fn demo() -> Result<Self> {
        let origin = Path::new("configs").join("demo.toml");
        let p = Self::parse(DEMO_CONFIG, &origin)?;
        if !p.run.model.join("config.json").exists() {
            bail!(
                "the embedded demo uses the repository's files ({} is missing): run `protege train` from the \
                 repository root, or pass --config FILE",
                p.run.model.display()
            );
        }
        Ok(p)
    }
}

/// The table of `stage` when `run.stages` lists the stage (an error when it is missing).
fn stage_table<T>(run: &RunSection, stage: &str, table: Option<T>) -> Result<Option<T>> {
    match (run.stages.iter().any(|x| x == stage), table) {
        (true, Some(t)) => Ok(Some(t)),
        (true, None) => bail!("run.stages has \"{stage}\" but there is no [{stage}] table"),
        _ => Ok(None),
    }
}

/// `[synth]`, writing into `<run>/synth`, with the run's executor settings.
fn synth_config(mut t: toml::Table, run: &RunSection, dir: &Path, base: &Path) -> Result<SynthConfig> {
    inject(&mut t, "synth", "output", "run_dir", path_value(&dir.join("synth")))?;
    let mut c: SynthConfig = parse_stage(t, "synth")?;
    c.resolve_paths(base);
    c.executor = c.executor.or(run.executor);
    if let Some(d) = &run.docker {
        c.docker = d.clone();
    }
    c.validate().context("[synth]")?;
    Ok(c)
}

/// `[sft]`, training the run's model into `<run>/sft`, the synthesised trajectories first.
fn sft_config(
    mut t: toml::Table,
    run: &RunSection,
    dir: &Path,
    base: &Path,
    synth: Option<&SynthConfig>,
) -> Result<SftConfig> {
    inject(&mut t, "sft", "model", "path", path_value(&run.model))?;
    if let Some(c) = run.context {
        inject(&mut t, "sft", "model", "context", toml::Value::Integer(c as i64))?;
    }
    inject(&mut t, "sft", "output", "run_dir", path_value(&dir.join("sft")))?;
    // The synthesised trajectories come first; [sft.data] train may add more.
    let data = t.entry("data").or_insert_with(|| toml::Value::Table(Default::default()));
    let data = data.as_table_mut().context("[sft.data] must be a table")?;
    let mut train = match data.remove("train") {
        Some(toml::Value::Array(a)) => a,
        None => vec![],
        Some(_) => bail!("[sft.data] train must be a list of files"),
    };
    if let Some(s) = synth {
        train.insert(0, path_value(&s.output.run_dir.join("trajectories.jsonl")));
    }
    data.insert("train".into(), toml::Value::Array(train));
    let mut c: SftConfig = parse_stage(t, "sft")?;
    c.data.train = c.data.train.iter().map(|p| resolve(base, p)).collect();
    c.validate().context("[sft]")?;
    Ok(c)
}

/// `[rl]`, starting from what SFT made (or the run's model), into `<run>/rl`, with the run's
/// executor settings.
fn rl_config(
    mut t: toml::Table,
    run: &RunSection,
    dir: &Path,
    base: &Path,
    sft: Option<&SftConfig>,
) -> Result<RlConfig> {
    let (path, adapter) = sft_output(&run.model, sft);
    inject(&mut t, "rl", "model", "path", path_value(&path))?;
    if let Some(a) = adapter {
        inject(&mut t, "rl", "model", "adapter", path_value(&a))?;
    }
    if let Some(c) = run.context {
        inject(&mut t, "rl", "model", "context", toml::Value::Integer(c as i64))?;
    }
    inject(&mut t, "rl", "output", "run_dir", path_value(&dir.join("rl")))?;
    let mut c: RlConfig = parse_stage(t, "rl")?;
    c.resolve_paths(base);
    c.rollout.executor = c.rollout.executor.or(run.executor);
    if let Some(d) = &run.docker {
        c.rollout.docker = d.clone();
    }
    c.validate().context("[rl]")?;
    Ok(c)
}

/// `[eval]`, its paths resolved and its models and expert checked.
fn eval_section(mut e: EvalSection, base: &Path) -> Result<EvalSection> {
    e.suite = resolve(base, &e.suite);
    e.expert.path = e.expert.path.as_ref().map(|p| resolve(base, p));
    e.expert.spec().context("[eval.expert]")?;
    for m in &e.models {
        if !["base", "sft", "final"].contains(&m.as_str()) {
            bail!("eval.models: unknown model {m:?} (base, sft, final)");
        }
    }
    Ok(e)
}

/// The model SFT produces: (directory, adapter to merge). With LoRA, the base and the adapter
/// (merged at load) rather than the merged `model/`: the same weights, and the f32 adapter is
/// exact where `model/` is in the base's dtype.
fn sft_output(base: &Path, sft: Option<&SftConfig>) -> (PathBuf, Option<PathBuf>) {
    match sft {
        Some(s) if s.lora.is_some() => (base.to_path_buf(), Some(s.output.run_dir.join("adapter"))),
        Some(s) => (s.output.run_dir.join("model"), None),
        None => (base.to_path_buf(), None),
    }
}

fn stage_line(name: &str, what: &str) {
    eprintln!("\n== {name}: {what}");
}

/// Runs the pipeline; returns the eval summaries by model name.
pub fn run_pipeline(p: &Pipeline) -> Result<Vec<(String, Summary)>> {
    let device = p.device()?;
    p.prepare()?;
    if let Some(s) = &p.synth {
        synth_stage(s)?;
    }
    if let Some(s) = &p.sft {
        sft_stage(s, device)?;
    }
    if let Some(r) = &p.rl {
        rl_stage(r, device)?;
    }
    let summaries = match &p.eval {
        Some(e) => eval_stage(p, e, device)?,
        None => vec![],
    };
    report_stage(p)?;
    Ok(summaries)
}

impl Pipeline {
    /// Where SFT, RL and the local policy of eval run (`run.device`; the CPU by default).
    fn device(&self) -> Result<Device> {
        match &self.run.device {
            Some(d) => d.parse().context("run.device"),
            None => Ok(Device::Cpu),
        }
    }

    /// Checks what grading needs, creates the run directory and snapshots the config in it.
    fn prepare(&self) -> Result<()> {
        if self.synth.is_some() || self.rl.is_some() || self.eval.is_some() {
            // Grading runs the tasks' tests with pytest (each stage checks its suite's interpreters).
            crate::tasks::pytest::ensure_system()?;
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        write_atomic(&self.dir.join("config.toml"), self.text.as_bytes())?;
        eprintln!("protege train: run directory {}", self.dir.display());
        if let Some(n) = &self.run.note {
            eprintln!("note: {}", n.trim());
        }
        Ok(())
    }
}

/// Synthesis: expert-augmented trajectories, kept by rejection sampling. A finished synthesis
/// is skipped; one that accepted nothing stops the pipeline, as SFT would have nothing to learn.
fn synth_stage(s: &SynthConfig) -> Result<()> {
    let dir = &s.output.run_dir;
    if dir.join("summary.json").exists() {
        stage_line("synth", "done (skipped)");
        let sum: crate::synth::SynthSummary = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)
            .with_context(|| format!("{}/summary.json is corrupt", dir.display()))?;
        if sum.accepted == 0 {
            bail!("the finished synthesis in {} accepted no trajectory; nothing to fine-tune on", dir.display());
        }
        return Ok(());
    }
    stage_line("synth", "expert-augmented trajectories by rejection sampling");
    if s.agent.kind == "scripted" {
        eprintln!("   the agent is the SCRIPTED TEACHER: {}", crate::agent::teacher::TEACHER_LABEL);
    }
    let resume = dir.join("attempts.jsonl").exists();
    let text = toml::to_string(s)?;
    let sum = crate::synth::run_synth(s, &text, resume)?;
    eprintln!(
        "   {} of {} attempts accepted ({:.0}%), {:.1} expert calls and {:.1} steps per accepted trajectory",
        sum.accepted,
        sum.attempts,
        100.0 * sum.accept_rate,
        sum.expert_calls_per_accepted,
        sum.steps_per_accepted
    );
    if sum.accepted == 0 {
        bail!(
            "synthesis accepted no trajectory (rejections: {:?}); nothing to fine-tune on. The attempts and \
             their grading logs are in {}",
            sum.rejected,
            dir.join("attempts.jsonl").display()
        );
    }
    Ok(())
}

/// Supervised fine-tuning on the accepted trajectories (resumed from its checkpoints).
fn sft_stage(s: &SftConfig, device: Device) -> Result<()> {
    let dir = &s.output.run_dir;
    // model/ is written last (after adapter/ with LoRA).
    if dir.join("model/config.json").exists() {
        stage_line("sft", "done (skipped)");
        return Ok(());
    }
    stage_line("sft", "supervised fine-tuning on the accepted trajectories");
    let resume = dir.join("checkpoints/latest").exists();
    let out = crate::train::sft::run_sft_on(device, &World::from_env()?, s, &toml::to_string(s)?, resume, None)?;
    if let Some(m) = out.metrics.last() {
        eprintln!(
            "   step {}: loss {:.4}{}",
            m.step,
            m.loss,
            m.eval_loss.map(|e| format!(", eval loss {e:.4}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// GRPO on the SFT model, stage by stage of its curriculum (resumed from its checkpoints).
fn rl_stage(r: &RlConfig, device: Device) -> Result<()> {
    let dir = &r.output.run_dir;
    if dir.join("model/config.json").exists() {
        stage_line("rl", "done (skipped)");
        return Ok(());
    }
    stage_line("rl", "GRPO with the SWE-Protégé reward, stage by stage");
    let resume = dir.join("checkpoints/latest").exists();
    crate::train::rl::run_rl_on(device, r, &toml::to_string(r)?, resume, None)?;
    Ok(())
}

/// Evaluates each model `[eval] models` names on the held-out suite (a finished eval is read
/// back, an interrupted one resumed), then writes their comparison table.
fn eval_stage(p: &Pipeline, e: &EvalSection, device: Device) -> Result<Vec<(String, Summary)>> {
    let mut summaries = vec![];
    for name in &e.models {
        let (model, adapter) = match name.as_str() {
            "base" => (p.run.model.clone(), None),
            "sft" => sft_output(&p.run.model, p.sft.as_ref()),
            _ => match &p.rl {
                Some(r) => (r.output.run_dir.join("model"), None),
                None => sft_output(&p.run.model, p.sft.as_ref()),
            },
        };
        let out = p.dir.join("eval").join(name);
        let summary_path = out.join("summary.json");
        if summary_path.exists() {
            let text = std::fs::read_to_string(&summary_path)?;
            let s: Summary = crate::inputs::json_file(&text, &summary_path.display().to_string())
                .context("the eval summary is corrupt")?;
            // An interrupted eval wrote a partial summary: resume it (below) instead.
            if !s.interrupted {
                stage_line(&format!("eval {name}"), "done (skipped)");
                summaries.push((name.clone(), s));
                continue;
            }
        }
        let label = model_label(p, name);
        stage_line(&format!("eval {name}"), &format!("{label} on {}", e.suite.display()));
        let opts = EvalOptions {
            suite: e.suite.clone(),
            policy: PolicySpec::Local {
                model,
                adapter,
                sampling: SamplingParams { temperature: e.temperature, ..Default::default() },
                max_new_tokens: e.max_new_tokens,
                context: p.run.context,
                device: Some(device),
            },
            expert: e.expert.spec()?,
            concurrency: e.concurrency,
            out,
            episode: e.episode.clone(),
            limits: e.limits,
            grade_limits: Limits { timeout_s: 300.0, cpu_s: 600, ..e.limits },
            protection: e.protection.clone(),
            loops: Default::default(),
            only: vec![],
            seed: e.seed,
            isolation: None,
            executor: p.run.executor,
            docker: p.run.docker.clone().unwrap_or_default(),
            label: Some(label),
            // An interrupted stage picks up where it stopped.
            existing_out: ExistingOut::Resume,
        };
        summaries.push((name.clone(), run_eval(&opts)?));
    }
    if !summaries.is_empty() {
        let table = comparison(&summaries);
        eprintln!("\n{table}");
        write_atomic(&p.dir.join("eval").join("comparison.md"), table.as_bytes())?;
    }
    Ok(summaries)
}

/// `report.md` with its charts, from everything the run directory holds.
fn report_stage(p: &Pipeline) -> Result<()> {
    let report = crate::report::write_report(&p.dir)?;
    eprintln!("report: {}", report.display());
    Ok(())
}

/// How a model of the eval is named to people: a trained one by what the run made (paths in the
/// run directory) and what it was trained from, with the base named.
fn model_label(p: &Pipeline, name: &str) -> String {
    let here = |path: PathBuf| path.strip_prefix(&p.dir).map(Path::to_path_buf).unwrap_or(path).display().to_string();
    let base = p.run.model.display();
    let sft = |s: &SftConfig| match s.lora {
        Some(_) => format!("SFT adapter {} on base {base}", here(s.output.run_dir.join("adapter"))),
        None => format!("SFT model {} (from base {base})", here(s.output.run_dir.join("model"))),
    };
    match (name, &p.sft, &p.rl) {
        ("base", ..) => format!("base {base}"),
        ("sft", Some(s), _) => sft(s),
        (_, _, Some(r)) if name != "sft" => format!(
            "RL model {} (from {})",
            here(r.output.run_dir.join("model")),
            p.sft.as_ref().map_or_else(|| format!("base {base}"), sft)
        ),
        (_, Some(s), _) => sft(s),
        _ => format!("base {base} (no training stage ran)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_model_is_labelled_by_what_made_it() {
        let p = Pipeline::parse(DEMO_CONFIG, &Path::new("configs").join("demo.toml")).unwrap();
        let base = p.run.model.display().to_string();
        assert_eq!(model_label(&p, "base"), format!("base {base}"));
        assert_eq!(model_label(&p, "sft"), format!("SFT adapter sft/adapter on base {base}"));
        assert_eq!(
            model_label(&p, "final"),
            format!("RL model rl/model (from SFT adapter sft/adapter on base {base})")
        );
        // Without RL the final model is SFT's adapter, named as such rather than by the base's path.
        let no_rl =
            DEMO_CONFIG.replace(r#"stages = ["synth", "sft", "rl", "eval"]"#, r#"stages = ["synth", "sft", "eval"]"#);
        let p = Pipeline::parse(&no_rl, &Path::new("configs").join("demo.toml")).unwrap();
        assert!(p.rl.is_none());
        assert_eq!(model_label(&p, "final"), format!("SFT adapter sft/adapter on base {base}"));
    }
}
