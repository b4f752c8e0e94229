//! A restore at the engine's pace on the containerd image store: the blobs the host already
//! holds are neither downloaded nor sent to the engine again, each missing layer is written once
//! (by the worker, straight into the engine's content store: the layout a BuildKit build reads
//! holds only the small blobs), and the next build is fully cached.

use std::os::unix::fs::PermissionsExt;

use super::buildkit::{INLINE_CACHE, assert_fully_cached, build};
use super::engine_root::with_the_data_root_moved;
use tests::{CoordinatorProcess, DockerEngine, build_context, stderr_of};

/// Two random layers of 6 MiB each (incompressible): the `half` stage holds the first.
const HALF_AND_FULL: &str = "FROM base:1 AS half\nRUN head -c 6291456 /dev/urandom > /first\nFROM half\nRUN head -c 6291456 /dev/urandom > /second\n";

/// The bytes in a restore's summary line: `restored S: N images, K blobs downloaded (X MiB), ...`.
fn downloaded_mib(summary: &str) -> f64 {
    let in_parens = summary.split("blobs downloaded (").nth(1).and_then(|rest| rest.split(')').next());
    let (value, unit) = in_parens.and_then(|text| text.split_once(' ')).unwrap_or_else(|| panic!("{summary}"));
    let value: f64 = value.parse().unwrap_or_else(|_| panic!("{summary}"));
    match unit {
        "B" => value / 1048576.0,
        "KiB" => value / 1024.0,
        "MiB" => value,
        "GiB" => value * 1024.0,
        _ => panic!("{summary}"),
    }
}

/// Fails when a restore left a part file of its own in the content store at `content`.
fn assert_no_part_files(content: &std::path::Path) {
    let left: Vec<String> = std::fs::read_dir(content)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("cache-worker"))
        .collect();
    assert!(left.is_empty(), "part files left in the content store: {left:?}");
}

/// A coordinator holding the cache of `app:1` (built on a host of its own), and a fresh host
/// that holds the `half` stage: the base and the first random layer, the same blobs.
struct HalfHost {
    coordinator: CoordinatorProcess,
    token: String,
    app: tempfile::TempDir,
    half_host: DockerEngine,
    _build_host: DockerEngine,
    data_dir: tempfile::TempDir,
}

fn saved_and_half_held() -> Option<HalfHost> {
    let build_host = DockerEngine::start_with_containerd_store()?;
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    build_host.import_busybox_base("base:1");
    let app = build_context(HALF_AND_FULL);
    build(&build_host, app.path(), "half:1", &["--target", "half"]);
    build(&build_host, app.path(), "app:1", &[INLINE_CACHE]);
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));

    let half_host = DockerEngine::start_with_containerd_store().unwrap();
    let half_tar = data_dir.path().join("half.tar");
    let exported = build_host.docker(&["save", "-o", half_tar.to_str().unwrap(), "half:1"]);
    assert!(exported.status.success(), "{}", stderr_of(&exported));
    let loaded = half_host.docker(&["load", "-i", half_tar.to_str().unwrap()]);
    assert!(loaded.status.success(), "{}", stderr_of(&loaded));
    Some(HalfHost { coordinator, token, app, half_host, _build_host: build_host, data_dir })
}

/// The restore's summary line, once it downloaded only the missing layer (6 MiB) and the small
/// blobs and counted the held ones; the layout BuildKit reads holds the small blobs alone, and
/// the next build with the printed flags is fully cached.
fn assert_restored_only_the_other_half(host: &HalfHost, restored: &std::process::Output) -> String {
    assert!(restored.status.success(), "restore: {}", stderr_of(restored));
    let log = stderr_of(restored);
    let summary = log.lines().find(|line| line.starts_with("restored app: ")).unwrap_or_else(|| panic!("{log}"));
    let mib = downloaded_mib(summary);
    assert!((6.0..9.0).contains(&mib), "only the second layer (6 MiB) and the small blobs came down: {summary}");
    assert!(!summary.contains(" 0 layers already on this host"), "{summary}");

    // The layout BuildKit reads holds the small blobs; the layers are in the content store alone.
    let printed = String::from_utf8_lossy(&restored.stdout).trim().to_owned();
    let layout = host.half_host.build_cache_dir().join("app/images/blobs/sha256");
    let files: Vec<std::fs::Metadata> =
        std::fs::read_dir(&layout).unwrap().map(|entry| entry.unwrap().metadata().unwrap()).collect();
    let bytes: u64 = files.iter().map(|file| file.len()).sum();
    assert!(files.len() >= 4, "both images' indexes, manifests and configs: {} files", files.len());
    assert!(bytes < 1 << 20, "no layer in the layout: {bytes} bytes in {} files", files.len());

    let mut flags: Vec<&str> = printed.split_whitespace().collect();
    flags.push(INLINE_CACHE);
    let rebuilt = build(&host.half_host, host.app.path(), "app:1", &flags);
    assert_fully_cached(&rebuilt, 2);
    summary.to_owned()
}

#[test]
fn a_restore_onto_a_host_holding_half_the_image_downloads_only_the_other_half() {
    let Some(host) = saved_and_half_held() else { return };
    let HalfHost { coordinator, token, half_host, .. } = &host;
    let restored =
        coordinator.cache_worker_on(half_host, token, &["restore", "--service", "app", "--print-cache-from"]);
    let summary = assert_restored_only_the_other_half(&host, &restored);

    // The missing layer was written straight into the engine's content store, read-only as
    // containerd keeps its blobs, not ingested by the engine from the load's stream; nothing of
    // the writing is left behind (part files, the lease that kept it until the load).
    assert!(summary.contains(", 1 of them written straight into the engine's content store,"), "{summary}");
    let content = half_host.data_root().join("containerd/daemon/io.containerd.content.v1.content");
    for entry in std::fs::read_dir(content.join("blobs/sha256")).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444, "containerd's blobs are read-only");
    }
    assert_no_part_files(&content);
    let leases = std::process::Command::new("ctr")
        .arg("--address")
        .arg(half_host.containerd_socket())
        .args(["--namespace", "moby", "leases", "ls"])
        .output()
        .expect("ctr (Debian's containerd)");
    assert!(leases.status.success(), "{}", stderr_of(&leases));
    assert!(!String::from_utf8_lossy(&leases.stdout).contains("cache-worker"), "the restore's lease is deleted");
    host.coordinator.stop();
}

/// The first restore onto an engine that never held an image (an ephemeral build host's, the
/// common case) finds a content store with no blob folder yet, since containerd makes it with
/// its first blob: the layers are written straight into it all the same, and the next build
/// is fully cached.
#[test]
fn the_first_restore_onto_a_fresh_engine_writes_its_layers_straight_into_the_content_store() {
    let Some(host) = saved_and_half_held() else { return };
    let fresh = DockerEngine::start_with_containerd_store().unwrap();
    let blobs = fresh.data_root().join("containerd/daemon/io.containerd.content.v1.content/blobs/sha256");
    assert!(!blobs.exists(), "a fresh engine's content store has no blob folder yet");
    let restored =
        host.coordinator.cache_worker_on(&fresh, &host.token, &["restore", "--service", "app", "--print-cache-from"]);
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    let log = stderr_of(&restored);
    let summary = log.lines().find(|line| line.starts_with("restored app: ")).unwrap_or_else(|| panic!("{log}"));
    assert!(summary.contains(" of them written straight into the engine's content store"), "{summary}");
    let mode = std::fs::metadata(&blobs).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755, "the folder as containerd makes it");
    let mut flags: Vec<String> =
        String::from_utf8_lossy(&restored.stdout).split_whitespace().map(String::from).collect();
    flags.push(INLINE_CACHE.to_owned());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    assert_fully_cached(&build(&fresh, host.app.path(), "app:1", &flags), 2);
    host.coordinator.stop();
}

/// A worker that reaches the engine's containerd but not its files (the data root hidden, as in
/// `engine_root.rs`) asks containerd which blobs the host holds.
#[test]
fn through_containerds_socket_alone_a_restore_still_skips_the_blobs_the_host_holds() {
    let Some(host) = saved_and_half_held() else { return };
    let (coordinator, half_host) = (&host.coordinator, &host.half_host);
    let socket = half_host.containerd_socket();
    let args = ["--containerd-socket", socket.to_str().unwrap(), "restore", "--service", "app", "--print-cache-from"];
    let worker = coordinator.cache_worker_command_on(half_host, &host.token, &args);
    let restored = with_the_data_root_moved(&worker, half_host, None);
    let summary = assert_restored_only_the_other_half(&host, &restored);
    assert!(!summary.contains("written straight"), "no folder to write into: {summary}");
    host.coordinator.stop();
}

/// A layer corrupted in the store never reaches the engine's content store: the restore
/// checks it before its rename, warns naming it (exit 0), and leaves no part file behind.
#[test]
fn a_corrupt_layer_is_not_written_into_the_content_store() {
    let Some(host) = saved_and_half_held() else { return };
    let stored = host.data_dir.path().join("objects/layer-cache/cache/shop/blobs/sha256");
    let layer = std::fs::read_dir(&stored)
        .unwrap()
        .map(|entry| entry.unwrap())
        .find(|entry| entry.metadata().unwrap().len() > 5 << 20)
        .map(|entry| format!("sha256:{}", entry.file_name().to_string_lossy()))
        .expect("a 6 MiB layer in the store");
    tests::lose_blob(host.data_dir.path(), "shop", &layer, "corrupted");

    let fresh = DockerEngine::start_with_containerd_store().unwrap();
    let restored = host.coordinator.cache_worker_on(&fresh, &host.token, &["restore", "--service", "app"]);
    assert!(restored.status.success(), "a failed restore is a warning: {}", stderr_of(&restored));
    let warned = stderr_of(&restored);
    assert!(warned.contains(&format!("blob {layer} failed verification")), "{warned}");
    let content = fresh.data_root().join("containerd/daemon/io.containerd.content.v1.content");
    let hex = layer.trim_start_matches("sha256:");
    assert!(!content.join("blobs/sha256").join(hex).exists(), "the corrupt layer is not in the content store");
    assert_no_part_files(&content);
    let images = fresh.docker(&["image", "ls", "-q"]);
    assert!(String::from_utf8_lossy(&images.stdout).trim().is_empty(), "no image loaded");
    host.coordinator.stop();
}
