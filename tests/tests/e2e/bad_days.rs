//! An operator's bad day over the real parts (the real binaries and engines): a save killed
//! mid-upload and retried at once (Engines 20.10 and 26.1), a frozen coordinator, a store that
//! stalls mid-restore, twenty saves of one service at once (Engine 20.10).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{CoordinatorProcess, DockerEngine, EngineKind, build_context, http_get, stderr_of, stdout_of};

/// A build host with `big:1` (a busybox base and one layer of random bytes, big enough that
/// its save is still uploading when the test kills it), a coordinator and a project "web".
fn big_image_host(
    kind: EngineKind,
    coordinator_args: &[&str],
) -> Option<(DockerEngine, CoordinatorProcess, String, tempfile::TempDir)> {
    let engine = DockerEngine::start(kind)?;
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), coordinator_args);
    let token = coordinator.create_project("web");
    engine.import_busybox_base("base:1");
    let context = build_context("FROM base:1\nRUN dd if=/dev/urandom of=/big bs=1048576 count=192\n");
    let built = engine.classic_build(context.path(), "big:1", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    Some((engine, coordinator, token, data_dir))
}

/// A restore that failed without failing the build: exit 0 and one warning line.
fn assert_restore_warned_once(restore: &std::process::Output) {
    assert!(restore.status.success(), "a failed restore never fails a build: {}", stderr_of(restore));
    let warnings: Vec<String> = stderr_of(restore).lines().map(str::to_owned).collect();
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert!(warnings[0].starts_with("cache-worker: warning: restoring web failed"), "{warnings:?}");
}

/// Transfer requests the coordinator has granted and not had back: it grows when a save begins.
/// Builds `app:1`, one `RUN` on a busybox base, and saves it as service `web`.
fn build_and_save_one_step(coordinator: &CoordinatorProcess, build_host: &DockerEngine, token: &str) {
    build_host.import_busybox_base("base:1");
    let context = build_context("FROM base:1\nRUN echo one > /one\n");
    assert!(build_host.classic_build(context.path(), "app:1", &[]).status.success());
    let saved = coordinator.cache_worker_on(build_host, token, &["save", "--service", "web", "app:1"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
}

fn granted(coordinator: &CoordinatorProcess) -> u64 {
    let (_, text) = http_get(&format!("{}/metrics", coordinator.metrics_url));
    text.lines()
        .find_map(|line| line.strip_prefix("layer_cache_transfer_requests_granted "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Starts a save of `big:1` and signals it once the coordinator has begun it (its claims held).
fn save_interrupted_by(
    coordinator: &CoordinatorProcess,
    engine: &DockerEngine,
    token: &str,
    signal: &str,
) -> std::process::Output {
    // A killed save's share stays granted until it lapses: wait for this save's own.
    let before = granted(coordinator);
    let child = coordinator.spawn_cache_worker_on(engine, token, &["save", "--service", "web", "big:1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while granted(coordinator) <= before {
        assert!(Instant::now() < deadline, "the save never began");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    child.wait_with_output().unwrap()
}

fn assert_retry_uploads_itself(retry: &std::process::Output) {
    assert!(retry.status.success(), "the retry succeeds: {}", stderr_of(retry));
    let log = stdout_of(retry);
    assert!(!log.contains("uploaded by a concurrent save"), "the retry never waits for the save it repeats:\n{log}");
    assert!(log.lines().any(|line| line.contains(" layer ") && line.ends_with(" new")), "{log}");
    assert!(log.contains("saved web: 2 images"), "{log}");
}

#[test]
fn a_killed_or_interrupted_save_never_holds_up_its_retry_on_engine_20() {
    killed_and_interrupted_saves(EngineKind::Engine20);
}

/// Engine 26.1 exports the OCI layout, whose layers stream to the store without a spool.
#[test]
fn a_killed_or_interrupted_save_never_holds_up_its_retry_on_engine_26() {
    killed_and_interrupted_saves(EngineKind::Engine26);
}

fn killed_and_interrupted_saves(kind: EngineKind) {
    let Some((engine, coordinator, token, _data_dir)) = big_image_host(kind, &[]) else { return };

    let killed = save_interrupted_by(&coordinator, &engine, &token, "KILL");
    assert_eq!(killed.status.code(), None, "killed by SIGKILL: {}", stderr_of(&killed));
    let shown = coordinator.cachectl(&["show", "web", "web"]);
    assert_eq!(shown.status.code(), Some(66), "the killed save committed nothing: {}", stdout_of(&shown));
    let retry = coordinator.cache_worker_on(&engine, &token, &["save", "--service", "web", "big:1"]);
    assert_retry_uploads_itself(&retry);

    let flushed = coordinator.cachectl(&["flush", "web"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));
    // A CI runner cancelling a job sends SIGTERM; a person at a terminal, SIGINT.
    let (signal, code) = if kind == EngineKind::Engine20 { ("TERM", 143) } else { ("INT", 130) };
    let interrupted = save_interrupted_by(&coordinator, &engine, &token, signal);
    assert_eq!(interrupted.status.code(), Some(code), "{}", stderr_of(&interrupted));
    assert!(stderr_of(&interrupted).contains(&format!("interrupted by SIG{signal}")), "{}", stderr_of(&interrupted));
    let retry = coordinator.cache_worker_on(&engine, &token, &["save", "--service", "web", "big:1"]);
    assert_retry_uploads_itself(&retry);
}

#[test]
fn a_flush_mid_save_or_a_coordinator_killed_mid_restore_reads_as_one_plain_line() {
    // Build hosts reach the store through a proxy, to stop a restore's download at a known point.
    let proxy = tests::FaultyProxy::start();
    let public_url = format!("http://{}", proxy.address);
    let Some((engine, coordinator, token, data_dir)) =
        big_image_host(EngineKind::Engine20, &["--s3-public-url", &public_url])
    else {
        return;
    };
    proxy.forward_to(coordinator.s3_listen.as_deref().expect("the embedded endpoint's address"));

    // The project is flushed while the save's upload is in flight at the embedded endpoint.
    let saving = coordinator.spawn_cache_worker_on(&engine, &token, &["save", "--service", "web", "big:1"]);
    let objects = data_dir.path().join("objects");
    let receiving = || {
        std::fs::read_dir(&objects).into_iter().flatten().flatten().any(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with(".tmp.layer-cache-") || name.starts_with(".upload-")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !receiving() {
        assert!(Instant::now() < deadline, "the save never began uploading");
        std::thread::sleep(Duration::from_millis(10));
    }
    let flushed = coordinator.cachectl(&["flush", "web"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));
    let saved = saving.wait_with_output().unwrap();
    assert!(!saved.status.success(), "{}", stdout_of(&saved));
    tests::assert_one_plain_line(&saved);
    let line = stderr_of(&saved);
    assert!(line.starts_with("cache-worker: saving web failed: "), "{line}");
    // An upload in flight is refused as flushed; one begun after the flush, for its revoked key.
    assert!(line.contains("flushed") || line.contains("(InvalidAccessKeyId)"), "the cause is named: {line}");
    eprintln!("a flush mid-save reads: {line}");

    // Saved again, then the coordinator (and its embedded endpoint) dies mid-download.
    let saved = coordinator.cache_worker_on(&engine, &token, &["save", "--service", "web", "big:1"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let restoring = coordinator.spawn_cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    let before = proxy.bytes_moved_down();
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.bytes_moved_down() < before + (16 << 20) {
        assert!(Instant::now() < deadline, "the restore never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.freeze();
    coordinator.signal("KILL");
    proxy.thaw();
    let restore = restoring.wait_with_output().unwrap();
    assert_restore_warned_once(&restore);
    tests::assert_one_plain_line(&restore);
    let line = stderr_of(&restore);
    assert!(line.contains("failed, the build runs without cache: downloading blob sha256:"), "{line}");
    eprintln!("a coordinator killed mid-restore reads: {line}");
}

/// With the default `--stall-timeout` (10 s), a stopped coordinator costs a command at most
/// 15 s in all.
#[test]
fn a_stopped_coordinator_costs_a_build_its_stall_timeout() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    build_and_save_one_step(&coordinator, &build_host, &token);

    coordinator.signal("STOP");
    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let started = Instant::now();
    let restore = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    let restore_seconds = started.elapsed().as_secs_f64();
    assert_restore_warned_once(&restore);
    assert!(restore_seconds <= 15.0, "the restore gave up after its 10 s stall timeout, not {restore_seconds:.1} s");
    assert!(fresh_host.image_ids().is_empty(), "the engine holds nothing");

    let started = Instant::now();
    let save = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:1"]);
    let save_seconds = started.elapsed().as_secs_f64();
    assert_eq!(save.status.code(), Some(69), "{}", stderr_of(&save));
    assert_eq!(stderr_of(&save).lines().count(), 1, "{}", stderr_of(&save));
    assert!(save_seconds <= 15.0, "the save gave up after its 10 s stall timeout, not {save_seconds:.1} s");

    // Woken, it still has the previous manifest.
    coordinator.signal("CONT");
    let restore = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    assert!(stdout_of(&restore).contains("restored web: 2 images"), "{}{}", stdout_of(&restore), stderr_of(&restore));
}

#[test]
fn twenty_concurrent_saves_of_one_service_say_which_one_the_cache_keeps() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let root = tests::busybox_root();
    let n_saves = 20;
    for build in 0..n_saves {
        std::fs::write(root.path().join("build"), format!("{build}\n")).unwrap();
        let mut tar =
            Command::new("tar").arg("-C").arg(root.path()).args(["-c", "."]).stdout(Stdio::piped()).spawn().unwrap();
        let imported = Command::new("docker")
            .args(["import", "-", &format!("app:{build}")])
            .env("DOCKER_HOST", &build_host.host)
            .stdin(tar.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(tar.wait().unwrap().success());
        assert!(imported.status.success(), "{}", stderr_of(&imported));
    }
    let saves: Vec<_> = (0..n_saves)
        .map(|build| {
            coordinator.spawn_cache_worker_on(
                &build_host,
                &token,
                &["save", "--service", "web", &format!("app:{build}")],
            )
        })
        .collect();
    let logs: Vec<(String, String)> = saves
        .into_iter()
        .enumerate()
        .map(|(build, child)| {
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success(), "save {build}: {}", stderr_of(&output));
            (format!("app:{build}"), stdout_of(&output))
        })
        .collect();

    let shown = stdout_of(&coordinator.cachectl(&["show", "web", "web"]));
    let survivor = logs
        .iter()
        .map(|(tag, _)| tag)
        .find(|tag| shown.contains(&format!("({tag};")))
        .unwrap_or_else(|| panic!("{shown}"));
    let mut n_replaced = 0;
    for (tag, log) in &logs {
        let stored = log.contains("saved web: 1 images");
        let kept_out = log.contains("not stored: a save of web begun after this one is the cache");
        assert!(stored != kept_out, "each save says whether its images are the cache: {log}");
        if tag == survivor {
            assert!(stored, "the survivor's log says it stored its images: {log}");
        }
        if kept_out {
            assert_ne!(tag, survivor);
        }
        // A save that replaced another names it; nobody replaced the survivor.
        if let Some(line) = log.lines().find(|line| line.starts_with("replaced the ")) {
            n_replaced += 1;
            assert!(!line.contains(&format!("({survivor},")), "the survivor was replaced: {line}");
        }
    }
    let n_stored = logs.iter().filter(|(_, log)| log.contains("saved web: 1 images")).count();
    // Every stored save but the first replaced exactly one other.
    assert_eq!(n_replaced, n_stored - 1, "{logs:#?}");

    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let restore = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    assert!(stdout_of(&restore).contains("restored web: 1 images"), "{}{}", stdout_of(&restore), stderr_of(&restore));
    let inspect = fresh_host.docker(&["image", "inspect", survivor]);
    assert!(inspect.status.success(), "the survivor is back complete: {}", stderr_of(&inspect));
}

#[test]
fn a_store_that_stalls_mid_restore_costs_the_stall_timeout_not_minutes() {
    // Build hosts reach the store through a proxy that freezes mid-download: no answer, no
    // byte, connections open, as a stalled store or network does.
    let proxy = tests::FaultyProxy::start();
    let public_url = format!("http://{}", proxy.address);
    let Some((engine, coordinator, token, _data_dir)) =
        big_image_host(EngineKind::Engine20, &["--s3-public-url", &public_url])
    else {
        return;
    };
    proxy.forward_to(coordinator.s3_listen.as_deref().expect("the embedded endpoint's address"));
    let saved = coordinator.cache_worker_on(&engine, &token, &["save", "--service", "web", "big:1"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));

    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let before = proxy.bytes_moved_down();
    let restore = coordinator.spawn_cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.bytes_moved_down() < before + (16 << 20) {
        assert!(Instant::now() < deadline, "the restore never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.freeze();
    let frozen_at = Instant::now();
    let restore = restore.wait_with_output().unwrap();
    let seconds = frozen_at.elapsed().as_secs_f64();
    assert_restore_warned_once(&restore);
    // One stall of the default 10 s and the failure's report, not 3 attempts of it.
    assert!(seconds <= 15.0, "the restore gave up after {seconds:.1} s of a stalled store");
    assert!(fresh_host.image_ids().is_empty(), "the engine holds nothing");
    eprintln!("the restore gave up {seconds:.1} s after the store froze");
}

#[test]
fn a_store_that_answers_slow_down_is_retried() {
    let proxy = tests::FaultyProxy::start();
    let public_url = format!("http://{}", proxy.address);
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--s3-public-url", &public_url]);
    proxy.forward_to(coordinator.s3_listen.as_deref().unwrap());
    let token = coordinator.create_project("web");
    build_and_save_one_step(&coordinator, &build_host, &token);

    // Two refusals in a row, then the store answers: the restore retries through them.
    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    proxy.fail_next(2);
    let restored = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--strict", "--service", "web"]);
    assert!(restored.status.success(), "retried: {}", stderr_of(&restored));
    assert!(stdout_of(&restored).contains("restored web: 2 images"), "{}", stdout_of(&restored));

    // Refusals past the retries: a strict restore fails with one line naming the store's answer.
    let other_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    proxy.fail_next(1000);
    let refused = coordinator.cache_worker_on(&other_host, &token, &["restore", "--strict", "--service", "web"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr_of(&refused));
    assert_eq!(stderr_of(&refused).lines().count(), 1, "{}", stderr_of(&refused));
    assert!(stderr_of(&refused).contains("SlowDown"), "{}", stderr_of(&refused));
}
