//! One function per operation of the API, from a parsed route to a response: the ping,
//! manifests (GET/HEAD/PUT), blobs (GET/HEAD with one `Range`) and uploads (POST, with mount or
//! monolithic; PATCH; PUT; GET; DELETE). Bodies stream: uploads to a spool file through a
//! hasher, blobs from the backend's stream to the connection.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use proto::digest::sha256_digest;

use crate::backend::{Backend, ByteRange, ManifestBody, Reference, RegistryError};
use crate::names::{self, shown};
use crate::response::{self, API_VERSION, API_VERSION_HEADER, Body, Failure};
use crate::routes::{self, RangeAsk, Route, RouteError};
use crate::server::ServeOptions;
use crate::uploads::{self, AppendError, Uploads};

pub const DIGEST_HEADER: &str = "docker-content-digest";
const UPLOAD_UUID_HEADER: &str = "docker-upload-uuid";

/// What every request of one view shares.
pub struct View {
    pub backend: std::sync::Arc<dyn Backend>,
    pub options: ServeOptions,
    pub uploads: Uploads,
}

impl View {
    pub fn new(backend: std::sync::Arc<dyn Backend>, options: ServeOptions) -> View {
        let uploads =
            Uploads::new(options.spool_dir.clone(), options.max_uploads, options.idle_timeout, options.clock.clone());
        View { backend, options, uploads }
    }
}

/// Answers one request; every response carries the API version header.
pub async fn handle<B>(view: &View, request: Request<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    let mut response = match dispatch(view, request).await {
        Ok(response) => response,
        Err(failure) => failure.into_response(),
    };
    response.headers_mut().insert(API_VERSION_HEADER, HeaderValue::from_static(API_VERSION));
    response
}

async fn dispatch<B>(view: &View, request: Request<B>) -> Result<Response<Body>, Failure>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    let method = request.method().clone();
    let route = match routes::parse_path(request.uri().path()) {
        Ok(route) => route,
        Err(RouteError::Invalid(err)) => return Err(err.into()),
        Err(RouteError::NotFound) => {
            return Err(Failure::NoRoute(format!(
                "{method} {} is not a route of the registry API",
                shown(request.uri().path())
            )));
        }
    };
    let head = method == Method::HEAD;
    match (route, &method) {
        (Route::Ping, &Method::GET | &Method::HEAD) => {
            let mut response = Response::new(if head { response::empty() } else { response::full("{}") });
            set(response.headers_mut(), header::CONTENT_TYPE, "application/json");
            set(response.headers_mut(), header::CONTENT_LENGTH, "2");
            Ok(response)
        }
        (Route::Manifest { repository, reference }, &Method::GET | &Method::HEAD) => {
            get_manifest(view, &repository, &reference, head).await
        }
        (Route::Manifest { repository, reference }, &Method::PUT) => {
            put_manifest(view, &repository, &reference, request).await
        }
        (Route::Blob { repository, digest }, &Method::GET | &Method::HEAD) => {
            get_blob(view, &repository, &digest, request.headers(), head).await
        }
        (Route::Tags { repository }, &Method::GET) => list_tags(view, &repository, request.uri().query()).await,
        (Route::UploadStart { repository }, &Method::POST) => start_upload(view, &repository, request).await,
        (Route::Upload { repository, id }, &Method::GET) => upload_status(view, &repository, &id).await,
        (Route::Upload { repository, id }, &Method::PATCH) => patch_upload(view, &repository, &id, request).await,
        (Route::Upload { repository, id }, &Method::PUT) => finish_upload(view, &repository, &id, request).await,
        (Route::Upload { repository, id }, &Method::DELETE) => {
            view.uploads.get(&repository, &id)?;
            view.uploads.remove(&id);
            Ok(with_status(StatusCode::NO_CONTENT))
        }
        (_, method) => Err(unsupported(method)),
    }
}

fn unsupported(method: &Method) -> Failure {
    Failure::Registry(RegistryError::Unsupported(format!(
        "{method} is not offered on this route by the cache's registry view (no deletes, no catalog)"
    )))
}

fn set(headers: &mut HeaderMap, name: impl http::header::IntoHeaderName, value: &str) {
    // Every value set here was validated or built by this crate; one that still is not a header
    // value is left out rather than sent broken.
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

fn with_status(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(response::empty());
    *response.status_mut() = status;
    // A 204 carries no body, so no length either.
    if status != StatusCode::NO_CONTENT {
        set(response.headers_mut(), header::CONTENT_LENGTH, "0");
    }
    response
}

fn reference_text(repository: &str, reference: &Reference) -> String {
    match reference {
        Reference::Tag(tag) => format!("{repository}:{tag}"),
        Reference::Digest(digest) => format!("{repository}@{digest}"),
    }
}

async fn get_manifest(
    view: &View,
    repository: &str,
    reference: &Reference,
    head: bool,
) -> Result<Response<Body>, Failure> {
    let Some(manifest) = view.backend.manifest(repository, reference).await? else {
        return Err(RegistryError::ManifestUnknown(reference_text(repository, reference)).into());
    };
    // Served bytes always match the digest they are served under.
    let computed = sha256_digest(&manifest.bytes);
    let asked_for = match reference {
        Reference::Digest(digest) => digest,
        Reference::Tag(_) => &computed,
    };
    if computed != manifest.digest || *asked_for != computed {
        return Err(RegistryError::Internal(format!(
            "the cache's manifest for {} does not match its digest; not served",
            reference_text(repository, reference)
        ))
        .into());
    }
    let mut response = Response::new(if head { response::empty() } else { response::full(manifest.bytes.clone()) });
    let headers = response.headers_mut();
    let Ok(content_type) = HeaderValue::from_str(&manifest.media_type) else {
        return Err(
            RegistryError::Internal(format!("the cache's manifest for {repository} has a bad media type")).into()
        );
    };
    headers.insert(header::CONTENT_TYPE, content_type);
    set(headers, DIGEST_HEADER, &computed);
    set(headers, header::ETAG, &format!("\"{computed}\""));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(manifest.bytes.len()));
    Ok(response)
}

async fn put_manifest<B>(
    view: &View,
    repository: &str,
    reference: &Reference,
    request: Request<B>,
) -> Result<Response<Body>, Failure>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    view.backend.check_push(repository).await?;
    let limit = view.options.max_manifest_bytes;
    let too_large = || {
        Failure::TooLarge(format!("the manifest is larger than this view's limit of {limit} bytes; nothing was stored"))
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let content_type =
        request.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).map(str::to_owned);
    let mut body = request.into_body();
    let mut bytes = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(view.options.idle_timeout, body.frame()).await {
            Err(_) => {
                return Err(
                    RegistryError::ManifestInvalid("the manifest's body stalled; nothing was stored".into()).into()
                );
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                return Err(RegistryError::ManifestInvalid(format!(
                    "the manifest's body broke off: {err}; nothing was stored"
                ))
                .into());
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&data);
        }
    }
    let bytes = bytes.freeze();
    let media_type = names::manifest_media_type(&bytes, content_type.as_deref())?;
    let digest = sha256_digest(&bytes);
    if let Reference::Digest(named) = reference
        && *named != digest
    {
        return Err(RegistryError::DigestInvalid(format!(
            "the manifest's bytes have digest {digest}, not the {named} it was pushed as; nothing was stored"
        ))
        .into());
    }
    view.backend
        .put_manifest(repository, reference, ManifestBody { media_type, digest: digest.clone(), bytes })
        .await?;
    let mut response = with_status(StatusCode::CREATED);
    set(response.headers_mut(), header::LOCATION, &format!("/v2/{repository}/manifests/{digest}"));
    set(response.headers_mut(), DIGEST_HEADER, &digest);
    Ok(response)
}

async fn get_blob(
    view: &View,
    repository: &str,
    digest: &str,
    request_headers: &HeaderMap,
    head: bool,
) -> Result<Response<Body>, Failure> {
    let unknown = || Failure::Registry(RegistryError::BlobUnknown(digest.to_owned()));
    let range_header = request_headers.get(header::RANGE).and_then(|value| value.to_str().ok());
    let (status, range, size) = if head || range_header.is_some() {
        let size = view.backend.blob_size(repository, digest).await?.ok_or_else(unknown)?;
        match if head { RangeAsk::Whole } else { routes::parse_range(range_header, size) } {
            RangeAsk::Whole => (StatusCode::OK, None, size),
            RangeAsk::Part(range) => (StatusCode::PARTIAL_CONTENT, Some(range), size),
            RangeAsk::Unsatisfiable => {
                let mut response = Failure::RangeInvalid(format!(
                    "the range {} lies outside blob {digest} of {size} bytes",
                    shown(range_header.unwrap_or(""))
                ))
                .into_response();
                set(response.headers_mut(), header::CONTENT_RANGE, &format!("bytes */{size}"));
                return Ok(response);
            }
        }
    } else {
        (StatusCode::OK, None, 0)
    };
    let mut response = if head {
        Response::new(response::empty())
    } else {
        let read = view.backend.read_blob(repository, digest, range).await?.ok_or_else(unknown)?;
        let size = if range.is_some() { size } else { read.size };
        let length = range.map_or(size, |ByteRange { start, end }| end - start + 1);
        let mut response =
            Response::new(BlobBody { stream: read.body, remaining: length, digest: digest.to_owned() }.boxed_unsync());
        response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        if let Some(ByteRange { start, end }) = range {
            set(response.headers_mut(), header::CONTENT_RANGE, &format!("bytes {start}-{end}/{size}"));
        }
        response
    };
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if head {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    set(headers, DIGEST_HEADER, digest);
    set(headers, header::CONTENT_TYPE, "application/octet-stream");
    set(headers, header::ACCEPT_RANGES, "bytes");
    set(headers, header::ETAG, &format!("\"{digest}\""));
    Ok(response)
}

/// A blob's body as the backend streams it, held to the length the response announced: a
/// stream that fails, runs short or runs long ends in an error, which makes the connection
/// abort instead of ending a body that looks complete.
struct BlobBody {
    stream: BoxStream<'static, std::io::Result<Bytes>>,
    remaining: u64,
    digest: String,
}

impl HttpBody for BlobBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = ready!(self.stream.poll_next_unpin(cx));
        let failure = match polled {
            Some(Ok(bytes)) if bytes.len() as u64 > self.remaining => {
                std::io::Error::other(format!("the cache's stream of blob {} ran past its length", self.digest))
            }
            Some(Ok(bytes)) => {
                self.remaining -= bytes.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            Some(Err(err)) => err,
            None if self.remaining > 0 => std::io::Error::other(format!(
                "the cache's stream of blob {} ended {} bytes short",
                self.digest, self.remaining
            )),
            None => return Poll::Ready(None),
        };
        tracing::warn!(digest = %self.digest, error = %failure, "a blob read failed mid-stream; the connection is aborted");
        Poll::Ready(Some(Err(failure)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// `{"name","tags"}`, sorted, paged by `n` and `last` as distribution pages it.
async fn list_tags(view: &View, repository: &str, query: Option<&str>) -> Result<Response<Body>, Failure> {
    let mut tags = view.backend.tags(repository).await?;
    tags.sort();
    tags.dedup();
    if let Some(last) = routes::query_param(query, "last") {
        tags.retain(|tag| *tag > last);
    }
    if let Some(n) = routes::query_param(query, "n").and_then(|n| n.parse::<usize>().ok()) {
        tags.truncate(n);
    }
    let bytes = serde_json::to_vec(&serde_json::json!({ "name": repository, "tags": tags })).unwrap_or_default();
    let mut response = Response::new(response::full(bytes.clone()));
    set(response.headers_mut(), header::CONTENT_TYPE, "application/json");
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(response)
}

fn upload_response(status: StatusCode, repository: &str, id: &str, size: u64) -> Response<Body> {
    let mut response = with_status(status);
    let headers = response.headers_mut();
    set(headers, header::LOCATION, &format!("/v2/{repository}/blobs/uploads/{id}"));
    // As distribution writes it: the last byte held, "0-0" for an empty upload.
    set(headers, header::RANGE, &format!("0-{}", size.saturating_sub(1)));
    set(headers, UPLOAD_UUID_HEADER, id);
    response
}

fn blob_created(repository: &str, digest: &str) -> Response<Body> {
    let mut response = with_status(StatusCode::CREATED);
    set(response.headers_mut(), header::LOCATION, &format!("/v2/{repository}/blobs/{digest}"));
    set(response.headers_mut(), DIGEST_HEADER, digest);
    response
}

async fn start_upload<B>(view: &View, repository: &str, request: Request<B>) -> Result<Response<Body>, Failure>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    view.backend.check_push(repository).await?;
    let query = request.uri().query();
    if let Some(mount) = routes::query_param(query, "mount") {
        names::validate_digest(&mount)?;
        // The source name is checked but does not matter: every name of a view is one store.
        if let Some(from) = routes::query_param(query, "from") {
            names::validate_repository(&from)?;
        }
        if view.backend.blob_size(repository, &mount).await?.is_some() {
            return Ok(blob_created(repository, &mount));
        }
    } else if let Some(digest) = routes::query_param(query, "digest") {
        // A monolithic upload: the whole blob in this one request.
        names::validate_digest(&digest)?;
        let mut spool = view.uploads.spool()?;
        spool
            .append(request.into_body(), view.options.idle_timeout)
            .await
            .map_err(|err| err.into_failure(&format!("the upload of {digest}")))?;
        let blob = spool.finish(&digest, None).await?;
        view.backend.blob_uploaded(repository, blob).await?;
        return Ok(blob_created(repository, &digest));
    }
    let id = view.uploads.start(repository)?;
    Ok(upload_response(StatusCode::ACCEPTED, repository, &id, 0))
}

async fn upload_status(view: &View, repository: &str, id: &str) -> Result<Response<Body>, Failure> {
    let session = view.uploads.get(repository, id)?;
    let guard = session.spool.try_lock().map_err(|_| busy(id))?;
    let size = guard.as_ref().ok_or_else(|| uploads::unknown(id))?.size();
    Ok(upload_response(StatusCode::NO_CONTENT, repository, id, size))
}

fn busy(id: &str) -> Failure {
    Failure::UploadInvalid(format!("upload {id} is being written by another request"))
}

async fn patch_upload<B>(
    view: &View,
    repository: &str,
    id: &str,
    request: Request<B>,
) -> Result<Response<Body>, Failure>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let session = view.uploads.get(repository, id)?;
    let mut guard = session.spool.try_lock().map_err(|_| busy(id))?;
    let spool = guard.as_mut().ok_or_else(|| uploads::unknown(id))?;
    if let Some(content_range) = request.headers().get(header::CONTENT_RANGE) {
        let start = content_range.to_str().ok().and_then(routes::parse_content_range).map(|(start, _)| start);
        if start != Some(spool.size()) {
            let mut response = Failure::RangeInvalid(format!(
                "the chunk's Content-Range {} does not start where upload {id} stands ({} bytes)",
                shown(content_range.to_str().unwrap_or("?")),
                spool.size()
            ))
            .into_response();
            let current = upload_response(StatusCode::OK, repository, id, spool.size());
            for name in [header::LOCATION, header::RANGE] {
                if let Some(value) = current.headers().get(&name) {
                    response.headers_mut().insert(name, value.clone());
                }
            }
            return Ok(response);
        }
    }
    match spool.append(request.into_body(), view.options.idle_timeout).await {
        Ok(_) => {}
        Err(AppendError::Spool(err)) => {
            guard.take();
            view.uploads.remove(id);
            return Err(AppendError::Spool(err).into_failure(&format!("upload {id}")));
        }
        Err(err) => return Err(err.into_failure(&format!("upload {id}"))),
    }
    let size = spool.size();
    session.touch(view.uploads.now_ms());
    Ok(upload_response(StatusCode::ACCEPTED, repository, id, size))
}

async fn finish_upload<B>(
    view: &View,
    repository: &str,
    id: &str,
    request: Request<B>,
) -> Result<Response<Body>, Failure>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let session = view.uploads.get(repository, id)?;
    let Some(digest) = routes::query_param(request.uri().query(), "digest") else {
        return Err(RegistryError::DigestInvalid(format!(
            "the final PUT of upload {id} needs ?digest=sha256:<hex>; the upload is kept"
        ))
        .into());
    };
    names::validate_digest(&digest)?;
    let mut guard = session.spool.try_lock().map_err(|_| busy(id))?;
    let spool = guard.as_mut().ok_or_else(|| uploads::unknown(id))?;
    let appended = spool.append(request.into_body(), view.options.idle_timeout).await;
    if let Err(AppendError::Body(reason)) = appended {
        return Err(AppendError::Body(reason).into_failure(&format!("upload {id}")));
    }
    // From here the session is over, whatever the outcome: a mismatch deletes its file.
    let spool = guard.take().ok_or_else(|| uploads::unknown(id))?;
    view.uploads.remove(id);
    drop(guard);
    if let Err(err) = appended {
        return Err(err.into_failure(&format!("upload {id}")));
    }
    let blob = spool.finish(&digest, None).await?;
    view.backend.blob_uploaded(repository, blob).await?;
    Ok(blob_created(repository, &digest))
}
