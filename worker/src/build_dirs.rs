//! The worker's folders on the build host, one set per service under `--build-cache-dir`
//! (default `/tmp/cache-worker`): what a restore wrote for the build to read (BuildKit's
//! `type=local` cache sources on the containerd image store), where the build writes its
//! `mode=max` cache for the next save, and the record of the last restore or save of the
//! service on this host (which token wrote it, the images the engine held then, and the cache's
//! images), so a save on a reused host takes only what its own job built.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::docker::StageLeaf;

/// The default root: `$TMPDIR/cache-worker`.
pub fn default_root() -> PathBuf {
    std::env::temp_dir().join("cache-worker")
}

/// Who a record belongs to: a hash of the worker's token (never the token itself), so a save
/// tells its own project's (and scope's) restore from another's on a shared host.
pub fn owner_of(token: &str) -> String {
    let digest = Sha256::digest(format!("cache-worker build dir owner\n{token}").as_bytes());
    hex::encode(&digest[..16])
}

/// Which CI job a record belongs to: a hash of `--job-id` (`CACHE_JOB_ID`), else of the job
/// the platform names in its own variables (GitLab's `CI_JOB_ID`, Buildkite's
/// `BUILDKITE_JOB_ID`, GitHub's run, attempt and job); empty when none does.
pub fn job_of(job_id: Option<&str>) -> String {
    let from_platform = || {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        var("CI_JOB_ID")
            .map(|id| format!("gitlab {id}"))
            .or_else(|| var("BUILDKITE_JOB_ID").map(|id| format!("buildkite {id}")))
            .or_else(|| {
                let run = var("GITHUB_RUN_ID")?;
                Some(format!(
                    "github {run} {} {}",
                    var("GITHUB_RUN_ATTEMPT").unwrap_or_default(),
                    var("GITHUB_JOB").unwrap_or_default()
                ))
            })
    };
    match job_id.filter(|id| !id.is_empty()).map(str::to_owned).or_else(from_platform) {
        Some(job) => hex::encode(&Sha256::digest(format!("cache-worker build dir job\n{job}").as_bytes())[..16]),
        None => String::new(),
    }
}

/// One service's folders.
#[derive(Debug, Clone)]
pub struct BuildDirs {
    root: PathBuf,
}

/// What the last restore or save of a service on this host saw, by image ID. A restore writes
/// it as it begins (the job's mark: every image already here is not this job's build) and again
/// with the images it brought; a save writes it with the images it saved.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    /// [`owner_of`] the token that wrote it; empty in records of older workers.
    #[serde(default)]
    pub owner: String,
    /// [`job_of`] the job that wrote it; empty when no job was named.
    #[serde(default)]
    pub job: String,
    /// Seconds since the epoch: the newest record of any service speaks for the host.
    #[serde(default)]
    pub written_unix: u64,
    /// Every image the engine held when the record was begun: none is a later build's.
    #[serde(default)]
    pub present: HashSet<String>,
    /// The cache's images: those the restore brought or the save stored.
    pub images: HashSet<String>,
    /// The untagged leaves among them: build stages of the cached build.
    pub stages: HashSet<String>,
}

impl HostRecord {
    /// A record begun now by `owner` in `job` with the engine holding `present`.
    pub fn begin(owner: &str, job: &str, present: HashSet<String>) -> HostRecord {
        let written_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs());
        HostRecord { owner: owner.to_owned(), job: job.to_owned(), written_unix, present, ..Default::default() }
    }
}

const RECORD_FILE: &str = "restored.json";

fn read_record_file(path: &Path) -> Option<HostRecord> {
    std::fs::read(path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok())
}

impl BuildDirs {
    /// `service` is a validated service name, so it is one plain path component.
    pub fn new(root: &Path, service: &str) -> BuildDirs {
        BuildDirs { root: root.join(service) }
    }

    /// The OCI layout of the restored images (containerd image store): a BuildKit build reads
    /// their inline cache with `--cache-from type=local,src=THIS,digest=ID`.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The restored `mode=max` cache: `--cache-from type=local,src=THIS`.
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// Where the build writes its cache (`--cache-to type=local,dest=THIS,mode=max`) and the
    /// next save of the same token reads it.
    pub fn export(&self) -> PathBuf {
        self.root.join("export")
    }

    fn record(&self) -> PathBuf {
        self.root.join(RECORD_FILE)
    }

    /// A running registry view's process and address (`cache-worker view start` writes it,
    /// `view stop` reads it).
    pub fn view_state(&self) -> PathBuf {
        self.root.join("view.json")
    }

    /// What a running registry view prints, for `view stop` to show.
    pub fn view_log(&self) -> PathBuf {
        self.root.join("view.log")
    }

    /// Makes the service's folder (a view writes its state there).
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)
    }

    /// Empties the folders a restore writes and makes them again.
    pub fn reset(&self) -> std::io::Result<()> {
        for dir in [self.images(), self.cache(), self.export()] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        self.forget_record();
        std::fs::create_dir_all(self.images().join(proto::object_keys::BLOBS_DIR))?;
        std::fs::create_dir_all(self.cache().join(proto::object_keys::BLOBS_DIR))
    }

    /// Forgets the service's record.
    pub fn forget_record(&self) {
        let _ = std::fs::remove_file(self.record());
    }

    /// Writes the record whole: a reader sees the old one or the new one, never a part.
    pub fn write_record(&self, record: &HostRecord) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        let partial = self.root.join(format!(".{RECORD_FILE}.{}", std::process::id()));
        std::fs::write(&partial, serde_json::to_vec(record).expect("the record serializes"))?;
        std::fs::rename(&partial, self.record())
    }

    /// The service's record, if there is one (and it can be read).
    pub fn read_record(&self) -> Option<HostRecord> {
        read_record_file(&self.record())
    }

    /// The record a save by `owner` on this host goes by: the service's own, else the newest of
    /// any other service under the same root, with that service's stages left out (they are
    /// another cache's); and, whichever it is, every image another service's cache holds and
    /// every image another token's record saw counted as already here (another service's
    /// cache, or another project's or scope's build, is never this job's, even when this job
    /// ran no restore or restored several services before building them). `None` when no restore or save ever ran here
    /// (a fresh host).
    pub fn save_baseline(&self, owner: &str) -> Option<HostRecord> {
        let parent = self.root.parent()?;
        let others: Vec<(PathBuf, HostRecord)> = std::fs::read_dir(parent)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .filter(|path| *path != self.root)
                    .filter_map(|path| read_record_file(&path.join(RECORD_FILE)).map(|record| (path, record)))
                    .collect()
            })
            .unwrap_or_default();
        let mut baseline = match self.read_record() {
            Some(record) => record,
            None => {
                let newest = others.iter().max_by_key(|(_, record)| record.written_unix)?;
                HostRecord { stages: HashSet::new(), ..newest.1.clone() }
            }
        };
        for (_, record) in &others {
            // Another service's cache (restored or saved) is not this job's build, even
            // restored after this service's mark; what another token's record saw is not either.
            baseline.present.extend(record.images.iter().cloned());
            if record.owner != owner {
                baseline.present.extend(record.present.iter().cloned());
            }
        }
        Some(baseline)
    }

    /// Whether the build's cache export may be saved by `owner` in `job`: only when the
    /// service's record is theirs (their restore emptied the folder and printed the flag that
    /// fills it), and of the same job when both name one (not an earlier job's export).
    pub fn export_is_of(&self, owner: &str, job: &str) -> bool {
        self.read_record().is_some_and(|record| {
            record.owner == owner && (record.job.is_empty() || job.is_empty() || record.job == job)
        })
    }
}

/// Which stage leaves a save by `owner` takes, going by `baseline` (the last restore or save on
/// this host, [`BuildDirs::save_baseline`]): every one made since (neither on the engine then
/// nor among the cache's images), and a stage of the owner's own cache while no stage made
/// since grew from the same image (it was reused, or it is a sibling of one that changed and
/// will be made again). Images already on the host that the owner's cache does not hold as a
/// stage (an earlier build's, another service's or another project's, or a previous final
/// image untagged once the new one took its tag) are never taken, so a cache holds one build's
/// images. Without a baseline (a fresh host) every leaf is this job's.
pub fn stages_to_save(leaves: &[StageLeaf], baseline: Option<&HostRecord>, owner: &str) -> Vec<String> {
    let Some(baseline) = baseline else { return leaves.iter().map(|leaf| leaf.id.clone()).collect() };
    let made_since = |leaf: &&StageLeaf| !baseline.present.contains(&leaf.id) && !baseline.images.contains(&leaf.id);
    let own_stage = |leaf: &StageLeaf| baseline.owner == owner && baseline.stages.contains(&leaf.id);
    let new_bases: HashSet<&str> = leaves.iter().filter(made_since).map(|leaf| leaf.base.as_str()).collect();
    leaves
        .iter()
        .filter(|leaf| made_since(leaf) || (own_stage(leaf) && !new_bases.contains(leaf.base.as_str())))
        .map(|leaf| leaf.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(id: &str, base: &str) -> StageLeaf {
        StageLeaf { id: id.into(), base: base.into() }
    }

    fn ids(values: &[&str]) -> HashSet<String> {
        values.iter().map(|value| value.to_string()).collect()
    }

    #[test]
    fn a_save_takes_new_and_reused_stages_but_not_leftovers() {
        let restored = HostRecord {
            owner: "me".into(),
            images: ids(&["old-stage", "old-app", "sibling"]),
            stages: ids(&["old-stage", "sibling"]),
            ..Default::default()
        };
        // The builder stage was reused: the restored leaf is the stage.
        assert_eq!(stages_to_save(&[leaf("old-stage", "base")], Some(&restored), "me"), vec!["old-stage"]);
        // It changed: the new leaf replaces it (same base), and so the sibling from that base
        // waits for its next build.
        let changed = [leaf("new-stage", "base"), leaf("old-stage", "base"), leaf("sibling", "base")];
        assert_eq!(stages_to_save(&changed, Some(&restored), "me"), vec!["new-stage"]);
        // The previous final image, untagged now, is never a stage.
        assert_eq!(stages_to_save(&[leaf("old-app", "step")], Some(&restored), "me"), Vec::<String>::new());
        // On a fresh host every leaf is this build's.
        assert_eq!(stages_to_save(&changed, None, "me").len(), 3);
    }

    #[test]
    fn images_on_the_host_before_the_job_are_never_its_stages() {
        // Earlier builds' leftovers and another project's stages were on the engine when this
        // job's restore began; the stage this job made was not.
        let marked = HostRecord {
            owner: "me".into(),
            present: ids(&["build-1-app", "build-2-app", "their-stage"]),
            ..Default::default()
        };
        let leaves = [
            leaf("build-1-app", "base"),
            leaf("build-2-app", "base"),
            leaf("their-stage", "base"),
            leaf("mine", "base"),
        ];
        assert_eq!(stages_to_save(&leaves, Some(&marked), "me"), vec!["mine"]);
        // Another token's record: its cache's stages are not this save's, even unchanged.
        let theirs =
            HostRecord { owner: "them".into(), images: ids(&["their-stage"]), stages: ids(&["their-stage"]), ..marked };
        assert_eq!(stages_to_save(&[leaf("their-stage", "base")], Some(&theirs), "me"), Vec::<String>::new());
    }

    #[test]
    fn another_services_restored_images_are_not_this_saves_stages() {
        // One job restores two services, then builds both, then saves both: the second
        // service's restore brought its stage after the first service's mark.
        let root = tempfile::tempdir().unwrap();
        let (app, worker) = (BuildDirs::new(root.path(), "app"), BuildDirs::new(root.path(), "worker"));
        let shared = HostRecord {
            images: ids(&["shared-stage"]),
            stages: ids(&["shared-stage"]),
            ..HostRecord::begin("me", "", ids(&["base"]))
        };
        app.write_record(&shared).unwrap();
        let restored = HostRecord {
            images: ids(&["worker-stage", "shared-stage"]),
            stages: ids(&["worker-stage", "shared-stage"]),
            ..HostRecord::begin("me", "", ids(&["base"]))
        };
        worker.write_record(&restored).unwrap();
        let leaves = [leaf("app-stage", "base"), leaf("shared-stage", "app-step"), leaf("worker-stage", "base")];
        let baseline = app.save_baseline("me").unwrap();
        // A stage both caches hold stays this cache's too.
        assert_eq!(stages_to_save(&leaves, Some(&baseline), "me"), vec!["app-stage", "shared-stage"]);
    }

    #[test]
    fn a_service_without_a_record_goes_by_the_hosts_newest_and_an_export_by_its_owner() {
        let root = tempfile::tempdir().unwrap();
        let (app, worker, api) = (
            BuildDirs::new(root.path(), "app"),
            BuildDirs::new(root.path(), "worker"),
            BuildDirs::new(root.path(), "api"),
        );
        assert_eq!(api.save_baseline("me"), None, "a fresh host");
        let mut old = HostRecord::begin("me", "job-1", ids(&["old"]));
        old.written_unix -= 10;
        app.write_record(&old).unwrap();
        let newest = HostRecord { stages: ids(&["worker-stage"]), ..HostRecord::begin("me", "", ids(&["old", "new"])) };
        worker.write_record(&newest).unwrap();
        let baseline = api.save_baseline("me").unwrap();
        assert_eq!(baseline.present, ids(&["old", "new"]));
        assert!(baseline.stages.is_empty(), "another service's stages are not this one's");
        assert_eq!(app.save_baseline("me").unwrap().present, ids(&["old"]), "a service's own record first");
        // What another token's record saw or names is never this save's, whichever record it
        // goes by.
        let theirs =
            HostRecord { images: ids(&["their-stage"]), ..HostRecord::begin("them", "", ids(&["theirs-before"])) };
        BuildDirs::new(root.path(), "shop").write_record(&theirs).unwrap();
        let baseline = app.save_baseline("me").unwrap();
        assert_eq!(baseline.present, ids(&["old", "their-stage", "theirs-before"]));
        // For them, their own record adds nothing; the other token's records count.
        let for_them = app.save_baseline("them").unwrap().present;
        assert!(for_them.contains("their-stage"), "another service's cache, whoever's");
        assert!(!for_them.contains("theirs-before") && for_them.contains("new"), "{for_them:?}");
        assert!(app.export_is_of("me", "job-1") && !app.export_is_of("them", "job-1") && !api.export_is_of("me", ""));
        assert!(!app.export_is_of("me", "job-2"), "an earlier job's export");
        assert!(app.export_is_of("me", ""), "no job named: the token decides");
        assert_eq!(job_of(Some("")), job_of(None));
        assert_ne!(job_of(Some("1")), job_of(Some("2")));
        assert_ne!(owner_of("cct_a_1"), owner_of("cct_b_1"));
        assert!(!owner_of("cct_secret_token").contains("secret"));
    }
}
