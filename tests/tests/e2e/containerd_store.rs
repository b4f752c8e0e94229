//! The containerd image store (Engine 28.5 with `containerd-snapshotter`, as fresh Engine 29
//! installs run): BuildKit builds restored on a fresh host are fully cached with the flags
//! restore prints, the images come back under their own IDs and tags, a stage the final image
//! does not need stays cached through the `mode=max` export the next save picks up, and a
//! classic build is told why it runs uncached.

use super::buildkit::{INLINE_CACHE, assert_fully_cached, build};
use tests::{CoordinatorProcess, DockerEngine, SEED_DOCKERFILE, build_context, stderr_of, stdout_of};

fn image_id(engine: &DockerEngine, reference: &str) -> String {
    let inspected = engine.docker(&["image", "inspect", "--format", "{{.Id}}", reference]);
    assert!(inspected.status.success(), "{reference}: {}", stderr_of(&inspected));
    stdout_of(&inspected).trim().to_owned()
}

#[test]
fn the_seed_scenario_on_the_containerd_store_is_fully_cached_with_the_printed_flags() {
    let Some(build_host) = DockerEngine::start_with_containerd_store() else { return };
    // Like Engine 29, this engine refuses clients older than API 1.44; the worker is not one.
    let old_client = std::process::Command::new("docker")
        .arg("version")
        .env("DOCKER_HOST", &build_host.host)
        .env("DOCKER_API_VERSION", "1.41")
        .output()
        .unwrap();
    assert!(stderr_of(&old_client).contains("client version 1.41 is too old"), "{}", stderr_of(&old_client));
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    build_host.import_busybox_base("base:1");
    let app = build_context(SEED_DOCKERFILE);
    build(&build_host, app.path(), "app:1", &[INLINE_CACHE]);
    let (app_id, base_id) = (image_id(&build_host, "app:1"), image_id(&build_host, "base:1"));

    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    assert_eq!(stderr_of(&saved), "", "no warning");
    let log = stdout_of(&saved);
    assert!(log.contains(&format!("image {app_id} (app:1; BuildKit, inline cache)")), "{log}");
    assert!(log.contains(&format!("image {base_id} (base:1; imported)")), "{log}");
    // The base layer is one blob, stored once though both images name it.
    let base_layer = log.lines().find(|line| line.starts_with("  layer ")).unwrap().split_whitespace().nth(1).unwrap();
    assert_eq!(log.matches(&format!("layer {base_layer} ")).count(), 2, "{log}");
    let again = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(again.status.success(), "{}", stderr_of(&again));
    assert!(
        stdout_of(&again).contains("uploaded 0 blobs (0 B)")
            && stdout_of(&again).contains("unchanged since the last save"),
        "{}",
        stdout_of(&again)
    );

    let fresh_host = DockerEngine::start_with_containerd_store().unwrap();
    let printed = coordinator.restore_flags(&fresh_host, &token, "app");
    let dirs = fresh_host.build_cache_dir().join("app");
    assert_eq!(
        printed,
        format!(
            "--cache-from type=local,src={},digest={app_id} --cache-to type=local,dest={},mode=max",
            dirs.join("images").display(),
            dirs.join("export").display()
        )
    );
    assert_eq!(image_id(&fresh_host, "app:1"), app_id, "the image keeps its ID");
    assert_eq!(image_id(&fresh_host, "base:1"), base_id);
    let mut flags: Vec<&str> = printed.split_whitespace().collect();
    flags.push(INLINE_CACHE);
    let rebuilt = build(&fresh_host, app.path(), "app:1", &flags);
    assert_fully_cached(&rebuilt, 4);
    let ran = fresh_host.docker(&["run", "--rm", "--network", "none", "app:1", "cat", "/three"]);
    assert_eq!(stdout_of(&ran), "content\none\n", "{}", stderr_of(&ran));
    coordinator.stop();
}

/// A builder stage, a test stage built with `--target` in the same job, and the final stage.
const THREE_STAGES: &str = "FROM base:1 AS build\nRUN echo one > /one\nRUN echo two > /two\nCOPY file.txt /file.txt\nFROM build AS test\nRUN cat /two /file.txt > /tested\nFROM base:1\nCOPY --from=build /one /one\nENV GREETING=hello\nRUN cat /one > /three\n";

#[test]
fn every_stage_stays_cached_on_the_containerd_store_through_the_mode_max_export() {
    let Some(first_host) = DockerEngine::start_with_containerd_store() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    let app = build_context(THREE_STAGES);
    // The first job: nothing cached, so no flag (the classic builder would refuse --cache-to,
    // and nothing says which builder runs); the image carries inline cache.
    first_host.import_busybox_base("base:1");
    assert_eq!(coordinator.restore_flags(&first_host, &token, "app"), "");
    build(&first_host, app.path(), "app:1", &[INLINE_CACHE]);
    let saved = coordinator.cache_worker_on(&first_host, &token, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));

    // The second job: the inline cache serves the final image, and the flags ask BuildKit to
    // write its whole cache, which the save takes along.
    let second_host = DockerEngine::start_with_containerd_store().unwrap();
    let printed = coordinator.restore_flags(&second_host, &token, "app");
    let dirs = second_host.build_cache_dir().join("app");
    let export = format!("--cache-to type=local,dest={},mode=max", dirs.join("export").display());
    assert!(printed.ends_with(&export), "{printed}");
    let flags: Vec<&str> = printed.split_whitespace().collect();
    build(&second_host, app.path(), "app:test", &[&flags[..], &["--target", "test"]].concat());
    let rebuilt = build(&second_host, app.path(), "app:1", &[&flags[..], &[INLINE_CACHE]].concat());
    assert_fully_cached(&rebuilt, 5);
    let saved = coordinator.cache_worker_on(&second_host, &token, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    assert!(stdout_of(&saved).contains("BuildKit cache export sha256:"), "{}", stdout_of(&saved));

    // The third job: one cache source, the test stage's and the final image's caches merged.
    let third_host = DockerEngine::start_with_containerd_store().unwrap();
    let printed = coordinator.restore_flags(&third_host, &token, "app");
    let cache = third_host.build_cache_dir().join("app/cache");
    let cache_sources = format!("--cache-from type=local,src={},digest=sha256:", cache.display());
    assert_eq!(printed.matches(&cache_sources).count(), 1, "{printed}");
    assert_eq!(printed.matches("--cache-from").count(), 1, "{printed}");
    let flags: Vec<&str> = printed.split_whitespace().collect();
    let tested = build(&third_host, app.path(), "app:test", &[&flags[..], &["--target", "test"]].concat());
    assert_fully_cached(&tested, 4);
    let rebuilt = build(&third_host, app.path(), "app:1", &[&flags[..], &[INLINE_CACHE]].concat());
    assert_fully_cached(&rebuilt, 5);
    coordinator.stop();
}

#[test]
fn a_classic_build_on_the_containerd_store_is_told_why_it_runs_uncached() {
    let Some(build_host) = DockerEngine::start_with_containerd_store() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    build_host.import_busybox_base("base:1");
    let app = build_context(SEED_DOCKERFILE);
    // The job restores first (a miss), so the export folder is this job's.
    assert_eq!(coordinator.restore_flags(&build_host, &token, "app"), "");
    let built = build_host.classic_build(app.path(), "app:1", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    // A cache export of this job that names a manifest it lacks (a build killed mid-export,
    // say) is left out with a warning; the images are saved.
    let export = build_host.build_cache_dir().join("app/export");
    std::fs::create_dir_all(&export).unwrap();
    let zeros = "0".repeat(64);
    std::fs::write(
        export.join("index.json"),
        format!(r#"{{"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{zeros}","size":10}}]}}"#),
    )
    .unwrap();
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    assert!(
        stderr_of(&saved).starts_with(&format!(
            "cache-worker: warning: the build's cache export in {} cannot be read, the images are saved without it: ",
            export.display()
        )),
        "{}",
        stderr_of(&saved)
    );
    assert!(!stdout_of(&saved).contains("BuildKit cache export"), "{}", stdout_of(&saved));
    assert!(
        stdout_of(&saved).contains("(app:1, parent ") || stdout_of(&saved).contains("(app:1;"),
        "{}",
        stdout_of(&saved)
    );

    let fresh_host = DockerEngine::start_with_containerd_store().unwrap();
    let restored =
        coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "app", "--print-cache-from"]);
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    assert_eq!(stdout_of(&restored), "", "no flag that would fail the build");
    assert!(
        stderr_of(&restored).contains("app was built by the classic builder, which cannot reuse a restored cache on the containerd image store: the build runs uncached; BuildKit"),
        "{}",
        stderr_of(&restored)
    );
    assert!(image_id(&fresh_host, "base:1").starts_with("sha256:"), "FROM base:1 resolves");
    let rebuilt = fresh_host.classic_build(app.path(), "app:1", &[]);
    assert!(rebuilt.status.success(), "the build runs, uncached: {}", stderr_of(&rebuilt));
    coordinator.stop();
}

#[test]
fn a_cache_saved_on_a_graph_driver_is_not_restored_onto_the_containerd_store() {
    let Some(graph_driver_host) = DockerEngine::start(tests::EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    graph_driver_host.import_busybox_base("base:1");
    let app = build_context(SEED_DOCKERFILE);
    build(&graph_driver_host, app.path(), "app:1", &[INLINE_CACHE]);
    let saved =
        coordinator.cache_worker_on(&graph_driver_host, &token, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));

    let containerd_host = DockerEngine::start_with_containerd_store().unwrap();
    let restored =
        coordinator.cache_worker_on(&containerd_host, &token, &["restore", "--service", "app", "--print-cache-from"]);
    assert_eq!(restored.status.code(), Some(0), "{}", stderr_of(&restored));
    assert_eq!(
        stderr_of(&restored),
        "cache-worker: warning: the cache of app was saved from a graph-driver engine and this engine uses the containerd image store: nothing restored; the next save replaces it\n"
    );
    assert_eq!(stdout_of(&restored), "", "no flags");
    assert!(containerd_host.image_ids().is_empty(), "nothing loaded");
    coordinator.stop();
}
