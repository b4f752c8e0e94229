//! A content store as this worker reaches it: a folder of `<hex>` blob files read in place (the
//! engine's containerd content store, a BuildKit cache folder's `blobs/sha256`), or the
//! engine's containerd through its socket (`containerd.rs`) where the files are out of sight.
//! A save reads the blobs it uploads through it; a restore may ask whether the host already
//! holds a blob. Where the engine's store is, `save_source.rs` alone knows.
//!
//! Its calls block (but [`ContentStore::holds`]): make them from a blocking thread. Nothing read here is trusted: whoever
//! reads a blob checks it against its digest as it streams.

use std::io::Read;
use std::path::PathBuf;

use crate::containerd::ContentClient;

/// Where a content store's blobs are read from.
#[derive(Debug, Clone)]
pub enum ContentStore {
    /// A folder of `<hex>` files.
    Folder(PathBuf),
    /// containerd's Content service, in the engine's namespace.
    Socket(ContentClient),
}

fn not_found(digest: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotFound, format!("no blob {digest}"))
}

/// The hex of a checked digest: nothing else names a file or is asked for.
fn checked_hex(digest: &str) -> std::io::Result<&str> {
    proto::names::validate_digest(digest).map_err(|error| std::io::Error::other(error.to_string()))?;
    Ok(proto::digest::digest_hex(digest))
}

impl ContentStore {
    /// The size of the blob `digest`, or `None` when the store does not hold it.
    pub fn size(&self, digest: &str) -> std::io::Result<Option<u64>> {
        let hex = checked_hex(digest)?;
        match self {
            ContentStore::Folder(dir) => match std::fs::metadata(dir.join(hex)) {
                Ok(metadata) if metadata.is_file() => Ok(Some(metadata.len())),
                Ok(_) => Ok(None),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(error),
            },
            ContentStore::Socket(client) => client.size_blocking(digest),
        }
    }

    /// Whether the store holds the blob `digest` (a store that cannot answer holds nothing).
    pub fn has(&self, digest: &str) -> bool {
        matches!(self.size(digest), Ok(Some(_)))
    }

    /// [`ContentStore::has`] for async callers (a restore asking which blobs the host holds).
    pub async fn holds(&self, digest: &str) -> bool {
        match self {
            ContentStore::Folder(_) => self.has(digest),
            ContentStore::Socket(client) => {
                checked_hex(digest).is_ok() && matches!(client.size(digest).await, Ok(Some(_)))
            }
        }
    }

    /// The blob `digest`, its size and a reader of its bytes; an absent blob is `NotFound`.
    pub fn open(&self, digest: &str) -> std::io::Result<(u64, Box<dyn Read + Send>)> {
        let hex = checked_hex(digest)?;
        match self {
            ContentStore::Folder(dir) => {
                let file = std::fs::File::open(dir.join(hex))?;
                let metadata = file.metadata()?;
                if !metadata.is_file() {
                    return Err(not_found(digest));
                }
                Ok((metadata.len(), Box::new(file)))
            }
            ContentStore::Socket(client) => {
                let (size, reader) = client.open(digest)?;
                Ok((size, Box::new(reader)))
            }
        }
    }

    /// Where the store is, for the log.
    pub fn describe(&self) -> String {
        match self {
            ContentStore::Folder(dir) => dir.display().to_string(),
            ContentStore::Socket(client) => format!("containerd at {}", client.socket().display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_holds_the_files_named_by_checked_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::Folder(dir.path().to_owned());
        let held = format!("sha256:{}", "a".repeat(64));
        let absent = format!("sha256:{}", "b".repeat(64));
        std::fs::write(dir.path().join("a".repeat(64)), b"layer").unwrap();
        std::fs::create_dir(dir.path().join("c".repeat(64))).unwrap();
        assert!(store.has(&held) && !store.has(&absent));
        assert!(!store.has(&format!("sha256:{}", "c".repeat(64))), "a folder is no blob");
        assert_eq!(store.size(&held).unwrap(), Some(5));
        let (size, mut reader) = store.open(&held).unwrap();
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).unwrap();
        assert_eq!((size, bytes.as_slice()), (5, &b"layer"[..]));
        assert_eq!(store.open(&absent).err().unwrap().kind(), std::io::ErrorKind::NotFound);
        std::fs::write(dir.path().join("passwd"), b"x").unwrap();
        assert!(store.size("sha256:../passwd").is_err() && store.open("passwd").is_err(), "bad digests name no file");
        assert_eq!(store.describe(), dir.path().display().to_string());
    }
}
