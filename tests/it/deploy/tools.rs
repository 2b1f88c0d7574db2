//! The external tools the deploy checks run, and how to find them. A missing tool fails the
//! test with the command that installs it: these checks never skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const SETUP_HINT: &str = "run scripts/setup.sh as root (it installs the deploy checks' tools)";

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where scripts/setup.sh installs tools that are not Debian packages.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("PGFERRY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/pgferry-tools"))
}

fn require(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} not found at {}: {SETUP_HINT}",
        path.display()
    );
    path
}

fn on_path(name: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{name} not found on PATH (Debian package {package}): {SETUP_HINT}")
    })
}

pub fn kubernetes_validate() -> PathBuf {
    require(
        tools_dir().join("venv/bin/kubernetes-validate"),
        "kubernetes-validate (PyPI)",
    )
}

pub fn venv_python() -> PathBuf {
    require(
        tools_dir().join("venv/bin/python"),
        "the tools venv's python (with PyYAML)",
    )
}

pub fn promtool() -> PathBuf {
    on_path("promtool", "prometheus")
}

pub fn node() -> PathBuf {
    on_path("node", "nodejs")
}

/// The node_modules holding the Prometheus Operator schemas.
pub fn operator_schemas() -> PathBuf {
    let modules = tools_dir().join("node/node_modules");
    require(
        modules.join("@kubernetes-models/prometheus-operator/package.json"),
        "@kubernetes-models/prometheus-operator (npm)",
    );
    modules
}

/// Runs a command to completion; returns whether it exited 0, and stdout + stderr.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> (bool, String) {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input).expect("write to the child's stdin");
    }
    let out = child.wait_with_output().expect("wait for the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every YAML document of a file (empty ones dropped), as JSON values, parsed by PyYAML.
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let script = "import json, sys, yaml\n\
                  docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                  print(json.dumps(docs))";
    let (ok, out) = run(
        Command::new(venv_python()).arg("-c").arg(script).arg(path),
        None,
    );
    assert!(ok, "{} is not valid YAML:\n{out}", path.display());
    match serde_json::from_str(&out).expect("the script prints a JSON array") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// The one document of a single-document YAML file.
pub fn yaml_doc(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{} should hold one document", path.display());
    docs.remove(0)
}
