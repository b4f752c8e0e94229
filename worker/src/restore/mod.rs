//! `cache-worker restore`: looks the cache key up, streams the manifest's blobs into
//! `docker load` (verified on the way; on the containerd store the layers written into the
//! engine's content store first where it can, `place.rs`), brings back every tag, and says which `--cache-from`
//! flags the next build should use. It reads begin (look up) → load → tag → report; the
//! coordinator and the engine are behind the seams of `seams.rs`.

mod build_cache;
mod flags;
mod place;
pub mod seams;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use proto::format::format_bytes;
use proto::names;
use proto::v1 as pb;

use crate::build_dirs::{BuildDirs, HostRecord};
use crate::docker::EngineError;
use crate::error::WorkerError;
use crate::load::{LoadFailure, PlannedBlob, StreamEnd, Streamed, find_corrupt, load_stream, plan_load, plan_oci_load};
use crate::progress::{Progress, rate};
use crate::save_source::HostBlobs;
use build_cache::{host_io, restore_build_cache};
pub use flags::build_flags;
use flags::{buildkit_local_flags, cache_from_images, saved_as_oci, stage_leaves};
use place::Placer;
use seams::{ImageLoader, Lease, Lookup, RestoreCoordinator};

pub struct RestoreOptions {
    pub service: String,
    pub branch: String,
    /// Branches tried, in order, when `branch` has no cache.
    pub fallback_branches: Vec<String>,
    /// `--build-cache-dir` (see [`BuildDirs`]).
    pub build_cache_dir: PathBuf,
    /// [`crate::build_dirs::owner_of`] the token: whose the record this restore writes is.
    pub owner: String,
    /// [`crate::build_dirs::job_of`] the CI job, recorded for the save of the same job.
    pub job: String,
    /// Where this worker sees the engine's stores (`--engine-root`): on the containerd image
    /// store, the blobs the host already holds are neither downloaded nor sent again.
    pub stores: crate::save_source::EngineStores,
}

/// What a restore did.
#[derive(Debug, PartialEq, Eq)]
pub enum Restored {
    /// Nothing cached under the key or its fallbacks (or nothing this engine can load).
    Miss,
    /// The images are in the engine; the build command should carry these flags.
    Hit { flags: Vec<String> },
}

/// A restore under way: what it was asked, where it writes, since when, and the lease it holds.
struct Run<'a> {
    options: &'a RestoreOptions,
    say: &'a dyn Fn(&str),
    started: Instant,
    /// The engine keeps the containerd image store.
    oci: bool,
    dirs: BuildDirs,
    /// The job's mark as this restore began it: who, when, and every image already here.
    mark: HostRecord,
}

/// Restores the cache. `say` prints progress lines (stdout, or stderr when stdout is for the
/// flags alone). Whatever fails is reported to the coordinator (with the plan's lease, once it
/// holds one) before it is returned, unless the coordinator is what failed.
pub async fn restore<C: RestoreCoordinator, E: ImageLoader>(
    coordinator: &mut C,
    engine: &E,
    options: &RestoreOptions,
    say: &dyn Fn(&str),
) -> Result<Restored, WorkerError> {
    let (run, lookup) = match look_up(coordinator, engine, options, say).await {
        Ok(looked_up) => looked_up,
        Err(error) => return Err(report_failure(coordinator, &options.service, Lease::default(), error).await),
    };
    match lookup {
        Lookup::Miss(lease) => {
            say(&format!("no cached image for {}", options.service));
            run.report_miss(coordinator, lease).await
        }
        Lookup::Hit { manifest, lease, .. } if run.oci != saved_as_oci(&manifest) => {
            run.warn_other_store();
            run.report_miss(coordinator, lease).await
        }
        Lookup::Hit { manifest, plan, lease } => match run.restore_hit(coordinator, engine, &manifest, &plan).await {
            Ok(streamed) => Ok(run.finish(coordinator, &manifest, streamed, lease).await),
            Err(error) => Err(report_failure(coordinator, &options.service, lease, error).await),
        },
    }
}

/// Checks the names, readies the build cache folder and looks the key up.
async fn look_up<'a, C: RestoreCoordinator, E: ImageLoader>(
    coordinator: &mut C,
    engine: &E,
    options: &'a RestoreOptions,
    say: &'a dyn Fn(&str),
) -> Result<(Run<'a>, Lookup), WorkerError> {
    names::validate_service_name(&options.service)?;
    names::validate_branch_name(&options.branch)?;
    options.stores.validate().map_err(WorkerError::Invalid)?;
    for branch in &options.fallback_branches {
        names::validate_branch_name(branch)?;
    }
    let started = Instant::now();
    let oci = engine.uses_containerd_store().await?;
    let dirs = BuildDirs::new(&options.build_cache_dir, &options.service);
    if oci {
        dirs.reset().map_err(|error| {
            WorkerError::Host(format!("cannot prepare the build cache folder {}: {error}", dirs.images().display()))
        })?;
    }
    // The job's mark: whatever the engine holds now is not this job's build, and the cache
    // export the build writes is this token's (a save goes by both).
    let mark = HostRecord::begin(&options.owner, &options.job, engine.image_ids().await?);
    if let Err(error) = dirs.write_record(&mark) {
        dirs.forget_record();
        eprintln!(
            "cache-worker: warning: cannot write this job's mark under {}: {error}",
            options.build_cache_dir.display()
        );
    }
    let key = |branch: &String| pb::CacheKey { service: options.service.clone(), branch: branch.clone() };
    let lookup = pb::LookupRequest {
        key: Some(key(&options.branch)),
        fallbacks: options.fallback_branches.iter().map(key).collect(),
    };
    let lookup = coordinator.lookup(lookup).await?;
    Ok((Run { options, say, started, oci, dirs, mark }, lookup))
}

/// The metrics report of a restore.
fn metrics_report(
    service: &str,
    outcome: pb::RestoreOutcome,
    layers: Vec<pb::LayerMetric>,
    seconds: f64,
    lease: Lease,
) -> pb::ReportMetricsRequest {
    pb::ReportMetricsRequest {
        service: service.to_owned(),
        operation: pb::Operation::Restore as i32,
        layers,
        total_seconds: seconds,
        restore_outcome: outcome as i32,
        lease_id: lease.0,
        ..Default::default()
    }
}

/// Reports a failed restore to the coordinator with the lease it held, best effort, unless the
/// coordinator could not be talked to or refused us (the report would fail the same way: no
/// second wait, no second line); returns the failure.
pub async fn report_failure<C: RestoreCoordinator>(
    coordinator: &mut C,
    service: &str,
    lease: Lease,
    error: WorkerError,
) -> WorkerError {
    let report_fails = matches!(&error, WorkerError::Coordinator(client) if client.fails_reports_too());
    if !report_fails {
        let report = metrics_report(service, pb::RestoreOutcome::Error, Vec::new(), 0.0, lease);
        coordinator.report_failure_metrics(report).await;
    }
    error
}

impl Run<'_> {
    async fn report_miss<C: RestoreCoordinator>(
        &self,
        coordinator: &mut C,
        lease: Lease,
    ) -> Result<Restored, WorkerError> {
        let seconds = self.started.elapsed().as_secs_f64();
        let report = metrics_report(&self.options.service, pb::RestoreOutcome::Miss, Vec::new(), seconds, lease);
        coordinator.report_metrics(report).await;
        Ok(Restored::Miss)
    }

    /// The two stores keep different blobs (compressed or not) under different image IDs.
    fn warn_other_store(&self) {
        let (saved, here) = if self.oci {
            ("a graph-driver engine", "the containerd image store")
        } else {
            ("the containerd image store", "a graph driver")
        };
        eprintln!(
            "cache-worker: warning: the cache of {} was saved from {saved} and this engine uses {here}: nothing restored; the next save replaces it",
            self.options.service
        );
    }

    /// Loads the manifest's images into the engine (and BuildKit's cache export into its
    /// folder), then makes sure every tag points where it should.
    async fn restore_hit<C: RestoreCoordinator, E: ImageLoader>(
        &self,
        coordinator: &mut C,
        engine: &E,
        manifest: &pb::Manifest,
        plan: &pb::TransferPlan,
    ) -> Result<Streamed, WorkerError> {
        let store = coordinator.blob_reader(plan).await?;
        let concurrency = plan.max_concurrency as usize;
        let mut host = if self.oci { engine.host_blobs(&self.options.stores).await? } else { HostBlobs::default() };
        host.ask(manifest.images.iter().flat_map(crate::oci::image_blobs).map(|(digest, _)| digest)).await;
        // A cache of BuildKit's export alone (a view's push saves it so) has no image to load,
        // and the engine refuses a layout without one.
        let mut streamed = if manifest.images.iter().any(|image| !image.build_cache) {
            self.load(coordinator, engine, &store, manifest, &host, concurrency).await?
        } else {
            Streamed::default()
        };
        if self.oci {
            let cache_blobs = restore_build_cache(&store, manifest, &self.dirs, &host, concurrency).await?;
            streamed.blobs.extend(cache_blobs);
        }
        // The load restores tags from manifest.json; make sure each one points where it should.
        for image in manifest.images.iter().filter(|image| !image.build_cache) {
            for tag in &image.repo_tags {
                if engine.image_id(tag).await?.as_deref() != Some(image.id.as_str()) {
                    engine.tag(&image.id, tag).await?;
                }
            }
            if engine.image_id(&image.id).await?.is_none() {
                return Err(WorkerError::Restore(format!("image {} is missing after the load", image.id)));
            }
        }
        Ok(streamed)
    }

    /// Streams the images into `docker load`. The containerd store loads an OCI layout without
    /// the blobs its content store holds, and the layout BuildKit reads gets what it cannot
    /// find in that store ([`plan_oci_load`]); a graph driver loads `manifest.json`'s chains,
    /// without the layers the host holds.
    async fn load<C: RestoreCoordinator, E: ImageLoader>(
        &self,
        coordinator: &mut C,
        engine: &E,
        store: &C::Reader,
        manifest: &pb::Manifest,
        host: &HostBlobs,
        concurrency: usize,
    ) -> Result<Streamed, WorkerError> {
        let mut load_plan = if self.oci {
            plan_oci_load(manifest, &self.dirs.images(), host)
        } else {
            plan_load(manifest, &engine.layer_chains().await?)
        };
        let to_download: u64 = load_plan.blobs.iter().filter(|blob| !blob.skipped).map(|blob| blob.size).sum();
        let trailer = load_plan.trailer.clone();
        host.copy_out(std::mem::take(&mut load_plan.from_host)).await.map_err(WorkerError::Host)?;
        let bar = Progress::for_stderr().bar(&format!("restore {}", self.options.service), to_download);
        // On the containerd store, the layers written into the content store first (the
        // engine then loads a layout without them), under a lease held until the load is done.
        let placer = if self.oci { Placer::begin(host).await } else { None };
        let placed = match &placer {
            Some(placer) => {
                let placing = Instant::now();
                let placed = placer.place(store, &mut load_plan, concurrency, &bar).await;
                tracing::debug!(seconds = placing.elapsed().as_secs_f64(), "the layers are in the content store");
                placed
            }
            None => Ok(Vec::new()),
        };
        let loaded = match placed {
            Ok(placed) => {
                self.load_stream(coordinator, engine, store, load_plan, concurrency, bar).await.map(|mut streamed| {
                    streamed.placed = placed.len();
                    streamed.blobs.extend(placed);
                    streamed
                })
            }
            Err(failure) => Err(self.failed_blob(coordinator, failure).await),
        };
        if let Some(placer) = placer {
            placer.end().await;
        }
        let streamed = loaded?;
        if self.oci {
            for (name, bytes) in &trailer {
                std::fs::write(self.dirs.images().join(name), bytes).map_err(host_io)?;
            }
        }
        Ok(streamed)
    }

    /// Streams `load_plan` into `docker load`.
    async fn load_stream<C: RestoreCoordinator, E: ImageLoader>(
        &self,
        coordinator: &mut C,
        engine: &E,
        store: &C::Reader,
        load_plan: crate::load::LoadPlan,
        concurrency: usize,
        bar: crate::progress::Bar,
    ) -> Result<Streamed, WorkerError> {
        let checked_by_engine: Vec<PlannedBlob> =
            load_plan.blobs.iter().filter(|blob| blob.checked_by_engine).cloned().collect();
        let (tarball, outcome) = load_stream(store.clone(), load_plan, concurrency, bar);
        let loading = Instant::now();
        let loaded = engine.load(tarball).await;
        tracing::debug!(seconds = loading.elapsed().as_secs_f64(), "the engine finished the load");
        if let Err(stalled @ EngineError::Stalled { .. }) = loaded {
            // The stream's task may still wait on the request the engine froze on: the error is
            // the engine's, and what the stream did is not waited for.
            return Err(stalled.into());
        }
        let (streamed, read_whole) = match outcome.ended().await {
            StreamEnd::Finished(streamed) => (streamed, true),
            StreamEnd::Dropped(streamed) => (streamed, false),
            StreamEnd::Failed(failure) => return Err(self.failed_blob(coordinator, failure).await),
        };
        if let Err(refused) = loaded {
            // A layer the stream left to the engine's check fails the load in the engine, after
            // the last byte was read and before any image was committed: find which one.
            if read_whole
                && !checked_by_engine.is_empty()
                && let Some(failure) = find_corrupt(store.clone(), &checked_by_engine, concurrency).await
            {
                return Err(self.failed_blob(coordinator, failure).await);
            }
            return Err(refused.into());
        }
        Ok(streamed)
    }

    /// A blob that failed: a verification failure is the cause of the engine's error: name the
    /// blob, and tell the coordinator, which checks the store and drops a lost blob so the next
    /// save uploads it.
    async fn failed_blob<C: RestoreCoordinator>(&self, coordinator: &mut C, failure: LoadFailure) -> WorkerError {
        let reported = match &failure {
            LoadFailure::DigestMismatch { digest, .. } | LoadFailure::Missing { digest } => {
                format!("; {}", coordinator.report_bad_blob(digest).await.said())
            }
            LoadFailure::Transfer(_) => String::new(),
        };
        WorkerError::Restore(format!("{failure}; the engine loaded nothing{reported}"))
    }

    /// Reports the hit, records what was restored, and says which flags the build carries.
    async fn finish<C: RestoreCoordinator>(
        &self,
        coordinator: &mut C,
        manifest: &pb::Manifest,
        streamed: Streamed,
        lease: Lease,
    ) -> Restored {
        let Streamed { blobs, skipped, placed } = streamed;
        let bytes: u64 = blobs.iter().map(|blob| blob.bytes).sum();
        let seconds = self.started.elapsed().as_secs_f64();
        let layers = layer_metrics(manifest, &blobs, &skipped);
        let report = metrics_report(&self.options.service, pb::RestoreOutcome::Hit, layers, seconds, lease);
        coordinator.report_metrics(report).await;
        self.write_record(manifest);
        let flags = self.flags(manifest);
        let placed = if placed > 0 {
            format!(", {placed} of them written straight into the engine's content store")
        } else {
            String::new()
        };
        (self.say)(&format!(
            "restored {}: {} images, {} blobs downloaded ({}){placed}, {} layers already on this host, in {:.1} s, {}",
            self.options.service,
            manifest.images.len(),
            blobs.len(),
            format_bytes(bytes),
            skipped.len(),
            seconds,
            rate(bytes, seconds)
        ));
        if !flags.is_empty() {
            (self.say)(&format!("add to docker build: {}", build_flags(&flags)));
        }
        Restored::Hit { flags }
    }

    fn write_record(&self, manifest: &pb::Manifest) {
        let record = HostRecord {
            owner: self.mark.owner.clone(),
            job: self.mark.job.clone(),
            written_unix: self.mark.written_unix,
            present: self.mark.present.clone(),
            images: manifest.images.iter().map(|image| image.id.clone()).collect(),
            stages: stage_leaves(manifest),
        };
        if let Err(error) = self.dirs.write_record(&record) {
            // The job's mark stays: a save then counts the restored stages as this build's.
            eprintln!(
                "cache-worker: warning: cannot write what was restored under {}: {error}",
                self.options.build_cache_dir.display()
            );
        }
    }

    /// The flags the next build carries.
    fn flags(&self, manifest: &pb::Manifest) -> Vec<String> {
        let classic = manifest.images.iter().any(|image| image.builder() == pb::Builder::Classic);
        if !self.oci {
            cache_from_images(manifest)
        } else if classic {
            // Measured on 26.1 and 28.5: the classic builder there fails inside the engine when it
            // reuses a step without a layer (`ENV`), so it gets no flags and builds uncached.
            (self.say)(&format!(
                "{} was built by the classic builder, which cannot reuse a restored cache on the containerd image store: the build runs uncached; BuildKit (docker build without DOCKER_BUILDKIT=0) can reuse it",
                self.options.service
            ));
            Vec::new()
        } else if manifest.images.iter().any(|image| image.builder() == pb::Builder::Buildkit) {
            buildkit_local_flags(manifest, &self.dirs)
        } else {
            Vec::new()
        }
    }
}

/// The per-layer figures of a hit: each blob downloaded, each layer the host already held.
fn layer_metrics(
    manifest: &pb::Manifest,
    blobs: &[crate::load::BlobOutcome],
    skipped: &[String],
) -> Vec<pb::LayerMetric> {
    let transferred = blobs.iter().map(|blob| pb::LayerMetric {
        digest: blob.digest.clone(),
        bytes: blob.bytes,
        seconds: blob.seconds,
        outcome: pb::LayerOutcome::Transferred as i32,
    });
    let layer_sizes: HashMap<&str, u64> = manifest
        .images
        .iter()
        .flat_map(|image| &image.layers)
        .map(|layer| (layer.digest.as_str(), layer.size))
        .collect();
    let found = skipped.iter().map(|digest| pb::LayerMetric {
        digest: digest.clone(),
        bytes: layer_sizes.get(digest.as_str()).copied().unwrap_or(0),
        seconds: 0.0,
        outcome: pb::LayerOutcome::Found as i32,
    });
    transferred.chain(found).collect()
}
