//! Connecting to the coordinator, shared by `cache-worker` and `cachectl`: URL checks, the
//! bearer-token interceptor, and one-line descriptions of failed calls.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// Why a call to the coordinator failed, in the words a CI log should show.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid coordinator URL {0:?}: expected http://HOST:PORT")]
    InvalidUrl(String),
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("coordinator error: {0}")]
    Other(String),
}

impl ClientError {
    /// A process exit code a CI script can act on (sysexits.h).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::InvalidUrl(_) | ClientError::Invalid(_) => 64,
            ClientError::NotFound(_) => 66,
            ClientError::Unreachable { .. } => 69,
            ClientError::Refused(_) => 77,
            ClientError::Other(_) => 1,
        }
    }

    /// Turns a failed call into an error, keeping the coordinator's message.
    pub fn from_status(url: &str, status: &Status) -> ClientError {
        let message = status.message().to_owned();
        match status.code() {
            Code::Unauthenticated => ClientError::Refused(format!("unauthenticated: {message}")),
            Code::PermissionDenied => ClientError::Refused(format!("permission denied: {message}")),
            Code::InvalidArgument | Code::AlreadyExists => ClientError::Invalid(message),
            Code::NotFound => ClientError::NotFound(message),
            Code::Unavailable if message.contains("transport") || message.contains("connect") => {
                ClientError::Unreachable { url: url.to_owned(), reason: message }
            }
            code => ClientError::Other(format!("{message} ({code:?})")),
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<tonic::metadata::Ascii>);

impl BearerToken {
    /// The token must already have passed [`crate::names::validate_token`].
    pub fn new(token: &str) -> Result<BearerToken, ClientError> {
        crate::names::validate_token(token).map_err(|error| ClientError::Invalid(error.to_string()))?;
        let value =
            format!("Bearer {token}").parse().map_err(|_| ClientError::Invalid("invalid token: not ASCII".into()))?;
        Ok(BearerToken(value))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(crate::AUTHORIZATION_METADATA, self.0.clone());
        Ok(request)
    }
}

/// Connects to the coordinator at `url` (http only: run TLS in front of it for now).
pub async fn connect(url: &str) -> Result<Channel, ClientError> {
    if !url.starts_with("http://") {
        return Err(ClientError::InvalidUrl(url.to_owned()));
    }
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| ClientError::InvalidUrl(url.to_owned()))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(120));
    endpoint.connect().await.map_err(|error| {
        // tonic's transport error names only "transport error"; the cause says what happened.
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            reason = cause.to_string();
            source = cause.source();
        }
        ClientError::Unreachable { url: url.to_owned(), reason }
    })
}
