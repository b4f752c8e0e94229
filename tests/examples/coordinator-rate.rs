//! The coordinator alone, under 100 simulated workers on loopback: how many begin + commit +
//! lookup rounds per second it answers, on sled (one coordinator) and on PostgreSQL (one
//! replica, then two sharing the database), each on moto's S3 and STS. Every round's save
//! names blobs already stored (two images, alternated, so each commit writes a manifest), so
//! the figures are the coordinator's and its state's, not the store's.
//!
//! Run through `bench/coordinator-rate`, which builds it with the release binaries and starts
//! moto and PostgreSQL (`CACHE_TEST_MOTO_URL`, `CACHE_TEST_POSTGRES_URL`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::CoordinatorProcess;
use tests::moto::{new_bucket, platform_env, s3_args};

const WORKERS: usize = 100;
const PROJECTS: usize = 4;
const SECONDS: u64 = 10;

/// Rounds per second, and each call's share of the time, for `replicas` coordinators.
async fn rounds_per_second(replicas: &[CoordinatorProcess]) -> f64 {
    let images = [b"the first image's layer".to_vec(), b"the second image's layer".to_vec()];
    let mut tokens = Vec::new();
    for project in 0..PROJECTS {
        let token = replicas[0].create_project(&format!("bench{project}"));
        for (i, content) in images.iter().enumerate() {
            tests::save_one_layer_image(&replicas[0].grpc_url, &token, &format!("seed{i}"), "img:1", content).await;
        }
        tokens.push(token);
    }
    let rounds = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(SECONDS);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let url = replicas[worker % replicas.len()].grpc_url.clone();
        let token = tokens[worker % PROJECTS].clone();
        let (images, rounds) = (images.clone(), rounds.clone());
        tasks.spawn(async move {
            let mut client = tests::worker_client(&url, &token).await;
            let service = format!("worker{worker}");
            let key = pb::CacheKey { service: service.clone(), branch: String::new() };
            let mut n = 0usize;
            while Instant::now() < stop_at {
                let content = &images[n % 2];
                let begun = client.begin_save(tests::begin_one_layer_save(&service, "img:1", content)).await;
                let begun = begun.expect("BeginSave").into_inner();
                assert!(begun.missing_digests.is_empty() && !begun.unchanged, "{begun:?}");
                let commit = pb::CommitSaveRequest {
                    save_id: begun.save_id,
                    images: vec![tests::one_layer_image("img:1", content, true)],
                    save_log: Vec::new(),
                };
                assert!(client.commit_save(commit).await.expect("CommitSave").into_inner().stored);
                let found = client.lookup(pb::LookupRequest { key: Some(key.clone()), fallbacks: Vec::new() }).await;
                assert!(found.expect("Lookup").into_inner().found);
                rounds.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a simulated worker");
    }
    rounds.load(Ordering::Relaxed) as f64 / SECONDS as f64
}

#[tokio::main]
async fn main() {
    let moto = std::env::var("CACHE_TEST_MOTO_URL").expect("CACHE_TEST_MOTO_URL (bench/coordinator-rate sets it)");
    let mut rows = Vec::new();
    for (label, postgres, n_replicas) in [("sled", false, 1), ("PostgreSQL", true, 1), ("PostgreSQL", true, 2)] {
        let bucket = new_bucket(&moto).await;
        let mut args: Vec<String> = s3_args(&moto, &bucket).into_iter().map(str::to_owned).collect();
        args.extend(["--gc-interval".into(), "0".into()]);
        if postgres {
            let database = tests::postgres_database().await.expect("CACHE_TEST_POSTGRES_URL");
            args.extend(["--state".into(), database]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dirs: Vec<tempfile::TempDir> = (0..n_replicas).map(|_| tempfile::tempdir().unwrap()).collect();
        let replicas: Vec<CoordinatorProcess> =
            dirs.iter().map(|dir| CoordinatorProcess::start_with_env(dir.path(), &args, &platform_env())).collect();
        let rate = rounds_per_second(&replicas).await;
        println!(
            "{label:<11} {n_replicas} replica{}: {rate:>7.0} rounds/s (begin + commit + lookup), {:>7.0} calls/s",
            if n_replicas == 1 { " " } else { "s" },
            rate * 3.0
        );
        rows.push(rate);
        for replica in replicas {
            replica.stop();
        }
    }
    println!("PostgreSQL against sled: {:.2}x with one replica, {:.2}x with two", rows[1] / rows[0], rows[2] / rows[0]);
}
