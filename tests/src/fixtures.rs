//! Test fixtures: the seed scenario's image and build contexts, and one-layer images saved
//! through the API as a worker would.

use std::path::Path;

use proto::client::BearerToken;
use proto::v1 as pb;
use proto::v1::worker_client::WorkerClient;

use crate::*;

/// The seed scenario's Dockerfile: FROM, RUN, RUN, COPY, ENV, RUN.
pub const SEED_DOCKERFILE: &str = "FROM base:1\nRUN echo one > /one\nRUN echo two > /two\nCOPY file.txt /file.txt\nENV GREETING=hello\nRUN cat /file.txt /one > /three\n";

/// Imports `base:1` on `engine` and builds the seed image `app:latest` there (classic
/// builder); the build context is returned, for a rebuild.
pub fn build_seed_app(engine: &DockerEngine) -> tempfile::TempDir {
    engine.import_busybox_base("base:1");
    let context = build_context(SEED_DOCKERFILE);
    let built = engine.classic_build(context.path(), "app:latest", &[]);
    assert!(built.status.success(), "build: {}", stderr_of(&built));
    context
}

/// The layer digests (diff IDs) of `image` on `engine`, base first.
pub fn layer_digests(engine: &DockerEngine, image: &str) -> Vec<String> {
    let inspect = engine.docker(&["image", "inspect", "--format", "{{json .RootFS.Layers}}", image]);
    serde_json::from_str(stdout_of(&inspect).trim()).expect("the image's layers")
}

/// Builds the seed image again on `engine` (classic builder) and asserts that every one of its
/// five steps after `FROM` came from the cache.
pub fn assert_seed_rebuild_cached(engine: &DockerEngine, context: &Path) {
    let rebuilt = engine.classic_build(context, "app:latest", &[]);
    assert!(rebuilt.status.success(), "rebuild: {}", stderr_of(&rebuilt));
    assert_eq!(stdout_of(&rebuilt).matches("Using cache").count(), 5, "{}", stdout_of(&rebuilt));
}

/// A build context with `dockerfile` and the `file.txt` the seed Dockerfile copies.
pub fn build_context(dockerfile: &str) -> tempfile::TempDir {
    let context = tempfile::tempdir().expect("build context");
    std::fs::write(context.path().join("Dockerfile"), dockerfile).expect("write Dockerfile");
    std::fs::write(context.path().join("file.txt"), "content\n").expect("write file.txt");
    context
}

/// A blob of the embedded store lost behind the coordinator's back, `how`: its file under the
/// coordinator's data directory `data_dir` "corrupted" in place (as many bytes, all `x`) or
/// "deleted".
pub fn lose_blob(data_dir: &Path, project: &str, digest: &str, how: &str) {
    let file = data_dir
        .join("objects/layer-cache/cache")
        .join(project)
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    match how {
        "corrupted" => {
            let size = std::fs::metadata(&file).expect("the stored blob").len() as usize;
            std::fs::write(&file, vec![b'x'; size]).expect("corrupt the blob");
        }
        "deleted" => std::fs::remove_file(&file).expect("delete the blob"),
        other => panic!("no way to lose a blob called {other:?}"),
    }
}

/// "sha256:<hex>" of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    proto::digest::sha256_digest(bytes)
}

/// A worker's gRPC client with a project token.
pub async fn worker_client(
    grpc_url: &str,
    token: &str,
) -> WorkerClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>> {
    let channel = proto::client::connect(grpc_url).await.expect("connect to the coordinator");
    WorkerClient::with_interceptor(channel, BearerToken::new(token).expect("token"))
}

/// An image of one config and one layer, made of `content`, as a worker describes it: sizes
/// only `with_sizes` (a commit), not at the begin.
pub fn one_layer_image(tag: &str, content: &[u8], with_sizes: bool) -> pb::Image {
    let config = one_layer_config(content);
    pb::Image {
        id: sha256_digest(&config),
        repo_tags: vec![tag.to_owned()],
        config_size: if with_sizes { config.len() as u64 } else { 0 },
        layers: vec![pb::Layer {
            digest: sha256_digest(content),
            size: if with_sizes { content.len() as u64 } else { 0 },
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The config JSON [`one_layer_image`] names.
pub fn one_layer_config(content: &[u8]) -> Vec<u8> {
    format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#, sha256_digest(content)).into_bytes()
}

/// Begins the save of [`one_layer_image`] under `service`.
pub fn begin_one_layer_save(service: &str, tag: &str, content: &[u8]) -> pb::BeginSaveRequest {
    pb::BeginSaveRequest {
        key: Some(pb::CacheKey { service: service.into(), branch: String::new() }),
        images: vec![one_layer_image(tag, content, false)],
        engine_version: "test".into(),
        host: "test-host".into(),
    }
}

/// Uploads the blobs of [`one_layer_image`] with a begun save's credentials, as a worker does.
pub async fn upload_one_layer_blobs(credentials: &pb::Credentials, content: &[u8]) {
    let store = s3_client_for(credentials);
    for blob in [one_layer_config(content), content.to_vec()] {
        let key = proto::object_keys::blob_key(&credentials.prefix, &sha256_digest(&blob));
        store
            .put_object()
            .bucket(&credentials.bucket)
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from(blob))
            .send()
            .await
            .expect("upload a blob");
    }
}

/// A whole save of [`one_layer_image`] through the API: begin, upload, commit.
pub async fn save_one_layer_image(
    grpc_url: &str,
    token: &str,
    service: &str,
    tag: &str,
    content: &[u8],
) -> pb::CommitSaveResponse {
    let mut client = worker_client(grpc_url, token).await;
    let begun = client.begin_save(begin_one_layer_save(service, tag, content)).await.expect("BeginSave").into_inner();
    if let Some(credentials) = &begun.credentials {
        upload_one_layer_blobs(credentials, content).await;
    }
    let commit = pb::CommitSaveRequest {
        save_id: begun.save_id,
        images: vec![one_layer_image(tag, content, true)],
        save_log: vec![format!("saved {tag}")],
    };
    client.commit_save(commit).await.expect("CommitSave").into_inner()
}
