//! The seam between the protocol and whatever keeps the bytes: what a registry view asks of
//! its backend, and the errors a backend answers with (each one OCI error code).

use bytes::Bytes;
use futures::stream::BoxStream;

/// What a manifest request names: a tag (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`) or a digest
/// (`sha256:<64 hex>`), both validated by the protocol before a backend sees them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(String),
}

/// A manifest as stored: its exact bytes, their media type and their digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestBody {
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub bytes: Bytes,
}

/// The bytes `[start, end]` of a blob (both inclusive, as HTTP's `Range` names them), already
/// checked to lie inside the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// A blob being read: its whole size, and the bytes asked for (the whole blob, or the range).
/// A backend verifies a whole read against the digest as it streams and ends the stream with
/// an error rather than yield its last piece when it does not match, so a client never keeps
/// bytes that are not the blob's.
pub struct BlobRead {
    pub size: u64,
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
}

/// A finished upload, verified by the protocol: the file holds exactly `size` bytes whose
/// sha256 is `digest`. The file is deleted when this is dropped.
#[derive(Debug)]
pub struct UploadedBlob {
    pub digest: String,
    pub size: u64,
    pub path: tempfile::TempPath,
}

/// What a backend answers instead; each is one OCI error code and one line of text a build log
/// shows as it is (so it names the thing and what to do, and never a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// 404 `BLOB_UNKNOWN`.
    #[error("blob unknown to the cache: {0}")]
    BlobUnknown(String),
    /// 404 `MANIFEST_UNKNOWN`.
    #[error("manifest unknown to the cache: {0}")]
    ManifestUnknown(String),
    /// 400 `MANIFEST_INVALID`.
    #[error("{0}")]
    ManifestInvalid(String),
    /// 400 `MANIFEST_BLOB_UNKNOWN`: a pushed manifest names a blob neither uploaded nor stored.
    #[error("the manifest names blob {0}, which was neither uploaded nor is stored")]
    ManifestBlobUnknown(String),
    /// 400 `DIGEST_INVALID`.
    #[error("{0}")]
    DigestInvalid(String),
    /// 400 `NAME_INVALID`.
    #[error("{0}")]
    NameInvalid(String),
    /// 400 `TAG_INVALID`.
    #[error("{0}")]
    TagInvalid(String),
    /// 400 `SIZE_INVALID`.
    #[error("{0}")]
    SizeInvalid(String),
    /// 403 `DENIED`: the token may not do this (e.g. write a branch it may only read).
    #[error("{0}")]
    Denied(String),
    /// 405 `UNSUPPORTED`: an operation this view does not offer (e.g. deletes).
    #[error("{0}")]
    Unsupported(String),
    /// 503 `UNAVAILABLE`: the store or the coordinator did not answer in time; a client may
    /// retry.
    #[error("{0}")]
    Unavailable(String),
    /// 500 `UNKNOWN`.
    #[error("{0}")]
    Internal(String),
}

impl RegistryError {
    /// The OCI error code.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::BlobUnknown(_) => "BLOB_UNKNOWN",
            RegistryError::ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            RegistryError::ManifestInvalid(_) => "MANIFEST_INVALID",
            RegistryError::ManifestBlobUnknown(_) => "MANIFEST_BLOB_UNKNOWN",
            RegistryError::DigestInvalid(_) => "DIGEST_INVALID",
            RegistryError::NameInvalid(_) => "NAME_INVALID",
            RegistryError::TagInvalid(_) => "TAG_INVALID",
            RegistryError::SizeInvalid(_) => "SIZE_INVALID",
            RegistryError::Denied(_) => "DENIED",
            RegistryError::Unsupported(_) => "UNSUPPORTED",
            RegistryError::Unavailable(_) => "UNAVAILABLE",
            RegistryError::Internal(_) => "UNKNOWN",
        }
    }

    /// The HTTP status it is answered with.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            RegistryError::BlobUnknown(_) | RegistryError::ManifestUnknown(_) => StatusCode::NOT_FOUND,
            RegistryError::Denied(_) => StatusCode::FORBIDDEN,
            RegistryError::Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            RegistryError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// What keeps the bytes behind a registry view. `repository` is a validated distribution name
/// (`[a-z0-9]+(?:[._-][a-z0-9]+)*` components joined by `/`); digests are validated
/// `sha256:<64 hex>`.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The manifest `reference` names in `repository`, or `None` (answered `MANIFEST_UNKNOWN`).
    async fn manifest(&self, repository: &str, reference: &Reference) -> Result<Option<ManifestBody>, RegistryError>;

    /// The size of a blob this view serves (or that a push need not send: a `HEAD` answered
    /// present means the client skips the upload, so it must mean a later manifest naming it
    /// is accepted), or `None`.
    async fn blob_size(&self, repository: &str, digest: &str) -> Result<Option<u64>, RegistryError>;

    /// Reads a blob, whole or a range of it; `None` when this view does not serve it.
    async fn read_blob(
        &self,
        repository: &str,
        digest: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobRead>, RegistryError>;

    /// Takes a verified upload. Called before the upload's final `PUT` is answered.
    async fn blob_uploaded(&self, repository: &str, blob: UploadedBlob) -> Result<(), RegistryError>;

    /// Takes a pushed manifest (bytes within the protocol's cap, digest computed by the
    /// protocol; a `Reference::Digest` was checked to match). Called before the `PUT` is
    /// answered, so a backend that commits it answers only once it is committed.
    async fn put_manifest(
        &self,
        repository: &str,
        reference: &Reference,
        manifest: ManifestBody,
    ) -> Result<(), RegistryError>;

    /// Whether a push to `repository` may begin: asked before an upload starts (`POST`, also a
    /// mount or a monolithic upload) and before a manifest `PUT` is read, so a view that may not
    /// write refuses (`Denied`, one line the build log shows) before any byte is spooled.
    /// Optional: the default lets every push begin (`blob_uploaded` and `put_manifest` still
    /// decide).
    async fn check_push(&self, repository: &str) -> Result<(), RegistryError> {
        let _ = repository;
        Ok(())
    }

    /// The tags of `repository`, for `GET /v2/<name>/tags/list` (which `skopeo inspect` asks
    /// for). Optional: a backend that does not list answers `UNSUPPORTED`, as this default does.
    async fn tags(&self, repository: &str) -> Result<Vec<String>, RegistryError> {
        let _ = repository;
        Err(RegistryError::Unsupported("this registry view does not list tags".to_owned()))
    }
}
