//! Bearer tokens: project tokens (random, 256 bits, kept only as a SHA-256) and the admin
//! token, compared in constant time.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;

const PROJECT_TOKEN_PREFIX: &str = "cct_";
const ADMIN_TOKEN_FILE: &str = "admin-token";

/// 32 random bytes from the operating system, as 64 hex digits.
pub fn random_hex_32() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A new token for `project`: `cct_<project>_<64 hex>`. The project name is inside so the
/// coordinator finds the record to compare with; project names never contain `_`.
pub fn new_project_token(project: &str) -> String {
    format!("{PROJECT_TOKEN_PREFIX}{project}_{}", random_hex_32())
}

/// The project a token claims to belong to, if it has a project token's shape.
pub fn project_of_token(token: &str) -> Option<&str> {
    let (project, secret) = token.strip_prefix(PROJECT_TOKEN_PREFIX)?.split_once('_')?;
    proto::names::validate_project_name(project).ok()?;
    (secret.len() == 64).then_some(project)
}

pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `token` hashes to `expected_sha256_hex`, compared in constant time.
pub fn token_matches(token: &str, expected_sha256_hex: &str) -> bool {
    sha256_hex(token).as_bytes().ct_eq(expected_sha256_hex.as_bytes()).into()
}

/// The admin token as the coordinator holds it: only its hash, plus where it was written when
/// the coordinator generated it.
pub struct AdminToken {
    pub sha256_hex: String,
    /// Set when the token was generated into (or read from) the data directory.
    pub file: Option<PathBuf>,
}

/// Takes the admin token from `from_env` (`CACHE_ADMIN_TOKEN`) or, without one, reads the token
/// generated into the data directory, generating it (mode 0600) on first start.
pub fn load_or_create_admin_token(data_dir: &Path, from_env: Option<&str>) -> Result<AdminToken, Error> {
    if let Some(token) = from_env {
        proto::names::validate_token(token)
            .map_err(|error| Error::InvalidArgument(format!("CACHE_ADMIN_TOKEN: {error}")))?;
        return Ok(AdminToken { sha256_hex: sha256_hex(token), file: None });
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let data_dir_error = |error: std::io::Error| Error::DataDir {
        path: data_dir.to_path_buf(),
        reason: format!("{}: {error}", path.display()),
    };
    match std::fs::read_to_string(&path) {
        Ok(contents) => {
            let token = contents.trim();
            proto::names::validate_token(token).map_err(|error| Error::DataDir {
                path: data_dir.to_path_buf(),
                reason: format!("{}: {error}", path.display()),
            })?;
            Ok(AdminToken { sha256_hex: sha256_hex(token), file: Some(path) })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let token = format!("cca_{}", random_hex_32());
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path).map_err(data_dir_error)?;
            file.write_all(format!("{token}\n").as_bytes()).and_then(|()| file.sync_all()).map_err(data_dir_error)?;
            Ok(AdminToken { sha256_hex: sha256_hex(&token), file: Some(path) })
        }
        Err(error) => Err(data_dir_error(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_tokens_carry_their_project_and_256_random_bits() {
        let token = new_project_token("my-app.v2");
        assert_eq!(project_of_token(&token), Some("my-app.v2"));
        assert_ne!(token, new_project_token("my-app.v2"));
        assert!(proto::names::validate_token(&token).is_ok());
        assert!(token_matches(&token, &sha256_hex(&token)));
        assert!(!token_matches(&new_project_token("my-app.v2"), &sha256_hex(&token)));
        assert_eq!(project_of_token("cct_web_short"), None);
        assert_eq!(project_of_token(&format!("cct_../x_{}", "a".repeat(64))), None);
    }

    #[test]
    fn the_admin_token_is_generated_once_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_admin_token(dir.path(), None).unwrap();
        let second = load_or_create_admin_token(dir.path(), None).unwrap();
        assert_eq!(first.sha256_hex, second.sha256_hex);
        let path = first.file.unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        assert!(token_matches(written.trim(), &second.sha256_hex));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let from_env = load_or_create_admin_token(dir.path(), Some("an-operator-chosen-token")).unwrap();
        assert_eq!(from_env.file, None);
        assert!(matches!(load_or_create_admin_token(dir.path(), Some("bad token")), Err(Error::InvalidArgument(_))));
    }
}
