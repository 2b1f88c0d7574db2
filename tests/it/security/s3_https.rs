//! An S3 target behind HTTPS whose certificate comes from a private CA (`ca_file`).

use std::net::SocketAddr;

use super::*;
use crate::backup::TRICKY_SQL;
use crate::support::env::{keys, TestEnv};
use crate::support::restore_argv;
use crate::support::tls::{TestCa, TlsProxy};

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
        env::dump_key(&store, &id).await,
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
    env.pgferry(&with_ca, &restore_argv("acme", "staging-acme", &[]))
        .await
        .assert_code(0);
    staging.assert_same_tables("acme", &env.pg, "acme").await;

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
