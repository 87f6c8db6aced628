//! Chat messages in the OpenAI shape (system/user/assistant/tool, assistant `tool_calls`),
//! shared by the chat template, the trajectory files and the HTTP clients.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments object. OpenAI sends it as a JSON string; [`ToolCall::arguments`]
    /// parses that form.
    pub arguments: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".into()
}

impl ToolCall {
    pub fn new(name: &str, arguments: Value) -> Self {
        Self { id: None, kind: function_type(), function: FunctionCall { name: name.into(), arguments } }
    }

    /// The arguments as a JSON value: a string holding JSON (the OpenAI wire form) is parsed.
    pub fn arguments(&self) -> Value {
        match &self.function.arguments {
            Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
            v => v.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: Some(content.into()), tool_calls: vec![], tool_call_id: None, name: None }
    }
    pub fn system(c: impl Into<String>) -> Self {
        Self::new(Role::System, c)
    }
    pub fn user(c: impl Into<String>) -> Self {
        Self::new(Role::User, c)
    }
    pub fn assistant(c: impl Into<String>) -> Self {
        Self::new(Role::Assistant, c)
    }
    pub fn tool(c: impl Into<String>) -> Self {
        Self::new(Role::Tool, c)
    }

    pub fn text(&self) -> &str {
        self.content.as_deref().unwrap_or("")
    }

    /// Checks what the template relies on, naming message `index` in errors.
    pub fn validate(&self, index: usize) -> Result<()> {
        for (j, c) in self.tool_calls.iter().enumerate() {
            if self.role != Role::Assistant {
                bail!("message {index}: only assistant messages may have tool_calls (role is {})", self.role.as_str());
            }
            if c.function.name.trim().is_empty() {
                bail!("message {index}: tool call {j} has no function name");
            }
        }
        Ok(())
    }
}

/// A conversation file: either a JSON array of messages, or `{"messages": [...], "tools": [...]}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub tools: Vec<Value>,
}

impl Conversation {
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text, "the conversation")
    }

    /// Parses the conversation file `origin`.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let v: Value = crate::inputs::json_file(text, origin)?;
        let conv: Conversation = if v.is_array() {
            Conversation {
                messages: crate::inputs::json_value(v, origin).context("expected an array of messages")?,
                tools: vec![],
            }
        } else {
            crate::inputs::json_value(v, origin)
                .context("expected {\"messages\": [...], \"tools\": [...]} or an array of messages")?
        };
        for (i, m) in conv.messages.iter().enumerate() {
            m.validate(i)?;
        }
        Ok(conv)
    }
}

/// Serialises like Python's `json.dumps(v, ensure_ascii=False)` — the `tojson` filter of HF
/// chat templates: `", "` and `": "` separators, keys in their given order.
pub fn python_json(v: &Value) -> String {
    struct PyFormatter;
    impl serde_json::ser::Formatter for PyFormatter {
        fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    v.serialize(&mut ser).expect("serialising a JSON value cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_style_json() {
        let v = json!({"b": [1, 2.5, null, true], "a": {"x": "é\n\"q\""}});
        assert_eq!(python_json(&v), r#"{"b": [1, 2.5, null, true], "a": {"x": "é\n\"q\""}}"#);
    }

    #[test]
    fn openai_string_arguments_are_parsed() {
        let c: ToolCall = serde_json::from_value(json!({"id": "c1", "type": "function",
            "function": {"name": "bash", "arguments": "{\"command\": \"ls\"}"}}))
        .unwrap();
        assert_eq!(c.arguments(), json!({"command": "ls"}));
    }

    #[test]
    fn bad_messages_are_errors() {
        assert!(Conversation::from_json(r#"[{"role": "robot", "content": "hi"}]"#).is_err());
        let e = Conversation::from_json(
            r#"[{"role": "assistant", "tool_calls": [{"function": {"name": "", "arguments": {}}}]}]"#,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("no function name"), "{e:#}");
        let c = Conversation::from_json(
            r#"{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}"#,
        )
        .unwrap();
        assert_eq!(c.tools.len(), 1);
    }
}
