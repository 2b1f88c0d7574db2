//! Where a key sits in the config file, for messages: `source[1].name` → its line.
//!
//! Validation works on the serde structs, which have no positions; it names keys by path (as
//! [`super::validate`] does) and this module finds the line in the text, so every config
//! error and warning can say `file:line` without spans threaded through every struct.

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The 1-based line of `key` in `text`. `key` is a dotted path with `[i]` indexes into arrays
/// (`target[1].name`, `restore_target[0].hooks[2]`). If the key is not in the file (it took
/// its default), the line of the nearest enclosing entry that is; `None` if not even the
/// first segment is there.
pub(super) fn line_of(text: &str, key: &str) -> Option<usize> {
    let root = DeTable::parse(text).ok()?;
    let mut table: &DeTable = root.get_ref();
    let mut found: Option<usize> = None;
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        let (name, index) = split_index(segment);
        let Some((k, mut value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        found = Some(k.span().start);
        if let Some(i) = index {
            let Some(item) = element(value, i) else {
                break;
            };
            found = Some(item.span().start);
            value = item;
        }
        match value.get_ref() {
            DeValue::Table(t) if segments.peek().is_some() => table = t,
            _ => break,
        }
    }
    found.map(|offset| text[..offset.min(text.len())].matches('\n').count() + 1)
}

/// `hooks[2]` → (`hooks`, Some(2)); `name` → (`name`, None).
fn split_index(segment: &str) -> (&str, Option<usize>) {
    match segment.strip_suffix(']').and_then(|s| s.split_once('[')) {
        Some((name, i)) => (name, i.parse().ok()),
        None => (segment, None),
    }
}

fn element<'a, 'i>(value: &'a Spanned<DeValue<'i>>, i: usize) -> Option<&'a Spanned<DeValue<'i>>> {
    match value.get_ref() {
        DeValue::Array(a) => a.get(i),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const TEXT: &str = r#"[pipeline]
zstd_level = 3

[[source]]
name = "a"

[[source]]
name = "b"
retention = { keep_last = 2 }

[[restore_target]]
namespace = "x"
hooks = [
  "one.sql",
  "two.sql",
]
"#;

    #[test]
    fn finds_keys_array_entries_and_falls_back_to_the_enclosing_entry() {
        assert_eq!(line_of(TEXT, "pipeline.zstd_level"), Some(2));
        assert_eq!(line_of(TEXT, "source[1].name"), Some(8));
        assert_eq!(line_of(TEXT, "source[1].retention"), Some(9));
        assert_eq!(line_of(TEXT, "source[1].retention.keep_last"), Some(9));
        assert_eq!(line_of(TEXT, "restore_target[0].hooks[1]"), Some(15));
        // Defaults: the enclosing section or entry.
        assert_eq!(line_of(TEXT, "pipeline.stall_timeout"), Some(1));
        assert_eq!(line_of(TEXT, "source[0].schedule"), Some(4));
        assert_eq!(line_of(TEXT, "daemon.listen"), None);
        assert_eq!(line_of("not toml [", "daemon.listen"), None);
    }
}
