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
    #[error("the coordinator at {url} did not answer within {seconds} s: it is overloaded or stopped")]
    Stalled { url: String, seconds: u64 },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The coordinator failed inside (a broken data directory, a failed task): nothing the
    /// caller did, and nothing it can fix by asking again differently.
    #[error("{0}")]
    Internal(String),
    /// The coordinator answered, but something it depends on (its database) is down for now:
    /// asking another replica would not help, asking again later may.
    #[error("{0}")]
    Unavailable(String),
    #[error("coordinator error: {0}")]
    Other(String),
}

impl ClientError {
    /// A process exit code a CI script can act on (sysexits.h).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::InvalidUrl(_) | ClientError::Invalid(_) => 64,
            ClientError::NotFound(_) => 66,
            ClientError::Unreachable { .. } | ClientError::Stalled { .. } | ClientError::Unavailable(_) => 69,
            ClientError::Refused(_) => 77,
            // EX_SOFTWARE: the coordinator's own failure, never the caller's bad input.
            ClientError::Internal(_) => 70,
            ClientError::Other(_) => 1,
        }
    }

    /// Whether a report of this failure to the coordinator would fail the same way: it could not
    /// be talked to, or it refused the caller.
    pub fn fails_reports_too(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. }
                | ClientError::Stalled { .. }
                | ClientError::Unavailable(_)
                | ClientError::Refused(_)
        )
    }

    /// Turns a failed call into an error, keeping the coordinator's message.
    pub fn from_status(url: &str, status: &Status) -> ClientError {
        Self::from_status_with_deadline(url, status, DEFAULT_CALL_TIMEOUT)
    }

    /// The same, for a channel whose calls have `call_timeout` as their deadline.
    pub fn from_status_with_deadline(url: &str, status: &Status, call_timeout: Duration) -> ClientError {
        let message = status.message().to_owned();
        match status.code() {
            // tonic's own deadline (the channel's per-call timeout) ran out.
            Code::Cancelled | Code::DeadlineExceeded if message.contains("Timeout expired") => {
                ClientError::Stalled { url: url.to_owned(), seconds: call_timeout.as_secs() }
            }
            // The connection's pings went unanswered (see `connect_watched`): frozen, not gone.
            Code::Unavailable | Code::Unknown if pings_unanswered(status) => {
                ClientError::Stalled { url: url.to_owned(), seconds: call_timeout.as_secs() }
            }
            Code::Unauthenticated => ClientError::Refused(format!("unauthenticated: {message}")),
            Code::PermissionDenied => ClientError::Refused(format!("permission denied: {message}")),
            Code::InvalidArgument | Code::AlreadyExists => ClientError::Invalid(message),
            Code::NotFound => ClientError::NotFound(message),
            // The line names the coordinator once, whether or not its message already does.
            Code::Internal if message.starts_with("the coordinator") => ClientError::Internal(message),
            Code::Internal => ClientError::Internal(format!("the coordinator failed: {message}")),
            Code::Unavailable if message.contains("transport") || message.contains("connect") => {
                ClientError::Unreachable { url: url.to_owned(), reason: message }
            }
            Code::Unavailable => ClientError::Unavailable(message),
            code => ClientError::Other(format!("{message} ({code:?})")),
        }
    }
}

/// Whether a call failed because its connection's HTTP/2 pings went unanswered (hyper's
/// keep-alive timeout, somewhere in the status's causes).
fn pings_unanswered(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if format!("{cause:?}").contains("KeepAliveTimedOut") || cause.to_string().contains("keep-alive timed out") {
            return true;
        }
        source = cause.source();
    }
    false
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

/// The per-call deadline of an operator's command.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Connects to the coordinator at `url` (http only: run TLS in front of it for now), every
/// call with a 120 s deadline (an operator's command).
pub async fn connect(url: &str) -> Result<Channel, ClientError> {
    connect_with_deadline(url, DEFAULT_CALL_TIMEOUT).await
}

/// Connects with a deadline on every call (and on connecting, at most 10 s): a stopped or
/// frozen coordinator costs a caller that long, not the operating system's TCP timeouts.
pub async fn connect_with_deadline(url: &str, call_timeout: Duration) -> Result<Channel, ClientError> {
    watched_endpoint(url, call_timeout, call_timeout)?.connect().await.map_err(|error| unreachable(url, &error))
}

/// A connection for calls that may take `call_timeout` while the coordinator works (a commit
/// that checks large blobs), made when first used: an HTTP/2 ping every half `stall_timeout`
/// while a call is open, unanswered for half of it, ends the connection and its calls. A
/// coordinator at work answers pings; a frozen one (stopped, its host hung) does not, so it
/// costs a caller `stall_timeout`, not `call_timeout`.
pub fn connect_watched(url: &str, stall_timeout: Duration, call_timeout: Duration) -> Result<Channel, ClientError> {
    Ok(watched_endpoint(url, stall_timeout, call_timeout)?.connect_lazy())
}

fn watched_endpoint(url: &str, stall_timeout: Duration, call_timeout: Duration) -> Result<Endpoint, ClientError> {
    if !url.starts_with("http://") {
        return Err(ClientError::InvalidUrl(url.to_owned()));
    }
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|_| ClientError::InvalidUrl(url.to_owned()))?
        .connect_timeout(stall_timeout.min(Duration::from_secs(10)))
        .http2_keep_alive_interval(stall_timeout / 2)
        .keep_alive_timeout(stall_timeout / 2)
        .timeout(call_timeout))
}

/// A failed connection as one line: tonic's transport error names only "transport error".
fn unreachable(url: &str, error: &tonic::transport::Error) -> ClientError {
    // The innermost cause says what happened.
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason = cause.to_string();
        source = cause.source();
    }
    ClientError::Unreachable { url: url.to_owned(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_error_of_the_coordinator_exits_70_with_its_message() {
        let status = Status::internal("the coordinator cannot write its data directory: its disk is full");
        let error = ClientError::from_status("http://coordinator:7070", &status);
        assert!(matches!(error, ClientError::Internal(_)), "{error:?}");
        assert_eq!(error.exit_code(), 70);
        assert_eq!(error.to_string(), "the coordinator cannot write its data directory: its disk is full");
        assert!(!error.fails_reports_too());
        let corrupt = ClientError::from_status("http://coordinator:7070", &Status::internal("stored state is corrupt"));
        assert_eq!(
            (corrupt.exit_code(), corrupt.to_string().as_str()),
            (70, "the coordinator failed: stored state is corrupt")
        );
    }

    #[test]
    fn bad_input_and_other_codes_keep_their_exit_codes() {
        let url = "http://coordinator:7070";
        assert_eq!(ClientError::from_status(url, &Status::invalid_argument("bad name")).exit_code(), 64);
        assert_eq!(ClientError::from_status(url, &Status::not_found("no cache")).exit_code(), 66);
        assert_eq!(ClientError::from_status(url, &Status::permission_denied("no")).exit_code(), 77);
        assert_eq!(ClientError::from_status(url, &Status::resource_exhausted("later")).exit_code(), 1);
    }

    #[test]
    fn a_coordinator_whose_database_is_down_is_unavailable_not_unreachable() {
        let status = Status::unavailable("database error: PostgreSQL: the coordinator's database is unavailable");
        let error = ClientError::from_status("http://coordinator:7070", &status);
        // Not another replica's turn (they share the database), but EX_UNAVAILABLE all the same.
        assert!(matches!(error, ClientError::Unavailable(_)), "{error:?}");
        assert_eq!(error.exit_code(), 69);
        assert!(error.fails_reports_too());
        assert_eq!(error.to_string(), status.message());
    }
}
