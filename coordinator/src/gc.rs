//! Garbage collection from the ledger: blobs no manifest names, unreferenced for longer than
//! the grace period and named by no open save, are forgotten and then deleted from the store,
//! in the background every `--gc-interval` and on demand (`cachectl gc [PROJECT] [--dry-run]`).
//!
//! The protocol, under the project's publish lock held exclusively (commits hold it shared
//! while they check and record their blobs; a `BeginSave` while it reads the ledger and
//! registers the save): the candidates are chosen, their ledger records removed (each only if
//! it still has no reference) and made durable, then their objects deleted. A commit after
//! finds a collected blob unknown and checks the store, which no longer has it; no manifest
//! ever names a deleted blob.

use proto::v1 as pb;

use crate::credentials::{now_unix, project_prefix};
use crate::error::Error;
use crate::saves::blob_key;
use crate::service::CacheService;

impl CacheService {
    /// Collects one project's garbage; with `dry_run`, only says what it would remove.
    pub async fn collect_garbage(&self, project: &str, dry_run: bool) -> Result<pb::GarbageCollected, Error> {
        self.existing_project(project)?;
        let publish_lock = self.publish_lock.of_project(project);
        let _exclusive = publish_lock.write().await;
        let now = now_unix();
        let grace = self.gc_grace.as_secs() as i64;
        let candidates: Vec<String> = self
            .db
            .unreferenced_blobs(project, now)?
            .into_iter()
            .filter(|(digest, record)| {
                now - record.unreferenced_since_unix >= grace && !self.pending_saves.named(project, digest)
            })
            .map(|(digest, _)| digest)
            .collect();
        let forgotten = if dry_run {
            self.db.stored_blobs(project, &candidates)?.into_iter().collect()
        } else {
            let forgotten = self.db.forget_unreferenced(project, &candidates)?;
            self.db.durable().await?;
            forgotten
        };
        let bytes: u64 = forgotten.iter().map(|(_, record)| record.stored_size).sum();
        if !dry_run && !forgotten.is_empty() {
            let prefix = project_prefix(&self.store_prefix, project);
            let keys: std::collections::HashSet<String> =
                forgotten.iter().map(|(digest, _)| blob_key(&prefix, digest)).collect();
            self.store.delete_prefix(&format!("{prefix}blobs/sha256/"), &|key: &str| !keys.contains(key)).await?;
            self.metrics.record_eviction(project, "unreferenced", forgotten.len() as u64, bytes);
            tracing::info!(project, blobs = forgotten.len(), bytes, "garbage collected");
        }
        Ok(pb::GarbageCollected { project: project.to_owned(), blobs: forgotten.len() as u64, bytes, dry_run })
    }

    /// Collects every project's garbage (the background run, and `cachectl gc` without a
    /// project). A project that fails is logged and the others go on.
    pub async fn collect_all_garbage(&self, dry_run: bool) -> Result<Vec<pb::GarbageCollected>, Error> {
        let mut collected = Vec::new();
        for project in self.db.projects()? {
            match self.collect_garbage(&project.name, dry_run).await {
                Ok(done) => collected.push(done),
                Err(error) => {
                    tracing::warn!(project = project.name, %error, "garbage collection failed; it is tried again")
                }
            }
        }
        Ok(collected)
    }
}
