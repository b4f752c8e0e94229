//! A view's life on the build host: `serve` in the foreground until SIGTERM or SIGINT; `start`
//! runs `serve` detached and prints the build's flags once it answers; `stop` ends it and
//! prints what it did, once its pending pushes are committed; `run` wraps a build command in
//! the three. The running view's pid and address are in the service's build-cache folder
//! (`view.json`), its output beside it (`view.log`).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Opened, ViewBackend, ViewOptions, view_flags};
use crate::build_dirs::BuildDirs;
use crate::coordinator::Coordinator;
use crate::docker::Engine;
use crate::error::WorkerError;

/// A view opened and bound, not yet serving.
pub struct Running {
    backend: Arc<ViewBackend>,
    listener: tokio::net::TcpListener,
    pub address: String,
    /// The flags a build command carries.
    pub flags: Vec<String>,
    pub opened: Opened,
}

/// The running view's record, for `stop`.
#[derive(Debug, Serialize, Deserialize)]
struct ViewState {
    pid: u32,
    address: String,
    flags: Vec<String>,
}

/// Opens a view (the engine's kind, the lookup) and binds `listen`.
pub async fn open(
    coordinator: Result<Coordinator, WorkerError>,
    options: ViewOptions,
    listen: &str,
    stall: std::time::Duration,
) -> Result<Running, WorkerError> {
    let (containerd_store, version) = match Engine::connect(stall).await {
        Ok(engine) => match (engine.uses_containerd_store().await, engine.version().await) {
            (Ok(oci), Ok(version)) => (Some(oci), version),
            (Err(error), _) | (_, Err(error)) => {
                eprintln!("cache-worker: warning: the engine did not answer, the view prints no build flags: {error}");
                (None, String::new())
            }
        },
        Err(error) => {
            eprintln!("cache-worker: warning: the engine did not answer, the view prints no build flags: {error}");
            (None, String::new())
        }
    };
    let (backend, opened) = ViewBackend::open(coordinator, options, containerd_store, version).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| WorkerError::Host(format!("the view cannot listen on {listen}: {error}")))?;
    let address = listener.local_addr().map_err(|error| WorkerError::Host(error.to_string()))?.to_string();
    let flags = view_flags(&address, opened, backend.catalog());
    Ok(Running { backend: Arc::new(backend), listener, address, flags, opened })
}

impl Running {
    /// Serves until `shutdown`, then waits for the requests in flight (a push being
    /// committed), reports to the coordinator and returns the summary lines.
    pub async fn serve_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Vec<String>, WorkerError> {
        // One folder per service, the same for every view of it, so a view killed mid-push
        // leaves nothing for long: the next one removes the uploads it left as it starts.
        let spool = crate::export::spool_dir().join(format!("cache-worker-view-{}", self.backend.options.service));
        std::fs::create_dir_all(&spool).map_err(|error| {
            WorkerError::Host(format!("the view cannot make its spool folder {}: {error}", spool.display()))
        })?;
        let options = registry::server::ServeOptions::new(spool);
        let backend: Arc<dyn registry::Backend> = Arc::new(super::SharedView(Arc::clone(&self.backend)));
        registry::server::serve(self.listener, backend, options, shutdown)
            .await
            .map_err(|error| WorkerError::Host(format!("the view stopped serving: {error}")))?;
        Ok(self.backend.close().await)
    }
}

/// `view serve`: serves in the foreground, recording itself for `stop`, until SIGTERM or
/// SIGINT; prints the summary.
pub async fn serve(running: Running, dirs: &BuildDirs) -> Result<(), WorkerError> {
    let state = ViewState { pid: std::process::id(), address: running.address.clone(), flags: running.flags.clone() };
    write_state(dirs, &state)?;
    eprintln!("view: listening on {}", running.address);
    let result = running
        .serve_until(async {
            crate::signals::interrupted().await;
        })
        .await;
    let _ = std::fs::remove_file(dirs.view_state());
    for line in result? {
        println!("{line}");
    }
    Ok(())
}

fn write_state(dirs: &BuildDirs, state: &ViewState) -> Result<(), WorkerError> {
    let failed = |error: std::io::Error| WorkerError::Host(format!("the view cannot record itself: {error}"));
    dirs.create().map_err(failed)?;
    let temporary = dirs.view_state().with_extension("json.new");
    std::fs::write(&temporary, serde_json::to_vec(state).expect("the state serializes")).map_err(failed)?;
    std::fs::rename(&temporary, dirs.view_state()).map_err(failed)
}

fn read_state(dirs: &BuildDirs) -> Option<ViewState> {
    std::fs::read(dirs.view_state()).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok())
}

/// Whether `pid` is a view still running (not gone, not a zombie, and a `view serve`).
fn is_running_view(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = status.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let command = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let arguments: Vec<&[u8]> = command.split(|byte| *byte == 0).collect();
    arguments.windows(2).any(|pair| pair[0] == b"view" && pair[1] == b"serve")
}

/// What `start` passes on to the view it runs: the global settings, as environment variables
/// so the token never shows in a process list.
pub struct Settings<'a> {
    pub coordinator: &'a str,
    pub token: Option<&'a str>,
    pub stall_timeout: u64,
    pub build_cache_dir: &'a Path,
    pub job_id: Option<&'a str>,
}

/// `view start`: runs `view serve` detached (in its own process group, its output in the
/// service's `view.log`), waits until it answers, and returns the flags it printed. A view
/// that cannot start is one warning and no flags: the build runs uncached.
pub async fn start(
    options: &ViewOptions,
    listen: &str,
    settings: &Settings<'_>,
    dirs: &BuildDirs,
) -> Result<Vec<String>, WorkerError> {
    proto::names::validate_service_name(&options.service)?;
    if let Some(state) = read_state(dirs).filter(|state| is_running_view(state.pid)) {
        return Err(WorkerError::Invalid(format!(
            "a view of {} is already running (pid {}, {}): stop it first with cache-worker view stop --service {}",
            options.service, state.pid, state.address, options.service
        )));
    }
    let _ = std::fs::remove_file(dirs.view_state());
    dirs.create()
        .map_err(|error| WorkerError::Host(format!("cannot make the service's build-cache folder: {error}")))?;
    let log = std::fs::File::create(dirs.view_log())
        .map_err(|error| WorkerError::Host(format!("cannot write {}: {error}", dirs.view_log().display())))?;
    let executable =
        std::env::current_exe().map_err(|error| WorkerError::Host(format!("cannot find this executable: {error}")))?;
    let mut command = std::process::Command::new(executable);
    command.args(["view", "serve", "--service", &options.service, "--branch", &options.branch, "--listen", listen]);
    for branch in &options.fallback_branches {
        command.args(["--fallback-branch", branch]);
    }
    command
        .env("CACHE_COORDINATOR", settings.coordinator)
        .env("CACHE_STALL_TIMEOUT", settings.stall_timeout.to_string())
        .env("CACHE_BUILD_CACHE_DIR", settings.build_cache_dir)
        .env_remove("CACHE_TOKEN")
        .env_remove("CACHE_JOB_ID");
    if let Some(token) = settings.token {
        command.env("CACHE_TOKEN", token);
    }
    if let Some(job) = settings.job_id {
        command.env("CACHE_JOB_ID", job);
    }
    let stderr = log.try_clone().map_err(|error| WorkerError::Host(error.to_string()))?;
    command.stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(stderr));
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().map_err(|error| WorkerError::Host(format!("cannot start the view: {error}")))?;
    // The view looks the cache up and asks the engine before it answers: both are bounded by
    // the stall timeout.
    let deadline = Instant::now() + Duration::from_secs(settings.stall_timeout * 3 + 10);
    loop {
        if let Some(state) = read_state(dirs).filter(|state| state.pid == child.id()) {
            // The view warned as it opened (no coordinator, no engine): the job's log shows it
            // now, beside the flags it explains, not only at the stop.
            let log = std::fs::read_to_string(dirs.view_log()).unwrap_or_default();
            for warning in log.lines().filter(|line| line.starts_with("cache-worker: warning: ")) {
                eprintln!("{warning}");
            }
            return Ok(state.flags);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dirs.view_log()).unwrap_or_default();
            eprint!("{log}");
            return Err(WorkerError::Host(format!("the view of {} stopped as it started ({status})", options.service)));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(WorkerError::Host(format!("the view of {} did not start in time", options.service)));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The longest `stop` waits for a view to finish its pending pushes before it kills it.
const MOST_STOP_WAIT: Duration = Duration::from_secs(30 * 60);

/// `view stop`: ends the service's view, waits until it is gone, and prints its output. No
/// view running is a warning.
pub async fn stop(service: &str, dirs: &BuildDirs) -> Result<(), WorkerError> {
    proto::names::validate_service_name(service)?;
    let Some(state) = read_state(dirs) else {
        eprintln!("cache-worker: warning: no view of {service} is running");
        return Ok(());
    };
    let pid = rustix::process::Pid::from_raw(state.pid as i32);
    let waited = Instant::now();
    if let Some(pid) = pid.filter(|_| is_running_view(state.pid)) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        while is_running_view(state.pid) {
            if waited.elapsed() > MOST_STOP_WAIT {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                eprintln!(
                    "cache-worker: warning: the view of {service} did not finish within {} s and was killed",
                    MOST_STOP_WAIT.as_secs()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        eprintln!("cache-worker: warning: the view of {service} had already stopped");
    }
    let _ = std::fs::remove_file(dirs.view_state());
    let log = std::fs::read_to_string(dirs.view_log()).unwrap_or_default();
    print!("{log}");
    let _ = std::fs::remove_file(dirs.view_log());
    Ok(())
}

/// `view run`: serves while `command` runs with the flags appended (and in
/// `CACHE_VIEW_FLAGS`, the address in `CACHE_VIEW_ADDRESS`), then stops and prints the
/// summary; the command's exit code.
pub async fn run(running: Running, command: &[String]) -> Result<i32, WorkerError> {
    let (program, arguments) =
        command.split_first().ok_or_else(|| WorkerError::Invalid("name the build command after --".into()))?;
    let flags: Vec<String> = running.flags.iter().flat_map(|flag| flag.split(' ').map(str::to_owned)).collect();
    let mut child = tokio::process::Command::new(program)
        .args(arguments)
        .args(&flags)
        .env("CACHE_VIEW_FLAGS", running.flags.join(" "))
        .env("CACHE_VIEW_ADDRESS", &running.address)
        .spawn()
        .map_err(|error| WorkerError::Invalid(format!("cannot run {program}: {error}")))?;
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(running.serve_until(async {
        let _ = finished.await;
    }));
    let status =
        child.wait().await.map_err(|error| WorkerError::Host(format!("waiting for {program} failed: {error}")));
    let _ = done.send(());
    let lines = serving.await??;
    for line in lines {
        println!("{line}");
    }
    Ok(status?.code().unwrap_or(1))
}
