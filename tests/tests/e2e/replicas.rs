//! Coordinator replicas sharing one PostgreSQL database (`--state postgres://…`) and one
//! bucket (moto's S3 and STS): a project created through one is the other's; a save through one
//! restores through the other on a fresh engine, fully cached; a flush through one fences a
//! save begun through the other; the embedded store with PostgreSQL is refused in one line.

use proto::v1 as pb;
use tests::moto::{new_bucket, platform_env, s3_args};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, moto_url, stderr_of, stdout_of};

/// Two replicas on one database and one bucket.
fn replicas(
    moto: &str,
    bucket: &str,
    database: &str,
) -> (CoordinatorProcess, CoordinatorProcess, [tempfile::TempDir; 2]) {
    let mut args = s3_args(moto, bucket);
    args.extend(["--state", database]);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = CoordinatorProcess::start_with_env(dirs[0].path(), &args, &platform_env());
    let b = CoordinatorProcess::start_with_env(dirs[1].path(), &args, &platform_env());
    (a, b, dirs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_through_one_replica_restores_through_another_fully_cached() {
    let Some(moto) = moto_url() else { return };
    let Some(database) = tests::postgres_database().await else { return };
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let bucket = new_bucket(&moto).await;
    let (a, b, _dirs) = replicas(&moto, &bucket, &database);
    let token = a.create_project("shop");
    let listed = stdout_of(&b.cachectl(&["ls"]));
    assert!(listed.lines().any(|line| line.starts_with("shop ")), "B knows the project A created: {listed}");

    let context = tests::build_seed_app(&build_host);
    let saved = a.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert!(saved.status.success(), "save through A: {}", stderr_of(&saved));
    let Some(fresh_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let restored = b.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web", "--strict"]);
    assert!(restored.status.success(), "restore through B: {}", stderr_of(&restored));
    tests::assert_seed_rebuild_cached(&fresh_host, context.path());
    // The same save again, through B: every blob is found, nothing moves.
    let again = b.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert!(again.status.success(), "{}", stderr_of(&again));
    assert!(stdout_of(&again).contains("unchanged"), "{}", stdout_of(&again));
    let shown = stdout_of(&a.cachectl(&["ls", "shop"]));
    assert!(shown.lines().any(|line| line.starts_with("web ")), "{shown}");

    // A flush through B fences a save begun through A.
    let content = b"a layer saved across a flush".to_vec();
    let mut through_a = tests::worker_client(&a.grpc_url, &token).await;
    let begun = through_a.begin_save(tests::begin_one_layer_save("api", "api:1", &content)).await.unwrap().into_inner();
    tests::upload_one_layer_blobs(begun.credentials.as_ref().unwrap(), &content).await;
    let flushed = b.cachectl(&["flush", "shop"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));
    let commit = pb::CommitSaveRequest {
        save_id: begun.save_id,
        images: vec![tests::one_layer_image("api:1", &content, true)],
        save_log: Vec::new(),
    };
    let refused = through_a.commit_save(commit).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("was flushed while the save ran"), "{refused:?}");
    let listed = stdout_of(&a.cachectl(&["ls", "shop"]));
    assert_eq!(listed.lines().count(), 2, "no cache after the flush: {listed}");
    a.assert_no_secret_logged(&[&token]);
    b.assert_no_secret_logged(&[&token]);
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_state_with_the_embedded_store_is_refused_in_one_line() {
    tests::assert_coordinator_refuses(
        &["--s3-listen", "127.0.0.1:0", "--state", "postgres://cache:s3cret@127.0.0.1:1/cache"],
        &[],
        "--state postgres://… needs --store s3: the embedded S3 endpoint keeps its objects on this machine's disk",
    );
    let Some(moto) = moto_url() else { return };
    let bucket = new_bucket(&moto).await;
    let (_closed, port) = tests::closed_port();
    let mut args = s3_args(&moto, &bucket);
    let unreachable = format!("postgres://cache:s3cret@{port}/cache");
    args.extend(["--state", &unreachable]);
    tests::assert_coordinator_refuses(&args, &platform_env(), "--state: database error: PostgreSQL:");
}
