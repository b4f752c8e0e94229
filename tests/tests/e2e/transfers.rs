//! The transfer engine over real parts: part planning (limits refused at start-up, the stored
//! parts of a real save), the global budget's fair share through the API, credentials renewed
//! in the middle of a multipart upload on the embedded endpoint (which binds an upload to its
//! key), and a save cancelled by SIGTERM mid-upload leaving no object, no parts and no manifest.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use proto::v1 as pb;
use proto::v1::worker_client::WorkerClient;
use sha2::{Digest, Sha256};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, binary, build_context, s3_client_for, stderr_of, stdout_of};
use worker::coordinator::Coordinator;
use worker::transfer::BlobStore;

const MIB: usize = 1024 * 1024;

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Bytes that do not repeat, so no store could shortcut them.
fn noise(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest([seed]);
    while bytes.len() < len {
        bytes.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    bytes.truncate(len);
    bytes
}

/// A save request for one image of one layer, sizes not yet known.
fn begin_request(service: &str, config: &[u8], layer: &[u8]) -> pb::BeginSaveRequest {
    pb::BeginSaveRequest {
        key: Some(pb::CacheKey { service: service.into(), branch: String::new() }),
        images: vec![pb::Image {
            id: digest(config),
            layers: vec![pb::Layer { digest: digest(layer), ..Default::default() }],
            ..Default::default()
        }],
        engine_version: "test".into(),
        host: "test-host".into(),
    }
}

#[test]
fn part_sizes_outside_the_limits_are_refused_at_start_up() {
    for (flag, value) in [("--part-size-mib", "4"), ("--part-size-mib", "6000"), ("--multipart-threshold-mib", "1")] {
        let data_dir = tempfile::tempdir().unwrap();
        let output = Command::new(binary("cache-coordinator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--s3-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir.path())
            .args([flag, value])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{flag} {value}: {}", stderr_of(&output));
        let stderr = stderr_of(&output);
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains("expected 8 to 5120 MiB"), "{stderr}");
        assert_eq!(std::fs::read_dir(data_dir.path()).unwrap().count(), 0, "nothing written for a refused config");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_budget_is_shared_fairly_between_projects() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator =
        CoordinatorProcess::start(data_dir.path(), &["--transfer-budget", "8", "--worker-concurrency", "8"]);
    let client_of = |token: String| {
        let url = coordinator.grpc_url.clone();
        async move {
            let channel = proto::client::connect(&url).await.unwrap();
            WorkerClient::with_interceptor(channel, proto::client::BearerToken::new(&token).unwrap())
        }
    };
    let mut shop = client_of(coordinator.create_project("shop")).await;
    let mut web = client_of(coordinator.create_project("web")).await;
    let (config, layer) = (b"{}".to_vec(), b"layer".to_vec());
    let grant = async |client: &mut WorkerClient<_>, service: &str| {
        let begun = client.begin_save(begin_request(service, &config, &layer)).await.unwrap().into_inner();
        let plan = begun.plan.expect("a save that uploads gets a plan");
        assert_eq!(plan.part_size, 8 << 20);
        assert_eq!(plan.lease_id, begun.save_id, "the save's lease is named by its save ID");
        plan
    };

    // A lone worker gets the per-worker cap; a second one of the same project splits the
    // project's share with the first, which hears of it at its next keep-alive.
    let shop1 = grant(&mut shop, "one").await;
    assert_eq!(shop1.max_concurrency, 8);
    assert_eq!(grant(&mut shop, "two").await.max_concurrency, 4);
    let share_of = async |client: &mut WorkerClient<_>, save_id: &str| {
        let request = pb::KeepSaveAliveRequest { save_id: save_id.to_owned() };
        client.keep_save_alive(request).await.unwrap().into_inner().plan.unwrap().max_concurrency
    };
    assert_eq!(share_of(&mut shop, &shop1.lease_id).await, 4);
    // Another project arriving while shop holds the whole budget gets its fair half; shop's
    // workers shrink to the other half.
    assert_eq!(grant(&mut web, "one").await.max_concurrency, 4);
    assert_eq!(share_of(&mut shop, &shop1.lease_id).await, 2);
    // Shop's first worker reports back (its lease goes back to the budget): shop's other
    // worker has shop's half to itself, web's two workers split web's.
    let report = pb::ReportMetricsRequest {
        service: "one".into(),
        operation: pb::Operation::Save as i32,
        lease_id: shop1.lease_id.clone(),
        ..Default::default()
    };
    shop.report_metrics(report).await.unwrap();
    assert_eq!(grant(&mut web, "two").await.max_concurrency, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_renewed_in_the_middle_of_a_multipart_upload() {
    let data_dir = tempfile::tempdir().unwrap();
    // Keys live 2 seconds; the upload below takes longer than that.
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--credential-ttl", "2"]);
    let token = coordinator.create_project("web");
    let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let layer = noise(20 * MIB, 1);

    let mut worker = Coordinator::connect(&coordinator.grpc_url, Some(&token), Duration::from_secs(30)).await.unwrap();
    let begun = worker.client.begin_save(begin_request("web", &config, &layer)).await.unwrap().into_inner();
    let credentials = begun.credentials.clone().unwrap();
    let plan = begun.plan.clone().unwrap();
    let renewing = BlobStore::new(&credentials, &plan, Some(worker.client.clone()), worker.stall_timeout);
    // The same kind of key without renewal, to show that keys do run out.
    let other = coordinator.credentials(&token, pb::Access::Write).await;
    let fixed = BlobStore::new(&other, &plan, None, Duration::from_secs(30));

    let upload = renewing.begin_multipart(&digest(&layer), layer.len() as u64).await.unwrap();
    assert_eq!(upload.part_size, 8 << 20);
    let part = |range: std::ops::Range<usize>| ByteStream::from(layer[range].to_vec());
    let mut parts = vec![upload.upload_part(1, part(0..8 * MIB)).await.unwrap()];
    // Past both keys' expiry, by the clock that decides it (whole seconds).
    let first_expiry = credentials.expires_unix.max(other.expires_unix);
    wait_past(first_expiry).await;
    let refused = fixed.upload_bytes(&digest(b"late"), b"late".to_vec()).await.unwrap_err();
    assert!(refused.to_string().contains("ExpiredToken"), "a key nobody renews expires: {refused}");
    parts.push(upload.upload_part(2, part(8 * MIB..16 * MIB)).await.unwrap());
    // Past a renewed key's lifetime too: it was renewed again.
    wait_past(first_expiry + 2).await;
    parts.push(upload.upload_part(3, part(16 * MIB..20 * MIB)).await.unwrap());
    upload.complete(parts).await.expect("the upload completes with the renewed key that began it");
    renewing.upload_bytes(&digest(&config), config.clone()).await.unwrap();

    // The blob is whole, in three parts, and the save commits.
    let reader = s3_client_for(&coordinator.credentials(&token, pb::Access::Read).await);
    let stored = reader.get_object().bucket(&credentials.bucket).key(renewing.key(&digest(&layer))).send().await;
    let stored = stored.unwrap();
    assert!(stored.e_tag().unwrap_or_default().trim_matches('"').ends_with("-3"), "{:?}", stored.e_tag());
    assert_eq!(stored.body.collect().await.unwrap().into_bytes().as_ref(), layer.as_slice());
    let mut image = begin_request("web", &config, &layer).images.remove(0);
    image.config_size = config.len() as u64;
    image.layers[0].size = layer.len() as u64;
    let commit = pb::CommitSaveRequest { save_id: begun.save_id, images: vec![image], save_log: Vec::new() };
    worker.client.commit_save(commit).await.expect("commit");
}

/// Returns once the wall clock's whole seconds are past `unix` (how key expiry is judged).
async fn wait_past(unix: i64) {
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    while now() <= unix {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A build host holding `big:1`: one layer of `mib` MiB of noise on a busybox base.
fn build_big_image(engine: &DockerEngine, mib: usize) -> String {
    engine.import_busybox_base("base:1");
    let context = build_context(&format!("FROM base:1\nRUN head -c {} /dev/urandom > /noise\n", mib * MIB));
    let built = engine.classic_build(context.path(), "big:1", &[]);
    assert!(built.status.success(), "build: {}", stderr_of(&built));
    let layers = engine.docker(&["image", "inspect", "--format", "{{json .RootFS.Layers}}", "big:1"]);
    let layers: Vec<String> = serde_json::from_str(stdout_of(&layers).trim()).unwrap();
    layers.last().unwrap().clone()
}

/// Multipart uploads the embedded endpoint holds unfinished (s3s-fs keeps them as dot files at
/// its root).
fn unfinished_uploads(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("objects"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".upload"))
        .collect()
}

#[test]
fn a_real_save_stores_blobs_in_the_planned_parts_and_restores_from_them() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let noise_layer = build_big_image(&build_host, 20);
    for (part_size_mib, expected_parts) in [("8", "-3"), ("16", "-2")] {
        let data_dir = tempfile::tempdir().unwrap();
        // Build hosts reach the store through a proxy that notes every GET's range.
        let proxy = tests::FaultyProxy::start();
        let public_url = format!("http://{}", proxy.address);
        let args = ["--part-size-mib", part_size_mib, "--multipart-threshold-mib", "8", "--s3-public-url", &public_url];
        let coordinator = CoordinatorProcess::start(data_dir.path(), &args);
        proxy.forward_to(coordinator.s3_listen.as_deref().unwrap());
        let token = coordinator.create_project("web");
        let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "web", "big:1"]);
        assert!(saved.status.success(), "save: {}", stderr_of(&saved));

        let runtime = tokio::runtime::Runtime::new().unwrap();
        let credentials = runtime.block_on(coordinator.credentials(&token, pb::Access::Read));
        let key = format!("{}blobs/sha256/{}", credentials.prefix, noise_layer.trim_start_matches("sha256:"));
        let head =
            runtime.block_on(s3_client_for(&credentials).head_object().bucket(&credentials.bucket).key(&key).send());
        let e_tag = head.unwrap().e_tag().unwrap_or_default().trim_matches('"').to_owned();
        assert!(e_tag.ends_with(expected_parts), "{part_size_mib} MiB parts of 20 MiB: ETag {e_tag}");
        assert!(unfinished_uploads(data_dir.path()).is_empty());

        // A fresh host restores it with ranges aligned to those parts, verified.
        let Some(fresh) = DockerEngine::start(EngineKind::Engine20) else { return };
        let restored = coordinator.cache_worker_on(&fresh, &token, &["restore", "--strict", "--service", "web"]);
        assert!(restored.status.success(), "restore: {}", stderr_of(&restored));
        let ids = fresh.image_ids();
        let original = build_host.docker(&["image", "inspect", "--format", "{{.Id}}", "big:1"]);
        assert!(ids.contains(&stdout_of(&original).trim().to_owned()), "{ids:?}");
        // Every range starts on a part boundary and spans at most one part; the 20 MiB layer
        // came in one range per part.
        let part_size: u64 = part_size_mib.parse::<u64>().unwrap() << 20;
        let ranges: Vec<(u64, u64)> = proxy
            .ranges()
            .iter()
            .map(|range| {
                let (first, last) = range.strip_prefix("bytes=").and_then(|span| span.split_once('-')).unwrap();
                (first.parse().unwrap(), last.parse().unwrap())
            })
            .collect();
        for (first, last) in &ranges {
            assert!(first % part_size == 0 && last - first < part_size, "unaligned range {first}-{last}");
        }
        let n_parts_of_layer = ranges.iter().filter(|(first, _)| *first > 0).count() + 1;
        assert_eq!(format!("-{n_parts_of_layer}"), expected_parts, "{ranges:?}");
    }
}

#[test]
fn a_save_cancelled_mid_upload_leaves_no_object_no_parts_and_no_manifest() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let noise_layer = build_big_image(&build_host, 192);
    let data_dir = tempfile::tempdir().unwrap();
    // Multipart for everything of 8 MiB and more, one request at a time: the upload lasts.
    let args = ["--multipart-threshold-mib", "8", "--worker-concurrency", "1"];
    let coordinator = CoordinatorProcess::start(data_dir.path(), &args);
    let token = coordinator.create_project("web");
    let spool = tempfile::tempdir().unwrap();
    let mut save = Command::new(binary("cache-worker"))
        .args(["--coordinator", &coordinator.grpc_url, "save", "--service", "web", "big:1"])
        .env("CACHE_TOKEN", &token)
        .env("DOCKER_HOST", &build_host.host)
        .env("CACHE_SPOOL_DIR", spool.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Interrupt once the endpoint holds part of the upload.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !unfinished_uploads(data_dir.path()).iter().any(|name| name.contains(".part-")) {
        assert!(save.try_wait().unwrap().is_none(), "the save ended before its upload could be interrupted");
        assert!(Instant::now() < deadline, "no multipart upload began within 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill").args(["-TERM", &save.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = save.wait().unwrap();
    let mut stderr = String::new();
    save.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(
        stderr.contains("saving web interrupted by SIGTERM: aborted 1 unfinished upload, nothing saved"),
        "{stderr}"
    );

    assert_eq!(unfinished_uploads(data_dir.path()), Vec::<String>::new(), "the store keeps no part");
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0, "the spool is gone");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let credentials = runtime.block_on(coordinator.credentials(&token, pb::Access::Read));
    let key = format!("{}blobs/sha256/{}", credentials.prefix, noise_layer.trim_start_matches("sha256:"));
    let head = runtime.block_on(s3_client_for(&credentials).head_object().bucket(&credentials.bucket).key(&key).send());
    assert!(head.is_err(), "no object for the interrupted blob");
    let Some(fresh) = DockerEngine::start(EngineKind::Engine20) else { return };
    let restored = coordinator.cache_worker_on(&fresh, &token, &["restore", "--service", "web"]);
    assert_eq!(stdout_of(&restored).trim(), "no cached image for web", "{}", stderr_of(&restored));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_get_a_projects_credentials_with_cachectl() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    coordinator.create_project("web");
    let credentials = |args: &[&str]| {
        let output = coordinator.cachectl(args);
        assert!(output.status.success(), "{args:?}: {}", stderr_of(&output));
        let exports: std::collections::HashMap<String, String> =
            tests::parse_exports(&stdout_of(&output)).into_iter().collect();
        pb::Credentials {
            access_key_id: exports["AWS_ACCESS_KEY_ID"].clone(),
            secret_access_key: exports["AWS_SECRET_ACCESS_KEY"].clone(),
            session_token: exports["AWS_SESSION_TOKEN"].clone(),
            endpoint_url: exports["AWS_ENDPOINT_URL"].clone(),
            region: exports["AWS_REGION"].clone(),
            bucket: exports["CACHE_S3_BUCKET"].clone(),
            prefix: exports["CACHE_S3_PREFIX"].clone(),
            path_style: true,
            ..Default::default()
        }
    };
    let put = |credentials: pb::Credentials| async move {
        let key = tests::blob_key(&credentials, b"x");
        let client = s3_client_for(&credentials);
        client.put_object().bucket(&credentials.bucket).key(key).body(ByteStream::from_static(b"x")).send().await
    };
    let write = credentials(&["credentials", "web", "--write"]);
    assert_eq!(write.prefix, "cache/web/");
    put(write).await.expect("a write key puts under the project's prefix");
    let read = credentials(&["credentials", "web"]);
    assert!(put(read).await.is_err(), "the default is read-only");

    let missing = coordinator.cachectl(&["credentials", "nope"]);
    assert_eq!(missing.status.code(), Some(66), "no such project: {}", stderr_of(&missing));
    assert_eq!(stderr_of(&missing).trim().lines().count(), 1, "{}", stderr_of(&missing));
    assert!(stderr_of(&missing).contains("nope"), "{}", stderr_of(&missing));
    let bad = coordinator.cachectl(&["credentials", "../etc"]);
    assert_eq!(bad.status.code(), Some(64), "{}", stderr_of(&bad));
}

/// A coordinator on the embedded store with a project "web", and web's write credentials.
async fn web_project(data_dir: &Path) -> (CoordinatorProcess, pb::Credentials) {
    let coordinator = CoordinatorProcess::start(data_dir, &[]);
    let token = coordinator.create_project("web");
    let write = coordinator.credentials(&token, pb::Access::Write).await;
    (coordinator, write)
}

/// A worker's store with `credentials` as they are: 8 MiB parts, 4 requests in flight.
fn unrenewed_store(credentials: &pb::Credentials, multipart_threshold: u64) -> BlobStore {
    let plan = pb::TransferPlan { part_size: 8 << 20, multipart_threshold, max_concurrency: 4, ..Default::default() };
    BlobStore::new(credentials, &plan, None, Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_endpoint_writes_blobs_without_md5_and_everything_else_through_s3s_fs() {
    let data_dir = tempfile::tempdir().unwrap();
    let (_coordinator, write) = web_project(data_dir.path()).await;
    let store = unrenewed_store(&write, 5120 << 20);
    let client = s3_client_for(&write);
    let head = |key: String| {
        let (client, bucket) = (client.clone(), write.bucket.clone());
        async move { client.head_object().bucket(bucket).key(key).send().await.unwrap() }
    };

    // A worker's blob: its ETag is its address, its bytes come back whole and ranged.
    let blob = noise(3 * MIB + 5, 7);
    let blob_digest = digest(&blob);
    store.upload_bytes(&blob_digest, blob.clone()).await.unwrap();
    let hex_digest = blob_digest.trim_start_matches("sha256:");
    let e_tag = head(store.key(&blob_digest)).await.e_tag().unwrap_or_default().trim_matches('"').to_owned();
    assert_eq!(e_tag, hex_digest[..32]);
    assert_eq!(store.stored_size(&blob_digest).await.unwrap(), Some(blob.len() as u64));
    let range = store.download_range(&blob_digest, MIB as u64, 10).await.unwrap();
    assert_eq!(range.as_ref(), &blob[MIB..MIB + 10]);
    assert!(unfinished_uploads(data_dir.path()).is_empty());
    let leftovers = std::fs::read_dir(data_dir.path().join("objects")).unwrap();
    assert!(leftovers.filter_map(Result::ok).all(|entry| !entry.file_name().to_string_lossy().starts_with(".tmp")));

    // Anything else (here a Content-MD5) is s3s-fs's, checked against the address once written:
    // the ETag is the MD5.
    let sentence = b"The quick brown fox jumps over the lazy dog";
    let other_key = format!("{}blobs/sha256/{}", write.prefix, digest(sentence).trim_start_matches("sha256:"));
    let md5_hex = "9e107d9d372bb6826bd81d3542a419d6"; // MD5 of the sentence below
    client
        .put_object()
        .bucket(&write.bucket)
        .key(&other_key)
        .content_md5("nhB9nTcrtoJr2B01QqQZ1g==")
        .body(ByteStream::from_static(sentence))
        .send()
        .await
        .unwrap();
    assert_eq!(head(other_key).await.e_tag().unwrap_or_default().trim_matches('"'), md5_hex);
    // The same path with other bytes under another blob's address: refused, and not kept.
    let planted = format!("{}blobs/sha256/{}", write.prefix, digest(b"planted").trim_start_matches("sha256:"));
    let refused = client
        .put_object()
        .bucket(&write.bucket)
        .key(&planted)
        .content_md5("nhB9nTcrtoJr2B01QqQZ1g==")
        .body(ByteStream::from_static(sentence))
        .send()
        .await
        .unwrap_err();
    assert_eq!(aws_sdk_s3::error::ProvideErrorMetadata::code(&refused), Some("BadDigest"), "{refused:?}");
    assert!(client.head_object().bucket(&write.bucket).key(&planted).send().await.is_err(), "nothing stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_blob_that_ends_short_or_fails_its_digest_is_never_stored() {
    let data_dir = tempfile::tempdir().unwrap();
    let (_coordinator, write) = web_project(data_dir.path()).await;
    let blob = noise(20 * MIB, 9);
    let blob_digest = digest(&blob);
    for threshold in [8u64 << 20, 5120 << 20] {
        // In parts (multipart) and in one PUT.
        let store = unrenewed_store(&write, threshold);
        for failure in ["short", "mismatch"] {
            let (sender, body) = tokio::sync::mpsc::channel(4);
            let upload = {
                let store = store.clone();
                let digest = blob_digest.clone();
                tokio::spawn(async move {
                    store.upload_stream(&digest, 20 << 20, body, &worker::progress::Bar::none()).await
                })
            };
            for piece in blob[..12 * MIB].chunks(MIB) {
                sender.send(Ok(bytes::Bytes::copy_from_slice(piece))).await.unwrap();
            }
            if failure == "mismatch" {
                sender.send(Err(std::io::Error::other("blob hashes to something else"))).await.unwrap();
            }
            drop(sender);
            let result = upload.await.unwrap();
            assert!(result.is_err(), "{failure} with threshold {threshold}: the upload fails");
            assert_eq!(store.stored_size(&blob_digest).await.unwrap(), None, "{failure}: nothing stored");
            assert!(unfinished_uploads(data_dir.path()).is_empty(), "{failure}: no parts left");
        }
    }
}

/// A save granted no share of the budget (its project's other saves hold all of it) starts no
/// request until a keep-alive answer brings it one, then completes. That it waits is shown
/// after a keep-alive answered it, not after a sleep.
#[test]
fn a_save_beyond_its_projects_share_waits_for_one_then_completes() {
    let Some(engine) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator =
        CoordinatorProcess::start(data_dir.path(), &["--transfer-budget", "2", "--worker-concurrency", "2"]);
    let token = coordinator.create_project("web");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime.block_on(tests::worker_client(&coordinator.grpc_url, &token));
    let holders: Vec<String> = ["one", "two"]
        .iter()
        .map(|service| {
            let begun = runtime.block_on(client.begin_save(begin_request(service, b"{}", service.as_bytes())));
            begun.unwrap().into_inner().save_id
        })
        .collect();
    engine.import_busybox_base("base:1");
    let context = build_context(tests::SEED_DOCKERFILE);
    let built = engine.classic_build(context.path(), "app:latest", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));

    let started = Instant::now();
    let mut save = coordinator.spawn_cache_worker_on(&engine, &token, &["save", "--service", "app", "app:latest"]);
    // Not a timer but an event: once a keep-alive has answered the begun save its (empty)
    // share, the save still waits, and has stored nothing.
    let keep_alive_answered = "layer_cache_grpc_requests_total{method=\"KeepSaveAlive\",code=\"Ok\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    while coordinator.metric(keep_alive_answered).unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < deadline, "no keep-alive of the waiting save was answered");
        assert!(save.try_wait().unwrap().is_none(), "the save waits for a share");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(save.try_wait().unwrap().is_none(), "the save waits for a share");
    assert!(coordinator.blob_files("web").is_empty(), "a save granted no share starts no upload");
    for save_id in holders {
        runtime.block_on(client.abandon_save(pb::AbandonSaveRequest { save_id })).unwrap();
    }
    let saved = save.wait_with_output().unwrap();
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    assert!(stdout_of(&saved).contains("uploaded"), "{}", stdout_of(&saved));
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    let restored = coordinator.cache_worker_on(&engine, &token, &["restore", "--service", "app", "--strict"]);
    assert!(restored.status.success(), "{}", stderr_of(&restored));
}
