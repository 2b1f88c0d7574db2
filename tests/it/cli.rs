//! Command-line behaviour that needs no server: config errors, `config check`, usage.

use crate::support::env::{assert_no_secret, pgferry_with_env, Run};

const GOOD: &str = r#"
[[source]]
name = "prod"
url = "postgres://pgferry:${PGFERRY_CLI_TEST_PW}@127.0.0.1:5432/postgres"

[[target]]
name = "s3"
url = "s3://bucket/pg"
endpoint = "http://127.0.0.1:3900"
access_key_id = "GK0123456789abcdef"
secret_access_key = "${PGFERRY_CLI_TEST_SECRET}"

[[restore_target]]
namespace = "staging-*"
url = "postgres://odoo:staging-pw-4242@pg.{namespace}.svc/postgres"
"#;

const SECRETS: [&str; 3] = ["db-pass-9876", "s3-secret-5432", "staging-pw-4242"];

async fn run(body: &str, args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgferry.toml");
    std::fs::write(&path, body).unwrap();
    let env = vec![
        ("PGFERRY_CLI_TEST_PW".to_string(), SECRETS[0].to_string()),
        (
            "PGFERRY_CLI_TEST_SECRET".to_string(),
            SECRETS[1].to_string(),
        ),
    ];
    let run = pgferry_with_env(&path, args, &env).await;
    assert_no_secret(
        &run.output(),
        &SECRETS.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    run
}

fn line_of(text: &str, needle: &str) -> usize {
    text[..text.find(needle).unwrap()].matches('\n').count() + 1
}

#[tokio::test]
async fn config_check_prints_the_effective_config_redacted() {
    let r = run(GOOD, &["config", "check"]).await;
    r.assert_code(0);
    assert!(r.stdout.contains("<redacted>"), "{}", r.stdout);
    assert!(
        r.stdout.contains("max_concurrent_backups = 2"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("schedule = \"0 * * * *\""),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("GK0123456789abcdef"), "{}", r.stdout);
}

#[tokio::test]
async fn config_errors_exit_2_naming_key_and_line() {
    let unknown = GOOD.replace("name = \"s3\"", "name = \"s3\"\nbuckett = \"x\"");
    let r = run(&unknown, &["config", "check"]).await;
    r.assert_code(2);
    assert!(r.stderr.contains("buckett"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!(":{}:", line_of(&unknown, "buckett"))),
        "{}",
        r.stderr
    );

    let missing_var = GOOD.replace("${PGFERRY_CLI_TEST_SECRET}", "${PGFERRY_NOT_SET_ANYWHERE}");
    let r = run(&missing_var, &["backup"]).await;
    r.assert_code(2);
    assert!(
        r.stderr.contains("PGFERRY_NOT_SET_ANYWHERE"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!(":{}:", line_of(&missing_var, "PGFERRY_NOT_SET"))),
        "{}",
        r.stderr
    );

    let bad_cron = GOOD.replace(
        "name = \"prod\"",
        "name = \"prod\"\nschedule = \"0 25 * * *\"",
    );
    let r = run(&bad_cron, &["list"]).await;
    r.assert_code(2);
    assert!(r.stderr.contains("source[0].schedule"), "{}", r.stderr);
    assert!(r.stderr.contains("0 25 * * *"), "{}", r.stderr);

    let duplicate = format!("{GOOD}\n[[target]]\nname = \"s3\"\nurl = \"file:///tmp/x\"\n");
    let r = run(&duplicate, &["config", "check"]).await;
    r.assert_code(2);
    assert!(
        r.stderr.contains("duplicate target name \"s3\""),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("target[1].name"), "{}", r.stderr);
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let r = run(GOOD, &["backup", "--no-such-flag"]).await;
    r.assert_code(2);
    let r = run(GOOD, &["list", "--target", "nope"]).await;
    r.assert_code(2);
    assert!(
        r.stderr.contains("no target named \"nope\""),
        "{}",
        r.stderr
    );
    let r = run(GOOD, &["backup", "--source", "nope"]).await;
    r.assert_code(2);
    assert!(r.stderr.contains("configured: prod"), "{}", r.stderr);
}
