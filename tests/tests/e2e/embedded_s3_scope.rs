//! The embedded endpoint, driven by aws-sdk-s3 with minted credentials: everything inside the
//! scope works, everything outside it is refused and leaves nothing behind.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use proto::v1 as pb;
use tests::{CoordinatorProcess, blob_key, s3_client, s3_client_for};

/// The S3 error code of a failed call (the HTTP status for a HEAD, which has no body), or a
/// panic if it succeeded.
fn refusal_code<T, E>(result: Result<T, SdkError<E, HttpResponse>>) -> String
where
    T: std::fmt::Debug,
    E: ProvideErrorMetadata + std::fmt::Debug,
{
    match result {
        Ok(value) => panic!("expected a refusal, got {value:?}"),
        Err(error) => match (error.code(), error.raw_response()) {
            (Some(code), _) => code.to_owned(),
            (None, Some(response)) => response.status().as_u16().to_string(),
            (None, None) => format!("{error:?}"),
        },
    }
}

/// Whether `key` exists, asked with a key that may read it.
async fn exists(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> bool {
    match client.head_object().bucket(bucket).key(key).send().await {
        Ok(_) => true,
        Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => false,
        Err(error) => panic!("head {key}: {error:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_keys_work_inside_their_scope_only() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let web_token = coordinator.create_project("web");
    let api_token = coordinator.create_project("api");
    let web_write = coordinator.credentials(&web_token, pb::Access::Write).await;
    let web_read = coordinator.credentials(&web_token, pb::Access::Read).await;
    let api_write = coordinator.credentials(&api_token, pb::Access::Write).await;
    assert_eq!(web_write.prefix, "cache/web/");
    assert_eq!(api_write.prefix, "cache/api/");
    let bucket = web_write.bucket.clone();
    let web = s3_client_for(&web_write);
    // Write keys write blobs, each under the sha256 of its bytes.
    let key = blob_key(&web_write, b"0123456789");

    // Inside the scope: put, get, ranged get.
    web.put_object().bucket(&bucket).key(&key).body(ByteStream::from_static(b"0123456789")).send().await.unwrap();
    let body = web.get_object().bucket(&bucket).key(&key).send().await.unwrap().body.collect().await.unwrap();
    assert_eq!(body.into_bytes().as_ref(), b"0123456789");
    let ranged = web.get_object().bucket(&bucket).key(&key).range("bytes=2-5").send().await.unwrap();
    assert_eq!(ranged.body.collect().await.unwrap().into_bytes().as_ref(), b"2345");

    // Inside the scope: a multipart upload of two parts (the first at S3's 5 MiB minimum).
    let first_part = vec![7u8; 5 * 1024 * 1024];
    let multipart_key = blob_key(&web_write, &[first_part.as_slice(), b"tail"].concat());
    let upload = web.create_multipart_upload().bucket(&bucket).key(&multipart_key).send().await.unwrap();
    let upload_id = upload.upload_id().unwrap();
    let mut completed = Vec::new();
    for (number, bytes) in [(1, first_part.clone()), (2, b"tail".to_vec())] {
        let part = web
            .upload_part()
            .bucket(&bucket)
            .key(&multipart_key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .unwrap();
        completed.push(CompletedPart::builder().part_number(number).e_tag(part.e_tag().unwrap()).build());
    }
    web.complete_multipart_upload()
        .bucket(&bucket)
        .key(&multipart_key)
        .upload_id(upload_id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(completed)).build())
        .send()
        .await
        .unwrap();
    let whole =
        web.get_object().bucket(&bucket).key(&multipart_key).send().await.unwrap().body.collect().await.unwrap();
    assert_eq!(whole.into_bytes().len(), first_part.len() + 4);
    let listed = web.list_objects_v2().bucket(&bucket).prefix(&web_write.prefix).send().await.unwrap();
    assert_eq!(listed.contents().len(), 2);

    // Another project's key, on web's objects: refused, for reads, writes and listings.
    let api = s3_client_for(&api_write);
    assert_eq!(refusal_code(api.get_object().bucket(&bucket).key(&key).send().await), "AccessDenied");
    assert_eq!(refusal_code(api.head_object().bucket(&bucket).key(&key).send().await), "403");
    let overwrite = api.put_object().bucket(&bucket).key(&key).body(ByteStream::from_static(b"evil")).send().await;
    assert_eq!(refusal_code(overwrite), "AccessDenied");
    let listing = api.list_objects_v2().bucket(&bucket).prefix(&web_write.prefix).send().await;
    assert_eq!(refusal_code(listing), "AccessDenied");

    // Paths outside the prefix, even ones that start with it.
    for outside in ["cache/api/x", "cache/webx/y", "elsewhere/x", "cache/web/../api/x", "cache/web/./x"] {
        let put = web.put_object().bucket(&bucket).key(outside).body(ByteStream::from_static(b"x")).send().await;
        assert_eq!(refusal_code(put), "AccessDenied", "{outside}");
    }
    let other_bucket =
        web.put_object().bucket("other-bucket").key(&key).body(ByteStream::from_static(b"x")).send().await;
    assert_eq!(refusal_code(other_bucket), "AccessDenied");

    // Listing the bucket root or every bucket.
    assert_eq!(refusal_code(web.list_objects_v2().bucket(&bucket).send().await), "AccessDenied");
    assert_eq!(refusal_code(web.list_objects_v2().bucket(&bucket).prefix("cache/").send().await), "AccessDenied");
    assert_eq!(refusal_code(web.list_buckets().send().await), "AccessDenied");

    // A read-only key cannot write, start a multipart upload, or delete.
    let reader = s3_client_for(&web_read);
    let new_key = format!("{}blobs/sha256/{}", web_write.prefix, "ef".repeat(32));
    let put = reader.put_object().bucket(&bucket).key(&new_key).body(ByteStream::from_static(b"x")).send().await;
    assert_eq!(refusal_code(put), "AccessDenied");
    assert_eq!(
        refusal_code(reader.create_multipart_upload().bucket(&bucket).key(&new_key).send().await),
        "AccessDenied"
    );
    assert!(reader.get_object().bucket(&bucket).key(&key).send().await.is_ok());

    // Nobody deletes, not even the project's own write key.
    assert_eq!(refusal_code(web.delete_object().bucket(&bucket).key(&key).send().await), "AccessDenied");
    assert_eq!(refusal_code(reader.delete_object().bucket(&bucket).key(&key).send().await), "AccessDenied");

    // A wrong secret, a missing session token, another key's session token.
    let wrong_secret = s3_client(&web_write, &"0".repeat(40), Some(&web_write.session_token));
    assert_eq!(refusal_code(wrong_secret.get_object().bucket(&bucket).key(&key).send().await), "SignatureDoesNotMatch");
    let no_token = s3_client(&web_write, &web_write.secret_access_key, None);
    assert_eq!(refusal_code(no_token.get_object().bucket(&bucket).key(&key).send().await), "InvalidToken");
    let stolen_token = s3_client(&web_write, &web_write.secret_access_key, Some(&web_read.session_token));
    assert_eq!(refusal_code(stolen_token.get_object().bucket(&bucket).key(&key).send().await), "InvalidToken");

    // None of the refused writes left anything behind; web's objects are intact.
    assert!(!exists(&web, &bucket, &new_key).await);
    assert!(!exists(&web, &bucket, "cache/web/x").await);
    let body = web.get_object().bucket(&bucket).key(&key).send().await.unwrap().body.collect().await.unwrap();
    assert_eq!(body.into_bytes().as_ref(), b"0123456789");
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_refused_and_minted_keys_survive_a_restart() {
    let data_dir = tempfile::tempdir().unwrap();
    // Expiry is in whole seconds: a 2-second key lives 1 to 2 s, long enough for the PUT below
    // wherever in its second it was minted (a 1-second key may live 0 s).
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--credential-ttl", "2"]);
    let token = coordinator.create_project("web");
    let short_lived = coordinator.credentials(&token, pb::Access::Write).await;
    let client = s3_client_for(&short_lived);
    let key = blob_key(&short_lived, b"x");
    client.put_object().bucket(&short_lived.bucket).key(&key).body(ByteStream::from_static(b"x")).send().await.unwrap();
    // Wait out the key's lifetime on the clock, not for any readiness.
    while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
        <= short_lived.expires_unix
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(refusal_code(client.get_object().bucket(&short_lived.bucket).key(&key).send().await), "ExpiredToken");
    coordinator.stop();

    // A key minted before a restart still works after it, on the new process.
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let long_lived = coordinator.credentials(&token, pb::Access::Read).await;
    coordinator.stop();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let restarted = pb::Credentials { endpoint_url: coordinator.s3_url.clone(), ..long_lived };
    let body = s3_client_for(&restarted).get_object().bucket(&restarted.bucket).key(&key).send().await.unwrap();
    assert_eq!(body.body.collect().await.unwrap().into_bytes().as_ref(), b"x");
    coordinator.stop();
}
