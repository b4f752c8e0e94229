//! The same isolation, checked with an independent S3 client: the AWS CLI (Debian's `awscli`),
//! fed the `export` lines `cache-worker credentials` prints or keys from the gRPC API.

use std::process::{Command, Output};

use proto::v1 as pb;
use tests::{CoordinatorProcess, in_ci, parse_exports, stderr_of, stdout_of};

/// Whether the AWS CLI is installed; in CI its absence fails the test.
fn awscli_present() -> bool {
    let present = Command::new("aws").arg("--version").output().is_ok_and(|output| output.status.success());
    assert!(present || !in_ci(), "the AWS CLI is missing: .ci/run installs Debian's awscli");
    if !present {
        eprintln!("skipping: the AWS CLI is not installed here (CI installs it)");
    }
    present
}

/// Environment for the AWS CLI from credentials, with every other source of configuration off.
fn environment(credentials: &pb::Credentials) -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), credentials.access_key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY".into(), credentials.secret_access_key.clone()),
        ("AWS_SESSION_TOKEN".into(), credentials.session_token.clone()),
        ("AWS_ENDPOINT_URL".into(), credentials.endpoint_url.clone()),
        ("CACHE_S3_BUCKET".into(), credentials.bucket.clone()),
        ("CACHE_S3_PREFIX".into(), credentials.prefix.clone()),
    ]
}

fn aws(environment: &[(String, String)], args: &[&str]) -> Output {
    let endpoint = environment.iter().find(|(name, _)| name == "AWS_ENDPOINT_URL").map(|(_, url)| url.clone()).unwrap();
    Command::new("aws")
        .args(["--endpoint-url", &endpoint, "--region", "us-east-1"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(environment.iter().filter(|(name, _)| name != "AWS_ENDPOINT_URL").cloned())
        .output()
        .expect("run aws")
}

fn assert_ok(output: &Output, what: &str) {
    assert!(output.status.success(), "{what}: {}", stderr_of(output));
}

fn assert_refused(output: &Output, code: &str, what: &str) {
    let stderr = stderr_of(output);
    assert!(!output.status.success(), "{what} was allowed: {}", stdout_of(output));
    assert!(stderr.contains(code), "{what}: expected {code}, got {stderr}");
}

fn with(environment: &[(String, String)], name: &str, value: Option<&str>) -> Vec<(String, String)> {
    let mut changed: Vec<(String, String)> = environment.iter().filter(|(n, _)| n != name).cloned().collect();
    if let Some(value) = value {
        changed.push((name.to_owned(), value.to_owned()));
    }
    changed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_cli_meets_the_same_refusals() {
    if !awscli_present() {
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let web_token = coordinator.create_project("web");
    let api_token = coordinator.create_project("api");
    let write = environment(&coordinator.credentials(&web_token, pb::Access::Write).await);
    let other_project = environment(&coordinator.credentials(&api_token, pb::Access::Write).await);
    // The read-only key exactly as a user gets it: `cache-worker credentials --format env`.
    let printed = coordinator.cache_worker(&web_token, &["credentials", "--format", "env"]);
    let read = parse_exports(&stdout_of(&printed));
    let bucket = read.iter().find(|(name, _)| name == "CACHE_S3_BUCKET").unwrap().1.clone();
    let files = tempfile::tempdir().unwrap();
    let small = files.path().join("small");
    std::fs::write(&small, b"hello layer").unwrap();
    let big = files.path().join("big");
    std::fs::write(&big, vec![3u8; 9 * 1024 * 1024]).unwrap();
    let small = small.to_str().unwrap();
    // Write keys write blobs only, each under its own sha256.
    let blob_key = |content: &[u8]| {
        format!("cache/web/blobs/sha256/{}", tests::sha256_digest(content).trim_start_matches("sha256:"))
    };
    let key = &blob_key(b"hello layer");
    let big_key = blob_key(&vec![3u8; 9 * 1024 * 1024]);
    let url = |key: &str| format!("s3://{bucket}/{key}");

    // Inside the scope: put, get, ranged get, a multipart upload (9 MiB > the CLI's 8 MiB
    // threshold), and a listing of the project's own prefix with the read-only key.
    assert_ok(&aws(&write, &["s3api", "put-object", "--bucket", &bucket, "--key", key, "--body", small]), "put");
    let fetched = files.path().join("fetched");
    assert_ok(
        &aws(&read, &["s3api", "get-object", "--bucket", &bucket, "--key", key, fetched.to_str().unwrap()]),
        "get",
    );
    assert_eq!(std::fs::read(&fetched).unwrap(), b"hello layer");
    let ranged = aws(
        &read,
        &["s3api", "get-object", "--bucket", &bucket, "--key", key, "--range", "bytes=0-4", fetched.to_str().unwrap()],
    );
    assert_ok(&ranged, "ranged get");
    assert_eq!(std::fs::read(&fetched).unwrap(), b"hello");
    assert_ok(&aws(&write, &["s3", "cp", big.to_str().unwrap(), &url(&big_key)]), "multipart upload");
    let listing = aws(&read, &["s3", "ls", &url("cache/web/blobs/sha256/")]);
    assert_ok(&listing, "list own prefix");
    let big_hex = big_key.rsplit('/').next().unwrap();
    assert!(stdout_of(&listing).contains(big_hex), "{}", stdout_of(&listing));
    // Bytes under another blob's address, or under any other name, are refused.
    assert_refused(
        &aws(&write, &["s3api", "put-object", "--bucket", &bucket, "--key", &blob_key(b"other"), "--body", small]),
        "BadDigest",
        "a blob whose bytes are not its address",
    );
    assert_refused(
        &aws(&write, &["s3api", "put-object", "--bucket", &bucket, "--key", "cache/web/junk", "--body", small]),
        "AccessDenied",
        "a write outside blobs/sha256/",
    );

    // Refusals.
    let fetched = fetched.to_str().unwrap();
    assert_refused(
        &aws(&other_project, &["s3api", "get-object", "--bucket", &bucket, "--key", key, fetched]),
        "AccessDenied",
        "another project's key",
    );
    assert_refused(
        &aws(&write, &["s3api", "put-object", "--bucket", &bucket, "--key", "cache/api/x", "--body", small]),
        "AccessDenied",
        "a path outside the prefix",
    );
    assert_refused(
        &aws(&write, &["s3api", "list-objects-v2", "--bucket", &bucket]),
        "AccessDenied",
        "listing the bucket root",
    );
    assert_refused(&aws(&read, &["s3", "ls"]), "AccessDenied", "listing buckets");
    assert_refused(
        &aws(&read, &["s3api", "put-object", "--bucket", &bucket, "--key", "cache/web/new", "--body", small]),
        "AccessDenied",
        "a write with a read-only key",
    );
    assert_refused(
        &aws(&read, &["s3", "cp", big.to_str().unwrap(), &url("cache/web/big2")]),
        "AccessDenied",
        "a multipart upload with a read-only key",
    );
    assert_refused(
        &aws(&write, &["s3api", "delete-object", "--bucket", &bucket, "--key", key]),
        "AccessDenied",
        "a delete",
    );
    assert_refused(
        &aws(
            &with(&read, "AWS_SECRET_ACCESS_KEY", Some(&"0".repeat(40))),
            &["s3api", "get-object", "--bucket", &bucket, "--key", key, fetched],
        ),
        "SignatureDoesNotMatch",
        "a wrong secret",
    );
    assert_refused(
        &aws(
            &with(&read, "AWS_SESSION_TOKEN", None),
            &["s3api", "get-object", "--bucket", &bucket, "--key", key, fetched],
        ),
        "InvalidToken",
        "a missing session token",
    );
    let other_token = other_project.iter().find(|(name, _)| name == "AWS_SESSION_TOKEN").unwrap().1.clone();
    assert_refused(
        &aws(
            &with(&read, "AWS_SESSION_TOKEN", Some(&other_token)),
            &["s3api", "get-object", "--bucket", &bucket, "--key", key, fetched],
        ),
        "InvalidToken",
        "a wrong session token",
    );

    // What the refusals left: the object is intact, nothing new appeared.
    let listing = stdout_of(&aws(&read, &["s3", "ls", "--recursive", &url("cache/web/")]));
    let mut names: Vec<&str> = listing.lines().filter_map(|line| line.split_whitespace().last()).collect();
    names.sort_unstable();
    let mut expected = [key.as_str(), big_key.as_str()];
    expected.sort_unstable();
    assert_eq!(names, expected);
    coordinator.stop();

    // An expired key, on a coordinator that mints one-second keys.
    let short_dir = tempfile::tempdir().unwrap();
    let short = CoordinatorProcess::start(short_dir.path(), &["--credential-ttl", "1"]);
    let token = short.create_project("web");
    let credentials = short.credentials(&token, pb::Access::Read).await;
    while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
        <= credentials.expires_unix
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let expired =
        aws(&environment(&credentials), &["s3api", "get-object", "--bucket", &bucket, "--key", "cache/web/x", fetched]);
    assert_refused(&expired, "ExpiredToken", "an expired key");
    short.stop();
}
