//! The scripted teacher: a rule-based stand-in for a strong model during trajectory synthesis,
//! for demos and tests where no strong model is available. It is NOT a model: it reads the
//! task's gold patch and plays a fixed, plausible plan — look at the file the fix touches, run
//! the tests, ask the expert, make the fix hunk by hunk with `str_replace`, re-run the tests,
//! submit. Trajectories it produces say so in their `meta.agent`.

use anyhow::Result;
use serde_json::{json, Value};

use super::policy::{Policy, PolicyTurn, Replay};
use crate::chat::Message;
use crate::tasks::instance::patch_files;
use crate::tasks::TaskInstance;

/// What trajectories made by the teacher are labelled with.
pub const TEACHER_LABEL: &str = "scripted teacher (rule-based stand-in for a strong model; reads the gold patch)";

/// The old and new text of every hunk of a unified diff, per file: `(file, old, new)`.
pub fn hunk_edits(patch: &str) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = vec![];
    let mut file = String::new();
    let mut in_hunk = false;
    for l in patch.lines() {
        if let Some(p) = l.strip_prefix("+++ ") {
            file = p.trim().trim_start_matches("b/").to_string();
            in_hunk = false;
        } else if l.starts_with("--- ") || l.starts_with("diff --git") || l.starts_with("index ") {
            in_hunk = false;
        } else if l.starts_with("@@") {
            out.push((file.clone(), String::new(), String::new()));
            in_hunk = true;
        } else if in_hunk {
            let Some(h) = out.last_mut() else { continue };
            let (kind, body) = l.split_at(l.len().min(1));
            match kind {
                " " | "" => {
                    h.1 += body;
                    h.1.push('\n');
                    h.2 += body;
                    h.2.push('\n');
                }
                "-" => {
                    h.1 += body;
                    h.1.push('\n');
                }
                "+" => {
                    h.2 += body;
                    h.2.push('\n');
                }
                _ => {}
            }
        }
    }
    out
}

fn call(thought: &str, name: &str, args: Value) -> String {
    Replay::call(thought, name, args)
}

/// The teacher's replies for `task`.
pub fn plan(task: &TaskInstance) -> Vec<String> {
    let files = patch_files(&task.patch);
    let first = files.first().cloned().unwrap_or_else(|| ".".into());
    let module = first.rsplit('/').next().unwrap_or(&first).trim_end_matches(".py").to_string();
    let mut r = vec![
        call(
            &format!("The issue points at `{module}`. Let me find where it is defined."),
            "bash",
            json!({"command": format!("grep -rn \"def \" {first} | head -40")}),
        ),
        call("Let me read the file.", "str_replace_editor", json!({"command": "view", "path": first})),
        call(
            "Let me run the existing tests to see the current state.",
            "bash",
            json!({"command": "python3 -m pytest -q -x 2>&1 | tail -15"}),
        ),
        call(
            "I see the code but I am not sure which part causes the reported behaviour.",
            "ask_expert",
            json!({"query": format!(
                "The issue says: {}. I read {first} and ran the tests. Which function is wrong, and what should change?",
                task.problem_statement.lines().next().unwrap_or("").trim()
            )}),
        ),
    ];
    for (file, old, new) in hunk_edits(&task.patch) {
        r.push(call(
            &format!("Following the advice, I will fix `{file}`."),
            "str_replace_editor",
            json!({"command": "str_replace", "path": file, "old_str": old, "new_str": new}),
        ));
    }
    r.push(call(
        "Now let me check that the tests pass.",
        "bash",
        json!({"command": "python3 -m pytest -q 2>&1 | tail -15"}),
    ));
    r.push(call("The fix is in place and the tests pass.", "submit", json!({})));
    r
}

/// The teacher as a policy.
pub struct ScriptedTeacher {
    replay: Replay,
}

impl ScriptedTeacher {
    pub fn new(task: &TaskInstance) -> Self {
        Self { replay: Replay::new(plan(task)) }
    }
}

impl Policy for ScriptedTeacher {
    fn name(&self) -> String {
        "scripted-teacher".into()
    }

    fn act(&mut self, messages: &[Message], tools: &[Value]) -> Result<PolicyTurn> {
        self.replay.act(messages, tools)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hunks_become_unique_replacements() {
        let patch = "diff --git a/p/m.py b/p/m.py\n--- a/p/m.py\n+++ b/p/m.py\n@@ -1,3 +1,3 @@ def f():\n a = 1\n-b = a - 1\n+b = a + 1\n c = b\n";
        let e = hunk_edits(patch);
        assert_eq!(e, vec![("p/m.py".into(), "a = 1\nb = a - 1\nc = b\n".into(), "a = 1\nb = a + 1\nc = b\n".into())]);
    }
}
