//! Trust inside a project (issue 14): a token that may write only `pr-*` and read `main`, as a
//! CI platform gives a fork's pull requests. Its save to `main` is refused with one line, its
//! restore of `main` works, a corrupt blob it uploads under a real layer's digest never makes a
//! `main` restore fail; read-only tokens get no write credentials; revoking a token, rotating
//! the project token and deleting the project take their storage keys with them.

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use proto::v1 as pb;
use tests::{CoordinatorProcess, DockerEngine, EngineKind, s3_client_for, stderr_of, stdout_of};

#[test]
fn a_pull_request_token_writes_its_own_branches_and_reads_main_without_harming_it() {
    let Some(ci_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let project_token = coordinator.create_project("web");
    let context = tests::build_seed_app(&ci_host);
    let main_save = ["save", "--service", "app", "--branch", "main", "app:latest"];
    let saved = coordinator.cache_worker_on(&ci_host, &project_token, &main_save);
    assert!(saved.status.success(), "{}", stderr_of(&saved));

    let pr = tests::printed_token(&coordinator.cachectl(&tests::scoped_token_args("web", "pr-*", "main")));
    let listed = stdout_of(&coordinator.cachectl(&["token", "ls", "web"]));
    assert!(listed.contains("pr-*") && listed.contains("main") && listed.contains("never"), "{listed}");
    assert!(!listed.contains(&pr), "a token's secret is never listed");

    // Its save to main is refused with one line; nothing of main changes.
    let refused = coordinator.cache_worker_on(&ci_host, &pr, &main_save);
    assert!(!refused.status.success());
    let line = stderr_of(&refused);
    assert!(line.contains("may save to pr-* only, not to branch \"main\""), "{line}");
    assert_eq!(line.trim().lines().count(), 1, "{line}");

    // A corrupt blob it uploads under the address of main's next layer is refused, so main's
    // next save stores the real layer and main's restore stays whole.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let write = runtime.block_on(coordinator.credentials(&pr, pb::Access::Write));
    std::fs::write(context.path().join("file.txt"), "changed on main\n").unwrap();
    let rebuilt = ci_host.classic_build(context.path(), "app:latest", &[]);
    assert!(rebuilt.status.success(), "{}", stderr_of(&rebuilt));
    let new_layer = {
        let layers = tests::layer_digests(&ci_host, "app:latest");
        layers[layers.len() - 2].clone()
    };
    let key = format!("{}blobs/sha256/{}", write.prefix, new_layer.trim_start_matches("sha256:"));
    let planted = runtime.block_on(
        s3_client_for(&write)
            .put_object()
            .bucket(&write.bucket)
            .key(&key)
            .body(ByteStream::from_static(b"junk"))
            .send(),
    );
    assert_eq!(planted.unwrap_err().code(), Some("BadDigest"));
    let saved = coordinator.cache_worker_on(&ci_host, &project_token, &main_save);
    assert!(saved.status.success(), "{}", stderr_of(&saved));

    // Its restore of main (through its own branch's fallback) works on a fresh host, and so
    // does the build after it.
    let Some(pr_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let restore = ["restore", "--service", "app", "--branch", "pr-7", "--fallback-branch", "main", "--strict"];
    let restored = coordinator.cache_worker_on(&pr_host, &pr, &restore);
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    tests::assert_seed_rebuild_cached(&pr_host, context.path());
    // It saves its own branch; the project token reads it.
    let saved =
        coordinator.cache_worker_on(&pr_host, &pr, &["save", "--service", "app", "--branch", "pr-7", "app:latest"]);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let shown = stdout_of(&coordinator.cachectl(&["show", "web", "app", "--branch", "pr-7"]));
    assert!(shown.contains("app:latest"), "{shown}");
    // It may not read a branch outside its scope.
    let other =
        coordinator.cache_worker_on(&pr_host, &pr, &["restore", "--service", "app", "--branch", "dev", "--strict"]);
    assert!(!other.status.success());
    assert!(stderr_of(&other).contains("not branch \"dev\""), "{}", stderr_of(&other));

    // Main, restored with the project token on a third host, is complete.
    let Some(main_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let restored = coordinator.cache_worker_on(
        &main_host,
        &project_token,
        &["restore", "--service", "app", "--branch", "main", "--strict"],
    );
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    tests::assert_seed_rebuild_cached(&main_host, context.path());

    // A read-only token gets no write credentials and cannot save.
    let reader = tests::printed_token(&coordinator.cachectl(&[
        "token",
        "create",
        "web",
        "--read-branch",
        "main",
        "--expires",
        "1h",
    ]));
    let mut client = runtime.block_on(tests::worker_client(&coordinator.grpc_url, &reader));
    let request = pb::GetCredentialsRequest { access: pb::Access::Write as i32, ..Default::default() };
    let no_write = runtime.block_on(client.get_credentials(request)).unwrap_err();
    assert_eq!(no_write.code(), tonic::Code::PermissionDenied, "{no_write:?}");
    assert!(no_write.message().contains("may only read"), "{}", no_write.message());
    let read_only = coordinator.cache_worker(&reader, &["credentials", "--format", "env"]);
    assert!(read_only.status.success(), "it reads: {}", stderr_of(&read_only));
    let no_save = coordinator.cache_worker_on(&ci_host, &reader, &main_save);
    assert!(
        !no_save.status.success() && stderr_of(&no_save).contains("may save to nothing"),
        "{}",
        stderr_of(&no_save)
    );

    // Revoking the pull request token takes its storage keys with it.
    let read = runtime.block_on(coordinator.credentials(&pr, pb::Access::Read));
    let token_id = listed.lines().nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let revoked = coordinator.cachectl(&["token", "revoke", "web", &token_id]);
    assert!(revoked.status.success(), "{}", stderr_of(&revoked));
    let after = coordinator.cache_worker_on(&pr_host, &pr, &restore);
    assert!(stderr_of(&after).contains("unknown or revoked project token"), "{}", stderr_of(&after));
    let listing = runtime.block_on(s3_client_for(&read).head_object().bucket(&read.bucket).key(&key).send());
    assert!(listing.is_err(), "a revoked token's key no longer reads");
    let again = coordinator.cachectl(&["token", "revoke", "web", &token_id]);
    assert!(!again.status.success(), "revoking a token that is gone is an error");

    // Rotating the project token: the old one stops working, the new one works.
    let rotated = tests::printed_token(&coordinator.cachectl(&["project", "rotate-token", "web"]));
    let old = coordinator.cache_worker_on(
        &main_host,
        &project_token,
        &["restore", "--service", "app", "--branch", "main", "--strict"],
    );
    assert!(stderr_of(&old).contains("unknown or revoked project token"), "{}", stderr_of(&old));
    let new = coordinator.cache_worker_on(
        &main_host,
        &rotated,
        &["restore", "--service", "app", "--branch", "main", "--strict"],
    );
    assert!(new.status.success(), "{}", stderr_of(&new));

    // Deleting the project: its objects, tokens and records go.
    let objects_of_web = data_dir.path().join("objects/layer-cache/cache/web");
    assert!(!walk_files(&objects_of_web).is_empty(), "the project's blobs are under {}", objects_of_web.display());
    let deleted = coordinator.cachectl(&["project", "delete", "web"]);
    assert!(deleted.status.success(), "{}", stderr_of(&deleted));
    assert!(stdout_of(&deleted).contains("deleted project web"), "{}", stdout_of(&deleted));
    let gone = coordinator.cache_worker_on(&main_host, &rotated, &["restore", "--service", "app", "--strict"]);
    assert!(stderr_of(&gone).contains("unknown or revoked project token"), "{}", stderr_of(&gone));
    assert!(!stdout_of(&coordinator.cachectl(&["ls"])).contains("web"));
    let objects = walk_files(&objects_of_web);
    assert!(objects.is_empty(), "{objects:?}");
    let recreated = coordinator.cachectl(&["project", "create", "web"]);
    assert!(recreated.status.success(), "a deleted project's name can be used again: {}", stderr_of(&recreated));
    coordinator.assert_no_secret_logged(&[&pr, &reader, &rotated, &project_token]);
    coordinator.stop();
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .flat_map(|entry| if entry.path().is_dir() { walk_files(&entry.path()) } else { vec![entry.path()] })
        .collect()
}
