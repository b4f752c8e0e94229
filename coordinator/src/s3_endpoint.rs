//! The embedded S3 endpoint: s3s over s3s-fs, storing objects under the data directory, with
//! every request checked against the minted key that signed it (SigV4 signature by s3s; expiry,
//! session token and scope here).

use std::sync::Arc;

use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::*;
use s3s::path::S3Path;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};

use proto::clock::SharedClock;

use proto::object_keys::project_prefix;

use crate::credentials::SigningKey;
use crate::metrics::{Metrics, ProjectLabels};
use crate::scope::{KeyScope, Target, authorize};
use crate::state::{MintedKeyRecord, State};

/// The header, and the presigned-URL query parameter, that carry the session token.
const SESSION_TOKEN_HEADER: &str = "x-amz-security-token";
const SESSION_TOKEN_QUERY: &str = "X-Amz-Security-Token";

/// Looks up minted keys for s3s's signature check.
struct MintedKeyAuth {
    state: Arc<dyn State>,
    clock: SharedClock,
    signing_key: Arc<SigningKey>,
}

/// The record of a key that is recorded and not expired by `clock`.
async fn live_record(state: &dyn State, clock: &SharedClock, access_key_id: &str) -> S3Result<MintedKeyRecord> {
    let record = state
        .minted_key(access_key_id)
        .await
        .map_err(|error| s3_error!(InternalError, "{}", error.line()))?
        .ok_or_else(|| s3_error!(InvalidAccessKeyId, "the access key is not one this endpoint minted"))?;
    if record.expires_unix <= clock.now_unix() {
        return Err(s3_error!(ExpiredToken, "the access key has expired: ask the coordinator for new credentials"));
    }
    Ok(record)
}

#[async_trait::async_trait]
impl S3Auth for MintedKeyAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        live_record(self.state.as_ref(), &self.clock, access_key).await?;
        Ok(SecretKey::from(self.signing_key.secret_for(access_key)))
    }
}

/// Checks expiry, session token and scope of every signed request.
struct MintedKeyAccess {
    metrics: Arc<Metrics>,
    refusals: Arc<RefusalLog>,
    state: Arc<dyn State>,
    clock: SharedClock,
    signing_key: Arc<SigningKey>,
    bucket: String,
    store_prefix: String,
}

fn query_parameter(cx: &S3AccessContext<'_>, name: &str) -> Option<String> {
    let query = cx.uri().query()?;
    form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
}

#[async_trait::async_trait]
impl S3Access for MintedKeyAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let Some(credentials) = cx.credentials() else {
            return Err(s3_error!(AccessDenied, "requests must be signed with credentials from the coordinator"));
        };
        let access_key_id = credentials.access_key.clone();
        let record = live_record(self.state.as_ref(), &self.clock, &access_key_id).await?;

        let presented_token = match cx.headers().get(SESSION_TOKEN_HEADER) {
            Some(value) => value.to_str().ok().map(str::to_owned),
            None => query_parameter(cx, SESSION_TOKEN_QUERY),
        };
        let token_ok =
            presented_token.is_some_and(|token| self.signing_key.session_token_matches(&access_key_id, &token));
        let refused =
            || self.metrics.storage_refusals.get_or_create(&ProjectLabels { project: record.project.clone() }).inc();
        if !token_ok {
            refused();
            self.refusals.note(|| {
                tracing::warn!(
                    access_key_id,
                    project = record.project,
                    "storage request refused: missing or wrong session token"
                )
            });
            return Err(s3_error!(InvalidToken, "the session token is missing or does not belong to the access key"));
        }

        let project_prefix = project_prefix(&self.store_prefix, &record.project);
        let scope = KeyScope { bucket: &self.bucket, project_prefix: &project_prefix, access: record.access };
        let list_prefix = query_parameter(cx, "prefix");
        let target = match cx.s3_path() {
            S3Path::Root => Target::Root,
            S3Path::Bucket { bucket } => Target::Bucket { bucket, list_prefix: list_prefix.as_deref() },
            S3Path::Object { bucket, key } => Target::Object { bucket, key },
        };
        let operation = cx.s3_op().name();
        authorize(scope, operation, target).map_err(|reason| {
            refused();
            self.refusals.note(|| {
                tracing::warn!(access_key_id, project = record.project, operation, reason, "storage request refused")
            });
            s3_error!(AccessDenied, "{reason}")
        })
    }
}

/// s3s-fs with reads that keep up with the engine: its GetObject streams files in 4 KiB reads
/// (one blocking-pool round trip each; measured ~200 MB/s and most of a core on loopback), so
/// the body is replaced by the same bytes read 1 MiB at a time. Every other operation, and
/// every header of GetObject, is s3s-fs's own.
struct ObjectFiles {
    files: s3s_fs::FileSystem,
    root: std::path::PathBuf,
    state: Arc<dyn State>,
    /// Held shared while an object becomes visible, exclusively by a flush while it revokes the
    /// project's keys: an upload begun before a flush either lands before it (and the flush
    /// deletes it) or finds its key revoked and leaves nothing.
    publish: PublishLock,
}

/// One lock per project (see [`ObjectFiles::publish`]), so a flush waits only for its own
/// project's uploads; the flush's side is `CacheService::flush_project`.
#[derive(Clone, Default)]
pub struct PublishLock(Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::RwLock<()>>>>>);

impl PublishLock {
    pub fn of_project(&self, project: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.0.lock().expect("publish locks").entry(project.to_owned()).or_default().clone()
    }
}

/// The failure of a write to the objects folder, as the worker's line and the log should say
/// it: the disk's own problem when it has one (probed, since s3s-fs keeps only a message).
fn write_failed(root: &std::path::Path, error: s3s::S3Error) -> s3s::S3Error {
    let probe = root.join(".write-probe");
    let probed = std::fs::write(&probe, [0u8; 4096]).and_then(|()| std::fs::remove_file(&probe));
    let problem =
        probed.as_ref().err().and_then(|error| Some(format!("{} ({error})", crate::error::disk_problem(error)?)));
    match problem {
        Some(problem) => {
            let _ = std::fs::remove_file(&probe);
            tracing::error!(objects = %root.display(), problem, "an upload to the embedded store failed");
            s3_error!(InternalError, "the coordinator cannot write its data directory: {problem}")
        }
        None => error,
    }
}

impl ObjectFiles {
    /// Where s3s-fs keeps an object (the access check has held the key to safe segments).
    fn object_path(&self, bucket: &str, key: &str) -> std::path::PathBuf {
        self.root.join(bucket).join(key)
    }

    /// Refuses to begin or complete a multipart upload of a blob already stored.
    fn refuse_stored(&self, bucket: &str, key: &str) -> S3Result<()> {
        if self.object_path(bucket, key).is_file() {
            return Err(s3_error!(
                PreconditionFailed,
                "the blob is already stored, and a stored blob is never replaced"
            ));
        }
        Ok(())
    }

    /// Checks an object s3s-fs just wrote against the digest its key names; one that does not
    /// match is deleted (nothing else was there: a stored blob is never replaced) and refused.
    async fn check_stored(&self, bucket: &str, key: &str) -> S3Result<()> {
        let path = self.object_path(bucket, key);
        let expected = blob_hex(key).ok_or_else(|| s3_error!(InvalidRequest, "not a blob key"))?.to_owned();
        let actual = tokio::task::spawn_blocking({
            let path = path.clone();
            move || crate::store::file_sha256_hex(&path)
        })
        .await
        .map_err(|error| s3_error!(InternalError, "{error}"))?
        .map_err(|error| s3_error!(error, InternalError))?;
        if actual == expected {
            return Ok(());
        }
        let _ = tokio::fs::remove_file(&path).await;
        Err(bad_digest(&expected, &actual))
    }

    /// Refuses a multipart operation on an upload the signing key did not begin (another
    /// project's, found by its ID), whatever object key the request names. s3s-fs records
    /// the access key that began each upload in `.upload-<id>.json` at its root.
    async fn owns_upload(&self, upload_id: &str, credentials: Option<&s3s::auth::Credentials>) -> S3Result<()> {
        let well_formed = upload_id.len() == 36
            && upload_id
                .bytes()
                .enumerate()
                .all(|(i, b)| if matches!(i, 8 | 13 | 18 | 23) { b == b'-' } else { b.is_ascii_hexdigit() });
        let no_such = || s3_error!(NoSuchUpload, "no upload {upload_id:?} was begun by this key");
        if !well_formed {
            return Err(no_such());
        }
        let recorded =
            tokio::fs::read(self.root.join(format!(".upload-{upload_id}.json"))).await.map_err(|_| no_such())?;
        let began: Option<String> = serde_json::from_slice(&recorded).map_err(|_| no_such())?;
        match (began, credentials) {
            (Some(began), Some(credentials)) if began == credentials.access_key => Ok(()),
            _ => Err(no_such()),
        }
    }

    /// Holds the publish lock for an object about to become visible, once the key that signed
    /// the request is still recorded (a flush revokes its project's keys).
    async fn publishing(
        &self,
        credentials: Option<&s3s::auth::Credentials>,
    ) -> S3Result<tokio::sync::OwnedRwLockReadGuard<()>> {
        let access_key_id = credentials.map(|credentials| credentials.access_key.as_str()).unwrap_or_default();
        let revoked = || {
            s3_error!(
                AccessDenied,
                "the project was flushed while this upload ran: its key is revoked and nothing was stored"
            )
        };
        let lookup = || async {
            self.state.minted_key(access_key_id).await.map_err(|error| s3_error!(InternalError, "{}", error.line()))
        };
        let project = lookup().await?.ok_or_else(revoked)?.project;
        let guard = self.publish.of_project(&project).read_owned().await;
        // Looked up again under the lock: a flush may have revoked it meanwhile.
        lookup().await?.ok_or_else(revoked)?;
        Ok(guard)
    }
}

/// Bytes per read of an object's file, and per write of an uploaded body.
const READ_CHUNK: usize = 1 << 20;

/// `length` bytes of `file` from `start`, read [`READ_CHUNK`] at a time on the blocking pool
/// straight into the buffers the answer sends: tokio's `File` reads into a buffer of its own
/// and copies out of it, a tenth of the endpoint's CPU while it serves a restore. A file that
/// ends early fails the body (the client sees a short answer, never other bytes).
fn file_body(file: std::fs::File, start: u64, length: u64) -> StreamingBlob {
    let end = start.saturating_add(length);
    let chunks = futures::stream::try_unfold((file, start), move |(file, at)| async move {
        if at >= end {
            return Ok::<_, std::io::Error>(None);
        }
        let want = (end - at).min(READ_CHUNK as u64) as usize;
        let (file, chunk) =
            tokio::task::spawn_blocking(move || read_chunk(file, at, want)).await.map_err(std::io::Error::other)??;
        let next = at + chunk.len() as u64;
        Ok(Some((bytes::Bytes::from(chunk), (file, next))))
    });
    StreamingBlob::wrap(chunks)
}

/// Up to `want` bytes of `file` at `offset`, read into memory never initialized before.
fn read_chunk(file: std::fs::File, offset: u64, want: usize) -> std::io::Result<(std::fs::File, Vec<u8>)> {
    let mut chunk = Vec::with_capacity(want);
    while chunk.len() < want {
        let at = offset + chunk.len() as u64;
        let read = rustix::io::pread(&file, rustix::buffer::spare_capacity(&mut chunk), at)?;
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the object is shorter than its length",
            ));
        }
    }
    // A capacity above `want` (the allocator's to give) must not lengthen the answer.
    chunk.truncate(want);
    Ok((file, chunk))
}

/// An upload's body in pieces of at least [`READ_CHUNK`] bytes: s3s-fs writes each piece it is
/// given through one blocking-pool round trip, and HTTP hands over a few KiB at a time. The
/// body's own failure (it ended early, stalled, or did not hash to its signed
/// `x-amz-content-sha256`) is kept in `failed`, so the answer blames the client, not the disk.
fn coalesced(body: StreamingBlob, failed: &BodyFailure) -> StreamingBlob {
    StreamingBlob::wrap(Coalesced { body, piece: bytes::BytesMut::new(), ended: false, failed: failed.clone() })
}

struct Coalesced {
    body: StreamingBlob,
    piece: bytes::BytesMut,
    ended: bool,
    failed: BodyFailure,
}

/// How an upload's body failed, if it did (see [`coalesced`]).
#[derive(Clone, Default)]
struct BodyFailure(Arc<std::sync::Mutex<Option<String>>>);

impl BodyFailure {
    /// The client's error in S3's words, when the body failed; else `otherwise`.
    fn or(&self, otherwise: s3s::S3Error) -> s3s::S3Error {
        match self.0.lock().expect("body failure").clone() {
            Some(failure) if failure.contains("Sha256Mismatch") => {
                let mut error = s3s::S3Error::with_message(
                    s3s::S3ErrorCode::Custom("XAmzContentSHA256Mismatch".into()),
                    "the body does not hash to its x-amz-content-sha256 header",
                );
                error.set_status_code(http::StatusCode::BAD_REQUEST);
                error
            }
            Some(failure) => s3_error!(IncompleteBody, "the request body failed: {failure}"),
            None => otherwise,
        }
    }
}

impl futures::Stream for Coalesced {
    type Item = Result<bytes::Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            if self.ended {
                let rest = self.piece.split().freeze();
                return Poll::Ready((!rest.is_empty()).then_some(Ok(rest)));
            }
            match std::pin::Pin::new(&mut self.body).poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    self.piece.extend_from_slice(&bytes);
                    if self.piece.len() >= READ_CHUNK {
                        return Poll::Ready(Some(Ok(self.piece.split().freeze())));
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    self.ended = true;
                    self.piece.clear();
                    self.failed.0.lock().expect("body failure").get_or_insert_with(|| error.to_string());
                    return Poll::Ready(Some(Err(std::io::Error::other(error))));
                }
                Poll::Ready(None) => self.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[async_trait::async_trait]
impl S3 for ObjectFiles {
    async fn get_object(&self, mut req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        // The access check has already held the key to safe segments under the project's prefix.
        let path = self.object_path(&req.input.bucket, &req.input.key);
        let (file, file_len) = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path).map_err(|error| s3_error!(error, NoSuchKey))?;
            let len = file.metadata().map_err(|error| s3_error!(error, InternalError))?.len();
            Ok::<_, s3s::S3Error>((file, len))
        })
        .await
        .map_err(|error| s3_error!(InternalError, "{error}"))??;
        // The range is checked against the object and handed on as plain offsets: s3s-fs
        // panics on a suffix range longer than an i64 (`bytes=-9223372036854775808`).
        let start = match req.input.range {
            Some(range) => {
                let checked = range.check(file_len)?;
                req.input.range = Some(Range::Int { first: checked.start, last: Some(checked.end - 1) });
                checked.start
            }
            None => 0,
        };
        let mut response = self.files.get_object(req).await?;
        let length = response.output.content_length.unwrap_or(0).max(0) as u64;
        response.output.body = Some(file_body(file, start, length));
        Ok(response)
    }

    async fn create_bucket(&self, req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        self.files.create_bucket(req).await
    }

    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        self.files.copy_object(req).await
    }

    async fn delete_bucket(&self, req: S3Request<DeleteBucketInput>) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.files.delete_bucket(req).await
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.files.delete_object(req).await
    }

    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.files.delete_objects(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.files.get_bucket_location(req).await
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        self.files.head_bucket(req).await
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        self.files.head_object(req).await
    }

    async fn list_buckets(&self, req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        self.files.list_buckets(req).await
    }

    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        self.files.list_objects(req).await
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.files.list_objects_v2(req).await
    }

    async fn put_object(&self, mut req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        // A stored blob is never replaced: it was checked against its address when written.
        if self.object_path(&req.input.bucket, &req.input.key).is_file() {
            // Read to its end: a worker retrying an upload its killed save already
            // finished gets its answer, not a broken pipe.
            if let Some(body) = req.input.body.as_mut() {
                drain_up_to(body, u64::MAX).await;
            }
            return Ok(S3Response::new(PutObjectOutput::default()));
        }
        let failed = BodyFailure::default();
        req.input.body = req.input.body.map(|body| coalesced(body, &failed));
        if let Some(e_tag) = plain_blob_e_tag(&req.input).filter(|_| req.trailing_headers.is_none()) {
            return self.put_blob(req.input, req.credentials.as_ref(), e_tag).await.map_err(|error| failed.or(error));
        }
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        // s3s-fs writes and renames in one call: the lock spans it.
        let _publishing = self.publishing(req.credentials.as_ref()).await?;
        let stored = self.files.put_object(req).await.map_err(|error| failed.or(write_failed(&self.root, error)))?;
        self.check_stored(&bucket, &key).await?;
        Ok(stored)
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.refuse_stored(&req.input.bucket, &req.input.key)?;
        self.files.create_multipart_upload(req).await
    }

    async fn upload_part(&self, mut req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        self.owns_upload(&req.input.upload_id, req.credentials.as_ref()).await?;
        let failed = BodyFailure::default();
        req.input.body = req.input.body.map(|body| coalesced(body, &failed));
        self.files.upload_part(req).await.map_err(|error| failed.or(write_failed(&self.root, error)))
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.files.upload_part_copy(req).await
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        // s3s-fs checks who began an upload for its other multipart operations, not this one.
        self.owns_upload(&req.input.upload_id, req.credentials.as_ref()).await?;
        self.files.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.owns_upload(&req.input.upload_id, req.credentials.as_ref()).await?;
        self.refuse_stored(&req.input.bucket, &req.input.key)?;
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let _publishing = self.publishing(req.credentials.as_ref()).await?;
        let stored =
            self.files.complete_multipart_upload(req).await.map_err(|error| write_failed(&self.root, error))?;
        self.check_stored(&bucket, &key).await?;
        Ok(stored)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.owns_upload(&req.input.upload_id, req.credentials.as_ref()).await?;
        self.files.abort_multipart_upload(req).await
    }
}

/// A worker's PUT of a content-addressed blob (`…/blobs/sha256/<hex>`) that asks for nothing
/// but the bytes: no checksum, no Content-MD5, no metadata or attributes beyond the default
/// content type, no condition. Its ETag is the first 32 hex digits of its address (it changes
/// exactly when the content does); [`ObjectFiles::put_blob`] writes it. `None`: anything else,
/// which goes to s3s-fs.
fn plain_blob_e_tag(input: &PutObjectInput) -> Option<String> {
    let hex = proto::object_keys::blob_hex_of_key(&input.key)?;
    let plain = hex.len() == 64
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && input.content_length.is_some()
        && input.content_md5.is_none()
        && input.checksum_algorithm.is_none()
        && input.checksum_crc32.is_none()
        && input.checksum_crc32c.is_none()
        && input.checksum_sha1.is_none()
        && input.checksum_sha256.is_none()
        && input.checksum_crc64nvme.is_none()
        && input.metadata.as_ref().is_none_or(|metadata| metadata.is_empty())
        // aws-sdk-s3 sends S3's default content type when none is set.
        && input.content_type.as_deref().is_none_or(|content_type| content_type == "application/octet-stream")
        && input.content_encoding.is_none()
        && input.content_disposition.is_none()
        && input.content_language.is_none()
        && input.cache_control.is_none()
        && input.expires.is_none()
        && input.website_redirect_location.is_none()
        && input.if_match.is_none()
        && input.if_none_match.is_none()
        && input.storage_class.is_none();
    plain.then(|| hex[..32].to_ascii_lowercase())
}

impl ObjectFiles {
    /// Writes a blob the way s3s-fs would (a temporary file renamed into place, its ETag in the
    /// `.internal.json` file s3s-fs reads for GET and HEAD) but without s3s-fs's MD5 pass, which
    /// cost the endpoint most of a core per 700 MB.
    async fn put_blob(
        &self,
        input: PutObjectInput,
        credentials: Option<&s3s::auth::Credentials>,
        e_tag: String,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        use base64::Engine;
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let expected = input.content_length.unwrap_or(0).max(0) as u64;
        let object_path = self.object_path(&input.bucket, &input.key);
        let parent = object_path.parent().ok_or_else(|| s3_error!(InvalidRequest))?.to_owned();
        let mut body = input.body.ok_or_else(|| s3_error!(IncompleteBody, "no body"))?;
        // Deleted when dropped, also when the client goes away mid-body and this future with it.
        let temp =
            match tempfile::Builder::new().prefix(".tmp.layer-cache-").suffix(".internal.part").tempfile_in(&self.root)
            {
                Ok(temp) => temp,
                Err(error) => {
                    drain(&mut body).await;
                    return Err(write_failed(&self.root, s3_error!(error, InternalError)));
                }
            };
        let (file, temp_path) = temp.into_parts();
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let written: std::io::Result<u64> = async {
            let mut file = tokio::fs::File::from_std(file);
            let mut written = 0u64;
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(std::io::Error::other)?;
                written += piece.len() as u64;
                sha2::Digest::update(&mut hasher, &piece);
                if let Err(error) = file.write_all(&piece).await {
                    drain(&mut body).await;
                    return Err(error);
                }
            }
            file.flush().await?;
            Ok(written)
        }
        .await;
        let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let info_path =
            self.root.join(format!(".bucket-{}.object-{}.internal.json", encode(&input.bucket), encode(&input.key)));
        let actual = hex::encode(sha2::Digest::finalize(hasher));
        let address = blob_hex(&input.key).unwrap_or_default();
        if matches!(written, Ok(size) if size == expected) && actual != address {
            return Err(bad_digest(address, &actual));
        }
        // The ETag is in place before the object appears, so no GET finds one without the other.
        let moved = match written {
            Ok(size) if size == expected => {
                let _publishing = self.publishing(credentials).await?;
                async {
                    tokio::fs::write(&info_path, serde_json::json!({ "e_tag": e_tag }).to_string()).await?;
                    tokio::fs::create_dir_all(&parent).await?;
                    temp_path.persist(&object_path).map_err(|error| error.error)
                }
                .await
            }
            Ok(size) => Err(std::io::Error::other(format!("{size} bytes of {expected}"))),
            Err(error) => Err(error),
        };
        moved.map_err(|error| match crate::error::disk_problem(&error) {
            Some(problem) => {
                let problem = format!("{problem} ({error})");
                tracing::error!(objects = %self.root.display(), problem, "an upload to the embedded store failed");
                s3_error!(InternalError, "the coordinator cannot write its data directory: {problem}")
            }
            None => s3_error!(error, IncompleteBody),
        })?;
        let output = PutObjectOutput { e_tag: Some(ETag::Strong(e_tag)), ..Default::default() };
        Ok(S3Response::new(output))
    }
}

/// The `<64 hex>` a blob key ends in.
fn blob_hex(key: &str) -> Option<&str> {
    proto::object_keys::blob_hex_of_key(key).filter(|hex| hex.len() == 64)
}

fn bad_digest(expected: &str, actual: &str) -> s3s::S3Error {
    s3_error!(BadDigest, "the body hashes to sha256:{actual}, not to the blob's address sha256:{expected}")
}

/// How much of a refused upload's body the endpoint still reads: a client that is still
/// sending when the answer comes reads no answer at all (it sees a broken pipe), so a refusal
/// of a body up to this size reaches the worker in its own words.
const DRAINED_BODY_LIMIT: u64 = 64 << 20;

/// Reads and drops what is left of a refused upload's body, up to [`DRAINED_BODY_LIMIT`].
async fn drain(body: &mut StreamingBlob) {
    drain_up_to(body, DRAINED_BODY_LIMIT).await;
}

/// Reads and drops up to `limit` bytes of a body.
async fn drain_up_to(body: &mut StreamingBlob, limit: u64) {
    use futures::StreamExt;
    let mut drained = 0u64;
    while drained < limit {
        match body.next().await {
            Some(Ok(piece)) => drained += piece.len() as u64,
            Some(Err(_)) | None => return,
        }
    }
}

/// At most this many refusals are logged per [`REFUSAL_LOG_WINDOW`]; the rest are counted,
/// and the count is logged once the window has passed.
const REFUSALS_LOGGED_PER_WINDOW: u32 = 20;
const REFUSAL_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// The log of refused storage requests, rate-limited: a stream of anonymous or hostile
/// requests costs a few lines per window, not one each.
#[derive(Default)]
pub struct RefusalLog(std::sync::Mutex<RefusalWindow>);

#[derive(Default)]
struct RefusalWindow {
    started: Option<std::time::Instant>,
    logged: u32,
    unlogged: u64,
}

impl RefusalLog {
    /// Runs `log` (one line) unless this window's lines are spent.
    pub fn note(&self, log: impl FnOnce()) {
        let mut window = self.0.lock().expect("refusal log");
        let now = std::time::Instant::now();
        if window.started.is_none_or(|started| now.duration_since(started) >= REFUSAL_LOG_WINDOW) {
            if window.unlogged > 0 {
                tracing::warn!(
                    "{} more storage requests were refused in the last {} s (not logged one by one)",
                    window.unlogged,
                    REFUSAL_LOG_WINDOW.as_secs()
                );
            }
            *window = RefusalWindow { started: Some(now), logged: 0, unlogged: 0 };
        }
        if window.logged < REFUSALS_LOGGED_PER_WINDOW {
            window.logged += 1;
            drop(window);
            log();
        } else {
            window.unlogged += 1;
        }
    }
}

/// The largest body of a request that is not an object or part upload (a multipart
/// completion naming 10,000 parts is about 1.5 MB).
const MOST_REQUEST_XML: usize = 8 << 20;

/// The endpoint's front door, before s3s reads anything: a request signed by no key, or by a
/// key this endpoint never minted, is refused from its headers alone, its body unread and its
/// connection closed; the body of every request but a PUT is capped at [`MOST_REQUEST_XML`];
/// an answer of the endpoint's own failure (5xx) is logged, rate-limited like the refusals.
#[derive(Clone)]
pub struct Gate {
    s3: s3s::service::S3Service,
    state: Arc<dyn State>,
    refusals: Arc<RefusalLog>,
}

/// The access key a request is signed with (SigV4 header or presigned query), if it names one
/// of a plausible shape.
fn signing_key_id<B>(request: &http::Request<B>) -> Option<String> {
    let credential = match request.headers().get(http::header::AUTHORIZATION) {
        Some(value) => value
            .to_str()
            .ok()?
            .strip_prefix("AWS4-HMAC-SHA256")?
            .split(',')
            .find_map(|part| part.trim().strip_prefix("Credential="))?
            .to_owned(),
        None => form_urlencoded::parse(request.uri().query()?.as_bytes())
            .find(|(name, _)| name == "X-Amz-Credential")
            .map(|(_, value)| value.into_owned())?,
    };
    let id = credential.split('/').next()?;
    (!id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| id.to_owned())
}

/// An S3 error answer written by the gate itself; on HTTP/1 it closes the connection, so an
/// unread body is never read.
fn gate_refusal(
    version: http::Version,
    status: http::StatusCode,
    code: &str,
    message: &str,
) -> http::Response<s3s::Body> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    let mut response = http::Response::new(s3s::Body::from(xml));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/xml"));
    if version <= http::Version::HTTP_11 {
        headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    response
}

impl Gate {
    /// The refusal, from the headers alone, of a request no key of this endpoint signed. A key
    /// it minted (live or expired) passes: s3s checks the signature and gives the precise answer.
    async fn refusal<B>(&self, request: &http::Request<B>) -> Option<http::Response<s3s::Body>> {
        let refuse = |code: &'static str, message: &'static str| {
            self.refusals
                .note(|| tracing::warn!(code, method = %request.method(), "storage request refused: {message}"));
            Some(gate_refusal(request.version(), http::StatusCode::FORBIDDEN, code, message))
        };
        let Some(access_key_id) = signing_key_id(request) else {
            return refuse("AccessDenied", "requests must be signed with credentials from the coordinator");
        };
        match self.state.minted_key(&access_key_id).await {
            Ok(None) => refuse("InvalidAccessKeyId", "the access key is not one this endpoint minted"),
            // A database failure is s3s's to answer, through the same lookup.
            Ok(Some(_)) | Err(_) => None,
        }
    }

    async fn answer(
        self,
        request: http::Request<crate::listener::TimedBody>,
    ) -> Result<http::Response<s3s::Body>, s3s::HttpError> {
        if let Some(refusal) = self.refusal(&request).await {
            return Ok(refusal);
        }
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let request = if request.method() == http::Method::PUT {
            request.map(s3s::Body::http_body_unsync)
        } else {
            request.map(|body| s3s::Body::http_body_unsync(http_body_util::Limited::new(body, MOST_REQUEST_XML)))
        };
        let answered = self.s3.call(request).await;
        if let Ok(response) = &answered
            && response.status().is_server_error()
        {
            let status = response.status().as_u16();
            self.refusals.note(|| tracing::error!(%method, path, status, "a storage request failed in the endpoint"));
        }
        answered
    }
}

impl hyper::service::Service<http::Request<crate::listener::TimedBody>> for Gate {
    type Response = http::Response<s3s::Body>;
    type Error = s3s::HttpError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, request: http::Request<crate::listener::TimedBody>) -> Self::Future {
        Box::pin(self.clone().answer(request))
    }
}

/// Where the endpoint finds the keys it admits: their records (through the state, whichever
/// backend holds it), the clock their expiry is read by, and the key their secrets derive from.
pub struct MintedKeys {
    pub state: Arc<dyn State>,
    pub clock: SharedClock,
    pub signing_key: Arc<SigningKey>,
}

/// Builds the endpoint's HTTP service over the objects in `objects_root`.
pub fn build_service(
    metrics: Arc<Metrics>,
    objects_root: &std::path::Path,
    keys: MintedKeys,
    bucket: &str,
    store_prefix: &str,
    publish: PublishLock,
) -> std::io::Result<Gate> {
    let MintedKeys { state, clock, signing_key } = keys;
    let file_system =
        s3s_fs::FileSystem::new(objects_root).map_err(|error| std::io::Error::other(format!("{error:?}")))?;
    let files = ObjectFiles { files: file_system, root: objects_root.to_path_buf(), state: state.clone(), publish };
    let mut builder = s3s::service::S3ServiceBuilder::new(files);
    builder.set_auth(MintedKeyAuth { state: state.clone(), clock: clock.clone(), signing_key: signing_key.clone() });
    let refusals = Arc::new(RefusalLog::default());
    builder.set_access(MintedKeyAccess {
        metrics,
        refusals: refusals.clone(),
        state: state.clone(),
        clock,
        signing_key,
        bucket: bucket.to_owned(),
        store_prefix: store_prefix.to_owned(),
    });
    Ok(Gate { s3: builder.build(), state, refusals })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::{READ_CHUNK, file_body};

    /// The pieces of a GET's body, or the error it ended with.
    async fn pieces(body: s3s::dto::StreamingBlob) -> Result<Vec<bytes::Bytes>, String> {
        let mut body = body;
        let mut pieces = Vec::new();
        while let Some(piece) = body.next().await {
            pieces.push(piece.map_err(|error| error.to_string())?);
        }
        Ok(pieces)
    }

    #[tokio::test]
    async fn a_range_s_bytes_come_exactly_in_pieces_of_at_most_one_read() {
        let content: Vec<u8> = (0..READ_CHUNK * 5 / 2 + 7).map(|i| (i * 31 % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        std::fs::write(&path, &content).unwrap();
        let file = || std::fs::File::open(&path).unwrap();
        for (start, length) in
            [(0, content.len()), (100, READ_CHUNK + 5), (READ_CHUNK, READ_CHUNK), (content.len() - 3, 3)]
        {
            let got = pieces(file_body(file(), start as u64, length as u64)).await.unwrap();
            assert!(got.iter().all(|piece| !piece.is_empty() && piece.len() <= READ_CHUNK), "{start}+{length}");
            assert_eq!(got.concat(), &content[start..start + length], "{start}+{length}");
        }
        assert!(pieces(file_body(file(), 5, 0)).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_answer_fails_the_body_rather_than_ending_it_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        std::fs::write(&path, vec![1u8; READ_CHUNK + 10]).unwrap();
        let failed = pieces(file_body(std::fs::File::open(&path).unwrap(), 0, READ_CHUNK as u64 + 20)).await;
        assert!(failed.unwrap_err().contains("shorter than its length"));
    }
}
