//! Deploying pgferry: the image recipe, the Kubernetes manifests, the alert rules and the
//! Grafana dashboard under docker/, checked offline by the real tools (kubernetes-validate,
//! the Prometheus Operator's schemas, promtool) and against pgferry's own code (metric names,
//! pg tool lookup, config). Building the image needs a Docker engine, which these machines
//! do not have; what the image must provide is checked in its recipe instead.

mod kustomize;
mod manifests;
mod promql;
mod scrape;
mod tools;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use tools::{repo, run, yaml_doc};

/// The Kubernetes releases the manifests are validated against: an older one still in
/// common use (every field used must exist there) and kubernetes-validate's newest.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// Every kustomization an operator renders, under docker/k8s/overlays: one per cluster, and
/// the restore Job template that the staging cluster's restores are rendered from.
const OVERLAYS: &[&str] = &["production", "staging", "staging/restore-job", "tools"];

fn k8s_dir() -> PathBuf {
    repo().join("docker/k8s")
}

fn overlay_dir(overlay: &str) -> PathBuf {
    k8s_dir().join("overlays").join(overlay)
}

/// The objects `kubectl kustomize docker/k8s/overlays/<overlay>` prints.
fn rendered(overlay: &str) -> Vec<Value> {
    kustomize::render(&overlay_dir(overlay)).objects
}

/// Every YAML file under docker/k8s, kustomizations and patches included.
fn yaml_files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("readable dir entry").path();
        if path.is_dir() {
            files.extend(yaml_files_under(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.insert(path.canonicalize().unwrap());
        }
    }
    files
}

fn is_operator_resource(doc: &Value) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
}

#[test]
fn every_overlay_renders_and_every_object_validates_against_the_kubernetes_api_schemas() {
    let validator = tools::kubernetes_validate();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut expected = 0;
    for overlay in OVERLAYS {
        let objects = rendered(overlay);
        assert!(!objects.is_empty(), "{overlay} renders nothing");
        for (i, doc) in objects.iter().enumerate() {
            if is_operator_resource(doc) {
                continue; // no schema in kubernetes-validate: see the next test
            }
            let file = format!("{}-{i}.json", overlay.replace('/', "-"));
            std::fs::write(dir.path().join(file), serde_json::to_vec(doc).unwrap()).unwrap();
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
    let mut docs = Vec::new();
    for overlay in OVERLAYS {
        for doc in rendered(overlay).into_iter().filter(is_operator_resource) {
            assert_eq!(
                *overlay, "production",
                "monitoring goes with the daemon: {doc}"
            );
            docs.push(doc);
        }
    }
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

/// `Kind/name` of every object of an overlay.
fn inventory(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// What goes to which cluster (README, "Deploy on Kubernetes"): production runs the daemon
/// and its monitoring and holds no age identity; staging gets what a restore needs but never
/// starts one when applied; the restore template renders one Job; tools runs the verify.
#[test]
fn each_cluster_gets_what_it_runs_and_nothing_else() {
    let base: BTreeSet<String> = [
        "Namespace/pgferry",
        "ServiceAccount/pgferry",
        "ConfigMap/pgferry-config",
        "Secret/pgferry-env",
    ]
    .map(String::from)
    .into();
    let expect = |extra: &[&str]| -> BTreeSet<String> {
        base.iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let wanted: BTreeMap<&str, BTreeSet<String>> = BTreeMap::from([
        (
            "production",
            expect(&[
                "Secret/pgferry-api-token",
                "Deployment/pgferry",
                "Service/pgferry",
                "PodDisruptionBudget/pgferry",
                "ServiceMonitor/pgferry",
                "PrometheusRule/pgferry",
                "ConfigMap/pgferry-grafana-dashboard",
            ]),
        ),
        (
            "staging",
            expect(&[
                "Role/pgferry-restore-starter",
                "RoleBinding/pgferry-restore-starter",
                "ServiceAccount/pgferry-restore-ci",
                "Secret/pgferry-identity",
            ]),
        ),
        (
            "staging/restore-job",
            ["Job/pgferry-restore".to_string()].into(),
        ),
        (
            "tools",
            expect(&["Secret/pgferry-identity", "CronJob/pgferry-verify"]),
        ),
    ]);
    let mut used = BTreeSet::new();
    for overlay in OVERLAYS {
        let r = kustomize::render(&overlay_dir(overlay));
        used.extend(r.files);
        assert_eq!(inventory(&r.objects), wanted[overlay], "{overlay}");
        for o in &r.objects {
            if o["kind"] != "Namespace" {
                assert_eq!(o["metadata"]["namespace"], "pgferry", "{overlay}: {o}");
            }
        }
        // Every container runs the image this overlay's `images:` names: none hard-coded.
        let k = yaml_doc(&overlay_dir(overlay).join("kustomization.yaml"));
        let images = k["images"].as_array();
        let mut seen = 0;
        for mut o in r.objects.clone() {
            kustomize::walk_containers(&mut o, &mut |c| {
                seen += 1;
                let image = images.and_then(|i| i.iter().find(|i| i["name"] == "pgferry"));
                let image =
                    image.unwrap_or_else(|| panic!("{overlay}: no images: entry for pgferry"));
                let want = format!(
                    "{}:{}",
                    image["newName"].as_str().unwrap(),
                    image["newTag"].as_str().unwrap()
                );
                assert_eq!(c["image"], Value::from(want), "{overlay}");
            });
        }
        let workloads = ["Deployment", "Job", "CronJob"];
        let has_workload = r
            .objects
            .iter()
            .any(|o| workloads.contains(&o["kind"].as_str().unwrap()));
        assert_eq!(seen > 0, has_workload, "{overlay}");
        // Production encrypts to public keys only: no identity there, mounted or not.
        let identity_mounts = r
            .objects
            .iter()
            .filter(|o| {
                serde_json::to_string(o)
                    .unwrap()
                    .contains("\"secretName\":\"pgferry-identity\"")
            })
            .count();
        match *overlay {
            "production" => assert_eq!(identity_mounts, 0, "production holds no identity"),
            "staging/restore-job" | "tools" => {
                assert_eq!(
                    identity_mounts, 1,
                    "{overlay}: the identity Secret is mounted"
                )
            }
            _ => {}
        }
    }
    // Every file under docker/k8s is part of some overlay (none forgotten, none stale).
    let on_disk = yaml_files_under(&k8s_dir());
    let unused: Vec<_> = on_disk.difference(&used).collect();
    assert!(unused.is_empty(), "in no overlay: {unused:?}");
}

/// The staging overlay lets an operator (a group) or CI (a service account) start a restore
/// Job and follow it, and nothing more; pgferry's own service account is bound to nothing.
#[test]
fn staging_rbac_lets_an_operator_or_ci_start_a_restore_and_nothing_more() {
    let staging = rendered("staging");
    let find = |kind: &str| {
        let found: Vec<&Value> = staging.iter().filter(|o| o["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind}");
        found[0]
    };
    let role = find("Role");
    let binding = find("RoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let allows = |group: &str, resource: &str, verb: &str| {
        role["rules"].as_array().unwrap().iter().any(|r| {
            let has = |field: &str, v: &str| r[field].as_array().unwrap().iter().any(|x| x == v);
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
        })
    };
    // What `kubectl create -f`, `kubectl logs -f job/...` and `kubectl wait` need for the
    // rendered restore Job.
    let job = &rendered("staging/restore-job")[0];
    let (group, _) = job["apiVersion"].as_str().unwrap().split_once('/').unwrap();
    for verb in ["create", "get", "list", "watch"] {
        assert!(allows(group, "jobs", verb), "jobs: {verb}");
    }
    for resource in ["pods", "pods/log"] {
        assert!(allows("", resource, "get"), "{resource}: get");
    }
    let verbs: BTreeSet<&str> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
        })
        .collect();
    assert_eq!(
        verbs,
        BTreeSet::from(["create", "get", "list", "watch"]),
        "no deletes, no exec"
    );
    let resources: BTreeSet<&str> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
        })
        .collect();
    assert_eq!(
        resources,
        BTreeSet::from(["jobs", "pods", "pods/log"]),
        "no Secrets"
    );
    let subjects = binding["subjects"].as_array().unwrap();
    let ci = subjects
        .iter()
        .find(|s| s["kind"] == "ServiceAccount")
        .expect("a service account for CI");
    assert_eq!(ci["namespace"], "pgferry");
    assert_ne!(ci["name"], "pgferry", "pgferry itself needs no API access");
    assert!(staging
        .iter()
        .any(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == ci["name"]));
    assert!(subjects.iter().any(|s| s["kind"] == "Group"), "operators");
}

fn rules_file() -> PathBuf {
    repo().join("docker/alerts/pgferry-rules.yaml")
}

#[test]
fn prometheusrule_embeds_the_plain_rules_file() {
    let plain = yaml_doc(&rules_file());
    let cr = yaml_doc(&overlay_dir("production").join("prometheusrule.yaml"));
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
    // It says what goes to which cluster: every overlay, with the command that applies it.
    for overlay in OVERLAYS {
        let dir = format!("docker/k8s/overlays/{overlay}");
        assert_in_repo(Path::new(&dir));
        let command = if overlay.contains('/') {
            format!("kubectl kustomize {dir}")
        } else {
            format!("kubectl apply -k {dir}")
        };
        assert!(readme.contains(&command), "README lacks `{command}`");
    }
}

/// kube-prometheus-stack picks up what pgferry ships with its defaults: ServiceMonitors and
/// PrometheusRules labelled with its release name, dashboards from ConfigMaps labelled
/// `grafana_dashboard: "1"` (its Grafana sidecar's default).
#[test]
fn monitoring_loads_under_kube_prometheus_stack_defaults() {
    for file in ["servicemonitor.yaml", "prometheusrule.yaml"] {
        let doc = yaml_doc(&overlay_dir("production").join(file));
        assert_eq!(
            doc["metadata"]["labels"]["release"], "kube-prometheus-stack",
            "{file}: kube-prometheus-stack's default selector"
        );
    }
    let cm = yaml_doc(&overlay_dir("production").join("grafana-dashboard.yaml"));
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
