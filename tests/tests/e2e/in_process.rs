//! A coordinator run in the test's own process (`coordinator::run` on ports the kernel picks)
//! with a manual clock: tests of expiry and last use move its time with
//! [`InProcessCoordinator::advance`] instead of sleeping. Workers and cachectl stay the real
//! binaries, against it as against a process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use coordinator::config::{Cli, Command as CoordinatorCommand, FileConfig, merge};
use proto::clock::ManualClock;
use tests::{ADMIN_TOKEN, DockerEngine, binary, blob_files_in, cachectl_at, metric_sample, stderr_of, stdout_of};

/// A coordinator serving from a thread of the test process until stopped or dropped.
pub struct InProcessCoordinator {
    /// The clock every time it stamps or compares is read from; moved only by the test.
    pub clock: Arc<ManualClock>,
    pub grpc_url: String,
    /// `http://HOST:PORT` of the metrics and health listener.
    pub metrics_url: String,
    pub data_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessCoordinator {
    /// Starts a coordinator on `data_dir` with the embedded store, `cache-coordinator serve
    /// EXTRA_ARGS…` as the process would be, and returns once it listens.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> InProcessCoordinator {
        let mut args = vec!["cache-coordinator", "serve", "--listen", "127.0.0.1:0", "--s3-listen", "127.0.0.1:0"];
        args.extend(["--metrics-listen", "127.0.0.1:0", "--data-dir", data_dir.to_str().expect("UTF-8 path")]);
        args.extend(extra_args);
        let CoordinatorCommand::Serve(serve_args) = Cli::parse_from(args).command;
        let config = merge(serve_args, FileConfig::default()).expect("a valid configuration");
        let clock = ManualClock::starting_now();
        let (ready_sender, ready_receiver) = std::sync::mpsc::channel();
        let (shutdown, shutdown_receiver) = tokio::sync::oneshot::channel::<()>();
        let server_clock: proto::clock::SharedClock = clock.clone();
        let server = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async move {
                let with_sled = config.state.is_none();
                let data_dir =
                    coordinator::open_data_dir(&config.data_dir, Some(ADMIN_TOKEN), &config.bucket, with_sled)?;
                let state = coordinator::open_state(&config, &data_dir).await?;
                let listeners = coordinator::Listeners::bind(&config).await?;
                let endpoints = listeners.endpoints(&config)?;
                let store =
                    coordinator::open_store(&config, &data_dir, state.clone(), server_clock.clone(), &endpoints)
                        .await?;
                let _ = ready_sender.send(endpoints);
                let shutdown = async move {
                    let _ = shutdown_receiver.await;
                };
                coordinator::run(config, data_dir, state, listeners, store, server_clock, shutdown).await
            })
        });
        let endpoints = match ready_receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(endpoints) => endpoints,
            Err(_) => panic!("the in-process coordinator did not start: {:?}", server.join()),
        };
        InProcessCoordinator {
            clock,
            grpc_url: format!("http://{}", endpoints.grpc),
            metrics_url: format!("http://{}", endpoints.metrics),
            data_dir: data_dir.to_path_buf(),
            shutdown: Some(shutdown),
            server: Some(server),
        }
    }

    /// Moves the coordinator's time forward by `by`, at once.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Shuts it down as SIGTERM would, and checks it stopped cleanly.
    pub fn stop(mut self) {
        let result = self.shut_down();
        assert!(matches!(result, Some(Ok(Ok(())))), "the in-process coordinator stopped with {result:?}");
    }

    fn shut_down(&mut self) -> Option<std::thread::Result<anyhow::Result<()>>> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.server.take().map(std::thread::JoinHandle::join)
    }

    /// Runs cachectl against it with the admin token.
    pub fn cachectl(&self, args: &[&str]) -> Output {
        cachectl_at(&self.grpc_url, ADMIN_TOKEN, args)
    }

    /// `cachectl gc ARGS…`, which must succeed: what it printed.
    pub fn gc(&self, args: &[&str]) -> String {
        let output = self.cachectl(&[&["gc"], args].concat());
        assert!(output.status.success(), "{}", stderr_of(&output));
        stdout_of(&output)
    }

    /// Creates a project through cachectl and returns its token (the last stdout line).
    pub fn create_project(&self, name: &str) -> String {
        let output = self.cachectl(&["project", "create", name]);
        assert!(output.status.success(), "cachectl project create {name}: {}", stderr_of(&output));
        stdout_of(&output).lines().last().expect("token line").to_owned()
    }

    /// The value of one sample (`name{labels}`) of its `/metrics`, if it is there.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        metric_sample(&self.metrics_url, sample)
    }

    /// The sizes of the blob files of `project` in its embedded store (none: no folder yet).
    pub fn blob_files(&self, project: &str) -> Vec<u64> {
        blob_files_in(&self.data_dir, project)
    }

    /// Runs cache-worker with a project token against `engine`.
    pub fn cache_worker_on(&self, engine: &DockerEngine, token: &str, args: &[&str]) -> Output {
        Command::new(binary("cache-worker"))
            .arg("--coordinator")
            .arg(&self.grpc_url)
            .args(args)
            .env("CACHE_TOKEN", token)
            .env("DOCKER_HOST", &engine.host)
            .env("CACHE_BUILD_CACHE_DIR", engine.build_cache_dir())
            .output()
            .expect("run cache-worker")
    }
}

impl Drop for InProcessCoordinator {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}
