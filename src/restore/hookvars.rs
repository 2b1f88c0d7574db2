//! The variables a restore hook sees, and their psql-style substitution into its SQL.
//!
//! Hooks run through tokio-postgres (one `batch_execute` per file, see [`super::swap`]), not
//! psql, so pgferry does psql's variable interpolation itself, with psql's rules: `:name` is
//! replaced by the value as is, `:'name'` by the value as an SQL literal and `:"name"` by the
//! value as an identifier (both escaped as libpq's `PQescapeLiteral`/`PQescapeIdentifier` do,
//! so a quote in a value cannot end the literal), `:{?name}` by `TRUE` or `FALSE`. Nothing is
//! replaced inside string literals, quoted identifiers, dollar-quoted bodies (`DO $$ … $$`) or
//! comments, `::` is a cast, and a variable that is not set is left as written, as psql
//! leaves it (the server then reports a syntax error at the `:`). Since psql never
//! substitutes inside a `DO` body, every variable is also set for the hook's transaction as
//! the setting `pgferry.<name>` (`current_setting('pgferry.base_url', true)`, NULL when not
//! set). This module does not talk to the server.

use std::collections::BTreeMap;

use super::guard::quote_ident;
use crate::config::RestoreTargetConfig;
// The names' rules are config's (validation checks them); substitution is here.
pub use crate::config::hook_names::{valid_name, BUILTIN, MAX_NAME_BYTES, VALUE_PLACEHOLDERS};

/// Name → value, for one restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookVars(BTreeMap<String, String>);

impl HookVars {
    /// The built-in variables for a restore into `database` of `namespace`, plus the
    /// target's own `variables` with `{namespace}` and `{database}` expanded.
    pub fn for_restore(
        target: &RestoreTargetConfig,
        namespace: &str,
        database: &str,
        snapshot_id: &str,
    ) -> HookVars {
        let mut vars: BTreeMap<String, String> = target
            .variables
            .iter()
            .map(|(k, v)| (k.clone(), expand(v, namespace, database)))
            .collect();
        vars.insert("namespace".into(), namespace.into());
        vars.insert("database".into(), database.into());
        vars.insert("snapshot_id".into(), snapshot_id.into());
        HookVars(vars)
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> HookVars {
        HookVars(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `sql` with the variables substituted, and the names referenced but not set (left as
    /// written), each once.
    pub fn substitute(&self, sql: &str) -> (String, Vec<String>) {
        substitute(sql, |name| self.get(name))
    }
}

/// Replaces `{namespace}` and `{database}` in one pass (a value is never expanded again).
pub fn expand(template: &str, namespace: &str, database: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        rest = &rest[open..];
        if let Some(after) = rest.strip_prefix("{namespace}") {
            out.push_str(namespace);
            rest = after;
        } else if let Some(after) = rest.strip_prefix("{database}") {
            out.push_str(database);
            rest = after;
        } else {
            out.push('{');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// psql's `variable_char`: ASCII letters, digits, `_` and any non-ASCII byte.
fn variable_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// The first character of an identifier or of a dollar-quote tag.
fn ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

/// Later characters of an identifier (which may hold `$`, so `a$b$` is no dollar quote).
fn ident_cont(b: u8) -> bool {
    variable_char(b) || b == b'$'
}

/// `value` as an SQL literal, as `PQescapeLiteral` writes it: quotes doubled, and when the
/// value holds a backslash, backslashes doubled inside ` E'…'` (right whatever
/// `standard_conforming_strings` is).
pub fn quote_literal(value: &str) -> String {
    let backslash = value.contains('\\');
    let mut out = String::with_capacity(value.len() + 4);
    if backslash {
        out.push_str(" E");
    }
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The index just past the quoted text opening at `start` (`b[start]` is the quote), where
/// the quote doubled stands for itself and, with `backslash`, `\x` escapes any `x`.
fn skip_quoted(b: &[u8], start: usize, quote: u8, backslash: bool) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslash => i += 2,
            c if c == quote => {
                if b.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return i + 1;
                }
            }
            _ => i += 1,
        }
    }
    b.len()
}

/// psql's interpolation over `sql` with `lookup`; see the module documentation.
pub fn substitute<'v>(
    sql: &str,
    lookup: impl Fn(&str) -> Option<&'v str>,
) -> (String, Vec<String>) {
    let b = sql.as_bytes();
    let n = b.len();
    let mut out = String::with_capacity(n);
    let mut missing: Vec<String> = Vec::new();
    let mut copied = 0;
    let mut i = 0;
    while i < n {
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map_or(n, |p| i + p + 1);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Block comments nest in PostgreSQL.
                let mut depth = 1;
                i += 2;
                while i < n && depth > 0 {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => i = skip_quoted(b, i, b'\'', false),
            b'"' => i = skip_quoted(b, i, b'"', false),
            b'$' => {
                // `$1` is a parameter; `$tag$ … $tag$` a dollar-quoted string.
                let mut j = i + 1;
                if j < n && ident_start(b[j]) {
                    j += 1;
                    while j < n && variable_char(b[j]) {
                        j += 1;
                    }
                }
                if b.get(j) == Some(&b'$') {
                    let tag = &sql[i..=j];
                    i = sql[j + 1..].find(tag).map_or(n, |p| j + 1 + p + tag.len());
                } else {
                    i += 1;
                }
            }
            c if ident_start(c) => {
                let start = i;
                while i < n && ident_cont(b[i]) {
                    i += 1;
                }
                // E'…' is the one string form where a backslash escapes the quote.
                if i - start == 1 && (c == b'e' || c == b'E') && b.get(i) == Some(&b'\'') {
                    i = skip_quoted(b, i, b'\'', true);
                }
            }
            b'0'..=b'9' => {
                // A number (or a number glued to letters, `1e5`): never a string prefix.
                while i < n && ident_cont(b[i]) {
                    i += 1;
                }
            }
            b':' => {
                let Some(reference) = variable_at(b, i) else {
                    // `::` is a cast; a lone `:` (array slices) stays.
                    i += if b.get(i + 1) == Some(&b':') { 2 } else { 1 };
                    continue;
                };
                let name = &sql[reference.name.clone()];
                let replacement = match (lookup(name), reference.form) {
                    (value, Form::Defined) => {
                        Some(if value.is_some() { "TRUE" } else { "FALSE" }.to_string())
                    }
                    (Some(v), Form::Raw) => Some(v.to_string()),
                    (Some(v), Form::Literal) => Some(quote_literal(v)),
                    (Some(v), Form::Ident) => Some(quote_ident(v)),
                    (None, _) => {
                        if !missing.iter().any(|m| m == name) {
                            missing.push(name.to_string());
                        }
                        None
                    }
                };
                if let Some(r) = replacement {
                    out.push_str(&sql[copied..i]);
                    out.push_str(&r);
                    copied = reference.end;
                }
                i = reference.end;
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[copied..]);
    (out, missing)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `:name`
    Raw,
    /// `:'name'`
    Literal,
    /// `:"name"`
    Ident,
    /// `:{?name}`
    Defined,
}

struct Reference {
    name: std::ops::Range<usize>,
    form: Form,
    /// Just past the reference.
    end: usize,
}

/// The variable reference starting at the `:` at `i`, if there is one.
fn variable_at(b: &[u8], i: usize) -> Option<Reference> {
    let name_from = |start: usize| {
        let mut j = start;
        while j < b.len() && variable_char(b[j]) {
            j += 1;
        }
        (j > start).then_some(j)
    };
    match *b.get(i + 1)? {
        q @ (b'\'' | b'"') => {
            let end = name_from(i + 2)?;
            (b.get(end) == Some(&q)).then(|| Reference {
                name: i + 2..end,
                form: if q == b'\'' {
                    Form::Literal
                } else {
                    Form::Ident
                },
                end: end + 1,
            })
        }
        b'{' if b.get(i + 2) == Some(&b'?') => {
            let end = name_from(i + 3)?;
            (b.get(end) == Some(&b'}')).then_some(Reference {
                name: i + 3..end,
                form: Form::Defined,
                end: end + 1,
            })
        }
        c if variable_char(c) => {
            let end = name_from(i + 1)?;
            Some(Reference {
                name: i + 1..end,
                form: Form::Raw,
                end,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> HookVars {
        HookVars::from_pairs([
            ("namespace", "staging-acme"),
            ("database", "acme"),
            ("base_url", "https://x.example"),
            ("evil", "a'); DROP TABLE t; --"),
            ("bs", r"c:\temp\'x"),
            ("col", "we\"ird"),
        ])
    }

    fn sub(sql: &str) -> String {
        vars().substitute(sql).0
    }

    #[test]
    fn the_three_forms_are_replaced() {
        assert_eq!(
            sub("SELECT :'namespace', :\"database\", :database;"),
            "SELECT 'staging-acme', \"acme\", acme;"
        );
        assert_eq!(sub("x=:'base_url'"), "x='https://x.example'");
        assert_eq!(sub("SELECT :{?base_url}, :{?nope}"), "SELECT TRUE, FALSE");
    }

    #[test]
    fn quotes_in_values_cannot_leave_the_literal() {
        assert_eq!(sub(":'evil'"), "'a''); DROP TABLE t; --'");
        assert_eq!(sub(":\"col\""), "\"we\"\"ird\"");
        // PQescapeLiteral: backslashes doubled inside E'…'.
        assert_eq!(sub(":'bs'"), r" E'c:\\temp\\''x'");
        assert_eq!(quote_literal(""), "''");
    }

    #[test]
    fn nothing_is_replaced_inside_strings_identifiers_comments_or_dollar_quotes() {
        for sql in [
            "SELECT ':namespace', ':''namespace'''",
            "SELECT \":namespace\"",
            "-- :namespace\n",
            "/* :namespace /* nested :database */ still :namespace */",
            "DO $$ BEGIN PERFORM :'namespace'; END $$",
            "DO $body$ :namespace $x$ :database $body$",
            r"SELECT E'it\'s :namespace'",
        ] {
            assert_eq!(sub(sql), sql, "{sql}");
        }
        assert_eq!(
            sub("DO $$ :a $$; SELECT :'database'; -- :x\nSELECT :database"),
            "DO $$ :a $$; SELECT 'acme'; -- :x\nSELECT acme"
        );
        // A standard string ends at the quote even after a backslash.
        assert_eq!(sub(r"SELECT '\', :'database'"), r"SELECT '\', 'acme'");
    }

    #[test]
    fn casts_parameters_and_identifiers_with_dollars_are_not_variables() {
        assert_eq!(
            sub("SELECT 1::text, now()::date"),
            "SELECT 1::text, now()::date"
        );
        assert_eq!(sub("SELECT $1, :database"), "SELECT $1, acme");
        assert_eq!(sub("SELECT a$b$ + :database"), "SELECT a$b$ + acme");
        assert_eq!(sub("SELECT e.x, :'database'"), "SELECT e.x, 'acme'");
    }

    #[test]
    fn unset_variables_are_left_as_written_and_reported() {
        let (out, missing) = vars().substitute("SELECT :'nope', :nope, :\"other\", a[1:2]");
        assert_eq!(out, "SELECT :'nope', :nope, :\"other\", a[1:2]");
        assert_eq!(missing, vec!["nope", "other", "2"]);
        // Malformed references stay too.
        assert_eq!(sub("SELECT :'database, :"), "SELECT :'database, :");
    }

    #[test]
    fn non_ascii_text_survives() {
        assert_eq!(
            sub("SELECT 'é', ñ, :'database' -- ü"),
            "SELECT 'é', ñ, 'acme' -- ü"
        );
    }

    #[test]
    fn values_expand_namespace_and_database_once() {
        assert_eq!(
            expand(
                "https://{namespace}.s.example/{database}/{other}",
                "n-1",
                "{namespace}"
            ),
            "https://n-1.s.example/{namespace}/{other}"
        );
    }

    #[test]
    fn names_are_identifiers() {
        assert!(valid_name("base_url") && valid_name("_x1"));
        assert!(!valid_name("1x") && !valid_name("a-b") && !valid_name("") && !valid_name("é"));
        assert!(!valid_name(&"a".repeat(MAX_NAME_BYTES + 1)));
    }
}
