//! Backup, restore and verify as least-privilege roles.

use super::*;
use crate::backup::TRICKY_SQL;
use crate::support::env::{keys, TestEnv};
use crate::support::restore_argv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_with_only_pg_read_all_data_backs_up_and_takes_the_ha_lock() {
    const FERRY_PW_VAR: &str = "PGFERRY_TEST_FERRY_PASSWORD";
    let env = TestEnv::start().await;
    env.pg.create_database("acme").await.unwrap();
    env.pg.execute("acme", TRICKY_SQL).await.unwrap();
    // Objects pgferry's role has no grant on: another owner, a schema closed to PUBLIC.
    env.pg
        .execute(
            "acme",
            "CREATE ROLE app NOLOGIN; CREATE SCHEMA private AUTHORIZATION app; \
             REVOKE ALL ON SCHEMA public FROM PUBLIC; \
             CREATE TABLE private.secrets (id int PRIMARY KEY, v text); \
             INSERT INTO private.secrets SELECT g, md5(g::text) FROM generate_series(1, 500) g; \
             ALTER TABLE private.secrets OWNER TO app; \
             CREATE SEQUENCE private.counter; SELECT setval('private.counter', 42); \
             ALTER SEQUENCE private.counter OWNER TO app",
        )
        .await
        .unwrap();
    let password = crate::support::random_hex(16);
    env.pg.create_role("ferry", &password, "").await.unwrap();
    env.pg
        .execute("postgres", "GRANT pg_read_all_data TO ferry")
        .await
        .unwrap();
    env.add_secret_var(FERRY_PW_VAR, &password);
    let (target, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "[[source]]\nname = \"prod\"\nurl = \"postgres://ferry:${{{FERRY_PW_VAR}}}@127.0.0.1:{}/postgres\"\ndatabases = [\"acme\"]\n{target}",
        env.pg.port()
    ));

    // pg_read_all_data covers tables, views and sequences, not large objects: pg_dump's
    // refusal comes with what to grant.
    let r = env.pgferry(&config, &["backup"]).await;
    r.assert_code(1);
    assert!(
        r.stdout.contains("permission denied for large object")
            && r.stdout
                .contains("ALTER ROLE <backup role> SET lo_compat_privileges = on"),
        "{}",
        r.output()
    );
    env.pg
        .execute("postgres", "ALTER ROLE ferry SET lo_compat_privileges = on")
        .await
        .unwrap();
    // Nor does it bypass row-level security, which pg_dump will not silently apply.
    env.pg
        .execute(
            "acme",
            "CREATE TABLE private.tenants (id int, tenant text); \
             INSERT INTO private.tenants SELECT g, 't' || g % 3 FROM generate_series(1, 30) g; \
             ALTER TABLE private.tenants OWNER TO app; \
             ALTER TABLE private.tenants ENABLE ROW LEVEL SECURITY; \
             CREATE POLICY mine ON private.tenants USING (tenant = current_user)",
        )
        .await
        .unwrap();
    let r = env.pgferry(&config, &["backup"]).await;
    r.assert_code(1);
    assert!(
        r.stdout.contains("row-level security") && r.stdout.contains("needs BYPASSRLS"),
        "{}",
        r.output()
    );
    assert!(
        keys(&store).await.is_empty(),
        "a failed run committed something"
    );
    env.pg
        .execute("postgres", "ALTER ROLE ferry BYPASSRLS")
        .await
        .unwrap();

    let id = env.pgferry(&config, &["backup"]).await.snapshot_id();
    let dump = env::get(&store, &env::dump_key(&store, &id).await).await;
    let path = env.dir.path().join("acme.dump.zst");
    std::fs::write(&path, &dump).unwrap();
    crate::backup::restore_by_hand(&env.pg, &path, "acme_restored").await;
    let restored = env.pg.table_fingerprints("acme_restored").await.unwrap();
    assert_eq!(restored, env.pg.table_fingerprints("acme").await.unwrap());
    assert_eq!(restored["private.secrets"].0, 500);
    assert_eq!(restored["private.tenants"].0, 30);
    assert_eq!(restored["pg_largeobject"].0, 1);

    // The daemon's advisory lock works for this role too: one holder at a time.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("${{{FERRY_PW_VAR}}}"), &password)
        .replace(&format!("${{{S3_KEY_VAR}}}"), env.s3.access_key_id())
        .replace(&format!("${{{S3_SECRET_VAR}}}"), env.s3.secret_access_key());
    let cfg = pgferry::config::Config::from_str_at(&text, &config).expect("config");
    let source = &cfg.sources[0];
    let held = pgferry::backup::lock::try_lock(source, "acme")
        .await
        .expect("lock query")
        .expect("the lock is free");
    let second = pgferry::backup::lock::try_lock(source, "acme")
        .await
        .expect("lock query");
    assert!(second.is_none(), "a second session must not get the lock");
    drop(held);
    // The server releases the lock when the holder's session ends; poll briefly for that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let again = pgferry::backup::lock::try_lock(source, "acme")
            .await
            .expect("lock query");
        if again.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lock was never released"
        );
        tokio::time::sleep(crate::support::POLL_INTERVAL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_verify_run_as_roles_with_only_createdb_and_the_owner_role() {
    const RESTORER_PW_VAR: &str = "PGFERRY_TEST_RESTORER_PASSWORD";
    const VERIFIER_PW_VAR: &str = "PGFERRY_TEST_VERIFIER_PASSWORD";
    let env = TestEnv::start().await;
    let staging = PgCluster::start()
        .await
        .expect("start the staging PostgreSQL");
    env.pg.create_database("acme").await.unwrap();
    env.pg.execute("acme", TRICKY_SQL).await.unwrap();
    let (restorer_pw, verifier_pw) = (
        crate::support::random_hex(16),
        crate::support::random_hex(16),
    );
    env.add_secret_var(RESTORER_PW_VAR, &restorer_pw);
    env.add_secret_var(VERIFIER_PW_VAR, &verifier_pw);
    staging.create_role("odoo", "odoo-pw", "").await.unwrap();
    staging
        .create_role("restorer", &restorer_pw, "CREATEDB")
        .await
        .unwrap();
    staging
        .create_role("verifier", &verifier_pw, "CREATEDB")
        .await
        .unwrap();
    for sql in ["GRANT odoo TO restorer", "CREATE DATABASE acme OWNER odoo"] {
        staging.execute("postgres", sql).await.unwrap();
    }
    staging
        .execute(
            "acme",
            "CREATE TABLE previous (id int); INSERT INTO previous VALUES (1)",
        )
        .await
        .unwrap();
    let (target, _store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{target}\n[[restore_target]]\nnamespace = \"staging-*\"\nurl = \"postgres://restorer:${{{RESTORER_PW_VAR}}}@127.0.0.1:{port}/postgres\"\nowner = \"odoo\"\n\n[verify]\nurl = \"postgres://verifier:${{{VERIFIER_PW_VAR}}}@127.0.0.1:{port}/postgres\"\n",
        env.source_toml("prod"),
        port = staging.port(),
    ));

    env.pgferry(&config, &["backup"]).await.snapshot_id();
    env.pgferry(&config, &restore_argv("acme", "staging-acme", &[]))
        .await
        .assert_code(0);
    staging.assert_same_tables("acme", &env.pg, "acme").await;
    let owner: String = staging
        .client("postgres")
        .await
        .unwrap()
        .query_one(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "odoo");
    env.pgferry(
        &config,
        &["verify", "--source", "prod", "--database", "acme"],
    )
    .await
    .assert_code(0);
}
