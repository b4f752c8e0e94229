//! The worker's folders on the build host, one set per service under `--build-cache-dir`
//! (default `/tmp/cache-worker`): what a restore wrote for the build to read (BuildKit's
//! `type=local` cache sources on the containerd image store), where the build writes its
//! `mode=max` cache for the next save, and which images the restore brought (so a save tells
//! the build's own stages from images left over from the cache).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::docker::StageLeaf;

/// The default root: `$TMPDIR/cache-worker`.
pub fn default_root() -> PathBuf {
    std::env::temp_dir().join("cache-worker")
}

/// One service's folders.
#[derive(Debug, Clone)]
pub struct BuildDirs {
    root: PathBuf,
}

/// What the last restore on this host brought, by image ID.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreRecord {
    pub images: HashSet<String>,
    /// The untagged leaves among them: build stages of the saved build.
    pub stages: HashSet<String>,
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
    /// next save reads it.
    pub fn export(&self) -> PathBuf {
        self.root.join("export")
    }

    fn record(&self) -> PathBuf {
        self.root.join("restored.json")
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

    /// Forgets the last restore's record: a restore that brings nothing leaves none behind.
    pub fn forget_record(&self) {
        let _ = std::fs::remove_file(self.record());
    }

    pub fn write_record(&self, record: &RestoreRecord) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        std::fs::write(self.record(), serde_json::to_vec(record).expect("the record serializes"))
    }

    /// The last restore's record; empty when there was none (or it cannot be read).
    pub fn read_record(&self) -> RestoreRecord {
        std::fs::read(self.record()).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
    }
}

/// Which stage leaves a save takes: every one this build made, and a restored stage while no
/// stage this build made grew from the same image (it was reused, or it is a sibling of one
/// that changed and will be made again). Restored images that were not stages (a previous
/// build's final image, untagged once the new one took its tag) are never taken, so a cache
/// does not grow by one build's images each time.
pub fn stages_to_save(leaves: &[StageLeaf], restored: &RestoreRecord) -> Vec<String> {
    let new_bases: HashSet<&str> =
        leaves.iter().filter(|leaf| !restored.images.contains(&leaf.id)).map(|leaf| leaf.base.as_str()).collect();
    leaves
        .iter()
        .filter(|leaf| {
            !restored.images.contains(&leaf.id)
                || (restored.stages.contains(&leaf.id) && !new_bases.contains(leaf.base.as_str()))
        })
        .map(|leaf| leaf.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(id: &str, base: &str) -> StageLeaf {
        StageLeaf { id: id.into(), base: base.into() }
    }

    #[test]
    fn a_save_takes_new_and_reused_stages_but_not_leftovers() {
        let restored = RestoreRecord {
            images: ["old-stage", "old-app", "sibling"].map(String::from).into(),
            stages: ["old-stage", "sibling"].map(String::from).into(),
        };
        // The builder stage was reused: the restored leaf is the stage.
        assert_eq!(stages_to_save(&[leaf("old-stage", "base")], &restored), vec!["old-stage"]);
        // It changed: the new leaf replaces it (same base), and so the sibling from that base
        // waits for its next build.
        let changed = [leaf("new-stage", "base"), leaf("old-stage", "base"), leaf("sibling", "base")];
        assert_eq!(stages_to_save(&changed, &restored), vec!["new-stage"]);
        // The previous final image, untagged now, is never a stage.
        assert_eq!(stages_to_save(&[leaf("old-app", "step")], &restored), Vec::<String>::new());
        // Without a restore every leaf is this build's.
        assert_eq!(stages_to_save(&changed, &RestoreRecord::default()).len(), 3);
    }
}
