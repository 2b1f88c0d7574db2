//! Which databases of a source a backup takes: the one selection rule, used by
//! `pgferry backup`, the daemon's schedule and its HTTP API alike.
//!
//! A database is selected when the source's `databases` globs match it and its `exclude`
//! globs do not, or when it is named explicitly (`--database`). pg_dump cannot take a
//! database that refuses connections (`datallowconn = false`) or one that is a template
//! (`datistemplate`): such a database matched by a glob is skipped and named with why, never
//! silently; one named explicitly is an error, and so is an explicit name the server does not
//! have. [`select`] is pure; [`discover`] reads `pg_database` and applies it.

use tokio_postgres::Client;

use super::SourceError;
use crate::config::SourceConfig;

/// One row of `pg_database`, as far as selection cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRow {
    pub name: String,
    pub allow_connections: bool,
    pub is_template: bool,
}

/// Why a database that would be selected cannot be backed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("it does not allow connections (datallowconn = false), so pg_dump cannot read it; allow connections, or add it to the source's exclude to silence this")]
    NoConnections,
    #[error("it is a template database (datistemplate); unmark it (ALTER DATABASE … IS_TEMPLATE false) to back it up, or add it to the source's exclude to silence this")]
    Template,
}

/// A database left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub database: String,
    pub reason: SkipReason,
}

/// What a source's selection came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The databases to back up, sorted.
    pub databases: Vec<String>,
    /// Databases the globs match that cannot be backed up, with why.
    pub skipped: Vec<Skipped>,
    /// Explicit names this server does not have.
    pub missing: Vec<String>,
    /// Explicit names this server has but that cannot be backed up, with why.
    pub refused: Vec<Skipped>,
    /// Every database name on the server, for messages.
    pub available: Vec<String>,
}

/// Applies `source`'s globs, or the `explicit` names when there are any, to `rows`.
pub fn select(source: &SourceConfig, rows: &[DatabaseRow], explicit: &[String]) -> Selection {
    let mut out = Selection {
        available: rows.iter().map(|r| r.name.clone()).collect(),
        ..Selection::default()
    };
    let reason = |r: &DatabaseRow| {
        if r.is_template {
            Some(SkipReason::Template)
        } else if !r.allow_connections {
            Some(SkipReason::NoConnections)
        } else {
            None
        }
    };
    if explicit.is_empty() {
        for r in rows.iter().filter(|r| source.selects(&r.name)) {
            match reason(r) {
                None => out.databases.push(r.name.clone()),
                Some(reason) => out.skipped.push(Skipped {
                    database: r.name.clone(),
                    reason,
                }),
            }
        }
    } else {
        for name in explicit {
            match rows.iter().find(|r| r.name == *name) {
                None => out.missing.push(name.clone()),
                Some(r) => match reason(r) {
                    None => out.databases.push(r.name.clone()),
                    Some(reason) => out.refused.push(Skipped {
                        database: r.name.clone(),
                        reason,
                    }),
                },
            }
        }
    }
    out.databases.sort();
    out.databases.dedup();
    out
}

/// Every database of the server `client` is connected to.
pub async fn databases(
    client: &Client,
    source: &SourceConfig,
) -> Result<Vec<DatabaseRow>, SourceError> {
    let rows = client
        .query(
            "SELECT datname, datallowconn, datistemplate FROM pg_database ORDER BY datname",
            &[],
        )
        .await
        .map_err(|source_err| SourceError::Query {
            url: source.url.redacted(),
            source: source_err,
        })?;
    Ok(rows
        .iter()
        .map(|r| DatabaseRow {
            name: r.get(0),
            allow_connections: r.get(1),
            is_template: r.get(2),
        })
        .collect())
}

/// The databases of `source` to back up (its globs, or the `explicit` names), read from the
/// server `client` is connected to.
pub async fn discover(
    client: &Client,
    source: &SourceConfig,
    explicit: &[String],
) -> Result<Selection, SourceError> {
    Ok(select(source, &databases(client, source).await?, explicit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn source(globs: &str) -> SourceConfig {
        let text = format!(
            "[[source]]\nname = \"prod\"\nurl = \"postgres://u@h/postgres\"\n{globs}\n[[target]]\nname = \"a\"\nurl = \"file:///tmp/a\"\n"
        );
        Config::from_str_at(&text, std::path::Path::new("/x.toml"))
            .unwrap()
            .sources
            .remove(0)
    }

    fn rows() -> Vec<DatabaseRow> {
        let row = |name: &str, allow_connections, is_template| DatabaseRow {
            name: name.into(),
            allow_connections,
            is_template,
        };
        vec![
            row("acme", true, false),
            row("archive", false, false),
            row("globex", true, false),
            row("postgres", true, false),
            row("shop_tpl", true, true),
            row("template0", false, true),
            row("template1", true, true),
        ]
    }

    fn names(s: &[Skipped]) -> Vec<(&str, SkipReason)> {
        s.iter().map(|k| (k.database.as_str(), k.reason)).collect()
    }

    #[test]
    fn globs_select_and_undumpable_matches_are_named() {
        let s = select(&source(""), &rows(), &[]);
        assert_eq!(s.databases, vec!["acme", "globex"]);
        assert_eq!(
            names(&s.skipped),
            vec![
                ("archive", SkipReason::NoConnections),
                ("shop_tpl", SkipReason::Template)
            ]
        );
        assert!(s.missing.is_empty() && s.refused.is_empty());
        let s = select(&source("databases = [\"a*\"]"), &rows(), &[]);
        assert_eq!(s.databases, vec!["acme"]);
        assert_eq!(names(&s.skipped).len(), 1);
    }

    #[test]
    fn explicit_names_must_exist_and_be_dumpable() {
        let explicit = ["globex", "nosuch", "template1", "postgres", "globex"].map(String::from);
        let s = select(&source(""), &rows(), &explicit);
        // An explicit name overrides the globs (postgres is excluded by default).
        assert_eq!(s.databases, vec!["globex", "postgres"]);
        assert_eq!(s.missing, vec!["nosuch"]);
        assert_eq!(names(&s.refused), vec![("template1", SkipReason::Template)]);
        assert!(s.skipped.is_empty());
    }
}
