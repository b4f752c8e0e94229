//! Quotas, eviction and expiry (issue 15) over the real parts: a project over its quota after
//! a commit evicts its least recently used caches, the one just saved last; every restore after
//! is either complete (its rebuild fully cached) or a clean miss; a save larger than the quota
//! alone is refused and keeps the previous caches; caches unused past `--cache-expiry` are
//! evicted by a collection; a running restore's blobs survive an eviction of its cache. Last
//! use and expiry are driven by an in-process coordinator's manual clock, not by sleeping.

use std::process::Output;
use std::time::Duration;

use proto::v1 as pb;
use tests::{CoordinatorProcess, DockerEngine, EngineKind, save_one_layer_image, stderr_of, stdout_of};

use super::in_process::InProcessCoordinator;

/// What these tests read of a coordinator, run as a process or in this one.
trait Observed {
    fn cachectl(&self, args: &[&str]) -> Output;
    fn metric(&self, sample: &str) -> Option<f64>;
    fn blob_files(&self, project: &str) -> Vec<u64>;
}

impl Observed for CoordinatorProcess {
    fn cachectl(&self, args: &[&str]) -> Output {
        CoordinatorProcess::cachectl(self, args)
    }
    fn metric(&self, sample: &str) -> Option<f64> {
        CoordinatorProcess::metric(self, sample)
    }
    fn blob_files(&self, project: &str) -> Vec<u64> {
        CoordinatorProcess::blob_files(self, project)
    }
}

impl Observed for InProcessCoordinator {
    fn cachectl(&self, args: &[&str]) -> Output {
        InProcessCoordinator::cachectl(self, args)
    }
    fn metric(&self, sample: &str) -> Option<f64> {
        InProcessCoordinator::metric(self, sample)
    }
    fn blob_files(&self, project: &str) -> Vec<u64> {
        InProcessCoordinator::blob_files(self, project)
    }
}

/// Bytes in the blob files of project `web` in an embedded store.
fn stored_bytes(coordinator: &impl Observed) -> u64 {
    coordinator.blob_files("web").iter().sum()
}

/// The value of one sample in the coordinator's metrics, 0 when it is not there.
fn metric(coordinator: &impl Observed, sample: &str) -> u64 {
    coordinator.metric(sample).unwrap_or(0.0) as u64
}

/// The services `cachectl ls web` lists.
fn listed_services(coordinator: &impl Observed) -> Vec<String> {
    let listed = coordinator.cachectl(&["ls", "web"]);
    assert!(listed.status.success(), "{}", stderr_of(&listed));
    stdout_of(&listed).lines().skip(2).map(|line| line.split_whitespace().next().unwrap().to_owned()).collect()
}

/// A build context whose one step writes `mib` MiB of random bytes: a layer of its own.
fn service_context(name: &str, mib: u32) -> tempfile::TempDir {
    tests::build_context(&format!("FROM base:1\nRUN head -c {} /dev/urandom > /{name}\n", mib << 20))
}

#[test]
fn a_project_over_its_quota_evicts_its_least_recently_used_caches() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = InProcessCoordinator::start(data_dir.path(), &["--gc-interval", "0"]);
    let token = coordinator.create_project("web");
    build_host.import_busybox_base("base:1");
    let services = ["s1", "s2", "s3", "s4", "s5"];
    let contexts: Vec<tempfile::TempDir> = services.iter().map(|name| service_context(name, 1)).collect();
    let save = |service: &str, tag: &str| {
        let saved = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", service, tag]);
        assert!(saved.status.success(), "save {service}: {}", stderr_of(&saved));
        // Last use is counted in seconds: each step in a second of its own.
        coordinator.advance(Duration::from_millis(1100));
    };
    for (service, context) in services.iter().zip(&contexts) {
        let built = build_host.classic_build(context.path(), &format!("{service}:1"), &[]);
        assert!(built.status.success(), "build {service}: {}", stderr_of(&built));
    }
    save("s1", "s1:1");
    // Room for the base and three services' layers, not four.
    let one_service = metric(&coordinator, "layer_cache_store_bytes{project=\"web\"}");
    let quota = one_service + (5 << 19);
    let set = coordinator.cachectl(&["project", "set-quota", "web", &quota.to_string()]);
    assert!(set.status.success(), "{}", stderr_of(&set));
    assert!(stdout_of(&set).starts_with("project web: quota "), "{}", stdout_of(&set));
    save("s2", "s2:1");
    save("s3", "s3:1");
    assert_eq!(listed_services(&coordinator), ["s1", "s2", "s3"]);
    assert!(stored_bytes(&coordinator) <= quota);
    // A restore of s1 makes it the most recently used: s2, then s3, go first.
    let Some(touch_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let restored = coordinator.cache_worker_on(&touch_host, &token, &["restore", "--service", "s1", "--strict"]);
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    coordinator.advance(Duration::from_millis(1100));
    save("s4", "s4:1");
    assert!(stored_bytes(&coordinator) <= quota, "{} > {quota}", stored_bytes(&coordinator));
    assert_eq!(listed_services(&coordinator), ["s1", "s3", "s4"], "s2 was the least recently used");
    save("s5", "s5:1");
    assert!(stored_bytes(&coordinator) <= quota, "{} > {quota}", stored_bytes(&coordinator));
    assert_eq!(listed_services(&coordinator), ["s1", "s4", "s5"]);
    let listed = stdout_of(&coordinator.cachectl(&["ls", "web"]));
    assert!(listed.lines().next().unwrap().contains("% of its quota of"), "{listed}");
    assert_eq!(metric(&coordinator, "layer_cache_evicted_caches_total{project=\"web\",reason=\"quota\"}"), 2);
    assert!(metric(&coordinator, "layer_cache_evicted_bytes_total{project=\"web\",reason=\"quota\"}") >= 2 << 20);

    // A save larger than the quota alone is refused in one line; the caches stay as they were
    // and its uploads are removed.
    let before = stored_bytes(&coordinator);
    let big = service_context("big", 5);
    let built = build_host.classic_build(big.path(), "big:1", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    let refused = coordinator.cache_worker_on(&build_host, &token, &["save", "--service", "big", "big:1"]);
    assert!(!refused.status.success(), "{}", stdout_of(&refused));
    let line = stderr_of(&refused);
    assert_eq!(line.trim().lines().count(), 1, "{line}");
    assert!(line.contains("more than project \"web\"'s quota") && line.contains("previous cache is kept"), "{line}");
    assert_eq!(listed_services(&coordinator), ["s1", "s4", "s5"]);
    assert_eq!(stored_bytes(&coordinator), before, "the refused save's blobs are gone");

    // Every restore on a fresh host is complete, its rebuild fully cached, or a clean miss.
    let Some(fresh_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    for (service, context) in services.iter().zip(&contexts) {
        let restored = coordinator.cache_worker_on(&fresh_host, &token, &["restore", "--service", service]);
        assert!(restored.status.success(), "restore {service}: {}", stderr_of(&restored));
        if ["s2", "s3"].contains(service) {
            assert_eq!(stdout_of(&restored), format!("no cached image for {service}\n"));
            continue;
        }
        assert!(
            stderr_of(&restored).is_empty(),
            "{service}: a complete restore warns of nothing: {}",
            stderr_of(&restored)
        );
        let rebuilt = fresh_host.classic_build(context.path(), &format!("{service}:1"), &[]);
        assert!(rebuilt.status.success(), "{}", stderr_of(&rebuilt));
        assert_eq!(stdout_of(&rebuilt).matches("Using cache").count(), 1, "{service}: {}", stdout_of(&rebuilt));
    }
    // A lower quota evicts at once, down to what fits.
    let lowered = coordinator.cachectl(&["project", "set-quota", "web", "1MiB"]);
    assert!(lowered.status.success(), "{}", stderr_of(&lowered));
    assert!(stdout_of(&lowered).contains("evicted 3 caches (s1, s4, s5)"), "{}", stdout_of(&lowered));
    assert!(listed_services(&coordinator).is_empty());
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_unused_past_their_expiry_are_evicted_by_a_collection() {
    let data_dir = tempfile::tempdir().unwrap();
    let args = ["--cache-expiry", "6s", "--gc-interval", "0", "--gc-grace", "1h", "--default-quota", "10GiB"];
    let coordinator = InProcessCoordinator::start(data_dir.path(), &args);
    let token = coordinator.create_project("web");
    let url = coordinator.grpc_url.clone();
    save_one_layer_image(&url, &token, "old", "old:1", b"a layer only old names").await;
    save_one_layer_image(&url, &token, "used", "used:1", b"a layer used names").await;
    coordinator.advance(Duration::from_secs(4));
    let mut client = tests::worker_client(&url, &token).await;
    let key = pb::CacheKey { service: "used".into(), branch: String::new() };
    let found = client.lookup(pb::LookupRequest { key: Some(key), fallbacks: Vec::new() }).await.unwrap().into_inner();
    assert!(found.found);
    coordinator.advance(Duration::from_secs(4));

    let gc = |args: &[&str]| coordinator.gc(&[&["web"], args].concat());
    let files = || coordinator.blob_files("web").len();
    assert_eq!(gc(&["--dry-run"]), "gc web: would remove 2 blobs (137 B), would evict 1 expired cache (old)\n");
    assert_eq!((files(), listed_services(&coordinator)), (4, vec!["old".to_owned(), "used".to_owned()]));
    assert_eq!(gc(&[]), "gc web: removed 2 blobs (137 B), evicted 1 expired cache (old)\n");
    assert_eq!((files(), listed_services(&coordinator)), (2, vec!["used".to_owned()]));
    assert_eq!(metric(&coordinator, "layer_cache_evicted_caches_total{project=\"web\",reason=\"expired\"}"), 1);
    assert_eq!(metric(&coordinator, "layer_cache_evicted_blobs_total{project=\"web\",reason=\"expired\"}"), 2);
    // The default quota is the project's when it is created without one; --quota wins.
    let listed = stdout_of(&coordinator.cachectl(&["ls"]));
    assert!(listed.lines().any(|line| line.starts_with("web ") && line.contains("10.0 GiB")), "{listed}");
    let created = coordinator.cachectl(&["project", "create", "api", "--quota", "0"]);
    assert!(created.status.success(), "{}", stderr_of(&created));
    let listed = stdout_of(&coordinator.cachectl(&["ls"]));
    assert!(listed.lines().any(|line| line.starts_with("api ") && line.ends_with(" none")), "{listed}");
    let bad = coordinator.cachectl(&["project", "set-quota", "web", "10GB"]);
    assert!(!bad.status.success());
    assert!(stderr_of(&bad).contains("invalid size \"10GB\""), "{}", stderr_of(&bad));
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_restore_keeps_its_blobs_when_its_cache_is_evicted() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--gc-interval", "0", "--gc-grace", "0s"]);
    let token = coordinator.create_project("web");
    let url = coordinator.grpc_url.clone();
    let content = vec![7u8; 1 << 20];
    save_one_layer_image(&url, &token, "app", "app:1", &content).await;
    // A restore begins: its lookup holds a lease naming the manifest's blobs.
    let mut client = tests::worker_client(&url, &token).await;
    let key = pb::CacheKey { service: "app".into(), branch: String::new() };
    let found = client.lookup(pb::LookupRequest { key: Some(key), fallbacks: Vec::new() }).await.unwrap().into_inner();
    let lease_id = found.plan.unwrap().lease_id;
    // Its cache is evicted meanwhile, and a collection runs: the blobs it reads stay.
    let lowered = coordinator.cachectl(&["project", "set-quota", "web", "1KiB"]);
    assert!(stdout_of(&lowered).contains("evicted 1 cache (app) and removed 0 blobs"), "{}", stdout_of(&lowered));
    assert_eq!(coordinator.gc(&["web"]), "gc web: removed 0 blobs (0 B)\n");
    let read = coordinator.credentials(&token, pb::Access::Read).await;
    let store = tests::s3_client_for(&read);
    let got = store.get_object().bucket(&read.bucket).key(tests::blob_key(&read, &content)).send().await.unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes().len(), 1 << 20, "the restore reads its layer whole");
    // Its report ends the lease; the next collection removes what no cache names.
    let report = pb::ReportMetricsRequest {
        service: "app".into(),
        operation: pb::Operation::Restore as i32,
        restore_outcome: pb::RestoreOutcome::Hit as i32,
        lease_id,
        ..Default::default()
    };
    client.report_metrics(report).await.unwrap();
    assert_eq!(coordinator.gc(&["web"]), "gc web: removed 2 blobs (1.0 MiB)\n");
    let gone = store.get_object().bucket(&read.bucket).key(tests::blob_key(&read, &content)).send().await;
    assert!(gone.is_err(), "deleted once no restore reads it");
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_acknowledged_with_its_commit_survives_a_sigkill_right_after() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--gc-interval", "0", "--gc-grace", "0s"]);
    let token = coordinator.create_project("web");
    let set = coordinator.cachectl(&["project", "set-quota", "web", "1500KiB"]);
    assert!(set.status.success(), "{}", stderr_of(&set));
    let (first, second) = (vec![1u8; 1 << 20], vec![2u8; 1 << 20]);
    save_one_layer_image(&coordinator.grpc_url, &token, "old", "old:1", &first).await;
    // This commit's answer comes after the eviction it caused: killed right after it, the
    // coordinator comes back with old evicted and new whole.
    let committed = save_one_layer_image(&coordinator.grpc_url, &token, "new", "new:1", &second).await;
    assert!(committed.stored, "{committed:?}");
    let coordinator = coordinator.crash_and_restart();
    assert_eq!(listed_services(&coordinator), ["new"]);
    assert!(stored_bytes(&coordinator) <= 1500 << 10, "{}", stored_bytes(&coordinator));
    assert_eq!(coordinator.gc(&["web"]), "gc web: removed 0 blobs (0 B)\n", "nothing was left half-removed");
    let read = coordinator.credentials(&token, pb::Access::Read).await;
    let store = tests::s3_client_for(&read);
    let got = store.get_object().bucket(&read.bucket).key(tests::blob_key(&read, &second)).send().await.unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes().len(), 1 << 20);
    // The retry of the evicted cache's save uploads it again and it is kept (new goes now).
    let again = save_one_layer_image(&coordinator.grpc_url, &token, "old", "old:1", &first).await;
    assert!(again.stored, "{again:?}");
    assert_eq!(listed_services(&coordinator), ["old"]);
    coordinator.stop();
}

/// A one-layer save of `service` through the API whose commit carries `save_log`: the commit's
/// answer, or its refusal.
async fn save_with_log(
    coordinator: &CoordinatorProcess,
    token: &str,
    service: &str,
    save_log: Vec<String>,
) -> Result<pb::CommitSaveResponse, tonic::Status> {
    let content = format!("the layer of {service}").into_bytes();
    let mut client = tests::worker_client(&coordinator.grpc_url, token).await;
    let begun = client
        .begin_save(tests::begin_one_layer_save(service, "app:1", &content))
        .await
        .expect("BeginSave")
        .into_inner();
    if let Some(credentials) = &begun.credentials {
        tests::upload_one_layer_blobs(credentials, &content).await;
    }
    let images = vec![tests::one_layer_image("app:1", &content, true)];
    let commit = pb::CommitSaveRequest { save_id: begun.save_id, images, save_log };
    client.commit_save(commit).await.map(tonic::Response::into_inner)
}

/// What a client writes beside its blobs is bounded and counted: a save log of 990 lines of
/// 4,000 bytes (each commit kept 4 MB of it on today's main, 377 MiB for a 1 MiB quota) is
/// refused with one line naming the limit, as is an engine version carrying escape codes; the
/// manifests' own bytes count against the quota, so ten saves of logs of 1,000 lines of 1,000
/// bytes, under ten services, leave only the newest cache of a 1 MiB quota, and a manifest
/// bigger than the quota alone is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_bounded_and_count_against_the_quota() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let set = coordinator.cachectl(&["project", "set-quota", "web", "1MiB"]);
    assert!(set.status.success(), "{}", stderr_of(&set));

    let huge = save_with_log(&coordinator, &token, "huge", vec!["x".repeat(4000); 990]).await.unwrap_err();
    assert_eq!(huge.code(), tonic::Code::InvalidArgument, "{huge:?}");
    assert_eq!(huge.message(), "a save log line holds at most 1024 bytes");
    let escapes =
        save_with_log(&coordinator, &token, "escapes", vec!["\u{1b}]52;c;aGk=\u{7}".into()]).await.unwrap_err();
    assert_eq!(escapes.code(), tonic::Code::InvalidArgument, "{escapes:?}");
    let mut client = tests::worker_client(&coordinator.grpc_url, &token).await;
    let mut begin = tests::begin_one_layer_save("version", "app:1", b"a layer");
    begin.engine_version = "20.10\u{1b}[2J saved from ci-main-1".into();
    let version = client.begin_save(begin).await.unwrap_err();
    assert_eq!(version.code(), tonic::Code::InvalidArgument, "{version:?}");

    for service_idx in 0..10 {
        let service = format!("svc{service_idx}");
        let saved = save_with_log(&coordinator, &token, &service, vec!["y".repeat(1000); 1000]).await;
        assert!(saved.is_ok_and(|saved| saved.stored), "{service}");
    }
    let listed = stdout_of(&coordinator.cachectl(&["ls", "web"]));
    let caches: Vec<&str> = listed.lines().filter(|line| line.contains("svc")).collect();
    assert_eq!(caches.len(), 1, "one manifest of 1 MB fits a 1 MiB quota:\n{listed}");
    assert!(caches[0].contains("svc9"), "the newest stays:\n{listed}");

    let lowered = coordinator.cachectl(&["project", "set-quota", "web", "512KiB"]);
    assert!(lowered.status.success(), "{}", stderr_of(&lowered));
    let over = save_with_log(&coordinator, &token, "over", vec!["z".repeat(1000); 600]).await.unwrap_err();
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over:?}");
    coordinator.stop();
}
