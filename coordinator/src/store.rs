//! The coordinator's own object work (checking blobs before a commit, deleting on flush): a
//! trait with two implementations: the embedded store's here, which works on the same files the
//! embedded S3 endpoint serves, and an S3 bucket's in `store/s3.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use s3s::S3;

use crate::error::Error;

pub mod s3;

/// A count of objects and their bytes: what a deletion removed, or what a prefix holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectTotals {
    pub count: u64,
    pub bytes: u64,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub key: String,
    pub size: u64,
    /// When it was last written (unix seconds).
    pub modified_unix: i64,
}

/// What the store really holds under a blob's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    Intact,
    Missing,
    /// It did not hash to its digest, and was deleted.
    Corrupt,
}

/// The sha256 of a file's bytes, as hex.
pub(crate) fn file_sha256_hex(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Which objects of a prefix a deletion keeps, by key.
pub type KeepObject<'a> = dyn Fn(&str) -> bool + Send + Sync + 'a;

/// Keeps nothing: a flush.
pub fn keep_nothing(_key: &str) -> bool {
    false
}

#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync {
    /// The size of an object, or `None` when it does not exist.
    async fn object_size(&self, key: &str) -> Result<Option<u64>, Error>;
    /// Deletes the objects of `keys`; a key with no object is no error.
    async fn delete_keys(&self, keys: &[String]) -> Result<(), Error>;
    /// Deletes every object whose key starts with `prefix` (which ends in `/`), but those
    /// `keep` says to keep.
    async fn delete_prefix(&self, prefix: &str, keep: &KeepObject<'_>) -> Result<ObjectTotals, Error> {
        Ok(delete_unkept(self, prefix, keep).await?.0)
    }
    /// Every object stored under `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>, Error>;
    /// How many objects are stored under `prefix`, and their bytes.
    async fn usage(&self, prefix: &str) -> Result<ObjectTotals, Error> {
        let objects = self.list(prefix).await?;
        Ok(ObjectTotals { count: objects.len() as u64, bytes: objects.iter().map(|object| object.size).sum() })
    }
    /// What is stored under a blob's `key`, checked against its `digest` (read and hashed, or
    /// on S3 by its stored SHA-256 checksum); a corrupt object is deleted. For a restore's
    /// report of a bad blob, so it does not trust the endpoint's check at write time.
    async fn check_blob(&self, key: &str, digest: &str) -> Result<BlobState, Error>;
    /// Whether the stored blob under `key` hashes to `digest` (`sha256:<hex>`); one that does
    /// not is deleted, so the next upload of the blob can land. The embedded endpoint checks
    /// every blob while it is written, so by default the answer is yes without reading.
    async fn verify_blob(&self, key: &str, digest: &str) -> Result<bool, Error> {
        let _ = (key, digest);
        Ok(true)
    }
}

/// Deletes the objects under `prefix` that `keep` does not keep: what was deleted, and how
/// many were kept.
async fn delete_unkept<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &str,
    keep: &KeepObject<'_>,
) -> Result<(ObjectTotals, usize), Error> {
    let listed = store.list(prefix).await?;
    let n_listed = listed.len();
    let doomed: Vec<StoredObject> = listed.into_iter().filter(|object| !keep(&object.key)).collect();
    let keys: Vec<String> = doomed.iter().map(|object| object.key.clone()).collect();
    store.delete_keys(&keys).await?;
    let deleted = ObjectTotals { count: doomed.len() as u64, bytes: doomed.iter().map(|object| object.size).sum() };
    Ok((deleted, n_listed - doomed.len()))
}

/// The embedded store: objects are files under `<objects_root>/<bucket>/`.
pub struct EmbeddedStore {
    file_system: Arc<s3s_fs::FileSystem>,
    bucket_dir: PathBuf,
    bucket: String,
}

impl EmbeddedStore {
    pub fn new(objects_root: &Path, bucket: &str) -> Result<EmbeddedStore, Error> {
        let file_system = s3s_fs::FileSystem::new(objects_root).map_err(|error| Error::store(format!("{error:?}")))?;
        Ok(EmbeddedStore {
            file_system: Arc::new(file_system),
            bucket_dir: objects_root.join(bucket),
            bucket: bucket.to_owned(),
        })
    }
}

/// Every file under `dir`, its key relative to `bucket_dir`.
fn list_files(bucket_dir: &Path, dir: &Path) -> std::io::Result<Vec<StoredObject>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_file() {
                let path = entry.path();
                let relative = path.strip_prefix(bucket_dir).map_err(std::io::Error::other)?;
                let key = relative.iter().map(|part| part.to_string_lossy()).collect::<Vec<_>>().join("/");
                let metadata = entry.metadata()?;
                let modified = metadata.modified()?.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                files.push(StoredObject { key, size: metadata.len(), modified_unix: modified.as_secs() as i64 });
            }
        }
    }
    Ok(files)
}

fn internal_request<T>(input: T) -> s3s::S3Request<T> {
    s3s::S3Request {
        input,
        method: http::Method::DELETE,
        uri: http::Uri::from_static("/"),
        headers: http::HeaderMap::new(),
        extensions: http::Extensions::new(),
        credentials: None,
        region: None,
        service: None,
        trailing_headers: None,
    }
}

#[async_trait::async_trait]
impl ObjectStore for EmbeddedStore {
    async fn object_size(&self, key: &str) -> Result<Option<u64>, Error> {
        match tokio::fs::metadata(self.bucket_dir.join(key)).await {
            Ok(metadata) if metadata.is_file() => Ok(Some(metadata.len())),
            Ok(_) => Ok(None),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(Error::store_cause(key, error)),
        }
    }

    async fn check_blob(&self, key: &str, digest: &str) -> Result<BlobState, Error> {
        let path = self.bucket_dir.join(key);
        let hashed = tokio::task::spawn_blocking({
            let path = path.clone();
            move || file_sha256_hex(&path)
        })
        .await?;
        match hashed {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(BlobState::Missing),
            Err(error) => Err(Error::store_cause(key, error)),
            Ok(actual) if Some(actual.as_str()) == digest.strip_prefix("sha256:") => Ok(BlobState::Intact),
            Ok(_) => {
                tokio::fs::remove_file(&path).await.map_err(|error| Error::store_cause(key, error))?;
                Ok(BlobState::Corrupt)
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>, Error> {
        let (bucket_dir, dir) = (self.bucket_dir.clone(), self.bucket_dir.join(prefix.trim_end_matches('/')));
        tokio::task::spawn_blocking(move || list_files(&bucket_dir, &dir))
            .await?
            .map_err(|error| Error::store_cause(format!("listing {prefix}"), error))
    }

    async fn delete_keys(&self, keys: &[String]) -> Result<(), Error> {
        for key in keys {
            if self.object_size(key).await?.is_none() {
                continue;
            }
            // Through s3s-fs, so its metadata files go with the object.
            let input = s3s::dto::DeleteObjectInput::builder()
                .bucket(self.bucket.clone())
                .key(key.clone())
                .build()
                .map_err(|error| Error::store_cause(format!("deleting {key}"), error))?;
            self.file_system
                .delete_object(internal_request(input))
                .await
                .map_err(|error| Error::store(format!("deleting {key}: {error}")))?;
        }
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &str, keep: &KeepObject<'_>) -> Result<ObjectTotals, Error> {
        let (deleted, n_kept) = delete_unkept(self, prefix, keep).await?;
        if n_kept > 0 {
            return Ok(deleted);
        }
        let prefix_dir = self.bucket_dir.join(prefix.trim_end_matches('/'));
        match tokio::fs::remove_dir_all(&prefix_dir).await {
            Ok(()) => Ok(deleted),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(deleted),
            Err(error) => Err(Error::store_cause(format!("removing {}", prefix_dir.display()), error)),
        }
    }
}
