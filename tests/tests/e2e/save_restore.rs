//! The seed scenario over real engines: build on one engine, save, restore on a second engine
//! with an empty data root (a fresh build host), rebuild fully cached. On Engine 20.10 a plain
//! classic build hits the cache; on Engine 26.1 the build needs the `--cache-from` flags that
//! restore prints.

use std::path::Path;

use tests::{CoordinatorProcess, DockerEngine, EngineKind, SEED_DOCKERFILE, build_context, stderr_of, stdout_of};

fn build_app(engine: &DockerEngine, context: &Path, extra_args: &[&str]) -> String {
    let built = engine.classic_build(context, "app:latest", extra_args);
    assert!(built.status.success(), "build: {}", stderr_of(&built));
    stdout_of(&built)
}

fn image_id(engine: &DockerEngine, reference: &str) -> String {
    let output = engine.docker(&["image", "inspect", "--format", "{{.Id}}", reference]);
    assert!(output.status.success(), "inspect {reference}: {}", stderr_of(&output));
    stdout_of(&output).trim().to_owned()
}

/// Exactly what the service's counters say moved (layers and bytes transferred), from the
/// admin API: `cachectl stats` rounds bytes for people.
fn moved(coordinator: &CoordinatorProcess, service: &str) -> (u64, u64) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let channel = proto::client::connect(&coordinator.grpc_url).await.unwrap();
        let token = proto::client::BearerToken::new(&coordinator.admin_token).unwrap();
        let mut admin = proto::v1::admin_client::AdminClient::with_interceptor(channel, token);
        let stats = admin.stats(proto::v1::StatsRequest { project: "web".into() }).await.unwrap().into_inner();
        let row = stats.services.iter().find(|row| row.service == service).expect("the service's counters");
        (row.layers_transferred, row.bytes_transferred)
    })
}

/// A build host with the seed image built, a coordinator and a project "web".
struct SeedBuilt {
    build_host: DockerEngine,
    coordinator: CoordinatorProcess,
    token: String,
    context: tempfile::TempDir,
    data_dir: tempfile::TempDir,
}

fn build_seed(kind: EngineKind) -> Option<SeedBuilt> {
    let build_host = DockerEngine::start(kind)?;
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    build_host.import_busybox_base("base:1");
    let context = build_context(SEED_DOCKERFILE);
    build_app(&build_host, context.path(), &[]);
    Some(SeedBuilt { build_host, coordinator, token, context, data_dir })
}

fn seed_scenario(kind: EngineKind) {
    let Some(SeedBuilt { build_host, coordinator, token, context, data_dir: _data_dir }) = build_seed(kind) else {
        return;
    };
    let app_id = image_id(&build_host, "app:latest");

    // Save: the log names every image with its tags, and every layer.
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    let log = stdout_of(&saved);
    assert!(log.contains(&format!("image {app_id} (app:latest, parent sha256:")), "{log}");
    assert!(log.contains("; classic builder)"), "{log}");
    assert!(log.lines().any(|line| line.starts_with("image ") && line.contains("(base:1; imported)")), "{log}");
    assert_eq!(log.lines().filter(|line| line.starts_with("image ")).count(), 6, "base, 4 intermediates, app: {log}");
    assert!(log.contains(" new\n"), "{log}");
    let shown = stdout_of(&coordinator.cachectl(&["show", "web", "web"]));
    for line in log.lines().filter(|line| line.starts_with("  layer ") || line.starts_with("image ")) {
        let digest = line.split_whitespace().nth(1).unwrap();
        assert!(shown.contains(digest), "cachectl show lacks {digest}: {shown}");
    }
    assert!(shown.contains("app:latest") && shown.contains("base:1"), "{shown}");

    // Saving the unchanged image again moves no layer bytes: the log says so, and so do the
    // counters the worker reported.
    let moved_before = moved(&coordinator, "web");
    assert!(moved_before.0 > 0 && moved_before.1 > 0, "the first save's uploads were counted: {moved_before:?}");
    let again = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert!(again.status.success(), "second save: {}", stderr_of(&again));
    let again_log = stdout_of(&again);
    assert!(again_log.contains("uploaded 0 blobs (0 B), 11 already stored; unchanged"), "{again_log}");
    assert!(!again_log.contains(" new\n"), "{again_log}");
    assert_eq!(moved(&coordinator, "web"), moved_before, "not a layer nor a config moved");

    // A fresh build host: restore, then the same build.
    let fresh_host = DockerEngine::start(kind).unwrap();
    let mut restore_args = vec!["restore", "--service", "web"];
    if kind != EngineKind::Engine20 {
        restore_args.push("--print-cache-from");
    }
    let restored = coordinator.cache_worker_on(&fresh_host, &token, &restore_args);
    assert!(restored.status.success(), "restore: {}", stderr_of(&restored));
    let flags: Vec<String> = match kind {
        EngineKind::Engine20 => {
            assert!(stdout_of(&restored).contains("add to docker build: --cache-from base:1 --cache-from app:latest"));
            Vec::new()
        }
        EngineKind::Engine26 | EngineKind::Engine28 => {
            let printed = stdout_of(&restored);
            assert_eq!(printed.trim(), "--cache-from base:1 --cache-from app:latest");
            printed.split_whitespace().map(str::to_owned).collect()
        }
    };
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    if kind != EngineKind::Engine20 {
        // Why restore prints the flags: without them this engine reuses no loaded image.
        let plain = fresh_host.classic_build(context.path(), "plain:latest", &[]);
        assert!(plain.status.success(), "{}", stderr_of(&plain));
        let plain = stdout_of(&plain);
        assert_eq!(plain.matches("Using cache").count(), 0, "a plain build reuses nothing on 26.1 and 28.5: {plain}");
        assert_eq!(plain.matches("Running in").count(), 4, "its RUN and ENV steps all ran: {plain}");
    }
    let rebuilt = build_app(&fresh_host, context.path(), &flags);
    assert_eq!(rebuilt.matches("Using cache").count(), 5, "every step after FROM is cached: {rebuilt}");
    assert!(!rebuilt.contains("Running in"), "{rebuilt}");
    assert_eq!(image_id(&fresh_host, "app:latest"), app_id);

    // Restoring again onto a host that holds every layer chain downloads no layer: the tarball
    // carries them empty, and the engine loads it.
    let again = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web", "--strict"]);
    assert!(again.status.success(), "restore again: {}", stderr_of(&again));
    let summary = stdout_of(&again);
    assert!(summary.contains("6 blobs downloaded") && summary.contains("5 layers already on this host"), "{summary}");
    assert_eq!(image_id(&fresh_host, "app:latest"), app_id);

    // After a flush, another fresh host finds nothing, and that is not an error.
    let flushed = coordinator.cachectl(&["flush", "web"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));
    let empty_host = DockerEngine::start(kind).unwrap();
    let missed = coordinator.cache_worker_on(&empty_host, &token, &["restore", "--service", "web"]);
    assert!(missed.status.success(), "{}", stderr_of(&missed));
    assert_eq!(stdout_of(&missed), "no cached image for web\n");
    assert!(empty_host.image_ids().is_empty());
    coordinator.stop();
}

#[test]
fn the_seed_scenario_on_engine_20_10_rebuilds_fully_cached_with_a_plain_build() {
    seed_scenario(EngineKind::Engine20);
}

#[test]
fn the_seed_scenario_on_engine_26_1_rebuilds_fully_cached_with_the_printed_flags() {
    seed_scenario(EngineKind::Engine26);
}

#[test]
fn the_seed_scenario_on_engine_28_5_rebuilds_fully_cached_with_the_printed_flags() {
    seed_scenario(EngineKind::Engine28);
}

/// Flips one byte in the middle of the largest stored blob of the project.
fn corrupt_largest_blob(data_dir: &Path) -> String {
    let blobs = data_dir.join("objects/layer-cache/cache/web/blobs/sha256");
    let largest = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .max_by_key(|path| std::fs::metadata(path).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&largest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&largest, bytes).unwrap();
    format!("sha256:{}", largest.file_name().unwrap().to_string_lossy())
}

#[test]
fn a_broken_cache_never_breaks_a_build() {
    let Some(SeedBuilt { build_host, coordinator, token, context, data_dir }) = build_seed(EngineKind::Engine20) else {
        return;
    };
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));

    // A failed save exits non-zero with one line and leaves the previous manifest in place.
    let failed = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "nothing:here"]);
    assert_eq!(failed.status.code(), Some(1), "a failed save: exit 1, as README says");
    assert_eq!(stderr_of(&failed), "cache-worker: saving web failed: no image \"nothing:here\" in the Docker engine\n");
    assert!(stdout_of(&coordinator.cachectl(&["show", "web", "web"])).contains("app:latest"));

    // A flipped byte: restore names the blob, loads nothing, exits 0 (1 with --strict).
    let corrupted = corrupt_largest_blob(data_dir.path());
    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let restored = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    assert_eq!(restored.status.code(), Some(0), "{}", stderr_of(&restored));
    let warning = stderr_of(&restored);
    assert_eq!(warning.lines().count(), 1, "{warning}");
    assert!(
        warning.starts_with("cache-worker: warning: restoring web failed, the build runs without cache: "),
        "{warning}"
    );
    assert!(warning.contains(&format!("blob {corrupted} failed verification")), "{warning}");
    assert!(warning.contains("dropped it with the 1 cache(s) naming it"), "the coordinator was told: {warning}");
    assert!(fresh_host.image_ids().is_empty(), "the engine holds nothing from the broken manifest");
    // The broken cache is gone: the next restore is a miss, even with --strict.
    let miss = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web", "--strict"]);
    assert_eq!(miss.status.code(), Some(0), "{}", stderr_of(&miss));
    assert!(stdout_of(&miss).contains("no cached image for web"), "{}", stdout_of(&miss));
    // Saved again (the lost blob uploaded again), then broken again: --strict exits 1.
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    assert_eq!(corrupt_largest_blob(data_dir.path()), corrupted);
    let strict = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web", "--strict"]);
    assert_eq!(strict.status.code(), Some(1));
    assert!(stderr_of(&strict).contains(&format!("blob {corrupted} failed verification")));
    assert!(fresh_host.image_ids().is_empty());
    // Both failed restores gave their share of the transfer budget back with their reports.
    let (status, metrics) = tests::http_get(&format!("{}/metrics", coordinator.metrics_url));
    assert_eq!(status, 200);
    assert!(metrics.lines().any(|line| line == "layer_cache_transfer_requests_granted 0"), "{metrics}");

    // The next build runs normally, without the cache.
    fresh_host.import_busybox_base("base:1");
    let rebuilt = build_app(&fresh_host, context.path(), &[]);
    assert!(rebuilt.matches("Running in").count() >= 3, "{rebuilt}");
    assert!(!rebuilt.contains("Using cache"), "{rebuilt}");

    // An unreachable coordinator: a warning and exit 0, or exit 69 with --strict.
    let (_held_closed, closed_port) = tests::closed_port();
    let unreachable = std::process::Command::new(tests::binary("cache-worker"))
        .args(["--coordinator", &format!("http://{closed_port}"), "restore", "--service", "web"])
        .env("CACHE_TOKEN", &token)
        .env("DOCKER_HOST", &fresh_host.host)
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(0));
    assert!(stderr_of(&unreachable).contains("cannot reach the coordinator"), "{}", stderr_of(&unreachable));
    let strict_unreachable = std::process::Command::new(tests::binary("cache-worker"))
        .args(["--coordinator", &format!("http://{closed_port}"), "restore", "--service", "web", "--strict"])
        .env("CACHE_TOKEN", &token)
        .env("DOCKER_HOST", &fresh_host.host)
        .output()
        .unwrap();
    assert_eq!(strict_unreachable.status.code(), Some(69));

    // A refused token: a warning and exit 0, or exit 77 with --strict; one line either way.
    let wrong_token = "cct_web_".to_owned() + &"0".repeat(64);
    for (extra, code) in [(None, 0), (Some("--strict"), 77)] {
        let mut args = vec!["restore", "--service", "web"];
        args.extend(extra);
        let refused = coordinator.cache_worker_on(&fresh_host, &wrong_token, &args);
        assert_eq!(refused.status.code(), Some(code), "{args:?}: {}", stderr_of(&refused));
        assert_eq!(stderr_of(&refused).lines().count(), 1, "{}", stderr_of(&refused));
        assert!(stderr_of(&refused).contains("unknown or revoked project token"), "{}", stderr_of(&refused));
    }
    coordinator.stop();
}

#[test]
fn branch_caches_fall_back_in_the_order_given() {
    let Some(SeedBuilt { build_host, coordinator, token, context: _context, data_dir: _data_dir }) =
        build_seed(EngineKind::Engine20)
    else {
        return;
    };
    let app_id = image_id(&build_host, "app:latest");
    let saved = coordinator.cache_worker_on(
        &build_host,
        &token,
        &["save", "--service", "web", "--branch", "main", "app:latest"],
    );
    assert!(saved.status.success(), "{}", stderr_of(&saved));

    // The branch's own key only: the default entry and other branches stay empty.
    for branch in ["", "feature"] {
        let shown = coordinator.cachectl(&["show", "web", "web", "--branch", branch]);
        assert_eq!(shown.status.code(), Some(66), "branch {branch:?}: {}", stdout_of(&shown));
    }
    let shown = coordinator.cachectl(&["show", "web", "web", "--branch", "main"]);
    assert!(stdout_of(&shown).contains("service web, branch main"), "{}", stdout_of(&shown));

    // Another branch holds just the base.
    let saved = coordinator.cache_worker_on(
        &build_host,
        &token,
        &["save", "--service", "web", "--branch", "release", "base:1"],
    );
    assert!(saved.status.success(), "{}", stderr_of(&saved));

    // A pull request's branch has no cache: it restores the first fallback that has one.
    let restore = |host: &DockerEngine, fallbacks: [&str; 2]| {
        let mut args = vec!["restore", "--service", "web", "--branch", "feature"];
        for fallback in fallbacks {
            args.extend(["--fallback-branch", fallback]);
        }
        let restored = coordinator.cache_worker_on(host, &token, &args);
        assert!(restored.status.success(), "{}", stderr_of(&restored));
        stdout_of(&restored)
    };
    let first_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let restored = restore(&first_host, ["release", "main"]);
    assert!(restored.contains("restored web: 1 images"), "release first: {restored}");
    assert!(first_host.docker(&["image", "inspect", "app:latest"]).status.code() == Some(1), "only the base");
    let second_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let restored = restore(&second_host, ["nope", "main"]);
    assert!(restored.contains("restored web: "), "{restored}");
    assert_eq!(image_id(&second_host, "app:latest"), app_id);

    // Without a fallback that has one, it is a miss; and --print-cache-from prints nothing.
    let other_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let missed = coordinator.cache_worker_on(
        &other_host,
        &token,
        &["restore", "--service", "web", "--branch", "feature", "--fallback-branch", "nope", "--print-cache-from"],
    );
    assert!(missed.status.success(), "{}", stderr_of(&missed));
    assert_eq!(stdout_of(&missed), "", "no flags on a miss");
    assert!(stderr_of(&missed).contains("no cached image for web"), "{}", stderr_of(&missed));
    assert!(other_host.image_ids().is_empty());
}
