//! A save reads only the blobs the project lacks, straight from the engine's stores (the graph
//! driver's layer folders and tar-split records; the containerd image store's content store),
//! byte-identical to the engine's own `docker save` for layers with hard links, symlinks,
//! whiteouts, an opaque folder, long and non-UTF-8 names, empty files, a fifo and a large file.
//! After a one-line change the next save uploads that one layer, and a fresh host restored from
//! it rebuilds fully cached. Where the worker cannot read the engine's data root (here hidden
//! under an empty tmpfs in the worker's own mount namespace, as in a container that only has
//! the socket) the save reads `docker save` instead and says why.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::buildkit::{INLINE_CACHE, assert_fully_cached, build};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, build_context, sha256_digest, stderr_of, stdout_of};

/// Every kind of tar entry a layer may hold, then a step that deletes and replaces some, then
/// the one-line file a CI change touches.
const AWKWARD_LAYERS: &str = r#"FROM base:1
RUN mkdir -p /d/sub /opq/in && echo hi > /d/a && busybox ln /d/a /d/hard && busybox ln -s a /d/sym && busybox ln -s /nowhere /d/dangling && touch /d/empty "/d/$(busybox printf 'caf\351')" && L=$(busybox printf '%0150d' 0) && mkdir -p /d/$L/$L && echo deep > /d/$L/$L/file && echo gone > /d/gone && echo 1 > /opq/in/f && busybox mkfifo /d/fifo && dd if=/dev/urandom of=/d/big bs=1048576 count=72 2>/dev/null
RUN rm /d/gone /d/hard && rm -rf /opq && mkdir /opq && echo 2 > /opq/g && echo changed > /d/a
COPY file.txt /file.txt
"#;

fn files_under(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            files.extend(files_under(&path));
        } else if entry.file_type().unwrap().is_file() {
            files.push(path);
        }
    }
    files
}

/// The sha256 of every layer in the engine's own `docker save` of `image`: `layer.tar` files
/// of the legacy format, non-JSON blobs of the OCI layout.
fn exported_layers(host: &DockerEngine, image: &str) -> HashSet<String> {
    let folder = tempfile::tempdir().unwrap();
    let tarball = folder.path().join("export.tar");
    let saved = host.docker(&["save", "-o", tarball.to_str().unwrap(), image]);
    assert!(saved.status.success(), "docker save: {}", stderr_of(&saved));
    let unpacked = folder.path().join("x");
    std::fs::create_dir(&unpacked).unwrap();
    let untar = Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(&unpacked).output().unwrap();
    assert!(untar.status.success(), "{}", stderr_of(&untar));
    files_under(&unpacked)
        .into_iter()
        .filter(|path| {
            let in_blobs = path.parent().is_some_and(|parent| parent.ends_with("blobs/sha256"));
            path.ends_with("layer.tar") || (in_blobs && !std::fs::read(path).unwrap().starts_with(b"{"))
        })
        .map(|path| sha256_digest(&std::fs::read(path).unwrap()))
        .collect()
}

/// The digests of the blobs the embedded store holds, each checked to hash to its name.
fn stored_blobs(data_dir: &Path) -> HashSet<String> {
    let mut stored = HashSet::new();
    for path in files_under(data_dir) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.len() == 64 && path.parent().is_some_and(|parent| parent.ends_with("blobs/sha256")) {
            let digest = sha256_digest(&std::fs::read(&path).unwrap());
            assert_eq!(digest, format!("sha256:{name}"), "{} holds other bytes than its name", path.display());
            stored.insert(digest);
        }
    }
    stored
}

/// Every blob the embedded store holds hashes to its name, and every layer of the engine's
/// own export is among them, byte for byte.
pub(super) fn assert_stored_like_the_export(data_dir: &Path, host: &DockerEngine, image: &str) {
    let stored = stored_blobs(data_dir);
    let exported = exported_layers(host, image);
    assert!(exported.len() >= 4, "base, two RUN layers and a COPY: {exported:?}");
    let missing: Vec<&String> = exported.difference(&stored).collect();
    assert!(missing.is_empty(), "layers of docker save that the store lacks: {missing:?}");
}

/// Layers the save log calls new.
pub(super) fn new_layers(log: &str) -> usize {
    log.lines().filter(|line| line.starts_with("  layer ") && line.ends_with(" new")).count()
}

fn save(coordinator: &CoordinatorProcess, host: &DockerEngine, token: &str) -> Output {
    let saved = coordinator.cache_worker_on(host, token, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    saved
}

/// A build of the context on `host`: BuildKit with inline cache on the containerd store (the
/// classic builder's images there serve no cache), the classic builder elsewhere. Returns its
/// progress.
pub(super) fn build_app(host: &DockerEngine, context: &Path, flags: &[&str]) -> String {
    if host.containerd_store {
        let mut flags = flags.to_vec();
        flags.push(INLINE_CACHE);
        return build(host, context, "app:1", &flags);
    }
    let built = host.classic_build(context, "app:1", flags);
    assert!(built.status.success(), "build: {}", stderr_of(&built));
    stdout_of(&built)
}

/// A coordinator with a project, and the awkward image built on a host.
pub(super) struct Built {
    pub(super) coordinator: CoordinatorProcess,
    pub(super) data_dir: tempfile::TempDir,
    pub(super) token: String,
    pub(super) app: tempfile::TempDir,
}

pub(super) fn built_on(build_host: &DockerEngine) -> Built {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    build_host.import_busybox_base("base:1");
    let app = build_context(AWKWARD_LAYERS);
    build_app(build_host, app.path(), &[]);
    Built { coordinator, data_dir, token, app }
}

/// Restores on `fresh_host` and rebuilds `context` there: every step is cached.
pub(super) fn assert_restores_fully_cached(
    coordinator: &CoordinatorProcess,
    token: &str,
    fresh_host: &DockerEngine,
    context: &Path,
) {
    let flags = coordinator.restore_flags(fresh_host, token, "app");
    let flags: Vec<&str> = flags.split_whitespace().collect();
    let progress = build_app(fresh_host, context, &flags);
    if fresh_host.containerd_store {
        assert_fully_cached(&progress, 3);
    } else {
        assert_eq!(progress.matches("Using cache").count(), 3, "{progress}");
        assert!(!progress.contains("Running in"), "{progress}");
    }
}

fn incremental_saves(build_host: Option<DockerEngine>, fresh: impl Fn() -> DockerEngine) {
    let Some(build_host) = build_host else { return };
    let Built { coordinator, data_dir, token, app } = built_on(&build_host);

    let cold = save(&coordinator, &build_host, &token);
    assert!(!stderr_of(&cold).contains("docker save"), "read from the engine's stores: {}", stderr_of(&cold));
    assert!(stdout_of(&cold).contains(", read from the engine's store)"), "{}", stdout_of(&cold));
    assert_stored_like_the_export(data_dir.path(), &build_host, "app:1");

    // One line changes: the next save uploads that layer (and the new images' small blobs).
    std::fs::write(app.path().join("file.txt"), "changed\n").unwrap();
    build_app(&build_host, app.path(), &[]);
    let incremental = save(&coordinator, &build_host, &token);
    let log = stdout_of(&incremental);
    assert_eq!(new_layers(&log), 1, "only the COPY layer: {log}");
    assert!(!stderr_of(&incremental).contains("docker save"), "{}", stderr_of(&incremental));
    assert_stored_like_the_export(data_dir.path(), &build_host, "app:1");

    assert_restores_fully_cached(&coordinator, &token, &fresh(), app.path());
    coordinator.stop();
}

#[test]
fn an_incremental_save_on_engine_20_10_uploads_the_changed_layer_read_from_the_layer_store() {
    incremental_saves(DockerEngine::start(EngineKind::Engine20), || DockerEngine::start(EngineKind::Engine20).unwrap());
}

#[test]
fn an_incremental_save_on_engine_26_1_uploads_the_changed_layer_read_from_the_layer_store() {
    incremental_saves(DockerEngine::start(EngineKind::Engine26), || DockerEngine::start(EngineKind::Engine26).unwrap());
}

#[test]
fn an_incremental_save_on_engine_28_5_uploads_the_changed_layer_read_from_the_layer_store() {
    incremental_saves(DockerEngine::start(EngineKind::Engine28), || DockerEngine::start(EngineKind::Engine28).unwrap());
}

#[test]
fn an_incremental_save_on_the_containerd_store_uploads_the_changed_layer_read_from_the_content_store() {
    incremental_saves(DockerEngine::start_with_containerd_store(), || {
        DockerEngine::start_with_containerd_store().unwrap()
    });
}

/// `cache-worker` with an empty tmpfs over the engine's data root in its own mount namespace:
/// the engine answers on its socket, its files are out of sight.
fn save_without_the_data_root(coordinator: &CoordinatorProcess, host: &DockerEngine, token: &str) -> Output {
    let worker = coordinator.cache_worker_command_on(host, token, &["save", "--service", "app", "app:1", "base:1"]);
    host.without_data_root(&worker).output().expect("unshare")
}

fn fallback(build_host: Option<DockerEngine>, fresh: impl Fn() -> DockerEngine, why: &str) {
    let Some(build_host) = build_host else { return };
    let Built { coordinator, data_dir, token, app } = built_on(&build_host);
    let saved = save_without_the_data_root(&coordinator, &build_host, &token);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    let said = stderr_of(&saved);
    assert_eq!(
        said.lines().filter(|line| line.starts_with("cache-worker: reading the images through docker save: ")).count(),
        1,
        "{said}"
    );
    assert!(said.contains(why), "{said}");
    assert!(stdout_of(&saved).contains(", read from docker save)"), "{}", stdout_of(&saved));
    assert_stored_like_the_export(data_dir.path(), &build_host, "app:1");

    assert_restores_fully_cached(&coordinator, &token, &fresh(), app.path());
    coordinator.stop();
}

#[test]
fn without_access_to_the_data_root_engine_20_10_saves_through_docker_save_and_says_why() {
    fallback(
        DockerEngine::start(EngineKind::Engine20),
        || DockerEngine::start(EngineKind::Engine20).unwrap(),
        "this worker cannot read the engine's data root",
    );
}

#[test]
fn without_access_to_the_data_root_the_containerd_store_saves_through_docker_save_and_says_why() {
    fallback(
        DockerEngine::start_with_containerd_store(),
        || DockerEngine::start_with_containerd_store().unwrap(),
        "this worker cannot read the engine's content store",
    );
}

#[test]
fn a_layer_changed_under_the_engine_is_never_stored() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let Built { coordinator, data_dir, token, app: _app } = built_on(&build_host);
    // The first RUN step's /d/a, rewritten in its layer folder with as many bytes.
    let folders = build_host.data_root().join("overlay2");
    let changed: Vec<PathBuf> = std::fs::read_dir(&folders)
        .unwrap()
        .flatten()
        .map(|entry| entry.path().join("diff/d/a"))
        .filter(|file| std::fs::read(file).is_ok_and(|content| content == b"hi\n"))
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    std::fs::write(&changed[0], b"ho\n").unwrap();

    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "app", "app:1", "base:1"]);
    let said = stderr_of(&saved);
    assert!(
        said.contains(" hashes to sha256:") && said.contains(": saving app through docker save instead\n"),
        "{said}"
    );
    // The engine's own export checks the layer too, and fails: so does the save, in one line.
    assert_eq!(saved.status.code(), Some(1), "{said}");
    assert!(said.lines().last().unwrap().starts_with("cache-worker: saving app failed: "), "{said}");
    stored_blobs(data_dir.path());
    let shown = coordinator.cachectl(&["show", "shop", "app"]);
    assert!(!shown.status.success(), "nothing was committed: {}", stdout_of(&shown));
    coordinator.stop();
}
