//! The destination guard and the names restore gives to databases.
//!
//! Owns the rule that restore can never write to production: `--to` must match a
//! `[[restore_target]]`, and a destination on the same server as a configured `[[source]]`
//! is refused when that source selects (backs up) the destination database's name. "Same
//! server" compares resolved addresses (so `localhost` equals `127.0.0.1`; any two loopback
//! addresses, `127.0.0.1` and `::1`, count as one machine) and ports (5432 when omitted). A destination on a source's server whose name the source does not back up
//! is allowed: that database is not production as far as pgferry knows it.
//!
//! That address comparison is the first, offline layer; `identity` is the one that cannot be
//! fooled by another name (it compares `system_identifier`s over real connections). Here too:
//! `--to` must be an RFC 1123 label before it is matched or substituted into a URL, and
//! `template0`, `template1`, `postgres` are refused as destination names on every server.
//!
//! Also owns identifier quoting and the temporary / set-aside database names (≤ 63 bytes,
//! recognizable by their prefix so a later run can clean them). It connects to nothing.

use std::collections::HashSet;
use std::net::IpAddr;

use sha2::{Digest, Sha256};
use tokio_postgres::config::Host;

use crate::config::{Config, PgUrl, RestoreTargetConfig, SourceConfig};

/// PostgreSQL's default port, used when a URL names none.
const DEFAULT_PORT: u16 = 5432;

/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; longer names would silently
/// collide, so every name we build fits.
pub const MAX_IDENT_BYTES: usize = 63;

/// Prefix of temporary databases: `pgferry_tmp_<dest hash>_<snapshot id>`.
pub const TMP_PREFIX: &str = "pgferry_tmp_";

/// Prefix of an old destination set aside during the swap, dropped right after.
pub const OLD_PREFIX: &str = "pgferry_old_";

/// Hex digits of the destination-name hash in generated names: enough to keep destinations
/// apart on one server, short enough to leave room for the snapshot id.
const HASH_HEX: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("--to {namespace:?} matches no [[restore_target]]; configured namespaces: {configured}. Restore only writes to configured staging targets")]
    UnknownNamespace {
        namespace: String,
        configured: String,
    },
    #[error(
        "restore target {pattern:?} gives an invalid URL for namespace {namespace:?}: {reason}"
    )]
    BadUrl {
        pattern: String,
        namespace: String,
        reason: String,
    },
    #[error("refusing to restore into {database:?} on {host}:{port}: that server is source {source_name:?}, which backs up a database of that name. Restore never writes to production; point the [[restore_target]] at a staging server")]
    IsProduction {
        source_name: String,
        host: String,
        port: u16,
        database: String,
    },
    #[error("database name {name:?} is not usable: {reason}")]
    BadName { name: String, reason: String },
    #[error("--to {namespace:?} is not a namespace name: {reason}. A Kubernetes namespace is 1–63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit")]
    BadNamespace { namespace: String, reason: String },
    #[error("refusing to restore into {database:?}: it is a template database on that server (every database created afterwards would start from it). Choose another name with --as")]
    Template { database: String },
    #[error(transparent)]
    Identity(Box<super::identity::IdentityError>),
}

impl From<super::identity::IdentityError> for GuardError {
    fn from(e: super::identity::IdentityError) -> Self {
        GuardError::Identity(Box::new(e))
    }
}

impl GuardError {
    /// A usage or configuration problem (exit 2), as opposed to an operational failure.
    pub fn is_usage(&self) -> bool {
        match self {
            GuardError::Identity(e) => e.is_usage(),
            _ => true,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            GuardError::Identity(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Databases no restore may replace on any server: the templates every `CREATE DATABASE`
/// copies, and the maintenance database tools and operators connect to.
pub const RESERVED_DATABASES: &[&str] = &["template0", "template1", "postgres"];

/// Longest Kubernetes namespace name (an RFC 1123 label).
const MAX_NAMESPACE_BYTES: usize = 63;

/// Refuses anything but an RFC 1123 label, before `--to` is matched or substituted into a URL
/// (where `/`, `?`, `@`, `,` or `:` would change which server is reached).
pub fn check_namespace(namespace: &str) -> Result<(), GuardError> {
    let bad = |reason: &str| {
        Err(GuardError::BadNamespace {
            namespace: namespace.chars().take(80).collect(),
            reason: reason.into(),
        })
    };
    if namespace.is_empty() {
        return bad("it is empty");
    }
    if namespace.len() > MAX_NAMESPACE_BYTES {
        return bad("it is longer than 63 characters");
    }
    if !namespace
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("it holds a character other than a-z, 0-9 and '-'");
    }
    if namespace.starts_with('-') || namespace.ends_with('-') {
        return bad("it starts or ends with '-'");
    }
    Ok(())
}

/// Where a restore writes: a configured target, its server, and the database name.
#[derive(Debug, Clone)]
pub struct Destination {
    pub namespace: String,
    pub target: RestoreTargetConfig,
    /// Connects to the maintenance database of the destination server.
    pub url: PgUrl,
    /// The database that ends up holding the snapshot.
    pub database: String,
}

/// Resolves `--to` and `--as` into a [`Destination`] (no network access).
pub fn resolve(
    config: &Config,
    namespace: &str,
    database: &str,
) -> Result<Destination, GuardError> {
    check_namespace(namespace)?;
    let target = config
        .restore_targets
        .iter()
        .find(|r| r.namespace == namespace)
        .or_else(|| {
            config
                .restore_targets
                .iter()
                .find(|r| r.namespace_glob.matches(namespace))
        })
        .ok_or_else(|| GuardError::UnknownNamespace {
            namespace: namespace.into(),
            configured: if config.restore_targets.is_empty() {
                "(none)".into()
            } else {
                config
                    .restore_targets
                    .iter()
                    .map(|r| r.namespace.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?;
    let url = target
        .url_for(namespace)
        .map_err(|reason| GuardError::BadUrl {
            pattern: target.namespace.clone(),
            namespace: namespace.into(),
            reason,
        })?;
    check_name(database)?;
    Ok(Destination {
        namespace: namespace.into(),
        target: target.clone(),
        url,
        database: database.into(),
    })
}

/// Refuses names PostgreSQL would truncate or reject, and our own reserved prefixes.
fn check_name(name: &str) -> Result<(), GuardError> {
    let bad = |reason: &str| {
        Err(GuardError::BadName {
            name: name.into(),
            reason: reason.into(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_IDENT_BYTES {
        return bad("longer than 63 bytes");
    }
    if name.contains('\0') {
        return bad("contains a NUL byte");
    }
    if RESERVED_DATABASES.contains(&name) {
        return bad("template0, template1 and postgres are never replaced by a restore; choose another name with --as");
    }
    if name.starts_with(TMP_PREFIX) || name.starts_with(OLD_PREFIX) {
        return bad("pgferry_tmp_ and pgferry_old_ are reserved for restore's own databases");
    }
    Ok(())
}

/// A server endpoint: the addresses a host resolves to (or a socket directory) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub addrs: HashSet<IpAddr>,
    /// Unix socket directory, when the URL names one.
    pub socket_dir: Option<String>,
    pub port: u16,
}

impl Endpoint {
    /// Whether two endpoints reach the same server (a shared address, or the same socket).
    pub fn same_server(&self, other: &Endpoint) -> bool {
        if self.port != other.port {
            return false;
        }
        if self.host.eq_ignore_ascii_case(&other.host) {
            return true;
        }
        match (&self.socket_dir, &other.socket_dir) {
            (Some(a), Some(b)) => a.trim_end_matches('/') == b.trim_end_matches('/'),
            // A local socket and a loopback address are the same server when the ports agree.
            (Some(_), None) => other.addrs.iter().any(IpAddr::is_loopback),
            (None, Some(_)) => self.addrs.iter().any(IpAddr::is_loopback),
            // Two loopback addresses (127.0.0.1 and ::1) reach the same machine: a server
            // listening on `localhost` answers on both.
            (None, None) => {
                !self.addrs.is_disjoint(&other.addrs)
                    || (self.addrs.iter().any(IpAddr::is_loopback)
                        && other.addrs.iter().any(IpAddr::is_loopback))
            }
        }
    }
}

/// Resolves every host of `url` (names through DNS, as libpq would; a `hostaddr` entry is
/// the address libpq connects to for the host at the same position).
pub async fn endpoints(url: &PgUrl, what: &str) -> Vec<Endpoint> {
    let cfg = &url.parsed;
    let ports = cfg.get_ports();
    let port_of = |i: usize| {
        ports
            .get(i)
            .or(ports.first().filter(|_| ports.len() == 1))
            .copied()
            .unwrap_or(DEFAULT_PORT)
    };
    let hostaddrs = cfg.get_hostaddrs();
    if cfg.get_hosts().is_empty() {
        return vec![Endpoint {
            host: "localhost".into(),
            addrs: HashSet::new(),
            socket_dir: Some("/var/run/postgresql".into()),
            port: port_of(0),
        }];
    }
    let mut out = Vec::new();
    for (i, host) in cfg.get_hosts().iter().enumerate() {
        let port = port_of(i);
        out.push(match host {
            Host::Unix(p) => Endpoint {
                host: p.display().to_string(),
                addrs: HashSet::new(),
                socket_dir: Some(p.display().to_string()),
                port,
            },
            Host::Tcp(h) => {
                let bare = h.trim_start_matches('[').trim_end_matches(']');
                let addrs: HashSet<IpAddr> = if let Some(a) = hostaddrs.get(i) {
                    [*a].into()
                } else {
                    match bare.parse::<IpAddr>() {
                        Ok(ip) => [ip].into(),
                        // A name that does not resolve here (a staging cluster cannot resolve
                        // production's) is compared by name; `identity` compares the servers.
                        Err(_) => match tokio::net::lookup_host((bare, port)).await {
                            Ok(found) => found.map(|a| a.ip()).collect(),
                            Err(error) => {
                                tracing::debug!(message = "Host does not resolve; comparing by name.", what = %what, host = %h, error = %error);
                                HashSet::new()
                            }
                        },
                    }
                };
                Endpoint {
                    host: h.clone(),
                    addrs,
                    socket_dir: None,
                    port,
                }
            }
        });
    }
    out
}

/// The first endpoint of `url` (see [`endpoints`]).
pub async fn endpoint(url: &PgUrl, what: &str) -> Endpoint {
    endpoints(url, what)
        .await
        .into_iter()
        .next()
        .expect("endpoints returns at least one")
}

/// The pure part of the offline guard: refuses `dest` when any of its endpoints is on the
/// server of a source that selects the destination database. `sources` pairs each source with
/// its endpoints.
pub fn check_not_production(
    dest: &[Endpoint],
    database: &str,
    sources: &[(&SourceConfig, Vec<Endpoint>)],
) -> Result<(), GuardError> {
    for (source, eps) in sources {
        let source_own_db = source.url.parsed.get_dbname().unwrap_or("postgres");
        for d in dest {
            if eps.iter().any(|ep| d.same_server(ep))
                && (source.selects(database) || database == source_own_db)
            {
                return Err(GuardError::IsProduction {
                    source_name: source.name.clone(),
                    host: d.host.clone(),
                    port: d.port,
                    database: database.into(),
                });
            }
        }
    }
    Ok(())
}

/// Resolves every source and the destination, then applies [`check_not_production`].
pub async fn check_destination(config: &Config, dest: &Destination) -> Result<(), GuardError> {
    let dest_eps = endpoints(&dest.url, &format!("restore target {:?}", dest.namespace)).await;
    let mut sources = Vec::new();
    for s in &config.sources {
        let eps = endpoints(&s.url, &format!("source {:?}", s.name)).await;
        sources.push((s, eps));
    }
    check_not_production(&dest_eps, &dest.database, &sources)
}

/// `"name"` with embedded quotes doubled: safe for any name, spaces and non-ASCII included.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A SQL string literal; backslashes are escaped with the `E''` form so the result means
/// the same whatever `standard_conforming_strings` says.
pub fn quote_literal(text: &str) -> String {
    let doubled = text.replace('\'', "''");
    if doubled.contains('\\') {
        format!("E'{}'", doubled.replace('\\', "\\\\"))
    } else {
        format!("'{doubled}'")
    }
}

/// Short hex hash of a destination name: names never carry the destination's own bytes.
pub fn dest_hash(database: &str) -> String {
    let digest = Sha256::digest(database.as_bytes());
    hex::encode(digest)[..HASH_HEX].to_string()
}

/// The temporary database a restore of `snapshot_id` into `database` loads into.
pub fn tmp_name(database: &str, snapshot_id: &str) -> String {
    let id: String = snapshot_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase();
    truncate(format!("{TMP_PREFIX}{}_{id}", dest_hash(database)))
}

/// The `LIKE` pattern matching every temporary database of `database`.
pub fn tmp_like(database: &str) -> String {
    format!(
        "{}\\_%",
        like_escape(&format!("{TMP_PREFIX}{}", dest_hash(database)))
    )
}

/// The `LIKE` pattern matching every set-aside old copy of `database`.
pub fn old_like(database: &str) -> String {
    format!(
        "{}\\_%",
        like_escape(&format!("{OLD_PREFIX}{}", dest_hash(database)))
    )
}

/// The name the old destination gets during the swap (dropped right after).
pub fn old_name(database: &str, stamp: &str) -> String {
    truncate(format!("{OLD_PREFIX}{}_{stamp}", dest_hash(database)))
}

/// The dated name `--keep-old` keeps the previous destination under: `<name>_pre_<stamp>`,
/// the name shortened (on a character boundary) so the whole fits in 63 bytes.
pub fn kept_name(database: &str, stamp: &str) -> String {
    let suffix = format!("_pre_{stamp}");
    let room = MAX_IDENT_BYTES.saturating_sub(suffix.len());
    let mut head = String::new();
    for c in database.chars() {
        if head.len() + c.len_utf8() > room {
            break;
        }
        head.push(c);
    }
    format!("{head}{suffix}")
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

fn truncate(mut s: String) -> String {
    // Generated names are ASCII, so any byte index is a character boundary.
    s.truncate(MAX_IDENT_BYTES);
    s
}

/// The advisory-lock key of a destination (with a fixed class id, see `swap`).
pub fn lock_key(database: &str) -> i32 {
    let d = Sha256::digest(database.as_bytes());
    i32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, ips: &[&str], port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            addrs: ips.iter().map(|i| i.parse().unwrap()).collect(),
            socket_dir: None,
            port,
        }
    }

    fn source(url: &str, dbs: &[&str], exclude: &[&str]) -> SourceConfig {
        let toml = format!(
            "[[source]]\nname = \"prod\"\nurl = \"{url}\"\ndatabases = {dbs:?}\nexclude = {exclude:?}\n[[target]]\nname = \"t\"\nurl = \"file:///tmp/pgferry-guard-test\"\n"
        );
        let c = Config::from_str_at(&toml, std::path::Path::new("/tmp/x.toml")).unwrap();
        c.sources[0].clone()
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("acme"), "\"acme\"");
        assert_eq!(quote_ident("a \"b\" é"), "\"a \"\"b\"\" é\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
    }

    #[test]
    fn names_fit_and_are_recognizable() {
        let long = "é".repeat(40); // 80 bytes
        let tmp = tmp_name(&long, "20261127T090000Z");
        assert!(tmp.len() <= MAX_IDENT_BYTES);
        assert!(tmp.starts_with(TMP_PREFIX));
        assert_eq!(tmp, tmp_name(&long, "20261127T090000Z"));
        assert_ne!(tmp_name("a", "x"), tmp_name("b", "x"));
        assert!(tmp.ends_with("_20261127t090000z"), "{tmp}");
        let kept = kept_name(&long, "20261127T093000Z");
        assert!(kept.len() <= MAX_IDENT_BYTES, "{}", kept.len());
        assert!(kept.ends_with("_pre_20261127T093000Z"));
        assert!(kept.starts_with('é'));
        assert_eq!(kept_name("acme", "S"), "acme_pre_S");
        assert!(old_name("acme", "20261127T093000Z").starts_with(OLD_PREFIX));
        // The LIKE pattern escapes the underscores of the prefix.
        assert!(tmp_like("acme").starts_with("pgferry\\_tmp\\_"));
        assert!(tmp_like("acme").ends_with("\\_%"));
    }

    #[test]
    fn reserved_and_oversized_names_are_refused() {
        assert!(check_name("acme").is_ok());
        assert!(check_name("a b \"c\" é").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
        assert!(check_name("pgferry_tmp_x").is_err());
    }

    #[test]
    fn same_server_rules() {
        let a = ep("localhost", &["127.0.0.1", "::1"], 5432);
        assert!(a.same_server(&ep("127.0.0.1", &["127.0.0.1"], 5432)));
        assert!(!a.same_server(&ep("127.0.0.1", &["127.0.0.1"], 5433)));
        assert!(!a.same_server(&ep("staging", &["10.0.0.7"], 5432)));
        let sock = Endpoint {
            host: "/run/postgresql".into(),
            addrs: HashSet::new(),
            socket_dir: Some("/run/postgresql/".into()),
            port: 5432,
        };
        assert!(sock.same_server(&a));
        // IPv4 and IPv6 loopback: one machine.
        let v4 = ep("127.0.0.1", &["127.0.0.1"], 5432);
        assert!(v4.same_server(&ep("::1", &["::1"], 5432)));
        // A source that did not resolve still matches by name.
        let unresolved = Endpoint {
            host: "pg.prod.svc".into(),
            addrs: HashSet::new(),
            socket_dir: None,
            port: 5432,
        };
        assert!(unresolved.same_server(&ep("PG.prod.svc", &["10.0.0.9"], 5432)));
        assert!(!unresolved.same_server(&ep("pg.staging.svc", &["10.0.0.9"], 5432)));
    }

    #[test]
    fn production_is_refused_only_for_databases_the_source_backs_up() {
        let s = source(
            "postgres://pgferry@127.0.0.1:5432/postgres",
            &["*"],
            &["staging_*", "template*"],
        );
        let prod = ep("127.0.0.1", &["127.0.0.1"], 5432);
        let srcs = vec![(&s, vec![prod.clone()])];
        let dest = [ep("localhost", &["127.0.0.1", "::1"], 5432)];
        let err = check_not_production(&dest, "acme", &srcs).unwrap_err();
        assert!(matches!(err, GuardError::IsProduction { .. }));
        assert!(err.to_string().contains("never writes to production"));
        // The source's own maintenance database is production too.
        assert!(check_not_production(&dest, "odoo_main", &[(&s, vec![])]).is_ok());
        // Excluded by the source: not production.
        assert!(check_not_production(&dest, "staging_acme", &srcs).is_ok());
        // Another server: fine whatever the name.
        let other = [ep("staging", &["10.1.2.3"], 5432)];
        assert!(check_not_production(&other, "acme", &srcs).is_ok());
    }

    /// Every spelling of the production server is refused: the host as a name or an
    /// address (v4 or v6 loopback, any case), the default port written or omitted, other
    /// users, schemes, maintenance databases, trailing options, and libpq's key/value form.
    /// Another port is another server.
    #[tokio::test]
    async fn production_is_refused_however_its_url_is_spelled() {
        let refused = [
            "postgres://odoo@localhost/postgres",
            "postgres://odoo@LocalHost:5432/postgres",
            "postgres://odoo:pw@127.0.0.1/template1",
            "postgresql://other@127.0.0.1:5432/postgres?sslmode=disable&application_name=x",
            "postgres://odoo@[::1]:5432/postgres",
            "postgres://odoo@staging.invalid:5433,127.0.0.1:5432/postgres",
            "host=staging.invalid hostaddr=127.0.0.1 port=5432 user=odoo",
            "postgres://odoo@localhost:5432/postgres?connect_timeout=5",
            "host=localhost port=5432 user=odoo dbname=postgres",
            "host=127.0.0.1 user=odoo",
        ];
        let allowed = [
            "postgres://odoo@localhost:5433/postgres",
            "postgres://odoo@127.0.0.1:15432/postgres",
        ];
        for source_url in [
            "postgres://pgferry@127.0.0.1:5432/postgres",
            "postgres://pgferry@localhost/postgres?sslmode=prefer",
            "postgresql://pgferry:secret@[::1]/postgres",
        ] {
            let mut toml = format!(
                "[[source]]\nname = \"prod\"\nurl = \"{source_url}\"\ndatabases = [\"acme\"]\n[[target]]\nname = \"t\"\nurl = \"file:///tmp/pgferry-guard-test\"\n"
            );
            for (i, url) in refused.iter().chain(allowed.iter()).enumerate() {
                toml.push_str(&format!(
                    "[[restore_target]]\nnamespace = \"ns{i}\"\nurl = \"{url}\"\nowner = \"odoo\"\n"
                ));
            }
            let config = Config::from_str_at(&toml, std::path::Path::new("/tmp/x.toml")).unwrap();
            for (i, url) in refused.iter().chain(allowed.iter()).enumerate() {
                let dest = resolve(&config, &format!("ns{i}"), "acme").unwrap();
                let checked = check_destination(&config, &dest).await;
                if i < refused.len() {
                    assert!(
                        matches!(checked, Err(GuardError::IsProduction { .. })),
                        "source {source_url}: {url} was not refused: {checked:?}"
                    );
                } else {
                    assert!(
                        checked.is_ok(),
                        "source {source_url}: {url} was refused: {checked:?}"
                    );
                }
                // A database the source does not back up is not production, on any spelling.
                let other = resolve(&config, &format!("ns{i}"), "acme_staging").unwrap();
                assert!(check_destination(&config, &other).await.is_ok(), "{url}");
            }
        }
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback() {
        let url = PgUrl::parse("postgres://u@localhost/postgres").unwrap();
        let e = endpoint(&url, "test").await;
        assert_eq!(e.port, DEFAULT_PORT);
        assert!(e.addrs.iter().any(IpAddr::is_loopback), "{e:?}");
        let ip = PgUrl::parse("postgres://u@127.0.0.1:5432/postgres").unwrap();
        assert!(e.same_server(&endpoint(&ip, "test").await));
    }
}
