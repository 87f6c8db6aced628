//! Chat templates as model directories hold them (Jinja), rendered with minijinja the way
//! transformers' `apply_chat_template` renders them with jinja2, and the attribution of every
//! rendered byte to the template or to the body of a message.
//!
//! **Where the template comes from**, as transformers looks for it: `chat_template.jinja` in the
//! model directory, else `chat_template` in its `tokenizer_config.json` (a string, or a list of
//! `{name, template}`: the one named "tool_use" when tools are given and the list has it, else
//! "default"). A directory with neither gets Qwen2.5's template ([`QWEN25`]).
//!
//! **Rendering** gives the template what transformers gives it: `messages` (each message as
//! JSON, fields that are `null` left out, tool-call arguments as objects), `tools` (none when
//! there are none), `documents` (none), `add_generation_prompt`, and the special tokens of
//! `tokenizer_config.json` (`bos_token`, `eos_token`, ...); the functions `raise_exception` and
//! `strftime_now`; a `tojson` filter that writes like Python's `json.dumps(ensure_ascii=False)`
//! with its `indent`, `separators` and `sort_keys`; Python's string, dict and list methods
//! (`.strip()`, `.split()`, `.items()`, ...); `trim_blocks` and `lstrip_blocks`, and the
//! template's final newline dropped.
//!
//! **Attribution** ([`ChatTemplate::render_attributed`]) renders prefixes of the conversation:
//! the first `k` messages end where the rendering of `messages[..k]` stops agreeing with the
//! rendering of the whole conversation, so message `k` owns the text between two such ends (its
//! part). An assistant message's body starts where its generation prompt (`messages[..k]`
//! rendered with `add_generation_prompt`) stops agreeing, and ends after the last end-of-turn
//! token of its part (`<|im_end|>`; what follows, such as the newline, is the template's). The
//! body of another message is its content where it appears in its part (the last occurrence that
//! splits no added token such as `<|im_end|>`), or nothing when the template changed it. Ends
//! never fall inside an added token.
//!
//! Templates that render a message differently once more messages follow (Qwen3 writes an
//! empty thinking block into the last assistant turn only) are handled by rendering the prefix
//! again with a user message after it. When an assistant message with content still gets no
//! body, attribution fails naming the message; rendering alone (prompts) works with any template.
//! Attribution costs about one rendering per message and two per assistant message, each of the
//! conversation so far: quadratic in the conversation's length (see the README for timings).

use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value as J, ValueKind};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde_json::Value;

use crate::chat::{Message, Role};

/// Qwen2.5's chat template (Qwen2.5-*-Instruct's `tokenizer_config.json`): the template of
/// model directories that have none.
pub const QWEN25: &str = include_str!("qwen25_chat_template.jinja");

const DEFAULT: &str = "default";
const TOOL_USE: &str = "tool_use";

/// The special tokens transformers passes to templates (its `special_tokens_map`).
const SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// The most instructions one rendering may execute.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (file and field), for errors.
    origin: String,
    has_tool_use: bool,
    /// `bos_token`, `eos_token`, ... as the template sees them.
    special_tokens: Vec<(String, String)>,
}

/// Where one message lies in a rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSpan {
    /// Everything the message added to the rendering (headers, separators, its body).
    pub part: Range<usize>,
    /// The message's own text within `part`; for an assistant message what it produced, up to
    /// and including its end-of-turn token. Empty when nothing could be attributed.
    pub body: Range<usize>,
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in errors (a syntax error gives its line).
    pub fn new(source: &str, origin: &str) -> Result<Self> {
        Self::from_named(vec![(DEFAULT.to_string(), source.to_string())], origin)
    }

    fn from_named(templates: Vec<(String, String)>, origin: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| anyhow!("minijinja syntax config: {e}"))?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template comes with a model, from anyone: bound its work so that one cannot hang
        // training or the server (a 75-step conversation takes well under 1% of this).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let mut has_tool_use = false;
        for (name, source) in templates {
            has_tool_use |= name == TOOL_USE;
            let what = if name == DEFAULT { String::new() } else { format!(" \"{name}\"") };
            env.add_template_owned(name, source.clone()).map_err(|e| {
                let line = e.line().and_then(|l| source.lines().nth(l.saturating_sub(1))).unwrap_or("");
                anyhow!("{origin}: the chat template{what} does not compile: {}\n    {}", describe(&e), line.trim())
            })?;
        }
        Ok(Self { env, origin: origin.to_string(), has_tool_use, special_tokens: vec![] })
    }

    /// The template of the model directory `dir` with the special tokens of its
    /// `tokenizer_config.json`, or `None` when the directory has no template.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<Value> = if config_path.exists() {
            let text =
                std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
            Some(crate::inputs::json_file(&text, &config_path.display().to_string())?)
        } else {
            None
        };
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.exists() {
            let source = std::fs::read_to_string(&jinja).with_context(|| format!("reading {}", jinja.display()))?;
            Self::new(&source, &jinja.display().to_string())?
        } else {
            let origin = format!("{} (chat_template)", config_path.display());
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(source)) => Self::new(source, &origin)?,
                Some(Value::Array(list)) => Self::from_named(named_templates(list, &origin)?, &origin)?,
                Some(other) => bail!(
                    "{origin}: expected a string or a list of {{\"name\", \"template\"}}, found {}",
                    json_kind(other)
                ),
            }
        };
        Ok(Some(template.with_special_tokens(config.as_ref().map(special_tokens).unwrap_or_default())))
    }

    /// Sets the special tokens the template sees (`("eos_token", "<|im_end|>")`, ...).
    pub fn with_special_tokens(mut self, tokens: Vec<(String, String)>) -> Self {
        self.special_tokens = tokens;
        self
    }

    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The rendering of `messages` with `tools` offered, as transformers writes it.
    pub fn render(&self, messages: &[Message], tools: &[Value], add_generation_prompt: bool) -> Result<String> {
        let values: Vec<J> = messages.iter().map(message_value).collect();
        self.render_values(&values, &tools_value(tools), add_generation_prompt)
    }

    fn render_values(&self, messages: &[J], tools: &J, add_generation_prompt: bool) -> Result<String> {
        let name = if self.has_tool_use && !tools.is_none() { TOOL_USE } else { DEFAULT };
        let template = self.env.get_template(name).map_err(|e| anyhow!("{}: {e}", self.origin))?;
        let mut ctx: Vec<(&str, J)> =
            self.special_tokens.iter().map(|(k, v)| (k.as_str(), J::from(v.as_str()))).collect();
        ctx.push(("messages", J::from(messages.to_vec())));
        ctx.push(("tools", tools.clone()));
        ctx.push(("documents", J::from(())));
        ctx.push(("add_generation_prompt", J::from(add_generation_prompt)));
        template
            .render(J::from_pairs(ctx))
            .map_err(|e| anyhow!("{}: rendering the chat template failed: {}", self.origin, describe(&e)))
    }

    /// Renders `messages` and finds the part and body of `messages[first..]` in the text (see
    /// the module documentation); earlier messages get empty spans. `end_of_turn` are the
    /// tokens that close an assistant turn (`<|im_end|>`), `markers` the tokenizer's added
    /// tokens (never split by a message's content).
    pub fn render_attributed(
        &self,
        messages: &[Message],
        tools: &[Value],
        add_generation_prompt: bool,
        first: usize,
        end_of_turn: &[String],
        markers: &[String],
    ) -> Result<(String, Vec<MessageSpan>)> {
        let values: Vec<J> = messages.iter().map(message_value).collect();
        let tools = tools_value(tools);
        let render = |msgs: &[J], gen: bool| self.render_values(msgs, &tools, gen);
        let text = render(&values, add_generation_prompt)?;
        let marks = occurrences(&text, markers);
        let n = messages.len();
        let mut spans = vec![MessageSpan { part: 0..0, body: 0..0 }; first.min(n)];
        // Where a rendering stops agreeing with `text`, never inside an added token.
        let agree = |other: &str| unsplit(common_prefix(other, &text), &marks);
        let mut start = if first == 0 { 0 } else { agree(&render(&values[..first.min(n)], false)?) };
        for (k, m) in messages.iter().enumerate().skip(first) {
            let whole = k + 1 == n && !add_generation_prompt;
            let (mut end, clean) = if whole {
                (text.len(), true)
            } else {
                let prefix = render(&values[..=k], false)?;
                let end = agree(&prefix);
                (end, end == prefix.len())
            };
            end = end.max(start);
            let body = if m.role == Role::Assistant {
                if !clean {
                    // Rendered differently as the last message: ask again with one after it.
                    let mut probe = values[..=k].to_vec();
                    probe.push(message_value(&Message::user("?")));
                    end = agree(&render(&probe, false)?).max(end);
                }
                let from = agree(&render(&values[..k], true)?).clamp(start, end);
                let body = from..turn_end(&text, from..end, end_of_turn);
                let produced = !m.text().trim().is_empty() || !m.tool_calls.is_empty();
                if body.is_empty() && produced {
                    bail!(
                        "{}: cannot tell which tokens message {k} (assistant) produced: the chat template renders \
                         the conversation's first {} messages differently from how it renders them within the \
                         whole conversation",
                        self.origin,
                        k + 1
                    );
                }
                body
            } else {
                find_content(&text, start..end, m.text(), &marks).unwrap_or(end..end)
            };
            spans.push(MessageSpan { part: start..end, body });
            start = end;
        }
        Ok((text, spans))
    }
}

/// The templates of a `chat_template` list (`[{"name": ..., "template": ...}]`).
fn named_templates(list: &[Value], origin: &str) -> Result<Vec<(String, String)>> {
    let mut out = vec![];
    for (i, item) in list.iter().enumerate() {
        let name = item.get("name").and_then(Value::as_str);
        let template = item.get("template").and_then(Value::as_str);
        match (name, template) {
            (Some(n), Some(t)) => out.push((n.to_string(), t.to_string())),
            _ => bail!("{origin}: item {i} is not {{\"name\": string, \"template\": string}}"),
        }
    }
    if !out.iter().any(|(n, _)| n == DEFAULT) {
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        bail!("{origin}: the list of templates has none named \"default\" (it has {names:?})");
    }
    Ok(out)
}

/// The special tokens of a `tokenizer_config.json` (a string or an `{"content": ...}` object).
fn special_tokens(config: &Value) -> Vec<(String, String)> {
    SPECIAL_TOKENS
        .iter()
        .filter_map(|&key| {
            let v = config.get(key)?;
            let token = v.as_str().or_else(|| v.get("content").and_then(Value::as_str))?;
            Some((key.to_string(), token.to_string()))
        })
        .collect()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A message as transformers hands it to templates: its JSON without `null` fields, tool-call
/// arguments as objects (OpenAI's JSON strings parsed).
fn message_value(m: &Message) -> J {
    let mut v = serde_json::to_value(m).expect("a message serialises to JSON");
    if let Value::Object(o) = &mut v {
        o.retain(|_, x| !x.is_null());
        if let Some(Value::Array(calls)) = o.get_mut("tool_calls") {
            for (c, call) in calls.iter_mut().zip(&m.tool_calls) {
                c["function"]["arguments"] = call.arguments();
            }
        }
    }
    to_jinja(&v)
}

fn tools_value(tools: &[Value]) -> J {
    if tools.is_empty() {
        J::from(())
    } else {
        J::from(tools.iter().map(to_jinja).collect::<Vec<_>>())
    }
}

fn to_jinja(v: &Value) -> J {
    match v {
        Value::Null => J::from(()),
        Value::Bool(b) => J::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => J::from(i),
            (_, Some(u)) => J::from(u),
            _ => J::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => J::from(s.as_str()),
        Value::Array(a) => J::from(a.iter().map(to_jinja).collect::<Vec<_>>()),
        Value::Object(o) => J::from_pairs(o.iter().map(|(k, v)| (k.as_str(), to_jinja(v)))),
    }
}

fn to_json(v: &J) -> Result<Value, JError> {
    Ok(match v.kind() {
        ValueKind::Undefined | ValueKind::None => Value::Null,
        ValueKind::Bool => Value::Bool(v.is_true()),
        ValueKind::Number if v.is_integer() => match v.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(u64::try_from(v.clone())?),
        },
        ValueKind::Number => serde_json::Number::from_f64(f64::try_from(v.clone())?).map_or(Value::Null, Value::Number),
        ValueKind::String => Value::String(v.as_str().unwrap_or_default().to_string()),
        ValueKind::Seq | ValueKind::Iterable => {
            Value::Array(v.try_iter()?.map(|x| to_json(&x)).collect::<Result<_, _>>()?)
        }
        ValueKind::Map => {
            let mut o = serde_json::Map::new();
            for key in v.try_iter()? {
                let item = to_json(&v.get_item(&key)?)?;
                o.insert(key.as_str().map_or_else(|| key.to_string(), str::to_string), item);
            }
            Value::Object(o)
        }
        _ => Value::String(v.to_string()),
    })
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` (not jinja2's, which escapes HTML characters).
fn tojson(value: J, kwargs: Kwargs) -> Result<String, JError> {
    let indent: Option<J> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_str(), v.as_usize()) {
            (Some(s), _) => Some(s.to_string()),
            (_, Some(n)) => Some(" ".repeat(n)),
            _ => return Err(JError::new(ErrorKind::InvalidOperation, "tojson: indent must be a number or a string")),
        },
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(JError::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    json.write(&to_json(&value)?, 0, &mut out);
    Ok(out)
}

/// Python's `json.dumps` layout.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, v: &Value, level: usize, out: &mut String) {
        match v {
            Value::Array(a) if a.is_empty() => out.push_str("[]"),
            Value::Object(o) if o.is_empty() => out.push_str("{}"),
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    self.separate(i, level + 1, out);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            Value::Object(o) => {
                out.push('{');
                let mut entries: Vec<(&String, &Value)> = o.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    self.separate(i, level + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key_sep);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
            Value::String(s) => self.string(s, out),
            other => out.push_str(&other.to_string()),
        }
    }

    fn separate(&self, i: usize, level: usize, out: &mut String) {
        if i > 0 {
            out.push_str(&self.item_sep);
        }
        self.newline(level, out);
    }

    fn newline(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        // serde_json escapes what Python does: quote, backslash and control characters.
        let quoted = serde_json::to_string(s).expect("a string serialises");
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
}

fn raise_exception(message: String) -> Result<J, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, format!("the template raised an exception: {message}")))
}

/// Python's `datetime.now().strftime(format)` (C's strftime, as CPython's on Linux).
fn strftime_now(format: String) -> Result<String, JError> {
    let bad = |what: &str| JError::new(ErrorKind::InvalidOperation, format!("strftime_now: {what}"));
    let c_format = std::ffi::CString::new(format.clone()).map_err(|_| bad("the format holds a NUL byte"))?;
    // SAFETY: `tm` is written by localtime_r before strftime reads it; `buf` outlives the call
    // and strftime writes at most `buf.len()` bytes.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad("no local time"));
        }
        let mut buf = vec![0u8; 256 + 16 * format.len()];
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_format.as_ptr(), &tm);
        buf.truncate(n);
        String::from_utf8(buf).map_err(|_| bad("the result is not UTF-8"))
    }
}

/// A minijinja error in one line: what, where, why.
fn describe(e: &JError) -> String {
    let mut s = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        s = format!("line {line}: {s}");
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Length of the common prefix of `a` and `b`, at a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    (0..=n).rev().find(|&i| a.is_char_boundary(i)).unwrap_or(0)
}

/// `pos`, or the start of the marker it falls inside.
fn unsplit(pos: usize, marks: &[Range<usize>]) -> usize {
    let i = marks.partition_point(|m| m.end <= pos);
    marks[i..].iter().take_while(|m| m.start < pos).map(|m| m.start).min().unwrap_or(pos)
}

/// Where an assistant's turn ends within `range`: after the last end-of-turn token, else at
/// the end of the range.
fn turn_end(text: &str, range: Range<usize>, end_of_turn: &[String]) -> usize {
    let part = &text[range.clone()];
    end_of_turn
        .iter()
        .filter(|t| !t.is_empty())
        .filter_map(|t| part.rfind(t.as_str()).map(|i| range.start + i + t.len()))
        .max()
        .unwrap_or(range.end)
}

/// Byte ranges of every occurrence of `markers` in `text`, by start.
fn occurrences(text: &str, markers: &[String]) -> Vec<Range<usize>> {
    let mut v: Vec<Range<usize>> = markers
        .iter()
        .filter(|m| !m.is_empty())
        .flat_map(|m| text.match_indices(m.as_str()).map(|(i, s)| i..i + s.len()))
        .collect();
    v.sort_by_key(|r| (r.start, r.end));
    v
}

/// The last occurrence of `content` (or of it trimmed) in `range` that splits no marker (a
/// marker inside the content is the content's).
fn find_content(text: &str, range: Range<usize>, content: &str, marks: &[Range<usize>]) -> Option<Range<usize>> {
    let overlaps = |r: &Range<usize>| {
        let first = marks.partition_point(|m| m.end <= r.start);
        marks[first..].iter().take_while(|m| m.start < r.end).any(|m| m.start < r.start || m.end > r.end)
    };
    let part = &text[range.clone()];
    [content, content.trim()].into_iter().filter(|c| !c.is_empty()).find_map(|c| {
        let found: Vec<Range<usize>> =
            part.match_indices(c).map(|(i, _)| range.start + i..range.start + i + c.len()).collect();
        found.into_iter().rev().find(|r| !overlaps(r))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_template_that_never_ends_is_stopped() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "slow.jinja",
        )
        .unwrap();
        let e = format!("{:#}", t.render(&[crate::chat::Message::user("hi")], &[], true).unwrap_err());
        assert!(e.contains("fuel"), "{e}");
    }

    fn render(source: &str, ctx: Value) -> Result<String> {
        let t = ChatTemplate::new(source, "test.jinja")?;
        let template = t.env.get_template(DEFAULT)?;
        template.render(to_jinja(&ctx)).map_err(|e| anyhow!("{}", describe(&e)))
    }

    #[test]
    fn tojson_writes_like_python() {
        let ctx = json!({"x": {"b": [1, 2.5, null, true], "a": "é\n\"<q>\""}});
        assert_eq!(
            render("{{ x | tojson }}", ctx.clone()).unwrap(),
            r#"{"b": [1, 2.5, null, true], "a": "é\n\"<q>\""}"#
        );
        assert_eq!(
            render("{{ x | tojson(indent=2, sort_keys=true) }}", ctx.clone()).unwrap(),
            "{\n  \"a\": \"é\\n\\\"<q>\\\"\",\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}"
        );
        assert_eq!(
            render("{{ x.b | tojson(separators=(',', ':')) }}{{ x.a | tojson(ensure_ascii=true) }}", ctx).unwrap(),
            r#"[1,2.5,null,true]"\u00e9\n\"<q>\"""#
        );
    }

    #[test]
    fn python_methods_and_whitespace_control() {
        let ctx = json!({"s": "  a,b  ", "d": {"k": 1}});
        let out = render(
            "{% if s.strip().startswith('a') %}\n  {{ s.strip().split(',') | join('+') }}\n{% endif %}\n{% for k, v in d.items() %}{{ k }}={{ v }}{% endfor %}\n",
            ctx,
        )
        .unwrap();
        assert_eq!(out, "  a+b\nk=1");
        let year = render("{{ strftime_now('%Y') }}", json!({})).unwrap();
        assert!(year.len() == 4 && year.starts_with("20"), "{year}");
    }

    #[test]
    fn errors_name_the_template_and_line() {
        let e = ChatTemplate::new("hello\n{% if x %}\n{{ y }", "model/chat_template.jinja").err().unwrap().to_string();
        assert!(e.starts_with("model/chat_template.jinja: the chat template does not compile: line 3"), "{e}");
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "model/chat_template.jinja").unwrap();
        let e = t.render(&[Message::user("hi")], &[], false).unwrap_err().to_string();
        assert_eq!(
            e,
            "model/chat_template.jinja: rendering the chat template failed: line 1: invalid operation: the template \
             raised an exception: roles must alternate"
        );
    }

    #[test]
    fn content_is_found_outside_markers() {
        let text = "<|im_start|>user\nend<|im_end|>\n";
        let marks = occurrences(text, &["<|im_start|>".into(), "<|im_end|>".into()]);
        assert_eq!(find_content(text, 0..text.len(), "end", &marks), Some(17..20));
        assert_eq!(find_content(text, 0..text.len(), " user ", &marks), Some(12..16));
        assert_eq!(find_content(text, 0..text.len(), "absent", &marks), None);
        let text = "<|im_start|>user\nsay <|im_end|> twice<|im_end|>\n";
        let marks = occurrences(text, &["<|im_start|>".into(), "<|im_end|>".into()]);
        assert_eq!(find_content(text, 0..text.len(), "say <|im_end|> twice", &marks), Some(17..37));
        assert_eq!(unsplit(14, &marks), 14);
        assert_eq!(unsplit(3, &marks), 0);
        assert_eq!(unsplit(12, &marks), 12);
    }
}
