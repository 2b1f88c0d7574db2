//! Generated-inputs tests of the connection-string parser: every spelling × passwords with
//! the characters that broke pattern-based redaction.

use super::*;
use crate::config::PgUrl;

/// Every password holds this marker, so a leak is found by a plain substring search.
const MARK: &str = "S3kr1t";

fn passwords() -> Vec<String> {
    [
        "",
        "@",
        "a@b",
        "/",
        "?",
        "#",
        "&x=1",
        "a b",
        "q'uote",
        "back\\slash",
        "per%cent",
        "%41",
        "ünï",
        "a,b:c",
        "[::1]",
        "=",
        "${NOPE}",
        "tab\there",
        "pass word=x host=evil",
    ]
    .iter()
    .map(|s| format!("{MARK}{s}{MARK}"))
    .collect()
}

fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A key/value value as an operator writes it: quoted, and `$` doubled (a literal `$`).
fn kv_quote(s: &str) -> String {
    let s = s.replace('$', "$$");
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// (spelling, expected hosts) for one password; `${PW}` spellings take it from the lookup.
fn spellings(pw: &str) -> Vec<(String, Vec<&'static str>)> {
    let e = pct(pw);
    let q = kv_quote(pw);
    vec![
        (
            format!("postgres://u:{e}@127.0.0.1:5432/db"),
            vec!["127.0.0.1"],
        ),
        (
            format!("postgresql://u:{e}@127.0.0.1:5432,127.0.0.1:5499/postgres"),
            vec!["127.0.0.1", "127.0.0.1"],
        ),
        (
            format!("postgres://u:{e}@[::1]:5432,db.example:6432/x?sslmode=disable"),
            vec!["::1", "db.example"],
        ),
        (
            format!("postgres://u@h1,h2/db?password={e}&application_name=a"),
            vec!["h1", "h2"],
        ),
        (
            format!("postgres://u@h/db?hostaddr=10.0.0.1&password={e}"),
            vec!["h"],
        ),
        (
            format!("host=h1,h2 port=5432,5433 user=u password={q} dbname=d"),
            vec!["h1", "h2"],
        ),
        (format!("host = h  password = {q}  user = u"), vec!["h"]),
        (format!("password={q} host='h'"), vec!["h"]),
        (
            "postgres://u:${PW}@127.0.0.1:5432,127.0.0.2/db".to_string(),
            vec!["127.0.0.1", "127.0.0.2"],
        ),
        ("postgres://u@h/db?password=${PW}".to_string(), vec!["h"]),
        ("host=h password=${PW}".to_string(), vec!["h"]),
        ("host=h password='${PW}'".to_string(), vec!["h"]),
    ]
}

#[test]
fn every_spelling_reads_the_password_and_never_shows_it() {
    for pw in passwords() {
        let lookup = |name: &str| (name == "PW").then(|| pw.clone());
        for (raw, hosts) in spellings(&pw) {
            let info = ConnInfo::parse(&raw, &lookup)
                .unwrap_or_else(|e| panic!("{}: {e}", raw.replace(MARK, "*")));
            assert_eq!(
                info.get("password"),
                Some(pw.as_str()),
                "{}",
                raw.replace(MARK, "*")
            );
            assert_eq!(info.hosts(), hosts, "{}", raw.replace(MARK, "*"));
            for shown in [
                info.redacted(),
                format!("{info}"),
                format!("{info:?}"),
                redact(&raw),
            ] {
                assert!(!shown.contains(MARK), "leak: {shown}");
                assert!(shown.contains(REDACTED), "{shown}");
            }
            // The redacted form parses again to the same non-secret parameters.
            let again = ConnInfo::parse(&info.redacted(), &|_| None).unwrap();
            let public = |i: &ConnInfo| -> Vec<(String, String)> {
                i.params()
                    .iter()
                    .filter(|(k, _)| k != "password")
                    .cloned()
                    .collect()
            };
            assert_eq!(public(&again), public(&info), "{}", info.redacted());
            // One parse connects and redacts: tokio-postgres gets exactly the same password
            // and every host.
            let url = PgUrl::parse_with(&raw, &lookup).unwrap();
            assert_eq!(url.parsed.get_password(), Some(pw.as_bytes()));
            assert_eq!(url.parsed.get_hosts().len(), hosts.len());
            for shown in [url.redacted(), format!("{url}"), format!("{url:?}")] {
                assert!(!shown.contains(MARK), "leak: {shown}");
            }
        }
    }
}

#[test]
fn broken_strings_never_echo_a_value() {
    let broken = [
        format!("host=h {MARK}"),
        format!("host=h password='{MARK}"),
        format!("postgres://u:{MARK}%zz@h/db"),
        format!("postgres://u:{MARK}${{bad-name}}@h/db"),
        format!("postgres://u:{MARK}@h/db?{MARK}"),
        format!("postgres://u:{MARK}@[::1/db"),
        format!("host=h password={MARK} password=x"),
        format!("postgres://u:{MARK}@h/db?password=${{MISSING}}"),
    ];
    for raw in &broken[..broken.len() - 1] {
        assert_eq!(redact(raw), UNPARSEABLE);
    }
    for raw in &broken {
        let err = ConnInfo::parse(raw, &|_| None).unwrap_err();
        assert!(!err.to_string().contains(MARK), "{err}");
        assert!(!redact(raw).contains(MARK), "{}", redact(raw));
        let err = PgUrl::parse_with(raw, &|_| None).unwrap_err();
        assert!(!err.contains(MARK), "{err}");
    }
    // tokio-postgres' own complaints name the option only.
    let err =
        PgUrl::parse_with(&format!("host=h port={MARK} password={MARK}"), &|_| None).unwrap_err();
    assert!(!err.contains(MARK), "{err}");
}

#[test]
fn variables_expand_into_their_part_only() {
    // A raw `@` or `/` in a variable's value stays in the password.
    let lookup = |n: &str| (n == "PW").then(|| "a@b/c?d#e".to_string());
    let info = ConnInfo::parse("postgres://u:${PW}@db.svc:5432/postgres", &lookup).unwrap();
    assert_eq!(info.get("password"), Some("a@b/c?d#e"));
    assert_eq!(info.hosts(), vec!["db.svc"]);
    assert_eq!(info.get("dbname"), Some("postgres"));
    // `$$` is a literal dollar; a percent-encoded `${` is not a reference.
    let info = ConnInfo::parse("postgres://u:a$$b%24%7BPW%7D@h/d", &lookup).unwrap();
    assert_eq!(info.get("password"), Some("a$b${PW}"));
    // A missing variable names itself and its part.
    let err = ConnInfo::parse("host=h password=${NOPE}", &|_| None).unwrap_err();
    assert_eq!(
        err,
        ConnInfoError::MissingVar {
            part: "the password",
            name: "NOPE".into()
        }
    );
    // Redacting a template keeps the reference and the `{namespace}` placeholder readable.
    assert_eq!(
        redact("postgres://odoo:${PW}@pg.{namespace}.svc:5432/postgres"),
        "postgres://odoo:<redacted>@pg.{namespace}.svc:5432/postgres"
    );
}

#[test]
fn hostaddr_and_sockets() {
    let info = ConnInfo::parse("host=db.prod hostaddr=10.1.2.3,10.1.2.4 port=5432", &|_| {
        None
    })
    .unwrap();
    assert_eq!(info.hostaddrs(), vec!["10.1.2.3", "10.1.2.4"]);
    let url = PgUrl::parse_with("postgres://u@%2Frun%2Fpostgresql:5433/db", &|_| None).unwrap();
    assert!(matches!(
        url.parsed.get_hosts()[0],
        tokio_postgres::config::Host::Unix(_)
    ));
    let url = PgUrl::parse_with("postgres://u@h/db?hostaddr=127.0.0.1", &|_| None).unwrap();
    assert_eq!(url.parsed.get_hostaddrs().len(), 1);
}

/// `config check`'s output, the config's Debug and its load errors never show a password,
/// in any spelling, for sources, restore targets and the verify server alike.
#[test]
fn config_check_output_never_shows_a_password() {
    let path = std::path::Path::new("/etc/pgferry/pgferry.toml");
    for pw in passwords() {
        let var = "PGFERRY_CONNINFO_TEST_PW";
        // Edition 2021: set_var is safe; a name no other test reads.
        std::env::set_var(var, &pw);
        for (raw, _) in spellings(&pw) {
            let raw = raw.replace("${PW}", &format!("${{{var}}}"));
            let restore = raw.replace("127.0.0.1", "pg.{namespace}.svc");
            let toml = format!(
                "[[source]]\nname = \"prod\"\nurl = {raw:?}\n[[target]]\nname = \"t\"\nurl = \"file:///tmp/x\"\n\
                 [[restore_target]]\nnamespace = \"staging-*\"\nurl = {restore:?}\n[verify]\nurl = {raw:?}\n"
            );
            let c = crate::config::Config::from_str_at(&toml, path)
                .unwrap_or_else(|e| panic!("{}", e.to_string().replace(MARK, "*")));
            for shown in [c.redacted_toml(), format!("{c:?}")] {
                assert!(!shown.contains(MARK), "leak:\n{shown}");
            }
            // A broken URL's error names the key, not the value.
            let broken = toml.replace(
                &format!("url = {raw:?}"),
                &format!("url = {:?}", format!("{raw} {MARK}")),
            );
            if let Err(e) = crate::config::Config::from_str_at(&broken, path) {
                assert!(!e.to_string().contains(MARK), "{e}");
            }
        }
    }
}
