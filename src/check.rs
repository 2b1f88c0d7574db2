//! `check`: proves, without restoring, that every copy of every expected snapshot is there.
//!
//! The catalog says which snapshots exist and which targets hold them (a target holds a
//! snapshot iff its manifest is there and names the snapshot's object). A snapshot is
//! *expected* on every configured target when the retention plan over the union of every
//! target's snapshots of its database keeps it: what retention would delete anyway is never
//! asked for (and never copied by `repair`, so repair and prune cannot undo each other).
//! Then, per expected snapshot and target:
//!
//! - the target holds no manifest of it → [`ProblemKind::Missing`];
//! - an object its manifest names (the dump, and the companion-files archive when it has one)
//!   is not listed, or listed with another size than the manifest's `stored_size` →
//!   [`ProblemKind::ObjectMissing`], [`ProblemKind::WrongSize`] (one LIST per database folder
//!   per target: cheap);
//! - with `read_data`, each object is read (streamed, `jobs` at once) and its sha256 and size
//!   compared with the manifest's → [`ProblemKind::WrongHash`], [`ProblemKind::Unreadable`];
//!   a copy that does not match the snapshot's manifest (the first holder's) is compared with
//!   its own target's manifest too: when that one says otherwise about the same object, the
//!   manifests disagree ([`ProblemKind::ManifestsDisagree`]: a bucket was changed outside
//!   pgferry, and which copy is right is for an operator to find out; `repair` leaves both).
//!
//! A problem names the object it is about (`object_key`): the dump's or the files archive's.
//!
//! A target that holds a manifest of another attempt at the slot (naming another object) is
//! not missing it: that is a copy too, and it is not this module's to judge. This module never
//! writes; `repair` acts on its report.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::app::App;
use crate::retention::{self, SnapshotRef};
use crate::storage::catalog::{self, Filter, SnapshotEntry};
use crate::storage::key::{object_path, SnapshotId, SnapshotKey};
use crate::storage::manifest::Manifest;
use crate::storage::target::{error_text, Target};

/// Copies re-hashed at once by `check --read-data` when `--jobs` is not given: each is one
/// GET stream, so two keep one core busy hashing without flooding a provider.
pub const DEFAULT_READ_JOBS: usize = 2;

/// What is wrong with one copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProblemKind {
    /// The target has no manifest of the snapshot.
    Missing,
    /// The manifest is there, the object it names is not.
    ObjectMissing,
    /// The object is listed with `size` bytes, the manifest says `expected`.
    WrongSize { size: u64, expected: u64 },
    /// The object's bytes hash to `sha256`, not to the manifest's.
    WrongHash { sha256: String, size: u64 },
    /// The object could not be read.
    Unreadable { error: String },
    /// The object does not hash to the manifest the snapshot is known by (the first holder's),
    /// and this target's own manifest of the same object says something else (`own_sha256`):
    /// the targets' manifests disagree, so a bucket was changed outside pgferry. Which copy
    /// is right cannot be told from here; `repair` leaves both alone.
    ManifestsDisagree {
        sha256: String,
        own_sha256: String,
        /// The target whose manifest the snapshot is known by, and what it says.
        other: String,
        expected_sha256: String,
    },
    /// This target's manifest names the same objects as the one the snapshot is known by
    /// (`other`'s) but says otherwise about the encryption (`own` vs `expected`, in words): a
    /// bucket was changed outside pgferry. Restore and verify do not read this copy; `repair`
    /// leaves both alone.
    EncryptionDisagrees {
        own: String,
        other: String,
        expected: String,
    },
}

/// One copy that is missing or damaged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub target: String,
    pub source: String,
    pub database: String,
    pub snapshot_id: String,
    /// The object of the snapshot the problem is about (its dump, or its companion-files
    /// archive), relative to the target's prefix.
    pub object_key: String,
    #[serde(flatten)]
    pub kind: ProblemKind,
}

impl Problem {
    /// Whether `repair` can fix it (a copy elsewhere is needed, which it looks for).
    pub fn fix(&self) -> String {
        match &self.kind {
            ProblemKind::Unreadable { .. } => format!(
                "check that target {} answers, then run `pgferry check --read-data --source {} --database {}` again; if it stays unreadable run `pgferry repair --to {}`",
                self.target, self.source, self.database, self.target
            ),
            ProblemKind::ManifestsDisagree { .. } | ProblemKind::EncryptionDisagrees { .. } => "find out which bucket was changed (list each target alone: a config naming only it); restore from the other, then delete the wrong manifest and object by hand; `pgferry repair` leaves both copies alone".to_string(),
            _ => format!("run `pgferry repair --to {}`", self.target),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.kind {
            ProblemKind::Missing => "has no copy".to_string(),
            ProblemKind::ObjectMissing => {
                format!("has the manifest but not the object {}", self.object_key)
            }
            ProblemKind::WrongSize { size, expected } => {
                format!(
                    "holds {} with {size} bytes, the manifest says {expected}",
                    self.object_key
                )
            }
            ProblemKind::WrongHash { sha256, .. } => {
                format!(
                    "holds {} whose sha256 is {sha256}, not the manifest's: the copy is damaged",
                    self.object_key
                )
            }
            ProblemKind::Unreadable { error } => {
                format!("cannot read {}: {error}", self.object_key)
            }
            ProblemKind::ManifestsDisagree {
                sha256,
                own_sha256,
                other,
                expected_sha256,
            } => {
                // Neither copy is to blame before an operator knows which bucket changed.
                return write!(
                    f,
                    "targets {other} and {}: their manifests of snapshot {}/{}/{} disagree about {}: {other}'s says sha256 {expected_sha256}, {}'s says {own_sha256} (its copy hashes to {sha256}); {}",
                    self.target,
                    self.source,
                    self.database,
                    self.snapshot_id,
                    self.object_key,
                    self.target,
                    self.fix()
                );
            }
            ProblemKind::EncryptionDisagrees {
                own,
                other,
                expected,
            } => {
                return write!(
                    f,
                    "targets {other} and {}: their manifests of snapshot {}/{}/{} disagree about its encryption: {other}'s says {expected}, {}'s says {own} (restore and verify do not read {}'s copy); {}",
                    self.target,
                    self.source,
                    self.database,
                    self.snapshot_id,
                    self.target,
                    self.target,
                    self.fix()
                );
            }
        };
        write!(
            f,
            "target {}: snapshot {}/{}/{} {what}; {}",
            self.target,
            self.source,
            self.database,
            self.snapshot_id,
            self.fix()
        )
    }
}

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    pub filter: Filter,
    /// Re-hash every copy (else: listings only).
    pub read_data: bool,
    /// Copies read at once with `read_data`.
    pub jobs: usize,
}

/// What `check` found.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    /// Snapshots expected on every target.
    pub snapshots: usize,
    /// Copies looked at (one per snapshot and holding target).
    pub copies: usize,
    pub problems: Vec<Problem>,
    /// Targets that could not be listed: nothing on them was checked.
    pub unreachable: Vec<(String, String)>,
    /// Manifests that could not be read.
    pub warnings: Vec<String>,
    /// The expected snapshots, newest first (what `repair` copies from).
    #[serde(skip)]
    pub expected: Vec<SnapshotEntry>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.unreachable.is_empty() && self.warnings.is_empty()
    }

    /// Snapshots missing or damaged per reachable target, every target of `targets` named
    /// (0 when clean): the `target_missing_snapshots` gauge.
    pub fn missing_per_target(&self, targets: &[Target]) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, HashSet<(&str, &str, &str)>> = targets
            .iter()
            .filter(|t| !self.unreachable.iter().any(|(n, _)| n == &t.name))
            .map(|t| (t.name.clone(), HashSet::new()))
            .collect();
        for p in &self.problems {
            if let Some(set) = counts.get_mut(&p.target) {
                set.insert((&p.source, &p.database, &p.snapshot_id));
            }
        }
        counts.into_iter().map(|(t, s)| (t, s.len())).collect()
    }
}

/// Checks every target (see the module doc).
pub async fn check(app: &App, opts: &CheckOptions) -> CheckReport {
    let mut filter = opts.filter.clone();
    filter.target = None;
    let catalog = app.catalog(&filter).await;
    let mut report = CheckReport {
        unreachable: catalog.unreachable.clone(),
        warnings: catalog.warnings.clone(),
        ..CheckReport::default()
    };
    let reachable: Vec<&Target> = app
        .targets
        .iter()
        .filter(|t| !catalog.unreachable.iter().any(|(n, _)| n == &t.name))
        .collect();
    let listings = futures::future::join_all(reachable.iter().map(|t| list(t, &filter))).await;
    let mut sizes: HashMap<String, HashMap<Path, u64>> = HashMap::new();
    for (t, listing) in reachable.iter().zip(listings) {
        match listing {
            Ok(l) => {
                sizes.insert(t.name.clone(), l);
            }
            Err(e) => report.unreachable.push((t.name.clone(), error_text(&e))),
        }
    }
    report.expected = expected(app, &catalog.snapshots);
    report.snapshots = report.expected.len();
    let mut to_read = Vec::new();
    for entry in &report.expected {
        let m = &entry.manifest;
        let Some(objects) = Expected::of(m) else {
            continue; // The catalog only keeps manifests that own their objects.
        };
        let problem = |target: &str, object: &Expected, kind| Problem {
            target: target.to_string(),
            source: m.source.clone(),
            database: m.database.clone(),
            snapshot_id: m.snapshot_id.clone(),
            object_key: object.key.to_string(),
            kind,
        };
        for t in app.targets.iter() {
            let Some(listed) = sizes.get(&t.name) else {
                continue;
            };
            if !entry.targets.contains(&t.name) {
                // A manifest of the slot that the catalog refused (its object is gone or of
                // another size, or it names something else) is a damaged copy, not another
                // attempt: repair must replace it.
                let refused = catalog.unreadable.iter().find(|u| {
                    u.target == t.name && Some(&u.key) == manifest_key(t, entry).as_ref()
                });
                if let Some(refused) = refused {
                    let found: Vec<Problem> = objects
                        .iter()
                        .filter_map(|o| Some(problem(&t.name, o, o.listed(t, listed)?)))
                        .collect();
                    if found.is_empty() {
                        let first = &objects[0];
                        report.problems.push(problem(
                            &t.name,
                            first,
                            ProblemKind::Unreadable {
                                error: refused.error.clone(),
                            },
                        ));
                    }
                    report.problems.extend(found);
                } else if !holds_other_attempt(t, entry, listed) {
                    report
                        .problems
                        .push(problem(&t.name, &objects[0], ProblemKind::Missing));
                }
                continue;
            }
            report.copies += 1;
            // A manifest here that says otherwise about the encryption: restore refuses this
            // copy (`restore::load::manifest_for`), so it is no copy to count on.
            if let Some(own) = entry.disagreeing.get(&t.name) {
                if entry.encryption_disagrees(&t.name) {
                    report.problems.push(problem(
                        &t.name,
                        &objects[0],
                        ProblemKind::EncryptionDisagrees {
                            own: crate::encryption::describe(own.encryption.as_ref()),
                            other: entry.targets.first().cloned().unwrap_or_default(),
                            expected: crate::encryption::describe(m.encryption.as_ref()),
                        },
                    ));
                }
            }
            for o in &objects {
                match o.listed(t, listed) {
                    Some(kind) => report.problems.push(problem(&t.name, o, kind)),
                    None if opts.read_data => to_read.push((t, entry, o.clone())),
                    None => {}
                }
            }
        }
    }
    // Futures collected first: a stream mapping borrowed tuples through a closure is not
    // `Send` for every lifetime, which `tokio::spawn` (the daemon) needs.
    let reads: Vec<_> = to_read
        .into_iter()
        .map(|(t, entry, object)| read_copy(t, entry, object))
        .collect();
    let read: Vec<Option<Problem>> = futures::stream::iter(reads)
        .buffer_unordered(opts.jobs.max(1))
        .collect()
        .await;
    report.problems.extend(read.into_iter().flatten());
    report.problems.sort_by(|a, b| {
        (&a.target, &a.source, &a.database)
            .cmp(&(&b.target, &b.source, &b.database))
            .then_with(|| b.snapshot_id.cmp(&a.snapshot_id))
            .then_with(|| a.object_key.cmp(&b.object_key))
    });
    report
}

/// One object a snapshot's manifest names, with what the manifest says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Relative to a target's prefix.
    pub key: Path,
    pub size: u64,
    pub sha256: String,
}

impl Expected {
    /// The objects of `m`: its dump, then its companion-files archive when it has one.
    /// `None` when a key is not one pgferry writes (the catalog keeps no such manifest).
    pub fn of(m: &Manifest) -> Option<Vec<Expected>> {
        let mut objects = vec![Expected {
            key: object_path(&m.object_key)?,
            size: m.stored_size,
            sha256: m.sha256.clone(),
        }];
        if let Some(a) = m.files_archive() {
            objects.push(Expected {
                key: object_path(&a.object_key)?,
                size: a.stored_size,
                sha256: a.sha256.clone(),
            });
        }
        Some(objects)
    }

    /// What is wrong with this object in `t`'s listing (`None`: listed with its size).
    fn listed(&self, t: &Target, listed: &HashMap<Path, u64>) -> Option<ProblemKind> {
        match listed.get(&t.at(&self.key)) {
            None => Some(ProblemKind::ObjectMissing),
            Some(&size) if size != self.size => Some(ProblemKind::WrongSize {
                size,
                expected: self.size,
            }),
            Some(_) => None,
        }
    }
}

/// Re-hashes one object of a copy; `Some` when it does not match its manifest.
async fn read_copy(t: &Target, entry: &SnapshotEntry, object: Expected) -> Option<Problem> {
    let m = &entry.manifest;
    let kind = match hash_object(t, &t.at(&object.key)).await {
        Ok((sha256, size)) if sha256 == object.sha256 && size == object.size => return None,
        Ok((sha256, size)) => match own_expectation(t, m, &object).await {
            // This target's own manifest says otherwise about the same object: not damage
            // (repairing it from the snapshot's manifest could overwrite the good copy).
            Some(own) if own.sha256 != object.sha256 || own.size != object.size => {
                ProblemKind::ManifestsDisagree {
                    sha256,
                    own_sha256: own.sha256,
                    other: entry
                        .targets
                        .iter()
                        .find(|h| **h != t.name)
                        .cloned()
                        .unwrap_or_default(),
                    expected_sha256: object.sha256.clone(),
                }
            }
            _ => ProblemKind::WrongHash { sha256, size },
        },
        Err(e) => ProblemKind::Unreadable {
            error: error_text(&e),
        },
    };
    Some(Problem {
        target: t.name.clone(),
        source: m.source.clone(),
        database: m.database.clone(),
        snapshot_id: m.snapshot_id.clone(),
        object_key: object.key.to_string(),
        kind,
    })
}

/// What `t`'s own manifest of `m`'s snapshot says of `object`, when it names the same objects
/// as `m` (`None`: no such manifest, unreadable, or of another attempt).
async fn own_expectation(t: &Target, m: &Manifest, object: &Expected) -> Option<Expected> {
    let id = SnapshotId::parse(&m.snapshot_id)?;
    let key = t.at(&SnapshotKey::new(&m.source, &m.database, id).manifest());
    let own = catalog::read_manifest(t, &key).await.ok()?;
    if !catalog::same_objects(&own, m) {
        return None;
    }
    Expected::of(&own)?
        .into_iter()
        .find(|o| o.key == object.key)
}

/// The snapshots every target should hold: per database, those the retention plan over the
/// union of all targets' snapshots keeps (all of them for a source no longer configured,
/// whose policy is unknown).
pub fn expected(app: &App, snapshots: &[SnapshotEntry]) -> Vec<SnapshotEntry> {
    let mut keep: HashSet<(String, String, String)> = HashSet::new();
    for ((source, database), entries) in catalog::by_database(snapshots) {
        let refs: Vec<SnapshotRef> = entries
            .iter()
            .map(|s| SnapshotRef {
                id: s.id().to_string(),
                time: crate::schedule::parse_snapshot_id(s.id()).unwrap_or(s.manifest.started_at),
            })
            .collect();
        let kept: Vec<String> = match app.config.source(&source) {
            Some(cfg) => retention::plan(&cfg.retention, &refs)
                .keep
                .into_iter()
                .map(|(r, _)| r.id)
                .collect(),
            None => refs.into_iter().map(|r| r.id).collect(),
        };
        for id in kept {
            keep.insert((source.clone(), database.clone(), id));
        }
    }
    snapshots
        .iter()
        .filter(|s| {
            keep.contains(&(
                s.manifest.source.clone(),
                s.manifest.database.clone(),
                s.id().to_string(),
            ))
        })
        .cloned()
        .collect()
}

/// Whether `t` has a manifest of this snapshot that the catalog set aside because it names
/// another attempt's object (that object listed): a copy, not a gap.
fn holds_other_attempt(t: &Target, entry: &SnapshotEntry, listed: &HashMap<Path, u64>) -> bool {
    manifest_key(t, entry).is_some_and(|k| listed.contains_key(&k))
}

/// The full key of `entry`'s manifest on `t`.
fn manifest_key(t: &Target, entry: &SnapshotEntry) -> Option<Path> {
    let m = &entry.manifest;
    let id = SnapshotId::parse(&m.snapshot_id)?;
    Some(t.at(&SnapshotKey::new(&m.source, &m.database, id).manifest()))
}

/// Every object under the selected folders of `t`, with its size (full keys).
async fn list(t: &Target, filter: &Filter) -> Result<HashMap<Path, u64>, object_store::Error> {
    let folders = match (&filter.source, filter.databases.is_empty()) {
        (Some(source), false) => filter
            .databases
            .iter()
            .map(|d| t.folder(Some(source), Some(d)))
            .collect(),
        (source, _) => vec![t.folder(source.as_deref(), None)],
    };
    let mut sizes = HashMap::new();
    for folder in folders {
        let mut listed = t.store.list(Some(&folder));
        while let Some(o) = listed.try_next().await? {
            sizes.insert(o.location, o.size);
        }
    }
    Ok(sizes)
}

/// sha256 (hex) and byte count of the object at `key` (a full key), streamed: memory is one
/// chunk of the response, whatever the object's size.
pub async fn hash_object(t: &Target, key: &Path) -> Result<(String, u64), object_store::Error> {
    let mut stream = t.store.get(key).await?.into_stream();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.try_next().await? {
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
    }
    Ok((hex::encode(hasher.finalize()), bytes))
}
