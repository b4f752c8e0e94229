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

/// A multipart upload begun and never completed nor aborted: its parts take room that no
/// object listing shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    /// Its parts' bytes (0 where the store does not say).
    pub bytes: u64,
    /// When it was begun or last given a part, whichever is later (unix seconds).
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
    /// `keep` says to keep; incomplete multipart uploads of such keys are aborted alike.
    async fn delete_prefix(&self, prefix: &str, keep: &KeepObject<'_>) -> Result<ObjectTotals, Error> {
        Ok(delete_unkept(self, prefix, keep).await?.0)
    }
    /// Every object stored under `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>, Error>;
    /// The incomplete multipart uploads of objects under `prefix`.
    async fn pending_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, Error>;
    /// Aborts `uploads`, their parts removed; one already gone is no error.
    async fn abort_uploads(&self, uploads: &[PendingUpload]) -> Result<(), Error>;
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

/// The incomplete uploads under `prefix`; none, logged, when the store will not list them (an
/// S3 policy written before the coordinator asked for `s3:ListBucketMultipartUploads`), so a
/// flush or a collection still does the rest of its work.
pub async fn pending_uploads_or_none<S: ObjectStore + ?Sized>(store: &S, prefix: &str) -> Vec<PendingUpload> {
    match store.pending_uploads(prefix).await {
        Ok(uploads) => uploads,
        Err(error) => {
            tracing::warn!(prefix, error = %error.line(), "listing incomplete multipart uploads failed; they are left");
            Vec::new()
        }
    }
}

/// Deletes the objects under `prefix` that `keep` does not keep, and aborts the incomplete
/// uploads of such keys (each counted as one object): what was deleted, and how many objects
/// were kept.
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
    let uploads: Vec<PendingUpload> =
        pending_uploads_or_none(store, prefix).await.into_iter().filter(|upload| !keep(&upload.key)).collect();
    let uploads = match store.abort_uploads(&uploads).await {
        Ok(()) => uploads,
        Err(error) => {
            tracing::warn!(prefix, error = %error.line(), "aborting incomplete multipart uploads failed; they are left");
            Vec::new()
        }
    };
    let deleted = ObjectTotals {
        count: (doomed.len() + uploads.len()) as u64,
        bytes: doomed.iter().map(|object| object.size).sum::<u64>()
            + uploads.iter().map(|upload| upload.bytes).sum::<u64>(),
    };
    Ok((deleted, n_listed - doomed.len()))
}

/// The embedded store: objects are files under `<objects_root>/<bucket>/`; s3s-fs keeps a
/// multipart upload's record, metadata and parts as files at `<objects_root>` itself.
pub struct EmbeddedStore {
    file_system: Arc<s3s_fs::FileSystem>,
    objects_root: PathBuf,
    bucket_dir: PathBuf,
    bucket: String,
}

impl EmbeddedStore {
    pub fn new(objects_root: &Path, bucket: &str) -> Result<EmbeddedStore, Error> {
        let file_system = s3s_fs::FileSystem::new(objects_root).map_err(|error| Error::store(format!("{error:?}")))?;
        Ok(EmbeddedStore {
            file_system: Arc::new(file_system),
            objects_root: objects_root.to_path_buf(),
            bucket_dir: objects_root.join(bucket),
            bucket: bucket.to_owned(),
        })
    }
}

/// The files of s3s-fs's incomplete multipart uploads at `root` whose object is in `bucket`
/// under `prefix`, each upload with its files. s3s-fs names them
/// `.bucket-<b64 bucket>.object-<b64 key>.upload-<id>.metadata.json` (written when the upload
/// begins), `.upload-<id>.json` (who began it) and `.upload_id-<id>.part-<n>`.
fn upload_files(root: &Path, bucket: &str, prefix: &str) -> std::io::Result<Vec<(PendingUpload, Vec<PathBuf>)>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let object_tag = format!(".bucket-{}.object-", b64.encode(bucket));
    let mut uploads: std::collections::BTreeMap<String, (PendingUpload, Vec<PathBuf>)> = Default::default();
    // Every upload file at the root, by upload ID: its path, size and time.
    let mut files_of: std::collections::HashMap<String, Vec<(PathBuf, u64, i64)>> = Default::default();
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let metadata = match entry.metadata() {
            Ok(metadata) if metadata.is_file() => metadata,
            _ => continue,
        };
        let modified = metadata.modified()?.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        let file = (entry.path(), metadata.len(), modified);
        if let Some(rest) = name.strip_prefix(&object_tag).and_then(|rest| rest.strip_suffix(".metadata.json")) {
            let Some((key_b64, upload_id)) = rest.rsplit_once(".upload-") else { continue };
            let Some(key) = b64.decode(key_b64).ok().and_then(|key| String::from_utf8(key).ok()) else { continue };
            if key.starts_with(prefix) {
                let upload = PendingUpload { key, upload_id: upload_id.to_owned(), bytes: 0, modified_unix: modified };
                uploads.insert(upload_id.to_owned(), (upload, vec![file.0]));
            }
        } else if let Some(upload_id) = name.strip_prefix(".upload-").and_then(|rest| rest.strip_suffix(".json")) {
            files_of.entry(upload_id.to_owned()).or_default().push(file);
        } else if let Some((upload_id, _)) = name.strip_prefix(".upload_id-").and_then(|rest| rest.split_once(".part-"))
        {
            files_of.entry(upload_id.to_owned()).or_default().push(file);
        }
    }
    for (upload_id, (upload, paths)) in &mut uploads {
        for (path, size, modified) in files_of.remove(upload_id).unwrap_or_default() {
            upload.bytes += size;
            upload.modified_unix = upload.modified_unix.max(modified);
            paths.push(path);
        }
    }
    Ok(uploads.into_values().collect())
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

    /// Objects and incomplete uploads alike (an upload as one object: its parts' bytes).
    async fn usage(&self, prefix: &str) -> Result<ObjectTotals, Error> {
        let objects = self.list(prefix).await?;
        let uploads = self.pending_uploads(prefix).await?;
        Ok(ObjectTotals {
            count: (objects.len() + uploads.len()) as u64,
            bytes: objects.iter().map(|object| object.size).sum::<u64>()
                + uploads.iter().map(|upload| upload.bytes).sum::<u64>(),
        })
    }

    async fn pending_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, Error> {
        let (root, bucket, key_prefix) = (self.objects_root.clone(), self.bucket.clone(), prefix.to_owned());
        let found = tokio::task::spawn_blocking(move || upload_files(&root, &bucket, &key_prefix))
            .await?
            .map_err(|error| Error::store_cause(format!("listing the uploads under {prefix}"), error))?;
        Ok(found.into_iter().map(|(upload, _)| upload).collect())
    }

    async fn abort_uploads(&self, uploads: &[PendingUpload]) -> Result<(), Error> {
        let (root, bucket) = (self.objects_root.clone(), self.bucket.clone());
        let doomed: std::collections::HashSet<(String, String)> =
            uploads.iter().map(|upload| (upload.key.clone(), upload.upload_id.clone())).collect();
        tokio::task::spawn_blocking(move || {
            for (upload, paths) in upload_files(&root, &bucket, "")? {
                if !doomed.contains(&(upload.key, upload.upload_id)) {
                    continue;
                }
                for path in paths {
                    match std::fs::remove_file(&path) {
                        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
                        _ => {}
                    }
                }
            }
            Ok(())
        })
        .await?
        .map_err(|error| Error::store_cause("aborting incomplete uploads", error))
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
