//! The embedded S3 endpoint: s3s over s3s-fs, storing objects under the data directory, with
//! every request checked against the minted key that signed it (SigV4 signature by s3s; expiry,
//! session token and scope here).

use std::sync::Arc;

use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::path::S3Path;
use s3s::{S3Result, s3_error};

use crate::credentials::{SigningKey, now_unix, project_prefix};
use crate::manifests::{Database, MintedKeyRecord};
use crate::metrics::{Metrics, ProjectLabels};
use crate::scope::{KeyScope, Target, authorize};

/// The header, and the presigned-URL query parameter, that carry the session token.
const SESSION_TOKEN_HEADER: &str = "x-amz-security-token";
const SESSION_TOKEN_QUERY: &str = "X-Amz-Security-Token";

/// Looks up minted keys for s3s's signature check.
struct MintedKeyAuth {
    db: Database,
    signing_key: Arc<SigningKey>,
}

fn live_record(db: &Database, access_key_id: &str) -> S3Result<MintedKeyRecord> {
    let record = db
        .minted_key(access_key_id)
        .map_err(|error| s3_error!(InternalError, "{error}"))?
        .ok_or_else(|| s3_error!(InvalidAccessKeyId, "the access key is not one this endpoint minted"))?;
    if record.expires_unix <= now_unix() {
        return Err(s3_error!(ExpiredToken, "the access key has expired: ask the coordinator for new credentials"));
    }
    Ok(record)
}

#[async_trait::async_trait]
impl S3Auth for MintedKeyAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        live_record(&self.db, access_key)?;
        Ok(SecretKey::from(self.signing_key.secret_for(access_key)))
    }
}

/// Checks expiry, session token and scope of every signed request.
struct MintedKeyAccess {
    metrics: Arc<Metrics>,
    db: Database,
    signing_key: Arc<SigningKey>,
    bucket: String,
    store_prefix: String,
}

fn query_parameter(cx: &S3AccessContext<'_>, name: &str) -> Option<String> {
    let query = cx.uri().query()?;
    form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
}

#[async_trait::async_trait]
impl S3Access for MintedKeyAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let Some(credentials) = cx.credentials() else {
            return Err(s3_error!(AccessDenied, "requests must be signed with credentials from the coordinator"));
        };
        let access_key_id = credentials.access_key.clone();
        let record = live_record(&self.db, &access_key_id)?;

        let presented_token = match cx.headers().get(SESSION_TOKEN_HEADER) {
            Some(value) => value.to_str().ok().map(str::to_owned),
            None => query_parameter(cx, SESSION_TOKEN_QUERY),
        };
        let token_ok =
            presented_token.is_some_and(|token| self.signing_key.session_token_matches(&access_key_id, &token));
        let refused =
            || self.metrics.storage_refusals.get_or_create(&ProjectLabels { project: record.project.clone() }).inc();
        if !token_ok {
            refused();
            tracing::warn!(
                access_key_id,
                project = record.project,
                "storage request refused: missing or wrong session token"
            );
            return Err(s3_error!(InvalidToken, "the session token is missing or does not belong to the access key"));
        }

        let project_prefix = project_prefix(&self.store_prefix, &record.project);
        let scope = KeyScope { bucket: &self.bucket, project_prefix: &project_prefix, access: record.access };
        let list_prefix = query_parameter(cx, "prefix");
        let target = match cx.s3_path() {
            S3Path::Root => Target::Root,
            S3Path::Bucket { bucket } => Target::Bucket { bucket, list_prefix: list_prefix.as_deref() },
            S3Path::Object { bucket, key } => Target::Object { bucket, key },
        };
        let operation = cx.s3_op().name();
        authorize(scope, operation, target).map_err(|reason| {
            refused();
            tracing::warn!(access_key_id, project = record.project, operation, reason, "storage request refused");
            s3_error!(AccessDenied, "{reason}")
        })
    }
}

/// Builds the endpoint's HTTP service over the objects in `objects_root`.
pub fn build_service(
    metrics: Arc<Metrics>,
    objects_root: &std::path::Path,
    db: Database,
    signing_key: Arc<SigningKey>,
    bucket: &str,
    store_prefix: &str,
) -> std::io::Result<s3s::service::S3Service> {
    let file_system =
        s3s_fs::FileSystem::new(objects_root).map_err(|error| std::io::Error::other(format!("{error:?}")))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(file_system);
    builder.set_auth(MintedKeyAuth { db: db.clone(), signing_key: signing_key.clone() });
    builder.set_access(MintedKeyAccess {
        metrics,
        db,
        signing_key,
        bucket: bucket.to_owned(),
        store_prefix: store_prefix.to_owned(),
    });
    Ok(builder.build())
}
