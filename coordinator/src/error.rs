//! The coordinator's errors. Variants are causes; `api.rs` maps each to a gRPC code on purpose,
//! since the code decides whether a caller retries.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data directory {} is in use by another cache-coordinator: stop it or pick another --data-dir", .0.display())]
    DataDirLocked(PathBuf),
    #[error("data directory {} cannot be used: {reason}", path.display())]
    DataDir { path: PathBuf, reason: String },
    #[error("database error: {0}")]
    Database(String),
    /// The disk under the data directory refuses writes: full, out of inodes, over quota or
    /// read-only. Said in those words, in the worker's line and the coordinator's log.
    #[error("the coordinator cannot write its data directory: {0}")]
    DataDirUnwritable(String),
    #[error("stored state is corrupt ({0}): restore the data directory from a backup")]
    CorruptState(String),
    #[error("project {0:?} already exists")]
    ProjectExists(String),
    #[error("no project named {0:?}")]
    NoSuchProject(String),
    #[error("no cache for service {service:?} in project {project:?}")]
    NoSuchCache { project: String, service: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    SaveConflict(String),
    /// A project is at one of its bounds (saves in progress, blobs they hold): it must wait.
    #[error("{0}")]
    TooMany(String),
    /// A save would take more than its project's quota alone: it is not stored.
    #[error("{0}")]
    OverQuota(String),
    #[error("{0}")]
    BlobNotStored(String),
    /// A stored blob did not hash to its digest (planted, or corrupted in the store): it was
    /// deleted, and the save should upload it again.
    #[error("{0}")]
    BlobCorrupt(String),
    #[error("unknown save {0:?}: it expired or the coordinator restarted; save again")]
    NoSuchSave(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// A scoped token asked for a branch outside its scope.
    #[error("{0}")]
    OutOfScope(String),
    #[error("object store error: {0}")]
    Store(String),
    #[error("{0}")]
    Credentials(String),
}

/// The cause of a failed write, when it is the disk's: what an operator must fix, in words.
pub fn disk_problem(error: &std::io::Error) -> Option<String> {
    let cause = match error.kind() {
        std::io::ErrorKind::StorageFull => "its disk is full (no space or no inodes left): free space on it",
        std::io::ErrorKind::QuotaExceeded => "its disk quota is exceeded: raise the quota or free space",
        std::io::ErrorKind::ReadOnlyFilesystem => "its file system is read-only: remount it read-write",
        std::io::ErrorKind::PermissionDenied => "permission denied: give the coordinator's user write access",
        _ => return None,
    };
    Some(format!("{cause} ({error})"))
}

impl From<proto::names::InvalidName> for Error {
    fn from(error: proto::names::InvalidName) -> Self {
        Error::InvalidArgument(error.to_string())
    }
}

/// One line for a failed AWS SDK call: the service's error code and message, or the chain of
/// causes of a request that never got an answer (SDK errors print as many lines otherwise).
pub fn sdk_error_line<E, R>(error: &aws_sdk_s3::error::SdkError<E, R>) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    if let Some(service_error) = error.as_service_error() {
        let code = service_error.code().unwrap_or("error");
        return match service_error.message() {
            Some(message) => format!("{code}: {message}"),
            None => code.to_owned(),
        };
    }
    let mut parts = vec![error.to_string()];
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ").replace('\n', " ")
}
