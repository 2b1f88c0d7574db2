//! Security (issue 8): TLS to PostgreSQL under each `sslmode`, S3 over HTTPS with a private
//! CA, and backups as a minimal role. Real servers: PostgreSQL with `ssl = on` and a
//! `hostssl`-only `pg_hba.conf` (so any TCP connection that works used TLS), Garage behind a
//! TLS-terminating proxy, certificates from a throwaway CA made with `openssl`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::backup::TRICKY_SQL;
use crate::support::env::{self, keys, Run, TestEnv, S3_KEY_VAR, S3_SECRET_VAR};
use crate::support::garage::Garage;
use crate::support::postgres::{PgCluster, ServerTls};
use crate::support::tls::{Issued, TestCa, TlsProxy};

const PROD_PW_VAR: &str = "PGFERRY_TEST_PROD_PASSWORD";
const STAGING_PW_VAR: &str = "PGFERRY_TEST_STAGING_PASSWORD";

/// Every variable a config of these tests expands; all of them count as secrets.
fn vars(prod: &PgCluster, staging: Option<&PgCluster>, s3: &Garage) -> Vec<(String, String)> {
    let mut v = vec![
        (PROD_PW_VAR.into(), prod.superuser_password().to_string()),
        (S3_KEY_VAR.into(), s3.access_key_id().to_string()),
        (S3_SECRET_VAR.into(), s3.secret_access_key().to_string()),
    ];
    if let Some(s) = staging {
        v.push((STAGING_PW_VAR.into(), s.superuser_password().to_string()));
    }
    v
}

/// Runs pgferry; fails the test if any variable's value shows in its output.
async fn run(config: &Path, args: &[&str], vars: &[(String, String)]) -> Run {
    let run = env::pgferry_with_env(config, args, vars).await;
    let secrets: Vec<String> = vars.iter().map(|(_, v)| v.clone()).collect();
    env::assert_no_secret(&run.output(), &secrets);
    run
}

fn write(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join(format!("{}.toml", crate::support::unique_name("cfg")));
    std::fs::write(&path, body).expect("write config");
    path
}

/// A `[[source]]` named prod on `host:port` with the given URL parameters.
fn source(host: &str, port: u16, params: &str) -> String {
    format!(
        "[[source]]\nname = \"prod\"\nurl = \"postgres://postgres:${{{PROD_PW_VAR}}}@{host}:{port}/postgres?{params}\"\ndatabases = [\"acme\"]\n"
    )
}

async fn tls_cluster(cert: &Issued) -> PgCluster {
    PgCluster::start_with_tls(ServerTls {
        cert: &cert.cert,
        key: &cert.key,
        client_ca: None,
    })
    .await
    .expect("start PostgreSQL with ssl = on")
}

/// Whether a plain (non-TLS) TCP connection to `pg` is refused, as its pg_hba.conf says.
async fn plain_tcp_is_refused(pg: &PgCluster) -> String {
    let err = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(pg.port())
        .user(PgCluster::SUPERUSER)
        .password(pg.superuser_password())
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("the TLS cluster refuses TCP without TLS");
    err.as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_else(|| err.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_backup_restore_and_verify_all_run_over_tls() {
    let ca = TestCa::new("pgferry-test-ca").await.expect("test CA");
    let cert = ca.issue("localhost", &["DNS:localhost"]).await.unwrap();
    let prod = tls_cluster(&cert).await;
    let staging = tls_cluster(&cert).await;
    let s3 = Garage::start().await.expect("start Garage");
    // The clusters take TCP only over TLS: every pgferry connection below used it.
    let refused = plain_tcp_is_refused(&prod).await;
    assert!(refused.contains("no encryption"), "{refused}");

    prod.create_database("acme").await.unwrap();
    prod.execute("acme", TRICKY_SQL).await.unwrap();
    staging.create_role("odoo", "odoo-pw", "").await.unwrap();
    let (target, store) = env::s3_target(&s3, "s3", "").await;
    let tls = format!("sslmode=verify-full&sslrootcert={}", ca.ca_pem().display());
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &format!(
            "{}{target}\n[[restore_target]]\nnamespace = \"staging-*\"\nurl = \"postgres://postgres:${{{STAGING_PW_VAR}}}@localhost:{port}/postgres?{tls}\"\nowner = \"odoo\"\n\n[verify]\nurl = \"postgres://postgres:${{{STAGING_PW_VAR}}}@localhost:{port}/postgres?{tls}\"\n",
            source("localhost", prod.port(), &tls),
            port = staging.port(),
        ),
    );
    let vars = vars(&prod, Some(&staging), &s3);

    let check = run(&config, &["config", "check"], &vars).await;
    check.assert_code(0);
    assert!(
        check.stdout.contains("sslmode=verify-full"),
        "{}",
        check.stdout
    );

    // Discovery and the size query (our connection), then pg_dump (libpq's): both verify-full.
    let id = run(&config, &["backup"], &vars).await.snapshot_id();
    assert_eq!(keys(&store).await.len(), 2);

    // The restore destination: guard, temp database, pg_restore, swap, all over TLS.
    run(
        &config,
        &[
            "restore",
            "--source",
            "prod",
            "--database",
            "acme",
            "--to",
            "staging-acme",
        ],
        &vars,
    )
    .await
    .assert_code(0);
    assert_eq!(
        staging.table_fingerprints("acme").await.unwrap(),
        prod.table_fingerprints("acme").await.unwrap()
    );

    // The verify server, over TLS too.
    let verified = run(
        &config,
        &["verify", "--source", "prod", "--database", "acme"],
        &vars,
    )
    .await;
    verified.assert_code(0);
    assert!(verified.output().contains(&id), "{}", verified.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_verifies_what_libpq_does_and_failures_commit_nothing() {
    let ca = TestCa::new("pgferry-test-ca").await.expect("test CA");
    let other_ca = TestCa::new("some-other-ca").await.expect("second CA");
    let cert = ca.issue("localhost", &["DNS:localhost"]).await.unwrap();
    let pg = tls_cluster(&cert).await;
    let plain = PgCluster::start()
        .await
        .expect("start PostgreSQL without TLS");
    let s3 = Garage::start().await.expect("start Garage");
    pg.create_database("acme").await.unwrap();
    pg.execute(
        "acme",
        "CREATE TABLE t AS SELECT generate_series(1, 100) AS id",
    )
    .await
    .unwrap();
    let (target, store) = env::s3_target(&s3, "s3", "").await;
    let dir = tempfile::tempdir().unwrap();
    let vars = vars(&pg, None, &s3);
    let ca_pem = ca.ca_pem().display().to_string();
    let other_pem = other_ca.ca_pem().display().to_string();
    let backup_to = |target: &str, host: &'static str, port: u16, params: String| {
        let config = write(
            dir.path(),
            &format!("{}{target}", source(host, port, &params)),
        );
        let vars = vars.clone();
        async move { run(&config, &["backup"], &vars).await }
    };
    let backup = |host, port, params| backup_to(&target, host, port, params);

    // A certificate from another CA: refused, before pg_dump ever starts.
    let r = backup(
        "localhost",
        pg.port(),
        format!("sslmode=verify-full&sslrootcert={other_pem}"),
    )
    .await;
    r.assert_code(1);
    assert!(
        r.output().contains(&format!(
            "TLS: the certificate of localhost is not signed by a CA in sslrootcert {other_pem} (sslmode=verify-full)"
        )),
        "{}",
        r.output()
    );
    // libpq: require with a root certificate checks the chain (as verify-ca).
    let r = backup(
        "127.0.0.1",
        pg.port(),
        format!("sslmode=require&sslrootcert={other_pem}"),
    )
    .await;
    r.assert_code(1);
    assert!(
        r.output().contains("not signed by a CA in sslrootcert"),
        "{}",
        r.output()
    );

    // The right CA, but a host name the certificate does not hold.
    let r = backup(
        "127.0.0.1",
        pg.port(),
        format!("sslmode=verify-full&sslrootcert={ca_pem}"),
    )
    .await;
    r.assert_code(1);
    assert!(
        r.output().contains(
            "TLS: certificate for localhost not valid for 127.0.0.1 (sslmode=verify-full)"
        ),
        "{}",
        r.output()
    );

    // No TLS at all against a hostssl-only server: the server's own refusal.
    let r = backup("127.0.0.1", pg.port(), "sslmode=disable".into()).await;
    r.assert_code(1);
    assert!(
        r.output().contains("no pg_hba.conf entry") && r.output().contains("no encryption"),
        "{}",
        r.output()
    );

    // A server without TLS when TLS is required.
    let r = backup("127.0.0.1", plain.port(), "sslmode=require".into()).await;
    r.assert_code(1);
    assert!(
        r.output()
            .contains("the server does not support TLS but sslmode=require"),
        "{}",
        r.output()
    );
    assert!(
        keys(&store).await.is_empty(),
        "a failed run committed something"
    );

    // The cases that work, each to a bucket of its own (manual snapshot ids are per second).
    for (host, params) in [
        // verify-ca checks the chain, not the name: 127.0.0.1 is fine. pg_dump agrees.
        (
            "127.0.0.1",
            format!("sslmode=verify-ca&sslrootcert={ca_pem}"),
        ),
        // require without a CA: encrypted, nothing verified.
        ("127.0.0.1", "sslmode=require".to_string()),
        // The default (prefer) finds TLS on the server; hostssl-only proves it was used.
        ("localhost", String::new()),
    ] {
        let (target, store) = env::s3_target(&s3, "ok", "").await;
        let id = backup_to(&target, host, pg.port(), params.clone())
            .await
            .snapshot_id();
        assert_eq!(
            keys(&store).await,
            [
                format!("prod/acme/{id}.dump.zst"),
                format!("prod/acme/{id}.manifest.json")
            ],
            "{host} {params}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_over_https_needs_the_ca_file_and_works_with_it() {
    let env = TestEnv::start().await;
    let staging = PgCluster::start()
        .await
        .expect("start the staging PostgreSQL");
    env.add_secret_var(STAGING_PW_VAR, staging.superuser_password());
    staging.create_role("odoo", "odoo-pw", "").await.unwrap();
    env.pg.create_database("acme").await.unwrap();
    env.pg.execute("acme", TRICKY_SQL).await.unwrap();

    let ca = TestCa::new("pgferry-test-ca").await.expect("test CA");
    let cert = ca
        .issue("s3.test", &["DNS:localhost", "IP:127.0.0.1"])
        .await
        .unwrap();
    let garage: SocketAddr = env
        .s3
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("Garage listens on ip:port");
    let proxy = TlsProxy::start(&cert, garage).await.expect("TLS proxy");
    let bucket = env.s3.unique_bucket("pgferry-https").await.unwrap();
    // Read back over plain HTTP, straight from Garage.
    let store = env::s3_store(&env.s3, &bucket);
    let https_target = |extra: &str| {
        format!(
            "[[target]]\nname = \"https\"\nurl = \"s3://{bucket}/{}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"${{{S3_KEY_VAR}}}\"\nsecret_access_key = \"${{{S3_SECRET_VAR}}}\"\n{extra}",
            env::S3_PREFIX,
            proxy.endpoint(),
            env.s3.region()
        )
    };
    let source = format!("{}databases = [\"acme\"]\n", env.source_toml("prod"));

    let with_ca = env.write_config(&format!(
        "{source}{}\n[[restore_target]]\nnamespace = \"staging-*\"\nurl = \"postgres://postgres:${{{STAGING_PW_VAR}}}@127.0.0.1:{}/postgres\"\nowner = \"odoo\"\n",
        https_target(&format!("ca_file = \"{}\"\n", ca.ca_pem().display())),
        staging.port()
    ));
    let id = env.pgferry(&with_ca, &["backup"]).await.snapshot_id();
    let committed = vec![
        format!("prod/acme/{id}.dump.zst"),
        format!("prod/acme/{id}.manifest.json"),
    ];
    assert_eq!(keys(&store).await, committed);
    let list = env.pgferry(&with_ca, &["list", "--json"]).await;
    list.assert_code(0);
    let listed: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(
        listed["snapshots"][0]["manifest"]["snapshot_id"],
        id.as_str(),
        "{listed}"
    );
    assert_eq!(
        listed["snapshots"][0]["targets"],
        serde_json::json!(["https"])
    );
    env.pgferry(
        &with_ca,
        &[
            "restore",
            "--source",
            "prod",
            "--database",
            "acme",
            "--to",
            "staging-acme",
        ],
    )
    .await
    .assert_code(0);
    assert_eq!(
        staging.table_fingerprints("acme").await.unwrap(),
        env.pg.table_fingerprints("acme").await.unwrap()
    );

    // Without ca_file the system roots do not know the CA: the target is dropped with a
    // certificate error, the snapshot commits on the other target only.
    let (file, file_dir) = env.file_target_toml("local");
    let without_ca = env.write_config(&format!("{source}{}{file}", https_target("")));
    let run = env.pgferry(&without_ca, &["backup"]).await;
    let second = run.snapshot_id();
    assert!(run.stdout.contains("not on: https"), "{}", run.output());
    assert!(
        run.output().contains("certificate") && run.output().contains("UnknownIssuer"),
        "{}",
        run.output()
    );
    assert_eq!(
        keys(&store).await,
        committed,
        "nothing new on the https target"
    );
    let manifest = env::get(
        &env::file_store(&file_dir),
        &format!("prod/acme/{second}.manifest.json"),
    )
    .await;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(manifest["targets"], serde_json::json!(["local"]));
}

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
    let dump = env::get(&store, &format!("prod/acme/{id}.dump.zst")).await;
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
    let held = pgferry::daemon::ha::try_lock(source, "acme")
        .await
        .expect("lock query")
        .expect("the lock is free");
    let second = pgferry::daemon::ha::try_lock(source, "acme")
        .await
        .expect("lock query");
    assert!(second.is_none(), "a second session must not get the lock");
    drop(held);
    // The server releases the lock when the holder's session ends; poll briefly for that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let again = pgferry::daemon::ha::try_lock(source, "acme")
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
    env.pgferry(
        &config,
        &[
            "restore",
            "--source",
            "prod",
            "--database",
            "acme",
            "--to",
            "staging-acme",
        ],
    )
    .await
    .assert_code(0);
    assert_eq!(
        staging.table_fingerprints("acme").await.unwrap(),
        env.pg.table_fingerprints("acme").await.unwrap()
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_the_url_reaches_pgferry_and_pg_dump() {
    let ca = TestCa::new("pgferry-test-ca").await.expect("test CA");
    let server = ca.issue("localhost", &["DNS:localhost"]).await.unwrap();
    // clientcert=verify-full: the certificate's CN must be the user name.
    let client = ca.issue("postgres", &["DNS:pgferry.client"]).await.unwrap();
    let pg = PgCluster::start_with_tls(ServerTls {
        cert: &server.cert,
        key: &server.key,
        client_ca: Some(&ca.ca_pem()),
    })
    .await
    .expect("start PostgreSQL demanding client certificates");
    let s3 = Garage::start().await.expect("start Garage");
    pg.create_database("acme").await.unwrap();
    pg.execute(
        "acme",
        "CREATE TABLE t AS SELECT generate_series(1, 10) AS id",
    )
    .await
    .unwrap();
    let (target, store) = env::s3_target(&s3, "s3", "").await;
    let dir = tempfile::tempdir().unwrap();
    let vars = vars(&pg, None, &s3);
    let tls = format!("sslmode=verify-full&sslrootcert={}", ca.ca_pem().display());

    let without = write(
        dir.path(),
        &format!("{}{target}", source("localhost", pg.port(), &tls)),
    );
    let r = run(&without, &["backup"], &vars).await;
    r.assert_code(1);
    assert!(
        r.output()
            .contains("connection requires a valid client certificate"),
        "the server demands a client certificate: {}",
        r.output()
    );
    assert!(keys(&store).await.is_empty());

    let with = write(
        dir.path(),
        &format!(
            "{}{target}",
            source(
                "localhost",
                pg.port(),
                &format!(
                    "{tls}&sslcert={}&sslkey={}",
                    client.cert.display(),
                    client.key.display()
                )
            )
        ),
    );
    // Discovery (rustls) and pg_dump (libpq, PGSSLCERT/PGSSLKEY) both present it.
    let id = run(&with, &["backup"], &vars).await.snapshot_id();
    assert_eq!(keys(&store).await.len(), 2, "{id} committed");
}
