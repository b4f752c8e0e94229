//! The coordinator's errors. Variants are causes; `api.rs` maps each to a gRPC code on purpose,
//! since the code decides whether a caller retries.

use std::path::PathBuf;

/// What caused an error, kept for the line printed at the edge ([`Error::line`]).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The coordinator's errors. A variant's own message never repeats its cause: the cause is its
/// `source`, and [`Error::line`] (or `{:#}` through anyhow) walks the chain into one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data directory {} is in use by another cache-coordinator: stop it or pick another --data-dir", .0.display())]
    DataDirLocked(PathBuf),
    #[error("data directory {} cannot be used: {reason}", path.display())]
    DataDir { path: PathBuf, reason: String },
    /// The database refused or failed (sled, PostgreSQL): `what` says where, `source` why.
    #[error("database error: {what}")]
    Database {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// The database cannot be reached (stopped, restarting, its connections lost, or too
    /// busy to hand out one in time): the call may be made again once it is back, and the
    /// coordinator reconnects by itself. Its gRPC message leaves the cause out (the log has it).
    #[error(
        "database error: {what}: the coordinator's database is unavailable (stopped, restarting or too busy): try again once it is back"
    )]
    DatabaseUnavailable {
        what: &'static str,
        #[source]
        source: Cause,
    },
    /// The disk under the data directory refuses writes: full, out of inodes, over quota or
    /// read-only. Said in those words, in the worker's line and the coordinator's log.
    #[error("the coordinator cannot write its data directory: {problem}")]
    DataDirUnwritable {
        problem: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("stored state is corrupt ({record}): restore the data directory from a backup")]
    CorruptState {
        record: String,
        #[source]
        source: Cause,
    },
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
    /// The object store failed: `what` names the object or the call, `source` the cause.
    #[error("object store error: {what}")]
    Store {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// Issuing storage credentials failed (STS).
    #[error("{what}")]
    Credentials {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// A task of the coordinator panicked or was cancelled: a bug, never the caller's input
    /// (gRPC `INTERNAL`, exit 70).
    #[error("an internal task failed")]
    Internal(#[from] tokio::task::JoinError),
}

impl Error {
    /// A database error with its cause.
    pub fn database(what: impl Into<String>, source: impl Into<Cause>) -> Error {
        Error::Database { what: what.into(), source: Some(source.into()) }
    }

    /// A corrupt record (`record` names its table or tree) with the decoding error.
    pub fn corrupt(record: impl Into<String>, source: impl Into<Cause>) -> Error {
        Error::CorruptState { record: record.into(), source: source.into() }
    }

    /// An object store error said in one line already (an SDK error flattened by [`sdk_error_line`]).
    pub fn store(what: impl Into<String>) -> Error {
        Error::Store { what: what.into(), source: None }
    }

    /// An object store error with its cause.
    pub fn store_cause(what: impl Into<String>, source: impl Into<Cause>) -> Error {
        Error::Store { what: what.into(), source: Some(source.into()) }
    }

    /// A credentials error said in one line.
    pub fn credentials(what: impl Into<String>) -> Error {
        Error::Credentials { what: what.into(), source: None }
    }

    /// The error and its causes in one line: what a worker, an operator's terminal or a log reads.
    pub fn line(&self) -> String {
        chain_line(self)
    }
}

/// An error and its chain of causes, joined by ": " on one line. A cause whose words its
/// error already ends with is said once (some libraries' messages repeat their source).
pub fn chain_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let words = cause.to_string();
        if !parts.last().is_some_and(|last| last.ends_with(&words)) {
            parts.push(words);
        }
        source = cause.source();
    }
    parts.join(": ").replace('\n', " ")
}

/// The cause of a failed write, when it is the disk's: what an operator must fix, in words.
pub fn disk_problem(error: &std::io::Error) -> Option<&'static str> {
    let cause = match error.kind() {
        std::io::ErrorKind::StorageFull => "its disk is full (no space or no inodes left): free space on it",
        std::io::ErrorKind::QuotaExceeded => "its disk quota is exceeded: raise the quota or free space",
        std::io::ErrorKind::ReadOnlyFilesystem => "its file system is read-only: remount it read-write",
        std::io::ErrorKind::PermissionDenied => "permission denied: give the coordinator's user write access",
        _ => return None,
    };
    Some(cause)
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
    R: std::fmt::Debug + 'static,
{
    if let Some(service_error) = error.as_service_error() {
        let code = service_error.code().unwrap_or("error");
        return match service_error.message() {
            Some(message) => format!("{code}: {message}"),
            None => code.to_owned(),
        };
    }
    chain_line(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device");
        let error = Error::DataDirUnwritable { problem: disk_problem(&io).unwrap(), source: io };
        assert_eq!(
            error.line(),
            "the coordinator cannot write its data directory: its disk is full (no space or no inodes left): \
             free space on it: No space left on device"
        );
        assert_eq!(
            error.to_string(),
            "the coordinator cannot write its data directory: its disk is full (no space or no inodes left): free space on it"
        );

        #[derive(Debug, thiserror::Error)]
        #[error("db error: {0}")]
        struct Repeats(#[source] std::io::Error);
        let error = Error::database("PostgreSQL", Repeats(std::io::Error::other("connection refused")));
        assert_eq!(error.line(), "database error: PostgreSQL: db error: connection refused");
    }

    #[tokio::test]
    async fn a_panicked_task_is_an_internal_error() {
        let joined = tokio::spawn(async { panic!("a bug") }).await;
        let error = Error::from(joined.unwrap_err());
        assert!(matches!(error, Error::Internal(_)));
        assert!(error.line().starts_with("an internal task failed: task "), "{}", error.line());
    }
}
