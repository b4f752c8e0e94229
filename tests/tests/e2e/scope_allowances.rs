//! Trust by scope inside one project: what a less trusted token (a fork's pull requests, `pr-*`,
//! or one that may only read `main`) can spend or hold never denies the project token's saves
//! of the default branch: single-flight claims, open saves, checks of reported bad blobs. And a
//! storage key renews only for the token it was issued to, so revoking or rotating that token
//! revokes it. Driven through the gRPC API and aws-sdk-s3 against an in-process coordinator
//! whose clock stands still, so nothing lapses while the test runs.

use proto::v1 as pb;
use tests::{
    DockerEngine, EngineKind, begin_one_layer_save, one_layer_image, s3_client_for, sha256_digest, stderr_of,
    stdout_of, upload_one_layer_blobs, worker_client,
};

use super::in_process::InProcessCoordinator;

/// [`begin_one_layer_save`] on `branch`.
fn begin_on(branch: &str, service: &str, content: &[u8]) -> pb::BeginSaveRequest {
    let mut request = begin_one_layer_save(service, "app:1", content);
    request.key.as_mut().expect("a key").branch = branch.into();
    request
}

/// Uploads and commits a begun save of [`one_layer_image`] of `content`.
async fn upload_and_commit(
    grpc_url: &str,
    token: &str,
    begun: &pb::BeginSaveResponse,
    content: &[u8],
) -> pb::CommitSaveResponse {
    upload_one_layer_blobs(begun.credentials.as_ref().expect("write credentials"), content).await;
    let commit = pb::CommitSaveRequest {
        save_id: begun.save_id.clone(),
        images: vec![one_layer_image("app:1", content, true)],
        save_log: vec!["saved app:1".into()],
    };
    worker_client(grpc_url, token).await.commit_save(commit).await.expect("CommitSave").into_inner()
}

/// A project `web` with its project token (which saves `main`), a token for `pr-*` that may
/// read `main`, and one that may only read `main`.
struct Project {
    coordinator: InProcessCoordinator,
    _data_dir: tempfile::TempDir,
    main_token: String,
    pr_token: String,
    reader_token: String,
}

impl Project {
    fn start() -> Project {
        let data_dir = tempfile::tempdir().unwrap();
        let coordinator = InProcessCoordinator::start(data_dir.path(), &[]);
        let main_token = coordinator.create_project("web");
        let pr_args = tests::scoped_token_args("web", "pr-*", "main");
        let pr_token = tests::printed_token(&coordinator.cachectl(&pr_args));
        let reader_token =
            tests::printed_token(&coordinator.cachectl(&["token", "create", "web", "--read-branch", "main"]));
        Project { coordinator, _data_dir: data_dir, main_token, pr_token, reader_token }
    }
}

#[test]
fn a_pull_request_claim_never_holds_up_the_default_branch() {
    let project = Project::start();
    let url = project.coordinator.grpc_url.clone();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut pr = worker_client(&url, &project.pr_token).await;
        let mut main = worker_client(&url, &project.main_token).await;
        // The pull request begins a save naming main's next layer, keeps it alive and never
        // uploads. Main's save uploads the layer itself and commits at once.
        let next_layer = b"main's next layer".to_vec();
        let held = pr.begin_save(begin_on("pr-1", "app", &next_layer)).await.unwrap().into_inner();
        assert_eq!(held.missing_digests.len(), 2, "{held:?}");
        pr.keep_save_alive(pb::KeepSaveAliveRequest { save_id: held.save_id.clone() }).await.unwrap();
        let begun = main.begin_save(begin_on("main", "app", &next_layer)).await.unwrap().into_inner();
        assert!(begun.in_flight_digests.is_empty(), "main waits for the pull request: {:?}", begun.in_flight_digests);
        assert_eq!(begun.missing_digests.len(), 2, "main uploads the blobs itself: {begun:?}");
        let committed = upload_and_commit(&url, &project.main_token, &begun, &next_layer).await;
        assert!(committed.stored && committed.waiting_for_digests.is_empty(), "{committed:?}");
    });
    project.coordinator.stop();
}

#[test]
fn a_pull_request_token_holding_its_most_saves_leaves_the_default_branch_saving() {
    let project = Project::start();
    let url = project.coordinator.grpc_url.clone();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut pr = worker_client(&url, &project.pr_token).await;
        let mut main = worker_client(&url, &project.main_token).await;
        for i in 1..=64 {
            pr.begin_save(begin_on(&format!("pr-{i}"), &format!("svc{i}"), format!("pr {i}").as_bytes()))
                .await
                .unwrap_or_else(|status| panic!("the pull request's save {i}: {status:?}"));
        }
        let refused = pr.begin_save(begin_on("pr-65", "svc65", b"one more")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
        assert!(refused.message().contains("has 64 saves in progress"), "{}", refused.message());
        let layer = b"main's layer".to_vec();
        let begun = main.begin_save(begin_on("main", "api", &layer)).await.expect("main's save begins").into_inner();
        assert!(upload_and_commit(&url, &project.main_token, &begun, &layer).await.stored);
    });
    project.coordinator.stop();
}

#[test]
fn a_read_only_token_spending_its_bad_blob_checks_leaves_the_project_tokens() {
    let project = Project::start();
    let url = project.coordinator.grpc_url.clone();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut main = worker_client(&url, &project.main_token).await;
        let (intact_layer, lost_layer) = (b"an intact layer".to_vec(), b"a layer the store loses".to_vec());
        for (service, layer) in [("app", &intact_layer), ("api", &lost_layer)] {
            let begun = main.begin_save(begin_on("main", service, layer)).await.unwrap().into_inner();
            assert!(upload_and_commit(&url, &project.main_token, &begun, layer).await.stored);
        }
        // A token that may only read main spends its checks on an intact blob.
        let mut reader = worker_client(&url, &project.reader_token).await;
        let intact = sha256_digest(&intact_layer);
        for _ in 0..10 {
            let answer = reader.report_bad_blob(pb::ReportBadBlobRequest { digest: intact.clone() }).await.unwrap();
            assert!(!answer.into_inner().dropped, "an intact blob is kept");
        }
        let spent = reader.report_bad_blob(pb::ReportBadBlobRequest { digest: intact.clone() }).await.unwrap_err();
        assert_eq!(spent.code(), tonic::Code::ResourceExhausted, "{spent:?}");
        // The project token's report of a blob the store really lost is still checked, and the
        // blob dropped with the cache naming it.
        let lost = sha256_digest(&lost_layer);
        let path = project
            .coordinator
            .data_dir
            .join("objects/layer-cache")
            .join(proto::object_keys::blob_key(&proto::object_keys::project_prefix("cache", "web"), &lost));
        std::fs::remove_file(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let answer = main.report_bad_blob(pb::ReportBadBlobRequest { digest: lost }).await;
        let answer = answer.expect("main's report is checked").into_inner();
        assert!(answer.dropped && answer.caches_removed == 1, "{answer:?}");
    });
    project.coordinator.stop();
}

#[test]
fn a_storage_key_renews_only_for_its_token_and_goes_with_it() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = InProcessCoordinator::start(data_dir.path(), &[]);
    let main_token = coordinator.create_project("web");
    let pr_token = tests::printed_token(&coordinator.cachectl(&tests::scoped_token_args("web", "pr-*", "main")));
    let url = coordinator.grpc_url.clone();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let credentials = |token: &str, renew: &str| {
        let (url, token, renew) = (url.clone(), token.to_owned(), renew.to_owned());
        async move {
            let request = pb::GetCredentialsRequest { access: pb::Access::Write as i32, renew_access_key_id: renew };
            let answer = worker_client(&url, &token).await.get_credentials(request).await?;
            Ok::<_, tonic::Status>(answer.into_inner().credentials.expect("credentials"))
        }
    };
    let write_with = |key: &pb::Credentials| {
        let key = key.clone();
        async move {
            let blob = b"a blob".to_vec();
            s3_client_for(&key)
                .put_object()
                .bucket(&key.bucket)
                .key(tests::blob_key(&key, &blob))
                .body(aws_sdk_s3::primitives::ByteStream::from(blob))
                .send()
                .await
        }
    };
    let main_key = runtime.block_on(credentials(&main_token, "")).unwrap();
    let pr_key = runtime.block_on(credentials(&pr_token, "")).unwrap();
    // Each token renews its own key.
    let renewed = runtime.block_on(credentials(&pr_token, &pr_key.access_key_id)).unwrap();
    assert_eq!(renewed.access_key_id, pr_key.access_key_id);
    let renewed = runtime.block_on(credentials(&main_token, &main_key.access_key_id)).unwrap();
    assert_eq!(renewed.access_key_id, main_key.access_key_id);
    assert!(runtime.block_on(write_with(&main_key)).is_ok());

    // The pull request's token names the project token's key to renew: it must neither get the
    // key's secret nor take the key over, so rotating the project token still revokes it.
    let taken_over = runtime.block_on(credentials(&pr_token, &main_key.access_key_id));
    tests::printed_token(&coordinator.cachectl(&["project", "rotate-token", "web"]));
    assert!(runtime.block_on(write_with(&main_key)).is_err(), "the project token's key outlived its rotation");
    let refused = taken_over.expect_err("a scoped token renewed the project token's key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("issued to another token"), "{}", refused.message());

    // A rotation leaves scoped tokens' keys; revoking the scoped token revokes its key.
    assert!(runtime.block_on(write_with(&pr_key)).is_ok(), "a rotation leaves scoped tokens' keys");
    let listed = stdout_of(&coordinator.cachectl(&["token", "ls", "web"]));
    let pr_id = listed.split_whitespace().find(|word| word.starts_with("tok_")).expect("the token's ID").to_owned();
    let revoked = coordinator.cachectl(&["token", "revoke", "web", &pr_id]);
    assert!(revoked.status.success(), "{}", stderr_of(&revoked));
    assert!(runtime.block_on(write_with(&pr_key)).is_err(), "the scoped token's key outlived its revocation");
    coordinator.stop();
}

#[test]
fn a_pull_request_save_never_evicts_the_default_branch_to_fit_the_quota() {
    let project = Project::start();
    let set = project.coordinator.cachectl(&["project", "set-quota", "web", "1MiB"]);
    assert!(set.status.success(), "{}", stderr_of(&set));
    let url = project.coordinator.grpc_url.clone();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut main = worker_client(&url, &project.main_token).await;
        let mut pr = worker_client(&url, &project.pr_token).await;
        let main_layer = vec![1u8; 600 * 1024];
        let begun = main.begin_save(begin_on("main", "app", &main_layer)).await.unwrap().into_inner();
        assert!(upload_and_commit(&url, &project.main_token, &begun, &main_layer).await.stored);

        // The pull request's cache fits the quota alone, not beside main's: it is not saved,
        // and main's cache stays.
        let pr_layer = vec![2u8; 600 * 1024];
        let begun = pr.begin_save(begin_on("pr-1", "app", &pr_layer)).await.unwrap().into_inner();
        upload_one_layer_blobs(begun.credentials.as_ref().expect("write credentials"), &pr_layer).await;
        let commit = pb::CommitSaveRequest {
            save_id: begun.save_id.clone(),
            images: vec![one_layer_image("app:1", &pr_layer, true)],
            save_log: Vec::new(),
        };
        let refused = pr.commit_save(commit).await.expect_err("the pull request's save evicted main's cache");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
        assert!(refused.message().contains("beside the caches token tok_"), "{}", refused.message());
        let key = |branch: &str| Some(pb::CacheKey { service: "app".into(), branch: branch.into() });
        let lookup = |branch: &str| pb::LookupRequest { key: key(branch), ..Default::default() };
        assert!(main.lookup(lookup("main")).await.unwrap().into_inner().found, "main's cache was evicted");
        assert!(!pr.lookup(lookup("pr-1")).await.unwrap().into_inner().found);

        // The project token's next save of main (begun after the last) makes room by evicting
        // what it must.
        project.coordinator.advance(std::time::Duration::from_secs(1));
        let small = b"a small layer".to_vec();
        let begun = pr.begin_save(begin_on("pr-2", "app", &small)).await.unwrap().into_inner();
        assert!(upload_and_commit(&url, &project.pr_token, &begun, &small).await.stored, "a cache that fits is saved");
        let bigger = vec![3u8; 900 * 1024];
        let begun = main.begin_save(begin_on("main", "app", &bigger)).await.unwrap().into_inner();
        assert!(upload_and_commit(&url, &project.main_token, &begun, &bigger).await.stored);
        assert!(main.lookup(lookup("main")).await.unwrap().into_inner().found);
    });
    project.coordinator.stop();
}

#[test]
fn a_pull_request_token_reporting_many_new_services_leaves_the_project_tokens_reports() {
    let project = Project::start();
    let url = project.coordinator.grpc_url.clone();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let miss = |service: String| pb::ReportMetricsRequest {
            service,
            operation: pb::Operation::Restore as i32,
            restore_outcome: pb::RestoreOutcome::Miss as i32,
            total_seconds: 0.1,
            ..Default::default()
        };
        let mut pr = worker_client(&url, &project.pr_token).await;
        let mut accepted = 0;
        for i in 0..64 {
            if pr.report_metrics(miss(format!("junk{i}"))).await.is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 32, "a scoped token adds half the project's services without a cache");
        let mut main = worker_client(&url, &project.main_token).await;
        main.report_metrics(miss("app".into())).await.expect("the project token's first report of a new service");
    });
    project.coordinator.stop();
}

/// Runs cache-worker against `coordinator` and `engine`, failing the test if it has not ended
/// after `limit` (a save waiting for ever is the failure looked for, not a slow machine).
fn cache_worker_within(
    coordinator: &InProcessCoordinator,
    engine: &DockerEngine,
    token: &str,
    args: &[&str],
    limit: std::time::Duration,
) -> std::process::Output {
    let mut child = std::process::Command::new(tests::binary("cache-worker"))
        .arg("--coordinator")
        .arg(&coordinator.grpc_url)
        .args(args)
        .env("CACHE_TOKEN", token)
        .env("DOCKER_HOST", &engine.host)
        .env("CACHE_BUILD_CACHE_DIR", engine.build_cache_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cache-worker");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("cache-worker's status").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("cache-worker's output");
            panic!("cache-worker {args:?} had not ended after {limit:?}: {}", stderr_of(&output));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.wait_with_output().expect("cache-worker's output")
}

#[test]
fn main_saves_and_restores_on_a_real_engine_while_a_pull_request_holds_its_layers() {
    let Some(ci_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let project = Project::start();
    let context = tests::build_seed_app(&ci_host);
    let layers = tests::layer_digests(&ci_host, "app:latest");
    let image_id = stdout_of(&ci_host.docker(&["image", "inspect", "--format", "{{.Id}}", "app:latest"]));
    // The pull request begins a save naming main's image and every layer, and never uploads:
    // it claims them all (the coordinator's clock stands still, so the claims never lapse).
    let url = project.coordinator.grpc_url.clone();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let image = pb::Image {
            id: image_id.trim().to_owned(),
            repo_tags: vec!["app:pr".into()],
            layers: layers.iter().map(|digest| pb::Layer { digest: digest.clone(), ..Default::default() }).collect(),
            ..Default::default()
        };
        let request = pb::BeginSaveRequest {
            key: Some(pb::CacheKey { service: "app".into(), branch: "pr-1".into() }),
            images: vec![image],
            engine_version: "test".into(),
            host: "pr-host".into(),
        };
        let held = worker_client(&url, &project.pr_token).await.begin_save(request).await.unwrap().into_inner();
        assert_eq!(held.missing_digests.len(), layers.len() + 1, "{held:?}");
    });

    // Main's save neither waits for those claims nor fails; its strict restore on a fresh host
    // brings back a cache every step of the rebuild reuses.
    let save = ["save", "--service", "app", "--branch", "main", "app:latest"];
    let limit = std::time::Duration::from_secs(180);
    let saved = cache_worker_within(&project.coordinator, &ci_host, &project.main_token, &save, limit);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let Some(fresh_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let restore = ["restore", "--service", "app", "--branch", "main", "--strict"];
    let restored = cache_worker_within(&project.coordinator, &fresh_host, &project.main_token, &restore, limit);
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    tests::assert_seed_rebuild_cached(&fresh_host, context.path());
    project.coordinator.stop();
}
