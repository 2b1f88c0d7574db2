//! Companion files: a directory per database (Odoo's filestore) that travels with its dump.
//!
//! `[[source]] files = "/mnt/filestore/filestore/{database}"` names, per database, a directory
//! that each backup run archives (tar, zstd, age when encryption is on) beside the dump, as
//! `<snapshot_id>-<run>.files.tar.zst[.age]`, committed by the same manifest (`files`).
//! `[[restore_target]] files` is where a restore puts them: extracted beside the destination's
//! directory under a temporary name and swapped in together with the database.
//!
//! Both settings are a [`FilesTemplate`]: an absolute directory whose last segment is exactly
//! `{database}`, so every database's directory is a sibling of the others and a restore's
//! temporary directory is on the same filesystem as the one it replaces (one `rename`).

pub mod pack;
pub mod unpack;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The placeholder a [`FilesTemplate`] ends with.
pub const DATABASE_PLACEHOLDER: &str = "{database}";

/// `<parent>/{database}`: where the companion files of each database are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesTemplate {
    parent: PathBuf,
}

/// A database whose name cannot be a directory name (`/`, `.`, `..`, NUL, empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("database {0:?} cannot name a directory (its name holds '/', is '.' or '..', or is empty); its companion files are not read or written")]
pub struct UnsafeName(pub String);

impl FilesTemplate {
    /// Parses `raw` (already resolved against the config's directory): absolute, ending in
    /// `/{database}`, with no other placeholder and no `.`/`..` segment.
    pub fn parse(raw: &Path) -> Result<FilesTemplate, String> {
        let text = raw.to_string_lossy();
        let Some(parent) = text.strip_suffix(&format!("/{DATABASE_PLACEHOLDER}")) else {
            return Err(format!(
                "{text:?} must end with /{DATABASE_PLACEHOLDER}: each database's files are in \
                 their own directory, named after the database (Odoo: \
                 \"<data_dir>/filestore/{DATABASE_PLACEHOLDER}\")"
            ));
        };
        if parent.contains('{') || parent.contains('}') {
            return Err(format!(
                "{text:?}: only the last segment may be a placeholder, and only \
                 {DATABASE_PLACEHOLDER}"
            ));
        }
        let parent = PathBuf::from(if parent.is_empty() { "/" } else { parent });
        if !parent.is_absolute() {
            return Err(format!("{text:?} must be an absolute path"));
        }
        if parent
            .to_string_lossy()
            .split('/')
            .any(|s| s == "." || s == "..")
        {
            return Err(format!("{text:?} must not hold '.' or '..' segments"));
        }
        Ok(FilesTemplate { parent })
    }

    /// The directory holding every database's directory.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// The directory of `database`'s files.
    pub fn dir_for(&self, database: &str) -> Result<PathBuf, UnsafeName> {
        if !is_directory_name(database) {
            return Err(UnsafeName(database.to_string()));
        }
        Ok(self.parent.join(database))
    }
}

/// Whether `name` is one path segment naming an entry of a directory.
pub fn is_directory_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

impl fmt::Display for FilesTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{DATABASE_PLACEHOLDER}",
            self.parent.display().to_string().trim_end_matches('/')
        )
    }
}

impl Serialize for FilesTemplate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_end_with_the_database() {
        let t = FilesTemplate::parse(Path::new("/mnt/filestore/filestore/{database}")).unwrap();
        assert_eq!(t.parent(), Path::new("/mnt/filestore/filestore"));
        assert_eq!(
            t.dir_for("acme").unwrap(),
            PathBuf::from("/mnt/filestore/filestore/acme")
        );
        assert_eq!(t.to_string(), "/mnt/filestore/filestore/{database}");
        let root = FilesTemplate::parse(Path::new("/{database}")).unwrap();
        assert_eq!(root.dir_for("x").unwrap(), PathBuf::from("/x"));
        assert_eq!(root.to_string(), "/{database}");
        for bad in [
            "/mnt/filestore",
            "/mnt/{database}/filestore",
            "/mnt/{namespace}/{database}",
            "mnt/{database}",
            "/mnt/../etc/{database}",
            "/mnt/./x/{database}",
            "/mnt/x{database}",
            "{database}",
        ] {
            assert!(FilesTemplate::parse(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_plain_names_become_directories() {
        let t = FilesTemplate::parse(Path::new("/fs/{database}")).unwrap();
        for bad in ["", ".", "..", "a/b", "../etc", "a\0b"] {
            assert_eq!(t.dir_for(bad), Err(UnsafeName(bad.into())), "{bad:?}");
        }
        for good in ["acme", "a b", "café", "..x", "a.b", "-x"] {
            assert!(t.dir_for(good).is_ok(), "{good:?}");
        }
    }
}
