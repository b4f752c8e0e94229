//! The save protocol: `BeginSave` records what a worker is about to save and answers which
//! blobs the store lacks; `CommitSave` checks every blob is stored with the right size, then
//! makes the manifest visible in one transaction with the ledger.
//!
//! Architecture Invariant: a manifest never names a blob that was not verified present.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use proto::names;
use proto::v1 as pb;

use crate::credentials::{now_unix, now_unix_ms, project_prefix};
use crate::error::Error;
use crate::service::{CacheService, validate_key};
use crate::state::{BlobRecord, Committed, Ephemeral, OpenSave, OpenSaves, ServiceCounters, manifest_digests};

/// How long a begun save may take before its commit is refused.
const SAVE_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// How long one `CommitSave` call waits for blobs other saves are uploading before it answers
/// "call again": well inside any worker's per-call deadline.
const COMMIT_WAIT: Duration = Duration::from_secs(2);
/// How often a commit waiting for another save's blobs looks at the store.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(250);
const MAX_IMAGES: usize = 1000;
const MAX_LAYERS_PER_IMAGE: usize = 1000;
const MAX_HOST_NAME: usize = 255;
/// Saves of one project held at once (each kept alive by its worker, or silent for less than
/// [`SILENT_SAVE_CLAIM_TTLS`] claim lifetimes): a build matrix saves in parallel, a token
/// cannot pile up saves without end.
const MOST_SAVES_PER_PROJECT: usize = 64;
/// Distinct blobs one save may name.
const MOST_BLOBS_PER_SAVE: usize = 20_000;
/// Blob and image names the saves of one project may hold in memory together (about 10 MB).
const MOST_HELD_NAMES_PER_PROJECT: usize = 100_000;
/// A save whose worker is silent for this many claim lifetimes (10 minutes by default) is
/// forgotten: its worker, should it come back, hears that the save is unknown and begins again.
const SILENT_SAVE_CLAIM_TTLS: u32 = 40;
/// Store lookups (HEAD) one commit keeps in flight.
const STORE_LOOKUPS_IN_FLIGHT: usize = 16;

/// Begun saves and their single-flight claims, kept in the state's ephemeral records (this
/// process's memory on sled, the database replicas share on PostgreSQL). Every rule below runs
/// on one consistent view of the project's open saves, at a time (unix milliseconds) its
/// caller passes in.
pub struct PendingSaves {
    saves: Arc<dyn Ephemeral>,
    /// How long a claim outlives its worker's last sign of life.
    claim_ttl: Duration,
}

fn millis(duration: Duration) -> i64 {
    duration.as_millis() as i64
}

/// The names a save holds (`claimed` is a part of `named`).
fn held_names(save: &OpenSave) -> usize {
    save.named.len() + save.image_ids.len()
}

/// Whether a save was begun too long ago to commit.
fn too_old(save: &OpenSave, now: i64) -> bool {
    now.saturating_sub(save.began_unix_ms) >= millis(SAVE_LIFETIME)
}

impl PendingSaves {
    pub fn new(claim_ttl: Duration, saves: Arc<dyn Ephemeral>) -> PendingSaves {
        PendingSaves { saves, claim_ttl }
    }

    /// How often a worker says it is alive: a claim survives two missed calls.
    pub fn keep_alive_interval(&self) -> Duration {
        (self.claim_ttl / 3).max(Duration::from_secs(1))
    }

    fn claims(&self, save: &OpenSave, project: &str, digest: &str, now: i64) -> bool {
        save.project == project
            && now.saturating_sub(save.last_alive_unix_ms) < millis(self.claim_ttl)
            && save.claimed.contains(digest)
    }

    /// Runs `change` on the open saves of `project` (`None`: of every project).
    async fn change<R: Send>(
        &self,
        project: Option<&str>,
        change: impl FnOnce(&mut OpenSaves) -> R + Send,
    ) -> Result<R, Error> {
        let (mut change, mut result) = (Some(change), None);
        self.saves
            .update_open_saves(project, &mut |saves| {
                if let Some(change) = change.take() {
                    result = Some(change(saves));
                }
            })
            .await?;
        Ok(result.expect("the change ran"))
    }

    /// Answers `read` of the open saves of `project`.
    async fn read<R: Send>(&self, project: &str, read: impl Fn(&OpenSaves) -> R + Send + Sync) -> Result<R, Error> {
        let mut result = None;
        self.saves.read_open_saves(project, &mut |saves| result = Some(read(saves))).await?;
        Ok(result.expect("the read ran"))
    }

    /// Registers a save. Of the `missing` blobs it claims those no other live save of the
    /// project claims, and returns (claimed: upload these, in flight: another save does). A
    /// blob claimed only by an earlier save of the same cache key is taken over: that is a
    /// retry of a save that failed or was killed, or a save it replaces anyway, and a retry
    /// must never wait for the save it repeats.
    /// Refused while the project holds [`MOST_SAVES_PER_PROJECT`] saves or
    /// [`MOST_HELD_NAMES_PER_PROJECT`] names.
    async fn begin(
        &self,
        save_id: String,
        mut save: OpenSave,
        missing: Vec<String>,
        now: i64,
    ) -> Result<(Vec<String>, Vec<String>), Error> {
        let project = save.project.clone();
        let forget_silent = millis(self.claim_ttl * SILENT_SAVE_CLAIM_TTLS);
        self.change(Some(&project), move |saves| {
            saves.retain(|_, pending| {
                pending.project != save.project
                    || (!too_old(pending, now) && now.saturating_sub(pending.last_alive_unix_ms) < forget_silent)
            });
            save.named.extend(missing.iter().cloned());
            let of_project = || saves.values().filter(|other| other.project == save.project);
            if of_project().count() >= MOST_SAVES_PER_PROJECT {
                return Err(Error::TooMany(format!(
                    "project {:?} has {MOST_SAVES_PER_PROJECT} saves in progress, the most it may: save again once some have committed",
                    save.project
                )));
            }
            let held: usize = of_project().map(held_names).sum();
            if held + held_names(&save) > MOST_HELD_NAMES_PER_PROJECT {
                return Err(Error::TooMany(format!(
                    "project {:?}'s saves in progress name {held} blobs and images, and this one would take them over \
                     {MOST_HELD_NAMES_PER_PROJECT}: save again once some have committed",
                    save.project
                )));
            }
            let same_key = |other: &OpenSave| other.service == save.service && other.branch == save.branch;
            let (in_flight, to_upload): (Vec<String>, Vec<String>) = missing.into_iter().partition(|digest| {
                saves.values().any(|other| !same_key(other) && self.claims(other, &save.project, digest, now))
            });
            for other in saves.values_mut().filter(|other| other.project == save.project && same_key(other)) {
                for digest in &to_upload {
                    other.claimed.remove(digest);
                }
            }
            save.claimed = to_upload.iter().cloned().collect();
            saves.insert(save_id, save);
            Ok((to_upload, in_flight))
        })
        .await?
    }

    /// The blobs open saves of `project` name (a garbage collection keeps them).
    pub(crate) async fn named(&self, project: &str) -> Result<HashSet<String>, Error> {
        self.read(project, |saves| {
            saves.values().filter(|save| save.project == project).flat_map(|save| save.named.iter().cloned()).collect()
        })
        .await
    }

    /// The blobs live saves of `project` are uploading (the post-flush sweep keeps them).
    pub(crate) async fn in_flight(&self, project: &str, now: i64) -> Result<HashSet<String>, Error> {
        self.read(project, |saves| {
            let live = saves.values().filter(|save| {
                save.project == project && now.saturating_sub(save.last_alive_unix_ms) < millis(self.claim_ttl)
            });
            live.flat_map(|save| save.claimed.iter().cloned()).collect()
        })
        .await
    }

    /// Whether a live save of `project` other than `waiting_save_id` is uploading `digest`: a
    /// save never waits for its own claims (what it did not upload is simply not there).
    async fn in_flight_for(&self, project: &str, digest: &str, waiting_save_id: &str, now: i64) -> Result<bool, Error> {
        self.read(project, |saves| {
            saves.iter().any(|(save_id, save)| save_id != waiting_save_id && self.claims(save, project, digest, now))
        })
        .await
    }

    /// Records a sign of life of a save's worker.
    async fn keep_alive(&self, save_id: &str, project: &str, now: i64) -> Result<(), Error> {
        self.change(Some(project), |saves| match saves.get_mut(save_id) {
            Some(save) if save.project == project && !too_old(save, now) => {
                save.last_alive_unix_ms = now;
                save.silence_noted = false;
                Ok(())
            }
            _ => Err(Error::NoSuchSave(save_id.to_owned())),
        })
        .await?
    }

    /// Saves of `project` (`None`: of every project) whose worker has been silent for the
    /// claim lifetime (killed, most likely): their claims have lapsed, and their shares of the
    /// transfer budget should too. Each is named once; the save itself stays begun, should its
    /// worker come back and commit. Saves silent for [`SILENT_SAVE_CLAIM_TTLS`] claim lifetimes,
    /// or begun too long ago, are forgotten.
    async fn newly_silent(&self, project: Option<&str>, now: i64) -> Result<Vec<(String, String)>, Error> {
        let (claim_ttl, forget_silent) = (millis(self.claim_ttl), millis(self.claim_ttl * SILENT_SAVE_CLAIM_TTLS));
        self.change(project, |saves| {
            let mine = |save: &OpenSave| project.is_none_or(|project| save.project == project);
            saves.retain(|_, save| {
                !mine(save) || (!too_old(save, now) && now.saturating_sub(save.last_alive_unix_ms) < forget_silent)
            });
            let mut silent = Vec::new();
            for (save_id, save) in saves.iter_mut().filter(|(_, save)| mine(save)) {
                if !save.silence_noted && now.saturating_sub(save.last_alive_unix_ms) >= claim_ttl {
                    save.silence_noted = true;
                    silent.push((save.project.clone(), save_id.clone()));
                }
            }
            silent.sort();
            silent
        })
        .await
    }

    /// Forgets a save (and its claims); whether it was there.
    async fn abandon(&self, save_id: &str, project: &str) -> Result<bool, Error> {
        self.change(Some(project), |saves| {
            if saves.get(save_id).is_some_and(|save| save.project == project) {
                saves.remove(save_id);
                return true;
            }
            false
        })
        .await
    }

    /// Forgets every save of a project (a flush: none of them can commit).
    async fn abandon_project(&self, project: &str) -> Result<(), Error> {
        self.change(Some(project), |saves| saves.retain(|_, save| save.project != project)).await
    }

    /// What a commit needs of a begun save, which stays begun until [`PendingSaves::take`].
    async fn describe(&self, save_id: &str, project: &str, now: i64) -> Result<SaveFacts, Error> {
        self.read(project, |saves| match saves.get(save_id) {
            Some(save) if save.project == project && !too_old(save, now) => Ok(SaveFacts {
                key: pb::CacheKey { service: save.service.clone(), branch: save.branch.clone() },
                generation: save.generation,
                image_ids: save.image_ids.clone(),
                engine_version: save.engine_version.clone(),
                began_unix_ms: save.began_unix_ms,
                host: save.host.clone(),
            }),
            _ => Err(Error::NoSuchSave(save_id.to_owned())),
        })
        .await?
    }

    async fn take(&self, save_id: &str, project: &str) -> Result<(), Error> {
        if self.abandon(save_id, project).await? { Ok(()) } else { Err(Error::NoSuchSave(save_id.to_owned())) }
    }
}

/// A begun save, as its commit sees it.
struct SaveFacts {
    key: pb::CacheKey,
    generation: u64,
    image_ids: Vec<String>,
    engine_version: String,
    began_unix_ms: i64,
    host: String,
}

/// Checks of a reported bad blob one project may ask for per minute (each may read a blob).
const BAD_BLOB_CHECKS_PER_MINUTE: u32 = 10;

/// The refusal of a commit naming a blob whose stored bytes do not hash to its digest (the
/// store has just deleted them).
fn planted(digest: &str) -> Error {
    Error::BlobCorrupt(format!(
        "blob {digest} in the store did not hash to its digest and was deleted: upload it again"
    ))
}

/// A build host's name from outside: printable, short.
fn validate_host(host: &str) -> Result<(), Error> {
    if host.len() > MAX_HOST_NAME || host.chars().any(|c| c.is_control()) {
        return Err(Error::InvalidArgument(format!("a host name has at most {MAX_HOST_NAME} printable characters")));
    }
    Ok(())
}

/// Checks the images a worker sends: digests, tags, parents inside the chain or empty.
fn validate_images(images: &[pb::Image]) -> Result<(), Error> {
    if images.is_empty() || images.len() > MAX_IMAGES {
        return Err(Error::InvalidArgument(format!("a save holds 1 to {MAX_IMAGES} images, not {}", images.len())));
    }
    for image in images {
        names::validate_digest(&image.id)?;
        if !image.parent_id.is_empty() {
            names::validate_digest(&image.parent_id)?;
        }
        for tag in &image.repo_tags {
            names::validate_repo_tag(tag)?;
        }
        if image.layers.len() > MAX_LAYERS_PER_IMAGE {
            return Err(Error::InvalidArgument(format!(
                "image {} has more than {MAX_LAYERS_PER_IMAGE} layers",
                image.id
            )));
        }
        for layer in &image.layers {
            names::validate_digest(&layer.digest)?;
            if !["", "gzip", "zstd"].contains(&layer.encoding.as_str()) {
                return Err(Error::InvalidArgument(format!("unknown layer encoding {:?}", layer.encoding)));
            }
            if !layer.stored_digest.is_empty() {
                names::validate_digest(&layer.stored_digest)?;
            }
        }
        if image.oci_blobs.len() > MAX_LAYERS_PER_IMAGE {
            return Err(Error::InvalidArgument(format!(
                "image {} names more than {MAX_LAYERS_PER_IMAGE} OCI blobs",
                image.id
            )));
        }
        for blob in &image.oci_blobs {
            names::validate_digest(&blob.digest)?;
            if !blob.encoding.is_empty() || !blob.stored_digest.is_empty() {
                return Err(Error::InvalidArgument(format!("OCI blob {} is stored as it is", blob.digest)));
            }
        }
        if image.oci_media_type.len() > 255 || image.oci_media_type.chars().any(|c| c.is_control()) {
            return Err(Error::InvalidArgument("an OCI media type has at most 255 printable characters".into()));
        }
    }
    Ok(())
}

/// The images a manifest is about, without sizes or times: what makes two saves the same.
fn identity(images: &[pb::Image]) -> Vec<(String, String, Vec<String>, Vec<String>)> {
    images
        .iter()
        .map(|image| {
            let layers = image.layers.iter().map(|layer| layer.digest.clone()).collect();
            (image.id.clone(), image.parent_id.clone(), image.repo_tags.clone(), layers)
        })
        .collect()
}

impl CacheService {
    pub async fn begin_save(
        &self,
        principal: &crate::principals::Principal,
        request: &pb::BeginSaveRequest,
    ) -> Result<pb::BeginSaveResponse, Error> {
        let project = principal.project.as_str();
        let key = validate_key(request.key.as_ref())?;
        principal.check_write(&key.branch)?;
        validate_images(&request.images)?;
        validate_host(&request.host)?;
        let record = self.db.project(project).await?.ok_or_else(|| Error::NoSuchProject(project.to_owned()))?;
        let probe = pb::Manifest { images: request.images.clone(), ..Default::default() };
        let digests: BTreeSet<String> = manifest_digests(&probe);
        if digests.len() > MOST_BLOBS_PER_SAVE {
            return Err(Error::InvalidArgument(format!(
                "a save names {} blobs, more than the {MOST_BLOBS_PER_SAVE} one save may",
                digests.len()
            )));
        }
        // Held until the save is registered: a garbage collection (which takes the lock
        // exclusively) either ran before and this save sees what it left, or runs after and
        // keeps every blob this save names.
        let registering = self.lock_project(project, crate::service::Lock::Shared).await?;
        let named: Vec<String> = digests.iter().cloned().collect();
        let stored = self.db.stored_blobs(project, &named).await?;
        let missing: Vec<String> = digests.iter().filter(|d| !stored.contains_key(*d)).cloned().collect();
        let current = self.db.manifest(project, &key.service, &key.branch).await?;
        let wanted_ids: BTreeSet<&str> = request.images.iter().map(|image| image.id.as_str()).collect();
        let mut known_images: Vec<pb::Image> = Vec::new();
        for manifest in self.db.manifests(project).await? {
            for image in manifest.images {
                if wanted_ids.contains(image.id.as_str()) && !known_images.iter().any(|known| known.id == image.id) {
                    known_images.push(image);
                }
            }
        }
        let known_size: u64 = stored.values().map(|record| record.stored_size).sum();
        if record.quota_bytes > 0 && known_size > record.quota_bytes {
            return Err(crate::gc::over_quota(project, &key, known_size, record.quota_bytes));
        }
        let unchanged = match &current {
            Some(manifest) => missing.is_empty() && identity(&manifest.images) == identity(&request.images),
            None => false,
        };
        if unchanged && let Some(manifest) = &current {
            // An unchanged save is a use of its cache, as a restore is.
            self.db.touch_manifest(project, manifest, now_unix()).await?;
        }

        let save_id = crate::tokens::random_hex_32();
        let now = now_unix_ms();
        let pending = OpenSave {
            project: project.to_owned(),
            service: key.service.clone(),
            branch: key.branch.clone(),
            generation: record.generation,
            image_ids: request.images.iter().map(|image| image.id.clone()).collect(),
            engine_version: request.engine_version.clone(),
            began_unix_ms: now,
            host: request.host.clone(),
            last_alive_unix_ms: now,
            claimed: BTreeSet::new(),
            named: digests.clone(),
            silence_noted: false,
        };
        self.release_silent_saves(Some(project)).await;
        // An unchanged save commits nothing, so it is not kept (and claims nothing).
        let (missing_digests, in_flight_digests) = if unchanged {
            (Vec::new(), Vec::new())
        } else {
            self.pending_saves.begin(save_id.clone(), pending, missing, now).await?
        };
        drop(registering);
        // Blobs in flight still need the worker's export (for their sizes), not its uploads.
        // A save that moves nothing holds no share of the transfer budget.
        let (credentials, plan) = if missing_digests.is_empty() && in_flight_digests.is_empty() {
            (None, None)
        } else {
            let credentials = match self.issue_credentials(project, pb::Access::Write, "", &principal.token_id).await {
                Ok(credentials) => credentials,
                Err(error) => {
                    self.pending_saves.abandon(&save_id, project).await?;
                    return Err(error);
                }
            };
            // The save ID names its lease; the commit gives it back.
            let plan = self.budget.grant(project, &save_id, crate::budget::LeaseKind::Save, now).await?;
            (Some(credentials), Some(plan))
        };
        tracing::info!(
            project,
            n_blobs = digests.len(),
            n_missing = missing_digests.len(),
            n_in_flight = in_flight_digests.len(),
            unchanged,
            "save begun"
        );
        Ok(pb::BeginSaveResponse {
            save_id,
            missing_digests,
            plan,
            credentials,
            unchanged,
            stored_blobs: stored
                .into_iter()
                .map(|(digest, record)| pb::Layer {
                    digest,
                    size: record.size,
                    encoding: record.encoding,
                    stored_size: record.stored_size,
                    stored_digest: record.stored_digest,
                })
                .collect(),
            known_images,
            in_flight_digests,
            keep_alive_seconds: self.pending_saves.keep_alive_interval().as_secs() as u32,
        })
    }

    /// A restore's report of a blob missing or corrupt in the store: checked against the store
    /// (a report is never trusted), and if the blob is indeed lost, dropped from the ledger
    /// with every manifest naming it, under the project's publish lock, so the next save
    /// uploads it again and no restore starts on a manifest that cannot complete.
    pub async fn report_bad_blob(&self, project: &str, digest: &str) -> Result<pb::ReportBadBlobResponse, Error> {
        names::validate_digest(digest)?;
        if self.db.stored_blobs(project, &[digest.to_owned()]).await?.is_empty() {
            return Ok(pb::ReportBadBlobResponse::default());
        }
        {
            let mut checks = self.bad_blob_checks.lock().expect("bad blob checks");
            let (since, n) = checks.entry(project.to_owned()).or_insert((Instant::now(), 0));
            if since.elapsed() >= Duration::from_secs(60) {
                (*since, *n) = (Instant::now(), 0);
            }
            if *n >= BAD_BLOB_CHECKS_PER_MINUTE {
                return Err(Error::TooMany(format!(
                    "project {project:?} reported {BAD_BLOB_CHECKS_PER_MINUTE} bad blobs this minute, the most checked: report again later"
                )));
            }
            *n += 1;
        }
        let _no_commits = self.lock_project(project, crate::service::Lock::Exclusive).await?;
        let key = blob_key(&project_prefix(&self.store_prefix, project), digest);
        let state = self.store.check_blob(&key, digest).await?;
        if state == crate::store::BlobState::Intact {
            tracing::info!(project, digest, "a blob reported bad is intact in the store");
            return Ok(pb::ReportBadBlobResponse::default());
        }
        let size =
            self.db.stored_blobs(project, &[digest.to_owned()]).await?.values().map(|record| record.stored_size).sum();
        let caches_removed = self.db.drop_blob(project, digest).await?;
        self.db.durable().await?;
        self.metrics.record_eviction(project, "lost", 1, size);
        self.metrics.record_cache_evictions(project, "lost", caches_removed);
        tracing::warn!(
            project,
            digest,
            ?state,
            caches_removed,
            "a blob the store lost was dropped with the caches naming it"
        );
        Ok(pb::ReportBadBlobResponse { dropped: true, caches_removed: caches_removed as u32 })
    }

    /// Keeps a begun save's claims alive while its worker works; answers its share of the
    /// transfer budget now.
    pub async fn keep_save_alive(&self, project: &str, save_id: &str) -> Result<Option<pb::TransferPlan>, Error> {
        let now = now_unix_ms();
        self.pending_saves.keep_alive(save_id, project, now).await?;
        self.budget.renew(project, save_id, now).await
    }

    /// Gives a save's claims and its share of the transfer budget back: its worker will not commit.
    pub async fn abandon_save(&self, project: &str, save_id: &str) -> Result<(), Error> {
        if self.pending_saves.abandon(save_id, project).await? {
            self.budget.release(project, save_id, now_unix_ms()).await?;
            tracing::info!(project, "save abandoned");
        }
        Ok(())
    }

    /// Gives back the budget shares of saves of `project` (`None`: of every project) whose
    /// workers fell silent (see [`PendingSaves::newly_silent`]), so a killed worker's share
    /// does not wait 10 minutes. A failure is logged: the next call tries again.
    pub(crate) async fn release_silent_saves(&self, project: Option<&str>) {
        let now = now_unix_ms();
        let released = async {
            for (project, save_id) in self.pending_saves.newly_silent(project, now).await? {
                self.budget.release(&project, &save_id, now).await?;
                tracing::info!(project, "a save's worker fell silent: its claims lapsed and its budget share is back");
            }
            Ok::<_, Error>(())
        };
        if let Err(error) = released.await {
            tracing::warn!(%error, "releasing the budget shares of silent saves failed; it is tried again");
        }
    }

    /// Forgets every begun save of a flushed project: none of them can commit.
    pub(crate) async fn abandon_project_saves(&self, project: &str) -> Result<(), Error> {
        self.pending_saves.abandon_project(project).await
    }

    pub async fn commit_save(
        &self,
        principal: &crate::principals::Principal,
        request: &pb::CommitSaveRequest,
    ) -> Result<pb::CommitSaveResponse, Error> {
        let project = principal.project.as_str();
        validate_images(&request.images)?;
        let pending = self.pending_saves.describe(&request.save_id, project, now_unix_ms()).await?;
        // Checked again: the save may have been begun by another token of the project.
        principal.check_write(&pending.key.branch)?;
        // A flush since the begin (through another replica, which cannot forget this one's
        // open saves) is named as such, before the store is asked for what it deleted.
        let record = self.existing_project(project).await?;
        if record.generation != pending.generation {
            self.pending_saves.take(&request.save_id, project).await?;
            self.budget.release(project, &request.save_id, now_unix_ms()).await?;
            return Err(Error::SaveConflict(format!("project {project:?} was flushed while the save ran: save again")));
        }
        let image_ids: Vec<String> = request.images.iter().map(|image| image.id.clone()).collect();
        if image_ids != pending.image_ids {
            return Err(Error::InvalidArgument("the committed images differ from the ones the save began with".into()));
        }
        let mut manifest = pb::Manifest {
            key: Some(pending.key.clone()),
            images: request.images.clone(),
            engine_version: pending.engine_version.clone(),
            created_unix: now_unix(),
            last_used_unix: now_unix(),
            save_log: request.save_log.iter().take(10_000).cloned().collect(),
            origin: Some(pb::SaveOrigin {
                save_id: request.save_id.clone(),
                host: pending.host.clone(),
                began_unix_ms: pending.began_unix_ms,
                committed_unix_ms: 0,
                repo_tags: request.images.iter().flat_map(|image| image.repo_tags.iter().cloned()).collect(),
            }),
        };
        // Every blob must be stored with the size the worker reports: the ledger answers for
        // blobs it knows, the store for new ones.
        let mut reported: HashMap<String, BlobRecord> = HashMap::new();
        for image in &mut manifest.images {
            let config = BlobRecord { stored_size: image.config_size, size: image.config_size, ..Default::default() };
            reported.insert(image.id.clone(), config);
            for layer in &mut image.layers {
                if layer.encoding.is_empty() {
                    layer.stored_size = layer.size;
                    layer.stored_digest.clear();
                }
                let record = BlobRecord {
                    stored_size: layer.stored_size,
                    size: layer.size,
                    encoding: layer.encoding.clone(),
                    stored_digest: layer.stored_digest.clone(),
                    ..Default::default()
                };
                reported.insert(layer.digest.clone(), record);
            }
            for blob in &mut image.oci_blobs {
                blob.stored_size = blob.size;
                reported.insert(
                    blob.digest.clone(),
                    BlobRecord { stored_size: blob.size, size: blob.size, ..Default::default() },
                );
            }
        }
        // A post-flush sweep waits until the blobs are checked and recorded.
        let no_sweep = self.lock_project(project, crate::service::Lock::Shared).await?;
        let reported_digests: Vec<String> = reported.keys().cloned().collect();
        let known = self.db.stored_blobs(project, &reported_digests).await?;
        let prefix = project_prefix(&self.store_prefix, project);
        // The store answers for the blobs the ledger does not know, several at once, so a
        // commit of many new layers stays well inside a worker's per-call deadline.
        let waiting_since = Instant::now();
        let unknown: Vec<String> = reported.keys().filter(|digest| !known.contains_key(*digest)).cloned().collect();
        let lookups = unknown.into_iter().map(|digest| {
            let key = blob_key(&prefix, &digest);
            async move {
                let awaited = self.stored_or_awaited(project, &request.save_id, &key, &digest, waiting_since).await?;
                Ok::<_, Error>((digest, awaited))
            }
        });
        let looked_up: Vec<(String, Awaited)> =
            futures::stream::iter(lookups).buffer_unordered(STORE_LOOKUPS_IN_FLIGHT).try_collect().await?;
        let mut waiting_for = Vec::new();
        let mut in_store: HashMap<String, Option<u64>> = HashMap::new();
        for (digest, awaited) in looked_up {
            match awaited {
                Awaited::Stored(size) => {
                    in_store.insert(digest, size);
                }
                Awaited::StillInFlight => waiting_for.push(digest),
            }
        }
        for (digest, record) in &reported {
            let stored = match known.get(digest) {
                Some(known) => Some(known.stored_size),
                None => match in_store.get(digest) {
                    Some(size) => *size,
                    None => continue,
                },
            };
            match stored {
                Some(size) if size == record.stored_size => {}
                // New to the ledger and of another size: planted, most likely (a write key
                // of the project put other bytes there), and deleted if so.
                Some(_)
                    if !known.contains_key(digest)
                        && !self.store.verify_blob(&blob_key(&prefix, digest), digest).await? =>
                {
                    return Err(planted(digest));
                }
                Some(size) => {
                    return Err(Error::BlobNotStored(format!(
                        "blob {digest} is stored with {size} bytes, not {}: upload it again",
                        record.stored_size
                    )));
                }
                None => {
                    return Err(Error::BlobNotStored(format!(
                        "blob {digest} is not in the store: upload it before committing"
                    )));
                }
            }
        }
        if !waiting_for.is_empty() {
            waiting_for.sort();
            return Ok(pb::CommitSaveResponse { waiting_for_digests: waiting_for, ..Default::default() });
        }
        // Architecture Invariant: a blob is verified against its digest before the ledger
        // counts it, so no save, however trusted, counts a blob another token planted.
        let new_blobs: Vec<String> = in_store.keys().cloned().collect();
        let checks = new_blobs.into_iter().map(|digest| {
            let key = blob_key(&prefix, &digest);
            async move {
                let matches = self.store.verify_blob(&key, &digest).await?;
                Ok::<_, Error>((digest, matches))
            }
        });
        let checked: Vec<(String, bool)> =
            futures::stream::iter(checks).buffer_unordered(STORE_LOOKUPS_IN_FLIGHT).try_collect().await?;
        if let Some((digest, _)) = checked.iter().find(|(_, matches)| !matches) {
            return Err(planted(digest));
        }
        self.pending_saves.take(&request.save_id, project).await?;
        self.budget.release(project, &request.save_id, now_unix_ms()).await?;
        let size: u64 = reported.values().map(|record| record.stored_size).sum();
        let quota = record.quota_bytes;
        if quota > 0 && size > quota {
            drop(no_sweep);
            let uploaded: HashMap<String, BlobRecord> =
                reported.into_iter().filter(|(digest, _)| in_store.contains_key(digest)).collect();
            return Err(self.refuse_over_quota(project, &pending.key, size, quota, &uploaded).await);
        }
        if let Some(origin) = manifest.origin.as_mut() {
            origin.committed_unix_ms = now_unix_ms();
        }
        let committed = self.db.commit_manifest(project, &manifest, pending.generation, &reported).await?;
        self.db
            .add_to_counters(project, &pending.key.service, &ServiceCounters { saves: 1, ..Default::default() })
            .await?;
        // The worker prints "saved" on this answer: the manifest must survive a crash after it.
        self.db.durable().await?;
        drop(no_sweep);
        if quota > 0 {
            // Architecture Invariant: after a commit the project fits its quota again, the cache
            // just saved evicted last of all (it alone fits, as checked above).
            // The save is stored whatever happens here: a failed eviction is the next one's.
            match self.fit_quota(project, Some(&pending.key)).await {
                Ok(evicted) if !evicted.caches.is_empty() => tracing::info!(
                    project,
                    caches = evicted.caches.len(),
                    bytes = evicted.bytes,
                    "least recently used caches evicted to fit the quota"
                ),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(project, %error, "evicting to fit the quota failed; the next commit tries again")
                }
            }
        }
        let response = match committed {
            Committed::Stored { replaced } => {
                tracing::info!(
                    project,
                    service = pending.key.service,
                    n_images = manifest.images.len(),
                    "save committed"
                );
                pb::CommitSaveResponse {
                    manifest: Some(manifest),
                    stored: true,
                    replaced,
                    waiting_for_digests: Vec::new(),
                }
            }
            Committed::KeptNewer(current) => {
                tracing::info!(
                    project,
                    service = pending.key.service,
                    "save not stored: a newer save's manifest is kept"
                );
                pb::CommitSaveResponse { manifest: Some(current), stored: false, ..Default::default() }
            }
        };
        Ok(response)
    }
}

/// A blob a commit looked for in the store.
enum Awaited {
    /// Its stored size, or `None` when it is not there and nobody is uploading it.
    Stored(Option<u64>),
    /// Another live save is still uploading it.
    StillInFlight,
}

impl CacheService {
    /// The stored size of a blob; while another live save of the project than `save_id` is
    /// uploading it (single flight), waits for it, up to [`COMMIT_WAIT`] after `waiting_since`.
    async fn stored_or_awaited(
        &self,
        project: &str,
        save_id: &str,
        key: &str,
        digest: &str,
        waiting_since: Instant,
    ) -> Result<Awaited, Error> {
        loop {
            let stored = self.store.object_size(key).await?;
            if stored.is_some() || !self.pending_saves.in_flight_for(project, digest, save_id, now_unix_ms()).await? {
                return Ok(Awaited::Stored(stored));
            }
            if waiting_since.elapsed() >= COMMIT_WAIT {
                return Ok(Awaited::StillInFlight);
            }
            tokio::time::sleep(IN_FLIGHT_POLL).await;
        }
    }
}

/// Where a blob lives in the store.
pub fn blob_key(project_prefix: &str, digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("{project_prefix}blobs/sha256/{hex}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pending(project: &str, service: &str, now: i64) -> OpenSave {
        OpenSave {
            project: project.into(),
            service: service.into(),
            branch: String::new(),
            generation: 0,
            image_ids: Vec::new(),
            engine_version: String::new(),
            began_unix_ms: now,
            host: String::new(),
            last_alive_unix_ms: now,
            claimed: BTreeSet::new(),
            named: BTreeSet::new(),
            silence_noted: false,
        }
    }

    fn digests(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    fn set(names: &[&str]) -> HashSet<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    const TTL: Duration = Duration::from_secs(15);
    /// The clock of these tests, in unix milliseconds.
    const START: i64 = 1_800_000_000_000;

    fn saves() -> PendingSaves {
        PendingSaves::new(TTL, Arc::new(crate::state::InMemory::default()))
    }

    /// The rules of single flight on `saves`, which two replicas may share: `other` sees what
    /// `saves` registered (the same saves, on sled; another replica, on PostgreSQL).
    pub(crate) async fn single_flight_holds(saves: &PendingSaves, other: &PendingSaves, project: &str) {
        let now = START;
        let (upload, in_flight) =
            saves.begin("s1".into(), pending(project, "one", now), digests(&["a", "b"]), now).await.unwrap();
        assert_eq!((upload, in_flight), (digests(&["a", "b"]), digests(&[])));
        let (upload, in_flight) =
            other.begin("s2".into(), pending(project, "two", now), digests(&["b", "c"]), now).await.unwrap();
        assert_eq!((upload, in_flight), (digests(&["c"]), digests(&["b"])));
        // Another project never waits for this one's uploads.
        let elsewhere = format!("{project}-other");
        let (upload, in_flight) =
            other.begin("s3".into(), pending(&elsewhere, "one", now), digests(&["a"]), now).await.unwrap();
        assert_eq!((upload, in_flight), (digests(&["a"]), digests(&[])));
        assert_eq!(other.in_flight(project, now).await.unwrap(), set(&["a", "b", "c"]));
        assert!(!other.in_flight_for(project, "b", "s1", now).await.unwrap(), "a save never waits for its own claim");
        assert!(other.in_flight_for(project, "b", "s2", now).await.unwrap());
        assert_eq!(other.named(project).await.unwrap(), set(&["a", "b", "c"]));
        let facts = other.describe("s1", project, now).await.unwrap();
        assert_eq!(facts.key.service, "one");
        // The claimant's commit (or its abandoning the save) ends the claim.
        other.take("s1", project).await.unwrap();
        assert!(!saves.in_flight_for(project, "b", "s2", now).await.unwrap());
        assert_eq!(saves.in_flight(project, now).await.unwrap(), set(&["c"]));
        assert!(saves.take("s1", project).await.is_err(), "a save commits once");
        // A flush forgets the project's saves, and only its.
        saves.abandon_project(project).await.unwrap();
        assert!(other.named(project).await.unwrap().is_empty());
        assert_eq!(other.named(&elsewhere).await.unwrap(), set(&["a"]));
    }

    #[tokio::test]
    async fn a_blob_another_save_uploads_is_uploaded_once() {
        let saves = saves();
        single_flight_holds(&saves, &saves, "web").await;
    }

    #[tokio::test]
    async fn a_retry_of_the_same_cache_key_takes_the_claims_over() {
        let saves = saves();
        let now = START;
        saves.begin("killed".into(), pending("web", "one", now), digests(&["a", "b"]), now).await.unwrap();
        // The retry (same key) uploads both itself, at once; another key waits for the retry.
        let (upload, in_flight) =
            saves.begin("retry".into(), pending("web", "one", now), digests(&["a", "b"]), now).await.unwrap();
        assert_eq!((upload, in_flight), (digests(&["a", "b"]), digests(&[])));
        saves.abandon("retry", "web").await.unwrap();
        assert!(
            saves.in_flight("web", now).await.unwrap().is_empty(),
            "the killed save no longer claims what its retry took over"
        );
    }

    #[tokio::test]
    async fn a_claim_lapses_after_its_workers_last_sign_of_life() {
        let saves = saves();
        let start = START;
        saves.begin("s1".into(), pending("web", "one", start), digests(&["a"]), start).await.unwrap();
        let later = start + 10_000;
        assert!(saves.in_flight("web", later).await.unwrap().contains("a"));
        saves.keep_alive("s1", "web", later).await.unwrap();
        assert!(saves.in_flight("web", later + 14_000).await.unwrap().contains("a"));
        let lapsed = later + millis(TTL);
        assert!(saves.in_flight("web", lapsed).await.unwrap().is_empty(), "no sign of life for the claim's lifetime");
        let (upload, in_flight) =
            saves.begin("s2".into(), pending("web", "two", lapsed), digests(&["a"]), lapsed).await.unwrap();
        assert_eq!((upload, in_flight), (digests(&["a"]), digests(&[])), "a lapsed claim is uploaded again");
        assert!(saves.keep_alive("s1", "api", lapsed).await.is_err(), "another project's save is not found");
        assert!(saves.abandon("s2", "web").await.unwrap() && !saves.abandon("s2", "web").await.unwrap());
        assert!(saves.keep_alive("s2", "web", lapsed).await.is_err());
        assert_eq!(saves.keep_alive_interval(), Duration::from_secs(5));
        assert_eq!(saves.newly_silent(None, lapsed).await.unwrap(), vec![("web".to_string(), "s1".to_string())]);
        assert!(saves.newly_silent(Some("web"), lapsed).await.unwrap().is_empty(), "each silent save is named once");
    }

    #[tokio::test]
    async fn a_project_holds_a_bounded_number_of_saves_and_names_and_silent_ones_are_forgotten() {
        let saves = saves();
        let start = START;
        for i in 0..MOST_SAVES_PER_PROJECT {
            let save = pending("web", &format!("svc{i}"), start);
            saves.begin(format!("s{i}"), save, digests(&["a"]), start).await.unwrap();
        }
        let refused =
            saves.begin("over".into(), pending("web", "over", start), digests(&["a"]), start).await.unwrap_err();
        assert!(refused.to_string().contains("has 64 saves in progress"), "{refused}");
        // Another project is not held up by this one's saves.
        saves.begin("api".into(), pending("api", "one", start), digests(&["a"]), start).await.unwrap();
        // Saves silent for 40 claim lifetimes are forgotten; one kept alive stays.
        let later = start + millis(TTL * SILENT_SAVE_CLAIM_TTLS) - 1_000;
        saves.keep_alive("s0", "web", later).await.unwrap();
        let forgotten = later + 2_000;
        saves.begin("next".into(), pending("web", "next", forgotten), digests(&["a"]), forgotten).await.unwrap();
        assert!(saves.keep_alive("s0", "web", forgotten).await.is_ok());
        assert!(saves.keep_alive("s1", "web", forgotten).await.is_err(), "a silent save was forgotten");
        // Names held: a save that would take the project over the bound is refused.
        let many: Vec<String> = (0..MOST_HELD_NAMES_PER_PROJECT - 10).map(|i| format!("d{i}")).collect();
        saves.begin("big".into(), pending("web", "big", forgotten), many, forgotten).await.unwrap();
        let more = (0..20).map(|i| format!("x{i}")).collect();
        let refused = saves.begin("more".into(), pending("web", "more", forgotten), more, forgotten).await.unwrap_err();
        assert!(refused.to_string().contains("blobs and images"), "{refused}");
    }

    #[test]
    fn images_from_outside_are_checked() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let image = pb::Image { id: digest.clone(), repo_tags: vec!["app:1".into()], ..Default::default() };
        assert!(validate_images(std::slice::from_ref(&image)).is_ok());
        assert!(validate_images(&[]).is_err());
        let bad_tag = pb::Image { repo_tags: vec!["../../x".into()], ..image.clone() };
        assert!(validate_images(&[bad_tag]).is_err());
        let bad_layer = pb::Image {
            layers: vec![pb::Layer { digest: "sha256:../../etc/passwd".into(), ..Default::default() }],
            ..image.clone()
        };
        assert!(validate_images(&[bad_layer]).is_err());
        assert_eq!(blob_key("cache/web/", &digest), format!("cache/web/blobs/sha256/{}", "a".repeat(64)));
    }
}
