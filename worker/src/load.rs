//! Builds the `docker load` tarball of a manifest as a stream: each config and each distinct
//! layer downloaded (several at once, in bounded memory) and verified as it passes, then a
//! `manifest.json` whose entries carry the tags and `Parent` links. A blob whose digest does not
//! match ends the stream with an error before `manifest.json`, so the engine commits nothing.
//! The uncompressed layers of the chain `manifest.json` names first are not hashed here: the
//! engine hashes each against its diff ID before it commits any image, a second SHA-256 pass
//! costs the CPU the engine needs, and a load it refuses gets its culprit from [`find_corrupt`].
//! For the containerd image store the same stream carries an OCI layout (`blobs/sha256/*`, then
//! `oci-layout` and `index.json`) without the blobs the host's content store already holds (or
//! that the restore wrote there itself first, `restore/place.rs`); the layout a BuildKit build
//! reads gets the small blobs, and the layers only when this worker cannot reach that content
//! store (BuildKit reads them there: each layer is written once).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use proto::digest::{DigestHasher, digest_hex as hex};
use proto::v1 as pb;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::progress::Bar;
use crate::save_source::HostBlobs;
use crate::transfer::{BlobStore, TransferError};

/// One blob of the tarball, in the order it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBlob {
    pub path_in_tar: String,
    /// The blob's address in the store.
    pub digest: String,
    /// sha256 of the stored bytes: the address, or the compressed digest of a gzip layer.
    pub stored_digest: String,
    /// Bytes as stored.
    pub size: u64,
    /// The host already holds this layer's chain wherever the tarball uses it: `docker load`
    /// does not read it, so it goes as an empty entry and is not downloaded.
    pub skipped: bool,
    /// Also written here as it passes (renamed into place once verified): the OCI layout a
    /// BuildKit build reads on the containerd image store.
    pub copy_to: Option<std::path::PathBuf>,
    /// An uncompressed layer the graph driver registers from the tarball while it reads the first
    /// entry of `manifest.json`, hashing it against its diff ID before any image is committed:
    /// the stream does not hash it too (see [`plan_load`]).
    pub checked_by_engine: bool,
}

/// What to write: the blobs, then small files by name (`manifest.json`; or the OCI layout's
/// `oci-layout` and `index.json`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadPlan {
    pub blobs: Vec<PlannedBlob>,
    pub trailer: Vec<(String, Vec<u8>)>,
    /// Blobs the host's content store holds: no entry in the tarball (the engine's import
    /// finds them there), not downloaded.
    pub held: Vec<String>,
    /// Blobs the host holds that the BuildKit layout needs, and their files in the layout
    /// ([`HostBlobs::copy_out`]).
    pub from_host: Vec<(String, std::path::PathBuf)>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct LoadManifestEntry {
    config: String,
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    parent: String,
}

/// Lays out the tarball of `manifest`: configs as `<hex>.json`, one `<hex>/layer.tar` per
/// distinct layer, and the entries of `manifest.json` in the manifest's order (parents first),
/// but for the one that goes first: the entry whose chain the engine registers the most bytes of.
/// A layer is left empty when every chain it ends in the tarball is in `present_chains` (the
/// host's layer chains, as lists of diff IDs from the bottom).
///
/// The graph driver's `docker load` reads the entries in order, and registers each entry's
/// layers (hashing each against its diff ID) before it commits that entry's image: a layer it
/// registers for the first entry is checked before anything is committed, and a bad one leaves
/// nothing loaded. Those layers, when stored uncompressed (their bytes are what the engine
/// hashes, and no more than the manifest's size reaches the engine), are `checked_by_engine`;
/// every other blob is hashed as it streams.
pub fn plan_load(manifest: &pb::Manifest, present_chains: &HashSet<Vec<String>>) -> LoadPlan {
    let mut needed: HashSet<&str> = HashSet::new();
    for image in &manifest.images {
        let diff_ids: Vec<String> = image.layers.iter().map(|layer| layer.digest.clone()).collect();
        for (layer_idx, layer) in image.layers.iter().enumerate() {
            if !present_chains.contains(&diff_ids[..=layer_idx]) {
                needed.insert(&layer.digest);
            }
        }
    }
    let first = manifest.images.iter().enumerate().max_by_key(|(image_idx, image)| {
        let bytes: u64 = engine_checked(image, present_chains).map(|layer| layer.size).sum();
        (bytes, std::cmp::Reverse(*image_idx))
    });
    let checked_by_engine: HashSet<&str> = first
        .into_iter()
        .flat_map(|(_, image)| engine_checked(image, present_chains))
        .map(|layer| layer.digest.as_str())
        .collect();
    let mut blobs = Vec::new();
    let mut seen = HashSet::new();
    let image_ids: HashSet<&str> = manifest.images.iter().map(|image| image.id.as_str()).collect();
    let mut entries = Vec::new();
    for image in &manifest.images {
        let config = format!("{}.json", hex(&image.id));
        if seen.insert(image.id.clone()) {
            blobs.push(PlannedBlob {
                path_in_tar: config.clone(),
                digest: image.id.clone(),
                stored_digest: image.id.clone(),
                size: image.config_size,
                skipped: false,
                copy_to: None,
                checked_by_engine: false,
            });
        }
        let mut layers = Vec::new();
        for layer in &image.layers {
            let path = format!("{}/layer.tar", hex(&layer.digest));
            if seen.insert(layer.digest.clone()) {
                // The engine decompresses a gzip layer.tar itself and checks its diff ID.
                let compressed = !layer.stored_digest.is_empty();
                let skipped = !needed.contains(layer.digest.as_str());
                blobs.push(PlannedBlob {
                    path_in_tar: path.clone(),
                    digest: layer.digest.clone(),
                    stored_digest: if compressed { layer.stored_digest.clone() } else { layer.digest.clone() },
                    size: if compressed { layer.stored_size } else { layer.size },
                    skipped,
                    copy_to: None,
                    checked_by_engine: !skipped && checked_by_engine.contains(layer.digest.as_str()),
                });
            }
            layers.push(path);
        }
        let parent = if image_ids.contains(image.parent_id.as_str()) { image.parent_id.clone() } else { String::new() };
        entries.push(LoadManifestEntry {
            config,
            repo_tags: (!image.repo_tags.is_empty()).then(|| image.repo_tags.clone()),
            layers,
            parent,
        });
    }
    // The engine sets `Parent` links once every entry is in: the order changes nothing else.
    if let Some((first_idx, _)) = first {
        let entry = entries.remove(first_idx);
        entries.insert(0, entry);
    }
    let manifest_json = serde_json::to_vec(&entries).expect("manifest.json serializes");
    LoadPlan { blobs, trailer: vec![("manifest.json".to_owned(), manifest_json)], ..LoadPlan::default() }
}

/// The uncompressed layers of `image` the engine registers from the tarball when it reads the
/// image's entry first: those whose chain from the bottom the host does not hold.
fn engine_checked<'a>(
    image: &'a pb::Image,
    present_chains: &'a HashSet<Vec<String>>,
) -> impl Iterator<Item = &'a pb::Layer> + 'a {
    let diff_ids: Vec<String> = image.layers.iter().map(|layer| layer.digest.clone()).collect();
    image.layers.iter().enumerate().filter_map(move |(layer_idx, layer)| {
        let registered = !present_chains.contains(&diff_ids[..=layer_idx]);
        (registered && layer.stored_digest.is_empty()).then_some(layer)
    })
}

/// Lays out the tarball of the containerd image store's images of `manifest` as an OCI layout
/// (their blobs under `blobs/sha256/`, then `oci-layout` and `index.json`). A blob the host
/// holds has no entry: containerd's import takes the content store's. The layout a BuildKit
/// build reads (`copy_dir`) gets the small blobs (indexes, manifests, configs), copied as they
/// pass or from the content store; when this worker reaches that store it gets no layer (BuildKit
/// on the engine reads the layers from the content store the load fills, so each is written
/// once), else every layer is copied as it passes. BuildKit's cache exports are not part of it.
pub fn plan_oci_load(manifest: &pb::Manifest, copy_dir: &std::path::Path, host: &HostBlobs) -> LoadPlan {
    let images: Vec<&pb::Image> = manifest.images.iter().filter(|image| !image.build_cache).collect();
    let layers: HashSet<&str> =
        images.iter().flat_map(|image| &image.layers).map(|layer| layer.digest.as_str()).collect();
    let mut seen = HashSet::new();
    let mut plan = LoadPlan::default();
    for (digest, size) in images.iter().flat_map(|image| crate::oci::image_blobs(image)) {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let path_in_tar = crate::layout::blob_path(&digest);
        let in_layout = copy_dir.join(&path_in_tar);
        let in_layout = (!host.reached() || !layers.contains(digest.as_str())).then_some(in_layout);
        if host.holds(&digest) {
            plan.from_host.extend(in_layout.map(|in_layout| (digest.clone(), in_layout)));
            plan.held.push(digest);
            continue;
        }
        plan.blobs.push(PlannedBlob {
            copy_to: in_layout,
            path_in_tar,
            stored_digest: digest.clone(),
            digest,
            size,
            skipped: false,
            checked_by_engine: false,
        });
    }
    plan.trailer = vec![
        ("oci-layout".to_owned(), crate::oci::OCI_LAYOUT.to_vec()),
        ("index.json".to_owned(), crate::oci::index_json(&images)),
    ];
    plan
}

/// A 512-byte tar header for a regular file.
fn tar_header(path: &str, size: u64) -> Bytes {
    let mut header = tar::Header::new_ustar();
    header.set_path(path).expect("short ASCII paths fit a ustar header");
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    Bytes::copy_from_slice(header.as_bytes())
}

fn padding(size: u64) -> Bytes {
    let remainder = (size % 512) as usize;
    Bytes::from(vec![0u8; if remainder == 0 { 0 } else { 512 - remainder }])
}

/// How one blob went, for the metrics report and the summary line.
#[derive(Debug, Clone)]
pub struct BlobOutcome {
    pub digest: String,
    pub bytes: u64,
    pub seconds: f64,
}

/// Why the stream stopped early; the restore reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadFailure {
    #[error("blob {digest} failed verification: its stored content hashes to {actual}")]
    DigestMismatch { digest: String, actual: String },
    #[error("blob {digest} is not in the store")]
    Missing { digest: String },
    #[error("{0}")]
    Transfer(String),
}

/// What a load stream wrote.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    /// Blobs downloaded and verified (by the stream, or by the engine as it registered them).
    pub blobs: Vec<BlobOutcome>,
    /// Layers left out because the host already holds them.
    pub skipped: Vec<String>,
    /// Of `blobs`, how many this worker wrote into the engine's content store itself.
    pub placed: usize,
}

/// How a load stream ended, returned by its task once it did.
#[derive(Debug)]
pub enum StreamEnd {
    /// Every blob verified (or left to the engine's check), the trailer written.
    Finished(Streamed),
    /// A blob failed: the stream ended with an error before the trailer.
    Failed(LoadFailure),
    /// Its reader (the engine) stopped reading first; what it wrote until then.
    Dropped(Streamed),
}

/// The end of a load stream, to await once the engine is done reading it.
pub struct LoadOutcome(tokio::task::JoinHandle<StreamEnd>);

impl LoadOutcome {
    pub async fn ended(self) -> StreamEnd {
        self.0.await.unwrap_or_else(|error| {
            StreamEnd::Failed(LoadFailure::Transfer(format!("the load stream's task failed: {error}")))
        })
    }
}

/// Where a load reads its blobs: the object store ([`BlobStore`]), or a fake in tests.
pub trait BlobReader: Clone + Send + Sync + 'static {
    /// The part size of a blob of `size` bytes (its ranges follow the parts it was uploaded in).
    fn part_size_for(&self, size: u64) -> u64;
    /// The bytes `offset..offset + length` of a stored blob, unverified.
    fn download_range(
        &self,
        digest: &str,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = Result<Bytes, TransferError>> + Send;
    /// The same bytes in the pieces they arrived in, not copied into one buffer.
    fn download_range_pieces(
        &self,
        digest: &str,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = Result<Vec<Bytes>, TransferError>> + Send {
        async move { Ok(vec![self.download_range(digest, offset, length).await?]) }
    }
    /// A stored blob's bytes, unverified.
    fn download(&self, digest: &str) -> impl Future<Output = Result<BlobBody, TransferError>> + Send;
}

/// A blob's bytes as they arrive.
pub type BlobBody = futures::stream::BoxStream<'static, Result<Bytes, TransferError>>;

impl BlobReader for BlobStore {
    fn part_size_for(&self, size: u64) -> u64 {
        BlobStore::part_size_for(self, size)
    }

    async fn download_range(&self, digest: &str, offset: u64, length: u64) -> Result<Bytes, TransferError> {
        BlobStore::download_range(self, digest, offset, length).await
    }

    async fn download_range_pieces(&self, digest: &str, offset: u64, length: u64) -> Result<Vec<Bytes>, TransferError> {
        BlobStore::download_range_pieces(self, digest, offset, length).await
    }

    async fn download(&self, digest: &str) -> Result<BlobBody, TransferError> {
        Ok(BlobStore::download(self, digest).await?.boxed())
    }
}

/// One ranged GET: a part of a blob, in tarball order.
struct PlannedPart {
    blob_idx: usize,
    offset: u64,
    length: u64,
}

/// Splits the blobs into parts, in tarball order, each blob's ranges aligned to the parts it
/// was uploaded in (`part_size_for` its size). Blobs the host already has (`skipped`) and
/// empty ones have none.
fn plan_parts(blobs: &[PlannedBlob], part_size_for: impl Fn(u64) -> u64) -> Vec<PlannedPart> {
    let mut parts = Vec::new();
    for (blob_idx, blob) in blobs.iter().enumerate() {
        let part_size = part_size_for(blob.size);
        let mut offset = 0;
        while offset < blob.size && !blob.skipped {
            let length = part_size.min(blob.size - offset);
            parts.push(PlannedPart { blob_idx, offset, length });
            offset += length;
        }
    }
    parts
}

/// A downloaded part, in the pieces it arrived in (passed on as they are: copying 8 to 16 MiB
/// parts into one buffer cost a restore a fifth of its CPU), holding its permit so memory stays
/// bounded until the writer used it.
pub(crate) type FetchedPart = Result<(Vec<Bytes>, OwnedSemaphorePermit), TransferError>;

/// The parts being fetched, in tarball order.
pub(crate) type PartsInFlight = mpsc::UnboundedReceiver<oneshot::Receiver<FetchedPart>>;

/// The tarball of `plan` as a stream, and its outcome once it ended. Parts (the plan's part
/// size below 70 GiB blobs) are fetched with ranged GETs, up to `concurrency` at once and in
/// tarball order, so the writer always waits for the oldest part in flight and memory stays
/// under `concurrency × part size`.
pub fn load_stream<R: BlobReader>(
    store: R,
    plan: LoadPlan,
    concurrency: usize,
    bar: Bar,
) -> (impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, LoadOutcome) {
    // A part's pieces queue for the engine's socket: a few at a time, not one.
    let (sender, receiver) = mpsc::channel::<std::io::Result<Bytes>>(PIECES_QUEUED);
    let parts = fetch_parts(store, &plan.blobs, concurrency);
    let writer = TarWriter {
        sender,
        parts,
        bar,
        waited_for_store: std::time::Duration::ZERO,
        waited_for_engine: std::time::Duration::ZERO,
    };
    let task = tokio::spawn(writer.write(plan));
    (tokio_stream::wrappers::ReceiverStream::new(receiver), LoadOutcome(task))
}

/// How many pieces of a part wait for the engine's socket at most (each is what one read of the
/// store's answer gave, up to a few hundred KiB).
const PIECES_QUEUED: usize = 16;

/// Starts fetching every part of `blobs`, at most `concurrency` held at once.
pub(crate) fn fetch_parts<R: BlobReader>(store: R, blobs: &[PlannedBlob], concurrency: usize) -> PartsInFlight {
    let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
    let parts = plan_parts(blobs, |size| store.part_size_for(size));
    let digests: Vec<String> = blobs.iter().map(|blob| blob.digest.clone()).collect();
    let (parts_sender, parts_receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for part in parts {
            let Ok(permit) = semaphore.clone().acquire_owned().await else { return };
            let (part_sender, part_receiver) = oneshot::channel();
            let store = store.clone();
            let digest = digests[part.blob_idx].clone();
            tokio::spawn(async move {
                let fetched = store.download_range_pieces(&digest, part.offset, part.length).await;
                let _ = part_sender.send(fetched.map(|bytes| (bytes, permit)));
            });
            if parts_sender.send(part_receiver).is_err() {
                return;
            }
        }
    });
    parts_receiver
}

/// Why one blob's entry stopped.
enum BlobEnd {
    /// The reader went away.
    Gone,
    Failed(LoadFailure),
}

/// Writes the tarball's entries into the stream, verifying each blob as it passes.
struct TarWriter {
    sender: mpsc::Sender<std::io::Result<Bytes>>,
    parts: PartsInFlight,
    bar: Bar,
    /// How long the writer waited for the store's parts, and for the engine to take pieces.
    waited_for_store: std::time::Duration,
    waited_for_engine: std::time::Duration,
}

impl TarWriter {
    async fn write(mut self, plan: LoadPlan) -> StreamEnd {
        let started = Instant::now();
        let mut streamed = Streamed { skipped: plan.held.clone(), ..Streamed::default() };
        for blob in &plan.blobs {
            match self.write_blob(blob).await {
                Ok(Some(outcome)) => streamed.blobs.push(outcome),
                Ok(None) => streamed.skipped.push(blob.digest.clone()),
                Err(BlobEnd::Gone) => return StreamEnd::Dropped(streamed),
                Err(BlobEnd::Failed(failure)) => {
                    let _ = self.sender.send(Err(std::io::Error::other(failure.to_string()))).await;
                    return StreamEnd::Failed(failure);
                }
            }
        }
        self.bar.finish();
        let mut pieces = Vec::new();
        for (name, bytes) in plan.trailer {
            let size = bytes.len() as u64;
            pieces.extend([tar_header(&name, size), Bytes::from(bytes), padding(size)]);
        }
        pieces.push(Bytes::from(vec![0u8; 1024]));
        for piece in pieces {
            if self.send(piece).await.is_err() {
                return StreamEnd::Dropped(streamed);
            }
        }
        // Beside the engine's "finished the load": how long the engine waited on the stream.
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            waited_for_store = self.waited_for_store.as_secs_f64(),
            waited_for_engine = self.waited_for_engine.as_secs_f64(),
            "the load stream is written"
        );
        StreamEnd::Finished(streamed)
    }

    async fn send(&mut self, bytes: Bytes) -> Result<(), BlobEnd> {
        let waiting = Instant::now();
        let sent = self.sender.send(Ok(bytes)).await.map_err(|_| BlobEnd::Gone);
        self.waited_for_engine += waiting.elapsed();
        sent
    }

    /// One blob's entry: its header, its parts as they arrive (hashed unless the engine checks
    /// it, and copied into the layout when it has a `copy_to`), its padding. `None` for a layer
    /// left out.
    async fn write_blob(&mut self, blob: &PlannedBlob) -> Result<Option<BlobOutcome>, BlobEnd> {
        let failed = |reason: String| BlobEnd::Failed(LoadFailure::Transfer(reason));
        self.send(tar_header(&blob.path_in_tar, if blob.skipped { 0 } else { blob.size })).await?;
        if blob.skipped {
            return Ok(None);
        }
        let started = Instant::now();
        let mut hasher = (!blob.checked_by_engine).then(DigestHasher::new);
        let mut copy = match &blob.copy_to {
            Some(path) => Some(Copy::create(path).await.map_err(failed)?),
            None => None,
        };
        let mut written = 0;
        while written < blob.size {
            let waiting = Instant::now();
            let fetched = next_part(&mut self.parts, &blob.digest).await;
            self.waited_for_store += waiting.elapsed();
            let (pieces, permit) = fetched.map_err(BlobEnd::Failed)?;
            for piece in &pieces {
                self.bar.add(piece.len() as u64);
                written += piece.len() as u64;
                // Into the stream first: the engine reads this piece while it is hashed (a bad
                // blob still ends the stream before the trailer, so the engine commits nothing).
                self.send(piece.clone()).await?;
                if let Some(hasher) = hasher.as_mut() {
                    hasher.update(piece);
                }
            }
            if let Some(copy) = copy.as_mut() {
                copy.write(&pieces).await.map_err(failed)?;
            }
            drop(permit);
        }
        if let Some(hasher) = hasher {
            let actual = hasher.finish();
            if actual != blob.stored_digest {
                return Err(BlobEnd::Failed(LoadFailure::DigestMismatch { digest: blob.digest.clone(), actual }));
            }
        }
        if let Some(copy) = copy {
            copy.finish().await.map_err(failed)?;
        }
        let outcome =
            BlobOutcome { digest: blob.digest.clone(), bytes: written, seconds: started.elapsed().as_secs_f64() };
        self.send(padding(blob.size)).await?;
        Ok(Some(outcome))
    }
}

/// The oldest part in flight, once fetched.
async fn next_part(parts: &mut PartsInFlight, digest: &str) -> Result<(Vec<Bytes>, OwnedSemaphorePermit), LoadFailure> {
    let ended = |what: &str| {
        let reason = format!("the download {what} ended early");
        Err(TransferError::Download { digest: digest.to_owned(), reason })
    };
    let fetched = match parts.recv().await {
        Some(part) => part.await.unwrap_or_else(|_| ended("task")),
        None => ended("scheduler"),
    };
    fetched.map_err(|error| match error {
        TransferError::NotStored { digest } => LoadFailure::Missing { digest },
        error => LoadFailure::Transfer(error.to_string()),
    })
}

/// After the engine refused a load whose stream it read whole: downloads the blobs the stream
/// left to the engine's check again, in order, and hashes each until one fails (a layer whose
/// bytes do not hash to its diff ID, or are no tar at all, fails the engine's load with an
/// error that need not name it). `None` when each is intact, or cannot be read again: the
/// engine's own error is then the one to tell.
pub async fn find_corrupt<R: BlobReader>(store: R, blobs: &[PlannedBlob], concurrency: usize) -> Option<LoadFailure> {
    let mut parts = fetch_parts(store, blobs, concurrency);
    for blob in blobs.iter().filter(|blob| !blob.skipped) {
        let mut hasher = DigestHasher::new();
        while hasher.size() < blob.size {
            match next_part(&mut parts, &blob.digest).await {
                Ok((pieces, _permit)) => pieces.iter().for_each(|piece| hasher.update(piece)),
                Err(missing @ LoadFailure::Missing { .. }) => return Some(missing),
                Err(_) => return None,
            }
        }
        let actual = hasher.finish();
        if actual != blob.stored_digest {
            return Some(LoadFailure::DigestMismatch { digest: blob.digest.clone(), actual });
        }
    }
    None
}

/// A blob's copy into a layout folder: written as `<name>.part`, renamed once verified. The
/// pieces of each write go to the file on a blocking thread as they are (`Bytes` handles, no
/// copy of them).
/// A copy dropped before it is finished (a failure, a restore given up) removes its part file.
pub(crate) struct Copy {
    file: Option<std::fs::File>,
    part: std::path::PathBuf,
    path: std::path::PathBuf,
    renamed: bool,
}

impl Drop for Copy {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

impl Copy {
    pub(crate) async fn create(path: &std::path::Path) -> Result<Copy, String> {
        Copy::create_beside(path, path.with_extension("part")).await
    }

    /// A copy written as `part` (on the same file system as `path`), renamed to `path`.
    pub(crate) async fn create_beside(path: &std::path::Path, part: std::path::PathBuf) -> Result<Copy, String> {
        let file = std::fs::File::create(&part).map_err(|error| copy_failed(&part, error))?;
        Ok(Copy { file: Some(file), part, path: path.to_owned(), renamed: false })
    }

    pub(crate) async fn write(&mut self, pieces: &[Bytes]) -> Result<(), String> {
        use std::io::Write;
        let Some(mut file) = self.file.take() else { return Err(format!("{} was closed", self.part.display())) };
        let pieces = pieces.to_vec();
        let written = tokio::task::spawn_blocking(move || {
            pieces.iter().try_for_each(|piece| file.write_all(piece)).map(|()| file)
        })
        .await;
        match written {
            Ok(Ok(file)) => {
                self.file = Some(file);
                Ok(())
            }
            Ok(Err(error)) => Err(copy_failed(&self.part, error)),
            Err(error) => Err(format!("writing {} failed: {error}", self.part.display())),
        }
    }

    pub(crate) async fn finish(mut self) -> Result<(), String> {
        drop(self.file.take());
        tokio::fs::rename(&self.part, &self.path).await.map_err(|error| copy_failed(&self.path, error))?;
        self.renamed = true;
        Ok(())
    }

    /// [`Copy::finish`], the file made read-only first (as containerd keeps its blobs).
    pub(crate) async fn finish_read_only(self) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let read_only = std::fs::Permissions::from_mode(0o444);
        std::fs::set_permissions(&self.part, read_only).map_err(|error| copy_failed(&self.part, error))?;
        self.finish().await
    }
}

fn copy_failed(path: &std::path::Path, error: std::io::Error) -> String {
    format!("writing {} failed: {error}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    #[test]
    fn the_plan_writes_each_layer_once_and_links_parents() {
        let layer = |n| pb::Layer { digest: digest(n), size: 10 * n as u64, ..Default::default() };
        let manifest = pb::Manifest {
            images: vec![
                pb::Image {
                    id: digest(1),
                    repo_tags: vec!["base:1".into()],
                    layers: vec![layer(10)],
                    config_size: 5,
                    ..Default::default()
                },
                pb::Image {
                    id: digest(2),
                    parent_id: digest(1),
                    layers: vec![layer(10), layer(11)],
                    config_size: 6,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let plan = plan_load(&manifest, &HashSet::new());
        let paths: Vec<&str> = plan.blobs.iter().map(|blob| blob.path_in_tar.as_str()).collect();
        assert_eq!(paths.len(), 4, "two configs and two distinct layers: {paths:?}");
        assert_eq!(plan.trailer[0].0, "manifest.json");
        let entries: serde_json::Value = serde_json::from_slice(&plan.trailer[0].1).unwrap();
        // The longer chain first (see `plan_load`), its parent linked all the same.
        assert_eq!(entries[1]["RepoTags"][0], "base:1");
        assert!(entries[1].get("Parent").is_none());
        assert_eq!(entries[0]["Parent"], digest(1));
        assert_eq!(entries[0]["RepoTags"], serde_json::Value::Null);
        assert_eq!(entries[0]["Layers"][0], entries[1]["Layers"][0]);
    }

    #[test]
    fn layers_whose_every_chain_is_on_the_host_are_left_out() {
        let layer = |n| pb::Layer { digest: digest(n), size: 10, ..Default::default() };
        let manifest = pb::Manifest {
            images: vec![
                pb::Image { id: digest(1), layers: vec![layer(10), layer(11)], config_size: 5, ..Default::default() },
                // Layer 11 again, on another chain the host does not have.
                pb::Image { id: digest(2), layers: vec![layer(12), layer(11)], config_size: 5, ..Default::default() },
            ],
            ..Default::default()
        };
        let present = HashSet::from([vec![digest(10)], vec![digest(10), digest(11)]]);
        let plan = plan_load(&manifest, &present);
        let skipped: Vec<&str> =
            plan.blobs.iter().filter(|blob| blob.skipped).map(|blob| blob.digest.as_str()).collect();
        assert_eq!(skipped, vec![digest(10).as_str()]);
        let parts = plan_parts(&plan.blobs, |_| 4);
        assert_eq!(
            parts.len(),
            2 * 2 + 2 * 3,
            "two configs of 5 bytes in 2 parts each, layers 11 and 12 in 3 each, none for 10"
        );
    }

    #[test]
    fn the_longest_chain_goes_first_and_its_uncompressed_layers_are_left_to_the_engine() {
        let layer = |n| pb::Layer { digest: digest(n), size: 10, ..Default::default() };
        let gzip = pb::Layer { stored_digest: digest(40), stored_size: 5, ..layer(13) };
        let image = |id, parent: Option<u8>, layers| pb::Image {
            id: digest(id),
            parent_id: parent.map(digest).unwrap_or_default(),
            layers,
            config_size: 5,
            ..Default::default()
        };
        let manifest = pb::Manifest {
            images: vec![
                image(1, None, vec![layer(10)]),
                image(2, Some(1), vec![layer(10), layer(11), gzip, layer(15)]),
                // Another chain on a base the host holds, sharing layer 11.
                image(3, None, vec![layer(12), layer(11), layer(14)]),
            ],
            ..Default::default()
        };
        let present = HashSet::from([vec![digest(12)]]);
        let plan = plan_load(&manifest, &present);
        let entries: serde_json::Value = serde_json::from_slice(&plan.trailer[0].1).unwrap();
        let configs: Vec<&str> = entries.as_array().unwrap().iter().map(|e| e["Config"].as_str().unwrap()).collect();
        let config = |n| format!("{}.json", hex(&digest(n)));
        assert_eq!(configs, vec![config(2), config(1), config(3)], "the chain registering the most bytes first");
        assert_eq!(entries[0]["Parent"], digest(1), "its parent link stays");
        let checked: Vec<&str> =
            plan.blobs.iter().filter(|blob| blob.checked_by_engine).map(|blob| blob.digest.as_str()).collect();
        assert_eq!(
            checked,
            vec![digest(10).as_str(), digest(11).as_str(), digest(15).as_str()],
            "the first entry's uncompressed layers; not its gzip layer, not the other chain's"
        );

        // A layer the first entry finds on the host is registered later, for another chain:
        // the stream hashes it.
        let present = HashSet::from([vec![digest(10)]]);
        let manifest = pb::Manifest {
            images: vec![
                image(2, None, vec![layer(10), layer(11), layer(13), layer(14)]),
                image(3, None, vec![layer(12), layer(10)]),
            ],
            ..Default::default()
        };
        let plan = plan_load(&manifest, &present);
        let checked: Vec<&str> =
            plan.blobs.iter().filter(|blob| blob.checked_by_engine).map(|blob| blob.digest.as_str()).collect();
        assert_eq!(checked, vec![digest(11).as_str(), digest(13).as_str(), digest(14).as_str()]);
        assert!(plan.blobs.iter().any(|blob| blob.digest == digest(10) && !blob.skipped), "layer 10 is streamed");
    }

    #[test]
    fn an_oci_load_writes_each_blob_once_into_the_layout_and_leaves_caches_out() {
        let blob = |n: u8, size| pb::Layer { digest: digest(n), size, stored_size: size, ..Default::default() };
        let image = |id: u8, tag: &str, layers: Vec<pb::Layer>| pb::Image {
            id: digest(id),
            repo_tags: vec![tag.to_owned()],
            oci_media_type: "application/vnd.oci.image.index.v1+json".into(),
            config_size: 7,
            layers,
            oci_blobs: vec![blob(id + 100, 3)],
            ..Default::default()
        };
        let cache = pb::Image { build_cache: true, ..image(9, "", vec![blob(50, 5)]) };
        let manifest = pb::Manifest {
            images: vec![
                image(1, "base:1", vec![blob(10, 4)]),
                image(2, "app:1", vec![blob(10, 4), blob(11, 6)]),
                cache,
            ],
            ..Default::default()
        };
        let plan = plan_oci_load(&manifest, std::path::Path::new("/layout"), &HostBlobs::default());
        assert!(plan.held.is_empty() && plan.from_host.is_empty(), "no content store here: copies");
        let digests: Vec<&str> = plan.blobs.iter().map(|blob| blob.digest.as_str()).collect();
        // Each image's index, its other blob and its layers; the shared layer once; no cache blob.
        assert_eq!(digests.len(), 6, "{digests:?}");
        assert!(!digests.contains(&digest(50).as_str()) && !digests.contains(&digest(9).as_str()));
        for blob in &plan.blobs {
            assert_eq!(blob.path_in_tar, format!("blobs/sha256/{}", hex(&blob.digest)));
            assert_eq!(
                blob.copy_to.as_deref(),
                Some(std::path::Path::new("/layout").join(&blob.path_in_tar).as_path())
            );
        }
        let names: Vec<&str> = plan.trailer.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, vec!["oci-layout", "index.json"]);
        let index: serde_json::Value = serde_json::from_slice(&plan.trailer[1].1).unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "one per tag: {index}");
    }

    #[tokio::test]
    async fn an_oci_load_leaves_out_what_the_host_holds_and_writes_each_layer_once() {
        let blob = |n: u8, size| pb::Layer { digest: digest(n), size, stored_size: size, ..Default::default() };
        let image = pb::Image {
            id: digest(1),
            repo_tags: vec!["app:1".into()],
            oci_media_type: "application/vnd.oci.image.index.v1+json".into(),
            config_size: 7,
            layers: vec![blob(10, 4), blob(11, 6)],
            oci_blobs: vec![blob(101, 3), blob(102, 3)],
            ..Default::default()
        };
        let manifest = pb::Manifest { images: vec![image], ..Default::default() };
        let content = tempfile::tempdir().unwrap();
        for held in [10, 102] {
            std::fs::write(content.path().join(hex(&digest(held))), "held").unwrap();
        }
        let mut host = HostBlobs::in_store(crate::content_store::ContentStore::Folder(content.path().to_owned()));
        host.ask([1, 10, 11, 101, 102].map(digest)).await;
        let layout = tempfile::tempdir().unwrap();
        let in_layout = |n: u8| layout.path().join(format!("blobs/sha256/{}", hex(&digest(n))));
        let plan = plan_oci_load(&manifest, layout.path(), &host);
        assert_eq!(plan.held, vec![digest(102), digest(10)], "what the host holds: no entry, no download");
        let streamed: Vec<(&str, Option<&std::path::Path>)> =
            plan.blobs.iter().map(|blob| (blob.digest.as_str(), blob.copy_to.as_deref())).collect();
        let (index, other) = (in_layout(1), in_layout(101));
        assert_eq!(
            streamed,
            vec![
                (digest(1).as_str(), Some(index.as_path())),
                (digest(101).as_str(), Some(other.as_path())),
                (digest(11).as_str(), None)
            ],
            "the small blobs copied as they pass; the layer written by the engine alone"
        );
        assert_eq!(plan.from_host, vec![(digest(102), in_layout(102))]);
        std::fs::create_dir_all(layout.path().join("blobs/sha256")).unwrap();
        host.copy_out(plan.from_host).await.unwrap();
        assert_eq!(std::fs::read(in_layout(102)).unwrap(), b"held");
    }

    #[tokio::test]
    async fn the_blobs_the_host_holds_have_no_entry_and_count_as_found() {
        let new = b"a blob the host lacks".as_slice();
        let store = Blobs(Arc::new([(proto::digest::sha256_digest(new), Bytes::copy_from_slice(new))].into()));
        let plan = LoadPlan {
            blobs: vec![blob(new)],
            trailer: vec![("index.json".into(), b"{}".to_vec())],
            held: vec![digest(7)],
            from_host: Vec::new(),
        };
        let (stream, outcome) = load_stream(store, plan, 2, Bar::none());
        let (bytes, failed) = read_all(stream).await;
        assert!(!failed);
        let names = entry_names(&bytes);
        assert_eq!(names.len(), 2, "the new blob and index.json: {names:?}");
        let StreamEnd::Finished(streamed) = outcome.ended().await else { panic!("the stream did not finish") };
        assert_eq!(streamed.skipped, vec![digest(7)]);
        assert_eq!(streamed.blobs.len(), 1);
    }

    #[test]
    fn headers_and_padding_keep_512_byte_blocks() {
        assert_eq!(tar_header("x.json", 3).len(), 512);
        assert_eq!(padding(3).len(), 509);
        assert_eq!(padding(1024).len(), 0);
    }

    /// Blobs by digest, read in parts of 3 bytes, each arriving a byte at a time.
    #[derive(Clone)]
    struct Blobs(Arc<std::collections::HashMap<String, Bytes>>);

    impl BlobReader for Blobs {
        fn part_size_for(&self, _size: u64) -> u64 {
            3
        }

        async fn download_range(&self, digest: &str, offset: u64, length: u64) -> Result<Bytes, TransferError> {
            let blob = self.0.get(digest).ok_or_else(|| TransferError::NotStored { digest: digest.to_owned() })?;
            Ok(blob.slice(offset as usize..(offset + length) as usize))
        }

        async fn download_range_pieces(
            &self,
            digest: &str,
            offset: u64,
            length: u64,
        ) -> Result<Vec<Bytes>, TransferError> {
            let part = self.download_range(digest, offset, length).await?;
            Ok((0..part.len()).map(|at| part.slice(at..at + 1)).collect())
        }

        async fn download(&self, _digest: &str) -> Result<BlobBody, TransferError> {
            unreachable!("a load reads ranges")
        }
    }

    fn blob(bytes: &[u8]) -> PlannedBlob {
        let digest = proto::digest::sha256_digest(bytes);
        PlannedBlob {
            path_in_tar: format!("{}.json", hex(&digest)),
            stored_digest: digest.clone(),
            digest,
            size: bytes.len() as u64,
            skipped: false,
            copy_to: None,
            checked_by_engine: false,
        }
    }

    /// The names of a tarball's entries, in order.
    fn entry_names(bytes: &[u8]) -> Vec<String> {
        tar::Archive::new(bytes)
            .entries()
            .unwrap()
            .map(|entry| entry.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// Reads the whole stream: its bytes, and whether it ended with an error.
    async fn read_all(stream: impl Stream<Item = std::io::Result<Bytes>>) -> (Vec<u8>, bool) {
        let mut stream = std::pin::pin!(stream);
        let mut bytes = Vec::new();
        while let Some(piece) = stream.next().await {
            match piece {
                Ok(piece) => bytes.extend_from_slice(&piece),
                Err(_) => return (bytes, true),
            }
        }
        (bytes, false)
    }

    #[tokio::test]
    async fn a_verified_stream_returns_what_it_wrote() {
        let (first, second) = (b"the first blob".as_slice(), b"a second one".as_slice());
        let store = Blobs(Arc::new(
            [first, second].map(|b| (proto::digest::sha256_digest(b), Bytes::copy_from_slice(b))).into(),
        ));
        let plan = LoadPlan {
            blobs: vec![blob(first), blob(second)],
            trailer: vec![("manifest.json".into(), b"[]".to_vec())],
            ..LoadPlan::default()
        };
        let (stream, outcome) = load_stream(store, plan, 2, Bar::none());
        let (bytes, failed) = read_all(stream).await;
        assert!(!failed);
        let names = entry_names(&bytes);
        assert_eq!(names.last().map(String::as_str), Some("manifest.json"));
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
        assert_eq!(content, first, "the pieces in order, as they arrived");
        let StreamEnd::Finished(streamed) = outcome.ended().await else { panic!("the stream did not finish") };
        let sizes: Vec<u64> = streamed.blobs.iter().map(|blob| blob.bytes).collect();
        assert_eq!(sizes, vec![first.len() as u64, second.len() as u64]);
    }

    #[tokio::test]
    async fn a_layer_left_to_the_engine_streams_unhashed_and_is_found_if_the_engine_refuses_it() {
        let intact = b"an intact layer".as_slice();
        let corrupt = PlannedBlob { checked_by_engine: true, ..blob(b"what the manifest says") };
        let store = Blobs(Arc::new(
            [
                (proto::digest::sha256_digest(intact), Bytes::copy_from_slice(intact)),
                (corrupt.digest.clone(), Bytes::from_static(b"what the store returns")),
            ]
            .into(),
        ));
        let intact = PlannedBlob { checked_by_engine: true, ..blob(intact) };
        let plan = LoadPlan {
            blobs: vec![intact.clone(), corrupt.clone()],
            trailer: vec![("manifest.json".into(), b"[]".to_vec())],
            ..LoadPlan::default()
        };
        let (stream, outcome) = load_stream(store.clone(), plan, 2, Bar::none());
        let (bytes, failed) = read_all(stream).await;
        assert!(!failed, "the engine's check, not the stream's");
        assert_eq!(entry_names(&bytes).last().map(String::as_str), Some("manifest.json"));
        let StreamEnd::Finished(streamed) = outcome.ended().await else { panic!("the stream did not finish") };
        assert_eq!(streamed.blobs.len(), 2);

        assert_eq!(find_corrupt(store.clone(), std::slice::from_ref(&intact), 2).await, None);
        let Some(LoadFailure::DigestMismatch { digest, actual }) =
            find_corrupt(store.clone(), &[intact.clone(), corrupt.clone()], 2).await
        else {
            panic!("the corrupt layer is not found")
        };
        assert_eq!((digest, actual), (corrupt.digest, proto::digest::sha256_digest(b"what the store returns")));
        let lost = PlannedBlob { checked_by_engine: true, ..blob(b"a blob the store lost") };
        let missing = find_corrupt(store, &[intact, lost.clone()], 2).await;
        assert_eq!(missing, Some(LoadFailure::Missing { digest: lost.digest }));
    }

    #[tokio::test]
    async fn a_corrupt_blob_ends_the_stream_before_the_trailer() {
        let good = b"a good blob".as_slice();
        let corrupt = blob(b"what the manifest says");
        let store = Blobs(Arc::new(
            [
                (proto::digest::sha256_digest(good), Bytes::copy_from_slice(good)),
                (corrupt.digest.clone(), Bytes::from_static(b"what the store returns")),
            ]
            .into(),
        ));
        let plan = LoadPlan {
            blobs: vec![blob(good), corrupt.clone()],
            trailer: vec![("manifest.json".into(), b"[]".to_vec())],
            ..LoadPlan::default()
        };
        let (stream, outcome) = load_stream(store, plan, 2, Bar::none());
        let (bytes, failed) = read_all(stream).await;
        assert!(failed, "the stream ends with an error");
        assert!(!bytes.windows(13).any(|window| window == b"manifest.json"), "no trailer was written");
        let StreamEnd::Failed(LoadFailure::DigestMismatch { digest, .. }) = outcome.ended().await else {
            panic!("the mismatch is not the outcome")
        };
        assert_eq!(digest, corrupt.digest);
    }
}
