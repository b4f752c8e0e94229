//! A coordinator whose data directory fills up or turns read-only: the refused save says why
//! in one line (and so does the coordinator's log), and the cache already stored still
//! restores. The data directory is a small tmpfs of its own, mounted by the test (root only,
//! as CI runs).

use std::process::Command;

use aws_sdk_s3::primitives::ByteStream;
use proto::v1 as pb;
use tests::{
    CoordinatorProcess, DockerEngine, EngineKind, begin_one_layer_save, build_context, in_ci, one_layer_config,
    s3_client_for, save_one_layer_image, stderr_of, stdout_of, worker_client,
};

/// A tmpfs of `size` mounted on a new folder, unmounted when dropped; `None` (with a note)
/// where mounting is not allowed, which fails the test in CI.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|output| output.status.success());
        assert!(mounted || !in_ci(), "mounting a tmpfs failed: CI runs as root");
        if !mounted {
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs(dir))
    }
}

/// `folder` made read-only in place (a read-only bind mount over it), undone when dropped.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn bind(folder: &std::path::Path) -> ReadOnly {
        for args in [&["--bind"][..], &["-o", "remount,ro,bind"][..]] {
            let mut mount = Command::new("mount");
            mount.args(args);
            if args[0] == "--bind" {
                mount.arg(folder);
            }
            let status = mount.arg(folder).status();
            assert!(status.is_ok_and(|status| status.success()), "mount {args:?} {}", folder.display());
        }
        ReadOnly(folder.to_owned())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Tries to save new content; the refusal's one line, from whichever step the disk stopped.
async fn refused_save(coordinator: &CoordinatorProcess, token: &str, content: &[u8]) -> String {
    let mut client = worker_client(&coordinator.grpc_url, token).await;
    let begun = match client.begin_save(begin_one_layer_save("svc", "app:2", content)).await {
        Ok(begun) => begun.into_inner(),
        Err(status) => return status.message().to_owned(),
    };
    let credentials = begun.credentials.expect("write credentials");
    let store = tests::s3_client_as_worker(&credentials);
    for blob in [content.to_vec(), one_layer_config(content)] {
        let key = tests::blob_key(&credentials, &blob);
        let put = store.put_object().bucket(&credentials.bucket).key(key).body(ByteStream::from(blob)).send().await;
        if let Err(error) = put {
            return aws_sdk_s3::error::DisplayErrorContext(&error).to_string();
        }
    }
    panic!("the save was stored on a disk that should refuse it");
}

/// The stored cache restores: the lookup finds it and its blobs read back.
async fn previous_cache_restores(coordinator: &CoordinatorProcess, token: &str, content: &[u8]) {
    let mut client = worker_client(&coordinator.grpc_url, token).await;
    let key = Some(pb::CacheKey { service: "svc".into(), branch: String::new() });
    let found = client.lookup(pb::LookupRequest { key, fallbacks: vec![] }).await.unwrap().into_inner();
    let tags = &found.manifest.expect("the previous manifest").images[0].repo_tags;
    assert_eq!(tags, &vec!["app:1".to_string()]);
    let credentials = coordinator.credentials(token, pb::Access::Read).await;
    let key = tests::blob_key(&credentials, content);
    let object = s3_client_for(&credentials).get_object().bucket(&credentials.bucket).key(key).send().await.unwrap();
    assert_eq!(object.body.collect().await.unwrap().into_bytes().as_ref(), content);
}

/// A build host holding `d:1`, a busybox base and one layer of 8 MiB of random bytes.
fn image_to_save() -> Option<DockerEngine> {
    let engine = DockerEngine::start(EngineKind::Engine20)?;
    engine.import_busybox_base("base:1");
    let context = build_context("FROM base:1\nRUN dd if=/dev/urandom of=/layer bs=1048576 count=8\n");
    let built = engine.classic_build(context.path(), "d:1", &[]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    Some(engine)
}

/// cache-worker's save on the full disk fails with one plain line naming the full disk.
fn worker_save_names_the_full_disk(coordinator: &CoordinatorProcess, token: &str, build_host: Option<&DockerEngine>) {
    let Some(build_host) = build_host else { return };
    let saved = coordinator.cache_worker_on(build_host, token, &["save", "--service", "d", "d:1"]);
    assert!(!saved.status.success(), "{}", stdout_of(&saved));
    tests::assert_one_plain_line(&saved);
    let line = stderr_of(&saved);
    assert!(line.starts_with("cache-worker: saving d failed: "), "{line}");
    assert!(line.contains("disk is full"), "the cause is named: {line}");
    eprintln!("a save on a full disk reads: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_read_only_data_directory_is_named_and_the_stored_cache_still_restores() {
    let Some(tmpfs) = Tmpfs::mount("48m") else { return };
    let data_dir = tmpfs.0.path().join("data");
    let coordinator = CoordinatorProcess::start(&data_dir, &[]);
    let token = coordinator.create_project("web");
    let build_host = image_to_save();
    let first = b"the layer stored before the disk filled".to_vec();
    assert!(save_one_layer_image(&coordinator.grpc_url, &token, "svc", "app:1", &first).await.stored);

    // Fill the disk to the last byte.
    let filler = tmpfs.0.path().join("filler");
    let _ = Command::new("dd").arg("if=/dev/zero").arg(format!("of={}", filler.display())).arg("bs=1M").output();
    let refusal = refused_save(&coordinator, &token, &vec![1u8; 32 << 20]).await;
    assert!(!refusal.contains('\n'), "one line: {refusal}");
    assert!(refusal.contains("disk is full"), "the cause is named: {refusal}");
    worker_save_names_the_full_disk(&coordinator, &token, build_host.as_ref());
    assert!(coordinator.log().contains("disk is full"), "and logged: {}", coordinator.log());
    previous_cache_restores(&coordinator, &token, &first).await;

    std::fs::remove_file(&filler).unwrap();
    // The objects' folder turns read-only (a remount of the whole tmpfs is refused while the
    // database's files are open for writing).
    let read_only = ReadOnly::bind(&data_dir.join("objects"));
    let refusal = refused_save(&coordinator, &token, &vec![2u8; 32 << 20]).await;
    assert!(!refusal.contains('\n'), "one line: {refusal}");
    assert!(refusal.contains("read-only"), "the cause is named: {refusal}");
    assert!(coordinator.log().contains("read-only"), "and logged: {}", coordinator.log());
    previous_cache_restores(&coordinator, &token, &first).await;
    drop(read_only);
}
