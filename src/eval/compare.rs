//! The eval metrics of several models side by side, as `protege train` prints it after its
//! evals and `protege report` writes it into the run's report.

use super::Summary;

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::agent::episode::ExitStatus;
    use crate::eval::TaskResult;
    use crate::sandbox::Isolation;

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
}
