//! Docker engines: the one `.ci/run` starts, and private engines of each version (20.10, 26.1,
//! 28.5 with either image store), each a fresh build host with its own data root; busybox bases.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::*;

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
        self.buildkit_build_command(context, tag, extra_args).output().expect("docker build with BuildKit")
    }

    /// The command [`DockerEngine::buildkit_build`] runs, for a test to run it another way (as
    /// the command a wrapper runs, or while reading its output as it comes).
    pub fn buildkit_build_command(&self, context: &Path, tag: &str, extra_args: &[&str]) -> Command {
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
            .env("DOCKER_BUILDKIT", "1");
        command
    }

    /// The engine's data root (`--data-root`).
    pub fn data_root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The socket of the containerd this engine starts for itself (under its exec root).
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.path().join("x/containerd/containerd.sock")
    }

    /// This host's `--build-cache-dir`.
    pub fn build_cache_dir(&self) -> PathBuf {
        self.dir.path().join("build-cache")
    }

    /// Makes a busybox base image on this engine.
    pub fn import_busybox_base(&self, tag: &str) {
        import_busybox(Some(&self.host), tag);
    }

    /// Makes a busybox base image on this engine whose layer is the same bytes on every host (the
    /// tar's order, times and owners fixed), as a base pulled from a registry would be: builds on
    /// fresh hosts then share cache keys without restoring the base.
    pub fn import_reproducible_busybox_base(&self, tag: &str) {
        let root = busybox_root();
        let mut tar = Command::new("tar")
            .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
            .arg(root.path())
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let imported = Command::new("docker")
            .args(["import", "-", tag])
            .stdin(tar.stdout.take().expect("tar stdout"))
            .env("DOCKER_HOST", &self.host)
            .output()
            .expect("docker import");
        assert!(tar.wait().expect("wait for tar").success(), "tar of the base image failed");
        assert!(imported.status.success(), "docker import {tag}: {}", stderr_of(&imported));
    }

    /// Sends dockerd `signal` (`STOP`, `CONT`): a frozen engine, whose socket still accepts
    /// connections and answers nothing.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(sent.is_ok_and(|status| status.success()), "kill -{signal} dockerd");
    }

    /// Bytes dockerd has read so far (`rchar` of /proc/PID/io): a load's stream among them.
    pub fn bytes_read(&self) -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.child.id())).expect("dockerd's /proc/PID/io");
        io.lines().find_map(|line| line.strip_prefix("rchar: ")?.trim().parse().ok()).expect("rchar")
    }

    /// `command` (cache-worker on this engine) run with an empty tmpfs over the engine's data
    /// root in a mount namespace of its own: the engine answers on its socket, its files are
    /// out of sight, so a save reads `docker save`.
    pub fn without_data_root(&self, command: &Command) -> Command {
        let mut hidden = Command::new("unshare");
        hidden
            .args(["--mount", "--propagation", "private", "sh", "-c", r#"mount -t tmpfs none "$0" && exec "$@""#])
            .arg(self.data_root())
            .arg(command.get_program())
            .args(command.get_args());
        for (name, value) in command.get_envs() {
            if let Some(value) = value {
                hidden.env(name, value);
            }
        }
        hidden
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
        // A stopped engine takes SIGTERM only once woken.
        let _ = Command::new("kill").arg("-CONT").arg(self.child.id().to_string()).stderr(Stdio::null()).status();
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
