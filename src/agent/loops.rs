//! The loop detector (SWE-Protégé's definition): actions are reduced to base commands, and
//! maximal runs of consecutive identical base commands are measured and penalised.

use serde::{Deserialize, Serialize};

/// Commands whose first two words name the action (`git status` and `git diff` differ).
const TWO_WORD: [&str; 6] = ["git", "pip", "conda", "cargo", "npm", "poetry"];
/// Searching and viewing are one class of action.
const SEARCH: [&str; 6] = ["grep", "egrep", "fgrep", "rg", "find", "ag"];
const SEARCH_CLASS: &str = "search/view";

/// One action of an episode, as the loop detector sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "tool", rename_all = "snake_case")]
pub enum Action {
    Bash { command: String },
    Editor { command: String },
    AskExpert,
    Submit,
}

/// The base command of an action: for bash, leading `VAR=value` assignments are dropped, of a
/// chain joined by `&&`, `||` or `;` the last subcommand is kept, and its first word (two for
/// `git status`-style commands) is the base; grep/find and the editor's `view` are one class.
pub fn base_command(action: &Action) -> String {
    match action {
        Action::Editor { command } if command == "view" => SEARCH_CLASS.into(),
        Action::Editor { command } => format!("str_replace_editor {command}"),
        Action::AskExpert => "ask_expert".into(),
        Action::Submit => "submit".into(),
        Action::Bash { command } => {
            let last = command
                .split("&&")
                .flat_map(|s| s.split("||"))
                .flat_map(|s| s.split(';'))
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .last()
                .unwrap_or("");
            let words: Vec<&str> = last.split_whitespace().skip_while(|w| is_assignment(w)).collect();
            let Some(first) = words.first() else { return String::new() };
            let first = first.rsplit('/').next().unwrap_or(first);
            if SEARCH.contains(&first) {
                SEARCH_CLASS.into()
            } else if TWO_WORD.contains(&first) && words.len() > 1 {
                format!("{first} {}", words[1])
            } else {
                first.to_string()
            }
        }
    }
}

fn is_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        }
        None => false,
    }
}

/// Loop penalty constants (the paper's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    /// Free length of the longest run.
    pub k1: usize,
    /// Free length of every other run.
    pub k2: usize,
    /// Penalty per action beyond the free length.
    pub lambda: f64,
    /// The penalty's floor (negative).
    pub floor: f64,
    /// A trajectory with a run longer than this counts as looping.
    pub looping_run: usize,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self { k1: 15, k2: 8, lambda: 0.5, floor: -10.0, looping_run: 10 }
    }
}

/// A maximal run of one base command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub base: String,
    pub start: usize,
    pub len: usize,
}

/// The runs of an action sequence, in order.
pub fn runs(actions: &[Action]) -> Vec<Run> {
    let mut out: Vec<Run> = vec![];
    for (i, a) in actions.iter().enumerate() {
        let base = base_command(a);
        match out.last_mut() {
            Some(r) if r.base == base => r.len += 1,
            _ => out.push(Run { base, start: i, len: 1 }),
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopReport {
    pub longest_run: usize,
    pub longest_base: String,
    /// R_loop: `max(floor, -lambda * [max(0, s1-k1+1) + sum_{j>=2} max(0, sj-k2+1)])` over run
    /// lengths sorted longest first.
    pub penalty: f64,
    pub looping: bool,
}

pub fn analyse(actions: &[Action], cfg: &LoopConfig) -> LoopReport {
    let rs = runs(actions);
    let mut lens: Vec<usize> = rs.iter().map(|r| r.len).collect();
    lens.sort_unstable_by(|a, b| b.cmp(a));
    let excess = |s: usize, k: usize| (s + 1).saturating_sub(k) as f64;
    let total: f64 =
        lens.iter().enumerate().map(|(j, &s)| if j == 0 { excess(s, cfg.k1) } else { excess(s, cfg.k2) }).sum();
    let longest = rs.iter().max_by_key(|r| r.len);
    LoopReport {
        longest_run: longest.map_or(0, |r| r.len),
        longest_base: longest.map(|r| r.base.clone()).unwrap_or_default(),
        penalty: if total > 0.0 { (-cfg.lambda * total).max(cfg.floor) } else { 0.0 },
        looping: longest.is_some_and(|r| r.len > cfg.looping_run),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bash(c: &str) -> Action {
        Action::Bash { command: c.into() }
    }

    #[test]
    fn base_commands() {
        assert_eq!(base_command(&bash("ls -la")), "ls");
        assert_eq!(base_command(&bash("PYTHONPATH=src FOO=1 python -m pytest -x")), "python");
        assert_eq!(base_command(&bash("cd /repo && python -m pytest")), "python");
        assert_eq!(base_command(&bash("cd /repo; cat a.py")), "cat");
        assert_eq!(base_command(&bash("false || echo no")), "echo");
        assert_eq!(base_command(&bash("git status")), "git status");
        assert_eq!(base_command(&bash("git diff HEAD")), "git diff");
        assert_eq!(base_command(&bash("/usr/bin/python3 x.py")), "python3");
        assert_eq!(base_command(&bash("grep -rn foo .")), "search/view");
        assert_eq!(base_command(&bash("find . -name '*.py'")), "search/view");
        assert_eq!(base_command(&Action::Editor { command: "view".into() }), "search/view");
        assert_eq!(base_command(&Action::Editor { command: "str_replace".into() }), "str_replace_editor str_replace");
        assert_eq!(base_command(&bash("A=1")), "");
        assert_eq!(base_command(&bash("2x=1 ls")), "2x=1", "a name cannot start with a digit");
    }

    #[test]
    fn runs_are_maximal_and_grep_find_view_are_one_class() {
        let acts = vec![
            bash("grep -n x a.py"),
            bash("find . -name a.py"),
            Action::Editor { command: "view".into() },
            bash("git status"),
            bash("git diff"),
            bash("git diff"),
        ];
        let rs = runs(&acts);
        let got: Vec<(&str, usize, usize)> = rs.iter().map(|r| (r.base.as_str(), r.start, r.len)).collect();
        assert_eq!(got, vec![("search/view", 0, 3), ("git status", 3, 1), ("git diff", 4, 2)]);
    }

    #[test]
    fn penalty_follows_the_formula() {
        let cfg = LoopConfig::default();
        let seq = |n: usize, c: &str| vec![bash(c); n];
        // Runs up to k1 (longest) and k2 (others) - 1 are free.
        let free = [seq(14, "ls"), seq(7, "cat a"), seq(7, "pwd")].concat();
        let r = analyse(&free, &cfg);
        assert_eq!((r.penalty, r.longest_run, r.looping), (0.0, 14, true));
        // s1 = 20 -> 6 over, s2 = 9 -> 2 over, s3 = 3 -> 0: -0.5 * 8 = -4.
        let acts = [seq(20, "ls"), seq(9, "cat a"), seq(3, "pwd")].concat();
        let r = analyse(&acts, &cfg);
        assert_eq!(r.penalty, -4.0);
        assert_eq!(r.longest_base, "ls");
        // The floor.
        assert_eq!(analyse(&seq(75, "ls"), &cfg).penalty, -10.0);
        // Looping means a run longer than 10.
        assert!(!analyse(&seq(10, "ls"), &cfg).looping);
        assert!(analyse(&seq(11, "ls"), &cfg).looping);
        assert_eq!(analyse(&[], &cfg).penalty, 0.0);
    }
}
