//! What a hostile tenant's storage key tried on the embedded endpoint (issue 14), each refused
//! or answered without harm: a suffix range that panicked s3s-fs, and another project's
//! multipart upload reached by its ID with the attacker's own key in the path.

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use proto::v1 as pb;
use tests::{CoordinatorProcess, blob_key, s3_client_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_key_stores_blobs_under_their_own_digest_only_and_never_replaces_one() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let write = coordinator.credentials(&token, pb::Access::Write).await;
    let (web, bucket) = (s3_client_for(&write), write.bucket.clone());
    let layer = b"the real layer".to_vec();
    let key = blob_key(&write, &layer);
    let get = |key: String| {
        let (web, bucket) = (web.clone(), bucket.clone());
        async move { web.get_object().bucket(bucket).key(key).send().await.map(|got| got.body) }
    };

    // Junk under any other name, or under a real layer's address before it is stored.
    let junk = web
        .put_object()
        .bucket(&bucket)
        .key(format!("{}junk/of/any/size", write.prefix))
        .body(ByteStream::from_static(b"junk"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(junk.code(), Some("AccessDenied"), "{junk:?}");
    let planted = web.put_object().bucket(&bucket).key(&key).body(ByteStream::from_static(b"poison")).send().await;
    assert_eq!(planted.unwrap_err().code(), Some("BadDigest"));
    assert!(get(key.clone()).await.is_err(), "nothing was stored under the layer's address");
    let upload = web.create_multipart_upload().bucket(&bucket).key(&key).send().await.unwrap();
    let part = web
        .upload_part()
        .bucket(&bucket)
        .key(&key)
        .upload_id(upload.upload_id().unwrap())
        .part_number(1)
        .body(ByteStream::from_static(b"poison in parts"))
        .send()
        .await
        .unwrap();
    let parts = aws_sdk_s3::types::CompletedMultipartUpload::builder()
        .parts(aws_sdk_s3::types::CompletedPart::builder().part_number(1).e_tag(part.e_tag().unwrap()).build())
        .build();
    let completed = web
        .complete_multipart_upload()
        .bucket(&bucket)
        .key(&key)
        .upload_id(upload.upload_id().unwrap())
        .multipart_upload(parts)
        .send()
        .await;
    assert_eq!(completed.unwrap_err().code(), Some("BadDigest"));
    assert!(get(key.clone()).await.is_err(), "nothing was stored in parts either");

    // The real layer, then other bytes over it: the stored blob stays as it is.
    web.put_object().bucket(&bucket).key(&key).body(ByteStream::from(layer.clone())).send().await.unwrap();
    let over = web.put_object().bucket(&bucket).key(&key).body(ByteStream::from_static(b"poison")).send().await;
    assert!(over.is_ok(), "a PUT of a stored blob is answered as done: {over:?}");
    let again = web.create_multipart_upload().bucket(&bucket).key(&key).send().await.unwrap_err();
    assert_eq!(again.code(), Some("PreconditionFailed"), "{again:?}");
    let stored = get(key.clone()).await.unwrap().collect().await.unwrap().into_bytes();
    assert_eq!(stored.as_ref(), layer.as_slice(), "the stored blob was not replaced");
    // A retried upload of a big stored blob (its save was killed after uploading it) is read
    // to its end and answered, not cut off.
    let big = vec![5u8; 65 << 20];
    let big_key = blob_key(&write, &big);
    for _ in 0..2 {
        let put = web.put_object().bucket(&bucket).key(&big_key).body(ByteStream::from(big.clone())).send().await;
        assert!(put.is_ok(), "{put:?}");
    }
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suffix_range_beyond_any_object_is_answered_not_panicked_on() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let write = coordinator.credentials(&token, pb::Access::Write).await;
    let web = s3_client_for(&write);
    let key = blob_key(&write, b"0123456789");
    web.put_object().bucket(&write.bucket).key(&key).body(ByteStream::from_static(b"0123456789")).send().await.unwrap();

    // As S3 does: a suffix longer than the object is the whole object.
    for range in ["bytes=-9223372036854775808", "bytes=-18446744073709551615", "bytes=-11"] {
        let got = web.get_object().bucket(&write.bucket).key(&key).range(range).send().await;
        let body = got.unwrap_or_else(|error| panic!("{range}: {error:?}")).body.collect().await.unwrap();
        assert_eq!(body.into_bytes().as_ref(), b"0123456789", "{range}");
    }
    let tail = web.get_object().bucket(&write.bucket).key(&key).range("bytes=-3").send().await.unwrap();
    assert_eq!(tail.body.collect().await.unwrap().into_bytes().as_ref(), b"789");
    for range in ["bytes=10-", "bytes=5-2", "bytes=-0"] {
        let refused = web.get_object().bucket(&write.bucket).key(&key).range(range).send().await.unwrap_err();
        // s3s's header parser refuses a backwards range before the endpoint sees it.
        assert!(matches!(refused.code(), Some("InvalidRange" | "InvalidArgument")), "{range}: {refused:?}");
    }
    assert!(!coordinator.log().contains("panicked"), "{}", coordinator.log());
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_projects_multipart_upload_is_out_of_reach_by_its_id() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let web_write = coordinator.credentials(&coordinator.create_project("web"), pb::Access::Write).await;
    let api_write = coordinator.credentials(&coordinator.create_project("api"), pb::Access::Write).await;
    let (web, api, bucket) = (s3_client_for(&web_write), s3_client_for(&api_write), web_write.bucket.clone());
    let web_key = format!("{}blobs/sha256/{}", web_write.prefix, "cd".repeat(32));
    let upload = web.create_multipart_upload().bucket(&bucket).key(&web_key).send().await.unwrap();
    let upload_id = upload.upload_id().unwrap().to_owned();
    let part = vec![7u8; 5 * 1024 * 1024];
    web.upload_part()
        .bucket(&bucket)
        .key(&web_key)
        .upload_id(&upload_id)
        .part_number(1)
        .body(ByteStream::from(part.clone()))
        .send()
        .await
        .unwrap();
    let listed = web.list_parts().bucket(&bucket).key(&web_key).upload_id(&upload_id).send().await.unwrap();
    assert_eq!(listed.parts().len(), 1, "the owner lists its parts");

    // api names its own key in the path, which its scope allows, and web's upload ID.
    let api_key = format!("{}blobs/sha256/{}", api_write.prefix, "cd".repeat(32));
    let listing = api.list_parts().bucket(&bucket).key(&api_key).upload_id(&upload_id).send().await.unwrap_err();
    assert_eq!(listing.code(), Some("NoSuchUpload"), "{listing:?}");
    let planted = api
        .upload_part()
        .bucket(&bucket)
        .key(&api_key)
        .upload_id(&upload_id)
        .part_number(2)
        .body(ByteStream::from_static(b"evil"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(planted.code(), Some("NoSuchUpload"), "{planted:?}");
    let aborted = api.abort_multipart_upload().bucket(&bucket).key(&api_key).upload_id(&upload_id).send().await;
    assert_eq!(aborted.unwrap_err().code(), Some("NoSuchUpload"));
    for forged in ["../../etc/passwd", "not-an-id", "00000000-0000-0000-0000-000000000000"] {
        let listing = api.list_parts().bucket(&bucket).key(&api_key).upload_id(forged).send().await.unwrap_err();
        assert_eq!(listing.code(), Some("NoSuchUpload"), "{forged}: {listing:?}");
    }

    // web's upload is as it was.
    let listed = web.list_parts().bucket(&bucket).key(&web_key).upload_id(&upload_id).send().await.unwrap();
    assert_eq!(listed.parts().len(), 1);
    coordinator.stop();
}

/// `ReportMetrics` from a project's token, as a forger sends it.
async fn report(
    coordinator: &CoordinatorProcess,
    token: &str,
    service: &str,
    layer: pb::LayerMetric,
    total_seconds: f64,
) -> Result<(), tonic::Status> {
    let mut client = tests::worker_client(&coordinator.grpc_url, token).await;
    let request = pb::ReportMetricsRequest {
        service: service.into(),
        operation: pb::Operation::Restore as i32,
        layers: vec![layer],
        total_seconds,
        restore_outcome: pb::RestoreOutcome::Miss as i32,
        lease_id: String::new(),
    };
    client.report_metrics(request).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_metric_reports_are_refused_and_add_no_series_beyond_a_cap() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let layer = |bytes: u64, seconds: f64| pb::LayerMetric {
        digest: format!("sha256:{}", "ab".repeat(32)),
        bytes,
        seconds,
        outcome: pb::LayerOutcome::Transferred as i32,
    };
    assert!(report(&coordinator, &token, "app", layer(1024, 0.5), 1.0).await.is_ok(), "a real report");
    for (forged, total) in
        [(layer(u64::MAX, 0.5), 1.0), (layer(1, f64::NAN), 1.0), (layer(1, -1.0), 1.0), (layer(1, 0.5), f64::INFINITY)]
    {
        let refused = report(&coordinator, &token, "app", forged.clone(), total).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{forged:?} {total}: {refused:?}");
        assert!(refused.message().starts_with("metrics report refused: "), "{}", refused.message());
    }
    let bad_digest = pb::LayerMetric { digest: "../../x".into(), ..layer(1, 0.5) };
    assert_eq!(
        report(&coordinator, &token, "app", bad_digest, 1.0).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let metrics_url = format!("{}/metrics", coordinator.metrics_url);
    let (_, text) = tests::http_get(&metrics_url);
    let moved: Vec<&str> =
        text.lines().filter(|line| line.contains("layer_bytes_total{") && line.contains("service=\"app\"")).collect();
    assert_eq!(moved.len(), 1, "{text}");
    assert!(moved[0].ends_with(" 1024"), "only the real report counted: {moved:?}");

    // New service names, each a set of series: up to the cap, then refused with one line.
    let (_, before) = tests::http_get(&metrics_url);
    let mut accepted = 1;
    for i in 0..100 {
        match report(&coordinator, &token, &format!("junk{i}"), layer(1, 0.1), 0.1).await {
            Ok(()) => accepted += 1,
            Err(refused) => {
                assert_eq!(refused.code(), tonic::Code::InvalidArgument);
                assert!(refused.message().contains("without a cache, the most it may"), "{}", refused.message());
            }
        }
    }
    // The coordinator's MAX_REPORTED_SERVICES: 64 services without a cache.
    assert_eq!(accepted, 64, "app and 63 junk services");
    let (_, after) = tests::http_get(&metrics_url);
    assert!(after.contains("service=\"junk62\"") && !after.contains("junk63"), "no series past the cap");
    assert!(after.len() < before.len() + 64 * 4096, "{} bytes grew to {}", before.len(), after.len());
    // The services already reported keep reporting.
    assert!(report(&coordinator, &token, "junk1", layer(1, 0.1), 0.1).await.is_ok());
    coordinator.stop();
}
