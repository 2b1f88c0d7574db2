//! The manifests against pgferry itself: the ConfigMap's config is one pgferry accepts, every
//! secret it names comes from the Secret, the pods mount what the config points at, and every
//! pod runs locked down.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::tools::{repo, run};
use super::{rendered, OVERLAYS};

/// Every object of every overlay, once: what the base gives each cluster is the same object
/// in each.
fn all_docs() -> Vec<Value> {
    let mut docs: Vec<Value> = Vec::new();
    for overlay in OVERLAYS {
        for doc in rendered(overlay) {
            let same = |d: &&Value| {
                d["kind"] == doc["kind"] && d["metadata"]["name"] == doc["metadata"]["name"]
            };
            match docs.iter().find(same) {
                Some(seen) => assert_eq!(*seen, doc, "{overlay}: differs from another overlay's"),
                None => docs.push(doc),
            }
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The pod template of a Deployment, Job or CronJob.
fn pod_spec(doc: &Value) -> &Value {
    match doc["kind"].as_str().unwrap() {
        "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &doc["spec"]["template"]["spec"],
    }
}

fn workloads(docs: &[Value]) -> Vec<&Value> {
    let kinds = ["Deployment", "Job", "CronJob"];
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| kinds.contains(&d["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        found.len(),
        3,
        "the daemon, the restore Job and the verify CronJob"
    );
    found
}

fn config_text(docs: &[Value]) -> String {
    let cm = find(docs, "ConfigMap", "pgferry-config");
    cm["data"]["pgferry.toml"]
        .as_str()
        .expect("data.pgferry.toml")
        .to_string()
}

/// `${VAR}` names in a config text.
fn config_vars(text: &str) -> BTreeSet<String> {
    text.match_indices("${")
        .map(|(at, _)| {
            let rest = &text[at + 2..];
            rest[..rest.find('}').expect("closed ${")].to_string()
        })
        .collect()
}

#[test]
fn the_configmap_holds_a_config_pgferry_accepts_with_secrets_from_the_secret() {
    let docs = all_docs();
    let text = config_text(&docs);
    let env = find(&docs, "Secret", "pgferry-env");
    let secret_keys: BTreeSet<String> = env["stringData"]
        .as_object()
        .expect("stringData")
        .keys()
        .cloned()
        .collect();
    let vars = config_vars(&text);
    assert!(!vars.is_empty(), "secrets are ${{VAR}}s in the config");
    assert_eq!(
        vars, secret_keys,
        "the config's ${{VAR}}s and the Secret's keys"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgferry.toml");
    std::fs::write(&path, &text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgferry"));
    cmd.arg("--config").arg(&path).args(["config", "check"]);
    let values: Vec<String> = vars
        .iter()
        .map(|v| format!("secret-value-of-{v}"))
        .collect();
    for (var, value) in vars.iter().zip(&values) {
        cmd.env(var, value);
    }
    let (ok, out) = run(&mut cmd, None);
    assert!(
        ok,
        "pgferry config check rejects the ConfigMap's config:\n{out}"
    );
    for value in &values {
        assert!(
            !out.contains(value.as_str()),
            "config check printed a secret:\n{out}"
        );
    }
}

/// The verify window stops new verifies; the CronJob's deadline kills the pod. The deadline
/// must outlast the window by the time the verifies started last need, or they are killed
/// half-way every night (leaving scratch databases for the next run to drop).
#[test]
fn the_verify_cronjob_deadline_outlasts_the_verify_window() {
    let docs = all_docs();
    let config: toml::Table = toml::from_str(&config_text(&docs)).unwrap();
    let window = config["verify"]["window"]
        .as_str()
        .expect("the ConfigMap sets [verify] window");
    let window = pgferry::config::parse_duration(window).unwrap().as_secs();
    let cron = find(&docs, "CronJob", "pgferry-verify");
    let deadline = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
        .as_u64()
        .expect("activeDeadlineSeconds");
    // The longest single verify the example fleet expects (Odoo databases: minutes).
    let last_verifies = 15 * 60;
    assert!(
        deadline >= window + last_verifies,
        "activeDeadlineSeconds {deadline} leaves under {last_verifies} s after the {window} s window"
    );
    assert!(
        deadline <= window + 3600,
        "activeDeadlineSeconds {deadline} is far beyond the {window} s window: the window, not the deadline, should end the night's work"
    );
}

#[test]
fn committed_secrets_are_placeholders() {
    for doc in all_docs().iter().filter(|d| d["kind"] == "Secret") {
        assert!(
            doc["data"].is_null(),
            "use stringData placeholders, not data"
        );
        for (key, value) in doc["stringData"].as_object().unwrap() {
            assert_eq!(value, "CHANGE-ME", "{key} must be a placeholder in git");
        }
    }
}

#[test]
fn pods_mount_what_the_config_points_at() {
    let docs = all_docs();
    let config: toml::Table = toml::from_str(&config_text(&docs)).expect("TOML");
    let daemon = &config["daemon"];
    let listen: std::net::SocketAddr = daemon["listen"].as_str().unwrap().parse().unwrap();
    let token_file = Path::new(daemon["api_token_file"].as_str().unwrap());
    let grace =
        pgferry::config::parse_duration(daemon["shutdown_grace"].as_str().unwrap()).unwrap();
    let spool = config["restore"]["spool_dir"].as_str().unwrap();
    let config_dir = Path::new(pgferry::config::DEFAULT_CONFIG_PATH)
        .parent()
        .unwrap();

    for doc in workloads(&docs) {
        let kind = doc["kind"].as_str().unwrap();
        let pod = pod_spec(doc);
        let container = &pod["containers"][0];
        let mounts: Vec<(&str, &str)> = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap(),
                    m["name"].as_str().unwrap(),
                )
            })
            .collect();
        let volume = |name: &str| {
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .cloned()
        };
        let mounted = |path: &Path| {
            mounts
                .iter()
                .find(|(p, _)| Path::new(p) == path)
                .map(|(_, n)| *n)
        };
        let config_volume = mounted(config_dir).and_then(volume);
        assert_eq!(
            config_volume.map(|v| v["configMap"]["name"].clone()),
            Some(Value::from("pgferry-config")),
            "{kind}: the ConfigMap at {}",
            config_dir.display()
        );
        let tmp = mounted(Path::new("/tmp")).and_then(volume);
        assert!(
            tmp.is_some_and(|v| v["emptyDir"].is_object()),
            "{kind}: an emptyDir at /tmp"
        );
        assert_eq!(
            container["envFrom"][0]["secretRef"]["name"], "pgferry-env",
            "{kind}"
        );
        if kind != "CronJob" {
            let spool_volume = mounted(Path::new(spool)).and_then(volume);
            assert!(
                spool_volume.is_some_and(|v| v["emptyDir"].is_object()),
                "{kind}: spool emptyDir at {spool}"
            );
        }
    }

    let deployment = find(&docs, "Deployment", "pgferry");
    let pod = pod_spec(deployment);
    let container = &pod["containers"][0];
    assert_eq!(container["args"], serde_json::json!(["daemon"]));
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(container["ports"][0]["containerPort"], listen.port());
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["resources"]["limits"]["memory"], "384Mi");
    let token_mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == token_file.parent().unwrap())
        .expect("the api token's directory is mounted");
    let token_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == token_mount["name"])
        .unwrap();
    assert_eq!(token_volume["secret"]["secretName"], "pgferry-api-token");
    let token_key = token_file.file_name().unwrap().to_str().unwrap();
    assert!(find(&docs, "Secret", "pgferry-api-token")["stringData"][token_key].is_string());
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        termination > grace.as_secs(),
        "terminationGracePeriodSeconds {termination} <= shutdown_grace {grace:?}"
    );

    // The Service and the ServiceMonitor reach the daemon's port.
    let service = find(&docs, "Service", "pgferry");
    let labels = &pod_template_labels(deployment);
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "Service selector {k}");
    }
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        container["ports"][0]["name"]
    );
    let monitor = find(&docs, "ServiceMonitor", "pgferry");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "ServiceMonitor selector {k}"
        );
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    // The operator names the scrape job after the Service: the daemon-down alerts match it.
    let rules = std::fs::read_to_string(repo().join("docker/alerts/pgferry-rules.yaml")).unwrap();
    assert!(rules.contains(&format!(
        "job=\"{}\"",
        service["metadata"]["name"].as_str().unwrap()
    )));

    // Hooks ship in the image (Dockerfile: COPY config/hooks/ /usr/share/pgferry/hooks/).
    for target in config["restore_target"].as_array().unwrap() {
        for hook in target["hooks"].as_array().into_iter().flatten() {
            let hook = hook.as_str().unwrap();
            let name = hook
                .strip_prefix("/usr/share/pgferry/hooks/")
                .expect("hooks from the image");
            assert!(repo().join("config/hooks").join(name).is_file(), "{hook}");
        }
    }
}

fn pod_template_labels(doc: &Value) -> serde_json::Map<String, Value> {
    doc["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap()
        .clone()
}

#[test]
fn every_pod_runs_non_root_read_only_without_capabilities() {
    let docs = all_docs();
    for doc in workloads(&docs) {
        let kind = doc["kind"].as_str().unwrap();
        let pod = pod_spec(doc);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{kind}");
        assert_eq!(
            pod["securityContext"]["runAsUser"], 10001,
            "{kind}: the image's uid"
        );
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{kind}"
        );
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{kind}: no RBAC, no token"
        );
        // Secret files are root's, group fsGroup: pgferry (uid 10001) reads them through the
        // group, so every Secret volume's mode needs the group read bit.
        let fs_group = &pod["securityContext"]["fsGroup"];
        assert_eq!(fs_group, &pod["securityContext"]["runAsGroup"], "{kind}");
        for v in pod["volumes"].as_array().unwrap() {
            if let Some(mode) = v["secret"]["defaultMode"].as_u64() {
                assert_eq!(
                    mode & 0o040,
                    0o040,
                    "{kind}: volume {} unreadable",
                    v["name"]
                );
                assert_eq!(
                    mode & 0o007,
                    0,
                    "{kind}: volume {} readable by all",
                    v["name"]
                );
            }
        }
        for c in pod["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{kind}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{kind}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{kind}"
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{kind}: memory limit"
            );
            assert!(
                c["resources"]["requests"]["cpu"].is_string(),
                "{kind}: cpu request"
            );
        }
    }
    // pgferry never calls the Kubernetes API: its account is bound to nothing (the staging
    // Role is for whoever starts restores), and nothing is cluster-wide.
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        assert!(
            !["ClusterRole", "ClusterRoleBinding"].contains(&kind),
            "no cluster-wide RBAC"
        );
        if kind == "RoleBinding" {
            for s in d["subjects"].as_array().unwrap() {
                assert_ne!(s["name"], "pgferry", "pgferry needs no RBAC: {d}");
            }
        }
    }
}

#[test]
fn the_restore_job_and_the_verify_cronjob_never_retry_blindly() {
    let docs = all_docs();
    let job = find(&docs, "Job", "pgferry-restore");
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert!(job["spec"]["ttlSecondsAfterFinished"].is_u64());
    assert_eq!(pod_spec(job)["restartPolicy"], "Never");
    let args: Vec<&str> = pod_spec(job)["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "restore");
    for flag in ["--source=", "--database=", "--to="] {
        assert!(
            args.iter().any(|a| a.starts_with(flag)),
            "restore needs {flag}"
        );
    }

    let cron = find(&docs, "CronJob", "pgferry-verify");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    assert_eq!(cron["spec"]["jobTemplate"]["spec"]["backoffLimit"], 0);
    assert_eq!(pod_spec(cron)["restartPolicy"], "Never");
    let args = &pod_spec(cron)["containers"][0]["args"];
    assert_eq!(args[0], "verify");
    assert!(args
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a.as_str().unwrap().starts_with("--pushgateway=")));
}

/// The companion files: the daemon reads the filestore through a read-only mount, the restore
/// Job writes the staging one through a read-write mount, each where the config's `files`
/// points; the verify CronJob needs none (it reads the archive from the buckets).
#[test]
fn the_filestores_are_mounted_read_only_for_backups_and_read_write_for_restores() {
    let docs = all_docs();
    let config: toml::Table = toml::from_str(&config_text(&docs)).expect("TOML");
    let source_files = config["source"][0]["files"]
        .as_str()
        .expect("[[source]] files");
    let restore_files = config["restore_target"][0]["files"]
        .as_str()
        .expect("[[restore_target]] files");
    // The mount holding `files`, and whether it is read only.
    let mount_of = |doc: &Value, files: &str| -> Option<(String, bool)> {
        pod_spec(doc)["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| files.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_string(),
                    m["readOnly"] == true,
                )
            })
            .next()
    };
    let claim = |doc: &Value, volume: &str| -> Value {
        let v = pod_spec(doc)["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == volume)
            .cloned()
            .unwrap_or_else(|| panic!("no volume {volume}"));
        v["persistentVolumeClaim"].clone()
    };
    let daemon = find(&docs, "Deployment", "pgferry");
    let (volume, read_only) =
        mount_of(daemon, source_files).expect("the daemon mounts the filestore");
    assert!(read_only, "the daemon's filestore mount is read only");
    assert_eq!(claim(daemon, &volume)["readOnly"], true);
    let job = find(&docs, "Job", "pgferry-restore");
    let (volume, read_only) =
        mount_of(job, restore_files).expect("the restore Job mounts the staging filestore");
    assert!(!read_only, "the restore Job writes the staging filestore");
    assert!(claim(job, &volume)["claimName"].is_string());
    assert_ne!(claim(job, &volume)["readOnly"], true);
    assert!(
        mount_of(daemon, restore_files).is_none(),
        "production never mounts the staging filestore"
    );
}
