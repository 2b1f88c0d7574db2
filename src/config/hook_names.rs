//! The names and placeholders of `[[restore_target]] variables`: what validation accepts and
//! what `restore::hookvars` binds.

/// The variables pgferry binds itself; `[[restore_target]] variables` may not redefine them.
pub const BUILTIN: &[&str] = &["namespace", "database", "snapshot_id"];

/// The placeholders a `[[restore_target]] variables` value may hold.
pub const VALUE_PLACEHOLDERS: &[&str] = &["{namespace}", "{database}"];

/// A variable name pgferry accepts in config: an identifier, so that `pgferry.<name>` is a
/// valid setting name too (psql itself takes any letters, digits and `_`).
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= MAX_NAME_BYTES
}

/// PostgreSQL truncates identifiers (and so setting names) at 63 bytes; `pgferry.` takes 8.
pub const MAX_NAME_BYTES: usize = 55;
