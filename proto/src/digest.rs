//! Content digests, in one place: the `sha256:<64 hex>` form every side writes, computed from
//! bytes at once or as they stream, and the hex part an object key or a file name uses.

use sha2::{Digest as _, Sha256};

/// The prefix of every digest the cache handles.
pub const SHA256_PREFIX: &str = "sha256:";

/// `sha256:` and the lower-case hex SHA-256 of `bytes`.
pub fn sha256_digest(bytes: impl AsRef<[u8]>) -> String {
    format!("{SHA256_PREFIX}{}", sha256_hex(bytes))
}

/// The lower-case hex SHA-256 of `bytes`, without the prefix.
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    hex::encode(Sha256::digest(bytes.as_ref()))
}

/// The hex part of a digest (`sha256:ab…` → `ab…`); a bare hex string is returned as it is.
pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix(SHA256_PREFIX).unwrap_or(digest)
}

/// A SHA-256 computed as bytes stream past, finished as a digest.
#[derive(Clone, Default)]
pub struct DigestHasher {
    hasher: Sha256,
    size: u64,
}

impl DigestHasher {
    pub fn new() -> DigestHasher {
        DigestHasher::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
    }

    /// How many bytes went through so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `sha256:` and the hex digest of everything that went through.
    pub fn finish(self) -> String {
        format!("{SHA256_PREFIX}{}", self.finish_hex())
    }

    /// The hex digest of everything that went through, without the prefix.
    pub fn finish_hex(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_digest_equals_the_digest_of_the_whole() {
        let mut hasher = DigestHasher::new();
        hasher.update(b"hello ");
        hasher.update(b"world");
        assert_eq!(hasher.size(), 11);
        assert_eq!(hasher.finish(), sha256_digest(b"hello world"));
        assert_eq!(
            sha256_digest(b"hello world"),
            "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(digest_hex("sha256:ab"), "ab");
        assert_eq!(digest_hex("ab"), "ab");
    }
}
