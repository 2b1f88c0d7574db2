//! age's payload, written and read by pgferry: the header comes from the `age` crate (it
//! writes it, and it parses and authenticates it on the way back), the chunks are sealed and
//! opened here, in place, in one buffer reused for the whole stream.
//!
//! Why not `age::stream::StreamWriter` / `StreamReader`: their ChaCha20-Poly1305 is the
//! RustCrypto crates', which encrypt (or decrypt) and authenticate in two passes (~1 GB/s here
//! with AVX2), and per 64 KiB chunk they allocate a buffer and copy it twice. ring's
//! ChaCha20-Poly1305 (the BoringSSL assembly rustls uses) does both in one pass, several times
//! faster (`benches/pipeline.rs` group `sealer`); here a chunk is copied once into the chunk
//! buffer, sealed or opened there in place and handed on.
//!
//! The format is age v1's, unchanged (<https://age-encryption.org/v1>): the `age` crate
//! writes the header (the recipients' stanzas, the MAC) and the 16-byte nonce, with a file
//! key it draws itself. The payload key is HKDF-SHA-256(ikm = file key, salt = nonce,
//! info = "payload"); the payload is the STREAM construction: ChaCha20-Poly1305 over 64 KiB
//! chunks, the nonce an 11-byte big-endian chunk counter and a last-chunk flag byte, only the
//! last chunk shorter than 64 KiB (empty only when the whole plaintext is), each followed by
//! its 16-byte tag. The file key reaches this module through [`KeyCapture`], a recipient that
//! wraps it for the real recipients and keeps a copy, and on the way back through
//! [`KeyCatch`], an identity that unwraps it with a real identity and keeps a copy (the age
//! crate then checks the header's MAC with it: a copy is used only when that passes); either
//! copy is wiped once the payload key is derived. (ring does not wipe the payload key when
//! the writer or reader is dropped; it opens this one object only, whose plaintext goes
//! through the same process's memory anyway.)
//! Tests: the `age` crate and the `age` command-line tool decrypt what this writes, and this
//! reads what the `age` crate writes.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::Write;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use age::secrecy::ExposeSecret;
use age_core::format::{FileKey, Stanza, FILE_KEY_BYTES};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use zeroize::Zeroize;

/// age's plaintext chunk.
const CHUNK: usize = 64 * 1024;
/// Poly1305's tag after each chunk.
const TAG: usize = 16;
/// The nonce age writes after the header, the payload key's salt.
const NONCE: usize = 16;
/// HKDF's info for the payload key.
const PAYLOAD_KEY_LABEL: &[u8] = b"payload";
/// The largest header read: age's is a line a recipient (~100 bytes) and a few more, so this
/// holds ~600 recipients. Kept small because the `age` crate parses the header again from its
/// start after each line it reads (quadratic): a crafted 1 MiB header of stanzas took over
/// 4 minutes per copy (debug build; tests/it/review17.rs).
const MAX_HEADER: usize = 64 * 1024;

/// A recipient standing for all of `recipients` at once: wraps the file key for each (their
/// stanzas in order, as `age::Encryptor` would list them) and keeps a copy of it.
struct KeyCapture<'a> {
    recipients: &'a [&'a dyn age::Recipient],
    file_key: RefCell<Option<[u8; FILE_KEY_BYTES]>>,
}

impl age::Recipient for KeyCapture<'_> {
    fn wrap_file_key(
        &self,
        file_key: &FileKey,
    ) -> Result<(Vec<Stanza>, HashSet<String>), age::EncryptError> {
        let mut stanzas = Vec::new();
        let mut labels: Option<HashSet<String>> = None;
        for r in self.recipients {
            let (s, l) = r.wrap_file_key(file_key)?;
            // age refuses recipients whose labels differ; say the same here.
            match &labels {
                Some(have) if *have != l => {
                    return Err(age::EncryptError::IncompatibleRecipients {
                        l_labels: have.clone(),
                        r_labels: l,
                    })
                }
                Some(_) => {}
                None => labels = Some(l),
            }
            stanzas.extend(s);
        }
        *self.file_key.borrow_mut() = Some(*file_key.expose_secret());
        Ok((stanzas, labels.unwrap_or_default()))
    }
}

/// Writes an age file to `inner`: the header at once ([`PayloadWriter::new`]), then the
/// encrypted chunks as the plaintext comes; [`PayloadWriter::finish`] writes the last one.
pub struct PayloadWriter<W: Write> {
    inner: W,
    key: LessSafeKey,
    /// The index of the chunk being filled.
    counter: u64,
    /// The chunk being filled (`len` bytes of plaintext), room for its tag after it.
    buf: Box<[u8; CHUNK + TAG]>,
    len: usize,
}

impl<W: Write> PayloadWriter<W> {
    /// Writes the header for `recipients` (at least one) into `inner`.
    pub fn new(recipients: &[&dyn age::Recipient], mut inner: W) -> std::io::Result<Self> {
        let capture = KeyCapture {
            recipients,
            file_key: RefCell::new(None),
        };
        let encryptor =
            age::Encryptor::with_recipients(std::iter::once(&capture as &dyn age::Recipient))
                .map_err(std::io::Error::other)?;
        // age writes the header and the nonce; its own stream writer is dropped unused (it
        // writes nothing until it is given plaintext).
        let mut head = Vec::new();
        drop(encryptor.wrap_output(&mut head)?);
        let mut file_key = capture
            .file_key
            .take()
            .expect("age wraps the file key for its recipient");
        let key = payload_key(&mut file_key, &head[head.len() - NONCE..]);
        inner.write_all(&head)?;
        Ok(PayloadWriter {
            inner,
            key,
            counter: 0,
            buf: chunk_buffer(),
            len: 0,
        })
    }

    /// Encrypts the chunk held in place, appends its tag and writes both on.
    fn seal_chunk(&mut self, last: bool) -> std::io::Result<()> {
        let (plain, tag_room) = self.buf.split_at_mut(self.len);
        let tag = self
            .key
            .seal_in_place_separate_tag(chunk_nonce(self.counter, last), Aad::empty(), plain)
            .map_err(|_| std::io::Error::other("ChaCha20-Poly1305 refused a 64 KiB chunk"))?;
        tag_room[..TAG].copy_from_slice(tag.as_ref());
        self.inner.write_all(&self.buf[..self.len + TAG])?;
        self.counter += 1;
        self.len = 0;
        Ok(())
    }

    /// Writes the last chunk (the plaintext not yet written, possibly none) and hands the
    /// writer back.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.seal_chunk(true)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for PayloadWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A full chunk is sealed only once more plaintext comes: the last chunk must carry
        // the last-chunk flag, and only `finish` knows which one that is.
        if self.len == CHUNK && !buf.is_empty() {
            self.seal_chunk(false)?;
        }
        let n = buf.len().min(CHUNK - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&buf[..n]);
        self.len += n;
        Ok(n)
    }

    fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let n = self.write(buf)?;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The payload key of a stream, from its file key (wiped here) and its nonce.
fn payload_key(file_key: &mut [u8; FILE_KEY_BYTES], nonce: &[u8]) -> LessSafeKey {
    let mut key = age_core::primitives::hkdf(nonce, PAYLOAD_KEY_LABEL, file_key);
    file_key.zeroize();
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key);
    key.zeroize();
    LessSafeKey::new(unbound.expect("HKDF gives the 32 bytes of a key"))
}

/// Chunk `counter`'s nonce: 11 bytes of big-endian counter (a u64's 8 in the low ones), then
/// the last-chunk flag.
fn chunk_nonce(counter: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[3..11].copy_from_slice(&counter.to_be_bytes());
    nonce[11] = u8::from(last);
    Nonce::assume_unique_for_key(nonce)
}

fn chunk_buffer() -> Box<[u8; CHUNK + TAG]> {
    vec![0u8; CHUNK + TAG]
        .into_boxed_slice()
        .try_into()
        .expect("the length is CHUNK + TAG")
}

/// Why an age stream cannot be opened. Download errors of the input are not among them: they
/// come back as the input returned them.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Input(std::io::Error),
    #[error("{0}")]
    Header(String),
    #[error("{0}")]
    Age(age::DecryptError),
}

/// An identity standing for `inner` that keeps a copy of the file key it unwraps.
struct KeyCatch<'a> {
    inner: &'a dyn age::Identity,
    file_key: &'a RefCell<Option<[u8; FILE_KEY_BYTES]>>,
}

impl KeyCatch<'_> {
    fn keep(
        &self,
        got: Option<Result<FileKey, age::DecryptError>>,
    ) -> Option<Result<FileKey, age::DecryptError>> {
        if let Some(Ok(k)) = &got {
            *self.file_key.borrow_mut() = Some(*k.expose_secret());
        }
        got
    }
}

impl age::Identity for KeyCatch<'_> {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
        self.keep(self.inner.unwrap_stanza(stanza))
    }

    fn unwrap_stanzas(&self, stanzas: &[Stanza]) -> Option<Result<FileKey, age::DecryptError>> {
        self.keep(self.inner.unwrap_stanzas(stanzas))
    }
}

/// Reads the age header and nonce of `input` (at most [`MAX_HEADER`] bytes), has the `age`
/// crate parse it, unwrap the file key with one of `identities` and check the header's MAC,
/// then returns the reader of the payload that follows.
pub async fn open<'a, R>(
    mut input: R,
    identities: impl Iterator<Item = &'a dyn age::Identity>,
) -> Result<PayloadReader<R>, OpenError>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let n = (&mut input)
            .take((MAX_HEADER - start) as u64)
            .read_until(b'\n', &mut head)
            .await
            .map_err(OpenError::Input)?;
        if n == 0 || head.last() != Some(&b'\n') {
            return Err(OpenError::Header(if head.len() >= MAX_HEADER {
                format!("no age header in the first {MAX_HEADER} bytes")
            } else {
                "the age header is truncated".into()
            }));
        }
        // The MAC line ends the header (stanza bodies are base64, never starting with '-').
        if head[start..].starts_with(b"--- ") {
            break;
        }
    }
    let mut nonce = [0u8; NONCE];
    input.read_exact(&mut nonce).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            OpenError::Header("the age file ends after its header".into())
        } else {
            OpenError::Input(e)
        }
    })?;
    head.extend_from_slice(&nonce);
    let caught = RefCell::new(None);
    let catches: Vec<KeyCatch> = identities
        .map(|inner| KeyCatch {
            inner,
            file_key: &caught,
        })
        .collect();
    let opened = age::Decryptor::new_buffered(&head[..]).and_then(|d| {
        d.decrypt(catches.iter().map(|c| c as &dyn age::Identity))
            .map(drop)
    });
    let file_key = caught.take();
    let mut file_key = match opened {
        Ok(()) => file_key.expect("age opened the header with a caught file key"),
        Err(e) => {
            if let Some(mut k) = file_key {
                k.zeroize();
            }
            return Err(OpenError::Age(e));
        }
    };
    Ok(PayloadReader {
        inner: input,
        key: payload_key(&mut file_key, &nonce),
        counter: 0,
        buf: chunk_buffer(),
        filled: 0,
        pos: 0,
        end: 0,
        done: false,
    })
}

/// A [`DecryptFailed`](super::DecryptFailed) in an `io::Error`.
fn failed(kind: std::io::ErrorKind, reason: &str) -> std::io::Error {
    std::io::Error::new(
        kind,
        super::DecryptFailed {
            reason: reason.into(),
        },
    )
}

/// The plaintext of an age payload, opened chunk by chunk as it is read ([`open`] makes it).
/// Errors of the input pass through unchanged; a chunk that does not authenticate, or a
/// stream that ends before its last chunk, is a [`DecryptFailed`](super::DecryptFailed)
/// (`InvalidData` / `UnexpectedEof`).
pub struct PayloadReader<R> {
    inner: R,
    key: LessSafeKey,
    /// The index of the next chunk to open.
    counter: u64,
    /// Ciphertext of the chunk being read (`filled` bytes), then its plaintext
    /// (`pos..end` not yet read).
    buf: Box<[u8; CHUNK + TAG]>,
    filled: usize,
    pos: usize,
    end: usize,
    /// The last chunk is open: the end of the plaintext once `pos == end`.
    done: bool,
}

impl<R: tokio::io::AsyncBufRead + Unpin> PayloadReader<R> {
    /// Reads and opens the next chunk into `buf`; `Ready(Ok)` with nothing more to read means
    /// the stream is complete.
    fn poll_next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.filled < CHUNK + TAG {
            let avail = ready!(Pin::new(&mut self.inner).poll_fill_buf(cx))?;
            if avail.is_empty() {
                break;
            }
            let n = avail.len().min(CHUNK + TAG - self.filled);
            self.buf[self.filled..self.filled + n].copy_from_slice(&avail[..n]);
            Pin::new(&mut self.inner).consume(n);
            self.filled += n;
        }
        // A full chunk is the last one when the input ends after it.
        let last = self.filled < CHUNK + TAG
            || ready!(Pin::new(&mut self.inner).poll_fill_buf(cx))?.is_empty();
        if self.filled < TAG {
            return Poll::Ready(Err(failed(
                std::io::ErrorKind::UnexpectedEof,
                "the age file is truncated",
            )));
        }
        let len = self.filled;
        let opened = self.key.open_in_place(
            chunk_nonce(self.counter, last),
            Aad::empty(),
            &mut self.buf[..len],
        );
        let plain = match opened {
            Ok(p) => p.len(),
            Err(_) => {
                return Poll::Ready(Err(failed(
                    std::io::ErrorKind::InvalidData,
                    "a chunk does not authenticate: it was changed, or the file is truncated",
                )))
            }
        };
        if last && plain == 0 && self.counter > 0 {
            return Poll::Ready(Err(failed(
                std::io::ErrorKind::InvalidData,
                "the age file has an empty last chunk after others",
            )));
        }
        self.counter += 1;
        (self.filled, self.pos, self.end, self.done) = (0, 0, plain, last);
        Poll::Ready(Ok(()))
    }
}

/// The chunk buffer holds plaintext: wiped when the reader goes, as age's own reader does
/// (the writer's holds ciphertext once sealed; the dump's plaintext is in the pipeline's raw
/// buffers anyway).
impl<R> Drop for PayloadReader<R> {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

impl<R: tokio::io::AsyncBufRead + Unpin> tokio::io::AsyncBufRead for PayloadReader<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<&[u8]>> {
        let this = self.get_mut();
        while this.pos == this.end && !this.done {
            ready!(this.poll_next_chunk(cx))?;
        }
        Poll::Ready(Ok(&this.buf[this.pos..this.end]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = (this.pos + amt).min(this.end);
    }
}

impl<R: tokio::io::AsyncBufRead + Unpin> tokio::io::AsyncRead for PayloadReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        use tokio::io::AsyncBufRead;
        let avail = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = avail.len().min(out.remaining());
        out.put_slice(&avail[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn keys(n: usize) -> Vec<age::x25519::Identity> {
        (0..n).map(|_| age::x25519::Identity::generate()).collect()
    }

    /// `plain` sealed by [`PayloadWriter`], written in pieces of `piece` bytes.
    fn seal(ids: &[age::x25519::Identity], plain: &[u8], piece: usize) -> Vec<u8> {
        let pubs: Vec<_> = ids.iter().map(|k| k.to_public()).collect();
        let rs: Vec<&dyn age::Recipient> = pubs.iter().map(|r| r as &dyn age::Recipient).collect();
        let mut w = PayloadWriter::new(&rs, Vec::new()).unwrap();
        for p in plain.chunks(piece.max(1)) {
            w.write_all(p).unwrap();
        }
        w.finish().unwrap()
    }

    /// The same plaintext sealed by the `age` crate's own writer.
    fn seal_by_age(ids: &[age::x25519::Identity], plain: &[u8]) -> Vec<u8> {
        let pubs: Vec<_> = ids.iter().map(|k| k.to_public()).collect();
        let e =
            age::Encryptor::with_recipients(pubs.iter().map(|r| r as &dyn age::Recipient)).unwrap();
        let mut w = e.wrap_output(Vec::new()).unwrap();
        w.write_all(plain).unwrap();
        w.finish().unwrap()
    }

    /// The bytes after the header (whose last line is `--- ` and the MAC) and the nonce.
    fn payload_len(cipher: &[u8]) -> usize {
        let mac_line = cipher.windows(5).position(|w| w == b"\n--- ").unwrap() + 1;
        let header_end =
            mac_line + cipher[mac_line..].iter().position(|&b| b == b'\n').unwrap() + 1;
        cipher.len() - header_end - NONCE
    }

    fn open_by_age(id: &age::x25519::Identity, cipher: &[u8]) -> std::io::Result<Vec<u8>> {
        let d = age::Decryptor::new(cipher).map_err(std::io::Error::other)?;
        let mut r = d
            .decrypt(std::iter::once(id as &dyn age::Identity))
            .map_err(std::io::Error::other)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn the_age_crate_opens_every_size_and_the_layout_is_ages() {
        let ids = keys(2);
        let data: Vec<u8> = (0..3 * CHUNK as u32 + 5)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        // Empty, a partial chunk, exactly one and two chunks (the last chunk full), one
        // byte more, and pieces smaller than, equal to and larger than a chunk.
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 5] {
            for piece in [1 + size / 7, 32 * 1024, CHUNK, 3 * CHUNK] {
                let plain = &data[..size];
                let cipher = seal(&ids, plain, piece);
                assert!(cipher.starts_with(b"age-encryption.org/v1\n"));
                // The chunks and tags after the header and nonce: as many as age's own writer
                // makes (one chunk, the last, even when empty; a full last chunk stays last).
                let chunks = size.div_ceil(CHUNK).max(1);
                assert_eq!(payload_len(&cipher), size + chunks * TAG, "size {size}");
                assert_eq!(payload_len(&seal_by_age(&ids, plain)), size + chunks * TAG);
                for id in &ids {
                    assert_eq!(open_by_age(id, &cipher).unwrap(), plain, "size {size}");
                }
            }
        }
    }

    #[test]
    fn every_stream_has_its_own_key_and_the_chunks_are_authenticated() {
        let ids = keys(1);
        let plain = vec![0u8; 2 * CHUNK + 100];
        let (a, b) = (seal(&ids, &plain, CHUNK), seal(&ids, &plain, CHUNK));
        // The header and nonce differ, and so does every chunk's ciphertext.
        let tail = 2 * (CHUNK + TAG);
        assert_ne!(a[a.len() - tail..], b[b.len() - tail..]);
        // Swapping two chunks, dropping the last one, or flipping a tag's bit is refused.
        let start = a.len() - (2 * (CHUNK + TAG) + 100 + TAG);
        let mut swapped = a.clone();
        let (first, second) = swapped[start..].split_at_mut(CHUNK + TAG);
        first.swap_with_slice(&mut second[..CHUNK + TAG]);
        assert!(open_by_age(&ids[0], &swapped).is_err());
        assert!(open_by_age(&ids[0], &a[..a.len() - (100 + TAG)]).is_err());
        let mut flipped = a.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x80;
        assert!(open_by_age(&ids[0], &flipped).is_err());
        assert_eq!(open_by_age(&ids[0], &a).unwrap(), plain);
    }

    #[test]
    fn recipients_that_age_would_refuse_together_are_refused() {
        // An X25519 recipient with one that wants to be alone (a random label, as age's
        // scrypt recipient sets): age refuses the mix; so does KeyCapture.
        struct Lonely;
        impl age::Recipient for Lonely {
            fn wrap_file_key(
                &self,
                _: &FileKey,
            ) -> Result<(Vec<Stanza>, HashSet<String>), age::EncryptError> {
                Ok((Vec::new(), HashSet::from(["lonely".to_string()])))
            }
        }
        let k = age::x25519::Identity::generate().to_public();
        let rs: [&dyn age::Recipient; 2] = [&k, &Lonely];
        assert!(PayloadWriter::new(&rs, Vec::new()).is_err());
    }

    /// What [`open`] reads from `cipher`, given to it `piece` bytes at a time.
    fn open_here(
        id: &age::x25519::Identity,
        cipher: &[u8],
        piece: usize,
    ) -> std::io::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let input = tokio::io::BufReader::with_capacity(piece, cipher);
            let mut r = open(input, std::iter::once(id as &dyn age::Identity))
                .await
                .map_err(std::io::Error::other)?;
            let mut out = Vec::new();
            r.read_to_end(&mut out).await?;
            Ok(out)
        })
    }

    #[test]
    fn the_reader_opens_every_size_written_by_age_or_here_read_in_any_pieces() {
        let ids = keys(2);
        let data: Vec<u8> = (0..3 * CHUNK as u32 + 5)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 5] {
            let plain = &data[..size];
            for cipher in [seal(&ids, plain, 10_007), seal_by_age(&ids, plain)] {
                for piece in [1, 7, 4096, CHUNK + TAG, 3 * CHUNK] {
                    if piece == 1 && size > CHUNK + 1 {
                        continue; // slow, and the small sizes cover byte-wise reads
                    }
                    for id in &ids {
                        assert_eq!(
                            open_here(id, &cipher, piece).unwrap(),
                            plain,
                            "size {size} piece {piece}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_reader_refuses_what_age_refuses() {
        let ids = keys(1);
        let other = keys(1);
        let plain = vec![3u8; 2 * CHUNK + 100];
        let a = seal(&ids, &plain, CHUNK);
        let id = &ids[0];
        // The payload's own refusals (the header's come from the age crate).
        let is_decrypt_failed = |r: std::io::Result<Vec<u8>>| {
            let e = r.unwrap_err();
            e.get_ref()
                .is_some_and(|i| i.is::<crate::encryption::DecryptFailed>())
        };
        // A wrong identity, a header MAC changed, a truncated header.
        assert!(open_here(&other[0], &a, 4096).is_err());
        let mac_line = a.windows(5).position(|w| w == b"\n--- ").unwrap() + 6;
        let mut bad_mac = a.clone();
        bad_mac[mac_line + 2] = if bad_mac[mac_line + 2] == b'A' {
            b'B'
        } else {
            b'A'
        };
        assert!(open_here(id, &bad_mac, 4096).is_err());
        assert!(open_here(id, &a[..mac_line], 4096).is_err());
        assert!(open_here(id, &a[..mac_line + 50], 4096).is_err());
        // Two chunks swapped, a tag's bit flipped, the last chunk dropped (the file then
        // ends on a full chunk that is not the last), a chunk cut short, bytes appended.
        let start = a.len() - (2 * (CHUNK + TAG) + 100 + TAG);
        let mut swapped = a.clone();
        let (first, second) = swapped[start..].split_at_mut(CHUNK + TAG);
        first.swap_with_slice(&mut second[..CHUNK + TAG]);
        assert!(is_decrypt_failed(open_here(id, &swapped, 4096)));
        let mut flipped = a.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x80;
        assert!(is_decrypt_failed(open_here(id, &flipped, 4096)));
        assert!(is_decrypt_failed(open_here(
            id,
            &a[..a.len() - (100 + TAG)],
            4096
        )));
        assert!(is_decrypt_failed(open_here(id, &a[..a.len() - 1], 4096)));
        assert!(is_decrypt_failed(open_here(id, &a[..start + 10], 4096)));
        let mut longer = a.clone();
        longer.extend_from_slice(&[0u8; 40]);
        assert!(is_decrypt_failed(open_here(id, &longer, 4096)));
        // A file that ends right after its header and nonce has no last chunk.
        assert!(open_here(id, &a[..start], 4096).is_err());
        assert_eq!(open_here(id, &a, 4096).unwrap(), plain);

        // An empty last chunk after a full one (age never writes it and refuses it).
        let pubs = [ids[0].to_public()];
        let rs: Vec<&dyn age::Recipient> = pubs.iter().map(|r| r as &dyn age::Recipient).collect();
        let mut w = PayloadWriter::new(&rs, Vec::new()).unwrap();
        w.write_all(&plain[..CHUNK]).unwrap();
        w.seal_chunk(false).unwrap();
        let crafted = w.finish().unwrap();
        assert!(open_by_age(id, &crafted).is_err());
        assert!(is_decrypt_failed(open_here(id, &crafted, 4096)));
    }
}
