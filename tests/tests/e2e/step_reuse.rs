//! Honest hit rates: a save counts the build steps the build reused from the cache its key
//! held, and names why the first rebuilt step was rebuilt: its files, its instruction, the base
//! image, or (Engine 26.1 without the printed `--cache-from`) a restore the build did not use.
//! The counts reach the metrics, `cachectl stats` and `cachectl show`.

use super::buildkit::{INLINE_CACHE, build as buildkit_build};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, SEED_DOCKERFILE, stderr_of, stdout_of};

/// The steps counter of project web's service web.
fn steps(coordinator: &CoordinatorProcess, outcome: &str) -> f64 {
    let sample = format!("layer_cache_build_steps_total{{project=\"web\",service=\"web\",outcome=\"{outcome}\"}}");
    coordinator.metric(&sample).unwrap_or(0.0)
}

/// Saves `images` from `host` as service web; its output's one reuse line (for the first image).
fn save_images(coordinator: &CoordinatorProcess, host: &DockerEngine, token: &str, images: &[&str]) -> String {
    let mut args = vec!["save", "--service", "web"];
    args.extend(images);
    let saved = coordinator.cache_worker_on(host, token, &args);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let out = stdout_of(&saved);
    let lines: Vec<&str> = out.lines().filter(|line| line.contains(": reused ")).collect();
    assert_eq!(lines.len(), 1, "one reuse line, for the image the build made: {out}");
    assert!(lines[0].starts_with(&format!("{}: reused ", images[0])), "{out}");
    lines[0].to_owned()
}

fn save(coordinator: &CoordinatorProcess, host: &DockerEngine, token: &str) -> String {
    save_images(coordinator, host, token, &["app:latest"])
}

fn build(host: &DockerEngine, context: &std::path::Path, flags: &[&str]) {
    let built = host.classic_build(context, "app:latest", flags);
    assert!(built.status.success(), "{}", stderr_of(&built));
}

fn step_reuse(kind: EngineKind) {
    let Some(first_host) = DockerEngine::start(kind) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let context = tests::build_seed_app(&first_host);
    assert_eq!(
        save(&coordinator, &first_host, &token),
        "app:latest: reused 0 of 5 steps; first rebuilt: step 1 RUN echo one > /one (the cache held no image for this key)"
    );

    // A fresh host restores the cache.
    let host = DockerEngine::start(kind).unwrap();
    let restored = coordinator.cache_worker_on(&host, &token, &["restore", "--service", "web", "--print-cache-from"]);
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    let printed = stdout_of(&restored);
    let flags: Vec<&str> = if kind == EngineKind::Engine20 { Vec::new() } else { printed.split_whitespace().collect() };
    if kind != EngineKind::Engine20 {
        // Rebuilt without the printed flags, this engine reuses no loaded image: the restore
        // was a hit, the honest figure is none of the steps.
        build(&host, context.path(), &[]);
        let (reused, rebuilt) = (steps(&coordinator, "reused"), steps(&coordinator, "rebuilt"));
        assert_eq!(
            save(&coordinator, &host, &token),
            "app:latest: reused 0 of 5 steps; first rebuilt: step 1 RUN echo one > /one \
             (unchanged, but the build did not use the restored cache)"
        );
        assert_eq!((steps(&coordinator, "reused") - reused, steps(&coordinator, "rebuilt") - rebuilt), (0.0, 5.0));
        let restores =
            coordinator.metric("layer_cache_restores_total{project=\"web\",service=\"web\",outcome=\"hit\"}");
        assert_eq!(restores, Some(1.0), "the restore itself was a hit");
    }

    // The file the COPY reads changed: the two RUNs before it were reused.
    std::fs::write(context.path().join("file.txt"), "changed content\n").unwrap();
    build(&host, context.path(), &flags);
    let (reused, rebuilt) = (steps(&coordinator, "reused"), steps(&coordinator, "rebuilt"));
    let line = save(&coordinator, &host, &token);
    assert!(line.starts_with("app:latest: reused 2 of 5 steps; first rebuilt: step 3 COPY "), "{line}");
    assert!(line.ends_with(" in /file.txt (its files changed)"), "{line}");
    assert_eq!((steps(&coordinator, "reused") - reused, steps(&coordinator, "rebuilt") - rebuilt), (2.0, 3.0));
    let shown = stdout_of(&coordinator.cachectl(&["show", "web", "web"]));
    assert!(shown.contains(&format!("log: {line}")), "cachectl show names the last save's reuse: {shown}");
    let stats = stdout_of(&coordinator.cachectl(&["stats", "web"]));
    assert!(stats.lines().next().unwrap().ends_with("STEPS REUSED"), "{stats}");
    let total = if kind == EngineKind::Engine20 { "2 of 10 (20%)" } else { "2 of 15 (13%)" };
    assert!(stats.lines().nth(1).unwrap().ends_with(total), "{stats}");

    // An instruction edited: the step before it was reused.
    let edited = SEED_DOCKERFILE.replace("echo two > /two", "echo TWO > /two");
    std::fs::write(context.path().join("Dockerfile"), edited).unwrap();
    build(&host, context.path(), &flags);
    assert_eq!(
        save(&coordinator, &host, &token),
        "app:latest: reused 1 of 5 steps; first rebuilt: step 2 RUN echo TWO > /two (the instruction changed)"
    );

    // The base image rebuilt with other content: nothing is reused, and the base is named.
    let base = tests::build_context("FROM base:1\nRUN echo moved > /moved\n");
    let rebuilt_base = host.classic_build(base.path(), "base:1", &[]);
    assert!(rebuilt_base.status.success(), "{}", stderr_of(&rebuilt_base));
    let base_id = stdout_of(&host.docker(&["image", "inspect", "--format", "{{.Id}}", "base:1"])).trim().to_owned();
    build(&host, context.path(), &flags);
    let short = &base_id.trim_start_matches("sha256:")[..12];
    assert_eq!(
        save(&coordinator, &host, &token),
        format!(
            "app:latest: reused 0 of 5 steps; first rebuilt: step 1 RUN echo one > /one \
             (the base image moved: base:1 is now sha256:{short})"
        )
    );
    // Saved again unchanged: every step is the cache's.
    assert_eq!(save(&coordinator, &host, &token), "app:latest: reused 5 of 5 steps");
    coordinator.stop();
}

#[test]
fn engine_20_10_counts_the_steps_a_build_reused_and_names_why_the_first_miss_missed() {
    step_reuse(EngineKind::Engine20);
}

#[test]
fn engine_26_1_counts_no_step_reused_when_the_build_ignores_the_restored_cache() {
    step_reuse(EngineKind::Engine26);
}

/// BuildKit images (with inline cache, saved with their base named beside them, as users of
/// `--cache-from` do) on `host` and a fresh host of the same kind.
fn buildkit_step_reuse(first_host: DockerEngine, fresh_host: impl Fn() -> DockerEngine) {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    first_host.import_busybox_base("base:1");
    let app = tests::build_context(SEED_DOCKERFILE);
    buildkit_build(&first_host, app.path(), "app:1", &[INLINE_CACHE]);
    let images = ["app:1", "base:1"];
    assert_eq!(
        save_images(&coordinator, &first_host, &token, &images),
        "app:1: reused 0 of 5 steps; first rebuilt: step 1 RUN echo one > /one (the cache held no image for this key)",
        "the ENV step counts though it has no layer"
    );
    let host = fresh_host();
    let printed = coordinator.restore_flags(&host, &token, "web");
    let mut flags: Vec<&str> = printed.split_whitespace().collect();
    flags.push(INLINE_CACHE);
    buildkit_build(&host, app.path(), "app:1", &flags);
    assert_eq!(save_images(&coordinator, &host, &token, &images), "app:1: reused 5 of 5 steps");
    std::fs::write(app.path().join("file.txt"), "changed content\n").unwrap();
    buildkit_build(&host, app.path(), "app:1", &flags);
    assert_eq!(
        save_images(&coordinator, &host, &token, &images),
        "app:1: reused 2 of 5 steps; first rebuilt: step 3 COPY file.txt /file.txt (its files changed)"
    );
    // A multi-stage build: its steps are the final stage's, after its FROM.
    let stages = tests::build_context(
        "FROM base:1 AS build\nRUN echo one > /one\nFROM base:1\nCOPY --from=build /one /one\nRUN cat /one > /two\n",
    );
    buildkit_build(&host, stages.path(), "app:1", &flags);
    let line = save_images(&coordinator, &host, &token, &images);
    assert!(line.starts_with("app:1: reused 0 of 2 steps; first rebuilt: step 1 COPY "), "{line}");
    assert_eq!((steps(&coordinator, "reused"), steps(&coordinator, "rebuilt")), (7.0, 10.0));
    coordinator.stop();
}

#[test]
fn buildkit_images_on_engine_28_5_count_the_steps_a_build_reused() {
    let Some(host) = DockerEngine::start(EngineKind::Engine28) else { return };
    buildkit_step_reuse(host, || DockerEngine::start(EngineKind::Engine28).unwrap());
}

#[test]
fn buildkit_images_on_the_containerd_store_count_the_steps_a_build_reused() {
    let Some(host) = DockerEngine::start_with_containerd_store() else { return };
    buildkit_step_reuse(host, || DockerEngine::start_with_containerd_store().unwrap());
}
