//! The real binaries as processes: a coordinator on ports the kernel picks, with its log
//! captured (and checked for secrets and escape codes), crashed, stopped and restarted;
//! cache-worker runs against an engine; a port that stays closed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use proto::client::BearerToken;
use proto::v1 as pb;
use proto::v1::worker_client::WorkerClient;

use crate::*;

/// A binary of this workspace, built by the same `cargo test` run (each binary's package has an
/// integration test, so cargo builds it before any test runs).
pub fn binary(name: &str) -> PathBuf {
    let test_executable = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = test_executable.parent().and_then(Path::parent).expect("target directory");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A coordinator process on ports chosen by the kernel, with its own data directory.
pub struct CoordinatorProcess {
    child: Child,
    /// The process's stderr (its log), kept for tests to read and printed when a test fails.
    log: tempfile::NamedTempFile,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    pub grpc_url: String,
    pub s3_url: String,
    /// The address the embedded S3 endpoint is bound to (it differs from `s3_url` behind
    /// `--s3-public-url`); `None` with an S3 store.
    pub s3_listen: Option<String>,
    /// `http://HOST:PORT` of the metrics and health listener.
    pub metrics_url: String,
    pub data_dir: PathBuf,
    pub admin_token: String,
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

impl CoordinatorProcess {
    /// Starts `cache-coordinator serve` on `data_dir` and waits for its ready line.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> CoordinatorProcess {
        Self::start_with_env(data_dir, extra_args, &[])
    }

    /// The same, with extra environment variables (the coordinator's own AWS credentials).
    pub fn start_with_env(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> CoordinatorProcess {
        Self::start_command(Command::new(binary("cache-coordinator")), data_dir, extra_args, env)
    }

    /// Starts it with at most `open_files` file descriptors (soft and hard limit, through
    /// util-linux's `prlimit`), as a host's limit would hold it.
    pub fn start_with_file_limit(data_dir: &Path, open_files: u64, extra_args: &[&str]) -> CoordinatorProcess {
        let mut command = Command::new("prlimit");
        command.arg(format!("--nofile={open_files}:{open_files}")).arg("--").arg(binary("cache-coordinator"));
        Self::start_command(command, data_dir, extra_args, &[])
    }

    fn start_command(
        mut command: Command,
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> CoordinatorProcess {
        let log = tempfile::NamedTempFile::new().expect("coordinator log file");
        let stderr = log.reopen().expect("coordinator log file");
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--s3-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .env("CACHE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("CACHE_CONFIG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start cache-coordinator");
        let stdout = child.stdout.take().expect("stdout");
        let (line_sender, line_receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_sender.send(line).is_err() {
                    break;
                }
            }
        });
        let ready = loop {
            match line_receiver.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.starts_with("cache-coordinator ready:") => break line,
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait();
                    let log_text = std::fs::read_to_string(log.path()).unwrap_or_default();
                    panic!("cache-coordinator printed no ready line: {status:?}\n{log_text}");
                }
            }
        };
        let field = |name: &str| {
            ready
                .split_whitespace()
                .find_map(|part| part.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} in {ready:?}"))
                .to_owned()
        };
        let s3_listen = ready.split_whitespace().find_map(|part| part.strip_prefix("s3_listen=")).map(str::to_owned);
        CoordinatorProcess {
            grpc_url: field("grpc"),
            s3_url: field("s3"),
            s3_listen,
            metrics_url: field("metrics"),
            child,
            log,
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            env: env.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect(),
            data_dir: data_dir.to_path_buf(),
            admin_token: ADMIN_TOKEN.to_owned(),
        }
    }

    /// Asserts that none of `secrets` (tokens, secret keys, session tokens), nor the admin
    /// token, appears in what the process has logged.
    pub fn assert_no_secret_logged(&self, secrets: &[&str]) {
        let log = self.log();
        for secret in secrets.iter().copied().chain([self.admin_token.as_str()]) {
            assert!(secret.len() >= 16, "not a secret to look for: {secret:?}");
            assert!(!log.contains(secret), "a secret reached the coordinator's log:\n{log}");
        }
    }

    /// What the process has logged so far (its stderr, a file): plain text, since a log that is
    /// not a terminal never holds escape codes (journald, Kubernetes and log shippers show them
    /// as garbage).
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.log.path()).expect("read the coordinator's log");
        assert!(!log.contains('\x1b'), "the coordinator's log to a file holds terminal escape codes:\n{log:?}");
        log
    }

    /// Kills the process with SIGKILL (an OOM kill, a lost node: no clean shutdown) and starts
    /// it again on the same data directory and arguments; the new one's ports are new.
    pub fn crash_and_restart(mut self) -> CoordinatorProcess {
        self.child.kill().expect("SIGKILL cache-coordinator");
        self.child.wait().expect("wait for cache-coordinator");
        let extra_args: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        CoordinatorProcess::start_with_env(&self.data_dir, &extra_args, &env)
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|status| status.success()), "kill -{name} cache-coordinator");
    }

    /// The process's ID (for reading its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the process with SIGTERM and waits for it.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let status = self.child.wait().expect("wait for cache-coordinator");
        assert!(status.success(), "cache-coordinator exited with {status}");
    }

    /// Runs cachectl against this coordinator with the admin token.
    pub fn cachectl(&self, args: &[&str]) -> Output {
        cachectl_at(&self.grpc_url, &self.admin_token, args)
    }

    /// `cachectl gc ARGS…`, which must succeed: what it printed.
    pub fn gc(&self, args: &[&str]) -> String {
        let output = self.cachectl(&[&["gc"], args].concat());
        assert!(output.status.success(), "{}", stderr_of(&output));
        stdout_of(&output)
    }

    /// The value of one sample (`name{labels}`) of the coordinator's `/metrics`, if it is there.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        metric_sample(&self.metrics_url, sample)
    }

    /// The sizes of the blob files of `project` in its embedded store (none: no folder yet).
    pub fn blob_files(&self, project: &str) -> Vec<u64> {
        blob_files_in(&self.data_dir, project)
    }

    /// Creates a project through cachectl and returns its token (the last stdout line).
    pub fn create_project(&self, name: &str) -> String {
        let output = self.cachectl(&["project", "create", name]);
        assert!(output.status.success(), "cachectl project create {name}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("utf-8").lines().last().expect("token line").to_owned()
    }

    /// The `--build-cache-dir` of workers run without an engine of their own: inside the
    /// coordinator's data folder, so tests never share one.
    pub fn build_cache_dir(&self) -> PathBuf {
        self.data_dir.join("test-worker-build-cache")
    }

    /// Runs cache-worker against this coordinator with a project token.
    pub fn cache_worker(&self, token: &str, args: &[&str]) -> Output {
        Command::new(binary("cache-worker"))
            .arg("--coordinator")
            .arg(&self.grpc_url)
            .args(args)
            .env("CACHE_TOKEN", token)
            .env("CACHE_BUILD_CACHE_DIR", self.build_cache_dir())
            .output()
            .expect("run cache-worker")
    }

    /// Storage credentials straight from the gRPC API, as the worker gets them.
    pub async fn credentials(&self, token: &str, access: pb::Access) -> pb::Credentials {
        let channel = proto::client::connect(&self.grpc_url).await.expect("connect");
        let mut client = WorkerClient::with_interceptor(channel, BearerToken::new(token).expect("token"));
        let response = client
            .get_credentials(pb::GetCredentialsRequest { access: access as i32, ..Default::default() })
            .await
            .expect("GetCredentials");
        response.into_inner().credentials.expect("credentials")
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        // A stopped process takes SIGKILL too, but let it run its last moments visibly.
        let _ = Command::new("kill").arg("-CONT").arg(self.child.id().to_string()).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- cache-coordinator's log ---\n{}",
                std::fs::read_to_string(self.log.path()).unwrap_or_default()
            );
        } else {
            // Every coordinator of the suite, whatever it went through, logged plain lines.
            self.log();
        }
    }
}

/// Parses `export NAME='value'` lines as cache-worker prints them.
pub fn parse_exports(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.strip_prefix("export ")?.split_once('=')?;
            let value = value.strip_prefix('\'')?.strip_suffix('\'')?.replace(r"'\''", "'");
            Some((name.to_owned(), value))
        })
        .collect()
}

/// Text of a process's stderr.
pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Text of a process's stdout.
pub fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A command's stderr is one plain line a person reads: no second line from a log, no `Debug`
/// dump of an SDK's error, no terminal escape codes (stderr is not a terminal here).
pub fn assert_one_plain_line(output: &Output) {
    let stderr = stderr_of(output);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for dump in ["Error {", "ServiceError(", "DispatchFailure", "ConnectorError", "\x1b", "WARN"] {
        assert!(!stderr.contains(dump), "no {dump:?} in: {stderr}");
    }
}

impl CoordinatorProcess {
    /// Starts cache-worker with a project token against `engine`, its output piped, for a test
    /// to signal or wait for.
    pub fn spawn_cache_worker_on(&self, engine: &DockerEngine, token: &str, args: &[&str]) -> Child {
        self.cache_worker_command_on(engine, token, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cache-worker")
    }

    /// Runs cache-worker with a project token against `engine`.
    pub fn cache_worker_on(&self, engine: &DockerEngine, token: &str, args: &[&str]) -> Output {
        self.cache_worker_command_on(engine, token, args).output().expect("run cache-worker")
    }

    /// `cache-worker restore --service SERVICE --print-cache-from` on `engine`, which must
    /// succeed: the flags it printed.
    pub fn restore_flags(&self, engine: &DockerEngine, token: &str, service: &str) -> String {
        let restored = self.cache_worker_on(engine, token, &["restore", "--service", service, "--print-cache-from"]);
        assert!(restored.status.success(), "restore: {}", stderr_of(&restored));
        stdout_of(&restored).trim().to_owned()
    }

    /// cache-worker with a project token, the engine as its host and the engine's own
    /// `--build-cache-dir`.
    pub fn cache_worker_command_on(&self, engine: &DockerEngine, token: &str, args: &[&str]) -> Command {
        let mut command = Command::new(binary("cache-worker"));
        command
            .arg("--coordinator")
            .arg(&self.grpc_url)
            .args(args)
            .env("CACHE_TOKEN", token)
            .env("DOCKER_HOST", &engine.host)
            .env("CACHE_BUILD_CACHE_DIR", engine.build_cache_dir());
        command
    }
}

/// A loopback port that refuses connections and stays so: bound but never listening, so no
/// other process can take it while the returned socket lives.
pub fn closed_port() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket.bind("127.0.0.1:0".parse().expect("address")).expect("bind a port");
    let address = socket.local_addr().expect("address");
    (socket, address)
}

/// `cache-coordinator serve` with `args` refuses to start: one line on stderr holding `needle`,
/// exit code 64, no ready line.
pub fn assert_coordinator_refuses(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let data_dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary("cache-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir.path())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    assert_eq!(stdout_of(&output), "", "no ready line");
}

/// The value of one sample (`name{labels}`) of the `/metrics` at `metrics_url`, if it is there.
pub fn metric_sample(metrics_url: &str, sample: &str) -> Option<f64> {
    let (_, text) = http_get(&format!("{metrics_url}/metrics"));
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map(|value| value.trim().parse().expect("a sample's value"))
}

/// The sizes of the blob files of `project` in the embedded store under `data_dir` (none: no
/// folder yet).
pub fn blob_files_in(data_dir: &std::path::Path, project: &str) -> Vec<u64> {
    let dir = data_dir
        .join("objects/layer-cache")
        .join(proto::object_keys::blobs_prefix(&proto::object_keys::project_prefix("cache", project)));
    std::fs::read_dir(dir).map_or(Vec::new(), |dir| dir.map(|entry| entry.unwrap().metadata().unwrap().len()).collect())
}

/// `cachectl token create PROJECT --write-branch WRITE --read-branch READ`, as its arguments.
pub fn scoped_token_args<'a>(project: &'a str, write: &'a str, read: &'a str) -> [&'a str; 7] {
    ["token", "create", project, "--write-branch", write, "--read-branch", read]
}

/// The token a successful `cachectl token create` printed as its last line.
pub fn printed_token(output: &Output) -> String {
    assert!(output.status.success(), "cachectl: {}", stderr_of(output));
    stdout_of(output).lines().last().expect("a token line").trim().to_owned()
}

/// Runs cachectl against the coordinator at `grpc_url` with `admin_token`.
pub fn cachectl_at(grpc_url: &str, admin_token: &str, args: &[&str]) -> Output {
    Command::new(binary("cachectl"))
        .arg("--coordinator")
        .arg(grpc_url)
        .args(args)
        .env("CACHE_ADMIN_TOKEN", admin_token)
        .output()
        .expect("run cachectl")
}
