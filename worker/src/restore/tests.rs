//! Unit tests of the restore against fakes of the coordinator, the store and the engine: the
//! real tarball goes through, the fake engine reads its `manifest.json`.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use proto::client::ClientError;
use proto::digest::sha256_digest;
use proto::v1 as pb;

use super::seams::{BadBlob, ImageLoader, Lease, Lookup, RestoreCoordinator};
use super::*;
use crate::docker::EngineError;
use crate::load::{BlobBody, BlobReader};
use crate::transfer::TransferError;

/// The store: blobs by digest, read in parts of 4 bytes.
#[derive(Clone, Default)]
struct FakeStore(Arc<HashMap<String, Bytes>>);

impl BlobReader for FakeStore {
    fn part_size_for(&self, _size: u64) -> u64 {
        4
    }

    async fn download_range(&self, digest: &str, offset: u64, length: u64) -> Result<Bytes, TransferError> {
        let blob = self.0.get(digest).ok_or_else(|| TransferError::NotStored { digest: digest.to_owned() })?;
        Ok(blob.slice(offset as usize..(offset + length) as usize))
    }

    async fn download(&self, digest: &str) -> Result<BlobBody, TransferError> {
        let blob = self.0.get(digest).cloned().ok_or_else(|| TransferError::NotStored { digest: digest.to_owned() })?;
        Ok(futures::stream::iter([Ok(blob)]).boxed())
    }
}

enum Answer {
    Hit(Box<pb::Manifest>),
    Miss,
    Unreachable,
}

/// The coordinator: one answer to the lookup, lease `lease-1`; what it was told, recorded.
struct FakeCoordinator {
    answer: Answer,
    store: FakeStore,
    bad_blobs: Vec<String>,
    reports: Vec<pb::ReportMetricsRequest>,
}

impl FakeCoordinator {
    fn new(answer: Answer, store: FakeStore) -> FakeCoordinator {
        FakeCoordinator { answer, store, bad_blobs: Vec::new(), reports: Vec::new() }
    }

    fn outcomes(&self) -> Vec<(pb::RestoreOutcome, String)> {
        self.reports.iter().map(|report| (report.restore_outcome(), report.lease_id.clone())).collect()
    }
}

impl RestoreCoordinator for FakeCoordinator {
    type Reader = FakeStore;

    async fn lookup(&mut self, _request: pb::LookupRequest) -> Result<Lookup, WorkerError> {
        let lease = Lease("lease-1".into());
        match &self.answer {
            Answer::Hit(manifest) => {
                let plan = pb::TransferPlan { max_concurrency: 2, lease_id: lease.0.clone(), ..Default::default() };
                Ok(Lookup::Hit { manifest: manifest.clone(), plan, lease })
            }
            Answer::Miss => Ok(Lookup::Miss(lease)),
            Answer::Unreachable => Err(WorkerError::Coordinator(ClientError::Unreachable {
                url: "http://coordinator".into(),
                reason: "connection refused".into(),
            })),
        }
    }

    async fn blob_reader(&mut self, _plan: &pb::TransferPlan) -> Result<FakeStore, WorkerError> {
        Ok(self.store.clone())
    }

    async fn report_bad_blob(&mut self, digest: &str) -> BadBlob {
        self.bad_blobs.push(digest.to_owned());
        BadBlob::Dropped { caches_removed: 1 }
    }

    async fn report_metrics(&mut self, report: pb::ReportMetricsRequest) {
        self.reports.push(report);
    }

    async fn report_failure_metrics(&mut self, report: pb::ReportMetricsRequest) {
        self.reports.push(report);
    }
}

/// A graph-driver engine: loads a tarball by its `manifest.json` (images and tags), or
/// refuses every load.
#[derive(Default)]
struct FakeEngine {
    refuses: bool,
    /// Keeps the containerd image store.
    containerd: bool,
    chains: HashSet<Vec<String>>,
    /// Its content store.
    host: crate::save_source::HostBlobs,
    /// References (IDs and tags) to image IDs.
    images: Mutex<HashMap<String, String>>,
}

impl ImageLoader for FakeEngine {
    async fn uses_containerd_store(&self) -> Result<bool, EngineError> {
        Ok(self.containerd)
    }

    async fn host_blobs(
        &self,
        _stores: &crate::save_source::EngineStores,
    ) -> Result<crate::save_source::HostBlobs, EngineError> {
        Ok(self.host.clone())
    }

    async fn image_ids(&self) -> Result<HashSet<String>, EngineError> {
        Ok(self.images.lock().unwrap().values().cloned().collect())
    }

    async fn layer_chains(&self) -> Result<HashSet<Vec<String>>, EngineError> {
        Ok(self.chains.clone())
    }

    async fn load<S>(&self, tarball: S) -> Result<(), EngineError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let failed = |reason: String| EngineError::Failed { action: "load the restored images", reason };
        if self.refuses {
            return Err(failed("no space left on device".into()));
        }
        let mut bytes = Vec::new();
        let mut tarball = std::pin::pin!(tarball);
        while let Some(piece) = tarball.next().await {
            bytes.extend_from_slice(&piece.map_err(|error| failed(error.to_string()))?);
        }
        // As the graph driver does: the whole tarball unpacked first, then the entries of
        // `manifest.json` in order, each entry's layers checked against their diff IDs (named
        // by their paths) before its image is committed.
        let mut files = HashMap::new();
        let mut archive = tar::Archive::new(bytes.as_slice());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            files.insert(path, content);
        }
        let entries: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        for entry in entries.as_array().unwrap() {
            for (layer_idx, path) in entry["Layers"].as_array().unwrap().iter().enumerate() {
                let path = path.as_str().unwrap();
                let expected = format!("sha256:{}", path.trim_end_matches("/layer.tar"));
                // An empty entry is a layer whose chain the host holds: not read.
                let content = &files[path];
                if !content.is_empty() && sha256_digest(content) != expected {
                    return Err(failed(format!("invalid diffID for layer {layer_idx}")));
                }
            }
            self.commit(entry);
        }
        Ok(())
    }

    async fn image_id(&self, reference: &str) -> Result<Option<String>, EngineError> {
        Ok(self.images.lock().unwrap().get(reference).cloned())
    }

    async fn tag(&self, image_id: &str, repo_tag: &str) -> Result<(), EngineError> {
        self.images.lock().unwrap().insert(repo_tag.to_owned(), image_id.to_owned());
        Ok(())
    }
}

impl FakeEngine {
    /// Commits the image of one entry of `manifest.json`, with its tags.
    fn commit(&self, entry: &serde_json::Value) {
        let mut images = self.images.lock().unwrap();
        let id = format!("sha256:{}", entry["Config"].as_str().unwrap().trim_end_matches(".json"));
        images.insert(id.clone(), id.clone());
        for tag in entry["RepoTags"].as_array().into_iter().flatten() {
            images.insert(tag.as_str().unwrap().to_owned(), id.clone());
        }
    }

    fn loaded(&self) -> usize {
        self.images.lock().unwrap().len()
    }
}

/// Two images, `base:1` and `app:1` grown from it, with the store holding their blobs.
fn cached() -> (pb::Manifest, HashMap<String, Bytes>) {
    let mut blobs = HashMap::new();
    let mut add = |bytes: &[u8]| {
        let digest = sha256_digest(bytes);
        blobs.insert(digest.clone(), Bytes::copy_from_slice(bytes));
        (digest, bytes.len() as u64)
    };
    let (base_layer, base_layer_size) = add(b"the base image's layer");
    let (app_layer, app_layer_size) = add(b"the app's layer, a little longer");
    let (base_id, base_config_size) = add(br#"{"config":"base"}"#);
    let (app_id, app_config_size) = add(br#"{"config":"app"}"#);
    let layer = |digest: &String, size| pb::Layer { digest: digest.clone(), size, ..Default::default() };
    let manifest = pb::Manifest {
        images: vec![
            pb::Image {
                id: base_id.clone(),
                repo_tags: vec!["base:1".into()],
                layers: vec![layer(&base_layer, base_layer_size)],
                config_size: base_config_size,
                ..Default::default()
            },
            pb::Image {
                id: app_id,
                parent_id: base_id,
                repo_tags: vec!["app:1".into()],
                layers: vec![layer(&base_layer, base_layer_size), layer(&app_layer, app_layer_size)],
                config_size: app_config_size,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    (manifest, blobs)
}

fn options(dir: &tempfile::TempDir) -> RestoreOptions {
    RestoreOptions {
        service: "shop".into(),
        branch: "main".into(),
        fallback_branches: vec!["develop".into()],
        build_cache_dir: dir.path().to_owned(),
        owner: crate::build_dirs::owner_of("cct_shop_token"),
        job: crate::build_dirs::job_of(Some("job-1")),
        stores: crate::save_source::EngineStores::default(),
    }
}

async fn run(coordinator: &mut FakeCoordinator, engine: &FakeEngine) -> (Result<Restored, WorkerError>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let said = Mutex::new(Vec::new());
    let say = |line: &str| said.lock().unwrap().push(line.to_owned());
    let restored = restore(coordinator, engine, &options(&dir), &say).await;
    (restored, said.into_inner().unwrap())
}

#[tokio::test]
async fn every_blob_is_restored_tagged_and_reported_with_the_lease() {
    let (manifest, blobs) = cached();
    let mut coordinator = FakeCoordinator::new(Answer::Hit(Box::new(manifest.clone())), FakeStore(Arc::new(blobs)));
    let engine = FakeEngine::default();
    let (restored, said) = run(&mut coordinator, &engine).await;
    assert_eq!(
        restored.unwrap(),
        Restored::Hit { flags: vec!["--cache-from base:1".into(), "--cache-from app:1".into()] }
    );
    assert_eq!(engine.images.lock().unwrap().get("app:1"), Some(&manifest.images[1].id));
    assert_eq!(engine.loaded(), 4, "two IDs, two tags");
    assert_eq!(coordinator.outcomes(), vec![(pb::RestoreOutcome::Hit, "lease-1".to_owned())]);
    let layers = &coordinator.reports[0].layers;
    assert_eq!(layers.len(), 4, "two configs and two distinct layers: {layers:?}");
    assert!(layers.iter().all(|layer| layer.outcome() == pb::LayerOutcome::Transferred));
    assert!(coordinator.bad_blobs.is_empty());
    assert!(said[0].starts_with("restored shop: 2 images, 4 blobs downloaded"), "{said:?}");
    assert_eq!(said[1], "add to docker build: --cache-from base:1 --cache-from app:1");
}

#[tokio::test]
async fn layers_the_host_holds_are_not_downloaded_and_reported_found() {
    let (manifest, blobs) = cached();
    let base_layer = manifest.images[0].layers[0].clone();
    let mut coordinator = FakeCoordinator::new(Answer::Hit(Box::new(manifest)), FakeStore(Arc::new(blobs)));
    let engine = FakeEngine { chains: HashSet::from([vec![base_layer.digest.clone()]]), ..Default::default() };
    let (restored, said) = run(&mut coordinator, &engine).await;
    assert!(matches!(restored.unwrap(), Restored::Hit { .. }));
    let found: Vec<(String, u64)> = coordinator.reports[0]
        .layers
        .iter()
        .filter(|layer| layer.outcome() == pb::LayerOutcome::Found)
        .map(|layer| (layer.digest.clone(), layer.bytes))
        .collect();
    assert_eq!(found, vec![(base_layer.digest, base_layer.size)]);
    assert!(said[0].contains("3 blobs downloaded") && said[0].contains("1 layers already on this host"), "{said:?}");
}

#[tokio::test]
async fn a_corrupt_blob_is_named_reported_and_nothing_loads() {
    let (manifest, mut blobs) = cached();
    let app_layer = manifest.images[1].layers[1].digest.clone();
    let size = blobs[&app_layer].len();
    blobs.insert(app_layer.clone(), Bytes::from(vec![b'x'; size]));
    let mut coordinator = FakeCoordinator::new(Answer::Hit(Box::new(manifest)), FakeStore(Arc::new(blobs)));
    let engine = FakeEngine::default();
    let (restored, _) = run(&mut coordinator, &engine).await;
    let error = restored.unwrap_err().to_string();
    assert!(error.starts_with(&format!("blob {app_layer} failed verification")), "{error}");
    assert!(
        error.ends_with("the engine loaded nothing; the coordinator found it lost in the store and dropped it with the 1 cache(s) naming it: the next save uploads it again"),
        "{error}"
    );
    assert_eq!(coordinator.bad_blobs, vec![app_layer]);
    assert_eq!(engine.loaded(), 0);
    assert_eq!(coordinator.outcomes(), vec![(pb::RestoreOutcome::Error, "lease-1".to_owned())]);
}

#[tokio::test]
async fn a_blob_missing_from_the_store_is_reported_too() {
    let (manifest, mut blobs) = cached();
    let base_id = manifest.images[0].id.clone();
    blobs.remove(&base_id);
    let mut coordinator = FakeCoordinator::new(Answer::Hit(Box::new(manifest)), FakeStore(Arc::new(blobs)));
    let (restored, _) = run(&mut coordinator, &FakeEngine::default()).await;
    let error = restored.unwrap_err().to_string();
    assert!(error.starts_with(&format!("blob {base_id} is not in the store; the engine loaded nothing")), "{error}");
    assert_eq!(coordinator.bad_blobs, vec![base_id]);
    assert_eq!(coordinator.outcomes(), vec![(pb::RestoreOutcome::Error, "lease-1".to_owned())]);
}

#[tokio::test]
async fn an_engine_refusing_the_load_fails_the_restore_and_gives_the_lease_back() {
    let (manifest, blobs) = cached();
    let mut coordinator = FakeCoordinator::new(Answer::Hit(Box::new(manifest)), FakeStore(Arc::new(blobs)));
    let engine = FakeEngine { refuses: true, ..Default::default() };
    let (restored, _) = run(&mut coordinator, &engine).await;
    let error = restored.unwrap_err();
    assert!(matches!(error, WorkerError::Engine(_)), "{error:?}");
    assert_eq!(error.to_string(), "the Docker engine failed to load the restored images: no space left on device");
    assert!(coordinator.bad_blobs.is_empty());
    assert_eq!(coordinator.outcomes(), vec![(pb::RestoreOutcome::Error, "lease-1".to_owned())]);
}

#[tokio::test]
async fn an_unreachable_coordinator_is_not_sent_a_report() {
    let mut coordinator = FakeCoordinator::new(Answer::Unreachable, FakeStore::default());
    let (restored, said) = run(&mut coordinator, &FakeEngine::default()).await;
    let error = restored.unwrap_err();
    assert_eq!(error.exit_code(), 69, "{error}");
    assert!(coordinator.reports.is_empty(), "the report would wait for it a second time");
    assert!(said.is_empty());
}

#[tokio::test]
async fn a_miss_is_said_and_reported_with_the_lease() {
    let mut coordinator = FakeCoordinator::new(Answer::Miss, FakeStore::default());
    let (restored, said) = run(&mut coordinator, &FakeEngine::default()).await;
    assert_eq!(restored.unwrap(), Restored::Miss);
    assert_eq!(said, vec!["no cached image for shop".to_owned()]);
    assert_eq!(coordinator.outcomes(), vec![(pb::RestoreOutcome::Miss, "lease-1".to_owned())]);
}

#[tokio::test]
async fn a_cache_of_buildkits_export_alone_is_restored_without_a_load() {
    // As a view's push saves it: BuildKit's cache export, no image.
    let mut blobs = HashMap::new();
    let layer = Bytes::from_static(b"a cached layer");
    let config = Bytes::from_static(br#"{"layers":[],"records":[]}"#);
    let (layer_digest, config_digest) = (sha256_digest(&layer), sha256_digest(&config));
    let manifest_json = serde_json::to_vec(&serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.buildkit.cacheconfig.v0", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = sha256_digest(&manifest_json);
    let plain = |digest: &String, size: usize| pb::Layer {
        digest: digest.clone(),
        size: size as u64,
        stored_size: size as u64,
        ..Default::default()
    };
    let image = pb::Image {
        id: manifest_digest.clone(),
        oci_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        config_size: manifest_json.len() as u64,
        layers: vec![plain(&layer_digest, layer.len())],
        oci_blobs: vec![plain(&config_digest, config.len())],
        build_cache: true,
        builder: pb::Builder::Buildkit as i32,
        ..Default::default()
    };
    blobs.insert(layer_digest, layer);
    blobs.insert(config_digest, config);
    blobs.insert(manifest_digest.clone(), Bytes::from(manifest_json));
    let manifest = pb::Manifest { images: vec![image], ..Default::default() };
    let mut coordinator = FakeCoordinator::new(Answer::Hit(Box::new(manifest)), FakeStore(Arc::new(blobs)));
    // A load of a layout with no image fails in the engine ("image might be filtered out").
    let engine = FakeEngine { containerd: true, refuses: true, ..Default::default() };
    let (restored, said) = run(&mut coordinator, &engine).await;
    let Ok(Restored::Hit { flags }) = restored else { panic!("a hit: {restored:?} {said:?}") };
    assert!(flags[0].contains(&format!("/cache,digest={manifest_digest}")), "{flags:?}");
    assert_eq!(coordinator.outcomes(), vec![(pb::RestoreOutcome::Hit, "lease-1".to_owned())]);
}

#[tokio::test]
async fn a_cache_from_the_other_image_store_is_a_miss() {
    let (mut manifest, blobs) = cached();
    manifest.images[0].oci_media_type = "application/vnd.oci.image.index.v1+json".into();
    let mut coordinator = FakeCoordinator::new(Answer::Hit(Box::new(manifest)), FakeStore(Arc::new(blobs)));
    let engine = FakeEngine::default();
    let (restored, _) = run(&mut coordinator, &engine).await;
    assert_eq!(restored.unwrap(), Restored::Miss);
    assert_eq!(engine.loaded(), 0);
    assert_eq!(coordinator.outcomes(), vec![(pb::RestoreOutcome::Miss, "lease-1".to_owned())]);
}

#[tokio::test]
async fn an_invalid_branch_is_bad_input_and_reported_without_a_lease() {
    let mut coordinator = FakeCoordinator::new(Answer::Miss, FakeStore::default());
    let dir = tempfile::tempdir().unwrap();
    let options = RestoreOptions { branch: "no spaces allowed".into(), ..options(&dir) };
    let error = restore(&mut coordinator, &FakeEngine::default(), &options, &|_| {}).await.unwrap_err();
    assert_eq!(error.exit_code(), 64, "{error}");
    assert_eq!(coordinator.outcomes(), vec![(pb::RestoreOutcome::Error, String::new())]);
}

#[tokio::test]
async fn a_restore_marks_the_job_with_the_images_already_here_and_its_token() {
    // A leftover of an earlier job on this host.
    let engine = FakeEngine::default();
    engine.images.lock().unwrap().insert("old:1".into(), "sha256:left-behind".into());
    let dir = tempfile::tempdir().unwrap();
    let dirs = BuildDirs::new(dir.path(), "shop");
    let say = |_: &str| {};
    // A miss leaves the mark alone: nothing restored, the leftover already here.
    let empty = FakeStore(Arc::new(HashMap::new()));
    let mut coordinator = FakeCoordinator::new(Answer::Miss, empty);
    assert_eq!(restore(&mut coordinator, &engine, &options(&dir), &say).await.unwrap(), Restored::Miss);
    let mark = dirs.read_record().unwrap();
    assert_eq!(mark.owner, crate::build_dirs::owner_of("cct_shop_token"));
    assert_eq!(mark.present, HashSet::from(["sha256:left-behind".to_string()]));
    assert!(mark.images.is_empty());
    // A hit keeps the mark and adds the cache's images.
    let (manifest, blobs) = cached();
    let mut coordinator = FakeCoordinator::new(Answer::Hit(Box::new(manifest.clone())), FakeStore(Arc::new(blobs)));
    assert!(matches!(restore(&mut coordinator, &engine, &options(&dir), &say).await, Ok(Restored::Hit { .. })));
    let record = dirs.read_record().unwrap();
    assert!(record.present.contains("sha256:left-behind"));
    assert_eq!(record.images, manifest.images.iter().map(|image| image.id.clone()).collect());
    assert_eq!(record.owner, mark.owner);
}
