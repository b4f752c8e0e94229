//! `cache-worker restore`: looks the cache key up, streams the manifest's blobs into
//! `docker load` (verified on the way), brings back every tag, and says which `--cache-from`
//! flags the next build should use.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use proto::format::format_bytes;
use proto::names;
use proto::v1 as pb;

use crate::build_dirs::{BuildDirs, RestoreRecord};
use crate::coordinator::Coordinator;
use crate::docker::Engine;
use crate::error::WorkerError;
use crate::load::{Copy, LoadReport, load_stream, plan_load, plan_oci_load};
use crate::progress::{Progress, rate};
use crate::transfer::BlobStore;

pub struct RestoreOptions {
    pub service: String,
    pub branch: String,
    /// Branches tried, in order, when `branch` has no cache.
    pub fallback_branches: Vec<String>,
    /// `--build-cache-dir` (see [`BuildDirs`]).
    pub build_cache_dir: PathBuf,
}

/// What a restore did.
#[derive(Debug, PartialEq, Eq)]
pub enum Restored {
    /// Nothing cached under the key or its fallbacks (or nothing this engine can load).
    Miss,
    /// The images are in the engine; the build command should carry these flags.
    Hit { flags: Vec<String> },
}

/// The flags as one piece of a build command line.
pub fn build_flags(flags: &[String]) -> String {
    flags.join(" ")
}

/// Graph-driver engines: `--cache-from IMAGE` for every tag of the chain and every untagged
/// image no other image of it grew from (the classic builder's other stages; an untagged
/// chain is named by its last image).
fn cache_from_images(manifest: &pb::Manifest) -> Vec<String> {
    let parents: HashSet<&str> = manifest.images.iter().map(|image| image.parent_id.as_str()).collect();
    manifest
        .images
        .iter()
        .flat_map(|image| {
            if !image.repo_tags.is_empty() {
                image.repo_tags.clone()
            } else if !parents.contains(image.id.as_str()) {
                vec![image.id.clone()]
            } else {
                Vec::new()
            }
        })
        .map(|image| format!("--cache-from {image}"))
        .collect()
}

/// The untagged images no other image of the manifest grew from: build stages.
fn stage_leaves(manifest: &pb::Manifest) -> HashSet<String> {
    let parents: HashSet<&str> = manifest.images.iter().map(|image| image.parent_id.as_str()).collect();
    manifest
        .images
        .iter()
        .filter(|image| image.repo_tags.is_empty() && !image.build_cache && !parents.contains(image.id.as_str()))
        .map(|image| image.id.clone())
        .collect()
}

/// The containerd image store with BuildKit: each restored image's inline cache read from the
/// restored layout, or the restored `mode=max` cache, and the build's own cache written for the
/// next save. Only when the saved images say BuildKit built them: the classic builder refuses
/// `--cache-to` (`unknown flag`), and on a miss nothing says which builder runs.
///
/// The `mode=max` cache holds everything the images' inline cache does, and BuildKit reads
/// overlapping sources unreliably (measured on 28.5: a step whose parent matched in the inline
/// source, which keeps no result for a stage's inner steps, missed in about half the builds on
/// a busy host), so when there is one it is the only source.
fn buildkit_local_flags(manifest: &pb::Manifest, dirs: &BuildDirs) -> Vec<String> {
    let images = manifest.images.as_slice();
    let mut flags = Vec::new();
    if let Some(cache) = images.iter().find(|image| image.build_cache) {
        flags.push(format!("--cache-from type=local,src={},digest={}", dirs.cache().display(), cache.id));
    } else {
        for image in images.iter().filter(|image| image.inline_cache) {
            flags.push(format!("--cache-from type=local,src={},digest={}", dirs.images().display(), image.id));
        }
    }
    flags.push(format!("--cache-to type=local,dest={},mode=max", dirs.export().display()));
    flags
}

/// Whether a manifest was saved from the containerd image store (its images are OCI blobs).
fn saved_as_oci(manifest: &pb::Manifest) -> bool {
    manifest.images.iter().any(|image| !image.oci_media_type.is_empty())
}

/// Restores the cache. `say` prints progress lines (stdout, or stderr when stdout is for the
/// flags alone).
/// Tells the coordinator a blob came back missing or corrupt; what it did, for the restore's
/// one warning line. A cache never breaks a build: a failed report is said, not raised.
async fn report_bad_blob(coordinator: &mut Coordinator, digest: &str) -> String {
    let request = pb::ReportBadBlobRequest { digest: digest.to_owned() };
    match coordinator.client.report_bad_blob(request).await {
        Ok(answer) if answer.get_ref().dropped => format!(
            "the coordinator found it lost in the store and dropped it with the {} cache(s) naming it: the next save uploads it again",
            answer.get_ref().caches_removed
        ),
        Ok(_) => "the coordinator found it intact in the store".to_owned(),
        Err(status) => format!("telling the coordinator failed: {}", status.message()),
    }
}

pub async fn restore(
    coordinator: &mut Coordinator,
    engine: &Engine,
    options: &RestoreOptions,
    say: &dyn Fn(&str),
) -> Result<Restored, WorkerError> {
    names::validate_service_name(&options.service)?;
    names::validate_branch_name(&options.branch)?;
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
    } else {
        dirs.forget_record();
    }
    let key = pb::CacheKey { service: options.service.clone(), branch: options.branch.clone() };
    let fallbacks = options
        .fallback_branches
        .iter()
        .map(|branch| pb::CacheKey { service: options.service.clone(), branch: branch.clone() })
        .collect();
    let lookup = pb::LookupRequest { key: Some(key), fallbacks };
    let found = coordinator.client.lookup(lookup).await.map_err(|s| coordinator.failed(s))?.into_inner();
    // The plan's lease goes back to the coordinator's budget with the report, also with the
    // report of a restore that fails from here on (`report_failure`).
    let lease_id = found.plan.as_ref().map(|plan| plan.lease_id.clone()).unwrap_or_default();
    coordinator.lease_id = lease_id.clone();
    let report = |outcome: pb::RestoreOutcome, layers: Vec<pb::LayerMetric>, seconds: f64| pb::ReportMetricsRequest {
        service: options.service.clone(),
        operation: pb::Operation::Restore as i32,
        layers,
        total_seconds: seconds,
        restore_outcome: outcome as i32,
        lease_id: lease_id.clone(),
        ..Default::default()
    };
    let (true, Some(manifest)) = (found.found, found.manifest) else {
        say(&format!("no cached image for {}", options.service));
        coordinator.report_metrics(report(pb::RestoreOutcome::Miss, Vec::new(), started.elapsed().as_secs_f64())).await;
        return Ok(Restored::Miss);
    };
    if oci != saved_as_oci(&manifest) {
        // The two stores keep different blobs (compressed or not) under different image IDs.
        let (saved, here) = if oci {
            ("a graph-driver engine", "the containerd image store")
        } else {
            ("the containerd image store", "a graph driver")
        };
        eprintln!(
            "cache-worker: warning: the cache of {} was saved from {saved} and this engine uses {here}: nothing restored; the next save replaces it",
            options.service
        );
        coordinator.report_metrics(report(pb::RestoreOutcome::Miss, Vec::new(), started.elapsed().as_secs_f64())).await;
        return Ok(Restored::Miss);
    }

    let request = pb::GetCredentialsRequest { access: pb::Access::Read as i32, ..Default::default() };
    let credentials =
        coordinator.client.get_credentials(request).await.map_err(|s| coordinator.failed(s))?.into_inner();
    let credentials = credentials.credentials.unwrap_or_default();
    let plan = found.plan.unwrap_or_default();
    let store = BlobStore::new(&credentials, &plan, Some(coordinator.client.clone()), coordinator.stall_timeout);
    let load_report = Arc::new(LoadReport::default());
    // The containerd store loads an OCI layout, each blob also written into the layout BuildKit
    // reads; a graph driver loads `manifest.json`'s chains, without the layers the host holds.
    let load_plan = if oci {
        plan_oci_load(&manifest, &dirs.images())
    } else {
        plan_load(&manifest, &engine.layer_chains().await?)
    };
    let to_download: u64 = load_plan.blobs.iter().filter(|blob| !blob.skipped).map(|blob| blob.size).sum();
    let trailer = load_plan.trailer.clone();
    let bar = Progress::for_stderr().bar(&format!("restore {}", options.service), to_download);
    let tarball = load_stream(store.clone(), load_plan, plan.max_concurrency as usize, load_report.clone(), bar);
    let loaded = engine.load(tarball).await;
    // A verification failure is the cause of the engine's error: name the blob, and tell the
    // coordinator, which checks the store and drops a lost blob so the next save uploads it.
    let failure = load_report.failure.lock().expect("report lock").clone();
    if let Some(failure) = failure {
        let reported = match &failure {
            crate::load::LoadFailure::DigestMismatch { digest, .. } | crate::load::LoadFailure::Missing { digest } => {
                format!("; {}", report_bad_blob(coordinator, digest).await)
            }
            crate::load::LoadFailure::Transfer(_) => String::new(),
        };
        return Err(WorkerError::Restore(format!("{failure}; the engine loaded nothing{reported}")));
    }
    loaded?;
    if oci {
        for (name, bytes) in &trailer {
            std::fs::write(dirs.images().join(name), bytes).map_err(host_io)?;
        }
        let cache_blobs = restore_build_cache(&store, &manifest, &dirs, plan.max_concurrency as usize).await?;
        load_report.blobs.lock().expect("report lock").extend(cache_blobs);
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
    let blobs = load_report.blobs.lock().expect("report lock").clone();
    let skipped = load_report.skipped.lock().expect("report lock").clone();
    let bytes: u64 = blobs.iter().map(|blob| blob.bytes).sum();
    let mut layers: Vec<pb::LayerMetric> = blobs
        .iter()
        .map(|blob| pb::LayerMetric {
            digest: blob.digest.clone(),
            bytes: blob.bytes,
            seconds: blob.seconds,
            outcome: pb::LayerOutcome::Transferred as i32,
        })
        .collect();
    let layer_sizes: std::collections::HashMap<&str, u64> = manifest
        .images
        .iter()
        .flat_map(|image| &image.layers)
        .map(|layer| (layer.digest.as_str(), layer.size))
        .collect();
    layers.extend(skipped.iter().map(|digest| pb::LayerMetric {
        digest: digest.clone(),
        bytes: layer_sizes.get(digest.as_str()).copied().unwrap_or(0),
        seconds: 0.0,
        outcome: pb::LayerOutcome::Found as i32,
    }));
    let seconds = started.elapsed().as_secs_f64();
    coordinator.report_metrics(report(pb::RestoreOutcome::Hit, layers, seconds)).await;
    let record = RestoreRecord {
        images: manifest.images.iter().map(|image| image.id.clone()).collect(),
        stages: stage_leaves(&manifest),
    };
    if let Err(error) = dirs.write_record(&record) {
        // A save then takes every build stage it finds: more stored, nothing lost.
        eprintln!(
            "cache-worker: warning: cannot write what was restored under {}: {error}",
            options.build_cache_dir.display()
        );
    }
    let classic = manifest.images.iter().any(|image| image.builder() == pb::Builder::Classic);
    let flags = if !oci {
        cache_from_images(&manifest)
    } else if classic {
        // Measured on 26.1 and 28.5: the classic builder there fails inside the engine when it
        // reuses a step without a layer (`ENV`), so it gets no flags and builds uncached.
        say(&format!(
            "{} was built by the classic builder, which cannot reuse a restored cache on the containerd image store: the build runs uncached; BuildKit (docker build without DOCKER_BUILDKIT=0) can reuse it",
            options.service
        ));
        Vec::new()
    } else if manifest.images.iter().any(|image| image.builder() == pb::Builder::Buildkit) {
        buildkit_local_flags(&manifest, &dirs)
    } else {
        Vec::new()
    };
    say(&format!(
        "restored {}: {} images, {} blobs downloaded ({}), {} layers already on this host, in {:.1} s, {}",
        options.service,
        manifest.images.len(),
        blobs.len(),
        format_bytes(bytes),
        skipped.len(),
        seconds,
        rate(bytes, seconds)
    ));
    if !flags.is_empty() {
        say(&format!("add to docker build: {}", build_flags(&flags)));
    }
    Ok(Restored::Hit { flags })
}

/// Writes BuildKit's restored cache export (containerd image store) into `dirs.cache()`: each
/// blob the restored images' layout already holds linked from there, the others downloaded,
/// several at once, each verified against its digest before it is renamed into place; then
/// its `index.json`. Returns the blobs downloaded.
async fn restore_build_cache(
    store: &BlobStore,
    manifest: &pb::Manifest,
    dirs: &BuildDirs,
    concurrency: usize,
) -> Result<Vec<crate::load::BlobOutcome>, WorkerError> {
    let caches: Vec<&pb::Image> = manifest.images.iter().filter(|image| image.build_cache).collect();
    if caches.is_empty() {
        return Ok(Vec::new());
    }
    let mut wanted: Vec<(String, u64)> = Vec::new();
    for (digest, size) in caches.iter().flat_map(|image| crate::oci::image_blobs(image)) {
        names::validate_digest(&digest)?;
        let hex = digest.trim_start_matches("sha256:");
        let (restored, cached) =
            (dirs.images().join("blobs/sha256").join(hex), dirs.cache().join("blobs/sha256").join(hex));
        if cached.exists() || std::fs::hard_link(&restored, &cached).is_ok() {
            continue;
        }
        if !wanted.iter().any(|(known, _)| *known == digest) {
            wanted.push((digest, size));
        }
    }
    let downloads = wanted.into_iter().map(|(digest, size)| async move {
        let started = Instant::now();
        let path = dirs.cache().join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        let mut copy = Copy::create(&path).await.map_err(WorkerError::Host)?;
        let mut body = std::pin::pin!(store.download(&digest).await?);
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = body.try_next().await? {
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            copy.write(&chunk).await.map_err(WorkerError::Host)?;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest || bytes != size {
            return Err(WorkerError::Restore(format!(
                "blob {digest} of the build cache failed verification: its stored content hashes to {actual} ({bytes} bytes, {size} expected)"
            )));
        }
        copy.finish().await.map_err(WorkerError::Host)?;
        Ok::<_, WorkerError>(crate::load::BlobOutcome { digest, bytes, seconds: started.elapsed().as_secs_f64() })
    });
    let outcomes: Vec<_> = futures::stream::iter(downloads).buffer_unordered(concurrency.max(1)).try_collect().await?;
    std::fs::write(dirs.cache().join("oci-layout"), crate::oci::OCI_LAYOUT).map_err(host_io)?;
    std::fs::write(dirs.cache().join("index.json"), crate::oci::index_json(&caches)).map_err(host_io)?;
    Ok(outcomes)
}

fn host_io(error: std::io::Error) -> WorkerError {
    WorkerError::Host(format!("writing the restored layout failed: {error}"))
}

/// Reports a failed restore to the coordinator, best effort.
pub async fn report_failure(coordinator: &mut Coordinator, service: &str) {
    let report = pb::ReportMetricsRequest {
        service: service.to_owned(),
        operation: pb::Operation::Restore as i32,
        restore_outcome: pb::RestoreOutcome::Error as i32,
        lease_id: std::mem::take(&mut coordinator.lease_id),
        ..Default::default()
    };
    coordinator.report_metrics(report).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tag_of_the_chain_becomes_a_cache_from_flag() {
        let manifest = pb::Manifest {
            images: vec![
                pb::Image { id: "sha256:1".into(), repo_tags: vec!["base:1".into()], ..Default::default() },
                pb::Image { id: "sha256:2".into(), parent_id: "sha256:1".into(), ..Default::default() },
                pb::Image {
                    id: "sha256:3".into(),
                    parent_id: "sha256:2".into(),
                    repo_tags: vec!["app:latest".into()],
                    ..Default::default()
                },
                // A build stage: untagged, no image grew from it.
                pb::Image { id: "sha256:4".into(), parent_id: "sha256:1".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        assert_eq!(
            build_flags(&cache_from_images(&manifest)),
            "--cache-from base:1 --cache-from app:latest --cache-from sha256:4"
        );
        assert_eq!(stage_leaves(&manifest), HashSet::from(["sha256:4".to_string()]));
        let untagged = pb::Manifest { images: vec![manifest.images[1].clone()], ..Default::default() };
        assert_eq!(cache_from_images(&untagged), vec!["--cache-from sha256:2".to_string()]);
    }
}
