//! `export` lines for a project's storage credentials, printed by `cache-worker credentials`
//! (read-only) and `cachectl credentials` (an operator's, either access), so a user can look at
//! a cache with any S3 tool.

use crate::v1 as pb;

/// Quotes `value` for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// `export` lines for the standard AWS variables and the cache's bucket and prefix.
pub fn format_env(credentials: &pb::Credentials) -> String {
    let lines = [
        ("AWS_ACCESS_KEY_ID", credentials.access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", credentials.secret_access_key.as_str()),
        ("AWS_SESSION_TOKEN", credentials.session_token.as_str()),
        ("AWS_ENDPOINT_URL", credentials.endpoint_url.as_str()),
        ("AWS_REGION", credentials.region.as_str()),
        ("CACHE_S3_BUCKET", credentials.bucket.as_str()),
        ("CACHE_S3_PREFIX", credentials.prefix.as_str()),
    ];
    let mut out = String::new();
    for (name, value) in lines {
        out.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;

    #[test]
    fn export_lines_are_quoted_for_the_shell() {
        let credentials = pb::Credentials {
            access_key_id: "LCABC".into(),
            secret_access_key: "it's".into(),
            endpoint_url: "http://127.0.0.1:7401".into(),
            prefix: "cache/web/".into(),
            ..Default::default()
        };
        let text = format_env(&credentials);
        assert!(text.contains("export AWS_ACCESS_KEY_ID='LCABC'\n"));
        assert!(text.contains(r"export AWS_SECRET_ACCESS_KEY='it'\''s'"));
        assert!(text.contains("export CACHE_S3_PREFIX='cache/web/'\n"));
        assert_eq!(text.lines().count(), 7);
    }
}
