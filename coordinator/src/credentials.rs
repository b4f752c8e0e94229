//! The credential broker: temporary object-store credentials scoped to one project's prefix.
//! The only file that imports aws-sdk-sts.
//!
//! With the embedded store the coordinator mints keys itself: each key's record (project,
//! access, expiry) lives in sled, and its secret and session token are derived from a signing
//! key in the data directory, so no secret is stored and minted keys survive a restart.
//!
//! With an S3 store, STS AssumeRole hands out session credentials whose inline session policy
//! allows only the project's prefix and the operations the use needs.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use proto::object_keys::{blobs_prefix, project_prefix};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{ChecksumMode, S3Settings};
use crate::error::{Error, sdk_error_line};
use crate::state::{KeyAccess, MintedKeyRecord, State};

/// Credentials handed to a worker. `Debug` hides the secret and the session token.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expires_unix: i64,
    pub endpoint_url: String,
    pub region: String,
    pub bucket: String,
    /// The project's key prefix, ending in `/`.
    pub prefix: String,
    pub path_style: bool,
    pub access: KeyAccess,
    /// "when_supported" or "when_required": see `ChecksumMode`.
    pub checksum_mode: &'static str,
}

impl std::fmt::Debug for IssuedCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expires_unix", &self.expires_unix)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

/// Hands out credentials for one project's prefix. The embedded store mints its own keys; an
/// STS-backed broker for real S3 stores sits behind the same trait.
#[async_trait::async_trait]
pub trait CredentialBroker: Send + Sync {
    /// New credentials for `project`, issued to the token `token_id` (empty: the project
    /// token): a broker that records its keys records them with it before they are handed out.
    async fn issue(&self, project: &str, access: KeyAccess, token_id: &str) -> Result<IssuedCredentials, Error>;

    /// Fresh credentials for a worker that holds `access_key_id` (issued to `token_id`: the
    /// service checked) and is about to see it expire mid-transfer. By default simply new ones
    /// (S3 does not bind an upload to a key).
    async fn renew(
        &self,
        project: &str,
        access: KeyAccess,
        access_key_id: &str,
        token_id: &str,
    ) -> Result<IssuedCredentials, Error> {
        let _ = access_key_id;
        self.issue(project, access, token_id).await
    }

    /// Whether the broker records the keys it issues itself (the embedded one must: its
    /// endpoint admits recorded keys only); the service records the others'.
    fn records_keys(&self) -> bool {
        false
    }
}

const SIGNING_KEY_FILE: &str = "s3-signing.key";

/// The secret from which every minted key's secret and session token derive.
pub struct SigningKey([u8; 32]);

impl SigningKey {
    /// Reads the key from the data directory, creating it (mode 0600) on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<SigningKey, Error> {
        let path = data_dir.join(SIGNING_KEY_FILE);
        let data_dir_error = |reason: String| Error::DataDir { path: data_dir.to_path_buf(), reason };
        match std::fs::read_to_string(&path) {
            Ok(contents) => {
                let mut key = [0u8; 32];
                hex::decode_to_slice(contents.trim(), &mut key)
                    .map_err(|error| data_dir_error(format!("{}: {error}", path.display())))?;
                Ok(SigningKey(key))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file =
                    options.open(&path).map_err(|error| data_dir_error(format!("{}: {error}", path.display())))?;
                file.write_all(format!("{}\n", hex::encode(key)).as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|error| data_dir_error(format!("{}: {error}", path.display())))?;
                Ok(SigningKey(key))
            }
            Err(error) => Err(data_dir_error(format!("{}: {error}", path.display()))),
        }
    }

    fn derive(&self, label: &str, access_key_id: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(access_key_id.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn secret_for(&self, access_key_id: &str) -> String {
        hex::encode(&self.derive("secret", access_key_id)[..20])
    }

    pub fn session_token_for(&self, access_key_id: &str) -> String {
        hex::encode(self.derive("session", access_key_id))
    }

    /// Whether `presented` is the session token of `access_key_id`, compared in constant time.
    pub fn session_token_matches(&self, access_key_id: &str, presented: &str) -> bool {
        self.session_token_for(access_key_id).as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

/// Where the embedded endpoint is reached and what it serves.
#[derive(Debug, Clone)]
pub struct EmbeddedStoreSettings {
    pub endpoint_url: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
}

/// Mints keys for the embedded endpoint, which enforces them (see `s3_endpoint.rs`).
pub struct EmbeddedBroker {
    /// Where minted keys are recorded: the endpoint admits recorded keys only.
    pub state: std::sync::Arc<dyn State>,
    /// What a key's expiry counts from.
    pub clock: proto::clock::SharedClock,
    pub signing_key: std::sync::Arc<SigningKey>,
    pub settings: EmbeddedStoreSettings,
    pub ttl: Duration,
}

impl EmbeddedBroker {
    /// Mints a key for `project` that expires at `expires_unix`, recorded as issued to
    /// `token_id` (empty: the project token) before anyone holds it, so revoking the token
    /// revokes it.
    pub async fn mint(
        &self,
        project: &str,
        access: KeyAccess,
        expires_unix: i64,
        token_id: &str,
    ) -> Result<IssuedCredentials, Error> {
        let mut id_bytes = [0u8; 10];
        rand::rngs::OsRng.fill_bytes(&mut id_bytes);
        let access_key_id = format!("LC{}", hex::encode_upper(id_bytes));
        let record =
            MintedKeyRecord { project: project.to_owned(), access, expires_unix, token_id: token_id.to_owned() };
        self.state.insert_minted_key(&access_key_id, &record).await?;
        self.state.key_durable(access).await?;
        Ok(self.credentials(project, access, access_key_id, expires_unix))
    }

    /// What a worker needs to use a minted key.
    fn credentials(
        &self,
        project: &str,
        access: KeyAccess,
        access_key_id: String,
        expires_unix: i64,
    ) -> IssuedCredentials {
        IssuedCredentials {
            secret_access_key: self.signing_key.secret_for(&access_key_id),
            session_token: self.signing_key.session_token_for(&access_key_id),
            access_key_id,
            expires_unix,
            endpoint_url: self.settings.endpoint_url.clone(),
            region: self.settings.region.clone(),
            bucket: self.settings.bucket.clone(),
            prefix: project_prefix(&self.settings.prefix, project),
            path_style: true,
            access,
            // On loopback over plain HTTP, aws-sdk-s3's default upload checksums cost a full
            // extra SHA-256 pass (measured: a third of a save's CPU); every blob is verified by
            // its digest end to end instead (spooled, committed by size, restored by sha256).
            checksum_mode: ChecksumMode::WhenRequired.api_name(),
        }
    }
}

#[async_trait::async_trait]
impl CredentialBroker for EmbeddedBroker {
    async fn issue(&self, project: &str, access: KeyAccess, token_id: &str) -> Result<IssuedCredentials, Error> {
        self.mint(project, access, self.clock.now_unix() + self.ttl.as_secs() as i64, token_id).await
    }

    fn records_keys(&self) -> bool {
        true
    }

    /// The embedded endpoint (s3s-fs) binds a multipart upload to the key that began it, so a
    /// live key of the same project, access and token is extended rather than replaced. Any
    /// other recorded key (expired, read for write) gets new credentials instead; an unrecorded
    /// one (revoked) or another token's is refused before this, by the service.
    async fn renew(
        &self,
        project: &str,
        access: KeyAccess,
        access_key_id: &str,
        token_id: &str,
    ) -> Result<IssuedCredentials, Error> {
        let now_unix = self.clock.now_unix();
        let expires_unix = now_unix + self.ttl.as_secs() as i64;
        match self.state.minted_key(access_key_id).await? {
            Some(record)
                if record.project == project
                    && record.access == access
                    && record.token_id == token_id
                    && record.expires_unix > now_unix =>
            {
                self.state.insert_minted_key(access_key_id, &MintedKeyRecord { expires_unix, ..record }).await?;
                self.state.key_durable(access).await?;
                Ok(self.credentials(project, access, access_key_id.to_owned(), expires_unix))
            }
            _ => self.mint(project, access, expires_unix, token_id).await,
        }
    }
}

/// The partition of an ARN (`aws`, `aws-cn`, `aws-us-gov`), for resource ARNs in policies.
fn partition(role_arn: &str) -> &str {
    role_arn.split(':').nth(1).unwrap_or("aws")
}

/// The inline session policy for one project and use: objects under `<prefix>/<project>/` only;
/// reads for a restore; for a save also writes of blobs (`blobs/sha256/…`) and the multipart
/// operations; never a delete, never a listing. With `conditional_writes` (a store that takes
/// checksums and conditional headers: S3 itself) a PUT or a multipart completion must carry
/// `If-None-Match: *`, so a stored blob is never replaced, whoever holds the key; beginning an
/// upload and its parts carry no such header (S3's `s3:ObjectCreationOperation` is false for
/// them) and stay allowed.
pub fn session_policy(
    role_arn: &str,
    bucket: &str,
    store_prefix: &str,
    project: &str,
    access: KeyAccess,
    conditional_writes: bool,
) -> String {
    let project_objects =
        format!("arn:{}:s3:::{bucket}/{}", partition(role_arn), project_prefix(store_prefix, project));
    let (resource, blobs) = (format!("{project_objects}*"), format!("{}*", blobs_prefix(&project_objects)));
    let mut statements = vec![serde_json::json!({
        "Sid": "ReadProjectBlobs",
        "Effect": "Allow",
        "Action": ["s3:GetObject"],
        "Resource": [resource],
    })];
    if access == KeyAccess::Write {
        let write = |sid: &str, condition: Option<serde_json::Value>| {
            let mut statement = serde_json::json!({
                "Sid": sid,
                "Effect": "Allow",
                "Action": ["s3:PutObject"],
                "Resource": [blobs],
            });
            if let Some(condition) = condition {
                statement["Condition"] = condition;
            }
            statement
        };
        if conditional_writes {
            statements.push(write(
                "WriteNewBlobsOnly",
                Some(serde_json::json!({ "StringEquals": { "s3:if-none-match": "*" } })),
            ));
            statements.push(write(
                "BeginUploadsAndParts",
                Some(serde_json::json!({ "Bool": { "s3:ObjectCreationOperation": "false" } })),
            ));
        } else {
            statements.push(write("WriteProjectBlobs", None));
        }
        statements.push(serde_json::json!({
            "Sid": "MultipartBookkeeping",
            "Effect": "Allow",
            "Action": ["s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
            "Resource": [blobs],
        }));
    }
    serde_json::json!({ "Version": "2012-10-17", "Statement": statements }).to_string()
}

/// The session's name, which CloudTrail shows: `layer-cache-<project>`, within STS's 64
/// characters of `[\w+=,.@-]` (project names are a subset).
pub fn role_session_name(project: &str) -> String {
    format!("layer-cache-{project}").chars().take(64).collect()
}

/// Hands out STS session credentials for an S3 store.
pub struct StsBroker {
    pub client: aws_sdk_sts::Client,
    pub settings: S3Settings,
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    pub ttl: Duration,
}

impl StsBroker {
    pub fn new(
        sdk_config: &aws_config::SdkConfig,
        settings: S3Settings,
        bucket: &str,
        prefix: &str,
        region: &str,
        ttl: Duration,
    ) -> StsBroker {
        let mut config = aws_sdk_sts::config::Builder::from(sdk_config);
        if let Some(endpoint) = &settings.sts_endpoint {
            config = config.endpoint_url(endpoint);
        }
        StsBroker {
            client: aws_sdk_sts::Client::from_conf(config.build()),
            settings,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            region: region.to_owned(),
            ttl,
        }
    }

    async fn assume_role(&self, project: &str, access: KeyAccess) -> Result<IssuedCredentials, Error> {
        let role_arn = &self.settings.sts_role_arn;
        let tag =
            aws_sdk_sts::types::Tag::builder().key("layer-cache-project").value(project).build().map_err(|error| {
                Error::Credentials { what: "building the STS session tag".into(), source: Some(error.into()) }
            })?;
        let response = self
            .client
            .assume_role()
            .role_arn(role_arn)
            .role_session_name(role_session_name(project))
            .policy(session_policy(
                role_arn,
                &self.bucket,
                &self.prefix,
                project,
                access,
                self.settings.checksums == ChecksumMode::WhenSupported,
            ))
            .duration_seconds(self.ttl.as_secs() as i32)
            .tags(tag)
            .send()
            .await
            .map_err(|error| {
                Error::credentials(format!("STS AssumeRole of {role_arn} failed: {}", sdk_error_line(&error)))
            })?;
        let credentials =
            response.credentials().ok_or_else(|| Error::credentials("STS AssumeRole returned no credentials"))?;
        Ok(IssuedCredentials {
            access_key_id: credentials.access_key_id().to_owned(),
            secret_access_key: credentials.secret_access_key().to_owned(),
            session_token: credentials.session_token().to_owned(),
            expires_unix: credentials.expiration().secs(),
            endpoint_url: self.settings.endpoint.clone().unwrap_or_default(),
            region: self.region.clone(),
            bucket: self.bucket.clone(),
            prefix: project_prefix(&self.prefix, project),
            path_style: self.settings.path_style,
            access,
            checksum_mode: self.settings.checksums.api_name(),
        })
    }

    /// Assumes the role once at start-up, so a wrong role or missing permission is a start-up
    /// error rather than a failure at the first build.
    pub async fn check(&self) -> Result<(), Error> {
        self.assume_role("start-up-check", KeyAccess::Read).await.map(|_| ())
    }
}

#[async_trait::async_trait]
impl CredentialBroker for StsBroker {
    async fn issue(&self, project: &str, access: KeyAccess, token_id: &str) -> Result<IssuedCredentials, Error> {
        let _ = token_id;
        self.assume_role(project, access).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "arn:aws:iam::123456789012:role/layer-cache";

    #[test]
    fn a_restore_may_only_read_its_projects_blobs() {
        let policy: serde_json::Value =
            serde_json::from_str(&session_policy(ROLE, "platform-cache", "cache", "web", KeyAccess::Read, true))
                .unwrap();
        assert_eq!(
            policy,
            serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{
                    "Sid": "ReadProjectBlobs",
                    "Effect": "Allow",
                    "Action": ["s3:GetObject"],
                    "Resource": ["arn:aws:s3:::platform-cache/cache/web/*"],
                }],
            })
        );
    }

    #[test]
    fn a_save_adds_writes_and_multipart_but_never_deletes_or_lists() {
        let text = session_policy("arn:aws-cn:iam::123456789012:role/r", "b", "p/q", "web", KeyAccess::Write, false);
        let policy: serde_json::Value = serde_json::from_str(&text).unwrap();
        let blobs = serde_json::json!(["arn:aws-cn:s3:::b/p/q/web/blobs/sha256/*"]);
        assert_eq!(
            policy["Statement"][1],
            serde_json::json!({ "Sid": "WriteProjectBlobs", "Effect": "Allow", "Action": ["s3:PutObject"], "Resource": blobs })
        );
        assert_eq!(
            policy["Statement"][2]["Action"],
            serde_json::json!(["s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"])
        );
        assert!(!text.contains("Delete") && !text.contains("ListBucket") && !text.contains("\"s3:*\""));
    }

    #[test]
    fn on_s3_a_save_writes_only_blobs_not_yet_stored() {
        let text = session_policy(ROLE, "b", "cache", "web", KeyAccess::Write, true);
        let policy: serde_json::Value = serde_json::from_str(&text).unwrap();
        let statements = policy["Statement"].as_array().unwrap();
        let puts: Vec<&serde_json::Value> =
            statements.iter().filter(|s| s["Action"] == serde_json::json!(["s3:PutObject"])).collect();
        assert_eq!(puts.len(), 2, "{text}");
        assert_eq!(puts[0]["Condition"], serde_json::json!({ "StringEquals": { "s3:if-none-match": "*" } }));
        assert_eq!(puts[1]["Condition"], serde_json::json!({ "Bool": { "s3:ObjectCreationOperation": "false" } }));
        assert!(
            puts.iter().all(|put| put["Resource"] == serde_json::json!(["arn:aws:s3:::b/cache/web/blobs/sha256/*"]))
        );
    }

    #[test]
    fn no_valid_project_name_escapes_its_prefix() {
        for project in ["a", "web.v2", "a-b", "x..y", &"z".repeat(63)] {
            proto::names::validate_project_name(project).unwrap();
            let policy: serde_json::Value =
                serde_json::from_str(&session_policy(ROLE, "b", "cache", project, KeyAccess::Write, true)).unwrap();
            for statement in policy["Statement"].as_array().unwrap() {
                let resource = statement["Resource"][0].as_str().unwrap();
                // One wildcard, at the end, inside the project's own folder.
                assert!(resource.starts_with(&format!("arn:aws:s3:::b/cache/{project}/")), "{resource}");
                assert!(resource.ends_with('*') && resource.matches(['*', '?']).count() == 1, "{resource}");
            }
        }
        // Names that would widen the resource never pass validation.
        for bad in ["*", "a*", "a?b", "..", "a/b", ""] {
            assert!(proto::names::validate_project_name(bad).is_err(), "{bad}");
        }
        assert_eq!(role_session_name("web"), "layer-cache-web");
        assert_eq!(role_session_name(&"z".repeat(63)).len(), 64);
    }

    #[test]
    fn secrets_derive_from_the_signing_key_and_survive_reloading() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::load_or_create(dir.path()).unwrap();
        let reloaded = SigningKey::load_or_create(dir.path()).unwrap();
        assert_eq!(key.secret_for("LC1"), reloaded.secret_for("LC1"));
        assert_ne!(key.secret_for("LC1"), key.secret_for("LC2"));
        assert_ne!(key.secret_for("LC1"), key.session_token_for("LC1")[..40]);
        assert!(key.session_token_matches("LC1", &reloaded.session_token_for("LC1")));
        assert!(!key.session_token_matches("LC1", &key.session_token_for("LC2")));
        assert!(!key.session_token_matches("LC1", ""));
    }

    #[tokio::test]
    async fn minted_keys_are_recorded_with_their_scope() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::state::Database::open(dir.path()).unwrap();
        let clock = proto::clock::ManualClock::at(1_000_000);
        let broker = crate::service::tests::embedded_broker_on(dir.path(), &db, clock.clone());
        let issued = broker.mint("web", KeyAccess::Read, 1234, "").await.unwrap();
        assert_eq!(issued.prefix, "cache/web/");
        assert!(!format!("{issued:?}").contains(&issued.secret_access_key));
        assert!(!format!("{issued:?}").contains(&issued.session_token));
        let record = db.minted_key(&issued.access_key_id).await.unwrap().unwrap();
        assert_eq!(
            record,
            MintedKeyRecord {
                project: "web".into(),
                access: KeyAccess::Read,
                expires_unix: 1234,
                token_id: String::new()
            }
        );

        // Expiry counts from the broker's clock: a live key is extended, an expired one replaced.
        let write = broker.issue("web", KeyAccess::Write, "tok_1").await.unwrap();
        assert_eq!(write.expires_unix, 1_000 + 900);
        let record = db.minted_key(&write.access_key_id).await.unwrap().unwrap();
        assert_eq!(record.token_id, "tok_1", "a key is recorded with its token before it is handed out");
        clock.advance(Duration::from_secs(600));
        let extended = broker.renew("web", KeyAccess::Write, &write.access_key_id, "tok_1").await.unwrap();
        assert_eq!(
            (extended.access_key_id.as_str(), extended.expires_unix),
            (write.access_key_id.as_str(), 1_600 + 900)
        );
        // Another token never extends it (nor learns its secret): it gets a key of its own.
        let other = broker.renew("web", KeyAccess::Write, &write.access_key_id, "tok_2").await.unwrap();
        assert_ne!(other.access_key_id, write.access_key_id);
        assert_eq!(db.minted_key(&write.access_key_id).await.unwrap().unwrap().token_id, "tok_1");
        clock.advance(Duration::from_secs(901));
        let replaced = broker.renew("web", KeyAccess::Write, &write.access_key_id, "tok_1").await.unwrap();
        assert_ne!(replaced.access_key_id, write.access_key_id);
    }
}
