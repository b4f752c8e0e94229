//! `cache-worker save`: the image chain goes to the project's store, only the blobs it lacks,
//! and the coordinator commits the manifest once every blob is verified stored.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use proto::format::format_bytes;
use proto::names;
use proto::v1 as pb;
use tokio::sync::mpsc;

use crate::build_dirs::{BuildDirs, HostRecord, stages_to_save};
use crate::coordinator::{CommitOutcome, Coordinator, SaveCoordinator, SaveLease};
use crate::direct::{self, DirectBlob};
use crate::docker::{Engine, EngineError, EngineImage};
use crate::error::WorkerError;
use crate::export::{SpooledBlob, blocking_reader, plain, read_export, spool_dir};
use crate::image_config::{ImageFacts, builder_name, image_facts};
use crate::layer_store::{LayerStore, chain_ids};
use crate::oci::{self, Descriptor, OciBlobs};
use crate::progress::{Bar, Progress, rate, short_digest};
use crate::save_source::{BlobSource, EngineStores};
use crate::steps::ImageSteps;
use crate::transfer::BlobStore;
use crate::upload::{Moved, upload_bounded};

pub struct SaveOptions {
    pub service: String,
    pub branch: String,
    /// Images named on the command line; each is saved with its parent chain.
    pub images: Vec<String>,
    /// `--build-cache-dir`: where the last restore's record and the build's own cache export
    /// are (see [`BuildDirs`]).
    pub build_cache_dir: std::path::PathBuf,
    /// [`crate::build_dirs::owner_of`] the token: a record or cache export another token left
    /// on this host is not this job's.
    pub owner: String,
    /// [`crate::build_dirs::job_of`] the CI job: a cache export an earlier job left is not
    /// this one's.
    pub job: String,
    /// Where this worker reaches the engine's stores, when not where the engine says.
    pub stores: EngineStores,
}

/// What a save cancelled mid-way (a signal) leaves to clean up: the multipart uploads it began
/// and did not finish, and its spool folder. The save fills it in as it goes.
#[derive(Clone, Default)]
pub struct SaveCleanup(Arc<std::sync::Mutex<CleanupState>>);

#[derive(Default)]
struct CleanupState {
    store: Option<BlobStore>,
    spool: Option<std::path::PathBuf>,
    /// The begun save, given back to the coordinator so its claims free at once.
    save: Option<(crate::coordinator::Client, String)>,
}

impl SaveCleanup {
    fn set_store(&self, store: &BlobStore) {
        self.0.lock().expect("cleanup lock").store = Some(store.clone());
    }

    fn set_spool(&self, path: &std::path::Path) {
        self.0.lock().expect("cleanup lock").spool = Some(path.to_owned());
    }

    fn set_save(&self, coordinator: &Coordinator, save_id: &str) {
        self.0.lock().expect("cleanup lock").save = Some((coordinator.client.clone(), save_id.to_owned()));
    }

    /// Aborts the unfinished uploads, so the store keeps none of their parts and no object
    /// appears, removes the spool, and gives the begun save back to the coordinator (so a
    /// retry never waits for it). Returns how many uploads it aborted.
    pub async fn run(&self) -> usize {
        let CleanupState { store, spool, save } = std::mem::take(&mut *self.0.lock().expect("cleanup lock"));
        if let Some(spool) = spool {
            // Files still open are unlinked; their space returns when the process exits.
            let _ = std::fs::remove_dir_all(spool);
        }
        let aborted = match store {
            Some(store) => store.abort_unfinished().await,
            None => 0,
        };
        if let Some((client, save_id)) = save {
            crate::coordinator::abandon_save(client, &save_id, crate::transfer::AFTER_FAILURE).await;
        }
        aborted
    }
}

/// What a save did, for the summary line and the tests.
#[derive(Debug, Default)]
pub struct SaveSummary {
    pub n_images: usize,
    pub n_blobs_uploaded: usize,
    pub bytes_uploaded: u64,
    pub n_blobs_stored: usize,
    pub unchanged: bool,
    /// The commit made this save's images the cache (false: a newer save's were kept).
    pub stored: bool,
}

fn chain_request(chain: &[EngineImage]) -> Vec<pb::Image> {
    chain
        .iter()
        .map(|image| pb::Image {
            id: image.id.clone(),
            repo_tags: image.repo_tags.clone(),
            parent_id: image.parent_id.clone(),
            layers: image
                .diff_ids
                .iter()
                .map(|digest| pb::Layer { digest: digest.clone(), ..Default::default() })
                .collect(),
            ..Default::default()
        })
        .collect()
}

/// The save log: each image with its tags, parent and builder, each layer with its size, how
/// it is stored, and whether this save uploaded it.
pub(crate) fn save_log(images: &[pb::Image], uploaded: &HashSet<String>, in_flight: &HashSet<String>) -> Vec<String> {
    let mut lines = Vec::new();
    for image in images {
        let tags = if image.repo_tags.is_empty() { "<no tag>".to_owned() } else { image.repo_tags.join(", ") };
        let parent = if image.parent_id.is_empty() { String::new() } else { format!(", parent {}", image.parent_id) };
        let builder = builder_name(image.builder());
        let cache = match (image.builder(), image.inline_cache) {
            (_, true) => ", inline cache",
            (pb::Builder::Buildkit, false) => ", no inline cache",
            _ => "",
        };
        if image.build_cache {
            lines.push(format!("BuildKit cache export {} (--cache-to, mode=max)", image.id));
        } else {
            lines.push(format!("image {} ({tags}{parent}; {builder}{cache})", image.id));
        }
        for layer in &image.layers {
            let state = if uploaded.contains(&layer.digest) {
                "new"
            } else if in_flight.contains(&layer.digest) {
                "uploaded by a concurrent save"
            } else {
                "already stored"
            };
            let encoding = if layer.encoding.is_empty() {
                String::new()
            } else {
                format!(" (stored {} as {})", format_bytes(layer.stored_size), layer.encoding)
            };
            lines.push(format!("  layer {} {}{encoding} {state}", layer.digest, format_bytes(layer.size)));
        }
    }
    lines
}

/// A BuildKit image without inline cache metadata cannot serve `--cache-from`: say how to fix it.
fn warn_about_missing_inline_cache(images: &[pb::Image]) {
    // The build's own cache export serves instead, stages and all.
    if images.iter().any(|image| image.build_cache) {
        return;
    }
    for image in images.iter().filter(|image| image.builder() == pb::Builder::Buildkit && !image.inline_cache) {
        let name = image.repo_tags.first().cloned().unwrap_or_else(|| image.id.clone());
        eprintln!(
            "cache-worker: warning: {name} was built by BuildKit without inline cache metadata, so a build cannot reuse its steps: build it with --build-arg BUILDKIT_INLINE_CACHE=1"
        );
    }
}

/// How each image was built, from the configs the export held, the coordinator's knowledge, or
/// (rarely: stored but in no manifest any more) the stored configs themselves.
async fn image_facts_for(
    coordinator: &mut Coordinator,
    chain: &[EngineImage],
    from_export: &HashMap<String, ImageFacts>,
    known_images: &[pb::Image],
    plan: &pb::TransferPlan,
) -> Result<HashMap<String, ImageFacts>, WorkerError> {
    let mut facts = from_export.clone();
    for image in known_images {
        facts
            .entry(image.id.clone())
            .or_insert(ImageFacts { builder: image.builder(), inline_cache: image.inline_cache });
    }
    let unknown: Vec<&EngineImage> = chain.iter().filter(|image| !facts.contains_key(&image.id)).collect();
    if unknown.is_empty() {
        return Ok(facts);
    }
    let credentials = coordinator.read_credentials().await?;
    let store = BlobStore::new(&credentials, plan, None, coordinator.stall_timeout);
    for image in unknown {
        let mut body = std::pin::pin!(store.download(&image.id).await?);
        let mut config = Vec::new();
        while let Some(chunk) = body.try_next().await? {
            config.extend_from_slice(&chunk);
            if config.len() as u64 > crate::export::JSON_LIMIT {
                return Err(WorkerError::Invalid(format!(
                    "the stored config {} is bigger than an image config may be",
                    image.id
                )));
            }
        }
        facts.insert(image.id.clone(), image_facts(&config));
    }
    Ok(facts)
}

/// Uploads every blob the export hands over, several at once; returns (digest, bytes, seconds).
async fn upload_spooled(
    store: BlobStore,
    concurrency: usize,
    blobs: mpsc::Receiver<SpooledBlob>,
    progress: &Progress,
) -> Result<Vec<Moved>, WorkerError> {
    let blobs = tokio_stream::wrappers::ReceiverStream::new(blobs);
    upload_bounded(concurrency, blobs, |blob| {
        let store = store.clone();
        let bar = match &blob {
            SpooledBlob::File { layer, .. } | SpooledBlob::Stream { layer, .. } => {
                progress.bar(&short_digest(&layer.digest), layer.stored_size)
            }
            SpooledBlob::Bytes { .. } => Bar::none(),
        };
        async move { upload_spooled_one(&store, blob, &bar).await }
    })
    .await
}

async fn upload_spooled_one(store: &BlobStore, blob: SpooledBlob, bar: &Bar) -> Result<Moved, WorkerError> {
    let started = Instant::now();
    let (digest, size) = match blob {
        SpooledBlob::File { layer, path } => {
            store.upload_file(&layer.digest, &path, layer.stored_size, bar).await?;
            bar.finish();
            (layer.digest, layer.stored_size)
        }
        SpooledBlob::Bytes { digest, bytes } => {
            let size = bytes.len() as u64;
            store.upload_bytes(&digest, bytes).await?;
            (digest, size)
        }
        SpooledBlob::Stream { layer, body } => {
            store.upload_stream(&layer.digest, layer.stored_size, body, bar).await?;
            bar.finish();
            (layer.digest, layer.stored_size)
        }
    };
    Ok((digest, size, started.elapsed().as_secs_f64()))
}

/// The build host's name, for the logs of other saves this one replaces or keeps out.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().chars().filter(|c| !c.is_control()).take(255).collect())
        .unwrap_or_default()
}

/// One save: what every attempt works from, whatever its blob source.
struct SaveJob<'a> {
    engine: &'a Engine,
    options: &'a SaveOptions,
    cleanup: &'a SaveCleanup,
    /// The images the save names, their parents and (classic builder) their other stages.
    chain: Vec<EngineImage>,
    started: Instant,
    /// BuildKit's `mode=max` cache export the build wrote into `--build-cache-dir`, as an image
    /// of the save and the blobs it reads from.
    build_cache: Option<(pb::Image, OciBlobs)>,
    /// The build steps of the images the save names (those the engine could tell).
    steps: Vec<ImageSteps>,
    /// The classic builder's other stages the save takes (their leaves); `None` on the
    /// containerd image store, where images have no parent chain.
    stages: Option<Vec<String>>,
}

/// The blobs of the containerd image store's images: a `docker save` read into its spool
/// folder, or the engine's content store read in place.
struct OciExport {
    blobs: OciBlobs,
    _spool: Option<tempfile::TempDir>,
}

/// What an attempt's uploads came to: the images described with every blob's size, and the
/// blobs this save moved.
struct Uploaded {
    images: Vec<pb::Image>,
    moved: Vec<Moved>,
}

/// How one attempt at a save ended.
#[derive(Debug)]
pub(crate) enum Attempt {
    Done(SaveSummary),
    /// The coordinator lost the save (it restarted) or a save this one waited for died before
    /// uploading what it claimed: beginning again fixes both.
    Again(String),
}

/// Saves the images `options` names: the job is prepared and its blob source chosen once, then
/// attempted (begin → upload → commit → report) until it is done.
pub async fn save(
    coordinator: &mut Coordinator,
    engine: &Engine,
    options: &SaveOptions,
    cleanup: &SaveCleanup,
) -> Result<SaveSummary, WorkerError> {
    let (job, source) = SaveJob::prepare(engine, options, cleanup).await?;
    let summary =
        attempt_until_done(&options.service, source, async |source| save_once(coordinator, &job, source).await).await?;
    job.write_record().await;
    Ok(summary)
}

/// The one retry layer: an attempt told to begin again is made once more, and a read in place
/// that failed its check is made again from the engine's export (nothing it read was kept).
async fn attempt_until_done(
    service: &str,
    mut source: BlobSource,
    mut attempt: impl AsyncFnMut(&BlobSource) -> Result<Attempt, WorkerError>,
) -> Result<SaveSummary, WorkerError> {
    let mut began_again = false;
    loop {
        match attempt(&source).await {
            Ok(Attempt::Done(summary)) => return Ok(summary),
            Ok(Attempt::Again(reason)) if !began_again => {
                eprintln!("cache-worker: {reason}: saving {service} again");
                began_again = true;
            }
            Ok(Attempt::Again(reason)) => return Err(WorkerError::Save(format!("{reason}, twice"))),
            Err(WorkerError::Direct(reason)) if source.reads_in_place() => {
                eprintln!("cache-worker: {reason}: saving {service} through docker save instead");
                source = source.export();
                began_again = false;
            }
            Err(error) => return Err(error),
        }
    }
}

impl<'a> SaveJob<'a> {
    /// Checks the names, reads the chain, the build's cache export and steps from the engine,
    /// and chooses where the blobs are read from.
    async fn prepare(
        engine: &'a Engine,
        options: &'a SaveOptions,
        cleanup: &'a SaveCleanup,
    ) -> Result<(SaveJob<'a>, BlobSource), WorkerError> {
        names::validate_service_name(&options.service)?;
        names::validate_branch_name(&options.branch)?;
        if options.images.is_empty() {
            return Err(WorkerError::Invalid("name at least one image to save".into()));
        }
        let started = Instant::now();
        let storage = engine.storage().await?;
        let oci = storage.containerd_store;
        let dirs = BuildDirs::new(&options.build_cache_dir, &options.service);
        let mut references = options.images.clone();
        let mut stages = None;
        if !oci {
            // The classic builder's other stages: nobody names their images, so those made
            // since this job's restore (or the host's last save) are taken.
            let leaves = engine.stage_leaves(&options.images).await?;
            let taken = stages_to_save(&leaves, dirs.save_baseline(&options.owner).as_ref(), &options.owner);
            references.extend(taken.iter().cloned());
            stages = Some(taken);
        }
        let chain = engine.image_chain(&references).await?;
        for image in &chain {
            for tag in &image.repo_tags {
                names::validate_repo_tag(tag)?;
            }
        }
        let export_is_ours = oci && dirs.export_is_of(&options.owner, &options.job);
        if oci && !export_is_ours && dirs.export().join("index.json").exists() {
            // Another project's job, or one before any restore of this service: not this build's.
            eprintln!(
                "cache-worker: warning: the cache export in {} was not written after a restore of {} with this token in this job, so it is left out: restore before the build",
                dirs.export().display(),
                options.service
            );
        }
        let build_cache = match export_is_ours.then(|| read_build_cache(&dirs.export())).transpose() {
            Ok(cache) => cache.flatten(),
            Err(error) => {
                // The images are still worth saving; the next job's build exports its cache again.
                eprintln!(
                    "cache-worker: warning: the build's cache export in {} cannot be read, the images are saved without it: {error}",
                    dirs.export().display()
                );
                None
            }
        };
        let steps = named_steps(engine, &options.images, &chain).await?;
        let probe = chain.first().map(|image| image.id.as_str()).unwrap_or_default();
        let source = BlobSource::choose(&storage, &options.stores, probe).await;
        Ok((SaveJob { engine, options, cleanup, chain, started, build_cache, steps, stages }, source))
    }
}

impl SaveJob<'_> {
    /// After a save on a graph driver, the service's record says what the host held and what
    /// the cache holds now, so the next save here (without a restore first) takes only what
    /// its own build made. Best effort: without it that save goes by an older record.
    async fn write_record(&self) {
        let Some(stages) = &self.stages else { return };
        let Ok(present) = self.engine.image_ids().await else { return };
        let record = HostRecord {
            images: self.chain.iter().map(|image| image.id.clone()).collect(),
            stages: stages.iter().cloned().collect(),
            ..HostRecord::begin(&self.options.owner, &self.options.job, present)
        };
        let dirs = BuildDirs::new(&self.options.build_cache_dir, &self.options.service);
        if let Err(error) = dirs.write_record(&record) {
            eprintln!(
                "cache-worker: warning: cannot write what was saved under {}: {error}",
                self.options.build_cache_dir.display()
            );
        }
    }
}

/// One attempt: begin, upload the missing blobs, commit, report. A begun save that fails is
/// given back to the coordinator, so its claims never hold up a retry.
async fn save_once(
    coordinator: &mut Coordinator,
    job: &SaveJob<'_>,
    source: &BlobSource,
) -> Result<Attempt, WorkerError> {
    let (request, export) = begin_request(coordinator, job, source).await?;
    let begun = coordinator.begin_save(request.clone()).await?;
    if begun.unchanged {
        return upload_commit_report(coordinator, job, source, None, request, begun, export).await;
    }
    job.cleanup.set_save(coordinator, &begun.save_id);
    let interval = Duration::from_secs(begun.keep_alive_seconds.max(1).into());
    let first_share = begun.plan.as_ref().map_or(1, |plan| plan.max_concurrency);
    let lease = coordinator.lease_save(&begun.save_id, interval, first_share);
    let result = upload_commit_report(coordinator, job, source, Some(&lease), request, begun, export).await;
    // The keep-alive stops before the save is given back.
    let save_id = lease.save_id.clone();
    drop(lease);
    // Not to a coordinator that just stopped answering: it would cost the save that again.
    let coordinator_failed = matches!(&result, Err(WorkerError::Coordinator(error)) if error.fails_reports_too());
    if !matches!(result, Ok(Attempt::Done(_))) && !coordinator_failed {
        coordinator.abandon_save(&save_id).await;
    }
    result
}

/// What the save begins with: the chain's images, described as OCI blobs on the containerd
/// image store (with the export that described them, kept for the uploads), and their steps.
async fn begin_request(
    coordinator: &mut Coordinator,
    job: &SaveJob<'_>,
    source: &BlobSource,
) -> Result<(pb::BeginSaveRequest, Option<OciExport>), WorkerError> {
    let key = pb::CacheKey { service: job.options.service.clone(), branch: job.options.branch.clone() };
    let mut request = pb::BeginSaveRequest {
        key: Some(key),
        images: chain_request(&job.chain),
        engine_version: job.engine.version().await?,
        host: host_name(),
    };
    let mut export = None;
    if source.oci() {
        (request.images, export) = oci_images(coordinator, job, source, request.clone()).await?;
    }
    for steps in &job.steps {
        steps.attach(&mut request.images);
    }
    Ok((request, export))
}

/// A begun save: the blobs the project lacks uploaded from the job's source, then the log, the
/// commit and the report.
async fn upload_commit_report(
    coordinator: &mut Coordinator,
    job: &SaveJob<'_>,
    source: &BlobSource,
    lease: Option<&SaveLease>,
    request: pb::BeginSaveRequest,
    begun: pb::BeginSaveResponse,
    export: Option<OciExport>,
) -> Result<Attempt, WorkerError> {
    let images = request.images;
    let uploaded = match source {
        BlobSource::LayerStore(layers) => {
            upload_from_layer_store(coordinator, job, lease, layers, images, &begun).await?
        }
        BlobSource::Export { oci: false } => upload_from_export(coordinator, job, lease, images, &begun).await?,
        BlobSource::ContentStore(_) | BlobSource::Export { oci: true } => {
            let moved = upload_oci(coordinator, job, lease, &begun, export).await?;
            Uploaded { images, moved }
        }
    };
    let in_flight: HashSet<String> = begun.in_flight_digests.iter().cloned().collect();
    let uploaded_digests: HashSet<String> = uploaded.moved.iter().map(|(digest, _, _)| digest.clone()).collect();
    let mut log = save_log(&uploaded.images, &uploaded_digests, &in_flight);
    let (reuse_lines, steps_reused, steps_rebuilt) = step_reuse(job, &begun.previous_images).await;
    log.extend(reuse_lines);
    for line in &log {
        println!("{line}");
    }
    warn_about_missing_inline_cache(&uploaded.images);
    // The manifest keeps the log within the bounds the coordinator accepts.
    let log = proto::save_log::fit_save_log(log);
    let service = &job.options.service;
    let stored = match commit(coordinator, service, &uploaded.images, &begun, log, &in_flight, MOST_COMMIT_WAIT).await?
    {
        Ok(stored) => stored,
        Err(again) => return Ok(again),
    };
    let steps = (steps_reused, steps_rebuilt);
    Ok(Attempt::Done(report(coordinator, job, source.reads_in_place(), &uploaded, &begun, stored, steps).await))
}

/// A spool or upload failure on a full or read-only disk of the build host, said as such.
fn host_disk_error(error: WorkerError) -> WorkerError {
    if let WorkerError::Export(crate::export::ExportError::Io(io)) = &error {
        let cause = match io.kind() {
            std::io::ErrorKind::StorageFull => "is full (no space or no inodes left)",
            std::io::ErrorKind::QuotaExceeded => "is over its disk quota",
            std::io::ErrorKind::ReadOnlyFilesystem => "is on a read-only file system",
            _ => return error,
        };
        return WorkerError::Host(format!(
            "the spool folder {} {cause}: free space there or set CACHE_SPOOL_DIR ({io})",
            spool_dir().display()
        ));
    }
    error
}

/// The containerd image store's images as the save describes them: every blob each one's
/// index or manifest reaches, from what the project's manifests already say of an image (a
/// probe `BeginSave`, given straight back) or else from a `docker save`, which is kept for the
/// uploads. BuildKit's cache export, when the build wrote one, comes last.
async fn oci_images(
    coordinator: &mut Coordinator,
    job: &SaveJob<'_>,
    source: &BlobSource,
    probe: pb::BeginSaveRequest,
) -> Result<(Vec<pb::Image>, Option<OciExport>), WorkerError> {
    let mut images = probe.images.clone();
    for (image, engine_image) in images.iter_mut().zip(&job.chain) {
        image.layers.clear();
        image.oci_media_type = engine_image.media_type.clone();
    }
    if let BlobSource::ContentStore(store) = source {
        // Reading the indexes and manifests in place costs less than asking which are known.
        let tops: Vec<Descriptor> = images
            .iter()
            .map(|image| Descriptor {
                media_type: image.oci_media_type.clone(),
                digest: image.id.clone(),
                size: 0,
                annotations: Default::default(),
            })
            .collect();
        // Through containerd's socket, the reads block.
        let store = store.clone();
        let read = tokio::task::spawn_blocking(move || OciBlobs::read_content_store(&store, &tops))
            .await
            .map_err(WorkerError::Internal)?
            .and_then(|blobs| {
                for image in &mut images {
                    describe_oci_image(image, &blobs)?;
                }
                Ok(blobs)
            });
        let blobs =
            read.map_err(|error| WorkerError::Direct(format!("reading the engine's content store failed: {error}")))?;
        if let Some((cache, _)) = &job.build_cache {
            images.push(cache.clone());
        }
        return Ok((images, Some(OciExport { blobs, _spool: None })));
    }
    let probe = pb::BeginSaveRequest { images: images.clone(), ..probe };
    let known = coordinator.begin_save(probe).await?;
    coordinator.abandon_save(&known.save_id).await;
    let missing: HashSet<&String> = known.missing_digests.iter().collect();
    let known: HashMap<&str, &pb::Image> = known
        .known_images
        .iter()
        .filter(|image| !missing.contains(&image.id) && !image.oci_blobs.is_empty())
        .map(|image| (image.id.as_str(), image))
        .collect();
    let export = if images.iter().all(|image| known.contains_key(image.id.as_str())) {
        None
    } else {
        Some(export_oci(job).await?)
    };
    for image in &mut images {
        if let Some(known) = known.get(image.id.as_str()) {
            image.layers = known.layers.clone();
            image.oci_blobs = known.oci_blobs.clone();
            image.config_size = known.config_size;
            image.builder = known.builder;
            image.inline_cache = known.inline_cache;
            if image.oci_media_type.is_empty() {
                image.oci_media_type = known.oci_media_type.clone();
            }
            continue;
        }
        let blobs = &export.as_ref().expect("exported when an image is unknown").blobs;
        describe_oci_image(image, blobs)?;
    }
    if let Some((cache, _)) = &job.build_cache {
        images.push(cache.clone());
    }
    Ok((images, export))
}

/// Fills in an image of the containerd store from the layout that holds it.
fn describe_oci_image(image: &mut pb::Image, blobs: &OciBlobs) -> Result<(), crate::export::ExportError> {
    let resolved = blobs.resolve(&image.id)?;
    image.layers = resolved.layers;
    image.oci_blobs = resolved.oci_blobs;
    image.config_size = blobs.json.get(&image.id).map(|bytes| bytes.len() as u64).unwrap_or_default();
    if image.oci_media_type.is_empty() {
        let listed = blobs.index.iter().find(|descriptor| descriptor.digest == image.id);
        image.oci_media_type = listed.map(|descriptor| descriptor.media_type.clone()).unwrap_or_default();
    }
    // The platform config says how the image was built; an attestation's says nothing.
    let facts: Vec<ImageFacts> = resolved.configs.iter().map(|config| image_facts(config)).collect();
    let best = facts
        .iter()
        .find(|facts| facts.inline_cache)
        .or_else(|| facts.iter().find(|facts| matches!(facts.builder, pb::Builder::Buildkit | pb::Builder::Classic)))
        .or(facts.first());
    if let Some(facts) = best {
        image.builder = facts.builder as i32;
        image.inline_cache = facts.inline_cache;
    }
    Ok(())
}

/// The build's `--cache-to type=local,mode=max` export in `dir`, if it wrote one: the cache
/// manifests of every build of the job, merged into one, as an image of the save, and the
/// blobs it reaches.
fn read_build_cache(dir: &std::path::Path) -> Result<Option<(pb::Image, OciBlobs)>, WorkerError> {
    let Some(mut blobs) = OciBlobs::read_dir(dir)? else { return Ok(None) };
    let Some(top) = blobs.merge_caches()? else { return Ok(None) };
    let mut image =
        pb::Image { id: top.digest, oci_media_type: top.media_type, build_cache: true, ..Default::default() };
    describe_oci_image(&mut image, &blobs)?;
    image.builder = pb::Builder::Buildkit as i32;
    image.inline_cache = false;
    Ok(Some((image, blobs)))
}

/// `docker save` of the chain from the containerd image store, every blob into a spool folder.
async fn export_oci(job: &SaveJob<'_>) -> Result<OciExport, WorkerError> {
    let spool = tempfile::Builder::new().prefix("cache-worker-").tempdir_in(spool_dir()).map_err(|error| {
        WorkerError::Host(format!("cannot create a spool folder in {}: {error}", spool_dir().display()))
    })?;
    job.cleanup.set_spool(spool.path());
    let references: Vec<String> = job.chain.iter().map(|image| image.id.clone()).collect();
    let reader = blocking_reader(job.engine.export(&references));
    let path = spool.path().to_owned();
    let blobs = tokio::task::spawn_blocking(move || OciBlobs::read_export(reader, &path))
        .await
        .map_err(WorkerError::Internal)?
        .map_err(|error| host_disk_error(error.into()))?;
    Ok(OciExport { blobs, _spool: Some(spool) })
}

/// Uploads the OCI blobs the store lacks, from the export (made now if the images were known
/// but a blob of theirs is not stored) or the build's cache folder.
async fn upload_oci(
    coordinator: &mut Coordinator,
    job: &SaveJob<'_>,
    lease: Option<&SaveLease>,
    begun: &pb::BeginSaveResponse,
    export: Option<OciExport>,
) -> Result<Vec<Moved>, WorkerError> {
    let in_flight: HashSet<&String> = begun.in_flight_digests.iter().collect();
    let missing: Vec<&String> = begun.missing_digests.iter().filter(|digest| !in_flight.contains(digest)).collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let from_cache = |digest: &str| job.build_cache.as_ref().and_then(|(_, blobs)| blobs.source(digest));
    let export = match export {
        Some(export) => Some(export),
        None if missing.iter().all(|digest| from_cache(digest).is_some()) => None,
        None => Some(export_oci(job).await?),
    };
    let credentials =
        begun.credentials.clone().ok_or_else(|| WorkerError::Invalid("the coordinator sent no credentials".into()))?;
    let plan = begun.plan.clone().unwrap_or_default();
    let store = upload_store(coordinator, lease, &credentials, &plan).await;
    job.cleanup.set_store(&store);
    let mut blobs = Vec::new();
    for digest in missing {
        let source = export.as_ref().and_then(|export| export.blobs.source(digest)).or_else(|| from_cache(digest));
        // Every file is checked again as it streams: the content store's and the cache
        // folder's are read in place, unchecked until now.
        blobs.push(match source {
            Some(oci::LayoutBlob::Bytes(bytes)) => direct::from_bytes(digest, bytes),
            Some(oci::LayoutBlob::File(path, _)) => direct::from_file(digest, path),
            Some(oci::LayoutBlob::Stored(store)) => direct::from_content_store(digest, store),
            None => {
                return Err(WorkerError::Invalid(format!(
                    "blob {digest} is in neither the export nor the build cache"
                )));
            }
        });
    }
    let uploaded = direct::upload_all(&store, plan.max_concurrency as usize, blobs, &Progress::for_stderr()).await;
    drop(export);
    uploaded
}

/// The graph driver's blobs, read from `docker save` of the whole chain: the blobs the project
/// lacks are uploaded as the export streams past.
async fn upload_from_export(
    coordinator: &mut Coordinator,
    job: &SaveJob<'_>,
    lease: Option<&SaveLease>,
    images: Vec<pb::Image>,
    begun: &pb::BeginSaveResponse,
) -> Result<Uploaded, WorkerError> {
    let SaveJob { engine, cleanup, chain, .. } = job;
    let missing: HashSet<String> = begun.missing_digests.iter().cloned().collect();
    // Blobs another save of the project is uploading right now: read past, not uploaded.
    let in_flight: HashSet<String> = begun.in_flight_digests.iter().cloned().collect();
    let mut blobs: HashMap<String, pb::Layer> =
        begun.stored_blobs.iter().map(|blob| (blob.digest.clone(), blob.clone())).collect();
    let mut facts_from_export = HashMap::new();
    let mut uploaded: Vec<Moved> = Vec::new();
    let plan = begun.plan.clone().unwrap_or_default();

    if !missing.is_empty() || !in_flight.is_empty() {
        let credentials = begun
            .credentials
            .clone()
            .ok_or_else(|| WorkerError::Invalid("the coordinator sent no credentials".into()))?;
        let store = upload_store(coordinator, lease, &credentials, &plan).await;
        cleanup.set_store(&store);
        let spool = tempfile::Builder::new().prefix("cache-worker-").tempdir_in(spool_dir()).map_err(|error| {
            WorkerError::Host(format!("cannot create a spool folder in {}: {error}", spool_dir().display()))
        })?;
        cleanup.set_spool(spool.path());
        let spool_path = spool.path().to_owned();
        let diff_ids: HashMap<String, Vec<String>> =
            chain.iter().map(|image| (image.id.clone(), image.diff_ids.clone())).collect();
        let references: Vec<String> = chain.iter().map(|image| image.id.clone()).collect();
        let export = engine.export(&references);
        let (blob_sender, blob_receiver) = mpsc::channel(2);
        let reader = blocking_reader(export);
        let reader = tokio::task::spawn_blocking(move || {
            read_export(reader, &diff_ids, &missing, &spool_path, |blob| {
                // The receiver is gone only when an upload failed: that error is reported.
                blob_sender.blocking_send(blob).map_err(|_| std::io::Error::other("an upload failed"))
            })
        });
        let uploads =
            upload_spooled(store, plan.max_concurrency as usize, blob_receiver, &Progress::for_stderr()).await;
        let summary = reader.await.map_err(WorkerError::Internal);
        // An upload failure is the cause when the reader stopped because of it.
        uploaded = uploads?;
        let summary = summary?.map_err(|error| host_disk_error(error.into()))?;
        blobs.extend(summary.blobs);
        facts_from_export = summary.facts;
    }

    let facts = image_facts_for(coordinator, chain, &facts_from_export, &begun.known_images, &plan).await?;
    let images = describe_chain(images, &blobs, &facts)?;
    Ok(Uploaded { images, moved: uploaded })
}

/// The graph driver's images, their configs and layers, with sizes from what was read or what
/// the store holds, and how each was built.
fn describe_chain(
    mut images: Vec<pb::Image>,
    blobs: &HashMap<String, pb::Layer>,
    facts: &HashMap<String, ImageFacts>,
) -> Result<Vec<pb::Image>, WorkerError> {
    let described = |digest: &str| {
        blobs.get(digest).cloned().ok_or_else(|| WorkerError::Invalid(format!("no size is known for blob {digest}")))
    };
    for image in &mut images {
        image.config_size = described(&image.id)?.size;
        if let Some(facts) = facts.get(&image.id) {
            image.builder = facts.builder as i32;
            image.inline_cache = facts.inline_cache;
        }
        for layer in &mut image.layers {
            *layer = described(&layer.digest)?;
        }
    }
    Ok(images)
}

/// The graph driver's blobs, read from the engine's stores: every config of the chain (each
/// says how its image was built), and only the configs and layers the project lacks.
async fn upload_from_layer_store(
    coordinator: &mut Coordinator,
    job: &SaveJob<'_>,
    lease: Option<&SaveLease>,
    layers: &LayerStore,
    images: Vec<pb::Image>,
    begun: &pb::BeginSaveResponse,
) -> Result<Uploaded, WorkerError> {
    let missing: HashSet<&String> = begun.missing_digests.iter().collect();
    let in_flight: HashSet<&String> = begun.in_flight_digests.iter().collect();
    let mut blobs: HashMap<String, pb::Layer> =
        begun.stored_blobs.iter().map(|blob| (blob.digest.clone(), blob.clone())).collect();
    let mut facts = HashMap::new();
    let mut to_upload: Vec<DirectBlob> = Vec::new();
    let mut queued = HashSet::new();
    for image in &job.chain {
        let config = layers
            .config(&image.id)
            .map_err(|error| WorkerError::Direct(format!("reading the config of {} failed: {error}", image.id)))?;
        facts.insert(image.id.clone(), image_facts(&config));
        blobs.insert(image.id.clone(), plain(&image.id, config.len() as u64));
        if missing.contains(&image.id) && queued.insert(image.id.clone()) {
            to_upload.push(direct::from_bytes(&image.id, config));
        }
        for (diff_id, chain_id) in image.diff_ids.iter().zip(chain_ids(&image.diff_ids)) {
            if missing.contains(diff_id) && queued.insert(diff_id.clone()) {
                to_upload.push(direct::from_layer_store(layers, &chain_id, diff_id));
            } else if in_flight.contains(diff_id) && !blobs.contains_key(diff_id) {
                // Another save uploads it; its length is in its tar-split record.
                let layer = layers
                    .layer(&chain_id, diff_id)
                    .map_err(|error| WorkerError::Direct(format!("reading the layer {diff_id} failed: {error}")))?;
                blobs.insert(diff_id.clone(), plain(diff_id, layer.size));
            }
        }
    }
    let mut uploaded: Vec<Moved> = Vec::new();
    if !to_upload.is_empty() {
        let credentials = begun
            .credentials
            .clone()
            .ok_or_else(|| WorkerError::Invalid("the coordinator sent no credentials".into()))?;
        let plan = begun.plan.clone().unwrap_or_default();
        let store = upload_store(coordinator, lease, &credentials, &plan).await;
        job.cleanup.set_store(&store);
        uploaded =
            direct::upload_all(&store, plan.max_concurrency as usize, to_upload, &Progress::for_stderr()).await?;
    }
    for (digest, size, _) in &uploaded {
        blobs.insert(digest.clone(), plain(digest, *size));
    }
    let images = describe_chain(images, &blobs, &facts)?;
    Ok(Uploaded { images, moved: uploaded })
}

/// The build steps of the images `references` name, each read from the engine; one the engine
/// cannot tell is left out with a warning (its save goes on), and so is one that is the base of
/// another (`app:1 base:1`: the build made app:1, base:1 is what it grew from). An engine that
/// stalled fails the save: nothing more can be read from it.
async fn named_steps(
    engine: &Engine,
    references: &[String],
    chain: &[EngineImage],
) -> Result<Vec<ImageSteps>, EngineError> {
    let mut named = Vec::new();
    for reference in references {
        let image = match engine.image_id(reference).await {
            Ok(Some(id)) => chain.iter().find(|image| image.id == id),
            Err(stalled @ EngineError::Stalled { .. }) => return Err(stalled),
            _ => None,
        };
        let Some(image) = image else { continue };
        match crate::steps::of_image(engine, reference, image).await {
            Ok(steps) => named.push(steps),
            Err(stalled @ EngineError::Stalled { .. }) => return Err(stalled),
            Err(error) => eprintln!("cache-worker: warning: the build steps of {reference} are not counted: {error}"),
        }
    }
    let bases: HashSet<String> = named.iter().map(|steps| steps.base_id.clone()).collect();
    named.retain(|steps| !bases.contains(&steps.id));
    Ok(named)
}

/// Each named image's reuse line (`app:latest: reused 2 of 5 steps; first rebuilt: …`), and
/// the steps reused and rebuilt in all.
async fn step_reuse(job: &SaveJob<'_>, previous_images: &[pb::Image]) -> (Vec<String>, u32, u32) {
    let (mut lines, mut reused, mut rebuilt) = (Vec::new(), 0, 0);
    for steps in &job.steps {
        let previous = steps.previous(previous_images);
        let restored_here = match previous {
            Some(previous) => matches!(job.engine.image_id(&previous.id).await, Ok(Some(_))),
            None => false,
        };
        let reuse = crate::steps::compare(steps, previous, restored_here);
        lines.push(reuse.line(&steps.reference));
        reused += reuse.reused as u32;
        rebuilt += (reuse.steps - reuse.reused) as u32;
    }
    (lines, reused, rebuilt)
}

/// The longest a commit waits in all for blobs other saves of its token are uploading: past
/// it the save begins again, and then uploads what it waited for itself (the coordinator lets
/// a claim hold others up for 10 minutes of its save at most).
pub(crate) const MOST_COMMIT_WAIT: Duration = Duration::from_secs(15 * 60);

/// Commits the save's images (nothing to commit when it is unchanged): whether they became
/// the cache, or the attempt to make again. Waits for blobs other saves upload `most_wait` at
/// most.
pub(crate) async fn commit(
    coordinator: &mut impl SaveCoordinator,
    service: &str,
    images: &[pb::Image],
    begun: &pb::BeginSaveResponse,
    log: Vec<String>,
    in_flight: &HashSet<String>,
    most_wait: Duration,
) -> Result<Result<bool, Attempt>, WorkerError> {
    if begun.unchanged {
        return Ok(Ok(true));
    }
    let commit = pb::CommitSaveRequest { save_id: begun.save_id.clone(), images: images.to_vec(), save_log: log };
    let waiting_since = Instant::now();
    let committed = loop {
        // A commit waits a little for blobs other saves are still uploading, then says
        // which; those saves are alive (their claims hold), so this one waits on, for a while.
        match coordinator.commit_save(commit.clone(), !in_flight.is_empty()).await? {
            CommitOutcome::Committed(committed) => break *committed,
            CommitOutcome::Waiting if waiting_since.elapsed() < most_wait => continue,
            CommitOutcome::Waiting => {
                return Ok(Err(Attempt::Again(format!(
                    "blobs another save of the project claimed were still not uploaded after {} s",
                    most_wait.as_secs()
                ))));
            }
            CommitOutcome::BeginAgain(reason) => return Ok(Err(Attempt::Again(reason))),
        }
    };
    print_commit_outcome(service, &committed);
    Ok(Ok(committed.stored))
}

/// The store a save uploads to, following the save's share of the transfer budget.
pub(crate) async fn upload_store(
    coordinator: &Coordinator,
    lease: Option<&SaveLease>,
    credentials: &pb::Credentials,
    plan: &pb::TransferPlan,
) -> BlobStore {
    let store = BlobStore::new(credentials, plan, Some(coordinator.client.clone()), coordinator.stall_timeout);
    if let Some(lease) = lease {
        store.follow(lease.shares()).await;
    }
    store
}

/// Reports what moved to the coordinator's metrics and prints the summary line.
async fn report(
    coordinator: &mut Coordinator,
    job: &SaveJob<'_>,
    read_in_place: bool,
    Uploaded { images, moved: uploaded }: &Uploaded,
    begun: &pb::BeginSaveResponse,
    stored: bool,
    (steps_reused, steps_rebuilt): (u32, u32),
) -> SaveSummary {
    let SaveJob { options, started, .. } = job;
    let n_blobs_stored = begun.stored_blobs.len();
    let bytes_uploaded: u64 = uploaded.iter().map(|(_, bytes, _)| bytes).sum();
    let layer_metrics = crate::upload::layer_metrics(uploaded, &begun.stored_blobs);
    let seconds = started.elapsed().as_secs_f64();
    let report = pb::ReportMetricsRequest {
        service: options.service.clone(),
        operation: pb::Operation::Save as i32,
        layers: layer_metrics,
        total_seconds: seconds,
        restore_outcome: 0,
        // The commit gave the save's lease back.
        lease_id: String::new(),
        steps_reused,
        steps_rebuilt,
    };
    coordinator.report_metrics(report).await;
    let summary = SaveSummary {
        n_images: images.len(),
        n_blobs_uploaded: uploaded.len(),
        bytes_uploaded,
        n_blobs_stored,
        unchanged: begun.unchanged,
        stored,
    };
    let read_from = match (summary.n_blobs_uploaded, read_in_place) {
        (0, _) => "",
        (_, true) => ", read from the engine's store",
        (_, false) => ", read from docker save",
    };
    println!(
        "{} {}: {} images; uploaded {} blobs ({}{read_from}), {} already stored{}; {:.1} s, {}",
        if stored { "saved" } else { "not stored (a newer save is the cache)" },
        options.service,
        summary.n_images,
        summary.n_blobs_uploaded,
        format_bytes(bytes_uploaded),
        n_blobs_stored,
        if summary.unchanged { "; unchanged since the last save" } else { "" },
        seconds,
        rate(bytes_uploaded, seconds)
    );
    summary
}

/// Says what the commit did to the cache: which save's images it replaced (by their tags and
/// host), or which newer save's images it kept.
fn print_commit_outcome(service: &str, committed: &pb::CommitSaveResponse) {
    let describe = |origin: &pb::SaveOrigin| {
        let tags = if origin.repo_tags.is_empty() { "no tags".to_owned() } else { origin.repo_tags.join(", ") };
        let host = if origin.host.is_empty() { String::new() } else { format!(", from host {}", origin.host) };
        format!("{tags}{host}")
    };
    if !committed.stored {
        let origin = committed.manifest.as_ref().and_then(|manifest| manifest.origin.clone()).unwrap_or_default();
        println!(
            "not stored: a save of {service} begun after this one is the cache ({}); it keeps its images",
            describe(&origin)
        );
        return;
    }
    let Some(replaced) = &committed.replaced else { return };
    // Both times are the coordinator's, so the build hosts' clocks do not matter.
    let this_save = committed.manifest.as_ref().and_then(|manifest| manifest.origin.clone()).unwrap_or_default();
    if replaced.committed_unix_ms >= this_save.began_unix_ms && this_save.began_unix_ms > 0 {
        println!(
            "replaced the images of a concurrent save of {service} ({}), committed while this one ran",
            describe(replaced)
        );
    } else if replaced.committed_unix_ms > 0 {
        let age = (this_save.committed_unix_ms - replaced.committed_unix_ms) as f64 / 1000.0;
        println!("replaced the previous images of {service} ({}), saved {age:.0} s ago", describe(replaced));
    } else {
        println!("replaced the previous images of {service}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coordinator that answers commits from a script, and counts them.
    struct ScriptedCommits(Vec<CommitOutcome>, usize);

    impl SaveCoordinator for ScriptedCommits {
        async fn commit_save(
            &mut self,
            _request: pb::CommitSaveRequest,
            _waited_on_others: bool,
        ) -> Result<CommitOutcome, proto::client::ClientError> {
            self.1 += 1;
            Ok(self.0.remove(0))
        }
    }

    fn begun() -> pb::BeginSaveResponse {
        pb::BeginSaveResponse { save_id: "s1".into(), ..Default::default() }
    }

    #[tokio::test]
    async fn a_commit_waits_while_others_upload_then_says_whether_it_was_stored() {
        let stored = pb::CommitSaveResponse { stored: true, ..Default::default() };
        let script = vec![CommitOutcome::Waiting, CommitOutcome::Waiting, CommitOutcome::Committed(Box::new(stored))];
        let mut coordinator = ScriptedCommits(script, 0);
        let outcome =
            commit(&mut coordinator, "svc", &[], &begun(), vec![], &HashSet::new(), MOST_COMMIT_WAIT).await.unwrap();
        assert!(matches!(outcome, Ok(true)), "{outcome:?}");
        assert_eq!(coordinator.1, 3);

        let kept_newer = pb::CommitSaveResponse { stored: false, ..Default::default() };
        let mut coordinator = ScriptedCommits(vec![CommitOutcome::Committed(Box::new(kept_newer))], 0);
        let outcome =
            commit(&mut coordinator, "svc", &[], &begun(), vec![], &HashSet::new(), MOST_COMMIT_WAIT).await.unwrap();
        assert!(matches!(outcome, Ok(false)), "a newer cache kept: {outcome:?}");
    }

    #[tokio::test]
    async fn a_commit_waits_for_other_saves_a_bounded_time_then_begins_again() {
        // Another save keeps its claim alive and never uploads: past the bound (none here),
        // the save begins again rather than waiting for ever.
        let mut coordinator = ScriptedCommits(vec![CommitOutcome::Waiting], 0);
        let in_flight: HashSet<String> = ["sha256:a".to_owned()].into();
        let outcome = commit(&mut coordinator, "svc", &[], &begun(), vec![], &in_flight, Duration::ZERO).await.unwrap();
        assert!(
            matches!(&outcome, Err(Attempt::Again(reason)) if reason.contains("still not uploaded")),
            "{outcome:?}"
        );
        assert_eq!(coordinator.1, 1);
    }

    #[tokio::test]
    async fn a_commit_told_to_begin_again_returns_the_reason_and_an_unchanged_save_commits_nothing() {
        let mut coordinator = ScriptedCommits(vec![CommitOutcome::BeginAgain("the project was flushed".into())], 0);
        let outcome =
            commit(&mut coordinator, "svc", &[], &begun(), vec![], &HashSet::new(), MOST_COMMIT_WAIT).await.unwrap();
        assert!(matches!(&outcome, Err(Attempt::Again(reason)) if reason == "the project was flushed"), "{outcome:?}");

        let mut coordinator = ScriptedCommits(vec![], 0);
        let unchanged = pb::BeginSaveResponse { unchanged: true, ..begun() };
        let outcome =
            commit(&mut coordinator, "svc", &[], &unchanged, vec![], &HashSet::new(), MOST_COMMIT_WAIT).await.unwrap();
        assert!(matches!(outcome, Ok(true)), "{outcome:?}");
        assert_eq!(coordinator.1, 0, "nothing to commit");
    }

    /// Runs the retry layer over scripted attempts; returns its result and the sources tried.
    async fn attempts(
        source: BlobSource,
        script: Vec<Result<Attempt, WorkerError>>,
    ) -> (Result<SaveSummary, WorkerError>, Vec<BlobSource>) {
        let (mut script, mut tried) = (script.into_iter(), Vec::new());
        let result = attempt_until_done("svc", source, async |source| {
            tried.push(source.clone());
            script.next().expect("no attempt past the script")
        })
        .await;
        (result, tried)
    }

    fn done() -> Result<Attempt, WorkerError> {
        Ok(Attempt::Done(SaveSummary { stored: true, ..Default::default() }))
    }

    #[tokio::test]
    async fn a_save_told_to_begin_again_is_made_once_more_then_fails_naming_the_reason() {
        let export = BlobSource::Export { oci: false };
        let (result, tried) = attempts(export.clone(), vec![Ok(Attempt::Again("lost".into())), done()]).await;
        assert!(result.unwrap().stored);
        assert_eq!(tried.len(), 2);

        let again = || Ok(Attempt::Again("the coordinator no longer knows this save".into()));
        let (result, tried) = attempts(export, vec![again(), again()]).await;
        let error = result.unwrap_err();
        assert!(matches!(&error, WorkerError::Save(reason) if reason.ends_with("save, twice")), "{error:?}");
        assert_eq!(tried.len(), 2);
    }

    #[tokio::test]
    async fn a_failed_read_in_place_is_made_again_from_the_export_and_only_once() {
        let content = BlobSource::ContentStore(crate::content_store::ContentStore::Folder("/nowhere".into()));
        let unreadable = || Err(WorkerError::Direct("reading blob sha256:ab failed: it hashes to sha256:cd".into()));
        let (result, tried) = attempts(content.clone(), vec![unreadable(), done()]).await;
        assert!(result.is_ok());
        assert!(matches!(tried[..], [BlobSource::ContentStore(_), BlobSource::Export { oci: true }]), "{tried:?}");

        // The export failing its own check, or any other failure, ends the save.
        let (result, tried) = attempts(content.clone(), vec![unreadable(), unreadable()]).await;
        assert!(matches!(result, Err(WorkerError::Direct(_))), "{result:?}");
        assert_eq!(tried.len(), 2);
        let (result, tried) = attempts(content, vec![Err(WorkerError::Save("the store is gone".into()))]).await;
        assert!(matches!(result, Err(WorkerError::Save(_))), "{result:?}");
        assert_eq!(tried.len(), 1);
    }

    #[test]
    fn a_full_or_read_only_spool_is_named_as_such() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let named = host_disk_error(WorkerError::Export(crate::export::ExportError::Io(full))).to_string();
        assert!(named.starts_with("the spool folder ") && named.contains("is full"), "{named}");
        let read_only = std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem);
        let named = host_disk_error(WorkerError::Export(crate::export::ExportError::Io(read_only))).to_string();
        assert!(named.contains("read-only") && named.contains("CACHE_SPOOL_DIR"), "{named}");
        // Any other failure keeps its own words.
        let other = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let kept = host_disk_error(WorkerError::Export(crate::export::ExportError::Io(other))).to_string();
        assert!(kept.starts_with("reading the engine's export failed"), "{kept}");
    }
}
