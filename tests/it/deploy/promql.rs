//! Just enough PromQL lexing to list the metric names a query reads, and the metric names
//! pgferry declares in src/metrics.rs, so dashboards and rules can be checked against them.

use std::collections::BTreeSet;

/// Words that look like identifiers in PromQL but are not metric names.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// Clauses whose parenthesised list holds label names, not metrics.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects (Grafana variables allowed).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let cleaned = strip_non_metric_parts(expr);
    let chars: Vec<char> = cleaned.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let starts_ident = c.is_ascii_alphabetic() || c == '_' || c == ':';
        let after_number = i > 0 && (chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '.');
        let after_dollar = i > 0 && chars[i - 1] == '$';
        if !starts_ident || after_number || after_dollar {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len()
            && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
        {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        let is_call = j < chars.len() && chars[j] == '(';
        if !is_call && !KEYWORDS.contains(&word.as_str()) {
            names.insert(word);
        }
    }
    names
}

/// Removes string literals, label matchers `{...}`, ranges `[...]` and label lists
/// (`by (...)` and the like), which hold no metric names.
fn strip_non_metric_parts(expr: &str) -> String {
    let mut out = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                out.push(' ');
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                for d in chars.by_ref() {
                    if d == close {
                        break;
                    }
                }
                out.push(' ');
            }
            '(' if LABEL_LISTS.iter().any(|k| ends_with_word(&out, k)) => {
                // Drop the clause's keyword too, so the next `(` is not taken for its list.
                let keyword = LABEL_LISTS
                    .iter()
                    .find(|k| ends_with_word(&out, k))
                    .unwrap();
                out.truncate(out.trim_end().len() - keyword.len());
                for d in chars.by_ref() {
                    if d == ')' {
                        break;
                    }
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    out
}

fn ends_with_word(text: &str, word: &str) -> bool {
    let trimmed = text.trim_end();
    trimmed.ends_with(word)
        && trimmed[..trimmed.len() - word.len()]
            .chars()
            .last()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
}

/// Every metric name pgferry exports, read from src/metrics.rs: the declared names, plus the
/// `_bucket`, `_sum` and `_count` series of the histograms.
pub fn exported_metrics(metrics_rs: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = metrics_rs;
    while let Some(pos) = rest.find("\"pgferry_") {
        let tail = &rest[pos + 1..];
        let end = tail.find('"').expect("a closed string literal");
        let name = &tail[..end];
        let declared_by = &rest[..pos];
        let is_histogram = declared_by
            .rfind("Opts::new(")
            .is_some_and(|at| declared_by[..at].ends_with("Histogram"));
        names.insert(name.to_string());
        if is_histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn lexer_finds_metrics_and_ignores_the_rest() {
    let expr = r#"sum by (source, database) (increase(pgferry_backups_total{result="failure", x=~"a|b"}[$__rate_interval])) / on (source) group_left (le) max(pgferry_raw_bytes) > 2 * 3600 unless up offset 5m"#;
    let want: BTreeSet<String> = ["pgferry_backups_total", "pgferry_raw_bytes", "up"]
        .map(String::from)
        .into();
    assert_eq!(metric_names(expr), want);
}
