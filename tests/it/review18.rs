//! Hostile review of companion files (issue 18), against real PostgreSQL and Garage: a
//! destination directory that is a regular file or a symlink, and a restore SIGKILLed at
//! the moments its directories move, then settled by the next run: the staging database
//! and its directory must always match (both old or both new). The world (production with
//! a filestore, staging, two buckets) is `files_restore`'s.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::files_restore::{World, PREVIOUS_SQL};
use crate::support::env::{self, Run};
use crate::support::{kill_when_appears, names_in, restore_argv, tree_of};

/// Everything one test may take; a hang is a failure.
const TEST_DEADLINE: Duration = Duration::from_secs(600);

const ODOO_SQL: &str = r#"
CREATE TABLE ir_attachment (id serial PRIMARY KEY, name varchar, type varchar,
    store_fname varchar, db_datas bytea);
INSERT INTO ir_attachment (name, type, store_fname) VALUES
    ('invoice.pdf', 'binary', 'ab/ab0123456789abcdef0123456789abcdef0123'),
    ('big.bin', 'binary', 'f0/f0aabbccddeeff00112233445566778899aabb');
CREATE TABLE filler AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 200000) g;
"#;

/// The world of these tests: `files_restore`'s, with a bigger database and filestore.
async fn start() -> World {
    World::start_with(
        ODOO_SQL,
        vec![
            (
                "ab/ab0123456789abcdef0123456789abcdef0123".to_string(),
                vec![7u8; 1000],
            ),
            (
                "f0/f0aabbccddeeff00112233445566778899aabb".to_string(),
                vec![9u8; 3 << 20],
            ),
        ],
    )
    .await
}

impl World {
    async fn reset_staging(&self) {
        self.staging
            .execute("postgres", "DROP DATABASE IF EXISTS acme WITH (FORCE)")
            .await
            .unwrap();
        self.staging.create_database("acme").await.unwrap();
        self.staging.execute("acme", PREVIOUS_SQL).await.unwrap();
        self.reset_staging_files();
    }

    /// Whether staging's `acme` is the previous database (else the restored one).
    async fn database_is_previous(&self) -> bool {
        let t = self.staging.table_fingerprints("acme").await.unwrap();
        let previous = t.keys().any(|k| k.contains("previous_contents"));
        let new = t.keys().any(|k| k.contains("ir_attachment"));
        assert!(previous != new, "staging acme is neither or both: {t:?}");
        previous
    }

    /// Whether staging's `acme` directory holds the previous files (else the restored ones);
    /// it must exist and be one or the other.
    fn files_are_previous(&self) -> bool {
        let d = self.staging_fs.join("acme");
        assert!(
            d.is_dir(),
            "the destination directory is missing: {:?}",
            names_in(&self.staging_fs)
        );
        let t = tree_of(&d);
        let previous = t.contains_key("old/previous.txt");
        let new = t == tree_of(&self.prod_fs.join("acme"));
        assert!(previous != new, "the destination directory is mixed: {t:?}");
        previous
    }
}

/// A destination "directory" that is a regular file (an operator's mistake, a stray `touch`):
/// the restore must either refuse it before touching anything, or replace it; and a
/// restore after that must succeed — a leftover the next runs cannot settle would wedge
/// every later refresh of this destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_is_a_regular_file_does_not_wedge_later_restores() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let w = start().await;
        w.backup().await;
        let d = w.staging_fs.join("acme");
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::write(&d, "not a directory").unwrap();
        let first = w.restore_with(&w.config, &[]).await;
        if first.code != 0 {
            // Refused: nothing changed.
            assert_eq!(std::fs::read(&d).unwrap(), b"not a directory");
            assert!(w.database_is_previous().await, "{}", first.stderr);
            assert!(
                first.stderr.contains("is not a directory; move it away"),
                "{}",
                first.stderr
            );
            std::fs::remove_file(&d).unwrap();
        }
        let second = w.restore_with(&w.config, &[]).await;
        assert_eq!(
            second.code, 0,
            "first run: {} / {}\nsecond run:\n{}",
            first.code, first.stderr, second.stderr
        );
        assert!(!w.database_is_previous().await);
        assert!(!w.files_are_previous());
        let leftovers: Vec<String> = names_in(&w.staging_fs)
            .into_iter()
            .filter(|n| n.starts_with(".pgferry-"))
            .collect();
        assert!(leftovers.is_empty(), "leftovers: {leftovers:?}");
    })
    .await
    .expect("the test hung");
}

/// A destination directory that is a symlink to the real filestore elsewhere: replacing it
/// must never delete or write through what it points to, with or without `--keep-old`
/// (twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_symlink_is_replaced_never_followed() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let w = start().await;
        w.backup().await;
        let d = w.staging_fs.join("acme");
        let real = w.env.dir.path().join("elsewhere/acme");
        std::fs::create_dir_all(real.parent().unwrap()).unwrap();
        std::fs::rename(&d, &real).unwrap();
        std::os::unix::fs::symlink(&real, &d).unwrap();
        let before = tree_of(&real);
        for extra in [&[][..], &["--keep-old"][..], &["--keep-old"][..]] {
            let run = w.restore_with(&w.config, extra).await;
            run.assert_code(0);
            assert_eq!(tree_of(&real), before, "{extra:?}: followed the symlink");
            assert!(!w.files_are_previous());
            // The next round replaces a symlink again.
            if extra.is_empty() {
                std::fs::remove_dir_all(&d).unwrap();
                std::os::unix::fs::symlink(&real, &d).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(1100)).await; // a new stamp
        }
        assert_eq!(tree_of(&real), before);
    })
    .await
    .expect("the test hung");
}

/// Runs the failing-hook restore that settles what a killed one left; while the killed
/// run's server session still holds the destination's lock (its last statement finishing),
/// tries again (within 60 s). It must then fail in its hook, after settling.
async fn settle_with(w: &World, failing: &Path, what: &str) -> Run {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let run = w.restore_with(failing, &[]).await;
        if run.stderr.contains("advisory lock held") && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(run.code, 1, "{what}: {}", run.stderr);
        assert!(
            run.stderr.contains("SELECT 1/0") || run.stderr.contains("division by zero"),
            "{what}: did not fail in its hook: {}",
            run.stderr
        );
        return run;
    }
}

/// SIGKILLs a restore as soon as a name starting with `prefix` appears in the staging
/// filestore parent, `delay` later; returns whether it was killed (else it finished).
async fn kill_restore_at(w: &World, prefix: &'static str, delay: Duration) -> bool {
    let mut cmd = w
        .env
        .command(&w.config, &restore_argv("acme", "staging-acme", &[]));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let child = cmd.spawn().unwrap();
    kill_when_appears(child, w.staging_fs.clone(), prefix.to_string(), delay).await
}

/// A restore SIGKILLed while its companion files are extracted or swapped, then settled by
/// the next restore (which fails in a hook after settling): staging's database and its
/// directory are both the previous ones or both the restored ones, the directory never
/// missing, nothing of the runs left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_while_its_files_move_leaves_database_and_files_matching() {
    tokio::time::timeout(Duration::from_secs(1500), async {
        let w = start().await;
        w.backup().await;
        let failing = w.failing_config().await;
        let cases: &[(&'static str, u64)] = &[
            (".pgferry-tmp-acme-", 0),
            (".pgferry-tmp-acme-", 30),
            (".pgferry-old-acme-", 0),
            (".pgferry-old-acme-", 2),
            (".pgferry-old-acme-", 10),
            (".pgferry-old-acme-", 50),
        ];
        let mut outcomes = Vec::new();
        for &(prefix, ms) in cases {
            let killed = kill_restore_at(&w, prefix, Duration::from_millis(ms)).await;
            let settle = settle_with(&w, &failing, &format!("{prefix}+{ms}ms")).await;
            let db_previous = w.database_is_previous().await;
            let files_previous = w.files_are_previous();
            outcomes.push((prefix, ms, killed, db_previous));
            assert_eq!(
                db_previous,
                files_previous,
                "{prefix}+{ms}ms (killed: {killed}): the database is {} but the files are {}\n{}",
                if db_previous {
                    "the previous one"
                } else {
                    "the restored one"
                },
                if files_previous {
                    "the previous ones"
                } else {
                    "the restored ones"
                },
                settle.stderr
            );
            let dbs = w.staging.databases().await;
            assert!(
                dbs.iter().all(|d| !d.starts_with("pgferry_")),
                "{prefix}+{ms}ms: leftover databases {dbs:?}"
            );
            let names = names_in(&w.staging_fs);
            assert!(
                names.iter().all(|n| !n.starts_with(".pgferry-")),
                "{prefix}+{ms}ms: leftover directories {names:?}"
            );
            w.reset_staging().await;
        }
        eprintln!("outcomes (prefix, ms, killed, previous): {outcomes:?}");
    })
    .await
    .expect("the test hung");
}

/// One crafted tar entry: path, type, link name, data.
type Crafted<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

/// A regular file `ab/ok`, then `entries`. GNU headers, so that the tar reader applies pax
/// and GNU long-name entries to the next entry (with old v7 headers it hands them over as
/// entries of their own).
fn crafted_tar(entries: &[Crafted<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let ok: Crafted<'_> = (b"ab/ok", tar::EntryType::Regular, b"", b"ok");
    for (path, kind, link, data) in std::iter::once(&ok).chain(entries) {
        let mut h = tar::Header::new_gnu();
        let old = h.as_old_mut();
        old.name[..path.len()].copy_from_slice(path);
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Archives the unit tests of `unpack` meet one by one, here through the real restore with
/// a committed (checksum-consistent) archive: hard links (outside and inside), a FIFO, a
/// device, a pax or GNU long name climbing out, a duplicate, a file where a directory must
/// be. Each restore fails; staging's database and directory are untouched; nothing is
/// written outside; nothing of the run is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archives_are_refused_and_leave_staging_untouched() {
    use tar::EntryType as E;
    tokio::time::timeout(TEST_DEADLINE, async {
        let w = start().await;
        let id = w.backup().await;
        let pax = b"23 path=../pax-escaped\n";
        let gnu = b"../gnu-escaped\0";
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "hard link outside",
                crafted_tar(&[(b"ab/hard", E::Link, b"/etc/passwd", b"")]),
            ),
            (
                "hard link inside",
                crafted_tar(&[(b"ab/hard", E::Link, b"ab/ok", b"")]),
            ),
            ("fifo", crafted_tar(&[(b"ab/fifo", E::Fifo, b"", b"")])),
            ("device", crafted_tar(&[(b"ab/dev", E::Char, b"", b"")])),
            (
                "pax path",
                crafted_tar(&[
                    (b"PaxHeaders/x", E::XHeader, b"", pax),
                    (b"harmless", E::Regular, b"", b"escaped!"),
                ]),
            ),
            (
                "gnu long name",
                crafted_tar(&[
                    (b"././@LongLink", E::GNULongName, b"", gnu),
                    (b"harmless", E::Regular, b"", b"escaped!"),
                ]),
            ),
            (
                "duplicate",
                crafted_tar(&[(b"ab/ok", E::Regular, b"", b"overwritten")]),
            ),
            (
                "file where a directory must be",
                crafted_tar(&[(b"ab/ok/x", E::Regular, b"", b"x")]),
            ),
        ];
        for (what, tar) in cases {
            for store in &w.stores {
                env::plant_files_archive(store, &id, &tar, 2).await;
            }
            let db_before = w.staging.table_fingerprints("acme").await.unwrap();
            let fs_before = tree_of(&w.staging_fs);
            let run = w.restore_with(&w.config, &[]).await;
            assert_eq!(run.code, 1, "{what}: {}", run.stderr);
            assert!(
                run.stderr.contains("refused: ")
                    || run.stderr.contains("another entry needs as a directory"),
                "{what}: failed for another reason: {}",
                run.stderr
            );
            assert_eq!(
                w.staging.table_fingerprints("acme").await.unwrap(),
                db_before,
                "{what}: the database changed"
            );
            assert!(
                tree_of(&w.staging_fs) == fs_before,
                "{what}: the directory changed"
            );
            for escaped in ["pax-escaped", "gnu-escaped"] {
                assert!(!w.staging_fs.join(escaped).exists(), "{what}");
                assert!(!w.env.dir.path().join(escaped).exists(), "{what}");
            }
            let dbs = w.staging.databases().await;
            assert!(
                dbs.iter().all(|d| !d.starts_with("pgferry_")),
                "{what}: {dbs:?}"
            );
        }
    })
    .await
    .expect("the test hung");
}

/// Two backups of the same database at once (`--force` twice, companion files on): each
/// run that says it committed has a manifest whose dump and files archive are intact on
/// every target; `check --read-data` and `list` agree; the newest snapshot restores with its
/// files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backups_at_once_commit_intact_snapshots_with_their_files() {
    use sha2::Digest;
    tokio::time::timeout(TEST_DEADLINE, async {
        let w = start().await;
        let args = ["backup", "--source", "prod", "--force"];
        let (a, b) = tokio::join!(w.pgferry(&w.config, &args), w.pgferry(&w.config, &args));
        assert!(
            a.code == 0 || b.code == 0,
            "neither backup committed:\n{}\n{}",
            a.stderr,
            b.stderr
        );
        for store in &w.stores {
            let manifests = env::assert_every_manifest_names_an_intact_object(store).await;
            assert!(!manifests.is_empty());
            for key in &manifests {
                let m = env::manifest_of(&env::get(store, key).await);
                let f = &m["files"];
                let fk = f["object_key"].as_str().unwrap_or_else(|| panic!("{m}"));
                let bytes = env::get(store, fk).await;
                assert_eq!(bytes.len() as u64, f["stored_size"].as_u64().unwrap());
                assert_eq!(
                    hex::encode(sha2::Sha256::digest(&bytes)),
                    f["sha256"].as_str().unwrap()
                );
            }
            let all = env::keys(store).await;
            assert!(
                all.iter().all(|k| !k.ends_with(".upload.json")),
                "open upload markers left: {all:?}"
            );
        }
        let check = w.pgferry(&w.config, &["check", "--read-data"]).await;
        assert_eq!(check.code, 0, "{}", check.stderr);
        let list = w.pgferry(&w.config, &["list"]).await;
        assert_eq!(list.code, 0, "{}", list.stderr);
        let run = w.restore_with(&w.config, &[]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(!w.files_are_previous());
    })
    .await
    .expect("the test hung");
}

/// The destination has no directory yet (a first refresh): a restore SIGKILLed while its
/// files move, then settled, leaves either the previous database and still no directory, or
/// the restored database and its files; never the restored database without its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_first_restore_without_a_directory_settles_consistently() {
    tokio::time::timeout(Duration::from_secs(1500), async {
        let w = start().await;
        w.backup().await;
        let failing = w.failing_config().await;
        let d = w.staging_fs.join("acme");
        let mut outcomes = Vec::new();
        for ms in [0u64, 1, 3, 10, 50] {
            std::fs::remove_dir_all(&d).unwrap();
            let killed = kill_restore_at(&w, ".pgferry-old-acme-", Duration::from_millis(ms)).await;
            settle_with(&w, &failing, &format!("+{ms}ms")).await;
            let db_previous = w.database_is_previous().await;
            let present = d.exists();
            outcomes.push((ms, killed, db_previous, present));
            if db_previous {
                assert!(
                    !present,
                    "+{ms}ms: previous database, yet a directory: {:?}",
                    tree_of(&d)
                );
            } else {
                assert!(!w.files_are_previous(), "+{ms}ms");
            }
            let names = names_in(&w.staging_fs);
            assert!(
                names.iter().all(|n| !n.starts_with(".pgferry-")),
                "+{ms}ms: leftover directories {names:?}"
            );
            w.reset_staging().await;
        }
        eprintln!("outcomes (ms, killed, previous db, directory present): {outcomes:?}");
    })
    .await
    .expect("the test hung");
}
