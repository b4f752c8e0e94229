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
    #[error("{0}")]
    BlobNotStored(String),
    #[error("unknown save {0:?}: it expired or the coordinator restarted; save again")]
    NoSuchSave(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("object store error: {0}")]
    Store(String),
}

impl From<proto::names::InvalidName> for Error {
    fn from(error: proto::names::InvalidName) -> Self {
        Error::InvalidArgument(error.to_string())
    }
}
