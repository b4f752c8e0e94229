//! Validation of names that come from outside: projects, services, branches and digests.
//!
//! The rules are part of the API: the coordinator, the worker and cachectl all apply them, so a
//! user hears about a bad name before anything travels.

use std::fmt;

/// Why a name was refused; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidName {
    pub kind: &'static str,
    pub value: String,
    pub rule: &'static str,
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The value is shown escaped and cut short: it came from outside.
        let shown: String = self.value.chars().take(80).collect();
        write!(f, "invalid {} name {:?}: {}", self.kind, shown, self.rule)
    }
}

impl std::error::Error for InvalidName {}

const NAME_RULE: &str = "use 1 to 63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit";
const NAME_RULE_NO_UNDERSCORE: &str = "use 1 to 63 characters of a-z, 0-9, '.' or '-', starting with a letter or digit";

/// Checks `[a-z0-9][a-z0-9._-]{0,62}`, the rule for project, service and branch names.
///
/// Project names additionally never contain `_`: see [`validate_project_name`].
fn validate_name(kind: &'static str, value: &str, allow_underscore: bool, rule: &'static str) -> Result<(), InvalidName> {
    let bytes = value.as_bytes();
    let first_ok = bytes.first().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes.iter().all(|&b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || (allow_underscore && b == b'_')
    });
    // "." and ".." are path segments, not names, whatever the pattern says.
    let dots_only = bytes.iter().all(|&b| b == b'.');
    if first_ok && rest_ok && bytes.len() <= 63 && !dots_only {
        Ok(())
    } else {
        Err(InvalidName { kind, value: value.to_owned(), rule })
    }
}

/// A project name: `[a-z0-9][a-z0-9.-]{0,62}`.
///
/// DESIGN.md allows `_` too; project names go without it because a project token is
/// `cct_<project>_<secret>` and the project must be recoverable from the token unambiguously.
pub fn validate_project_name(value: &str) -> Result<(), InvalidName> {
    validate_name("project", value, false, NAME_RULE_NO_UNDERSCORE)
}

/// A service name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_service_name(value: &str) -> Result<(), InvalidName> {
    validate_name("service", value, true, NAME_RULE)
}

/// A branch name: empty (the default entry) or `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_branch_name(value: &str) -> Result<(), InvalidName> {
    if value.is_empty() {
        return Ok(());
    }
    validate_name("branch", value, true, NAME_RULE)
}

/// A content digest as the API writes it: `sha256:` and 64 lower-case hex digits.
pub fn validate_digest(value: &str) -> Result<(), InvalidName> {
    let ok = value
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(InvalidName { kind: "digest", value: value.to_owned(), rule: "expected sha256: and 64 lower-case hex digits" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_pattern() {
        for ok in ["a", "0", "web", "my-project.v2", &"a".repeat(63)] {
            assert_eq!(validate_project_name(ok), Ok(()), "{ok}");
            assert_eq!(validate_service_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_service_name("api_v2"), Ok(()));
        assert_eq!(validate_branch_name(""), Ok(()));
    }

    #[test]
    fn refuses_everything_else() {
        let long = "a".repeat(64);
        for bad in ["", "-a", ".a", "_a", "A", "a/b", "a b", "..", "ä", "a\n", &long, "a%2f"] {
            assert!(validate_project_name(bad).is_err(), "{bad:?}");
            assert!(validate_service_name(bad).is_err(), "{bad:?}");
        }
        let error = validate_project_name("a_b").unwrap_err();
        assert_eq!(error.to_string(), format!("invalid project name \"a_b\": {NAME_RULE_NO_UNDERSCORE}"));
    }

    #[test]
    fn digests_are_sha256_lower_hex() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(validate_digest(&format!("sha256:{hex}")), Ok(()));
        assert!(validate_digest(&hex).is_err());
        assert!(validate_digest(&format!("sha256:{}", hex.to_uppercase())).is_err());
        assert!(validate_digest(&format!("sha256:{hex}0")).is_err());
        assert!(validate_digest("sha256:../../etc").is_err());
    }
}
