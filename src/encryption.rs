//! Client-side encryption of stored objects with age (X25519 recipients).
//!
//! Backups encrypt the compressed stream once, to every configured recipient in one header,
//! with age's streaming format (64 KiB chunks, each authenticated): [`Sealer`] wraps the
//! pipeline's part writer on the compressor thread, so the sha256, the stored size and the
//! parts are those of the ciphertext and one ciphertext goes to every target. Production
//! holds only the recipients' public keys. Restore and verify read the secret keys from an
//! identity file ([`Identities::load`]) and decrypt the stream ([`open`]) between the
//! checksum tap and zstd.
//!
//! This module owns what may be said about keys: a recipient (public) may be printed, an
//! identity (secret) never is — not in errors, logs or `Debug` output; a malformed line of an
//! identity file is reported by its file and line number only. It does no network I/O.

mod payload;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The algorithm named in manifests of encrypted snapshots.
pub const ALGORITHM: &str = "age";

/// Appended to an object's key when it is encrypted (`.dump.zst` → `.dump.zst.age`), as the
/// `age` tool names its output.
pub const AGE_SUFFIX: &str = ".age";

/// An identity file holds a few keys; anything much larger is not one.
const MAX_IDENTITY_FILE_BYTES: u64 = 1024 * 1024;

/// How a snapshot is encrypted, as its manifest records it (public keys only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// `"age"`.
    pub algorithm: String,
    /// The recipients the object is encrypted to, `age1…`.
    pub recipients: Vec<String>,
}

/// What a manifest says of a snapshot's encryption, in words ("not encrypted", "encrypted
/// (age) to age1…, age1…"): for messages about manifests that disagree.
pub fn describe(e: Option<&Encryption>) -> String {
    match e {
        None => "not encrypted".to_string(),
        Some(e) => format!("encrypted ({}) to {}", e.algorithm, e.recipients.join(", ")),
    }
}

/// A public key an object is encrypted to: an age X25519 recipient, `age1…`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Recipient(age::x25519::Recipient);

impl Recipient {
    /// Parses `age1…`; the error says what was expected (the value is public, but the message
    /// does not repeat it: a secret key pasted in the wrong place must not be echoed).
    pub fn parse(s: &str) -> Result<Recipient, String> {
        let s = s.trim();
        if s.starts_with("AGE-SECRET-KEY-") {
            return Err("this is an identity (a secret key), not a recipient: put the public key (`age-keygen -y KEY_FILE` prints it) here, and keep the secret key out of production".into());
        }
        age::x25519::Recipient::from_str(s)
            .map(Recipient)
            .map_err(|e| format!("not an age X25519 recipient like \"age1…\" ({e})"))
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient({self})")
    }
}

impl Serialize for Recipient {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The recipients of a recipients file: one per line, blank lines and `#` comments allowed.
/// A bad line is `Err((line number, why))`.
pub fn parse_recipients(text: &str) -> Result<Vec<Recipient>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(Recipient::parse(line).map_err(|m| (i + 1, m))?);
    }
    Ok(out)
}

/// The manifest record for an object encrypted to `recipients`.
pub fn record(recipients: &[Recipient]) -> Encryption {
    Encryption {
        algorithm: ALGORITHM.into(),
        recipients: recipients.iter().map(ToString::to_string).collect(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("snapshot {snapshot} is encrypted (age, to {}) and no identity is configured; set identity_file in [encryption], the [[restore_target]] or [verify] to a file holding one of those recipients' secret keys", .recipients.join(", "))]
    NoIdentity {
        snapshot: String,
        recipients: Vec<String>,
    },
    #[error("snapshot {snapshot} is encrypted to {}, and no key in {} belongs to one of them (its keys are for {}); use the identity file of one of those recipients (after a key rotation, keep the old identity until retention removed the snapshots encrypted to it)", .recipients.join(", "), .file.display(), .have.join(", "))]
    WrongIdentity {
        snapshot: String,
        recipients: Vec<String>,
        file: PathBuf,
        have: Vec<String>,
    },
    #[error("snapshot {snapshot} is encrypted with {algorithm:?}, which this pgferry cannot decrypt (only \"age\"); upgrade pgferry")]
    UnknownAlgorithm { snapshot: String, algorithm: String },
    #[error("cannot read identity file {}: {source}", .file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("identity file {}:{line}: not an age X25519 identity (a line \"AGE-SECRET-KEY-1…\", as age-keygen writes it); the line is not shown because it may hold a secret", .file.display())]
    BadLine { file: PathBuf, line: usize },
    #[error("identity file {} holds no identity (lines \"AGE-SECRET-KEY-1…\")", .file.display())]
    Empty { file: PathBuf },
    #[error("identity file {} is larger than {MAX_IDENTITY_FILE_BYTES} bytes; it is not an age identity file", .file.display())]
    TooLarge { file: PathBuf },
}

/// Secret keys read from an identity file, for decrypting. Never printed.
#[derive(Clone)]
pub struct Identities {
    file: PathBuf,
    keys: Vec<age::x25519::Identity>,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Identities({}: {} keys <redacted>)",
            self.file.display(),
            self.keys.len()
        )
    }
}

impl Identities {
    /// Reads an age identity file (as `age-keygen` writes it; several keys allowed, for key
    /// rotation). Blocking, small.
    pub fn load(file: &Path) -> Result<Identities, KeyError> {
        use std::io::Read;
        let read_err = |source| KeyError::Read {
            file: file.to_path_buf(),
            source,
        };
        let f = std::fs::File::open(file).map_err(read_err)?;
        let mut text = String::new();
        f.take(MAX_IDENTITY_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_IDENTITY_FILE_BYTES {
            return Err(KeyError::TooLarge {
                file: file.to_path_buf(),
            });
        }
        let ids = Identities::parse(file, &text);
        // The text held secrets: do not leave them in freed memory longer than needed.
        zeroize_string(text);
        ids
    }

    /// Parses the text of identity file `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Identities, KeyError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = age::x25519::Identity::from_str(line).map_err(|_| KeyError::BadLine {
                file: file.to_path_buf(),
                line: i + 1,
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                file: file.to_path_buf(),
            });
        }
        Ok(Identities {
            file: file.to_path_buf(),
            keys,
        })
    }

    /// Identities of keys generated in a test.
    #[cfg(test)]
    pub(crate) fn from_keys(file: &Path, keys: Vec<age::x25519::Identity>) -> Identities {
        Identities {
            file: file.to_path_buf(),
            keys,
        }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The public keys of these identities.
    pub fn recipients(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.to_public().to_string())
            .collect()
    }

    fn as_dyn(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.keys.iter().map(|k| k as &dyn age::Identity)
    }
}

fn zeroize_string(mut s: String) {
    // SAFETY: zero bytes are valid UTF-8.
    unsafe { s.as_bytes_mut() }.fill(0);
    std::hint::black_box(&s);
}

/// The identities that open `snapshot`'s object, from `identity_file`: `Ok(None)` when the
/// snapshot is not encrypted (no key needed, none read). Fails before anything is downloaded
/// when no identity is configured or none of the file's keys is one of the recipients.
pub fn identities_for(
    snapshot: &str,
    encryption: Option<&Encryption>,
    identity_file: Option<&Path>,
) -> Result<Option<Identities>, KeyError> {
    let Some(enc) = encryption else {
        return Ok(None);
    };
    if enc.algorithm != ALGORITHM {
        return Err(KeyError::UnknownAlgorithm {
            snapshot: snapshot.into(),
            algorithm: enc.algorithm.clone(),
        });
    }
    let Some(file) = identity_file else {
        return Err(KeyError::NoIdentity {
            snapshot: snapshot.into(),
            recipients: enc.recipients.clone(),
        });
    };
    let ids = Identities::load(file)?;
    let have = ids.recipients();
    if !have.iter().any(|r| enc.recipients.contains(r)) {
        return Err(KeyError::WrongIdentity {
            snapshot: snapshot.into(),
            recipients: enc.recipients.clone(),
            file: file.to_path_buf(),
            have,
        });
    }
    Ok(Some(ids))
}

/// The last stage of the compressor: the compressed stream, encrypted or not, into `W`.
/// Encrypted, it is an age file (the header by the `age` crate, the 64 KiB chunks sealed in
/// place by [`payload`], faster than age's own writer).
pub enum Sealer<W: Write> {
    Plain(W),
    /// Boxed: the key schedule and chunk state are ~570 bytes, `Plain` a pointer or two.
    Age(Box<payload::PayloadWriter<W>>),
}

impl<W: Write> Sealer<W> {
    /// Encrypts to `recipients` when there are any; writes the age header at once.
    pub fn new(recipients: &[Recipient], inner: W) -> std::io::Result<Sealer<W>> {
        if recipients.is_empty() {
            return Ok(Sealer::Plain(inner));
        }
        let recipients: Vec<&dyn age::Recipient> = recipients
            .iter()
            .map(|r| &r.0 as &dyn age::Recipient)
            .collect();
        let writer = payload::PayloadWriter::new(&recipients, inner)?;
        Ok(Sealer::Age(Box::new(writer)))
    }

    /// Ends the stream (age's last chunk) and hands the writer back.
    pub fn finish(self) -> std::io::Result<W> {
        match self {
            Sealer::Plain(w) => Ok(w),
            Sealer::Age(w) => (*w).finish(),
        }
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sealer::Plain(w) => w.write(buf),
            Sealer::Age(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Sealer::Plain(w) => w.write_all(buf),
            Sealer::Age(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sealer::Plain(w) => w.flush(),
            Sealer::Age(w) => w.flush(),
        }
    }
}

/// Why the ciphertext could not be decrypted: a damaged or truncated copy (the age header or
/// a chunk failed authentication), carried inside an `io::Error` through the reader chain so
/// that it can be told apart from a download error and from corrupt zstd data.
#[derive(Debug, thiserror::Error)]
#[error("cannot decrypt the object ({reason}); this copy is damaged or truncated, or not encrypted to the configured identity")]
pub struct DecryptFailed {
    pub reason: String,
}

/// `e` is a download error from the object stream (passed through unchanged).
fn is_store_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<object_store::Error>())
}

fn decrypt_failed(e: std::io::Error) -> std::io::Error {
    if is_store_error(&e) {
        return e;
    }
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        DecryptFailed {
            reason: e.to_string(),
        },
    )
}

/// The plaintext of the age stream `input`: reads the header (so a header that does not
/// authenticate, or has no stanza for `identities`, fails here), then decrypts chunk by
/// chunk as it is read (see [`payload`]). Errors are [`DecryptFailed`] inside `io::Error`,
/// but for download errors of `input`, which pass through as they are.
pub async fn open<R>(
    input: R,
    identities: &Identities,
) -> std::io::Result<impl tokio::io::AsyncBufRead + Send + Unpin>
where
    R: tokio::io::AsyncBufRead + Send + Unpin,
{
    payload::open(input, identities.as_dyn())
        .await
        .map_err(|e| match e {
            payload::OpenError::Input(e) => decrypt_failed(e),
            payload::OpenError::Header(reason) => {
                std::io::Error::new(std::io::ErrorKind::InvalidData, DecryptFailed { reason })
            }
            payload::OpenError::Age(age::DecryptError::Io(e)) => decrypt_failed(e),
            payload::OpenError::Age(e) => decrypt_failed(std::io::Error::other(e.to_string())),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn pair() -> (Recipient, age::x25519::Identity) {
        let id = age::x25519::Identity::generate();
        (Recipient(id.to_public()), id)
    }

    fn seal(recipients: &[Recipient], plain: &[u8]) -> Vec<u8> {
        let mut s = Sealer::new(recipients, Vec::new()).unwrap();
        // Odd-sized writes across age's 64 KiB chunks.
        for piece in plain.chunks(10_007) {
            s.write_all(piece).unwrap();
        }
        s.finish().unwrap()
    }

    async fn unseal(cipher: &[u8], ids: &Identities) -> std::io::Result<Vec<u8>> {
        let mut r = open(cipher, ids).await?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn reason(e: &std::io::Error) -> Option<&DecryptFailed> {
        e.get_ref().and_then(|i| i.downcast_ref::<DecryptFailed>())
    }

    #[tokio::test]
    async fn a_stream_decrypts_with_each_recipient_alone() {
        let (r1, k1) = pair();
        let (r2, k2) = pair();
        let plain: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let cipher = seal(&[r1, r2], &plain);
        assert!(cipher.starts_with(b"age-encryption.org/v1\n"));
        assert_ne!(&cipher[cipher.len() - 1000..], &plain[plain.len() - 1000..]);
        for k in [k1, k2] {
            let ids = Identities::from_keys(Path::new("k"), vec![k]);
            assert_eq!(unseal(&cipher, &ids).await.unwrap(), plain);
        }
        // Nothing to encrypt to: the stream passes through.
        assert_eq!(seal(&[], b"abc"), b"abc");
    }

    #[tokio::test]
    async fn a_wrong_key_a_flipped_byte_and_a_truncation_fail() {
        let (r1, k1) = pair();
        let (_, other) = pair();
        let plain = vec![7u8; 200_000];
        let cipher = seal(&[r1], &plain);
        let wrong = Identities::from_keys(Path::new("k"), vec![other]);
        let e = unseal(&cipher, &wrong).await.unwrap_err();
        assert!(reason(&e).is_some(), "{e}");
        let ids = Identities::from_keys(Path::new("k"), vec![k1]);
        let mut flipped = cipher.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 0x01;
        let e = unseal(&flipped, &ids).await.unwrap_err();
        assert!(reason(&e).is_some(), "{e}");
        let e = unseal(&cipher[..cipher.len() - 100], &ids)
            .await
            .unwrap_err();
        assert!(reason(&e).is_some(), "{e}");
        let e = unseal(&cipher[..65_000], &ids).await.unwrap_err();
        assert!(reason(&e).is_some(), "{e}");
    }

    #[test]
    fn recipients_files_name_the_bad_line() {
        let (r1, _) = pair();
        let (r2, _) = pair();
        let text = format!("# ops team\n{r1}\n\n  {r2}  \n");
        assert_eq!(parse_recipients(&text).unwrap(), vec![r1.clone(), r2]);
        let text = format!("{r1}\n# next\nage1notakey\n");
        let (line, why) = parse_recipients(&text).unwrap_err();
        assert_eq!(line, 3);
        assert!(why.contains("age1"), "{why}");
        let secret = age::x25519::Identity::generate();
        let text = format!(
            "{}\n",
            age::secrecy::ExposeSecret::expose_secret(&secret.to_string())
        );
        let (line, why) = parse_recipients(&text).unwrap_err();
        assert_eq!(line, 1);
        assert!(why.contains("secret key"), "{why}");
    }

    #[test]
    fn identity_files_never_show_their_content() {
        let k = age::x25519::Identity::generate();
        let secret = age::secrecy::ExposeSecret::expose_secret(&k.to_string()).to_string();
        let text = format!(
            "# created: now\n# public key: {}\n{secret}\n",
            k.to_public()
        );
        let ids = Identities::parse(Path::new("/keys/id.txt"), &text).unwrap();
        assert_eq!(ids.recipients(), vec![k.to_public().to_string()]);
        assert!(!format!("{ids:?}").contains(&secret));
        // A damaged key: file and line, not the line's content.
        let damaged = format!("# x\n{}\n", &secret[..secret.len() - 2]);
        let e = Identities::parse(Path::new("/keys/id.txt"), &damaged).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/keys/id.txt:2"), "{msg}");
        assert!(!msg.contains(&secret[..20]), "{msg}");
        assert!(matches!(
            Identities::parse(Path::new("f"), "# nothing\n"),
            Err(KeyError::Empty { .. })
        ));
    }

    #[test]
    fn identities_are_checked_against_the_manifest_before_any_download() {
        let (r1, k1) = pair();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("id.txt");
        let secret = age::secrecy::ExposeSecret::expose_secret(&k1.to_string()).to_string();
        std::fs::write(&file, format!("{secret}\n")).unwrap();
        let enc = record(std::slice::from_ref(&r1));
        assert!(identities_for("s", None, None).unwrap().is_none());
        let e = identities_for("20261127T140000Z", Some(&enc), None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("20261127T140000Z") && msg.contains(&r1.to_string()),
            "{msg}"
        );
        assert!(identities_for("s", Some(&enc), Some(&file))
            .unwrap()
            .is_some());
        let (r2, _) = pair();
        let other = record(&[r2]);
        let e = identities_for("s", Some(&other), Some(&file)).unwrap_err();
        assert!(matches!(e, KeyError::WrongIdentity { .. }), "{e}");
        assert!(!e.to_string().contains(&secret));
    }
}
