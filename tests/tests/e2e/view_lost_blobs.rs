//! A blob lost behind the coordinator's back (corrupted in place, or deleted from the store)
//! that a build reads through the registry view: the view reports it, the coordinator drops it
//! with the cache naming it, and BuildKit (20.10's) reports the failed pull and runs that step
//! instead, so the build still succeeds; the next job builds uncached, saves, and the job after
//! it is cached again.

use tests::{CoordinatorProcess, DockerEngine, EngineKind, stderr_of, stdout_of};

const DOCKERFILE: &str = "FROM scratch\nCOPY file.txt /file.txt\nCOPY two.txt /two.txt\n";

/// `view start` on `engine`, which must succeed: the flags it printed.
fn view_start(coordinator: &CoordinatorProcess, engine: &DockerEngine, token: &str) -> String {
    let started = coordinator.cache_worker_on(engine, token, &["view", "start", "--service", "web"]);
    assert!(started.status.success(), "view start: {}", stderr_of(&started));
    stdout_of(&started).trim().to_owned()
}

fn view_stop(coordinator: &CoordinatorProcess, engine: &DockerEngine, token: &str) -> String {
    let stopped = coordinator.cache_worker_on(engine, token, &["view", "stop", "--service", "web"]);
    assert!(stopped.status.success(), "view stop: {}", stderr_of(&stopped));
    stdout_of(&stopped)
}

fn build(engine: &DockerEngine, context: &std::path::Path, flags: &str) -> std::process::Output {
    let mut arguments = vec!["--build-arg", "BUILDKIT_INLINE_CACHE=1"];
    arguments.extend(flags.split_whitespace());
    engine.buildkit_build(context, "app:1", &arguments)
}

#[test]
fn a_blob_lost_from_the_store_is_reported_through_the_view_and_the_build_runs_its_step_instead() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let context = tests::build_context(DOCKERFILE);
    std::fs::write(context.path().join("two.txt"), vec![b'2'; 100_000]).unwrap();
    let built = build(&build_host, context.path(), "");
    assert!(built.status.success(), "{}", stderr_of(&built));
    let save = ["save", "--service", "web", "app:1"];
    let layers = tests::layer_digests(&build_host, "app:1");

    for how in ["corrupted", "deleted"] {
        let saved = coordinator.cache_worker_on(&build_host, &token, &save);
        assert!(saved.status.success(), "{how}: {}", stderr_of(&saved));
        tests::lose_blob(data_dir.path(), "web", &layers[1], how);

        // The job that reads it: BuildKit's pull fails, and it runs the step instead.
        let Some(fresh_host) = DockerEngine::start(EngineKind::Engine20) else { return };
        let flags = view_start(&coordinator, &fresh_host, &token);
        assert!(flags.contains("--cache-from 127.0.0.1:"), "{how}: {flags}");
        let survived = build(&fresh_host, context.path(), &flags);
        let said = view_stop(&coordinator, &fresh_host, &token);
        assert!(survived.status.success(), "{how}: the build runs the step instead: {}{said}", stderr_of(&survived));
        let pulled = stderr_of(&survived);
        assert!(pulled.contains(&format!("could not fetch content descriptor {}", layers[1])), "{how}: {pulled}");
        assert!(
            said.contains(&format!("blob {} came back missing or corrupt from the store", layers[1])),
            "{how}: {said}"
        );
        assert!(said.contains("dropped it with the 1 cache(s) naming it"), "{how}: {said}");
        let listed = stdout_of(&coordinator.cachectl(&["ls", "web"]));
        assert!(!listed.contains("\nweb "), "{how}: the cache naming the lost blob is gone: {listed}");

        // The next job: no cache, so no flags; the build runs uncached and is saved whole.
        let Some(next_host) = DockerEngine::start(EngineKind::Engine20) else { return };
        let flags = view_start(&coordinator, &next_host, &token);
        assert_eq!(flags, "", "{how}: nothing to import");
        let uncached = build(&next_host, context.path(), &flags);
        assert!(uncached.status.success(), "{how}: {}", stderr_of(&uncached));
        assert!(view_stop(&coordinator, &next_host, &token).contains("no cached image for web"), "{how}");
        let saved = coordinator.cache_worker_on(&next_host, &token, &save);
        assert!(saved.status.success(), "{how}: {}", stderr_of(&saved));
        assert!(stdout_of(&saved).contains("saved web"), "{how}: {}", stdout_of(&saved));

        // And the job after it is cached through the view again (once is enough).
        if how == "corrupted" {
            continue;
        }
        let Some(last_host) = DockerEngine::start(EngineKind::Engine20) else { return };
        let flags = view_start(&coordinator, &last_host, &token);
        let cached = build(&last_host, context.path(), &flags);
        view_stop(&coordinator, &last_host, &token);
        assert!(cached.status.success(), "{how}: {}", stderr_of(&cached));
        let log = format!("{}{}", stdout_of(&cached), stderr_of(&cached));
        assert_eq!(log.matches("CACHED").count(), 2, "{how}: both steps cached: {log}");
    }
    coordinator.stop();
}
