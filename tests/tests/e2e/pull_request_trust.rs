//! What a pull request's token (`--write-branch 'pr-*' --read-branch main`) can do to the
//! default branch, tried as an attacker would through the gRPC API: forged blob records,
//! images of main re-described with huge step lists or other layers, lookups that crowd out
//! main's restore leases. After each, main's saves and restores work and its manifests hold
//! only what the coordinator checked; the last test runs the whole attack around a real
//! build on a real engine.

use proto::v1 as pb;
use tests::{
    CoordinatorProcess, DockerEngine, EngineKind, one_layer_config, one_layer_image, s3_client_for, sha256_digest,
    stderr_of, worker_client,
};

type Client = pb::worker_client::WorkerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, proto::client::BearerToken>,
>;

/// A pull request's token of project `web`: writes `pr-*`, reads `main`.
fn pull_request_token(coordinator: &CoordinatorProcess) -> String {
    tests::printed_token(&coordinator.cachectl(&tests::scoped_token_args("web", "pr-*", "main")))
}

fn key(service: &str, branch: &str) -> pb::CacheKey {
    pb::CacheKey { service: service.into(), branch: branch.into() }
}

/// Begins a save of `images` (described without sizes) under `key`.
async fn begin(
    client: &mut Client,
    key: pb::CacheKey,
    images: &[pb::Image],
) -> Result<pb::BeginSaveResponse, tonic::Status> {
    let images = images
        .iter()
        .map(|image| pb::Image {
            config_size: 0,
            layers: image
                .layers
                .iter()
                .map(|layer| pb::Layer { digest: layer.digest.clone(), ..Default::default() })
                .collect(),
            ..image.clone()
        })
        .collect();
    let request =
        pb::BeginSaveRequest { key: Some(key), images, engine_version: "test".into(), host: "pr-host".into() };
    client.begin_save(request).await.map(|answer| answer.into_inner())
}

/// Uploads those of `blobs` the begun save lacks, with its write credentials (a blob an
/// earlier, refused save of the same key left in the store is there already).
async fn upload_missing(begun: &pb::BeginSaveResponse, blobs: &[Vec<u8>]) {
    let Some(credentials) = &begun.credentials else { return };
    let store = s3_client_for(credentials);
    for blob in blobs.iter().filter(|blob| begun.missing_digests.contains(&sha256_digest(blob))) {
        let key = proto::object_keys::blob_key(&credentials.prefix, &sha256_digest(blob));
        let body = aws_sdk_s3::primitives::ByteStream::from(blob.clone());
        let put = store.put_object().bucket(&credentials.bucket).key(&key).body(body).send().await;
        if put.is_err() {
            store.head_object().bucket(&credentials.bucket).key(&key).send().await.expect("a blob stored");
        }
    }
}

/// Begins, uploads and commits `images` (described with sizes) under `key`.
async fn save(
    client: &mut Client,
    key: pb::CacheKey,
    images: Vec<pb::Image>,
    blobs: &[Vec<u8>],
) -> Result<pb::CommitSaveResponse, tonic::Status> {
    let begun = begin(client, key, &images).await?;
    upload_missing(&begun, blobs).await;
    let save_id = begun.save_id.clone();
    let commit = pb::CommitSaveRequest { save_id: save_id.clone(), images, save_log: vec!["saved".into()] };
    let committed = client.commit_save(commit).await.map(|answer| answer.into_inner());
    if committed.is_err() {
        let _ = client.abandon_save(pb::AbandonSaveRequest { save_id }).await;
    }
    committed
}

/// The blobs of [`one_layer_image`] of `content`: its config and its layer.
fn one_layer_blobs(content: &[u8]) -> Vec<Vec<u8>> {
    vec![one_layer_config(content), content.to_vec()]
}

async fn manifest_of(client: &mut Client, key: pb::CacheKey) -> pb::Manifest {
    let found = client.lookup(pb::LookupRequest { key: Some(key), fallbacks: vec![] }).await.expect("Lookup");
    found.into_inner().manifest.expect("a manifest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_requests_forged_blob_record_never_reaches_main() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let project_token = coordinator.create_project("web");
    let pr_token = pull_request_token(&coordinator);
    let mut pr = worker_client(&coordinator.grpc_url, &pr_token).await;
    let mut main = worker_client(&coordinator.grpc_url, &project_token).await;

    // The layer main's next build makes, uploaded for real by the pull request and committed
    // on its branch with a forged record: compressed, another stored digest, another size.
    let content = b"main's next layer".to_vec();
    let mut forged = one_layer_image("app:pr", &content, true);
    forged.layers[0] = pb::Layer {
        encoding: "gzip".into(),
        stored_digest: format!("sha256:{}", "0".repeat(64)),
        size: 123_456_789,
        stored_size: content.len() as u64,
        ..forged.layers[0].clone()
    };
    let refused = save(&mut pr, key("app", "pr-1"), vec![forged], &one_layer_blobs(&content)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("stored as the bytes of its digest"), "{}", refused.message());
    assert_eq!(refused.message().lines().count(), 1, "{}", refused.message());

    // The same blobs on the pull request's branch with an honest record are fine.
    let honest = one_layer_image("app:pr", &content, true);
    save(&mut pr, key("app", "pr-1"), vec![honest], &one_layer_blobs(&content)).await.expect("an honest commit");

    // Main's save of an image with that layer is told the stored blob as the coordinator
    // checked it, and commits it so.
    let image = one_layer_image("app:main", &content, true);
    let begun = begin(&mut main, key("app", "main"), std::slice::from_ref(&image)).await.unwrap();
    let told = begun.stored_blobs.iter().find(|blob| blob.digest == sha256_digest(&content)).expect("stored");
    assert_eq!(
        (told.size, told.stored_size, told.encoding.as_str(), told.stored_digest.as_str()),
        (content.len() as u64, content.len() as u64, "", "")
    );
    let mut described = image.clone();
    described.layers[0] = told.clone();
    let commit = pb::CommitSaveRequest { save_id: begun.save_id, images: vec![described], save_log: vec![] };
    assert!(main.commit_save(commit).await.unwrap().into_inner().stored);
    let stored = manifest_of(&mut main, key("app", "main")).await;
    let layer = &stored.images[0].layers[0];
    assert_eq!((layer.size, layer.encoding.as_str(), layer.stored_digest.as_str()), (content.len() as u64, "", ""));

    // A main save that copies a forged record (as a worker told so would) is refused too:
    // no record reaches a manifest unchecked.
    let mut copied = image.clone();
    copied.layers[0].encoding = "gzip".into();
    copied.layers[0].stored_digest = format!("sha256:{}", "0".repeat(64));
    let refused = save(&mut main, key("api", "main"), vec![copied], &[]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_never_describes_mains_images_and_cannot_swell_mains_answers() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let project_token = coordinator.create_project("web");
    let main_token = tests::printed_token(&coordinator.cachectl(&tests::scoped_token_args("web", "main", "main")));
    let pr_token = pull_request_token(&coordinator);
    let mut pr = worker_client(&coordinator.grpc_url, &pr_token).await;
    let mut main = worker_client(&coordinator.grpc_url, &main_token).await;

    // Main saves three images.
    let contents: Vec<Vec<u8>> = (0..3).map(|i| format!("main layer {i}").into_bytes()).collect();
    let images: Vec<pb::Image> =
        contents.iter().enumerate().map(|(i, content)| one_layer_image(&format!("app:{i}"), content, true)).collect();
    let blobs: Vec<Vec<u8>> = contents.iter().flat_map(|content| one_layer_blobs(content)).collect();
    save(&mut main, key("web", "main"), images.clone(), &blobs).await.expect("main's save");

    // The pull request re-describes each of main's images on its own branch, under services
    // that sort first, with 750 steps of 4 KiB each and its own layer added; and describes
    // main's next image (not saved by main yet) with a layer list of its choosing.
    let own = b"the pull request's layer".to_vec();
    let own_layer = pb::Layer { digest: sha256_digest(&own), size: own.len() as u64, ..Default::default() };
    let steps: Vec<pb::Step> = (0..750)
        .map(|i| pb::Step { instruction: format!("RUN {i} {}", "x".repeat(4_000)), ..Default::default() })
        .collect();
    for (i, image) in images.iter().enumerate() {
        let mut redescribed = image.clone();
        redescribed.steps = steps.clone();
        redescribed.layers.push(own_layer.clone());
        let saved = save(&mut pr, key(&format!("a{i}"), "pr-1"), vec![redescribed], std::slice::from_ref(&own)).await;
        assert!(saved.expect("the pull request's save").stored);
    }
    let next_content = b"main's next layer".to_vec();
    let next = one_layer_image("app:next", &next_content, true);
    let mut bogus = next.clone();
    bogus.layers = vec![own_layer.clone()];
    let mut bogus_blobs = one_layer_blobs(&next_content);
    bogus_blobs.push(own.clone());
    save(&mut pr, key("a9", "pr-1"), vec![bogus], &bogus_blobs).await.expect("the pull request's save");

    // Main's next saves: answers well under a worker's 4 MiB limit, each image described by
    // main's own manifest, never by the pull request's.
    let project = worker_client(&coordinator.grpc_url, &project_token).await;
    for mut client in [main, project] {
        let client = &mut client;
        let mut asked = images.clone();
        asked.push(next.clone());
        let begun = begin(client, key("web", "main"), &asked).await.expect("main's begin");
        assert_eq!(begun.known_images.len(), 3, "{:?}", begun.known_images.iter().map(|i| &i.id).collect::<Vec<_>>());
        for known in &begun.known_images {
            let original = images.iter().find(|image| image.id == known.id).expect("one of main's");
            let layers: Vec<&str> = known.layers.iter().map(|layer| layer.digest.as_str()).collect();
            assert_eq!(layers, vec![original.layers[0].digest.as_str()], "main's own layer list");
            assert!(known.steps.is_empty(), "no steps travel in known images");
        }
        client.abandon_save(pb::AbandonSaveRequest { save_id: begun.save_id }).await.unwrap();
    }
    coordinator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_by_a_pull_request_never_unprotect_the_blobs_a_main_restore_reads() {
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &["--gc-grace", "0s", "--gc-interval", "0"]);
    let project_token = coordinator.create_project("web");
    let pr_token = pull_request_token(&coordinator);
    let mut pr = worker_client(&coordinator.grpc_url, &pr_token).await;
    let mut main = worker_client(&coordinator.grpc_url, &project_token).await;

    // Main's restore of its first cache starts (its lease held: no report yet)...
    let first = b"main's first build".to_vec();
    let image = one_layer_image("app:1", &first, true);
    save(&mut main, key("app", "main"), vec![image], &one_layer_blobs(&first)).await.unwrap();
    let restoring = manifest_of(&mut main, key("app", "main")).await;
    let read_key = coordinator.credentials(&project_token, pb::Access::Read).await;
    // ...while main saves its next build, which leaves the first one's blobs unnamed.
    let second = b"main's second build".to_vec();
    save(&mut main, key("app", "main"), vec![one_layer_image("app:2", &second, true)], &one_layer_blobs(&second))
        .await
        .unwrap();

    // The pull request saves its own branch and looks it up 16 times.
    let own = b"the pull request's build".to_vec();
    save(&mut pr, key("app", "pr-1"), vec![one_layer_image("app:pr", &own, true)], &one_layer_blobs(&own))
        .await
        .unwrap();
    for _ in 0..16 {
        manifest_of(&mut pr, key("app", "pr-1")).await;
    }

    // A collection runs: unnamed blobs go at once (no grace), but none a restore reads; then
    // a quota of one byte evicts every cache it can.
    coordinator.gc(&["web"]);
    let set = coordinator.cachectl(&["project", "set-quota", "web", "1"]);
    assert!(set.status.success(), "{}", stderr_of(&set));
    let evicted = main.lookup(pb::LookupRequest { key: Some(key("app", "main")), fallbacks: vec![] }).await.unwrap();
    assert!(!evicted.into_inner().found, "the eviction ran");

    // Main's running restore still downloads every blob it reads.
    let store = s3_client_for(&read_key);
    for layer in restoring.images.iter().flat_map(|image| image.layers.iter()) {
        let key = proto::object_keys::blob_key(&read_key.prefix, &layer.digest);
        let got = store.get_object().bucket(&read_key.bucket).key(&key).send().await;
        assert!(got.is_ok(), "main's restore lost {}: {got:?}", layer.digest);
    }
    coordinator.stop();
}

#[test]
fn after_everything_a_pull_request_token_can_do_mains_save_and_strict_restore_work_and_the_rebuild_is_cached() {
    let Some(ci_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let _project_token = coordinator.create_project("web");
    let main_token = tests::printed_token(&coordinator.cachectl(&tests::scoped_token_args("web", "main", "main")));
    let pr_token = pull_request_token(&coordinator);
    let main_save = ["save", "--service", "app", "--branch", "main", "app:latest"];
    let context = tests::build_seed_app(&ci_host);
    let saved = coordinator.cache_worker_on(&ci_host, &main_token, &main_save);
    assert!(saved.status.success(), "{}", stderr_of(&saved));

    // Main's next build changes its file: new layers the pull request knows (it has the code).
    std::fs::write(context.path().join("file.txt"), "changed on main\n").unwrap();
    let rebuilt = ci_host.classic_build(context.path(), "app:latest", &[]);
    assert!(rebuilt.status.success(), "{}", stderr_of(&rebuilt));
    let layer_tars = layer_tars_of(&ci_host, "app:latest");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut pr = worker_client(&coordinator.grpc_url, &pr_token).await;
        let mut main_reader = worker_client(&coordinator.grpc_url, &main_token).await;
        let mains = manifest_of(&mut main_reader, key("app", "main")).await;
        // Every new layer of main's next build, uploaded for real and committed on the pull
        // request's branch with forged records (refused), then with honest ones.
        let new_layers: Vec<&Vec<u8>> = layer_tars
            .iter()
            .filter(|tar| !mains.images.iter().any(|image| image.layers.iter().any(|l| l.digest == sha256_digest(tar))))
            .collect();
        assert!(!new_layers.is_empty(), "main's rebuild made new layers");
        for (i, tar) in new_layers.iter().enumerate() {
            let mut image = one_layer_image(&format!("pr:{i}"), tar, true);
            let blobs = one_layer_blobs(tar);
            image.layers[0].encoding = "gzip".into();
            image.layers[0].stored_digest = format!("sha256:{}", "0".repeat(64));
            image.layers[0].size = 123_456_789;
            image.layers[0].stored_size = tar.len() as u64;
            let forged = save(&mut pr, key("app", &format!("pr-{i}")), vec![image], &blobs).await;
            assert!(forged.is_err(), "a forged record is refused");
            let honest = one_layer_image(&format!("pr:{i}"), tar, true);
            save(&mut pr, key("app", &format!("pr-{i}")), vec![honest], &blobs).await.expect("honest");
        }
        // Main's images re-described with huge step lists and an extra layer, under services
        // that sort before main's.
        let steps: Vec<pb::Step> = (0..750)
            .map(|i| pb::Step { instruction: format!("RUN {i} {}", "x".repeat(4_000)), ..Default::default() })
            .collect();
        let extra = new_layers[0];
        for (i, image) in mains.images.iter().enumerate() {
            let mut redescribed = image.clone();
            redescribed.steps = steps.clone();
            redescribed.layers.push(pb::Layer {
                digest: sha256_digest(extra),
                size: extra.len() as u64,
                stored_size: extra.len() as u64,
                ..Default::default()
            });
            let saved = save(&mut pr, key(&format!("a{i}"), "pr-9"), vec![redescribed], &[]).await;
            saved.expect("a re-description on the pull request's branch");
        }
        // Lookups of other branches, crowding the project's restore leases.
        for i in 0..20 {
            let _ = pr
                .lookup(pb::LookupRequest { key: Some(key("app", &format!("pr-{}", i % 2))), fallbacks: vec![] })
                .await;
        }
        // A read-only report of main's blobs as bad: each found intact, nothing dropped.
        for layer in mains.images.iter().flat_map(|image| image.layers.iter()).take(3) {
            let report = pr.report_bad_blob(pb::ReportBadBlobRequest { digest: layer.digest.clone() }).await;
            if let Ok(report) = report {
                assert!(!report.into_inner().dropped, "an intact blob is never dropped");
            }
        }
    });

    // Main saves its new build, and restores it strictly on a fresh host: fully cached.
    let saved = coordinator.cache_worker_on(&ci_host, &main_token, &main_save);
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let Some(fresh_host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let restored = coordinator.cache_worker_on(
        &fresh_host,
        &main_token,
        &["restore", "--service", "app", "--branch", "main", "--strict"],
    );
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    tests::assert_seed_rebuild_cached(&fresh_host, context.path());
    // And main's next save of the same build is unchanged and keeps what was checked.
    let again = coordinator.cache_worker_on(&ci_host, &main_token, &main_save);
    assert!(again.status.success(), "{}", stderr_of(&again));
    coordinator.assert_no_secret_logged(&[&pr_token, &main_token]);
    coordinator.stop();
}

/// The layer tars of `image` on `engine`, read from its `docker save` (Engine 20.10's legacy
/// format: `<v1 id>/layer.tar`).
fn layer_tars_of(engine: &DockerEngine, image: &str) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("saved.tar");
    let output = engine.docker(&["save", "-o", tarball.to_str().unwrap(), image]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let unpacked = dir.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let untar = std::process::Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(&unpacked).output().unwrap();
    assert!(untar.status.success(), "{}", stderr_of(&untar));
    let mut tars: Vec<Vec<u8>> = Vec::new();
    for entry in std::fs::read_dir(&unpacked).unwrap().flatten() {
        let layer = entry.path().join("layer.tar");
        if let Ok(bytes) = std::fs::read(&layer)
            && !tars.contains(&bytes)
        {
            tars.push(bytes);
        }
    }
    tars
}
