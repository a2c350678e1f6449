//! One sealed item on disk: the header, the chunking and the AAD, and the STREAM
//! encryption and decryption of one item. No file I/O here: [`crate::seal`] feeds
//! chunks from a file and [`crate::open_item`] passes bytes in memory.

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::{self, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;

use crate::limits::{CHUNK_PLAINTEXT_BYTES, HEADER_BYTES, NONCE_PREFIX_BYTES, TAG_BYTES};
use crate::SEAL_VERSION;

/// The first 8 bytes of every sealed item file.
pub const ITEM_MAGIC: [u8; 8] = *b"TSRSEAL1";

/// The first bytes of every chunk's AAD (domain separation from any other use of the
/// same key, which there should be none of).
pub const AAD_DOMAIN: &[u8] = b"tessera-seal-v1";

/// AAD bytes: domain, manifest id (32), item index (u32 LE), header.
pub const AAD_BYTES: usize = AAD_DOMAIN.len() + 32 + 4 + HEADER_BYTES;

/// Chunks of an item of `plaintext_bytes`: one per started 64 KiB, and one (empty)
/// for an empty item, since STREAM ends with a last chunk.
pub fn chunk_count(plaintext_bytes: u64) -> u64 {
    plaintext_bytes
        .div_ceil(CHUNK_PLAINTEXT_BYTES as u64)
        .max(1)
}

/// Plaintext bytes of chunk `chunk` (< [`chunk_count`]) of an item.
pub(crate) fn chunk_plaintext_bytes(plaintext_bytes: u64, chunk: u64) -> usize {
    let start = chunk * CHUNK_PLAINTEXT_BYTES as u64;
    (plaintext_bytes - start).min(CHUNK_PLAINTEXT_BYTES as u64) as usize
}

/// Bytes of the sealed file of an item of `plaintext_bytes`: header, plaintext, one
/// tag per chunk. `None` if that overflows a u64.
pub fn sealed_len(plaintext_bytes: u64) -> Option<u64> {
    chunk_count(plaintext_bytes)
        .checked_mul(TAG_BYTES as u64)?
        .checked_add(plaintext_bytes)?
        .checked_add(HEADER_BYTES as u64)
}

/// The header at the start of a sealed item file. It is bound into every chunk's
/// AAD, so a changed header fails authentication even where its own checks pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub index: u32,
    pub plaintext_bytes: u64,
    pub nonce_prefix: [u8; NONCE_PREFIX_BYTES],
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..8].copy_from_slice(&ITEM_MAGIC);
        h[8..12].copy_from_slice(&SEAL_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.index.to_le_bytes());
        h[16..24].copy_from_slice(&self.plaintext_bytes.to_le_bytes());
        h[24..31].copy_from_slice(&self.nonce_prefix);
        // h[31] is reserved and zero.
        h
    }

    /// Decodes a header, checking magic, version and the reserved byte.
    pub fn decode(h: &[u8; HEADER_BYTES]) -> Result<Header, String> {
        if h[..8] != ITEM_MAGIC {
            return Err("bad magic bytes: not a sealed Tessera item".into());
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if version != SEAL_VERSION {
            return Err(format!("format version {version}, expected {SEAL_VERSION}"));
        }
        if h[31] != 0 {
            return Err(format!("reserved byte is {}, expected 0", h[31]));
        }
        Ok(Header {
            index: u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")),
            plaintext_bytes: u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")),
            nonce_prefix: h[24..31].try_into().expect("7 bytes"),
        })
    }
}

/// The AAD of every chunk of an item: `AAD_DOMAIN || manifest_id || index (u32 LE) ||
/// header`.
pub(crate) fn aad(manifest_id: &[u8; 32], index: u32, header: &[u8; HEADER_BYTES]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_BYTES);
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(manifest_id);
    aad.extend_from_slice(&index.to_le_bytes());
    aad.extend_from_slice(header);
    debug_assert_eq!(aad.len(), AAD_BYTES);
    aad
}

/// Encrypts an item chunk by chunk, in place: the caller hands it each chunk's
/// plaintext in order, exactly [`chunk_plaintext_bytes`] long, and writes what it
/// leaves in the buffer.
pub(crate) struct ItemSealer {
    encryptor: Option<EncryptorBE32<ChaCha20Poly1305>>,
    aad: Vec<u8>,
    chunks_left: u64,
}

impl ItemSealer {
    pub fn new(key: &[u8; 32], manifest_id: &[u8; 32], header: &Header) -> ItemSealer {
        let cipher = ChaCha20Poly1305::new(key.into());
        ItemSealer {
            encryptor: Some(EncryptorBE32::from_aead(
                cipher,
                header.nonce_prefix.as_ref().into(),
            )),
            aad: aad(manifest_id, header.index, &header.encode()),
            chunks_left: chunk_count(header.plaintext_bytes),
        }
    }

    /// Replaces the plaintext in `buf` with its ciphertext and tag.
    pub fn seal_chunk(&mut self, buf: &mut Vec<u8>) {
        assert!(self.chunks_left > 0, "more chunks than the header's length");
        self.chunks_left -= 1;
        // Encryption fails only past STREAM's counter, which the limits rule out.
        if self.chunks_left == 0 {
            let encryptor = self.encryptor.take().expect("the last chunk comes once");
            encryptor.encrypt_last_in_place(&self.aad, buf)
        } else {
            let encryptor = self.encryptor.as_mut().expect("not past the last chunk");
            encryptor.encrypt_next_in_place(&self.aad, buf)
        }
        .expect("chunk count within STREAM's 32-bit counter (limits.rs)");
    }

    pub fn is_done(&self) -> bool {
        self.chunks_left == 0
    }
}

/// The part of a `Vec` after `start`, as a buffer STREAM decrypts in place: each chunk
/// is decrypted where its plaintext ends up, without a second copy.
struct Tail<'a> {
    vec: &'a mut Vec<u8>,
    start: usize,
}

impl AsRef<[u8]> for Tail<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.start..]
    }
}

impl AsMut<[u8]> for Tail<'_> {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..]
    }
}

impl aead::Buffer for Tail<'_> {
    fn extend_from_slice(&mut self, other: &[u8]) -> aead::Result<()> {
        self.vec.extend_from_slice(other);
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        self.vec.truncate(self.start + len);
    }
}

/// Decrypts the chunks after the header (`body`) of an item of `plaintext_bytes`.
/// On failure returns the index of the first chunk that did not authenticate (or is
/// missing, or, one past the last, the bytes after it).
pub(crate) fn open_body(
    key: &[u8; 32],
    manifest_id: &[u8; 32],
    header: &Header,
    body: &[u8],
    plaintext_bytes: u64,
) -> Result<Vec<u8>, u64> {
    let aad = aad(manifest_id, header.index, &header.encode());
    let cipher = ChaCha20Poly1305::new(key.into());
    let mut decryptor = Some(DecryptorBE32::from_aead(
        cipher,
        header.nonce_prefix.as_ref().into(),
    ));
    let chunks = chunk_count(plaintext_bytes);
    // Callers check `body` against `plaintext_bytes` first, so this allocation is
    // bounded by bytes already held.
    let mut out = Vec::with_capacity(body.len().min(plaintext_bytes as usize));
    let mut rest = body;
    for chunk in 0..chunks {
        let take = chunk_plaintext_bytes(plaintext_bytes, chunk) + TAG_BYTES;
        if rest.len() < take {
            return Err(chunk);
        }
        let (sealed, after) = rest.split_at(take);
        rest = after;
        let start = out.len();
        out.extend_from_slice(sealed);
        let mut tail = Tail {
            vec: &mut out,
            start,
        };
        let opened = if chunk + 1 == chunks {
            let decryptor = decryptor.take().expect("the last chunk comes once");
            decryptor.decrypt_last_in_place(&aad, &mut tail)
        } else {
            let decryptor = decryptor.as_mut().expect("not past the last chunk");
            decryptor.decrypt_next_in_place(&aad, &mut tail)
        };
        opened.map_err(|_| chunk)?;
    }
    if !rest.is_empty() {
        return Err(chunks);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: &[u8; 32], id: &[u8; 32], header: &Header, plaintext: &[u8]) -> Vec<u8> {
        let mut sealer = ItemSealer::new(key, id, header);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for chunk in 0..chunk_count(plaintext.len() as u64) {
            let start = chunk as usize * CHUNK_PLAINTEXT_BYTES;
            let len = chunk_plaintext_bytes(plaintext.len() as u64, chunk);
            buf.clear();
            buf.extend_from_slice(&plaintext[start..start + len]);
            sealer.seal_chunk(&mut buf);
            out.extend_from_slice(&buf);
        }
        assert!(sealer.is_done());
        out
    }

    #[test]
    fn sizes_count_one_tag_per_started_chunk() {
        let c = CHUNK_PLAINTEXT_BYTES as u64;
        assert_eq!(chunk_count(0), 1);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(c), 1);
        assert_eq!(chunk_count(c + 1), 2);
        assert_eq!(sealed_len(0), Some(32 + 16));
        assert_eq!(sealed_len(2 * c + 5), Some(32 + 2 * c + 5 + 3 * 16));
        assert_eq!(sealed_len(u64::MAX), None);
    }

    #[test]
    fn bodies_round_trip_at_chunk_edges() {
        let key = [7u8; 32];
        let id = [9u8; 32];
        let c = CHUNK_PLAINTEXT_BYTES;
        for len in [0, 1, c - 1, c, c + 1, 3 * c] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let header = Header {
                index: 3,
                plaintext_bytes: len as u64,
                nonce_prefix: [1, 2, 3, 4, 5, 6, 7],
            };
            let body = seal(&key, &id, &header, &plaintext);
            assert_eq!(
                HEADER_BYTES as u64 + body.len() as u64,
                sealed_len(len as u64).unwrap()
            );
            let opened = open_body(&key, &id, &header, &body, len as u64).unwrap();
            assert_eq!(opened, plaintext);
        }
    }

    /// Dropping whole chunks from the end, with a header and AAD that claim the
    /// shorter length, still fails: the chunk now read as the last was sealed as not
    /// the last (STREAM's last-chunk flag). This is the property a forged manifest
    /// cannot get around, so it is tested here below the manifest checks.
    #[test]
    fn chunks_dropped_at_the_end_do_not_authenticate() {
        let key = [7u8; 32];
        let id = [9u8; 32];
        let c = CHUNK_PLAINTEXT_BYTES;
        let plaintext = vec![5u8; 3 * c];
        let header = Header {
            index: 1,
            plaintext_bytes: 3 * c as u64,
            nonce_prefix: [0; 7],
        };
        let body = seal(&key, &id, &header, &plaintext);
        let two = &body[..2 * (c + TAG_BYTES)];
        assert_eq!(open_body(&key, &id, &header, two, 2 * c as u64), Err(1));
        // Chunks swapped: the first fails at its counter.
        let mut swapped = body.clone();
        swapped[..c + TAG_BYTES].copy_from_slice(&body[c + TAG_BYTES..2 * (c + TAG_BYTES)]);
        swapped[c + TAG_BYTES..2 * (c + TAG_BYTES)].copy_from_slice(&body[..c + TAG_BYTES]);
        assert_eq!(
            open_body(&key, &id, &header, &swapped, 3 * c as u64),
            Err(0)
        );
        // Bytes after the last chunk.
        let mut long = body.clone();
        long.push(0);
        assert_eq!(open_body(&key, &id, &header, &long, 3 * c as u64), Err(3));
    }

    #[test]
    fn headers_round_trip_and_refuse_other_formats() {
        let h = Header {
            index: 12,
            plaintext_bytes: 1 << 33,
            nonce_prefix: [9, 8, 7, 6, 5, 4, 3],
        };
        let bytes = h.encode();
        assert_eq!(Header::decode(&bytes), Ok(h));
        for (at, what) in [(0, "magic"), (8, "version"), (31, "reserved")] {
            let mut bad = bytes;
            bad[at] ^= 1;
            let e = Header::decode(&bad).unwrap_err();
            assert!(e.contains(what), "{e}");
        }
    }
}
