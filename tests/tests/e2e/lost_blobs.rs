//! A blob lost behind the coordinator's back (corrupted in place, or deleted from the store):
//! the restore that finds it warns, exits 0 and reports it; the coordinator checks the store
//! itself and drops the blob with the caches naming it; the next save uploads it again and the
//! restore after it is complete. A report of an intact blob changes nothing.

use std::path::PathBuf;

use proto::v1 as pb;
use tests::{CoordinatorProcess, DockerEngine, EngineKind, stderr_of, stdout_of};

#[test]
fn a_lost_blob_is_dropped_at_the_first_restore_and_uploaded_again_by_the_next_save() {
    let Some(build_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let context = tests::build_seed_app(&build_host);
    let save = ["save", "--service", "web", "app:latest"];
    let saved = coordinator.cache_worker_on(&build_host, &token, &save);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let blob_file = |digest: &str| -> PathBuf {
        data_dir.path().join("objects/layer-cache/cache/web/blobs/sha256").join(digest.trim_start_matches("sha256:"))
    };
    let layers = tests::layer_digests(&build_host, "app:latest");

    // An intact blob reported bad is checked and kept.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime.block_on(tests::worker_client(&coordinator.grpc_url, &token));
    let kept = runtime.block_on(client.report_bad_blob(pb::ReportBadBlobRequest { digest: layers[1].clone() }));
    assert!(!kept.unwrap().into_inner().dropped);
    assert!(stdout_of(&coordinator.cachectl(&["ls", "web"])).contains("\nweb "), "the cache stays");

    for (how, layer) in [("corrupted", &layers[2]), ("deleted", &layers[3])] {
        tests::lose_blob(data_dir.path(), "web", layer, how);
        let Some(fresh_host) = DockerEngine::start(EngineKind::Engine20) else { return };
        let restore = ["restore", "--service", "web"];
        let failed = coordinator.cache_worker_on(&fresh_host, &token, &restore);
        assert!(failed.status.success(), "a failed restore is a warning ({how}): {}", stderr_of(&failed));
        let warned = stderr_of(&failed);
        assert!(warned.contains("dropped it with the 1 cache(s) naming it"), "{how}: {warned}");
        assert_eq!(warned.lines().count(), 1, "{how}: one warning: {warned}");
        assert!(warned.contains(&format!("blob {layer} ")), "{how}: the blob is named: {warned}");
        // A layer in the middle of the chain: the images below it are not committed either.
        assert!(fresh_host.image_ids().is_empty(), "{how}: nothing half-loaded: {:?}", fresh_host.image_ids());
        let listed = stdout_of(&coordinator.cachectl(&["ls", "web"]));
        assert!(!listed.contains("\nweb "), "{how}: the cache naming the lost blob is gone: {listed}");
        let miss = coordinator.cache_worker_on(&fresh_host, &token, &restore);
        assert!(stdout_of(&miss).contains("no cached image for web"), "{how}: {}", stdout_of(&miss));

        // The next save uploads the lost layer again, and only it; the restore after is whole.
        let saved = coordinator.cache_worker_on(&build_host, &token, &save);
        assert!(saved.status.success(), "{how}: {}", stderr_of(&saved));
        assert!(stdout_of(&saved).contains("uploaded 1 blobs"), "{how}: {}", stdout_of(&saved));
        assert!(blob_file(layer).is_file(), "{how}: stored again");
        let Some(next_host) = DockerEngine::start(EngineKind::Engine20) else { return };
        let restored = coordinator.cache_worker_on(&next_host, &token, &["restore", "--service", "web", "--strict"]);
        assert!(restored.status.success(), "{how}: {}", stderr_of(&restored));
        tests::assert_seed_rebuild_cached(&next_host, context.path());
    }
    coordinator.stop();
}
