//! Passwords never show (issue 14 item 3, issue 20 item 11): a multi-host URL, a key/value
//! string with spaces and quotes, and a `${VAR}` password holding `#`, `/`, `?`, `@` — each
//! connects (the one parser is also what connects) and none appears in `config check`,
//! `backup` or `list` output.

use crate::support::env::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_key_value_and_special_character_passwords_never_appear() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let pw = "p#a/s?s@w'o rd%";
    env.pg
        .execute(
            "postgres",
            &format!(
                "CREATE ROLE ferry LOGIN SUPERUSER PASSWORD {}",
                crate::support::postgres::quote_literal(pw)
            ),
        )
        .await
        .unwrap();
    env.add_secret_var("PGFERRY_TEST_FERRY_PW", pw);
    let port = env.pg.port();
    let encoded: String = pw
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let kv_pw = pw.replace('\\', "\\\\").replace('\'', "\\'");
    // The first host of the list refuses connections; libpq semantics go on to the next.
    let spellings = [
        format!("postgres://ferry:{encoded}@127.0.0.1:1,127.0.0.1:{port}/postgres"),
        format!(
            "host = '127.0.0.1' port = {port} user = ferry password = '{kv_pw}' dbname = postgres"
        ),
        format!("postgres://ferry:${{PGFERRY_TEST_FERRY_PW}}@127.0.0.1:{port}/postgres"),
    ];
    for url in spellings {
        let (target, _store) = env.s3_target("s3").await;
        let config = env.write_config(&format!(
            "[[source]]\nname = \"prod\"\nurl = {url:?}\ndatabases = [\"acme\"]\n{target}"
        ));
        // `env.pgferry` fails the test if any registered secret shows in the output.
        let check = env.pgferry(&config, &["config", "check"]).await;
        check.assert_code(0);
        assert!(check.stdout.contains("<redacted>"), "{}", check.stdout);
        env.pgferry(&config, &["backup"]).await.assert_code(0);
        env.pgferry(&config, &["list"]).await.assert_code(0);
    }
}
