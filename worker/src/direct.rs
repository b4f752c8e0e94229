//! Where a save reads the blobs it uploads: straight from the engine's own stores when this
//! worker can read them (the graph driver's layers, `layer_store.rs`; the containerd image
//! store's content store, read by `oci.rs`), so a save reads only the blobs the project lacks
//! and never waits for `docker save`. Otherwise (a remote engine, another driver, a data root
//! this worker cannot see or read) the save reads the engine's export, and says why once.
//!
//! Whatever is read here is checked against its digest as it streams to the upload, which
//! fails before the store keeps a blob that does not match.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use crate::docker::Storage;
use crate::error::WorkerError;
use crate::export::{STREAM_PIECES, SendError, send_checked};
use crate::layer_store::LayerStore;
use crate::progress::{Bar, Progress, short_digest};
use crate::transfer::BlobStore;
use crate::upload::{Moved, upload_bounded};

/// The engine's stores, as this worker reads them.
#[derive(Debug, Clone)]
pub enum Stores {
    /// The graph driver's layer and image stores.
    Layers(LayerStore),
    /// The containerd image store's content store: `<hex>` blob files.
    Content(PathBuf),
}

/// Where containerd keeps blobs: the engine's own containerd under its data root, else the
/// system's (an engine started with `--containerd`).
fn content_store_dirs(storage: &Storage) -> [PathBuf; 2] {
    [
        storage.data_root.join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256"),
        PathBuf::from("/var/lib/containerd/io.containerd.content.v1.content/blobs/sha256"),
    ]
}

impl Stores {
    /// The engine's stores if this worker can read them; otherwise why not, for the log. On
    /// the containerd image store, the content store is the one that holds the image `probe`.
    pub fn open(storage: &Storage, probe: &str) -> Result<Stores, String> {
        if !storage.is_local() {
            return Err(format!("the engine at {} is not on this host", storage.host));
        }
        if storage.data_root.as_os_str().is_empty() {
            return Err("the engine did not say where its data root is".into());
        }
        if !storage.containerd_store {
            return LayerStore::open(&storage.data_root, &storage.driver).map(Stores::Layers);
        }
        let dirs = content_store_dirs(storage);
        let hex = probe.trim_start_matches("sha256:");
        if proto::names::validate_digest(probe).is_ok()
            && let Some(dir) = dirs.iter().find(|dir| dir.join(hex).is_file())
        {
            return Ok(Stores::Content(dir.clone()));
        }
        Err(format!("this worker cannot read the engine's content store ({})", dirs[0].display()))
    }
}

/// What a blob is read from, opened on a blocking thread when its upload starts.
pub type Open = Box<dyn FnOnce() -> std::io::Result<(u64, Box<dyn Read + Send>)> + Send>;

/// A blob to read from the engine's stores and upload.
pub struct DirectBlob {
    pub digest: String,
    pub open: Open,
}

/// Blobs read at once: each holds [`STREAM_PIECES`] MiB in its reader and up to five parts in
/// its upload, so this bounds the save's memory whatever the plan allows.
const READERS: usize = 4;

/// Reads and uploads `blobs`, `concurrency` at a time (at most [`READERS`]), each checked
/// against its digest as it streams. A blob that cannot be read fails the save with
/// [`WorkerError::Direct`] (the caller falls back to the export); a failed upload with its
/// own error.
pub async fn upload_all(
    store: &BlobStore,
    concurrency: usize,
    blobs: Vec<DirectBlob>,
    progress: &Progress,
) -> Result<Vec<Moved>, WorkerError> {
    upload_bounded(concurrency.clamp(1, READERS), futures::stream::iter(blobs), |blob| {
        let (store, progress) = (store.clone(), progress.clone());
        async move { upload_one(&store, blob, &progress).await }
    })
    .await
}

/// Why a direct read failed, naming the blob.
fn unreadable(digest: &str, error: impl std::fmt::Display) -> WorkerError {
    WorkerError::Direct(format!("reading blob {digest} failed: {error}"))
}

async fn upload_one(store: &BlobStore, blob: DirectBlob, progress: &Progress) -> Result<Moved, WorkerError> {
    let started = Instant::now();
    let DirectBlob { digest, open } = blob;
    let (sender, body) = tokio::sync::mpsc::channel(STREAM_PIECES);
    let (size_sender, size) = tokio::sync::oneshot::channel();
    let expected = digest.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let (size, mut reader) = open().map_err(SendError::Read)?;
        let _ = size_sender.send(size);
        send_checked(&mut reader, &expected, &sender)
    });
    let read_failed = |result: Result<Result<(), SendError>, tokio::task::JoinError>| match result {
        Ok(Ok(())) | Ok(Err(SendError::Closed)) => None,
        Ok(Err(SendError::Read(error))) => Some(unreadable(&digest, error)),
        Ok(Err(SendError::Mismatch { actual })) => Some(unreadable(&digest, format!("it hashes to {actual}"))),
        Err(error) => Some(WorkerError::Internal(error)),
    };
    let Ok(size) = size.await else {
        // Opening failed: the reader says why.
        return Err(read_failed(reader.await).unwrap_or_else(|| unreadable(&digest, "it could not be opened")));
    };
    let bar = if size >= 1 << 20 { progress.bar(&short_digest(&digest), size) } else { Bar::none() };
    let uploaded = store.upload_stream(&digest, size, body, &bar).await;
    // A read failure is the cause when the upload failed because of it.
    if let Some(error) = read_failed(reader.await) {
        return Err(error);
    }
    uploaded?;
    bar.finish();
    Ok((digest, size, started.elapsed().as_secs_f64()))
}

/// A blob already in memory (a config), as a [`DirectBlob`].
pub fn from_bytes(digest: &str, bytes: Vec<u8>) -> DirectBlob {
    DirectBlob {
        digest: digest.to_owned(),
        open: Box::new(move || Ok((bytes.len() as u64, Box::new(std::io::Cursor::new(bytes)) as Box<dyn Read + Send>))),
    }
}

/// A blob in a file (the content store's), as a [`DirectBlob`].
pub fn from_file(digest: &str, path: PathBuf) -> DirectBlob {
    DirectBlob {
        digest: digest.to_owned(),
        open: Box::new(move || {
            let file = std::fs::File::open(&path)?;
            let size = file.metadata()?.len();
            Ok((size, Box::new(file) as Box<dyn Read + Send>))
        }),
    }
}

/// The layer of an image in the layer store, as a [`DirectBlob`].
pub fn from_layer_store(store: &LayerStore, chain_id: &str, diff_id: &str) -> DirectBlob {
    let (store, chain_id, expected) = (store.clone(), chain_id.to_owned(), diff_id.to_owned());
    DirectBlob {
        digest: diff_id.to_owned(),
        open: Box::new(move || {
            let layer = store.layer(&chain_id, &expected)?;
            Ok((layer.size, Box::new(layer.reader) as Box<dyn Read + Send>))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(data_root: &std::path::Path, containerd_store: bool, host: &str) -> Storage {
        Storage { driver: "overlay2".into(), data_root: data_root.to_owned(), containerd_store, host: host.into() }
    }

    #[test]
    fn a_remote_engine_or_an_unreadable_store_is_read_through_its_export_with_the_reason() {
        let root = tempfile::tempdir().unwrap();
        let remote = Stores::open(&storage(root.path(), false, "tcp://10.0.0.5:2376"), "").unwrap_err();
        assert_eq!(remote, "the engine at tcp://10.0.0.5:2376 is not on this host");
        let empty = Stores::open(&storage(root.path(), false, "unix:///run/docker.sock"), "").unwrap_err();
        assert!(empty.starts_with("this worker cannot read the engine's data root"), "{empty}");
        let probe = format!("sha256:{}", "a".repeat(64));
        let no_content = Stores::open(&storage(root.path(), true, "unix:///run/docker.sock"), &probe).unwrap_err();
        assert!(no_content.starts_with("this worker cannot read the engine's content store"), "{no_content}");
    }

    #[test]
    fn the_content_store_is_the_one_holding_the_image() {
        let root = tempfile::tempdir().unwrap();
        let blobs = root.path().join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let probe = format!("sha256:{}", "a".repeat(64));
        let at = storage(root.path(), true, "unix:///run/docker.sock");
        assert!(Stores::open(&at, &probe).is_err(), "an empty store is not the engine's");
        std::fs::write(blobs.join("a".repeat(64)), "{}").unwrap();
        assert!(matches!(Stores::open(&at, &probe), Ok(Stores::Content(dir)) if dir == blobs));
        assert!(Stores::open(&at, "sha256:../../etc").is_err(), "a bad digest names no file");
    }
}
