//! The coordinator's own object work on an S3 store, with its own credentials (the standard AWS
//! chain): checking blobs before a commit, deleting a project's objects on flush, and checking
//! at start-up that the bucket is there.

use aws_sdk_s3::types::{Delete, ObjectIdentifier};

use super::ObjectStore;
use crate::config::{ChecksumMode, S3Settings};
use crate::error::{Error, sdk_error_line};

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
}

fn store_error<E, R>(what: &str, error: aws_sdk_s3::error::SdkError<E, R>) -> Error
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    Error::store(format!("{what}: {}", sdk_error_line(&error)))
}

fn build_error(what: &str, error: aws_sdk_s3::error::BuildError) -> Error {
    Error::store_cause(what, error)
}

impl S3Store {
    pub fn new(sdk_config: &aws_config::SdkConfig, settings: &S3Settings, bucket: &str) -> S3Store {
        let mut config = aws_sdk_s3::config::Builder::from(sdk_config).force_path_style(settings.path_style);
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        if settings.checksums == ChecksumMode::WhenRequired {
            config = config
                .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired);
        }
        S3Store { client: aws_sdk_s3::Client::from_conf(config.build()), bucket: bucket.to_owned() }
    }

    /// Fails with one clear line when the bucket is missing, unreachable or refuses the
    /// coordinator's credentials. A `HeadBucket` answer has no body, so no error code (the SDK
    /// names a 404 `NotFound`, a 403 nothing): the HTTP status names the cause.
    pub async fn check(&self) -> Result<(), Error> {
        self.client.head_bucket().bucket(&self.bucket).send().await.map_err(|error| {
            let status = error.raw_response().map(|response| response.status().as_u16());
            let bucket = &self.bucket;
            Error::store(match status {
                Some(403) => format!(
                    "bucket {bucket:?} refuses the coordinator's credentials: AccessDenied (HTTP 403); they need s3:ListBucket on it, and the role they assume the object permissions"
                ),
                Some(404) => format!("bucket {bucket:?} is missing: NoSuchBucket (HTTP 404)"),
                Some(301) => {
                    format!("bucket {bucket:?} is in another region (HTTP 301 from HeadBucket): set --s3-region")
                }
                Some(status) => format!(
                    "bucket {bucket:?} refuses the coordinator's credentials: {} (HTTP {status})",
                    sdk_error_line(&error)
                ),
                None => format!(
                    "bucket {bucket:?} is missing or unreachable with the coordinator's credentials: {}",
                    sdk_error_line(&error)
                ),
            })
        })?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl ObjectStore for S3Store {
    async fn object_size(&self, key: &str) -> Result<Option<u64>, Error> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(head) => Ok(Some(head.content_length().unwrap_or(0).max(0) as u64)),
            Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(None),
            Err(error) => Err(store_error(key, error)),
        }
    }

    /// S3 checks a PUT's body against its `x-amz-checksum-sha256` (workers send the blob's
    /// digest there), so a stored full-object SHA-256 equal to the digest settles it without
    /// reading. Without one (a multipart upload's checksum is a checksum of its parts; a
    /// client may send none) the object is read and hashed.
    async fn check_blob(&self, key: &str, digest: &str) -> Result<crate::store::BlobState, Error> {
        use base64::Engine;
        use sha2::Digest;
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let raw = hex::decode(hex).map_err(|_| Error::InvalidArgument(format!("not a digest: {digest}")))?;
        let expected = base64::engine::general_purpose::STANDARD.encode(raw);
        let head = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await
        {
            Ok(head) => head,
            Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => {
                return Ok(crate::store::BlobState::Missing);
            }
            Err(error) => return Err(store_error(key, error)),
        };
        let matches = match head.checksum_sha256().filter(|checksum| !checksum.contains('-')) {
            Some(checksum) => checksum == expected,
            None => {
                let object = self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|error| store_error(key, error))?;
                let mut body = object.body;
                let mut hasher = sha2::Sha256::new();
                while let Some(piece) =
                    body.try_next().await.map_err(|error| Error::store_cause(format!("reading {key}"), error))?
                {
                    hasher.update(&piece);
                }
                hex::encode(hasher.finalize()) == hex
            }
        };
        if !matches {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|error| store_error(key, error))?;
            tracing::warn!(key, "a stored blob did not hash to its digest and was deleted");
        }
        Ok(if matches { crate::store::BlobState::Intact } else { crate::store::BlobState::Corrupt })
    }

    /// Every blob new to the ledger is checked at commit: S3 stores what any key holder sent.
    async fn verify_blob(&self, key: &str, digest: &str) -> Result<bool, Error> {
        Ok(self.check_blob(key, digest).await? == crate::store::BlobState::Intact)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<crate::store::StoredObject>, Error> {
        let mut objects = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix).into_paginator().send();
        while let Some(page) = pages.next().await {
            for object in page.map_err(|error| store_error(prefix, error))?.contents() {
                objects.push(crate::store::StoredObject {
                    key: object.key().unwrap_or_default().to_owned(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    modified_unix: object.last_modified().map_or(0, |time| time.secs()),
                });
            }
        }
        Ok(objects)
    }

    /// ListMultipartUploads, page by page (its markers); S3 does not say how big an upload's
    /// parts are without a ListParts each, so their bytes are left 0, and its time is when it
    /// was begun.
    async fn pending_uploads(&self, prefix: &str) -> Result<Vec<crate::store::PendingUpload>, Error> {
        let mut uploads = Vec::new();
        let (mut key_marker, mut upload_id_marker) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_id_marker.take())
                .send()
                .await
                .map_err(|error| store_error(prefix, error))?;
            for upload in page.uploads() {
                uploads.push(crate::store::PendingUpload {
                    key: upload.key().unwrap_or_default().to_owned(),
                    upload_id: upload.upload_id().unwrap_or_default().to_owned(),
                    bytes: 0,
                    modified_unix: upload.initiated().map_or(0, |time| time.secs()),
                });
            }
            if !page.is_truncated().unwrap_or(false) || page.next_key_marker().is_none() {
                return Ok(uploads);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            upload_id_marker = page.next_upload_id_marker().map(str::to_owned);
        }
    }

    async fn abort_uploads(&self, uploads: &[crate::store::PendingUpload]) -> Result<(), Error> {
        for upload in uploads {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&upload.key)
                .upload_id(&upload.upload_id)
                .send()
                .await;
            match aborted {
                Err(error) if error.as_service_error().is_none_or(|e| !e.is_no_such_upload()) => {
                    return Err(store_error(&upload.key, error));
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn delete_keys(&self, keys: &[String]) -> Result<(), Error> {
        // DeleteObjects takes at most 1,000 keys.
        for batch in keys.chunks(1000) {
            let identifiers = batch
                .iter()
                .map(|key| ObjectIdentifier::builder().key(key).build().map_err(|e| build_error(key, e)))
                .collect::<Result<Vec<_>, _>>()?;
            let delete = Delete::builder()
                .set_objects(Some(identifiers))
                .quiet(true)
                .build()
                .map_err(|e| build_error("a deletion", e))?;
            let response = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|error| store_error(&batch[0], error))?;
            if let Some(failed) = response.errors().first() {
                return Err(Error::store(format!(
                    "deleting {} failed: {}",
                    failed.key().unwrap_or_default(),
                    failed.message().unwrap_or_default()
                )));
            }
        }
        Ok(())
    }
}
