//! Tool calls in a model's reply text: one tolerant parser, shared by the agent harness and the
//! HTTP server.
//!
//! The canonical form is Qwen2.5's ([`CallForm::Tagged`]); small models often write the same call
//! in another form, and refusing those ends their episodes on format errors. Accepted:
//!
//! | form | example |
//! |---|---|
//! | `tagged` | `<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>`, one block or several |
//! | `tools_tag` | `<tools>{...}</tools>` or `<tools>[{...}, {...}]</tools>` |
//! | `function_tag` | `<function=bash><parameter=command>ls</parameter></function>` or `<function=bash>{"command": "ls"}</function>`, bare or inside `<tool_call>` (Qwen3-Coder) |
//! | `fenced` | a ```` ```json ```` (or plain ```` ``` ````) block holding one call object or a list of them |
//! | `bare_json` | `{"name": "bash", "arguments": {...}}` or a list of such objects, anywhere in the text |
//!
//! Rules, in the order they apply:
//! - Explicit markers (`<tool_call>`, `<tools>`, `<function=`) always introduce calls. A block
//!   runs to its closing tag; the last one may lack it at the end of the text. A block that
//!   opens another of its kind before closing is refused. Inside a block, the body is one JSON
//!   object, a list of objects, such JSON in a fence, or `<function=…>` elements; anything
//!   else (invalid JSON, no `"name"`) is refused. Keys other than `name`, `arguments` and
//!   `parameters` are ignored there.
//! - A fence or a bare JSON value is a call only when it has a call's shape: an object whose
//!   keys are `name` and at most `arguments` / `parameters` (bare objects must have one of
//!   the two), or a non-empty list of those. Other JSON (a `package.json`, a dict in prose) is
//!   text. A bare value is a top-level value: one nested in a larger JSON value is not looked
//!   at, nor is anything inside a fence or a tag block.
//! - Every call of a reply must be in one form: a fence and a tag, or a bare object and a tag,
//!   are refused as ambiguous. Fenced and bare calls are implicit, so a reply may hold only one
//!   such block or value (repeats of the same call count once); several calls in those forms
//!   come as one JSON list.
//! - A call's `name` must be a non-empty string. `parameters` is a synonym of `arguments` (both
//!   at once are refused); absent or `null` arguments are `{}`; arguments given as a string
//!   must hold a JSON object (the OpenAI wire form); anything else is refused.
//! - `<parameter=KEY>VALUE</parameter>` values are text (one newline is trimmed at each end);
//!   [`coerce_arguments`] converts them to the types a tool declares. The last `</parameter>`
//!   of an element may be missing.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// How a reply wrote its tool calls; [`CallForm::Tagged`] is the canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallForm {
    /// `<tool_call>{json}</tool_call>` (Qwen2.5, Hermes).
    Tagged,
    /// A fenced ```` ```json ```` block.
    Fenced,
    /// A JSON object or list in the text (Llama 3 JSON, Mistral's list).
    BareJson,
    /// `<tools>{json}</tools>`, the tag of the tool definitions in the prompt.
    ToolsTag,
    /// `<function=NAME>…</function>` (Qwen3-Coder, Llama), bare or inside `<tool_call>`.
    FunctionTag,
}

impl CallForm {
    /// The form the model is taught (and RL rewards).
    pub fn is_canonical(self) -> bool {
        self == CallForm::Tagged
    }

    fn describe(self) -> &'static str {
        match self {
            CallForm::Tagged => "a <tool_call> block",
            CallForm::Fenced => "a ```json block",
            CallForm::BareJson => "a bare JSON call",
            CallForm::ToolsTag => "a <tools> block",
            CallForm::FunctionTag => "a <function=...> element",
        }
    }
}

/// One tool call of a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// Always a JSON object.
    pub arguments: Value,
}

/// A reply split into its text and its tool calls.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedReply {
    /// The text before the first call, trimmed at its end; the whole text when there is no call.
    pub content: String,
    pub calls: Vec<ParsedCall>,
    /// The form of the calls; `None` when there is none.
    pub form: Option<CallForm>,
}

/// The canonical form, shown to the model with every refusal.
pub const CANONICAL: &str = "<tool_call>\n{\"name\": <tool name>, \"arguments\": <arguments object>}\n</tool_call>";

const TOOL_CALL: (&str, &str) = ("<tool_call>", "</tool_call>");
const TOOLS: (&str, &str) = ("<tools>", "</tools>");
const FUNCTION: (&str, &str) = ("<function=", "</function>");
const PARAMETER: (&str, &str) = ("<parameter=", "</parameter>");
const FENCE: &str = "```";
/// What can open a call in a stream; see [`hold_from`].
const MARKERS: [&str; 4] = [TOOL_CALL.0, TOOLS.0, FUNCTION.0, FENCE];

/// Splits a reply into its text and tool calls (see the module's rules). `Ok` with no calls
/// when the reply holds none; `Err` with a message for the model when it holds a malformed or
/// ambiguous call.
pub fn parse_reply(text: &str) -> Result<ParsedReply, String> {
    // Each finder skips what an earlier one took: a marker inside a call's JSON string is text.
    let mut found = blocks(text, TOOL_CALL, CallForm::Tagged, &[]);
    let tagged: Vec<Span> = found.iter().map(|f| f.span).collect();
    found.extend(blocks(text, TOOLS, CallForm::ToolsTag, &tagged));
    let tags: Vec<Span> = found.iter().map(|f| f.span).collect();
    found.extend(function_elements(text, &tags));
    let explicit: Vec<Span> = found.iter().map(|f| f.span).collect();
    let fences = fences(text, &explicit);
    for f in &fences {
        if let Some(v) = call_json(f.body(text), false) {
            found.push(Found { span: f.span, form: CallForm::Fenced, calls: calls_of(v) });
        }
    }
    let skipped: Vec<Span> = explicit.iter().copied().chain(fences.iter().map(|f| f.span)).collect();
    found.extend(bare_values(text, &skipped));
    found.sort_by_key(|f| f.span.start);

    let Some(first) = found.first() else {
        return Ok(ParsedReply { content: text.to_string(), calls: vec![], form: None });
    };
    let form = first.form;
    if let Some(other) = found.iter().find(|f| f.form != form) {
        return Err(refuse(&format!(
            "Your reply writes tool calls in two ways ({} and {}), so it is not clear what to run.",
            form.describe(),
            other.form.describe()
        )));
    }
    let mut groups = vec![];
    for f in &found {
        groups.push(f.calls.clone().map_err(|e| refuse(&e))?);
    }
    let implicit = matches!(form, CallForm::Fenced | CallForm::BareJson);
    if implicit && groups.iter().any(|g| *g != groups[0]) {
        return Err(refuse(&format!(
            "Your reply holds {} different tool calls as {}s, so it is not clear what to run.",
            groups.len(),
            form.describe().trim_start_matches("a ")
        )));
    }
    let calls = if implicit { groups.swap_remove(0) } else { groups.concat() };
    Ok(ParsedReply { content: text[..first.span.start].trim_end().to_string(), calls, form: Some(form) })
}

/// The byte offset from which a streamed reply must be held back because a tool call may begin
/// there; `None` when all of `text` is plain text that can be sent. Held: the first explicit
/// marker (`<tool_call>`, `<tools>`, `<function=`); a fence that is still open or holds a call;
/// a `{` or `[` whose JSON is still incomplete or has a call's shape; a partial marker at the
/// very end (`<tool_`, ```` `` ````); and the whitespace just before any of these, which the
/// parsed content drops. Text released here is never part of a call in the finished reply.
pub fn hold_from(text: &str) -> Option<usize> {
    // Everything after an explicit marker is held, so only the text before it needs a look.
    let mut hold = [TOOL_CALL.0, TOOLS.0, FUNCTION.0].iter().filter_map(|m| text.find(m)).min().unwrap_or(text.len());
    let head = &text[..hold];
    let fences = fences(head, &[]);
    if let Some(f) = fences.iter().find(|f| !f.closed || call_json(f.body(head), false).is_some()) {
        hold = f.span.start;
    }
    let skipped: Vec<Span> = fences.iter().map(|f| f.span).collect();
    let mut at = 0;
    while let Some(i) = next_json_start(head, at, &skipped).filter(|&i| i < hold) {
        match first_json(&head[i..]) {
            Json::Incomplete => {
                hold = i;
                break;
            }
            Json::Value(v, _) if is_call_shaped(&v, true) => {
                hold = i;
                break;
            }
            Json::Value(_, len) => at = i + len,
            Json::Invalid => at = i + 1,
        }
    }
    // A marker cut by the end of the text: "<", "<tool_", "``".
    let partial = text
        .char_indices()
        .rev()
        .take(MARKERS.iter().map(|m| m.len()).max().unwrap_or(0))
        .map(|(i, _)| i)
        .filter(|&i| MARKERS.iter().any(|m| m.len() > text.len() - i && m.starts_with(&text[i..])))
        .min();
    hold = hold.min(partial.unwrap_or(text.len()));
    if hold < text.len() {
        Some(text[..hold].trim_end().len())
    } else {
        None
    }
}

/// Converts string arguments to the type `tools` (OpenAI function definitions) declare for
/// them, when the string holds a JSON value of that type: `<parameter=…>` values are text
/// ("3", "[1, 20]") where the editor wants an integer and a list.
pub fn coerce_arguments(call: &mut ParsedCall, tools: &[Value]) {
    let function = tools.iter().map(|t| &t["function"]).find(|f| f["name"] == call.name.as_str());
    let Some(properties) = function.and_then(|f| f["parameters"]["properties"].as_object()) else { return };
    let Some(args) = call.arguments.as_object_mut() else { return };
    for (key, value) in args.iter_mut() {
        let Some(declared) = properties.get(key).and_then(|p| p["type"].as_str()) else { continue };
        let Some(parsed) = value.as_str().and_then(|s| serde_json::from_str::<Value>(s.trim()).ok()) else { continue };
        let fits = match declared {
            "integer" => parsed.is_i64() || parsed.is_u64(),
            "number" => parsed.is_number(),
            "boolean" => parsed.is_boolean(),
            "array" => parsed.is_array(),
            "object" => parsed.is_object(),
            _ => false,
        };
        if fits {
            *value = parsed;
        }
    }
}

/// A byte range of the text, `start..end`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn contains(&self, i: usize) -> bool {
        self.start <= i && i < self.end
    }
}

/// Calls found at one place of the text, or why they cannot be read.
struct Found {
    span: Span,
    form: CallForm,
    calls: Result<Vec<ParsedCall>, String>,
}

fn refuse(problem: &str) -> String {
    format!("{problem} Make exactly one tool call per reply, written as:\n{CANONICAL}")
}

/// The first occurrence of `pattern` at or after `from` that is not inside one of `skip`.
fn find_outside(text: &str, pattern: &str, mut from: usize, skip: &[Span]) -> Option<usize> {
    loop {
        let i = from + text.get(from..)?.find(pattern)?;
        match skip.iter().find(|s| s.contains(i)) {
            Some(s) => from = s.end,
            None => return Some(i),
        }
    }
}

/// The `(open, close)` blocks of `text` outside `skip`: each runs to its close tag, the last
/// may run to the end of the text.
fn blocks(text: &str, (open, close): (&str, &str), form: CallForm, skip: &[Span]) -> Vec<Found> {
    let mut out = vec![];
    let mut at = 0;
    while let Some(start) = find_outside(text, open, at, skip) {
        let body_start = start + open.len();
        let (form, calls, end) = match json_body(text, body_start, close) {
            Some((v, end)) => (form, calls_of(v), end),
            None => {
                let (body, end) = up_to(text, body_start, close);
                if body.contains(open) {
                    (form, Err(format!("A {open} block is not closed: end each with {close}.")), end)
                } else if form == CallForm::Tagged && body.trim_start().starts_with(FUNCTION.0) {
                    (CallForm::FunctionTag, block_calls(body), end)
                } else {
                    (form, block_calls(body), end)
                }
            }
        };
        out.push(Found { span: Span { start, end }, form, calls });
        at = end;
    }
    out
}

/// The text from `from` to the next `close`, and the end of that tag; the whole rest of the
/// text when there is none.
fn up_to<'t>(text: &'t str, from: usize, close: &str) -> (&'t str, usize) {
    match text[from..].find(close) {
        Some(i) => (&text[from..from + i], from + i + close.len()),
        None => (&text[from..], text.len()),
    }
}

/// A JSON value that fills a block's body from `from` (whitespace aside) up to `close` or the
/// end of the text, and where the block ends. Reading the value first keeps a close tag
/// inside one of its strings (a command that greps for it) from cutting the block.
fn json_body(text: &str, from: usize, close: &str) -> Option<(Value, usize)> {
    let start = from + (text[from..].len() - text[from..].trim_start().len());
    if !text[start..].starts_with(['{', '[']) {
        return None;
    }
    let Json::Value(v, len) = first_json(&text[start..]) else { return None };
    let rest = &text[start + len..];
    let after = rest.trim_start();
    if after.is_empty() {
        Some((v, text.len()))
    } else if after.starts_with(close) {
        Some((v, text.len() - after.len() + close.len()))
    } else {
        None
    }
}

/// The calls in the body of a tag block: JSON (an object or a list, possibly fenced) or
/// `<function=…>` elements.
fn block_calls(body: &str) -> Result<Vec<ParsedCall>, String> {
    let body = body.trim();
    if body.starts_with(FUNCTION.0) {
        let elements = function_elements(body, &[]);
        let mut calls = vec![];
        let mut at = 0;
        for e in elements {
            if !body[at..e.span.start].trim().is_empty() {
                return Err(format!(
                    "Unexpected text around {}...{}: {:?}.",
                    FUNCTION.0,
                    FUNCTION.1,
                    &body[at..e.span.start]
                ));
            }
            calls.extend(e.calls?);
            at = e.span.end;
        }
        return Ok(calls);
    }
    let json = match body.strip_prefix(FENCE) {
        // A fence inside the tag: drop its info line and closing fence.
        Some(fenced) => fenced.split_once('\n').map_or("", |(_, rest)| rest).trim_end().trim_end_matches(FENCE),
        None => body,
    };
    if json.trim().is_empty() {
        return Err("The tool call is empty.".into());
    }
    let v: Value = serde_json::from_str(json.trim()).map_err(|e| format!("The tool call is not valid JSON: {e}."))?;
    calls_of(v)
}

/// `<function=NAME>…</function>` elements outside `skip`; the last may lack its close tag.
fn function_elements(text: &str, skip: &[Span]) -> Vec<Found> {
    let (open, close) = FUNCTION;
    let mut out = vec![];
    let mut at = 0;
    while let Some(start) = find_outside(text, open, at, skip) {
        let name_start = start + open.len();
        let (end, calls) = match text[name_start..].find('>') {
            None => (text.len(), Err(format!("The {open}NAME> tag is not closed with '>'."))),
            Some(i) => {
                let name = &text[name_start..name_start + i];
                let body_start = name_start + i + 1;
                match json_body(text, body_start, close) {
                    Some((v, end)) => (end, arguments_object(v).and_then(|a| function_call(name, a)).map(|c| vec![c])),
                    None => {
                        let (body, end) = up_to(text, body_start, close);
                        let calls = if body.contains(open) {
                            Err(format!("A {open}...> element is not closed: end each with {close}."))
                        } else {
                            parameters(name, body).and_then(|a| function_call(name, Value::Object(a))).map(|c| vec![c])
                        };
                        (end, calls)
                    }
                }
            }
        };
        out.push(Found { span: Span { start, end }, form: CallForm::FunctionTag, calls });
        at = end;
    }
    out
}

/// The call of `<function=NAME>`, once its arguments are read.
fn function_call(name: &str, arguments: Value) -> Result<ParsedCall, String> {
    let name = name.trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("{:?} is not a tool name: write {}NAME>.", name, FUNCTION.0));
    }
    Ok(ParsedCall { name: name.to_string(), arguments })
}

/// `<parameter=KEY>VALUE</parameter>` elements; values are text.
fn parameters(function: &str, mut rest: &str) -> Result<Map<String, Value>, String> {
    let (open, close) = PARAMETER;
    let mut args = Map::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(args);
        }
        let Some(after_open) = rest.strip_prefix(open) else {
            return Err(format!(
                "Write the arguments of {function} as {open}KEY>VALUE{close} elements or as one JSON object."
            ));
        };
        let Some(gt) = after_open.find('>') else { return Err(format!("The {open}KEY> tag is not closed with '>'.")) };
        let key = after_open[..gt].trim();
        if key.is_empty() {
            return Err(format!("A parameter of {function} has no name."));
        }
        let after = &after_open[gt + 1..];
        let (value, next) = match after.find(close) {
            Some(i) => (&after[..i], &after[i + close.len()..]),
            None => (after, ""),
        };
        // The Qwen3-Coder layout puts the value on its own lines.
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        if args.insert(key.to_string(), Value::String(value.to_string())).is_some() {
            return Err(format!("The parameter {key:?} of {function} is given twice."));
        }
        rest = next;
    }
}

/// A fenced block: from its opening fence to the end of its closing one (or of the text).
struct Fence {
    span: Span,
    body: Span,
    closed: bool,
}

impl Fence {
    fn body<'t>(&self, text: &'t str) -> &'t str {
        &text[self.body.start..self.body.end]
    }
}

/// The fenced blocks of `text` outside `skip`, paired in order; the last may be open. The
/// opening line's info string (`json`) is not part of the body.
fn fences(text: &str, skip: &[Span]) -> Vec<Fence> {
    let mut out = vec![];
    let mut at = 0;
    while let Some(start) = find_outside(text, FENCE, at, skip) {
        let inner = start + FENCE.len();
        let (inner_end, end, closed) = match find_outside(text, FENCE, inner, skip) {
            Some(i) => (i, i + FENCE.len(), true),
            None => (text.len(), text.len(), false),
        };
        let body_start = text[inner..inner_end].find('\n').map_or(inner, |i| inner + i + 1);
        out.push(Fence { span: Span { start, end }, body: Span { start: body_start, end: inner_end }, closed });
        at = end;
    }
    out
}

/// Where the next `{` or `[` outside `skip` is, from `at`.
fn next_json_start(text: &str, mut at: usize, skip: &[Span]) -> Option<usize> {
    loop {
        let i = at + text.get(at..)?.find(['{', '['])?;
        match skip.iter().find(|s| s.contains(i)) {
            Some(s) => at = s.end,
            None => return Some(i),
        }
    }
}

/// Top-level bare JSON calls outside `skip`.
fn bare_values(text: &str, skip: &[Span]) -> Vec<Found> {
    let mut out = vec![];
    let mut at = 0;
    while let Some(i) = next_json_start(text, at, skip) {
        match first_json(&text[i..]) {
            Json::Value(v, len) => {
                if is_call_shaped(&v, true) {
                    let span = Span { start: i, end: i + len };
                    out.push(Found { span, form: CallForm::BareJson, calls: calls_of(v) });
                }
                // Whatever it is, what it nests is not top-level.
                at = i + len;
            }
            Json::Incomplete | Json::Invalid => at = i + 1,
        }
    }
    out
}

enum Json {
    /// A whole value and its length in bytes.
    Value(Value, usize),
    /// The text ends before the value does.
    Incomplete,
    Invalid,
}

/// The JSON value at the start of `text`, ignoring what follows it.
fn first_json(text: &str) -> Json {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    match values.next() {
        Some(Ok(v)) => Json::Value(v, values.byte_offset()),
        Some(Err(e)) if e.is_eof() => Json::Incomplete,
        _ => Json::Invalid,
    }
}

/// `text` parsed, if it is JSON with a call's shape.
fn call_json(text: &str, needs_arguments: bool) -> Option<Value> {
    serde_json::from_str(text.trim()).ok().filter(|v| is_call_shaped(v, needs_arguments))
}

/// An object whose keys are `name` and at most `arguments` / `parameters` (one of them
/// required with `needs_arguments`), or a non-empty list of such objects.
fn is_call_shaped(v: &Value, needs_arguments: bool) -> bool {
    match v {
        Value::Object(m) => {
            let has_arguments = m.contains_key("arguments") || m.contains_key("parameters");
            m.contains_key("name")
                && m.keys().all(|k| matches!(k.as_str(), "name" | "arguments" | "parameters"))
                && (has_arguments || !needs_arguments)
        }
        Value::Array(items) => !items.is_empty() && items.iter().all(|x| is_call_shaped(x, needs_arguments)),
        _ => false,
    }
}

/// The calls of a JSON object or list.
fn calls_of(v: Value) -> Result<Vec<ParsedCall>, String> {
    match v {
        Value::Array(items) if items.is_empty() => Err("The list of tool calls is empty.".into()),
        Value::Array(items) => items.into_iter().map(call_of).collect(),
        v @ Value::Object(_) => Ok(vec![call_of(v)?]),
        _ => Err("The tool call must be a JSON object with \"name\" and \"arguments\".".into()),
    }
}

fn call_of(v: Value) -> Result<ParsedCall, String> {
    let Value::Object(mut m) = v else {
        return Err("Each tool call must be a JSON object with \"name\" and \"arguments\".".into());
    };
    let name = match m.remove("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(_) => return Err("The tool call's \"name\" must be a non-empty string.".into()),
        None => return Err("The tool call has no \"name\" string.".into()),
    };
    let arguments = match (m.remove("arguments"), m.remove("parameters")) {
        (Some(_), Some(_)) => return Err("Give the arguments once, as \"arguments\" (not also \"parameters\").".into()),
        (Some(a), None) | (None, Some(a)) => arguments_object(a)?,
        (None, None) => json!({}),
    };
    Ok(ParsedCall { name, arguments })
}

/// Arguments as an object: `null` is `{}`, a string must hold an object (the OpenAI wire form).
fn arguments_object(v: Value) -> Result<Value, String> {
    let not_object = || "\"arguments\" must be a JSON object.".to_string();
    match v {
        Value::Object(_) => Ok(v),
        Value::Null => Ok(json!({})),
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(not_object()),
        },
        _ => Err(not_object()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LS: &str = r#"{"name": "bash", "arguments": {"command": "ls"}}"#;

    fn ls() -> ParsedCall {
        ParsedCall { name: "bash".into(), arguments: json!({"command": "ls"}) }
    }

    fn parsed(text: &str) -> ParsedReply {
        parse_reply(text).unwrap_or_else(|e| panic!("{text:?} was refused: {e}"))
    }

    /// The one call of `text`, its form and the text before it.
    fn one(text: &str) -> (String, ParsedCall, CallForm) {
        let r = parsed(text);
        assert_eq!(r.calls.len(), 1, "{text:?}: {r:?}");
        (r.content, r.calls[0].clone(), r.form.unwrap())
    }

    fn refused(text: &str) -> String {
        parse_reply(text).expect_err(text)
    }

    #[test]
    fn the_canonical_form_one_block_or_several() {
        let (content, call, form) = one(&format!("Look.\n<tool_call>\n{LS}\n</tool_call>"));
        assert_eq!((content.as_str(), call, form), ("Look.", ls(), CallForm::Tagged));
        // The last block may lack its close tag (generation stopped on it).
        assert_eq!(one(&format!("<tool_call>\n{LS}\n")).1, ls());
        let two = parsed(&format!(
            "Both.\n<tool_call>{LS}</tool_call>\n<tool_call>{{\"name\": \"submit\", \"arguments\": {{}}}}</tool_call>"
        ));
        assert_eq!(two.calls.len(), 2);
        assert_eq!((two.content.as_str(), two.calls[1].name.as_str()), ("Both.", "submit"));
        // A close tag inside an argument does not cut the block.
        let grep = r#"<tool_call>{"name": "bash", "arguments": {"command": "grep '</tool_call>' f"}}</tool_call>"#;
        assert_eq!(one(grep).1.arguments["command"], "grep '</tool_call>' f");
        let tools = r#"<tool_call>{"name": "bash", "arguments": {"command": "grep -c '<tools>' p.txt"}}</tool_call>"#;
        assert_eq!(one(tools).2, CallForm::Tagged);
        // Arguments as a JSON string (the OpenAI wire form), `parameters`, none, null; extra keys.
        let wire = r#"<tool_call>{"name": "bash", "arguments": "{\"command\": \"ls\"}"}</tool_call>"#;
        assert_eq!(one(wire).1, ls());
        assert_eq!(one(r#"<tool_call>{"name": "bash", "parameters": {"command": "ls"}}</tool_call>"#).1, ls());
        assert_eq!(one(r#"<tool_call>{"name": "submit"}</tool_call>"#).1.arguments, json!({}));
        assert_eq!(one(r#"<tool_call>{"name": "submit", "arguments": null}</tool_call>"#).1.arguments, json!({}));
        let with_id = r#"<tool_call>{"id": 1, "name": "bash", "arguments": {"command": "ls"}}</tool_call>"#;
        assert_eq!(one(with_id).1, ls());
        // A fence inside the tag.
        assert_eq!(one(&format!("<tool_call>\n```json\n{LS}\n```\n</tool_call>")).2, CallForm::Tagged);
    }

    #[test]
    fn a_fenced_block() {
        let (content, call, form) = one(&format!("I will list.\n```json\n{LS}\n```"));
        assert_eq!((content.as_str(), call, form), ("I will list.", ls(), CallForm::Fenced));
        assert_eq!(one(&format!("```\n{LS}\n```\nThen we see.")).2, CallForm::Fenced);
        assert_eq!(one(&format!("```json\n{LS}\n")).1, ls(), "an open fence at the end");
        assert_eq!(one("```json\n{\"name\": \"submit\"}\n```").1.name, "submit");
        assert_eq!(parsed(&format!("```json\n[{LS}, {LS}]\n```")).calls, vec![ls(), ls()]);
        // Code, and JSON that is not a call, are text.
        for text in ["```python\nprint({'name': 1})\n```", "```json\n{\"name\": \"pkg\", \"version\": \"1.0\"}\n```"] {
            assert_eq!(parsed(text), ParsedReply { content: text.into(), calls: vec![], form: None });
        }
    }

    #[test]
    fn bare_json_objects_and_lists() {
        let (content, call, form) = one(LS);
        assert_eq!((content.as_str(), call, form), ("", ls(), CallForm::BareJson));
        let prose = format!("Let me look around first. {LS}");
        assert_eq!(one(&prose).0, "Let me look around first.");
        assert_eq!(one(r#"{"name": "bash", "parameters": {"command": "ls"}}"#).1, ls(), "Llama 3 JSON");
        assert_eq!(parsed(&format!("[{LS}, {LS}]")).calls.len(), 2, "a list (Mistral)");
        // The same call written twice is one call.
        assert_eq!(parsed(&format!("I will run {LS}.\n{LS}")).calls, vec![ls()]);
        // Not calls: a bare object without arguments, other keys, nested calls, JSON in prose,
        // braces that are not JSON, code in a fence.
        for text in [
            r#"{"name": "bash"}"#.to_string(),
            r#"{"name": "bash", "arguments": {}, "why": "x"}"#.into(),
            format!(r#"{{"calls": [{LS}]}}"#),
            "The config is {\"a\": 1} and [1, 2], see [the docs].".into(),
            "fn main() { let v = [0; 3]; }".into(),
            format!("```\n{{\"plan\": {LS}}}\n```"),
        ] {
            assert!(parsed(&text).calls.is_empty(), "{text}");
        }
        // Broken JSON before a call does not hide it.
        assert_eq!(one(&format!("Try {{oops then {LS}")).1, ls());
    }

    #[test]
    fn tools_tags() {
        let (content, call, form) = one(&format!("Run.\n<tools>\n{LS}\n</tools>"));
        assert_eq!((content.as_str(), call, form), ("Run.", ls(), CallForm::ToolsTag));
        assert_eq!(parsed(&format!("<tools>[{LS}, {LS}]</tools>")).calls.len(), 2);
        assert!(refused("<tools>[]</tools>").contains("empty"));
    }

    #[test]
    fn function_tags() {
        let (content, call, form) = one("Listing.\n<function=bash><parameter=command>ls</parameter></function>");
        assert_eq!((content.as_str(), call, form), ("Listing.", ls(), CallForm::FunctionTag));
        // Qwen3-Coder: inside <tool_call>, values on their own lines (exactly one newline trimmed).
        let qwen3 = "<tool_call>\n<function=str_replace_editor>\n<parameter=command>\nstr_replace\n</parameter>\n\
                     <parameter=path>\na.py\n</parameter>\n<parameter=old_str>\n    x = 1\n\n</parameter>\n\
                     <parameter=insert_line>\n3\n</parameter>\n</function>\n</tool_call>";
        let (_, call, form) = one(qwen3);
        assert_eq!(form, CallForm::FunctionTag);
        assert_eq!(
            call.arguments,
            json!({"command": "str_replace", "path": "a.py", "old_str": "    x = 1\n", "insert_line": "3"})
        );
        // JSON arguments; no arguments; a missing close tag at the end.
        assert_eq!(one(r#"<function=bash>{"command": "ls"}</function>"#).1, ls());
        assert_eq!(one("<function=submit></function>").1.arguments, json!({}));
        assert_eq!(one("<function=bash>\n<parameter=command>\nls\n").1, ls());
        assert_eq!(
            one(r#"<function=bash>{"command": "echo </function>"}</function>"#).1.arguments["command"],
            "echo </function>"
        );
        let two = parsed("<function=bash><parameter=command>ls</parameter></function>\n<function=submit></function>");
        assert_eq!(two.calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["bash", "submit"]);
        assert!(refused("<function=bash>ls</function>").contains("<parameter=KEY>"));
        assert!(refused("<function=>{}</function>").contains("not a tool name"));
        assert!(
            refused("<function=bash><parameter=a>1</parameter><parameter=a>2</parameter></function>").contains("twice")
        );
        assert!(refused("<function=bash>[1]</function>").contains("must be a JSON object"));
    }

    #[test]
    fn a_reply_without_a_call_is_its_own_content() {
        for text in ["", "I am done thinking.\n", "Use `ls` and a <b>tag</b>; x < y {z}."] {
            assert_eq!(parsed(text), ParsedReply { content: text.into(), calls: vec![], form: None });
        }
    }

    #[test]
    fn malformed_and_ambiguous_calls_are_refused_with_the_canonical_form() {
        let cases = [
            ("<tool_call>{oops</tool_call>", "not valid JSON"),
            ("<tool_call></tool_call>", "empty"),
            ("<tool_call>{\"arguments\": {}}</tool_call>", "no \"name\""),
            ("<tool_call>[1]</tool_call>", "must be a JSON object"),
            ("<tool_call>\"ls\"</tool_call>", "must be a JSON object"),
            (r#"<tool_call>{"name": "bash", "arguments": [1]}</tool_call>"#, "\"arguments\" must be a JSON object"),
            (r#"<tool_call>{"name": "bash", "arguments": "ls"}</tool_call>"#, "\"arguments\" must be a JSON object"),
            (r#"{"name": 3, "arguments": {}}"#, "\"name\" must be a non-empty string"),
            (r#"{"name": "", "arguments": {}}"#, "\"name\" must be a non-empty string"),
            (r#"{"name": "bash", "arguments": {}, "parameters": {}}"#, "once"),
            (r#"{"name": "bash", "arguments": 1}"#, "\"arguments\" must be a JSON object"),
            (&format!("<tool_call>{LS}<tool_call>{LS}</tool_call>"), "not closed"),
        ];
        for (text, problem) in cases {
            let e = refused(text);
            assert!(e.contains(problem) && e.ends_with(CANONICAL), "{text:?} -> {e}");
        }
        let submit = r#"{"name": "submit", "arguments": {}}"#;
        let ambiguous = [
            format!("{LS}\n{submit}"),
            format!("```json\n{LS}\n```\n```json\n{submit}\n```"),
            format!("```json\n{LS}\n```\n<tool_call>{LS}</tool_call>"),
            format!("I will call {LS}\n<tool_call>{LS}</tool_call>"),
            format!("<function=bash>{{}}</function><tool_call>{LS}</tool_call>"),
            format!("<tools>{LS}</tools><tool_call>{LS}</tool_call>"),
        ];
        for text in ambiguous {
            let e = refused(&text);
            assert!(e.contains("not clear what to run"), "{text:?} -> {e}");
        }
    }

    #[test]
    fn string_arguments_take_the_declared_types() {
        let tools = crate::agent::tools::tool_specs("/repo");
        let mut call = ParsedCall {
            name: "str_replace_editor".into(),
            arguments: json!({"command": "insert", "path": "3", "insert_line": "3", "view_range": "[1, -1]",
                              "new_str": "42", "file_text": 7}),
        };
        coerce_arguments(&mut call, &tools);
        assert_eq!(
            call.arguments,
            json!({"command": "insert", "path": "3", "insert_line": 3, "view_range": [1, -1], "new_str": "42",
                   "file_text": 7})
        );
        let mut odd = ParsedCall { name: "str_replace_editor".into(), arguments: json!({"insert_line": "three"}) };
        coerce_arguments(&mut odd, &tools);
        assert_eq!(odd.arguments["insert_line"], "three", "left for the tool to refuse");
    }

    #[test]
    fn plain_prose_streams_and_calls_are_held_from_their_first_byte() {
        for prose in ["", "Let me look at the file.", "Lines\nand more lines\n", "x = a[0] + f(b) - c[1:2]"] {
            assert_eq!(hold_from(prose), None, "{prose:?}");
        }
        // Markup and JSON that cannot be a call stream too.
        for text in ["a <b>tag</b>", "`ls` works", "{\"a\": 1} done", "[see docs]", "```py\nx = {}\n```\nok"] {
            assert_eq!(hold_from(text), None, "{text:?}");
        }
        let at = |text: &str, from: &str| assert_eq!(hold_from(text), text.find(from), "{text:?}");
        // Each form's opening, with the whitespace before it.
        at("Look.\n<tool_call>\n{\"name\"", "\n<tool_call>");
        at("Look. <tools>", " <tools>");
        at("Look.\n<function=bash>", "\n<function=");
        at("Look.\n```json\n{\"name\": \"bash\"", "\n```");
        at("Look.\n```", "\n```");
        at("Look. {", " {");
        at("Look.\n[{\"name\": \"ba", "\n[");
        at(&format!("Look. {LS} and more"), " {");
        at("{\"na", "{");
        // A marker cut by the end of the text.
        for partial in ["<", "<tool_", "<tool_call", "<tools", "<func", "<function", "`", "``"] {
            at(&format!("Hm. {partial}"), &format!(" {partial}"));
        }
        assert_eq!(hold_from("Hm. <toolbox"), None);
    }

    #[test]
    fn streamed_text_is_always_the_start_of_the_content() {
        let replies = [
            format!("Look.\n<tool_call>\n{LS}\n</tool_call>"),
            format!("I will use {{braces}} and [links](x), then\n```json\n{LS}\n```"),
            format!("```python\nprint(1)\n```\nNow: {LS}"),
            "Ok <function=bash><parameter=command>ls</parameter></function>".into(),
            format!("Tags: <b>x</b> `y` <tools>[{LS}]</tools>"),
        ];
        for reply in replies {
            let content = parsed(&reply).content;
            assert!(!parsed(&reply).calls.is_empty(), "{reply}");
            for (end, _) in reply.char_indices().chain([(reply.len(), ' ')]) {
                let prefix = &reply[..end];
                let sent = &prefix[..hold_from(prefix).unwrap_or(prefix.len())];
                assert!(content.starts_with(sent.trim_end()), "{prefix:?} sends {sent:?}, content is {content:?}");
            }
        }
    }
}
