//! Snapshot choice: which committed snapshot a restore loads (`latest`, an id, or `--at`).
//!
//! Pure functions over catalog entries, so every rule is unit-tested. A snapshot's time is
//! when its data was read (the manifest's `started_at`, when pg_dump took its snapshot), not
//! its id: the id names the schedule slot, and a slot the daemon caught up late (slot 07:00
//! dumped at 07:39) holds data of 07:39, so `--at 07:30` must not pick it. "Latest" is the
//! snapshot whose data was read last. This module does no I/O and does not decide where the
//! snapshot is read from.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

use crate::schedule::parse_snapshot_id;
use crate::storage::catalog::SnapshotEntry;

/// How many snapshot ids an error lists before saying "and N more".
const LISTED_IDS: usize = 20;

/// Which snapshot the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotChoice {
    Latest,
    Id(String),
    /// The newest snapshot whose time is at or before this instant.
    At(DateTime<Utc>),
}

impl SnapshotChoice {
    /// From `--snapshot` (`latest` or an id) and `--at`; both at once is refused by clap.
    pub fn from_flags(snapshot: Option<&str>, at: Option<&str>) -> Result<SnapshotChoice, String> {
        if let Some(at) = at {
            return parse_at(at).map(SnapshotChoice::At);
        }
        match snapshot {
            None | Some("latest") => Ok(SnapshotChoice::Latest),
            Some(id) => Ok(SnapshotChoice::Id(id.to_string())),
        }
    }
}

impl std::fmt::Display for SnapshotChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotChoice::Latest => f.write_str("the latest snapshot"),
            SnapshotChoice::Id(id) => write!(f, "snapshot {id}"),
            SnapshotChoice::At(t) => {
                write!(
                    f,
                    "the newest snapshot whose data was read at or before {}",
                    t.to_rfc3339()
                )
            }
        }
    }
}

/// Parses `--at`: RFC 3339 (`2026-11-27T09:00:00+01:00`), or UTC `2026-11-27 09:00[:SS]`,
/// `2026-11-27T09:00[:SS]`, a snapshot id `20261127T090000Z`, or a bare date (midnight UTC
/// at its start is rarely meant, so a date means the end of that day).
pub fn parse_at(raw: &str) -> Result<DateTime<Utc>, String> {
    let s = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Some(t) = parse_snapshot_id(s) {
        return Ok(t);
    }
    let naive = s.trim_end_matches('Z');
    for fmt in [
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(naive, fmt) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(naive, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(23, 59, 59) {
            return Ok(t.and_utc());
        }
    }
    Err(format!(
        "--at {raw:?} is not a time; use RFC 3339 (2026-11-27T09:00:00Z) or UTC \"2026-11-27 09:00\""
    ))
}

/// The time a snapshot stands for: when its data was read.
pub fn snapshot_time(entry: &SnapshotEntry) -> DateTime<Utc> {
    entry.data_time()
}

/// What was picked, for the operator: "snapshot 20261127T070000Z (data read at
/// 2026-11-27T07:39:00Z)", and for `--at`, the time asked for.
pub fn describe(entry: &SnapshotEntry, choice: &SnapshotChoice) -> String {
    let picked = format!(
        "snapshot {} (data read at {})",
        entry.id(),
        entry.data_time().to_rfc3339()
    );
    match choice {
        SnapshotChoice::At(t) => format!(
            "--at {}: {picked}, the newest whose data was read at or before it",
            t.to_rfc3339()
        ),
        _ => picked,
    }
}

/// Why no snapshot matched; carries what exists so the message can list it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    #[error("no committed snapshot of {source_name}/{database} on any target; run `pgferry backup --source {source_name} --database {database}` first, or check `pgferry list --source {source_name} --database {database}`")]
    Empty {
        source_name: String,
        database: String,
    },
    #[error("{wanted} of {source_name}/{database} does not exist; available (newest first): {}; see `pgferry list --source {source_name} --database {database}`", list_ids(.available))]
    NotFound {
        source_name: String,
        database: String,
        wanted: String,
        available: Vec<String>,
    },
}

pub(crate) fn list_ids(ids: &[String]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    let mut s = ids
        .iter()
        .take(LISTED_IDS)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > LISTED_IDS {
        s.push_str(&format!(" and {} more", ids.len() - LISTED_IDS));
    }
    s
}

/// Picks the snapshot from `entries` (one database's, newest first as the catalog gives).
pub fn choose<'a>(
    entries: &[&'a SnapshotEntry],
    choice: &SnapshotChoice,
    source: &str,
    database: &str,
) -> Result<&'a SnapshotEntry, ChooseError> {
    if entries.is_empty() {
        return Err(ChooseError::Empty {
            source_name: source.into(),
            database: database.into(),
        });
    }
    // Ties (two snapshots read in the same instant): the greater id.
    let newest = |e: &&&SnapshotEntry| (snapshot_time(e), e.manifest.snapshot_id.clone());
    let found = match choice {
        SnapshotChoice::Latest => entries.iter().max_by_key(newest),
        SnapshotChoice::Id(id) => entries.iter().find(|e| e.manifest.snapshot_id == *id),
        SnapshotChoice::At(t) => entries
            .iter()
            .filter(|e| snapshot_time(e) <= *t)
            .max_by_key(newest),
    };
    found.copied().ok_or_else(|| ChooseError::NotFound {
        source_name: source.into(),
        database: database.into(),
        wanted: choice.to_string(),
        available: entries
            .iter()
            .map(|e| {
                format!(
                    "{} (data read at {})",
                    e.manifest.snapshot_id,
                    e.data_time().format("%Y-%m-%d %H:%M:%SZ")
                )
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::manifest::tests::sample;

    fn entry(id: &str) -> SnapshotEntry {
        let mut m = sample();
        m.snapshot_id = id.into();
        m.started_at = parse_snapshot_id(id).unwrap();
        SnapshotEntry {
            manifest: m,
            targets: vec!["a".into()],
            verify: None,
            objects: Default::default(),
            disagreeing: Default::default(),
        }
    }

    /// A snapshot of slot `id` whose data was read at `read`.
    fn late(id: &str, read: &str) -> SnapshotEntry {
        let mut e = entry(id);
        e.manifest.started_at = utc(read);
        e
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn at_formats() {
        let nine = utc("2026-11-27T09:00:00Z");
        assert_eq!(parse_at("2026-11-27 09:00").unwrap(), nine);
        assert_eq!(parse_at("2026-11-27T09:00:00Z").unwrap(), nine);
        assert_eq!(parse_at("2026-11-27T10:00:00+01:00").unwrap(), nine);
        assert_eq!(parse_at("2026-11-27 09:00:00").unwrap(), nine);
        assert_eq!(parse_at("20261127T090000Z").unwrap(), nine);
        assert_eq!(parse_at("2026-11-27").unwrap(), utc("2026-11-27T23:59:59Z"));
        let err = parse_at("yesterday").unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
    }

    #[test]
    fn flags() {
        assert_eq!(
            SnapshotChoice::from_flags(None, None).unwrap(),
            SnapshotChoice::Latest
        );
        assert_eq!(
            SnapshotChoice::from_flags(Some("latest"), None).unwrap(),
            SnapshotChoice::Latest
        );
        assert_eq!(
            SnapshotChoice::from_flags(Some("20261127T090000Z"), None).unwrap(),
            SnapshotChoice::Id("20261127T090000Z".into())
        );
        assert!(SnapshotChoice::from_flags(None, Some("nope")).is_err());
    }

    #[test]
    fn chooses_latest_id_and_at() {
        let (a, b, c) = (
            entry("20261127T100000Z"),
            entry("20261127T090000Z"),
            entry("20261127T080000Z"),
        );
        let all = vec![&a, &b, &c];
        let pick = |ch: SnapshotChoice| choose(&all, &ch, "prod", "acme").map(|e| e.id());
        assert_eq!(pick(SnapshotChoice::Latest), Ok("20261127T100000Z"));
        assert_eq!(
            pick(SnapshotChoice::Id("20261127T080000Z".into())),
            Ok("20261127T080000Z")
        );
        // Exactly at a slot: that slot. Between slots: the one before.
        assert_eq!(
            pick(SnapshotChoice::At(utc("2026-11-27T09:00:00Z"))),
            Ok("20261127T090000Z")
        );
        assert_eq!(
            pick(SnapshotChoice::At(utc("2026-11-27T09:59:59Z"))),
            Ok("20261127T090000Z")
        );
        assert_eq!(
            pick(SnapshotChoice::At(utc("2030-01-01T00:00:00Z"))),
            Ok("20261127T100000Z")
        );
        let before = pick(SnapshotChoice::At(utc("2026-11-27T07:00:00Z"))).unwrap_err();
        assert!(matches!(before, ChooseError::NotFound { .. }));
        let unknown = pick(SnapshotChoice::Id("20200101T000000Z".into())).unwrap_err();
        let msg = unknown.to_string();
        assert!(
            msg.contains("20261127T100000Z (data read at 2026-11-27 10:00:00Z), 20261127T090000Z"),
            "{msg}"
        );
        assert!(
            msg.contains("pgferry list --source prod --database acme"),
            "{msg}"
        );
    }

    #[test]
    fn time_is_when_the_data_was_read() {
        // Slot 07:00 caught up at 07:39; a manual snapshot at 07:18; slot 06:00 on time.
        let (slot, manual, six) = (
            late("20261127T070000Z", "2026-11-27T07:39:00Z"),
            entry("20261127T071800Z"),
            late("20261127T060000Z", "2026-11-27T06:00:05Z"),
        );
        let all = vec![&manual, &slot, &six];
        let pick = |ch: SnapshotChoice| choose(&all, &ch, "prod", "acme").map(|e| e.id());
        assert_eq!(pick(SnapshotChoice::Latest), Ok("20261127T070000Z"));
        let at = SnapshotChoice::At(utc("2026-11-27T07:30:00Z"));
        assert_eq!(pick(at.clone()), Ok("20261127T071800Z"));
        assert_eq!(
            pick(SnapshotChoice::At(utc("2026-11-27T07:10:00Z"))),
            Ok("20261127T060000Z")
        );
        let said = describe(&manual, &at);
        assert!(said.contains("--at 2026-11-27T07:30:00+00:00"), "{said}");
        assert!(
            said.contains("snapshot 20261127T071800Z (data read at 2026-11-27T07:18:00+00:00)"),
            "{said}"
        );
    }

    #[test]
    fn empty_history() {
        let err = choose(&[], &SnapshotChoice::Latest, "prod", "acme").unwrap_err();
        assert_eq!(
            err,
            ChooseError::Empty {
                source_name: "prod".into(),
                database: "acme".into()
            }
        );
        assert!(err.to_string().contains("pgferry list"));
    }
}
