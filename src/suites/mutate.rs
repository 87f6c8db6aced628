//! Mutation operators over Python source, found with a real parser (tree-sitter-python): each
//! mutant is one small, plausible bug — a flipped comparison or boolean, an off-by-one, a wrong
//! constant, a removed statement or return, an inverted condition, swapped arguments, a changed
//! default, a swapped arithmetic operator.

use serde::{Deserialize, Serialize};
use tree_sitter::{Node, Parser};

/// One candidate bug: replace `source[start..end]` with `replacement`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mutant {
    pub file: String,
    pub operator: String,
    pub start: usize,
    pub end: usize,
    pub replacement: String,
    /// 1-based line of the change.
    pub line: usize,
    /// The enclosing function (or `<module>`).
    pub function: String,
}

impl Mutant {
    pub fn apply(&self, source: &str) -> String {
        format!("{}{}{}", &source[..self.start], self.replacement, &source[self.end..])
    }

    /// A stable id: file, position and replacement.
    pub fn key(&self) -> String {
        format!("{}:{}-{}:{}", self.file, self.start, self.end, self.replacement)
    }
}

fn text<'a>(n: &Node, src: &'a str) -> &'a str {
    &src[n.byte_range()]
}

fn enclosing_function(n: &Node, src: &str) -> String {
    let mut cur = n.parent();
    while let Some(p) = cur {
        if p.kind() == "function_definition" {
            if let Some(name) = p.child_by_field_name("name") {
                return text(&name, src).to_string();
            }
        }
        cur = p.parent();
    }
    "<module>".into()
}

/// Whether `n` sits in a docstring-like or type-annotation context we should not mutate.
fn in_annotation(n: &Node) -> bool {
    let mut cur = n.parent();
    while let Some(p) = cur {
        if p.kind() == "type" || p.kind() == "decorator" {
            return true;
        }
        cur = p.parent();
    }
    false
}

/// Every mutant of `source` (the file's path, relative to the package root, is `file`).
pub fn mutants(source: &str, file: &str) -> Vec<Mutant> {
    let mut parser = Parser::new();
    parser.set_language(&tree_sitter_python::LANGUAGE.into()).expect("the Python grammar loads");
    let Some(tree) = parser.parse(source, None) else { return vec![] };
    let mut out = vec![];
    let mut stack = vec![tree.root_node()];
    while let Some(n) = stack.pop() {
        for i in (0..n.child_count()).rev() {
            if let Some(c) = n.child(i) {
                stack.push(c);
            }
        }
        if n.is_error() || n.has_error() || in_annotation(&n) {
            continue;
        }
        let mut add = |op: &str, node: &Node, replacement: String| {
            out.push(Mutant {
                file: file.into(),
                operator: op.into(),
                start: node.start_byte(),
                end: node.end_byte(),
                replacement,
                line: node.start_position().row + 1,
                function: enclosing_function(node, source),
            });
        };
        match n.kind() {
            "comparison_operator" => {
                for i in 0..n.child_count() {
                    let Some(c) = n.child(i) else { continue };
                    if c.is_named() {
                        continue;
                    }
                    let flipped = match text(&c, source) {
                        "<" => "<=",
                        "<=" => "<",
                        ">" => ">=",
                        ">=" => ">",
                        "==" => "!=",
                        "!=" => "==",
                        "in" => "not in",
                        "not in" => "in",
                        "is" => "is not",
                        "is not" => "is",
                        _ => continue,
                    };
                    add("comparison_flip", &c, flipped.into());
                }
            }
            "boolean_operator" => {
                if let Some(op) = n.child_by_field_name("operator") {
                    let flipped = if text(&op, source) == "and" { "or" } else { "and" };
                    add("boolean_flip", &op, flipped.into());
                }
            }
            "not_operator" => {
                if let Some(arg) = n.child_by_field_name("argument") {
                    add("inverted_condition", &n, text(&arg, source).to_string());
                }
            }
            "if_statement" | "elif_clause" | "while_statement" => {
                if let Some(cond) = n.child_by_field_name("condition") {
                    if cond.kind() != "not_operator" {
                        add("inverted_condition", &cond, format!("not ({})", text(&cond, source)));
                    }
                }
            }
            "binary_operator" => {
                if let Some(op) = n.child_by_field_name("operator") {
                    let right = n.child_by_field_name("right");
                    let is_one = right.is_some_and(|r| r.kind() == "integer" && text(&r, source) == "1");
                    let o = text(&op, source);
                    let flipped = match o {
                        "+" if is_one => Some(("off_by_one", "-")),
                        "-" if is_one => Some(("off_by_one", "+")),
                        "+" => Some(("arithmetic_flip", "-")),
                        "-" => Some(("arithmetic_flip", "+")),
                        "*" => Some(("arithmetic_flip", "/")),
                        "//" => Some(("arithmetic_flip", "%")),
                        "%" => Some(("arithmetic_flip", "//")),
                        _ => None,
                    };
                    if let Some((name, f)) = flipped {
                        add(name, &op, f.into());
                    }
                }
            }
            "integer" => {
                let t = text(&n, source);
                if let Ok(v) = t.parse::<i64>() {
                    if v.abs() <= 1000 {
                        // In a slice, a subscript or range(): an off-by-one; elsewhere a wrong constant.
                        let ctx = n.parent().map(|p| p.kind()).unwrap_or("");
                        let in_range = n
                            .parent()
                            .and_then(|p| p.parent())
                            .filter(|g| g.kind() == "call")
                            .and_then(|g| g.child_by_field_name("function"))
                            .is_some_and(|f| text(&f, source) == "range");
                        let name = if ctx == "slice" || ctx == "subscript" || in_range {
                            "off_by_one"
                        } else {
                            "wrong_constant"
                        };
                        add(name, &n, (v + 1).to_string());
                        if v != 0 {
                            add(name, &n, (v - 1).to_string());
                        }
                    }
                }
            }
            "true" => add("wrong_constant", &n, "False".into()),
            "false" => add("wrong_constant", &n, "True".into()),
            "return_statement" if n.named_child_count() > 0 => add("removed_return", &n, "return None".into()),
            "expression_statement" => {
                // A call or assignment statement, not a docstring.
                let first = n.named_child(0);
                if first.is_some_and(|c| {
                    c.kind() == "call" || c.kind() == "assignment" || c.kind() == "augmented_assignment"
                }) && n.parent().is_some_and(|p| p.kind() == "block" && p.named_child_count() > 1)
                {
                    add("removed_statement", &n, "pass".into());
                }
            }
            "argument_list" => {
                let args: Vec<Node> = (0..n.named_child_count())
                    .filter_map(|i| n.named_child(i as u32))
                    .filter(|a| {
                        a.kind() != "keyword_argument" && a.kind() != "list_splat" && a.kind() != "dictionary_splat"
                    })
                    .collect();
                if args.len() >= 2 && text(&args[0], source) != text(&args[1], source) {
                    let (a, b) = (args[0], args[1]);
                    let between = &source[a.end_byte()..b.start_byte()];
                    let node_span = Mutant {
                        file: file.into(),
                        operator: "swapped_arguments".into(),
                        start: a.start_byte(),
                        end: b.end_byte(),
                        replacement: format!("{}{between}{}", text(&b, source), text(&a, source)),
                        line: a.start_position().row + 1,
                        function: enclosing_function(&n, source),
                    };
                    out.push(node_span);
                }
            }
            "default_parameter" | "typed_default_parameter" => {
                if let Some(v) = n.child_by_field_name("value") {
                    let t = text(&v, source);
                    let changed = match v.kind() {
                        "true" => Some("False".to_string()),
                        "false" => Some("True".to_string()),
                        "integer" => t.parse::<i64>().ok().map(|x| (x + 1).to_string()),
                        _ => None,
                    };
                    if let Some(c) = changed {
                        add("changed_default", &v, c);
                    }
                }
            }
            _ => {}
        }
    }
    // Integers inside default parameters are covered by changed_default; keep one of each.
    out.sort_by(|a, b| (a.start, a.end, &a.replacement).cmp(&(b.start, b.end, &b.replacement)));
    out.dedup_by(|a, b| a.start == b.start && a.end == b.end && a.replacement == b.replacement);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"def window(xs, k=2, strict=True):
    """Sliding windows."""
    out = []
    for i in range(len(xs) - k + 1):
        if i >= 0 and strict:
            out.append(xs[i:i + k])
    return out
"#;

    #[test]
    fn finds_each_operator_with_its_location() {
        let ms = mutants(SRC, "pkg/w.py");
        let has = |op: &str, repl: &str| ms.iter().any(|m| m.operator == op && m.replacement == repl);
        assert!(has("comparison_flip", ">"), "{ms:#?}");
        assert!(has("boolean_flip", "or"));
        assert!(has("inverted_condition", "not (i >= 0 and strict)"));
        assert!(has("off_by_one", "-"), "the + 1 in range()");
        assert!(has("changed_default", "3") && has("changed_default", "False"));
        assert!(has("removed_return", "return None"));
        assert!(has("removed_statement", "pass"));
        assert!(ms.iter().all(|m| m.function == "window"));
        let m = ms.iter().find(|m| m.operator == "comparison_flip").unwrap();
        assert_eq!(m.line, 5);
        assert!(m.apply(SRC).contains("if i > 0 and strict:"));
        // Every mutant still parses.
        for m in &ms {
            let mut p = Parser::new();
            p.set_language(&tree_sitter_python::LANGUAGE.into()).unwrap();
            assert!(!p.parse(m.apply(SRC), None).unwrap().root_node().has_error(), "{m:?}");
        }
        // The docstring is not touched.
        assert!(ms.iter().all(|m| !(m.start > 40 && m.end < 60)));
    }
}
