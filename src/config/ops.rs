//! The config keys that make pgferry fit the tools operators already run: S3 request options
//! (`virtual_hosted_style`, `sse`, `sse_kms_key_id`, `session_token` on a `[[target]]`), the
//! `[notify]` webhook and the `[[source]] ping` URL.
//!
//! Each is parsed in `raw` like every other key and validated here into typed values by small
//! functions that `super::validate` calls; this keeps the additions out of the main validation
//! function. Webhook and ping URLs are [`Secret`]s: a healthchecks.io UUID or a webhook token
//! in the URL is as good as a password, so they are shown redacted like every other secret.

use std::time::Duration;

use serde::Deserialize;

use super::raw::RawTarget;
use super::{Secret, Text};

/// Server-side encryption requested on every object pgferry writes to a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    /// SSE-S3: `x-amz-server-side-encryption: AES256`.
    Aes256,
    /// SSE-KMS with the bucket's default key, or the key named.
    Kms { key_id: Option<String> },
}

impl Sse {
    /// The value as written in the config (and as S3 spells it).
    pub fn as_str(&self) -> &'static str {
        match self {
            Sse::Aes256 => "AES256",
            Sse::Kms { .. } => "aws:kms",
        }
    }
}

/// S3 options beyond endpoint, region and keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// `https://bucket.endpoint/key` instead of `https://endpoint/bucket/key`. AWS prefers it;
    /// most self-hosted servers (Garage, MinIO) want path style, the default.
    pub virtual_hosted_style: bool,
    pub sse: Option<Sse>,
    /// Goes with `access_key_id`/`secret_access_key` from the config (temporary credentials).
    pub session_token: Option<Secret>,
}

/// `config check` shows the keys as written (flattened into the target), secrets redacted.
impl serde::Serialize for S3Options {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        if self.virtual_hosted_style {
            m.serialize_entry("virtual_hosted_style", &true)?;
        }
        if let Some(sse) = &self.sse {
            m.serialize_entry("sse", sse.as_str())?;
            if let Sse::Kms { key_id: Some(k) } = sse {
                m.serialize_entry("sse_kms_key_id", k)?;
            }
        }
        if let Some(t) = &self.session_token {
            m.serialize_entry("session_token", t)?;
        }
        m.end()
    }
}

/// Validates a `[[target]]`'s S3 options; `Err((key, message))` names the offending key.
pub(super) fn s3_options(t: &RawTarget) -> Result<S3Options, (&'static str, String)> {
    if t.storage_class.is_some() {
        // object_store 0.12.5 has Attribute::StorageClass (x-amz-storage-class), but only
        // put_opts/put_multipart_opts send attributes; the dump is a multipart upload through
        // MultipartStore::create_multipart (its upload id goes into the marker that lets a
        // later run abort it), which takes no options. ClientOptions::with_default_headers is
        // no way round: the header would go on every request (GET, UploadPart, DELETE), added
        // by reqwest after object_store signed the request, and S3 refuses unsigned x-amz-*
        // headers. A storage class would silently apply to manifests only: refused.
        return Err((
            "storage_class",
            "is not supported: object_store 0.12 cannot set it on the resumable multipart \
             uploads pgferry writes dumps with; use a bucket lifecycle rule (e.g. transition \
             after 0 days) to move objects to another storage class"
                .into(),
        ));
    }
    let sse = match t.sse.as_ref().map(|s| s.0.as_str()) {
        None => {
            if t.sse_kms_key_id.is_some() {
                return Err(("sse_kms_key_id", "needs sse = \"aws:kms\"".into()));
            }
            None
        }
        Some("AES256") => {
            if t.sse_kms_key_id.is_some() {
                return Err(("sse_kms_key_id", "needs sse = \"aws:kms\"".into()));
            }
            Some(Sse::Aes256)
        }
        Some("aws:kms") => Some(Sse::Kms {
            key_id: t.sse_kms_key_id.as_ref().map(|k| k.0.clone()),
        }),
        Some(other) => {
            return Err((
                "sse",
                format!("{other:?} is not one of \"AES256\" or \"aws:kms\""),
            ))
        }
    };
    if t.session_token.is_some() && t.access_key_id.is_none() {
        return Err((
            "session_token",
            "goes with access_key_id and secret_access_key".into(),
        ));
    }
    Ok(S3Options {
        virtual_hosted_style: t.virtual_hosted_style.unwrap_or(false),
        sse,
        session_token: t.session_token.as_ref().map(|v| Secret(v.0.clone())),
    })
}

/// The S3-only keys of this module that a `file://` target sets, if any.
pub(super) fn s3_only_keys(t: &RawTarget) -> Option<&'static str> {
    [
        (t.virtual_hosted_style.is_some(), "virtual_hosted_style"),
        (t.sse.is_some(), "sse"),
        (t.sse_kms_key_id.is_some(), "sse_kms_key_id"),
        (t.storage_class.is_some(), "storage_class"),
        (t.session_token.is_some(), "session_token"),
    ]
    .into_iter()
    .find_map(|(present, key)| present.then_some(key))
}

/// `[notify]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNotify {
    /// POSTed a JSON report after every finished backup, restore and verify.
    #[serde(default)]
    webhook: Option<Text>,
    /// How long one POST may take.
    #[serde(default)]
    timeout: Option<Text>,
}

/// Where run reports go besides the logs and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NotifyConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Secret>,
    #[serde(serialize_with = "super::show::duration")]
    pub timeout: Duration,
}

/// Default per-request timeout of webhooks and pings: a notification must never hold a
/// backup slot for long, and a healthy receiver answers in well under a second.
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn notify(raw: RawNotify) -> Result<NotifyConfig, (&'static str, String)> {
    let webhook = raw
        .webhook
        .map(|w| http_url(&w.0).map(|()| Secret(w.0)))
        .transpose()
        .map_err(|m| ("notify.webhook", m))?;
    let timeout = match raw.timeout {
        Some(t) => super::parse_duration(&t.0).map_err(|m| ("notify.timeout", m))?,
        None => DEFAULT_NOTIFY_TIMEOUT,
    };
    Ok(NotifyConfig { webhook, timeout })
}

/// A `[[source]] ping` URL (healthchecks.io style: `<url>/start`, `<url>`, `<url>/fail`).
pub(super) fn ping(raw: Option<Text>) -> Result<Option<Secret>, String> {
    raw.map(|p| http_url(&p.0).map(|()| Secret(p.0)))
        .transpose()
}

/// An `http://` or `https://` URL; the message never repeats it (it may hold a token).
fn http_url(raw: &str) -> Result<(), String> {
    match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(()),
        Ok(_) => Err("must be an http:// or https:// URL".into()),
        Err(e) => Err(format!("is not a URL ({e})")),
    }
}

/// A URL for display: scheme and host only (the path and query may carry a token).
pub fn redact_http_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(u) => format!(
            "{}://{}/<redacted>",
            u.scheme(),
            u.host_str().unwrap_or_default()
        ),
        Err(_) => "<redacted>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(extra: &str) -> Result<S3Options, (&'static str, String)> {
        let raw: RawTarget =
            toml::from_str(&format!("name = \"t\"\nurl = \"s3://b/p\"\n{extra}")).unwrap();
        s3_options(&raw)
    }

    #[test]
    fn s3_options_parse_and_check() {
        assert_eq!(target("").unwrap(), S3Options::default());
        let o = target("virtual_hosted_style = true\nsse = \"AES256\"").unwrap();
        assert!(o.virtual_hosted_style);
        assert_eq!(o.sse, Some(Sse::Aes256));
        let o = target("sse = \"aws:kms\"\nsse_kms_key_id = \"arn:k\"").unwrap();
        assert_eq!(
            o.sse,
            Some(Sse::Kms {
                key_id: Some("arn:k".into())
            })
        );
        assert_eq!(target("sse = \"des\"").unwrap_err().0, "sse");
        assert_eq!(
            target("sse_kms_key_id = \"k\"").unwrap_err().0,
            "sse_kms_key_id"
        );
        assert_eq!(
            target("storage_class = \"GLACIER\"").unwrap_err().0,
            "storage_class"
        );
        assert_eq!(
            target("session_token = \"t\"").unwrap_err().0,
            "session_token"
        );
    }

    #[test]
    fn notify_urls_are_checked_and_never_echoed() {
        let n = notify(RawNotify {
            webhook: Some(Text("https://hooks.example/T0K3N".into())),
            timeout: None,
        })
        .unwrap();
        assert_eq!(n.webhook.unwrap().expose(), "https://hooks.example/T0K3N");
        assert_eq!(n.timeout, DEFAULT_NOTIFY_TIMEOUT);
        let e = notify(RawNotify {
            webhook: Some(Text("ftp://x/T0K3N".into())),
            timeout: None,
        })
        .unwrap_err();
        assert!(!e.1.contains("T0K3N"), "{e:?}");
        assert!(ping(Some(Text("not a url T0K3N".into())))
            .unwrap_err()
            .find("T0K3N")
            .is_none());
        assert_eq!(
            redact_http_url("https://hc.example/uuid-secret?x=1"),
            "https://hc.example/<redacted>"
        );
    }
}
