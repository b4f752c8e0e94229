//! BuildKit's restored cache export on the containerd image store: the blobs of the manifest's
//! build-cache images written into `dirs.cache()`: a layer the engine's content store holds left
//! to BuildKit to read there, a blob the restored images' layout or that store holds linked or
//! copied from there, the others downloaded and verified.

use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use proto::digest::DigestHasher;
use proto::names;
use proto::v1 as pb;

use crate::build_dirs::BuildDirs;
use crate::error::WorkerError;
use crate::layout;
use crate::load::{BlobOutcome, BlobReader, Copy};
use crate::save_source::HostBlobs;

/// Writes BuildKit's restored cache export (containerd image store) into `dirs.cache()`: no
/// layer the host's content store holds (BuildKit on the engine reads it there), each other
/// blob the restored images' layout or that store holds linked or copied from there, the others
/// downloaded,
/// several at once, each verified against its digest before it is renamed into place; then
/// its `index.json`. Returns the blobs downloaded.
pub(super) async fn restore_build_cache<R: BlobReader>(
    store: &R,
    manifest: &pb::Manifest,
    dirs: &BuildDirs,
    host: &HostBlobs,
    concurrency: usize,
) -> Result<Vec<BlobOutcome>, WorkerError> {
    let caches: Vec<&pb::Image> = manifest.images.iter().filter(|image| image.build_cache).collect();
    if caches.is_empty() {
        return Ok(Vec::new());
    }
    let (wanted, from_host) = blobs_to_download(&caches, dirs, host)?;
    host.copy_out(from_host).await.map_err(WorkerError::Host)?;
    let downloads = wanted.into_iter().map(|(digest, size)| download(store, dirs, digest, size));
    let outcomes: Vec<_> = futures::stream::iter(downloads).buffer_unordered(concurrency.max(1)).try_collect().await?;
    std::fs::write(dirs.cache().join("oci-layout"), crate::oci::OCI_LAYOUT).map_err(host_io)?;
    std::fs::write(dirs.cache().join("index.json"), crate::oci::index_json(&caches)).map_err(host_io)?;
    Ok(outcomes)
}

/// The caches' blobs neither in the cache folder already, nor held by the host (a layer) or
/// linked there from the restored images' layout, each once; and the other blobs the host
/// holds, with their files in the cache folder.
#[allow(clippy::type_complexity)]
fn blobs_to_download(
    caches: &[&pb::Image],
    dirs: &BuildDirs,
    host: &HostBlobs,
) -> Result<(Vec<(String, u64)>, Vec<(String, std::path::PathBuf)>), WorkerError> {
    let mut wanted: Vec<(String, u64)> = Vec::new();
    let mut from_host = Vec::new();
    let layers: std::collections::HashSet<&str> =
        caches.iter().flat_map(|image| &image.layers).map(|layer| layer.digest.as_str()).collect();
    for (digest, size) in caches.iter().flat_map(|image| crate::oci::image_blobs(image)) {
        names::validate_digest(&digest)?;
        let (restored, cached) =
            (layout::blob_file(&dirs.images(), &digest), layout::blob_file(&dirs.cache(), &digest));
        if cached.exists() || std::fs::hard_link(&restored, &cached).is_ok() {
            continue;
        }
        if host.holds(&digest) {
            if !layers.contains(digest.as_str()) && !from_host.iter().any(|(known, _)| *known == digest) {
                from_host.push((digest, cached));
            }
            continue;
        }
        if !wanted.iter().any(|(known, _)| *known == digest) {
            wanted.push((digest, size));
        }
    }
    Ok((wanted, from_host))
}

/// Downloads one blob into the cache folder, renamed into place once verified.
async fn download<R: BlobReader>(
    store: &R,
    dirs: &BuildDirs,
    digest: String,
    size: u64,
) -> Result<BlobOutcome, WorkerError> {
    let started = Instant::now();
    let mut copy = Copy::create(&layout::blob_file(&dirs.cache(), &digest)).await.map_err(WorkerError::Host)?;
    let mut body = store.download(&digest).await?;
    let mut hasher = DigestHasher::new();
    while let Some(chunk) = body.try_next().await? {
        hasher.update(&chunk);
        copy.write(std::slice::from_ref(&chunk)).await.map_err(WorkerError::Host)?;
    }
    let bytes = hasher.size();
    let actual = hasher.finish();
    if actual != digest || bytes != size {
        return Err(WorkerError::Restore(format!(
            "blob {digest} of the build cache failed verification: its stored content hashes to {actual} ({bytes} bytes, {size} expected)"
        )));
    }
    copy.finish().await.map_err(WorkerError::Host)?;
    Ok(BlobOutcome { digest, bytes, seconds: started.elapsed().as_secs_f64() })
}

pub(super) fn host_io(error: std::io::Error) -> WorkerError {
    WorkerError::Host(format!("writing the restored layout failed: {error}"))
}
