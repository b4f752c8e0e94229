//! The Grafana dashboard against a real Prometheus scraping a real coordinator: saves and
//! restores with known outcomes (one miss, then two hits; build steps reused 3 of 6) and a quota's eviction, then every panel's query of
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
    // The window spans the whole test: both phases' samples are in it.
    expr.replace("$project", ".*").replace("$__rate_interval", "10m").replace("$__range", "1h")
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

/// The full title of the panel whose title begins with `start`.
fn answers_title(answers: &std::collections::HashMap<(String, String), serde_json::Value>, start: &str) -> String {
    answers.keys().find(|(title, _)| title.starts_with(start)).map(|(title, _)| title.clone()).unwrap()
}

/// Waits until Prometheus has scraped each query's value.
async fn wait_for(prometheus: &PrometheusProcess, expected: &[(&str, f64)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = expected
            .iter()
            .all(|(query, value)| series(&prometheus.query(query)).first().is_some_and(|(_, found)| found == value));
        if seen {
            // One more scrape, so each rate has a sample after the last change too.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            return;
        }
        assert!(Instant::now() < deadline, "Prometheus never saw {expected:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
    let idle_token = coordinator.create_project("idle");

    // Health: the listener and the gRPC health service.
    assert_eq!(http_get(&format!("{}/healthz", coordinator.metrics_url)), (200, "ok\n".to_owned()));
    assert_eq!(http_get(&format!("{}/readyz", coordinator.metrics_url)), (200, "ready\n".to_owned()));
    let channel = proto::client::connect(&coordinator.grpc_url).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: "layercache.v1.Worker".into() };
    let status = health.check(request).await.unwrap().into_inner().status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // Known outcomes in two phases, each scraped before the next: the rate panels see what the
    // second phase added to series the first one began (a series that first appears already
    // incremented shows no increase).
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
    let not_found = || {
        let shown = coordinator.cachectl(&["show", "shop", "nosuch"]);
        assert_eq!(shown.status.code(), Some(66), "{}", stderr_of(&shown));
    };
    // Phase 1: a miss, a save, an unchanged save (all found), a hit, a failed call: every
    // series the rate panels read begins here.
    assert_eq!(run(&["restore", "--service", "web"]), "no cached image for web\n");
    run(&["save", "--service", "web", "app:latest"]);
    run(&["save", "--service", "web", "app:latest"]);
    run(&["restore", "--service", "web", "--strict"]);
    not_found();
    wait_for(&prometheus, &[("sum(layer_cache_restores_total)", 2.0), ("sum(layer_cache_saves_total)", 2.0)]).await;
    // Phase 2: a save that finds the base and moves a new layer, a hit, a failed call, a flush.
    std::fs::write(context.path().join("Dockerfile"), "FROM base:1\nRUN echo one > /one\nRUN echo three > /three\n")
        .unwrap();
    let built = host.classic_build(context.path(), "app:latest", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    run(&["save", "--service", "web", "app:latest"]);
    run(&["restore", "--service", "web", "--strict"]);
    not_found();
    // A cache of idle evicted by a quota that leaves no room: its every byte is freed.
    let saved = coordinator.cache_worker_on(&host, &idle_token, &["save", "--service", "old", "app:latest"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let evicted = coordinator.cachectl(&["project", "set-quota", "idle", "1"]);
    assert!(stdout_of(&evicted).contains("evicted 1 cache (old)"), "{}", stdout_of(&evicted));
    let flushed = coordinator.cachectl(&["flush", "idle"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));
    wait_for(
        &prometheus,
        &[
            ("sum(layer_cache_restores_total)", 3.0),
            ("sum(layer_cache_flushes_total)", 1.0),
            ("sum(layer_cache_saves_total)", 4.0),
            ("sum(layer_cache_evicted_caches_total)", 1.0),
        ],
    )
    .await;

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
    // Over the window only the second phase's restore (a hit) added to a series.
    let over_time = series(answer("Restore hit rate over time"));
    assert_eq!(over_time.len(), 1, "{over_time:?}");
    assert_eq!((over_time[0].0["service"].as_str(), over_time[0].1), (Some("web"), 1.0));
    // Steps reused, from the saves' reports: web's first save reused none of its 2 steps (no
    // cache yet), the unchanged one both, the last one the first (its second was edited); idle's
    // save found no cache for its key.
    let steps = answer("Build steps reused since start");
    assert_eq!(value_for(steps, "project", "shop"), 0.5, "{steps}");
    assert_eq!(value_for(steps, "project", "idle"), 0.0, "{steps}");
    let by_outcome = answer("Restores by outcome");
    assert!(value_for(by_outcome, "outcome", "hit") > 0.0, "{by_outcome}");
    assert_eq!(value_for(by_outcome, "outcome", "miss"), 0.0, "{by_outcome}");
    // The durations are quantiles of what the second phase observed: positive, and shorter
    // than the test.
    for title in ["Save duration", "Restore duration"] {
        for ref_id in ["A", "B"] {
            let quantile = series(&answers[&(answers_title(&answers, title), ref_id.to_owned())]);
            assert_eq!(quantile.len(), 1, "{title} {ref_id}: {quantile:?}");
            assert!(quantile[0].1 > 0.0 && quantile[0].1 < 120.0, "{title} {ref_id}: {quantile:?}");
        }
    }
    let throughput = answer("Transfer throughput");
    for operation in ["save", "restore"] {
        let bytes_per_second = value_for(throughput, "operation", operation);
        assert!(bytes_per_second > 0.0 && bytes_per_second.is_finite(), "{operation}: {throughput}");
    }
    let layers = series(answer("Layers found and moved"));
    let layer_rate = |operation: &str, outcome: &str| {
        layers
            .iter()
            .find(|(labels, _)| labels["operation"] == operation && labels["outcome"] == outcome)
            .map(|(_, value)| *value)
            .unwrap_or_else(|| panic!("no {operation}/{outcome} series in {layers:?}"))
    };
    assert!(layer_rate("save", "found") > 0.0 && layer_rate("save", "transferred") > 0.0, "{layers:?}");
    assert!(layer_rate("restore", "transferred") > 0.0, "{layers:?}");
    let failed = series(answer("Failed gRPC calls"));
    let not_found_rate = failed
        .iter()
        .find(|(labels, _)| labels["code"] == "NotFound")
        .unwrap_or_else(|| panic!("no NotFound series in {failed:?}"));
    assert!(not_found_rate.1 > 0.0, "{failed:?}");
    assert_eq!(not_found_rate.0["method"], "ShowCache", "{failed:?}");
    let store_bytes = value_for(answer("Store size per project"), "project", "shop");
    assert!(store_bytes > 1_000_000.0, "the busybox layer alone is ~2 MB: {store_bytes}");
    assert_eq!(value_for(answer("Store size per project"), "project", "idle"), 0.0);
    // The unchanged save found every blob of the first one, the last save all but its new
    // layer and config: dedup saved more than the whole first save.
    let dedup = series(answer("Bytes saved by dedup"));
    assert!(dedup[0].1 > store_bytes * 0.9 && dedup[0].1 < store_bytes * 2.0, "{dedup:?} {store_bytes}");
    assert_eq!(value_for(answer("Top projects by restore misses"), "project", "shop"), 1.0);
    assert_eq!(value_for(answer("Flushes per project"), "project", "idle"), 1.0);
    // The eviction: the bytes the coordinator counted, and one cache.
    let freed = coordinator
        .metric("layer_cache_evicted_bytes_total{project=\"idle\",reason=\"quota\"}")
        .expect("a quota eviction in the metrics");
    assert!(freed > 1_000_000.0, "the busybox layer alone is ~2 MB: {freed}");
    let title = answers_title(&answers, "Evictions and bytes freed");
    let evictions = |ref_id: &str| answers[&(title.clone(), ref_id.to_owned())].clone();
    assert_eq!(value_for(&evictions("A"), "reason", "quota"), freed);
    assert_eq!(value_for(&evictions("B"), "reason", "quota"), 1.0);
    // Every save committed and every restore reported: no lease holds any of the budget.
    let budget = |ref_id: &str| {
        let key = ("Transfer budget in use".to_owned(), ref_id.to_owned());
        series(&answers[&key]).first().map(|(_, value)| *value)
    };
    assert_eq!((budget("A"), budget("B")), (Some(0.0), Some(256.0)));
    // The state answered all along: up, and no outage.
    let database = |ref_id: &str| {
        let key = (answers_title(&answers, "Coordinator database up"), ref_id.to_owned());
        series(&answers[&key]).first().map(|(_, value)| *value)
    };
    assert_eq!((database("A"), database("B")), (Some(1.0), Some(0.0)));
    coordinator.stop();
}
