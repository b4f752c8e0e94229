//! The coordinator on an S3 store with STS credentials, against moto's server (S3 and STS):
//! the seed scenario end to end, session credentials that are not the platform's keys, objects
//! under `PREFIX/PROJECT/`, and bad configuration refused at start-up.

use tests::moto::{PLATFORM_KEY_ID, PLATFORM_SECRET, new_bucket, platform_env, s3_args};
use tests::{
    CoordinatorProcess, DockerEngine, EngineKind, moto_url, parse_exports, platform_s3_client, stderr_of, stdout_of,
};

/// A coordinator on a bucket of its own in moto, with project `shop`, and a build host; `None`
/// when moto or the engine is missing (outside CI).
struct OnMoto {
    moto: String,
    bucket: String,
    data_dir: tempfile::TempDir,
    coordinator: CoordinatorProcess,
    build_host: DockerEngine,
    token: String,
}

async fn on_moto() -> Option<OnMoto> {
    let moto = moto_url()?;
    let build_host = DockerEngine::start(EngineKind::Engine20)?;
    let bucket = new_bucket(&moto).await;
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start_with_env(data_dir.path(), &s3_args(&moto, &bucket), &platform_env());
    let token = coordinator.create_project("shop");
    Some(OnMoto { moto, bucket, data_dir, coordinator, build_host, token })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_scenario_runs_on_an_s3_store_with_sts_credentials() {
    let Some(OnMoto { moto, bucket, data_dir: _data_dir, coordinator, build_host, token }) = on_moto().await else {
        return;
    };

    // The worker gets session credentials with a token, never the platform's keys.
    let printed = coordinator.cache_worker(&token, &["credentials", "--format", "env"]);
    assert!(printed.status.success(), "{}", stderr_of(&printed));
    let exports = parse_exports(&stdout_of(&printed));
    let value = |name: &str| exports.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default();
    assert_ne!(value("AWS_ACCESS_KEY_ID"), PLATFORM_KEY_ID);
    assert_ne!(value("AWS_SECRET_ACCESS_KEY"), PLATFORM_SECRET);
    assert!(!value("AWS_ACCESS_KEY_ID").is_empty());
    assert!(!value("AWS_SESSION_TOKEN").is_empty(), "session credentials carry a token");
    assert_eq!(value("AWS_ENDPOINT_URL"), moto);
    assert_eq!((value("CACHE_S3_BUCKET"), value("CACHE_S3_PREFIX")), (bucket.clone(), "ci/shop/".to_owned()));
    assert!(!stdout_of(&printed).contains(PLATFORM_SECRET));

    // The seed scenario: build, save, a fresh host restores, the rebuild is fully cached.
    let context = tests::build_seed_app(&build_host);
    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let restored = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web", "--strict"]);
    assert!(restored.status.success(), "restore: {}", stderr_of(&restored));
    let rebuilt = fresh_host.classic_build(context.path(), "app:latest", &[]);
    assert!(rebuilt.status.success(), "{}", stderr_of(&rebuilt));
    assert_eq!(stdout_of(&rebuilt).matches("Using cache").count(), 5, "{}", stdout_of(&rebuilt));

    // Every object sits under PREFIX/PROJECT/ in the bucket.
    let client = platform_s3_client(&moto, PLATFORM_KEY_ID, PLATFORM_SECRET);
    let listed = client.list_objects_v2().bucket(&bucket).send().await.unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|object| object.key()).collect();
    assert_eq!(keys.len(), 11, "6 configs and 5 layers: {keys:?}");
    assert!(keys.iter().all(|key| key.starts_with("ci/shop/blobs/sha256/")), "{keys:?}");

    // A flush deletes them with the coordinator's own credentials.
    let flushed = coordinator.cachectl(&["flush", "shop"]);
    assert_eq!(
        stdout_of(&flushed),
        format!("flushed project shop: 1 manifests and 11 objects ({}) removed\n", {
            let total: i64 = listed.contents().iter().filter_map(|object| object.size()).sum();
            proto::format::format_bytes(total as u64)
        })
    );
    let listed = client.list_objects_v2().bucket(&bucket).send().await.unwrap();
    assert!(listed.contents().is_empty());
    coordinator.stop();
}

/// One line on stderr and exit code 64, before anything is served.
fn assert_refused_at_start_up(args: &[&str], needle: &str) {
    assert_refused_at_start_up_with(args, &platform_env(), needle);
}

fn assert_refused_at_start_up_with(args: &[&str], env: &[(&str, &str)], needle: &str) {
    tests::assert_coordinator_refuses(args, env, needle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_s3_configuration_is_refused_at_start_up() {
    let Some(moto) = moto_url() else { return };
    let bucket = new_bucket(&moto).await;
    let mut no_role = s3_args(&moto, &bucket);
    no_role.truncate(no_role.len() - 4);
    no_role.extend(["--sts-endpoint", &moto]);
    assert_refused_at_start_up(&no_role, "--store s3 needs --sts-role-arn");
    assert_refused_at_start_up(
        &s3_args(&moto, "no-such-bucket-here"),
        "bucket \"no-such-bucket-here\" is missing: NoSuchBucket (HTTP 404)",
    );
    let (_held_closed, closed_port) = tests::closed_port();
    let closed = format!("http://{closed_port}");
    assert_refused_at_start_up(&s3_args(&closed, &bucket), "is missing or unreachable");

    // Credentials the store refuses (`AccessDenied`): one project's read key of another
    // coordinator's embedded endpoint, which may not look at the bucket itself.
    let data_dir = tempfile::tempdir().unwrap();
    let other = CoordinatorProcess::start(data_dir.path(), &[]);
    other.create_project("elsewhere");
    let exports = parse_exports(&stdout_of(&other.cachectl(&["credentials", "elsewhere"])));
    let export = |name: &str| exports.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str()).unwrap();
    let (endpoint, bucket) = (export("AWS_ENDPOINT_URL").to_owned(), export("CACHE_S3_BUCKET").to_owned());
    let mut env = platform_env();
    env.retain(|(name, _)| !name.starts_with("AWS_ACCESS") && !name.starts_with("AWS_SECRET"));
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"] {
        if exports.iter().any(|(key, _)| key == name) {
            env.push((name, export(name)));
        }
    }
    let mut denied = s3_args(&endpoint, &bucket);
    let sts = denied.len() - 1;
    denied[sts] = &moto;
    assert_refused_at_start_up_with(
        &denied,
        &env,
        &format!("bucket {bucket:?} refuses the coordinator's credentials: AccessDenied (HTTP 403)"),
    );
    other.stop();
}

/// On S3 a write key's PUT is not checked against its digest by the store unless it carries
/// the digest as its SHA-256 checksum, so a pull request's token can plant junk under a real
/// layer's address. The commit of the default branch's save verifies every blob the ledger
/// does not know yet: the junk is found, deleted, the worker uploads the layer again in the
/// same run, and the default branch's restore on a fresh host is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_planted_by_a_pull_request_token_never_reaches_the_default_branch() {
    let Some(OnMoto { moto, bucket, data_dir: _data_dir, coordinator, build_host, token }) = on_moto().await else {
        return;
    };
    let created = coordinator.cachectl(&tests::scoped_token_args("shop", "pr-*", ""));
    assert!(created.status.success(), "{}", stderr_of(&created));
    let pr = stdout_of(&created).lines().last().unwrap().trim().to_owned();

    let context = tests::build_seed_app(&build_host);
    let layers = tests::layer_digests(&build_host, "app:latest");
    let write = coordinator.credentials(&pr, proto::v1::Access::Write).await;
    let key = format!("{}blobs/sha256/{}", write.prefix, layers[1].trim_start_matches("sha256:"));
    let planted = tests::s3_client_for(&write)
        .put_object()
        .bucket(&write.bucket)
        .key(&key)
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"junk under a real layer's address"))
        .send()
        .await;
    assert!(planted.is_ok(), "moto stores it, as S3 would without a checksum: {planted:?}");

    // Junk of a layer's very size, and a commit through the API that names it without
    // uploading it: refused, the junk deleted.
    let content = b"the real layer's bytes".to_vec();
    let junk = vec![b'j'; content.len()];
    let junk_key = tests::blob_key(&write, &content);
    let store = tests::s3_client_for(&write);
    store.put_object().bucket(&write.bucket).key(&junk_key).body(junk.into()).send().await.unwrap();
    let mut client = tests::worker_client(&coordinator.grpc_url, &token).await;
    let begun = client.begin_save(tests::begin_one_layer_save("api", "api:1", &content)).await.unwrap().into_inner();
    let config = tests::one_layer_config(&content);
    store
        .put_object()
        .bucket(&write.bucket)
        .key(tests::blob_key(&write, &config))
        .body(config.into())
        .send()
        .await
        .unwrap();
    let commit = proto::v1::CommitSaveRequest {
        save_id: begun.save_id,
        images: vec![tests::one_layer_image("api:1", &content, true)],
        save_log: Vec::new(),
    };
    let refused = client.commit_save(commit).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::DataLoss, "{refused:?}");
    assert!(store.head_object().bucket(&write.bucket).key(&junk_key).send().await.is_err(), "the junk was deleted");

    let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "app:latest"]);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    assert!(stderr_of(&saved).contains("did not hash to its digest and was deleted"), "{}", stderr_of(&saved));
    assert!(stderr_of(&saved).contains("saving web again"), "{}", stderr_of(&saved));
    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let restored = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web", "--strict"]);
    assert!(restored.status.success(), "restore: {}", stderr_of(&restored));
    tests::assert_seed_rebuild_cached(&fresh_host, context.path());
    // Every blob the worker put carries its digest as its SHA-256 checksum: the commit's
    // check of the next save is a HEAD, not a read.
    let client = platform_s3_client(&moto, PLATFORM_KEY_ID, PLATFORM_SECRET);
    let head = client
        .head_object()
        .bucket(&bucket)
        .key(&key)
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert!(head.checksum_sha256().is_some(), "{head:?}");
    coordinator.stop();
}

/// A blob deleted from the bucket behind the coordinator's back: the restore that misses it
/// reports it, the coordinator finds it gone (a HEAD) and drops it with its cache, and the next
/// save uploads it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_lost_from_the_bucket_is_dropped_and_uploaded_again() {
    let Some(OnMoto { moto, bucket, data_dir: _data_dir, coordinator, build_host, token }) = on_moto().await else {
        return;
    };
    let context = tests::build_seed_app(&build_host);
    let save = ["save", "--service", "web", "app:latest"];
    let saved = coordinator.cache_worker_on(&build_host, &token, &save);
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    let layers = tests::layer_digests(&build_host, "app:latest");
    let key = format!("ci/shop/blobs/sha256/{}", layers[2].trim_start_matches("sha256:"));
    let client = platform_s3_client(&moto, PLATFORM_KEY_ID, PLATFORM_SECRET);
    client.delete_object().bucket(&bucket).key(&key).send().await.unwrap();

    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    let failed = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web"]);
    assert!(failed.status.success(), "a failed restore is a warning: {}", stderr_of(&failed));
    assert!(stderr_of(&failed).contains("dropped it with the 1 cache(s) naming it"), "{}", stderr_of(&failed));
    let saved = coordinator.cache_worker_on(&build_host, &token, &save);
    assert!(stdout_of(&saved).contains("uploaded 1 blobs"), "{}", stdout_of(&saved));
    let restored = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", "web", "--strict"]);
    assert!(restored.status.success(), "restore: {}", stderr_of(&restored));
    tests::assert_seed_rebuild_cached(&fresh_host, context.path());
    coordinator.stop();
}

/// Garbage collection, a quota's eviction and uploads no save committed, on a bucket: what no
/// cache names is deleted with the coordinator's own credentials, what the caches name stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_and_eviction_delete_from_the_bucket_only_what_no_cache_names() {
    let Some(moto) = moto_url() else { return };
    let bucket = new_bucket(&moto).await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut args = s3_args(&moto, &bucket);
    args.extend(["--gc-grace", "0s", "--gc-interval", "0"]);
    let coordinator = CoordinatorProcess::start_with_env(data_dir.path(), &args, &platform_env());
    let token = coordinator.create_project("shop");
    let url = coordinator.grpc_url.clone();
    let client = platform_s3_client(&moto, PLATFORM_KEY_ID, PLATFORM_SECRET);
    let keys = || async {
        let listed = client.list_objects_v2().bucket(&bucket).prefix("ci/shop/").send().await.unwrap();
        let mut keys: Vec<String> = listed.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect();
        keys.sort();
        keys
    };
    let (old, new, other) = (vec![1u8; 300_000], vec![2u8; 300_000], vec![3u8; 300_000]);
    tests::save_one_layer_image(&url, &token, "web", "web:1", &old).await;
    tests::save_one_layer_image(&url, &token, "web", "web:1", &new).await;
    tests::save_one_layer_image(&url, &token, "api", "api:1", &other).await;
    // An upload no save commits.
    let mut worker = tests::worker_client(&url, &token).await;
    let stray = vec![4u8; 300_000];
    let begun = worker.begin_save(tests::begin_one_layer_save("ops", "ops:1", &stray)).await.unwrap().into_inner();
    let credentials = begun.credentials.clone().unwrap();
    tests::upload_one_layer_blobs(&credentials, &stray).await;
    worker.abandon_save(proto::v1::AbandonSaveRequest { save_id: begun.save_id }).await.unwrap();
    assert_eq!(keys().await.len(), 8);
    // A multipart upload begun and never completed: not an object, but it holds its parts.
    let left_key = tests::blob_key(&credentials, b"an upload never completed");
    let upload = client.create_multipart_upload().bucket(&bucket).key(&left_key).send().await.unwrap();
    client
        .upload_part()
        .bucket(&bucket)
        .key(&left_key)
        .upload_id(upload.upload_id().unwrap())
        .part_number(1)
        .body(aws_sdk_s3::primitives::ByteStream::from(vec![5u8; 1 << 20]))
        .send()
        .await
        .unwrap();
    let uploads = || async {
        let listed = client.list_multipart_uploads().bucket(&bucket).prefix("ci/shop/").send().await.unwrap();
        listed.uploads().len()
    };
    assert_eq!(uploads().await, 1);

    let collected = coordinator.gc(&["shop"]);
    assert!(collected.starts_with("gc shop: removed 5 blobs"), "{collected}");
    assert_eq!(uploads().await, 0, "the incomplete upload was aborted");
    let left = keys().await;
    let named: Vec<String> = [&new, &other].iter().map(|content| tests::blob_key(&credentials, content)).collect();
    assert_eq!(left.len(), 4, "{left:?}");
    assert!(named.iter().all(|key| left.contains(key)), "{left:?}");
    // A quota with room for one cache evicts the least recently used: web, saved first.
    let set = coordinator.cachectl(&["project", "set-quota", "shop", "400000"]);
    assert!(stdout_of(&set).contains("evicted 1 cache (web)"), "{}", stdout_of(&set));
    let left = keys().await;
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&tests::blob_key(&credentials, &other)), "{left:?}");
    coordinator.stop();
}
