//! The one parser of libpq connection strings, used both to connect and to redact.
//!
//! Both spellings libpq accepts are read into one list of `key = value` parameters with
//! libpq's names: the URL form (`postgres[ql]://user:password@host1:port1,[::1]:port2/db?k=v`,
//! any number of hosts, percent-encoding in every part) and the key/value form (`host = a
//! password = 'a b' port=5432`, spaces around `=`, single quotes, `\` escapes). `${VAR}`
//! references are expanded *after* the string is split into its parts, into the part they
//! were written in, so a password holding `@`, `/`, `?`, `#` or `'` can never change where
//! the host is or leak into another field. `$$` is a literal `$`.
//!
//! Redaction is by structure: [`ConnInfo::redacted`] re-renders the parsed parameters with
//! every secret replaced, and a string that does not parse is never echoed back at all.
//! Errors name the part or key that is wrong, never a value (a value may be a password).
//! This module does no I/O and opens no socket.
//!
//! [`PgUrl`] (`url`) is the parsed string as the rest of pgferry holds it, and `tls` libpq's
//! `sslmode`/`sslrootcert`/`sslcert`/`sslkey` taken out of it (and the rustls connector that
//! honours them). `config` parses connection strings with it and `source` connects with it;
//! it depends on neither.

use std::fmt;

pub mod tls;
mod url;

pub use url::{redact_url, PgUrl};

/// Keys whose values are secrets: never rendered.
const SECRET_KEYS: &[&str] = &["password", "sslpassword"];

/// What a redacted secret reads as.
pub const REDACTED: &str = "<redacted>";

/// What [`redact`] prints for a string that does not parse: nothing of it can be trusted to
/// be free of a password.
pub const UNPARSEABLE: &str = "<connection string that does not parse, not shown>";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    #[error("the connection string is empty")]
    Empty,
    #[error("the key/value connection string has a word without `=` (word {word}); write key=value pairs, or a postgres:// URL")]
    MissingEquals { word: usize },
    #[error("the value of {key:?} opens a quote that is never closed")]
    UnterminatedQuote { key: String },
    #[error("{part} holds an invalid percent-encoding (a `%` not followed by two hex digits); write `%25` for a literal `%`")]
    Percent { part: &'static str },
    #[error("{part} is not UTF-8 once percent-decoded")]
    NotUtf8 { part: &'static str },
    #[error("{part} has an unterminated `${{`; write `$$` for a literal `$`")]
    UnterminatedVar { part: &'static str },
    #[error("{part} names an invalid environment variable {name:?} (letters, digits, `_`)")]
    BadVarName { part: &'static str, name: String },
    #[error("environment variable {name} (in {part}) is not set; set it or remove ${{{name}}}")]
    MissingVar { part: &'static str, name: String },
    #[error("the URL's query has a parameter without `=` (parameter {index})")]
    QueryPair { index: usize },
    #[error("the URL has an unclosed `[` in its host list")]
    Bracket,
    #[error("{key} is given twice")]
    Duplicate { key: String },
}

/// How the string was written; redaction renders it back in the same form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Url,
    KeyValue,
}

/// A parsed connection string: libpq parameter names and their decoded, expanded values.
/// `host` and `port` hold libpq's comma-separated lists. Debug and Display are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    form: Form,
    params: Vec<(String, String)>,
}

/// Looks up an environment variable (injected so tests need no process environment).
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A lookup that keeps `${NAME}` as written: for redacting a template.
fn keep_refs(name: &str) -> Option<String> {
    Some(format!("${{{name}}}"))
}

impl ConnInfo {
    /// Parses `raw` in either form, expanding `${VAR}` through `lookup`.
    pub fn parse(raw: &str, lookup: Lookup<'_>) -> Result<ConnInfo, ConnInfoError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(ConnInfoError::Empty);
        }
        let (form, params) = if let Some(rest) = trimmed
            .strip_prefix("postgresql://")
            .or_else(|| trimmed.strip_prefix("postgres://"))
        {
            (Form::Url, parse_url(rest, lookup)?)
        } else {
            (Form::KeyValue, parse_key_values(trimmed, lookup)?)
        };
        let mut seen = Vec::new();
        for (k, _) in &params {
            if seen.contains(&k) {
                return Err(ConnInfoError::Duplicate { key: k.clone() });
            }
            seen.push(k);
        }
        Ok(ConnInfo { form, params })
    }

    /// Parses `raw` with `${VAR}` references taken from the process environment.
    pub fn parse_env(raw: &str) -> Result<ConnInfo, ConnInfoError> {
        ConnInfo::parse(raw, &|name| std::env::var(name).ok())
    }

    pub fn form(&self) -> Form {
        self.form
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every parameter, in the order written (secrets included: never log them).
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// Removes and returns a parameter.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let i = self.params.iter().position(|(k, _)| k == key)?;
        Some(self.params.remove(i).1)
    }

    /// The hosts of the `host` list (brackets of IPv6 literals removed); empty when none.
    pub fn hosts(&self) -> Vec<String> {
        split_list(self.get("host"))
    }

    /// The `hostaddr` list.
    pub fn hostaddrs(&self) -> Vec<String> {
        split_list(self.get("hostaddr"))
    }

    /// The key/value form libpq and tokio-postgres read, every value quoted (secrets in
    /// clear: for handing to a client library only).
    pub fn to_key_values(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| format!("{k}={}", quote_value(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The string in the form it was written, every secret replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        let shown = |k: &str, v: &str| -> String {
            if SECRET_KEYS.contains(&k) {
                REDACTED.to_string()
            } else {
                v.to_string()
            }
        };
        match self.form {
            Form::KeyValue => self
                .params
                .iter()
                .map(|(k, v)| {
                    let v = shown(k, v);
                    if SECRET_KEYS.contains(&k.as_str()) {
                        format!("{k}={v}")
                    } else {
                        format!("{k}={}", quote_value(&v))
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            Form::Url => {
                let mut s = String::from("postgres://");
                if let Some(user) = self.get("user") {
                    s.push_str(&encode(user));
                }
                if self.get("password").is_some() {
                    s.push(':');
                    s.push_str(REDACTED);
                }
                if self.get("user").is_some() || self.get("password").is_some() {
                    s.push('@');
                }
                let hosts = self.hosts();
                let ports = split_list(self.get("port"));
                let n = hosts.len().max(ports.len());
                let mut spec = Vec::new();
                for i in 0..n {
                    let h = hosts.get(i).map(String::as_str).unwrap_or("");
                    let mut one = if h.contains(':') {
                        format!("[{h}]")
                    } else {
                        encode(h)
                    };
                    let port = if ports.len() == 1 {
                        ports.first()
                    } else {
                        ports.get(i)
                    };
                    if let Some(p) = port.filter(|p| !p.is_empty()) {
                        one.push(':');
                        one.push_str(&encode(p));
                    }
                    spec.push(one);
                }
                s.push_str(&spec.join(","));
                if let Some(db) = self.get("dbname") {
                    s.push('/');
                    s.push_str(&encode(db));
                }
                let rest: Vec<String> = self
                    .params
                    .iter()
                    .filter(|(k, _)| {
                        !matches!(k.as_str(), "user" | "password" | "host" | "port" | "dbname")
                    })
                    .map(|(k, v)| {
                        let v = shown(k, v);
                        if SECRET_KEYS.contains(&k.as_str()) {
                            format!("{}={v}", encode(k))
                        } else {
                            format!("{}={}", encode(k), encode(&v))
                        }
                    })
                    .collect();
                if !rest.is_empty() {
                    s.push('?');
                    s.push_str(&rest.join("&"));
                }
                s
            }
        }
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({})", self.redacted())
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Redacts any connection string: parsed (with `${VAR}` kept as written), re-rendered with
/// every secret replaced; a string that does not parse is not shown at all.
pub fn redact(raw: &str) -> String {
    match ConnInfo::parse(raw, &keep_refs) {
        Ok(info) => info.redacted(),
        Err(_) => UNPARSEABLE.to_string(),
    }
}

fn split_list(value: Option<&str>) -> Vec<String> {
    match value {
        None | Some("") => Vec::new(),
        Some(v) => v
            .split(',')
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .collect(),
    }
}

/// A key/value value, single-quoted with `\` and `'` escaped when it needs it: always safe
/// to re-parse.
fn quote_value(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '\'' | '\\' | '='));
    if plain {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Percent-encodes everything but unreserved characters (and `$`, `{`, `}` so templates and
/// kept references stay readable).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~${}".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Byte index of the first char of `s` matching `pred`, outside `${…}` references.
fn find_outside_vars(s: &str, pred: impl Fn(char) -> bool) -> Option<usize> {
    let mut in_var = false;
    let mut prev_dollar = false;
    for (i, c) in s.char_indices() {
        if in_var {
            if c == '}' {
                in_var = false;
            }
            prev_dollar = false;
            continue;
        }
        if prev_dollar && c == '{' {
            in_var = true;
            prev_dollar = false;
            continue;
        }
        if pred(c) {
            return Some(i);
        }
        prev_dollar = c == '$' && !prev_dollar;
    }
    None
}

/// Byte index of the last `c` of `s` outside `${…}` references.
fn rfind_outside_vars(s: &str, c: char) -> Option<usize> {
    let mut last = None;
    let mut from = 0;
    while let Some(i) = find_outside_vars(&s[from..], |x| x == c) {
        last = Some(from + i);
        from += i + c.len_utf8();
    }
    last
}

/// Splits `s` on `sep` outside `${…}` references.
fn split_outside_vars(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = find_outside_vars(rest, |x| x == sep) {
        out.push(&rest[..i]);
        rest = &rest[i + sep.len_utf8()..];
    }
    out.push(rest);
    out
}

/// Decodes one part: `%XX` (when `percent`), `$$`, and `${NAME}` looked up; the value of a
/// variable is inserted as is, never decoded or split.
fn decode(
    raw: &str,
    part: &'static str,
    percent: bool,
    lookup: Lookup<'_>,
) -> Result<String, ConnInfoError> {
    let bytes = raw.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if percent => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(ConnInfoError::Percent { part })?;
                out.push(hex);
                i += 3;
            }
            b'$' if bytes.get(i + 1) == Some(&b'$') => {
                out.push(b'$');
                i += 2;
            }
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                let body = &raw[i + 2..];
                let end = body
                    .find('}')
                    .ok_or(ConnInfoError::UnterminatedVar { part })?;
                let name = &body[..end];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(ConnInfoError::BadVarName {
                        part,
                        name: name.chars().take(40).collect(),
                    });
                }
                let value = lookup(name).ok_or_else(|| ConnInfoError::MissingVar {
                    part,
                    name: name.into(),
                })?;
                out.extend_from_slice(value.as_bytes());
                i += 2 + end + 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::NotUtf8 { part })
}

/// The part of a URL after `postgres://`.
fn parse_url(rest: &str, lookup: Lookup<'_>) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut params = Vec::new();
    // The query starts at the first `?`; the path at the first `/` before it.
    let (before_query, query) = match find_outside_vars(rest, |c| c == '?') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    // userinfo ends at the last `@` (a raw `@` in a password is then still read as libpq's
    // users expect), and the host list at the first `/` after it.
    let (userinfo, after_user) = match rfind_outside_vars(before_query, '@') {
        Some(i) => (Some(&before_query[..i]), &before_query[i + 1..]),
        None => (None, before_query),
    };
    let (hostspec, path) = match find_outside_vars(after_user, |c| c == '/') {
        Some(i) => (&after_user[..i], Some(&after_user[i + 1..])),
        None => (after_user, None),
    };
    if let Some(ui) = userinfo {
        let (user, password) = match find_outside_vars(ui, |c| c == ':') {
            Some(i) => (&ui[..i], Some(&ui[i + 1..])),
            None => (ui, None),
        };
        if !user.is_empty() {
            params.push(("user".into(), decode(user, "the URL's user", true, lookup)?));
        }
        if let Some(p) = password {
            params.push((
                "password".into(),
                decode(p, "the URL's password", true, lookup)?,
            ));
        }
    }
    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for one in split_outside_vars(hostspec, ',') {
            let (host, port) = if let Some(v6) = one.strip_prefix('[') {
                let end = v6.find(']').ok_or(ConnInfoError::Bracket)?;
                let after = &v6[end + 1..];
                (&v6[..end], after.strip_prefix(':'))
            } else {
                match rfind_outside_vars(one, ':') {
                    Some(i) => (&one[..i], Some(&one[i + 1..])),
                    None => (one, None),
                }
            };
            hosts.push(decode(host, "the URL's host", true, lookup)?);
            ports.push(match port {
                Some(p) => decode(p, "the URL's port", true, lookup)?,
                None => String::new(),
            });
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            params.push(("host".into(), hosts.join(",")));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            params.push(("port".into(), ports.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        params.push((
            "dbname".into(),
            decode(db, "the URL's database", true, lookup)?,
        ));
    }
    if let Some(q) = query {
        for (index, pair) in split_outside_vars(q, '&').into_iter().enumerate() {
            if pair.is_empty() {
                continue;
            }
            let Some(eq) = find_outside_vars(pair, |c| c == '=') else {
                return Err(ConnInfoError::QueryPair { index: index + 1 });
            };
            let key = decode(&pair[..eq], "a URL parameter's name", true, &|_| None)?;
            let value = decode(&pair[eq + 1..], "a URL parameter's value", true, lookup)?;
            // libpq's URL parameters may repeat what the URL's parts said; the parameter wins.
            params.retain(|(k, _)| *k != key);
            params.push((key, value));
        }
    }
    Ok(params)
}

/// The `key = value` form: spaces around `=`, single-quoted values, `\` escapes.
fn parse_key_values(raw: &str, lookup: Lookup<'_>) -> Result<Vec<(String, String)>, ConnInfoError> {
    let chars: Vec<char> = raw.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    let mut word = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            return Ok(out);
        }
        word += 1;
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '=' {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        skip_ws(&mut i);
        if key.is_empty() || i >= chars.len() || chars[i] != '=' {
            return Err(ConnInfoError::MissingEquals { word });
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = String::new();
        if chars.get(i) == Some(&'\'') {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(ConnInfoError::UnterminatedQuote { key }),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        if let Some(c) = chars.get(i + 1) {
                            value.push(*c);
                        }
                        i += 2;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' {
                    if let Some(c) = chars.get(i + 1) {
                        value.push(*c);
                    }
                    i += 2;
                } else {
                    value.push(chars[i]);
                    i += 1;
                }
            }
        }
        let part = if SECRET_KEYS.contains(&key.as_str()) {
            "the password"
        } else {
            "a key/value parameter"
        };
        out.push((key, decode(&value, part, false, lookup)?));
    }
}

#[cfg(test)]
mod tests;
