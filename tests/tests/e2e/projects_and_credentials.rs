//! cachectl and cache-worker through the real binaries against a real coordinator process:
//! projects, listings, flushes, credentials, restarts and bad input.

use aws_sdk_s3::primitives::ByteStream;
use proto::v1 as pb;
use tests::{CoordinatorProcess, binary, parse_exports, s3_client_for, stderr_of, stdout_of};

fn exit_code(output: &std::process::Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

/// One line on stderr, nothing on stdout, and the given exit code.
fn assert_one_line_failure(output: &std::process::Output, code: i32, needle: &str) {
    let stderr = stderr_of(output);
    assert_eq!(exit_code(output), code, "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    assert_eq!(stdout_of(output), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_live_through_restarts_and_flush_removes_only_their_cache() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let web_token = coordinator.create_project("web");
    let api_token = coordinator.create_project("api");
    assert!(web_token.starts_with("cct_web_"), "{web_token}");
    assert_ne!(web_token, api_token);

    let listing = stdout_of(&coordinator.cachectl(&["ls"]));
    let names: Vec<&str> = listing.lines().skip(1).filter_map(|line| line.split_whitespace().next()).collect();
    assert_eq!(names, ["api", "web"]);

    // Objects in both projects, written with their own write keys.
    let mut keys = Vec::new();
    for token in [&web_token, &api_token] {
        let credentials = coordinator.credentials(token, pb::Access::Write).await;
        let client = s3_client_for(&credentials);
        let key = tests::blob_key(&credentials, b"layer");
        client
            .put_object()
            .bucket(&credentials.bucket)
            .key(&key)
            .body(ByteStream::from_static(b"layer"))
            .send()
            .await
            .unwrap();
        keys.push((credentials, key));
    }

    let flushed = coordinator.cachectl(&["flush", "web"]);
    assert!(flushed.status.success(), "{}", stderr_of(&flushed));
    assert_eq!(stdout_of(&flushed), "flushed project web: 0 manifests and 1 objects (5 B) removed\n");
    let again = coordinator.cachectl(&["flush", "web"]);
    assert_eq!(stdout_of(&again), "flushed project web: 0 manifests and 0 objects (0 B) removed\n");

    let (web_credentials, web_key) = &keys[0];
    let web_reader = s3_client_for(&coordinator.credentials(&web_token, pb::Access::Read).await);
    let gone = web_reader.head_object().bucket(&web_credentials.bucket).key(web_key).send().await;
    assert!(gone.is_err_and(|error| error.as_service_error().is_some_and(|e| e.is_not_found())));
    let (api_credentials, api_key) = &keys[1];
    let kept =
        s3_client_for(api_credentials).get_object().bucket(&api_credentials.bucket).key(api_key).send().await.unwrap();
    assert_eq!(kept.body.collect().await.unwrap().into_bytes().as_ref(), b"layer");

    // The project and its token stay after a flush, and after a restart.
    coordinator.stop();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let listing = stdout_of(&coordinator.cachectl(&["ls"]));
    assert!(
        listing.lines().any(|line| line.starts_with("web ") && line.split_whitespace().nth(5) == Some("2")),
        "{listing}"
    );
    let exports = coordinator.cache_worker(&web_token, &["credentials", "--format", "env"]);
    assert!(exports.status.success(), "{}", stderr_of(&exports));
    let exports = parse_exports(&stdout_of(&exports));
    let names: Vec<&str> = exports.iter().map(|(name, _)| name.as_str()).collect();
    for expected in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "CACHE_S3_BUCKET",
        "CACHE_S3_PREFIX",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    let value = |name: &str| exports.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(value("CACHE_S3_PREFIX"), "cache/web/");
    assert_eq!(value("AWS_ENDPOINT_URL"), coordinator.s3_url);
    let caches = coordinator.cachectl(&["ls", "web"]);
    assert!(caches.status.success(), "{}", stderr_of(&caches));
    assert_eq!(stdout_of(&caches).lines().count(), 2, "the project's totals and the header: no caches yet");
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_refused_auth_are_one_clear_line() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");

    assert_one_line_failure(
        &coordinator.cachectl(&["project", "create", "Bad_Name"]),
        64,
        "invalid project name \"Bad_Name\"",
    );
    assert_one_line_failure(&coordinator.cachectl(&["project", "create", "web"]), 64, "project \"web\" already exists");
    assert_one_line_failure(&coordinator.cachectl(&["flush", "nope"]), 66, "no project named \"nope\"");
    assert_one_line_failure(&coordinator.cachectl(&["show", "web", "../etc"]), 64, "invalid service name");
    assert_one_line_failure(&coordinator.cachectl(&["show", "web", "app"]), 66, "no cache for service \"app\"");

    let wrong_admin = std::process::Command::new(binary("cachectl"))
        .args(["--coordinator", &coordinator.grpc_url, "ls"])
        .env("CACHE_ADMIN_TOKEN", "wrong-admin-token-123456")
        .output()
        .unwrap();
    assert_one_line_failure(&wrong_admin, 77, "unauthenticated: wrong admin token");
    let project_as_admin = std::process::Command::new(binary("cachectl"))
        .args(["--coordinator", &coordinator.grpc_url, "flush", "web"])
        .env("CACHE_ADMIN_TOKEN", &token)
        .output()
        .unwrap();
    assert_one_line_failure(&project_as_admin, 77, "permission denied: a project token cannot use the admin API");

    let admin_as_worker = coordinator.cache_worker(&coordinator.admin_token, &["credentials", "--format", "env"]);
    assert_one_line_failure(&admin_as_worker, 77, "permission denied: the admin token cannot be used by a worker");
    let forged = format!("cct_web_{}", "0".repeat(64));
    assert_one_line_failure(
        &coordinator.cache_worker(&forged, &["credentials"]),
        77,
        "unknown or revoked project token",
    );
    assert_one_line_failure(&coordinator.cache_worker("not a token", &["credentials"]), 64, "invalid token");
    let no_token = std::process::Command::new(binary("cache-worker"))
        .args(["--coordinator", &coordinator.grpc_url, "credentials"])
        .env_remove("CACHE_TOKEN")
        .output()
        .unwrap();
    assert_one_line_failure(&no_token, 64, "no project token");

    // Nothing above changed what is stored.
    let listing = stdout_of(&coordinator.cachectl(&["ls"]));
    assert_eq!(listing.lines().count(), 2, "{listing}");
    assert!(coordinator.cache_worker(&token, &["credentials"]).status.success());

    // An unreachable coordinator: one line naming it.
    let (_held_closed, closed_port) = tests::closed_port();
    let url = format!("http://{closed_port}");
    let unreachable = std::process::Command::new(binary("cache-worker"))
        .args(["--coordinator", &url, "credentials"])
        .env("CACHE_TOKEN", &token)
        .output()
        .unwrap();
    assert_one_line_failure(&unreachable, 69, &format!("cannot reach the coordinator at {url}"));
    let bad_url = std::process::Command::new(binary("cache-worker"))
        .args(["--coordinator", "ftp://x", "credentials"])
        .env("CACHE_TOKEN", &token)
        .output()
        .unwrap();
    assert_one_line_failure(&bad_url, 64, "invalid coordinator URL");
    coordinator.stop();
}

#[test]
fn a_data_directory_in_use_or_unusable_is_refused_without_touching_it() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("web");
    let serve = |data_dir: &std::path::Path| {
        std::process::Command::new(binary("cache-coordinator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--s3-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .output()
            .unwrap()
    };
    let second = serve(data_dir.path());
    assert_one_line_failure(&second, 64, "is in use by another cache-coordinator");
    // The first coordinator still serves the same projects and tokens.
    assert!(coordinator.cache_worker(&token, &["credentials"]).status.success());

    let file = data_dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    assert_one_line_failure(&serve(&file.join("sub")), 64, "cannot be used");
    let bad_address = std::process::Command::new(binary("cache-coordinator"))
        .args(["serve", "--listen", "nowhere"])
        .arg("--data-dir")
        .arg(data_dir.path().join("unused"))
        .output()
        .unwrap();
    assert_one_line_failure(&bad_address, 64, "invalid --listen address \"nowhere\"");
    assert!(!data_dir.path().join("unused").exists(), "a bad flag creates nothing");
    coordinator.stop();
}
