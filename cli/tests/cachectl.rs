//! The `cachectl` binary refuses bad input before it contacts anything.

use std::process::Command;

#[test]
fn bad_names_and_missing_tokens_are_refused_before_any_call() {
    // Port 9 (discard) on loopback: nothing listens, so reaching it would fail differently.
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cachectl"))
            .args(["--coordinator", "http://127.0.0.1:9", "--admin-token-file", "/nonexistent/admin-token"])
            .args(args)
            .env_remove("CACHE_ADMIN_TOKEN")
            .output()
            .unwrap()
    };
    let bad_name = run(&["flush", "../etc"]);
    assert_eq!(bad_name.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&bad_name.stderr).trim_end(),
        "cachectl: invalid project name \"../etc\": use 1 to 63 characters of a-z, 0-9, '.' or '-', starting with a letter or digit"
    );
    let no_token = run(&["ls"]);
    assert_eq!(no_token.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&no_token.stderr).starts_with("cachectl: no admin token: pass --admin-token"));
}
