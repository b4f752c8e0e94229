//! Coordinator replicas sharing one PostgreSQL database (`--state postgres://…`) and one
//! bucket (moto's S3 and STS): a project created through one is the other's; a save through one
//! restores through the other on a fresh engine, fully cached; two saves of one new blob
//! through the two upload it once, under one transfer budget; a flush through one fences a
//! save begun through the other, and a token revoked through one is refused at once through the
//! other; the embedded store with PostgreSQL is refused in one line.

use proto::v1 as pb;
use tests::moto::{new_bucket, platform_env, s3_args};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, moto_url, stderr_of, stdout_of};

/// Two replicas on one database and one bucket, started with `extra` arguments.
fn replicas(
    moto: &str,
    bucket: &str,
    database: &str,
    extra: &[&str],
) -> (CoordinatorProcess, CoordinatorProcess, [tempfile::TempDir; 2]) {
    let mut args = s3_args(moto, bucket);
    args.extend(["--state", database]);
    args.extend(extra);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = CoordinatorProcess::start_with_env(dirs[0].path(), &args, &platform_env());
    let b = CoordinatorProcess::start_with_env(dirs[1].path(), &args, &platform_env());
    (a, b, dirs)
}

/// Two replicas on a new database and bucket, and a build host; `None` when moto, PostgreSQL
/// or the engine is missing (outside CI).
async fn replicas_and_a_build_host()
-> Option<(CoordinatorProcess, CoordinatorProcess, [tempfile::TempDir; 2], DockerEngine)> {
    let moto = moto_url()?;
    let database = tests::postgres_database().await?;
    let build_host = DockerEngine::start(EngineKind::Engine20)?;
    let bucket = new_bucket(&moto).await;
    let (a, b, dirs) = replicas(&moto, &bucket, &database, &[]);
    Some((a, b, dirs, build_host))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_saves_of_one_new_blob_through_two_replicas_upload_it_once_under_one_budget() {
    let Some(moto) = moto_url() else { return };
    let Some(database) = tests::postgres_database().await else { return };
    let bucket = new_bucket(&moto).await;
    // A budget of one worker's cap: two saves share it wherever they began.
    let (a, b, _dirs) = replicas(&moto, &bucket, &database, &["--transfer-budget", "8"]);
    let token = a.create_project("web");
    let (mut through_a, mut through_b) =
        (tests::worker_client(&a.grpc_url, &token).await, tests::worker_client(&b.grpc_url, &token).await);
    let content = vec![42u8; 3 << 20];
    let expected = {
        let mut digests = vec![tests::sha256_digest(&content), tests::one_layer_image("app:1", &content, false).id];
        digests.sort();
        digests
    };
    let sorted = |mut digests: Vec<String>| {
        digests.sort();
        digests
    };

    let first = through_a.begin_save(tests::begin_one_layer_save("one", "app:1", &content)).await.unwrap().into_inner();
    assert_eq!(sorted(first.missing_digests.clone()), expected);
    assert_eq!(first.plan.as_ref().unwrap().max_concurrency, 8, "alone, the save holds the whole budget");
    let second =
        through_b.begin_save(tests::begin_one_layer_save("two", "app:1", &content)).await.unwrap().into_inner();
    assert!(second.missing_digests.is_empty(), "B's save uploads nothing: {:?}", second.missing_digests);
    assert_eq!(sorted(second.in_flight_digests.clone()), expected, "B knows A's save is uploading them");
    assert_eq!(second.plan.as_ref().unwrap().max_concurrency, 4, "B's save gets half the one budget");
    let renewed = through_a
        .keep_save_alive(pb::KeepSaveAliveRequest { save_id: first.save_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.plan.unwrap().max_concurrency, 4, "A's save learns that B's took half");
    for replica in [&a, &b] {
        assert_eq!(replica.metric("layer_cache_transfer_requests_granted"), Some(8.0), "one budget, seen by both");
    }

    // B's commit waits for the blobs A's save is uploading, then says it still waits.
    let second_commit = pb::CommitSaveRequest {
        save_id: second.save_id,
        images: vec![tests::one_layer_image("app:1", &content, true)],
        save_log: Vec::new(),
    };
    let waiting = through_b.commit_save(second_commit.clone()).await.unwrap().into_inner();
    assert_eq!(waiting.waiting_for_digests, expected, "{waiting:?}");
    assert!(!waiting.stored);
    tests::upload_one_layer_blobs(first.credentials.as_ref().unwrap(), &content).await;
    let first_commit = pb::CommitSaveRequest {
        save_id: first.save_id,
        images: vec![tests::one_layer_image("app:1", &content, true)],
        save_log: Vec::new(),
    };
    assert!(through_a.commit_save(first_commit).await.unwrap().into_inner().stored);
    let committed = through_b.commit_save(second_commit).await.unwrap().into_inner();
    assert!(committed.stored && committed.waiting_for_digests.is_empty(), "{committed:?}");
    for replica in [&a, &b] {
        assert_eq!(replica.metric("layer_cache_transfer_requests_granted"), Some(0.0), "both leases went back");
    }
    let listed = stdout_of(&b.cachectl(&["ls", "web"]));
    assert!(listed.lines().any(|line| line.starts_with("one ")), "{listed}");
    assert!(listed.lines().any(|line| line.starts_with("two ")), "{listed}");
    // One of them leads the collections and sweeps, not both.
    let leads = |replica: &CoordinatorProcess| replica.log().contains("leads the background work");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !leads(&a) && !leads(&b) {
        assert!(std::time::Instant::now() < deadline, "no replica took the lead: {}", a.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(!(leads(&a) && leads(&b)), "both replicas lead: {}\n{}", a.log(), b.log());
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_through_one_replica_restores_through_another_fully_cached() {
    let Some((a, b, _dirs, build_host)) = replicas_and_a_build_host().await else { return };
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
    // The flush forgot the project's open saves on every replica (they are shared), as one
    // coordinator's flush does: the commit finds its save unknown, and its worker begins again.
    let refused = through_a.commit_save(commit).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("save again"), "{refused:?}");
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

/// `cache-worker` on `engine` given several coordinator URLs, tried in order.
fn worker_through(urls: &[&str], engine: &DockerEngine, token: &str, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(tests::binary("cache-worker"));
    command
        .arg("--coordinator")
        .arg(urls.join(","))
        .args(args)
        .env("CACHE_TOKEN", token)
        .env("DOCKER_HOST", &engine.host)
        .env("CACHE_BUILD_CACHE_DIR", engine.build_cache_dir());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_save_costs_that_save_one_retry_through_the_next() {
    let Some((a, b, _dirs, build_host)) = replicas_and_a_build_host().await else { return };
    let token = a.create_project("shop");
    let context = tests::build_seed_app(&build_host);
    let urls = [a.grpc_url.as_str(), b.grpc_url.as_str()];
    let saved =
        worker_through(&urls, &build_host, &token, &["save", "--service", "web", "app:latest"]).output().unwrap();
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    assert!(stderr_of(&saved).is_empty(), "A answered: no warning: {}", stderr_of(&saved));

    // A save big enough to be uploading when A is killed.
    let big = tests::build_context("FROM base:1\nRUN head -c 67108864 /dev/urandom > /big\n");
    let built = build_host.classic_build(big.path(), "big:1", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    let saving = worker_through(&urls, &build_host, &token, &["save", "--service", "big", "big:1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // The web save began once through A; the big one is the second.
    while a.log().matches("save begun").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "the big save never began through A: {}", a.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    a.signal("KILL");
    let output = saving.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let warned = stderr_of(&output);
    assert!(warned.contains(&format!("coordinator {} did not answer", a.grpc_url)), "{warned}");
    assert!(warned.contains(&format!("trying {}", b.grpc_url)), "{warned}");

    // Both caches restore through B on a fresh host, whole: nothing was half-committed.
    let Some(fresh_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    for service in ["web", "big"] {
        let restored = worker_through(&urls, &fresh_host, &token, &["restore", "--service", service, "--strict"])
            .output()
            .unwrap();
        assert!(restored.status.success(), "{service}: {}", stderr_of(&restored));
        assert!(stderr_of(&restored).contains("did not answer"), "A is gone: B served it: {}", stderr_of(&restored));
    }
    tests::assert_seed_rebuild_cached(&fresh_host, context.path());
    let rebuilt = fresh_host.classic_build(big.path(), "big:1", &[]);
    assert_eq!(stdout_of(&rebuilt).matches("Using cache").count(), 1, "{}", stdout_of(&rebuilt));
    b.stop();
}

/// The code a lookup of service "web" on `branch` through `grpc_url` with `token` answers.
async fn lookup_code(grpc_url: &str, token: &str, branch: &str) -> tonic::Code {
    let key = pb::CacheKey { service: "web".into(), branch: branch.into() };
    let mut client = tests::worker_client(grpc_url, token).await;
    match client.lookup(pb::LookupRequest { key: Some(key), fallbacks: Vec::new() }).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// A replica reuses its check of a worker's token for a few seconds; a revocation, rotation or
/// flush through another replica still takes effect at once for begins, commits and lookups,
/// which check the token, and read the project, inside their own step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_or_a_project_flushed_through_one_replica_counts_at_once_through_the_other() {
    let Some(moto) = moto_url() else { return };
    let Some(database) = tests::postgres_database().await else { return };
    let (a, b, _dirs) = replicas(&moto, &new_bucket(&moto).await, &database, &[]);
    let token = a.create_project("shop");
    let pr = tests::printed_token(&a.cachectl(&["token", "create", "shop", "--write-branch", "pr-*"]));
    let content = b"a layer of the default branch".to_vec();
    let saved = tests::save_one_layer_image(&b.grpc_url, &token, "web", "web:1", &content).await;
    assert!(saved.waiting_for_digests.is_empty());

    // The pull request's token, checked through B (and its check kept there), revoked through A.
    let mut pr_through_b = tests::worker_client(&b.grpc_url, &pr).await;
    assert_eq!(lookup_code(&b.grpc_url, &pr, "pr-1").await, tonic::Code::Ok);
    let listed = stdout_of(&a.cachectl(&["token", "ls", "shop"]));
    let token_id = listed.lines().nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let revoked = a.cachectl(&["token", "revoke", "shop", &token_id]);
    assert!(revoked.status.success(), "{}", stderr_of(&revoked));
    assert_eq!(lookup_code(&b.grpc_url, &pr, "pr-1").await, tonic::Code::Unauthenticated, "a lookup");
    let mut begin = tests::begin_one_layer_save("web", "web:2", b"a pull request's layer");
    begin.key.as_mut().unwrap().branch = "pr-1".into();
    let refused = pr_through_b.begin_save(begin).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "a begin: {refused:?}");
    assert!(refused.message().contains("unknown or revoked project token"), "{refused:?}");

    // A flush through A: B's next save, with the token check it keeps, begins after the flush
    // and commits, and its cache is the one found.
    let mut through_b = tests::worker_client(&b.grpc_url, &token).await;
    assert_eq!(lookup_code(&b.grpc_url, &token, "").await, tonic::Code::Ok);
    let flushed = a.cachectl(&["flush", "shop"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));
    let again = b"a layer saved right after the flush".to_vec();
    let saved = tests::save_one_layer_image(&b.grpc_url, &token, "web", "web:3", &again).await;
    assert!(saved.waiting_for_digests.is_empty());
    let key = pb::CacheKey { service: "web".into(), branch: String::new() };
    let found = through_b.lookup(pb::LookupRequest { key: Some(key), fallbacks: Vec::new() }).await.unwrap();
    let found = found.into_inner().manifest.unwrap();
    assert_eq!(found.images[0].repo_tags, ["web:3"], "the save after the flush is the cache");

    // A save begun through B, the project token rotated through A: its commit is refused.
    let begun = through_b.begin_save(tests::begin_one_layer_save("api", "api:1", &again)).await.unwrap().into_inner();
    let rotated = tests::printed_token(&a.cachectl(&["project", "rotate-token", "shop"]));
    let commit = pb::CommitSaveRequest {
        save_id: begun.save_id,
        images: vec![tests::one_layer_image("api:1", &again, true)],
        save_log: Vec::new(),
    };
    let refused = through_b.commit_save(commit).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "a commit: {refused:?}");
    assert_eq!(lookup_code(&b.grpc_url, &token, "").await, tonic::Code::Unauthenticated, "the old token");
    assert_eq!(lookup_code(&b.grpc_url, &rotated, "").await, tonic::Code::Ok, "the new token");
    assert!(stdout_of(&a.cachectl(&["ls", "shop"])).lines().all(|line| !line.starts_with("api ")), "nothing committed");
    a.assert_no_secret_logged(&[&token, &pr, &rotated]);
    b.assert_no_secret_logged(&[&token, &pr, &rotated]);
    a.stop();
    b.stop();
}
