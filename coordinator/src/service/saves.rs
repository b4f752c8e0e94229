//! The save protocol: `BeginSave` records what a worker is about to save and answers which
//! blobs the store lacks; `CommitSave` checks every blob is stored with the right size, then
//! makes the manifest visible in one transaction with the ledger.
//!
//! Architecture Invariant: a manifest never names a blob that was not verified present.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use proto::names;
use proto::object_keys::{blob_key, project_prefix};
use proto::v1 as pb;

use super::{CacheService, Lock, validate_key};
use crate::claims::SaveFacts;
use crate::error::Error;
use crate::state::{BlobRecord, Committed, OpenSave, ServiceCounters, manifest_digests};

/// How long one `CommitSave` call waits for blobs other saves are uploading before it answers
/// "call again": well inside any worker's per-call deadline.
const COMMIT_WAIT: Duration = Duration::from_secs(2);
/// How often a commit waiting for another save's blobs looks at the store.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(250);
const MAX_IMAGES: usize = 1000;
const MAX_LAYERS_PER_IMAGE: usize = 1000;
const MAX_HOST_NAME: usize = 255;
/// Distinct blobs one save may name.
const MOST_BLOBS_PER_SAVE: usize = 20_000;
/// Store lookups (HEAD) one commit keeps in flight.
const STORE_LOOKUPS_IN_FLIGHT: usize = 16;
/// Checks of a reported bad blob one token of a project may ask for per minute (each may read
/// a blob).
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

/// The save log and engine version from outside: within the bounds every worker fits them to
/// (`proto::save_log`), printable.
fn validate_save_log(lines: &[String]) -> Result<(), Error> {
    proto::save_log::check_save_log(lines).map_err(Error::InvalidArgument)
}

fn validate_engine_version(version: &str) -> Result<(), Error> {
    proto::save_log::check_engine_version(version).map_err(Error::InvalidArgument)
}

/// Tags one image may carry.
const MAX_TAGS_PER_IMAGE: usize = 256;

/// The most build steps one image may record, and the longest instruction.
const MAX_STEPS_PER_IMAGE: usize = 1000;
const MAX_INSTRUCTION: usize = 4096;

/// Checks an image's build steps and base: bounded, and the base a tag and a digest.
fn validate_steps(image: &pb::Image) -> Result<(), Error> {
    if image.steps.len() > MAX_STEPS_PER_IMAGE {
        return Err(Error::InvalidArgument(format!(
            "image {} records more than {MAX_STEPS_PER_IMAGE} steps",
            image.id
        )));
    }
    if image.steps.iter().any(|step| step.instruction.len() > MAX_INSTRUCTION) {
        return Err(Error::InvalidArgument(format!("a build step has at most {MAX_INSTRUCTION} bytes of instruction")));
    }
    if !image.base.is_empty() {
        names::validate_repo_tag(&image.base)?;
    }
    if !image.base_id.is_empty() {
        names::validate_digest(&image.base_id)?;
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
        if image.repo_tags.len() > MAX_TAGS_PER_IMAGE {
            return Err(Error::InvalidArgument(format!("image {} has more than {MAX_TAGS_PER_IMAGE} tags", image.id)));
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
        validate_steps(image)?;
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

/// A begin's key and the distinct blobs it names, once the principal may write its branch and
/// its images, host and number of blobs are within bounds.
fn validate_begin(
    principal: &crate::tokens::Principal,
    request: &pb::BeginSaveRequest,
) -> Result<(pb::CacheKey, BTreeSet<String>), Error> {
    let key = validate_key(request.key.as_ref())?;
    principal.check_write(&key.branch)?;
    validate_images(&request.images)?;
    validate_host(&request.host)?;
    validate_engine_version(&request.engine_version)?;
    let probe = pb::Manifest { images: request.images.clone(), ..Default::default() };
    let digests: BTreeSet<String> = manifest_digests(&probe);
    if digests.len() > MOST_BLOBS_PER_SAVE {
        return Err(Error::InvalidArgument(format!(
            "a save names {} blobs, more than the {MOST_BLOBS_PER_SAVE} one save may",
            digests.len()
        )));
    }
    Ok((key, digests))
}

/// The record of a begun save, as its claims keep it until the commit.
fn open_save(
    principal: &crate::tokens::Principal,
    key: &pb::CacheKey,
    generation: u64,
    request: &pb::BeginSaveRequest,
    digests: &BTreeSet<String>,
    moves_blobs: bool,
    now_unix_ms: i64,
) -> OpenSave {
    OpenSave {
        project: principal.project.clone(),
        token_id: principal.token_id.clone(),
        service: key.service.clone(),
        branch: key.branch.clone(),
        generation,
        image_ids: request.images.iter().map(|image| image.id.clone()).collect(),
        engine_version: request.engine_version.clone(),
        began_unix_ms: now_unix_ms,
        host: request.host.clone(),
        last_alive_unix_ms: now_unix_ms,
        claimed: BTreeSet::new(),
        named: digests.clone(),
        silence_noted: false,
        // A save that moves nothing holds no share of the transfer budget.
        leased: moves_blobs,
    }
}

/// A blob the ledger holds, as a begin answers it: derived from its digest and the stored size
/// the commit that recorded it checked against the store, never from what a worker claimed of
/// it (a record written before that was checked keeps no other field).
///
/// Architecture Invariant: every blob is stored as the bytes of its digest (the embedded
/// endpoint refuses other bytes, a commit verifies each new blob), so its record is plain.
fn stored_layer(digest: String, record: BlobRecord) -> pb::Layer {
    pb::Layer { digest, size: record.stored_size, stored_size: record.stored_size, ..Default::default() }
}

/// The most bytes of image descriptions (`known_images`) one begin answers: what is left of a
/// worker's 4 MiB message beside the other answers. Images beyond are not described, and
/// their save reads them from the engine.
const KNOWN_IMAGES_BUDGET: usize = 1 << 20;

/// Whether what `manifest` says of its images may be told to `principal`'s save of `branch`:
/// the token may read the manifest's branch, and that is `branch` itself, or the token that
/// wrote the manifest could have written `branch` too, or the save's token is a scoped one
/// given that branch to read (a pull request's token, whose builds already load the default
/// branch's cache). So a branch is never told what a less trusted token wrote (a pull
/// request's description of the default branch's images: the project token reads every
/// branch but was given none), and a manifest from before its writer was recorded describes
/// only its own branch and the branches of tokens given it to read.
fn may_describe(principal: &crate::tokens::Principal, manifest: &pb::Manifest, branch: &str) -> bool {
    let source = manifest.key.as_ref().map(|key| key.branch.as_str()).unwrap_or_default();
    if principal.check_read(source).is_err() {
        return false;
    }
    let written_by_a_writer_of_branch = manifest.origin.as_ref().is_some_and(|origin| {
        origin.writer_branches.iter().any(|pattern| crate::tokens::branch_matches(pattern, branch))
    });
    let given_to_read = principal
        .scope
        .as_ref()
        .is_some_and(|scope| scope.read.iter().any(|pattern| crate::tokens::branch_matches(pattern, source)));
    source == branch || written_by_a_writer_of_branch || given_to_read
}

/// What a begin tells of an image a manifest holds: what a save that runs no `docker save`
/// needs (its blobs, as [`stored_layer`] derives them, and how it was built), not its steps or
/// tags, which the manifest's writer chose.
fn known_image(image: pb::Image) -> pb::Image {
    let plain = |layer: pb::Layer| pb::Layer {
        size: layer.stored_size,
        stored_size: layer.stored_size,
        digest: layer.digest,
        ..Default::default()
    };
    pb::Image {
        id: image.id,
        parent_id: image.parent_id,
        layers: image.layers.into_iter().map(plain).collect(),
        config_size: image.config_size,
        builder: image.builder,
        inline_cache: image.inline_cache,
        oci_blobs: image.oci_blobs.into_iter().map(plain).collect(),
        oci_media_type: image.oci_media_type,
        build_cache: image.build_cache,
        ..Default::default()
    }
}

/// The images of `images` that the project's `manifests` already hold, each once, with what
/// the first trusted one recorded of them ([`may_describe`]; the save's own branch first),
/// within [`KNOWN_IMAGES_BUDGET`].
fn known_images(
    principal: &crate::tokens::Principal,
    key: &pb::CacheKey,
    images: &[pb::Image],
    manifests: &[pb::Manifest],
) -> Vec<pb::Image> {
    use prost::Message;
    let wanted_ids: BTreeSet<&str> = images.iter().map(|image| image.id.as_str()).collect();
    let mut sources: Vec<&pb::Manifest> =
        manifests.iter().filter(|manifest| may_describe(principal, manifest, &key.branch)).collect();
    sources.sort_by_key(|manifest| manifest.key.as_ref().is_none_or(|source| source.branch != key.branch));
    let (mut known_images, mut n_bytes): (Vec<pb::Image>, usize) = (Vec::new(), 0);
    for image in sources.into_iter().flat_map(|manifest| &manifest.images) {
        if !wanted_ids.contains(image.id.as_str()) || known_images.iter().any(|known| known.id == image.id) {
            continue;
        }
        let described = known_image(image.clone());
        n_bytes += described.encoded_len();
        if n_bytes > KNOWN_IMAGES_BUDGET {
            break;
        }
        known_images.push(described);
    }
    known_images
}

/// The most bytes of the key's previous images (with their steps) one begin answers.
const PREVIOUS_IMAGES_BUDGET: usize = 1 << 20;

/// The images of the key's manifest that recorded build steps, for the save to say which steps
/// it reused, within [`PREVIOUS_IMAGES_BUDGET`] (beyond, a save reports no reuse for the rest).
fn previous_images(manifest: pb::Manifest) -> Vec<pb::Image> {
    use prost::Message;
    let mut n_bytes = 0;
    manifest
        .images
        .into_iter()
        .filter(|image| !image.steps.is_empty())
        .take_while(|image| {
            n_bytes += image.encoded_len();
            n_bytes <= PREVIOUS_IMAGES_BUDGET
        })
        .collect()
}

/// Whether every blob record of `manifest` is one a commit derives (plain: no encoding, no
/// other stored digest, stored size equal to size).
fn checked_records(manifest: &pb::Manifest) -> bool {
    manifest.images.iter().flat_map(|image| image.layers.iter().chain(&image.oci_blobs)).all(|layer| {
        layer.encoding.is_empty()
            && (layer.stored_digest.is_empty() || layer.stored_digest == layer.digest)
            && layer.size == layer.stored_size
    })
}

/// The branch patterns a principal may write, as a manifest records its writer.
fn writer_branches(principal: &crate::tokens::Principal) -> Vec<String> {
    match &principal.scope {
        Some(scope) => scope.write.clone(),
        None => vec!["*".to_owned()],
    }
}

impl CacheService {
    /// Records what a worker is about to save and answers which blobs the store lacks (claimed
    /// for it to upload, or in flight from another save), with credentials and a share of the
    /// transfer budget when it moves anything.
    pub async fn begin_save(
        &self,
        principal: &crate::tokens::Principal,
        request: &pb::BeginSaveRequest,
    ) -> Result<pb::BeginSaveResponse, Error> {
        let project = principal.project.as_str();
        let (key, digests) = validate_begin(principal, request)?;
        // Held until the save is registered: a garbage collection (which takes the lock
        // exclusively) either ran before and this save sees what it left, or runs after and
        // keeps every blob this save names. Across replicas the state holds it for its step
        // (`State::begin_save`).
        let registering = self.lock_in_process(project, Lock::Shared).await;
        let named: Vec<String> = digests.iter().cloned().collect();
        let save_id = crate::tokens::random_hex_32();
        let now = self.clock.now_unix_ms();
        let mut outcome = None;
        self.db
            .begin_save(project, principal.holder(), &named, &mut |record, stored, manifests, saves| {
                let missing: Vec<String> = digests.iter().filter(|d| !stored.contains_key(*d)).cloned().collect();
                let current = manifests.iter().find(|manifest| manifest.key.as_ref() == Some(&key));
                let known_size: u64 = stored.values().map(|record| record.stored_size).sum();
                if record.quota_bytes > 0 && known_size > record.quota_bytes {
                    return Err(super::gc::over_quota(project, &key, known_size, record.quota_bytes));
                }
                let unchanged = match current {
                    // A manifest holding a record no commit checked (written before commits
                    // derived them) is saved again, so the save replaces it with checked ones.
                    Some(manifest) => {
                        missing.is_empty()
                            && identity(&manifest.images) == identity(&request.images)
                            && checked_records(manifest)
                    }
                    None => false,
                };
                // An unchanged save commits nothing, so it is not kept (and claims nothing).
                let begun = match unchanged {
                    true => None,
                    false => {
                        let moves_blobs = !missing.is_empty();
                        let pending =
                            open_save(principal, &key, record.generation, request, &digests, moves_blobs, now);
                        let begun =
                            self.pending_saves.begin_in(saves, save_id.clone(), pending.clone(), missing, now)?;
                        Some((pending, begun))
                    }
                };
                let known_images = known_images(principal, &key, &request.images, manifests);
                outcome = Some((stored.clone(), current.cloned(), known_images, begun));
                Ok(())
            })
            .await?;
        drop(registering);
        let (stored, current, known_images, begun) = outcome.expect("the save was registered");
        let unchanged = begun.is_none();
        let (missing_digests, in_flight_digests) = match begun {
            Some((pending, begun)) => {
                self.pending_saves.begun_here(&save_id, &pending, now);
                self.release_shares_of_silent(begun.silent, now).await;
                (begun.to_upload, begun.in_flight)
            }
            None => (Vec::new(), Vec::new()),
        };
        if unchanged && let Some(manifest) = &current {
            // An unchanged save is a use of its cache, as a restore is.
            self.db.touch_manifest(project, manifest, self.clock.now_unix()).await?;
        }
        // Blobs in flight still need the worker's export (for their sizes), not its uploads.
        // A save that moves nothing holds no share of the transfer budget.
        let (credentials, plan) = if missing_digests.is_empty() && in_flight_digests.is_empty() {
            (None, None)
        } else {
            self.save_grant(principal, &save_id, now).await?
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
            stored_blobs: stored.into_iter().map(|(digest, record)| stored_layer(digest, record)).collect(),
            known_images,
            previous_images: current.map(previous_images).unwrap_or_default(),
            in_flight_digests,
            keep_alive_seconds: self.pending_saves.keep_alive_interval().as_secs() as u32,
        })
    }

    /// Write credentials and a share of the transfer budget for a save that moves blobs; the
    /// save ID names its lease, and the commit gives it back. Without credentials, the save's
    /// claims are given back.
    async fn save_grant(
        &self,
        principal: &crate::tokens::Principal,
        save_id: &str,
        now_unix_ms: i64,
    ) -> Result<(Option<pb::Credentials>, Option<pb::TransferPlan>), Error> {
        let project = principal.project.as_str();
        let credentials = match self.issue_credentials(project, pb::Access::Write, "", Some(principal)).await {
            Ok(credentials) => credentials,
            Err(error) => {
                self.pending_saves.abandon(save_id, project).await?;
                return Err(error);
            }
        };
        let plan = self.budget.grant_save(project, &principal.token_id, save_id, now_unix_ms).await?;
        Ok((Some(credentials), Some(plan)))
    }

    /// A restore's report of a blob missing or corrupt in the store: checked against the store
    /// (a report is never trusted), and if the blob is indeed lost, dropped from the ledger
    /// with every manifest naming it, under the project's publish lock, so the next save
    /// uploads it again and no restore starts on a manifest that cannot complete.
    pub async fn report_bad_blob(
        &self,
        principal: &crate::tokens::Principal,
        digest: &str,
    ) -> Result<pb::ReportBadBlobResponse, Error> {
        let project = principal.project.as_str();
        names::validate_digest(digest)?;
        if self.db.stored_blobs(project, &[digest.to_owned()]).await?.is_empty() {
            return Ok(pb::ReportBadBlobResponse::default());
        }
        {
            let mut checks = self.bad_blob_checks.lock().expect("bad blob checks");
            let now_ms = self.clock.now_unix_ms();
            let holder = (project.to_owned(), principal.token_id.clone());
            let (since_ms, n) = checks.entry(holder).or_insert((now_ms, 0));
            if now_ms - *since_ms >= 60_000 {
                (*since_ms, *n) = (now_ms, 0);
            }
            if *n >= BAD_BLOB_CHECKS_PER_MINUTE {
                let whose = if principal.token_id.is_empty() {
                    format!("project {project:?}'s token")
                } else {
                    format!("token {} of project {project:?}", principal.token_id)
                };
                return Err(Error::TooMany(format!(
                    "{whose} reported {BAD_BLOB_CHECKS_PER_MINUTE} bad blobs this minute, the most checked: report again later"
                )));
            }
            *n += 1;
        }
        let key = blob_key(&project_prefix(&self.store_prefix, project), digest);
        // Read and hashed without the project's lock: a report of a big intact blob (any token
        // may send one) must not hold every save and restore of the project meanwhile.
        if self.store.check_blob(&key, digest).await? == crate::store::BlobState::Intact {
            tracing::info!(project, digest, "a blob reported bad is intact in the store");
            return Ok(pb::ReportBadBlobResponse::default());
        }
        let _no_commits = self.lock_project(project, Lock::Exclusive).await?;
        // Looked at again under the lock, before anything is dropped.
        let state = self.store.check_blob(&key, digest).await?;
        if state == crate::store::BlobState::Intact {
            tracing::info!(project, digest, "a blob reported bad is intact in the store");
            return Ok(pb::ReportBadBlobResponse::default());
        }
        let size =
            self.db.stored_blobs(project, &[digest.to_owned()]).await?.values().map(|record| record.stored_size).sum();
        let caches_removed = self.db.drop_blob(project, digest, self.clock.now_unix()).await?;
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
        let now = self.clock.now_unix_ms();
        self.pending_saves.keep_alive(save_id, project, now).await?;
        self.budget.renew(project, save_id, now).await
    }

    /// Gives a save's claims and its share of the transfer budget back: its worker will not commit.
    pub async fn abandon_save(&self, project: &str, save_id: &str) -> Result<(), Error> {
        if self.pending_saves.abandon(save_id, project).await? {
            self.budget.release(project, save_id, self.clock.now_unix_ms()).await?;
            tracing::info!(project, "save abandoned");
        }
        Ok(())
    }

    /// Gives back the budget shares of saves whose workers fell silent (see
    /// [`crate::claims::PendingSaves::newly_silent`]), so a killed worker's share does not
    /// wait 10 minutes. Run each second by the replica leading the background work (and, for
    /// its project, by every begin); a failure is logged, and the next second tries again.
    pub(crate) async fn release_silent_saves(&self) {
        let now = self.clock.now_unix_ms();
        match self.pending_saves.newly_silent(now).await {
            Ok(silent) => self.release_shares_of_silent(silent, now).await,
            Err(error) => tracing::warn!(error = %error.line(), "looking for silent saves failed; it is tried again"),
        }
    }

    /// Gives back the budget shares of `silent` saves, (project, save ID) each.
    async fn release_shares_of_silent(&self, silent: Vec<(String, String)>, now: i64) {
        for (project, save_id) in silent {
            match self.budget.release(&project, &save_id, now).await {
                Ok(()) => tracing::info!(
                    project,
                    "a save's worker fell silent: its claims lapsed and its budget share is back"
                ),
                Err(error) => {
                    tracing::warn!(project, error = %error.line(), "releasing a silent save's budget share failed")
                }
            }
        }
    }

    /// Forgets every begun save of a flushed project: none of them can commit.
    pub(crate) async fn abandon_project_saves(&self, project: &str) -> Result<(), Error> {
        self.pending_saves.abandon_project(project).await
    }

    /// Checks every blob the save names is stored with the size its worker reports (and each
    /// new one against its digest), then commits the manifest with the ledger, durably, and
    /// evicts to fit the quota; or answers which blobs other saves are still uploading.
    pub async fn commit_save(
        &self,
        principal: &crate::tokens::Principal,
        request: &pb::CommitSaveRequest,
    ) -> Result<pb::CommitSaveResponse, Error> {
        let project = principal.project.as_str();
        validate_images(&request.images)?;
        validate_save_log(&request.save_log)?;
        let pending = self.committable_save(principal, request).await?;
        let mut manifest = self.manifest_of(principal, &pending, request);
        let reported = reported_blobs(&mut manifest.images)?;
        match self.commit_known_blobs(principal, &pending, &manifest, &reported, &request.save_id).await {
            Ok(Some(answer)) => return Ok(answer),
            Ok(None) => {}
            Err(Error::SaveConflict(flushed)) => {
                return Err(self.flushed_since_begun(&pending, &request.save_id, flushed).await);
            }
            Err(error) => return Err(error),
        }
        // Before the store is asked for what a flush deleted: a save no longer open (a flush
        // forgets its project's open saves) is refused as unknown, one the flush missed (begun
        // as it ran) by the project's generation.
        self.pending_saves.describe_open(&request.save_id, project, self.clock.now_unix_ms()).await?;
        let record = self.existing_project(project).await?;
        if record.generation != pending.generation {
            let flushed = format!("project {project:?} was flushed while the save ran: save again");
            return Err(self.flushed_since_begun(&pending, &request.save_id, flushed).await);
        }
        // A post-flush sweep waits until the blobs are checked and recorded.
        let no_sweep = self.lock_project(project, Lock::Shared).await?;
        let reported_digests: Vec<String> = reported.keys().cloned().collect();
        let known = self.db.stored_blobs(project, &reported_digests).await?;
        let prefix = project_prefix(&self.store_prefix, project);
        let (in_store, mut waiting_for) =
            self.look_up_unknown_blobs(project, &request.save_id, &prefix, &reported, &known).await?;
        self.check_stored_sizes(&prefix, &reported, &known, &in_store).await?;
        if !waiting_for.is_empty() {
            waiting_for.sort();
            return Ok(pb::CommitSaveResponse { waiting_for_digests: waiting_for, ..Default::default() });
        }
        self.verify_new_blobs(&prefix, &in_store).await?;
        self.pending_saves.take(&request.save_id, project).await?;
        if pending.leased {
            self.budget.release(project, &request.save_id, self.clock.now_unix_ms()).await?;
        }
        // The manifest's own bytes count against the quota beside its blobs'.
        let size: u64 = reported.values().map(|record| record.stored_size).sum::<u64>() + manifest_bytes(&manifest);
        let quota = record.quota_bytes;
        if quota > 0 && size > quota {
            drop(no_sweep);
            let uploaded: HashMap<String, BlobRecord> =
                reported.into_iter().filter(|(digest, _)| in_store.contains_key(digest)).collect();
            return Err(self.refuse_over_quota(project, &pending.key, size, quota, &uploaded).await);
        }
        if let Some(origin) = manifest.origin.as_mut() {
            origin.committed_unix_ms = self.clock.now_unix_ms();
        }
        let committed = self.record_commit(project, &manifest, &pending, &reported).await?;
        self.pending_saves.forget_here(&request.save_id);
        drop(no_sweep);
        if quota > 0 && !self.fit_quota_after_commit(principal, &pending.key).await {
            return Err(super::gc::over_quota_of_others(principal, &pending.key, quota));
        }
        Ok(commit_response(project, &pending.key, manifest, committed))
    }

    /// The commit of a save whose every blob the ledger records, which needs no look at the
    /// store: checked against the ledger and the project's quota, and recorded, in one step of
    /// the state (`State::commit_known`, under the publish lock held shared for the step, the
    /// token checked live inside it). `None`: the ledger lacks one of the blobs, or the save is
    /// over the quota, and nothing changed; the commit then takes the way through the store.
    /// [`Error::SaveConflict`]: the project was flushed since the save began.
    async fn commit_known_blobs(
        &self,
        principal: &crate::tokens::Principal,
        pending: &SaveFacts,
        manifest: &pb::Manifest,
        reported: &HashMap<String, BlobRecord>,
        save_id: &str,
    ) -> Result<Option<pb::CommitSaveResponse>, Error> {
        let project = principal.project.as_str();
        let size: u64 = reported.values().map(|record| record.stored_size).sum::<u64>() + manifest_bytes(manifest);
        let mut quota = 0;
        let mut manifest = manifest.clone();
        if let Some(origin) = manifest.origin.as_mut() {
            origin.committed_unix_ms = self.clock.now_unix_ms();
        }
        let recording = self.lock_in_process(project, Lock::Shared).await;
        let committed = self
            .db
            .commit_known(
                project,
                principal.holder(),
                &manifest,
                pending.generation,
                reported,
                self.clock.now_unix(),
                &mut |record, known| {
                    quota = record.quota_bytes;
                    check_known_sizes(reported, known)?;
                    Ok(quota == 0 || size <= quota)
                },
                save_id,
            )
            .await?;
        drop(recording);
        let Some(committed) = committed else { return Ok(None) };
        self.pending_saves.forget_here(save_id);
        self.db.durable().await?;
        if pending.leased {
            self.budget.release(project, save_id, self.clock.now_unix_ms()).await?;
        }
        if quota > 0 && !self.fit_quota_after_commit(principal, &pending.key).await {
            return Err(super::gc::over_quota_of_others(principal, &pending.key, quota));
        }
        Ok(Some(commit_response(project, &pending.key, manifest, committed)))
    }

    /// The begun save `request` commits: refused when the save was begun for a branch this
    /// principal may not write, or when its images changed.
    async fn committable_save(
        &self,
        principal: &crate::tokens::Principal,
        request: &pb::CommitSaveRequest,
    ) -> Result<SaveFacts, Error> {
        let project = principal.project.as_str();
        let pending = self.pending_saves.describe(&request.save_id, project, self.clock.now_unix_ms()).await?;
        // Checked again: the save may have been begun by another token of the project.
        principal.check_write(&pending.key.branch)?;
        let image_ids: Vec<String> = request.images.iter().map(|image| image.id.clone()).collect();
        if image_ids != pending.image_ids {
            return Err(Error::InvalidArgument("the committed images differ from the ones the save began with".into()));
        }
        Ok(pending)
    }

    /// The refusal of a save whose project was flushed since it began (`flushed` says so), its
    /// claims and budget share given back first.
    async fn flushed_since_begun(&self, pending: &SaveFacts, save_id: &str, flushed: String) -> Error {
        let project = pending.project.as_str();
        let given_back = async {
            self.pending_saves.abandon(save_id, project).await?;
            if pending.leased {
                self.budget.release(project, save_id, self.clock.now_unix_ms()).await?;
            }
            Ok::<_, Error>(())
        };
        match given_back.await {
            Ok(()) => Error::SaveConflict(flushed),
            Err(error) => error,
        }
    }

    /// The manifest a commit makes visible, created and last used now, naming the branches its
    /// committing `principal` may write; its origin's commit time is stamped just before it is
    /// recorded.
    fn manifest_of(
        &self,
        principal: &crate::tokens::Principal,
        pending: &SaveFacts,
        request: &pb::CommitSaveRequest,
    ) -> pb::Manifest {
        let now = self.clock.now_unix();
        pb::Manifest {
            key: Some(pending.key.clone()),
            images: request.images.clone(),
            engine_version: pending.engine_version.clone(),
            created_unix: now,
            last_used_unix: now,
            save_log: request.save_log.iter().take(10_000).cloned().collect(),
            origin: Some(pb::SaveOrigin {
                save_id: request.save_id.clone(),
                host: pending.host.clone(),
                began_unix_ms: pending.began_unix_ms,
                committed_unix_ms: 0,
                repo_tags: request.images.iter().flat_map(|image| image.repo_tags.iter().cloned()).collect(),
                writer_branches: writer_branches(principal),
            }),
        }
    }

    /// Asks the store for the reported blobs the ledger does not know, several at once, so a
    /// commit of many new layers stays well inside a worker's per-call deadline: their stored
    /// sizes (`None`: absent), and the blobs other live saves are still uploading.
    async fn look_up_unknown_blobs(
        &self,
        project: &str,
        save_id: &str,
        prefix: &str,
        reported: &HashMap<String, BlobRecord>,
        known: &HashMap<String, BlobRecord>,
    ) -> Result<(HashMap<String, Option<u64>>, Vec<String>), Error> {
        let waiting_since = Instant::now();
        let unknown: Vec<String> = reported.keys().filter(|digest| !known.contains_key(*digest)).cloned().collect();
        let lookups = unknown.into_iter().map(|digest| {
            let key = blob_key(prefix, &digest);
            async move {
                let awaited = self.stored_or_awaited(project, save_id, &key, &digest, waiting_since).await?;
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
        Ok((in_store, waiting_for))
    }

    /// Every reported blob not still in flight must be stored with the size its worker
    /// reports: the ledger answers for blobs it knows, the store (`in_store`) for new ones.
    async fn check_stored_sizes(
        &self,
        prefix: &str,
        reported: &HashMap<String, BlobRecord>,
        known: &HashMap<String, BlobRecord>,
        in_store: &HashMap<String, Option<u64>>,
    ) -> Result<(), Error> {
        for (digest, record) in reported {
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
                        && !self.store.verify_blob(&blob_key(prefix, digest), digest).await? =>
                {
                    return Err(planted(digest));
                }
                Some(size) => return Err(stored_with(digest, size, record.stored_size)),
                None => {
                    return Err(Error::BlobNotStored(format!(
                        "blob {digest} is not in the store: upload it before committing"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks each blob new to the ledger (`in_store`) against its digest, several at once.
    ///
    /// Architecture Invariant: a blob is verified against its digest before the ledger
    /// counts it, so no save, however trusted, counts a blob another token planted.
    async fn verify_new_blobs(&self, prefix: &str, in_store: &HashMap<String, Option<u64>>) -> Result<(), Error> {
        let checks = in_store.keys().cloned().map(|digest| {
            let key = blob_key(prefix, &digest);
            async move {
                let matches = self.store.verify_blob(&key, &digest).await?;
                Ok::<_, Error>((digest, matches))
            }
        });
        let checked: Vec<(String, bool)> =
            futures::stream::iter(checks).buffer_unordered(STORE_LOOKUPS_IN_FLIGHT).try_collect().await?;
        match checked.iter().find(|(_, matches)| !matches) {
            Some((digest, _)) => Err(planted(digest)),
            None => Ok(()),
        }
    }

    /// Commits the manifest with the ledger, counts the save, and makes both durable: the
    /// worker prints "saved" on the answer, so the manifest must survive a crash after it.
    async fn record_commit(
        &self,
        project: &str,
        manifest: &pb::Manifest,
        pending: &SaveFacts,
        reported: &HashMap<String, BlobRecord>,
    ) -> Result<Committed, Error> {
        let committed =
            self.db.commit_manifest(project, manifest, pending.generation, reported, self.clock.now_unix()).await?;
        self.db
            .add_to_counters(project, &pending.key.service, &ServiceCounters { saves: 1, ..Default::default() })
            .await?;
        self.db.durable().await?;
        Ok(committed)
    }

    /// Evicts the least recently used caches until the project fits its quota again; whether
    /// the cache just saved is kept.
    ///
    /// Architecture Invariant: after a commit the project fits its quota again, the cache
    /// just saved evicted last of all (it alone fits, as checked before the commit). A scoped
    /// token's commit never evicts a cache it may read but not write (rather its own): a less
    /// trusted token never evicts the default branch's.
    /// The save is stored whatever else happens here: a failed eviction is the next one's.
    async fn fit_quota_after_commit(&self, principal: &crate::tokens::Principal, saved: &pb::CacheKey) -> bool {
        let project = principal.project.as_str();
        match self.fit_quota(project, Some(saved), principal.scope.as_ref()).await {
            Ok(evicted) if evicted.caches.contains(saved) => {
                tracing::info!(project, "a scoped token's save did not fit the quota beside the caches it reads");
                false
            }
            Ok(evicted) if !evicted.caches.is_empty() => {
                tracing::info!(
                    project,
                    caches = evicted.caches.len(),
                    bytes = evicted.bytes,
                    "least recently used caches evicted to fit the quota"
                );
                true
            }
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(project, error = %error.line(), "evicting to fit the quota failed; the next commit tries again");
                true
            }
        }
    }
}

/// What a manifest costs its project's quota: its encoded size.
pub(crate) fn manifest_bytes(manifest: &pb::Manifest) -> u64 {
    prost::Message::encoded_len(manifest) as u64
}

/// The refusal of a commit describing a blob as stored otherwise than as the bytes of its
/// digest: no store holds such a blob, and its record would reach other branches' saves.
fn not_plain(digest: &str) -> Error {
    Error::InvalidArgument(format!(
        "blob {digest} is stored as the bytes of its digest: commit it with no encoding or stored digest"
    ))
}

/// The blobs a commit names, each with the record the coordinator derives for it, keyed by
/// digest: image configs, layers and OCI blobs. Every blob is stored as the bytes of its
/// digest, so its record is its size alone (stored size and size equal), which the commit
/// then checks against the ledger or the store; a layer described as compressed or stored
/// under another digest is refused, never recorded for another branch to copy.
fn reported_blobs(images: &mut [pb::Image]) -> Result<HashMap<String, BlobRecord>, Error> {
    let mut reported: HashMap<String, BlobRecord> = HashMap::new();
    // A blob named twice is named with one size: each place it is named is what a restore reads.
    let mut note = |digest: &str, size: u64| match reported.insert(digest.to_owned(), BlobRecord::plain(size)) {
        Some(earlier) if earlier.stored_size != size => Err(Error::InvalidArgument(format!(
            "blob {digest} is named with two sizes, {} and {size}",
            earlier.stored_size
        ))),
        _ => Ok(()),
    };
    for image in images {
        note(&image.id, image.config_size)?;
        for layer in &mut image.layers {
            let stored_as_itself = layer.stored_digest.is_empty() || layer.stored_digest == layer.digest;
            if !layer.encoding.is_empty() || !stored_as_itself {
                return Err(not_plain(&layer.digest));
            }
            layer.stored_size = layer.size;
            layer.stored_digest.clear();
            note(&layer.digest, layer.size)?;
        }
        for blob in &mut image.oci_blobs {
            blob.stored_size = blob.size;
            note(&blob.digest, blob.size)?;
        }
    }
    Ok(reported)
}

/// The refusal of a commit reporting a blob of `reported_size` bytes that is stored with `size`.
fn stored_with(digest: &str, size: u64, reported_size: u64) -> Error {
    Error::BlobNotStored(format!("blob {digest} is stored with {size} bytes, not {reported_size}: upload it again"))
}

/// Every reported blob the ledger records (`known`) must be recorded with the size its worker
/// reports.
fn check_known_sizes(reported: &HashMap<String, BlobRecord>, known: &HashMap<String, BlobRecord>) -> Result<(), Error> {
    for (digest, record) in reported {
        if let Some(known) = known.get(digest).filter(|known| known.stored_size != record.stored_size) {
            return Err(stored_with(digest, known.stored_size, record.stored_size));
        }
    }
    Ok(())
}

/// A commit's answer: the manifest stored, or the newer one kept.
fn commit_response(
    project: &str,
    key: &pb::CacheKey,
    manifest: pb::Manifest,
    committed: Committed,
) -> pb::CommitSaveResponse {
    match committed {
        Committed::Stored { replaced } => {
            tracing::info!(project, service = key.service, n_images = manifest.images.len(), "save committed");
            pb::CommitSaveResponse { manifest: Some(manifest), stored: true, replaced, waiting_for_digests: Vec::new() }
        }
        Committed::KeptNewer(current) => {
            tracing::info!(project, service = key.service, "save not stored: a newer save's manifest is kept");
            pb::CommitSaveResponse { manifest: Some(current), stored: false, ..Default::default() }
        }
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
            if stored.is_some()
                || !self.pending_saves.in_flight_for(project, digest, save_id, self.clock.now_unix_ms()).await?
            {
                return Ok(Awaited::Stored(stored));
            }
            if waiting_since.elapsed() >= COMMIT_WAIT {
                return Ok(Awaited::StillInFlight);
            }
            tokio::time::sleep(IN_FLIGHT_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Saves one image of a config and one layer through `service` as `principal`, the blobs
    /// written straight into the embedded store's folder under `dir`; returns the layer's digest.
    async fn save_one_layer(
        service: &CacheService,
        principal: &crate::tokens::Principal,
        dir: &std::path::Path,
        layer: &[u8],
    ) -> String {
        let layer_digest = proto::digest::sha256_digest(layer);
        let config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#).into_bytes();
        let image = |sized: bool| pb::Image {
            id: proto::digest::sha256_digest(&config),
            repo_tags: vec!["app:1".into()],
            config_size: if sized { config.len() as u64 } else { 0 },
            layers: vec![pb::Layer {
                digest: layer_digest.clone(),
                size: if sized { layer.len() as u64 } else { 0 },
                ..Default::default()
            }],
            ..Default::default()
        };
        let key = pb::CacheKey { service: "app".into(), branch: String::new() };
        let begin = pb::BeginSaveRequest { key: Some(key), images: vec![image(false)], ..Default::default() };
        let begun = service.begin_save(principal, &begin).await.unwrap();
        for blob in [&config[..], layer] {
            let digest = proto::digest::sha256_digest(blob);
            let path = dir.join("objects/layer-cache").join(blob_key("cache/web/", &digest));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, blob).unwrap();
        }
        let commit = pb::CommitSaveRequest { save_id: begun.save_id, images: vec![image(true)], save_log: Vec::new() };
        assert!(service.commit_save(principal, &commit).await.unwrap().stored);
        layer_digest
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_of_an_intact_blob_never_waits_for_the_projects_lock() {
        let dir = tempfile::tempdir().unwrap();
        let service = super::super::tests::service(dir.path(), crate::state::Database::open(dir.path()).unwrap(), None);
        let (_, token) = service.create_project("web", None).await.unwrap();
        let principal = service.authenticate_worker(Some(&token)).await.unwrap();
        let digest = save_one_layer(&service, &principal, dir.path(), &vec![7u8; 1 << 20]).await;
        // A commit or a lookup holds the project's lock (shared) meanwhile: a report of an
        // intact blob, which any token may send ten times a minute and which reads the whole
        // blob, is answered without waiting for it (it used to take the lock exclusively).
        let _committing = service.lock_project("web", Lock::Shared).await.unwrap();
        let report = service.report_bad_blob(&principal, &digest);
        let answered = tokio::time::timeout(Duration::from_secs(20), report).await;
        let answer = answered.expect("the report waited for the project's lock").unwrap();
        assert!(!answer.dropped);
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn image_with(layer: pb::Layer) -> pb::Image {
        pb::Image { id: digest('c'), config_size: 5, layers: vec![layer], ..Default::default() }
    }

    #[test]
    fn a_commit_derives_every_record_and_refuses_a_compressed_or_renamed_one() {
        let honest = pb::Layer { digest: digest('a'), size: 10, stored_size: 99, ..Default::default() };
        let mut images = vec![image_with(honest.clone())];
        let reported = reported_blobs(&mut images).unwrap();
        assert_eq!(reported[&digest('a')], BlobRecord::plain(10));
        assert_eq!(reported[&digest('c')], BlobRecord::plain(5));
        assert_eq!(images[0].layers[0].stored_size, 10, "the manifest carries the derived record");
        for forged in [
            pb::Layer { encoding: "gzip".into(), ..honest.clone() },
            pb::Layer { stored_digest: digest('0'), ..honest.clone() },
        ] {
            let refused = reported_blobs(&mut [image_with(forged)]).unwrap_err();
            assert!(refused.line().contains("stored as the bytes of its digest"), "{}", refused.line());
        }
        let twice = pb::Image { layers: vec![honest.clone(), pb::Layer { size: 11, ..honest }], ..images[0].clone() };
        assert!(reported_blobs(&mut [twice]).unwrap_err().line().contains("two sizes"));
    }

    fn manifest_on(branch: &str, writer_branches: &[&str]) -> pb::Manifest {
        pb::Manifest {
            key: Some(pb::CacheKey { service: "app".into(), branch: branch.into() }),
            origin: Some(pb::SaveOrigin {
                writer_branches: writer_branches.iter().map(|pattern| pattern.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_branch_is_told_only_what_tokens_that_could_write_it_wrote() {
        let project_token = crate::tokens::Principal {
            project: "web".into(),
            token_id: String::new(),
            scope: None,
            token_sha256_hex: String::new(),
        };
        let pr_token = crate::tokens::Principal {
            scope: Some(crate::tokens::BranchScope { read: vec!["main".into()], write: vec!["pr-*".into()] }),
            ..project_token.clone()
        };
        let by_pr = manifest_on("pr-1", &["pr-*"]);
        let by_project_token = manifest_on("main", &["*"]);
        assert!(!may_describe(&project_token, &by_pr, "main"), "a pull request never describes main's images");
        assert!(may_describe(&project_token, &by_project_token, "pr-1"));
        assert!(may_describe(&pr_token, &by_project_token, "pr-2"), "main's describe a pull request's");
        let by_main_token = manifest_on("main", &["main"]);
        assert!(may_describe(&pr_token, &by_main_token, "pr-2"), "the branch a pull request was given to read");
        assert!(!may_describe(&project_token, &manifest_on("pr-1", &["pr-*"]), "main"));
        assert!(may_describe(&pr_token, &by_pr, "pr-2"), "one pull request's another's: the same writer");
        assert!(!may_describe(&pr_token, &manifest_on("dev", &["*"]), "pr-2"), "a branch it may not read");
        assert!(!may_describe(&project_token, &manifest_on("pr-1", &[]), "main"), "an unknown writer");
        assert!(may_describe(&project_token, &manifest_on("main", &[]), "main"), "its own branch");
    }

    #[test]
    fn known_images_carry_checked_records_and_no_steps() {
        let forged = pb::Layer {
            digest: digest('a'),
            size: 123,
            stored_size: 10,
            encoding: "gzip".into(),
            ..Default::default()
        };
        let image = pb::Image {
            steps: vec![pb::Step { instruction: "RUN x".into(), ..Default::default() }],
            repo_tags: vec!["app:1".into()],
            ..image_with(forged)
        };
        let manifest = pb::Manifest { images: vec![image.clone()], ..Default::default() };
        assert!(!checked_records(&manifest), "saved again rather than kept");
        let known = known_image(image);
        assert!(known.steps.is_empty() && known.repo_tags.is_empty());
        assert_eq!(known.layers[0], pb::Layer { digest: digest('a'), size: 10, stored_size: 10, ..Default::default() });
    }

    #[test]
    fn what_a_save_records_beside_its_images_is_bounded() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let tagged = pb::Image { id: digest, repo_tags: vec!["app:1".into(); 257], ..Default::default() };
        assert!(validate_images(&[tagged]).unwrap_err().to_string().contains("256 tags"));
        assert!(validate_save_log(&vec!["x".repeat(4000); 990]).is_err());
        assert!(validate_save_log(&vec!["x".into(); 10_001]).is_err());
        assert!(validate_save_log(&vec!["x".repeat(1000); 1100]).is_err());
        assert!(validate_save_log(&["saved from ci-main-1\u{1b}[2J".into()]).is_err());
        assert!(validate_save_log(&vec!["x".repeat(1000); 1000]).is_ok());
        assert!(validate_engine_version("20.10.24").is_ok());
        assert!(validate_engine_version("20.10\u{1b}]52;c;aGk=\u{7}").is_err());
        let manifest = pb::Manifest { save_log: vec!["x".repeat(1000); 1000], ..Default::default() };
        assert!((1_000_000..1_010_000).contains(&manifest_bytes(&manifest)));
    }
}
