//! Where a save reads the blobs it uploads, chosen once per save: the engine's own stores when
//! this worker can read them (the graph driver's layer store, `layer_store.rs`; the containerd
//! image store's content store, read by `oci.rs`), so a save reads only the blobs the project
//! lacks and never waits for `docker save`; otherwise (a remote engine, another driver, a data
//! root this worker cannot see or read) the engine's export, with the reason said once.

use std::path::PathBuf;

use crate::docker::Storage;
use crate::layer_store::LayerStore;

/// The one place a save's blobs come from (see [`BlobSource::choose`]).
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// The graph driver's layer and image stores, read in place.
    LayerStore(LayerStore),
    /// The containerd image store's content store (`<hex>` blob files), read in place.
    ContentStore(PathBuf),
    /// `docker save`: a tar of the graph driver's images, streamed past the uploads, or an OCI
    /// layout of the containerd image store's (`oci`), spooled.
    Export { oci: bool },
}

/// Where containerd keeps blobs: the engine's own containerd under its data root, else the
/// system's (an engine started with `--containerd`).
fn content_store_dirs(storage: &Storage) -> [PathBuf; 2] {
    [
        storage.data_root.join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256"),
        PathBuf::from("/var/lib/containerd/io.containerd.content.v1.content/blobs/sha256"),
    ]
}

/// The blobs the engine's containerd holds, as files this worker can read (a restore's one
/// question about them: [`HostBlobs::holds`]). Empty when the engine is not on this host, keeps
/// the graph driver, or its content store is not visible here.
#[derive(Debug, Clone, Default)]
pub struct HostBlobs {
    dirs: Vec<PathBuf>,
}

impl HostBlobs {
    /// The content store of `storage`'s engine, if this worker can see it: the engine's own
    /// containerd's when it exists, else the system's (never both: the system's containerd
    /// may hold blobs the engine's does not).
    pub fn of(storage: &Storage) -> HostBlobs {
        if !storage.is_local() || !storage.containerd_store || storage.data_root.as_os_str().is_empty() {
            return HostBlobs::default();
        }
        HostBlobs::in_dirs(content_store_dirs(storage).into_iter().find(|dir| dir.is_dir()).into_iter().collect())
    }

    /// The blobs under these `<hex>` folders (a test's, or a content store found another way).
    pub fn in_dirs(dirs: Vec<PathBuf>) -> HostBlobs {
        HostBlobs { dirs }
    }

    /// Whether any content store is visible: then the host's blobs can be linked, not copied.
    pub fn visible(&self) -> bool {
        !self.dirs.is_empty()
    }

    /// The file of `digest` when the host holds it (containerd commits a blob by renaming it
    /// into place once verified: a file here is whole).
    pub fn holds(&self, digest: &str) -> Option<PathBuf> {
        proto::names::validate_digest(digest).ok()?;
        let hex = proto::digest::digest_hex(digest);
        self.dirs.iter().map(|dir| dir.join(hex)).find(|file| file.is_file())
    }
}

impl BlobSource {
    /// The engine's stores if this worker can read them, else its export, saying why. On the
    /// containerd image store, the content store is the one that holds the image `probe`.
    pub fn choose(storage: &Storage, probe: &str) -> BlobSource {
        BlobSource::in_place(storage, probe).unwrap_or_else(|why| {
            eprintln!("cache-worker: reading the images through docker save: {why}");
            BlobSource::Export { oci: storage.containerd_store }
        })
    }

    /// The engine's stores if this worker can read them; otherwise why not, for the log.
    fn in_place(storage: &Storage, probe: &str) -> Result<BlobSource, String> {
        if !storage.is_local() {
            return Err(format!("the engine at {} is not on this host", storage.host));
        }
        if storage.data_root.as_os_str().is_empty() {
            return Err("the engine did not say where its data root is".into());
        }
        if !storage.containerd_store {
            return LayerStore::open(&storage.data_root, &storage.driver).map(BlobSource::LayerStore);
        }
        let dirs = content_store_dirs(storage);
        let hex = proto::digest::digest_hex(probe);
        if proto::names::validate_digest(probe).is_ok()
            && let Some(dir) = dirs.iter().find(|dir| dir.join(hex).is_file())
        {
            return Ok(BlobSource::ContentStore(dir.clone()));
        }
        Err(format!("this worker cannot read the engine's content store ({})", dirs[0].display()))
    }

    /// The images are the containerd image store's: described as OCI blobs.
    pub fn oci(&self) -> bool {
        match self {
            BlobSource::LayerStore(_) => false,
            BlobSource::ContentStore(_) => true,
            BlobSource::Export { oci } => *oci,
        }
    }

    /// Reads the engine's stores in place (a failed read falls back to the export).
    pub fn reads_in_place(&self) -> bool {
        !matches!(self, BlobSource::Export { .. })
    }

    /// The export of the same images, for a save whose read in place failed.
    pub fn export(&self) -> BlobSource {
        BlobSource::Export { oci: self.oci() }
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
        let remote = BlobSource::in_place(&storage(root.path(), false, "tcp://10.0.0.5:2376"), "").unwrap_err();
        assert_eq!(remote, "the engine at tcp://10.0.0.5:2376 is not on this host");
        let empty = BlobSource::in_place(&storage(root.path(), false, "unix:///run/docker.sock"), "").unwrap_err();
        assert!(empty.starts_with("this worker cannot read the engine's data root"), "{empty}");
        let probe = format!("sha256:{}", "a".repeat(64));
        let at = storage(root.path(), true, "unix:///run/docker.sock");
        let no_content = BlobSource::in_place(&at, &probe).unwrap_err();
        assert!(no_content.starts_with("this worker cannot read the engine's content store"), "{no_content}");
        let chosen = BlobSource::choose(&at, &probe);
        assert!(matches!(chosen, BlobSource::Export { oci: true }), "{chosen:?}");
        assert!(!chosen.reads_in_place() && chosen.oci());
    }

    #[test]
    fn the_host_holds_the_blobs_its_visible_content_store_has() {
        let root = tempfile::tempdir().unwrap();
        let blobs = root.path().join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256");
        let (held, absent) = (format!("sha256:{}", "a".repeat(64)), format!("sha256:{}", "b".repeat(64)));
        let local = storage(root.path(), true, "unix:///run/docker.sock");
        assert!(!HostBlobs::of(&local).visible(), "no content store yet");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join("a".repeat(64)), "{}").unwrap();
        let host = HostBlobs::of(&local);
        assert!(host.visible());
        assert_eq!(host.holds(&held), Some(blobs.join("a".repeat(64))));
        assert_eq!(host.holds(&absent), None);
        assert_eq!(host.holds("sha256:../../etc/passwd"), None, "a bad digest names no file");
        let remote = HostBlobs::of(&storage(root.path(), true, "tcp://10.0.0.5:2376"));
        let graph_driver = HostBlobs::of(&storage(root.path(), false, "unix:///run/docker.sock"));
        assert!(remote.holds(&held).is_none() && graph_driver.holds(&held).is_none());
    }

    #[test]
    fn the_content_store_is_the_one_holding_the_image() {
        let root = tempfile::tempdir().unwrap();
        let blobs = root.path().join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let probe = format!("sha256:{}", "a".repeat(64));
        let at = storage(root.path(), true, "unix:///run/docker.sock");
        assert!(BlobSource::in_place(&at, &probe).is_err(), "an empty store is not the engine's");
        std::fs::write(blobs.join("a".repeat(64)), "{}").unwrap();
        let chosen = BlobSource::choose(&at, &probe);
        assert!(matches!(&chosen, BlobSource::ContentStore(dir) if *dir == blobs), "{chosen:?}");
        assert!(chosen.reads_in_place() && chosen.oci());
        assert!(matches!(chosen.export(), BlobSource::Export { oci: true }));
        assert!(BlobSource::in_place(&at, "sha256:../../etc").is_err(), "a bad digest names no file");
    }
}
