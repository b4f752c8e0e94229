//! The credential broker: temporary object-store credentials scoped to one project's prefix.
//!
//! With the embedded store the coordinator mints keys itself: each key's record (project,
//! access, expiry) lives in sled, and its secret and session token are derived from a signing
//! key in the data directory, so no secret is stored and minted keys survive a restart.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::Error;
use crate::manifests::{Database, KeyAccess, MintedKeyRecord};

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
    async fn issue(&self, project: &str, access: KeyAccess) -> Result<IssuedCredentials, Error>;
}

pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// Where a project's objects live: `<prefix>/<project>/`.
pub fn project_prefix(store_prefix: &str, project: &str) -> String {
    if store_prefix.is_empty() { format!("{project}/") } else { format!("{store_prefix}/{project}/") }
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
    pub db: Database,
    pub signing_key: std::sync::Arc<SigningKey>,
    pub settings: EmbeddedStoreSettings,
    pub ttl: Duration,
}

impl EmbeddedBroker {
    /// Mints a key for `project` that expires at `expires_unix`.
    pub fn mint(&self, project: &str, access: KeyAccess, expires_unix: i64) -> Result<IssuedCredentials, Error> {
        let mut id_bytes = [0u8; 10];
        rand::rngs::OsRng.fill_bytes(&mut id_bytes);
        let access_key_id = format!("LC{}", hex::encode_upper(id_bytes));
        let record = MintedKeyRecord { project: project.to_owned(), access, expires_unix };
        self.db.insert_minted_key(&access_key_id, &record)?;
        Ok(IssuedCredentials {
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
        })
    }
}

#[async_trait::async_trait]
impl CredentialBroker for EmbeddedBroker {
    async fn issue(&self, project: &str, access: KeyAccess) -> Result<IssuedCredentials, Error> {
        self.mint(project, access, now_unix() + self.ttl.as_secs() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn minted_keys_are_recorded_with_their_scope() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        let broker = EmbeddedBroker {
            db: db.clone(),
            signing_key: std::sync::Arc::new(SigningKey::load_or_create(dir.path()).unwrap()),
            settings: EmbeddedStoreSettings {
                endpoint_url: "http://127.0.0.1:7401".into(),
                region: "us-east-1".into(),
                bucket: "layer-cache".into(),
                prefix: "cache".into(),
            },
            ttl: Duration::from_secs(900),
        };
        let issued = broker.mint("web", KeyAccess::Read, 1234).unwrap();
        assert_eq!(issued.prefix, "cache/web/");
        assert!(!format!("{issued:?}").contains(&issued.secret_access_key));
        assert!(!format!("{issued:?}").contains(&issued.session_token));
        let record = db.minted_key(&issued.access_key_id).unwrap().unwrap();
        assert_eq!(record, MintedKeyRecord { project: "web".into(), access: KeyAccess::Read, expires_unix: 1234 });
    }
}
