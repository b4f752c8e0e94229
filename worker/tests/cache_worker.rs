//! The `cache-worker` binary refuses bad input before it contacts anything.

use std::process::Command;

#[test]
fn a_missing_or_malformed_token_is_refused_before_any_call() {
    let run = |token: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cache-worker"));
        command
            .args(["--coordinator", "http://127.0.0.1:9", "credentials", "--format", "env"])
            .env_remove("CACHE_TOKEN");
        if let Some(token) = token {
            command.env("CACHE_TOKEN", token);
        }
        command.output().unwrap()
    };
    let missing = run(None);
    assert_eq!(missing.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "cache-worker: no project token: pass --token or set CACHE_TOKEN\n"
    );
    let malformed = run(Some("has spaces in it, not a token"));
    assert_eq!(malformed.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&malformed.stderr);
    assert!(stderr.starts_with("cache-worker: invalid token:"), "{stderr}");
    assert!(!stderr.contains("spaces"), "the token is never echoed: {stderr}");
}
