//! The blobs a save reads from files, a content store or memory (the engine's stores read in
//! place, see `save_source.rs`; an OCI export's spool; the build's cache folder) and uploads.
//!
//! Whatever is read here is checked against its digest as it streams to the upload, which
//! fails before the store keeps a blob that does not match.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use crate::content_store::ContentStore;
use crate::error::WorkerError;
use crate::export::{STREAM_PIECES, SendError, send_checked};
use crate::layer_store::LayerStore;
use crate::progress::{Bar, Progress, short_digest};
use crate::transfer::BlobStore;
use crate::upload::{Moved, upload_bounded};

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

/// A blob in a content store (a folder of blob files, or containerd's socket), as a
/// [`DirectBlob`].
pub fn from_content_store(digest: &str, store: ContentStore) -> DirectBlob {
    let name = digest.to_owned();
    DirectBlob { digest: digest.to_owned(), open: Box::new(move || store.open(&name)) }
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
