//! BuildKit builds share the cache: an image with inline cache metadata, saved with the base
//! named beside it, restored on a fresh engine, rebuilt with the `--cache-from` flags restore
//! printed: every step `CACHED`. And one project serves a classic and a BuildKit service from
//! one store, their shared base stored once.

use std::collections::HashSet;
use std::path::Path;

use tests::{CoordinatorProcess, DockerEngine, EngineKind, SEED_DOCKERFILE, build_context, stderr_of, stdout_of};

pub(crate) const INLINE_CACHE: &str = "--build-arg=BUILDKIT_INLINE_CACHE=1";

/// BuildKit's plain progress: (Dockerfile steps after FROM, those of them that said `CACHED`),
/// as progress IDs (`#5`).
pub(crate) fn steps_and_cached(progress: &str) -> (HashSet<String>, HashSet<String>) {
    let id = |line: &str| line.split_whitespace().next().unwrap_or_default().to_owned();
    let steps = progress
        .lines()
        .filter(|line| line.starts_with('#'))
        .filter(|line| {
            // `#5 [2/5] RUN ...`, or with a stage name `#5 [build 2/4] RUN ...`.
            let after_id = line.split_once(' ').map(|(_, rest)| rest).unwrap_or_default();
            after_id.strip_prefix('[').and_then(|rest| rest.split_once(']')).is_some_and(|(step, _)| step.contains('/'))
        })
        .filter(|line| !line.contains(" FROM "))
        .map(id)
        .collect();
    let cached = progress.lines().filter(|line| line.starts_with('#') && line.ends_with(" CACHED")).map(id).collect();
    (steps, cached)
}

/// Asserts that the build had `n_steps` steps after FROM, every one `CACHED`.
pub(crate) fn assert_fully_cached(progress: &str, n_steps: usize) {
    let (steps, cached) = steps_and_cached(progress);
    assert_eq!(steps.len(), n_steps, "{progress}");
    assert!(
        steps.is_subset(&cached),
        "steps that ran: {:?}\n{progress}",
        steps.difference(&cached).collect::<Vec<_>>()
    );
}

pub(crate) fn build(engine: &DockerEngine, context: &Path, tag: &str, extra_args: &[&str]) -> String {
    let mut built = engine.buildkit_build(context, tag, extra_args);
    // On the containerd store BuildKit sometimes fails to unpack the image it just exported
    // (moby/buildkit#6521, open; Docker 29 users see it too): an engine bug, not ours. Once
    // more is what users do; the build's cached steps make it cheap.
    if engine.containerd_store && stderr_of(&built).contains("failed to prepare extraction snapshot") {
        eprintln!("the engine failed to unpack {tag} (moby/buildkit#6521): building it again");
        built = engine.buildkit_build(context, tag, extra_args);
    }
    assert!(built.status.success(), "BuildKit build of {tag}: {}", stderr_of(&built));
    stderr_of(&built)
}

fn buildkit_scenario(kind: EngineKind) {
    let Some(build_host) = DockerEngine::start(kind) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    build_host.import_busybox_base("base:1");
    let app = build_context(SEED_DOCKERFILE);
    let first = build(&build_host, app.path(), "app:latest", &[INLINE_CACHE]);
    assert!(steps_and_cached(&first).1.is_empty(), "the first build runs every step: {first}");

    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "app", "app:latest", "base:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    let log = stdout_of(&saved);
    assert!(log.lines().any(|line| line.contains("(app:latest; BuildKit, inline cache)")), "{log}");
    assert!(log.lines().any(|line| line.contains("(base:1; imported)")), "{log}");
    assert_eq!(stderr_of(&saved), "", "no warning for an image with inline cache");

    let fresh_host = DockerEngine::start(kind).unwrap();
    let restored =
        coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "app", "--print-cache-from"]);
    assert!(restored.status.success(), "restore: {}", stderr_of(&restored));
    let printed = stdout_of(&restored);
    assert_eq!(printed.trim(), "--cache-from app:latest --cache-from base:1");
    let mut flags: Vec<&str> = printed.split_whitespace().collect();
    flags.push(INLINE_CACHE);
    let rebuilt = build(&fresh_host, app.path(), "app:latest", &flags);
    assert_fully_cached(&rebuilt, 4);

    // An image without inline cache metadata is saved too, with a warning that says how to fix it.
    let plain = build_context("FROM base:1\nRUN echo plain > /plain\n");
    build(&build_host, plain.path(), "plain:1", &[]);
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "plain", "plain:1", "base:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    assert!(stdout_of(&saved).contains("(plain:1; BuildKit, no inline cache)"), "{}", stdout_of(&saved));
    assert_eq!(
        stderr_of(&saved),
        "cache-worker: warning: plain:1 was built by BuildKit without inline cache metadata, so a build cannot reuse its steps: build it with --build-arg BUILDKIT_INLINE_CACHE=1\n"
    );
    coordinator.stop();
}

#[test]
fn a_buildkit_build_restored_on_engine_20_10_is_fully_cached() {
    buildkit_scenario(EngineKind::Engine20);
}

#[test]
fn a_buildkit_build_restored_on_engine_26_1_is_fully_cached() {
    buildkit_scenario(EngineKind::Engine26);
}

#[test]
fn a_buildkit_build_restored_on_engine_28_5_is_fully_cached() {
    buildkit_scenario(EngineKind::Engine28);
}

#[test]
fn a_classic_and_a_buildkit_service_share_one_store() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    build_host.import_busybox_base("base:1");
    let web = build_context(SEED_DOCKERFILE);
    let api = build_context("FROM base:1\nRUN echo api > /api\nCOPY file.txt /api.txt\n");
    let classic = build_host.classic_build(web.path(), "web:latest", &[]);
    assert!(classic.status.success(), "{}", stderr_of(&classic));
    build(&build_host, api.path(), "api:latest", &[INLINE_CACHE]);

    let inspect = build_host.docker(&["image", "inspect", "--format", "{{.Id}} {{index .RootFS.Layers 0}}", "base:1"]);
    let base = stdout_of(&inspect);
    let (base_id, base_layer) = base.trim().split_once(' ').unwrap();
    let mut digests = HashSet::new();
    let mut logs = Vec::new();
    for (service, images) in [("web", vec!["web:latest"]), ("api", vec!["api:latest", "base:1"])] {
        let mut args = vec!["save", "--service", service];
        args.extend(images);
        let saved = coordinator.cache_worker_on(&build_host, &token, &args);
        assert!(saved.status.success(), "save {service}: {}", stderr_of(&saved));
        for line in stdout_of(&saved).lines().filter(|line| line.starts_with("image ") || line.starts_with("  layer "))
        {
            digests.insert(line.split_whitespace().nth(1).unwrap().to_owned());
        }
        logs.push(stdout_of(&saved));
    }
    // The second save found the base already stored and uploaded nothing of it.
    let base_layer_lines: Vec<&str> =
        logs[1].lines().filter(|line| line.starts_with(&format!("  layer {base_layer} "))).collect();
    assert!(!base_layer_lines.is_empty(), "{}", logs[1]);
    assert!(base_layer_lines.iter().all(|line| line.ends_with(" already stored")), "{}", logs[1]);
    assert!(logs[1].contains(&format!("image {base_id} (base:1")), "{}", logs[1]);
    let summary = logs[1].lines().find(|line| line.starts_with("saved api: ")).unwrap();
    let before_stored = summary.split(" already stored").next().unwrap();
    let n_stored: usize =
        before_stored.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{summary}"));
    assert!(n_stored >= 2, "the base's config and layer were already stored: {summary}");
    // Every distinct config and layer once in the store: the base layer is not stored twice.
    let blobs_dir = data_dir.path().join("objects/layer-cache/cache/shop/blobs/sha256");
    let stored: HashSet<String> = std::fs::read_dir(&blobs_dir)
        .unwrap()
        .map(|entry| format!("sha256:{}", entry.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(stored, digests);

    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    for service in ["web", "api"] {
        let restored = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", service]);
        assert!(restored.status.success(), "restore {service}: {}", stderr_of(&restored));
    }
    let rebuilt_web = fresh_host.classic_build(web.path(), "web:latest", &[]);
    assert!(rebuilt_web.status.success(), "{}", stderr_of(&rebuilt_web));
    assert_eq!(stdout_of(&rebuilt_web).matches("Using cache").count(), 5, "{}", stdout_of(&rebuilt_web));
    let rebuilt_api = build(&fresh_host, api.path(), "api:latest", &["--cache-from", "api:latest", INLINE_CACHE]);
    assert_fully_cached(&rebuilt_api, 2);
    coordinator.stop();
}
