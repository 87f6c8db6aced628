//! The agent's tools (SWE-agent conventions) and the one tool call each reply must make (read
//! by [`super::toolcall`]).
//!
//! `bash` runs a stateless command in the repository root; `str_replace_editor` views, creates
//! and edits files (paths confined to the work tree, with undo); `ask_expert` sends a free-text
//! query to the expert; `submit` ends the episode with the work tree's diff as the patch.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use serde_json::{json, Value};

use super::loops::Action;
use super::toolcall::{coerce_arguments, parse_reply, CallForm, CANONICAL};
use crate::chat::ToolCall;
use crate::sandbox::{agent_path, shell_quote, PathKind, Workspace};

/// The same four tools with one-line descriptions and bare parameters: for small models with
/// short contexts (the full definitions take ~2000 tokens of a byte-level test tokenizer).
pub fn compact_tool_specs() -> Vec<Value> {
    let function = |name: &str, description: &str, properties: Value, required: &[&str]| {
        json!({"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required}}})
    };
    vec![
        function("bash", "Run a shell command.", json!({"command": {"type": "string"}}), &["command"]),
        function(
            "str_replace_editor",
            "View, create or edit a file.",
            json!({"command": {"type": "string"}, "path": {"type": "string"}, "old_str": {"type": "string"},
                   "new_str": {"type": "string"}, "file_text": {"type": "string"}}),
            &["command", "path"],
        ),
        function("ask_expert", "Ask the expert for help.", json!({"query": {"type": "string"}}), &["query"]),
        function("submit", "Submit the fix.", json!({}), &[]),
    ]
}

/// The function definitions given to the model (OpenAI / Qwen2.5 tool format).
pub fn tool_specs(workdir: &str) -> Vec<Value> {
    let function = |name: &str, description: String, properties: Value, required: &[&str]| {
        json!({"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required}}})
    };
    vec![
        function(
            "bash",
            format!(
                "Run a bash command in the repository root ({workdir}). Each call starts a fresh shell (no state \
                 is kept between calls); there is no network and no interactive input; long outputs are cut."
            ),
            json!({"command": {"type": "string", "description": "The command to run."}}),
            &["command"],
        ),
        function(
            "str_replace_editor",
            "View, create and edit files. `view` shows a file with line numbers (optionally a `view_range` \
             [start, end], end -1 for the end of the file) or lists a directory two levels deep. `create` writes \
             a new file. `str_replace` replaces `old_str`, which must occur exactly once, with `new_str`. `insert` \
             adds `new_str` after line `insert_line` (0 for the top). `undo_edit` reverts the last edit of a file."
                .into(),
            json!({
                "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"]},
                "path": {"type": "string", "description": format!("A path in the repository, absolute ({workdir}/...) or relative to it.")},
                "file_text": {"type": "string"},
                "old_str": {"type": "string"},
                "new_str": {"type": "string"},
                "insert_line": {"type": "integer"},
                "view_range": {"type": "array", "items": {"type": "integer"}}
            }),
            &["command", "path"],
        ),
        function(
            "ask_expert",
            "Ask a stronger expert model for guidance when you are stuck or unsure how to proceed. The expert sees \
             your question and the last few messages of this conversation. Calls are limited: ask specific \
             questions, and follow the advice you get."
                .into(),
            json!({"query": {"type": "string", "description": "What you need help with, with the relevant context."}}),
            &["query"],
        ),
        function(
            "submit",
            "Submit your changes to the repository as the final fix. Ends the task.".into(),
            json!({}),
            &[],
        ),
    ]
}

/// The one tool call of a model reply, in any form [`super::toolcall`] accepts (the Qwen2.5
/// `<tool_call>` block is the canonical one), with the text before it and the form it was
/// written in. String arguments take the types `tools` declare for them. An error is the
/// message for the model: a malformed or ambiguous call, no call, or more than one.
pub fn parse_tool_call(text: &str, tools: &[Value]) -> std::result::Result<(String, ToolCall, CallForm), String> {
    let reply = parse_reply(text)?;
    let (Some(form), [call]) = (reply.form, reply.calls.as_slice()) else {
        return Err(match reply.calls.len() {
            0 => format!("Your reply has no tool call. Every reply must end with exactly one call:\n{CANONICAL}"),
            n => format!(
                "Your reply has {n} tool calls. Make exactly one call per reply; you will see its result before \
                 the next:\n{CANONICAL}"
            ),
        });
    };
    let mut call = call.clone();
    coerce_arguments(&mut call, tools);
    Ok((reply.content, ToolCall::new(&call.name, call.arguments), form))
}

/// What a tool call asks the harness to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Bash(String),
    Editor(Value),
    AskExpert(String),
    Submit,
}

impl Request {
    /// Checks the call's name and arguments; an error is the message for the model.
    pub fn from_call(call: &ToolCall) -> std::result::Result<Self, String> {
        let args = call.arguments();
        let string = |k: &str| {
            args.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or(format!("`{}` needs a string argument \"{k}\".", call.function.name))
        };
        match call.function.name.as_str() {
            "bash" => Ok(Request::Bash(string("command")?)),
            "str_replace_editor" => {
                string("command")?;
                string("path")?;
                Ok(Request::Editor(args))
            }
            "ask_expert" => Ok(Request::AskExpert(string("query")?)),
            "submit" => Ok(Request::Submit),
            other => {
                Err(format!("Unknown tool {other:?}. The tools are bash, str_replace_editor, ask_expert and submit."))
            }
        }
    }

    /// The action as the loop detector sees it.
    pub fn action(&self) -> Action {
        match self {
            Request::Bash(c) => Action::Bash { command: c.clone() },
            Request::Editor(a) => {
                Action::Editor { command: a.get("command").and_then(Value::as_str).unwrap_or("").to_string() }
            }
            Request::AskExpert(_) => Action::AskExpert,
            Request::Submit => Action::Submit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_must_hold_exactly_one_tool_call_in_any_accepted_form() {
        let tools = tool_specs("/repo");
        let parse = |text: &str| parse_tool_call(text, &tools);
        let (thought, call, form) =
            parse("Look.\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls\"}}\n</tool_call>")
                .unwrap();
        assert_eq!((thought.as_str(), call.function.name.as_str(), form), ("Look.", "bash", CallForm::Tagged));
        assert_eq!(call.arguments()["command"], "ls");
        let bare = "I will list. {\"name\": \"bash\", \"arguments\": {\"command\": \"ls\"}}";
        let (thought, call, form) = parse(bare).unwrap();
        assert_eq!(
            (thought.as_str(), call.arguments()["command"].as_str(), form),
            ("I will list.", Some("ls"), CallForm::BareJson)
        );
        // Text values of the function form take the editor's types.
        let insert =
            "<function=str_replace_editor><parameter=command>insert</parameter><parameter=path>a.py</parameter>\
                      <parameter=insert_line>2</parameter><parameter=new_str>x = 1</parameter></function>";
        let (_, call, form) = parse(insert).unwrap();
        assert_eq!((call.arguments()["insert_line"].clone(), form), (json!(2), CallForm::FunctionTag));
        assert!(parse("```python\nprint(1)\n```").unwrap_err().contains("no tool call"));
        let ls = "<tool_call>{\"name\": \"bash\", \"arguments\": {\"command\": \"ls\"}}</tool_call>";
        assert!(parse(&format!("{ls}\n{ls}")).unwrap_err().contains("2 tool calls"));
        assert!(parse("<tool_call>{\"arguments\": {}}</tool_call>").unwrap_err().contains("name"));
    }
}

/// `str_replace_editor` with its undo history.
#[derive(Default)]
pub struct Editor {
    /// Per file, its contents before each edit (`None`: it did not exist).
    history: HashMap<PathBuf, Vec<Option<Vec<u8>>>>,
}

const SNIPPET_CONTEXT: usize = 4;

fn numbered(text: &str, first_line: usize) -> String {
    text.lines().enumerate().map(|(i, l)| format!("{:6}\t{l}\n", first_line + i)).collect()
}

impl Editor {
    /// Runs one editor command. `Ok` is the observation; `Err` an error message for the model
    /// (the episode continues either way). Harness failures are `Result` errors.
    pub fn run(&mut self, exec: &dyn Workspace, args: &Value) -> Result<std::result::Result<String, String>> {
        let s = |k: &str| args.get(k).and_then(Value::as_str);
        let command = s("command").unwrap_or("");
        let given = s("path").unwrap_or("");
        let workdir = exec.workdir();
        let rel = match agent_path(&workdir, given) {
            Ok(r) => r,
            Err(e) => return Ok(Err(format!("Refused: {e}."))),
        };
        let shown = if rel.as_os_str().is_empty() { workdir.clone() } else { format!("{workdir}/{}", rel.display()) };
        let kind = match exec.kind(&rel) {
            Ok(k) => k,
            Err(e) => return Ok(Err(format!("Refused: {e}."))),
        };
        let read_text = |exec: &dyn Workspace| -> Result<std::result::Result<String, String>> {
            match kind {
                PathKind::File => match exec.read(&rel) {
                    Ok(bytes) => Ok(String::from_utf8(bytes).map_err(|_| format!("{shown} is not UTF-8 text."))),
                    Err(e) => Ok(Err(format!("Cannot read {shown}: {e:#}."))),
                },
                PathKind::Dir => Ok(Err(format!("{shown} is a directory."))),
                PathKind::Missing => Ok(Err(format!("{shown} does not exist."))),
            }
        };
        Ok(match command {
            "view" => {
                if kind == PathKind::Dir {
                    let q = shell_quote(&shown);
                    let listing = exec.run(&format!(
                        "cd {q} && find . -mindepth 1 -maxdepth 2 -not -path '*/.*' | sort | sed \"s|^\\./|$(pwd)/|\""
                    ))?;
                    return Ok(Ok(format!(
                        "Files and directories up to 2 levels deep in {shown}:\n{}",
                        listing.output
                    )));
                }
                let text = match read_text(exec)? {
                    Ok(t) => t,
                    Err(e) => return Ok(Err(e)),
                };
                let lines: Vec<&str> = text.lines().collect();
                let (mut start, mut end) = (1usize, lines.len());
                if let Some(r) = args.get("view_range") {
                    let r: Option<Vec<i64>> = serde_json::from_value(r.clone()).ok();
                    match r.as_deref() {
                        Some(&[a, b]) if a >= 1 && (a as usize) <= lines.len().max(1) && (b == -1 || b >= a) => {
                            start = a as usize;
                            if b != -1 {
                                end = (b as usize).min(lines.len());
                            }
                        }
                        _ => {
                            return Ok(Err(format!(
                                "Invalid view_range {r:?}: expected [start, end] with 1 <= start <= {} and end >= start or -1.",
                                lines.len()
                            )))
                        }
                    }
                }
                let body = lines.get(start - 1..end).unwrap_or(&[]).join("\n");
                Ok(format!("Here's the result of running `cat -n` on {shown}:\n{}", numbered(&body, start)))
            }
            "create" => {
                let Some(text) = s("file_text") else { return Ok(Err("`create` needs \"file_text\".".into())) };
                if kind != PathKind::Missing {
                    return Ok(Err(format!("{shown} already exists; edit it with `str_replace` instead.")));
                }
                if let Err(e) = exec.write(&rel, text.as_bytes()) {
                    return Ok(Err(format!("Cannot create {shown}: {e:#}.")));
                }
                self.history.entry(rel.clone()).or_default().push(None);
                Ok(format!("File created at {shown}."))
            }
            "str_replace" => {
                let Some(old) = s("old_str") else { return Ok(Err("`str_replace` needs \"old_str\".".into())) };
                let new = s("new_str").unwrap_or("");
                let text = match read_text(exec)? {
                    Ok(t) => t,
                    Err(e) => return Ok(Err(e)),
                };
                let hits: Vec<usize> = text.match_indices(old).map(|(i, _)| i).collect();
                if old.is_empty() || hits.is_empty() {
                    return Ok(Err(format!(
                        "No replacement was performed: old_str did not appear verbatim in {shown}."
                    )));
                }
                if hits.len() > 1 {
                    let lines: Vec<usize> = hits.iter().map(|&i| text[..i].matches('\n').count() + 1).collect();
                    return Ok(Err(format!(
                        "No replacement was performed: old_str occurs {} times (lines {lines:?}). Include more context \
                         so that it is unique.",
                        hits.len()
                    )));
                }
                let updated = format!("{}{new}{}", &text[..hits[0]], &text[hits[0] + old.len()..]);
                if let Err(e) = self.save(exec, &rel, text.as_bytes(), updated.as_bytes()) {
                    return Ok(Err(format!("Cannot write {shown}: {e:#}.")));
                }
                let first = text[..hits[0]].matches('\n').count() + 1;
                Ok(format!("The file {shown} has been edited. {}", snippet(&updated, first, new.lines().count())))
            }
            "insert" => {
                let Some(new) = s("new_str") else { return Ok(Err("`insert` needs \"new_str\".".into())) };
                let text = match read_text(exec)? {
                    Ok(t) => t,
                    Err(e) => return Ok(Err(e)),
                };
                // Lines keep their own endings (LF or CRLF); the new text takes the file's.
                let lines: Vec<&str> = text.split_inclusive('\n').collect();
                let at = match args.get("insert_line").and_then(Value::as_i64) {
                    Some(n) if n >= 0 && (n as usize) <= lines.len() => n as usize,
                    _ => return Ok(Err(format!("`insert` needs \"insert_line\" between 0 and {}.", lines.len()))),
                };
                let eol = if text.contains("\r\n") { "\r\n" } else { "\n" };
                let mut updated: String = lines[..at].concat();
                if !updated.is_empty() && !updated.ends_with('\n') {
                    updated.push_str(eol);
                }
                for l in new.lines() {
                    updated.push_str(l);
                    updated.push_str(eol);
                }
                updated.push_str(&lines[at..].concat());
                if let Err(e) = self.save(exec, &rel, text.as_bytes(), updated.as_bytes()) {
                    return Ok(Err(format!("Cannot write {shown}: {e:#}.")));
                }
                Ok(format!("The file {shown} has been edited. {}", snippet(&updated, at + 1, new.lines().count())))
            }
            "undo_edit" => match self.history.get_mut(&rel).and_then(Vec::pop) {
                Some(previous) => {
                    let done = match &previous {
                        Some(bytes) => exec.write(&rel, bytes),
                        None => exec.remove(&rel),
                    };
                    match done {
                        Ok(()) => Ok(format!("Last edit to {shown} undone.")),
                        Err(e) => Err(format!("Cannot undo the last edit to {shown}: {e:#}.")),
                    }
                }
                None => Err(format!("No edit to undo for {shown}.")),
            },
            other => {
                Err(format!("Unknown editor command {other:?}: use view, create, str_replace, insert or undo_edit."))
            }
        })
    }

    fn save(&mut self, exec: &dyn Workspace, rel: &std::path::Path, old: &[u8], new: &[u8]) -> Result<()> {
        exec.write(rel, new)?;
        self.history.entry(rel.to_path_buf()).or_default().push(Some(old.to_vec()));
        Ok(())
    }
}

/// The edited region with a few lines of context, numbered.
fn snippet(text: &str, first_changed: usize, changed: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = first_changed.saturating_sub(SNIPPET_CONTEXT).max(1);
    let end = (first_changed + changed.max(1) - 1 + SNIPPET_CONTEXT).min(lines.len());
    let body = lines.get(start - 1..end).unwrap_or(&[]).join("\n");
    format!(
        "Here's a snippet of the result:\n{}Review the changes and make sure they are as expected.",
        numbered(&body, start)
    )
}
