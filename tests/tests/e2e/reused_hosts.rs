//! A build host that is not fresh (self-hosted runners, shell executors): a save takes only
//! what its own job built. Ten builds and saves of one service on one host, then a second
//! service on the same base: each cache holds one build's images and a quota sized for one
//! build of each holds. Two projects' jobs of the same service name one after the other on one
//! containerd-store host: neither saves the other's BuildKit cache export, and each restores
//! fully cached. A job that restores two services before building them saves each without
//! the other's stages. A project that saves without a restore on a host another project used
//! takes none of its images.

use std::collections::HashSet;
use std::process::Output;

use super::buildkit::{INLINE_CACHE, assert_fully_cached, build};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, SEED_DOCKERFILE, build_context, stderr_of, stdout_of};

/// Two stages; the builder stage changes with `--build-arg BUILD=…`, so every build makes new
/// images of both stages (300 kB of random bytes each) and leaves the previous ones behind.
const APP: &str = "FROM base:1 AS build\nARG BUILD\nRUN echo $BUILD > /build && head -c 300000 /dev/urandom > /bytes\nFROM base:1\nCOPY --from=build /build /bytes /\nRUN cat /build\n";

/// Another service on the same base.
const WORKER: &str = "FROM base:1 AS build\nRUN head -c 300000 /dev/urandom > /bytes\nFROM base:1\nCOPY --from=build /bytes /worker-bytes\n";

/// The image and layer digests a save log names: what the cache it wrote names.
fn named_in(log: &str) -> HashSet<String> {
    log.lines()
        .filter_map(|line| line.strip_prefix("image ").or_else(|| line.strip_prefix("  layer ")))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn images_in(log: &str) -> usize {
    log.lines().filter(|line| line.starts_with("image ")).count()
}

/// One CI job of the classic builder as README gives it: restore, build with the printed
/// flags, save. Returns the save log.
fn classic_job(
    coordinator: &CoordinatorProcess,
    host: &DockerEngine,
    token: &str,
    service: &str,
    context: &std::path::Path,
    build_args: &[&str],
) -> String {
    let flags = coordinator.restore_flags(host, token, service);
    let flags: Vec<&str> = flags.split_whitespace().chain(build_args.iter().copied()).collect();
    let tag = format!("{service}:1");
    let built = host.classic_build(context, &tag, &flags);
    assert!(built.status.success(), "{}", stderr_of(&built));
    let saved = coordinator.cache_worker_on(host, token, &["save", "--service", service, &tag, "base:1"]);
    assert!(saved.status.success(), "save of {service}: {}", stderr_of(&saved));
    stdout_of(&saved)
}

#[test]
fn ten_builds_on_one_engine_20_10_host_and_a_second_service_each_cache_one_build() {
    ten_builds_and_a_second_service(EngineKind::Engine20);
}

#[test]
fn ten_builds_on_one_engine_26_1_host_and_a_second_service_each_cache_one_build() {
    ten_builds_and_a_second_service(EngineKind::Engine26);
}

#[test]
fn ten_builds_on_one_engine_28_5_host_and_a_second_service_each_cache_one_build() {
    ten_builds_and_a_second_service(EngineKind::Engine28);
}

fn ten_builds_and_a_second_service(kind: EngineKind) {
    let Some(host) = DockerEngine::start(kind) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--gc-grace", "0s", "--gc-interval", "0"]);
    let token = coordinator.create_project("shop");
    host.import_busybox_base("base:1");
    let app = build_context(APP);
    let first = classic_job(&coordinator, &host, &token, "app", app.path(), &["--build-arg", "BUILD=0"]);
    // base, the builder stage's ARG and RUN, the final stage's COPY and RUN.
    assert_eq!(images_in(&first), 5, "{first}");
    // Room for one build of each service (the second is smaller than the first), not for two
    // builds of the first.
    let one_app: u64 = coordinator.blob_files("shop").iter().sum();
    let quota = (one_app + 1_000_000).to_string();
    let set = coordinator.cachectl(&["project", "set-quota", "shop", &quota]);
    assert!(set.status.success(), "{}", stderr_of(&set));

    let mut last_app = first;
    for build in 1..10 {
        let build_arg = format!("BUILD={build}");
        last_app = classic_job(&coordinator, &host, &token, "app", app.path(), &["--build-arg", &build_arg]);
        assert_eq!(images_in(&last_app), 5, "build {build}: one build's images, not the earlier builds': {last_app}");
    }
    let worker = build_context(WORKER);
    let worker_log = classic_job(&coordinator, &host, &token, "worker", worker.path(), &[]);
    // base, the builder stage's RUN, the final stage's COPY: none of app's builds.
    assert_eq!(images_in(&worker_log), 3, "{worker_log}");
    let app_images: HashSet<&str> = last_app.lines().filter_map(|line| line.strip_prefix("image ")).collect();
    let worker_images: HashSet<&str> = worker_log.lines().filter_map(|line| line.strip_prefix("image ")).collect();
    assert_eq!(app_images.intersection(&worker_images).count(), 1, "the base alone is shared");

    // After a collection the store holds what the two caches name, and nothing else.
    coordinator.gc(&["shop"]);
    let named: HashSet<String> = named_in(&last_app).union(&named_in(&worker_log)).cloned().collect();
    assert_eq!(coordinator.blob_files("shop").len(), named.len(), "{last_app}\n{worker_log}");
    let stored: u64 = coordinator.blob_files("shop").iter().sum();
    assert!(stored <= quota.parse().unwrap(), "{stored} bytes stored, quota {quota}");
    coordinator.stop();
}

#[test]
fn a_job_restoring_two_services_before_building_them_saves_each_without_the_others_stages() {
    let Some(first_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    let (app, worker) = (build_context(APP), build_context(WORKER));
    first_host.import_busybox_base("base:1");
    let app_log = classic_job(&coordinator, &first_host, &token, "app", app.path(), &["--build-arg", "BUILD=1"]);
    let worker_log = classic_job(&coordinator, &first_host, &token, "worker", worker.path(), &[]);
    assert_eq!((images_in(&app_log), images_in(&worker_log)), (5, 3));

    // The next job, on a fresh host: both restores first, then both builds, then both saves.
    let host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let app_flags = coordinator.restore_flags(&host, &token, "app");
    let worker_flags = coordinator.restore_flags(&host, &token, "worker");
    for (context, tag, flags, extra) in [
        (app.path(), "app:1", &app_flags, &["--build-arg", "BUILD=1"][..]),
        (worker.path(), "worker:1", &worker_flags, &[][..]),
    ] {
        let flags: Vec<&str> = flags.split_whitespace().chain(extra.iter().copied()).collect();
        let built = host.classic_build(context, tag, &flags);
        assert!(built.status.success(), "{}", stderr_of(&built));
        assert!(!stdout_of(&built).contains("Running in"), "fully cached: {}", stdout_of(&built));
    }
    for (service, tag, log) in [("app", "app:1", &app_log), ("worker", "worker:1", &worker_log)] {
        let saved = coordinator.cache_worker_on(&host, &token, &["save", "--service", service, tag, "base:1"]);
        assert!(saved.status.success(), "{}", stderr_of(&saved));
        assert_eq!(named_in(&stdout_of(&saved)), named_in(log), "{service}: {}", stdout_of(&saved));
    }
    coordinator.stop();
}

/// A save without a restore: the job's build and save alone, as a CI script that never
/// restores runs them.
fn save_only_job(
    coordinator: &CoordinatorProcess,
    host: &DockerEngine,
    token: &str,
    service: &str,
    context: &std::path::Path,
) -> String {
    let tag = format!("{service}:1");
    let built = host.classic_build(context, &tag, &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    let saved = coordinator.cache_worker_on(host, token, &["save", "--service", service, &tag, "base:1"]);
    assert!(saved.status.success(), "save of {service}: {}", stderr_of(&saved));
    stdout_of(&saved)
}

#[test]
fn a_project_saving_without_a_restore_on_a_shared_host_takes_none_of_another_projects_images() {
    let Some(host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let (ours, theirs) = (coordinator.create_project("ours"), coordinator.create_project("theirs"));
    host.import_busybox_base("base:1");
    let worker = build_context(WORKER);
    let first = save_only_job(&coordinator, &host, &ours, "worker", worker.path());
    assert_eq!(images_in(&first), 3, "{first}");
    // Another project's job on the same host, on the same base.
    let app = build_context(APP);
    let their_log = classic_job(&coordinator, &host, &theirs, "app", app.path(), &["--build-arg", "BUILD=1"]);
    assert_eq!(images_in(&their_log), 5, "{their_log}");
    // Our next job saves without restoring: the same build's images, none of theirs.
    let again = save_only_job(&coordinator, &host, &ours, "worker", worker.path());
    let their_images: HashSet<&str> = their_log.lines().filter_map(|line| line.strip_prefix("image ")).collect();
    let our_images: HashSet<&str> = again.lines().filter_map(|line| line.strip_prefix("image ")).collect();
    assert_eq!(our_images.intersection(&their_images).count(), 1, "the base alone: {again}");
    assert_eq!(images_in(&again), 3, "{again}");
    coordinator.stop();
}

/// The names of the blob files of `project` in the embedded store under `data_dir`.
fn blob_names(data_dir: &std::path::Path, project: &str) -> HashSet<String> {
    let dir = data_dir
        .join("objects/layer-cache")
        .join(proto::object_keys::blobs_prefix(&proto::object_keys::project_prefix("cache", project)));
    std::fs::read_dir(dir)
        .map(|dir| dir.map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// The first project's service: three steps of its own, 100 kB of random bytes in one.
const OTHER_APP: &str = "FROM base:1\nRUN echo theirs > /theirs\nRUN head -c 100000 /dev/urandom > /their-bytes\nCOPY file.txt /their-file.txt\n";

#[test]
fn two_projects_jobs_of_one_service_name_on_one_containerd_store_host_keep_to_their_own() {
    let Some(host) = DockerEngine::start_with_containerd_store() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let (theirs, ours, probe) =
        (coordinator.create_project("theirs"), coordinator.create_project("ours"), coordinator.create_project("probe"));
    host.import_busybox_base("base:1");
    // What the base alone stores: the only blobs the two projects may share.
    let saved = coordinator.cache_worker_on(&host, &probe, &["save", "--service", "base", "base:1"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let base_blobs = blob_names(data_dir.path(), "probe");

    // The first project's jobs of service `app` on this host: the second restores, writes its
    // whole cache into the export folder and saves it.
    let other_app = build_context(OTHER_APP);
    assert_eq!(coordinator.restore_flags(&host, &theirs, "app"), "");
    build(&host, other_app.path(), "app:1", &[INLINE_CACHE]);
    let saved = coordinator.cache_worker_on(&host, &theirs, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let printed = coordinator.restore_flags(&host, &theirs, "app");
    assert!(printed.contains("--cache-to type=local"), "{printed}");
    let flags: Vec<&str> = printed.split_whitespace().collect();
    build(&host, other_app.path(), "app:1", &[&flags[..], &[INLINE_CACHE]].concat());
    let saved = coordinator.cache_worker_on(&host, &theirs, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    assert!(stdout_of(&saved).contains("BuildKit cache export sha256:"), "{}", stdout_of(&saved));
    let their_blobs = blob_names(data_dir.path(), "theirs");

    // Then this project's first job of its own service `app` on the same host: build, save.
    // The other project's export is still in the folder; it is not this job's.
    let app = build_context(SEED_DOCKERFILE);
    build(&host, app.path(), "app:1", &[INLINE_CACHE]);
    let saved = coordinator.cache_worker_on(&host, &ours, &["save", "--service", "app", "app:1", "base:1"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    assert!(!stdout_of(&saved).contains("BuildKit cache export"), "{}", stdout_of(&saved));
    let export = host.build_cache_dir().join("app/export");
    assert_eq!(
        stderr_of(&saved),
        format!(
            "cache-worker: warning: the cache export in {} was not written after a restore of app with this token in this job, so it is left out: restore before the build\n",
            export.display()
        )
    );
    let our_blobs = blob_names(data_dir.path(), "ours");
    let shared: HashSet<&String> = our_blobs.intersection(&their_blobs).collect();
    assert!(shared.iter().all(|blob| base_blobs.contains(*blob)), "shared beyond the base: {shared:?}");

    // Each project's next job on a fresh host: restored and rebuilt fully cached.
    let fresh_host = DockerEngine::start_with_containerd_store().unwrap();
    let printed = coordinator.restore_flags(&fresh_host, &ours, "app");
    let mut flags: Vec<&str> = printed.split_whitespace().collect();
    flags.push(INLINE_CACHE);
    assert_fully_cached(&build(&fresh_host, app.path(), "app:1", &flags), 4);
    let other_fresh_host = DockerEngine::start_with_containerd_store().unwrap();
    let printed = coordinator.restore_flags(&other_fresh_host, &theirs, "app");
    let mut flags: Vec<&str> = printed.split_whitespace().collect();
    flags.push(INLINE_CACHE);
    assert_fully_cached(&build(&other_fresh_host, other_app.path(), "app:1", &flags), 3);
    coordinator.stop();
}

/// `cache-worker ARGS…` on `host` in the CI job `job` (`CACHE_JOB_ID`), which must succeed.
fn in_job(coordinator: &CoordinatorProcess, host: &DockerEngine, token: &str, job: &str, args: &[&str]) -> Output {
    let output = coordinator.cache_worker_command_on(host, token, args).env("CACHE_JOB_ID", job).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", stderr_of(&output));
    output
}

#[test]
fn a_later_job_of_the_same_project_does_not_save_an_earlier_jobs_cache_export() {
    let Some(host) = DockerEngine::start_with_containerd_store() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    host.import_busybox_base("base:1");
    let app = build_context(OTHER_APP);
    let save = ["save", "--service", "app", "app:1", "base:1"];
    build(&host, app.path(), "app:1", &[INLINE_CACHE]);
    in_job(&coordinator, &host, &token, "1", &save);
    // Job 2 restores, builds with the printed flags (its export) and saves the export.
    let restored = in_job(&coordinator, &host, &token, "2", &["restore", "--service", "app", "--print-cache-from"]);
    let printed = stdout_of(&restored);
    let flags: Vec<&str> = printed.split_whitespace().collect();
    build(&host, app.path(), "app:1", &[&flags[..], &[INLINE_CACHE]].concat());
    let saved = in_job(&coordinator, &host, &token, "2", &save);
    assert!(stdout_of(&saved).contains("BuildKit cache export sha256:"), "{}", stdout_of(&saved));
    // Job 3 changes the build and saves without restoring: job 2's export is not its build's.
    std::fs::write(app.path().join("file.txt"), "changed\n").unwrap();
    build(&host, app.path(), "app:1", &[INLINE_CACHE]);
    let saved = in_job(&coordinator, &host, &token, "3", &save);
    assert!(!stdout_of(&saved).contains("BuildKit cache export"), "{}", stdout_of(&saved));
    assert!(stderr_of(&saved).contains("with this token in this job, so it is left out"), "{}", stderr_of(&saved));
    // So a fresh host rebuilds job 3's build fully cached from its inline cache.
    let fresh_host = DockerEngine::start_with_containerd_store().unwrap();
    let printed = coordinator.restore_flags(&fresh_host, &token, "app");
    let mut flags: Vec<&str> = printed.split_whitespace().collect();
    flags.push(INLINE_CACHE);
    assert_fully_cached(&build(&fresh_host, app.path(), "app:1", &flags), 3);
    coordinator.stop();
}
