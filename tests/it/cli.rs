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

/// 1-based line of the last occurrence of `needle`.
fn last_line_of(text: &str, needle: &str) -> usize {
    text[..text.rfind(needle).unwrap()].matches('\n').count() + 1
}

/// Issue 20 items 8 and 12: each operator mistake is refused by `config check` (exit 2) with
/// the file, the line and the key, and a message saying what is wrong.
#[tokio::test]
async fn config_check_refuses_operator_mistakes_with_file_line_and_key() {
    let restore_url = "url = \"postgres://odoo:staging-pw-4242@pg.{namespace}.svc/postgres\"";
    let with_hooks =
        |hooks: &str| GOOD.replace(restore_url, &format!("{restore_url}\nhooks = [{hooks}]"));
    let cases: Vec<(&str, String, &str, &str, &str)> = vec![
        (
            "relative file URL",
            format!("{GOOD}\n[[target]]\nname = \"disk\"\nurl = \"file:relative\"\n"),
            "target[1].url",
            "file:relative",
            "write file:///absolute/dir",
        ),
        (
            "directory as a hook",
            with_hooks("\".\""),
            "restore_target[0].hooks[0]",
            "hooks = ",
            "is a directory",
        ),
        (
            "zero stall_timeout",
            format!("{GOOD}\n[pipeline]\nstall_timeout = \"0s\"\n"),
            "pipeline.stall_timeout",
            "stall_timeout",
            "below the minimum of 1s",
        ),
        (
            "placeholder typo",
            GOOD.replace("{namespace}", "{namepsace}"),
            "restore_target[0].url",
            "{namepsace}",
            "unknown placeholder {namepsace}; the only one is {namespace}",
        ),
        (
            "absurd zstd_workers",
            format!("{GOOD}\n[pipeline]\nzstd_workers = 1000\n"),
            "pipeline.zstd_workers",
            "zstd_workers",
            "more than 32",
        ),
        (
            "empty database list",
            GOOD.replace("name = \"prod\"", "name = \"prod\"\ndatabases = []"),
            "source[0].databases",
            "databases = []",
            "selects no database",
        ),
        (
            "duplicate source name",
            format!("{GOOD}\n[[source]]\nname = \"prod\"\nurl = \"postgres://h/x\"\n"),
            "source[1].name",
            "name = \"prod\"",
            "duplicate source name \"prod\", already the name of source[0]",
        ),
        (
            "cron minute out of range",
            GOOD.replace(
                "name = \"prod\"",
                "name = \"prod\"\nschedule = \"61 * * * *\"",
            ),
            "source[0].schedule",
            "61 * * * *",
            "Minutes must be at most 59 (61 given)",
        ),
        (
            "'..' as a source name",
            GOOD.replace("name = \"prod\"", "name = \"..\""),
            "source[0].name",
            "name = \"..\"",
            "\"..\" must not start with '.'",
        ),
        (
            "misspelt URL scheme",
            GOOD.replace("postgres://pgferry", "postgress://pgferry"),
            "source[0].url",
            "postgress://",
            "unknown URL scheme postgress; use postgres:// or postgresql://",
        ),
    ];
    // Every case runs, and every miss is reported, not only the first.
    let mut misses = Vec::new();
    for (what, body, key, needle, says) in cases {
        let r = run(&body, &["config", "check"]).await;
        let at = format!("pgferry.toml:{}: {key}: ", last_line_of(&body, needle));
        if r.code != 2 || !r.stderr.contains(&at) || !r.stderr.contains(says) {
            misses.push(format!(
                "{what}: want exit 2, {at:?} and {says:?}; got exit {}: {}",
                r.code,
                r.stderr.trim()
            ));
        }
    }
    assert!(misses.is_empty(), "{}", misses.join("\n"));
}

/// `retention = { keep_last = 2 }` is valid, but keeps 48 hourly snapshots and more:
/// `config check` says which defaults apply, with the line.
#[tokio::test]
async fn config_check_says_which_retention_defaults_apply() {
    let body = GOOD.replace(
        "name = \"prod\"",
        "name = \"prod\"\nretention = { keep_last = 2 }",
    );
    let r = run(&body, &["config", "check"]).await;
    r.assert_code(0);
    let at = format!(
        "warning: {}:{}: source[0].retention: ",
        "pgferry.toml",
        line_of(&body, "retention")
    );
    let warning = r
        .stderr
        .lines()
        .find(|l| l.starts_with("warning: ") && l.contains("source[0].retention"))
        .unwrap_or_else(|| panic!("no retention warning in\n{}", r.stderr));
    assert!(
        warning.contains(&at[at.find("pgferry.toml").unwrap()..]),
        "{warning}"
    );
    assert!(
        warning.contains("hourly = 48, daily = 14, weekly = 8, monthly = 12"),
        "{warning}"
    );
    // The effective values are in the output too.
    assert!(r.stdout.contains("keep_last = 2"), "{}", r.stdout);
    assert!(r.stdout.contains("hourly = 48"), "{}", r.stdout);
    // A complete policy: no warning.
    let full = GOOD.replace(
        "name = \"prod\"",
        "name = \"prod\"\nretention = { keep_last = 2, hourly = 0, daily = 7, weekly = 0, monthly = 0 }",
    );
    let r = run(&full, &["config", "check"]).await;
    r.assert_code(0);
    assert!(!r.stderr.contains("warning:"), "{}", r.stderr);
}

/// A hook file missing where `config check` runs is reported with its line, as a warning:
/// the config may be checked away from the image that ships the hooks.
#[tokio::test]
async fn config_check_warns_about_a_missing_hook_file() {
    let restore_url = "url = \"postgres://odoo:staging-pw-4242@pg.{namespace}.svc/postgres\"";
    let body = GOOD.replace(
        restore_url,
        &format!("{restore_url}\nhooks = [\"missing.sql\"]"),
    );
    let r = run(&body, &["config", "check"]).await;
    r.assert_code(0);
    let at = format!(
        "pgferry.toml:{}: restore_target[0].hooks[0]: ",
        line_of(&body, "missing.sql")
    );
    let warning = r
        .stderr
        .lines()
        .find(|l| l.starts_with("warning: ") && l.contains(&at))
        .unwrap_or_else(|| panic!("no {at:?} warning in\n{}", r.stderr));
    assert!(warning.contains("missing.sql does not exist"), "{warning}");
    assert!(r.stderr.contains("(1 warning(s) above)"), "{}", r.stderr);
}
