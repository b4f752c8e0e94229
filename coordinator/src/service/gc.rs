//! A project's store over its life: garbage collection from the ledger, expiry of unused
//! caches, and its quota, each removing blobs only once nothing can need them.
//!
//! - **Collection** (every `--gc-interval`, and `cachectl gc [PROJECT] [--dry-run]`): caches
//!   neither restored nor saved for `--cache-expiry` are evicted; blobs no manifest names,
//!   unreferenced for longer than `--gc-grace`, are removed; so are objects the ledger never
//!   recorded (uploads of saves that never committed) written longer than the grace ago, and
//!   multipart uploads never completed and untouched as long (flush and project deletion
//!   abort them all).
//! - **Quota** (after each commit, and `cachectl project set-quota`): while the ledger's bytes
//!   exceed the project's quota, blobs no manifest names go first, then the least recently
//!   used caches, the one just saved last of all. A single save larger than the quota is
//!   refused at its commit ([`CacheService::refuse_over_quota`]).
//!
//! The protocol, under the project's publish lock held exclusively (commits hold it shared
//! while they check and record their blobs; a `BeginSave` and a `Lookup` while they read and
//! register): an evicted cache's manifest goes first, with its blobs' references, in one
//! transaction; then the blobs left with none are forgotten (each only if it still has no
//! reference), made durable, and only then deleted from the store. Never deleted: a blob an
//! open save names (it may commit it) or a running restore reads (its lease names the
//! manifest's blobs). A commit after finds a deleted blob unknown and checks the store, which
//! no longer has it; so no manifest ever names a deleted blob, and no restore starts on one.

use std::collections::{BTreeSet, HashMap};

use proto::object_keys::{blob_key, blobs_prefix, project_prefix};
use proto::v1 as pb;

use super::CacheService;
use crate::error::Error;
use crate::state::{BlobRecord, manifest_digests};
use crate::store::{ObjectTotals, PendingUpload, StoredObject};

/// When a cache was last used: its last restore or save (its creation, for a manifest written
/// before use was recorded).
fn last_used(manifest: &pb::Manifest) -> i64 {
    manifest.last_used_unix.max(manifest.created_unix)
}

impl CacheService {
    /// Whether nothing may delete one of `project`'s blobs now: an open save names it, or a
    /// running restore reads it.
    async fn protected(&self, project: &str) -> Result<impl Fn(&str) -> bool + use<>, Error> {
        let read = self.budget.read_by_restores(project, self.clock.now_unix_ms()).await?;
        let named = self.pending_saves.named(project).await?;
        Ok(move |digest: &str| read.contains(digest) || named.contains(digest))
    }

    /// Makes the forgetting of `forgotten` durable, then deletes their objects, and counts them
    /// in the metrics under `reason`. The caller holds the project's publish lock exclusively.
    async fn delete_forgotten(
        &self,
        project: &str,
        forgotten: &[(String, BlobRecord)],
        reason: &str,
    ) -> Result<ObjectTotals, Error> {
        let totals = ObjectTotals {
            count: forgotten.len() as u64,
            bytes: forgotten.iter().map(|(_, record)| record.stored_size).sum(),
        };
        if forgotten.is_empty() {
            return Ok(totals);
        }
        self.db.durable().await?;
        let prefix = project_prefix(&self.store_prefix, project);
        let keys: Vec<String> = forgotten.iter().map(|(digest, _)| blob_key(&prefix, digest)).collect();
        self.store.delete_keys(&keys).await?;
        self.metrics.record_eviction(project, reason, totals.count, totals.bytes);
        Ok(totals)
    }

    /// Evicts the caches of `keys` (their manifests first); returns the blobs they leave
    /// unreferenced that nothing protects, and the caches evicted.
    async fn evict_caches(
        &self,
        project: &str,
        keys: &[pb::CacheKey],
        reason: &str,
    ) -> Result<(Vec<String>, Vec<pb::CacheKey>), Error> {
        let protected = self.protected(project).await?;
        let (mut removable, mut evicted) = (Vec::new(), Vec::new());
        for key in keys {
            if let Some(unreferenced) = self.db.remove_manifest(project, key, self.clock.now_unix()).await? {
                removable.extend(unreferenced.into_iter().filter(|digest| !protected(digest)));
                evicted.push(key.clone());
            }
        }
        self.metrics.record_cache_evictions(project, reason, evicted.len() as u64);
        for key in &evicted {
            tracing::info!(project, service = key.service, branch = key.branch, reason, "cache evicted");
        }
        Ok((removable, evicted))
    }

    /// Collects one project's garbage: expired caches, then blobs unreferenced past the grace
    /// period, strays and incomplete uploads untouched for it; with `dry_run`, only says what
    /// it would remove.
    pub async fn collect_garbage(&self, project: &str, dry_run: bool) -> Result<pb::GarbageCollected, Error> {
        self.existing_project(project).await?;
        // Listed before the lock, which saves and restores of the project wait for; what is
        // stray is decided under it.
        let listed = self.store.list(&blobs_prefix(&project_prefix(&self.store_prefix, project))).await?;
        let _exclusive = self.lock_project(project, super::Lock::Exclusive).await?;
        let now = self.clock.now_unix();
        let expiry = self.cache_expiry.as_secs() as i64;
        let manifests = self.db.manifests(project).await?;
        let expired: Vec<pb::CacheKey> = manifests
            .iter()
            .filter(|manifest| expiry > 0 && now - last_used(manifest) >= expiry)
            .map(|manifest| manifest.key.clone().unwrap_or_default())
            .collect();
        let grace = self.gc_grace.as_secs() as i64;
        let protected = self.protected(project).await?;
        let past_grace = |record: &BlobRecord| now - record.unreferenced_since_unix >= grace;
        let collectable: Vec<String> = self
            .db
            .unreferenced_blobs(project, now)
            .await?
            .into_iter()
            .filter(|(digest, record)| past_grace(record) && !protected(digest))
            .map(|(digest, _)| digest)
            .collect();
        let strays = self.strays(project, listed, now, grace).await?;
        let stale_uploads: Vec<PendingUpload> =
            crate::store::pending_uploads_or_none(self.store.as_ref(), &project_prefix(&self.store_prefix, project))
                .await
                .into_iter()
                .filter(|upload| now - upload.modified_unix >= grace && !protected(&upload_digest(&upload.key)))
                .collect();
        let uploads = ObjectTotals {
            count: stale_uploads.len() as u64,
            bytes: stale_uploads.iter().map(|upload| upload.bytes).sum(),
        };
        if dry_run {
            // What expiring would leave unreferenced: blobs only the expired caches name.
            let kept: BTreeSet<String> = manifests
                .iter()
                .filter(|manifest| !expired.contains(&manifest.key.clone().unwrap_or_default()))
                .flat_map(manifest_digests)
                .collect();
            let mut would_remove: BTreeSet<String> = manifests
                .iter()
                .filter(|manifest| expired.contains(&manifest.key.clone().unwrap_or_default()))
                .flat_map(manifest_digests)
                .filter(|digest| !kept.contains(digest) && !protected(digest))
                .collect();
            would_remove.extend(collectable);
            let would_remove: Vec<String> = would_remove.into_iter().collect();
            let records = self.db.stored_blobs(project, &would_remove).await?;
            return Ok(pb::GarbageCollected {
                project: project.to_owned(),
                blobs: (records.len() + strays.len()) as u64 + uploads.count,
                bytes: records.values().map(|record| record.stored_size).sum::<u64>()
                    + strays.iter().map(|object| object.size).sum::<u64>()
                    + uploads.bytes,
                dry_run,
                expired,
            });
        }
        let (left_by_expired, expired) = self.evict_caches(project, &expired, "expired").await?;
        let forgotten = self.db.forget_unreferenced(project, &left_by_expired).await?;
        let removed_expired = self.delete_forgotten(project, &forgotten, "expired").await?;
        let forgotten = self.db.forget_unreferenced(project, &collectable).await?;
        let removed = self.delete_forgotten(project, &forgotten, "unreferenced").await?;
        let removed_strays = self.delete_strays(project, &strays).await?;
        // Multipart uploads begun and left (a killed worker's, or a key holder's that never
        // completes them): aborted once untouched for the grace period.
        let uploads = match self.store.abort_uploads(&stale_uploads).await {
            Ok(()) => uploads,
            Err(error) => {
                tracing::warn!(project, error = %error.line(), "aborting incomplete multipart uploads failed; the next collection tries again");
                ObjectTotals::default()
            }
        };
        if uploads.count > 0 {
            self.metrics.record_eviction(project, "uncommitted", uploads.count, uploads.bytes);
        }
        let blobs = removed.count + removed_expired.count + removed_strays.count + uploads.count;
        let bytes = removed.bytes + removed_expired.bytes + removed_strays.bytes + uploads.bytes;
        if blobs > 0 || !expired.is_empty() {
            tracing::info!(project, blobs, bytes, expired_caches = expired.len(), "garbage collected");
        }
        Ok(pb::GarbageCollected { project: project.to_owned(), blobs, bytes, dry_run, expired })
    }

    /// The project's blob objects the ledger does not record, written longer than the grace
    /// period ago, that no open save names: uploads of saves that never committed (their
    /// worker died, or the save was refused). The caller holds the publish lock exclusively.
    async fn strays(
        &self,
        project: &str,
        listed: Vec<StoredObject>,
        now: i64,
        grace: i64,
    ) -> Result<Vec<StoredObject>, Error> {
        let recorded = self.db.ledger_digests(project).await?;
        let blobs = blobs_prefix(&project_prefix(&self.store_prefix, project));
        let protected = self.protected(project).await?;
        Ok(listed
            .into_iter()
            .filter(|object| {
                let digest = format!("sha256:{}", object.key.strip_prefix(&blobs).unwrap_or_default());
                !recorded.contains(&digest) && now - object.modified_unix >= grace && !protected(&digest)
            })
            .collect())
    }

    /// Deletes the stray objects [`CacheService::strays`] found.
    async fn delete_strays(&self, project: &str, strays: &[StoredObject]) -> Result<ObjectTotals, Error> {
        let deleted = ObjectTotals { count: strays.len() as u64, bytes: strays.iter().map(|object| object.size).sum() };
        if !strays.is_empty() {
            let keys: Vec<String> = strays.iter().map(|object| object.key.clone()).collect();
            self.store.delete_keys(&keys).await?;
            self.metrics.record_eviction(project, "uncommitted", deleted.count, deleted.bytes);
        }
        Ok(deleted)
    }

    /// Collects every project's garbage (the background run, and `cachectl gc` without a
    /// project). A project that fails is logged and the others go on.
    pub async fn collect_all_garbage(&self, dry_run: bool) -> Result<Vec<pb::GarbageCollected>, Error> {
        let mut collected = Vec::new();
        for project in self.db.projects().await? {
            match self.collect_garbage(&project.name, dry_run).await {
                Ok(done) => collected.push(done),
                Err(error) => {
                    tracing::warn!(project = project.name, error = %error.line(), "garbage collection failed; it is tried again")
                }
            }
        }
        Ok(collected)
    }

    /// Brings a project within its quota, if it has one: blobs no manifest names go first
    /// (grace or not, when nothing protects them), then the least recently used caches, `keep`
    /// (the cache just saved) never. With `saved_by` (the scope of the scoped token that saved
    /// `keep`), no cache of a branch that token may read but not write is evicted: those are
    /// what it falls back to, more trusted than itself (`main` for a fork's pull requests), so
    /// a less trusted token never evicts the default branch's cache; when the rest is not
    /// enough, `keep` goes too (and is among the caches answered). Takes the project's
    /// publish lock exclusively.
    pub async fn fit_quota(
        &self,
        project: &str,
        keep: Option<&pb::CacheKey>,
        saved_by: Option<&crate::tokens::BranchScope>,
    ) -> Result<pb::Evicted, Error> {
        let _exclusive = self.lock_project(project, super::Lock::Exclusive).await?;
        let quota = self.existing_project(project).await?.quota_bytes;
        if quota == 0 {
            return Ok(pb::Evicted::default());
        }
        // The manifests' own bytes count beside the blobs'.
        let mut caches = self.db.manifests(project).await?;
        let mut used =
            self.db.totals(project).await?.stored_bytes + caches.iter().map(super::saves::manifest_bytes).sum::<u64>();
        if used <= quota {
            return Ok(pb::Evicted::default());
        }
        let protected = self.protected(project).await?;
        let spare: Vec<String> = self
            .db
            .unreferenced_blobs(project, self.clock.now_unix())
            .await?
            .into_iter()
            .map(|(digest, _)| digest)
            .filter(|digest| !protected(digest))
            .collect();
        let mut forgotten = self.db.forget_unreferenced(project, &spare).await?;
        used -= forgotten.iter().map(|(_, record)| record.stored_size).sum::<u64>();
        caches.retain(|manifest| {
            let branch = manifest.key.as_ref().map_or("", |key| key.branch.as_str());
            let trusted_more = |scope: &crate::tokens::BranchScope| scope.may_read(branch) && !scope.may_write(branch);
            manifest.key.as_ref() != keep && !saved_by.is_some_and(trusted_more)
        });
        // Within a second, the earlier saved goes first.
        caches
            .sort_by_key(|manifest| (last_used(manifest), manifest.origin.as_ref().map_or(0, |o| o.committed_unix_ms)));
        let mut evicted = Vec::new();
        for manifest in caches {
            if used <= quota {
                break;
            }
            used -= super::saves::manifest_bytes(&manifest);
            let key = manifest.key.unwrap_or_default();
            let (removable, gone) = self.evict_caches(project, std::slice::from_ref(&key), "quota").await?;
            let freed = self.db.forget_unreferenced(project, &removable).await?;
            used -= freed.iter().map(|(_, record)| record.stored_size).sum::<u64>();
            forgotten.extend(freed);
            evicted.extend(gone);
        }
        if let (Some(_), Some(keep)) = (saved_by, keep)
            && used > quota
        {
            let (removable, gone) = self.evict_caches(project, std::slice::from_ref(keep), "quota").await?;
            let freed = self.db.forget_unreferenced(project, &removable).await?;
            used -= freed.iter().map(|(_, record)| record.stored_size).sum::<u64>();
            forgotten.extend(freed);
            evicted.extend(gone);
        }
        let removed = self.delete_forgotten(project, &forgotten, "quota").await?;
        if used > quota {
            tracing::warn!(
                project,
                used,
                quota,
                "still over its quota: what is left is the cache just saved, or blobs an open save or a running restore needs"
            );
        }
        Ok(pb::Evicted { caches: evicted, blobs: removed.count, bytes: removed.bytes })
    }

    /// A save whose blobs alone exceed its project's quota is not stored: the blobs it
    /// uploaded are removed (nothing names them) and the previous cache stays. Called by its
    /// commit, which no longer holds the publish lock.
    pub(crate) async fn refuse_over_quota(
        &self,
        project: &str,
        key: &pb::CacheKey,
        size: u64,
        quota: u64,
        uploaded: &HashMap<String, BlobRecord>,
    ) -> Error {
        let exclusive = match self.lock_project(project, super::Lock::Exclusive).await {
            Ok(exclusive) => exclusive,
            Err(error) => return error,
        };
        // Never recorded, so nothing names them, unless a save committed one since, or an open
        // save or a running restore needs it; what fails here a collection finds as a stray.
        let discarded = async {
            let digests: Vec<String> = uploaded.keys().cloned().collect();
            let recorded = self.db.stored_blobs(project, &digests).await?;
            let protected = self.protected(project).await?;
            let prefix = project_prefix(&self.store_prefix, project);
            let doomed: Vec<(&String, &BlobRecord)> =
                uploaded.iter().filter(|(digest, _)| !recorded.contains_key(*digest) && !protected(digest)).collect();
            let keys: Vec<String> = doomed.iter().map(|(digest, _)| blob_key(&prefix, digest)).collect();
            self.store.delete_keys(&keys).await?;
            let bytes = doomed.iter().map(|(_, record)| record.stored_size).sum();
            self.metrics.record_eviction(project, "quota", keys.len() as u64, bytes);
            Ok::<_, Error>(())
        };
        if let Err(error) = discarded.await {
            tracing::warn!(project, error = %error.line(), "removing the blobs of a save over its quota failed; a collection will");
        }
        drop(exclusive);
        over_quota(project, key, size, quota)
    }
}

/// The refusal of a scoped token's save that fits the quota only by evicting caches of
/// branches the token reads but may not write (its own cache was evicted again).
pub(crate) fn over_quota_of_others(principal: &crate::tokens::Principal, key: &pb::CacheKey, quota: u64) -> Error {
    let branch = if key.branch.is_empty() { String::new() } else { format!(" on branch {}", key.branch) };
    Error::OverQuota(format!(
        "the cache of {}{branch} does not fit project {:?}'s quota of {} beside the caches token {} reads: \
         not saved (the operator can raise it with cachectl project set-quota)",
        key.service,
        principal.project,
        proto::format::format_bytes(quota),
        principal.token_id,
    ))
}

/// The digest an upload's blob key names (empty for any other key), for the protection check.
fn upload_digest(key: &str) -> String {
    proto::object_keys::blob_hex_of_key(key).map(|hex| format!("sha256:{hex}")).unwrap_or_default()
}

/// The one line a save over its project's quota gets.
pub(crate) fn over_quota(project: &str, key: &pb::CacheKey, size: u64, quota: u64) -> Error {
    let branch = if key.branch.is_empty() { String::new() } else { format!(" on branch {}", key.branch) };
    Error::OverQuota(format!(
        "the cache of {}{branch} needs {} in the store, more than project {project:?}'s quota of {}: not saved, \
         the previous cache is kept (raise it with cachectl project set-quota {project} SIZE)",
        key.service,
        proto::format::format_bytes(size),
        proto::format::format_bytes(quota),
    ))
}
