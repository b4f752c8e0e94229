//! Bearer tokens: project tokens (random, 256 bits, kept only as a SHA-256) and the admin
//! token, compared in constant time.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;

/// A worker token, authenticated.
#[derive(Debug, Clone)]
pub struct Principal {
    pub project: String,
    /// The scoped token's ID; empty for the project token.
    pub token_id: String,
    /// `None`: the project token, which may read and write every branch.
    pub scope: Option<BranchScope>,
    /// The SHA-256 of the token presented, to check it is still live inside a step of the
    /// state and when a key is minted.
    pub token_sha256_hex: String,
}

impl Principal {
    /// The token, as a step of the state checks it is still live.
    pub fn holder(&self) -> crate::state::Holder<'_> {
        crate::state::Holder { token_sha256_hex: &self.token_sha256_hex, token_id: &self.token_id }
    }

    /// Refuses a lookup of a branch the token may not read.
    pub fn check_read(&self, branch: &str) -> Result<(), Error> {
        match &self.scope {
            Some(scope) if !scope.may_read(branch) => Err(Error::OutOfScope(format!(
                "token {} may read {} only, not {}",
                self.token_id,
                BranchScope::describe(&[scope.read.clone(), scope.write.clone()].concat()),
                branch_for_people(branch)
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses a save to a branch the token may not write.
    pub fn check_write(&self, branch: &str) -> Result<(), Error> {
        match &self.scope {
            Some(scope) if !scope.may_write(branch) => Err(Error::OutOfScope(format!(
                "token {} may save to {} only, not to {}",
                self.token_id,
                BranchScope::describe(&scope.write),
                branch_for_people(branch)
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses write credentials to a token that may write no branch.
    pub fn check_writes_some(&self) -> Result<(), Error> {
        match &self.scope {
            Some(scope) if scope.write.is_empty() => {
                Err(Error::OutOfScope(format!("token {} may only read: it gets no write credentials", self.token_id)))
            }
            _ => Ok(()),
        }
    }
}

/// How long a check of a worker's token is reused (unix milliseconds): a worker's calls come
/// seconds apart, and its project's other hosts share its token.
const TOKEN_CHECK_REUSE_MS: i64 = 10_000;
/// Token checks kept at most; beyond, the oldest are forgotten first.
const MOST_RECENT_TOKEN_CHECKS: usize = 10_000;

/// The token checks this process made lately, by the token's SHA-256: a worker's call reuses
/// one for [`TOKEN_CHECK_REUSE_MS`] instead of reading the project's record and its scoped
/// token again (one database transaction a call on PostgreSQL). What a check finds never
/// changes for a token (its project, ID, scope and expiry are fixed when it is made) but
/// whether it is still live, and that is checked again wherever it matters: inside each begin,
/// commit and lookup's own step of the state ([`crate::state::Holder`]), and before a key is
/// minted. A revocation or rotation through this process forgets its project's checks at once;
/// through another replica, a keep-alive, an abandon or a metrics report with the old token is
/// taken for up to the reuse time more.
pub struct RecentTokens {
    checks: std::sync::Mutex<std::collections::HashMap<String, RecentCheck>>,
    /// Held while a token is checked, by a slot its hash picks: the workers of a project that
    /// call at once (a coordinator's restart, a burst of jobs) make one check of their token
    /// between them, not one each.
    checking: [tokio::sync::Mutex<()>; CHECKING_SLOTS],
}

/// Slots of [`RecentTokens::checking`]: checks of different tokens rarely wait for each other.
const CHECKING_SLOTS: usize = 64;

impl Default for RecentTokens {
    fn default() -> RecentTokens {
        RecentTokens { checks: Default::default(), checking: std::array::from_fn(|_| Default::default()) }
    }
}

struct RecentCheck {
    principal: Principal,
    /// The scoped token's expiry (unix seconds; 0: none), checked on each reuse.
    expires_unix: i64,
    checked_unix_ms: i64,
}

impl RecentTokens {
    /// The principal, and its token's expiry, of a check of the token hashing to `sha256_hex`
    /// made less than the reuse time before `now_unix_ms`.
    pub fn get(&self, sha256_hex: &str, now_unix_ms: i64) -> Option<(Principal, i64)> {
        let checks = self.checks.lock().expect("token checks");
        let check = checks.get(sha256_hex)?;
        let fresh = (0..TOKEN_CHECK_REUSE_MS).contains(&now_unix_ms.saturating_sub(check.checked_unix_ms));
        fresh.then(|| (check.principal.clone(), check.expires_unix))
    }

    /// Waits until no other check of the token hashing to `sha256_hex` runs (nor of a token
    /// sharing its slot), and holds that until the guard drops: a caller that misses asks
    /// [`RecentTokens::get`] again under it before it checks.
    pub async fn checking(&self, sha256_hex: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let slot = sha256_hex.bytes().fold(0usize, |slot, byte| slot.wrapping_mul(31).wrapping_add(byte as usize));
        self.checking[slot % CHECKING_SLOTS].lock().await
    }

    /// Keeps a check made at `now_unix_ms`.
    pub fn put(&self, principal: Principal, expires_unix: i64, now_unix_ms: i64) {
        let mut checks = self.checks.lock().expect("token checks");
        if checks.len() >= MOST_RECENT_TOKEN_CHECKS {
            checks.retain(|_, check| now_unix_ms.saturating_sub(check.checked_unix_ms) < TOKEN_CHECK_REUSE_MS);
        }
        if checks.len() >= MOST_RECENT_TOKEN_CHECKS {
            checks.clear();
        }
        let key = principal.token_sha256_hex.clone();
        checks.insert(key, RecentCheck { principal, expires_unix, checked_unix_ms: now_unix_ms });
    }

    /// Forgets every check of `project`'s tokens.
    pub fn forget_project(&self, project: &str) {
        self.checks.lock().expect("token checks").retain(|_, check| check.principal.project != project);
    }
}

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

/// Whether two SHA-256 hex digests are the same, compared in constant time.
pub fn token_matches_hash(sha256_hex: &str, expected_sha256_hex: &str) -> bool {
    sha256_hex.as_bytes().ct_eq(expected_sha256_hex.as_bytes()).into()
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

/// The branches a scoped token may read (look up, restore) and write (save). A pattern is a
/// branch name in which `*` stands for any run of characters; `*` alone also matches the
/// default entry (no branch), which the empty pattern matches too.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BranchScope {
    pub read: Vec<String>,
    pub write: Vec<String>,
}

/// The most patterns of each kind one token carries.
pub const MOST_PATTERNS: usize = 16;

/// Checks a branch pattern: a branch name's characters, `*` anywhere, or empty.
pub fn validate_branch_pattern(pattern: &str) -> Result<(), Error> {
    let plain = pattern.replace('*', "a");
    let ok = pattern.is_empty() || pattern == "*" || proto::names::validate_branch_name(&plain).is_ok();
    if !ok || pattern.len() > 63 {
        return Err(Error::InvalidArgument(format!(
            "invalid branch pattern {pattern:?}: use a branch name, with '*' for any run of characters"
        )));
    }
    Ok(())
}

/// Whether `branch` matches the glob `pattern` (`*`: any run of characters, possibly none).
pub fn branch_matches(pattern: &str, branch: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = branch.strip_prefix(first) else { return false };
    let mut parts: Vec<&str> = parts.collect();
    let Some(last) = parts.pop() else { return rest.is_empty() };
    for part in parts {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

impl BranchScope {
    pub fn validate(&self) -> Result<(), Error> {
        if self.read.len() > MOST_PATTERNS || self.write.len() > MOST_PATTERNS {
            return Err(Error::InvalidArgument(format!(
                "a token carries at most {MOST_PATTERNS} patterns of each kind"
            )));
        }
        if self.read.is_empty() && self.write.is_empty() {
            return Err(Error::InvalidArgument(
                "a scoped token needs at least one --read-branch or --write-branch pattern".into(),
            ));
        }
        self.read.iter().chain(&self.write).try_for_each(|pattern| validate_branch_pattern(pattern))
    }

    /// Whether a cache of `branch` may be read: a branch it may write it may also read.
    pub fn may_read(&self, branch: &str) -> bool {
        self.read.iter().chain(&self.write).any(|pattern| branch_matches(pattern, branch))
    }

    pub fn may_write(&self, branch: &str) -> bool {
        self.write.iter().any(|pattern| branch_matches(pattern, branch))
    }

    /// The patterns for a person: `pr-*, main` or `nothing`.
    pub fn describe(patterns: &[String]) -> String {
        if patterns.is_empty() {
            return "nothing".into();
        }
        let shown: Vec<String> =
            patterns.iter().map(|p| if p.is_empty() { "the default branch".to_owned() } else { p.clone() }).collect();
        shown.join(", ")
    }
}

/// A branch for a person.
pub fn branch_for_people(branch: &str) -> String {
    if branch.is_empty() { "the default branch".to_owned() } else { format!("branch {branch:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal_of(project: &str, sha256_hex: &str) -> Principal {
        let (project, token_sha256_hex) = (project.to_owned(), sha256_hex.to_owned());
        Principal { project, token_id: String::new(), scope: None, token_sha256_hex }
    }

    #[test]
    fn a_token_check_is_reused_for_a_while_then_made_again() {
        let recent = RecentTokens::default();
        recent.put(principal_of("web", "aa"), 0, 1_000);
        recent.put(principal_of("api", "bb"), 77, 1_000);
        assert_eq!(recent.get("aa", 1_000).map(|(p, _)| p.project), Some("web".into()));
        assert_eq!(recent.get("bb", 1_000 + TOKEN_CHECK_REUSE_MS - 1).map(|(_, e)| e), Some(77));
        assert!(recent.get("bb", 1_000 + TOKEN_CHECK_REUSE_MS).is_none(), "stale");
        assert!(recent.get("aa", 999).is_none(), "a clock that went back reuses nothing");
        assert!(recent.get("cc", 1_000).is_none());
        recent.forget_project("web");
        assert!(recent.get("aa", 1_000).is_none(), "a revocation here forgets its project's checks");
        assert!(recent.get("bb", 1_000).is_some(), "and no other project's");
        for n in 0..MOST_RECENT_TOKEN_CHECKS + 5 {
            recent.put(principal_of("many", &format!("{n:x}")), 0, 2_000);
        }
        assert!(recent.checks.lock().unwrap().len() <= MOST_RECENT_TOKEN_CHECKS, "bounded");
    }

    #[test]
    fn branch_patterns_match_as_globs() {
        for (pattern, branch, matches) in [
            ("pr-*", "pr-12", true),
            ("pr-*", "pr-", true),
            ("pr-*", "main", false),
            ("pr-*", "", false),
            ("main", "main", true),
            ("main", "main2", false),
            ("*", "", true),
            ("*", "anything", true),
            ("", "", true),
            ("", "main", false),
            ("release-*-rc", "release-1.2-rc", true),
            ("release-*-rc", "release-1.2-rc1", false),
            ("*-rc", "1-rc", true),
            ("a*a", "a", false),
        ] {
            assert_eq!(branch_matches(pattern, branch), matches, "{pattern:?} {branch:?}");
        }
        let scope = BranchScope { read: vec!["main".into()], write: vec!["pr-*".into()] };
        assert!(scope.may_read("main") && scope.may_read("pr-3") && !scope.may_read("dev"));
        assert!(scope.may_write("pr-3") && !scope.may_write("main") && !scope.may_write(""));
        assert!(scope.validate().is_ok());
        assert!(BranchScope::default().validate().is_err());
        for bad in ["../x", "PR-*", "a b", "**/x"] {
            assert!(validate_branch_pattern(bad).is_err(), "{bad}");
        }
        assert!(validate_branch_pattern("").is_ok() && validate_branch_pattern("*").is_ok());
    }

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
