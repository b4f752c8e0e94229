//! The Grafana dashboard against a real Prometheus scraping a real coordinator: saves and
//! restores with known outcomes (one miss, then two hits), then every panel's query of
//! deploy/grafana/dashboards/layer-cache.json evaluated through Prometheus's HTTP API, and the
//! values checked. Plus the health endpoints and the gRPC health service.

use std::path::Path;
use std::time::{Duration, Instant};

use tests::{CoordinatorProcess, DockerEngine, EngineKind, PrometheusProcess, http_get, stderr_of, stdout_of};

fn dashboard() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards/layer-cache.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A panel's query as Prometheus takes it: Grafana's variables replaced by what they mean.
fn as_prometheus_query(expr: &str) -> String {
    expr.replace("$project", ".*").replace("$__rate_interval", "1m").replace("$__range", "1h")
}

/// The series of an instant query as (labels, value).
fn series(answer: &serde_json::Value) -> Vec<(serde_json::Value, f64)> {
    answer["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sample| (sample["metric"].clone(), sample["value"][1].as_str().unwrap().parse::<f64>().unwrap()))
        .collect()
}

fn value_for(answer: &serde_json::Value, label: &str, value: &str) -> f64 {
    series(answer)
        .into_iter()
        .find(|(labels, _)| labels[label] == value)
        .unwrap_or_else(|| panic!("no series with {label}={value} in {answer}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_reads_the_right_values_from_a_real_prometheus() {
    let Some(host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let Some(prometheus) = PrometheusProcess::start(coordinator.metrics_url.trim_start_matches("http://")) else {
        return;
    };
    let token = coordinator.create_project("shop");
    coordinator.create_project("idle");

    // Health: the listener and the gRPC health service.
    assert_eq!(http_get(&format!("{}/healthz", coordinator.metrics_url)), (200, "ok\n".to_owned()));
    assert_eq!(http_get(&format!("{}/readyz", coordinator.metrics_url)), (200, "ready\n".to_owned()));
    let channel = proto::client::connect(&coordinator.grpc_url).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: "layercache.v1.Worker".into() };
    let status = health.check(request).await.unwrap().into_inner().status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // Known outcomes: a miss, a save, an unchanged save (all found), two hits, a flush.
    host.import_busybox_base("base:1");
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("Dockerfile"), "FROM base:1\nRUN echo one > /one\nRUN echo two > /two\n")
        .unwrap();
    let built = host.classic_build(context.path(), "app:latest", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    let run = |args: &[&str]| {
        let output = coordinator.cache_worker_on(&host, &token, args);
        assert!(output.status.success(), "{args:?}: {}", stderr_of(&output));
        stdout_of(&output)
    };
    assert_eq!(run(&["restore", "--service", "web"]), "no cached image for web\n");
    run(&["save", "--service", "web", "app:latest"]);
    run(&["save", "--service", "web", "app:latest"]);
    run(&["restore", "--service", "web", "--strict"]);
    run(&["restore", "--service", "web", "--strict"]);
    let flushed = coordinator.cachectl(&["flush", "idle"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));

    // Wait until Prometheus has scraped all of it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let restores = series(&prometheus.query("sum(layer_cache_restores_total)"));
        let flushes = series(&prometheus.query("sum(layer_cache_flushes_total)"));
        let saves = series(&prometheus.query("sum(layer_cache_saves_total)"));
        let seen = |found: &[(serde_json::Value, f64)], expected: f64| {
            found.first().is_some_and(|(_, value)| *value == expected)
        };
        if seen(&restores, 3.0) && seen(&flushes, 1.0) && seen(&saves, 2.0) {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never saw the known outcomes");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every panel's every query evaluates; the stat panels read what happened.
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut answers = std::collections::HashMap::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap().to_owned();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            let expr = as_prometheus_query(target["expr"].as_str().unwrap());
            answers.insert((title.clone(), target["refId"].as_str().unwrap().to_owned()), prometheus.query(&expr));
        }
    }
    let answer = |title: &str| {
        answers
            .iter()
            .find(|((panel, ref_id), _)| panel.starts_with(title) && ref_id == "A")
            .map(|(_, answer)| answer)
            .unwrap()
    };
    let hit_rate = series(answer("Restore hit rate since start"));
    assert_eq!(hit_rate.len(), 1, "{hit_rate:?}");
    assert_eq!(hit_rate[0].0["service"], "web");
    assert!((hit_rate[0].1 - 2.0 / 3.0).abs() < 1e-9, "hit rate {}", hit_rate[0].1);
    let store_bytes = value_for(answer("Store size per project"), "project", "shop");
    assert!(store_bytes > 1_000_000.0, "the busybox layer alone is ~2 MB: {store_bytes}");
    assert_eq!(value_for(answer("Store size per project"), "project", "idle"), 0.0);
    // The second save found every blob already stored: dedup saved the whole store's bytes.
    let dedup = series(answer("Bytes saved by dedup"));
    assert_eq!(dedup[0].1, store_bytes);
    assert_eq!(value_for(answer("Top projects by restore misses"), "project", "shop"), 1.0);
    assert_eq!(value_for(answer("Flushes per project"), "project", "idle"), 1.0);
    // Every save committed and every restore reported: no lease holds any of the budget.
    let budget = |ref_id: &str| {
        let key = ("Transfer budget in use".to_owned(), ref_id.to_owned());
        series(&answers[&key]).first().map(|(_, value)| *value)
    };
    assert_eq!((budget("A"), budget("B")), (Some(0.0), Some(256.0)));
    coordinator.stop();
}
