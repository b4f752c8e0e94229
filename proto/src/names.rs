//! Validation of names that come from outside: projects, services, branches and digests.
//!
//! The rules are part of the API: the coordinator, the worker and cachectl all apply them, so a
//! user hears about a bad name before anything travels.

use std::fmt;

/// Why a name was refused; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidName {
    /// What was refused, e.g. "project name".
    pub what: &'static str,
    /// The refused value, when it may be shown (never for a token).
    pub value: Option<String>,
    pub rule: &'static str,
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            // The value is shown escaped and cut short: it came from outside.
            Some(value) => {
                let shown: String = value.chars().take(80).collect();
                write!(f, "invalid {} {:?}: {}", self.what, shown, self.rule)
            }
            None => write!(f, "invalid {}: {}", self.what, self.rule),
        }
    }
}

impl std::error::Error for InvalidName {}

const NAME_RULE: &str = "use 1 to 63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit";
const NAME_RULE_NO_UNDERSCORE: &str = "use 1 to 63 characters of a-z, 0-9, '.' or '-', starting with a letter or digit";

/// Checks `[a-z0-9][a-z0-9._-]{0,62}`, the rule for project, service and branch names.
///
/// Project names additionally never contain `_`: see [`validate_project_name`].
fn validate_name(
    what: &'static str,
    value: &str,
    allow_underscore: bool,
    rule: &'static str,
) -> Result<(), InvalidName> {
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
        Err(InvalidName { what, value: Some(value.to_owned()), rule })
    }
}

/// A project name: `[a-z0-9][a-z0-9.-]{0,62}`.
///
/// DESIGN.md allows `_` too; project names go without it because a project token is
/// `cct_<project>_<secret>` and the project must be recoverable from the token unambiguously.
pub fn validate_project_name(value: &str) -> Result<(), InvalidName> {
    validate_name("project name", value, false, NAME_RULE_NO_UNDERSCORE)
}

/// A service name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_service_name(value: &str) -> Result<(), InvalidName> {
    validate_name("service name", value, true, NAME_RULE)
}

/// A branch name: empty (the default entry) or `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_branch_name(value: &str) -> Result<(), InvalidName> {
    if value.is_empty() {
        return Ok(());
    }
    validate_name("branch name", value, true, NAME_RULE)
}

/// A content digest as the API writes it: `sha256:` and 64 lower-case hex digits.
pub fn validate_digest(value: &str) -> Result<(), InvalidName> {
    let ok = value
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what: "digest",
            value: Some(value.to_owned()),
            rule: "expected sha256: and 64 lower-case hex digits",
        })
    }
}

/// An image reference as the engine lists it in `RepoTags`, e.g. `registry:5000/team/app:1.2`:
/// 3 to 255 characters of `A-Za-z0-9._/:@-`, a `:` before the tag, no `..`.
pub fn validate_repo_tag(value: &str) -> Result<(), InvalidName> {
    let ok = (3..=255).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b':' | b'@' | b'-'))
        && value.rsplit_once(':').is_some_and(|(repo, tag)| !repo.is_empty() && !tag.is_empty() && !tag.contains('/'))
        && !value.contains("..");
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what: "image tag",
            value: Some(value.to_owned()),
            rule: "expected REPOSITORY:TAG of A-Z, a-z, 0-9, '.', '_', '/', ':', '@' or '-'",
        })
    }
}

/// A bearer token (project or admin) as given on a command line or in the environment: 16 to
/// 256 characters of `A-Za-z0-9._~-`. The check is about shape only, so a typo is reported
/// before anything is sent; whether the token is right is the coordinator's call.
pub fn validate_token(value: &str) -> Result<(), InvalidName> {
    let ok = (16..=256).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'));
    if ok {
        Ok(())
    } else {
        // The value of a token is never echoed back, even a malformed one.
        Err(InvalidName {
            what: "token",
            value: None,
            rule: "expected 16 to 256 characters of A-Z, a-z, 0-9, '.', '_', '~' or '-'",
        })
    }
}

/// Characters a terminal acts on rather than shows: control characters (escape sequences,
/// newlines that forge a line of their own) and the bidirectional overrides and isolates that
/// reorder what is shown.
pub fn acts_on_terminal(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

/// `value` as a terminal may show it: each character a terminal would act on written as an
/// escape (`\u{1b}`), so text from outside, even text stored before it was validated, can
/// neither move the cursor, write the clipboard nor forge a line.
pub fn printable(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.chars().any(acts_on_terminal) {
        return value.into();
    }
    value.chars().map(|c| if acts_on_terminal(c) { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_outside_is_shown_escaped() {
        for hostile in ["\u{1b}]52;c;cHduZWQ=\u{7}", "ok\nsaved from ci-main-1", "\u{202e}gnp.exe", "tab\there"] {
            assert!(hostile.chars().any(acts_on_terminal), "{hostile:?}");
        }
        assert_eq!(printable("plain é text"), "plain é text");
        assert_eq!(printable("a\u{1b}[2Jb\nc\u{202e}"), "a\\u{1b}[2Jb\\u{a}c\\u{202e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, failure_persistence: None, ..Default::default() })]

        /// Any string from outside: no panic, a refusal is one line, and what passes is safe
        /// as a storage key segment (no separator, not `.` or `..`).
        #[test]
        fn any_name_is_refused_in_one_line_or_is_a_safe_segment(value in "(?s).{0,80}|[a-z0-9._-]{1,70}") {
            for check in [validate_project_name, validate_service_name, validate_branch_name] {
                match check(&value) {
                    Ok(()) => proptest::prop_assert!(
                        value.is_empty() || (!value.contains('/') && value != "." && value != ".." && value.len() <= 63)
                    ),
                    Err(error) => proptest::prop_assert!(!error.to_string().contains('\n')),
                }
            }
        }

        #[test]
        fn any_digest_tag_or_token_is_refused_in_one_line(value in "(?s).{0,300}|sha256:[0-9a-f]{64}|[a-z/]{1,20}:[a-z0-9.]{1,10}") {
            for check in [validate_digest, validate_repo_tag] {
                if let Err(error) = check(&value) {
                    proptest::prop_assert!(!error.to_string().contains('\n'));
                }
            }
            if validate_repo_tag(&value).is_ok() {
                proptest::prop_assert!(
                    !value.contains("..") && value.contains(':') && value.bytes().all(|b| b.is_ascii_graphic())
                );
            }
            if let Err(error) = validate_token(&value) {
                // A token is never echoed, not even a malformed one.
                proptest::prop_assert!(value.len() < 4 || !error.to_string().contains(&value));
            }
        }
    }

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

    #[test]
    fn repo_tags_are_references_with_a_tag() {
        for ok in ["base:1", "registry:5000/team/app:1.2", "app:latest"] {
            assert_eq!(validate_repo_tag(ok), Ok(()), "{ok}");
        }
        for bad in ["app", ":1", "app:", "a b:1", "registry:5000/app", "../x:1", "app:1\n"] {
            assert!(validate_repo_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_are_checked_for_shape_and_never_echoed() {
        assert_eq!(validate_token(&format!("cct_web_{}", "ab".repeat(32))), Ok(()));
        let error = validate_token("secret value with spaces").unwrap_err();
        assert!(!error.to_string().contains("secret"), "{error}");
        assert!(validate_token("short").is_err());
    }
}
