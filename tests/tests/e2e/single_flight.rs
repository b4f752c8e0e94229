//! Single flight: two saves of one project that need the same new blob upload it once. The
//! second is told the blob is in flight, uploads nothing, and its commit waits for the first's
//! upload. Driven through the gRPC API and aws-sdk-s3, with no engine, so the overlap is certain.

use aws_sdk_s3::primitives::ByteStream;
use proto::v1 as pb;
use proto::v1::worker_client::WorkerClient;
use tests::{CoordinatorProcess, s3_client_for, sha256_digest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_saves_of_one_new_blob_upload_it_once() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let channel = proto::client::connect(&coordinator.grpc_url).await.unwrap();
    let mut client = WorkerClient::with_interceptor(channel, proto::client::BearerToken::new(&token).unwrap());

    let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let layer = vec![42u8; 3 * 1024 * 1024];
    let image = |with_sizes: bool| pb::Image {
        id: sha256_digest(&config),
        repo_tags: vec!["app:1".into()],
        config_size: if with_sizes { config.len() as u64 } else { 0 },
        layers: vec![pb::Layer {
            digest: sha256_digest(&layer),
            size: if with_sizes { layer.len() as u64 } else { 0 },
            ..Default::default()
        }],
        ..Default::default()
    };
    let begin = |service: &str| pb::BeginSaveRequest {
        key: Some(pb::CacheKey { service: service.into(), branch: String::new() }),
        images: vec![image(false)],
        engine_version: "test".into(),
        host: "test-host".into(),
    };

    let first = client.begin_save(begin("one")).await.unwrap().into_inner();
    assert_eq!(first.missing_digests.len(), 2);
    assert!(first.in_flight_digests.is_empty());
    let second = client.begin_save(begin("two")).await.unwrap().into_inner();
    assert!(second.missing_digests.is_empty(), "the second save uploads nothing: {:?}", second.missing_digests);
    let mut in_flight = second.in_flight_digests.clone();
    in_flight.sort();
    let mut expected = vec![sha256_digest(&config), sha256_digest(&layer)];
    expected.sort();
    assert_eq!(in_flight, expected);

    // The second commit waits for the blobs the first save is uploading, then says it still
    // waits for them: the save stays begun and commits later.
    let second_commit =
        pb::CommitSaveRequest { save_id: second.save_id, images: vec![image(true)], save_log: Vec::new() };
    let waiting = client.commit_save(second_commit.clone()).await.unwrap().into_inner();
    assert_eq!(waiting.waiting_for_digests, expected, "the second commit waits while the blobs are in flight");
    assert!(waiting.manifest.is_none() && !waiting.stored);

    let credentials = first.credentials.clone().unwrap();
    let store = s3_client_for(&credentials);
    for blob in [&config, &layer] {
        let key = tests::blob_key(&credentials, blob);
        store
            .put_object()
            .bucket(&credentials.bucket)
            .key(key)
            .body(ByteStream::from(blob.clone()))
            .send()
            .await
            .unwrap();
    }
    let request = pb::CommitSaveRequest { save_id: first.save_id, images: vec![image(true)], save_log: Vec::new() };
    assert!(client.commit_save(request).await.unwrap().into_inner().stored);
    let committed = client.commit_save(second_commit).await.unwrap().into_inner();
    assert!(committed.stored && committed.waiting_for_digests.is_empty(), "{committed:?}");

    // Both caches exist; a third save finds everything stored.
    let third = client.begin_save(begin("three")).await.unwrap().into_inner();
    assert!(third.missing_digests.is_empty() && third.in_flight_digests.is_empty());
    let listed = String::from_utf8(coordinator.cachectl(&["ls", "web"]).stdout).unwrap();
    assert!(listed.contains("one") && listed.contains("two"), "{listed}");
    coordinator.stop();
}
