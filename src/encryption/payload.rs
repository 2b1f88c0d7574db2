//! age's payload, written by pgferry: the header comes from the `age` crate, the chunks are
//! encrypted here, in place, in one buffer reused for the whole stream.
//!
//! Why not `age::stream::StreamWriter`: its ChaCha20-Poly1305 is the RustCrypto crates',
//! which encrypt and then authenticate in two passes (~1 GB/s here with AVX2), and per 64 KiB
//! chunk it allocates a buffer and copies the plaintext twice. ring's ChaCha20-Poly1305 (the
//! BoringSSL assembly rustls uses) does both in one pass, several times faster
//! (`benches/pipeline.rs` group `sealer`); here the plaintext is copied once into the chunk
//! buffer, sealed there in place and written on.
//!
//! The format is age v1's, unchanged (<https://age-encryption.org/v1>): the `age` crate
//! writes the header (the recipients' stanzas, the MAC) and the 16-byte nonce, with a file
//! key it draws itself. The payload key is HKDF-SHA-256(ikm = file key, salt = nonce,
//! info = "payload"); the payload is the STREAM construction: ChaCha20-Poly1305 over 64 KiB
//! chunks, the nonce an 11-byte big-endian chunk counter and a last-chunk flag byte, only the
//! last chunk shorter than 64 KiB (empty only when the whole plaintext is), each followed by
//! its 16-byte tag. The file key reaches this module through [`KeyCapture`], a recipient that
//! wraps it for the real recipients and keeps a copy, wiped once the payload key is derived.
//! (ring does not wipe the payload key when the writer is dropped; it opens this one object
//! only, whose plaintext went through the same process's memory anyway.)
//! Tests: the `age` crate and the `age` command-line tool decrypt what this writes.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::Write;

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
        let nonce = &head[head.len() - NONCE..];
        let mut key = age_core::primitives::hkdf(nonce, PAYLOAD_KEY_LABEL, &file_key);
        file_key.zeroize();
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key);
        key.zeroize();
        let key = LessSafeKey::new(unbound.expect("HKDF gives the 32 bytes of a key"));
        inner.write_all(&head)?;
        Ok(PayloadWriter {
            inner,
            key,
            counter: 0,
            buf: vec![0u8; CHUNK + TAG]
                .into_boxed_slice()
                .try_into()
                .expect("the length is CHUNK + TAG"),
            len: 0,
        })
    }

    /// Encrypts the chunk held in place, appends its tag and writes both on.
    fn seal_chunk(&mut self, last: bool) -> std::io::Result<()> {
        // 11 bytes of big-endian counter (a u64's 8 in the low ones), then the flag.
        let mut nonce = [0u8; 12];
        nonce[3..11].copy_from_slice(&self.counter.to_be_bytes());
        nonce[11] = u8::from(last);
        let (plain, tag_room) = self.buf.split_at_mut(self.len);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), plain)
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
}
