//! Running pgferry like the tools operators already trust: S3 credentials from the AWS
//! environment, `--json` on every verb with one object on the last line, no colour codes in
//! a piped log.

use crate::restore::World;
use crate::support::env::{self, TestEnv};
use crate::support::restore_argv;

/// The last line of stdout, parsed: every verb's `--json` contract.
#[track_caller]
fn last_json(run: &env::Run) -> serde_json::Value {
    let last = run
        .stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no stdout\n{}", run.output()));
    let v: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}\n{}", run.output()));
    assert!(v.is_object(), "{v}");
    assert!(v["result"].is_string(), "no result: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_credentials_come_from_the_aws_environment() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (target, store) = env.s3_target("s3").await;
    // The same target without keys in the config: they come from AWS_ACCESS_KEY_ID/SECRET.
    let keyless: String = target
        .lines()
        .filter(|l| !l.starts_with("access_key_id") && !l.starts_with("secret_access_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{keyless}",
        env.source_toml("prod")
    ));
    let mut vars = env.env_vars();
    vars.push((
        "AWS_ACCESS_KEY_ID".into(),
        env.s3.access_key_id().to_string(),
    ));
    vars.push((
        "AWS_SECRET_ACCESS_KEY".into(),
        env.s3.secret_access_key().to_string(),
    ));

    let check = env::pgferry_with_env(&config, &["config", "check", "--json"], &vars).await;
    env::assert_no_secret(&check.output(), &env.secrets());
    check.assert_code(0);
    let v = last_json(&check);
    let creds = v["targets"][0]["credentials"].as_str().unwrap();
    assert!(creds.starts_with("environment"), "{v}");

    let run = env::pgferry_with_env(&config, &["backup", "--json"], &vars).await;
    env::assert_no_secret(&run.output(), &env.secrets());
    run.assert_code(0);
    let v = last_json(&run);
    assert_eq!(v["result"], "success", "{v}");
    let id = v["databases"][0]["snapshot_id"].as_str().unwrap();
    assert!(
        env::keys(&store)
            .await
            .iter()
            .any(|k| k.ends_with(&format!("{id}.manifest.json"))),
        "the snapshot is in the bucket"
    );

    // Keys in the config win over the environment: wrong ones in the environment are unused.
    let mut wrong = env.env_vars();
    wrong.push(("AWS_ACCESS_KEY_ID".into(), "GKwrongwrongwrong".into()));
    wrong.push(("AWS_SECRET_ACCESS_KEY".into(), "wrong".into()));
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{target}",
        env.source_toml("prod")
    ));
    let check = env::pgferry_with_env(&config, &["config", "check"], &wrong).await;
    check.assert_code(0);
    assert!(
        check
            .stdout
            .contains("# target s3: credentials from config (access_key_id"),
        "{}",
        check.stdout
    );
    let run = env::pgferry_with_env(&config, &["list", "--json"], &wrong).await;
    run.assert_code(0);
    assert_eq!(last_json(&run)["snapshots"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verbs_json_last_line_parses_and_logs_carry_no_escape_codes() {
    let w = World::start("", &[], "").await;
    // Verify into the staging cluster (scratch databases are dropped afterwards).
    let text = std::fs::read_to_string(&w.config).unwrap();
    let config = w.env.write_config(&format!(
        "{text}\n[verify]\nurl = \"postgres://postgres:${{PGFERRY_TEST_STAGING_PASSWORD}}@127.0.0.1:{}/postgres\"\n",
        w.staging.port()
    ));
    let config = config.as_path();

    let run = w
        .pgferry_with(config, &["--log-format", "text", "backup", "--json"])
        .await;
    run.assert_code(0);
    let v = last_json(&run);
    assert_eq!(v["result"], "success", "{v}");
    assert_eq!(v["databases"][0]["database"], "acme", "{v}");
    assert!(
        !run.stderr.contains('\u{1b}'),
        "escape codes in a piped text log: {:?}",
        run.stderr
    );
    assert!(run.stderr.contains("Backup committed."), "{}", run.stderr);

    for (args, field) in [
        (&["config", "check", "--json"][..], "targets"),
        (&["list", "--json"][..], "snapshots"),
        (&["prune", "--dry-run", "--json"][..], "deleted_snapshots"),
        (&["prune", "--json"][..], "errors"),
        (&["verify", "--json"][..], "reports"),
        (&["check", "--json"][..], "problems"),
        (&["repair", "--dry-run", "--json"][..], "copies"),
        (&["repair", "--json"][..], "copies"),
        (
            &restore_argv("acme", "staging-acme", &["--json"])[..],
            "restore",
        ),
    ] {
        let run = w.pgferry_with(config, args).await;
        run.assert_code(0);
        let v = last_json(&run);
        assert_eq!(v["result"], "success", "{args:?}: {v}");
        assert!(!v[field].is_null(), "{args:?}: no {field}: {v}");
        assert_eq!(run.stdout.lines().count(), 1, "{args:?}: {}", run.stdout);
    }

    // Failures end with a JSON object too: a usage error and a failed run.
    let run = w
        .pgferry_with(config, &["backup", "--source", "nope", "--json"])
        .await;
    run.assert_code(2);
    let v = last_json(&run);
    assert_eq!(v["result"], "error", "{v}");
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    let run = w
        .pgferry_with(config, &restore_argv("acme", "production", &["--json"]))
        .await;
    assert_ne!(run.code, 0);
    assert_ne!(last_json(&run)["result"], "success");
}

#[tokio::test]
async fn completions_and_man_page_need_no_config() {
    let missing = std::path::Path::new("/nonexistent/pgferry.toml");
    let run = env::pgferry_with_env(missing, &["completions", "bash"], &[]).await;
    run.assert_code(0);
    assert!(run.stdout.contains("pgferry"), "{}", run.stdout);
    assert!(run.stdout.contains("restore"), "{}", run.stdout);
    let run = env::pgferry_with_env(missing, &["man"], &[]).await;
    run.assert_code(0);
    assert!(
        run.stdout.starts_with(".ie") || run.stdout.contains(".TH"),
        "{}",
        run.stdout
    );
}

/// IRSA: a web identity token file and a role ARN in the environment, exchanged for
/// temporary keys at an STS endpoint (here a fake one, behind TLS: object_store talks to STS
/// over https only), then used against the real S3 server. Garage has no STS; the fake answers
/// AssumeRoleWithWebIdentity with Garage's own key plus a session token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_credentials_from_a_web_identity_token_file() {
    use std::sync::{Arc, Mutex};

    use crate::support::tls::{TestCa, TlsProxy};

    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (target, store) = env.s3_target("s3").await;
    let keyless: String = target
        .lines()
        .filter(|l| !l.starts_with("access_key_id") && !l.starts_with("secret_access_key"))
        .map(|l| format!("{l}\n"))
        .collect();

    // The fake STS: records the token and role it was given, answers with Garage's key.
    let seen: Arc<Mutex<Vec<String>>> = Default::default();
    let answer = format!(
        "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
         <SessionToken>session-token-e2e</SessionToken><SecretAccessKey>{}</SecretAccessKey>\
         <AccessKeyId>{}</AccessKeyId><Expiration>2099-01-01T00:00:00Z</Expiration>\
         </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
        env.s3.secret_access_key(),
        env.s3.access_key_id()
    );
    let sts = {
        let seen = seen.clone();
        axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let seen = seen.clone();
            let answer = answer.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push(uri.query().unwrap_or_default().to_string());
                answer
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sts_addr = listener.local_addr().unwrap();
    let _sts = tokio::spawn(async move { axum::serve(listener, sts).await.unwrap() });
    let ca = TestCa::new("pgferry-sts-ca").await.expect("test CA");
    let cert = ca
        .issue("sts.test", &["DNS:localhost", "IP:127.0.0.1"])
        .await
        .unwrap();
    let proxy = TlsProxy::start(&cert, sts_addr).await.expect("TLS proxy");

    let token_file = env.dir.path().join("web-identity-token");
    std::fs::write(&token_file, "projected-sa-token-77").unwrap();
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{keyless}",
        env.source_toml("prod")
    ));
    let mut vars = env.env_vars();
    for (k, v) in [
        (
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            token_file.display().to_string(),
        ),
        (
            "AWS_ROLE_ARN",
            "arn:aws:iam::123456789012:role/pgferry".into(),
        ),
        ("AWS_ENDPOINT_URL_STS", proxy.endpoint()),
        // rustls-native-certs reads the trusted roots from here: the fake STS's CA.
        ("SSL_CERT_FILE", ca.ca_pem().display().to_string()),
    ] {
        vars.push((k.to_string(), v));
    }

    let check = env::pgferry_with_env(&config, &["config", "check", "--json"], &vars).await;
    check.assert_code(0);
    let creds = last_json(&check)["targets"][0]["credentials"].clone();
    assert!(
        creds.as_str().unwrap().starts_with("web identity"),
        "{creds}"
    );

    let run = env::pgferry_with_env(&config, &["backup", "--json"], &vars).await;
    env::assert_no_secret(&run.output(), &env.secrets());
    run.assert_code(0);
    let id = last_json(&run)["databases"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(env::keys(&store)
        .await
        .iter()
        .any(|k| k.ends_with(&format!("{id}.manifest.json"))));
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty(), "STS was never asked");
    assert!(
        seen[0].contains("AssumeRoleWithWebIdentity")
            && seen[0].contains("projected-sa-token-77")
            && seen[0].contains("role%2Fpgferry"),
        "{seen:?}"
    );
}

/// object_store 0.12 cannot read AWS profiles: with `AWS_PROFILE` set and no keys anywhere,
/// pgferry refuses the target instead of quietly using the instance role.
#[tokio::test]
async fn an_aws_profile_is_refused_with_what_to_do_instead() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgferry.toml");
    std::fs::write(
        &config,
        "[[source]]\nname = \"prod\"\nurl = \"postgres://pgferry@127.0.0.1:1/postgres\"\n\
         schedule = \"0 * * * *\"\n\n[[target]]\nname = \"aws\"\nurl = \"s3://backups/pg\"\n\
         region = \"eu-west-1\"\n",
    )
    .unwrap();
    let vars = |profile: &str| vec![("AWS_PROFILE".to_string(), profile.to_string())];
    let run = env::pgferry_with_env(&config, &["config", "check", "--json"], &vars("backup")).await;
    run.assert_code(2);
    let v = last_json(&run);
    assert_eq!(v["result"], "error", "{v}");
    let error = v["error"].as_str().unwrap();
    for words in [
        "target aws",
        "AWS_PROFILE=\"backup\"",
        "access_key_id",
        "unset AWS_PROFILE",
    ] {
        assert!(error.contains(words), "{words:?} not in {error}");
    }
    // Without the profile the same config checks, with the chain's last resort named.
    let run = env::pgferry_with_env(&config, &["config", "check", "--json"], &vars("")).await;
    run.assert_code(0);
    let v = last_json(&run);
    assert!(
        v["targets"][0]["credentials"]
            .as_str()
            .unwrap()
            .starts_with("instance metadata"),
        "{v}"
    );
}
