//! A restart of the coordinator's PostgreSQL under load: a cluster of the test's own, stopped
//! with `pg_ctl -m immediate` (as a crash: sessions cut, unlogged tables emptied) while a save
//! and a restore run, then started again on the same port. The coordinator reconnects by
//! itself; while the database is down every call fails at once in one clear line (a restore
//! warns and exits 0, a save fails), `/readyz` says 503 and `state_up` 0; every save a worker
//! acknowledged is there afterwards, whole; nothing is half-committed. A frozen server (its
//! processes stopped) costs a waiting call the time a probe takes to find it silent, not the
//! caller's deadline.

use std::time::{Duration, Instant};

use coordinator::state::State;
use proto::v1 as pb;
use tests::moto::{new_bucket, platform_env, s3_args};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, http_get, moto_url, stderr_of, stdout_of};

const UNAVAILABLE: &str = "the coordinator's database is unavailable";

/// Polls `/readyz` until it answers `status`; its body then.
fn readyz_until(coordinator: &CoordinatorProcess, status: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (answered, body) = http_get(&format!("{}/readyz", coordinator.metrics_url));
        if answered == status {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz still answers {answered} {body:?}:\n{}", coordinator.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lines of `stderr` that are not a save beginning again (the worker's own retry).
fn final_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|line| !line.ends_with(" again")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_save_and_restore_is_survived_without_a_coordinator_restart() {
    let Some(cluster) = tests::PrivateCluster::start() else { return };
    let Some(moto) = moto_url() else { return };
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let bucket = new_bucket(&moto).await;
    let database = cluster.url();
    let mut args = s3_args(&moto, &bucket);
    args.extend(["--state", &database]);
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start_with_env(data_dir.path(), &args, &platform_env());
    let token = coordinator.create_project("shop");
    let context = tests::build_seed_app(&build_host);
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    assert!(stdout_of(&saved).contains("saved"), "{}", stdout_of(&saved));
    let mut acknowledged = vec!["web"];

    // In flight when the server stops: a save big enough to be uploading, and a restore on a
    // fresh host.
    let big = tests::build_context("FROM base:1\nRUN head -c 33554432 /dev/urandom > /big\n");
    let built = build_host.classic_build(big.path(), "big:1", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    let Some(restore_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let saving = coordinator.spawn_cache_worker_on(&build_host, &token, &["save", "--service", "big", "big:1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while coordinator.log().matches("save begun").count() < 2 {
        assert!(Instant::now() < deadline, "the big save never began: {}", coordinator.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let restoring = coordinator.spawn_cache_worker_on(&restore_host, &token, &["restore", "--service", "web"]);
    // And one begun through the API, its blobs uploaded, to commit after the restart.
    let content = b"a layer uploaded across the database's restart".to_vec();
    let mut client = tests::worker_client(&coordinator.grpc_url, &token).await;
    let begun = client.begin_save(tests::begin_one_layer_save("api", "api:1", &content)).await.unwrap().into_inner();
    tests::upload_one_layer_blobs(begun.credentials.as_ref().unwrap(), &content).await;
    cluster.stop_immediately();

    // Down: not ready, in one line; every call fails at once, in one line naming the database.
    let body = readyz_until(&coordinator, 503, Duration::from_secs(20));
    assert_eq!(body.lines().count(), 1, "{body:?}");
    assert!(body.starts_with("not ready: ") && body.contains(UNAVAILABLE), "{body:?}");
    assert_eq!(coordinator.metric("layer_cache_state_up"), Some(0.0));
    let started = Instant::now();
    let listed = coordinator.cachectl(&["ls"]);
    eprintln!("a call while the database is down failed in {:?}", started.elapsed());
    assert!(!listed.status.success());
    assert_eq!(stderr_of(&listed).lines().count(), 1, "{}", stderr_of(&listed));
    assert!(stderr_of(&listed).contains(UNAVAILABLE), "{}", stderr_of(&listed));
    let again = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert_eq!(again.status.code(), Some(69), "a save while the database is down: {}", stdout_of(&again));
    assert_eq!(stderr_of(&again).lines().count(), 1, "{}", stderr_of(&again));
    assert!(stderr_of(&again).contains(UNAVAILABLE), "{}", stderr_of(&again));
    let restored = coordinator.cache_worker_on(&build_host, &token, &["restore", "--service", "web"]);
    assert!(restored.status.success(), "a restore degrades to a warning: {}", stderr_of(&restored));
    let warned = stderr_of(&restored);
    assert_eq!(warned.lines().count(), 1, "{warned}");
    assert!(warned.starts_with("cache-worker: warning: ") && warned.contains(UNAVAILABLE), "{warned}");
    assert!(started.elapsed() < Duration::from_secs(30), "calls failed slowly: {:?}", started.elapsed());

    // Back: the same coordinator process serves again by itself.
    cluster.start_again();
    let restarted = Instant::now();
    assert_eq!(readyz_until(&coordinator, 200, Duration::from_secs(30)), "ready\n");
    eprintln!("ready again {:?} after the server was", restarted.elapsed());
    assert_eq!(coordinator.metric("layer_cache_state_up"), Some(1.0));
    assert!(
        coordinator.metric("layer_cache_state_outages_total") >= Some(1.0),
        "{:?}",
        coordinator.metric("layer_cache_state_outages_total")
    );

    // The crash emptied the open saves: the commit of the one begun before is told to begin
    // again, never stored on the word of a record that is gone.
    let commit = pb::CommitSaveRequest {
        save_id: begun.save_id,
        images: vec![tests::one_layer_image("api:1", &content, true)],
        save_log: Vec::new(),
    };
    let refused = client.commit_save(commit).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("save again"), "{refused:?}");

    // The save in flight began again and was stored, or failed in one line.
    let saving = saving.wait_with_output().unwrap();
    let stderr = stderr_of(&saving);
    if saving.status.success() {
        assert!(stdout_of(&saving).contains("saved"), "{}", stdout_of(&saving));
        assert!(final_lines(&stderr).is_empty(), "{stderr}");
        acknowledged.push("big");
    } else {
        assert_eq!(final_lines(&stderr).len(), 1, "{stderr}");
    }
    eprintln!("the save in flight: {}\n{stderr}", saving.status);
    // The restore in flight finished before the server stopped, or warned once: exit 0 either way.
    let restoring = restoring.wait_with_output().unwrap();
    assert!(restoring.status.success(), "{}", stderr_of(&restoring));
    assert!(stderr_of(&restoring).lines().count() <= 1, "{}", stderr_of(&restoring));

    // A frozen server (its processes stopped, the kernel still acknowledging what is sent): a
    // call already waiting on it fails once a probe finds the server silent, in the same line,
    // rather than at its caller's deadline (cachectl's is 120 s); then it serves again.
    cluster.freeze();
    let frozen = Instant::now();
    let listed = coordinator.cachectl(&["ls"]);
    let waited = frozen.elapsed();
    cluster.thaw();
    eprintln!("a call waiting on a frozen server failed after {waited:?}");
    assert!(!listed.status.success() && stderr_of(&listed).contains(UNAVAILABLE), "{}", stderr_of(&listed));
    assert_eq!(stderr_of(&listed).lines().count(), 1, "{}", stderr_of(&listed));
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    assert_eq!(readyz_until(&coordinator, 200, Duration::from_secs(30)), "ready\n");

    // Saves work again, and every acknowledged one restores whole on a fresh host.
    let after = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "after", "app:latest"]);
    assert!(after.status.success(), "{}", stderr_of(&after));
    acknowledged.push("after");
    let Some(fresh_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    for service in &acknowledged {
        let restored = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", service, "--strict"]);
        assert!(restored.status.success(), "{service}: {}", stderr_of(&restored));
    }
    tests::assert_seed_rebuild_cached(&fresh_host, context.path());

    // Nothing half-committed: each manifest names only blobs the ledger holds, and the totals
    // are what the ledger and the manifests add up to.
    let state = coordinator::state::postgres::Postgres::connect(&database).await.unwrap();
    let manifests = state.manifests("shop").await.unwrap();
    let services: Vec<String> =
        manifests.iter().map(|manifest| manifest.key.clone().unwrap_or_default().service).collect();
    for service in &acknowledged {
        assert!(services.iter().any(|kept| kept == service), "{service} is lost: {services:?}");
    }
    for manifest in &manifests {
        let digests: Vec<String> = coordinator::state::manifest_digests(manifest).into_iter().collect();
        let stored = state.stored_blobs("shop", &digests).await.unwrap();
        let missing: Vec<&String> = digests.iter().filter(|digest| !stored.contains_key(*digest)).collect();
        assert!(missing.is_empty(), "{:?} names blobs the ledger lacks: {missing:?}", manifest.key);
    }
    let ledger: Vec<String> = state.ledger_digests("shop").await.unwrap().into_iter().collect();
    let records = state.stored_blobs("shop", &ledger).await.unwrap();
    let totals = state.totals("shop").await.unwrap();
    assert_eq!(totals.blobs, ledger.len() as u64);
    assert_eq!(totals.stored_bytes, records.values().map(|record| record.stored_size).sum::<u64>());
    assert_eq!(totals.manifests, manifests.len() as u64);
    coordinator.assert_no_secret_logged(&[&token]);
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_reconnect_after_a_postgres_restart_and_one_leads_again() {
    // Without a probe noticing the restart, the replica that led kept believing it did while
    // the other took the lock the crash released: both ran the collections.
    let Some(cluster) = tests::PrivateCluster::start() else { return };
    let Some(moto) = moto_url() else { return };
    let bucket = new_bucket(&moto).await;
    let database = cluster.url();
    let mut args = s3_args(&moto, &bucket);
    args.extend(["--state", &database]);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = CoordinatorProcess::start_with_env(dirs[0].path(), &args, &platform_env());
    let b = CoordinatorProcess::start_with_env(dirs[1].path(), &args, &platform_env());
    let token = a.create_project("web");
    let leads = || {
        [&a, &b]
            .iter()
            .map(|replica| replica.log().matches("this coordinator leads the background work").count())
            .sum::<usize>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while leads() < 1 {
        assert!(Instant::now() < deadline, "no replica took the lead:\n{}\n{}", a.log(), b.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    cluster.stop_immediately();
    for replica in [&a, &b] {
        readyz_until(replica, 503, Duration::from_secs(20));
    }
    cluster.start_again();
    for replica in [&a, &b] {
        assert_eq!(readyz_until(replica, 200, Duration::from_secs(30)), "ready\n");
    }
    // The crash released the lead's lock: the replica that led gave the lead up, and one
    // replica took it again; never both believe they lead.
    let deadline = Instant::now() + Duration::from_secs(15);
    while leads() < 2 {
        assert!(Instant::now() < deadline, "no replica took the lead again:\n{}\n{}", a.log(), b.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(leads(), 2, "one lead before the restart, one after:\n{}\n{}", a.log(), b.log());
    let believes_it_leads = |replica: &CoordinatorProcess| {
        let log = replica.log();
        let took = log.rfind("this coordinator leads the background work");
        let gave_up = log.rfind("the lead of the background work is taken again");
        took.is_some_and(|took| gave_up.is_none_or(|gave_up| took > gave_up))
    };
    let leaders = [&a, &b].into_iter().filter(|replica| believes_it_leads(replica)).count();
    assert_eq!(leaders, 1, "replicas that believe they lead:\n{}\n{}", a.log(), b.log());

    // A save through one replica is stored and found through the other.
    let content = b"a layer saved after the database's restart".to_vec();
    let (mut through_a, mut through_b) =
        (tests::worker_client(&a.grpc_url, &token).await, tests::worker_client(&b.grpc_url, &token).await);
    let begun = through_a.begin_save(tests::begin_one_layer_save("api", "api:1", &content)).await.unwrap().into_inner();
    tests::upload_one_layer_blobs(begun.credentials.as_ref().unwrap(), &content).await;
    let commit = pb::CommitSaveRequest {
        save_id: begun.save_id,
        images: vec![tests::one_layer_image("api:1", &content, true)],
        save_log: Vec::new(),
    };
    assert!(through_a.commit_save(commit).await.unwrap().into_inner().stored);
    let key = pb::CacheKey { service: "api".into(), branch: String::new() };
    let found = through_b.lookup(pb::LookupRequest { key: Some(key), ..Default::default() }).await.unwrap();
    assert!(found.into_inner().manifest.is_some(), "B finds what A stored");
    a.stop();
    b.stop();
}
