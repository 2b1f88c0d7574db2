//! Client-side encryption (age) end to end: a production cluster backed up, encrypted, to two
//! Garage buckets, restored and verified into a staging cluster with the identity files, and
//! opened by hand with the independent `age` tool. Keys are generated per test.

use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use object_store::{ObjectStore, PutPayload};
use sha2::Digest;

use crate::backup::TRICKY_SQL;
use crate::restore::{hook_path, json, without_hooked, World};
use crate::support::env::{self, get, keys, manifest_of, Run};
use crate::support::postgres::PgCluster;
use crate::support::restore_argv;

/// A generated key pair: its identity file (as age-keygen writes it) and public key.
struct Key {
    file: PathBuf,
    recipient: String,
    secret: String,
}

fn key(dir: &Path, name: &str) -> Key {
    let id = age::x25519::Identity::generate();
    let secret = id.to_string().expose_secret().to_string();
    let recipient = id.to_public().to_string();
    let file = dir.join(format!("{name}.txt"));
    std::fs::write(
        &file,
        format!("# created: by the test\n# public key: {recipient}\n{secret}\n"),
    )
    .unwrap();
    Key {
        file,
        recipient,
        secret,
    }
}

impl World {
    /// This world's config with `extra` appended (an `[encryption]` section, say), written to
    /// a new file.
    fn config_plus(&self, extra: &str) -> PathBuf {
        let base = std::fs::read_to_string(&self.config).unwrap();
        self.env.write_config(&format!("{base}\n{extra}\n"))
    }

    /// No secret key may appear in any output.
    fn keep_secret(&self, k: &Key) {
        self.env
            .add_secret_var(&format!("PGFERRY_TEST_UNUSED_{}", k.recipient), &k.secret);
    }

    async fn restore_with(&self, config: &Path, extra: &[&str]) -> Run {
        self.pgferry_with(config, &restore_argv("acme", "staging-acme", extra))
            .await
    }

    async fn manifest(&self, i: usize, id: &str) -> serde_json::Value {
        manifest_of(&get(&self.stores[i], &format!("prod/acme/{id}.manifest.json")).await)
    }
}

fn encryption_toml(recipients: &[&Key], identity: Option<&Key>) -> String {
    let list = recipients
        .iter()
        .map(|k| format!("{:?}", k.recipient))
        .collect::<Vec<_>>()
        .join(", ");
    let identity = identity
        .map(|k| format!("identity_file = {:?}\n", k.file.display().to_string()))
        .unwrap_or_default();
    format!("[encryption]\nrecipients = [{list}]\n{identity}")
}

/// `age -d -i KEY object | zstd -d | pg_restore` into a new database of `pg`.
async fn restore_by_hand_with_age(pg: &PgCluster, object: &Path, identity: &Path, into: &str) {
    let decode = format!(
        "'{}' -d -i '{}' '{}' | zstd -q -d -c",
        which("age").display(),
        identity.display(),
        object.display()
    );
    crate::backup::restore_piped(pg, &decode, into).await;
}

/// The path of a tool the test needs; a missing one fails the test loudly
/// (scripts/setup.sh installs it).
fn which(tool: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{tool}` is not installed; run scripts/setup.sh"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_recipients_each_identity_alone_restores_and_the_age_tool_opens_the_object() {
    let w = World::start(TRICKY_SQL, &[hook_path()], "").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (key(keys_dir.path(), "k1"), key(keys_dir.path(), "k2"));
    w.keep_secret(&k1);
    w.keep_secret(&k2);
    let source = w.env.pg.table_fingerprints("acme").await.unwrap();

    // Taken before encryption was turned on.
    let plain_id = w.backup().await;
    std::thread::sleep(std::time::Duration::from_millis(1100));

    let encrypted = w.config_plus(&encryption_toml(&[&k1, &k2], None));
    let run = w
        .pgferry_with(&encrypted, &["backup", "--source", "prod", "--force"])
        .await;
    let id = run.snapshot_id();
    assert_ne!(id, plain_id);

    // Both targets hold the same ciphertext, named .age, hashed as stored.
    let m = w.manifest(0, &id).await;
    let object = m["object_key"].as_str().unwrap().to_string();
    assert!(object.ends_with(".dump.zst.age"), "{object}");
    assert_eq!(m["encryption"]["algorithm"], "age", "{m}");
    assert_eq!(
        m["encryption"]["recipients"],
        serde_json::json!([k1.recipient, k2.recipient])
    );
    assert_eq!(w.manifest(1, &id).await["object_key"], m["object_key"]);
    let a = get(&w.stores[0], &object).await;
    let b = get(&w.stores[1], &object).await;
    assert_eq!(a, b, "one ciphertext fans out to every target");
    assert!(a.starts_with(b"age-encryption.org/v1\n"));
    assert_eq!(hex::encode(sha2::Sha256::digest(&a)), m["sha256"]);
    assert_eq!(a.len() as u64, m["stored_size"].as_u64().unwrap());
    assert!(
        zstd::decode_all(&a[..]).is_err(),
        "the stored object must not be plain zstd"
    );
    // The plain snapshot's manifest says nothing about encryption.
    let plain = w.manifest(0, &plain_id).await;
    assert!(plain.get("encryption").is_none(), "{plain}");
    assert!(plain["object_key"].as_str().unwrap().ends_with(".dump.zst"));

    // Each identity alone restores it: k1 as the global identity file, k2 as the restore
    // target's.
    let with_k1 = w.config_plus(&encryption_toml(&[&k1, &k2], Some(&k1)));
    let run = w
        .restore_with(&with_k1, &["--json", "--as", "acme_k1"])
        .await;
    run.assert_code(0);
    assert_eq!(json(&run)["restore"]["snapshot_id"], id.as_str());
    let restored = w.staging.table_fingerprints("acme_k1").await.unwrap();
    assert_eq!(without_hooked(&restored), without_hooked(&source));

    let base = std::fs::read_to_string(&w.config).unwrap();
    let with_k2 = w.env.write_config(&format!(
        "{}\n{}",
        base.replacen(
            "owner = \"odoo\"\n",
            &format!(
                "owner = \"odoo\"\nidentity_file = {:?}\n",
                k2.file.display().to_string()
            ),
            1
        ),
        encryption_toml(&[&k1, &k2], None)
    ));
    // --jobs 2: through the spool, which is gone afterwards.
    let run = w
        .restore_with(&with_k2, &["--as", "acme_k2", "--jobs", "2"])
        .await;
    run.assert_code(0);
    let restored = w.staging.table_fingerprints("acme_k2").await.unwrap();
    assert_eq!(without_hooked(&restored), without_hooked(&source));

    // The plain snapshot still restores with encryption on and no identity at all.
    let run = w
        .restore_with(&encrypted, &["--snapshot", &plain_id, "--as", "acme_plain"])
        .await;
    run.assert_code(0);
    let restored = w.staging.table_fingerprints("acme_plain").await.unwrap();
    assert_eq!(without_hooked(&restored), without_hooked(&source));

    // Verify decrypts with [verify] identity_file.
    let verifying = w.config_plus(&format!(
        "{}\n[verify]\nurl = \"{}\"\nidentity_file = {:?}\n",
        encryption_toml(&[&k1, &k2], None),
        w.staging.url(),
        k2.file.display().to_string()
    ));
    let run = w
        .pgferry_with(&verifying, &["verify", "--database", "acme", "--json"])
        .await;
    run.assert_code(0);

    // By hand: `age -d -i key | zstd -d | pg_restore`, with the independent age tool.
    let downloaded = keys_dir.path().join("x.dump.zst.age");
    std::fs::write(&downloaded, &a).unwrap();
    restore_by_hand_with_age(&w.staging, &downloaded, &k1.file, "acme_by_hand").await;
    assert_eq!(
        w.staging.table_fingerprints("acme_by_hand").await.unwrap(),
        source
    );
    w.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identity_or_a_wrong_one_fails_before_staging_is_touched() {
    let w = World::start(TRICKY_SQL, &[hook_path()], "").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let (k1, other) = (key(keys_dir.path(), "k1"), key(keys_dir.path(), "other"));
    w.keep_secret(&k1);
    w.keep_secret(&other);
    let encrypted = w.config_plus(&encryption_toml(&[&k1], None));
    let id = w
        .pgferry_with(&encrypted, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    let before = w.staging.table_fingerprints("acme").await.unwrap();

    let run = w.restore_with(&encrypted, &[]).await;
    run.assert_code(2);
    let out = run.output();
    assert!(out.contains("no identity is configured"), "{out}");
    assert!(out.contains(&id) && out.contains(&k1.recipient), "{out}");
    for jobs in ["1", "2"] {
        let wrong = w.config_plus(&encryption_toml(&[&k1], Some(&other)));
        let run = w.restore_with(&wrong, &["--jobs", jobs]).await;
        run.assert_code(2);
        let out = run.output();
        assert!(out.contains("no key in"), "{out}");
        assert!(
            out.contains(&k1.recipient) && out.contains(&other.recipient),
            "the error names the recipients and the keys it has: {out}"
        );
    }
    let unreadable = w.config_plus(&format!(
        "[encryption]\nrecipients = [{:?}]\nidentity_file = \"/nonexistent/key.txt\"\n",
        k1.recipient
    ));
    let run = w.restore_with(&unreadable, &[]).await;
    run.assert_code(2);
    assert!(
        run.output().contains("/nonexistent/key.txt"),
        "{}",
        run.output()
    );
    assert_eq!(w.staging.table_fingerprints("acme").await.unwrap(), before);
    w.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_ciphertext_falls_back_to_the_other_target() {
    let w = World::start(TRICKY_SQL, &[hook_path()], "").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let k1 = key(keys_dir.path(), "k1");
    w.keep_secret(&k1);
    let config = w.config_plus(&encryption_toml(&[&k1], Some(&k1)));
    let id = w
        .pgferry_with(&config, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    let source = w.env.pg.table_fingerprints("acme").await.unwrap();

    // A flipped byte in target a's copy: the checksum sees it, b's copy is restored.
    let object = w.manifest(0, &id).await["object_key"]
        .as_str()
        .unwrap()
        .to_string();
    let good = get(&w.stores[0], &object).await;
    let mut flipped = good.to_vec();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    put(&w.stores[0], &object, flipped.clone()).await;
    let run = w.restore_with(&config, &["--json"]).await;
    run.assert_code(0);
    let report = json(&run);
    assert_eq!(report["restore"]["target"], "b", "{report}");
    assert_eq!(report["restore"]["failed_targets"][0]["target"], "a");
    let why = report["restore"]["failed_targets"][0]["error"]
        .as_str()
        .unwrap();
    assert!(why.contains("checksum mismatch"), "{why}");
    let restored = w.staging.table_fingerprints("acme").await.unwrap();
    assert_eq!(without_hooked(&restored), without_hooked(&source));

    // Someone who can write the buckets alters the object and fixes up the manifests' hash
    // (on both targets: a restore reads one manifest for every copy): age's authentication
    // refuses the ciphertext, nothing is restored, staging is untouched. Likewise a
    // truncated object whose manifests were fixed up.
    let before = w.staging.table_fingerprints("acme").await.unwrap();
    let truncated = good[..good.len() - 1000].to_vec();
    for (bad, what) in [(flipped, "tampered"), (truncated, "truncated")] {
        let mut manifest = w.manifest(0, &id).await;
        manifest["sha256"] = hex::encode(sha2::Sha256::digest(&bad)).into();
        manifest["stored_size"] = bad.len().into();
        put(&w.stores[0], &object, bad).await;
        for store in &w.stores {
            put(
                store,
                &format!("prod/acme/{id}.manifest.json"),
                serde_json::to_vec_pretty(&manifest).unwrap(),
            )
            .await;
        }
        for jobs in ["1", "2"] {
            let run = w.restore_with(&config, &["--jobs", jobs]).await;
            run.assert_code(1);
            let out = run.output();
            assert!(
                out.contains("a: cannot decrypt the object"),
                "{what}, --jobs {jobs}: {out}"
            );
            assert_eq!(
                w.staging.table_fingerprints("acme").await.unwrap(),
                before,
                "{what}, --jobs {jobs}"
            );
        }
    }
    w.assert_no_leftovers().await;
}

async fn put(store: &std::sync::Arc<dyn ObjectStore>, key: &str, bytes: Vec<u8>) {
    store
        .put(
            &object_store::path::Path::parse(key).unwrap(),
            PutPayload::from(bytes),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_repair_and_prune_need_no_key() {
    let w = World::start(TRICKY_SQL, &[], "").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let k1 = key(keys_dir.path(), "k1");
    w.keep_secret(&k1);
    // Production's config: public keys only.
    let config = w.config_plus(&encryption_toml(&[&k1], None));
    let id = w
        .pgferry_with(&config, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    let object = w.manifest(0, &id).await["object_key"]
        .as_str()
        .unwrap()
        .to_string();
    w.pgferry_with(&config, &["check", "--read-data"])
        .await
        .assert_code(0);

    // b loses its copy; a flipped byte would be found the same way (tests/it/repair.rs).
    w.stores[1]
        .delete(&object_store::path::Path::parse(&object).unwrap())
        .await
        .unwrap();
    w.pgferry_with(&config, &["check"]).await.assert_code(1);
    let run = w.pgferry_with(&config, &["repair"]).await;
    run.assert_code(0);
    assert!(run.stdout.contains(" to b from a"), "{}", run.stdout);
    w.pgferry_with(&config, &["check", "--read-data"])
        .await
        .assert_code(0);
    assert_eq!(
        get(&w.stores[1], &object).await,
        get(&w.stores[0], &object).await
    );
    env::assert_every_manifest_names_an_intact_object(&w.stores[1]).await;

    // An encrypted dump no manifest names is an orphan like a plain one: listed, and removed
    // by prune once pipeline.orphan_grace has passed; the committed snapshot stays.
    let orphan = format!("prod/acme/{id}-0123456789ab.dump.zst.age");
    put(&w.stores[0], &orphan, b"age-encryption.org/v1\n".to_vec()).await;
    let run = w.pgferry_with(&config, &["list"]).await;
    run.assert_code(0);
    assert!(
        run.stderr
            .contains("0123456789ab.dump.zst.age has no manifest"),
        "{}",
        run.stderr
    );
    let before: Vec<String> = keys(&w.stores[0])
        .await
        .into_iter()
        .filter(|k| *k != orphan)
        .collect();
    let out = crate::retention::prune_later(
        &config,
        &w.env_vars(),
        &Default::default(),
        pgferry::retention::DEFAULT_ORPHAN_GRACE + std::time::Duration::from_secs(60),
    )
    .await;
    assert!(
        out.contains("deleted 0 snapshot(s) and 1 orphan dump(s)"),
        "{out}"
    );
    assert_eq!(keys(&w.stores[0]).await, before);
    assert_eq!(
        get(&w.stores[0], &object).await,
        get(&w.stores[1], &object).await
    );
}
