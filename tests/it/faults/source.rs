//! The source misbehaving during `pgferry backup`: its server restarted mid-dump, and a
//! database dropped between discovery and its dump.

use std::time::Duration;

use crate::support::env::{self, keys, TestEnv};

/// Polls the source until pg_dump of `database` runs its COPY; fails the test after 60 s.
async fn wait_for_copy(env: &TestEnv, database: &str) {
    let client = env.pg.client("postgres").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows = client
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'COPY%'",
                &[&database],
            )
            .await
            .unwrap();
        if !rows.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw pg_dump's COPY in {database}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const BIG_SQL: &str = "CREATE TABLE t AS SELECT g AS id, repeat(md5(g::text), 20) AS v FROM generate_series(1, 300000) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restarted_mid_dump_commits_nothing_and_the_next_run_does() {
    let mut env = TestEnv::start().await;
    env.pg.create_database("big").await.unwrap();
    env.pg.execute("big", BIG_SQL).await.unwrap();
    let (s3, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [\"big\"]\n{s3}",
        env.source_toml("prod")
    ));
    let child = env.command(&config, &["backup"]).spawn().unwrap();
    wait_for_copy(&env, "big").await;
    env.pg.restart().await.unwrap(); // pg_ctl -m fast: every client disconnected
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("backup ended")
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    env::assert_no_secret(&output, &env.secrets());
    assert_eq!(out.status.code(), Some(1), "{output}");
    assert!(output.contains("pg_dump of big failed"), "{output}");
    // The server's own words: "terminating connection due to administrator command", or
    // libpq's "server closed the connection unexpectedly".
    assert!(
        output.contains("administrator command") || output.contains("closed the connection"),
        "{output}"
    );
    // The multipart upload was aborted: no dump object, no manifest.
    assert_eq!(keys(&store).await, Vec::<String>::new());

    // The server is back: the next run commits.
    let run = env.pgferry(&config, &["backup"]).await;
    let id = run.snapshot_id();
    assert_eq!(
        keys(&store).await,
        vec![
            env::dump_key(&store, &id).await,
            format!("prod/big/{id}.manifest.json")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_dropped_before_its_dump_is_named_and_the_others_commit() {
    let env = TestEnv::start().await;
    // Discovery sorts by name and one backup runs at a time: a_big is dumped first.
    env.pg.create_database("a_big").await.unwrap();
    env.pg.execute("a_big", BIG_SQL).await.unwrap();
    env.pg.create_database("b_gone").await.unwrap();
    env.pg
        .execute("b_gone", "CREATE TABLE t AS SELECT 1 AS id;")
        .await
        .unwrap();
    let (s3, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "[daemon]\nmax_concurrent_backups = 1\n{}databases = [\"a_big\", \"b_gone\"]\n{s3}",
        env.source_toml("prod")
    ));
    let child = env.command(&config, &["backup"]).spawn().unwrap();
    wait_for_copy(&env, "a_big").await;
    env.pg
        .execute("postgres", "DROP DATABASE b_gone WITH (FORCE);")
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("backup ended")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let output = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    env::assert_no_secret(&output, &env.secrets());
    // DESIGN: exit 0 only if every database committed.
    assert_eq!(out.status.code(), Some(1), "{output}");
    let gone = stdout
        .lines()
        .find(|l| l.starts_with("prod/b_gone "))
        .unwrap_or_else(|| panic!("no line for b_gone:\n{stdout}"));
    assert!(
        gone.contains("FAILED") && gone.contains("\"b_gone\" does not exist"),
        "{gone}"
    );
    assert!(
        output.contains("1 of 2 database backup(s) failed"),
        "{output}"
    );
    let k = keys(&store).await;
    assert_eq!(k.len(), 2, "{k:?}");
    assert!(
        k.iter().all(|k| k.starts_with("prod/a_big/")),
        "only a_big is stored: {k:?}"
    );
    assert!(k[1].ends_with(".manifest.json"), "{k:?}");
}
