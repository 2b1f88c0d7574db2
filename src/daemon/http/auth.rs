//! The bearer tokens of the API: `daemon.api_token_file` for the mutating endpoints, and the
//! optional `daemon.read_token_file` for the read endpoints.
//!
//! A token lives in a file (a mounted Kubernetes secret). It is re-read
//! when the file's modification time changes, so a rotated secret takes effect without a
//! restart. No file (or an empty one) disables the endpoints it guards. Tokens are compared in
//! constant time. The token never appears in a response or a log line.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use subtle::ConstantTimeEq;

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token is configured: mutating endpoints are off (403).
    #[error("disabled: no token configured")]
    Disabled,
    /// No `Authorization: Bearer` header (401).
    #[error("missing bearer token")]
    Missing,
    /// A token that does not match (401).
    #[error("invalid bearer token")]
    Wrong,
}

/// Checks an `Authorization` header value against the configured token (pure).
pub fn authorize(token: Option<&str>, header: Option<&str>) -> Result<(), AuthError> {
    let Some(token) = token else {
        return Err(AuthError::Disabled);
    };
    let given = header
        .and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or(AuthError::Missing)?;
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(AuthError::Wrong)
    }
}

/// The token file, cached by modification time.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    cache: Mutex<Option<(SystemTime, Option<String>)>>,
}

impl TokenFile {
    pub fn new(path: PathBuf) -> TokenFile {
        TokenFile {
            path,
            cache: Mutex::new(None),
        }
    }

    /// The current token, or None when the file is missing, unreadable or empty.
    pub fn token(&self) -> Option<String> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, token)) = cache.as_ref() {
            if *seen == mtime {
                return token.clone();
            }
        }
        let token = match std::fs::read_to_string(&self.path) {
            Ok(text) => Some(text.trim().to_string()).filter(|t| !t.is_empty()),
            Err(error) => {
                tracing::warn!(message = "Cannot read a token file; the endpoints it guards are disabled.", path = %self.path.display(), error = %error);
                None
            }
        };
        *cache = Some((mtime, token.clone()));
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_the_bearer_token() {
        assert_eq!(authorize(None, Some("Bearer x")), Err(AuthError::Disabled));
        assert_eq!(authorize(Some("s3cret"), None), Err(AuthError::Missing));
        assert_eq!(
            authorize(Some("s3cret"), Some("Basic s3cret")),
            Err(AuthError::Missing)
        );
        assert_eq!(
            authorize(Some("s3cret"), Some("Bearer nope")),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            authorize(Some("s3cret"), Some("Bearer s3cre")),
            Err(AuthError::Wrong)
        );
        assert_eq!(authorize(Some("s3cret"), Some("Bearer s3cret")), Ok(()));
        assert_eq!(authorize(Some("s3cret"), Some("bearer  s3cret ")), Ok(()));
    }

    #[test]
    fn the_token_file_is_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let f = TokenFile::new(path.clone());
        assert_eq!(f.token(), None);
        std::fs::write(&path, "one\n").unwrap();
        assert_eq!(f.token().as_deref(), Some("one"));
        std::fs::write(&path, "two\n").unwrap();
        // Make sure the mtime moves even on coarse-grained file systems.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(f.token().as_deref(), Some("two"));
        std::fs::write(&path, "  \n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(f.token(), None);
    }
}
