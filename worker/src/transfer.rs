//! Moving blobs between the build host and the object store with aws-sdk-s3, using the
//! scoped credentials and the plan the coordinator handed out. Blobs live at
//! `<prefix>blobs/sha256/<hex>`, addressed by content.

use std::path::Path;

use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use proto::v1 as pb;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("uploading blob {digest} failed: {reason}")]
    Upload { digest: String, reason: String },
    #[error("downloading blob {digest} failed: {reason}")]
    Download { digest: String, reason: String },
    #[error("blob {digest} is not in the store")]
    NotStored { digest: String },
}

/// S3's smallest part; the coordinator's plan never asks for less.
const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Parts of one blob in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// The project's blobs in the object store.
#[derive(Clone)]
pub struct BlobStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    part_size: u64,
    multipart_threshold: u64,
}

fn reason<E: std::error::Error>(error: E) -> String {
    DisplayErrorContext(error).to_string()
}

impl BlobStore {
    pub fn new(credentials: &pb::Credentials, plan: &pb::TransferPlan) -> BlobStore {
        let provider = aws_credential_types::Credentials::new(
            &credentials.access_key_id,
            &credentials.secret_access_key,
            Some(credentials.session_token.clone()).filter(|token| !token.is_empty()),
            None,
            "layer-cache-coordinator",
        );
        let region = if credentials.region.is_empty() { "us-east-1".to_owned() } else { credentials.region.clone() };
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region))
            .force_path_style(credentials.path_style)
            // 5xx, throttling and timeouts are retried with exponential backoff and jitter; a
            // part that stalls is cut off and retried rather than hanging the build.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(5))
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(10))
                    .operation_attempt_timeout(std::time::Duration::from_secs(300))
                    .build(),
            )
            // Every blob is verified against its sha256 as it streams (load.rs): a second,
            // CRC check would cost CPU the engine needs and hide which blob failed.
            .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
            .credentials_provider(provider)
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            );
        if !credentials.endpoint_url.is_empty() {
            config = config.endpoint_url(&credentials.endpoint_url);
        }
        // Some S3-compatible stores reject the CRC checksums aws-sdk-s3 adds by default.
        if credentials.checksum_mode == "when_required" {
            config = config.request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired);
        }
        BlobStore {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            bucket: credentials.bucket.clone(),
            prefix: credentials.prefix.clone(),
            part_size: plan.part_size.max(MIN_PART_SIZE),
            multipart_threshold: plan.multipart_threshold.max(MIN_PART_SIZE),
        }
    }

    pub fn key(&self, digest: &str) -> String {
        format!("{}blobs/sha256/{}", self.prefix, digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    /// Uploads bytes already in memory (configs) in one PUT.
    pub async fn upload_bytes(&self, digest: &str, bytes: Vec<u8>) -> Result<(), TransferError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(digest))
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|error| TransferError::Upload { digest: digest.to_owned(), reason: reason(error) })?;
        Ok(())
    }

    /// Uploads a file: one PUT below the multipart threshold, parts in parallel above it. A
    /// failed multipart upload is aborted.
    pub async fn upload_file(&self, digest: &str, path: &Path, size: u64) -> Result<(), TransferError> {
        let failed = |reason: String| TransferError::Upload { digest: digest.to_owned(), reason };
        let key = self.key(digest);
        if size < self.multipart_threshold {
            let body = ByteStream::from_path(path).await.map_err(|error| failed(error.to_string()))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .body(body)
                .send()
                .await
                .map_err(|e| failed(reason(e)))?;
            return Ok(());
        }
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|error| failed(reason(error)))?;
        let upload_id = upload.upload_id().ok_or_else(|| failed("the store returned no upload ID".into()))?.to_owned();
        let n_parts = size.div_ceil(self.part_size);
        let parts = futures::stream::iter(0..n_parts)
            .map(|part_idx| {
                let (key, upload_id) = (&key, &upload_id);
                async move {
                    let offset = part_idx * self.part_size;
                    let length = self.part_size.min(size - offset);
                    let body = ByteStream::read_from()
                        .path(path)
                        .offset(offset)
                        .length(Length::Exact(length))
                        .build()
                        .await
                        .map_err(|error| error.to_string())?;
                    let part_number = (part_idx + 1) as i32;
                    let uploaded = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(part_number)
                        .body(body)
                        // The blob's sha256 was checked while spooling and the commit checks
                        // its size: a second SHA-256 pass for the signature only costs CPU.
                        .customize()
                        .disable_payload_signing()
                        .send()
                        .await
                        .map_err(reason)?;
                    Ok::<_, String>(
                        CompletedPart::builder()
                            .part_number(part_number)
                            .set_e_tag(uploaded.e_tag().map(str::to_owned))
                            .build(),
                    )
                }
            })
            .buffered(PARTS_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await;
        let completed = match parts {
            Ok(parts) => {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                    .send()
                    .await
            }
            Err(error) => {
                self.abort(&key, &upload_id).await;
                return Err(failed(error));
            }
        };
        if let Err(error) = completed {
            self.abort(&key, &upload_id).await;
            return Err(failed(reason(error)));
        }
        Ok(())
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        if let Err(error) =
            self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(upload_id).send().await
        {
            tracing::warn!(key, error = reason(error), "aborting a multipart upload failed");
        }
    }

    /// The bytes `offset..offset + length` of a stored blob, in memory. The caller verifies them.
    pub async fn download_range(&self, digest: &str, offset: u64, length: u64) -> Result<Bytes, TransferError> {
        let failed = |reason: String| TransferError::Download { digest: digest.to_owned(), reason };
        let range = format!("bytes={offset}-{}", offset + length - 1);
        let response =
            self.client.get_object().bucket(&self.bucket).key(self.key(digest)).range(range).send().await.map_err(
                |error| {
                    if error.as_service_error().is_some_and(|e| e.is_no_such_key()) {
                        TransferError::NotStored { digest: digest.to_owned() }
                    } else {
                        failed(reason(error))
                    }
                },
            )?;
        let bytes = response.body.collect().await.map_err(|error| failed(reason(error)))?.into_bytes();
        if bytes.len() as u64 != length {
            return Err(failed(format!("asked for {length} bytes at {offset}, got {}", bytes.len())));
        }
        Ok(bytes)
    }

    /// Streams a blob's bytes as stored. The caller verifies them.
    pub async fn download(
        &self,
        digest: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, TransferError>> + Send + 'static, TransferError> {
        let failed = |reason: String| TransferError::Download { digest: digest.to_owned(), reason };
        let response =
            self.client.get_object().bucket(&self.bucket).key(self.key(digest)).send().await.map_err(|error| {
                if error.as_service_error().is_some_and(|e| e.is_no_such_key()) {
                    TransferError::NotStored { digest: digest.to_owned() }
                } else {
                    failed(reason(error))
                }
            })?;
        let digest = digest.to_owned();
        Ok(futures::stream::unfold(Some(response.body), move |body| {
            let digest = digest.clone();
            async move {
                let mut body = body?;
                match body.try_next().await {
                    Ok(Some(chunk)) => Some((Ok(chunk), Some(body))),
                    Ok(None) => None,
                    Err(error) => Some((Err(TransferError::Download { digest, reason: reason(error) }), None)),
                }
            }
        }))
    }
}
