//! Moving blobs between the build host and the object store with aws-sdk-s3, using the
//! scoped credentials and the plan the coordinator handed out. Blobs live at
//! `<prefix>blobs/sha256/<hex>`, addressed by content.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length, SdkBody};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use proto::v1 as pb;
use tokio::sync::Semaphore;

use crate::coordinator::Client;
use crate::progress::Bar;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("uploading blob {digest} failed: {reason}")]
    Upload { digest: String, reason: String },
    #[error("downloading blob {digest} failed: {reason}")]
    Download { digest: String, reason: String },
    #[error("blob {digest} is not in the store")]
    NotStored { digest: String },
    /// The store took no byte and gave no answer for the whole stall timeout (or did so
    /// earlier in this command): nothing more is asked of it.
    #[error(
        "{moving} blob {digest} failed: the store {moved} and gave no answer for {seconds} s: it is overloaded or stopped"
    )]
    Stalled { moving: &'static str, moved: &'static str, digest: String, seconds: u64 },
}

/// Bytes per read of a spooled file: aws-smithy's default of 64 KiB costs a blocking-pool round
/// trip per 64 KiB.
const READ_CHUNK: usize = 1 << 20;

/// Parts of one blob in flight at once; the store's request cap bounds all of them together.
const PARTS_IN_FLIGHT: usize = 4;

/// The longest a best-effort request after a failure may take (an abort, a report): the
/// endpoint may be what failed, and the command's line is already decided.
pub const AFTER_FAILURE: Duration = Duration::from_secs(1);

/// How long a request that sends `size` bytes may take in all: the stall timeout plus the body
/// at 1 MiB/s (uploads, and a commit that checks what they stored).
pub fn body_deadline(stall_timeout: Duration, size: u64) -> Duration {
    stall_timeout + Duration::from_secs(size.div_ceil(1 << 20))
}

/// No second attempt after a timeout: the store just went the whole stall timeout without an
/// answer, and another attempt would cost a build that long again. Refusals and 5xx answers
/// are still retried.
#[derive(Debug)]
struct NoRetryAfterStall;

impl ClassifyRetry for NoRetryAfterStall {
    fn classify_retry(&self, context: &aws_sdk_s3::config::interceptors::InterceptorContext) -> RetryAction {
        match context.output_or_error() {
            Some(Err(error))
                if error.is_timeout_error() || error.as_connector_error().is_some_and(|error| error.is_timeout()) =>
            {
                RetryAction::RetryForbidden
            }
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "no retry after a stall"
    }
}

/// Which way a stalled request moved bytes, for its line.
#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

/// When a request last made progress: begun, a byte of its body taken by the connection, or a
/// byte of its answer received.
#[derive(Clone)]
struct LastProgress(Arc<Mutex<Instant>>);

impl LastProgress {
    fn now() -> LastProgress {
        LastProgress(Arc::new(Mutex::new(Instant::now())))
    }

    fn mark(&self) {
        *self.0.lock().expect("progress lock") = Instant::now();
    }

    fn at(&self) -> Instant {
        *self.0.lock().expect("progress lock")
    }

    /// `body`, marking this progress each time the connection takes a piece of it (again on
    /// each attempt: the SDK rebuilds a retryable body through the same mapping).
    fn watch(&self, body: ByteStream) -> ByteStream {
        let progress = self.clone();
        ByteStream::new(body.into_inner().map_preserve_contents(move |inner| {
            SdkBody::from_body_1_x(WatchedBody { inner, progress: progress.clone() })
        }))
    }

    /// Runs `request` until it ends, or `None` once it went `stall_timeout` without progress.
    async fn unless_stalled<T>(&self, stall_timeout: Duration, request: impl Future<Output = T>) -> Option<T> {
        let mut request = std::pin::pin!(request);
        loop {
            let deadline = self.at() + stall_timeout;
            tokio::select! {
                done = &mut request => return Some(done),
                () = tokio::time::sleep_until(deadline.into()) => {
                    if self.at() + stall_timeout <= Instant::now() {
                        return None;
                    }
                }
            }
        }
    }
}

/// A request body that marks its [`LastProgress`] as the connection takes it: a store that
/// stops reading (frozen, its buffers full) shows as no progress, which the SDK's own stall
/// protection does not count against an upload.
struct WatchedBody {
    inner: SdkBody,
    progress: LastProgress,
}

impl http_body::Body for WatchedBody {
    type Data = Bytes;
    type Error = aws_sdk_s3::error::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(context);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.is_data()
        {
            self.progress.mark();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body fed by a channel whose receiver the uploader can drop while the connection
/// still holds the body, so the sender is never left waiting on a stalled request.
struct ChannelBody {
    receiver: Arc<Mutex<Option<tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>>>>,
    bar: Bar,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let mut receiver = self.receiver.lock().expect("body lock");
        let Some(receiver) = receiver.as_mut() else {
            return Poll::Ready(Some(Err(std::io::Error::other("the upload was given up"))));
        };
        receiver.poll_recv(context).map(|piece| {
            piece.map(|piece| {
                piece.map(|bytes| {
                    self.bar.add(bytes.len() as u64);
                    http_body::Frame::data(bytes)
                })
            })
        })
    }
}

/// The project's blobs in the object store. Clones share the client, the cap on requests in
/// flight and the record of unfinished multipart uploads.
#[derive(Clone)]
pub struct BlobStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    part_size: u64,
    multipart_threshold: u64,
    /// One permit per request in flight: the plan's `max_concurrency` for this whole worker,
    /// following the coordinator's later answers during a save (see [`BlobStore::follow`]).
    requests: Arc<RequestLimit>,
    /// Multipart uploads begun and neither completed nor aborted, by upload ID: what a
    /// cancelled save aborts.
    unfinished: Arc<Mutex<HashMap<String, String>>>,
    /// How long a request may go without progress.
    stall_timeout: Duration,
    /// When a request last went `stall_timeout` without progress: for as long again no request
    /// is sent (aborts included), so a command that fails on it fails once, not per request
    /// (a view, which runs for a whole job, tries again after that).
    stalled_at: Arc<Mutex<Option<Instant>>>,
    /// The store takes checksums (S3, not the embedded endpoint, which checks every blob
    /// itself): each PUT carries the blob's digest as its `x-amz-checksum-sha256`, which S3
    /// checks the body against, and `If-None-Match: *`, so a stored blob is never replaced.
    conditional_puts: bool,
}

/// The cap on a worker's requests in flight, which can move while they run.
struct RequestLimit {
    permits: Semaphore,
    /// The cap now; held while it changes, so changes apply one at a time, in order.
    limit: tokio::sync::Mutex<usize>,
}

impl RequestLimit {
    fn new(limit: usize) -> RequestLimit {
        RequestLimit { permits: Semaphore::new(limit), limit: tokio::sync::Mutex::new(limit) }
    }

    /// Sets the cap; a lower one waits for the requests in flight beyond it to end.
    async fn set(&self, new: usize) {
        let mut limit = self.limit.lock().await;
        if new > *limit {
            self.permits.add_permits(new - *limit);
        } else if new < *limit {
            let fewer = u32::try_from(*limit - new).unwrap_or(u32::MAX);
            if let Ok(permits) = self.permits.acquire_many(fewer).await {
                permits.forget();
            }
        }
        *limit = new;
    }
}

/// A blob's digest (`sha256:<hex>`) as S3 writes a SHA-256 checksum: base64 of the raw bytes.
fn digest_base64(digest: &str) -> String {
    use base64::Engine;
    let raw = hex::decode(digest.strip_prefix("sha256:").unwrap_or(digest)).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// Whether S3 refused a conditional write because the object exists.
fn is_precondition_failed<E: aws_sdk_s3::error::ProvideErrorMetadata, R>(
    error: &aws_sdk_s3::error::SdkError<E, R>,
) -> bool {
    error.as_service_error().and_then(aws_sdk_s3::error::ProvideErrorMetadata::code) == Some("PreconditionFailed")
}

/// One readable line for a failed store request, never a `Debug` dump: the store's own message
/// and code when it answered ("the project was flushed ... (AccessDenied)"), "cannot reach the
/// store: <cause>" when no answer came, else the innermost cause.
fn reason<E, R>(error: SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    if let Some(service) = error.as_service_error() {
        match (service.message(), service.code()) {
            (Some(message), Some(code)) => return format!("{message} ({code})"),
            (Some(message), None) => return message.to_owned(),
            (None, Some(code)) => return format!("the store refused the request ({code})"),
            (None, None) => {}
        }
    }
    match &error {
        SdkError::DispatchFailure(failure) if failure.is_timeout() => "the store did not answer in time".to_owned(),
        SdkError::DispatchFailure(_) => format!("cannot reach the store: {}", innermost_cause(&error)),
        SdkError::TimeoutError(_) => "the store did not answer in time".to_owned(),
        _ => innermost_cause(&error),
    }
}

/// The last cause in an error's chain: the one that says what happened (an SDK's outer layers
/// only say where: "dispatch failure", "io error", "client error (Connect)").
fn innermost_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// How long before they expire credentials are renewed: a fifth of their lifetime, between one
/// second and one minute, so a request never starts with a key about to lapse.
fn renewal_margin(credentials: &pb::Credentials) -> Duration {
    let lifetime = credentials.expires_unix.saturating_sub(unix_now()).max(0) as u64;
    Duration::from_secs((lifetime / 5).clamp(1, 60))
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
}

fn sdk_credentials(credentials: &pb::Credentials) -> aws_credential_types::Credentials {
    let expires =
        (credentials.expires_unix > 0).then(|| UNIX_EPOCH + Duration::from_secs(credentials.expires_unix as u64));
    aws_credential_types::Credentials::new(
        &credentials.access_key_id,
        &credentials.secret_access_key,
        Some(credentials.session_token.clone()).filter(|token| !token.is_empty()),
        expires,
        "layer-cache-coordinator",
    )
}

/// Credentials that renew themselves through the coordinator before they expire, so a long
/// transfer outlives its first key: a background task renews them a margin before expiry
/// (even while no request runs, e.g. during the engine's silent export), and the SDK's identity
/// cache picks up the renewed ones when its copy nears expiry.
#[derive(Debug, Clone)]
struct RenewingCredentials {
    client: Option<Client>,
    access: pb::Access,
    current: Arc<tokio::sync::Mutex<pb::Credentials>>,
}

impl RenewingCredentials {
    fn new(credentials: &pb::Credentials, client: Option<Client>) -> RenewingCredentials {
        let renewing = RenewingCredentials {
            client,
            access: credentials.access(),
            current: Arc::new(tokio::sync::Mutex::new(credentials.clone())),
        };
        if let (Some(client), true) = (renewing.client.clone(), credentials.expires_unix > 0) {
            let (weak, access) = (Arc::downgrade(&renewing.current), renewing.access);
            // The task holds the credentials only while renewing them: dropping the store ends it.
            tokio::spawn(async move {
                while let Some(wait) = time_to_renewal(&weak).await {
                    tokio::time::sleep(wait).await;
                    let Some(current) = weak.upgrade() else { return };
                    if let Err(error) = renew_if_due(&client, access, &current).await {
                        // The next request tries again and reports it if it still fails.
                        tracing::warn!(%error, "renewing storage credentials failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            });
        }
        renewing
    }

    async fn fetch(&self) -> Result<aws_credential_types::Credentials, CredentialsError> {
        match &self.client {
            Some(client) => renew_if_due(client, self.access, &self.current).await,
            None => Ok(sdk_credentials(&*self.current.lock().await)),
        }
    }
}

/// How long until the credentials are due for renewal; `None` once the store is gone.
async fn time_to_renewal(current: &std::sync::Weak<tokio::sync::Mutex<pb::Credentials>>) -> Option<Duration> {
    let current = current.upgrade()?;
    let current = current.lock().await;
    let due = current.expires_unix - renewal_margin(&current).as_secs() as i64;
    Some(Duration::from_secs(due.saturating_sub(unix_now()).max(0) as u64))
}

/// The current credentials, renewed through the coordinator first when they are within the
/// renewal margin of their expiry (credentials without an expiry are used as they are).
async fn renew_if_due(
    client: &Client,
    access: pb::Access,
    current: &tokio::sync::Mutex<pb::Credentials>,
) -> Result<aws_credential_types::Credentials, CredentialsError> {
    let mut current = current.lock().await;
    if current.expires_unix == 0 || current.expires_unix - unix_now() > renewal_margin(&current).as_secs() as i64 {
        return Ok(sdk_credentials(&current));
    }
    let request =
        pb::GetCredentialsRequest { access: access as i32, renew_access_key_id: current.access_key_id.clone() };
    let renewed = client
        .clone()
        .get_credentials(request)
        .await
        .map_err(|status| CredentialsError::provider_error(format!("renewing credentials: {}", status.message())))?
        .into_inner()
        .credentials
        .ok_or_else(|| CredentialsError::provider_error("the coordinator renewed no credentials"))?;
    tracing::debug!(access_key_id = renewed.access_key_id, expires_unix = renewed.expires_unix, "credentials renewed");
    *current = renewed;
    Ok(sdk_credentials(&current))
}

impl ProvideCredentials for RenewingCredentials {
    fn provide_credentials<'a>(&'a self) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(self.fetch())
    }
}

impl BlobStore {
    /// A store reached with `credentials`. With the coordinator's `client`, the credentials are
    /// renewed before they expire; without it they are used as they are. A request that makes
    /// no progress for `stall_timeout` (no answer, or a body that stops moving) is cut off and
    /// not tried again, so a stalled store costs a build the stall timeout, once.
    pub fn new(
        credentials: &pb::Credentials,
        plan: &pb::TransferPlan,
        client: Option<Client>,
        stall_timeout: Duration,
    ) -> BlobStore {
        let provider = RenewingCredentials::new(credentials, client);
        let region = if credentials.region.is_empty() { "us-east-1".to_owned() } else { credentials.region.clone() };
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region))
            .force_path_style(credentials.path_style)
            // 5xx and throttling are retried with exponential backoff and jitter; a request that
            // stalls is cut off, not retried: no answer within the stall timeout (uploads: see
            // `upload_deadline` and `LastProgress`), or a body that moves no byte for that long.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(3))
            .retry_classifier(NoRetryAfterStall)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(stall_timeout.min(Duration::from_secs(10)))
                    .read_timeout(stall_timeout)
                    .build(),
            )
            .stalled_stream_protection(
                aws_sdk_s3::config::StalledStreamProtectionConfig::enabled().grace_period(stall_timeout).build(),
            )
            // Every blob is verified against its sha256 as it streams (load.rs): a second,
            // CRC check would cost CPU the engine needs and hide which blob failed.
            .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
            .identity_cache(aws_sdk_s3::config::IdentityCache::lazy().buffer_time(renewal_margin(credentials)).build())
            .credentials_provider(provider)
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            );
        if !credentials.endpoint_url.is_empty() {
            config = config.endpoint_url(&credentials.endpoint_url);
        }
        // Some S3-compatible stores reject the CRC checksums aws-sdk-s3 adds by default.
        if credentials.checksum_mode == "when_required" {
            config = config.request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired);
        }
        BlobStore {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            bucket: credentials.bucket.clone(),
            prefix: credentials.prefix.clone(),
            part_size: plan.part_size,
            multipart_threshold: plan.multipart_threshold.max(proto::parts::MIN_PART_SIZE),
            requests: Arc::new(RequestLimit::new((plan.max_concurrency as usize).max(1))),
            unfinished: Arc::default(),
            stall_timeout,
            stalled_at: Arc::default(),
            conditional_puts: credentials.checksum_mode != "when_required",
        }
    }

    /// The timeouts of a request that sends `size` bytes: the answer comes only after the
    /// whole body, so instead of the read timeout the attempt may take [`body_deadline`] (a
    /// body the store stops taking is cut off sooner, see [`BlobStore::send_watched`]).
    fn upload_deadline(&self, size: u64) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::default().timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(self.stall_timeout.min(Duration::from_secs(10)))
                .disable_read_timeout()
                .operation_attempt_timeout(body_deadline(self.stall_timeout, size))
                .build(),
        )
    }

    /// Sends an upload of `body` (`send` makes the request from the watched body) and waits for
    /// its answer while it makes progress: a store that takes no byte of it and gives no answer
    /// for the stall timeout fails it, and every later request of this store at once.
    async fn send_watched<T>(
        &self,
        digest: &str,
        body: ByteStream,
        send: impl AsyncFnOnce(ByteStream) -> T,
    ) -> Result<T, TransferError> {
        let progress = LastProgress::now();
        match progress.unless_stalled(self.stall_timeout, send(progress.watch(body))).await {
            Some(sent) => Ok(sent),
            None => {
                self.mark_stalled();
                Err(self.stall_error(Direction::Up, digest))
            }
        }
    }

    fn stall_error(&self, direction: Direction, digest: &str) -> TransferError {
        let (moving, moved) = match direction {
            Direction::Up => ("uploading", "took no bytes"),
            Direction::Down => ("downloading", "sent no bytes"),
        };
        TransferError::Stalled { moving, moved, digest: digest.to_owned(), seconds: self.stall_timeout.as_secs() }
    }

    /// Notes a failed request that timed out: the store stalled (see `stalled_at`).
    fn note_timeout<E, R>(&self, error: &SdkError<E, R>) {
        let timed_out = match error {
            SdkError::TimeoutError(_) => true,
            SdkError::DispatchFailure(failure) => failure.is_timeout(),
            _ => false,
        };
        if timed_out {
            self.mark_stalled();
        }
    }

    fn mark_stalled(&self) {
        *self.stalled_at.lock().expect("stall lock") = Some(Instant::now());
    }

    /// Whether a request stalled within the last stall timeout.
    fn stalled_recently(&self) -> bool {
        self.stalled_at.lock().expect("stall lock").is_some_and(|at| at.elapsed() < self.stall_timeout)
    }

    /// A blob's key under the prefix the credentials name (`proto::object_keys`' layout).
    pub fn key(&self, digest: &str) -> String {
        proto::object_keys::blob_key(&self.prefix, digest)
    }

    /// The part size of a blob of `size` bytes under the plan.
    pub fn part_size_for(&self, size: u64) -> u64 {
        proto::parts::part_size_for(size, self.part_size)
    }

    /// A permit to send a request about `digest`; refused right after the store stalled.
    async fn request_permit(&self, digest: &str) -> Result<tokio::sync::SemaphorePermit<'_>, TransferError> {
        let permit = self.requests.permits.acquire().await.expect("the request semaphore is never closed");
        if self.stalled_recently() {
            return Err(self.stall_error(Direction::Up, digest));
        }
        Ok(permit)
    }

    /// Follows the share of the transfer budget the coordinator grants this save as it
    /// changes (`shares`, fed by the save's keep-alive; 0: start no request until it rises).
    /// The current share applies before this returns; later ones until the store is dropped.
    pub async fn follow(&self, mut shares: tokio::sync::watch::Receiver<u32>) {
        let current = *shares.borrow_and_update();
        self.requests.set(current as usize).await;
        let limit = Arc::downgrade(&self.requests);
        tokio::spawn(async move {
            while shares.changed().await.is_ok() {
                let share = *shares.borrow_and_update();
                let Some(limit) = limit.upgrade() else { return };
                limit.set(share as usize).await;
            }
        });
    }

    /// Uploads bytes already in memory (configs) in one PUT.
    pub async fn upload_bytes(&self, digest: &str, bytes: Vec<u8>) -> Result<(), TransferError> {
        self.put(digest, bytes.len() as u64, ByteStream::from(bytes)).await
    }

    /// One PUT of a whole blob of `size` bytes.
    async fn put(&self, digest: &str, size: u64, body: ByteStream) -> Result<(), TransferError> {
        let _permit = self.request_permit(digest).await?;
        let mut put = self.client.put_object().bucket(&self.bucket).key(self.key(digest)).content_length(size as i64);
        if self.conditional_puts {
            put = put
                .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
                .checksum_sha256(digest_base64(digest))
                .if_none_match("*");
        }
        let sending = async move |body| {
            put.body(body)
                // Every blob's sha256 is checked on its way in (spooled, streamed or a config
                // read whole) and its size at the commit: a second SHA-256 pass for the
                // signature only costs CPU.
                .customize()
                .config_override(self.upload_deadline(size))
                .disable_payload_signing()
                .send()
                .await
        };
        match self.send_watched(digest, body, sending).await? {
            Ok(_) => Ok(()),
            // Already stored: the commit checks what is there against the digest.
            Err(error) if self.conditional_puts && is_precondition_failed(&error) => Ok(()),
            Err(error) => {
                self.note_timeout(&error);
                Err(TransferError::Upload { digest: digest.to_owned(), reason: reason(error) })
            }
        }
    }

    /// Uploads a file: one PUT below the multipart threshold, parts in parallel above it. A
    /// failed multipart upload is aborted.
    pub async fn upload_file(&self, digest: &str, path: &Path, size: u64, bar: &Bar) -> Result<(), TransferError> {
        let failed = |reason: String| TransferError::Upload { digest: digest.to_owned(), reason };
        if size < self.multipart_threshold {
            let body = ByteStream::read_from()
                .path(path)
                .buffer_size(READ_CHUNK)
                .build()
                .await
                .map_err(|error| failed(error.to_string()))?;
            self.put(digest, size, body).await?;
            bar.add(size);
            return Ok(());
        }
        let upload = self.begin_multipart(digest, size).await?;
        let part_size = upload.part_size;
        let parts = futures::stream::iter(0..size.div_ceil(part_size))
            .map(|part_idx| {
                let upload = &upload;
                async move {
                    let offset = part_idx * part_size;
                    let length = part_size.min(size - offset);
                    let body = ByteStream::read_from()
                        .path(path)
                        .buffer_size(READ_CHUNK)
                        .offset(offset)
                        .length(Length::Exact(length))
                        .build()
                        .await
                        .map_err(|error| failed(error.to_string()))?;
                    let part = upload.upload_part((part_idx + 1) as i32, body).await?;
                    bar.add(length);
                    Ok(part)
                }
            })
            .buffered(PARTS_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await;
        match parts {
            Ok(parts) => upload.complete(parts).await,
            Err(error) => {
                upload.abort().await;
                Err(error)
            }
        }
    }

    /// Uploads `size` bytes arriving on `body` (a layer streamed from the export without a
    /// spool): one PUT below the multipart threshold, else parts of the planned size, a few in
    /// flight. An error on `body` (a digest that did not match) fails the upload before the
    /// store keeps anything. A streamed body cannot be sent twice, so it is not retried.
    pub async fn upload_stream(
        &self,
        digest: &str,
        size: u64,
        mut body: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
        bar: &Bar,
    ) -> Result<(), TransferError> {
        let failed = |reason: String| TransferError::Upload { digest: digest.to_owned(), reason };
        if size < self.multipart_threshold {
            let receiver = Arc::new(Mutex::new(Some(body)));
            let body = ByteStream::from_body_1_x(ChannelBody { receiver: receiver.clone(), bar: bar.clone() });
            let put = self.put(digest, size, body).await;
            // The connection may still hold the body (a store that stopped reading it): the
            // sender (the export's reader) is let go all the same.
            drop(receiver.lock().expect("body lock").take());
            return put;
        }
        let upload = self.begin_multipart(digest, size).await?;
        let part_size = upload.part_size as usize;
        // Parts are cut from the stream in order and sent a few at a time: memory is at most
        // PARTS_IN_FLIGHT + 1 parts.
        let sent: Result<Vec<CompletedPart>, TransferError> = async {
            let mut in_flight = futures::stream::FuturesOrdered::new();
            let mut completed = Vec::new();
            let mut part = bytes::BytesMut::with_capacity(part_size);
            let mut part_number = 0;
            let mut received = 0u64;
            loop {
                let piece = body.recv().await;
                let ended = piece.is_none();
                if let Some(piece) = piece {
                    let piece = piece.map_err(|error| failed(error.to_string()))?;
                    received += piece.len() as u64;
                    part.extend_from_slice(&piece);
                }
                // A body that ends short (the export failed) must not complete as a blob.
                if ended && received != size {
                    return Err(failed(format!("the export ended after {received} of {size} bytes")));
                }
                while part.len() >= part_size || (ended && !part.is_empty()) {
                    let bytes = part.split_to(part.len().min(part_size)).freeze();
                    part_number += 1;
                    let (upload, number, length) = (&upload, part_number, bytes.len() as u64);
                    in_flight.push_back(async move {
                        let uploaded = upload.upload_part(number, ByteStream::from(bytes)).await;
                        bar.add(length);
                        uploaded
                    });
                    if in_flight.len() >= PARTS_IN_FLIGHT {
                        completed.push(in_flight.next().await.expect("a part is in flight")?);
                    }
                }
                if ended {
                    break;
                }
            }
            while let Some(uploaded) = in_flight.next().await {
                completed.push(uploaded?);
            }
            Ok(completed)
        }
        .await;
        match sent {
            Ok(completed) => upload.complete(completed).await,
            Err(error) => {
                upload.abort().await;
                Err(error)
            }
        }
    }

    /// Begins a multipart upload of a blob of `size` bytes, in parts of the planned size for
    /// it; it stays recorded as unfinished until it is completed or aborted.
    pub async fn begin_multipart(&self, digest: &str, size: u64) -> Result<MultipartUpload, TransferError> {
        let failed = |reason: String| TransferError::Upload { digest: digest.to_owned(), reason };
        if size > proto::parts::MAX_BLOB_SIZE {
            return Err(failed(format!("{size} bytes is more than one object can hold")));
        }
        let key = self.key(digest);
        let upload = {
            let _permit = self.request_permit(digest).await?;
            self.client.create_multipart_upload().bucket(&self.bucket).key(&key).send().await
        }
        .map_err(|error| {
            self.note_timeout(&error);
            failed(reason(error))
        })?;
        let upload_id = upload.upload_id().ok_or_else(|| failed("the store returned no upload ID".into()))?.to_owned();
        self.unfinished.lock().expect("unfinished uploads lock").insert(upload_id.clone(), key.clone());
        Ok(MultipartUpload {
            store: self.clone(),
            digest: digest.to_owned(),
            key,
            upload_id,
            part_size: self.part_size_for(size),
        })
    }

    /// Aborts every multipart upload this store began and did not finish (a cancelled save):
    /// the store keeps none of their parts. Returns how many it aborted.
    pub async fn abort_unfinished(&self) -> usize {
        let unfinished: Vec<(String, String)> =
            self.unfinished.lock().expect("unfinished uploads lock").drain().collect();
        for (upload_id, key) in &unfinished {
            self.abort(key, upload_id).await;
        }
        unfinished.len()
    }

    /// Aborts one upload, best effort; not against a store that stalled (another stall timeout
    /// would be spent on it): the coordinator's collection aborts what is left.
    async fn abort(&self, key: &str, upload_id: &str) {
        self.unfinished.lock().expect("unfinished uploads lock").remove(upload_id);
        if self.stalled_recently() {
            tracing::debug!(key, "the store stalled: the multipart upload is left to the coordinator's collection");
            return;
        }
        if let Err(error) =
            self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(upload_id).send().await
        {
            tracing::warn!(key, error = reason(error), "aborting a multipart upload failed");
        }
    }

    /// The stored size of a blob, or `None` when the store does not hold it.
    pub async fn stored_size(&self, digest: &str) -> Result<Option<u64>, TransferError> {
        let _permit = self.request_permit(digest).await?;
        match self.client.head_object().bucket(&self.bucket).key(self.key(digest)).send().await {
            Ok(head) => Ok(Some(head.content_length().unwrap_or(0).max(0) as u64)),
            Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(None),
            Err(error) => {
                self.note_timeout(&error);
                Err(TransferError::Download { digest: digest.to_owned(), reason: reason(error) })
            }
        }
    }

    /// The bytes `offset..offset + length` of a stored blob, in memory. The caller verifies them.
    pub async fn download_range(&self, digest: &str, offset: u64, length: u64) -> Result<Bytes, TransferError> {
        let mut pieces = self.download_range_pieces(digest, offset, length).await?;
        if pieces.len() == 1 {
            return Ok(pieces.remove(0));
        }
        let mut bytes = bytes::BytesMut::with_capacity(length as usize);
        pieces.iter().for_each(|piece| bytes.extend_from_slice(piece));
        Ok(bytes.freeze())
    }

    /// [`BlobStore::download_range`]'s bytes in the pieces they arrived in, not copied into one
    /// buffer.
    pub async fn download_range_pieces(
        &self,
        digest: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Bytes>, TransferError> {
        let failed = |reason: String| TransferError::Download { digest: digest.to_owned(), reason };
        let range = format!("bytes={offset}-{}", offset + length - 1);
        if self.stalled_recently() {
            return Err(self.stall_error(Direction::Down, digest));
        }
        // A range whose answer, or whose next byte, does not come for the stall timeout fails
        // then (the SDK's own protection would take a second or so more to see it).
        let progress = LastProgress::now();
        let fetching = async {
            let request = self.client.get_object().bucket(&self.bucket).key(self.key(digest)).range(range);
            let response = request.send().await.map_err(|error| self.get_failed(digest, error))?;
            progress.mark();
            let mut body = response.body;
            let mut pieces = Vec::new();
            while let Some(piece) = body.try_next().await.map_err(|error| failed(innermost_cause(&error)))? {
                progress.mark();
                pieces.push(piece);
            }
            Ok(pieces)
        };
        let Some(fetched) = progress.unless_stalled(self.stall_timeout, fetching).await else {
            self.mark_stalled();
            return Err(self.stall_error(Direction::Down, digest));
        };
        let pieces = fetched?;
        let got: u64 = pieces.iter().map(|piece| piece.len() as u64).sum();
        if got != length {
            return Err(failed(format!("asked for {length} bytes at {offset}, got {got}")));
        }
        Ok(pieces)
    }

    /// A GET of `digest` that failed: not stored, or why (a timeout is noted as a stall).
    fn get_failed<R>(
        &self,
        digest: &str,
        error: SdkError<aws_sdk_s3::operation::get_object::GetObjectError, R>,
    ) -> TransferError
    where
        R: std::fmt::Debug + 'static,
    {
        self.note_timeout(&error);
        if error.as_service_error().is_some_and(|e| e.is_no_such_key()) {
            TransferError::NotStored { digest: digest.to_owned() }
        } else {
            TransferError::Download { digest: digest.to_owned(), reason: reason(error) }
        }
    }

    /// Streams a blob's bytes as stored. The caller verifies them.
    pub async fn download(
        &self,
        digest: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, TransferError>> + Send + 'static, TransferError> {
        let get = self.client.get_object().bucket(&self.bucket).key(self.key(digest));
        let response = get.send().await.map_err(|error| self.get_failed(digest, error))?;
        let digest = digest.to_owned();
        Ok(futures::stream::unfold(Some(response.body), move |body| {
            let digest = digest.clone();
            async move {
                let mut body = body?;
                match body.try_next().await {
                    Ok(Some(chunk)) => Some((Ok(chunk), Some(body))),
                    Ok(None) => None,
                    Err(error) => {
                        Some((Err(TransferError::Download { digest, reason: innermost_cause(&error) }), None))
                    }
                }
            }
        }))
    }
}

/// A multipart upload of one blob, begun by [`BlobStore::begin_multipart`].
pub struct MultipartUpload {
    store: BlobStore,
    digest: String,
    key: String,
    upload_id: String,
    /// Every part but the last has this many bytes.
    pub part_size: u64,
}

impl MultipartUpload {
    fn failed(&self, reason: String) -> TransferError {
        TransferError::Upload { digest: self.digest.clone(), reason }
    }

    /// Uploads part `part_number` (from 1).
    pub async fn upload_part(&self, part_number: i32, body: ByteStream) -> Result<CompletedPart, TransferError> {
        let _permit = self.store.request_permit(&self.digest).await?;
        let sending = async |body| {
            self.store
                .client
                .upload_part()
                .bucket(&self.store.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .part_number(part_number)
                .body(body)
                // The blob's sha256 was checked while spooling and the commit checks its size:
                // a second SHA-256 pass for the signature only costs CPU.
                .customize()
                .config_override(self.store.upload_deadline(self.part_size))
                .disable_payload_signing()
                .send()
                .await
        };
        let uploaded = self.store.send_watched(&self.digest, body, sending).await?.map_err(|error| {
            self.store.note_timeout(&error);
            self.failed(reason(error))
        })?;
        Ok(CompletedPart::builder().part_number(part_number).set_e_tag(uploaded.e_tag().map(str::to_owned)).build())
    }

    /// Completes the upload from its parts, in order; aborts it if the store refuses.
    pub async fn complete(self, parts: Vec<CompletedPart>) -> Result<(), TransferError> {
        let completed = {
            let _permit = self.store.request_permit(&self.digest).await?;
            let mut complete = self
                .store
                .client
                .complete_multipart_upload()
                .bucket(&self.store.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build());
            if self.store.conditional_puts {
                complete = complete.if_none_match("*");
            }
            complete.send().await
        };
        match completed {
            Ok(_) => {
                self.store.unfinished.lock().expect("unfinished uploads lock").remove(&self.upload_id);
                Ok(())
            }
            // Already stored: the parts go, the commit checks what is there.
            Err(error) if self.store.conditional_puts && is_precondition_failed(&error) => {
                self.abort().await;
                Ok(())
            }
            Err(error) => {
                self.store.note_timeout(&error);
                self.abort().await;
                Err(self.failed(reason(error)))
            }
        }
    }

    /// Aborts the upload: the store drops its parts.
    pub async fn abort(&self) {
        self.store.abort(&self.key, &self.upload_id).await;
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_s3::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_s3::operation::put_object::PutObjectError;

    use super::*;

    #[test]
    fn a_store_refusal_reads_as_its_message_and_code() {
        let metadata = ErrorMetadata::builder()
            .code("AccessDenied")
            .message("the project was flushed while this upload ran: its key is revoked and nothing was stored")
            .build();
        let error = SdkError::<PutObjectError, ()>::service_error(PutObjectError::generic(metadata), ());
        assert_eq!(
            reason(error),
            "the project was flushed while this upload ran: its key is revoked and nothing was stored (AccessDenied)"
        );
    }

    /// A store that takes connections and never reads nor answers (a frozen process: the
    /// kernel still completes the handshake), and a store client on it with a 1 s stall timeout.
    fn frozen_store() -> (std::net::TcpListener, BlobStore) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let credentials = pb::Credentials {
            access_key_id: "AKIDFROZEN".into(),
            secret_access_key: "secret".into(),
            endpoint_url: format!("http://{}", listener.local_addr().unwrap()),
            bucket: "cache".into(),
            path_style: true,
            checksum_mode: "when_required".into(),
            ..Default::default()
        };
        let plan = pb::TransferPlan {
            part_size: 8 << 20,
            multipart_threshold: 64 << 20,
            max_concurrency: 4,
            ..Default::default()
        };
        (listener, BlobStore::new(&credentials, &plan, None, Duration::from_secs(1)))
    }

    #[tokio::test]
    async fn an_upload_the_store_stops_taking_fails_once_after_the_stall_timeout() {
        let (_listener, store) = frozen_store();
        let digest = format!("sha256:{}", "a".repeat(64));
        let started = Instant::now();
        // More than the socket buffers hold: the body stops moving. The attempt's own deadline
        // (1 s plus the body at 1 MiB/s) would be 33 s, times 3 attempts.
        let failed = store.upload_bytes(&digest, vec![7; 32 << 20]).await.unwrap_err();
        let seconds = started.elapsed().as_secs_f64();
        assert!(matches!(failed, TransferError::Stalled { seconds: 1, .. }), "{failed}");
        assert!((1.0..4.0).contains(&seconds), "gave up after {seconds:.1} s");
        assert_eq!(
            failed.to_string(),
            format!(
                "uploading blob {digest} failed: the store took no bytes and gave no answer for 1 s: it is overloaded or stopped"
            )
        );
        // What follows right after is not sent: the command fails once, not per request.
        let started = Instant::now();
        let again = store.begin_multipart(&digest, 100 << 20).await.err().unwrap();
        assert!(matches!(again, TransferError::Stalled { .. }), "{again}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_streamed_upload_the_store_stops_taking_fails_after_the_stall_timeout() {
        let (_listener, store) = frozen_store();
        let digest = format!("sha256:{}", "c".repeat(64));
        let size: u64 = 32 << 20;
        let (sender, body) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for _ in 0..32 {
                if sender.send(Ok(Bytes::from(vec![7u8; 1 << 20]))).await.is_err() {
                    return;
                }
            }
        });
        let started = Instant::now();
        let failed = store.upload_stream(&digest, size, body, &Bar::none()).await.unwrap_err();
        let seconds = started.elapsed().as_secs_f64();
        assert!(matches!(failed, TransferError::Stalled { .. }), "{failed}");
        assert!((1.0..4.0).contains(&seconds), "gave up after {seconds:.1} s");
    }

    #[tokio::test]
    async fn a_request_without_an_answer_is_not_attempted_again() {
        let (_listener, store) = frozen_store();
        let digest = format!("sha256:{}", "b".repeat(64));
        let started = Instant::now();
        let failed = store.download_range(&digest, 0, 10).await.err().unwrap();
        let seconds = started.elapsed().as_secs_f64();
        assert!(matches!(failed, TransferError::Stalled { .. } | TransferError::Download { .. }), "{failed}");
        // One attempt of 1 s; three would take 3 s and their backoff.
        assert!(seconds < 2.5, "gave up after {seconds:.1} s: the stalled request was tried again");
        let head = store.stored_size(&digest).await.err().unwrap();
        assert!(matches!(head, TransferError::Stalled { .. }), "{head}");
    }

    #[tokio::test]
    async fn a_request_that_keeps_making_progress_is_not_a_stall() {
        let progress = LastProgress::now();
        let marking = progress.clone();
        let slow = async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                marking.mark();
            }
            "done"
        };
        assert_eq!(progress.unless_stalled(Duration::from_millis(250), slow).await, Some("done"));
        let stuck = std::future::pending::<()>();
        assert_eq!(progress.unless_stalled(Duration::from_millis(250), stuck).await, None);
    }

    #[test]
    fn an_unreachable_store_reads_as_the_innermost_cause() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let error = SdkError::<PutObjectError, ()>::dispatch_failure(ConnectorError::io(Box::new(refused)));
        assert_eq!(reason(error), "cannot reach the store: Connection refused (os error 111)");
        let error = SdkError::<PutObjectError, ()>::timeout_error("deadline");
        assert_eq!(reason(error), "the store did not answer in time");
    }
}
