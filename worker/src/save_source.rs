//! Where a save reads the blobs it uploads, chosen once per save: the engine's own stores when
//! this worker can read them (the graph driver's layer store, `layer_store.rs`; the containerd
//! image store's content store, `content_store.rs`, as a folder or through containerd's
//! socket), so a save reads only the blobs the project lacks and never waits for `docker save`;
//! otherwise (a remote engine, another driver, a data root this worker cannot see or read) the
//! engine's export, with the reason said once. The one place that knows where those stores are:
//! under the engine's data root (or `--engine-root`, the same folder as this worker sees it),
//! and containerd's sockets.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::containerd::ContentClient;
use crate::content_store::ContentStore;
use crate::docker::Storage;
use crate::layer_store::LayerStore;

/// The one place a save's blobs come from (see [`BlobSource::choose`]).
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// The graph driver's layer and image stores, read in place.
    LayerStore(LayerStore),
    /// The containerd image store's content store, read in place or through containerd.
    ContentStore(ContentStore),
    /// `docker save`: a tar of the graph driver's images, streamed past the uploads, or an OCI
    /// layout of the containerd image store's (`oci`), spooled.
    Export { oci: bool },
}

/// The socket of the containerd a Docker engine starts for itself (`<exec-root>/containerd`),
/// and of a system containerd (an engine started with `--containerd`).
const CONTAINERD_SOCKETS: [&str; 2] = ["/var/run/docker/containerd/containerd.sock", "/run/containerd/containerd.sock"];

/// Where this worker reaches the engine's stores when it sees them elsewhere than the engine
/// says (a worker in a container, with the data root or containerd's socket mounted in).
#[derive(Debug, Clone)]
pub struct EngineStores {
    /// `--engine-root`: the engine's data root as this worker sees it, instead of its
    /// `DockerRootDir`.
    pub engine_root: Option<PathBuf>,
    /// `--containerd-socket`: the engine's containerd, tried before the usual places.
    pub containerd_socket: Option<PathBuf>,
    /// How long a call to containerd may go without progress (`--stall-timeout`).
    pub stall_timeout: Duration,
}

impl Default for EngineStores {
    fn default() -> Self {
        EngineStores { engine_root: None, containerd_socket: None, stall_timeout: Duration::from_secs(10) }
    }
}

impl EngineStores {
    /// Checks the paths given: absolute, and `--engine-root` an existing folder. Whether it is
    /// the engine's is found out when a save reads it (a wrong one falls back to the export).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(root) = &self.engine_root {
            if !root.is_absolute() {
                return Err(format!("--engine-root {} is not an absolute path", root.display()));
            }
            if !root.is_dir() {
                return Err(format!("--engine-root {} is not a folder this worker can see", root.display()));
            }
        }
        if let Some(socket) = &self.containerd_socket
            && !socket.is_absolute()
        {
            return Err(format!("--containerd-socket {} is not an absolute path", socket.display()));
        }
        Ok(())
    }

    /// The engine's data root as this worker sees it.
    fn data_root<'a>(&'a self, storage: &'a Storage) -> &'a Path {
        self.engine_root.as_deref().unwrap_or(&storage.data_root)
    }

    /// Where containerd keeps blobs: the engine's own containerd under its data root, else the
    /// system's (an engine started with `--containerd`).
    fn content_store_dirs(&self, storage: &Storage) -> [PathBuf; 2] {
        [
            self.data_root(storage).join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256"),
            PathBuf::from("/var/lib/containerd/io.containerd.content.v1.content/blobs/sha256"),
        ]
    }

    /// containerd's sockets, in the order they are tried: `--containerd-socket`, else
    /// `engine_named` (a restore passes the one `docker info` names; a save keeps to the
    /// places README documents), the engine's default place and the system's.
    fn containerd_sockets(&self, engine_named: Option<&Path>) -> Vec<PathBuf> {
        if let Some(socket) = &self.containerd_socket {
            return vec![socket.clone()];
        }
        let named = engine_named.map(Path::to_owned);
        let mut sockets: Vec<PathBuf> = named.into_iter().chain(CONTAINERD_SOCKETS.iter().map(PathBuf::from)).collect();
        sockets.dedup();
        sockets
    }

    /// Whether a flag says where the stores are: then the engine may be reached over TCP (a
    /// sidecar whose data root a shared volume holds), and what the paths hold decides.
    fn given(&self) -> bool {
        self.engine_root.is_some() || self.containerd_socket.is_some()
    }

    /// The engine's content store as this worker reaches it: the folder that holds `probe`
    /// (any blob of the engine's), else the first containerd socket that does.
    pub async fn content_store(&self, storage: &Storage, probe: &str) -> Result<ContentStore, String> {
        if proto::names::validate_digest(probe).is_err() {
            return Err(format!("the image {probe:?} names no blob"));
        }
        let hex = proto::digest::digest_hex(probe);
        let dirs = self.content_store_dirs(storage);
        if let Some(dir) = dirs.iter().find(|dir| dir.join(hex).is_file()) {
            return Ok(ContentStore::Folder(dir.clone()));
        }
        let sockets = self.containerd_sockets(None);
        let mut tried = Vec::new();
        for socket in &sockets {
            let holds = match ContentClient::connect(socket, self.stall_timeout).await {
                Ok(client) => client.size(probe).await.map(|size| size.map(|_| client)),
                Err(error) => Err(error),
            };
            match holds {
                Ok(Some(client)) => return Ok(ContentStore::Socket(client)),
                Ok(None) => tried.push(format!("{} does not hold the image", socket.display())),
                Err(error) if self.containerd_socket.is_some() => tried.push(error.to_string()),
                // The usual places, absent: nothing worth a word.
                Err(_) => {}
            }
        }
        let mut why = format!("this worker cannot read the engine's content store ({})", dirs[0].display());
        if self.engine_root.is_some() {
            why.push_str(", given by --engine-root");
        }
        if tried.is_empty() {
            let sockets: Vec<String> = sockets.iter().map(|socket| socket.display().to_string()).collect();
            why.push_str(&format!(" nor reach containerd at {}", sockets.join(" or ")));
        } else {
            why.push_str(&format!(" nor read it through containerd ({})", tried.join("; ")));
        }
        why.push_str(
            ": mount the data root and pass --engine-root, or mount containerd's socket and pass --containerd-socket",
        );
        Err(why)
    }

    /// The engine's content store where no image names it (a restore onto a host that may
    /// hold some blobs already): the first content store folder this worker sees, else the
    /// engine's containerd through its socket; and that containerd, when one answers
    /// (`--containerd-socket`, else `engine_named`, the one the engine names, then the usual
    /// places).
    pub async fn host_content_store(
        &self,
        storage: &Storage,
        engine_named: Option<&Path>,
    ) -> (Option<ContentStore>, Option<ContentClient>) {
        let mut containerd = None;
        for socket in self.containerd_sockets(engine_named) {
            if let Ok(client) = ContentClient::connect(&socket, self.stall_timeout).await {
                containerd = Some(client);
                break;
            }
        }
        let seen = !self.data_root(storage).as_os_str().is_empty();
        let folder = self.content_store_dirs(storage).into_iter().find(|dir| seen && content_store_at(dir));
        let store = folder.map(ContentStore::Folder).or_else(|| containerd.clone().map(ContentStore::Socket));
        (store, containerd)
    }

    /// The graph driver's stores under the data root, if they hold the image `probe`.
    fn layer_store(&self, storage: &Storage, probe: &str) -> Result<LayerStore, String> {
        let root = self.data_root(storage);
        let hint = if self.engine_root.is_some() { " given by --engine-root" } else { "" };
        let store = LayerStore::open(root, &storage.driver)
            .map_err(|why| format!("{why}{hint}: mount the data root and pass --engine-root"))?;
        if !probe.is_empty()
            && let Err(error) = store.config(probe)
        {
            return Err(format!(
                "the data root {}{hint} is not this engine's: it holds no image {probe} ({error})",
                root.display()
            ));
        }
        Ok(store)
    }
}

/// Whether a content store is at `blobs` (its `blobs/sha256` folder): the folder, or the
/// containerd whose store it is (its metadata database beside the store) without it yet:
/// containerd makes the store's folders with its first blob, so a fresh engine's first restore
/// finds none of them.
fn content_store_at(blobs: &Path) -> bool {
    let containerd_root = blobs.ancestors().nth(3);
    blobs.is_dir() || containerd_root.is_some_and(|root| root.join("io.containerd.metadata.v1.bolt").is_dir())
}

/// The blobs the engine's containerd holds, as this worker reaches its content store (the
/// folder, else containerd's socket): a restore asks once about the blobs it needs
/// ([`HostBlobs::ask`]), then [`HostBlobs::holds`] answers. Empty when the engine is not on
/// this host, keeps the graph driver, or its content store is out of reach.
#[derive(Debug, Clone, Default)]
pub struct HostBlobs {
    store: Option<ContentStore>,
    /// The engine's containerd, when it answers: a restore records there the layers it writes
    /// into the content store folder itself.
    containerd: Option<ContentClient>,
    /// Of the blobs asked about, those the store holds.
    held: HashSet<String>,
}

impl HostBlobs {
    /// The content store of `storage`'s engine as this worker reaches it: the engine's own
    /// containerd's folder when it exists, else the system's (never both: the system's
    /// containerd may hold blobs the engine's does not), else containerd's socket.
    pub async fn find(storage: &Storage, stores: &EngineStores) -> HostBlobs {
        let unseen = !storage.is_local() && !stores.given();
        if unseen || !storage.containerd_store {
            return HostBlobs::default();
        }
        let named = storage.containerd_socket.as_deref().filter(|_| storage.is_local());
        let (store, containerd) = stores.host_content_store(storage, named).await;
        HostBlobs { store, containerd, held: HashSet::new() }
    }

    /// The blobs of `store` (a test's, or a content store found another way).
    pub fn in_store(store: ContentStore) -> HostBlobs {
        HostBlobs { store: Some(store), ..HostBlobs::default() }
    }

    /// Asks the store which of `digests` it holds (a digest that names no blob is not held).
    pub async fn ask(&mut self, digests: impl IntoIterator<Item = String>) {
        let Some(store) = &self.store else { return };
        for digest in digests {
            if !self.held.contains(&digest) && store.holds(&digest).await {
                self.held.insert(digest);
            }
        }
    }

    /// Whether this worker reaches the engine's content store: then BuildKit's layout needs no
    /// layer (BuildKit on the engine reads them there).
    pub fn reached(&self) -> bool {
        self.store.is_some()
    }

    /// Whether the host holds `digest` (asked about before, [`HostBlobs::ask`]; containerd
    /// commits a blob once verified: a blob it holds is whole).
    pub fn holds(&self, digest: &str) -> bool {
        self.held.contains(digest)
    }

    /// The content store folder (`…/blobs/sha256`) a restore may write blobs into, and the
    /// containerd that records them, when both are at hand.
    pub fn writable(&self) -> Option<(PathBuf, ContentClient)> {
        match &self.store {
            Some(ContentStore::Folder(dir)) => Some((dir.clone(), self.containerd.clone()?)),
            _ => None,
        }
    }

    /// Puts each held blob of `files` into its layout file: a link to the store's file, or a
    /// copy (where the two are on different mounts: the engine mounts its data root; or read
    /// through containerd), checked against its digest and renamed into place.
    pub async fn copy_out(&self, files: Vec<(String, PathBuf)>) -> Result<(), String> {
        if files.is_empty() {
            return Ok(());
        }
        let Some(store) = self.store.clone() else { return Err("the host's content store is out of reach".into()) };
        let copied = tokio::task::spawn_blocking(move || {
            files.iter().try_for_each(|(digest, file)| copy_blob(&store, digest, file))
        });
        copied.await.map_err(|error| format!("copying from the host's content store failed: {error}"))?
    }
}

/// One blob of `store` into `file`, verified (a blocking call).
fn copy_blob(store: &ContentStore, digest: &str, file: &Path) -> Result<(), String> {
    use std::io::{Read, Write};
    let failed = |error: std::io::Error| format!("writing {} failed: {error}", file.display());
    if file.exists() {
        return Ok(());
    }
    if let ContentStore::Folder(dir) = store
        && std::fs::hard_link(dir.join(proto::digest::digest_hex(digest)), file).is_ok()
    {
        return Ok(());
    }
    let part = file.with_extension("part");
    let (_, mut reader) =
        store.open(digest).map_err(|error| format!("reading {digest} from {} failed: {error}", store.describe()))?;
    let mut out = std::fs::File::create(&part).map_err(failed)?;
    let mut hasher = proto::digest::DigestHasher::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buffer).map_err(failed)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(failed)?;
    }
    let actual = hasher.finish();
    if actual != digest {
        let _ = std::fs::remove_file(&part);
        return Err(format!("blob {digest} of the host's content store hashes to {actual}"));
    }
    std::fs::rename(&part, file).map_err(failed)
}

impl BlobSource {
    /// The engine's stores if this worker can read them, else its export, saying why. The
    /// stores are the ones that hold the image `probe`.
    pub async fn choose(storage: &Storage, stores: &EngineStores, probe: &str) -> BlobSource {
        match BlobSource::in_place(storage, stores, probe).await {
            Ok(source) => source,
            Err(why) => {
                eprintln!("cache-worker: reading the images through docker save: {why}");
                BlobSource::Export { oci: storage.containerd_store }
            }
        }
    }

    /// The engine's stores if this worker can read them; otherwise why not, for the log.
    async fn in_place(storage: &Storage, stores: &EngineStores, probe: &str) -> Result<BlobSource, String> {
        if !storage.is_local() && !stores.given() {
            return Err(format!(
                "the engine at {} is not on this host (a data root shared with this worker: pass --engine-root)",
                storage.host
            ));
        }
        if stores.data_root(storage).as_os_str().is_empty() {
            return Err("the engine did not say where its data root is: pass --engine-root".into());
        }
        if !storage.containerd_store {
            return stores.layer_store(storage, probe).map(BlobSource::LayerStore);
        }
        stores.content_store(storage, probe).await.map(BlobSource::ContentStore)
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

    fn storage(data_root: &Path, containerd_store: bool, host: &str) -> Storage {
        Storage {
            driver: "overlay2".into(),
            data_root: data_root.to_owned(),
            containerd_store,
            host: host.into(),
            containerd_socket: None,
        }
    }

    /// No containerd anywhere: a socket path that does not exist.
    fn stores(engine_root: Option<&Path>) -> EngineStores {
        EngineStores {
            engine_root: engine_root.map(Path::to_owned),
            containerd_socket: Some("/nonexistent/containerd.sock".into()),
            ..EngineStores::default()
        }
    }

    /// The folders of a graph driver's data root, holding the image config `probe`.
    fn layer_store_root(probe_config: &[u8]) -> (tempfile::TempDir, String) {
        let root = tempfile::tempdir().unwrap();
        for dir in ["image/overlay2/layerdb/sha256", "image/overlay2/imagedb/content/sha256", "overlay2"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        let hex = proto::digest::sha256_hex(probe_config);
        std::fs::write(root.path().join("image/overlay2/imagedb/content/sha256").join(&hex), probe_config).unwrap();
        (root, format!("sha256:{hex}"))
    }

    #[tokio::test]
    async fn a_remote_engine_or_an_unreadable_store_is_read_through_its_export_with_the_reason() {
        let root = tempfile::tempdir().unwrap();
        let none = stores(None);
        let remote = storage(root.path(), false, "tcp://10.0.0.5:2376");
        let remote = BlobSource::in_place(&remote, &EngineStores::default(), "").await.unwrap_err();
        assert!(remote.starts_with("the engine at tcp://10.0.0.5:2376 is not on this host"), "{remote}");
        let at = storage(root.path(), false, "unix:///run/docker.sock");
        let empty = BlobSource::in_place(&at, &none, "").await.unwrap_err();
        assert!(empty.starts_with("this worker cannot read the engine's data root"), "{empty}");
        assert!(empty.ends_with("mount the data root and pass --engine-root"), "{empty}");
        let probe = format!("sha256:{}", "a".repeat(64));
        let at = storage(root.path(), true, "unix:///run/docker.sock");
        let no_content = BlobSource::in_place(&at, &none, &probe).await.unwrap_err();
        assert!(no_content.starts_with("this worker cannot read the engine's content store"), "{no_content}");
        assert!(no_content.contains("/nonexistent/containerd.sock") && no_content.contains("--containerd-socket"));
        let chosen = BlobSource::choose(&at, &none, &probe).await;
        assert!(matches!(chosen, BlobSource::Export { oci: true }), "{chosen:?}");
        assert!(!chosen.reads_in_place() && chosen.oci());
    }

    #[tokio::test]
    async fn the_host_holds_the_blobs_its_content_store_has() {
        let root = tempfile::tempdir().unwrap();
        let blobs = root.path().join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256");
        let (held, absent) = (format!("sha256:{}", "a".repeat(64)), format!("sha256:{}", "b".repeat(64)));
        let local = storage(root.path(), true, "unix:///run/docker.sock");
        let no_socket = stores(None);
        assert!(!HostBlobs::find(&local, &no_socket).await.reached(), "no content store yet");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join("a".repeat(64)), "{}").unwrap();
        std::fs::write(root.path().join("passwd"), "x").unwrap();
        let asked = || [held.clone(), absent.clone(), "sha256:../../../../../passwd".to_owned()];
        let mut host = HostBlobs::find(&local, &no_socket).await;
        host.ask(asked()).await;
        assert!(host.reached() && host.writable().is_none(), "no containerd to record a write");
        assert!(host.holds(&held) && !host.holds(&absent));
        assert!(!host.holds("sha256:../../../../../passwd"), "a bad digest names no file");
        let flagless = EngineStores::default();
        let mut remote = HostBlobs::find(&storage(root.path(), true, "tcp://10.0.0.5:2376"), &flagless).await;
        let mut graph_driver =
            HostBlobs::find(&storage(root.path(), false, "unix:///run/docker.sock"), &flagless).await;
        remote.ask(asked()).await;
        graph_driver.ask(asked()).await;
        assert!(!remote.holds(&held) && !graph_driver.holds(&held));
        // A held blob copied out into a layout file.
        let layout = tempfile::tempdir().unwrap();
        let small = proto::digest::sha256_digest(b"{}");
        std::fs::write(blobs.join(proto::digest::digest_hex(&small)), "{}").unwrap();
        let in_layout = layout.path().join("small");
        host.copy_out(vec![(small, in_layout.clone())]).await.unwrap();
        assert_eq!(std::fs::read(&in_layout).unwrap(), b"{}");
    }

    #[tokio::test]
    async fn the_content_store_is_the_one_holding_the_image() {
        let root = tempfile::tempdir().unwrap();
        let blobs = root.path().join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let probe = format!("sha256:{}", "a".repeat(64));
        let at = storage(root.path(), true, "unix:///run/docker.sock");
        let none = stores(None);
        assert!(BlobSource::in_place(&at, &none, &probe).await.is_err(), "an empty store is not the engine's");
        std::fs::write(blobs.join("a".repeat(64)), "{}").unwrap();
        let chosen = BlobSource::choose(&at, &none, &probe).await;
        assert!(matches!(&chosen, BlobSource::ContentStore(ContentStore::Folder(dir)) if *dir == blobs), "{chosen:?}");
        assert!(chosen.reads_in_place() && chosen.oci());
        assert!(matches!(chosen.export(), BlobSource::Export { oci: true }));
        assert!(BlobSource::in_place(&at, &none, "sha256:../../etc").await.is_err(), "a bad digest names no file");
    }

    #[tokio::test]
    async fn the_engine_root_replaces_the_data_root_the_engine_reports() {
        let (mounted, probe) = layer_store_root(b"{\"config\":{}}");
        let elsewhere = storage(Path::new("/var/lib/docker-not-here"), false, "unix:///run/docker.sock");
        let without = BlobSource::in_place(&elsewhere, &stores(None), &probe).await.unwrap_err();
        assert!(without.contains("/var/lib/docker-not-here") && without.contains("--engine-root"), "{without}");
        let given = stores(Some(mounted.path()));
        let chosen = BlobSource::choose(&elsewhere, &given, &probe).await;
        assert!(matches!(chosen, BlobSource::LayerStore(_)), "{chosen:?}");
        // A sidecar engine over TCP whose data root this worker is given.
        let sidecar = storage(Path::new("/var/lib/docker"), false, "tcp://docker:2376");
        assert!(matches!(BlobSource::choose(&sidecar, &given, &probe).await, BlobSource::LayerStore(_)));

        // On the containerd store, the content store under the given root.
        let blobs = mounted.path().join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join(proto::digest::digest_hex(&probe)), "{}").unwrap();
        let containerd = storage(Path::new("/var/lib/docker-not-here"), true, "unix:///run/docker.sock");
        let chosen = BlobSource::choose(&containerd, &given, &probe).await;
        assert!(matches!(&chosen, BlobSource::ContentStore(ContentStore::Folder(dir)) if *dir == blobs), "{chosen:?}");
    }

    #[tokio::test]
    async fn a_root_that_is_not_the_engines_is_read_through_the_export_naming_the_flag() {
        let (mounted, _) = layer_store_root(b"{}");
        let other_image = format!("sha256:{}", "b".repeat(64));
        let at = storage(Path::new("/var/lib/docker"), false, "unix:///run/docker.sock");
        let given = stores(Some(mounted.path()));
        let why = BlobSource::in_place(&at, &given, &other_image).await.unwrap_err();
        assert!(
            why.starts_with(&format!(
                "the data root {} given by --engine-root is not this engine's",
                mounted.path().display()
            )),
            "{why}"
        );
        assert!(matches!(BlobSource::choose(&at, &given, &other_image).await, BlobSource::Export { oci: false }));
        let bare = tempfile::tempdir().unwrap();
        let why = BlobSource::in_place(&at, &stores(Some(bare.path())), &other_image).await.unwrap_err();
        assert!(
            why.starts_with("this worker cannot read the engine's data root") && why.contains("given by --engine-root"),
            "{why}"
        );
        let containerd = storage(Path::new("/var/lib/docker"), true, "unix:///run/docker.sock");
        let why = BlobSource::in_place(&containerd, &stores(Some(bare.path())), &other_image).await.unwrap_err();
        assert!(why.contains(&bare.path().display().to_string()) && why.contains("given by --engine-root"), "{why}");
    }

    #[tokio::test]
    async fn a_restore_finds_the_content_store_under_the_engine_root() {
        let root = tempfile::tempdir().unwrap();
        let at = storage(Path::new("/var/lib/docker-not-here"), true, "unix:///run/docker.sock");
        assert!(stores(Some(root.path())).host_content_store(&at, None).await.0.is_none(), "no folder, no socket");
        let blobs = root.path().join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let held = format!("sha256:{}", "a".repeat(64));
        std::fs::write(blobs.join("a".repeat(64)), "x").unwrap();
        let store = stores(Some(root.path())).host_content_store(&at, None).await.0.unwrap();
        assert!(matches!(&store, ContentStore::Folder(dir) if *dir == blobs), "{store:?}");
        assert!(store.holds(&held).await && !store.holds(&format!("sha256:{}", "b".repeat(64))).await);
    }

    #[test]
    fn the_paths_given_must_be_absolute_and_the_root_a_folder() {
        let folder = tempfile::tempdir().unwrap();
        let file = folder.path().join("file");
        std::fs::write(&file, "").unwrap();
        let with = |root: &str, socket: Option<&str>| EngineStores {
            engine_root: Some(root.into()),
            containerd_socket: socket.map(PathBuf::from),
            ..EngineStores::default()
        };
        assert!(with(folder.path().to_str().unwrap(), Some("/run/containerd/containerd.sock")).validate().is_ok());
        assert!(EngineStores::default().validate().is_ok());
        assert_eq!(
            with("var/lib/docker", None).validate().unwrap_err(),
            "--engine-root var/lib/docker is not an absolute path"
        );
        let not_a_folder = with(file.to_str().unwrap(), None).validate().unwrap_err();
        assert!(not_a_folder.ends_with("is not a folder this worker can see"), "{not_a_folder}");
        assert!(with("/nonexistent/root", None).validate().is_err());
        let relative_socket = with(folder.path().to_str().unwrap(), Some("containerd.sock")).validate().unwrap_err();
        assert_eq!(relative_socket, "--containerd-socket containerd.sock is not an absolute path");
    }
}
