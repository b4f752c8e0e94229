//! `cache-worker save`: the image chain goes to the project's store, only the blobs it lacks,
//! and the coordinator commits the manifest once every blob is verified stored.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use proto::format::format_bytes;
use proto::names;
use proto::v1 as pb;
use tokio::sync::{Semaphore, mpsc};

use crate::coordinator::Coordinator;
use crate::docker::{Engine, EngineImage};
use crate::error::WorkerError;
use crate::export::{SpooledBlob, blocking_reader, read_export, spool_dir};
use crate::image_config::{ImageFacts, builder_name, image_facts};
use crate::progress::{Bar, Progress, rate};
use crate::transfer::BlobStore;

pub struct SaveOptions {
    pub service: String,
    pub branch: String,
    /// Images named on the command line; each is saved with its parent chain.
    pub images: Vec<String>,
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

    fn set_save(&self, client: &crate::coordinator::Client, save_id: &str) {
        self.0.lock().expect("cleanup lock").save = Some((client.clone(), save_id.to_owned()));
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
            crate::coordinator::abandon_save(client, &save_id, Duration::from_secs(5)).await;
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
fn save_log(images: &[pb::Image], uploaded: &HashSet<String>, in_flight: &HashSet<String>) -> Vec<String> {
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
        lines.push(format!("image {} ({tags}{parent}; {builder}{cache})", image.id));
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
    let request = pb::GetCredentialsRequest { access: pb::Access::Read as i32, ..Default::default() };
    let credentials =
        coordinator.client.get_credentials(request).await.map_err(|s| coordinator.failed(s))?.into_inner();
    let store = BlobStore::new(&credentials.credentials.unwrap_or_default(), plan, None, coordinator.stall_timeout);
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

/// "layer 0123456789ab" for a progress bar.
fn short_digest(digest: &str) -> String {
    format!("layer {}", digest.trim_start_matches("sha256:").get(..12).unwrap_or(digest))
}

/// Uploads every blob the export hands over, several at once; returns (digest, bytes, seconds).
async fn upload_all(
    store: BlobStore,
    concurrency: usize,
    mut blobs: mpsc::Receiver<SpooledBlob>,
    progress: &Progress,
) -> Result<Vec<(String, u64, f64)>, WorkerError> {
    let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut uploads = tokio::task::JoinSet::new();
    let mut done = Vec::new();
    while let Some(blob) = blobs.recv().await {
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore is never closed");
        let store = store.clone();
        let bar = match &blob {
            SpooledBlob::File { layer, .. } | SpooledBlob::Stream { layer, .. } => {
                progress.bar(&short_digest(&layer.digest), layer.stored_size)
            }
            SpooledBlob::Bytes { .. } => Bar::none(),
        };
        uploads.spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let (digest, size) = match blob {
                SpooledBlob::File { layer, path } => {
                    store.upload_file(&layer.digest, &path, layer.stored_size, &bar).await?;
                    bar.finish();
                    (layer.digest.clone(), layer.stored_size)
                }
                SpooledBlob::Bytes { digest, bytes } => {
                    let size = bytes.len() as u64;
                    store.upload_bytes(&digest, bytes).await?;
                    (digest, size)
                }
                SpooledBlob::Stream { layer, body } => {
                    store.upload_stream(&layer.digest, layer.stored_size, body, &bar).await?;
                    bar.finish();
                    (layer.digest, layer.stored_size)
                }
            };
            Ok::<_, WorkerError>((digest, size, started.elapsed().as_secs_f64()))
        });
        // Surface a failure early rather than after the whole export.
        while let Some(finished) = uploads.try_join_next() {
            done.push(finished.map_err(|error| WorkerError::Invalid(error.to_string()))??);
        }
    }
    while let Some(finished) = uploads.join_next().await {
        done.push(finished.map_err(|error| WorkerError::Invalid(error.to_string()))??);
    }
    Ok(done)
}

/// The build host's name, for the logs of other saves this one replaces or keeps out.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().chars().filter(|c| !c.is_control()).take(255).collect())
        .unwrap_or_default()
}

/// What every attempt of one save works from.
#[derive(Clone, Copy)]
struct SaveWork<'a> {
    engine: &'a Engine,
    options: &'a SaveOptions,
    cleanup: &'a SaveCleanup,
    chain: &'a [EngineImage],
    started: Instant,
}

/// How one attempt at a save ended.
enum Attempt {
    Done(SaveSummary),
    /// The coordinator lost the save (it restarted) or a save this one waited for died before
    /// uploading what it claimed: beginning again fixes both.
    Again(String),
}

pub async fn save(
    coordinator: &mut Coordinator,
    engine: &Engine,
    options: &SaveOptions,
    cleanup: &SaveCleanup,
) -> Result<SaveSummary, WorkerError> {
    names::validate_service_name(&options.service)?;
    names::validate_branch_name(&options.branch)?;
    if options.images.is_empty() {
        return Err(WorkerError::Invalid("name at least one image to save".into()));
    }
    let started = Instant::now();
    if engine.uses_containerd_store().await? {
        // Image IDs there are manifest digests, not the config digests the cache addresses
        // images by: saving from that store is not supported yet. A cache never breaks a build.
        eprintln!(
            "cache-worker: warning: this engine uses the containerd image store, which cache-worker cannot save from yet: nothing saved for {}",
            options.service
        );
        return Ok(SaveSummary::default());
    }
    let chain = engine.image_chain(&options.images).await?;
    for image in &chain {
        for tag in &image.repo_tags {
            names::validate_repo_tag(tag)?;
        }
    }
    let work = SaveWork { engine, options, cleanup, chain: &chain, started };
    match save_once(coordinator, work).await? {
        Attempt::Done(summary) => Ok(summary),
        Attempt::Again(reason) => {
            eprintln!("cache-worker: {reason}: saving {} again", options.service);
            match save_once(coordinator, work).await? {
                Attempt::Done(summary) => Ok(summary),
                Attempt::Again(reason) => Err(WorkerError::Save(format!("{reason}, twice"))),
            }
        }
    }
}

/// One attempt: begin, move the missing blobs, commit. A begun save that fails is given back
/// to the coordinator, so its claims never hold up a retry.
async fn save_once(coordinator: &mut Coordinator, work: SaveWork<'_>) -> Result<Attempt, WorkerError> {
    let SaveWork { engine, options, cleanup, chain, .. } = work;
    let key = pb::CacheKey { service: options.service.clone(), branch: options.branch.clone() };
    let request = pb::BeginSaveRequest {
        key: Some(key.clone()),
        images: chain_request(chain),
        engine_version: engine.version().await?,
        host: host_name(),
    };
    let begun = coordinator.client.begin_save(request.clone()).await.map_err(|s| coordinator.failed(s))?.into_inner();
    if begun.unchanged {
        return save_begun(coordinator, work, request, begun).await;
    }
    cleanup.set_save(&coordinator.client, &begun.save_id);
    let save_id = begun.save_id.clone();
    let keep_alive = coordinator.keep_save_alive(&save_id, Duration::from_secs(begun.keep_alive_seconds.max(1).into()));
    let result = save_begun(coordinator, work, request, begun).await;
    drop(keep_alive);
    if !matches!(result, Ok(Attempt::Done(_))) {
        coordinator.abandon_save(&save_id).await;
    }
    result
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

async fn save_begun(
    coordinator: &mut Coordinator,
    work: SaveWork<'_>,
    request: pb::BeginSaveRequest,
    begun: pb::BeginSaveResponse,
) -> Result<Attempt, WorkerError> {
    let SaveWork { engine, options, cleanup, chain, started } = work;
    let missing: HashSet<String> = begun.missing_digests.iter().cloned().collect();
    // Blobs another save of the project is uploading right now: read past, not uploaded.
    let in_flight: HashSet<String> = begun.in_flight_digests.iter().cloned().collect();
    let mut blobs: HashMap<String, pb::Layer> =
        begun.stored_blobs.iter().map(|blob| (blob.digest.clone(), blob.clone())).collect();
    let mut facts_from_export = HashMap::new();
    let mut uploaded: Vec<(String, u64, f64)> = Vec::new();
    let plan = begun.plan.unwrap_or_default();

    if !missing.is_empty() || !in_flight.is_empty() {
        let credentials = begun
            .credentials
            .clone()
            .ok_or_else(|| WorkerError::Invalid("the coordinator sent no credentials".into()))?;
        let store = BlobStore::new(&credentials, &plan, Some(coordinator.client.clone()), coordinator.stall_timeout);
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
        let uploads = upload_all(store, plan.max_concurrency as usize, blob_receiver, &Progress::for_stderr()).await;
        let summary = reader.await.map_err(|error| WorkerError::Invalid(error.to_string()));
        // An upload failure is the cause when the reader stopped because of it.
        uploaded = uploads?;
        let summary = summary?.map_err(|error| host_disk_error(error.into()))?;
        blobs.extend(summary.blobs);
        facts_from_export = summary.facts;
    }

    let facts = image_facts_for(coordinator, chain, &facts_from_export, &begun.known_images, &plan).await?;
    let described = |digest: &str| {
        blobs.get(digest).cloned().ok_or_else(|| WorkerError::Invalid(format!("no size is known for blob {digest}")))
    };
    let mut images = request.images;
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
    let uploaded_digests: HashSet<String> = uploaded.iter().map(|(digest, _, _)| digest.clone()).collect();
    let log = save_log(&images, &uploaded_digests, &in_flight);
    for line in &log {
        println!("{line}");
    }
    warn_about_missing_inline_cache(&images);
    let mut stored = true;
    if !begun.unchanged {
        let commit = pb::CommitSaveRequest { save_id: begun.save_id.clone(), images: images.clone(), save_log: log };
        let committed = loop {
            // A commit waits a little for blobs other saves are still uploading, then says
            // which; those saves are alive (their claims hold), so this one waits on.
            match coordinator.client.commit_save(commit.clone()).await {
                Ok(response) if response.get_ref().waiting_for_digests.is_empty() => break response.into_inner(),
                Ok(_) => continue,
                Err(status) if status.code() == tonic::Code::NotFound => {
                    return Ok(Attempt::Again(format!(
                        "the coordinator no longer knows this save ({})",
                        status.message()
                    )));
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition && !in_flight.is_empty() => {
                    return Ok(Attempt::Again(format!(
                        "a concurrent save stopped before uploading what this one waited for ({})",
                        status.message()
                    )));
                }
                Err(status) => return Err(coordinator.failed(status).into()),
            }
        };
        stored = committed.stored;
        print_commit_outcome(&options.service, &committed);
    }

    let n_blobs_stored = begun.stored_blobs.len();
    let bytes_uploaded: u64 = uploaded.iter().map(|(_, bytes, _)| bytes).sum();
    let mut layer_metrics: Vec<pb::LayerMetric> = uploaded
        .iter()
        .map(|(digest, bytes, seconds)| pb::LayerMetric {
            digest: digest.clone(),
            bytes: *bytes,
            seconds: *seconds,
            outcome: pb::LayerOutcome::Transferred as i32,
        })
        .collect();
    layer_metrics.extend(begun.stored_blobs.iter().map(|blob| pb::LayerMetric {
        digest: blob.digest.clone(),
        bytes: blob.stored_size,
        seconds: 0.0,
        outcome: pb::LayerOutcome::Found as i32,
    }));
    let seconds = started.elapsed().as_secs_f64();
    let report = pb::ReportMetricsRequest {
        service: options.service.clone(),
        operation: pb::Operation::Save as i32,
        layers: layer_metrics,
        total_seconds: seconds,
        restore_outcome: 0,
        // The commit gave the save's lease back.
        lease_id: String::new(),
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
    println!(
        "{} {}: {} images; uploaded {} blobs ({}), {} already stored{}; {:.1} s, {}",
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
    Ok(Attempt::Done(summary))
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
