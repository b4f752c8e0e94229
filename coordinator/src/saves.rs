//! The save protocol: `BeginSave` records what a worker is about to save and answers which
//! blobs the store lacks; `CommitSave` checks every blob is stored with the right size, then
//! makes the manifest visible in one transaction with the ledger.
//!
//! Architecture Invariant: a manifest never names a blob that was not verified present.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::names;
use proto::v1 as pb;

use crate::credentials::{now_unix, project_prefix};
use crate::error::Error;
use crate::manifests::{BlobRecord, ServiceCounters, manifest_digests};
use crate::service::{CacheService, validate_key};

/// How long a begun save may take before its commit is refused.
const SAVE_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// How long a save's claim on the blobs it uploads holds (single flight): another save of the
/// project neither uploads them nor, at its commit, waits for them longer than this. A worker that
/// died mid-save releases its claims when this runs out.
const CLAIM_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// How often a commit waiting for another save's blobs looks at the store.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(250);
const MAX_IMAGES: usize = 1000;
const MAX_LAYERS_PER_IMAGE: usize = 1000;

/// A save between `BeginSave` and `CommitSave`.
struct PendingSave {
    project: String,
    key: pb::CacheKey,
    generation: u64,
    image_ids: Vec<String>,
    engine_version: String,
    began: Instant,
    /// The missing blobs this save uploads; no other save of the project uploads them meanwhile.
    claimed: HashSet<String>,
}

/// Begun saves, by save ID. Held in memory: a coordinator restart makes workers save again.
#[derive(Default)]
pub struct PendingSaves(Mutex<HashMap<String, PendingSave>>);

fn claims(save: &PendingSave, project: &str, digest: &str) -> bool {
    save.project == project && save.began.elapsed() < CLAIM_LIFETIME && save.claimed.contains(digest)
}

impl PendingSaves {
    /// Registers a save. Of the `missing` blobs it claims those no other live save of the
    /// project has claimed, and returns (claimed: upload these, in flight: another save does).
    fn begin(&self, save_id: String, mut save: PendingSave, missing: Vec<String>) -> (Vec<String>, Vec<String>) {
        let mut saves = self.0.lock().expect("pending saves lock");
        saves.retain(|_, pending| pending.began.elapsed() < SAVE_LIFETIME);
        let (in_flight, to_upload): (Vec<String>, Vec<String>) =
            missing.into_iter().partition(|digest| saves.values().any(|other| claims(other, &save.project, digest)));
        save.claimed = to_upload.iter().cloned().collect();
        saves.insert(save_id, save);
        (to_upload, in_flight)
    }

    /// Whether a live save of `project` other than the caller's is uploading `digest`.
    fn in_flight(&self, project: &str, digest: &str) -> bool {
        self.0.lock().expect("pending saves lock").values().any(|save| claims(save, project, digest))
    }

    fn take(&self, save_id: &str, project: &str) -> Result<PendingSave, Error> {
        let mut saves = self.0.lock().expect("pending saves lock");
        match saves.get(save_id) {
            Some(save) if save.project == project && save.began.elapsed() < SAVE_LIFETIME => {
                Ok(saves.remove(save_id).expect("present"))
            }
            _ => Err(Error::NoSuchSave(save_id.to_owned())),
        }
    }
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
        project: &str,
        request: &pb::BeginSaveRequest,
    ) -> Result<pb::BeginSaveResponse, Error> {
        let key = validate_key(request.key.as_ref())?;
        validate_images(&request.images)?;
        let record = self.db.project(project)?.ok_or_else(|| Error::NoSuchProject(project.to_owned()))?;
        let probe = pb::Manifest { images: request.images.clone(), ..Default::default() };
        let digests: BTreeSet<String> = manifest_digests(&probe);
        let stored = self.db.stored_blobs(project, &digests)?;
        let missing: Vec<String> = digests.iter().filter(|d| !stored.contains_key(*d)).cloned().collect();
        let current = self.db.manifest(project, &key.service, &key.branch)?;
        let wanted_ids: BTreeSet<&str> = request.images.iter().map(|image| image.id.as_str()).collect();
        let mut known_images: Vec<pb::Image> = Vec::new();
        for manifest in self.db.manifests(project)? {
            for image in manifest.images {
                if wanted_ids.contains(image.id.as_str()) && !known_images.iter().any(|known| known.id == image.id) {
                    known_images.push(image);
                }
            }
        }
        let unchanged = missing.is_empty()
            && current.is_some_and(|manifest| identity(&manifest.images) == identity(&request.images));

        let save_id = crate::tokens::random_hex_32();
        let pending = PendingSave {
            project: project.to_owned(),
            key,
            generation: record.generation,
            image_ids: request.images.iter().map(|image| image.id.clone()).collect(),
            engine_version: request.engine_version.clone(),
            began: Instant::now(),
            claimed: HashSet::new(),
        };
        let (missing_digests, in_flight_digests) = self.pending_saves.begin(save_id.clone(), pending, missing);
        // Blobs in flight still need the worker's export (for their sizes), not its uploads.
        // A save that moves nothing holds no share of the transfer budget.
        let (credentials, plan) = if missing_digests.is_empty() && in_flight_digests.is_empty() {
            (None, None)
        } else {
            let credentials = self.issue_credentials(project, pb::Access::Write, "").await?;
            // The save ID names its lease; the commit gives it back.
            (Some(credentials), Some(self.budget.grant(project, &save_id)))
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
        })
    }

    pub async fn commit_save(&self, project: &str, request: &pb::CommitSaveRequest) -> Result<pb::Manifest, Error> {
        validate_images(&request.images)?;
        let pending = self.pending_saves.take(&request.save_id, project)?;
        self.budget.release(project, &request.save_id);
        let image_ids: Vec<String> = request.images.iter().map(|image| image.id.clone()).collect();
        if image_ids != pending.image_ids {
            return Err(Error::InvalidArgument("the committed images differ from the ones the save began with".into()));
        }
        let mut manifest = pb::Manifest {
            key: Some(pending.key.clone()),
            images: request.images.clone(),
            engine_version: pending.engine_version,
            created_unix: now_unix(),
            last_used_unix: now_unix(),
            save_log: request.save_log.iter().take(10_000).cloned().collect(),
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
                    references: 0,
                };
                reported.insert(layer.digest.clone(), record);
            }
        }
        let known = self.db.stored_blobs(project, reported.keys())?;
        let prefix = project_prefix(&self.store_prefix, project);
        for (digest, record) in &reported {
            let stored = match known.get(digest) {
                Some(known) => Some(known.stored_size),
                None => self.stored_or_awaited(project, &blob_key(&prefix, digest), digest).await?,
            };
            match stored {
                Some(size) if size == record.stored_size => {}
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
        self.db.commit_manifest(project, &manifest, pending.generation, &reported)?;
        self.db.add_to_counters(project, &pending.key.service, &ServiceCounters { saves: 1, ..Default::default() })?;
        tracing::info!(project, service = pending.key.service, n_images = manifest.images.len(), "save committed");
        Ok(manifest)
    }
}

impl CacheService {
    /// The stored size of a blob; while another save of the project is still uploading it
    /// (single flight), waits for it, as long as that save's claim holds.
    async fn stored_or_awaited(&self, project: &str, key: &str, digest: &str) -> Result<Option<u64>, Error> {
        loop {
            let stored = self.store.object_size(key).await?;
            if stored.is_some() || !self.pending_saves.in_flight(project, digest) {
                return Ok(stored);
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
mod tests {
    use super::*;

    fn pending(project: &str) -> PendingSave {
        PendingSave {
            project: project.into(),
            key: pb::CacheKey::default(),
            generation: 0,
            image_ids: Vec::new(),
            engine_version: String::new(),
            began: Instant::now(),
            claimed: HashSet::new(),
        }
    }

    #[test]
    fn a_blob_another_save_uploads_is_uploaded_once() {
        let saves = PendingSaves::default();
        let digests = |names: &[&str]| names.iter().map(|name| name.to_string()).collect::<Vec<_>>();
        let (upload, in_flight) = saves.begin("s1".into(), pending("web"), digests(&["a", "b"]));
        assert_eq!((upload, in_flight), (digests(&["a", "b"]), digests(&[])));
        let (upload, in_flight) = saves.begin("s2".into(), pending("web"), digests(&["b", "c"]));
        assert_eq!((upload, in_flight), (digests(&["c"]), digests(&["b"])));
        // Another project never waits for this one's uploads.
        let (upload, in_flight) = saves.begin("s3".into(), pending("api"), digests(&["a"]));
        assert_eq!((upload, in_flight), (digests(&["a"]), digests(&[])));
        assert!(saves.in_flight("web", "b"));
        // The claimant's commit (or failure to come back) ends the claim.
        saves.take("s1", "web").unwrap();
        assert!(!saves.in_flight("web", "b"));
        assert!(saves.in_flight("web", "c"));
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
