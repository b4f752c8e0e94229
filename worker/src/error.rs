//! The worker's errors; each prints as one line a CI log can show, and picks the exit code.

use proto::client::ClientError;

use crate::docker::EngineError;
use crate::export::ExportError;
use crate::transfer::TransferError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Coordinator(#[from] ClientError),
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Export(ExportError),
    #[error("{0}")]
    Transfer(#[from] TransferError),
    #[error("{0}")]
    Restore(String),
    /// The build host itself: a spool folder that cannot be made, and the like.
    #[error("{0}")]
    Host(String),
    /// A save that could not complete for a reason that is nobody's input: begun twice and
    /// lost by the coordinator twice, say.
    #[error("{0}")]
    Save(String),
    /// A blob read from the engine's own stores (not its export) failed its check or its read.
    #[error("{0}")]
    Direct(String),
    /// A task of this worker panicked or was cancelled: a bug, never anyone's input.
    #[error("an internal task of the worker failed: {0}")]
    Internal(#[from] tokio::task::JoinError),
}

impl WorkerError {
    /// sysexits-style codes: 64 bad input, 70 an internal failure (`EX_SOFTWARE`), the
    /// coordinator's codes for its refusals, 69 a coordinator, store or engine that is
    /// unreachable or stopped answering, 1 else.
    pub fn exit_code(&self) -> u8 {
        match self {
            WorkerError::Invalid(_) => 64,
            WorkerError::Internal(_) => 70,
            WorkerError::Coordinator(error) => error.exit_code(),
            // EX_UNAVAILABLE, as for a coordinator that stopped answering.
            WorkerError::Transfer(TransferError::Stalled { .. }) => 69,
            WorkerError::Engine(EngineError::Unreachable { .. } | EngineError::Stalled { .. }) => 69,
            _ => 1,
        }
    }
}

impl From<ExportError> for WorkerError {
    /// An export that ended because the engine stalled is the engine's failure, not the
    /// export's.
    fn from(error: ExportError) -> Self {
        match &error {
            ExportError::Io(io) => {
                EngineError::stall_behind(io).map_or(WorkerError::Export(error), WorkerError::Engine)
            }
            _ => WorkerError::Export(error),
        }
    }
}

impl From<proto::names::InvalidName> for WorkerError {
    fn from(error: proto::names::InvalidName) -> Self {
        WorkerError::Invalid(error.to_string())
    }
}
