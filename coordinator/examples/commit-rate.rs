//! The cost of durable acknowledgements: commits per second through the database, each made
//! durable before its (imagined) reply, one at a time and 16 at once (group commit), against
//! the same commits without waiting for the disk. `cargo run --release -p coordinator --example
//! commit-rate [N]`; run it on the disk the data directory lives on (`TMPDIR`).

use std::collections::HashMap;
use std::time::Instant;

use coordinator::state::{BlobRecord, Database, ProjectRecord, State};
use proto::v1 as pb;

fn manifest(service: &str, n: usize) -> pb::Manifest {
    pb::Manifest {
        key: Some(pb::CacheKey { service: service.into(), branch: String::new() }),
        images: vec![pb::Image {
            id: format!("sha256:{n:064x}"),
            layers: (0..5)
                .map(|layer| pb::Layer { digest: format!("sha256:{:064x}", n * 8 + layer), ..Default::default() })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn commits_per_second(db: &Database, n_commits: usize, n_at_once: usize, durable: bool) -> f64 {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..n_at_once {
        let db = db.clone();
        tasks.spawn(async move {
            for n in (worker..n_commits).step_by(n_at_once) {
                let service = format!("s{}", n % 50);
                db.commit_manifest("bench", &manifest(&service, n), 0, &HashMap::<String, BlobRecord>::new(), 0)
                    .await
                    .unwrap();
                if durable {
                    db.durable().await.unwrap();
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    n_commits as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n_commits: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path()).unwrap();
    let project = ProjectRecord {
        name: "bench".into(),
        token_sha256_hex: "00".repeat(32),
        created_unix: 0,
        generation: 0,
        quota_bytes: 0,
        sweep_after_unix: 0,
    };
    db.create_project(&project).await.unwrap();
    println!("data directory {} ({n_commits} commits per row)", dir.path().display());
    for n_at_once in [1, 16] {
        let volatile = commits_per_second(&db, n_commits, n_at_once, false).await;
        let durable = commits_per_second(&db, n_commits, n_at_once, true).await;
        println!(
            "{n_at_once:>2} at once: {volatile:>8.0} commits/s without waiting for the disk, {durable:>8.0} durable ({:.2}x)",
            durable / volatile
        );
    }
}
