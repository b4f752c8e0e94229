//! S3 peers: aws-sdk-s3 clients from the credentials the coordinator hands out, moto's server
//! (S3 and STS) with a bucket per test, and where a blob lands under a project's prefix.

use aws_sdk_s3::config::{BehaviorVersion, Region};
use proto::v1 as pb;

use crate::*;

/// moto's server (S3 and STS) that `.ci/run` starts on loopback, or `None` (with a note) when
/// it is not running here. In CI its absence fails the test.
pub fn moto_url() -> Option<String> {
    let url = std::env::var("CACHE_TEST_MOTO_URL").ok().filter(|url| !url.is_empty());
    assert!(url.is_some() || !in_ci(), "CACHE_TEST_MOTO_URL is not set: .ci/run starts moto's server and sets it");
    if url.is_none() {
        eprintln!("skipping: moto's server is not running here (set CACHE_TEST_MOTO_URL; .ci/run does)");
    }
    url
}

/// An aws-sdk-s3 client with the platform's own (long-lived) keys, for a test to set up and
/// inspect a bucket.
pub fn platform_s3_client(endpoint: &str, access_key_id: &str, secret: &str) -> aws_sdk_s3::Client {
    let credentials = pb::Credentials {
        access_key_id: access_key_id.to_owned(),
        region: "us-east-1".into(),
        endpoint_url: endpoint.to_owned(),
        path_style: true,
        ..Default::default()
    };
    s3_client(&credentials, secret, None)
}

/// An aws-sdk-s3 client for `credentials`, with the secret and token overridable to test
/// refusals.
pub fn s3_client(credentials: &pb::Credentials, secret: &str, session_token: Option<&str>) -> aws_sdk_s3::Client {
    let provider = aws_credential_types::Credentials::new(
        &credentials.access_key_id,
        secret,
        session_token.map(str::to_owned),
        None,
        "layer-cache-test",
    );
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(credentials.region.clone()))
        .endpoint_url(&credentials.endpoint_url)
        .force_path_style(credentials.path_style)
        .credentials_provider(provider)
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The client a worker would build: the credentials exactly as handed out.
pub fn s3_client_for(credentials: &pb::Credentials) -> aws_sdk_s3::Client {
    s3_client(credentials, &credentials.secret_access_key, Some(&credentials.session_token))
}

/// The client a worker uses on the embedded store: no upload checksums, so a blob goes as one
/// plain PUT of its bytes. A body the test holds back is never cut off as stalled.
pub fn s3_client_as_worker(credentials: &pb::Credentials) -> aws_sdk_s3::Client {
    let config = s3_client_for(credentials)
        .config()
        .to_builder()
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .stalled_stream_protection(aws_sdk_s3::config::StalledStreamProtectionConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Where a blob of `content` goes in a project's store: its sha256 under the project's prefix
/// (write keys write nothing else).
pub fn blob_key(credentials: &pb::Credentials, content: &[u8]) -> String {
    proto::object_keys::blob_key(&credentials.prefix, &sha256_digest(content))
}

/// The coordinator on moto's S3 and STS (`CACHE_TEST_MOTO_URL`): its own AWS credentials and
/// role, the flags of an S3 store, and a bucket per test.
pub mod moto {
    use super::platform_s3_client;

    pub const PLATFORM_KEY_ID: &str = "AKIAPLATFORMKEY00001";
    pub const PLATFORM_SECRET: &str = "platform-secret-key-not-for-build-hosts";
    pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/layer-cache";

    /// The coordinator's own AWS credentials, from the standard chain (here: the environment),
    /// with every other source off.
    pub fn platform_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", PLATFORM_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", PLATFORM_SECRET),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
    }

    pub fn s3_args<'a>(moto: &'a str, bucket: &'a str) -> Vec<&'a str> {
        vec![
            "--store",
            "s3",
            "--s3-bucket",
            bucket,
            "--s3-prefix",
            "ci",
            "--s3-endpoint",
            moto,
            "--s3-path-style",
            "--sts-role-arn",
            ROLE_ARN,
            "--sts-endpoint",
            moto,
        ]
    }

    /// A bucket of its own per test: moto's server is shared.
    pub async fn new_bucket(moto: &str) -> String {
        let name = format!("layer-cache-{}", std::process::id())
            + &format!("-{}", std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000_000);
        let client = platform_s3_client(moto, PLATFORM_KEY_ID, PLATFORM_SECRET);
        client.create_bucket().bucket(&name).send().await.expect("create the bucket in moto");
        name
    }
}
