//! The distribution protocol over HTTP against an in-memory `Backend`: every route, ranges,
//! chunked and monolithic uploads, digests that do not match never reaching the backend, bad
//! names, the manifest cap, idle sessions and connections, a stop that waits for a manifest
//! `PUT` in flight; and skopeo, an independent client, copying an image in and out byte for byte.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, Method, Request};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;
use proto::clock::ManualClock;
use proto::digest::sha256_digest;
use registry::{
    Backend, BlobRead, ByteRange, ManifestBody, Reference, RegistryError, ServeOptions, UploadedBlob, serve,
};
use tokio::sync::{Notify, oneshot};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A backend that keeps everything in memory and counts what reaches it.
#[derive(Default)]
struct Memory {
    blobs: Mutex<HashMap<String, Bytes>>,
    manifests: Mutex<HashMap<(String, String), ManifestBody>>,
    n_blobs_uploaded: AtomicUsize,
    n_manifests_put: AtomicUsize,
    /// Blobs whose stream fails halfway, as a store that lost them mid-read.
    broken: Mutex<HashSet<String>>,
    /// When set, a manifest `PUT` signals `put_entered` and waits for `put_release`.
    hold_puts: AtomicBool,
    put_entered: Notify,
    put_release: Notify,
}

impl Memory {
    fn add_blob(&self, bytes: &Bytes) -> String {
        let digest = sha256_digest(bytes);
        self.blobs.lock().unwrap().insert(digest.clone(), bytes.clone());
        digest
    }

    fn add_manifest(&self, repository: &str, tag: &str, bytes: &Bytes) -> String {
        let digest = sha256_digest(bytes);
        let body = ManifestBody { media_type: OCI_MANIFEST.into(), digest: digest.clone(), bytes: bytes.clone() };
        let mut manifests = self.manifests.lock().unwrap();
        manifests.insert((repository.into(), tag.into()), body.clone());
        manifests.insert((repository.into(), digest.clone()), body);
        digest
    }

    fn blob(&self, digest: &str) -> Option<Bytes> {
        self.blobs.lock().unwrap().get(digest).cloned()
    }
}

#[async_trait::async_trait]
impl Backend for Memory {
    async fn manifest(&self, repository: &str, reference: &Reference) -> Result<Option<ManifestBody>, RegistryError> {
        let key = match reference {
            Reference::Tag(tag) => tag.clone(),
            Reference::Digest(digest) => digest.clone(),
        };
        Ok(self.manifests.lock().unwrap().get(&(repository.to_owned(), key)).cloned())
    }

    async fn blob_size(&self, _repository: &str, digest: &str) -> Result<Option<u64>, RegistryError> {
        Ok(self.blob(digest).map(|bytes| bytes.len() as u64))
    }

    async fn read_blob(
        &self,
        _repository: &str,
        digest: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobRead>, RegistryError> {
        let Some(bytes) = self.blob(digest) else { return Ok(None) };
        let size = bytes.len() as u64;
        let part = match range {
            Some(ByteRange { start, end }) => bytes.slice(start as usize..=end as usize),
            None => bytes,
        };
        let mut pieces: Vec<std::io::Result<Bytes>> =
            part.chunks(256 * 1024).map(|chunk| Ok(part.slice_ref(chunk))).collect();
        if self.broken.lock().unwrap().contains(digest) {
            pieces.truncate(pieces.len() / 2);
            pieces.push(Err(std::io::Error::other("the store lost the blob")));
        }
        Ok(Some(BlobRead { size, body: futures::stream::iter(pieces).boxed() }))
    }

    async fn blob_uploaded(&self, _repository: &str, blob: UploadedBlob) -> Result<(), RegistryError> {
        let bytes = Bytes::from(tokio::fs::read(&blob.path).await.unwrap());
        assert_eq!((sha256_digest(&bytes), bytes.len() as u64), (blob.digest.clone(), blob.size));
        self.blobs.lock().unwrap().insert(blob.digest, bytes);
        self.n_blobs_uploaded.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn put_manifest(
        &self,
        repository: &str,
        reference: &Reference,
        manifest: ManifestBody,
    ) -> Result<(), RegistryError> {
        if self.hold_puts.load(Ordering::SeqCst) {
            self.put_entered.notify_one();
            self.put_release.notified().await;
        }
        let json: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap();
        let named = json["layers"].as_array().into_iter().flatten().chain([&json["config"]]);
        for descriptor in named {
            if let Some(digest) = descriptor["digest"].as_str()
                && self.blob(digest).is_none()
            {
                return Err(RegistryError::ManifestBlobUnknown(digest.to_owned()));
            }
        }
        let key = match reference {
            Reference::Tag(tag) => tag.clone(),
            Reference::Digest(digest) => digest.clone(),
        };
        let mut manifests = self.manifests.lock().unwrap();
        manifests.insert((repository.to_owned(), manifest.digest.clone()), manifest.clone());
        manifests.insert((repository.to_owned(), key), manifest);
        self.n_manifests_put.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn tags(&self, repository: &str) -> Result<Vec<String>, RegistryError> {
        let manifests = self.manifests.lock().unwrap();
        let tags = manifests.keys().filter(|(name, key)| name == repository && !key.contains(':'));
        Ok(tags.map(|(_, tag)| tag.clone()).collect())
    }
}

/// A backend that keeps nothing and lists nothing: the trait's optional methods as they default.
struct Bare;

#[async_trait::async_trait]
impl Backend for Bare {
    async fn manifest(&self, _: &str, _: &Reference) -> Result<Option<ManifestBody>, RegistryError> {
        Ok(None)
    }

    async fn blob_size(&self, _: &str, _: &str) -> Result<Option<u64>, RegistryError> {
        Ok(None)
    }

    async fn read_blob(&self, _: &str, _: &str, _: Option<ByteRange>) -> Result<Option<BlobRead>, RegistryError> {
        Ok(None)
    }

    async fn blob_uploaded(&self, _: &str, _: UploadedBlob) -> Result<(), RegistryError> {
        Err(RegistryError::Denied("read-only".into()))
    }

    async fn put_manifest(&self, _: &str, _: &Reference, _: ManifestBody) -> Result<(), RegistryError> {
        Err(RegistryError::Denied("read-only".into()))
    }
}

/// A backend whose token may not push: it says so before anything is spooled.
struct ReadOnly(Memory);

#[async_trait::async_trait]
impl Backend for ReadOnly {
    async fn manifest(&self, repository: &str, reference: &Reference) -> Result<Option<ManifestBody>, RegistryError> {
        self.0.manifest(repository, reference).await
    }

    async fn blob_size(&self, repository: &str, digest: &str) -> Result<Option<u64>, RegistryError> {
        self.0.blob_size(repository, digest).await
    }

    async fn read_blob(
        &self,
        repository: &str,
        digest: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobRead>, RegistryError> {
        self.0.read_blob(repository, digest, range).await
    }

    async fn blob_uploaded(&self, repository: &str, blob: UploadedBlob) -> Result<(), RegistryError> {
        self.0.blob_uploaded(repository, blob).await
    }

    async fn put_manifest(
        &self,
        repository: &str,
        reference: &Reference,
        manifest: ManifestBody,
    ) -> Result<(), RegistryError> {
        self.0.put_manifest(repository, reference, manifest).await
    }

    async fn check_push(&self, _repository: &str) -> Result<(), RegistryError> {
        Err(RegistryError::Denied("token tok_1 may save to pr-* only, not to branch \"main\"".into()))
    }
}

/// A view served on a port the kernel picked, with a clock the test moves.
struct Served {
    addr: SocketAddr,
    memory: Arc<Memory>,
    clock: Arc<ManualClock>,
    spool: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    async fn start() -> Served {
        Served::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut ServeOptions)) -> Served {
        let memory = Arc::new(Memory::default());
        let clock = ManualClock::starting_now();
        let spool = tempfile::tempdir().unwrap();
        let mut options = ServeOptions::new(spool.path().join("spool"));
        options.clock = clock.clone();
        tweak(&mut options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, memory.clone(), options, async move {
            let _ = stopped.await;
        }));
        Served { addr, memory, clock, spool, stop: Some(stop), task }
    }

    fn n_spool_files(&self) -> usize {
        std::fs::read_dir(self.spool.path().join("spool")).map_or(0, |dir| dir.count())
    }

    /// Stops the view and waits for it; gives back what outlives it.
    async fn stop(mut self) -> (Arc<Memory>, tempfile::TempDir) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
        (self.memory, self.spool)
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    /// The body, or why it did not arrive whole.
    body: Result<Bytes, String>,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |value| value.to_str().unwrap())
    }

    fn bytes(&self) -> &Bytes {
        self.body.as_ref().unwrap()
    }

    /// The OCI error code of an error body.
    fn code(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(self.bytes()).unwrap();
        let errors = json["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 1);
        assert!(errors[0]["detail"].is_null());
        assert!(!errors[0]["message"].as_str().unwrap().contains('\n'));
        errors[0]["code"].as_str().unwrap().to_owned()
    }
}

type RequestBody = UnsyncBoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> RequestBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// A body sent chunked (no `Content-Length`), in the given pieces.
fn chunked(pieces: Vec<Bytes>) -> RequestBody {
    StreamBody::new(futures::stream::iter(pieces.into_iter().map(|piece| Ok(http_body::Frame::data(piece)))))
        .boxed_unsync()
}

/// One request on a connection of its own.
async fn send_body(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: RequestBody) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder().method(Method::from_bytes(method.as_bytes()).unwrap()).uri(path);
    request = request.header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender.send_request(request.body(body).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map(|collected| collected.to_bytes()).map_err(|err| err.to_string());
    Reply { status: parts.status.as_u16(), headers: parts.headers, body }
}

/// A manifest `PUT` the backend holds (until `put_release`), once the backend has it.
async fn held_manifest_put(served: &Served, seed: u64) -> tokio::task::JoinHandle<Reply> {
    let config = bytes_of(100, seed);
    served.memory.add_blob(&config);
    served.memory.hold_puts.store(true, Ordering::SeqCst);
    let manifest = oci_manifest(&config, &[]);
    let addr = served.addr;
    let push = tokio::spawn(async move { send(addr, "PUT", "/v2/app/manifests/1", &[], &manifest).await });
    served.memory.put_entered.notified().await;
    push
}

async fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    send_body(addr, method, path, headers, full(Bytes::copy_from_slice(body))).await
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, "GET", path, &[], b"").await
}

/// `n` bytes that differ with `seed`.
fn bytes_of(n: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut bytes = Vec::with_capacity(n);
    while bytes.len() < n {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(n);
    Bytes::from(bytes)
}

fn oci_manifest(config: &Bytes, layers: &[&Bytes]) -> Bytes {
    let descriptor = |media_type: &str, bytes: &Bytes| serde_json::json!({"mediaType": media_type, "digest": sha256_digest(bytes), "size": bytes.len()});
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": layers.iter().map(|layer| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)).collect::<Vec<_>>(),
    });
    Bytes::from(serde_json::to_vec(&manifest).unwrap())
}

#[tokio::test]
async fn the_ping_answers_an_empty_object_and_every_response_names_the_api_version() {
    let served = Served::start().await;
    for path in ["/v2/", "/v2"] {
        let reply = get(served.addr, path).await;
        assert_eq!((reply.status, reply.bytes().as_ref()), (200, &b"{}"[..]));
        assert_eq!(reply.header("docker-distribution-api-version"), "registry/2.0");
        assert_eq!(reply.header("content-type"), "application/json");
    }
    for path in ["/", "/v1/", "/v2/app", "/v2/app/unknown/x"] {
        let reply = get(served.addr, path).await;
        assert_eq!((reply.status, reply.code().as_str()), (404, "UNSUPPORTED"), "{path}");
        assert_eq!(reply.header("docker-distribution-api-version"), "registry/2.0");
    }
    served.stop().await;
}

#[tokio::test]
async fn manifests_are_served_by_tag_and_digest_as_stored_whatever_the_accept_header_says() {
    let served = Served::start().await;
    let config = bytes_of(300, 1);
    let manifest = oci_manifest(&config, &[]);
    let digest = served.memory.add_manifest("c/web", "latest", &manifest);
    for reference in ["latest", digest.as_str()] {
        let path = format!("/v2/c/web/manifests/{reference}");
        let accept = [("accept", "application/vnd.docker.distribution.manifest.v2+json")];
        let reply = send(served.addr, "GET", &path, &accept, b"").await;
        assert_eq!((reply.status, reply.bytes()), (200, &manifest));
        assert_eq!(reply.header("content-type"), OCI_MANIFEST);
        assert_eq!(reply.header("docker-content-digest"), digest);
        assert_eq!(reply.header("content-length"), manifest.len().to_string());

        let head = send(served.addr, "HEAD", &path, &[], b"").await;
        assert_eq!((head.status, head.bytes().len()), (200, 0));
        assert_eq!(head.header("content-length"), manifest.len().to_string());
        assert_eq!(head.header("docker-content-digest"), digest);
        assert_eq!(head.header("content-type"), OCI_MANIFEST);
    }
    let unknown = get(served.addr, "/v2/c/web/manifests/other").await;
    assert_eq!((unknown.status, unknown.code().as_str()), (404, "MANIFEST_UNKNOWN"));
    let elsewhere = get(served.addr, "/v2/c/api/manifests/latest").await;
    assert_eq!((elsewhere.status, elsewhere.code().as_str()), (404, "MANIFEST_UNKNOWN"));
    served.stop().await;
}

#[tokio::test]
async fn a_pushed_manifest_is_stored_with_its_computed_digest_and_served_back() {
    let served = Served::start().await;
    let config = bytes_of(200, 2);
    served.memory.add_blob(&config);
    let manifest = oci_manifest(&config, &[]);
    let digest = sha256_digest(&manifest);

    let reply = send(served.addr, "PUT", "/v2/app/manifests/1", &[("content-type", OCI_MANIFEST)], &manifest).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(reply.header("location"), format!("/v2/app/manifests/{digest}"));
    assert_eq!(reply.header("docker-content-digest"), digest);
    let back = get(served.addr, "/v2/app/manifests/1").await;
    assert_eq!((back.status, back.bytes()), (200, &manifest));

    // By digest: it must be the digest of the bytes.
    let by_digest = format!("/v2/app/manifests/{digest}");
    assert_eq!(send(served.addr, "PUT", &by_digest, &[], &manifest).await.status, 201);
    let other = format!("/v2/app/manifests/{}", sha256_digest(b"other"));
    let reply = send(served.addr, "PUT", &other, &[], &manifest).await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "DIGEST_INVALID"));
    assert_eq!(served.memory.n_manifests_put.load(Ordering::SeqCst), 2, "a mismatch never reaches the backend");

    // What the backend refuses comes back as its code.
    let missing = oci_manifest(&config, &[&bytes_of(10, 3)]);
    let reply = send(served.addr, "PUT", "/v2/app/manifests/2", &[], &missing).await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "MANIFEST_BLOB_UNKNOWN"));

    for (content_type, body) in [
        (OCI_MANIFEST, &b"not json"[..]),
        ("text/plain", &br#"{"schemaVersion":2}"#[..]),
        ("application/json", &br#"{"schemaVersion":2}"#[..]),
        (OCI_MANIFEST, &br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#[..]),
    ] {
        let reply = send(served.addr, "PUT", "/v2/app/manifests/3", &[("content-type", content_type)], body).await;
        assert_eq!((reply.status, reply.code().as_str()), (400, "MANIFEST_INVALID"), "{content_type}");
    }
    assert_eq!(served.memory.n_manifests_put.load(Ordering::SeqCst), 2);
    served.stop().await;
}

#[tokio::test]
async fn a_manifest_over_the_cap_is_refused_with_a_length_or_chunked() {
    let served = Served::start_with(|options| options.max_manifest_bytes = 1000).await;
    let padded =
        format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","annotations":{{"x":"{}"}}}}"#, "a".repeat(1000));
    let reply = send(served.addr, "PUT", "/v2/app/manifests/big", &[], padded.as_bytes()).await;
    assert_eq!((reply.status, reply.code().as_str()), (413, "SIZE_INVALID"));
    let pieces = padded.as_bytes().chunks(100).map(Bytes::copy_from_slice).collect();
    let reply = send_body(served.addr, "PUT", "/v2/app/manifests/big", &[], chunked(pieces)).await;
    assert_eq!((reply.status, reply.code().as_str()), (413, "SIZE_INVALID"));
    assert_eq!(served.memory.n_manifests_put.load(Ordering::SeqCst), 0);
    served.stop().await;
}

#[tokio::test]
async fn blobs_are_served_whole_or_by_one_range() {
    let served = Served::start().await;
    let blob = bytes_of(1_000_000, 4);
    let digest = served.memory.add_blob(&blob);
    let path = format!("/v2/app/blobs/{digest}");

    let whole = get(served.addr, &path).await;
    assert_eq!((whole.status, whole.bytes()), (200, &blob));
    assert_eq!(whole.header("content-length"), "1000000");
    assert_eq!(whole.header("docker-content-digest"), digest);
    assert_eq!(whole.header("content-type"), "application/octet-stream");
    assert_eq!(whole.header("accept-ranges"), "bytes");

    let head = send(served.addr, "HEAD", &path, &[], b"").await;
    assert_eq!((head.status, head.bytes().len(), head.header("content-length")), (200, 0, "1000000"));
    assert_eq!(head.header("docker-content-digest"), digest);

    for (range, start, end) in
        [("bytes=10-19", 10, 19), ("bytes=999990-", 999_990, 999_999), ("bytes=5-2000000", 5, 999_999)]
    {
        let part = send(served.addr, "GET", &path, &[("range", range)], b"").await;
        assert_eq!(part.status, 206, "{range}");
        assert_eq!(part.bytes(), &blob.slice(start..=end), "{range}");
        assert_eq!(part.header("content-range"), format!("bytes {start}-{end}/1000000"));
        assert_eq!(part.header("content-length"), (end - start + 1).to_string());
    }
    let outside = send(served.addr, "GET", &path, &[("range", "bytes=1000000-")], b"").await;
    assert_eq!((outside.status, outside.header("content-range")), (416, "bytes */1000000"));

    let unknown = get(served.addr, &format!("/v2/app/blobs/{}", sha256_digest(b"nothing"))).await;
    assert_eq!((unknown.status, unknown.code().as_str()), (404, "BLOB_UNKNOWN"));
    let head_unknown = send(served.addr, "HEAD", &format!("/v2/app/blobs/{}", sha256_digest(b"x")), &[], b"").await;
    assert_eq!(head_unknown.status, 404);
    served.stop().await;
}

#[tokio::test]
async fn a_blob_stream_that_fails_aborts_the_connection_instead_of_ending_short() {
    let served = Served::start().await;
    let blob = bytes_of(2_000_000, 5);
    let digest = served.memory.add_blob(&blob);
    served.memory.broken.lock().unwrap().insert(digest.clone());
    let reply = get(served.addr, &format!("/v2/app/blobs/{digest}")).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_err(), "a broken read looked complete: {} bytes", reply.body.map_or(0, |body| body.len()));
    served.stop().await;
}

#[tokio::test]
async fn a_monolithic_upload_is_verified_and_handed_to_the_backend() {
    let served = Served::start().await;
    let blob = bytes_of(300_000, 6);
    let digest = sha256_digest(&blob);
    let reply = send(served.addr, "POST", &format!("/v2/app/blobs/uploads/?digest={digest}"), &[], &blob).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(reply.header("location"), format!("/v2/app/blobs/{digest}"));
    assert_eq!(reply.header("docker-content-digest"), digest);
    assert_eq!(served.memory.blob(&digest), Some(blob.clone()));

    let wrong = sha256_digest(b"something else");
    let reply = send(served.addr, "POST", &format!("/v2/app/blobs/uploads/?digest={wrong}"), &[], &blob).await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "DIGEST_INVALID"));
    assert_eq!(served.memory.blob(&wrong), None);
    assert_eq!(served.memory.n_blobs_uploaded.load(Ordering::SeqCst), 1);
    assert_eq!(served.n_spool_files(), 0, "the refused bytes were deleted");
    served.stop().await;
}

#[tokio::test]
async fn a_chunked_upload_appends_in_order_and_finishes_with_its_digest() {
    let served = Served::start().await;
    let blob = bytes_of(3_000_000, 7);
    let digest = sha256_digest(&blob);
    let (first, second, last) = (blob.slice(..1_000_000), blob.slice(1_000_000..2_500_000), blob.slice(2_500_000..));

    let started = send(served.addr, "POST", "/v2/c/web/blobs/uploads/", &[], b"").await;
    assert_eq!(started.status, 202);
    assert_eq!(started.header("range"), "0-0");
    let location = started.header("location").to_owned();
    let id = started.header("docker-upload-uuid").to_owned();
    assert_eq!(location, format!("/v2/c/web/blobs/uploads/{id}"));

    let reply = send(served.addr, "PATCH", &location, &[("content-range", "0-999999")], &first).await;
    assert_eq!((reply.status, reply.header("range")), (202, "0-999999"));
    // A chunk that does not start where the upload stands is refused and changes nothing.
    let reply = send(served.addr, "PATCH", &location, &[("content-range", "0-999")], &first[..1000]).await;
    assert_eq!((reply.status, reply.code().as_str(), reply.header("range")), (416, "RANGE_INVALID", "0-999999"));
    // A chunk sent chunked, without Content-Range.
    let pieces = second.chunks(64 * 1024).map(|piece| second.slice_ref(piece)).collect();
    let reply = send_body(served.addr, "PATCH", &location, &[], chunked(pieces)).await;
    assert_eq!((reply.status, reply.header("range")), (202, "0-2499999"));
    let status = get(served.addr, &location).await;
    assert_eq!(
        (status.status, status.header("range"), status.header("docker-upload-uuid")),
        (204, "0-2499999", id.as_str())
    );

    // Another name cannot reach the session.
    let reply = get(served.addr, &format!("/v2/c/api/blobs/uploads/{id}")).await;
    assert_eq!((reply.status, reply.code().as_str()), (404, "BLOB_UPLOAD_UNKNOWN"));

    let reply = send(served.addr, "PUT", &format!("{location}?digest={digest}"), &[], &last).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(reply.header("location"), format!("/v2/c/web/blobs/{digest}"));
    assert_eq!(served.memory.blob(&digest), Some(blob));
    let gone = get(served.addr, &location).await;
    assert_eq!((gone.status, gone.code().as_str()), (404, "BLOB_UPLOAD_UNKNOWN"));
    assert_eq!(served.n_spool_files(), 0);
    served.stop().await;
}

#[tokio::test]
async fn an_upload_whose_bytes_do_not_match_its_digest_never_reaches_the_backend() {
    let served = Served::start().await;
    let started = send(served.addr, "POST", "/v2/app/blobs/uploads/", &[], b"").await;
    let location = started.header("location").to_owned();
    assert_eq!(send(served.addr, "PATCH", &location, &[], b"the real bytes").await.status, 202);
    let claimed = sha256_digest(b"what the client claims");
    let reply = send(served.addr, "PUT", &format!("{location}?digest={claimed}"), &[], b"").await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "DIGEST_INVALID"));
    assert_eq!(served.memory.n_blobs_uploaded.load(Ordering::SeqCst), 0);
    assert_eq!(served.memory.blob(&claimed), None);
    assert_eq!(served.n_spool_files(), 0, "the spooled bytes were deleted");
    assert_eq!(get(served.addr, &location).await.status, 404, "the session is over");

    // A final PUT without a digest keeps the session; a sha512 one is refused as such.
    let started = send(served.addr, "POST", "/v2/app/blobs/uploads/", &[], b"").await;
    let location = started.header("location").to_owned();
    let reply = send(served.addr, "PUT", &location, &[], b"abc").await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "DIGEST_INVALID"));
    let reply = send(served.addr, "PUT", &format!("{location}?digest=sha512:{}", "ab".repeat(64)), &[], b"").await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "DIGEST_INVALID"));
    assert_eq!(get(served.addr, &location).await.status, 204);
    served.stop().await;
}

#[tokio::test]
async fn a_mount_of_a_stored_blob_is_created_at_once_and_of_another_starts_an_upload() {
    let served = Served::start().await;
    let stored = served.memory.add_blob(&bytes_of(100, 8));
    let reply =
        send(served.addr, "POST", &format!("/v2/app/blobs/uploads/?mount={stored}&from=other%2Fapp"), &[], b"").await;
    assert_eq!((reply.status, reply.header("location")), (201, format!("/v2/app/blobs/{stored}").as_str()));
    assert_eq!(reply.header("docker-content-digest"), stored);
    let absent = sha256_digest(b"absent");
    let reply = send(served.addr, "POST", &format!("/v2/app/blobs/uploads/?mount={absent}&from=other"), &[], b"").await;
    assert_eq!(reply.status, 202);
    assert!(reply.header("location").starts_with("/v2/app/blobs/uploads/"));
    let reply = send(served.addr, "POST", "/v2/app/blobs/uploads/?mount=sha256:nothex&from=other", &[], b"").await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "DIGEST_INVALID"));
    served.stop().await;
}

#[tokio::test]
async fn a_cancelled_upload_is_forgotten_and_deletes_and_listings_are_unsupported() {
    let served = Served::start().await;
    let started = send(served.addr, "POST", "/v2/app/blobs/uploads/", &[], b"").await;
    let location = started.header("location").to_owned();
    assert_eq!(send(served.addr, "PATCH", &location, &[], b"partial").await.status, 202);
    assert_eq!(send(served.addr, "DELETE", &location, &[], b"").await.status, 204);
    let reply = send(served.addr, "PATCH", &location, &[], b"more").await;
    assert_eq!((reply.status, reply.code().as_str()), (404, "BLOB_UPLOAD_UNKNOWN"));
    assert_eq!(served.n_spool_files(), 0);

    let digest = served.memory.add_blob(&bytes_of(10, 9));
    served.memory.add_manifest("app", "1", &oci_manifest(&bytes_of(10, 9), &[]));
    for (method, path) in [
        ("DELETE", format!("/v2/app/blobs/{digest}")),
        ("DELETE", "/v2/app/manifests/1".to_owned()),
        ("GET", "/v2/_catalog".to_owned()),
        ("POST", "/v2/app/manifests/1".to_owned()),
        ("PUT", format!("/v2/app/blobs/{digest}")),
    ] {
        let reply = send(served.addr, method, &path, &[], b"").await;
        assert_eq!((reply.status, reply.code().as_str()), (405, "UNSUPPORTED"), "{method} {path}");
    }
    assert_eq!(get(served.addr, "/v2/app/manifests/1").await.status, 200, "nothing was deleted");
    served.stop().await;
}

#[tokio::test]
async fn a_view_that_may_not_push_refuses_before_spooling_and_still_serves_reads() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let memory = Memory::default();
    let config = bytes_of(100, 16);
    let digest = memory.add_blob(&config);
    let manifest = oci_manifest(&config, &[]);
    memory.add_manifest("app", "1", &manifest);
    let backend = Arc::new(ReadOnly(memory));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, backend.clone(), ServeOptions::new(spool.path().to_owned()), async move {
        let _ = stopped.await;
    }));
    let blob = bytes_of(1000, 17);
    for path in [
        "/v2/app/blobs/uploads/".to_owned(),
        format!("/v2/app/blobs/uploads/?digest={}", sha256_digest(&blob)),
        format!("/v2/app/blobs/uploads/?mount={digest}&from=app"),
        "/v2/app/manifests/latest".to_owned(),
    ] {
        let method = if path.contains("manifests") { "PUT" } else { "POST" };
        let body: &[u8] = if path.contains("manifests") { &manifest } else { &blob };
        let reply = send(addr, method, &path, &[], body).await;
        assert_eq!((reply.status, reply.code().as_str()), (403, "DENIED"), "{path}");
        let json: serde_json::Value = serde_json::from_slice(reply.bytes()).unwrap();
        assert_eq!(json["errors"][0]["message"], "token tok_1 may save to pr-* only, not to branch \"main\"");
    }
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0, "nothing was spooled");
    assert_eq!(backend.0.n_blobs_uploaded.load(Ordering::SeqCst), 0);
    assert_eq!(get(addr, "/v2/app/manifests/1").await.bytes(), &manifest);
    assert_eq!(get(addr, &format!("/v2/app/blobs/{digest}")).await.bytes(), &config);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn tags_are_listed_sorted_and_paged_when_the_backend_lists_them() {
    let served = Served::start().await;
    let manifest = oci_manifest(&bytes_of(10, 14), &[]);
    for tag in ["b", "a", "c"] {
        served.memory.add_manifest("c/web", tag, &manifest);
    }
    served.memory.add_manifest("other", "z", &manifest);
    let reply = get(served.addr, "/v2/c/web/tags/list").await;
    let json: serde_json::Value = serde_json::from_slice(reply.bytes()).unwrap();
    assert_eq!(json, serde_json::json!({"name": "c/web", "tags": ["a", "b", "c"]}));
    let reply = get(served.addr, "/v2/c/web/tags/list?n=1&last=a").await;
    let json: serde_json::Value = serde_json::from_slice(reply.bytes()).unwrap();
    assert_eq!(json["tags"], serde_json::json!(["b"]));
    served.stop().await;

    // A backend that does not list answers UNSUPPORTED.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, Arc::new(Bare), ServeOptions::new(spool.path().to_owned()), async move {
        let _ = stopped.await;
    }));
    let reply = get(addr, "/v2/app/tags/list").await;
    assert_eq!((reply.status, reply.code().as_str()), (405, "UNSUPPORTED"));
    let reply = send(addr, "PUT", "/v2/app/manifests/1", &[], &manifest).await;
    assert_eq!((reply.status, reply.code().as_str()), (403, "DENIED"));
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_names_tags_digests_and_paths_are_refused_before_the_backend() {
    let served = Served::start().await;
    let long_name = format!("/v2/{}/manifests/1", "a".repeat(256));
    let cases = [
        ("/v2/App/manifests/1", "NAME_INVALID"),
        ("/v2/a%2Fb/manifests/1", "NAME_INVALID"),
        ("/v2/a/../b/manifests/1", "NAME_INVALID"),
        ("/v2/a//b/manifests/1", "NAME_INVALID"),
        ("/v2/-a/blobs/uploads/", "NAME_INVALID"),
        (long_name.as_str(), "NAME_INVALID"),
        ("/v2/app/manifests/.hidden", "TAG_INVALID"),
        ("/v2/app/manifests/sha512:abcd", "DIGEST_INVALID"),
        ("/v2/app/blobs/sha256:ABCD", "DIGEST_INVALID"),
        ("/v2/app/blobs/md5:abcd", "DIGEST_INVALID"),
    ];
    for (path, code) in cases {
        let reply = get(served.addr, path).await;
        assert_eq!((reply.status, reply.code().as_str()), (400, code), "{path}");
    }
    let reply = get(served.addr, "/v2/app/blobs/uploads/not-an-id").await;
    assert_eq!((reply.status, reply.code().as_str()), (404, "BLOB_UPLOAD_UNKNOWN"));
    assert_eq!(served.memory.n_manifests_put.load(Ordering::SeqCst), 0);
    served.stop().await;
}

#[tokio::test]
async fn open_uploads_are_capped_and_an_idle_one_is_dropped_with_its_file() {
    let served = Served::start_with(|options| {
        options.max_uploads = 2;
        options.idle_timeout = Duration::from_secs(300);
    })
    .await;
    let first = send(served.addr, "POST", "/v2/app/blobs/uploads/", &[], b"").await.header("location").to_owned();
    assert_eq!(send(served.addr, "PATCH", &first, &[], b"spooled").await.status, 202);
    assert_eq!(send(served.addr, "POST", "/v2/app/blobs/uploads/", &[], b"").await.status, 202);
    let refused = send(served.addr, "POST", "/v2/app/blobs/uploads/", &[], b"").await;
    assert_eq!((refused.status, refused.code().as_str()), (429, "TOOMANYREQUESTS"));
    assert_eq!(served.n_spool_files(), 2);

    served.clock.advance(Duration::from_secs(301));
    // Opening a session drops the idle ones first.
    assert_eq!(send(served.addr, "POST", "/v2/app/blobs/uploads/", &[], b"").await.status, 202);
    let reply = get(served.addr, &first).await;
    assert_eq!((reply.status, reply.code().as_str()), (404, "BLOB_UPLOAD_UNKNOWN"));
    assert_eq!(served.n_spool_files(), 1);
    let (_, spool) = served.stop().await;
    assert_eq!(std::fs::read_dir(spool.path().join("spool")).unwrap().count(), 0, "the stop drops every session");
}

#[tokio::test]
async fn a_connection_left_idle_is_closed_and_a_busy_one_is_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let served = Served::start_with(|options| options.idle_timeout = Duration::from_secs(60)).await;
    let mut idle = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    let mut busy = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    // A request on the busy one, its keep-alive connection left open.
    busy.write_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buffer = vec![0u8; 4096];
    let n_read = busy.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n_read]).starts_with("HTTP/1.1 200"));

    served.clock.advance(Duration::from_secs(61));
    let n_read = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut buffer)).await.unwrap().unwrap();
    assert_eq!(n_read, 0, "the idle connection was closed");
    let n_read = tokio::time::timeout(Duration::from_secs(30), busy.read(&mut buffer)).await.unwrap().unwrap();
    assert_eq!(n_read, 0, "idle after its request, it was closed too");

    // A connection used just now stays open for another request.
    let mut fresh = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    for _ in 0..2 {
        fresh.write_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let n_read = fresh.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..n_read]).starts_with("HTTP/1.1 200"));
    }
    served.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let served = Served::start_with(|options| options.max_connections = 2).await;
    let ping = b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut buffer = vec![0u8; 4096];
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut connection = tokio::net::TcpStream::connect(served.addr).await.unwrap();
        connection.write_all(ping).await.unwrap();
        let n_read = connection.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..n_read]).starts_with("HTTP/1.1 200"));
        open.push(connection);
    }
    let mut third = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    third.write_all(ping).await.unwrap();
    // Not answered while two are open (this can only pass early, never fail late).
    assert!(tokio::time::timeout(Duration::from_millis(300), third.read(&mut buffer)).await.is_err());
    drop(open.pop());
    let n_read = third.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n_read]).starts_with("HTTP/1.1 200"));
    served.stop().await;
}

#[tokio::test]
async fn the_stop_waits_for_a_manifest_put_in_flight() {
    let served = Served::start().await;
    let push = held_manifest_put(&served, 10).await;

    let Served { memory, mut stop, task, addr, spool: _spool, .. } = served;
    stop.take().unwrap().send(()).unwrap();
    // Once the view no longer accepts connections, it has seen the stop.
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        tokio::task::yield_now().await;
    }
    assert!(!task.is_finished(), "the view stopped with a commit in flight");
    assert_eq!(memory.n_manifests_put.load(Ordering::SeqCst), 0);

    memory.put_release.notify_one();
    let reply = push.await.unwrap();
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    task.await.unwrap().unwrap();
    assert_eq!(memory.n_manifests_put.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_that_stops_reading_holds_the_stop_only_for_the_idle_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let served = Served::start_with(|options| options.idle_timeout = Duration::from_secs(60)).await;
    // Larger than what the sockets buffer, so the response cannot finish while nobody reads.
    let digest = served.memory.add_blob(&bytes_of(64 * 1024 * 1024, 15));
    let mut stuck = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    stuck.write_all(format!("GET /v2/app/blobs/{digest} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut buffer = vec![0u8; 4096];
    let n_read = stuck.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n_read]).starts_with("HTTP/1.1 200"));

    let Served { mut stop, task, addr, clock, spool: _spool, .. } = served;
    stop.take().unwrap().send(()).unwrap();
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        tokio::task::yield_now().await;
    }
    assert!(!task.is_finished(), "the response in flight was cut at once");
    clock.advance(Duration::from_secs(61));
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the stop waited past the idle time")
        .unwrap()
        .unwrap();
    drop(stuck);
}

#[tokio::test]
async fn a_client_that_hangs_up_does_not_cut_a_commit_short() {
    let served = Served::start().await;
    let push = held_manifest_put(&served, 11).await;
    push.abort();
    let _ = push.await;
    served.memory.put_release.notify_one();
    // The stop waits for the handler, which finishes the commit its client left.
    let (memory, _) = served.stop().await;
    assert_eq!(memory.n_manifests_put.load(Ordering::SeqCst), 1);
}

/// skopeo, or `None` when it is absent and this is not CI (with `CI` set its absence fails).
fn skopeo() -> Option<&'static str> {
    let found = std::process::Command::new("skopeo").arg("--version").output().is_ok_and(|out| out.status.success());
    if found {
        return Some("skopeo");
    }
    assert!(std::env::var_os("CI").is_none(), "skopeo is needed with CI set: apt-get install -y skopeo");
    eprintln!("skipped: skopeo is not installed (apt-get install -y skopeo)");
    None
}

fn run_skopeo(args: &[&str]) -> String {
    let output = std::process::Command::new("skopeo").arg("--insecure-policy").args(args).output().unwrap();
    assert!(output.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn gzip(bytes: &[u8]) -> Bytes {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    Bytes::from(encoder.finish().unwrap())
}

/// An image in skopeo's `dir:` layout: `manifest.json`, `version`, and each blob under its hex.
fn write_dir_image(dir: &Path, manifest: &Bytes, blobs: &[&Bytes]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("version"), "Directory Transport Version: 1.1\n").unwrap();
    std::fs::write(dir.join("manifest.json"), manifest).unwrap();
    for blob in blobs {
        std::fs::write(dir.join(proto::digest::digest_hex(&sha256_digest(blob))), blob).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_an_image_in_and_out_byte_for_byte() {
    let Some(_skopeo) = skopeo() else { return };
    let served = Served::start().await;
    let work = tempfile::tempdir().unwrap();
    let layers = [gzip(&bytes_of(6_000_000, 12)), gzip(&bytes_of(50_000, 13))];
    let config = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b"a"), sha256_digest(b"b")]},
        }))
        .unwrap(),
    );
    let manifest = oci_manifest(&config, &[&layers[0], &layers[1]]);
    let source = work.path().join("source");
    write_dir_image(&source, &manifest, &[&config, &layers[0], &layers[1]]);
    let image = format!("docker://{}/team/app:1", served.addr);

    let source_arg = format!("dir:{}", source.display());
    tokio::task::block_in_place(|| run_skopeo(&["copy", "--dest-tls-verify=false", &source_arg, &image]));
    for blob in [&config, &layers[0], &layers[1]] {
        assert_eq!(served.memory.blob(&sha256_digest(blob)).as_ref(), Some(blob), "stored byte for byte");
    }
    let stored = served.memory.manifests.lock().unwrap().get(&("team/app".to_owned(), "1".to_owned())).cloned();
    assert_eq!(stored.map(|body| body.bytes), Some(manifest.clone()));

    let inspected = tokio::task::block_in_place(|| run_skopeo(&["inspect", "--tls-verify=false", &image]));
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(inspected["Digest"], sha256_digest(&manifest));
    assert_eq!(inspected["Layers"], serde_json::json!([sha256_digest(&layers[0]), sha256_digest(&layers[1])]));

    let back = work.path().join("back");
    let back_arg = format!("dir:{}", back.display());
    tokio::task::block_in_place(|| run_skopeo(&["copy", "--src-tls-verify=false", &image, &back_arg]));
    assert_eq!(std::fs::read(back.join("manifest.json")).unwrap(), manifest);
    for blob in [&config, &layers[0], &layers[1]] {
        let hex = proto::digest::digest_hex(&sha256_digest(blob)).to_owned();
        assert_eq!(std::fs::read(back.join(hex)).unwrap(), blob.as_ref(), "copied back byte for byte");
    }

    // A second push of the same image sends no blob again: the HEADs answer present.
    let n_uploaded = served.memory.n_blobs_uploaded.load(Ordering::SeqCst);
    tokio::task::block_in_place(|| run_skopeo(&["copy", "--dest-tls-verify=false", &source_arg, &image]));
    assert_eq!(served.memory.n_blobs_uploaded.load(Ordering::SeqCst), n_uploaded);
    served.stop().await;
}
