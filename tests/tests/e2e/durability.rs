//! Nothing acknowledged is lost, and nothing a dead save held blocks another: a coordinator
//! killed with SIGKILL right after its answers, saves that die holding claims, a flush while a
//! save uploads. Driven through the gRPC API and aws-sdk-s3, with no engine, so every step
//! happens exactly when the test says.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use proto::v1 as pb;
use tests::{
    CoordinatorProcess, begin_one_layer_save, blob_key, one_layer_config, one_layer_image, s3_client_for,
    save_one_layer_image, sha256_digest, stderr_of, stdout_of, upload_one_layer_blobs, worker_client,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_sigkill() {
    // Each acknowledgement is the last thing before a SIGKILL: no clean shutdown flushes it.
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let web_token = coordinator.create_project("web");
    let coordinator = coordinator.crash_and_restart();
    let lookup = pb::LookupRequest {
        key: Some(pb::CacheKey { service: "svc".into(), branch: String::new() }),
        fallbacks: vec![],
    };
    let mut web = worker_client(&coordinator.grpc_url, &web_token).await;
    assert!(!web.lookup(lookup.clone()).await.expect("the printed token still works").into_inner().found);

    let committed = save_one_layer_image(&coordinator.grpc_url, &web_token, "svc", "app:1", b"web layer").await;
    assert!(committed.stored, "{committed:?}");
    let coordinator = coordinator.crash_and_restart();
    let shown = coordinator.cachectl(&["show", "web", "svc"]);
    assert!(shown.status.success(), "the acknowledged save is kept: {}", stderr_of(&shown));
    assert!(stdout_of(&shown).contains("app:1"), "{}", stdout_of(&shown));

    // A key handed out before the crash still reads (its record is what admits it), at the
    // endpoint's new address.
    let read_key = coordinator.credentials(&web_token, pb::Access::Read).await;
    let coordinator = coordinator.crash_and_restart();
    let moved = pb::Credentials { endpoint_url: coordinator.s3_url.clone(), ..read_key.clone() };
    let head =
        s3_client_for(&moved).head_object().bucket(&moved.bucket).key(blob_key(&moved, b"web layer")).send().await;
    assert!(head.is_ok(), "{head:?}");

    let flushed = coordinator.cachectl(&["flush", "web"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));
    let coordinator = coordinator.crash_and_restart();
    let mut web = worker_client(&coordinator.grpc_url, &web_token).await;
    assert!(!web.lookup(lookup).await.unwrap().into_inner().found, "the acknowledged flush is kept");
    let shown = coordinator.cachectl(&["show", "web", "svc"]);
    assert_eq!(shown.status.code(), Some(66), "{}", stderr_of(&shown));
    coordinator.assert_no_secret_logged(&[&web_token, &read_key.secret_access_key, &read_key.session_token]);
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_saves_claims_lapse_and_its_retry_never_waits() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--claim-ttl", "3"]);
    let token = coordinator.create_project("web");
    let mut client = worker_client(&coordinator.grpc_url, &token).await;
    let content = b"a layer the dead save claimed".to_vec();
    let expected_missing = {
        let mut digests = vec![sha256_digest(&one_layer_config(&content)), sha256_digest(&content)];
        digests.sort();
        digests
    };

    // A save that dies (SIGKILL: it neither commits nor gives its claims back), and its retry
    // (same cache key), which uploads at once rather than waiting for it: it takes the claims
    // over, so a save of another key now waits for the retry.
    let retried = b"a layer the retry uploads".to_vec();
    let dead = client.begin_save(begin_one_layer_save("one", "app:1", &retried)).await.unwrap().into_inner();
    assert_eq!(dead.missing_digests.len(), 2);
    assert_eq!(dead.keep_alive_seconds, 1);
    let retry = client.begin_save(begin_one_layer_save("one", "app:1", &retried)).await.unwrap().into_inner();
    assert_eq!(sorted(retry.missing_digests.clone()), sorted(dead.missing_digests.clone()), "the retry uploads it all");
    assert!(retry.in_flight_digests.is_empty());
    let third = client.begin_save(begin_one_layer_save("x", "app:1", &retried)).await.unwrap().into_inner();
    assert_eq!(third.in_flight_digests.len(), 2, "the retry holds the claims: {third:?}");

    // A dead save of another key: a save that needs its blobs waits until its claims lapse.
    let _dead = client.begin_save(begin_one_layer_save("two", "app:1", &content)).await.unwrap().into_inner();
    let other = client.begin_save(begin_one_layer_save("three", "app:1", &content)).await.unwrap().into_inner();
    let waiting_for = sorted(other.in_flight_digests.clone());
    assert!(other.missing_digests.is_empty() && waiting_for == expected_missing, "{other:?}");
    let commit = pb::CommitSaveRequest {
        save_id: other.save_id.clone(),
        images: vec![one_layer_image("app:1", &content, true)],
        save_log: Vec::new(),
    };
    // The commit answers "still waiting" while the claims hold, then (no sign of life for 3 s)
    // that the blobs are not stored: the worker begins again and uploads them itself.
    let mut n_waits = 0;
    let refused = loop {
        match client.commit_save(commit.clone()).await {
            Ok(response) => {
                assert_eq!(response.into_inner().waiting_for_digests, expected_missing);
                n_waits += 1;
                assert!(n_waits < 10, "the claims of a save with no sign of life lapse");
            }
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(n_waits >= 1, "the commit waited while the claims held");
    let again = client.begin_save(begin_one_layer_save("three", "app:1", &content)).await.unwrap().into_inner();
    assert_eq!(sorted(again.missing_digests.clone()), expected_missing, "nobody claims them now");
    upload_one_layer_blobs(again.credentials.as_ref().unwrap(), &content).await;
    let commit = pb::CommitSaveRequest { save_id: again.save_id, ..commit };
    assert!(client.commit_save(commit).await.unwrap().into_inner().stored);

    // A save that stays alive keeps its claims past the claim lifetime.
    let fresh = b"a layer a live save uploads".to_vec();
    let live = client.begin_save(begin_one_layer_save("three", "app:2", &fresh)).await.unwrap().into_inner();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.keep_save_alive(pb::KeepSaveAliveRequest { save_id: live.save_id.clone() }).await.unwrap();
    }
    let waiter = client.begin_save(begin_one_layer_save("four", "app:2", &fresh)).await.unwrap().into_inner();
    assert_eq!(waiter.in_flight_digests.len(), 2, "5 s after it began, a live save still claims its blobs");
    coordinator.stop();
}

fn sorted(mut digests: Vec<String>) -> Vec<String> {
    digests.sort();
    digests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_during_a_save_leaves_nothing_behind() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start_with_env(data_dir.path(), &[], &[("RUST_LOG", "debug")]);
    let token = coordinator.create_project("web");
    let mut client = worker_client(&coordinator.grpc_url, &token).await;
    let content = vec![7u8; 2 << 20];
    let begun = client.begin_save(begin_one_layer_save("svc", "app:1", &content)).await.unwrap().into_inner();
    let credentials = begun.credentials.clone().unwrap();
    // As the worker sends it: no checksum, one PUT of the blob's bytes.
    let store = tests::s3_client_as_worker(&credentials);

    // An upload in flight across the flush: half its body before, half after.
    let (pieces, body) = tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>(4);
    let body =
        ByteStream::from_body_1_x(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body)));
    let upload = store
        .put_object()
        .bucket(&credentials.bucket)
        .key(blob_key(&credentials, &content))
        .content_length(content.len() as i64)
        .body(body)
        .send();
    let upload = tokio::spawn(upload);
    let half = content.len() / 2;
    pieces.send(Ok(http_body::Frame::data(bytes::Bytes::copy_from_slice(&content[..half])))).await.unwrap();
    // The endpoint has the request once it writes the body's temporary file.
    let objects = data_dir.path().join("objects");
    let receiving = || {
        std::fs::read_dir(&objects)
            .unwrap()
            .flatten()
            .any(|entry| entry.file_name().to_string_lossy().starts_with(".tmp.layer-cache-"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !receiving() {
        assert!(std::time::Instant::now() < deadline, "the upload never reached the endpoint");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let flushed = coordinator.cachectl(&["flush", "web"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));
    // Should the upload have ended already, its error below says why.
    let _ = pieces.send(Ok(http_body::Frame::data(bytes::Bytes::copy_from_slice(&content[half..])))).await;
    drop(pieces);
    let refused = upload.await.unwrap().expect_err("an upload begun before the flush does not land after it");
    let refusal = aws_sdk_s3::error::DisplayErrorContext(&refused).to_string();
    assert!(refusal.contains("AccessDenied") && refusal.contains("flushed"), "{refusal}");

    // A request begun after the flush with the old key is refused, and the old save cannot commit.
    let config = one_layer_config(&content);
    let late = store
        .put_object()
        .bucket(&credentials.bucket)
        .key(blob_key(&credentials, &config))
        .body(ByteStream::from(config))
        .send()
        .await;
    let refusal =
        aws_sdk_s3::error::DisplayErrorContext(late.expect_err("the flushed project's keys are revoked")).to_string();
    assert!(refusal.contains("InvalidAccessKeyId"), "{refusal}");
    let commit = pb::CommitSaveRequest {
        save_id: begun.save_id,
        images: vec![one_layer_image("app:1", &content, true)],
        save_log: Vec::new(),
    };
    let stale = client.commit_save(commit).await.unwrap_err();
    assert_eq!(stale.code(), tonic::Code::NotFound, "{stale:?}");

    // Nothing of the project is left in the store's folder.
    let project_folder = data_dir.path().join("objects").join(&credentials.bucket).join(&credentials.prefix);
    let left: Vec<_> = walk(&project_folder);
    assert!(left.is_empty(), "left behind after the flush: {left:?}");
    let mut leftovers: Vec<_> =
        std::fs::read_dir(data_dir.path().join("objects")).unwrap().flatten().map(|entry| entry.file_name()).collect();
    leftovers.retain(|name| name.to_string_lossy().contains("layer-cache-"));
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // The project saves again as new.
    let saved = save_one_layer_image(&coordinator.grpc_url, &token, "svc", "app:1", &content).await;
    assert!(saved.stored);
    // Refused requests are logged (at debug too, here) without the key's secrets.
    coordinator.assert_no_secret_logged(&[&token, &credentials.secret_access_key, &credentials.session_token]);
    coordinator.stop();
}

/// Every file under `folder` (none when it does not exist).
fn walk(folder: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(folder) else { return files };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_saves_of_one_key_never_go_back_in_time() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let mut client = worker_client(&coordinator.grpc_url, &token).await;
    let (old, new) = (b"older build".to_vec(), b"newer build".to_vec());
    let older = client.begin_save(begin_one_layer_save("svc", "app:old", &old)).await.unwrap().into_inner();
    let newer = client.begin_save(begin_one_layer_save("svc", "app:new", &new)).await.unwrap().into_inner();
    upload_one_layer_blobs(newer.credentials.as_ref().unwrap(), &new).await;
    upload_one_layer_blobs(older.credentials.as_ref().unwrap(), &old).await;
    let commit = |save_id: &str, tag: &str, content: &[u8]| pb::CommitSaveRequest {
        save_id: save_id.to_owned(),
        images: vec![one_layer_image(tag, content, true)],
        save_log: Vec::new(),
    };
    let first = client.commit_save(commit(&newer.save_id, "app:new", &new)).await.unwrap().into_inner();
    assert!(first.stored && first.replaced.is_none(), "{first:?}");
    // The save begun earlier commits last: the newer build stays the cache, and it is told so.
    let last = client.commit_save(commit(&older.save_id, "app:old", &old)).await.unwrap().into_inner();
    assert!(!last.stored, "{last:?}");
    let kept = last.manifest.unwrap().origin.unwrap();
    assert_eq!(
        (kept.save_id.as_str(), kept.repo_tags.clone(), kept.host.as_str()),
        (newer.save_id.as_str(), vec!["app:new".to_string()], "test-host")
    );
    let shown = stdout_of(&coordinator.cachectl(&["show", "web", "svc"]));
    assert!(shown.contains("app:new") && !shown.contains("app:old"), "{shown}");
    // A later save replaces it and hears whose images it replaced.
    let latest = save_one_layer_image(&coordinator.grpc_url, &token, "svc", "app:latest", b"latest build").await;
    assert!(latest.stored);
    assert_eq!(latest.replaced.unwrap().save_id, newer.save_id);
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_saves_share_of_the_budget_comes_back_with_its_claims() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--claim-ttl", "3"]);
    let token = coordinator.create_project("web");
    let mut client = worker_client(&coordinator.grpc_url, &token).await;
    let began = std::time::Instant::now();
    let killed = client.begin_save(begin_one_layer_save("svc", "app:1", b"a killed save")).await.unwrap().into_inner();
    let share = killed.plan.unwrap().max_concurrency;
    assert!(share > 0);
    let granted = || {
        let (_, text) = tests::http_get(&format!("{}/metrics", coordinator.metrics_url));
        text.lines()
            .find_map(|line| line.strip_prefix("layer_cache_transfer_requests_granted "))
            .and_then(|value| value.trim().parse::<u32>().ok())
            .expect("the granted gauge")
    };
    assert_eq!(granted(), share);
    // No sign of life: after the claim lifetime its share is back (not after the lease's 10 min).
    while granted() != 0 {
        assert!(began.elapsed() < Duration::from_secs(20), "the silent save's share never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(began.elapsed() >= Duration::from_secs(3), "a share lapses only with its claims");
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_flushed_projects_keys_expire_its_store_is_swept_of_what_no_manifest_names() {
    // Where a key outlives its revocation (an STS session with an S3 store), a save begun
    // before a flush may still write after it: that object is swept once the key expires.
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--credential-ttl", "5"]);
    let token = coordinator.create_project("web");
    let mut client = worker_client(&coordinator.grpc_url, &token).await;
    let old =
        client.begin_save(begin_one_layer_save("svc", "app:0", b"begun before the flush")).await.unwrap().into_inner();
    let old_key = old.credentials.unwrap();
    assert!(coordinator.cachectl(&["flush", "web"]).status.success());
    let renewal = pb::GetCredentialsRequest {
        access: pb::Access::Write as i32,
        renew_access_key_id: old_key.access_key_id.clone(),
    };
    let refused = client.get_credentials(renewal).await.unwrap_err();
    assert!(refused.message().contains("revoked"), "a revoked key is never renewed: {refused:?}");

    // What the old save wrote late, as a file in the store (the embedded endpoint refuses it).
    let blobs = data_dir.path().join("objects").join(&old_key.bucket).join(&old_key.prefix).join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let orphan = blobs.join(sha256_digest(b"written late").trim_start_matches("sha256:"));
    std::fs::write(&orphan, b"written late").unwrap();
    // After the flush: a committed save, and one still uploading (its blobs claimed).
    let committed = save_one_layer_image(&coordinator.grpc_url, &token, "svc", "app:1", b"committed after").await;
    assert!(committed.stored);
    let uploading = client.begin_save(begin_one_layer_save("other", "app:2", b"uploading")).await.unwrap().into_inner();
    upload_one_layer_blobs(uploading.credentials.as_ref().unwrap(), b"uploading").await;
    let stored = |content: &[u8]| blobs.join(sha256_digest(content).trim_start_matches("sha256:")).is_file();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while orphan.exists() {
        assert!(std::time::Instant::now() < deadline, "the orphan was never swept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stored(b"committed after") && stored(&one_layer_config(b"committed after")), "a committed blob stays");
    assert!(stored(b"uploading"), "a live save's claimed blob stays");
    let commit = pb::CommitSaveRequest {
        save_id: uploading.save_id,
        images: vec![one_layer_image("app:2", b"uploading", true)],
        save_log: Vec::new(),
    };
    assert!(client.commit_save(commit).await.unwrap().into_inner().stored);
    assert!(coordinator.log().contains("swept what a flushed save left"), "{}", coordinator.log());
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_names_only_blobs_stored_with_the_size_it_reports() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let mut client = worker_client(&coordinator.grpc_url, &token).await;
    let content = b"a layer".to_vec();
    let begun = client.begin_save(begin_one_layer_save("svc", "app:1", &content)).await.unwrap().into_inner();
    let credentials = begun.credentials.clone().unwrap();
    let commit = |images| pb::CommitSaveRequest { save_id: begun.save_id.clone(), images, save_log: Vec::new() };

    // Only the config is stored: the layer is not, and the commit says which.
    let store = s3_client_for(&credentials);
    let config = one_layer_config(&content);
    let put = store
        .put_object()
        .bucket(&credentials.bucket)
        .key(blob_key(&credentials, &config))
        .body(ByteStream::from(config));
    put.send().await.unwrap();
    let refused = client.commit_save(commit(vec![one_layer_image("app:1", &content, true)])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(&sha256_digest(&content)) && refused.message().contains("not in the store"));

    // Stored, but the worker reports another size.
    upload_one_layer_blobs(&credentials, &content).await;
    let mut wrong_size = one_layer_image("app:1", &content, true);
    wrong_size.layers[0].size += 1;
    let refused = client.commit_save(commit(vec![wrong_size])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("is stored with 7 bytes, not 8"), "{refused:?}");
    let shown = coordinator.cachectl(&["show", "web", "svc"]);
    assert_eq!(shown.status.code(), Some(66), "no manifest after refused commits");

    // The save stays begun and commits once what it reports is true.
    let committed = client.commit_save(commit(vec![one_layer_image("app:1", &content, true)])).await.unwrap();
    assert!(committed.into_inner().stored);
    coordinator.stop();
}
