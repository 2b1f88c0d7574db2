//! Unit tests of config parsing, validation and redaction.

use super::*;

const MINIMAL: &str = r#"
[[source]]
name = "prod"
url = "postgres://pgferry:s3cret@127.0.0.1:5432/postgres"

[[target]]
name = "local"
url = "file:///var/lib/pgferry"
"#;

/// 1-based line of the first occurrence of `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text[..text.find(needle).unwrap()].matches('\n').count() + 1
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str_at(text, Path::new("/etc/pgferry/pgferry.toml"))
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.daemon.listen.to_string(), "0.0.0.0:9187");
    assert_eq!(c.daemon.max_concurrent_backups, 2);
    assert_eq!(c.daemon.shutdown_grace, Duration::from_secs(60));
    assert_eq!(c.pipeline.zstd_level, 1);
    assert_eq!(c.pipeline.min_targets, 1);
    assert_eq!(
        c.pipeline.orphan_grace,
        crate::retention::DEFAULT_ORPHAN_GRACE
    );
    let s = &c.sources[0];
    assert!(s.selects("acme"));
    assert!(!s.selects("postgres"));
    assert!(!s.selects("template1"));
    assert_eq!(s.schedule.expr(), "0 * * * *");
    assert_eq!(s.retention, RetentionPolicy::default());
    assert!(matches!(c.targets[0].kind, TargetKind::File { .. }));
}

#[test]
fn the_example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgferry.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let vars = [
        ("OVH_ACCESS_KEY_ID", "example-key"),
        ("OVH_SECRET_ACCESS_KEY", "example-secret"),
        ("SCW_ACCESS_KEY_ID", "example-key"),
        ("SCW_SECRET_ACCESS_KEY", "example-secret"),
    ];
    let mut expanded = text.clone();
    for (k, v) in vars {
        expanded = expanded.replace(&format!("${{{k}}}"), v);
    }
    let c = Config::from_str_at(&expanded, &path).unwrap();
    assert!(c.targets.len() >= 2);
    assert!(!c.restore_targets.is_empty());
    assert!(c.restore_targets[0].hooks[0].exists(), "hook file missing");
    assert_eq!(c.encryption.recipients.len(), 1);
    assert!(c.encryption.identity_file.is_some());
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = format!("{MINIMAL}\n[pipeline]\nzstd_levle = 3\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("zstd_levle"), "{err}");
    assert!(
        err.contains(&format!(":{}:", line_of(&text, "zstd_levle"))),
        "{err}"
    );
}

#[test]
fn missing_env_var_is_an_error_naming_it() {
    let text = MINIMAL.replace("s3cret", "${PGFERRY_TEST_SURELY_UNSET}");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("PGFERRY_TEST_SURELY_UNSET"), "{err}");
    assert!(
        err.contains(&format!(":{}:", line_of(&text, "PGFERRY_TEST"))),
        "{err}"
    );
}

#[test]
fn env_expansion() {
    let get = |n: &str| (n == "A").then(|| "x\"y".to_string());
    assert_eq!(expand_env("a${A}b", get).unwrap(), "ax\"yb");
    assert_eq!(expand_env("$$A $B", get).unwrap(), "$A $B");
    assert!(expand_env("${B}", get).is_err());
    assert!(expand_env("${A", get).is_err());
}

#[test]
fn bad_cron_duplicate_target_and_min_targets_are_rejected() {
    let bad_cron = MINIMAL.replace(
        "url = \"postgres",
        "schedule = \"61 * * * *\"\nurl = \"postgres",
    );
    let err = parse(&bad_cron).unwrap_err().to_string();
    assert!(err.contains("source[0].schedule"), "{err}");

    let dup = format!("{MINIMAL}\n[[target]]\nname = \"local\"\nurl = \"file:///tmp/x\"\n");
    let err = parse(&dup).unwrap_err().to_string();
    assert!(err.contains("duplicate target name"), "{err}");
    assert!(err.contains("target[1].name"), "{err}");

    let dup = format!("[[source]]\nname = \"prod\"\nurl = \"postgres://h/x\"\n{MINIMAL}");
    let err = parse(&dup).unwrap_err().to_string();
    assert!(err.contains("source[1].name"), "{err}");
    assert!(err.contains("duplicate source name \"prod\""), "{err}");

    let min = format!("{MINIMAL}\n[pipeline]\nmin_targets = 2\n");
    let err = parse(&min).unwrap_err().to_string();
    assert!(err.contains("min_targets"), "{err}");
}

#[test]
fn secrets_are_redacted() {
    let text = r#"
[[source]]
name = "prod"
url = "postgres://pgferry:s3cret@127.0.0.1:5432/postgres"
[[target]]
name = "s3"
url = "s3://bucket/pg"
endpoint = "http://127.0.0.1:3900"
access_key_id = "GKabc"
secret_access_key = "topsecretkey"
[[restore_target]]
namespace = "staging-*"
url = "postgres://odoo:hunter2@pg.{namespace}.svc/postgres"
"#;
    let c = parse(text).unwrap();
    let shown = c.redacted_toml();
    for secret in ["s3cret", "GKabc", "topsecretkey", "hunter2"] {
        assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
        assert!(
            !format!("{c:?}").contains(secret),
            "{secret} leaked in Debug"
        );
    }
    assert!(shown.contains("<redacted>"));
    // The redacted output is itself a valid config (with placeholders).
    toml::from_str::<toml::Value>(&shown).unwrap();
    assert_eq!(
        redact_url("host=a password=x user=b"),
        "host=a password=<redacted> user=b"
    );
}

#[test]
fn wrong_type_does_not_echo_the_value() {
    let text = MINIMAL.replace(
        "name = \"local\"",
        "name = \"local\"\nmax_parts = \"hunter2\"",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(!err.contains("hunter2"), "{err}");
    assert!(
        err.contains(&format!(":{}:", line_of(&text, "max_parts"))),
        "{err}"
    );
}

/// The fuzz corpus (seeds and past crashes of `fuzz/fuzz_targets/config.rs`) runs in every
/// `cargo test`: no input may panic the parser.
#[test]
fn fuzz_corpus_does_not_panic() {
    for (path, bytes) in crate::test_support::fuzz_corpus("config") {
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue; // the fuzz target only feeds UTF-8
        };
        let outcome = std::panic::catch_unwind(|| {
            if let Ok(config) = parse(text) {
                let _ = config.redacted_toml();
            }
        });
        assert!(
            outcome.is_ok(),
            "{} panicked the config parser",
            path.display()
        );
    }
}

/// A CA certificate (public part only) for configs that name one.
fn fixture_ca() -> String {
    format!("{}/tests/fixtures/tls/ca.pem", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn tls_settings_of_urls_are_checked() {
    let ca = fixture_ca();
    let with_url =
        |url: &str| MINIMAL.replace("postgres://pgferry:s3cret@127.0.0.1:5432/postgres", url);
    let c = parse(&with_url(&format!(
        "postgres://pgferry:s3cret@db.svc/postgres?sslmode=verify-full&sslrootcert={ca}"
    )))
    .unwrap();
    let tls = &c.sources[0].url.tls;
    assert_eq!(tls.mode, crate::conninfo::tls::SslMode::VerifyFull);
    assert_eq!(tls.root_cert.as_deref(), Some(Path::new(&ca)));
    // The TLS parameters stay visible in `config check`; the password does not.
    let shown = c.redacted_toml();
    assert!(shown.contains("sslmode=verify-full"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");

    let err = parse(&with_url(
        "postgres://u@db.svc/postgres?sslmode=verify_full",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("source[0].url") && err.contains("sslmode=\"verify_full\" is not one of"),
        "{err}"
    );
    let err = parse(&with_url(
        "postgres://u@db.svc/postgres?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("sslrootcert /nonexistent/ca.pem cannot be read"),
        "{err}"
    );
    let err = parse(&with_url("host=db.svc sslmode=verify-full"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs sslrootcert"), "{err}");

    // The verify server and restore targets are checked the same way.
    let verify =
        format!("{MINIMAL}\n[verify]\nurl = \"postgres://u@v/postgres?sslmode=verify-full\"\n");
    let err = parse(&verify).unwrap_err().to_string();
    assert!(
        err.contains("verify.url") && err.contains("needs sslrootcert"),
        "{err}"
    );
    let restore = format!(
        "{MINIMAL}\n[[restore_target]]\nnamespace = \"s-*\"\nurl = \"postgres://u@pg.{{namespace}}/postgres?sslmode=require&sslrootcert=/nope.pem\"\n"
    );
    let err = parse(&restore).unwrap_err().to_string();
    assert!(
        err.contains("restore_target[0].url") && err.contains("/nope.pem"),
        "{err}"
    );
    // A per-namespace CA path can only be checked at restore time.
    let per_ns = restore.replace("/nope.pem", "/etc/ca/{namespace}.pem");
    parse(&per_ns).unwrap();
}

#[test]
fn s3_ca_file_is_checked_and_shown() {
    let ca = fixture_ca();
    let target = |endpoint: &str, ca_file: &str| {
        MINIMAL.replace(
            "url = \"file:///var/lib/pgferry\"",
            &format!("url = \"s3://b/p\"\nendpoint = \"{endpoint}\"\nca_file = \"{ca_file}\""),
        )
    };
    let c = parse(&target("https://s3.internal:9000", &ca)).unwrap();
    match &c.targets[0].kind {
        TargetKind::S3 { ca_file, .. } => assert_eq!(ca_file.as_deref(), Some(Path::new(&ca))),
        other => panic!("{other:?}"),
    }
    assert!(c.redacted_toml().contains(&format!("ca_file = \"{ca}\"")));

    let err = parse(&target("https://s3.internal:9000", "/nonexistent/ca.pem"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target[0].ca_file") && err.contains("cannot be read"),
        "{err}"
    );
    let err = parse(&target("http://s3.internal:9000", &ca))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("only applies to an https:// endpoint"),
        "{err}"
    );
    let on_file = MINIMAL.replace(
        "url = \"file:///var/lib/pgferry\"",
        &format!("url = \"file:///var/lib/pgferry\"\nca_file = \"{ca}\""),
    );
    let err = parse(&on_file).unwrap_err().to_string();
    assert!(err.contains("only applies to s3:// targets"), "{err}");
}

/// The recipients file of the fixtures (public keys only).
fn fixture_recipients() -> String {
    format!(
        "{}/tests/fixtures/age/recipients.txt",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A recipient, `age1…`, of a key generated for the test.
fn new_recipient() -> String {
    age::x25519::Identity::generate().to_public().to_string()
}

/// Every key of the file, set to a non-default value, so `config check` must show each.
fn every_key() -> String {
    format!(
        r#"
[daemon]
listen = "127.0.0.1:9999"
api_token_file = "/run/token"
max_concurrent_backups = 3
shutdown_grace = "45s"

[pipeline]
zstd_level = 4
zstd_workers = 2
min_targets = 2
stall_timeout = "120s"
orphan_grace = "36h"

[[source]]
name = "prod"
url = "postgres://pgferry:s3cret@db.svc:5432/postgres?sslmode=require"
databases = ["acme", "globex*"]
exclude = ["globex_old"]
schedule = "30 * * * *"
retention = {{ keep_last = 5, hourly = 1, daily = 2, weekly = 3, monthly = 4 }}
pg_bin_dir = "/opt/pg17/bin"
spread = "20m"

[[target]]
name = "s3"
url = "s3://bucket/pg"
endpoint = "https://s3.internal:9000"
region = "eu-west-3"
access_key_id = "GKabc"
secret_access_key = "topsecretkey"
ca_file = "{ca}"
max_parts = 1000

[[target]]
name = "disk"
url = "file:///var/lib/pgferry"

[[restore_target]]
namespace = "staging-*"
url = "postgres://odoo:hunter2@pg.{{namespace}}.svc/postgres"
owner = "app"
hooks = ["{hook}"]
pg_bin_dir = "/opt/pg16/bin"
identity_file = "/keys/staging.txt"
variables = {{ base_url = "https://{{namespace}}.staging.example.net", db = "{{database}}" }}

[restore]
spool_dir = "/srv/spool"

[verify]
url = "postgres://v:vpass@verify.svc/postgres"
checks = ["SELECT true"]
schedule = "0 3 * * *"
pg_bin_dir = "/opt/pg15/bin"
concurrency = 3
window = "4h"
max_age = "72h"
identity_file = "/keys/verify.txt"

[encryption]
recipients = ["{recipient}"]
recipients_file = "{recipients_file}"
identity_file = "/keys/all.txt"
"#,
        ca = fixture_ca(),
        recipient = new_recipient(),
        recipients_file = fixture_recipients(),
        hook = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/hooks/odoo-neutralize.sql"
        ),
    )
}

#[test]
fn config_check_shows_every_key_from_the_typed_config() {
    let text = every_key();
    let c = parse(&text).unwrap();
    let shown = c.redacted_toml();
    for secret in ["s3cret", "GKabc", "topsecretkey", "hunter2", "vpass"] {
        assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
    }
    // Every key of the file is shown (defaults too, such as target[1].max_parts).
    let file: toml::Table = toml::from_str(&text).unwrap();
    let out: toml::Table = toml::from_str(&shown).unwrap();
    fn keys(prefix: &str, v: &toml::Value, into: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    keys(&format!("{prefix}.{k}"), v, into)
                }
            }
            toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty() => {
                for (i, v) in a.iter().enumerate() {
                    keys(&format!("{prefix}[{i}]"), v, into)
                }
            }
            _ => into.push(prefix.to_string()),
        }
    }
    let (mut want, mut got) = (Vec::new(), Vec::new());
    keys("", &toml::Value::Table(file), &mut want);
    keys("", &toml::Value::Table(out.clone()), &mut got);
    let missing: Vec<&String> = want.iter().filter(|k| !got.contains(k)).collect();
    assert!(missing.is_empty(), "{missing:?} not shown:\n{shown}");
    // Values other than secrets come out as written.
    assert_eq!(
        out["restore_target"][0]["pg_bin_dir"].as_str(),
        Some("/opt/pg16/bin")
    );
    assert_eq!(out["verify"]["pg_bin_dir"].as_str(), Some("/opt/pg15/bin"));
    assert_eq!(out["pipeline"]["stall_timeout"].as_str(), Some("120s"));
    assert_eq!(
        out["source"][0]["retention"]["monthly"].as_integer(),
        Some(4)
    );
    assert_eq!(
        out["target"][0]["secret_access_key"].as_str(),
        Some("<redacted>")
    );
    // And it is itself a valid config, which shows the same once more.
    let again = parse(&shown).unwrap().redacted_toml();
    assert_eq!(again, shown);
}

/// The error for `text`, which must name `key` and the line of `needle`.
fn error_at(text: &str, key: &str, needle: &str) -> String {
    let err = parse(text).unwrap_err().to_string();
    assert!(err.contains(key), "{key} not in {err}");
    assert!(
        err.contains(&format!("pgferry.toml:{}: ", line_of(text, needle))),
        "no line of {needle:?} in {err}"
    );
    err
}

#[test]
fn relative_file_urls_are_refused() {
    for url in ["file:relative", "file:/var/lib/pgferry", "file:./x"] {
        let text = MINIMAL.replace("file:///var/lib/pgferry", url);
        let err = error_at(&text, "target[0].url", url);
        assert!(err.contains("file:///absolute/dir"), "{err}");
    }
    let text = MINIMAL.replace("file:///var/lib/pgferry", "file:relative");
    assert!(parse(&text)
        .unwrap_err()
        .to_string()
        .contains("would mean /relative"));
}

#[test]
fn hook_directories_are_refused_and_missing_hooks_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ok.sql"), "SELECT 1;").unwrap();
    std::fs::create_dir(dir.path().join("hooks")).unwrap();
    let with_hooks = |hooks: &str| {
        format!(
            "{MINIMAL}\n[[restore_target]]\nnamespace = \"s\"\nurl = \"postgres://u@h/postgres\"\nhooks = [\n  \"ok.sql\",\n  {hooks},\n]\n"
        )
    };
    let at = |text: &str| Config::from_str_at(text, &dir.path().join("pgferry.toml"));
    assert!(at(&with_hooks("\"ok.sql\"")).unwrap().warnings.is_empty());
    let text = with_hooks("\"hooks\"");
    let err = at(&text).unwrap_err().to_string();
    assert!(err.contains("restore_target[0].hooks[1]"), "{err}");
    assert!(err.contains("is a directory"), "{err}");
    assert!(
        err.contains(&format!(":{}: ", line_of(&text, "\"hooks\""))),
        "{err}"
    );
    // Missing here may be present where the config runs (hooks ship in the image): a warning.
    let text = with_hooks("\"nope.sql\"");
    let c = at(&text).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    let w = c.warnings[0].to_string();
    assert!(w.contains("restore_target[0].hooks[1]"), "{w}");
    assert!(w.contains("nope.sql does not exist"), "{w}");
    assert!(
        w.contains(&format!(":{}: ", line_of(&text, "nope.sql"))),
        "{w}"
    );
}

#[test]
fn hook_variables_are_checked_with_file_and_line() {
    let with_vars = |vars: &str| {
        format!(
            "{MINIMAL}\n[[restore_target]]\nnamespace = \"s-*\"\nurl = \"postgres://u@h/postgres\"\nvariables = {{ {vars} }}\n"
        )
    };
    let c = parse(&with_vars(
        r#"base_url = "https://{namespace}.x.example/{database}/it's""#,
    ))
    .unwrap();
    assert_eq!(
        c.restore_targets[0].variables["base_url"],
        "https://{namespace}.x.example/{database}/it's"
    );
    let vars = crate::restore::hookvars::HookVars::for_restore(
        &c.restore_targets[0],
        "s-acme",
        "acme",
        "20261206T090000Z",
    );
    assert_eq!(
        vars.get("base_url"),
        Some("https://s-acme.x.example/acme/it's")
    );
    assert_eq!(vars.get("snapshot_id"), Some("20261206T090000Z"));
    for (vars, says) in [
        (r#"ok = "1", namespace = "x""#, "set by pgferry itself"),
        (r#""base-url" = "x""#, "not a variable name"),
        (r#"_9 = "1", "9a" = "x""#, "not a variable name"),
        (
            r#"u = "https://{namepsace}.x""#,
            "unknown placeholder {namepsace}",
        ),
        (r#"z = "a\u0000b""#, "NUL"),
    ] {
        let text = with_vars(vars);
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("restore_target[0].variables."), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(
            err.contains(&format!(":{}: ", line_of(&text, "variables ="))),
            "{err}"
        );
    }
}

#[test]
fn zero_and_absurd_durations_are_refused() {
    for (section, key, value) in [
        ("pipeline", "stall_timeout", "0s"),
        ("pipeline", "stall_timeout", "500ms"),
        ("daemon", "shutdown_grace", "0s"),
    ] {
        let text = format!("{MINIMAL}\n[{section}]\n{key} = \"{value}\"\n");
        let err = error_at(&text, &format!("{section}.{key}"), key);
        assert!(err.contains("below the minimum"), "{err}");
    }
    parse(&format!("{MINIMAL}\n[pipeline]\nstall_timeout = \"1s\"\n")).unwrap();
    parse(&format!("{MINIMAL}\n[daemon]\nshutdown_grace = \"1s\"\n")).unwrap();
}

#[test]
fn placeholder_typos_are_refused() {
    let restore = |url: &str| {
        format!("{MINIMAL}\n[[restore_target]]\nnamespace = \"s-*\"\nurl = \"{url}\"\n")
    };
    for url in [
        "postgres://u:pw@pg.{namepsace}.svc/postgres",
        "postgres://u:pw@pg.{namespace}.svc/{database}",
        "host=pg.{namespace}.svc dbname={namepsace} password=x",
    ] {
        let err = error_at(&restore(url), "restore_target[0].url", url);
        assert!(err.contains("unknown placeholder {"), "{err}");
        assert!(err.contains("the only one is {namespace}"), "{err}");
    }
    // A password may hold braces: it is not a template.
    parse(&restore("postgres://u:p{w}@pg.{namespace}.svc/postgres")).unwrap();
    // Sources, targets and the verify server have no placeholders at all.
    let source = MINIMAL.replace("127.0.0.1:5432", "pg.{namespace}.svc");
    let err = error_at(&source, "source[0].url", "{namespace}");
    assert!(err.contains("only [[restore_target]] URLs"), "{err}");
    let verify = format!("{MINIMAL}\n[verify]\nurl = \"postgres://v@{{namespace}}/postgres\"\n");
    error_at(&verify, "verify.url", "{namespace}");
}

#[test]
fn zstd_workers_are_capped() {
    let text = format!("{MINIMAL}\n[pipeline]\nzstd_workers = 1000\n");
    let err = error_at(&text, "pipeline.zstd_workers", "zstd_workers");
    assert!(err.contains("more than 32"), "{err}");
    parse(&format!("{MINIMAL}\n[pipeline]\nzstd_workers = 32\n")).unwrap();
}

#[test]
fn empty_database_lists_are_refused_and_excluded_names_warned_about() {
    let text = MINIMAL.replace("url = \"postgres:", "databases = []\nurl = \"postgres:");
    let err = error_at(&text, "source[0].databases", "databases");
    assert!(err.contains("selects no database"), "{err}");

    let text = MINIMAL.replace(
        "url = \"postgres:",
        "databases = [\"acme\", \"postgres\"]\nurl = \"postgres:",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    let w = c.warnings[0].to_string();
    assert!(w.contains("source[0].databases[1]"), "{w}");
    assert!(w.contains("\"postgres\" is also excluded"), "{w}");
    assert!(
        w.contains(&format!(":{}: ", line_of(&text, "databases"))),
        "{w}"
    );
}

#[test]
fn duplicate_names_say_where() {
    let text = format!("{MINIMAL}\n[[target]]\nname = \"local\"\nurl = \"file:///tmp/x\"\n");
    let second = text.rfind("name = \"local\"").unwrap();
    let line = text[..second].matches('\n').count() + 1;
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "/etc/pgferry/pgferry.toml:{line}: target[1].name: "
        )),
        "{err}"
    );
    assert!(err.contains("already the name of target[0]"), "{err}");
}

#[test]
fn partial_retention_names_the_defaults_that_apply() {
    let text = MINIMAL.replace(
        "url = \"postgres:",
        "retention = { keep_last = 2 }\nurl = \"postgres:",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.sources[0].retention.keep_last, 2);
    assert_eq!(c.sources[0].retention.hourly, 48);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    let w = c.warnings[0].to_string();
    assert!(
        w.starts_with(&format!(
            "/etc/pgferry/pgferry.toml:{}: source[0].retention: ",
            line_of(&text, "retention")
        )),
        "{w}"
    );
    assert!(
        w.contains("hourly = 48, daily = 14, weekly = 8, monthly = 12"),
        "{w}"
    );
    assert!(!w.contains("keep_last"), "{w}");
    // All keys given, or none: nothing to say.
    let full = MINIMAL.replace(
        "url = \"postgres:",
        "retention = { keep_last = 2, hourly = 0, daily = 0, weekly = 0, monthly = 0 }\nurl = \"postgres:",
    );
    assert!(parse(&full).unwrap().warnings.is_empty());
    assert!(parse(MINIMAL).unwrap().warnings.is_empty());
}

#[test]
fn name_and_scheme_messages_say_what_is_wrong() {
    for name in ["..", ".hidden"] {
        let text = MINIMAL.replace("name = \"prod\"", &format!("name = \"{name}\""));
        let err = error_at(&text, "source[0].name", "name =");
        assert!(err.contains("must not start with '.'"), "{err}");
        assert!(!err.contains("'-', '_', '.'"), "{err}");
    }
    let text = MINIMAL.replace("postgres://pgferry", "postgress://pgferry");
    let err = error_at(&text, "source[0].url", "postgress");
    assert!(
        err.contains("unknown URL scheme postgress; use postgres:// or postgresql://"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    let text = MINIMAL.replace("file:///var/lib/pgferry", "s3://key:topsecret@bucket/pg");
    let err = error_at(&text, "target[0].url", "s3://");
    assert!(err.contains("carries no credentials"), "{err}");
    assert!(!err.contains("topsecret"), "{err}");
}

#[test]
fn spread_must_be_shorter_than_the_slot() {
    let with = |schedule: &str, spread: &str| {
        MINIMAL.replace(
            "url = \"postgres://pgferry:s3cret@127.0.0.1:5432/postgres\"\n",
            &format!(
                "url = \"postgres://pgferry:s3cret@127.0.0.1:5432/postgres\"\nschedule = \"{schedule}\"\nspread = \"{spread}\"\n"
            ),
        )
    };
    let c = parse(&with("0 * * * *", "45m")).unwrap();
    assert_eq!(c.sources[0].spread, Some(Duration::from_secs(45 * 60)));
    assert_eq!(parse(MINIMAL).unwrap().sources[0].spread, None);
    for (schedule, spread, slot) in [
        ("0 * * * *", "1h", "1h"),
        ("0 * * * *", "90m", "1h"),
        ("0 9,17 * * *", "10h", "8h"),
        ("*/30 * * * * *", "30s", "30s"),
    ] {
        let text = with(schedule, spread);
        let err = error_at(&text, "source[0].spread", "spread");
        assert!(
            err.contains("not shorter than the schedule's slot")
                && err.contains(&format!("({slot} for \"{schedule}\")")),
            "{err}"
        );
    }
    let err = error_at(&with("0 * * * *", "0s"), "source[0].spread", "spread");
    assert!(err.contains("shorter than a second"), "{err}");
    parse(&with("0 9,17 * * *", "7h59m")).unwrap();
}

#[test]
fn verify_fleet_keys_have_defaults_and_bounds() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.verify.concurrency, 1);
    assert_eq!(c.verify.window, None);
    assert_eq!(c.verify.max_age, Duration::from_secs(48 * 3600));
    let c = parse(&format!(
        "{MINIMAL}\n[verify]\nconcurrency = 4\nwindow = \"4h30m\"\nmax_age = \"3d\"\n"
    ))
    .unwrap();
    assert_eq!(c.verify.concurrency, 4);
    assert_eq!(c.verify.window, Some(Duration::from_secs(4 * 3600 + 1800)));
    assert_eq!(c.verify.max_age, Duration::from_secs(72 * 3600));
    for (key, value, says) in [
        ("concurrency", "0", "at least 1"),
        ("window", "\"0s\"", "no verify at all"),
        ("window", "\"soon\"", "not a duration"),
        ("max_age", "\"old\"", "not a duration"),
    ] {
        let text = format!("{MINIMAL}\n[verify]\n{key} = {value}\n");
        let err = error_at(&text, &format!("verify.{key}"), key);
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn encryption_recipients_are_parsed_and_shown_identity_files_only_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recipients.txt");
    let (a, b) = (new_recipient(), new_recipient());
    std::fs::write(&file, format!("# ops\n{a}\n\n{b}\n{a}\n")).unwrap();
    let text = format!(
        "{MINIMAL}\n[encryption]\nrecipients = [\"{b}\"]\nrecipients_file = \"recipients.txt\"\nidentity_file = \"keys/id.txt\"\n"
    );
    let c = Config::from_str_at(&text, &dir.path().join("pgferry.toml")).unwrap();
    let got: Vec<String> = c
        .encryption
        .recipients
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(got, [b.clone(), a.clone()], "in order, each once");
    assert_eq!(
        c.encryption.identity_file,
        Some(dir.path().join("keys/id.txt"))
    );
    let shown = c.redacted_toml();
    assert!(shown.contains(&a) && shown.contains(&b), "{shown}");
    assert!(shown.contains("keys/id.txt"), "{shown}");
    // The identity file is not read (it does not even exist here): production has none.
    assert!(!dir.path().join("keys/id.txt").exists());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // Not encrypted by default.
    assert!(parse(MINIMAL).unwrap().encryption.recipients.is_empty());
}

#[test]
fn a_malformed_recipient_is_an_error_with_file_and_line() {
    let good = new_recipient();
    let text = format!(
        "{MINIMAL}\n[encryption]\nrecipients = [\n  \"{good}\",\n  \"age1qqqqbroken\",\n]\n"
    );
    let err = error_at(&text, "encryption.recipients[1]", "age1qqqqbroken");
    assert!(err.contains("age1"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recipients.txt");
    std::fs::write(&file, format!("# team\n{good}\nage1typo\n")).unwrap();
    let text = format!(
        "{MINIMAL}\n[encryption]\nrecipients_file = \"{}\"\n",
        file.display()
    );
    let err = error_at(&text, "encryption.recipients_file", "recipients_file");
    assert!(
        err.contains(&format!("{}:3: ", file.display())),
        "no recipients file line in {err}"
    );

    // A secret key where a recipient belongs: refused, and not echoed.
    let secret =
        age::secrecy::ExposeSecret::expose_secret(&age::x25519::Identity::generate().to_string())
            .to_string();
    let text = format!("{MINIMAL}\n[encryption]\nrecipients = [\"{secret}\"]\n");
    let err = error_at(&text, "encryption.recipients[0]", "recipients");
    assert!(!err.contains(&secret[16..]), "{err}");
    assert!(err.contains("secret key"), "{err}");

    // Missing or empty recipients files are errors, not unencrypted backups.
    let text = format!(
        "{MINIMAL}\n[encryption]\nrecipients_file = \"{}\"\n",
        dir.path().join("nope.txt").display()
    );
    error_at(&text, "encryption.recipients_file", "recipients_file");
    std::fs::write(&file, "# nobody yet\n").unwrap();
    let text = format!(
        "{MINIMAL}\n[encryption]\nrecipients_file = \"{}\"\n",
        file.display()
    );
    let err = error_at(&text, "encryption.recipients_file", "recipients_file");
    assert!(err.contains("no recipient"), "{err}");
}

#[test]
fn an_identity_file_without_recipients_is_a_warning() {
    let text = format!("{MINIMAL}\n[encryption]\nidentity_file = \"/keys/id.txt\"\n");
    let c = parse(&text).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].message.contains("unencrypted"));
}

#[test]
fn restore_and_verify_fall_back_to_the_global_identity_file() {
    let text = format!(
        "{MINIMAL}\n[[restore_target]]\nnamespace = \"a\"\nurl = \"postgres://x@h/postgres\"\nidentity_file = \"/keys/a.txt\"\n\n[[restore_target]]\nnamespace = \"b\"\nurl = \"postgres://x@h/postgres\"\n"
    );
    let c = parse(&text).unwrap();
    assert_eq!(
        c.restore_identity_file(&c.restore_targets[0]),
        Some(Path::new("/keys/a.txt"))
    );
    assert_eq!(c.restore_identity_file(&c.restore_targets[1]), None);
    assert_eq!(c.verify_identity_file(), None);
    let text = format!("{text}\n[encryption]\nidentity_file = \"/keys/all.txt\"\n");
    let c = parse(&text).unwrap();
    assert_eq!(
        c.restore_identity_file(&c.restore_targets[1]),
        Some(Path::new("/keys/all.txt"))
    );
    assert_eq!(c.verify_identity_file(), Some(Path::new("/keys/all.txt")));
}
