//! The part of kustomize that docker/k8s uses, so that the deploy checks render every overlay
//! offline with no kustomize or kubectl on the machine: `resources` (files inside the
//! kustomization's directory, or other kustomization directories), `namespace`, `patches`
//! (strategic merge patches from files, matched by kind, name and namespace) and `images`.
//! Any other kustomization field fails the render rather than being ignored, so a manifest
//! change that needs more of kustomize shows up here first. Checked against `kubectl
//! kustomize` (kustomize v5.5) on the same overlays when it was written.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::tools::{yaml_doc, yaml_docs};

/// The kustomization fields this renderer implements.
const FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "patches",
    "images",
];

/// Kinds that live outside namespaces: the namespace transformer leaves them alone.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
];

/// What rendering a kustomization produced: its objects and every file it read.
pub struct Rendered {
    pub objects: Vec<Value>,
    pub files: BTreeSet<PathBuf>,
}

/// Renders the kustomization in `dir` like `kubectl kustomize dir`, objects in resource order.
pub fn render(dir: &Path) -> Rendered {
    let file = dir.join("kustomization.yaml");
    let k = yaml_doc(&file);
    let fields = k.as_object().expect("a kustomization is a mapping");
    for key in fields.keys() {
        assert!(
            FIELDS.contains(&key.as_str()),
            "{}: `{key}` is not implemented by tests/it/deploy/kustomize.rs; extend it",
            file.display()
        );
    }
    assert_eq!(k["kind"], "Kustomization", "{}", file.display());
    let mut files = BTreeSet::from([canonical(&file)]);
    let mut objects = Vec::new();
    for entry in list(&k, "resources") {
        let path = dir.join(entry.as_str().expect("a resource is a path"));
        if path.is_dir() {
            let base = render(&path);
            files.extend(base.files);
            objects.extend(base.objects);
        } else {
            objects.extend(yaml_docs(&inside(dir, &path)));
            files.insert(canonical(&path));
        }
    }
    for entry in list(&k, "patches") {
        let only_path = entry.as_object().is_some_and(|p| p.len() == 1);
        assert!(
            only_path && entry["path"].is_string(),
            "{}: only `patches: - path: FILE` is implemented, not {entry}",
            file.display()
        );
        let path = inside(dir, &dir.join(entry["path"].as_str().unwrap()));
        for patch in yaml_docs(&path) {
            apply_patch(&mut objects, &patch, &path);
        }
        files.insert(canonical(&path));
    }
    if let Some(ns) = k["namespace"].as_str() {
        for o in &mut objects {
            if !CLUSTER_SCOPED.contains(&o["kind"].as_str().unwrap_or_default()) {
                o["metadata"]["namespace"] = Value::from(ns);
            }
        }
    }
    for image in list(&k, "images") {
        for o in &mut objects {
            set_images(o, &image);
        }
    }
    Rendered { objects, files }
}

fn list(k: &Value, field: &str) -> Vec<Value> {
    match &k[field] {
        Value::Null => Vec::new(),
        Value::Array(items) => items.clone(),
        other => panic!("kustomization {field} must be a list, not {other}"),
    }
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// kustomize's default load restrictor: a file must be inside the kustomization's directory
/// (other directories are reached as kustomizations of their own).
fn inside(dir: &Path, path: &Path) -> PathBuf {
    let (dir, path) = (canonical(dir), canonical(path));
    assert!(
        path.starts_with(&dir),
        "{} is outside {}: kustomize refuses it; make its directory a kustomization",
        path.display(),
        dir.display()
    );
    path
}

fn identity(o: &Value) -> (Value, Value, Value) {
    (
        o["kind"].clone(),
        o["metadata"]["name"].clone(),
        o["metadata"]["namespace"].clone(),
    )
}

/// A strategic merge patch applies to the one object of its kind, name and namespace.
fn apply_patch(objects: &mut [Value], patch: &Value, from: &Path) {
    let id = identity(patch);
    assert!(id.1.is_string(), "{}: a patch needs a name", from.display());
    let mut matching: Vec<&mut Value> = objects.iter_mut().filter(|o| identity(o) == id).collect();
    assert_eq!(
        matching.len(),
        1,
        "{}: no unique target for the patch {id:?} (namespaces must match as written)",
        from.display()
    );
    merge(matching[0], patch, "");
}

/// The list fields merged item by item, and the key that pairs their items (Kubernetes'
/// patchMergeKey); every other list is replaced by the patch's.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

/// Kubernetes' strategic merge: mappings merge key by key (null deletes), lists with a merge
/// key merge item by item, other values are replaced. `$patch` directives are not supported.
pub fn merge(base: &mut Value, patch: &Value, field: &str) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                assert!(
                    !k.starts_with('$'),
                    "patch directive {k} is not implemented"
                );
                if v.is_null() {
                    b.remove(k);
                } else if let Some(existing) = b.get_mut(k) {
                    merge(existing, v, k);
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Array(b), Value::Array(p)) if merge_key(field).is_some() => {
            let key = merge_key(field).unwrap();
            let mut added = Vec::new();
            for item in p {
                let k = &item[key];
                assert!(!k.is_null(), "an item of {field} without its {key}: {item}");
                match b.iter_mut().find(|x| &x[key] == k) {
                    Some(existing) => merge(existing, item, ""),
                    None => added.push(item.clone()),
                }
            }
            // kustomize puts the patch's new items first, in the patch's order.
            b.splice(0..0, added);
        }
        (b, p) => *b = p.clone(),
    }
}

/// The `images` transformer: every container whose image is `name`, `name:tag` or
/// `name@digest` gets `newName`, `newTag` or `digest`.
pub fn set_images(o: &mut Value, image: &Value) {
    let name = image["name"].as_str().expect("images: name");
    for key in image.as_object().unwrap().keys() {
        assert!(
            ["name", "newName", "newTag", "digest"].contains(&key.as_str()),
            "images: `{key}` is not implemented"
        );
    }
    walk_containers(o, &mut |c: &mut Map<String, Value>| {
        let Some(current) = c.get("image").and_then(Value::as_str) else {
            return;
        };
        let (repo, suffix) = split_image(current);
        if repo != name {
            return;
        }
        let repo = image["newName"].as_str().unwrap_or(repo);
        let suffix = match (image["digest"].as_str(), image["newTag"].as_str()) {
            (Some(d), _) => format!("@{d}"),
            (None, Some(t)) => format!(":{t}"),
            (None, None) => suffix.to_string(),
        };
        c.insert("image".into(), Value::from(format!("{repo}{suffix}")));
    });
}

/// `registry:5000/a/b:tag` → (`registry:5000/a/b`, `:tag`); a digest likewise.
fn split_image(image: &str) -> (&str, &str) {
    if let Some(at) = image.find('@') {
        return image.split_at(at);
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].find(':') {
        Some(colon) => image.split_at(last_slash + colon),
        None => (image, ""),
    }
}

/// Calls `f` on every item of every `containers` and `initContainers` list in `v`.
pub fn walk_containers(v: &mut Value, f: &mut dyn FnMut(&mut Map<String, Value>)) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if k == "containers" || k == "initContainers" {
                    for c in child.as_array_mut().into_iter().flatten() {
                        if let Value::Object(c) = c {
                            f(c);
                        }
                    }
                } else {
                    walk_containers(child, f);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| walk_containers(i, f)),
        _ => {}
    }
}

#[test]
fn strategic_merge_pairs_list_items_by_their_merge_key() {
    let mut base = serde_json::json!({"spec": {"containers": [
        {"name": "a", "image": "x", "args": ["one"], "volumeMounts": [{"mountPath": "/m", "name": "v"}]},
        {"name": "b", "image": "y"}
    ], "volumes": [{"name": "v", "emptyDir": {}}]}});
    let patch = serde_json::json!({"spec": {"containers": [
        {"name": "a", "args": ["two"], "volumeMounts": [{"mountPath": "/n", "name": "w"}]}
    ], "volumes": [{"name": "w", "secret": {"secretName": "s"}}, {"name": "v", "emptyDir": null, "configMap": {"name": "c"}}]}});
    merge(&mut base, &patch, "");
    let a = &base["spec"]["containers"][0];
    assert_eq!(a["image"], "x", "untouched fields stay");
    assert_eq!(
        a["args"],
        serde_json::json!(["two"]),
        "plain lists are replaced"
    );
    assert_eq!(a["volumeMounts"].as_array().unwrap().len(), 2);
    assert_eq!(base["spec"]["containers"][1]["name"], "b");
    let volumes = base["spec"]["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 2);
    assert_eq!(volumes[0]["name"], "w", "new items first, like kustomize");
    assert_eq!(
        volumes[1],
        serde_json::json!({"name": "v", "configMap": {"name": "c"}})
    );
}

#[test]
fn images_are_matched_by_name_whatever_their_tag() {
    let mut job = serde_json::json!({"spec": {"template": {"spec": {
        "initContainers": [{"name": "i", "image": "pgferry:old"}],
        "containers": [{"name": "a", "image": "pgferry"}, {"name": "b", "image": "registry:5000/pgferry-other:1"}]
    }}}});
    let image = serde_json::json!({"name": "pgferry", "newName": "registry.example.com/pgferry", "newTag": "0.2.0"});
    set_images(&mut job, &image);
    let spec = &job["spec"]["template"]["spec"];
    assert_eq!(
        spec["initContainers"][0]["image"],
        "registry.example.com/pgferry:0.2.0"
    );
    assert_eq!(
        spec["containers"][0]["image"],
        "registry.example.com/pgferry:0.2.0"
    );
    assert_eq!(
        spec["containers"][1]["image"],
        "registry:5000/pgferry-other:1"
    );
    assert_eq!(split_image("registry:5000/a/b"), ("registry:5000/a/b", ""));
    assert_eq!(split_image("a@sha256:00"), ("a", "@sha256:00"));
}
