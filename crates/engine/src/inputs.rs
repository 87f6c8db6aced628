//! Reading the files users write (configs, JSONL rows, model metadata): a parse error names the
//! file, the line and column, and the field (`messages[2].role`), in plain words, instead of
//! serde's bare "invalid type: integer `5`, expected a sequence at line 1 column 40".

use anyhow::{anyhow, Result};
use serde::de::DeserializeOwned;

/// Parses a whole JSON document read from `origin` (a path, or a name such as "the request").
pub fn json_file<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    parse_json(text, origin, None)
}

/// Parses line `line` (1-based) of the JSONL file `origin`.
pub fn json_line<T: DeserializeOwned>(text: &str, origin: &str, line: usize) -> Result<T> {
    parse_json(text, origin, Some(line))
}

/// Converts an already parsed JSON value, naming `origin` (left out when empty: the caller
/// names it) and the field that does not fit.
pub fn json_value<T: DeserializeOwned>(value: serde_json::Value, origin: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = field_of(e.path());
        let message = plain(&e.inner().to_string());
        if origin.is_empty() {
            anyhow!("{field}{message}")
        } else {
            anyhow!("{origin}: {field}{message}")
        }
    })
}

fn parse_json<T: DeserializeOwned>(text: &str, origin: &str, line: Option<usize>) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    let at = |e: &serde_json::Error| match line {
        Some(l) => format!("{origin}:{l}:{}", e.column()),
        None => format!("{origin}:{}:{}", e.line(), e.column()),
    };
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        let message = inner.to_string();
        // serde_json appends " at line L column C"; the location leads the message instead.
        let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
        let message = if inner.is_eof() { format!("{message} (the JSON is cut short)") } else { plain(message) };
        anyhow!("{}: {}{message}", at(inner), field_of(e.path()))
    })?;
    de.end().map_err(|e| anyhow!("{}: trailing characters after the JSON value", at(&e)))?;
    Ok(value)
}

/// Parses the TOML file `origin`.
pub fn toml_file<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let inner = e.inner();
        let at = match inner.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("{origin}:{line}:{column}")
            }
            None => origin.to_string(),
        };
        anyhow!("{at}: {}{}", field_of(e.path()), plain(inner.message()))
    })
}

/// "field `a.b[2]`: " for a located error, "" at the top level.
fn field_of(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." || p.is_empty() {
        String::new()
    } else {
        format!("field `{p}`: ")
    }
}

/// serde's vocabulary in the words of JSON and TOML.
fn plain(message: &str) -> String {
    let mut m = message
        .replace("invalid type: ", "wrong type: found ")
        .replace("a sequence", "a list")
        .replace("expected a map", "expected an object/table")
        .replace("integer `", "the number `")
        .replace("floating point `", "the number `");
    if m.starts_with("data did not match any variant of untagged enum") {
        m = "the value has none of the accepted shapes".into();
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Row {
        name: String,
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        size: u32,
    }

    #[test]
    fn json_errors_name_the_file_line_and_field() {
        let e = json_line::<Row>(r#"{"name": "a", "items": [{"size": 1}, {"size": "big"}]}"#, "rows.jsonl", 7)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("rows.jsonl:7:"), "{e}");
        assert!(e.contains("field `items[1].size`") && e.contains("wrong type: found string \"big\""), "{e}");
        assert!(!e.contains("at line"), "{e}");
        let e = json_file::<Row>("{\n  \"name\": \"a\",\n  \"items\": 5\n}", "x.json").unwrap_err().to_string();
        assert!(e.starts_with("x.json:3:") && e.contains("field `items`") && e.contains("expected a list"), "{e}");
        let e = json_file::<Row>(r#"{"name": "a", "itemz": []}"#, "x.json").unwrap_err().to_string();
        assert!(e.contains("unknown field `itemz`"), "{e}");
        let e = json_file::<Row>(r#"{"name": "a", "items": [{"size""#, "x.json").unwrap_err().to_string();
        assert!(e.contains("cut short"), "{e}");
        let e = json_file::<Row>(r#"{"name": "a", "items": []} trailing"#, "x.json").unwrap_err().to_string();
        assert!(e.contains("trailing characters"), "{e}");
    }

    #[test]
    fn toml_errors_name_the_line_and_field() {
        let text = "name = \"a\"\n\n[[items]]\nsize = -3\n";
        let e = toml_file::<Row>(text, "c.toml").unwrap_err().to_string();
        assert!(e.starts_with("c.toml:4:8:") && e.contains("field `items[0].size`"), "{e}");
        let e = toml_file::<Row>("name = \"a\"\nitems = []\nextra = 1\n", "c.toml").unwrap_err().to_string();
        assert!(e.starts_with("c.toml:3:1:") && e.contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn values_name_the_field() {
        let e = json_value::<Row>(serde_json::json!({"name": 1, "items": []}), "the request").unwrap_err().to_string();
        assert_eq!(e, "the request: field `name`: wrong type: found the number `1`, expected a string");
    }
}
