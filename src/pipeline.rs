//! `protege train`: the whole method as stages of one run directory —
//! synth → sft → rl → eval (before and after) → report.
//!
//! Each stage's table in the config is the stage's own config (`protege synth|sft|rl`)
//! without what the pipeline wires in: the base model, the run directories, and the files one
//! stage hands the next. A stage whose output exists is skipped; one that was interrupted is
//! resumed from its checkpoints. With no config, the embedded `configs/demo.toml` runs: the
//! tiny test model, the bundled suite, the oracle expert and the scripted teacher, on the CPU.

use std::path::{Path, PathBuf};

use crate::backend::cuda::Device;
use crate::train::dist::World;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::agent::episode::EpisodeConfig;
use crate::agent::sandbox::Limits;
use crate::backend::SamplingParams;
use crate::config::{ExpertSection, RlConfig, SftConfig, SynthConfig};
use crate::eval::{run_eval, EvalOptions, ExistingOut, PolicySpec, Summary};

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
        let mut run = cfg.run.clone();
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
        let on = |s: &str| run.stages.iter().any(|x| x == s);
        let context = run.context.map(|c| toml::Value::Integer(c as i64));

        let synth = match (on("synth"), cfg.synth.clone()) {
            (true, Some(mut t)) => {
                inject(&mut t, "synth", "output", "run_dir", path_value(&dir.join("synth")))?;
                let mut c: SynthConfig = parse_stage(t, "synth")?;
                c.resolve_paths(&base);
                c.executor = c.executor.or(run.executor);
                if let Some(d) = &run.docker {
                    c.docker = d.clone();
                }
                c.validate().context("[synth]")?;
                Some(c)
            }
            (true, None) => bail!("run.stages has \"synth\" but there is no [synth] table"),
            _ => None,
        };
        let sft = match (on("sft"), cfg.sft.clone()) {
            (true, Some(mut t)) => {
                inject(&mut t, "sft", "model", "path", path_value(&run.model))?;
                if let Some(c) = &context {
                    inject(&mut t, "sft", "model", "context", c.clone())?;
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
                if let Some(s) = &synth {
                    train.insert(0, path_value(&s.output.run_dir.join("trajectories.jsonl")));
                }
                data.insert("train".into(), toml::Value::Array(train));
                let mut c: SftConfig = parse_stage(t, "sft")?;
                let r = |p: &Path| resolve(&base, p);
                c.data.train = c.data.train.iter().map(|p| r(p)).collect();
                c.validate().context("[sft]")?;
                Some(c)
            }
            (true, None) => bail!("run.stages has \"sft\" but there is no [sft] table"),
            _ => None,
        };
        let rl = match (on("rl"), cfg.rl.clone()) {
            (true, Some(mut t)) => {
                let (path, adapter) = sft_output(&run.model, sft.as_ref());
                inject(&mut t, "rl", "model", "path", path_value(&path))?;
                if let Some(a) = adapter {
                    inject(&mut t, "rl", "model", "adapter", path_value(&a))?;
                }
                if let Some(c) = &context {
                    inject(&mut t, "rl", "model", "context", c.clone())?;
                }
                inject(&mut t, "rl", "output", "run_dir", path_value(&dir.join("rl")))?;
                let mut c: RlConfig = parse_stage(t, "rl")?;
                c.resolve_paths(&base);
                c.rollout.executor = c.rollout.executor.or(run.executor);
                if let Some(d) = &run.docker {
                    c.rollout.docker = d.clone();
                }
                c.validate().context("[rl]")?;
                Some(c)
            }
            (true, None) => bail!("run.stages has \"rl\" but there is no [rl] table"),
            _ => None,
        };
        let eval = match (on("eval"), cfg.eval.clone()) {
            (true, Some(mut e)) => {
                e.suite = resolve(&base, &e.suite);
                e.expert.path = e.expert.path.as_ref().map(|p| resolve(&base, p));
                e.expert.spec().context("[eval.expert]")?;
                for m in &e.models {
                    if !["base", "sft", "final"].contains(&m.as_str()) {
                        bail!("eval.models: unknown model {m:?} (base, sft, final)");
                    }
                }
                Some(e)
            }
            (true, None) => bail!("run.stages has \"eval\" but there is no [eval] table"),
            _ => None,
        };
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
    let device: Device = match &p.run.device {
        Some(d) => d.parse().context("run.device")?,
        None => Device::Cpu,
    };
    if p.synth.is_some() || p.rl.is_some() || p.eval.is_some() {
        // Grading runs the tasks' tests with pytest (each stage checks its suite's interpreters).
        crate::tasks::pytest::ensure_system()?;
    }
    std::fs::create_dir_all(&p.dir).with_context(|| format!("cannot create {}", p.dir.display()))?;
    crate::model::export::write_atomic(&p.dir.join("config.toml"), p.text.as_bytes())?;
    eprintln!("protege train: run directory {}", p.dir.display());
    if let Some(n) = &p.run.note {
        eprintln!("note: {}", n.trim());
    }
    if let Some(s) = &p.synth {
        let dir = &s.output.run_dir;
        if dir.join("summary.json").exists() {
            stage_line("synth", "done (skipped)");
            let sum: crate::synth::SynthSummary =
                serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)
                    .with_context(|| format!("{}/summary.json is corrupt", dir.display()))?;
            if sum.accepted == 0 {
                bail!("the finished synthesis in {} accepted no trajectory; nothing to fine-tune on", dir.display());
            }
        } else {
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
        }
    }
    if let Some(s) = &p.sft {
        let dir = &s.output.run_dir;
        // model/ is written last (after adapter/ with LoRA).
        if dir.join("model/config.json").exists() {
            stage_line("sft", "done (skipped)");
        } else {
            stage_line("sft", "supervised fine-tuning on the accepted trajectories");
            let resume = dir.join("checkpoints/latest").exists();
            let out =
                crate::train::sft::run_sft_on(device, &World::from_env()?, s, &toml::to_string(s)?, resume, None)?;
            if let Some(m) = out.metrics.last() {
                eprintln!(
                    "   step {}: loss {:.4}{}",
                    m.step,
                    m.loss,
                    m.eval_loss.map(|e| format!(", eval loss {e:.4}")).unwrap_or_default()
                );
            }
        }
    }
    if let Some(r) = &p.rl {
        let dir = &r.output.run_dir;
        if dir.join("model/config.json").exists() {
            stage_line("rl", "done (skipped)");
        } else {
            stage_line("rl", "GRPO with the SWE-Protégé reward, stage by stage");
            let resume = dir.join("checkpoints/latest").exists();
            crate::train::rl::run_rl_on(device, r, &toml::to_string(r)?, resume, None)?;
        }
    }
    let mut summaries = vec![];
    if let Some(e) = &p.eval {
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
            crate::model::export::write_atomic(&p.dir.join("eval").join("comparison.md"), table.as_bytes())?;
        }
    }
    let report = crate::report::write_report(&p.dir)?;
    eprintln!("report: {}", report.display());
    Ok(summaries)
}

/// The eval metrics side by side: which model each column is, every rate beside the share of
/// valid tool calls and the exit statuses, and a warning under the table for a model that never
/// acted (its rates of behaviour shown as n/a rather than as, say, 0% looping).
pub fn comparison(s: &[(String, Summary)]) -> String {
    let mut t = String::from("models:\n");
    for (n, x) in s {
        t += &format!("- {n}: {}\n", x.model_label());
    }
    t += "\n| metric |";
    for (n, _) in s {
        t += &format!(" {n} |");
    }
    t += "\n|---|";
    t += &"---|".repeat(s.len());
    t += "\n";
    let mut rows: Vec<(String, Vec<String>)> = vec![
        ("tasks".into(), s.iter().map(|(_, x)| x.tasks.to_string()).collect()),
        ("Pass@1".into(), s.iter().map(|(_, x)| format!("{:.1}%", 100.0 * x.pass_at_1)).collect()),
    ];
    let behaviour: Vec<_> = s.iter().map(|(_, x)| x.behaviour_rows()).collect();
    for (i, (name, _)) in behaviour[0].iter().enumerate() {
        rows.push((name.to_string(), behaviour.iter().map(|b| b[i].1.clone()).collect()));
    }
    rows.push(("cost / task".into(), s.iter().map(|(_, x)| format!("${:.4}", x.cost_per_task_usd)).collect()));
    let mut statuses: Vec<&String> = s.iter().flat_map(|(_, x)| x.exit_statuses.keys()).collect();
    statuses.sort();
    statuses.dedup();
    for st in statuses {
        let counts = s.iter().map(|(_, x)| x.exit_statuses.get(st).copied().unwrap_or(0).to_string()).collect();
        rows.push((format!("exit: {st}"), counts));
    }
    for (name, cells) in rows {
        t += &format!("| {name} |");
        for c in cells {
            t += &format!(" {c} |");
        }
        t += "\n";
    }
    for (_, x) in s {
        if let Some(w) = x.warning() {
            t += &format!("\n**{w}**\n");
        }
    }
    t
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
    use crate::agent::episode::ExitStatus;
    use crate::agent::sandbox::Isolation;
    use crate::eval::TaskResult;

    fn result(i: usize, steps: usize, turns: usize, exit_status: ExitStatus, looping: bool) -> TaskResult {
        TaskResult {
            task_id: format!("task-{i:02}"),
            resolved: false,
            exit_status,
            steps,
            turns,
            expert_calls: if steps > 0 { 1 } else { 0 },
            expert_tokens: if steps > 0 { 40 } else { 0 },
            policy_tokens: 30 * turns,
            cost_usd: 0.0,
            looping,
            longest_run: if looping { 12 } else { 2 },
            episode_s: 1.0,
            harness_s: 0.1,
            tampered: 0,
            error: None,
        }
    }

    fn summary(label: &str, results: Vec<TaskResult>) -> Summary {
        let mut s = Summary::new(
            Path::new("suite"),
            "local:/models/base".into(),
            "oracle".into(),
            Isolation::Plain,
            results,
            1.0,
        );
        s.label = label.into();
        s
    }

    fn row<'a>(table: &'a str, name: &str) -> &'a str {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no {name} row: {table}"))
    }

    /// The real 0.5B run's case: the base loops in 5 of 14 episodes; the trained model ends all
    /// 14 on format errors without one valid call. Its 0% looping must not read as a gain.
    #[test]
    fn a_model_that_never_acted_gets_a_warning_not_an_improvement() {
        let base = summary(
            "base /models/base",
            (0..14)
                .map(|i| result(i, 8, 9, if i < 5 { ExitStatus::StepLimit } else { ExitStatus::Submitted }, i < 5))
                .collect(),
        );
        let fin = summary(
            "RL model rl/model (from SFT adapter sft/adapter on base /models/base)",
            (0..14).map(|i| result(i, 0, 3, ExitStatus::FormatErrors, false)).collect(),
        );
        let t = comparison(&[("base".into(), base.clone()), ("final".into(), fin.clone())]);
        assert!(t.contains("- base: base /models/base\n"), "{t}");
        assert!(t.contains("- final: RL model rl/model (from SFT adapter sft/adapter on base /models/base)\n"), "{t}");
        assert_eq!(row(&t, "looping trajectories"), "| looping trajectories | 35.7% | n/a (no valid action) |");
        assert_eq!(
            row(&t, "valid tool calls"),
            "| valid tool calls | 88.9% (112 of 126 replies) | 0.0% (0 of 42 replies) |"
        );
        assert_eq!(row(&t, "episodes with a valid call"), "| episodes with a valid call | 14 of 14 | 0 of 14 |");
        for r in ["expert calls / task", "expert share of tokens", "steps / task", "patches touching protected files"] {
            assert!(row(&t, r).ends_with("| n/a (no valid action) |"), "{r}: {t}");
        }
        assert_eq!(row(&t, "exit: format_errors"), "| exit: format_errors | 0 | 14 |");
        assert_eq!(row(&t, "exit: submitted"), "| exit: submitted | 9 | 0 |");
        assert_eq!(row(&t, "exit: step_limit"), "| exit: step_limit | 5 | 0 |");
        assert_eq!(t.matches("WARNING").count(), 1, "only the model that never acted is flagged: {t}");
        let w = fin.warning().unwrap();
        assert!(w.contains("RL model rl/model") && w.contains("never made a valid tool call"), "{w}");
        assert!(w.contains("none of its 42 replies in 14 episodes") && w.contains("(14 format_errors)"), "{w}");
        assert!(t.contains(&w));
        assert!(base.warning().is_none());
        // The eval's own summary says the same.
        let md = fin.markdown();
        assert!(md.contains("model `RL model rl/model") && md.contains(&w), "{md}");
        assert!(md.contains("| looping trajectories | n/a (no valid action) |"), "{md}");
        assert!(md.contains("| exit statuses | 14 format_errors |"), "{md}");
        assert!(md.contains("| task-00 | no | format_errors | 0 / 3 | 0 | 2 |"), "{md}");
        // A model that acted in a few episodes only gets a note beside its rates.
        let mut few = fin.clone();
        few.results[0] = result(0, 2, 4, ExitStatus::Submitted, false);
        let few = summary("few", few.results);
        let w = few.warning().unwrap();
        assert!(
            w.starts_with("NOTE: only 1 of 14 episodes of `few`")
                && w.contains("2 of 43 replies; 13 format_errors, 1 submitted"),
            "{w}"
        );
        assert_eq!(few.behaviour_rows()[4], ("steps / task", "0.1".to_string()));
        // A summary written before labels existed reads as its policy.
        let mut old = base;
        old.label.clear();
        assert_eq!(old.model_label(), "local:/models/base");
    }

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
