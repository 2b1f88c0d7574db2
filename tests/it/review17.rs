//! Review 17, hostile: someone who can write ONE bucket replaces an encrypted snapshot's
//! objects (the dump, the companion-files archive) with crafted ciphertexts: truncated at a
//! chunk boundary, with bytes appended, two chunks swapped, a chunk of another snapshot
//! spliced in, another snapshot's header on this payload, a 2 MiB header line, an empty
//! object, a plain zstd dump, the same plaintext encrypted to another recipient. With the
//! manifests untouched the restore falls back to the other target; with the manifests fixed
//! up to the crafted bytes (sha256, size) restore and verify fail cleanly: exit 1, "cannot
//! decrypt", staging untouched, no plaintext or identity in the output, in bounded time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use age::secrecy::ExposeSecret;
use object_store::{ObjectStore, PutPayload};
use sha2::Digest;

use crate::backup::TRICKY_SQL;
use crate::restore::{json, without_hooked, World};
use crate::support::env::{get, manifest_of};
use crate::support::{kill_when_appears, restore_argv};

/// age's ciphertext chunk: 64 KiB of plaintext and its 16-byte tag.
const CHUNK: usize = 64 * 1024 + 16;

/// A value of the dump that must never reach pgferry's output.
const MARKER: &str = "R17-PLAINTEXT-MARKER-9f3c";

/// Enough poorly compressible rows for a dump of several age chunks, and the marker.
fn extra_sql() -> String {
    format!(
        "{TRICKY_SQL}\nCREATE TABLE r17_blob AS SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) AS h FROM generate_series(1, 12000) g;\nCREATE TABLE r17_plain (note text);\nINSERT INTO r17_plain VALUES ('{MARKER}');\n"
    )
}

pub(crate) struct Key {
    pub(crate) file: PathBuf,
    pub(crate) recipient: String,
    pub(crate) id: age::x25519::Identity,
}

pub(crate) fn key(dir: &Path, name: &str) -> Key {
    let id = age::x25519::Identity::generate();
    let secret = id.to_string().expose_secret().to_string();
    let recipient = id.to_public().to_string();
    let file = dir.join(format!("{name}.txt"));
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    Key {
        file,
        recipient,
        id,
    }
}

fn secret_of(k: &Key) -> String {
    k.id.to_string().expose_secret().to_string()
}

pub(crate) fn encryption_toml(k: &Key) -> String {
    format!(
        "[encryption]\nrecipients = [{:?}]\nidentity_file = {:?}\n",
        k.recipient,
        k.file.display().to_string()
    )
}

/// [`encryption_toml`] and a `[verify]` on the staging server, without checks.
fn encrypted_with_verify(w: &World, k: &Key) -> String {
    format!(
        "{}\n[verify]\nurl = \"{}\"\nchecks = []\n",
        encryption_toml(k),
        w.staging.url()
    )
}

pub(crate) fn config_plus(w: &World, extra: &str) -> PathBuf {
    let base = std::fs::read_to_string(&w.config).unwrap();
    w.env.write_config(&format!("{base}\n{extra}\n"))
}

/// Writes `m` as a manifest at `key`, pretty JSON as pgferry writes them.
pub(crate) async fn put_manifest(store: &Arc<dyn ObjectStore>, key: &str, m: &serde_json::Value) {
    put(store, key, serde_json::to_vec_pretty(m).unwrap()).await;
}

pub(crate) async fn put(store: &Arc<dyn ObjectStore>, key: &str, bytes: Vec<u8>) {
    store
        .put(
            &object_store::path::Path::parse(key).unwrap(),
            PutPayload::from(bytes),
        )
        .await
        .unwrap();
}

/// Where the payload of an age file starts: after the header's `--- ` line and the nonce.
fn payload_start(c: &[u8]) -> usize {
    let mac = c
        .windows(5)
        .position(|w| w == b"\n--- ")
        .expect("an age header")
        + 1;
    mac + c[mac..].iter().position(|&b| b == b'\n').unwrap() + 1 + 16
}

/// The plaintext of an age file, by the age crate.
pub(crate) fn decrypt(k: &Key, c: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let d = age::Decryptor::new(c).unwrap();
    let mut r = d
        .decrypt(std::iter::once(&k.id as &dyn age::Identity))
        .unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    out
}

/// `plain` encrypted by the age crate to a fresh key nobody configured.
fn encrypt_to_stranger(plain: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let stranger = age::x25519::Identity::generate().to_public();
    let e =
        age::Encryptor::with_recipients(std::iter::once(&stranger as &dyn age::Recipient)).unwrap();
    let mut w = e.wrap_output(Vec::new()).unwrap();
    w.write_all(plain).unwrap();
    w.finish().unwrap()
}

/// The crafted replacements of `good` (this snapshot's ciphertext), from `other` (another
/// snapshot's, same recipient) and `plain_zstd` (an unencrypted dump object).
fn crafted(k: &Key, good: &[u8], other: &[u8], plain_zstd: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let (s, so) = (payload_start(good), payload_start(other));
    assert!(
        good.len() > s + 3 * CHUNK && other.len() > so + 2 * CHUNK,
        "the test needs dumps of more than 3 age chunks: {} and {} bytes",
        good.len(),
        other.len()
    );
    let chunk =
        |c: &[u8], start: usize, i: usize| c[start + i * CHUNK..start + (i + 1) * CHUNK].to_vec();
    let mut swapped = good[..s].to_vec();
    swapped.extend(chunk(good, s, 1));
    swapped.extend(chunk(good, s, 0));
    swapped.extend_from_slice(&good[s + 2 * CHUNK..]);
    let mut spliced = good[..s + CHUNK].to_vec();
    spliced.extend(chunk(other, so, 1));
    spliced.extend_from_slice(&good[s + 2 * CHUNK..]);
    let mut other_header = other[..so].to_vec();
    other_header.extend_from_slice(&good[s..]);
    let mut appended = good.to_vec();
    appended.extend_from_slice(&[0u8; 16]);
    let mut appended_chunk = good.to_vec();
    appended_chunk.extend(chunk(good, s, 1));
    let mut huge_header = b"age-encryption.org/v1\n-> X25519 ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'A', 2 * 1024 * 1024));
    vec![
        ("empty", Vec::new()),
        (
            "truncated at a chunk boundary",
            good[..s + 2 * CHUNK].to_vec(),
        ),
        ("truncated after the header", good[..s].to_vec()),
        ("trailing bytes", appended),
        ("a chunk appended", appended_chunk),
        ("two chunks swapped", swapped),
        ("another snapshot's chunk spliced in", spliced),
        ("another snapshot's header", other_header),
        ("a 2 MiB header line", huge_header),
        ("a plain zstd dump named .age", plain_zstd.to_vec()),
        (
            "to another recipient",
            encrypt_to_stranger(&decrypt(k, good)),
        ),
    ]
}

/// Every output must be free of the identity and of the dump's plaintext.
pub(crate) fn assert_clean_output(out: &str, k: &Key) {
    let secret = secret_of(k);
    assert!(!out.contains(&secret), "the identity leaked: {out}");
    assert!(!out.contains(MARKER), "plaintext leaked: {out}");
}

pub(crate) async fn manifest(w: &World, i: usize, id: &str) -> serde_json::Value {
    manifest_of(&get(&w.stores[i], &format!("prod/acme/{id}.manifest.json")).await)
}

/// Runs pgferry under a time bound tighter than the harness's 10 minutes.
pub(crate) async fn bounded(w: &World, config: &Path, args: &[&str]) -> crate::support::env::Run {
    let started = Instant::now();
    let run = w.pgferry_with(config, args).await;
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "{args:?} took {:?}",
        started.elapsed()
    );
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_dump_ciphertexts_fall_back_then_fail_restore_and_verify_cleanly() {
    let w = World::start(&extra_sql(), &[], "").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let k = key(keys_dir.path(), "k");
    let config = config_plus(&w, &encrypted_with_verify(&w, &k));
    let source = w.env.pg.table_fingerprints("acme").await.unwrap();

    // A plain snapshot, another encrypted one, then the one under attack (the latest).
    let plain_id = w.backup().await;
    std::thread::sleep(Duration::from_millis(1100));
    let other_id = bounded(&w, &config, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    std::thread::sleep(Duration::from_millis(1100));
    let id = bounded(&w, &config, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    let object_of = |m: &serde_json::Value| m["object_key"].as_str().unwrap().to_string();
    let object = object_of(&manifest(&w, 0, &id).await);
    let good = get(&w.stores[0], &object).await.to_vec();
    let other = get(&w.stores[0], &object_of(&manifest(&w, 0, &other_id).await))
        .await
        .to_vec();
    let plain_zstd = get(&w.stores[0], &object_of(&manifest(&w, 0, &plain_id).await))
        .await
        .to_vec();
    let variants = crafted(&k, &good, &other, &plain_zstd);
    let argv = |extra: &[&'static str]| {
        let mut v = restore_argv("acme", "staging-acme", extra);
        v.extend(["--snapshot", id.as_str()]);
        v
    };

    // 1. One bucket's object replaced, its manifests untouched: b's copy is restored.
    for (what, bytes) in &variants {
        put(&w.stores[0], &object, bytes.clone()).await;
        let run = bounded(&w, &config, &argv(&["--json"])).await;
        assert_clean_output(&run.output(), &k);
        assert_eq!(run.code, 0, "{what}: {}", run.output());
        let report = json(&run);
        assert_eq!(report["restore"]["target"], "b", "{what}: {report}");
        // A copy of another size than the manifest's is skipped by the listing; one of
        // the same size fails its checksum or decryption and is reported.
        let failed = report["restore"]["failed_targets"].as_array().unwrap();
        assert!(
            failed.is_empty() && bytes.len() != good.len()
                || failed.len() == 1 && failed[0]["target"] == "a",
            "{what}: {report}"
        );
        let restored = w.staging.table_fingerprints("acme").await.unwrap();
        assert_eq!(without_hooked(&restored), without_hooked(&source), "{what}");
    }
    put(&w.stores[0], &object, good.clone()).await;
    bounded(&w, &config, &["check", "--read-data"])
        .await
        .assert_code(0);

    // 2. The object replaced on both targets and every manifest fixed up to its sha256 and
    //    size: restore and verify fail, staging is untouched, nothing is left behind.
    let before = w.staging.table_fingerprints("acme").await.unwrap();
    let original = manifest(&w, 0, &id).await;
    for (what, bytes) in &variants {
        let mut m = original.clone();
        m["sha256"] = hex::encode(sha2::Sha256::digest(bytes)).into();
        m["stored_size"] = bytes.len().into();
        for store in &w.stores {
            put(store, &object, bytes.clone()).await;
            put_manifest(store, &format!("prod/acme/{id}.manifest.json"), &m).await;
        }
        for jobs in ["1", "2"] {
            let run = bounded(&w, &config, &argv(&["--jobs", jobs])).await;
            let out = run.output();
            assert_clean_output(&out, &k);
            assert_eq!(run.code, 1, "{what}, --jobs {jobs}: {out}");
            assert!(
                out.contains("a: cannot decrypt the object")
                    && out.contains("b: cannot decrypt the object"),
                "{what}, --jobs {jobs}: {out}"
            );
            assert_eq!(
                w.staging.table_fingerprints("acme").await.unwrap(),
                before,
                "{what}, --jobs {jobs}"
            );
            w.assert_no_leftovers().await;
        }
        let run = bounded(&w, &config, &["verify", "--database", "acme", "--json"]).await;
        let out = run.output();
        assert_clean_output(&out, &k);
        assert_eq!(run.code, 1, "{what}: verify must fail: {out}");
        assert!(out.contains("cannot decrypt the object"), "{what}: {out}");
        w.assert_no_leftovers().await;
    }
}

/// A world whose source has a filestore (several age chunks of incompressible bytes and a
/// small file) and whose restore target has one (`acme/old/previous.txt`), encrypted to `k`.
pub(crate) struct FilesWorld {
    pub(crate) w: World,
    pub(crate) config: PathBuf,
    pub(crate) staging_fs: PathBuf,
    pub(crate) noise: Vec<u8>,
}

pub(crate) async fn files_world(k: &Key, hooks: &[&Path]) -> FilesWorld {
    let hooks: Vec<String> = hooks.iter().map(|h| h.display().to_string()).collect();
    let w = World::start(TRICKY_SQL, &hooks, "").await;
    let prod_fs = w.env.dir.path().join("prod-fs");
    let staging_fs = w.env.dir.path().join("staging-fs");
    let mut noise = vec![0u8; 5 * CHUNK];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut noise {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::create_dir_all(prod_fs.join("acme/ab")).unwrap();
    std::fs::write(prod_fs.join("acme/ab/noise.bin"), &noise).unwrap();
    std::fs::write(prod_fs.join("acme/ab/small.txt"), "small").unwrap();
    std::fs::create_dir_all(staging_fs.join("acme/old")).unwrap();
    std::fs::write(staging_fs.join("acme/old/previous.txt"), "previous files").unwrap();
    let base = std::fs::read_to_string(&w.config).unwrap();
    let base = base
        .replacen(
            "databases = [\"acme\"]\n",
            &format!(
                "databases = [\"acme\"]\nfiles = \"{}/{{database}}\"\n",
                prod_fs.display()
            ),
            1,
        )
        .replacen(
            "owner = \"odoo\"\n",
            &format!(
                "owner = \"odoo\"\nfiles = \"{}/{{database}}\"\n",
                staging_fs.display()
            ),
            1,
        );
    let config = w
        .env
        .write_config(&format!("{base}\n{}", encrypted_with_verify(&w, k)));
    FilesWorld {
        w,
        config,
        staging_fs,
        noise,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_files_archives_fall_back_then_fail_cleanly() {
    let keys_dir = tempfile::tempdir().unwrap();
    let k = key(keys_dir.path(), "k");
    let FilesWorld {
        w,
        config,
        staging_fs,
        noise,
        ..
    } = files_world(&k, &[]).await;
    let other_id = bounded(&w, &config, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    std::thread::sleep(Duration::from_millis(1100));
    let id = bounded(&w, &config, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    let files_of = |m: &serde_json::Value| {
        m["files"]["object_key"]
            .as_str()
            .unwrap_or_else(|| panic!("no files archive: {m}"))
            .to_string()
    };
    let original = manifest(&w, 0, &id).await;
    let object = files_of(&original);
    assert!(object.ends_with(".files.tar.zst.age"), "{object}");
    let good = get(&w.stores[0], &object).await.to_vec();
    let other = get(&w.stores[0], &files_of(&manifest(&w, 0, &other_id).await))
        .await
        .to_vec();
    let dump = get(&w.stores[0], original["object_key"].as_str().unwrap())
        .await
        .to_vec();
    // A zstd stream that is not age: the dump's plaintext.
    let plain_zstd = decrypt(&k, &dump);
    let variants = crafted(&k, &good, &other, &plain_zstd);
    let argv = |extra: &[&'static str]| {
        let mut v = restore_argv("acme", "staging-acme", extra);
        v.extend(["--snapshot", id.as_str()]);
        v
    };
    let restored_noise = || std::fs::read(staging_fs.join("acme/ab/noise.bin")).ok();

    // 1. a's archive replaced, manifests untouched: the files come from b.
    for (what, bytes) in &variants {
        put(&w.stores[0], &object, bytes.clone()).await;
        std::fs::remove_dir_all(staging_fs.join("acme")).ok();
        std::fs::create_dir_all(staging_fs.join("acme/old")).unwrap();
        let run = bounded(&w, &config, &argv(&["--json"])).await;
        assert_clean_output(&run.output(), &k);
        assert_eq!(run.code, 0, "{what}: {}", run.output());
        assert_eq!(restored_noise().as_deref(), Some(&noise[..]), "{what}");
        assert!(!staging_fs.join("acme/old").exists(), "{what}");
    }
    put(&w.stores[0], &object, good.clone()).await;

    // 2. Replaced on both, manifests fixed up: the restore fails, database and files as
    //    they were.
    std::fs::remove_dir_all(staging_fs.join("acme")).unwrap();
    std::fs::create_dir_all(staging_fs.join("acme/old")).unwrap();
    std::fs::write(staging_fs.join("acme/old/previous.txt"), "previous files").unwrap();
    let before = w.staging.table_fingerprints("acme").await.unwrap();
    for (what, bytes) in &variants {
        let mut m = original.clone();
        m["files"]["sha256"] = hex::encode(sha2::Sha256::digest(bytes)).into();
        m["files"]["stored_size"] = bytes.len().into();
        for store in &w.stores {
            put(store, &object, bytes.clone()).await;
            put_manifest(store, &format!("prod/acme/{id}.manifest.json"), &m).await;
        }
        let run = bounded(&w, &config, &argv(&[])).await;
        let out = run.output();
        assert_clean_output(&out, &k);
        assert_eq!(run.code, 1, "{what}: {out}");
        assert!(out.contains("cannot decrypt the object"), "{what}: {out}");
        assert_eq!(
            w.staging.table_fingerprints("acme").await.unwrap(),
            before,
            "{what}"
        );
        assert_eq!(
            std::fs::read_to_string(staging_fs.join("acme/old/previous.txt")).ok(),
            Some("previous files".to_string()),
            "{what}"
        );
        assert!(restored_noise().is_none(), "{what}");
        w.assert_no_leftovers().await;
        let run = bounded(&w, &config, &["verify", "--database", "acme"]).await;
        let out = run.output();
        assert_clean_output(&out, &k);
        assert_eq!(run.code, 1, "{what}: verify must fail: {out}");
        assert!(out.contains("cannot decrypt the object"), "{what}: {out}");
        w.assert_no_leftovers().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_buckets_rewritten_manifest_does_not_spoil_the_other_targets_copy() {
    let w = World::start(TRICKY_SQL, &[], "").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let k = key(keys_dir.path(), "k");
    let config = config_plus(&w, &encrypted_with_verify(&w, &k));
    let source = w.env.pg.table_fingerprints("acme").await.unwrap();
    let id = bounded(&w, &config, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    let manifest_key = format!("prod/acme/{id}.manifest.json");
    let original = manifest(&w, 0, &id).await;
    let object = original["object_key"].as_str().unwrap().to_string();
    let good = get(&w.stores[0], &object).await.to_vec();
    // The attacker writes bucket a only; bucket b (object and manifest) is intact.
    // 1. A flipped byte in a's ciphertext (same size), a's manifest's sha256 fixed up: b's copy
    //    is read with b's own manifest and restores; verify passes from b.
    let mut flipped = good.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    let mut fixed_up = original.clone();
    fixed_up["sha256"] = hex::encode(sha2::Sha256::digest(&flipped)).into();
    put(&w.stores[0], &object, flipped).await;
    put_manifest(&w.stores[0], &manifest_key, &fixed_up).await;
    let run = bounded(
        &w,
        &config,
        &restore_argv("acme", "staging-acme", &["--json"]),
    )
    .await;
    assert_clean_output(&run.output(), &k);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(json(&run)["restore"]["target"], "b", "{}", run.stdout);
    let restored = w.staging.table_fingerprints("acme").await.unwrap();
    assert_eq!(without_hooked(&restored), without_hooked(&source));
    let run = bounded(&w, &config, &["verify", "--database", "acme"]).await;
    assert_eq!(
        run.code, 0,
        "verify did not use b's intact copy: {}",
        run.stderr
    );

    // 2. a's manifest names another recipient (its object untouched): the manifests disagree
    //    about the encryption, and a copy is never read with a manifest that says otherwise
    //    than the first target's (else a bucket could downgrade a snapshot, or re-key it): the
    //    restore is refused before staging is touched, naming the recipients.
    let stranger = age::x25519::Identity::generate().to_public().to_string();
    let mut other_recipient = original.clone();
    other_recipient["encryption"]["recipients"] = serde_json::json!([stranger]);
    put(&w.stores[0], &object, good.clone()).await;
    put_manifest(&w.stores[0], &manifest_key, &other_recipient).await;
    let before = w.staging.table_fingerprints("acme").await.unwrap();
    let run = bounded(&w, &config, &restore_argv("acme", "staging-acme", &[])).await;
    assert_clean_output(&run.output(), &k);
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(run.stderr.contains(&stranger), "{}", run.stderr);
    assert_eq!(w.staging.table_fingerprints("acme").await.unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_buckets_rewrite_is_not_blamed_on_nor_repaired_into_the_intact_target() {
    let w = World::start(TRICKY_SQL, &[], "").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let k = key(keys_dir.path(), "k");
    let config = config_plus(&w, &encryption_toml(&k));
    let id = bounded(&w, &config, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    let mut m = manifest(&w, 0, &id).await;
    let object = m["object_key"].as_str().unwrap().to_string();
    let good = get(&w.stores[1], &object).await.to_vec();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    m["sha256"] = hex::encode(sha2::Sha256::digest(&bad)).into();
    put(&w.stores[0], &object, bad).await;
    put_manifest(&w.stores[0], &format!("prod/acme/{id}.manifest.json"), &m).await;
    let mut wrong = Vec::new();
    let check = bounded(&w, &config, &["check", "--read-data"]).await;
    let out = check.output();
    if out.contains("target b:") || out.contains("--to b") {
        wrong.push(format!("check blames b's intact copy: {out}"));
    }
    // What check advised: b's intact copy must survive it.
    let repair = bounded(&w, &config, &["repair", "--to", "b"]).await;
    if get(&w.stores[1], &object).await.to_vec() != good {
        wrong.push(format!(
            "repair --to b replaced b's intact copy: {}",
            repair.output()
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n---\n"));
}

/// SIGKILLs `pgferry restore … --as <as_db>` as soon as a name starting with `prefix`
/// appears in `parent`, `delay` later; whether it was killed (else it finished).
async fn kill_restore_at(
    w: &World,
    config: &Path,
    args: &[&str],
    parent: &Path,
    prefix: String,
    delay: Duration,
) -> bool {
    let child = w
        .env
        .command(config, args)
        .envs(w.env_vars())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kill_when_appears(child, parent.to_path_buf(), prefix, delay).await
}

/// The swap's other branch (issue 12 merged both into `rename_in`): the destination database
/// does not exist (`--as acme_fresh`), its directory absent or a stale one. A restore
/// SIGKILLed while its files move, then settled by the next restore of the same destination
/// (which fails in its hook after settling): the database exists iff its directory holds the
/// restored files; a stale directory without a database is either kept or replaced, never
/// lost half-way; nothing of the runs is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_into_a_new_database_killed_while_its_files_move_settles_consistently() {
    tokio::time::timeout(Duration::from_secs(1500), async {
        let keys_dir = tempfile::tempdir().unwrap();
        let k = key(keys_dir.path(), "k");
        let fw = files_world(&k, &[]).await;
        let (w, staging_fs) = (&fw.w, &fw.staging_fs);
        bounded(w, &fw.config, &["backup", "--source", "prod", "--force"])
            .await
            .assert_code(0);
        let hook = w.env.dir.path().join("fail.sql");
        std::fs::write(&hook, "SELECT 1/0;").unwrap();
        let base = std::fs::read_to_string(&fw.config).unwrap();
        let failing = w.env.write_config(&base.replacen(
            "hooks = []",
            &format!("hooks = [{:?}]", hook.display().to_string()),
            1,
        ));
        let args = restore_argv("acme", "staging-acme", &["--as", "acme_fresh"]);
        let d = staging_fs.join("acme_fresh");
        let mut outcomes = Vec::new();
        for stale in [false, true] {
            for ms in [0u64, 1, 3, 10, 30, 100] {
                let what = format!("stale dir {stale}, +{ms}ms");
                if stale {
                    std::fs::create_dir_all(d.join("stale")).unwrap();
                    std::fs::write(d.join("stale/s.txt"), "stale").unwrap();
                }
                let killed = kill_restore_at(
                    w,
                    &fw.config,
                    &args,
                    staging_fs,
                    ".pgferry-old-acme_fresh-".into(),
                    Duration::from_millis(ms),
                )
                .await;
                // Settle: the next restore of the destination, failing in its hook.
                let deadline = Instant::now() + Duration::from_secs(60);
                let settle = loop {
                    let run = w.pgferry_with(&failing, &args).await;
                    if run.stderr.contains("advisory lock held") && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    break run;
                };
                assert_eq!(settle.code, 1, "{what}: {}", settle.stderr);
                assert!(
                    settle.stderr.contains("division by zero"),
                    "{what}: {}",
                    settle.stderr
                );
                let db = w
                    .staging
                    .databases()
                    .await
                    .contains(&"acme_fresh".to_string());
                let noise = std::fs::read(d.join("ab/noise.bin")).ok();
                let stale_left = d.join("stale/s.txt").exists();
                outcomes.push((stale, ms, killed, db));
                if db {
                    assert_eq!(noise.as_deref(), Some(&fw.noise[..]), "{what}");
                    assert!(!stale_left, "{what}: restored database, stale files");
                } else {
                    assert!(noise.is_none(), "{what}: files without their database");
                    assert_eq!(stale_left, stale, "{what}: the stale directory");
                }
                let dbs = w.staging.databases().await;
                assert!(
                    dbs.iter().all(|n| !n.starts_with("pgferry_")),
                    "{what}: leftover databases {dbs:?}"
                );
                let names: Vec<String> = std::fs::read_dir(staging_fs)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert!(
                    names.iter().all(|n| !n.starts_with(".pgferry-")),
                    "{what}: leftover directories {names:?}"
                );
                // Reset: no acme_fresh database, no directory.
                if db {
                    w.staging
                        .execute("postgres", "DROP DATABASE acme_fresh")
                        .await
                        .unwrap();
                }
                std::fs::remove_dir_all(&d).ok();
            }
        }
        eprintln!("outcomes (stale dir, ms, killed, database restored): {outcomes:?}");
        assert!(
            outcomes.iter().any(|o| o.2),
            "no run was killed: the test proves nothing"
        );
    })
    .await
    .expect("the test hung");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_spooled_restore_leaves_no_plaintext_after_the_next_run() {
    tokio::time::timeout(Duration::from_secs(600), async {
        let w = World::start(&extra_sql(), &[], "").await;
        let keys_dir = tempfile::tempdir().unwrap();
        let k = key(keys_dir.path(), "k");
        let config = config_plus(&w, &encryption_toml(&k));
        bounded(&w, &config, &["backup", "--source", "prod", "--force"])
            .await
            .assert_code(0);
        let spool = w.env.dir.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let args = restore_argv("acme", "staging-acme", &["--jobs", "2"]);
        let mut killed = false;
        for _ in 0..5 {
            killed = kill_restore_at(
                &w,
                &config,
                &args,
                &spool,
                "pgferry-".into(),
                Duration::from_millis(0),
            )
            .await;
            if killed {
                break;
            }
        }
        assert!(killed, "no restore was killed while it spooled");
        let spooled = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("pgferry-"))
                .collect()
        };
        assert!(!spooled(&spool).is_empty(), "the kill left a spool file");
        // The next restore (after the killed one's session let go of the lock) succeeds ...
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let run = w.pgferry_with(&config, &args).await;
            if run.code != 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            run.assert_code(0);
            break;
        }
        // ... and no plaintext of the encrypted snapshot stays at rest.
        assert_eq!(spooled(&spool), Vec::<String>::new());
    })
    .await
    .expect("the test hung");
}

/// Memory and time stay bounded whatever the object holds: a 64 MiB "header" without a
/// newline and headers full of stanzas fail in seconds, with no more memory than a restore
/// of the real snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_crafted_header_costs_no_memory() {
    let w = World::start(TRICKY_SQL, &[], "").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let k = key(keys_dir.path(), "k");
    let config = config_plus(&w, &encryption_toml(&k));
    let id = bounded(&w, &config, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    let args = restore_argv("acme", "staging-acme", &[]);
    let baseline = crate::support::rusage::pgferry_measured(&w.env, &config, &args).await;
    baseline.run.assert_code(0);
    let original = manifest(&w, 0, &id).await;
    let object = original["object_key"].as_str().unwrap().to_string();
    let mut long_line = b"age-encryption.org/v1\n-> X25519 ".to_vec();
    long_line.extend(std::iter::repeat_n(b'A', 64 * 1024 * 1024));
    // Stanzas of k's real recipient type but garbage bodies: the age crate parses the header
    // again after each line (quadratic) and tries each stanza. 1 MiB of them took 557 s per
    // restore before the header was capped at 64 KiB; 60 KiB must be quick.
    let stanzas = |size: usize| {
        let mut many = b"age-encryption.org/v1\n".to_vec();
        while many.len() < size {
            many.extend_from_slice(
                b"-> X25519 TEiF0ypqr+bpvcqXNyCVJpL7OuwPdVwPL7KQEbFDOCc\nEmECAEcKN+n/Vs9SbWiV+Hu0r+E8R77DdWYyd83nw7U\n",
            );
        }
        many.extend_from_slice(b"--- AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n");
        many.extend_from_slice(&[0u8; 16 + 1000]);
        many
    };
    for (what, bytes) in [
        ("a 64 MiB line", long_line),
        ("1 MiB of stanzas", stanzas(1000 * 1024)),
        ("60 KiB of stanzas", stanzas(60 * 1024)),
    ] {
        let mut m = original.clone();
        m["sha256"] = hex::encode(sha2::Sha256::digest(&bytes)).into();
        m["stored_size"] = bytes.len().into();
        for store in &w.stores {
            put(store, &object, bytes.clone()).await;
            put_manifest(store, &format!("prod/acme/{id}.manifest.json"), &m).await;
        }
        let started = Instant::now();
        let measured = crate::support::rusage::pgferry_measured(&w.env, &config, &args).await;
        let took = started.elapsed();
        measured.run.assert_code(1);
        let out = measured.run.output();
        assert!(out.contains("cannot decrypt the object"), "{what}: {out}");
        assert_clean_output(&out, &k);
        eprintln!(
            "{what}: peak RSS {} KiB (baseline restore {} KiB), {took:?}",
            measured.max_rss_bytes / 1024,
            baseline.max_rss_bytes / 1024
        );
        assert!(
            measured.max_rss_bytes < baseline.max_rss_bytes + 16 * 1024 * 1024,
            "{what}: peak RSS {} bytes, a restore of the real snapshot {}",
            measured.max_rss_bytes,
            baseline.max_rss_bytes
        );
        assert!(took < Duration::from_secs(20), "{what}: took {took:?}");
    }
}
