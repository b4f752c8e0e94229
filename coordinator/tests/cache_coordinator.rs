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

/// The arguments deploy/ starts the coordinator with: the compose service's `command`, the
/// StatefulSet's container `args`, and the image's `ENTRYPOINT` + `CMD`.
fn deploy_argument_lists() -> Vec<(&'static str, Vec<String>)> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let strings = |value: &serde_yaml::Value| -> Vec<String> {
        value.as_sequence().expect("a list of arguments").iter().map(|arg| arg.as_str().unwrap().to_owned()).collect()
    };
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy.join("compose.yaml")).unwrap()).unwrap();
    let kubernetes = std::fs::read_to_string(deploy.join("kubernetes/coordinator.yaml")).unwrap();
    let stateful_set = serde_yaml::Deserializer::from_str(&kubernetes)
        .map(|document| <serde_yaml::Value as serde::Deserialize>::deserialize(document).unwrap())
        .find(|document| document["kind"] == "StatefulSet")
        .expect("a StatefulSet");
    let replicas = std::fs::read_to_string(deploy.join("kubernetes/replicas.yaml")).unwrap();
    let deployment = serde_yaml::Deserializer::from_str(&replicas)
        .map(|document| <serde_yaml::Value as serde::Deserialize>::deserialize(document).unwrap())
        .find(|document| document["kind"] == "Deployment")
        .expect("a Deployment");
    let dockerfile = std::fs::read_to_string(deploy.join("Dockerfile")).unwrap();
    let instruction = |name: &str| -> Vec<String> {
        let line = dockerfile.lines().find_map(|line| line.strip_prefix(name)).unwrap_or_else(|| panic!("no {name}"));
        serde_json::from_str(line.trim()).unwrap_or_else(|error| panic!("{name} is not a JSON list: {error}"))
    };
    let mut image = instruction("ENTRYPOINT ");
    assert_eq!(image, ["cache-coordinator"], "the image runs the coordinator");
    image.extend(instruction("CMD "));
    vec![
        ("compose.yaml", strings(&compose["services"]["coordinator"]["command"])),
        ("kubernetes/coordinator.yaml", strings(&stateful_set["spec"]["template"]["spec"]["containers"][0]["args"])),
        ("kubernetes/replicas.yaml", strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"])),
        ("Dockerfile", image[1..].to_vec()),
    ]
}

#[test]
fn deploy_files_start_the_coordinator_with_flags_it_takes() {
    use clap::Parser;
    for (file, arguments) in deploy_argument_lists() {
        let cli =
            coordinator::config::Cli::try_parse_from(std::iter::once("cache-coordinator".to_owned()).chain(arguments))
                .unwrap_or_else(|error| panic!("{file}: {error}"));
        let coordinator::config::Command::Serve(args) = cli.command;
        let config = merge(args, Default::default()).unwrap_or_else(|error| panic!("{file}: {error}"));
        assert_eq!(config.listen.to_string(), "0.0.0.0:7400", "{file}");
        assert_eq!(config.metrics_listen.to_string(), "0.0.0.0:9400", "{file}");
    }
}
