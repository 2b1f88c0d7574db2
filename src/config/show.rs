//! What `pgferry config check` prints: the effective configuration as TOML, secrets redacted.

use super::{redact_url, Config, TargetKind};

pub(super) fn render(config: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let q = |v: &str| toml::Value::String(v.to_string()).to_string();
    let list = |v: &[String]| {
        toml::Value::Array(v.iter().map(|x| toml::Value::String(x.clone())).collect()).to_string()
    };
    let d = &config.daemon;
    let _ = writeln!(s, "# effective configuration of {}", config.path.display());
    let _ = writeln!(s, "[daemon]");
    let _ = writeln!(s, "listen = {}", q(&d.listen.to_string()));
    let _ = writeln!(
        s,
        "api_token_file = {}",
        q(&d.api_token_file.display().to_string())
    );
    let _ = writeln!(s, "max_concurrent_backups = {}", d.max_concurrent_backups);
    let _ = writeln!(
        s,
        "shutdown_grace = {}",
        q(&format!("{}s", d.shutdown_grace.as_secs_f64()))
    );
    let p = &config.pipeline;
    let _ = writeln!(s, "\n[pipeline]");
    let _ = writeln!(s, "zstd_level = {}", p.zstd_level);
    let _ = writeln!(s, "zstd_workers = {}", p.zstd_workers);
    let _ = writeln!(s, "min_targets = {}", p.min_targets);
    let _ = writeln!(
        s,
        "stall_timeout = {}",
        q(&format!("{}s", p.stall_timeout.as_secs_f64()))
    );
    let _ = writeln!(
        s,
        "orphan_grace = {}",
        q(&format!("{}s", p.orphan_grace.as_secs_f64()))
    );
    for src in &config.sources {
        let pats = |v: &[glob::Pattern]| {
            list(&v.iter().map(|p| p.as_str().to_string()).collect::<Vec<_>>())
        };
        let r = &src.retention;
        let _ = writeln!(s, "\n[[source]]");
        let _ = writeln!(s, "name = {}", q(&src.name));
        let _ = writeln!(s, "url = {}", q(&src.url.redacted()));
        let _ = writeln!(s, "databases = {}", pats(&src.databases));
        let _ = writeln!(s, "exclude = {}", pats(&src.exclude));
        let _ = writeln!(s, "schedule = {}", q(src.schedule.expr()));
        let _ = writeln!(
            s,
            "retention = {{ keep_last = {}, hourly = {}, daily = {}, weekly = {}, monthly = {} }}",
            r.keep_last, r.hourly, r.daily, r.weekly, r.monthly
        );
        if let Some(dir) = &src.pg_bin_dir {
            let _ = writeln!(s, "pg_bin_dir = {}", q(&dir.display().to_string()));
        }
    }
    for t in &config.targets {
        let _ = writeln!(s, "\n[[target]]");
        let _ = writeln!(s, "name = {}", q(&t.name));
        let _ = writeln!(s, "url = {}", q(&t.url));
        if let TargetKind::S3 {
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            ca_file,
            ..
        } = &t.kind
        {
            if let Some(e) = endpoint {
                let _ = writeln!(s, "endpoint = {}", q(e));
            }
            if let Some(f) = ca_file {
                let _ = writeln!(s, "ca_file = {}", q(&f.display().to_string()));
            }
            let _ = writeln!(s, "region = {}", q(region));
            if access_key_id.is_some() {
                let _ = writeln!(s, "access_key_id = \"<redacted>\"");
            }
            if secret_access_key.is_some() {
                let _ = writeln!(s, "secret_access_key = \"<redacted>\"");
            }
        }
        let _ = writeln!(s, "max_parts = {}", t.max_parts);
    }
    for r in &config.restore_targets {
        let _ = writeln!(s, "\n[[restore_target]]");
        let _ = writeln!(s, "namespace = {}", q(&r.namespace));
        let _ = writeln!(s, "url = {}", q(&redact_url(r.url.expose())));
        let _ = writeln!(s, "owner = {}", q(&r.owner));
        let hooks: Vec<String> = r.hooks.iter().map(|h| h.display().to_string()).collect();
        let _ = writeln!(s, "hooks = {}", list(&hooks));
    }
    let _ = writeln!(s, "\n[restore]");
    let _ = writeln!(
        s,
        "spool_dir = {}",
        q(&config.restore.spool_dir.display().to_string())
    );
    let v = &config.verify;
    let _ = writeln!(s, "\n[verify]");
    let _ = writeln!(s, "url = {}", q(&v.url.redacted()));
    let _ = writeln!(s, "checks = {}", list(&v.checks));
    if let Some(sched) = &v.schedule {
        let _ = writeln!(s, "schedule = {}", q(sched.expr()));
    }
    s
}
