//! `protege report RUN_DIR`: PNG plots of a run's curves and a Markdown summary.
//!
//! Reads what the stages wrote — `synth/summary.json`, `sft/metrics.jsonl`,
//! `rl/metrics.jsonl`, `eval/*/summary.json` (a bare `protege rl` or `protege sft` run
//! directory works too) — and writes `report/*.png` and `report.md`. Text is drawn with an
//! embedded font (Noto Sans), so no system font is needed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::util::write_atomic;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in; registering it cannot fail for a valid TTF.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, ttf_noto_sans::REGULAR);
    });
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = vec![];
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(l) {
            Ok(v) => out.push(v),
            // A torn last line of a running or killed run.
            Err(_) if i + 1 == text.lines().count() => {}
            Err(e) => bail!("{}:{}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// `(step, value)` of `key` over `rows` (rows without it are skipped).
fn series(rows: &[Value], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A line chart of `lines` (name, points) to `path`.
pub fn line_chart(path: &Path, title: &str, y_label: &str, lines: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    register_font();
    let pts: Vec<(f64, f64)> = lines.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if pts.is_empty() {
        bail!("no data for {title}");
    }
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    y0 -= pad;
    y1 += pad;
    // Drawn under a temporary name (the backend picks the format from the extension), then
    // renamed: a reader never sees half a picture.
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("plot.png");
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(&tmp, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(y_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for (i, (name, p)) in lines.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            chart.draw_series(p.iter().map(|&(x, y)| Circle::new((x, y), 3, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font(("sans-serif", 15))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))
}

fn find(run: &Path, stage: &str, file: &str) -> Option<PathBuf> {
    [run.join(stage).join(file), run.join(file)].into_iter().find(|p| p.exists())
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Writes `RUN/report/*.png` and `RUN/report.md`; returns the Markdown's path.
pub fn write_report(run: &Path) -> Result<PathBuf> {
    if !run.is_dir() {
        bail!("{} is not a run directory", run.display());
    }
    let out = run.join("report");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut md = format!("# protege report\n\nrun `{}`\n\n", run.display());
    let mut plots = vec![];

    if let Some(p) = find(run, "synth", "summary.json") {
        let s: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
            .with_context(|| format!("{} is corrupt", p.display()))?;
        md += &format!(
            "## Synthesis\n\nagent: {}\n\nexpert: {}\n\n| tasks | attempts | accepted | accept rate | expert calls / accepted | steps / accepted |\n|---|---|---|---|---|---|\n| {} | {} | {} | {:.0}% | {:.2} | {:.1} |\n\n",
            s["agent"].as_str().unwrap_or("?"),
            s["expert"].as_str().unwrap_or("?"),
            s["tasks"],
            s["attempts"],
            s["accepted"],
            100.0 * f(&s, "accept_rate"),
            f(&s, "expert_calls_per_accepted"),
            f(&s, "steps_per_accepted"),
        );
    }

    let sft = find(run, "sft", "metrics.jsonl").map(|p| read_jsonl(&p)).transpose()?.unwrap_or_default();
    let sft: Vec<Value> = sft.into_iter().filter(|v| v.get("reward").is_none()).collect();
    if !sft.is_empty() {
        let png = out.join("sft_loss.png");
        line_chart(
            &png,
            "SFT loss",
            "loss (nats / token)",
            &[("train", series(&sft, "loss")), ("eval", series(&sft, "eval_loss"))],
        )?;
        plots.push(png);
        let (a, b) = (&sft[0], &sft[sft.len() - 1]);
        md += &format!(
            "## SFT\n\n{} steps: loss {:.4} → {:.4}\n\n![SFT loss](report/sft_loss.png)\n\n",
            sft.len(),
            f(a, "loss"),
            f(b, "loss")
        );
    }

    let rl = find(run, "rl", "metrics.jsonl").map(|p| read_jsonl(&p)).transpose()?.unwrap_or_default();
    let rl: Vec<Value> = rl.into_iter().filter(|v| v.get("reward").is_some()).collect();
    if !rl.is_empty() {
        // (file, title, y label, [(legend, metrics key)]).
        type Chart<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);
        let charts: [Chart; 5] = [
            (
                "rl_reward.png",
                "RL reward and its components",
                "reward",
                &[
                    ("R_total", "reward"),
                    ("R_loop", "r_loop"),
                    ("R_format", "r_format"),
                    ("R_follow", "r_follow"),
                    ("R_other", "r_other"),
                ],
            ),
            (
                "rl_behaviour.png",
                "Resolved and looping episodes",
                "fraction of episodes",
                &[
                    ("resolve rate", "resolve_rate"),
                    ("looping rate", "looping_rate"),
                    ("expert token share", "expert_token_share"),
                ],
            ),
            (
                "rl_expert.png",
                "Expert use and episode length",
                "per episode",
                &[("expert calls", "expert_calls"), ("steps", "steps_per_episode"), ("longest run", "longest_run")],
            ),
            (
                "rl_optim.png",
                "Optimisation",
                "value",
                &[
                    ("KL", "kl"),
                    ("clip fraction", "clip_frac"),
                    ("entropy (est.)", "entropy"),
                    ("grad norm", "grad_norm"),
                ],
            ),
            (
                "rl_time.png",
                "Time per step",
                "seconds",
                &[
                    ("generation", "gen_s"),
                    ("tools (sum)", "tools_s"),
                    ("training", "train_s"),
                    ("rollout wall", "rollout_wall_s"),
                ],
            ),
        ];
        md += "## RL\n\n";
        for (file, title, y, keys) in charts {
            let lines: Vec<(&str, Vec<(f64, f64)>)> = keys.iter().map(|(n, k)| (*n, series(&rl, k))).collect();
            let png = out.join(file);
            line_chart(&png, title, y, &lines)?;
            md += &format!("![{title}](report/{file})\n\n");
            plots.push(png);
        }
        md += "| step | stage | reward | R_loop | R_follow | R_other | resolved | valid calls | looping | expert calls | steps | KL | clip | entropy |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in &rl {
            // A step whose policy never made a valid call has no behaviour to rate: its 0%
            // looping is not an achievement.
            let valid = r.get("valid_call_rate").and_then(|v| v.as_f64());
            let (valid_cell, looping_cell) = match valid {
                Some(0.0) => ("0%".to_string(), crate::eval::NO_ACTION.to_string()),
                Some(v) => (format!("{:.0}%", 100.0 * v), format!("{:.0}%", 100.0 * f(r, "looping_rate"))),
                None => ("—".to_string(), format!("{:.0}%", 100.0 * f(r, "looping_rate"))),
            };
            md += &format!(
                "| {} | {} | {:+.3} | {:+.2} | {:+.2} | {:+.2} | {:.0}% | {valid_cell} | {looping_cell} | {:.2} | {:.1} | {:.4} | {:.3} | {:.3} |\n",
                r["step"],
                r["stage"].as_str().unwrap_or(""),
                f(r, "reward"),
                f(r, "r_loop"),
                f(r, "r_follow"),
                f(r, "r_other"),
                100.0 * f(r, "resolve_rate"),
                f(r, "expert_calls"),
                f(r, "steps_per_episode"),
                f(r, "kl"),
                f(r, "clip_frac"),
                f(r, "entropy"),
            );
        }
        md += "\n";
    }

    let eval_dir = run.join("eval");
    if eval_dir.is_dir() {
        let mut evals = vec![];
        let mut names: Vec<PathBuf> = std::fs::read_dir(&eval_dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        // Before training first.
        names.sort_by_key(|p| match p.file_name().and_then(|n| n.to_str()) {
            Some("base") => 0,
            Some("sft") => 1,
            Some("final") => 2,
            _ => 3,
        });
        for d in names {
            let p = d.join("summary.json");
            if p.exists() {
                let s: crate::eval::Summary = serde_json::from_str(&std::fs::read_to_string(&p)?)
                    .with_context(|| format!("{} is corrupt", p.display()))?;
                evals.push((d.file_name().unwrap_or_default().to_string_lossy().to_string(), s));
            }
        }
        if !evals.is_empty() {
            md += "## Evaluation\n\n";
            md += &crate::eval::comparison(&evals);
            md += "\n";
        }
    }
    if plots.is_empty() && !md.contains("## ") {
        bail!(
            "{} holds no metrics to report (synth/summary.json, sft or rl metrics.jsonl, eval/*/summary.json)",
            run.display()
        );
    }
    let path = run.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}
