//! The end-to-end harness: starts the real binaries (a coordinator process, cachectl,
//! cache-worker) and real peers (the AWS CLI, the Docker engine `.ci/run` starts), and builds
//! aws-sdk-s3 clients from the credentials the coordinator hands out.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Region};
use proto::client::BearerToken;
use proto::v1 as pb;
use proto::v1::worker_client::WorkerClient;

/// Whether this run is CI's, where a missing peer (engine, AWS CLI) fails the test.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}

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
    pub fn start_with_file_limit(data_dir: &Path, open_files: u64) -> CoordinatorProcess {
        let mut command = Command::new("prlimit");
        command.arg(format!("--nofile={open_files}:{open_files}")).arg("--").arg(binary("cache-coordinator"));
        Self::start_command(command, data_dir, &[], &[])
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

    /// What the process has logged so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).expect("read the coordinator's log")
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

    /// Stops the process with SIGTERM and waits for it.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let status = self.child.wait().expect("wait for cache-coordinator");
        assert!(status.success(), "cache-coordinator exited with {status}");
    }

    /// Runs cachectl against this coordinator with the admin token.
    pub fn cachectl(&self, args: &[&str]) -> Output {
        Command::new(binary("cachectl"))
            .arg("--coordinator")
            .arg(&self.grpc_url)
            .args(args)
            .env("CACHE_ADMIN_TOKEN", &self.admin_token)
            .output()
            .expect("run cachectl")
    }

    /// `cachectl gc ARGS…`, which must succeed: what it printed.
    pub fn gc(&self, args: &[&str]) -> String {
        let output = self.cachectl(&[&["gc"], args].concat());
        assert!(output.status.success(), "{}", stderr_of(&output));
        stdout_of(&output)
    }

    /// The value of one sample (`name{labels}`) of the coordinator's `/metrics`, if it is there.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, text) = http_get(&format!("{}/metrics", self.metrics_url));
        text.lines()
            .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .map(|value| value.trim().parse().expect("a sample's value"))
    }

    /// The sizes of the blob files of `project` in its embedded store (none: no folder yet).
    pub fn blob_files(&self, project: &str) -> Vec<u64> {
        let dir = self.data_dir.join(format!("objects/layer-cache/cache/{project}/blobs/sha256"));
        std::fs::read_dir(dir)
            .map_or(Vec::new(), |dir| dir.map(|entry| entry.unwrap().metadata().unwrap().len()).collect())
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

/// moto's server (S3 and STS) that `.ci/run` starts on loopback, or `None` (with a note) when
/// it is not running here. In CI its absence fails the test.
pub fn moto_url() -> Option<String> {
    let url = std::env::var("CACHE_TEST_MOTO_URL").ok().filter(|url| !url.is_empty());
    assert!(url.is_some() || !in_ci(), "CACHE_TEST_MOTO_URL is not set: .ci/run starts moto's server and sets it");
    if url.is_none() {
        eprintln!("skipping: moto's server is not running here (set CACHE_TEST_MOTO_URL; .ci/run does)");
    }
    url
}

/// An aws-sdk-s3 client with the platform's own (long-lived) keys, for a test to set up and
/// inspect a bucket.
pub fn platform_s3_client(endpoint: &str, access_key_id: &str, secret: &str) -> aws_sdk_s3::Client {
    let credentials = pb::Credentials {
        access_key_id: access_key_id.to_owned(),
        region: "us-east-1".into(),
        endpoint_url: endpoint.to_owned(),
        path_style: true,
        ..Default::default()
    };
    s3_client(&credentials, secret, None)
}

/// An aws-sdk-s3 client for `credentials`, with the secret and token overridable to test
/// refusals.
pub fn s3_client(credentials: &pb::Credentials, secret: &str, session_token: Option<&str>) -> aws_sdk_s3::Client {
    let provider = aws_credential_types::Credentials::new(
        &credentials.access_key_id,
        secret,
        session_token.map(str::to_owned),
        None,
        "layer-cache-test",
    );
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(credentials.region.clone()))
        .endpoint_url(&credentials.endpoint_url)
        .force_path_style(credentials.path_style)
        .credentials_provider(provider)
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The client a worker would build: the credentials exactly as handed out.
pub fn s3_client_for(credentials: &pb::Credentials) -> aws_sdk_s3::Client {
    s3_client(credentials, &credentials.secret_access_key, Some(&credentials.session_token))
}

/// The client a worker uses on the embedded store: no upload checksums, so a blob goes as one
/// plain PUT of its bytes. A body the test holds back is never cut off as stalled.
pub fn s3_client_as_worker(credentials: &pb::Credentials) -> aws_sdk_s3::Client {
    let config = s3_client_for(credentials)
        .config()
        .to_builder()
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .stalled_stream_protection(aws_sdk_s3::config::StalledStreamProtectionConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Text of a process's stderr.
pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Text of a process's stdout.
pub fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The Docker engine `.ci/run` started (`DOCKER_HOST`). Outside CI a missing engine skips the
/// test with a note; in CI it fails the test.
pub fn docker_host() -> Option<String> {
    let host = std::env::var("DOCKER_HOST").ok().filter(|host| !host.is_empty());
    let answers = host.is_some() && docker(&["version", "--format", "{{.Server.Version}}"]).status.success();
    if answers {
        return host;
    }
    assert!(!in_ci(), "no Docker engine answers at DOCKER_HOST={host:?}: .ci/run starts one");
    eprintln!("skipping: no Docker engine at DOCKER_HOST (run the tests through .ci/run)");
    None
}

/// Runs the docker CLI against `DOCKER_HOST`.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("run the docker CLI")
}

/// Makes a base image without a registry on the engine at `DOCKER_HOST`: busybox and its
/// applet links, imported as `tag`.
pub fn import_busybox_base(tag: &str) {
    import_busybox(None, tag);
}

/// Imports a busybox base image as `tag` on the engine at `host` (or `DOCKER_HOST`).
fn import_busybox(host: Option<&str>, tag: &str) {
    let root = busybox_root();
    let mut tar =
        Command::new("tar").arg("-C").arg(root.path()).args(["-c", "."]).stdout(Stdio::piped()).spawn().expect("tar");
    let mut import = Command::new("docker");
    import.args(["import", "-", tag]).stdin(tar.stdout.take().expect("tar stdout"));
    if let Some(host) = host {
        import.env("DOCKER_HOST", host);
    }
    let imported = import.output().expect("docker import");
    assert!(tar.wait().expect("wait for tar").success(), "tar of the base image failed");
    assert!(imported.status.success(), "docker import {tag}: {}", stderr_of(&imported));
}

/// The engines users run, all tested: Debian 12's Engine 20.10 (installed by `.ci/run`),
/// Debian 13's Engine 26.1 and Debian sid's Engine 28.5 with its own CLI and buildx (both
/// unpacked beside the system by `.ci/run`, found through `CACHE_TEST_ENGINE26` and
/// `CACHE_TEST_ENGINE28`, the roots of the unpacked packages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Engine20,
    Engine26,
    Engine28,
}

impl EngineKind {
    /// The variable naming the unpacked packages' root, and the engine's name, for the
    /// engines `.ci/run` unpacks.
    fn unpacked_root(self) -> Option<(&'static str, &'static str)> {
        match self {
            EngineKind::Engine20 => None,
            EngineKind::Engine26 => Some(("CACHE_TEST_ENGINE26", "Engine 26.1")),
            EngineKind::Engine28 => Some(("CACHE_TEST_ENGINE28", "Engine 28.5")),
        }
    }
}

/// A private Docker engine with a new, empty data root: a fresh build host.
pub struct DockerEngine {
    child: Child,
    dir: tempfile::TempDir,
    pub host: String,
    pub kind: EngineKind,
    /// Engine 28.5's own CLI and its config folder (with buildx).
    cli: Option<(PathBuf, PathBuf)>,
    /// Runs the containerd image store.
    pub containerd_store: bool,
}

impl DockerEngine {
    /// Starts an engine of `kind`, or `None` (with a note) when it is not installed here. In CI
    /// a missing engine fails the test.
    pub fn start(kind: EngineKind) -> Option<DockerEngine> {
        Self::start_with_config(kind, None)
    }

    /// Starts Engine 28.5 with the containerd image store (`containerd-snapshotter`), as fresh
    /// Engine 29 installs run by default.
    pub fn start_with_containerd_store() -> Option<DockerEngine> {
        Self::start_with_config(EngineKind::Engine28, Some(r#"{"features":{"containerd-snapshotter":true}}"#))
    }

    fn start_with_config(kind: EngineKind, daemon_json: Option<&str>) -> Option<DockerEngine> {
        let (dockerd, extra_path, root) = match kind.unpacked_root() {
            None => (PathBuf::from("dockerd"), None, None),
            Some((variable, name)) => match std::env::var_os(variable) {
                Some(root) => {
                    let root = PathBuf::from(root);
                    (
                        root.join("usr/sbin/dockerd"),
                        Some(format!("{}:{}", root.join("usr/bin").display(), root.join("usr/sbin").display())),
                        Some(root),
                    )
                }
                None => {
                    assert!(!in_ci(), "{variable} is not set: .ci/run unpacks {name} and sets it");
                    eprintln!("skipping: {name} is not unpacked here (set {variable}; .ci/run does)");
                    return None;
                }
            },
        };
        let installed = Command::new(&dockerd).arg("--version").output().is_ok_and(|output| output.status.success());
        if !installed {
            assert!(!in_ci(), "{} is missing: .ci/run installs it", dockerd.display());
            eprintln!("skipping: {} is not installed here", dockerd.display());
            return None;
        }
        // Unix socket paths are short: keep the folder near the root.
        let dir = tempfile::Builder::new().prefix("e").tempdir_in("/tmp").expect("engine folder");
        let path = std::env::var("PATH").unwrap_or_default();
        let path = match extra_path {
            Some(extra) => format!("{extra}:{path}"),
            None => path,
        };
        let host = format!("unix://{}/docker.sock", dir.path().display());
        let log = std::fs::File::create(dir.path().join("dockerd.log")).expect("engine log");
        let containerd_store = daemon_json.is_some_and(|json| json.contains("containerd-snapshotter"));
        let config_file = dir.path().join("daemon.json");
        std::fs::write(&config_file, daemon_json.unwrap_or("{}")).expect("daemon.json");
        let child = Command::new(&dockerd)
            .arg("--config-file")
            .arg(&config_file)
            .arg("--data-root")
            .arg(dir.path().join("root"))
            .arg("--exec-root")
            .arg(dir.path().join("x"))
            .arg("--pidfile")
            .arg(dir.path().join("docker.pid"))
            .args(["-H", &host, "--bridge=none", "--iptables=false", "--ip-masq=false"])
            .env("PATH", path)
            // Engine 29 refuses API versions before 1.44: so does the engine standing for it.
            .env("DOCKER_MIN_API_VERSION", if containerd_store { "1.44" } else { "1.24" })
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        // Engine 28.5's own CLI drives BuildKit through buildx, found in its config folder.
        let cli = match (kind, &root) {
            (EngineKind::Engine28, Some(root)) => {
                let plugins = dir.path().join("cli/cli-plugins");
                std::fs::create_dir_all(&plugins).expect("CLI plugin folder");
                std::os::unix::fs::symlink(
                    root.join("usr/libexec/docker/cli-plugins/docker-buildx"),
                    plugins.join("docker-buildx"),
                )
                .expect("link buildx");
                Some((root.join("usr/bin/docker"), dir.path().join("cli")))
            }
            _ => None,
        };
        let engine = DockerEngine { child, dir, host, kind, cli, containerd_store };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !engine.docker(&["version"]).status.success() {
            assert!(std::time::Instant::now() < deadline, "dockerd did not answer within 60 s: {}", engine.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(engine)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// Runs the docker CLI against this engine.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker").args(args).env("DOCKER_HOST", &self.host).output().expect("run the docker CLI")
    }

    /// A classic-builder build of `context`, off the network.
    pub fn classic_build(&self, context: &Path, tag: &str, extra_args: &[&str]) -> Output {
        Command::new("docker")
            .args(["build", "--network", "none", "-t", tag])
            .args(extra_args)
            .arg(context)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .expect("docker build")
    }

    /// A BuildKit build of `context`, off the network: through Engine 28.5's own CLI and
    /// buildx, or on the older engines Debian's own 20.10 client (`/usr/bin/docker`), since the
    /// newer client on PATH needs buildx.
    pub fn buildkit_build(&self, context: &Path, tag: &str, extra_args: &[&str]) -> Output {
        let mut command = match &self.cli {
            Some((cli, config)) => {
                let mut command = Command::new(cli);
                command.env("DOCKER_CONFIG", config);
                command
            }
            None => Command::new("/usr/bin/docker"),
        };
        command
            .args(["build", "--progress", "plain", "--network", "none", "-t", tag])
            .args(extra_args)
            .arg(context)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_BUILDKIT", "1")
            .output()
            .expect("docker build with BuildKit")
    }

    /// The engine's data root (`--data-root`).
    pub fn data_root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// This host's `--build-cache-dir`.
    pub fn build_cache_dir(&self) -> PathBuf {
        self.dir.path().join("build-cache")
    }

    /// Makes a busybox base image on this engine.
    pub fn import_busybox_base(&self, tag: &str) {
        import_busybox(Some(&self.host), tag);
    }

    /// IDs of every image the engine holds.
    pub fn image_ids(&self) -> Vec<String> {
        let output = self.docker(&["images", "-a", "-q", "--no-trunc"]);
        assert!(output.status.success(), "{}", stderr_of(&output));
        stdout_of(&output).lines().map(str::to_owned).collect()
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// A folder with busybox and its applet links: the root of a registry-free base image.
pub fn busybox_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temporary directory");
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).expect("create bin");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copy /bin/busybox (package busybox-static)");
    for applet in ["sh", "echo", "cat", "ls", "mkdir", "touch", "true", "sleep", "head", "dd", "rm", "cp"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
    }
    root
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

/// A TCP proxy on loopback in front of `upstream` that can freeze: while frozen it moves no
/// byte in either direction and keeps every connection open, as a stalled store or network
/// does. It also notes the `Range` headers of the requests it passes.
pub struct FaultyProxy {
    pub address: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    upstream: std::sync::Arc<std::sync::Mutex<String>>,
    /// Bytes moved from the upstream to clients so far.
    moved_down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The `Range` headers of the requests that passed, as sent (e.g. `bytes=0-8388607`).
    ranges: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// How many of the next connections are answered `503 Slow Down` instead of forwarded.
    failing: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

/// Answers one request on `client` with S3's `503 Slow Down` and closes the connection.
fn slow_down(mut client: std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && client.read(&mut byte).is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
    let body = "<Error><Code>SlowDown</Code><Message>injected by the test</Message></Error>";
    let _ = write!(
        client,
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Takes the complete lines out of `pending`; returns the values of `Range:` header lines.
fn range_headers(pending: &mut Vec<u8>) -> Vec<String> {
    let mut ranges = Vec::new();
    while let Some(end) = pending.windows(2).position(|pair| pair == b"\r\n") {
        let line = String::from_utf8_lossy(&pending[..end]).into_owned();
        pending.drain(..end + 2);
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            ranges.push(value.trim().to_owned());
        }
    }
    // A body without line breaks is not kept whole.
    if pending.len() > 64 * 1024 {
        pending.clear();
    }
    ranges
}

impl FaultyProxy {
    /// Listens now; forwards to the address [`FaultyProxy::forward_to`] sets.
    pub fn start() -> FaultyProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let address = listener.local_addr().expect("address");
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let upstream = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let moved_down = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ranges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (accept_upstream, accept_frozen, accept_moved) = (upstream.clone(), frozen.clone(), moved_down.clone());
        let accept_ranges = ranges.clone();
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let accept_failing = failing.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let fail = accept_failing
                    .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| {
                        n.checked_sub(1)
                    })
                    .is_ok();
                if fail {
                    std::thread::spawn(move || slow_down(client));
                    continue;
                }
                let upstream = accept_upstream.lock().expect("upstream").clone();
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let directions = [
                    (client.try_clone(), server.try_clone(), None, Some(accept_ranges.clone())),
                    (server.try_clone(), client.try_clone(), Some(accept_moved.clone()), None),
                ];
                for (from, to, counter, ranges) in directions {
                    let (Ok(mut from), Ok(mut to)) = (from, to) else { continue };
                    let frozen = accept_frozen.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buffer = vec![0u8; 64 * 1024];
                        let mut pending = Vec::new();
                        loop {
                            while frozen.load(std::sync::atomic::Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            match from.read(&mut buffer) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    while frozen.load(std::sync::atomic::Ordering::SeqCst) {
                                        std::thread::sleep(Duration::from_millis(50));
                                    }
                                    if to.write_all(&buffer[..n]).is_err() {
                                        break;
                                    }
                                    if let Some(counter) = &counter {
                                        counter.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                                    }
                                    if let Some(ranges) = &ranges {
                                        pending.extend_from_slice(&buffer[..n]);
                                        ranges.lock().expect("ranges").extend(range_headers(&mut pending));
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        FaultyProxy { address, frozen, upstream, moved_down, ranges, failing }
    }

    pub fn forward_to(&self, upstream: &str) {
        *self.upstream.lock().expect("upstream") = upstream.to_owned();
    }

    /// Answers the next `n` connections with `503 Slow Down` (each then closes).
    pub fn fail_next(&self, n: u32) {
        self.failing.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The `Range` headers of every request so far.
    pub fn ranges(&self) -> Vec<String> {
        self.ranges.lock().expect("ranges").clone()
    }

    pub fn bytes_moved_down(&self) -> u64 {
        self.moved_down.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A plain HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(host, path)| (host, format!("/{path}")));
    let mut stream = std::net::TcpStream::connect(host).unwrap_or_else(|error| panic!("connect {host}: {error}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("send the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, body.to_owned())
}

/// A real Prometheus (Debian's package, which `.ci/run` installs) scraping one target every
/// second, with its own storage. `None` (with a note) when it is not installed here; in CI its
/// absence fails the test.
pub struct PrometheusProcess {
    child: Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

impl PrometheusProcess {
    pub fn start(scrape_target: &str) -> Option<PrometheusProcess> {
        let installed =
            Command::new("prometheus").arg("--version").output().is_ok_and(|output| output.status.success());
        if !installed {
            assert!(!in_ci(), "prometheus is missing: .ci/run installs Debian's package");
            eprintln!("skipping: prometheus is not installed here");
            return None;
        }
        let dir = tempfile::tempdir().expect("prometheus folder");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: layer-cache\n    static_configs:\n      - targets: [\"{scrape_target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        // Prometheus cannot be handed a bound socket, and says nothing of a port the kernel
        // picked: pick one, and should another process take it first (Prometheus then exits,
        // or someone else answers), pick again. Only our own Prometheus names our storage path.
        let storage = dir.path().join("data");
        for _attempt in 0..5 {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", storage.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let url = format!("http://127.0.0.1:{port}");
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let ours = loop {
                if child.try_wait().expect("prometheus status").is_some() {
                    break false;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && http_get(&format!("{url}/-/ready")).0 == 200
                {
                    let (_, flags) = http_get(&format!("{url}/api/v1/status/flags"));
                    break flags.contains(&storage.display().to_string());
                }
                assert!(std::time::Instant::now() < deadline, "prometheus did not get ready within 60 s");
                std::thread::sleep(Duration::from_millis(200));
            };
            if ours {
                return Some(PrometheusProcess { child, url, _dir: dir });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("prometheus found no free port in 5 tries");
    }

    /// Evaluates `expr` now: the API's JSON answer.
    pub fn query(&self, expr: &str) -> serde_json::Value {
        let query: String = form_urlencoded::Serializer::new(String::new()).append_pair("query", expr).finish();
        let (status, body) = http_get(&format!("{}/api/v1/query?{query}", self.url));
        let answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON ({status}): {body}"));
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        answer
    }
}

impl Drop for PrometheusProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

/// "sha256:<hex>" of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Where a blob of `content` goes in a project's store: its sha256 under the project's prefix
/// (write keys write nothing else).
pub fn blob_key(credentials: &pb::Credentials, content: &[u8]) -> String {
    format!("{}blobs/sha256/{}", credentials.prefix, sha256_digest(content).trim_start_matches("sha256:"))
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
        let key = format!("{}blobs/sha256/{}", credentials.prefix, sha256_digest(&blob).trim_start_matches("sha256:"));
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

/// A loopback port that refuses connections and stays so: bound but never listening, so no
/// other process can take it while the returned socket lives.
pub fn closed_port() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket.bind("127.0.0.1:0".parse().expect("address")).expect("bind a port");
    let address = socket.local_addr().expect("address");
    (socket, address)
}

/// The coordinator on moto's S3 and STS (`CACHE_TEST_MOTO_URL`): its own AWS credentials and
/// role, the flags of an S3 store, and a bucket per test.
pub mod moto {
    use super::platform_s3_client;

    pub const PLATFORM_KEY_ID: &str = "AKIAPLATFORMKEY00001";
    pub const PLATFORM_SECRET: &str = "platform-secret-key-not-for-build-hosts";
    pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/layer-cache";

    /// The coordinator's own AWS credentials, from the standard chain (here: the environment),
    /// with every other source off.
    pub fn platform_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", PLATFORM_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", PLATFORM_SECRET),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
    }

    pub fn s3_args<'a>(moto: &'a str, bucket: &'a str) -> Vec<&'a str> {
        vec![
            "--store",
            "s3",
            "--s3-bucket",
            bucket,
            "--s3-prefix",
            "ci",
            "--s3-endpoint",
            moto,
            "--s3-path-style",
            "--sts-role-arn",
            ROLE_ARN,
            "--sts-endpoint",
            moto,
        ]
    }

    /// A bucket of its own per test: moto's server is shared.
    pub async fn new_bucket(moto: &str) -> String {
        let name = format!("layer-cache-{}", std::process::id())
            + &format!("-{}", std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000_000);
        let client = platform_s3_client(moto, PLATFORM_KEY_ID, PLATFORM_SECRET);
        client.create_bucket().bucket(&name).send().await.expect("create the bucket in moto");
        name
    }
}

/// A new, empty PostgreSQL database on the server `CACHE_TEST_POSTGRES_URL` names (which
/// `.ci/run` starts), for one test: its URL. `None` (with a note) when the variable is unset;
/// in CI that fails the test.
pub async fn postgres_database() -> Option<String> {
    let Ok(server) = std::env::var("CACHE_TEST_POSTGRES_URL") else {
        assert!(!in_ci(), "CACHE_TEST_POSTGRES_URL is not set: .ci/run starts PostgreSQL and sets it");
        eprintln!("skipping: CACHE_TEST_POSTGRES_URL is not set");
        return None;
    };
    let (client, connection) =
        tokio_postgres::connect(&server, tokio_postgres::NoTls).await.expect("connect to PostgreSQL");
    tokio::spawn(connection);
    let name = format!(
        "lc_e2e_{}_{}",
        std::process::id(),
        std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000_000_000
    );
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create a test database");
    let (base, _) = server.rsplit_once('/').expect("a URL naming a database");
    Some(format!("{base}/{name}"))
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
