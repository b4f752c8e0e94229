//! A frozen Docker engine (dockerd stopped with SIGSTOP: its socket accepts, nothing answers)
//! costs a build at most 15 s with the default flags, on Engine 20.10 and on Engine 28.5 with
//! the containerd image store: a restore frozen mid-load, or begun on a frozen engine, warns
//! once and exits 0, and the engine, woken, holds nothing of the cache; a save frozen
//! mid-export (`docker save`, the worker not seeing the data root), or begun on a frozen
//! engine, fails with one line and exit 69; one frozen mid-upload on the direct path (the
//! stores read in place) finishes without the engine.

use std::io::Read;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use tests::{CoordinatorProcess, DockerEngine, EngineKind, build_context, stderr_of};

/// The bound on what a frozen dependency costs a build, with the default flags.
const BOUND: Duration = Duration::from_secs(15);

/// Random bytes in each big image's layer: a few hundred MB, so a load or an export is well
/// under way when the engine is stopped, and far from its end.
const LAYER_MIB: u64 = 256;

/// Bytes a load or export has moved before the engine is stopped.
const UNDER_WAY: u64 = 32 << 20;

/// Builds `big:N`, a busybox base and one layer of random bytes, on `engine`.
fn build_big(engine: &DockerEngine, n: u32) {
    let context = build_context(&format!("FROM base:1\nRUN head -c {} /dev/urandom > /big{n}\n", LAYER_MIB << 20));
    let built = engine.classic_build(context.path(), &format!("big:{n}"), &[]);
    assert!(built.status.success(), "build big:{n}: {}", stderr_of(&built));
}

/// Waits for `child` to exit (its stderr read as it comes, so it never blocks on a full pipe),
/// failing the test once it took twice the bound: its output and how long it took after `from`.
fn finish(child: Child, from: Instant) -> (Output, Duration) {
    let mut child = child;
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for cache-worker") {
            break status;
        }
        if from.elapsed() > 2 * BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cache-worker still ran {:?} after the engine froze", from.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = from.elapsed();
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut stdout);
    }
    (Output { status, stdout, stderr: reader.join().expect("stderr reader") }, took)
}

/// Waits until `moved()` passed `amount` more than it was, or the command ended first.
fn wait_until_moved(child: &mut Child, moved: impl Fn() -> u64, amount: u64, what: &str) {
    let before = moved();
    let deadline = Instant::now() + Duration::from_secs(180);
    while moved() < before + amount {
        if let Some(status) = child.try_wait().expect("poll cache-worker") {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!("{what} ended ({status}) before the engine was stopped: {stderr}");
        }
        assert!(Instant::now() < deadline, "{what} never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A restore that gave up on the frozen engine: exit 0, one warning naming it, within the bound.
fn assert_restore_gave_up(restore: &Output, took: Duration, host: &DockerEngine, case: &str) {
    eprintln!("{case}: the restore ended {:.1} s after the engine froze", took.as_secs_f64());
    assert!(restore.status.success(), "{case}: a failed restore never fails a build: {}", stderr_of(restore));
    tests::assert_one_plain_line(restore);
    let line = stderr_of(restore);
    assert!(line.starts_with("cache-worker: warning: restoring web failed, the build runs without cache: "), "{line}");
    assert!(
        line.contains(&format!("the Docker engine at {} did not answer for 10 s (--stall-timeout)", host.host)),
        "{case}: {line}"
    );
    assert!(took <= BOUND, "{case}: the restore took {took:?} after the engine froze");
}

/// A save that gave up on the frozen engine: exit 69, one line naming it (after the export
/// path's own notice, when it took that path), within the bound.
fn assert_save_gave_up(save: &Output, took: Duration, host: &DockerEngine, case: &str) {
    eprintln!("{case}: the save ended {:.1} s after the engine froze", took.as_secs_f64());
    let stderr = stderr_of(save);
    assert_eq!(save.status.code(), Some(69), "{case}: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.starts_with("cache-worker: reading the images through docker save: "))
        .collect();
    assert_eq!(lines.len(), 1, "{case}: one line: {stderr}");
    assert_eq!(
        lines[0],
        format!(
            "cache-worker: saving web failed: the Docker engine at {} did not answer for 10 s (--stall-timeout)",
            host.host
        ),
        "{case}"
    );
    assert!(!stderr.contains('\x1b'), "{case}: {stderr}");
    assert!(took <= BOUND, "{case}: the save took {took:?} after the engine froze");
}

/// Every bound of a frozen engine on engines made by `start`; `content_store`: they keep the
/// containerd image store, into which a restore writes the layers itself (the engine then
/// loads only the small blobs).
fn a_frozen_engine_costs_a_build_at_most_15_s(start: impl Fn() -> Option<DockerEngine>, content_store: bool) {
    let Some(build_host) = start() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    build_host.import_busybox_base("base:1");
    build_big(&build_host, 1);
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "big:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));

    // Frozen tens of MB into the load (into the layers' writing, on the containerd store): the
    // restore warns, and the woken engine loads nothing.
    let fresh_host = start().unwrap();
    let content = fresh_host.data_root().join("containerd/daemon/io.containerd.content.v1.content");
    let moved = || if content_store { folder_bytes(&content) } else { fresh_host.bytes_read() };
    let mut restoring = coordinator.spawn_cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    wait_until_moved(&mut restoring, moved, UNDER_WAY, "the restore");
    fresh_host.signal("STOP");
    let (restore, took) = finish(restoring, Instant::now());
    fresh_host.signal("CONT");
    assert_restore_gave_up(&restore, took, &fresh_host, "frozen mid-load");
    // The engine reads what it was sent, finds no end to it, and keeps nothing.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(fresh_host.image_ids(), Vec::<String>::new(), "nothing half-loaded");
    let tags = fresh_host.docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert_eq!(tests::stdout_of(&tags).trim(), "", "no tag of the cache");

    // Begun on a frozen engine.
    fresh_host.signal("STOP");
    let started = Instant::now();
    let restoring = coordinator.spawn_cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    let (restore, took) = finish(restoring, started);
    fresh_host.signal("CONT");
    assert_restore_gave_up(&restore, took, &fresh_host, "frozen before the restore");

    // Frozen mid-export: a worker that cannot see the data root reads `docker save`, spooled.
    build_big(&build_host, 2);
    let spool = tempfile::tempdir().unwrap();
    let mut worker = coordinator.cache_worker_command_on(&build_host, &token, &["save", "--service", "web", "big:2"]);
    worker.env("CACHE_SPOOL_DIR", spool.path());
    let mut saving = build_host
        .without_data_root(&worker)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cache-worker in its own mount namespace");
    wait_until_moved(&mut saving, || build_host.bytes_read(), UNDER_WAY, "the save's export");
    build_host.signal("STOP");
    let (save, took) = finish(saving, Instant::now());
    build_host.signal("CONT");
    assert_save_gave_up(&save, took, &build_host, "frozen mid-export");

    // Begun on a frozen engine.
    build_host.signal("STOP");
    let started = Instant::now();
    let saving = coordinator.spawn_cache_worker_on(&build_host, &token, &["save", "--service", "web", "big:2"]);
    let (save, took) = finish(saving, started);
    build_host.signal("CONT");
    assert_save_gave_up(&save, took, &build_host, "frozen before the save");

    // Frozen mid-upload on the direct path: the blobs are read in place, so the uploads finish
    // without the engine, and the save's last asks of it (is the previous image here, what
    // does the host hold now) cost one deadline between them.
    let mut saving = coordinator.spawn_cache_worker_on(&build_host, &token, &["save", "--service", "web", "big:2"]);
    wait_until_moved(&mut saving, || folder_bytes(data_dir.path()), UNDER_WAY, "the save's upload");
    build_host.signal("STOP");
    let (save, took) = finish(saving, Instant::now());
    build_host.signal("CONT");
    eprintln!(
        "frozen mid-upload on the direct path: the save ended {:.1} s after the engine froze",
        took.as_secs_f64()
    );
    assert!(save.status.success(), "{}", stderr_of(&save));
    assert_eq!(stderr_of(&save), "", "no warning");
    assert!(tests::stdout_of(&save).contains("saved web: "), "{}", tests::stdout_of(&save));
    assert!(took <= BOUND, "the save took {took:?} after the engine froze");

    // Woken, the engines take the cache that was stored before the freezes.
    let restore = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    assert!(tests::stdout_of(&restore).contains("restored web: "), "{}", stderr_of(&restore));
}

/// Bytes of the files under `dir`, however deep.
fn folder_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => folder_bytes(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn a_frozen_engine_20_costs_a_build_at_most_15_s() {
    a_frozen_engine_costs_a_build_at_most_15_s(|| DockerEngine::start(EngineKind::Engine20), false);
}

#[test]
fn a_frozen_engine_on_the_containerd_store_costs_a_build_at_most_15_s() {
    a_frozen_engine_costs_a_build_at_most_15_s(DockerEngine::start_with_containerd_store, true);
}
