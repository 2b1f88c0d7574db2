//! Companion files, the restore side (issue 18): an Odoo-shaped database whose
//! `ir_attachment` rows name files in a filestore directory, backed up with `[[source]]
//! files`, restored into staging with `[[restore_target]] files`: the directory comes back
//! byte for byte, named after the destination database, swapped in with the database (both
//! or neither), the old one kept aside with `--keep-old`; failures leave the staging database
//! and its directory as they were; archives whose entries would escape are refused; a killed
//! restore's directories are settled by the next one; verify counts attachments whose file is
//! missing. Real PostgreSQL (production and staging), real Garage (two buckets).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use sha2::{Digest, Sha256};

use crate::support::env::{get, keys, manifest_of, plant_files_archive, Run, TestEnv};
use crate::support::{names_in, restore_argv, tree_of, Staging};

/// Odoo's attachment table (the columns that matter) and rows naming files in the
/// filestore, one stored in the database (no file) and one URL (no file).
const ODOO_SQL: &str = r#"
CREATE TABLE ir_attachment (id serial PRIMARY KEY, name varchar, type varchar,
    store_fname varchar, db_datas bytea);
INSERT INTO ir_attachment (name, type, store_fname) VALUES
    ('invoice.pdf', 'binary', 'ab/ab0123456789abcdef0123456789abcdef0123'),
    ('logo.png', 'binary', 'ab/ab99887766554433221100aabbccddeeff0011'),
    ('web.assets_backend.min.js', 'binary', 'cd/cd0011223344556677889900aabbccddeeff00'),
    ('contract.docx', 'binary', 'ef/ef5566778899aabbccddeeff00112233445566'),
    ('big.bin', 'binary', 'f0/f0aabbccddeeff00112233445566778899aabb');
INSERT INTO ir_attachment (name, type, db_datas) VALUES ('inline.txt', 'binary', 'x');
INSERT INTO ir_attachment (name, type) VALUES ('odoo.com', 'url');
"#;

/// What staging's `acme` holds before any restore.
pub(crate) const PREVIOUS_SQL: &str =
    "CREATE TABLE previous_contents AS SELECT g AS id FROM generate_series(1, 10) g;";

/// A hook that always fails.
const FAILING_HOOK: &str = "SELECT 1/0;";

/// The store_fname values of `ODOO_SQL`, and a content for each (the last one 2 MiB).
fn attachment_files() -> Vec<(String, Vec<u8>)> {
    let names = [
        "ab/ab0123456789abcdef0123456789abcdef0123",
        "ab/ab99887766554433221100aabbccddeeff0011",
        "cd/cd0011223344556677889900aabbccddeeff00",
        "ef/ef5566778899aabbccddeeff00112233445566",
        "f0/f0aabbccddeeff00112233445566778899aabb",
    ];
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let len = if i == 4 { 2 << 20 } else { 1000 * (i + 1) };
            let body: Vec<u8> = (0..len).map(|j| ((j * 31 + i * 7) % 251) as u8).collect();
            (n.to_string(), body)
        })
        .collect()
}

/// Production (with a filestore), staging (with a previous database and filestore), two
/// buckets, and configs tying them. `review18` uses it too.
pub(crate) struct World {
    pub(crate) env: TestEnv,
    pub(crate) staging: Staging,
    pub(crate) stores: Vec<Arc<dyn ObjectStore>>,
    /// The `[[target]]` sections of `stores`.
    targets: String,
    /// `<prod_fs>/acme` is production's filestore directory.
    pub(crate) prod_fs: PathBuf,
    /// `<staging_fs>/<database>` are staging's.
    pub(crate) staging_fs: PathBuf,
    pub(crate) config: PathBuf,
}

/// How a config of the world is written.
#[derive(Clone, Copy)]
pub(crate) struct Shape<'a> {
    source_files: bool,
    target_files: bool,
    hooks: &'a [&'a Path],
}

const FULL: Shape<'static> = Shape {
    source_files: true,
    target_files: true,
    hooks: &[],
};

impl World {
    async fn start() -> World {
        World::start_with(ODOO_SQL, attachment_files()).await
    }

    /// Production's `acme` is made by `odoo_sql`, its filestore holds `files` (path, bytes).
    pub(crate) async fn start_with(odoo_sql: &str, files: Vec<(String, Vec<u8>)>) -> World {
        let env = TestEnv::start().await;
        let staging = Staging::start(&env, PREVIOUS_SQL).await;
        env.pg.create_database("acme").await.unwrap();
        env.pg.execute("acme", odoo_sql).await.unwrap();
        let prod_fs = env.dir.path().join("prod-fs");
        for (name, body) in files {
            let p = prod_fs.join("acme").join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let staging_fs = env.dir.path().join("staging-fs");
        let (a, store_a) = env.s3_target("a").await;
        let (b, store_b) = env.s3_target("b").await;
        let mut w = World {
            env,
            staging,
            stores: vec![store_a, store_b],
            targets: format!("{a}{b}"),
            prod_fs,
            staging_fs,
            config: PathBuf::new(),
        };
        w.reset_staging_files();
        w.config = w.config_for(FULL, "main").await;
        w
    }

    /// Staging's `acme` directory as before any restore.
    pub(crate) fn reset_staging_files(&self) {
        let d = self.staging_fs.join("acme");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("old")).unwrap();
        std::fs::write(d.join("old/previous.txt"), "previous files").unwrap();
    }

    /// A config whose restore target runs a hook that always fails (after the restore
    /// settled what an earlier one left).
    pub(crate) async fn failing_config(&self) -> PathBuf {
        let hook = self.env.dir.path().join("fail.sql");
        std::fs::write(&hook, FAILING_HOOK).unwrap();
        self.config_for(
            Shape {
                hooks: &[&hook],
                ..FULL
            },
            "failing",
        )
        .await
    }

    /// A config of this world, written to `<dir>/<name>.toml`.
    pub(crate) async fn config_for(&self, shape: Shape<'_>, name: &str) -> PathBuf {
        let source_files = if shape.source_files {
            format!("files = \"{}/{{database}}\"\n", self.prod_fs.display())
        } else {
            String::new()
        };
        let target_files = if shape.target_files {
            format!("files = \"{}/{{database}}\"\n", self.staging_fs.display())
        } else {
            String::new()
        };
        let body = format!(
            "{}databases = [\"acme\"]\n{source_files}{}\n{}{target_files}\n[verify]\nurl = \"{}\"\nchecks = []\n",
            self.env.source_toml("prod"),
            self.targets,
            self.staging.restore_target_toml(shape.hooks),
            self.staging.url(),
        );
        let path = self.env.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, body).unwrap();
        path
    }

    pub(crate) async fn pgferry(&self, config: &Path, args: &[&str]) -> Run {
        self.env.pgferry(config, args).await
    }

    pub(crate) async fn backup(&self) -> String {
        self.pgferry(&self.config, &["backup", "--source", "prod", "--force"])
            .await
            .snapshot_id()
    }

    pub(crate) async fn restore_with(&self, config: &Path, extra: &[&str]) -> Run {
        self.pgferry(config, &restore_argv("acme", "staging-acme", extra))
            .await
    }

    async fn restore(&self, extra: &[&str]) -> Run {
        self.restore_with(&self.config, extra).await
    }

    /// The manifest of `id` in bucket `i`, with its key.
    async fn manifest(&self, i: usize, id: &str) -> (String, serde_json::Value) {
        let store = &self.stores[i];
        let key = keys(store)
            .await
            .into_iter()
            .find(|k| k.ends_with(&format!("/{id}.manifest.json")))
            .unwrap_or_else(|| panic!("no manifest of {id}"));
        let m = manifest_of(&get(store, &key).await);
        (key, m)
    }

    async fn put(&self, i: usize, key: &str, bytes: Vec<u8>) {
        self.stores[i]
            .put(
                &object_store::path::Path::parse(key).unwrap(),
                object_store::PutPayload::from(bytes),
            )
            .await
            .expect("put");
    }

    /// Staging as it is: `acme`'s tables and the filestore parent's whole tree.
    async fn staging_state(
        &self,
    ) -> (
        BTreeMap<String, (i64, String)>,
        BTreeMap<String, Option<Vec<u8>>>,
    ) {
        (
            self.staging.table_fingerprints("acme").await.unwrap(),
            tree_of(&self.staging_fs),
        )
    }

    /// No temporary database and no `.pgferry-` directory is left on staging.
    async fn assert_no_leftovers(&self) {
        let dbs = self.staging.databases().await;
        assert!(
            dbs.iter().all(|d| !d.starts_with("pgferry_")),
            "leftover databases on staging: {dbs:?}"
        );
        let names = names_in(&self.staging_fs);
        assert!(
            names.iter().all(|n| !n.starts_with(".pgferry-")),
            "leftover directories on staging: {names:?}"
        );
    }
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("--json output is JSON ({e}): {}", run.stdout))
}

/// The files object of snapshot `id` in bucket `i`, with its key.
async fn files_object(w: &World, i: usize, id: &str) -> (String, Vec<u8>) {
    let (_, m) = w.manifest(i, id).await;
    let key = m["files"]["object_key"]
        .as_str()
        .unwrap_or_else(|| panic!("{id} has no files archive: {m}"))
        .to_string();
    let bytes = get(&w.stores[i], &key).await.to_vec();
    (key, bytes)
}

/// Overwrites the files object of `id` in bucket `i` with bytes of the same length.
async fn corrupt_files(w: &World, i: usize, id: &str) {
    let (key, mut bytes) = files_object(w, i, id).await;
    let at = bytes.len() / 2;
    for b in &mut bytes[at..at + 64] {
        *b ^= 0x5a;
    }
    w.put(i, &key, bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_brings_the_filestore_with_the_database_and_keeps_the_old_one() {
    let w = World::start().await;
    let id = w.backup().await;
    let (_, m) = w.manifest(0, &id).await;
    assert_eq!(m["files"]["file_count"], 5, "{m}");
    let want = tree_of(&w.prod_fs.join("acme"));
    let previous = tree_of(&w.staging_fs.join("acme"));

    let run = w.restore(&["--json", "--keep-old"]).await;
    run.assert_code(0);
    let report = &json(&run)["restore"];
    assert_eq!(tree_of(&w.staging_fs.join("acme")), want, "byte for byte");
    let files = &report["files"];
    assert_eq!(files["status"], "restored", "{report}");
    assert_eq!(files["file_count"], 5);
    let bytes: usize = attachment_files().iter().map(|(_, b)| b.len()).sum();
    assert_eq!(files["file_bytes"], bytes as u64);
    assert_eq!(files["target"], "a");
    assert_eq!(files["replaced"], true);
    assert_eq!(
        files["directory"],
        w.staging_fs.join("acme").display().to_string()
    );
    // --keep-old: the previous files beside the previous database, under its name.
    let kept_db = report["kept_old"].as_str().expect("kept_old").to_string();
    assert_eq!(
        files["kept_old"],
        w.staging_fs.join(&kept_db).display().to_string()
    );
    assert_eq!(tree_of(&w.staging_fs.join(&kept_db)), previous);
    assert!(w
        .staging
        .table_fingerprints(&kept_db)
        .await
        .unwrap()
        .contains_key("public.previous_contents"));
    assert!(w
        .staging
        .table_fingerprints("acme")
        .await
        .unwrap()
        .contains_key("public.ir_attachment"));
    assert_eq!(
        names_in(&w.staging_fs),
        vec!["acme".to_string(), kept_db.clone()]
    );
    w.assert_no_leftovers().await;

    // Without --keep-old the previous directory goes, with what staging changed in it.
    std::fs::write(w.staging_fs.join("acme/ab/changed-in-staging"), "x").unwrap();
    let run = w.restore(&[]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains("companion files: 5") && run.stdout.contains("into"),
        "{}",
        run.stdout
    );
    assert_eq!(tree_of(&w.staging_fs.join("acme")), want);
    assert_eq!(names_in(&w.staging_fs), vec!["acme".to_string(), kept_db]);
    w.assert_no_leftovers().await;

    // The directory is named after the destination database.
    w.restore(&["--as", "acme copy é"]).await.assert_code(0);
    assert_eq!(tree_of(&w.staging_fs.join("acme copy é")), want);
    w.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_leaves_the_database_and_its_files_untouched() {
    let w = World::start().await;
    let id = w.backup().await;
    let want = tree_of(&w.prod_fs.join("acme"));

    // A hook that fails: nothing swapped, the extracted files removed.
    let failing = w.failing_config().await;
    let before = w.staging_state().await;
    w.restore_with(&failing, &[]).await.assert_code(1);
    assert!(w.staging_state().await == before, "staging changed");
    w.assert_no_leftovers().await;

    // The first target's files object is damaged: the second one's is used.
    corrupt_files(&w, 0, &id).await;
    let run = w.restore(&["--json"]).await;
    run.assert_code(0);
    let files = &json(&run)["restore"]["files"];
    assert_eq!(files["target"], "b", "{files}");
    assert_eq!(files["failed_targets"][0]["target"], "a", "{files}");
    assert_eq!(tree_of(&w.staging_fs.join("acme")), want);
    w.assert_no_leftovers().await;

    // Damaged on every target: the restore fails, staging stays as the last one left it.
    corrupt_files(&w, 1, &id).await;
    let before = w.staging_state().await;
    let run = w.restore(&[]).await;
    run.assert_code(1);
    assert!(
        run.stderr.contains("companion files") && run.stderr.contains("checksum mismatch"),
        "{}",
        run.stderr
    );
    assert!(w.staging_state().await == before, "staging changed");
    w.assert_no_leftovers().await;
}

/// One entry of [`crafted_tar`]: path, type, link target.
type RawEntry<'a> = (&'a [u8], tar::EntryType, Option<&'a [u8]>);

/// A tar written by hand (the tar crate's raw header).
fn crafted_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, link) in entries {
        let mut h = tar::Header::new_old();
        let old = h.as_old_mut();
        old.name[..path.len()].copy_from_slice(path);
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l);
        }
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        let data: &[u8] = if *kind == tar::EntryType::Regular {
            b"escaped!"
        } else {
            b""
        };
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_whose_entries_would_escape_are_refused() {
    let w = World::start().await;
    let id = w.backup().await;
    let outside = w.env.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let absolute = outside.join("absolute-escaped");
    let abs = absolute.display().to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "../escaped",
            crafted_tar(&[
                (b"ab/ok", tar::EntryType::Regular, None),
                (b"../escaped", tar::EntryType::Regular, None),
            ]),
        ),
        (
            abs.as_str(),
            crafted_tar(&[
                (b"ab/ok", tar::EntryType::Regular, None),
                (abs.as_bytes(), tar::EntryType::Regular, None),
            ]),
        ),
        (
            "ab/link",
            crafted_tar(&[
                (b"ab/ok", tar::EntryType::Regular, None),
                (
                    b"ab/link",
                    tar::EntryType::Symlink,
                    Some(outside.display().to_string().as_bytes()),
                ),
                (b"ab/link/through-the-link", tar::EntryType::Regular, None),
            ]),
        ),
    ];
    for (entry, tar) in cases {
        for store in &w.stores {
            plant_files_archive(store, &id, &tar, 2).await;
        }
        let before = w.staging_state().await;
        let run = w.restore(&[]).await;
        run.assert_code(1);
        assert!(
            run.stderr
                .contains(&format!("holds entry {entry:?}, refused")),
            "{entry}: {}",
            run.stderr
        );
        assert!(
            w.staging_state().await == before,
            "{entry}: staging changed"
        );
        assert!(!w.staging_fs.join("escaped").exists(), "{entry}");
        assert!(!w.env.dir.path().join("escaped").exists(), "{entry}");
        assert_eq!(names_in(&outside), Vec::<String>::new(), "{entry}");
        w.assert_no_leftovers().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_missing_attachments_by_count() {
    let w = World::start().await;
    w.backup().await;
    let run = w.pgferry(&w.config, &["verify", "--json"]).await;
    run.assert_code(0);
    let files = &json(&run)["reports"][0]["files"];
    assert_eq!(files["expected_files"], 5, "{files}");
    assert_eq!(files["actual_files"], 5, "{files}");
    assert_eq!(files["attachments_checked"], 5, "{files}");
    assert_eq!(files["missing_attachments"], 0, "{files}");

    // Two files lost from production's filestore; their rows stay.
    let lost = [
        "ab/ab99887766554433221100aabbccddeeff0011",
        "f0/f0aabbccddeeff00112233445566778899aabb",
    ];
    for l in lost {
        std::fs::remove_file(w.prod_fs.join("acme").join(l)).unwrap();
    }
    w.backup().await;
    let run = w.pgferry(&w.config, &["verify", "--json"]).await;
    run.assert_code(1);
    let report = &json(&run)["reports"][0];
    let files = &report["files"];
    assert_eq!(files["expected_files"], 3, "{files}");
    assert_eq!(files["actual_files"], 3, "{files}");
    assert_eq!(files["attachments_checked"], 5, "{files}");
    assert_eq!(files["missing_attachments"], 2, "{files}");
    assert_eq!(
        files["missing_examples"],
        serde_json::json!(lost),
        "{files}"
    );
    assert!(
        report["problems"]
            .to_string()
            .contains("2 of 5 ir_attachment rows name a file missing"),
        "{report}"
    );
    assert!(
        run.stderr
            .contains("Attachments name files missing from the companion files"),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_or_target_without_files_warns_and_leaves_the_directory() {
    let w = World::start().await;
    // A snapshot without files (its source has none configured), into a target with files.
    let no_source = w
        .config_for(
            Shape {
                source_files: false,
                ..FULL
            },
            "no-source-files",
        )
        .await;
    w.pgferry(&no_source, &["backup", "--source", "prod", "--force"])
        .await
        .assert_code(0);
    let before = tree_of(&w.staging_fs);
    let run = w.restore(&["--json"]).await;
    run.assert_code(0);
    let files = &json(&run)["restore"]["files"];
    assert_eq!(files["status"], "skipped", "{files}");
    assert!(
        files["warning"]
            .as_str()
            .unwrap()
            .contains("has no companion files"),
        "{files}"
    );
    assert_eq!(tree_of(&w.staging_fs), before);

    // A snapshot with files, into a target without.
    w.backup().await;
    let no_target = w
        .config_for(
            Shape {
                target_files: false,
                ..FULL
            },
            "no-target-files",
        )
        .await;
    let run = w.restore_with(&no_target, &[]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains("warning: companion files not restored")
            && run.stdout.contains("set [[restore_target]] files"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("Companion files not restored."),
        "{}",
        run.stderr
    );
    assert_eq!(tree_of(&w.staging_fs), before);
    w.assert_no_leftovers().await;
}

/// The name `guard::tmp_name` gives a restore's temporary database.
fn tmp_database(database: &str, snapshot_id: &str) -> String {
    let hash = &hex::encode(Sha256::digest(database.as_bytes()))[..10];
    format!("pgferry_tmp_{hash}_{}", snapshot_id.to_ascii_lowercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_restore_is_settled_by_the_next_one() {
    let w = World::start().await;
    let id = w.backup().await;
    // The next restores fail in their hook, after settling: what they settled stays to see.
    let failing = w.failing_config().await;
    let dest = w.staging_fs.join("acme");
    let old = w.staging_fs.join(".pgferry-old-acme-20261127T140000Z");
    let previous = tree_of(&dest);
    let write_new = |dir: &Path| {
        std::fs::create_dir_all(dir.join("ab")).unwrap();
        std::fs::write(dir.join("ab/new"), "new").unwrap();
    };

    // Killed between moving D aside and moving the new files in: D is put back; a T of
    // this destination is removed, one of `acme-x` is not.
    std::fs::rename(&dest, &old).unwrap();
    let t = w.staging_fs.join(".pgferry-tmp-acme-0123456789ab");
    let other = w.staging_fs.join(".pgferry-tmp-acme-x-0123456789ab");
    write_new(&t);
    write_new(&other);
    w.restore_with(&failing, &[]).await.assert_code(1);
    assert_eq!(tree_of(&dest), previous);
    assert!(!old.exists() && !t.exists() && other.exists());
    std::fs::remove_dir_all(&other).unwrap();
    w.assert_no_leftovers().await;

    // Killed after the new files went in, before the databases' rename (its temporary
    // database is there): rolled back.
    std::fs::rename(&dest, &old).unwrap();
    write_new(&dest);
    w.staging
        .create_database(&tmp_database("acme", &id))
        .await
        .unwrap();
    let run = w.restore_with(&failing, &[]).await;
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("Settled the companion files of an interrupted restore."),
        "{}",
        run.stderr
    );
    assert_eq!(tree_of(&dest), previous);
    w.assert_no_leftovers().await;

    // Killed after the databases' rename (no temporary database): rolled forward.
    std::fs::rename(&dest, &old).unwrap();
    write_new(&dest);
    let new = tree_of(&dest);
    w.restore_with(&failing, &[]).await.assert_code(1);
    assert_eq!(tree_of(&dest), new);
    w.assert_no_leftovers().await;
}
