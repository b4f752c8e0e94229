//! The containerd image store's fast way in: a restore writes the layers itself into the
//! engine's content store folder (several at once, each verified before it is renamed into
//! place, read-only as containerd keeps its blobs) and records each in the engine's namespace
//! through containerd (a commit that sends no byte: containerd finds the blob in its folder),
//! under a lease that keeps them until the loaded images reference them. `docker load` then
//! reads a layout without them, as it does for the blobs the host held already, instead of
//! ingesting each layer, one at a time, from the stream. A layer that cannot be written or
//! recorded goes through the stream as before: never a failed restore for the fast way.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use proto::digest::{DigestHasher, digest_hex};

use crate::containerd::ContentClient;
use crate::load::{BlobOutcome, BlobReader, Copy, LoadFailure, LoadPlan, PlannedBlob, fetch_parts};
use crate::progress::Bar;
use crate::save_source::HostBlobs;
use crate::transfer::TransferError;

/// How long containerd keeps the restore's lease if this worker dies before deleting it.
const LEASE_LASTS: Duration = Duration::from_secs(3600);

/// Layers written at once (each fetched in parts, a share of the restore's concurrency).
const LAYERS_AT_ONCE: usize = 4;

/// Writes layers into the engine's content store under one lease, from [`Placer::begin`] to
/// [`Placer::end`].
pub(super) struct Placer {
    /// `…/io.containerd.content.v1.content/blobs/sha256`.
    blobs: PathBuf,
    /// Where a blob is written before it is verified: the content store's own folder, beside
    /// `blobs` (containerd reads neither its files nor its names).
    parts: PathBuf,
    client: ContentClient,
    lease: String,
}

impl Placer {
    /// Ready when this worker sees the engine's content store folder and reaches its
    /// containerd, which grants a lease; `None` otherwise (the restore streams every blob).
    pub(super) async fn begin(host: &HostBlobs) -> Option<Placer> {
        let (blobs, client) = host.writable()?;
        let parts = blobs.parent()?.parent()?.to_owned();
        // A fresh engine's store has no folders yet: made as containerd makes them.
        if let Err(error) = std::fs::DirBuilder::new().recursive(true).mode(0o755).create(&blobs) {
            tracing::debug!(%error, "no blob folder in the content store: every blob goes through docker load");
            return None;
        }
        let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let lease = format!("cache-worker-restore-{}-{}", std::process::id(), unique.as_nanos());
        if let Err(error) = client.create_lease(&lease, LEASE_LASTS).await {
            tracing::debug!(%error, "no lease from containerd: every blob goes through docker load");
            return None;
        }
        Some(Placer { blobs, parts, client, lease })
    }

    /// Writes the plan's layers (the blobs the BuildKit layout does not take) into the content
    /// store and takes those it recorded out of the plan; returns them. A blob that fails its
    /// digest, or that the store lost, fails the restore as the stream would.
    pub(super) async fn place<R: BlobReader>(
        &self,
        store: &R,
        plan: &mut LoadPlan,
        concurrency: usize,
        bar: &Bar,
    ) -> Result<Vec<BlobOutcome>, LoadFailure> {
        let layers: Vec<PlannedBlob> =
            plan.blobs.iter().filter(|blob| blob.copy_to.is_none() && !blob.skipped).cloned().collect();
        let at_once = LAYERS_AT_ONCE.min(layers.len()).max(1);
        let each = (concurrency / at_once).max(1);
        let placing = layers.into_iter().map(|blob| self.place_one(store, blob, each, bar));
        let mut placing = futures::stream::iter(placing).buffer_unordered(at_once);
        let mut placed = Vec::new();
        while let Some(outcome) = placing.next().await {
            if let Some(outcome) = outcome? {
                placed.push(outcome);
            }
        }
        plan.blobs.retain(|blob| !placed.iter().any(|outcome: &BlobOutcome| outcome.digest == blob.digest));
        Ok(placed)
    }

    /// One layer: downloaded in parts into its part file, hashed as it comes, renamed into the
    /// store once verified, then recorded. `None` when it is left to the stream.
    async fn place_one<R: BlobReader>(
        &self,
        store: &R,
        blob: PlannedBlob,
        concurrency: usize,
        bar: &Bar,
    ) -> Result<Option<BlobOutcome>, LoadFailure> {
        let started = Instant::now();
        let hex = digest_hex(&blob.stored_digest);
        let left = |why: String| {
            tracing::debug!(digest = %blob.digest, why, "the layer goes through docker load");
            Ok(None)
        };
        // The name becomes a path in the engine's data root: only a well-formed digest makes one.
        if let Err(error) = proto::names::validate_digest(&blob.stored_digest) {
            return left(error.to_string());
        }
        let part = self.parts.join(format!("cache-worker-{hex}.part"));
        let mut copy = match Copy::create_beside(&self.blobs.join(hex), part).await {
            Ok(copy) => copy,
            Err(why) => return left(why),
        };
        let mut parts = fetch_parts(store.clone(), std::slice::from_ref(&blob), concurrency);
        let mut hasher = DigestHasher::new();
        while hasher.size() < blob.size {
            let fetched = match parts.recv().await {
                Some(part) => part.await.ok(),
                None => None,
            };
            // A failure drops `copy`, which removes its part file.
            let pieces = match fetched {
                Some(Ok((pieces, _permit))) => pieces,
                Some(Err(TransferError::NotStored { digest })) => return Err(LoadFailure::Missing { digest }),
                Some(Err(error)) => return left(error.to_string()),
                None => return left("the download ended early".into()),
            };
            for piece in &pieces {
                hasher.update(piece);
                bar.add(piece.len() as u64);
            }
            if let Err(why) = copy.write(&pieces).await {
                return left(why);
            }
        }
        let bytes = hasher.size();
        let actual = hasher.finish();
        if actual != blob.stored_digest {
            return Err(LoadFailure::DigestMismatch { digest: blob.digest.clone(), actual });
        }
        if let Err(why) = copy.finish_read_only().await {
            return left(why);
        }
        // A blob left in the folder unrecorded is one the engine's import finds there, or one
        // containerd's collector removes.
        if let Err(error) = self.client.commit_in_place(&blob.stored_digest, blob.size, &self.lease).await {
            return left(error.to_string());
        }
        Ok(Some(BlobOutcome { digest: blob.digest, bytes, seconds: started.elapsed().as_secs_f64() }))
    }

    /// Ends the lease: the loaded images now keep what they reference (a failed load leaves
    /// the blobs to containerd's collector).
    pub(super) async fn end(self) {
        if let Err(error) = self.client.delete_lease(&self.lease).await {
            tracing::debug!(%error, lease = self.lease, "the lease is left to expire");
        }
    }
}
