//! What a hostile tenant's storage key tried on the embedded endpoint (issue 14), each refused
//! or answered without harm: a suffix range that panicked s3s-fs, and another project's
//! multipart upload reached by its ID with the attacker's own key in the path.

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use proto::v1 as pb;
use tests::{CoordinatorProcess, s3_client_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suffix_range_beyond_any_object_is_answered_not_panicked_on() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let write = coordinator.credentials(&token, pb::Access::Write).await;
    let web = s3_client_for(&write);
    let key = format!("{}blobs/sha256/{}", write.prefix, "ab".repeat(32));
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
