//! The one bounded upload loop: blobs from any source, a few at a time, failing early.

use std::future::Future;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::Semaphore;

use crate::error::WorkerError;

/// One uploaded blob: its digest, its size in bytes and the seconds its upload took.
pub type Moved = (String, u64, f64);

/// The per-layer figures of a save's report (or a view's reads): each blob moved, then each the
/// store already held.
pub fn layer_metrics(moved: &[Moved], stored: &[proto::v1::Layer]) -> Vec<proto::v1::LayerMetric> {
    use proto::v1::{LayerMetric, LayerOutcome};
    let transferred = moved.iter().map(|(digest, bytes, seconds)| LayerMetric {
        digest: digest.clone(),
        bytes: *bytes,
        seconds: *seconds,
        outcome: LayerOutcome::Transferred as i32,
    });
    let found = stored.iter().map(|blob| LayerMetric {
        digest: blob.digest.clone(),
        bytes: blob.stored_size,
        seconds: 0.0,
        outcome: LayerOutcome::Found as i32,
    });
    transferred.chain(found).collect()
}

/// Runs `upload` on each item of `blobs`, at most `concurrency` at once (at least one). The
/// next item is taken only when a slot is free, so a source that reads or spools ahead is held
/// back; a failure is surfaced before the next item is taken, not after the whole source.
pub async fn upload_bounded<T, S, F, Fut>(concurrency: usize, blobs: S, upload: F) -> Result<Vec<Moved>, WorkerError>
where
    S: Stream<Item = T> + Unpin,
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<Moved, WorkerError>> + Send + 'static,
{
    let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut uploads = tokio::task::JoinSet::new();
    let mut moved = Vec::new();
    let mut blobs = blobs;
    while let Some(blob) = blobs.next().await {
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore is never closed");
        let uploaded = upload(blob);
        uploads.spawn(async move {
            let _permit = permit;
            uploaded.await
        });
        while let Some(finished) = uploads.try_join_next() {
            moved.push(finished??);
        }
    }
    while let Some(finished) = uploads.join_next().await {
        moved.push(finished??);
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_blob_is_uploaded_and_a_failure_is_returned() {
        let blobs = futures::stream::iter(vec![1u64, 2, 3]);
        let mut moved = upload_bounded(2, blobs, |n| async move { Ok((format!("sha256:{n}"), n, 0.0)) }).await.unwrap();
        moved.sort_by_key(|(_, size, _)| *size);
        assert_eq!(moved.iter().map(|(_, size, _)| *size).collect::<Vec<_>>(), [1, 2, 3]);

        let blobs = futures::stream::iter(vec![1u64, 2]);
        let failed = upload_bounded(1, blobs, |n| async move {
            if n == 2 { Err(WorkerError::Save("no".into())) } else { Ok((String::new(), n, 0.0)) }
        })
        .await;
        assert!(matches!(failed, Err(WorkerError::Save(_))), "{failed:?}");
    }

    #[tokio::test]
    async fn a_panicked_upload_is_an_internal_error() {
        let blobs = futures::stream::iter(vec![1u64]);
        let failed = upload_bounded(1, blobs, |_| async move { panic!("a bug") }).await;
        let error = failed.unwrap_err();
        assert!(matches!(error, WorkerError::Internal(_)), "{error:?}");
        assert_eq!(error.exit_code(), 70);
    }
}
