//! Multi-stage builds, saved by naming only what was built (`app:1 base:1`): after a restore on
//! a fresh host every step of every stage is cached, with the classic builder (whose other
//! stages the save finds as untagged images) and with BuildKit's inline cache. A changed stage
//! replaces its old images in the cache rather than adding to them.

use super::buildkit::{INLINE_CACHE, assert_fully_cached, build};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, build_context, stderr_of, stdout_of};

const TWO_STAGES: &str = "FROM base:1 AS build\nRUN echo one > /one\nRUN echo two > /two\nCOPY file.txt /file.txt\nFROM base:1\nCOPY --from=build /one /one\nENV GREETING=hello\nRUN cat /one > /three\n";

fn save(coordinator: &CoordinatorProcess, host: &DockerEngine, token: &str) -> String {
    let saved = coordinator.cache_worker_on(host, token, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    stdout_of(&saved)
}

/// The flags a restore printed, one per item.
fn restore_flags(coordinator: &CoordinatorProcess, host: &DockerEngine, token: &str) -> Vec<String> {
    coordinator.restore_flags(host, token, "app").split_whitespace().map(str::to_owned).collect()
}

fn images_in(log: &str) -> usize {
    log.lines().filter(|line| line.starts_with("image ")).count()
}

fn classic_two_stages(kind: EngineKind) {
    let Some(build_host) = DockerEngine::start(kind) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    build_host.import_busybox_base("base:1");
    let app = build_context(TWO_STAGES);
    let built = build_host.classic_build(app.path(), "app:1", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    // base, the builder stage's three steps, the final stage's three.
    assert_eq!(images_in(&save(&coordinator, &build_host, &token)), 7);

    let fresh_host = DockerEngine::start(kind).unwrap();
    let flags = restore_flags(&coordinator, &fresh_host, &token);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let rebuilt = fresh_host.classic_build(app.path(), "app:1", &flags);
    assert!(rebuilt.status.success(), "{}", stderr_of(&rebuilt));
    let rebuilt = stdout_of(&rebuilt);
    assert_eq!(rebuilt.matches("Using cache").count(), 6, "every step of both stages: {rebuilt}");
    assert!(!rebuilt.contains("Running in"), "{rebuilt}");

    // The builder stage changes: its new last step is saved, the restored one it replaces is not.
    std::fs::write(app.path().join("file.txt"), "changed\n").unwrap();
    let changed = fresh_host.classic_build(app.path(), "app:1", &flags);
    assert!(changed.status.success(), "{}", stderr_of(&changed));
    assert_eq!(
        stdout_of(&changed).matches("Using cache").count(),
        5,
        "only COPY file.txt ran: {}",
        stdout_of(&changed)
    );
    assert_eq!(images_in(&save(&coordinator, &fresh_host, &token)), 7, "not 8: the old stage stays behind");
    coordinator.stop();
}

#[test]
fn a_classic_two_stage_build_restored_on_engine_20_10_is_fully_cached() {
    classic_two_stages(EngineKind::Engine20);
}

#[test]
fn a_classic_two_stage_build_restored_on_engine_26_1_is_fully_cached() {
    classic_two_stages(EngineKind::Engine26);
}

#[test]
fn a_classic_two_stage_build_restored_on_engine_28_5_is_fully_cached() {
    classic_two_stages(EngineKind::Engine28);
}

fn buildkit_two_stages(host: Option<DockerEngine>, fresh: impl Fn() -> DockerEngine) {
    let Some(build_host) = host else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    build_host.import_busybox_base("base:1");
    let app = build_context(TWO_STAGES);
    build(&build_host, app.path(), "app:1", &[INLINE_CACHE]);
    save(&coordinator, &build_host, &token);

    let fresh_host = fresh();
    let flags = restore_flags(&coordinator, &fresh_host, &token);
    let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    flags.push(INLINE_CACHE);
    let rebuilt = build(&fresh_host, app.path(), "app:1", &flags);
    assert_fully_cached(&rebuilt, 5);
    coordinator.stop();
}

#[test]
fn a_buildkit_two_stage_build_restored_on_engine_20_10_is_fully_cached() {
    buildkit_two_stages(DockerEngine::start(EngineKind::Engine20), || {
        DockerEngine::start(EngineKind::Engine20).unwrap()
    });
}

#[test]
fn a_buildkit_two_stage_build_restored_on_the_containerd_store_is_fully_cached() {
    buildkit_two_stages(DockerEngine::start_with_containerd_store(), || {
        DockerEngine::start_with_containerd_store().unwrap()
    });
}
