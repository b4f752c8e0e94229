//! What a restore needs of the coordinator and of the engine, as two small traits with domain
//! outcomes; the real ones (`Coordinator`, `Engine`) implement them here, the tests' fakes in
//! `tests.rs`.

use std::collections::HashSet;

use bytes::Bytes;
use futures::Stream;
use proto::v1 as pb;

use crate::coordinator::Coordinator;
use crate::docker::{Engine, EngineError};
use crate::error::WorkerError;
use crate::load::BlobReader;
use crate::save_source::{EngineStores, HostBlobs};
use crate::transfer::BlobStore;

/// The transfer plan's lease a restore holds: given back with its metrics report, a failed
/// restore's included, so its share of the budget goes back at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lease(pub String);

/// What the coordinator found under a cache key or its fallbacks.
#[derive(Debug)]
pub enum Lookup {
    Miss(Lease),
    Hit { manifest: Box<pb::Manifest>, plan: pb::TransferPlan, lease: Lease },
}

/// What the coordinator did with a blob reported missing or corrupt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadBlob {
    /// Lost in the store: dropped, with the caches naming it.
    Dropped { caches_removed: u32 },
    /// Intact in the store.
    Intact,
    /// The report itself failed (the coordinator's message).
    NotTold(String),
}

impl BadBlob {
    /// What the coordinator did, for the restore's one warning line.
    pub fn said(&self) -> String {
        match self {
            BadBlob::Dropped { caches_removed } => format!(
                "the coordinator found it lost in the store and dropped it with the {caches_removed} cache(s) naming it: the next save uploads it again"
            ),
            BadBlob::Intact => "the coordinator found it intact in the store".to_owned(),
            BadBlob::NotTold(message) => format!("telling the coordinator failed: {message}"),
        }
    }
}

/// The coordinator, as a restore talks to it.
pub trait RestoreCoordinator {
    type Reader: BlobReader;

    /// Looks `request`'s key up, then its fallbacks.
    fn lookup(&mut self, request: pb::LookupRequest) -> impl Future<Output = Result<Lookup, WorkerError>>;

    /// A reader of the project's blobs under `plan`, with read credentials.
    fn blob_reader(&mut self, plan: &pb::TransferPlan) -> impl Future<Output = Result<Self::Reader, WorkerError>>;

    /// Tells the coordinator a blob came back missing or corrupt.
    fn report_bad_blob(&mut self, digest: &str) -> impl Future<Output = BadBlob>;

    /// Sends a restore's figures, best effort: a cache never breaks a build.
    fn report_metrics(&mut self, report: pb::ReportMetricsRequest) -> impl Future<Output = ()>;

    /// Sends a failed restore's figures, best effort and briefly (see
    /// [`crate::transfer::AFTER_FAILURE`]): the coordinator may be what failed.
    fn report_failure_metrics(&mut self, report: pb::ReportMetricsRequest) -> impl Future<Output = ()>;
}

impl RestoreCoordinator for Coordinator {
    type Reader = BlobStore;

    async fn lookup(&mut self, request: pb::LookupRequest) -> Result<Lookup, WorkerError> {
        let found = self.client.lookup(request).await.map_err(|status| self.failed(status))?.into_inner();
        let plan = found.plan.unwrap_or_default();
        let lease = Lease(plan.lease_id.clone());
        Ok(match (found.found, found.manifest) {
            (true, Some(manifest)) => Lookup::Hit { manifest: Box::new(manifest), plan, lease },
            _ => Lookup::Miss(lease),
        })
    }

    async fn blob_reader(&mut self, plan: &pb::TransferPlan) -> Result<BlobStore, WorkerError> {
        let request = pb::GetCredentialsRequest { access: pb::Access::Read as i32, ..Default::default() };
        let answer = self.client.get_credentials(request).await.map_err(|status| self.failed(status))?.into_inner();
        let credentials = answer.credentials.unwrap_or_default();
        Ok(BlobStore::new(&credentials, plan, Some(self.client.clone()), self.stall_timeout))
    }

    async fn report_bad_blob(&mut self, digest: &str) -> BadBlob {
        let request = pb::ReportBadBlobRequest { digest: digest.to_owned() };
        match self.client.report_bad_blob(request).await {
            Ok(answer) if answer.get_ref().dropped => {
                BadBlob::Dropped { caches_removed: answer.get_ref().caches_removed }
            }
            Ok(_) => BadBlob::Intact,
            Err(status) => BadBlob::NotTold(status.message().to_owned()),
        }
    }

    async fn report_metrics(&mut self, report: pb::ReportMetricsRequest) {
        Coordinator::report_metrics(self, report).await
    }

    async fn report_failure_metrics(&mut self, report: pb::ReportMetricsRequest) {
        Coordinator::report_failure_metrics(self, report).await
    }
}

/// The engine, as a restore loads images into it.
pub trait ImageLoader {
    /// Whether the engine keeps images in the containerd image store (OCI blobs).
    fn uses_containerd_store(&self) -> impl Future<Output = Result<bool, EngineError>>;

    /// The blobs the engine's content store holds, as this worker sees them (`stores`: where,
    /// when `--engine-root` says; none on a graph driver, or where the store is not visible).
    fn host_blobs(&self, stores: &EngineStores) -> impl Future<Output = Result<HostBlobs, EngineError>>;

    /// Every image the engine lists, by ID.
    fn image_ids(&self) -> impl Future<Output = Result<HashSet<String>, EngineError>>;

    /// Every layer chain the engine holds, as diff IDs from the bottom.
    fn layer_chains(&self) -> impl Future<Output = Result<HashSet<Vec<String>>, EngineError>>;

    /// `docker load` of a tarball stream.
    fn load<S>(&self, tarball: S) -> impl Future<Output = Result<(), EngineError>>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static;

    /// The ID `reference` names, if the engine has it.
    fn image_id(&self, reference: &str) -> impl Future<Output = Result<Option<String>, EngineError>>;

    /// Tags `image_id` as `repo_tag`.
    fn tag(&self, image_id: &str, repo_tag: &str) -> impl Future<Output = Result<(), EngineError>>;
}

impl ImageLoader for Engine {
    async fn uses_containerd_store(&self) -> Result<bool, EngineError> {
        Engine::uses_containerd_store(self).await
    }

    async fn host_blobs(&self, stores: &EngineStores) -> Result<HostBlobs, EngineError> {
        Ok(HostBlobs::find(&self.storage().await?, stores).await)
    }

    async fn image_ids(&self) -> Result<HashSet<String>, EngineError> {
        Engine::image_ids(self).await
    }

    async fn layer_chains(&self) -> Result<HashSet<Vec<String>>, EngineError> {
        Engine::layer_chains(self).await
    }

    async fn load<S>(&self, tarball: S) -> Result<(), EngineError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        Engine::load(self, tarball).await
    }

    async fn image_id(&self, reference: &str) -> Result<Option<String>, EngineError> {
        Engine::image_id(self, reference).await
    }

    async fn tag(&self, image_id: &str, repo_tag: &str) -> Result<(), EngineError> {
        Engine::tag(self, image_id, repo_tag).await
    }
}
