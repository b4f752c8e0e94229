//! `cache-worker view`: the project's cache served to BuildKit as a registry on the build host,
//! for the length of a CI job, so a build starts at once and fetches only the blobs it uses.
//!
//! It reads open (engine, look up) → serve → close (report, summary). Reads come from the
//! project's store through the worker's scoped read key (ranged GETs in parallel parts, a
//! whole read verified against its digest as it streams); a pushed BuildKit cache export is
//! committed as a save (begin, upload what the store lacks from the verified spool, commit)
//! under the token's rules. The protocol itself is the `registry` crate's.

pub mod catalog;
mod flags;
pub mod process;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use proto::client::ClientError;
use proto::digest::DigestHasher;
use proto::format::format_bytes;
use proto::v1 as pb;
use registry::{Backend, BlobRead, ByteRange, ManifestBody, Reference, RegistryError, UploadedBlob};

use crate::coordinator::Coordinator;
use crate::error::WorkerError;
use crate::restore::seams::{Lease, Lookup, RestoreCoordinator};
use crate::transfer::{BlobStore, TransferError};
use catalog::{BUILD_CACHE_REPOSITORY, Catalog, ManifestSource};
pub use flags::view_flags;

/// What a view serves, and for whom.
#[derive(Debug, Clone)]
pub struct ViewOptions {
    pub service: String,
    pub branch: String,
    /// Branches tried, in order, when `branch` has no cache.
    pub fallback_branches: Vec<String>,
}

/// What the view found when it opened: the engine's kind, and whether the coordinator answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The engine keeps the containerd image store (`None`: the engine did not answer).
    pub containerd_store: Option<bool>,
    /// The coordinator answered the lookup.
    pub coordinator: bool,
}

/// The figures of one view, for its summary and the metrics report.
#[derive(Default)]
struct Counters {
    manifests_served: AtomicU64,
    blobs_served: AtomicU64,
    bytes_served: AtomicU64,
    blobs_received: AtomicU64,
    bytes_received: AtomicU64,
    present_answers: AtomicU64,
}

/// The view's backend: the looked-up cache, the store, the coordinator for commits.
pub struct ViewBackend {
    options: ViewOptions,
    catalog: Catalog,
    /// The store with the read key (`None`: the coordinator did not answer at start).
    store: Option<BlobStore>,
    coordinator: tokio::sync::Mutex<Option<Coordinator>>,
    lease: Lease,
    engine_version: String,
    concurrency: usize,
    /// One permit per part held in memory ([`PARTS_HELD`]).
    parts: Arc<tokio::sync::Semaphore>,
    /// Verified uploads of this job not committed yet, by digest.
    uploads: std::sync::Mutex<HashMap<String, Arc<UploadedBlob>>>,
    /// Blobs outside the catalog the store was found to hold, with their sizes.
    stored: std::sync::Mutex<HashMap<String, u64>>,
    /// Stored manifests read once.
    manifests: std::sync::Mutex<HashMap<String, ManifestBody>>,
    counters: Counters,
    /// Blobs served, for the metrics report: (digest, bytes, seconds).
    served: std::sync::Mutex<Vec<(String, u64, f64)>>,
    /// Lines the summary prints after the counts (saves, lost blobs).
    said: std::sync::Mutex<Vec<String>>,
    hit: bool,
    /// The coordinator answered the lookup: pushes may be saved.
    answered: bool,
    started: Instant,
    /// The cache export this view last committed: a later push of the same job is merged
    /// with it, so a `--target test` build's stages stay beside the final build's.
    pushed: tokio::sync::Mutex<Option<ManifestBody>>,
    /// Reports of bad blobs under way, awaited before the view closes.
    reports: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Blobs this view found missing or corrupt: reported once, then answered `BLOB_UNKNOWN`
    /// at once (BuildKit asks again and again, backing off, before it runs the step instead).
    lost_blobs: std::sync::Mutex<HashSet<String>>,
}

/// The largest stored manifest read into memory.
const MANIFEST_LIMIT: u64 = 4 * 1024 * 1024;

/// Parts fetched ahead for one blob read.
const PARTS_PER_READ: usize = 4;

/// Parts held in memory across all the view's reads (fetched, not yet handed to a response):
/// with the plan's part size (8 MiB, more only for blobs over 70 GiB) this keeps the view
/// under 256 MiB however many blobs BuildKit reads at once (measured without it: about 400 MiB
/// with eight reads of a big blob).
const PARTS_HELD: usize = 8;

impl ViewBackend {
    /// Opens a view: the engine's kind and version, then the lookup with fallbacks and a
    /// reader of the store. A coordinator that does not answer leaves a view serving no cache
    /// (and taking no push), with one warning: the build runs uncached.
    pub async fn open(
        coordinator: Result<Coordinator, WorkerError>,
        options: ViewOptions,
        containerd_store: Option<bool>,
        engine_version: String,
    ) -> Result<(ViewBackend, Opened), WorkerError> {
        proto::names::validate_service_name(&options.service)?;
        proto::names::validate_branch_name(&options.branch)?;
        for branch in &options.fallback_branches {
            proto::names::validate_branch_name(branch)?;
        }
        let mut backend = ViewBackend {
            options,
            catalog: Catalog::default(),
            store: None,
            coordinator: tokio::sync::Mutex::new(None),
            lease: Lease::default(),
            engine_version,
            concurrency: PARTS_PER_READ,
            parts: Arc::new(tokio::sync::Semaphore::new(PARTS_HELD)),
            uploads: Default::default(),
            manifests: Default::default(),
            stored: Default::default(),
            counters: Counters::default(),
            served: Default::default(),
            said: Default::default(),
            hit: false,
            answered: false,
            started: Instant::now(),
            reports: Default::default(),
            lost_blobs: Default::default(),
            pushed: Default::default(),
        };
        let mut coordinator = match coordinator {
            Ok(coordinator) => coordinator,
            Err(error) => {
                backend.warn_uncached(&error);
                return Ok((backend, Opened { containerd_store, coordinator: false }));
            }
        };
        // As a restore: a cache never breaks a build, so any failure here is one warning.
        if let Err(error) = backend.look_up(&mut coordinator, containerd_store).await {
            backend.warn_uncached(&error);
            backend.catalog = Catalog::default();
            backend.store = None;
            return Ok((backend, Opened { containerd_store, coordinator: false }));
        }
        *backend.coordinator.get_mut() = Some(coordinator);
        backend.answered = true;
        Ok((backend, Opened { containerd_store, coordinator: true }))
    }

    fn warn_uncached(&self, error: &WorkerError) {
        eprintln!(
            "cache-worker: warning: the view of {} serves no cache, the build runs without it: {error}",
            self.options.service
        );
    }

    /// Looks the key up, then its fallbacks, and opens the store with the read key.
    async fn look_up(
        &mut self,
        coordinator: &mut Coordinator,
        containerd_store: Option<bool>,
    ) -> Result<(), WorkerError> {
        let key = |branch: &String| pb::CacheKey { service: self.options.service.clone(), branch: branch.clone() };
        let request = pb::LookupRequest {
            key: Some(key(&self.options.branch)),
            fallbacks: self.options.fallback_branches.iter().map(key).collect(),
        };
        let (manifest, plan, lease) = match coordinator.lookup(request).await? {
            Lookup::Miss(lease) => (None, pb::TransferPlan::default(), lease),
            Lookup::Hit { manifest, plan, lease } => (Some(manifest), plan, lease),
        };
        self.lease = lease;
        // A miss comes without a plan: this job's own reads then go at the view's pace.
        let planned = if plan.max_concurrency == 0 { PARTS_PER_READ } else { plan.max_concurrency as usize };
        self.concurrency = planned.clamp(1, PARTS_PER_READ);
        self.store = Some(coordinator.blob_reader(&plan).await?);
        let Some(manifest) = manifest else {
            eprintln!("view: no cached image for {}", self.options.service);
            return Ok(());
        };
        let saved_as_oci = manifest.images.iter().any(|image| !image.oci_media_type.is_empty() && !image.build_cache);
        let has_images = manifest.images.iter().any(|image| !image.build_cache);
        if has_images && containerd_store.is_some_and(|oci| oci != saved_as_oci) {
            eprintln!(
                "cache-worker: warning: the cache of {} was saved from another kind of image store than this engine's: its images are not served; the next save replaces them",
                self.options.service
            );
            let kept: Vec<pb::Image> = manifest.images.iter().filter(|image| image.build_cache).cloned().collect();
            self.catalog = Catalog::of(&pb::Manifest { images: kept, ..Default::default() });
        } else {
            self.catalog = Catalog::of(&manifest);
        }
        self.hit = true;
        let matched = manifest.key.as_ref().map(|key| key.branch.clone()).unwrap_or_default();
        let branch = if matched.is_empty() { String::new() } else { format!(" (branch {matched})") };
        eprintln!("view: serving the cache of {}{branch}: {} images", self.options.service, manifest.images.len());
        Ok(())
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The store, or the view's one reason it has none.
    fn store(&self) -> Result<&BlobStore, RegistryError> {
        self.store.as_ref().ok_or_else(|| {
            RegistryError::Unavailable(format!(
                "the coordinator did not answer when the view of {} started: it serves no cache",
                self.options.service
            ))
        })
    }

    /// A stored manifest's bytes, read once and verified.
    async fn stored_manifest(
        &self,
        digest: &str,
        media_type: Option<&str>,
        size: u64,
    ) -> Result<ManifestBody, RegistryError> {
        if let Some(body) = self.manifests.lock().expect("not poisoned").get(digest) {
            return Ok(body.clone());
        }
        if size > MANIFEST_LIMIT {
            return Err(RegistryError::ManifestInvalid(format!("the stored manifest {digest} is bigger than 4 MiB")));
        }
        let store = self.store()?;
        let bytes = if size == 0 {
            Bytes::new()
        } else {
            with_retries(|| store.download_range(digest, 0, size))
                .await
                .map_err(|error| self.read_failed(digest, error))?
        };
        let actual = proto::digest::sha256_digest(&bytes);
        if actual != digest {
            self.lost(digest).await;
            return Err(RegistryError::BlobUnknown(format!("the stored manifest {digest} hashes to {actual}")));
        }
        let media_type = media_type.map(str::to_owned).unwrap_or_else(|| catalog::sniff_media_type(&bytes));
        let body = ManifestBody { media_type, digest: digest.to_owned(), bytes };
        self.manifests.lock().expect("not poisoned").insert(digest.to_owned(), body.clone());
        Ok(body)
    }

    /// A store read that failed: a blob gone from the store is reported to the coordinator.
    fn read_failed(&self, digest: &str, error: TransferError) -> RegistryError {
        match error {
            TransferError::NotStored { .. } => {
                RegistryError::BlobUnknown(format!("{digest} is no longer in the store"))
            }
            error => RegistryError::Unavailable(format!("reading {digest} from the store failed: {error}")),
        }
    }

    /// Tells the coordinator a blob came back missing or corrupt, and says what it did.
    async fn lost(&self, digest: &str) {
        self.stored.lock().expect("not poisoned").remove(digest);
        if !self.lost_blobs.lock().expect("not poisoned").insert(digest.to_owned()) {
            return;
        }
        let mut coordinator = self.coordinator.lock().await;
        let said = match coordinator.as_mut() {
            Some(coordinator) => coordinator.report_bad_blob(digest).await.said(),
            None => "the coordinator is not reachable to be told".to_owned(),
        };
        let line = format!("cache-worker: warning: blob {digest} came back missing or corrupt from the store: {said}");
        eprintln!("{line}");
        self.said.lock().expect("not poisoned").push(line);
    }

    /// Two cache exports of this job as one (`oci.rs`'s merge, as a save merges the exports of
    /// a `type=local` folder): the merged manifest, and its config (digest, bytes), which no
    /// client uploaded.
    async fn merged(
        &self,
        earlier: &ManifestBody,
        pushed: &ManifestBody,
    ) -> Result<(ManifestBody, (String, Bytes)), RegistryError> {
        let mut blobs = crate::oci::OciBlobs::default();
        for manifest in [earlier, pushed] {
            let image = catalog::pushed_cache(manifest)?;
            let Some(config) = image.oci_blobs.first().filter(|_| manifest.media_type.contains("manifest")) else {
                return Err(RegistryError::ManifestInvalid("an export as an index (image-manifest=false)".into()));
            };
            let bytes = self.small_blob(&config.digest, config.size).await?;
            blobs.json.insert(config.digest.clone(), bytes.to_vec());
            blobs.json.insert(manifest.digest.clone(), manifest.bytes.to_vec());
            blobs.index.push(crate::oci::Descriptor {
                media_type: manifest.media_type.clone(),
                digest: manifest.digest.clone(),
                size: manifest.bytes.len() as u64,
                annotations: Default::default(),
            });
        }
        let top = blobs
            .merge_caches()
            .map_err(|error| RegistryError::ManifestInvalid(error.to_string()))?
            .ok_or_else(|| RegistryError::Internal("merging two exports gave none".into()))?;
        let bytes = Bytes::from(blobs.json.remove(&top.digest).unwrap_or_default());
        let merged = ManifestBody { media_type: top.media_type, digest: top.digest, bytes };
        let image = catalog::pushed_cache(&merged)?;
        let config = image.oci_blobs.first().map(|config| config.digest.clone()).unwrap_or_default();
        let config_bytes = Bytes::from(blobs.json.remove(&config).unwrap_or_default());
        Ok((merged, (config, config_bytes)))
    }

    /// A small blob's bytes (a cache config): from this job's uploads, else the store; verified.
    async fn small_blob(&self, digest: &str, size: u64) -> Result<Bytes, RegistryError> {
        if size > MANIFEST_LIMIT {
            return Err(RegistryError::ManifestInvalid(format!("the cache config {digest} is bigger than 4 MiB")));
        }
        let upload = self.uploads.lock().expect("not poisoned").get(digest).cloned();
        let bytes =
            match upload {
                Some(upload) => Bytes::from(tokio::fs::read(&upload.path).await.map_err(|error| {
                    RegistryError::Internal(format!("reading the upload of {digest} failed: {error}"))
                })?),
                None if size == 0 => Bytes::new(),
                None => {
                    let store = self.store()?;
                    with_retries(|| store.download_range(digest, 0, size))
                        .await
                        .map_err(|error| self.read_failed(digest, error))?
                }
            };
        if proto::digest::sha256_digest(&bytes) != digest {
            return Err(RegistryError::ManifestInvalid(format!(
                "the cache config {digest} does not hash to its digest"
            )));
        }
        Ok(bytes)
    }

    /// Reports a bad blob from a response already under way, awaited by `close`.
    fn report_later(self: &Arc<Self>, digest: &str) {
        let (view, digest) = (Arc::clone(self), digest.to_owned());
        let report = tokio::spawn(async move { view.lost(&digest).await });
        self.reports.lock().expect("not poisoned").push(report);
    }

    /// The size of a blob this view has: named by the cache, uploaded in this job, or stored.
    async fn size_of(&self, digest: &str) -> Result<Option<u64>, RegistryError> {
        if let Some(size) = self.catalog.blob_size(digest) {
            return Ok(Some(size));
        }
        if let Some(upload) = self.uploads.lock().expect("not poisoned").get(digest) {
            return Ok(Some(upload.size));
        }
        self.stored_size(digest).await
    }

    /// The size of `digest`'s object in the store, if there is one.
    /// Asked once per blob found: a push's `HEAD`, its manifest's check and its commit ask
    /// about the same blobs, and a stored blob is never replaced.
    async fn stored_size(&self, digest: &str) -> Result<Option<u64>, RegistryError> {
        if let Some(size) = self.stored.lock().expect("not poisoned").get(digest) {
            return Ok(Some(*size));
        }
        let Ok(store) = self.store() else { return Ok(None) };
        let size = with_retries(|| store.stored_size(digest))
            .await
            .map_err(|error| RegistryError::Unavailable(format!("asking the store for {digest} failed: {error}")))?;
        if let Some(size) = size {
            self.stored.lock().expect("not poisoned").insert(digest.to_owned(), size);
        }
        Ok(size)
    }

    /// Commits a pushed cache export as a save of the view's key.
    async fn commit_push(
        &self,
        image: pb::Image,
        manifest: &ManifestBody,
        config: Option<(String, Bytes)>,
    ) -> Result<(), RegistryError> {
        let mut guard = self.coordinator.lock().await;
        let Some(coordinator) = guard.as_mut() else {
            return Err(RegistryError::Unavailable(format!(
                "the coordinator did not answer when the view of {} started: the cache is not saved",
                self.options.service
            )));
        };
        let mut last = String::new();
        // A save the coordinator lost, or whose blobs another save failed to upload, begins
        // once more, as `cache-worker save` does.
        for _ in 0..2 {
            match self.save_once(coordinator, &image, manifest, config.as_ref()).await? {
                Ok(line) => {
                    self.said.lock().expect("not poisoned").push(line);
                    return Ok(());
                }
                Err(reason) => last = reason,
            }
        }
        Err(RegistryError::Unavailable(format!("saving the cache of {} failed: {last}, twice", self.options.service)))
    }

    /// One attempt: begin, upload what the store lacks from this job's uploads, commit.
    async fn save_once(
        &self,
        coordinator: &mut Coordinator,
        image: &pb::Image,
        manifest: &ManifestBody,
        config: Option<&(String, Bytes)>,
    ) -> Result<Result<String, String>, RegistryError> {
        let request = pb::BeginSaveRequest {
            key: Some(pb::CacheKey { service: self.options.service.clone(), branch: self.options.branch.clone() }),
            images: vec![image.clone()],
            engine_version: self.engine_version.clone(),
            host: crate::save::host_name(),
        };
        let begun = coordinator.begin_save(request).await.map_err(|error| refused(&self.options, error))?;
        if begun.unchanged {
            return Ok(Ok(format!(
                "view: {} unchanged: BuildKit's cache export is already the cache",
                self.options.service
            )));
        }
        let interval = Duration::from_secs(begun.keep_alive_seconds.max(1).into());
        let plan = begun.plan.clone().unwrap_or_default();
        let lease = coordinator.lease_save(&begun.save_id, interval, plan.max_concurrency);
        let result = self.upload_and_commit(coordinator, image, manifest, config, &begun, &lease).await;
        drop(lease);
        if !matches!(result, Ok(Ok(_))) {
            coordinator.abandon_save(&begun.save_id).await;
        }
        result
    }

    async fn upload_and_commit(
        &self,
        coordinator: &mut Coordinator,
        image: &pb::Image,
        manifest: &ManifestBody,
        config: Option<&(String, Bytes)>,
        begun: &pb::BeginSaveResponse,
        lease: &crate::coordinator::SaveLease,
    ) -> Result<Result<String, String>, RegistryError> {
        let started = Instant::now();
        let in_flight: HashSet<String> = begun.in_flight_digests.iter().cloned().collect();
        let mut blobs = Vec::new();
        let mut held = Vec::new();
        for digest in begun.missing_digests.iter().filter(|digest| !in_flight.contains(*digest)) {
            if *digest == manifest.digest {
                blobs.push(crate::direct::from_bytes(digest, manifest.bytes.to_vec()));
                continue;
            }
            if let Some((_, bytes)) = config.filter(|(config, _)| config == digest) {
                blobs.push(crate::direct::from_bytes(digest, bytes.to_vec()));
                continue;
            }
            let upload = self.uploads.lock().expect("not poisoned").get(digest).cloned();
            let Some(upload) = upload else {
                // Not in the ledger, yet in the store: a save that died after its upload (a
                // view killed mid-export) left it there, and a `HEAD` of it answered present,
                // so the build never sent it. The commit checks it against its digest.
                if self.stored_size(digest).await?.is_some() {
                    continue;
                }
                return Err(RegistryError::ManifestBlobUnknown(digest.clone()));
            };
            blobs.push(crate::direct::from_file(digest, upload.path.to_path_buf()));
            held.push(upload);
        }
        let mut moved = Vec::new();
        if !blobs.is_empty() {
            let credentials = begun
                .credentials
                .clone()
                .ok_or_else(|| RegistryError::Internal("the coordinator sent no credentials".into()))?;
            let plan = begun.plan.clone().unwrap_or_default();
            let store = crate::save::upload_store(coordinator, Some(lease), &credentials, &plan).await;
            let progress = crate::progress::Progress::for_stderr();
            moved = crate::direct::upload_all(&store, plan.max_concurrency as usize, blobs, &progress)
                .await
                .map_err(|error| RegistryError::Unavailable(format!("uploading the cache export failed: {error}")))?;
        }
        drop(held);
        let uploaded: HashSet<String> = moved.iter().map(|(digest, _, _)| digest.clone()).collect();
        let log = crate::save::save_log(std::slice::from_ref(image), &uploaded, &in_flight);
        for line in &log {
            println!("{line}");
        }
        let log = proto::save_log::fit_save_log(log);
        let service = &self.options.service;
        let images = std::slice::from_ref(image);
        let stored = match crate::save::commit(
            coordinator,
            service,
            images,
            begun,
            log,
            &in_flight,
            crate::save::MOST_COMMIT_WAIT,
        )
        .await
        .map_err(|error| refused(&self.options, error_of(error)))?
        {
            Ok(stored) => stored,
            Err(crate::save::Attempt::Again(reason)) => return Ok(Err(reason)),
            Err(crate::save::Attempt::Done(_)) => unreachable!("a commit ends no attempt"),
        };
        let bytes: u64 = moved.iter().map(|(_, bytes, _)| bytes).sum();
        let report = pb::ReportMetricsRequest {
            service: service.clone(),
            operation: pb::Operation::Save as i32,
            layers: crate::upload::layer_metrics(&moved, &begun.stored_blobs),
            total_seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        coordinator.report_metrics(report).await;
        let committed: HashSet<&String> =
            image.layers.iter().chain(&image.oci_blobs).map(|blob| &blob.digest).collect();
        self.uploads.lock().expect("not poisoned").retain(|digest, _| !committed.contains(digest));
        let outcome = if stored { "saved" } else { "not stored (a newer save is the cache)" };
        let line = format!(
            "view: {outcome} {service}: BuildKit's cache export, uploaded {} blobs ({}), {} already stored; {:.1} s",
            moved.len(),
            format_bytes(bytes),
            begun.stored_blobs.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(Ok(line))
    }

    /// Reports the view's reads to the coordinator (giving the lookup's lease back) and
    /// returns its summary lines.
    pub async fn close(&self) -> Vec<String> {
        let reports = std::mem::take(&mut *self.reports.lock().expect("not poisoned"));
        for report in reports {
            let _ = report.await;
        }
        let seconds = self.started.elapsed().as_secs_f64();
        let served = std::mem::take(&mut *self.served.lock().expect("not poisoned"));
        if let Some(coordinator) = self.coordinator.lock().await.as_mut() {
            let outcome = if self.hit { pb::RestoreOutcome::Hit } else { pb::RestoreOutcome::Miss };
            let layers = crate::upload::layer_metrics(&served, &[]);
            let report = pb::ReportMetricsRequest {
                service: self.options.service.clone(),
                operation: pb::Operation::Restore as i32,
                layers,
                total_seconds: seconds,
                restore_outcome: outcome as i32,
                lease_id: self.lease.0.clone(),
                ..Default::default()
            };
            coordinator.report_metrics(report).await;
        }
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let c = &self.counters;
        let mut lines = vec![format!(
            "view: {}: served {} manifests and {} blobs ({}); received {} blobs ({}); {} blobs a push did not send (already stored); {:.1} s",
            self.options.service,
            count(&c.manifests_served),
            count(&c.blobs_served),
            format_bytes(count(&c.bytes_served)),
            count(&c.blobs_received),
            format_bytes(count(&c.bytes_received)),
            count(&c.present_answers),
            seconds
        )];
        lines.extend(self.said.lock().expect("not poisoned").iter().cloned());
        let pending = self.uploads.lock().expect("not poisoned").len();
        if pending > 0 {
            lines.push(format!("view: {pending} uploaded blobs no pushed manifest named were not saved"));
        }
        lines
    }
}

/// A refusal of the coordinator as the registry error a build log shows.
fn refused(options: &ViewOptions, error: ClientError) -> RegistryError {
    let branch =
        if options.branch.is_empty() { "the default branch".to_owned() } else { format!("branch {}", options.branch) };
    let line = format!("saving the cache of {} ({branch}) was refused: {error}", options.service);
    match error {
        ClientError::Refused(_) => RegistryError::Denied(line),
        ClientError::Invalid(_) => RegistryError::ManifestInvalid(line),
        ClientError::Unreachable { .. } | ClientError::Stalled { .. } => RegistryError::Unavailable(line),
        _ => RegistryError::Internal(line),
    }
}

fn error_of(error: WorkerError) -> ClientError {
    match error {
        WorkerError::Coordinator(error) => error,
        other => ClientError::Other(other.to_string()),
    }
}

/// Runs a store request up to three times: the SDK retries each request already, this
/// covers a read that stalled past its deadline once.
async fn with_retries<T, F: Future<Output = Result<T, TransferError>>>(
    mut request: impl FnMut() -> F,
) -> Result<T, TransferError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match request().await {
            Err(TransferError::NotStored { digest }) => return Err(TransferError::NotStored { digest }),
            Err(_) if attempt < 3 => continue,
            result => return result,
        }
    }
}

/// The ranges of `[start, end]` cut at the blob's part boundaries.
fn part_ranges(start: u64, end: u64, part_size: u64) -> Vec<(u64, u64)> {
    let part_size = part_size.max(1);
    let mut ranges = Vec::new();
    let mut offset = start;
    while offset <= end {
        let boundary = (offset / part_size + 1) * part_size;
        let last = end.min(boundary - 1);
        ranges.push((offset, last - offset + 1));
        offset = last + 1;
    }
    ranges
}

/// A stream that yields `inner`'s pieces, holding the last back until the whole hashes to
/// `digest`; on a mismatch it ends with an error instead, so a client never keeps a blob that
/// is not the one it asked for.
fn verified(
    inner: futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
    digest: String,
    on_mismatch: impl FnOnce(String) + Send + 'static,
) -> futures::stream::BoxStream<'static, std::io::Result<Bytes>> {
    struct State<F> {
        inner: futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
        hasher: Option<DigestHasher>,
        held: Option<Bytes>,
        digest: String,
        on_mismatch: Option<F>,
    }
    let state = State { inner, hasher: Some(DigestHasher::new()), held: None, digest, on_mismatch: Some(on_mismatch) };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            let hasher = state.hasher.as_mut()?;
            match state.inner.next().await {
                Some(Ok(piece)) => {
                    hasher.update(&piece);
                    if let Some(previous) = state.held.replace(piece) {
                        return Some((Ok(previous), state));
                    }
                }
                Some(Err(error)) => {
                    state.hasher = None;
                    return Some((Err(error), state));
                }
                None => {
                    let actual = state.hasher.take().expect("checked above").finish();
                    if actual == state.digest {
                        return state.held.take().map(|last| (Ok(last), state));
                    }
                    if let Some(on_mismatch) = state.on_mismatch.take() {
                        on_mismatch(actual.clone());
                    }
                    let error = std::io::Error::other(format!("blob {} hashes to {actual} in the store", state.digest));
                    return Some((Err(error), state));
                }
            }
        }
    })
    .boxed()
}

/// The view as the protocol holds it.
#[derive(Clone)]
pub struct SharedView(pub Arc<ViewBackend>);

#[async_trait::async_trait]
impl Backend for SharedView {
    async fn manifest(&self, repository: &str, reference: &Reference) -> Result<Option<ManifestBody>, RegistryError> {
        let body = match self.0.catalog.manifest(repository, reference) {
            None => return Ok(None),
            Some(ManifestSource::Made(body)) => body.clone(),
            Some(ManifestSource::Stored { digest, media_type, size }) => {
                self.0.stored_manifest(digest, media_type.as_deref(), *size).await?
            }
        };
        self.0.counters.manifests_served.fetch_add(1, Ordering::Relaxed);
        Ok(Some(body))
    }

    async fn blob_size(&self, repository: &str, digest: &str) -> Result<Option<u64>, RegistryError> {
        let size = self.0.size_of(digest).await?;
        // A push asks before it sends: a blob already here is not sent again.
        if size.is_some() && repository == BUILD_CACHE_REPOSITORY {
            self.0.counters.present_answers.fetch_add(1, Ordering::Relaxed);
        }
        Ok(size)
    }

    async fn read_blob(
        &self,
        _repository: &str,
        digest: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobRead>, RegistryError> {
        let upload = self.0.uploads.lock().expect("not poisoned").get(digest).cloned();
        if let Some(upload) = upload {
            return Ok(Some(read_upload(upload, range).await?));
        }
        if self.0.lost_blobs.lock().expect("not poisoned").contains(digest) {
            return Err(RegistryError::BlobUnknown(format!("{digest} is no longer in the store")));
        }
        let Some(size) = self.0.size_of(digest).await? else { return Ok(None) };
        let store = self.0.store()?.clone();
        let (start, end) = range.map_or((0, size.saturating_sub(1)), |range| (range.start, range.end));
        let mut ranges = if size == 0 { Vec::new() } else { part_ranges(start, end, store.part_size_for(size)) };
        let length: u64 = ranges.iter().map(|(_, length)| length).sum();
        let view = Arc::clone(&self.0);
        let started = Instant::now();
        // The first part is read before the answer begins, so a blob the store lost is a clean
        // `BLOB_UNKNOWN` (and reported) rather than a response cut short.
        let first = match ranges.first().copied() {
            None => None,
            Some((offset, length)) => match with_retries(|| store.download_range(digest, offset, length)).await {
                Ok(piece) => Some(piece),
                Err(TransferError::NotStored { .. }) => {
                    self.0.lost(digest).await;
                    return Err(RegistryError::BlobUnknown(format!("{digest} is no longer in the store")));
                }
                Err(error) => return Err(self.0.read_failed(digest, error)),
            },
        };
        if !ranges.is_empty() {
            ranges.remove(0);
        }
        let owned = digest.to_owned();
        let reporter = Arc::clone(&self.0);
        let parts = Arc::clone(&self.0.parts);
        let rest = futures::stream::iter(ranges)
            .map(move |(offset, length)| {
                let (store, digest, parts) = (store.clone(), owned.clone(), Arc::clone(&parts));
                async move {
                    // Held until the part is handed on, as the stream yields it.
                    let held = parts.acquire_owned().await.expect("the semaphore is never closed");
                    let piece = with_retries(|| store.download_range(&digest, offset, length)).await;
                    piece.map(|piece| (piece, held))
                }
            })
            .buffered(self.0.concurrency)
            .map_ok(|(piece, _held)| piece)
            .map_err(move |error| {
                if let TransferError::NotStored { digest } = &error {
                    reporter.report_later(digest);
                }
                std::io::Error::other(error)
            });
        let body = futures::stream::iter(first.map(Ok)).chain(rest).boxed();
        let counted = {
            let (view, counting) = (Arc::clone(&view), Arc::clone(&view));
            let digest = digest.to_owned();
            body.inspect_ok(move |piece| {
                counting.counters.bytes_served.fetch_add(piece.len() as u64, Ordering::Relaxed);
            })
            .chain(futures::stream::once(async move {
                view.counters.blobs_served.fetch_add(1, Ordering::Relaxed);
                view.served.lock().expect("not poisoned").push((digest, length, started.elapsed().as_secs_f64()));
                Ok(Bytes::new())
            }))
            .try_filter(|piece| futures::future::ready(!piece.is_empty()))
            .boxed()
        };
        let body = if range.is_none() {
            let digest = digest.to_owned();
            verified(counted, digest.clone(), move |_| view.report_later(&digest))
        } else {
            counted
        };
        Ok(Some(BlobRead { size, body }))
    }

    async fn blob_uploaded(&self, _repository: &str, blob: UploadedBlob) -> Result<(), RegistryError> {
        self.0.counters.blobs_received.fetch_add(1, Ordering::Relaxed);
        self.0.counters.bytes_received.fetch_add(blob.size, Ordering::Relaxed);
        self.0.uploads.lock().expect("not poisoned").insert(blob.digest.clone(), Arc::new(blob));
        Ok(())
    }

    async fn check_push(&self, repository: &str) -> Result<(), RegistryError> {
        if repository != BUILD_CACHE_REPOSITORY {
            return Err(RegistryError::Unsupported(format!(
                "this view keeps BuildKit's cache export at {BUILD_CACHE_REPOSITORY}:<tag> only; save images with cache-worker save"
            )));
        }
        // Not the coordinator's lock: a commit holds it while it saves.
        if !self.0.answered {
            return Err(RegistryError::Unavailable(format!(
                "the coordinator did not answer when the view of {} started: the cache is not saved",
                self.0.options.service
            )));
        }
        Ok(())
    }

    async fn tags(&self, repository: &str) -> Result<Vec<String>, RegistryError> {
        Ok(self.0.catalog.tags(repository))
    }

    async fn put_manifest(
        &self,
        repository: &str,
        _reference: &Reference,
        manifest: ManifestBody,
    ) -> Result<(), RegistryError> {
        if repository != BUILD_CACHE_REPOSITORY {
            return Err(RegistryError::Unsupported(format!(
                "this view keeps BuildKit's cache export at {BUILD_CACHE_REPOSITORY}:<tag> only; save images with cache-worker save"
            )));
        }
        let image = catalog::pushed_cache(&manifest)?;
        for blob in image.layers.iter().chain(&image.oci_blobs) {
            if self.0.size_of(&blob.digest).await?.is_none() {
                return Err(RegistryError::ManifestBlobUnknown(blob.digest.clone()));
            }
        }
        // One push at a time: each merges with the one before.
        let mut pushed = self.0.pushed.lock().await;
        let named: Vec<String> = image.layers.iter().chain(&image.oci_blobs).map(|blob| blob.digest.clone()).collect();
        let (image, manifest, config) = match pushed.as_ref() {
            None => (image, manifest, None),
            Some(earlier) => match self.0.merged(earlier, &manifest).await {
                Ok((merged, config)) => (catalog::pushed_cache(&merged)?, merged, Some(config)),
                Err(error) => {
                    eprintln!(
                        "cache-worker: warning: this job's cache exports cannot be merged, the last one is saved alone: {error}"
                    );
                    (image, manifest, None)
                }
            },
        };
        if let Err(error) = self.0.commit_push(image, &manifest, config).await {
            // The build log shows the refusal; the job's summary says it too.
            let line = format!("view: {}: BuildKit's cache export was not saved: {error}", self.0.options.service);
            self.0.said.lock().expect("not poisoned").push(line);
            return Err(error);
        }
        // The pushed config a merge replaced is saved in the merged one.
        self.0.uploads.lock().expect("not poisoned").retain(|digest, _| !named.contains(digest));
        *pushed = Some(manifest);
        Ok(())
    }
}

/// A blob uploaded in this job, read back from its spool file.
async fn read_upload(upload: Arc<UploadedBlob>, range: Option<ByteRange>) -> Result<BlobRead, RegistryError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let (start, end) = range.map_or((0, upload.size.saturating_sub(1)), |range| (range.start, range.end));
    let mut file = tokio::fs::File::open(&upload.path)
        .await
        .map_err(|error| RegistryError::Internal(format!("reading the upload of {} failed: {error}", upload.digest)))?;
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|error| RegistryError::Internal(format!("reading the upload of {} failed: {error}", upload.digest)))?;
    let length = if upload.size == 0 { 0 } else { end - start + 1 };
    let reader = tokio_util::io::ReaderStream::with_capacity(file.take(length), 1 << 20);
    // The stream keeps the spool file alive while it is read.
    let size = upload.size;
    let body = reader.map(move |piece| {
        let _keep = &upload;
        piece
    });
    Ok(BlobRead { size, body: body.boxed() })
}

impl std::fmt::Debug for ViewBackend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ViewBackend").field("service", &self.options.service).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_the_parts_a_blob_was_uploaded_in() {
        assert_eq!(part_ranges(0, 9, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(part_ranges(5, 6, 4), vec![(5, 2)]);
        assert_eq!(part_ranges(3, 4, 4), vec![(3, 1), (4, 1)]);
        assert_eq!(part_ranges(0, 0, 8), vec![(0, 1)]);
    }

    #[tokio::test]
    async fn a_read_that_does_not_hash_to_its_digest_ends_in_an_error_before_its_last_piece() {
        let pieces =
            || futures::stream::iter(vec![Ok(Bytes::from_static(b"ab")), Ok(Bytes::from_static(b"cd"))]).boxed();
        let good = proto::digest::sha256_digest(b"abcd");
        let read: Vec<_> = verified(pieces(), good, |_| panic!("no mismatch")).collect().await;
        assert_eq!(read.iter().filter(|piece| piece.is_ok()).count(), 2);
        let (told, heard) = std::sync::mpsc::channel();
        let bad = proto::digest::sha256_digest(b"abce");
        let read: Vec<_> = verified(pieces(), bad, move |actual| told.send(actual).unwrap()).collect().await;
        assert!(matches!(read.as_slice(), [Ok(first), Err(_)] if first.as_ref() == b"ab"));
        assert_eq!(heard.recv().unwrap(), proto::digest::sha256_digest(b"abcd"));
    }
}
