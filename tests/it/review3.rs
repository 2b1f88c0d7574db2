//! Hostile review of `pgferry check` and `pgferry repair` (issue 16) against real PostgreSQL
//! and Garage servers: corrupt sources, crafted manifests, unknown targets, concurrent and
//! killed repairs, prune's repair hold, and the truth of check's exit code and messages.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::{path::Path as OPath, ObjectStore, PutPayload};

use crate::repair::{b_down_for, kill_once_a_mib_went_up, slow_b, BMissed, SlowB};
use crate::support::env::{
    assert_every_manifest_names_an_intact_object, corrupt_dump, dump_key, get, keys, manifest_of,
    TestEnv, KEEP_NEWEST_ONLY,
};

const KEEP_ALL: &str = "retention = { keep_last = 100 }\n";

async fn contents(store: &Arc<dyn ObjectStore>) -> BTreeMap<String, String> {
    use sha2::Digest;
    let mut out = BTreeMap::new();
    for k in keys(store).await {
        let bytes = get(store, &k).await;
        out.insert(k, hex::encode(sha2::Sha256::digest(&bytes)));
    }
    out
}

/// The first JSON document of `--json` stdout (the report; an error line may follow).
fn first_json(out: &str) -> serde_json::Value {
    serde_json::Deserializer::from_str(out)
        .into_iter::<serde_json::Value>()
        .next()
        .unwrap_or_else(|| panic!("no JSON: {out}"))
        .unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn manifest_key(all: &[String], id: &str) -> String {
    all.iter()
        .find(|k| k.ends_with(&format!("/{id}.manifest.json")))
        .unwrap_or_else(|| panic!("no manifest of {id}: {all:?}"))
        .clone()
}

/// Removes the snapshot's manifest and object from `store`: the target lacks it.
async fn remove_snapshot(store: &Arc<dyn ObjectStore>, id: &str) {
    let object = dump_key(store, id).await;
    let manifest = manifest_key(&keys(store).await, id);
    store.delete(&OPath::from(manifest.as_str())).await.unwrap();
    store.delete(&OPath::from(object.as_str())).await.unwrap();
}

async fn two_targets(
    env: &TestEnv,
    dbs: &str,
) -> (
    std::path::PathBuf,
    Arc<dyn ObjectStore>,
    Arc<dyn ObjectStore>,
) {
    let (a, a_store) = env.s3_target("a").await;
    let (b, b_store) = env.s3_target("b").await;
    let config = env.write_config(&format!(
        "{}databases = [{dbs}]\n{KEEP_ALL}{a}{b}",
        env.source_toml("prod")
    ));
    (config, a_store, b_store)
}

/// Database `acme` backed up once to targets a and b (see [`two_targets`]): the config, the
/// two stores and the snapshot id.
async fn acme_backed_up_on_two_targets(
    env: &TestEnv,
) -> (
    std::path::PathBuf,
    Arc<dyn ObjectStore>,
    Arc<dyn ObjectStore>,
    String,
) {
    env.small_database("acme").await;
    let (config, a_store, b_store) = two_targets(env, "\"acme\"").await;
    let id = env
        .pgferry(&config, &["backup", "--force"])
        .await
        .snapshot_id();
    (config, a_store, b_store, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_source_is_never_copied_to_a_target_that_lacks_it() {
    let env = TestEnv::start().await;
    let (config, a_store, b_store, id) = acme_backed_up_on_two_targets(&env).await;
    remove_snapshot(&b_store, &id).await;
    corrupt_dump(&a_store, &id).await;
    let before_a = contents(&a_store).await;

    let run = env.pgferry(&config, &["repair"]).await;
    assert_ne!(
        run.code,
        0,
        "repair copied from a corrupt source:\n{}",
        run.output()
    );
    let b_keys = keys(&b_store).await;
    assert!(
        b_keys
            .iter()
            .all(|k| !k.contains(&id) || k.ends_with(".upload.json")),
        "repair wrote something of {id} to b from a corrupt copy: {b_keys:?}\n{}",
        run.output()
    );
    assert_every_manifest_names_an_intact_object(&b_store).await;
    assert_eq!(
        contents(&a_store).await,
        before_a,
        "repair rewrote the source"
    );
    let check = env.pgferry(&config, &["check", "--read-data"]).await;
    check.assert_code(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_copies_corrupt_repair_writes_nothing_and_fails() {
    let env = TestEnv::start().await;
    let (config, a_store, b_store, id) = acme_backed_up_on_two_targets(&env).await;
    corrupt_dump(&a_store, &id).await;
    corrupt_dump(&b_store, &id).await;
    let before = (contents(&a_store).await, contents(&b_store).await);
    let run = env.pgferry(&config, &["repair"]).await;
    assert_ne!(run.code, 0, "{}", run.output());
    assert!(run.output().contains(&id), "{}", run.output());
    assert_eq!(before, (contents(&a_store).await, contents(&b_store).await));
    let check = env
        .pgferry(&config, &["check", "--read-data", "--json"])
        .await;
    check.assert_code(1);
    let report = first_json(&check.stdout);
    let kinds: Vec<_> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["target"].as_str().unwrap().to_string(),
                p["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("a".into(), "wrong_hash".into()),
            ("b".into(), "wrong_hash".into())
        ],
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_manifest_naming_another_databases_object_is_not_spread() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    env.small_database("other").await;
    let (config, a_store, b_store) = two_targets(&env, "\"acme\", \"other\"").await;
    let id = env
        .pgferry(&config, &["backup", "--force"])
        .await
        .snapshot_id();
    let all = keys(&a_store).await;
    let acme_m = all
        .iter()
        .find(|k| k.contains("/acme/") && k.ends_with(&format!("/{id}.manifest.json")))
        .unwrap()
        .clone();
    let other_m = all
        .iter()
        .find(|k| k.contains("/other/") && k.ends_with(&format!("/{id}.manifest.json")))
        .unwrap()
        .clone();
    let other = manifest_of(&get(&a_store, &other_m).await);
    let mut crafted = manifest_of(&get(&a_store, &acme_m).await);
    for f in ["object_key", "stored_size", "sha256"] {
        crafted[f] = other[f].clone();
    }
    a_store
        .put(
            &OPath::from(acme_m.as_str()),
            PutPayload::from(serde_json::to_vec(&crafted).unwrap()),
        )
        .await
        .unwrap();
    // b lacks acme's snapshot.
    let acme_obj_b = manifest_of(&get(&b_store, &acme_m).await)["object_key"]
        .as_str()
        .unwrap()
        .to_string();
    b_store.delete(&OPath::from(acme_m.as_str())).await.unwrap();
    b_store
        .delete(&OPath::from(acme_obj_b.as_str()))
        .await
        .unwrap();

    let run = env.pgferry(&config, &["repair"]).await;
    eprintln!("CRAFTED REPAIR:\n{}", run.output());
    let b_keys = keys(&b_store).await;
    if b_keys.contains(&acme_m) {
        let m = manifest_of(&get(&b_store, &acme_m).await);
        assert!(
            m["object_key"].as_str().unwrap().contains("/acme/"),
            "repair wrote acme's manifest on b naming another database's object: {m}\n{}",
            run.output()
        );
    }
    assert_every_manifest_names_an_intact_object(&b_store).await;
    // check must flag the crafted manifest (it names an object outside its own database).
    let check = env.pgferry(&config, &["check"]).await;
    eprintln!("CRAFTED CHECK:\n{}", check.output());
    assert_eq!(
        check.code,
        1,
        "check passes a manifest naming another database's object:\n{}",
        check.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_from_or_to_targets_are_refused_and_dry_run_changes_nothing() {
    let env = TestEnv::start().await;
    let (config, a_store, b_store, id) = acme_backed_up_on_two_targets(&env).await;
    remove_snapshot(&b_store, &id).await;
    let before = (contents(&a_store).await, contents(&b_store).await);
    for args in [
        &["repair", "--from", "nosuch"][..],
        &["repair", "--to", "nosuch"][..],
        &["repair", "--from", "b", "--to", "b"][..],
        &["repair", "--dry-run"][..],
        &["repair", "--dry-run", "--to", "b"][..],
    ] {
        let run = env.pgferry(&config, args).await;
        if args.contains(&"nosuch") {
            assert_eq!(run.code, 2, "{args:?}: {}", run.output());
            assert!(
                run.output().contains("nosuch"),
                "{args:?}: {}",
                run.output()
            );
        }
        if args == ["repair", "--from", "b", "--to", "b"] {
            assert_ne!(run.code, 0, "{args:?} claims success: {}", run.output());
        }
        assert_eq!(
            before,
            (contents(&a_store).await, contents(&b_store).await),
            "{args:?} changed a bucket"
        );
    }
}

/// Two repairs at once (two replicas' repair loops): each used to abort the upload it found
/// open on the key it was about to write, which could be the other's live one. A live repair
/// now rewrites its marker every 20 s and only a marker a minute old is cleaned, so one of
/// the two copies each snapshot and the other reports it busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_repairs_at_once_leave_every_manifest_intact() {
    let env = TestEnv::start().await;
    let BMissed {
        config,
        a_store,
        b_store,
        b_server: _b_server,
        ..
    } = b_down_for(&env, KEEP_ALL, "", 3).await;
    let one = env.command(&config, &["repair"]).output();
    let two = env.command(&config, &["repair"]).output();
    let (one, two) = tokio::join!(one, two);
    let (one, two) = (one.unwrap(), two.unwrap());
    let say = |o: &std::process::Output| {
        format!(
            "{:?}\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // A repair may fail a copy only because the other was writing the same object: it found
    // the other's upload open (busy), or, when both started it in the same instant, the
    // store kept one upload of the key (Garage ends the other at the first completion).
    // Nothing is damaged either way (below).
    for o in [&one, &two] {
        let out = say(o);
        for line in out.lines().filter(|l| l.starts_with("failed ")) {
            assert!(
                line.contains(" to b: "),
                "a copy to a failed: {line}\n{out}"
            );
        }
    }
    env.pgferry(&config, &["repair"]).await.assert_code(0);
    env.pgferry(&config, &["check", "--read-data"])
        .await
        .assert_code(0);
    assert_eq!(
        assert_every_manifest_names_an_intact_object(&b_store)
            .await
            .len(),
        4
    );
    assert_every_manifest_names_an_intact_object(&a_store).await;
    let left = keys(&b_store).await;
    assert!(
        left.iter().all(|k| !k.ends_with(".upload.json")),
        "{left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_holds_the_last_copies_a_target_lacks_then_goes_on_after_repair() {
    let env = TestEnv::start().await;
    let BMissed {
        config,
        a_store,
        b_store,
        b_server: _b_server,
        first,
        missed,
        ..
    } = b_down_for(&env, KEEP_NEWEST_ONLY, "", 2).await;
    let run = env.pgferry(&config, &["prune"]).await;
    let a_keys = keys(&a_store).await;
    // The snapshot the policy keeps (keep_last = 1 over every target's snapshots: the newest)
    // stays on a while b lacks it; an older one the policy expires everywhere is not held
    // (repair would never copy it, and holding it made two targets hold each other's).
    for id in &missed[1..] {
        assert!(
            a_keys.iter().any(|k| k.ends_with(&format!("/{id}.manifest.json"))),
            "prune deleted a's last copy of {id}, which b lacks, within the repair grace:\n{}\n{a_keys:?}",
            run.output()
        );
    }
    assert_every_manifest_names_an_intact_object(&a_store).await;
    assert_every_manifest_names_an_intact_object(&b_store).await;

    let rep = env.pgferry(&config, &["repair"]).await;
    rep.assert_code(0);
    env.pgferry(&config, &["check", "--read-data"])
        .await
        .assert_code(0);
    let run = env.pgferry(&config, &["prune"]).await;
    run.assert_code(0);
    eprintln!("REPAIR:\n{}", rep.output());
    for store in [&a_store, &b_store] {
        let ms = assert_every_manifest_names_an_intact_object(store).await;
        assert_eq!(
            ms.len(),
            1,
            "prune did not go on after repair: {ms:?}\n{}",
            run.output()
        );
        assert!(
            ms[0].ends_with(&format!("/{}.manifest.json", missed[1])),
            "{ms:?}"
        );
        assert!(!keys(store).await.iter().any(|k| k.contains(&first)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_size_copy_is_a_problem_and_repair_heals_it() {
    let env = TestEnv::start().await;
    let (config, a_store, b_store, id) = acme_backed_up_on_two_targets(&env).await;
    env.pgferry(&config, &["check"]).await.assert_code(0);
    env.pgferry(&config, &["check", "--read-data"])
        .await
        .assert_code(0);

    let kinds = |out: &str| -> Vec<(String, String)> {
        let r = first_json(out);
        r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["target"].as_str().unwrap().to_string(),
                    p["kind"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    // a: truncated object (size differs).
    let obj = dump_key(&a_store, &id).await;
    let bytes = get(&a_store, &obj).await;
    a_store
        .put(
            &OPath::from(obj.as_str()),
            PutPayload::from(bytes.slice(..bytes.len() - 10)),
        )
        .await
        .unwrap();
    let c = env.pgferry(&config, &["check", "--json"]).await;
    c.assert_code(1);
    let got = kinds(&c.stdout);
    let h = env.pgferry(&config, &["check"]).await;
    h.assert_code(1);
    assert!(
        h.stdout.contains(&id) && h.stdout.contains("pgferry repair"),
        "{}",
        h.stdout
    );
    // b holds a good copy: repair must replace a's truncated one (object then manifest).
    let rep = env.pgferry(&config, &["repair"]).await;
    let healed = env.pgferry(&config, &["check", "--read-data"]).await;
    assert_every_manifest_names_an_intact_object(&b_store).await;
    assert!(
        rep.stdout.contains(" to a from b") && healed.code == 0,
        "repair did not heal a's wrong-size copy (exit {}):\n{}\n--- check after:\n{}",
        rep.code,
        rep.output(),
        healed.output()
    );
    assert_every_manifest_names_an_intact_object(&a_store).await;
    assert_eq!(got, vec![("a".into(), "wrong_size".into())], "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_repair_then_backup_and_prune_then_repair_again_heals() {
    let env = TestEnv::start().await;
    let SlowB {
        a_store,
        b_store,
        proxy,
        slow_b,
        id,
        ..
    } = slow_b(&env, 256 * 1024).await;
    let mut child = env.command(&slow_b, &["repair"]).spawn().unwrap();
    kill_once_a_mib_went_up(&proxy, &mut child).await;
    proxy.throttle_up(0);
    crate::support::next_second().await;
    let id2 = env
        .pgferry(&slow_b, &["backup", "--force"])
        .await
        .snapshot_id();
    let p = env.pgferry(&slow_b, &["prune"]).await;
    p.assert_code(0);
    assert!(
        keys(&a_store).await.iter().any(|k| k.contains(&id)),
        "{}",
        p.output()
    );
    assert_every_manifest_names_an_intact_object(&b_store).await;
    let run = env.pgferry(&slow_b, &["repair"]).await;
    run.assert_code(0);
    assert!(run.stdout.contains(&id), "{}", run.stdout);
    env.pgferry(&slow_b, &["check", "--read-data"])
        .await
        .assert_code(0);
    let ms = assert_every_manifest_names_an_intact_object(&b_store).await;
    assert_eq!(ms.len(), 2, "{ms:?}");
    assert!(ms.iter().any(|k| k.contains(&id2)));
    assert_every_manifest_names_an_intact_object(&a_store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_missing_object_and_repair_heals_it() {
    let env = TestEnv::start().await;
    let (config, a_store, b_store, id) = acme_backed_up_on_two_targets(&env).await;
    let obj_b = dump_key(&b_store, &id).await;
    b_store.delete(&OPath::from(obj_b.as_str())).await.unwrap();
    let c = env.pgferry(&config, &["check", "--json"]).await;
    c.assert_code(1);
    let r = first_json(&c.stdout);
    let kinds: Vec<_> = r["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["target"].as_str().unwrap().to_string(),
                p["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let good = contents(&a_store).await;
    let rep = env.pgferry(&config, &["repair"]).await;
    rep.assert_code(0);
    assert!(
        rep.stdout.contains("copied "),
        "repair did not heal the missing object:\n{}",
        rep.output()
    );
    env.pgferry(&config, &["check", "--read-data"])
        .await
        .assert_code(0);
    assert_eq!(contents(&a_store).await, good);
    assert_every_manifest_names_an_intact_object(&b_store).await;
    // `--json`'s problems must name the damage (kind object_missing), not leave it to a
    // free-text warning beside `"problems": []`.
    assert_eq!(
        kinds,
        vec![("b".into(), "object_missing".into())],
        "{}",
        c.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_attempt_on_the_destination_is_left_alone() {
    let env = TestEnv::start().await;
    let (config, a_store, b_store, id) = acme_backed_up_on_two_targets(&env).await;
    env.pg
        .execute(
            "acme",
            "CREATE TABLE extra AS SELECT g FROM generate_series(1, 1000) g;",
        )
        .await
        .unwrap();
    crate::support::next_second().await;
    let id2 = env
        .pgferry(&config, &["backup", "--force"])
        .await
        .snapshot_id();
    // b's copy of `id` becomes another attempt of the same slot: a self-consistent manifest
    // naming `<id>-0000aaaa0000.dump.zst`, whose bytes differ from a's attempt.
    use sha2::Digest;
    let m_key = manifest_key(&keys(&b_store).await, &id);
    let old_obj = dump_key(&b_store, &id).await;
    let other = get(&b_store, &dump_key(&b_store, &id2).await).await;
    let new_obj = old_obj.replace(old_obj.rsplit('-').next().unwrap(), "0000aaaa0000.dump.zst");
    b_store
        .put(
            &OPath::from(new_obj.as_str()),
            PutPayload::from(other.clone()),
        )
        .await
        .unwrap();
    let mut m = manifest_of(&get(&b_store, &m_key).await);
    m["object_key"] = serde_json::json!(new_obj);
    m["stored_size"] = serde_json::json!(other.len());
    m["sha256"] = serde_json::json!(hex::encode(sha2::Sha256::digest(&other)));
    b_store
        .put(
            &OPath::from(m_key.as_str()),
            PutPayload::from(serde_json::to_vec(&m).unwrap()),
        )
        .await
        .unwrap();
    b_store
        .delete(&OPath::from(old_obj.as_str()))
        .await
        .unwrap();
    let before = (contents(&a_store).await, contents(&b_store).await);

    let run = env.pgferry(&config, &["repair"]).await;
    assert_eq!(
        before,
        (contents(&a_store).await, contents(&b_store).await),
        "repair rewrote a self-consistent copy:\n{}",
        run.output()
    );
    assert_every_manifest_names_an_intact_object(&a_store).await;
    assert_every_manifest_names_an_intact_object(&b_store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_object_left_without_a_manifest_is_not_adopted() {
    let env = TestEnv::start().await;
    let (config, a_store, b_store, id) = acme_backed_up_on_two_targets(&env).await;
    // b: the manifest is gone and the object at the same key is a partial one (same attempt,
    // a copy cut short), then a same-size flipped one.
    let m_key = manifest_key(&keys(&b_store).await, &id);
    let obj = dump_key(&b_store, &id).await;
    b_store.delete(&OPath::from(m_key.as_str())).await.unwrap();
    let bytes = get(&b_store, &obj).await;
    b_store
        .put(
            &OPath::from(obj.as_str()),
            PutPayload::from(bytes.slice(..bytes.len() / 2)),
        )
        .await
        .unwrap();
    let good = contents(&a_store).await;
    let rep = env.pgferry(&config, &["repair"]).await;
    rep.assert_code(0);
    assert_every_manifest_names_an_intact_object(&b_store).await;
    assert_eq!(contents(&a_store).await, good);
    env.pgferry(&config, &["check", "--read-data"])
        .await
        .assert_code(0);

    // Same again with a same-size, flipped orphan (a listing cannot tell).
    b_store.delete(&OPath::from(m_key.as_str())).await.unwrap();
    let mut flipped = bytes.to_vec();
    let n = flipped.len() / 2;
    flipped[n] ^= 0xff;
    b_store
        .put(&OPath::from(obj.as_str()), PutPayload::from(flipped))
        .await
        .unwrap();
    let rep = env.pgferry(&config, &["repair"]).await;
    rep.assert_code(0);
    assert_every_manifest_names_an_intact_object(&b_store).await;
    env.pgferry(&config, &["check", "--read-data"])
        .await
        .assert_code(0);
}
