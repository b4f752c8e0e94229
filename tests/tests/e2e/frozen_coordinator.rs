//! A coordinator frozen with SIGSTOP (and with it the embedded store it serves) in the middle of
//! a restore and of a save, with the worker's default flags: each costs the build at most 15 s,
//! says so in one line, and leaves nothing half-done: the fresh engine holds no image of the
//! cache, and once the coordinator runs again the previous cache restores whole (Engine 20.10,
//! and Engine 28.5 with the containerd image store).

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use tests::{CoordinatorProcess, DockerEngine, EngineKind, FaultyProxy, build_context, stderr_of, stdout_of};

/// What a frozen dependency may cost a build in all, with the default `--stall-timeout`.
const BOUND: Duration = Duration::from_secs(15);

/// Bytes that cross the store before the coordinator is stopped: well into the transfer.
const BEFORE_THE_STOP: u64 = 32 << 20;

/// A build host of `engine` with `image` built: a busybox base and one layer of 192 MB of random
/// bytes (classic builder on a graph driver, BuildKit on the containerd store, as each is used).
fn build_big_image(engine: &DockerEngine, image: &str) {
    let context = build_context(&format!(
        "FROM base:1\nRUN dd if=/dev/urandom of=/{} bs=1048576 count=192\n",
        image.replace(':', "-")
    ));
    let built = if engine.containerd_store {
        engine.buildkit_build(context.path(), image, &[])
    } else {
        engine.classic_build(context.path(), image, &[])
    };
    assert!(built.status.success(), "{}", stderr_of(&built));
}

/// Waits until `moved` (the proxy's count one way) has grown by [`BEFORE_THE_STOP`] past
/// `before`, then stops the coordinator: the instant it stopped.
fn stop_once_moved(
    coordinator: &CoordinatorProcess,
    moved: impl Fn() -> u64,
    before: u64,
    child: &mut Child,
) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(120);
    while moved() < before + BEFORE_THE_STOP {
        assert!(child.try_wait().unwrap().is_none(), "the command ended before {BEFORE_THE_STOP} bytes moved");
        assert!(Instant::now() < deadline, "the transfer never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    coordinator.signal("STOP");
    Instant::now()
}

/// Waits for `child`: its output and how long after `since` it ended.
fn ended(child: Child, since: Instant) -> (Output, Duration) {
    let output = child.wait_with_output().unwrap();
    (output, since.elapsed())
}

fn restored_whole(coordinator: &CoordinatorProcess, token: &str, kind: &str, image: &str) {
    let host = start(kind);
    let restored = coordinator.cache_worker_on(&host, token, &["restore", "--service", "web"]);
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    assert!(stdout_of(&restored).contains("restored web: "), "{}{}", stdout_of(&restored), stderr_of(&restored));
    let inspected = host.docker(&["image", "inspect", image]);
    assert!(inspected.status.success(), "{image} is back: {}", stderr_of(&inspected));
}

fn start(kind: &str) -> DockerEngine {
    match kind {
        "containerd" => DockerEngine::start_with_containerd_store().unwrap(),
        _ => DockerEngine::start(EngineKind::Engine20).unwrap(),
    }
}

/// The scenario on one kind of engine: a restore, then a save, each with the coordinator
/// stopped mid-transfer.
fn a_frozen_coordinator_costs_at_most_15_s(build_host: DockerEngine, kind: &str) {
    // Build hosts reach the embedded store through a proxy that only counts the bytes.
    let proxy = FaultyProxy::start();
    let public_url = format!("http://{}", proxy.address);
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--s3-public-url", &public_url]);
    proxy.forward_to(coordinator.s3_listen.as_deref().expect("the embedded endpoint's address"));
    let token = coordinator.create_project("web");
    build_host.import_busybox_base("base:1");
    build_big_image(&build_host, "big:1");
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "big:1", "base:1"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));

    // Stopped mid-restore: one warning, exit 0, and the engine loaded nothing.
    let fresh_host = start(kind);
    let before = proxy.bytes_moved_down();
    let mut restoring = coordinator.spawn_cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    let stopped = stop_once_moved(&coordinator, || proxy.bytes_moved_down(), before, &mut restoring);
    let (restore, took) = ended(restoring, stopped);
    coordinator.signal("CONT");
    assert!(restore.status.success(), "a failed restore never fails a build: {}", stderr_of(&restore));
    tests::assert_one_plain_line(&restore);
    let line = stderr_of(&restore);
    assert!(line.starts_with("cache-worker: warning: restoring web failed, the build runs without cache: "), "{line}");
    eprintln!("{kind}: a coordinator stopped mid-restore cost {:.1} s: {line}", took.as_secs_f64());
    assert!(took <= BOUND, "the restore ended {:.1} s after the coordinator stopped", took.as_secs_f64());
    assert!(fresh_host.image_ids().is_empty(), "nothing half-loaded: {:?}", fresh_host.image_ids());
    let again = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    assert!(stdout_of(&again).contains("restored web: "), "{}{}", stdout_of(&again), stderr_of(&again));

    // Stopped mid-save, uploading a new big layer: one line, exit 69, and the previous cache
    // stays whole.
    build_big_image(&build_host, "big:2");
    let before = proxy.bytes_moved_up();
    let mut saving =
        coordinator.spawn_cache_worker_on(&build_host, &token, &["save", "--service", "web", "big:2", "base:1"]);
    let stopped = stop_once_moved(&coordinator, || proxy.bytes_moved_up(), before, &mut saving);
    let (save, took) = ended(saving, stopped);
    coordinator.signal("CONT");
    tests::assert_one_plain_line(&save);
    let line = stderr_of(&save);
    assert!(line.starts_with("cache-worker: saving web failed: "), "{line}");
    assert_eq!(save.status.code(), Some(69), "a stopped dependency: {line}");
    eprintln!("{kind}: a coordinator stopped mid-save cost {:.1} s: {line}", took.as_secs_f64());
    assert!(took <= BOUND, "the save ended {:.1} s after the coordinator stopped", took.as_secs_f64());
    restored_whole(&coordinator, &token, kind, "big:1");
    coordinator.stop();
}

#[test]
fn a_frozen_coordinator_costs_a_build_at_most_15_s_on_engine_20() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    a_frozen_coordinator_costs_at_most_15_s(build_host, "graph driver");
}

#[test]
fn a_frozen_coordinator_costs_a_build_at_most_15_s_on_the_containerd_store() {
    let Some(build_host) = DockerEngine::start_with_containerd_store() else { return };
    a_frozen_coordinator_costs_at_most_15_s(build_host, "containerd");
}
