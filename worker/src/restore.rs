//! `cache-worker restore`: looks the cache key up, streams the manifest's blobs into
//! `docker load` (verified on the way), brings back every tag, and says which `--cache-from`
//! flags the next build should use.

use std::sync::Arc;
use std::time::Instant;

use proto::format::format_bytes;
use proto::names;
use proto::v1 as pb;

use crate::coordinator::Coordinator;
use crate::docker::Engine;
use crate::error::WorkerError;
use crate::load::{LoadReport, load_stream, plan_load};
use crate::progress::{Progress, rate};
use crate::transfer::BlobStore;

pub struct RestoreOptions {
    pub service: String,
    pub branch: String,
    /// Branches tried, in order, when `branch` has no cache.
    pub fallback_branches: Vec<String>,
}

/// What a restore did.
#[derive(Debug, PartialEq, Eq)]
pub enum Restored {
    /// Nothing cached under the key or its fallbacks.
    Miss,
    /// The images are in the engine; the build should name these with `--cache-from`.
    Hit { cache_from: Vec<String> },
}

/// `--cache-from IMAGE ...` for a build command.
pub fn cache_from_flags(images: &[String]) -> String {
    images.iter().map(|image| format!("--cache-from {image}")).collect::<Vec<_>>().join(" ")
}

/// What a build should name with `--cache-from`: every tag of the chain (an untagged chain is
/// named by its last image's ID).
fn cache_from_images(manifest: &pb::Manifest) -> Vec<String> {
    let tags: Vec<String> = manifest.images.iter().flat_map(|image| image.repo_tags.iter().cloned()).collect();
    if tags.is_empty() { manifest.images.last().map(|image| vec![image.id.clone()]).unwrap_or_default() } else { tags }
}

/// Restores the cache. `say` prints progress lines (stdout, or stderr when stdout is for the
/// flags alone).
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
    if engine.uses_containerd_store().await? {
        // Measured on Engine 26.1 (README): there a classic build with `--cache-from` reuses a
        // few steps and then fails inside the engine, and BuildKit looks for the inline cache in
        // a registry. A cache never breaks a build: restore nothing.
        eprintln!(
            "cache-worker: warning: this engine uses the containerd image store, where builds cannot reuse restored images yet: nothing restored for {}",
            options.service
        );
        return Ok(Restored::Miss);
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
    };
    let (true, Some(manifest)) = (found.found, found.manifest) else {
        say(&format!("no cached image for {}", options.service));
        coordinator.report_metrics(report(pb::RestoreOutcome::Miss, Vec::new(), started.elapsed().as_secs_f64())).await;
        return Ok(Restored::Miss);
    };

    let request = pb::GetCredentialsRequest { access: pb::Access::Read as i32, ..Default::default() };
    let credentials =
        coordinator.client.get_credentials(request).await.map_err(|s| coordinator.failed(s))?.into_inner();
    let credentials = credentials.credentials.unwrap_or_default();
    let plan = found.plan.unwrap_or_default();
    let store = BlobStore::new(&credentials, &plan, Some(coordinator.client.clone()), coordinator.stall_timeout);
    let load_plan = plan_load(&manifest, &engine.layer_chains().await?);
    let load_report = Arc::new(LoadReport::default());
    let to_download: u64 = load_plan.blobs.iter().filter(|blob| !blob.skipped).map(|blob| blob.size).sum();
    let bar = Progress::for_stderr().bar(&format!("restore {}", options.service), to_download);
    let tarball = load_stream(store, load_plan, plan.max_concurrency as usize, load_report.clone(), bar);
    let loaded = engine.load(tarball).await;
    // A verification failure is the cause of the engine's error: name the blob.
    if let Some(failure) = load_report.failure.lock().expect("report lock").clone() {
        return Err(WorkerError::Restore(format!("{failure}; the engine loaded nothing")));
    }
    loaded?;

    // The load restores tags from manifest.json; make sure each one points where it should.
    for image in &manifest.images {
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
    let cache_from = cache_from_images(&manifest);
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
    say(&format!("add to docker build: {}", cache_from_flags(&cache_from)));
    Ok(Restored::Hit { cache_from })
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
                pb::Image { id: "sha256:2".into(), ..Default::default() },
                pb::Image { id: "sha256:3".into(), repo_tags: vec!["app:latest".into()], ..Default::default() },
            ],
            ..Default::default()
        };
        assert_eq!(cache_from_flags(&cache_from_images(&manifest)), "--cache-from base:1 --cache-from app:latest");
        let untagged = pb::Manifest { images: vec![manifest.images[1].clone()], ..Default::default() };
        assert_eq!(cache_from_images(&untagged), vec!["sha256:2".to_string()]);
    }
}
