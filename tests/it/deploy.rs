//! Deploying pgferry: the image recipe, the Kubernetes manifests, the alert rules and the
//! Grafana dashboard under docker/, checked offline by the real tools (kubernetes-validate,
//! the Prometheus Operator's schemas, promtool) and against pgferry's own code (metric names,
//! pg tool lookup, config). Building the image needs a Docker engine, which these machines
//! do not have; what the image must provide is checked in its recipe instead.

mod manifests;
mod promql;
mod scrape;
mod tools;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use tools::{repo, run, yaml_doc, yaml_docs};

/// The Kubernetes releases the manifests are validated against: an older one still in
/// common use (every field used must exist there) and kubernetes-validate's newest.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

fn k8s_dir() -> PathBuf {
    repo().join("docker/k8s")
}

/// Every manifest file: docker/k8s/*.yaml and docker/k8s/jobs/*.yaml, kustomization excluded.
fn manifest_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in [k8s_dir(), k8s_dir().join("jobs")] {
        for entry in std::fs::read_dir(&dir).expect("docker/k8s exists") {
            let path = entry.expect("readable dir entry").path();
            let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if yaml && path.file_name().is_some_and(|n| n != "kustomization.yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 8, "too few manifests found: {files:?}");
    files
}

fn is_operator_resource(doc: &Value) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
}

#[test]
fn manifests_validate_against_the_kubernetes_api_schemas() {
    let validator = tools::kubernetes_validate();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut expected = 0;
    for file in manifest_files() {
        for (i, mut doc) in yaml_docs(&file).into_iter().enumerate() {
            if is_operator_resource(&doc) {
                continue; // no schema in kubernetes-validate: see the next test
            }
            // kubernetes-validate needs a name; the restore Job has a generateName.
            if doc["metadata"]["name"].is_null() {
                let generated = format!("{}x", doc["metadata"]["generateName"].as_str().unwrap());
                doc["metadata"]["name"] = Value::String(generated);
            }
            let stem = file.file_stem().unwrap().to_string_lossy();
            let out = dir.path().join(format!("{stem}-{i}.json"));
            std::fs::write(&out, serde_json::to_vec(&doc).unwrap()).unwrap();
            expected += 1;
        }
    }
    let files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for version in KUBERNETES_VERSIONS {
        let (ok, out) = run(
            Command::new(&validator)
                .args(["--kubernetes-version", version, "--strict"])
                .args(&files),
            None,
        );
        let passed = out.lines().filter(|l| l.contains(" passed ")).count();
        assert!(
            ok && passed == expected && !out.contains("WARN") && !out.contains("ERROR"),
            "kubernetes-validate --strict against {version}: {passed} of {expected} passed:\n{out}"
        );
    }
}

#[test]
fn monitoring_resources_validate_against_the_prometheus_operator_schemas() {
    let modules = tools::operator_schemas();
    let docs: Vec<Value> = manifest_files()
        .iter()
        .flat_map(|f| yaml_docs(f))
        .filter(is_operator_resource)
        .collect();
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["PrometheusRule", "ServiceMonitor"]));
    let script = repo().join("tests/it/deploy/validate-crds.mjs");
    let input = serde_json::to_vec(&docs).unwrap();
    let (ok, out) = run(
        Command::new(tools::node()).arg(&script).arg(&modules),
        Some(&input),
    );
    assert!(ok, "Prometheus Operator schema validation failed:\n{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("OK ")).count(),
        docs.len(),
        "{out}"
    );
}

#[test]
fn kustomization_lists_every_manifest_but_the_restore_job() {
    let k = yaml_doc(&k8s_dir().join("kustomization.yaml"));
    assert_eq!(k["namespace"], "pgferry");
    let listed: BTreeSet<PathBuf> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| k8s_dir().join(r.as_str().unwrap()))
        .collect();
    let restore_job = k8s_dir().join("jobs/restore-job.yaml");
    let on_disk: BTreeSet<PathBuf> = manifest_files()
        .into_iter()
        .filter(|f| *f != restore_job)
        .collect();
    assert_eq!(listed, on_disk, "kustomization.yaml resources vs files");
    // Applying the kustomization must never start a restore.
    assert!(!listed.contains(&restore_job));
    for doc in on_disk.iter().flat_map(|f| yaml_docs(f)) {
        let kind = doc["kind"].as_str().unwrap_or_default();
        assert_ne!(
            kind, "Job",
            "a Job in the kustomization would run on every apply"
        );
    }
}

fn rules_file() -> PathBuf {
    repo().join("docker/alerts/pgferry-rules.yaml")
}

#[test]
fn prometheusrule_embeds_the_plain_rules_file() {
    let plain = yaml_doc(&rules_file());
    let cr = yaml_doc(&k8s_dir().join("prometheusrule.yaml"));
    assert_eq!(cr["kind"], "PrometheusRule");
    assert_eq!(
        cr["spec"]["groups"], plain["groups"],
        "docker/k8s/prometheusrule.yaml spec.groups must equal docker/alerts/pgferry-rules.yaml groups"
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = tools::promtool();
    let (ok, out) = run(
        Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(rules_file()),
        None,
    );
    assert!(
        ok && out.contains("SUCCESS"),
        "promtool check rules:\n{out}"
    );
    let tests = repo().join("docker/alerts/pgferry-rules.test.yaml");
    let (ok, out) = run(
        Command::new(&promtool)
            .current_dir(repo().join("docker/alerts"))
            .args(["test", "rules"])
            .arg(&tests),
        None,
    );
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
}

fn alert_rules() -> Vec<Value> {
    let plain = yaml_doc(&rules_file());
    plain["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// GitHub-style anchors of the runbook's headings.
fn runbook_anchors() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("docs/runbook.md")).expect("docs/runbook.md");
    text.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_alert_is_explained_tested_both_ways_and_linked_to_its_runbook_section() {
    let anchors = runbook_anchors();
    let tests = yaml_doc(&repo().join("docker/alerts/pgferry-rules.test.yaml"));
    let evals: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    let rules = alert_rules();
    assert!(
        rules.len() >= 5,
        "backup, failures, target, verify and down alerts"
    );
    for rule in rules {
        let name = rule["alert"].as_str().expect("only alerting rules");
        let notes = &rule["annotations"];
        for key in ["summary", "description"] {
            assert!(
                notes[key].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: {key}"
            );
        }
        let url = notes["runbook_url"].as_str().unwrap_or_default();
        let anchor = url.rsplit_once("docs/runbook.md#").map(|(_, a)| a);
        assert!(
            anchor.is_some_and(|a| a == name.to_lowercase() && anchors.contains(a)),
            "{name}: runbook_url {url:?} must point at the `{name}` section of docs/runbook.md"
        );
        let mine = || evals.iter().filter(|e| e["alertname"] == name);
        assert!(
            mine().any(|e| e["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())),
            "{name}: no unit test where it fires"
        );
        assert!(
            mine().any(|e| e["exp_alerts"].as_array().is_some_and(|a| a.is_empty())),
            "{name}: no unit test where it stays quiet"
        );
        assert!(
            ["critical", "warning"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity"
        );
    }
}

fn exported_metrics() -> BTreeSet<String> {
    let source = std::fs::read_to_string(repo().join("src/metrics/mod.rs")).unwrap();
    let names = promql::exported_metrics(&source);
    assert!(names.contains("pgferry_backup_last_success_timestamp_seconds"));
    assert!(names.contains("pgferry_backup_duration_seconds_bucket"));
    names
}

fn check_names(expr: &str, allowed: &BTreeSet<String>, what: &str) -> BTreeSet<String> {
    let names = promql::metric_names(expr);
    assert!(!names.is_empty(), "{what}: no metric in {expr:?}");
    let unknown: Vec<_> = names.difference(allowed).collect();
    assert!(
        unknown.is_empty(),
        "{what}: {unknown:?} is not exported by pgferry (src/metrics.rs): {expr}"
    );
    names
}

#[test]
fn dashboard_is_grafana_json_whose_queries_name_only_exported_metrics() {
    let path = repo().join("docker/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(dash["uid"].is_string() && dash["title"].is_string());
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "the data source is a variable"
    );
    let exported = exported_metrics();
    let mut used = BTreeSet::new();
    for var in vars.iter().filter(|v| v["type"] == "query") {
        // label_values(<selector>, <label>): the selector names a metric.
        let query = var["query"]["query"].as_str().unwrap();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','));
        let (selector, _label) =
            inner.unwrap_or_else(|| panic!("unexpected variable query {query}"));
        used.extend(check_names(selector, &exported, "variable"));
    }
    let mut ids = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        assert!(panel["gridPos"]["w"].is_u64());
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap();
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            used.extend(check_names(t["expr"].as_str().unwrap(), &exported, title));
        }
    }
    for wanted in [
        "pgferry_backup_last_success_timestamp_seconds",
        "pgferry_backup_duration_seconds_sum",
        "pgferry_backup_stored_bytes",
        "pgferry_backup_raw_bytes",
        "pgferry_target_uploaded_bytes_total",
        "pgferry_target_uploads_total",
        "pgferry_verify_last_success_timestamp_seconds",
        "pgferry_verify_overdue_databases",
        "pgferry_backup_running",
    ] {
        assert!(
            used.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
}

#[test]
fn alert_rules_name_only_exported_metrics() {
    let mut allowed = exported_metrics();
    allowed.insert("up".into()); // Prometheus' own, for the daemon-down alerts
    for rule in alert_rules() {
        check_names(
            rule["expr"].as_str().unwrap(),
            &allowed,
            rule["alert"].as_str().unwrap(),
        );
    }
}

#[test]
fn dockerfile_installs_the_client_tools_where_pgferry_looks_for_them() {
    let text = std::fs::read_to_string(repo().join("docker/Dockerfile")).unwrap();
    let instructions: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut majors = BTreeSet::new();
    for (at, _) in instructions.match_indices("postgresql-client-") {
        let digits: String = instructions[at + "postgresql-client-".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        majors.insert(digits.parse::<u32>().expect("postgresql-client-<major>"));
    }
    // Every supported server major, 13 to 18 (a PG 18 server needs pg_dump 18).
    assert_eq!(majors, (13..=18).collect::<BTreeSet<u32>>());
    // Each pgdg postgresql-client-N installs /usr/lib/postgresql/N/bin/pg_dump, which is
    // where source::find_tool looks for the tools of a server of major N.
    assert_eq!(pgferry::source::PG_LIB_DIR, "/usr/lib/postgresql");
    assert!(
        text.contains("apt.postgresql.org"),
        "clients come from the PostgreSQL apt repository"
    );
    // The builder and the runtime are the same Debian release (the binary links its glibc),
    // and so is the pgdg suite.
    assert!(text.contains("FROM rust:1-bookworm AS build"));
    assert!(text.contains("FROM debian:bookworm-slim"));
    assert!(text.contains("bookworm-pgdg main"));
    assert!(text.contains("cargo build --release --locked"));
    for line in [
        "USER 10001:10001",
        r#"ENTRYPOINT ["pgferry"]"#,
        r#"CMD ["daemon"]"#,
        "ENV HOME=/home/pgferry",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == line),
            "Dockerfile lacks {line}"
        );
    }
    let config = format!(
        "ENV PGFERRY_CONFIG={}",
        pgferry::config::DEFAULT_CONFIG_PATH
    );
    assert!(text.contains(&config), "{config}");
    assert!(text.contains("COPY config/hooks/ /usr/share/pgferry/hooks/"));
    // The image user has a home (libpq's ~/.pgpass), not /nonexistent.
    assert!(text.contains("--home-dir /home/pgferry --create-home"));
    assert!(!instructions.contains("/nonexistent"));
    for label in ["title", "version", "revision", "source", "licenses"] {
        assert!(
            instructions.contains(&format!("org.opencontainers.image.{label}=")),
            "Dockerfile lacks the OCI label {label}"
        );
    }
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
}

/// Panics unless `path` exists in the repository (for paths named in messages).
fn assert_in_repo(path: &Path) {
    assert!(repo().join(path).exists(), "{} is missing", path.display());
}

#[test]
fn the_runbook_and_readme_describe_the_deployment() {
    assert_in_repo(Path::new("docs/runbook.md"));
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains("## Deploy on Kubernetes"));
    assert!(readme.contains("docs/runbook.md"));
}

/// kube-prometheus-stack picks up what pgferry ships with its defaults: ServiceMonitors and
/// PrometheusRules labelled with its release name, dashboards from ConfigMaps labelled
/// `grafana_dashboard: "1"` (its Grafana sidecar's default).
#[test]
fn monitoring_loads_under_kube_prometheus_stack_defaults() {
    for file in ["servicemonitor.yaml", "prometheusrule.yaml"] {
        let doc = yaml_doc(&k8s_dir().join(file));
        assert_eq!(
            doc["metadata"]["labels"]["release"], "kube-prometheus-stack",
            "{file}: kube-prometheus-stack's default selector"
        );
    }
    let cm = yaml_doc(&k8s_dir().join("grafana-dashboard.yaml"));
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let embedded: Value =
        serde_json::from_str(cm["data"]["pgferry.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("docker/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        embedded, file,
        "the ConfigMap must embed docker/grafana-dashboard.json verbatim"
    );
}
