//! Every file in deploy/ parses, and the ones with a real reader load into it: Prometheus's
//! configuration and rules through promtool, the coordinator's example configuration through
//! its own config types (coordinator/tests), the YAML and JSON through serde.

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::{in_ci, stderr_of};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { files.extend(files_under(&path)) } else { files.push(path) }
    }
    files
}

#[test]
fn every_yaml_and_json_file_in_deploy_is_well_formed() {
    let mut n_checked = 0;
    for path in files_under(&deploy_dir()) {
        let text = std::fs::read_to_string(&path).unwrap();
        match path.extension().and_then(|extension| extension.to_str()) {
            Some("yaml" | "yml") => {
                for document in serde_yaml::Deserializer::from_str(&text) {
                    let value = serde_yaml::Value::deserialize(document);
                    assert!(value.is_ok(), "{}: {:?}", path.display(), value.err());
                }
                n_checked += 1;
            }
            Some("json") => {
                serde_json::from_str::<serde_json::Value>(&text)
                    .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                n_checked += 1;
            }
            _ => {}
        }
    }
    assert!(n_checked >= 8, "{n_checked} files");

    // The compose file has the services the README opens the dashboard with.
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy_dir().join("compose.yaml")).unwrap()).unwrap();
    for service in ["coordinator", "minio", "prometheus", "grafana"] {
        assert!(compose["services"][service].is_mapping(), "compose.yaml lacks {service}");
    }
    // The Kubernetes manifests: a StatefulSet with a volume for sled, its Service, a worker example.
    let manifests = std::fs::read_to_string(deploy_dir().join("kubernetes/coordinator.yaml")).unwrap();
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&manifests)
        .map(|document| serde_yaml::Value::deserialize(document).unwrap()["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["Service", "StatefulSet"]);
    assert!(manifests.contains("volumeClaimTemplates"));
    // Replicas: a Deployment sharing PostgreSQL (its StatefulSet) and the bucket.
    let replicas = std::fs::read_to_string(deploy_dir().join("kubernetes/replicas.yaml")).unwrap();
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&replicas)
        .map(|document| serde_yaml::Value::deserialize(document).unwrap()["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["Service", "Deployment", "Service", "StatefulSet"]);
    assert!(replicas.contains("name: CACHE_STATE") && replicas.contains("--store=s3"));
    // The compose file runs two replicas on PostgreSQL.
    assert!(compose["services"]["postgres"].is_mapping() && compose["services"]["coordinator-2"].is_mapping());
    let command = compose["services"]["coordinator"]["command"].as_sequence().unwrap();
    assert!(command.iter().any(|arg| arg.as_str().is_some_and(|arg| arg.starts_with("--state=postgres://"))));
}

use serde::Deserialize as _;

#[test]
fn prometheus_loads_the_configuration_and_rules() {
    let promtool = Command::new("promtool").arg("--version").output();
    if !promtool.is_ok_and(|output| output.status.success()) {
        assert!(!in_ci(), "promtool is missing: .ci/run installs Debian's prometheus");
        eprintln!("skipping: promtool is not installed here");
        return;
    }
    for (what, file) in [("config", "prometheus/prometheus.yml"), ("rules", "prometheus/rules.yml")] {
        let checked = Command::new("promtool").args(["check", what]).arg(deploy_dir().join(file)).output().unwrap();
        assert!(
            checked.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&checked.stdout),
            stderr_of(&checked)
        );
    }
}

#[test]
fn the_worker_example_runs_cache_worker_with_flags_it_takes() {
    let manifest = std::fs::read_to_string(deploy_dir().join("kubernetes/worker-example.yaml")).unwrap();
    let pod: serde_yaml::Value = serde_yaml::from_str(&manifest).unwrap();
    let script = pod["spec"]["containers"][0]["args"][0].as_str().unwrap();
    let (_held_closed, closed_port) = tests::closed_port();
    let mut n_checked = 0;
    for line in script.lines() {
        let Some(start) = line.find("cache-worker ") else { continue };
        let command = &line[start + "cache-worker ".len()..];
        let arguments: Vec<&str> = command.trim_end_matches(')').split_whitespace().collect();
        // Against a closed port: whatever else fails, the arguments must parse (clap's usage
        // errors exit 2).
        let output = Command::new(tests::binary("cache-worker"))
            .args(&arguments)
            .env("CACHE_COORDINATOR", format!("http://{closed_port}"))
            .env("CACHE_TOKEN", "cct_web_0123456789abcdef0123456789abcdef")
            .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
            .output()
            .unwrap();
        let stderr = stderr_of(&output);
        assert_ne!(output.status.code(), Some(2), "{command}: {stderr}");
        assert!(!stderr.contains("Usage:"), "{command}: {stderr}");
        n_checked += 1;
    }
    assert_eq!(n_checked, 2, "the example restores and saves");
}

#[test]
fn the_image_builds_and_ships_the_three_binaries() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let workspace = std::fs::read_to_string(deploy_dir().join("../Cargo.toml")).unwrap();
    for package in ["coordinator", "worker", "cli"] {
        assert!(dockerfile.contains(&format!("-p {package}")), "the image builds package {package}");
        assert!(workspace.contains(&format!("\"{package}\"")), "{package} is a workspace member");
    }
    for binary in ["cache-coordinator", "cache-worker", "cachectl"] {
        assert!(dockerfile.contains(&format!("/src/target/release/{binary} ")), "the image ships {binary}");
        tests::binary(binary);
    }
    let toolchain = dockerfile.lines().find_map(|line| line.strip_prefix("FROM rust:")).unwrap();
    let rust_version = workspace.lines().find_map(|line| line.strip_prefix("rust-version = ")).unwrap();
    assert!(toolchain.starts_with(rust_version.trim_matches('"')), "the image's Rust is the workspace's: {toolchain}");
}
