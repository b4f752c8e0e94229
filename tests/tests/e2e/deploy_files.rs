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
