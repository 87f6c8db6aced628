//! How close a patch is to the gold patch (`R_sim`): a token-level LCS ratio over the changed
//! lines of two unified diffs.

/// Tokens of the changed lines of a unified diff, with the file each belongs to.
fn changed_tokens(patch: &str) -> Vec<String> {
    let mut out = vec![];
    for l in patch.lines() {
        if l.starts_with("+++") || l.starts_with("---") {
            out.push(
                l.trim_start_matches(['+', '-', ' ']).trim_start_matches("a/").trim_start_matches("b/").to_string(),
            );
            continue;
        }
        let Some(body) = l.strip_prefix('+').map(|b| ("+", b)).or_else(|| l.strip_prefix('-').map(|b| ("-", b))) else {
            continue;
        };
        for w in body.1.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()) {
            out.push(format!("{}{w}", body.0));
        }
        for c in body.1.chars().filter(|c| !c.is_alphanumeric() && *c != '_' && !c.is_whitespace()) {
            out.push(format!("{}{c}", body.0));
        }
    }
    out
}

/// Similarity of two patches in [0, 1]: `2·LCS / (|a| + |b|)` over the tokens of their changed
/// lines (difflib's ratio, on tokens). Each side is cut to 4000 tokens.
pub fn patch_similarity(a: &str, b: &str) -> f64 {
    let (mut x, mut y) = (changed_tokens(a), changed_tokens(b));
    x.truncate(4000);
    y.truncate(4000);
    if x.is_empty() || y.is_empty() {
        return if x.is_empty() && y.is_empty() { 1.0 } else { 0.0 };
    }
    let mut prev = vec![0u32; y.len() + 1];
    let mut cur = vec![0u32; y.len() + 1];
    for xi in &x {
        for (j, yj) in y.iter().enumerate() {
            cur[j + 1] = if xi == yj { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    2.0 * prev[y.len()] as f64 / (x.len() + y.len()) as f64
}
