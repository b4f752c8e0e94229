//! The `cache-coordinator` binary's start-up: the example config in deploy/ loads into the real
//! config types, and a bad config file is one line and exit code 64.

use std::path::Path;
use std::process::Command;

use coordinator::config::{ServeArgs, merge, read_file_config};

fn example_config() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.example.toml")
}

#[test]
fn the_example_config_in_deploy_loads() {
    let file = read_file_config(&example_config()).unwrap();
    let config = merge(ServeArgs::default(), file).unwrap();
    assert_eq!(config.listen.to_string(), "0.0.0.0:7400");
    assert_eq!(config.s3_public_url.as_deref(), Some("http://layer-cache.internal:7401"));
    assert_eq!(config.credential_ttl.as_secs(), 900);
    assert_eq!(config.bucket, "layer-cache");
    assert_eq!(config.plan.part_size, 8 << 20);
    assert_eq!(config.plan.multipart_threshold, 5120 << 20, "one PUT per blob on the embedded store");
    assert_eq!((config.plan.worker_concurrency, config.plan.transfer_budget), (8, 256));
}

#[test]
fn a_bad_config_file_is_one_line_and_exit_code_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nunknown_setting = 1\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_cache-coordinator"))
        .args(["serve", "--config"])
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown field `unknown_setting`"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing is created on bad configuration");
}
