//! Security (issue 8): TLS to PostgreSQL under each `sslmode`, S3 over HTTPS with a private
//! CA, and backups as a minimal role. Real servers: PostgreSQL with `ssl = on` and a
//! `hostssl`-only `pg_hba.conf` (so any TCP connection that works used TLS), Garage behind a
//! TLS-terminating proxy, certificates from a throwaway CA made with `openssl`.
//!
//! `pg_tls`: each sslmode against PostgreSQL; `s3_https`: a target behind HTTPS with a private
//! CA; `roles`: backup, restore and verify as least-privilege roles.

use std::path::{Path, PathBuf};

use crate::support::env::{self, Run, S3_KEY_VAR, S3_SECRET_VAR};
use crate::support::garage::Garage;
use crate::support::postgres::{PgCluster, ServerTls};
use crate::support::tls::Issued;

mod pg_tls;
mod roles;
mod s3_https;

pub const PROD_PW_VAR: &str = "PGFERRY_TEST_PROD_PASSWORD";
pub const STAGING_PW_VAR: &str = "PGFERRY_TEST_STAGING_PASSWORD";

/// Every variable a config of these tests expands; all of them count as secrets.
pub fn vars(prod: &PgCluster, staging: Option<&PgCluster>, s3: &Garage) -> Vec<(String, String)> {
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
pub async fn run(config: &Path, args: &[&str], vars: &[(String, String)]) -> Run {
    let run = env::pgferry_with_env(config, args, vars).await;
    let secrets: Vec<String> = vars.iter().map(|(_, v)| v.clone()).collect();
    env::assert_no_secret(&run.output(), &secrets);
    run
}

pub fn write(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join(format!("{}.toml", crate::support::unique_name("cfg")));
    std::fs::write(&path, body).expect("write config");
    path
}

/// A `[[source]]` named prod on `host:port` with the given URL parameters.
pub fn source(host: &str, port: u16, params: &str) -> String {
    format!(
        "[[source]]\nname = \"prod\"\nurl = \"postgres://postgres:${{{PROD_PW_VAR}}}@{host}:{port}/postgres?{params}\"\ndatabases = [\"acme\"]\n"
    )
}

pub async fn tls_cluster(cert: &Issued) -> PgCluster {
    PgCluster::start_with_tls(ServerTls {
        cert: &cert.cert,
        key: &cert.key,
        client_ca: None,
    })
    .await
    .expect("start PostgreSQL with ssl = on")
}

/// Whether a plain (non-TLS) TCP connection to `pg` is refused, as its pg_hba.conf says.
pub async fn plain_tcp_is_refused(pg: &PgCluster) -> String {
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
