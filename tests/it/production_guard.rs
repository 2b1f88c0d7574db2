//! Restore and verify never write to production (issue 14 item 1, issue 20 item 5): a
//! `[[restore_target]]` or `[verify]` URL that reaches the production server under any
//! spelling — `localhost`, `[::1]`, a second listen address, `hostaddr=`, one host of a
//! multi-host URL — is refused by the server's `system_identifier`, for every database name,
//! and production's database list is unchanged. Templates and `postgres` are refused on
//! every server; `--to` must be a namespace name.

use std::io::Write;

use crate::restore::World;
use crate::support::env::PG_PASSWORD_VAR;
use crate::support::postgres::PgCluster;
use crate::support::restore_argv;

/// Lets production also listen on 127.0.0.2 and ::1, as a server with several addresses does.
async fn listen_on_more_addresses(pg: &mut PgCluster) {
    let append = |file: &str, text: &str| {
        std::fs::OpenOptions::new()
            .append(true)
            .open(pg.data_dir().join(file))
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .unwrap_or_else(|e| panic!("append to {file}: {e}"));
    };
    append(
        "postgresql.conf",
        "\nlisten_addresses = '127.0.0.1,127.0.0.2,::1'\n",
    );
    append(
        "pg_hba.conf",
        "\nhost all all 127.0.0.0/8 scram-sha-256\nhost all all ::1/128 scram-sha-256\n",
    );
    pg.restart().await.expect("restart production");
}

/// Production under spellings the address comparison cannot all see through.
fn production_spellings(port: u16) -> Vec<(&'static str, String)> {
    let pw = format!("${{{PG_PASSWORD_VAR}}}");
    vec![
        (
            "prod-localhost",
            format!("postgres://postgres:{pw}@localhost:{port}/postgres"),
        ),
        (
            "prod-v6",
            format!("postgres://postgres:{pw}@[::1]:{port}/postgres"),
        ),
        (
            "prod-second-address",
            format!("postgres://postgres:{pw}@127.0.0.2:{port}/postgres"),
        ),
        (
            "prod-hostaddr",
            format!("host=db.staging.invalid hostaddr=127.0.0.1 port={port} user=postgres password={pw} dbname=postgres"),
        ),
        (
            "prod-multihost",
            format!("postgres://postgres:{pw}@db.staging.invalid:{port},127.0.0.1:{port}/postgres"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_onto_a_source_server_is_refused_under_every_spelling_and_name() {
    let mut w = World::start("", &[], "").await;
    w.pgferry(&["backup", "--source", "prod"])
        .await
        .assert_code(0);
    listen_on_more_addresses(&mut w.env.pg).await;
    let mut toml = std::fs::read_to_string(&w.config).unwrap();
    for (ns, url) in production_spellings(w.env.pg.port()) {
        toml.push_str(&format!(
            "\n[[restore_target]]\nnamespace = \"{ns}\"\nurl = {url:?}\nowner = \"postgres\"\n"
        ));
    }
    let config = w.env.write_config(&toml);
    let before = w.env.pg.databases().await;
    for (ns, _) in production_spellings(w.env.pg.port()) {
        // A name the source does not back up passes the address rule; the identity refuses.
        for name in ["acme_copy", "acme"] {
            let run = w
                .pgferry_with(&config, &restore_argv("acme", ns, &["--as", name]))
                .await;
            run.assert_code(2);
            let out = run.output();
            assert!(
                out.contains("never write to production")
                    || out.contains("never writes to production"),
                "{ns} --as {name}: {out}"
            );
        }
        let run = w
            .pgferry_with(&config, &restore_argv("acme", ns, &["--as", "acme_copy"]))
            .await;
        assert!(
            run.output().contains("source \"prod\"") || run.output().contains("was taken from"),
            "{}",
            run.output()
        );
    }
    // The templates and the maintenance database are never a destination, on any server.
    for name in ["template1", "template0", "postgres"] {
        let run = w.restore(&["--as", name]).await;
        run.assert_code(2);
        assert!(run.output().contains("never replaced"), "{}", run.output());
    }
    assert_eq!(w.env.pg.databases().await, before, "production changed");
    let staging = w.staging.databases().await;
    assert!(
        !staging.iter().any(|d| d == "template1_copy"),
        "{staging:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_database_and_a_bad_namespace_are_refused() {
    let w = World::start("", &[], "").await;
    w.pgferry(&["backup", "--source", "prod"])
        .await
        .assert_code(0);
    w.staging.create_database("odoo_template").await.unwrap();
    w.staging
        .execute("postgres", "ALTER DATABASE odoo_template IS_TEMPLATE true")
        .await
        .unwrap();
    let run = w.restore(&["--as", "odoo_template"]).await;
    run.assert_code(2);
    assert!(
        run.output().contains("template database"),
        "{}",
        run.output()
    );
    // `--to` is checked before it goes anywhere near a URL.
    for ns in [
        "staging-a/b",
        "staging-a?host=x",
        "staging-a@x",
        "Staging-A",
        "staging-a:1",
    ] {
        let run = w.pgferry(&restore_argv("acme", ns, &[])).await;
        run.assert_code(2);
        assert!(
            run.output().contains("not a namespace name"),
            "{ns}: {}",
            run.output()
        );
    }
    assert!(w
        .staging
        .databases()
        .await
        .contains(&"odoo_template".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_pointed_at_a_source_is_refused() {
    let w = World::start("", &[], "").await;
    w.pgferry(&["backup", "--source", "prod"])
        .await
        .assert_code(0);
    let mut toml = std::fs::read_to_string(&w.config).unwrap();
    toml.push_str(&format!(
        "\n[verify]\nurl = \"postgres://postgres:${{{PG_PASSWORD_VAR}}}@localhost:{}/postgres\"\n",
        w.env.pg.port()
    ));
    let config = w.env.write_config(&toml);
    let before = w.env.pg.databases().await;
    let run = w
        .pgferry_with(&config, &["verify", "--source", "prod"])
        .await;
    run.assert_code(2);
    assert!(
        run.output().contains("never write to production"),
        "{}",
        run.output()
    );
    assert_eq!(w.env.pg.databases().await, before);
}
