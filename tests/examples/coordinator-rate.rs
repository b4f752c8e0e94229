//! The coordinator alone, under 100 and 1,000 simulated workers on loopback: how many begin +
//! commit + lookup rounds per second it answers, how long each call takes (p50 and p99, timed
//! by the workers), and on PostgreSQL how many database transactions and WAL syncs (fsyncs of
//! the server's log, for all its databases) a round costs, and where the machine's CPU went
//! meanwhile (the coordinators', PostgreSQL's and the workers' own, per round, and how much of
//! it was idle); on sled (one coordinator) and on
//! PostgreSQL (one replica, then two sharing the database), each on moto's S3 and STS. Every
//! round's save names blobs already stored (two images, alternated, so each commit writes a
//! manifest), so the figures are the coordinator's and its state's, not the store's.
//!
//! Run through `bench/coordinator-rate`, which builds it with the release binaries and starts
//! moto and PostgreSQL (`CACHE_TEST_MOTO_URL`, `CACHE_TEST_POSTGRES_URL`). `WORKERS=100` (a
//! comma-separated list) measures other numbers of workers than 100 and 1,000.

use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::CoordinatorProcess;
use tests::moto::{new_bucket, platform_env, s3_args};

/// Numbers of simulated workers measured unless `WORKERS` names others.
const DEFAULT_WORKERS: [usize; 2] = [100, 1000];
/// Simulated workers per project: well under the saves one token may have open at once (64),
/// so 100 workers share 4 projects and 1,000 share 40, as a platform's hosts share teams.
const WORKERS_PER_PROJECT: usize = 25;
/// How long each configuration's workers start new rounds (rounds in flight then finish).
const SECONDS: u64 = 10;
/// Descriptors the bench needs besides one connection per simulated worker.
const SPARE_FILES: u64 = 256;

/// The three calls of a round, in their order.
const CALLS: [&str; 3] = ["BeginSave", "CommitSave", "Lookup"];

/// One configuration's figures.
struct Measured {
    rounds_per_second: f64,
    /// For each of [`CALLS`], its p50 and p99 latency.
    latencies: [(Duration, Duration); 3],
    /// Per round, on PostgreSQL only.
    database_per_round: Option<DatabaseCounts<f64>>,
    cpu: CpuSplit,
}

/// Where the machine's CPU went while the workers ran: milliseconds a round of the
/// coordinators, of PostgreSQL's processes (all of the machine's: the bench's server's, when
/// it started its own), and of the bench itself (the simulated workers); the share it was idle.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSplit {
    coordinators_ms: f64,
    postgres_ms: f64,
    workers_ms: f64,
    idle_percent: f64,
}

/// CPU times in clock ticks, read from `/proc`: of given processes, of every process named
/// `postgres`, of this one, and the machine's (busy, all).
#[derive(Debug, Default)]
struct CpuTicks {
    processes: u64,
    postgres: std::collections::HashMap<u32, u64>,
    own: u64,
    machine_idle: u64,
    machine_all: u64,
}

/// The user and system ticks of a process, and its name (`/proc/PID/stat`); `None` once gone.
fn process_ticks(pid: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the whole line, utime 14 and stime 15.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((name.to_owned(), ticks))
}

impl CpuTicks {
    fn read(pids: &[u32]) -> CpuTicks {
        let processes = pids.iter().filter_map(|pid| process_ticks(&pid.to_string())).map(|(_, ticks)| ticks).sum();
        let mut postgres = std::collections::HashMap::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(pid) = name.parse::<u32>() else { continue };
            if let Some((_, ticks)) = process_ticks(&name).filter(|(comm, _)| comm == "postgres") {
                postgres.insert(pid, ticks);
            }
        }
        let own = process_ticks("self").map_or(0, |(_, ticks)| ticks);
        let machine = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        let line = machine.lines().next().expect("the cpu line of /proc/stat");
        let times: Vec<u64> = line.split_whitespace().skip(1).filter_map(|field| field.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal: idle and iowait are idle.
        let (machine_idle, machine_all) = (times[3] + times[4], times.iter().take(8).sum());
        CpuTicks { processes, postgres, own, machine_idle, machine_all }
    }

    /// What went between `self` (earlier) and `later`, per round of `n_rounds`. A PostgreSQL
    /// process that started between counts whole.
    fn split(&self, later: &CpuTicks, n_rounds: u64) -> CpuSplit {
        let tick_ms = 1000.0 / clock_ticks_per_second();
        let per_round = |ticks: u64| ticks as f64 * tick_ms / n_rounds.max(1) as f64;
        let postgres: u64 =
            later.postgres.iter().map(|(pid, ticks)| ticks.saturating_sub(*self.postgres.get(pid).unwrap_or(&0))).sum();
        let all = later.machine_all.saturating_sub(self.machine_all).max(1);
        CpuSplit {
            coordinators_ms: per_round(later.processes.saturating_sub(self.processes)),
            postgres_ms: per_round(postgres),
            workers_ms: per_round(later.own.saturating_sub(self.own)),
            idle_percent: 100.0 * later.machine_idle.saturating_sub(self.machine_idle) as f64 / all as f64,
        }
    }
}

/// The kernel's clock ticks a second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    let output = std::process::Command::new("getconf").arg("CLK_TCK").output().ok();
    output.and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok()).unwrap_or(100.0)
}

/// What the bench's database committed, and how often the server synced its log to disk.
#[derive(Debug, Clone, Copy)]
struct DatabaseCounts<T> {
    transactions: T,
    wal_syncs: T,
}

/// What simulated workers did between their start and their last round's end.
struct Rounds {
    n_rounds: u64,
    elapsed: Duration,
    /// For each of [`CALLS`], every call's latency.
    latencies: [Vec<Duration>; 3],
    cpu: CpuSplit,
}

/// Seeds `n_projects` projects with both images through one coordinator on `dirs[0]`, which it
/// stops after: so the measured replicas start with every blob stored, and the seeding's
/// database transactions are all counted before the measurement begins. The projects' tokens.
async fn seed(dirs: &[tempfile::TempDir], args: &[&str], images: &[Vec<u8>; 2], n_projects: usize) -> Vec<String> {
    let seeder = CoordinatorProcess::start_with_env(dirs[0].path(), args, &platform_env());
    let mut tokens = Vec::new();
    for project in 0..n_projects {
        let token = seeder.create_project(&format!("bench{project}"));
        for (i, content) in images.iter().enumerate() {
            tests::save_one_layer_image(&seeder.grpc_url, &token, &format!("seed{i}"), "img:1", content).await;
        }
        tokens.push(token);
    }
    seeder.stop();
    tokens
}

/// Runs `n_workers` simulated workers against `replicas` (spread evenly), each on a connection
/// of its own as a build host has, for `SECONDS`: the rounds done and each call's latencies.
async fn run_rounds(
    replicas: &[CoordinatorProcess],
    tokens: &[String],
    images: &[Vec<u8>; 2],
    n_workers: usize,
) -> Rounds {
    // Every worker connects first; the clock starts once all have.
    let start_line = std::sync::Arc::new(tokio::sync::Barrier::new(n_workers + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..n_workers {
        let url = replicas[worker % replicas.len()].grpc_url.clone();
        let token = tokens[worker % tokens.len()].clone();
        let (images, start_line) = (images.clone(), start_line.clone());
        tasks.spawn(async move {
            let mut client = tests::worker_client(&url, &token).await;
            let service = format!("worker{worker}");
            let key = pb::CacheKey { service: service.clone(), branch: String::new() };
            let mut latencies: [Vec<Duration>; 3] = Default::default();
            start_line.wait().await;
            let stop_at = Instant::now() + Duration::from_secs(SECONDS);
            let (mut n_rounds, mut image_idx) = (0u64, 0usize);
            while Instant::now() < stop_at {
                let content = &images[image_idx];
                let begin_unix_ms = std::time::UNIX_EPOCH.elapsed().expect("a clock after 1970").as_millis() as i64;
                let started = Instant::now();
                let begun = client.begin_save(tests::begin_one_layer_save(&service, "img:1", content)).await;
                latencies[0].push(started.elapsed());
                let begun = begun.expect("BeginSave").into_inner();
                assert!(begun.missing_digests.is_empty() && !begun.unchanged, "{begun:?}");
                let commit = pb::CommitSaveRequest {
                    save_id: begun.save_id,
                    images: vec![tests::one_layer_image("img:1", content, true)],
                    save_log: Vec::new(),
                };
                let started = Instant::now();
                let committed = client.commit_save(commit).await;
                latencies[1].push(started.elapsed());
                let committed = committed.expect("CommitSave").into_inner();
                // Two saves of one key begun in the same millisecond are ordered by their ids, so
                // a worker whose rounds take under a millisecond may see its previous save kept
                // (and then saves this image again, the other one being the key's).
                let began_with_it = |manifest: &pb::Manifest| {
                    manifest.origin.as_ref().is_some_and(|origin| origin.began_unix_ms >= begin_unix_ms)
                };
                assert!(committed.stored || committed.manifest.as_ref().is_some_and(began_with_it), "{committed:?}");
                if committed.stored {
                    image_idx = 1 - image_idx;
                }
                let started = Instant::now();
                let found = client.lookup(pb::LookupRequest { key: Some(key.clone()), fallbacks: Vec::new() }).await;
                latencies[2].push(started.elapsed());
                assert!(found.expect("Lookup").into_inner().found);
                n_rounds += 1;
            }
            (n_rounds, latencies)
        });
    }
    let pids: Vec<u32> = replicas.iter().map(CoordinatorProcess::pid).collect();
    start_line.wait().await;
    let started = Instant::now();
    let ticks_before = CpuTicks::read(&pids);
    let mut rounds =
        Rounds { n_rounds: 0, elapsed: Duration::ZERO, latencies: Default::default(), cpu: CpuSplit::default() };
    while let Some(done) = tasks.join_next().await {
        let (n_rounds, latencies) = done.expect("a simulated worker");
        rounds.n_rounds += n_rounds;
        for (all, one) in rounds.latencies.iter_mut().zip(latencies) {
            all.extend(one);
        }
    }
    // Until the last round in flight at the deadline ended: with 1,000 workers on a slow state
    // that round may take seconds, and counting it without its time would flatter the rate.
    rounds.elapsed = started.elapsed();
    rounds.cpu = ticks_before.split(&CpuTicks::read(&pids), rounds.n_rounds);
    rounds
}

/// The `percent`th percentile (nearest rank) of `sorted`.
fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    sorted[(sorted.len() * percent).div_ceil(100).saturating_sub(1)]
}

/// A connection to the PostgreSQL server the bench's databases live on, for its statistics.
/// It is connected to the server's own database (the one `CACHE_TEST_POSTGRES_URL` names), so
/// its queries are never counted among the bench database's transactions.
struct DatabaseStats {
    client: tokio_postgres::Client,
}

impl DatabaseStats {
    async fn connect() -> DatabaseStats {
        let server = std::env::var("CACHE_TEST_POSTGRES_URL").expect("CACHE_TEST_POSTGRES_URL");
        let (client, connection) =
            tokio_postgres::connect(&server, tokio_postgres::NoTls).await.expect("connect to PostgreSQL");
        tokio::spawn(connection);
        DatabaseStats { client }
    }

    /// The transactions committed in `database` so far, once no session is connected to it: a
    /// server process publishes its counts when it ends (otherwise only about once a second
    /// while busy, and ten seconds late when idle), so only then is the count whole. With them
    /// the server's WAL syncs so far, for all its databases (only the bench's when the bench
    /// started the server).
    async fn counts(&self, database: &str) -> DatabaseCounts<i64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = self
                .client
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", &[&database])
                .await
                .expect("count the sessions of the bench's database");
            if row.get::<_, i64>(0) == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "sessions of {database} still open 30 s after its coordinators stopped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let row = self
            .client
            .query_one(
                "SELECT xact_commit, (SELECT wal_sync FROM pg_stat_wal) FROM pg_stat_database WHERE datname = $1",
                &[&database],
            )
            .await
            .expect("read the bench database's transaction count and the server's WAL syncs");
        DatabaseCounts { transactions: row.get(0), wal_syncs: row.get(1) }
    }
}

/// One configuration: `n_replicas` coordinators (on sled when `postgres` is false, then only
/// one) under `n_workers` simulated workers.
async fn measure(moto: &str, postgres: Option<&DatabaseStats>, n_replicas: usize, n_workers: usize) -> Measured {
    let images = [b"the first image's layer".to_vec(), b"the second image's layer".to_vec()];
    let bucket = new_bucket(moto).await;
    let mut args: Vec<String> = s3_args(moto, &bucket).into_iter().map(str::to_owned).collect();
    args.extend(["--gc-interval".into(), "0".into()]);
    let mut database_name = None;
    if postgres.is_some() {
        let database = tests::postgres_database().await.expect("CACHE_TEST_POSTGRES_URL");
        database_name = Some(database.rsplit_once('/').expect("a URL naming a database").1.to_owned());
        args.extend(["--state".into(), database]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dirs: Vec<tempfile::TempDir> = (0..n_replicas).map(|_| tempfile::tempdir().unwrap()).collect();
    let tokens = seed(&dirs, &args, &images, n_workers.div_ceil(WORKERS_PER_PROJECT)).await;
    let counts_before = match (postgres, &database_name) {
        (Some(stats), Some(name)) => Some(stats.counts(name).await),
        _ => None,
    };
    let replicas: Vec<CoordinatorProcess> =
        dirs.iter().map(|dir| CoordinatorProcess::start_with_env(dir.path(), &args, &platform_env())).collect();
    let mut rounds = run_rounds(&replicas, &tokens, &images, n_workers).await;
    for replica in replicas {
        replica.stop();
    }
    // Counted from before the replicas started to after they stopped: their start and
    // background work (a few transactions a second) are in it too, as they are in production.
    let database_per_round = match (postgres, &database_name, counts_before) {
        (Some(stats), Some(name), Some(before)) => {
            let after = stats.counts(name).await;
            let per_round = |count: i64| count as f64 / rounds.n_rounds as f64;
            Some(DatabaseCounts {
                transactions: per_round(after.transactions - before.transactions),
                wal_syncs: per_round(after.wal_syncs - before.wal_syncs),
            })
        }
        _ => None,
    };
    let latencies = std::array::from_fn(|call| {
        let sorted = &mut rounds.latencies[call];
        sorted.sort_unstable();
        (percentile(sorted, 50), percentile(sorted, 99))
    });
    Measured {
        rounds_per_second: rounds.n_rounds as f64 / rounds.elapsed.as_secs_f64(),
        latencies,
        database_per_round,
        cpu: rounds.cpu,
    }
}

/// The numbers of simulated workers to measure: `WORKERS` (comma-separated) or 100 and 1,000.
fn worker_counts() -> Result<Vec<usize>, String> {
    let Ok(list) = std::env::var("WORKERS") else { return Ok(DEFAULT_WORKERS.to_vec()) };
    list.split(',')
        .map(|item| match item.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("WORKERS={list:?}: expected numbers of workers separated by commas, e.g. 100,1000")),
        })
        .collect()
}

/// Raises the soft open-file limit to the hard one (as the coordinator does for itself, with
/// the same function) and checks it holds one connection per simulated worker on both ends:
/// in the bench, and in a coordinator's gRPC listener, whose cap is a share of the limit (one
/// replica may serve them all). Each worker makes one call at a time on its connection, far
/// below the 128 streams a connection may carry.
fn raise_open_file_limit(most_workers: usize) -> Result<(), String> {
    let open_files = coordinator::listener::raise_open_file_limit();
    let grpc_connections = coordinator::listener::ListenerLimits::for_open_files(open_files).grpc.max_connections;
    if open_files < most_workers as u64 + SPARE_FILES || grpc_connections < most_workers {
        return Err(format!(
            "{most_workers} workers need as many connections, and the open-file limit {open_files} lets the coordinator \
             take {grpc_connections}: raise the hard limit (ulimit -Hn) or set fewer WORKERS"
        ));
    }
    Ok(())
}

fn milliseconds(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms < 10.0 { format!("{ms:.1}") } else { format!("{ms:.0}") }
}

#[tokio::main]
async fn main() {
    let checked = worker_counts().and_then(|counts| {
        raise_open_file_limit(counts.iter().copied().max().unwrap_or(0))?;
        Ok(counts)
    });
    let worker_counts = checked.unwrap_or_else(|error| {
        eprintln!("coordinator-rate: {error}");
        std::process::exit(64);
    });
    let moto = std::env::var("CACHE_TEST_MOTO_URL").expect("CACHE_TEST_MOTO_URL (bench/coordinator-rate sets it)");
    let stats = DatabaseStats::connect().await;
    let bench_started = Instant::now();
    let mut table = vec![
        "| state | workers | rounds/s | vs sled | BeginSave p50 / p99 ms | CommitSave p50 / p99 ms | Lookup p50 / p99 ms | transactions / round | WAL syncs / round (server) | CPU ms / round: coordinators / PostgreSQL / workers | idle |".to_owned(),
        "|---|---|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    for &n_workers in &worker_counts {
        let mut sled_rate = None;
        for (label, postgres, n_replicas) in [("sled", false, 1), ("PostgreSQL", true, 1), ("PostgreSQL", true, 2)] {
            let measured = measure(&moto, postgres.then_some(&stats), n_replicas, n_workers).await;
            let rate = measured.rounds_per_second;
            let versus_sled = rate / *sled_rate.get_or_insert(rate);
            let state = format!("{label}, {n_replicas} replica{}", if n_replicas == 1 { "" } else { "s" });
            let calls: Vec<String> = measured
                .latencies
                .iter()
                .map(|(p50, p99)| format!("{} / {}", milliseconds(*p50), milliseconds(*p99)))
                .collect();
            let per_round = |figure: fn(&DatabaseCounts<f64>) -> f64| {
                measured
                    .database_per_round
                    .as_ref()
                    .map_or_else(|| "–".to_owned(), |counts| format!("{:.2}", figure(counts)))
            };
            let (transactions, wal_syncs) =
                (per_round(|counts| counts.transactions), per_round(|counts| counts.wal_syncs));
            let cpu = measured.cpu;
            let (coordinators, postgres, workers) = (cpu.coordinators_ms, cpu.postgres_ms, cpu.workers_ms);
            println!(
                "{state:<24} {n_workers:>5} workers: {rate:>7.0} rounds/s ({versus_sled:.2}x sled); p50 / p99 ms: {}; {transactions} transactions and {wal_syncs} WAL syncs a round; CPU ms a round: coordinators {coordinators:.2}, PostgreSQL {postgres:.2}, workers {workers:.2}, machine {:.0}% idle",
                CALLS
                    .iter()
                    .zip(&calls)
                    .map(|(call, figures)| format!("{call} {figures}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                cpu.idle_percent
            );
            table.push(format!(
                "| {state} | {n_workers} | {rate:.0} | {versus_sled:.2}× | {} | {transactions} | {wal_syncs} | {coordinators:.2} / {postgres:.2} / {workers:.2} | {:.0}% |",
                calls.join(" | "),
                cpu.idle_percent
            ));
        }
    }
    println!();
    for line in &table {
        println!("{line}");
    }
    println!("\n(measured in {:.0} s)", bench_started.elapsed().as_secs_f64());
}
