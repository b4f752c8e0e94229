//! What the protocol answers with: the body type every response carries, the failures a request
//! can end in (a backend's `RegistryError` or one of the protocol's own: unknown or invalid
//! uploads, ranges, sizes, too many sessions) and the OCI error body each becomes.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::backend::RegistryError;

/// Every response's body: bytes, or a stream that may fail (which aborts the connection).
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The header every response carries, so clients know they speak to a v2 registry.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
pub const API_VERSION: &str = "registry/2.0";

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// How a request failed; each is one OCI error code, one status and one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// What a backend or a validation answered.
    Registry(RegistryError),
    /// 404 `BLOB_UPLOAD_UNKNOWN`: no such upload (never started, finished, cancelled or dropped
    /// when idle).
    UploadUnknown(String),
    /// 400 `BLOB_UPLOAD_INVALID`: the upload cannot go on (its request broke off, its spool
    /// failed, another request is writing it).
    UploadInvalid(String),
    /// 416 `RANGE_INVALID`: a chunk that does not start where the upload stands.
    RangeInvalid(String),
    /// 413 `SIZE_INVALID`: a body over this view's limit.
    TooLarge(String),
    /// 429 `TOOMANYREQUESTS`: too many uploads open at once.
    TooMany(String),
    /// 404 `UNSUPPORTED`: not a route of the API.
    NoRoute(String),
}

impl From<RegistryError> for Failure {
    fn from(err: RegistryError) -> Failure {
        Failure::Registry(err)
    }
}

impl Failure {
    pub fn code(&self) -> &'static str {
        match self {
            Failure::Registry(err) => err.code(),
            Failure::UploadUnknown(_) => "BLOB_UPLOAD_UNKNOWN",
            Failure::UploadInvalid(_) => "BLOB_UPLOAD_INVALID",
            Failure::RangeInvalid(_) => "RANGE_INVALID",
            Failure::TooLarge(_) => "SIZE_INVALID",
            Failure::TooMany(_) => "TOOMANYREQUESTS",
            Failure::NoRoute(_) => "UNSUPPORTED",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Failure::Registry(err) => err.status(),
            Failure::UploadUnknown(_) | Failure::NoRoute(_) => StatusCode::NOT_FOUND,
            Failure::UploadInvalid(_) => StatusCode::BAD_REQUEST,
            Failure::RangeInvalid(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            Failure::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Failure::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::Registry(err) => err.to_string(),
            Failure::UploadUnknown(message)
            | Failure::UploadInvalid(message)
            | Failure::RangeInvalid(message)
            | Failure::TooLarge(message)
            | Failure::TooMany(message)
            | Failure::NoRoute(message) => message.clone(),
        }
    }

    /// The response: the status and `{"errors":[{"code","message","detail":null}]}`. The message
    /// is one line whatever a backend put in it.
    pub fn into_response(self) -> Response<Body> {
        let message = self.message().replace(['\r', '\n'], " ");
        let body = serde_json::json!({
            "errors": [{ "code": self.code(), "message": message, "detail": null }]
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(full(bytes.clone()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_error_body_is_the_oci_shape_on_one_line() {
        let response = Failure::Registry(RegistryError::DigestInvalid("bad\ndigest".into())).into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"errors":[{"code":"DIGEST_INVALID","message":"bad digest","detail":null}]})
        );
    }

    #[test]
    fn protocol_failures_have_their_codes_and_statuses() {
        let cases = [
            (Failure::UploadUnknown(String::new()), "BLOB_UPLOAD_UNKNOWN", 404),
            (Failure::UploadInvalid(String::new()), "BLOB_UPLOAD_INVALID", 400),
            (Failure::RangeInvalid(String::new()), "RANGE_INVALID", 416),
            (Failure::TooLarge(String::new()), "SIZE_INVALID", 413),
            (Failure::TooMany(String::new()), "TOOMANYREQUESTS", 429),
            (Failure::NoRoute(String::new()), "UNSUPPORTED", 404),
            (Failure::Registry(RegistryError::Unsupported(String::new())), "UNSUPPORTED", 405),
        ];
        for (failure, code, status) in cases {
            assert_eq!((failure.code(), failure.status().as_u16()), (code, status));
        }
    }
}
