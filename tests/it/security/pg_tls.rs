//! TLS to PostgreSQL under each `sslmode`, against clusters with `ssl = on` and a
//! `hostssl`-only `pg_hba.conf`.

use super::*;
use crate::backup::TRICKY_SQL;
use crate::support::env::keys;
use crate::support::restore_argv;
use crate::support::tls::TestCa;

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
    run(&config, &restore_argv("acme", "staging-acme", &[]), &vars)
        .await
        .assert_code(0);
    staging.assert_same_tables("acme", &prod, "acme").await;

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
                env::dump_key(&store, &id).await,
                format!("prod/acme/{id}.manifest.json")
            ],
            "{host} {params}"
        );
    }
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
