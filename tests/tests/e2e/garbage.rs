//! Garbage collection (issue 15): blobs no cache names are removed from the
//! ledger and the store once their grace has passed, never while an open save names them;
//! `cachectl gc --dry-run` removes nothing; evictions are counted in the metrics.

use proto::v1 as pb;
use tests::{CoordinatorProcess, save_one_layer_image, stdout_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_saves_of_a_service_leave_only_what_the_caches_name_after_a_collection() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--gc-grace", "0s", "--gc-interval", "0"]);
    let token = coordinator.create_project("web");
    let url = coordinator.grpc_url.clone();
    let layer = |i: u8| vec![i; 4 << 20];
    // Another service keeps the first save's layer: shared blobs stay.
    save_one_layer_image(&url, &token, "keep", "keep:1", &layer(0)).await;
    for i in 0..40 {
        save_one_layer_image(&url, &token, "app", "app:1", &layer(i)).await;
    }
    assert_eq!(coordinator.blob_files("web").len(), 80, "a config and a layer per save");

    let dry = coordinator.gc(&["web", "--dry-run"]);
    assert_eq!(dry, "gc web: would remove 76 blobs (152.0 MiB)\n");
    assert_eq!(coordinator.blob_files("web").len(), 80, "a dry run removes nothing");
    assert_eq!(coordinator.gc(&["web"]), "gc web: removed 76 blobs (152.0 MiB)\n");
    assert_eq!(coordinator.blob_files("web").len(), 4, "keep's blobs and app's last two");
    let listed = stdout_of(&coordinator.cachectl(&["ls", "web"]));
    assert!(listed.contains("in 4 blobs") && listed.contains("in 4 objects"), "{listed}");
    assert_eq!(coordinator.gc(&[]), "gc web: removed 0 blobs (0 B)\n");

    let (_, metrics) = tests::http_get(&format!("{}/metrics", coordinator.metrics_url));
    assert!(
        metrics.contains("layer_cache_evicted_blobs_total{project=\"web\",reason=\"unreferenced\"} 76"),
        "{metrics}"
    );
    // What the caches name still restores: their blobs read back whole.
    let read = coordinator.credentials(&token, pb::Access::Read).await;
    let store = tests::s3_client_for(&read);
    for content in [layer(0), layer(39)] {
        let got = store.get_object().bucket(&read.bucket).key(tests::blob_key(&read, &content)).send().await;
        assert_eq!(got.unwrap().body.collect().await.unwrap().into_bytes().len(), 4 << 20);
    }
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_keeps_what_an_open_save_names_and_what_is_in_its_grace() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--gc-grace", "0s", "--gc-interval", "0"]);
    let token = coordinator.create_project("web");
    let url = coordinator.grpc_url.clone();
    let (old, new) = (b"the old layer".to_vec(), b"the new layer".to_vec());
    save_one_layer_image(&url, &token, "app", "app:1", &old).await;
    save_one_layer_image(&url, &token, "app", "app:1", &new).await;
    // The old layer has no reference now. A save that names it again begins: it is told the
    // blob is stored, and a collection running before its commit (made certain here) keeps it.
    let mut client = tests::worker_client(&url, &token).await;
    let begun = client.begin_save(tests::begin_one_layer_save("other", "other:1", &old)).await.unwrap().into_inner();
    assert!(begun.missing_digests.is_empty(), "{begun:?}");
    assert_eq!(coordinator.gc(&["web"]), "gc web: removed 0 blobs (0 B)\n");
    let commit = pb::CommitSaveRequest {
        save_id: begun.save_id,
        images: vec![tests::one_layer_image("other:1", &old, true)],
        save_log: Vec::new(),
    };
    let committed = client.commit_save(commit).await.unwrap().into_inner();
    assert!(committed.stored, "{committed:?}");
    assert_eq!(coordinator.gc(&["web"]), "gc web: removed 0 blobs (0 B)\n", "it is named again");
    let read = coordinator.credentials(&token, pb::Access::Read).await;
    let got = tests::s3_client_for(&read).get_object().bucket(&read.bucket).key(tests::blob_key(&read, &old)).send();
    assert!(got.await.is_ok(), "the open save's blob is still stored");
    coordinator.stop();

    // With the default grace (1 h), a blob unreferenced a moment ago stays.
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    save_one_layer_image(&coordinator.grpc_url, &token, "app", "app:1", &old).await;
    save_one_layer_image(&coordinator.grpc_url, &token, "app", "app:1", &new).await;
    assert_eq!(coordinator.gc(&["web", "--dry-run"]), "gc web: would remove 0 blobs (0 B)\n");
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_no_save_committed_are_collected_once_their_save_is_gone_and_the_grace_passed() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--gc-grace", "0s", "--gc-interval", "0"]);
    let token = coordinator.create_project("web");
    let url = coordinator.grpc_url.clone();
    save_one_layer_image(&url, &token, "app", "app:1", b"a committed layer").await;
    // A save uploads its blobs and never commits (its worker died, say).
    let content = vec![9u8; 1 << 20];
    let mut client = tests::worker_client(&url, &token).await;
    let begun = client.begin_save(tests::begin_one_layer_save("app", "app:2", &content)).await.unwrap().into_inner();
    tests::upload_one_layer_blobs(begun.credentials.as_ref().unwrap(), &content).await;
    assert_eq!(coordinator.blob_files("web").len(), 4);
    assert_eq!(coordinator.gc(&["web"]), "gc web: removed 0 blobs (0 B)\n", "its save is open");
    client.abandon_save(pb::AbandonSaveRequest { save_id: begun.save_id }).await.unwrap();
    assert_eq!(coordinator.gc(&["web", "--dry-run"]), "gc web: would remove 2 blobs (1.0 MiB)\n");
    assert_eq!(coordinator.blob_files("web").len(), 4, "a dry run removes nothing");
    assert_eq!(coordinator.gc(&["web"]), "gc web: removed 2 blobs (1.0 MiB)\n");
    assert_eq!(coordinator.blob_files("web").len(), 2, "the committed cache's blobs stay");
    let (_, metrics) = tests::http_get(&format!("{}/metrics", coordinator.metrics_url));
    assert!(metrics.contains("layer_cache_evicted_blobs_total{project=\"web\",reason=\"uncommitted\"} 2"), "{metrics}");
    coordinator.stop();

    // Within the grace period such uploads stay: a save may still be on its way to commit.
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--gc-interval", "0"]);
    let token = coordinator.create_project("web");
    let mut client = tests::worker_client(&coordinator.grpc_url, &token).await;
    let begun = client.begin_save(tests::begin_one_layer_save("app", "app:2", &content)).await.unwrap().into_inner();
    tests::upload_one_layer_blobs(begun.credentials.as_ref().unwrap(), &content).await;
    client.abandon_save(pb::AbandonSaveRequest { save_id: begun.save_id }).await.unwrap();
    assert_eq!(coordinator.gc(&["web"]), "gc web: removed 0 blobs (0 B)\n");
    assert_eq!(coordinator.blob_files("web").len(), 2);
    coordinator.stop();
}
