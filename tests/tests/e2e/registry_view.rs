//! The registry view on real engines (`cache-worker view start|stop|run`): BuildKit exports its
//! cache through it and a fresh host imports lazily, fetching only what the build uses (Engine
//! 28.5 on the containerd store); images `save` stored serve `--cache-from` on the graph-driver
//! engines (20.10, 26.1, 28.5); a one-line change uploads only what changed; a pull request's
//! token imports main but cannot export to it; a view killed mid-export loses nothing; and with
//! no cache or no coordinator the build runs uncached. Bytes are counted by proxies on both
//! sides of the view: between BuildKit and the view, and between the view and the store.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::buildkit::{INLINE_CACHE, build, steps_and_cached};
use tests::{
    CoordinatorProcess, DockerEngine, EngineKind, FaultyProxy, binary, build_context, closed_port, printed_token,
    scoped_token_args, stderr_of, stdout_of,
};

/// A builder stage with a toolchain layer of `toolchain_mib` MiB of random bytes (so it does
/// not compress) and three small steps; a test stage and the final image take only `/app`
/// from it. Each build, of either target, has six steps after FROM (ENV is no step).
fn two_stages(toolchain_mib: u64) -> String {
    format!(
        "FROM base:1 AS build\nRUN dd if=/dev/urandom of=/toolchain bs=1M count={toolchain_mib} 2>/dev/null\nRUN echo one > /one\nCOPY file.txt /file.txt\nRUN cat /file.txt /one > /app\nFROM base:1 AS test\nCOPY --from=build /app /app\nRUN cat /app > /tested\nFROM base:1\nCOPY --from=build /app /app\nENV GREETING=hello\nRUN cat /app > /three\n"
    )
}

const STEPS: usize = 6;
const MIB: u64 = 1 << 20;

/// BuildKit's plain progress: (Dockerfile steps after FROM, those of them that came from the
/// cache), as progress IDs. From the cache is `CACHED`, or, for a cached step whose result the
/// build needs and fetches lazily, its layers downloaded from the view in place of running it
/// (`#12 sha256:… 107B / 107B done`): a step that runs downloads nothing.
fn steps_and_from_cache(progress: &str) -> (HashSet<String>, HashSet<String>) {
    let (steps, mut from_cache) = steps_and_cached(progress);
    from_cache.extend(
        progress
            .lines()
            .filter(|line| line.split_whitespace().nth(1).is_some_and(|word| word.starts_with("sha256:")))
            .filter(|line| line.ends_with(" done") && line.contains(" / "))
            .map(|line| line.split_whitespace().next().unwrap_or_default().to_owned()),
    );
    (steps, from_cache)
}

/// Asserts that the build had `n_steps` steps after FROM, each one from the cache.
fn assert_all_from_cache(progress: &str, n_steps: usize) {
    let (steps, from_cache) = steps_and_from_cache(progress);
    assert_eq!(steps.len(), n_steps, "{progress}");
    let ran: Vec<&String> = steps.difference(&from_cache).collect();
    assert!(ran.is_empty(), "steps that ran: {ran:?}\n{progress}");
}

/// Runs `command` to its end as a CI script's `$(…)` would, within `limit`: a command that
/// outlives it, or leaves a process holding its output open (a detached child that kept the
/// pipes), fails the test with `what` instead of hanging the suite.
fn output_within(mut command: Command, limit: Duration, what: &str) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    let (sender, receiver) = std::sync::mpsc::channel();
    let pipes: [(usize, Box<dyn Read + Send>); 2] =
        [(0, Box::new(child.stdout.take().expect("stdout"))), (1, Box::new(child.stderr.take().expect("stderr")))];
    for (index, mut pipe) in pipes {
        let sender = sender.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = sender.send((index, bytes));
        });
    }
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not end within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut streams = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
        let (index, bytes) = receiver
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("{what} exited, but a process it left holds its stdout or stderr open"));
        streams[index] = bytes;
    }
    let [stdout, stderr] = streams;
    Output { status, stdout, stderr }
}

/// The `127.0.0.1:PORT` of the view the flags name.
fn view_address(flags: &str) -> String {
    let start = flags.find("127.0.0.1:").unwrap_or_else(|| panic!("no view address in {flags:?}"));
    flags[start..].split('/').next().expect("an address").to_owned()
}

/// The process listening on loopback port `port` (found through the kernel's socket table,
/// whatever the view's state file says).
fn pid_listening_on(port: u16) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
        // State 0A is LISTEN.
        (local_port == port && fields.get(3) == Some(&"0A")).then(|| fields.get(9).map(|inode| inode.to_string()))?
    })?;
    let socket = std::path::PathBuf::from(format!("socket:[{inode}]"));
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|process| {
        let pid: u32 = process.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(process.path().join("fd")).ok()?;
        fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == socket)).then_some(pid)
    })
}

/// The bytes of `image`'s layers as the engine keeps them (`docker save`'s layer files: the
/// compressed blobs on the containerd store, the layer tars on a graph driver).
fn saved_layer_bytes(engine: &DockerEngine, image: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("image.tar");
    let saved = engine.docker(&["save", "-o", tarball.to_str().unwrap(), image]);
    assert!(saved.status.success(), "docker save {image}: {}", stderr_of(&saved));
    let unpacked = Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(dir.path()).status().unwrap();
    assert!(unpacked.success(), "unpack the saved {image}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    let layers = manifest[0]["Layers"].as_array().expect("the image's layers");
    layers.iter().map(|layer| std::fs::metadata(dir.path().join(layer.as_str().unwrap())).unwrap().len()).sum()
}

/// Ends the view of service `app` on a host when dropped, if it still runs: a test that fails
/// before its `view stop` leaves no process behind (the pid is in the view's `view.json`).
struct ViewGuard(std::path::PathBuf);

impl ViewGuard {
    fn of(host: &DockerEngine) -> ViewGuard {
        ViewGuard(host.build_cache_dir().join("app/view.json"))
    }
}

impl Drop for ViewGuard {
    fn drop(&mut self) {
        let Ok(state) = std::fs::read(&self.0) else { return };
        let Some(pid) =
            serde_json::from_slice::<serde_json::Value>(&state).ok().and_then(|state| state["pid"].as_u64())
        else {
            return;
        };
        let command = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if command.split(|byte| *byte == 0).any(|argument| argument == b"serve") {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

/// One CI job's view on a build host: `view start` answered, its flags rewritten to reach the
/// view through `meter`, a proxy counting what BuildKit and the view exchange.
struct Job<'a> {
    coordinator: &'a CoordinatorProcess,
    host: &'a DockerEngine,
    token: String,
    /// The flags `view start` printed, as printed.
    printed: String,
    meter: FaultyProxy,
    /// The view's own `127.0.0.1:PORT`.
    address: String,
    _guard: ViewGuard,
}

impl<'a> Job<'a> {
    /// `cache-worker view start --service app --branch main EXTRA…`, which must print flags.
    fn start(coordinator: &'a CoordinatorProcess, host: &'a DockerEngine, token: &str, extra: &[&str]) -> Job<'a> {
        let guard = ViewGuard::of(host);
        let mut args = vec!["view", "start", "--service", "app", "--branch", "main"];
        args.extend(extra);
        let command = coordinator.cache_worker_command_on(host, token, &args);
        let started = output_within(command, Duration::from_secs(60), "cache-worker view start");
        assert!(started.status.success(), "view start: {}", stderr_of(&started));
        let printed = stdout_of(&started);
        assert_eq!(printed.lines().count(), 1, "one line of flags: {printed:?}");
        let printed = printed.trim().to_owned();
        let address = view_address(&printed);
        let meter = FaultyProxy::start();
        meter.forward_to(&address);
        Job { coordinator, host, token: token.to_owned(), printed, meter, address, _guard: guard }
    }

    /// The printed flags, naming the meter instead of the view, as build arguments.
    fn flags(&self) -> Vec<String> {
        let through_meter = self.printed.replace(&self.address, &self.meter.address.to_string());
        through_meter.split_whitespace().map(str::to_owned).collect()
    }

    /// A BuildKit build of `context` with the flags, which must succeed: its progress.
    /// A build that waits on the view (a push held by the commit behind it) fails the test
    /// within three minutes instead of hanging it.
    fn build(&self, context: &Path, tag: &str, extra: &[&str]) -> String {
        let flags = self.flags();
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend(extra);
        let run = || {
            let command = self.host.buildkit_build_command(context, tag, &args);
            output_within(command, Duration::from_secs(180), &format!("the build of {tag} through the view"))
        };
        let mut built = run();
        // As `buildkit::build`: the containerd store's unpack bug (moby/buildkit#6521) is met
        // by building once more.
        if self.host.containerd_store && stderr_of(&built).contains("failed to prepare extraction snapshot") {
            eprintln!("the engine failed to unpack {tag} (moby/buildkit#6521): building it again");
            built = run();
        }
        assert!(built.status.success(), "BuildKit build of {tag}: {}", stderr_of(&built));
        stderr_of(&built)
    }

    /// `cache-worker view stop --service app`, which must succeed and leave nothing listening:
    /// its summary.
    fn stop(&self) -> String {
        let command =
            self.coordinator.cache_worker_command_on(self.host, &self.token, &["view", "stop", "--service", "app"]);
        let stopped = output_within(command, Duration::from_secs(120), "cache-worker view stop");
        assert!(stopped.status.success(), "view stop: {}", stderr_of(&stopped));
        let port: u16 = self.address.rsplit(':').next().unwrap().parse().unwrap();
        assert_eq!(pid_listening_on(port), None, "the view still listens on {} after its stop", self.address);
        stdout_of(&stopped)
    }
}

/// A coordinator whose store the build hosts reach through `store` (a proxy counting bytes each
/// way), with a project `shop`: (coordinator, its data folder, the project's token).
fn coordinator_behind(store: &FaultyProxy) -> (CoordinatorProcess, tempfile::TempDir, String) {
    let data_dir = tempfile::tempdir().unwrap();
    let public_url = format!("http://{}", store.address);
    let coordinator =
        CoordinatorProcess::start(data_dir.path(), &["--s3-public-url", &public_url, "--claim-ttl", "600"]);
    store.forward_to(coordinator.s3_listen.as_deref().expect("the embedded endpoint's address"));
    let token = coordinator.create_project("shop");
    (coordinator, data_dir, token)
}

fn print_versions(host: &DockerEngine) {
    let version = host.docker(&["version", "--format", "{{.Server.Version}}"]);
    eprintln!("engine {} (containerd store: {})", stdout_of(&version).trim(), host.containerd_store);
}

#[test]
fn a_mode_max_export_through_the_view_is_imported_lazily_on_a_fresh_containerd_host() {
    let Some(first_host) = DockerEngine::start_with_containerd_store() else { return };
    print_versions(&first_host);
    let store = FaultyProxy::start();
    let (coordinator, _data_dir, token) = coordinator_behind(&store);
    let toolchain = 64 * MIB;
    let app = build_context(&two_stages(64));

    // Job 1, nothing cached: the view takes BuildKit's whole cache.
    first_host.import_reproducible_busybox_base("base:1");
    let job = Job::start(&coordinator, &first_host, &token, &[]);
    let view = &job.address;
    let export = format!(
        "--cache-to type=registry,ref={view}/buildcache:export,mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true"
    );
    assert_eq!(job.printed, export, "nothing to import yet: the export alone");
    let built = job.build(app.path(), "app:1", &[]);
    assert!(steps_and_cached(&built).1.is_empty(), "nothing cached yet: {built}");
    let summary = job.stop();
    assert!(summary.contains("view: saved"), "{summary}");
    assert!(job.meter.bytes_moved_up() >= toolchain, "BuildKit pushed the toolchain through the view: {summary}");
    assert!(store.bytes_moved_up() >= toolchain, "the view stored it: {summary}");
    let final_layers = saved_layer_bytes(&first_host, "app:1");

    // Job 2 on a fresh host: every step of both stages cached, the toolchain never fetched.
    let second_host = DockerEngine::start_with_containerd_store().unwrap();
    second_host.import_reproducible_busybox_base("base:1");
    let read_before = store.bytes_moved_down();
    let job = Job::start(&coordinator, &second_host, &token, &[]);
    let view = &job.address;
    assert_eq!(
        job.printed,
        format!(
            "--cache-from type=registry,ref={view}/buildcache:latest --cache-to type=registry,ref={view}/buildcache:export,mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true"
        )
    );
    let rebuilt = job.build(app.path(), "app:1", &[]);
    assert_all_from_cache(&rebuilt, STEPS);
    let (served, read) = (job.meter.bytes_moved_down(), store.bytes_moved_down() - read_before);
    eprintln!(
        "lazy import, 28.5 containerd store: the view served {served} B, read {read} B from the store; the final image's layers are {final_layers} B, the toolchain {toolchain} B"
    );
    assert!(served > 0, "the build fetched the final image's layers through the view");
    assert!(served as f64 <= 1.2 * final_layers as f64, "served {served} B for {final_layers} B of final layers");
    assert!(read < toolchain / 4, "the view read {read} B from the store: the toolchain layer");
    let ran = second_host.docker(&["run", "--rm", "--network", "none", "app:1", "cat", "/three"]);
    assert_eq!(stdout_of(&ran), "content\none\n", "{}", stderr_of(&ran));

    // A one-line change in the same job: only the changed layers go up, the toolchain is
    // answered present.
    std::fs::write(app.path().join("file.txt"), "changed\n").unwrap();
    let stored_before = store.bytes_moved_up();
    let changed = job.build(app.path(), "app:1", &[]);
    // The toolchain step is cached; the echo step's result is fetched, not run (BuildKit shows
    // its layers' download rather than `CACHED`); COPY file.txt and what follows it ran.
    let (steps, cached) = steps_and_from_cache(&changed);
    let copied = changed.lines().find(|line| line.contains("] COPY file.txt")).expect("the COPY step");
    let copied = copied.split_whitespace().next().unwrap();
    assert!(steps.len() == STEPS && !cached.is_empty() && !cached.contains(copied), "{changed}");
    let summary = job.stop();
    assert!(summary.contains("view: saved"), "{summary}");
    let (pushed, stored) = (job.meter.bytes_moved_up(), store.bytes_moved_up() - stored_before);
    eprintln!("after a one-line change BuildKit pushed {pushed} B through the view, the view stored {stored} B");
    assert!(pushed < toolchain / 4, "BuildKit sent the toolchain again ({pushed} B): {summary}");
    assert!(stored > 0 && stored < toolchain / 4, "the view stored {stored} B: {summary}");

    // Job 3 on a fresh host: the changed build is what the cache holds now.
    let third_host = DockerEngine::start_with_containerd_store().unwrap();
    third_host.import_reproducible_busybox_base("base:1");
    let job = Job::start(&coordinator, &third_host, &token, &[]);
    assert_all_from_cache(&job.build(app.path(), "app:1", &[]), STEPS);
    job.stop();
    coordinator.stop();
}

#[test]
fn both_targets_a_job_builds_stay_cached_through_the_view() {
    let Some(first_host) = DockerEngine::start_with_containerd_store() else { return };
    let store = FaultyProxy::start();
    let (coordinator, _data_dir, token) = coordinator_behind(&store);
    let app = build_context(&two_stages(1));
    // A job builds its test stage (`--target test`), then its image, each with the flags.
    first_host.import_reproducible_busybox_base("base:1");
    let job = Job::start(&coordinator, &first_host, &token, &[]);
    job.build(app.path(), "app:test", &["--target", "test"]);
    job.build(app.path(), "app:1", &[]);
    let summary = job.stop();
    assert_eq!(
        summary.lines().filter(|line| line.starts_with("view: saved app: ")).count(),
        2,
        "each export once: {summary}"
    );

    // The next job, on a fresh host, finds both builds' steps: the second export added to the
    // first rather than replacing it.
    let fresh_host = DockerEngine::start_with_containerd_store().unwrap();
    fresh_host.import_reproducible_busybox_base("base:1");
    let job = Job::start(&coordinator, &fresh_host, &token, &[]);
    assert_all_from_cache(&job.build(app.path(), "app:test", &["--target", "test"]), STEPS);
    assert_all_from_cache(&job.build(app.path(), "app:1", &[]), STEPS);
    job.stop();
    coordinator.stop();
}

/// An image built with inline cache, saved by `cache-worker save`, serves `--cache-from
/// VIEW/app:1` on a fresh host of the same kind (`start` makes one): the graph drivers' only
/// way, and the containerd store's before its first export through the view.
fn inline_cache_through_the_view(start: impl Fn() -> Option<DockerEngine>) {
    let Some(first_host) = start() else { return };
    print_versions(&first_host);
    let store = FaultyProxy::start();
    let (coordinator, _data_dir, token) = coordinator_behind(&store);
    let app = build_context(&two_stages(16));
    first_host.import_reproducible_busybox_base("base:1");
    build(&first_host, app.path(), "app:1", &[INLINE_CACHE]);
    let saved = coordinator.cache_worker_on(
        &first_host,
        &token,
        &["save", "--service", "app", "--branch", "main", "app:1", "base:1"],
    );
    assert!(saved.status.success(), "save: {}", stderr_of(&saved));
    let final_layers = saved_layer_bytes(&first_host, "app:1");

    let fresh_host = start().expect("a second engine");
    fresh_host.import_reproducible_busybox_base("base:1");
    let read_before = store.bytes_moved_down();
    let job = Job::start(&coordinator, &fresh_host, &token, &[]);
    let view = &job.address;
    let printed: Vec<&str> = job.printed.split_whitespace().collect();
    let app_image = format!("{view}/app:1");
    assert!(
        printed.windows(2).any(|pair| pair[0] == "--cache-from" && pair[1] == app_image),
        "--cache-from {app_image} in {:?}",
        job.printed
    );
    if fresh_host.containerd_store {
        assert!(
            job.printed.contains(&format!("--cache-to type=registry,ref={view}/buildcache:export,")),
            "{}",
            job.printed
        );
    } else {
        assert!(!job.printed.contains("--cache-to"), "the docker driver refuses cache export here: {}", job.printed);
    }
    let rebuilt = job.build(app.path(), "app:1", &[INLINE_CACHE]);
    assert_all_from_cache(&rebuilt, STEPS);
    let (served, read) = (job.meter.bytes_moved_down(), store.bytes_moved_down() - read_before);
    eprintln!(
        "lazy import, {:?} (containerd store: {}), inline cache: the view served {served} B, read {read} B from the store; the final image's layers are {final_layers} B",
        fresh_host.kind, fresh_host.containerd_store
    );
    assert!(served > 0, "the build asked the view");
    assert!(read < 16 * MIB / 4, "the view read {read} B from the store: the toolchain layer");
    let summary = job.stop();
    assert!(summary.contains("view: app: served "), "{summary}");
    coordinator.stop();
}

#[test]
fn an_inline_cache_image_saved_on_engine_20_10_is_imported_through_the_view() {
    inline_cache_through_the_view(|| DockerEngine::start(EngineKind::Engine20));
}

#[test]
fn an_inline_cache_image_saved_on_engine_26_1_is_imported_through_the_view() {
    inline_cache_through_the_view(|| DockerEngine::start(EngineKind::Engine26));
}

#[test]
fn an_inline_cache_image_saved_on_the_containerd_store_is_imported_through_the_view() {
    inline_cache_through_the_view(DockerEngine::start_with_containerd_store);
}

#[test]
fn an_inline_cache_image_saved_on_engine_28_5_is_imported_through_the_view() {
    inline_cache_through_the_view(|| DockerEngine::start(EngineKind::Engine28));
}

/// `cachectl show shop app --branch main` without its `last used` line, which a lookup moves.
fn main_cache(coordinator: &CoordinatorProcess) -> String {
    let shown = coordinator.cachectl(&["show", "shop", "app", "--branch", "main"]);
    assert!(shown.status.success(), "{}", stderr_of(&shown));
    stdout_of(&shown).lines().filter(|line| !line.starts_with("engine ")).collect::<Vec<_>>().join("\n")
}

#[test]
fn a_pull_requests_view_imports_main_but_its_export_to_main_is_refused_in_one_line() {
    let Some(main_host) = DockerEngine::start_with_containerd_store() else { return };
    let store = FaultyProxy::start();
    let (coordinator, _data_dir, token) = coordinator_behind(&store);
    let app = build_context(&two_stages(1));
    main_host.import_reproducible_busybox_base("base:1");
    let job = Job::start(&coordinator, &main_host, &token, &[]);
    job.build(app.path(), "app:1", &[]);
    assert!(job.stop().contains("view: saved"));
    let before = main_cache(&coordinator);

    // A pull request's job, its token scoped to write `pr-*` and read `main`, asks for main.
    let pr_token = printed_token(&coordinator.cachectl(&scoped_token_args("shop", "pr-*", "main")));
    let pr_host = DockerEngine::start_with_containerd_store().unwrap();
    pr_host.import_reproducible_busybox_base("base:1");
    let job = Job::start(&coordinator, &pr_host, &pr_token, &[]);
    let mut flags = job.flags();
    if !flags.iter().any(|flag| flag == "--cache-to") {
        // A view may leave the export out; the pull request's script may still spell it.
        let cache = format!(
            "type=registry,ref={}/buildcache:latest,mode=max,image-manifest=true,oci-mediatypes=true",
            job.meter.address
        );
        flags.extend(["--cache-to".to_owned(), cache]);
    }
    std::fs::write(app.path().join("Dockerfile"), format!("{}RUN echo pr > /pr\n", two_stages(1))).unwrap();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let built = pr_host.buildkit_build(app.path(), "app:pr", &args);
    let progress = stderr_of(&built);
    // Main's steps came from main's cache; the pull request's own step ran.
    let (steps, from_cache) = steps_and_from_cache(&progress);
    assert_eq!((steps.len(), from_cache.len()), (STEPS + 1, STEPS), "{progress}");
    // BuildKit shows a registry's refusal as `denied: MESSAGE` on a line of its own.
    let refusals: Vec<&str> = progress.lines().filter(|line| line.starts_with("denied: ")).collect();
    assert!(!refusals.is_empty(), "a refusal line: {progress}");
    assert!(
        refusals.iter().all(|line| line.contains("main") && *line == refusals[0]),
        "one line naming main: {refusals:?}"
    );
    for dump in ["Error {", "Status {", "\\n"] {
        assert!(!progress.contains(dump), "no {dump:?} in the build log: {progress}");
    }
    let summary = job.stop();
    assert!(!summary.contains("view: saved"), "{summary}");
    let refused = format!("view: app: BuildKit's cache export was not saved: {}", &refusals[0]["denied: ".len()..]);
    assert!(summary.lines().any(|line| line == refused), "{refused:?} in {summary}");
    assert_eq!(main_cache(&coordinator), before, "main's cache is unchanged");
    coordinator.stop();
}

/// A build context whose builder stage copies a toolchain of `mib` MiB of pseudo-random bytes
/// (from `seed`: the same bytes, and so the same layer, on every host) instead of making one.
fn toolchain_context(mib: u64, seed: u64) -> tempfile::TempDir {
    let dockerfile = two_stages(mib).replace(
        &format!("RUN dd if=/dev/urandom of=/toolchain bs=1M count={mib} 2>/dev/null"),
        "COPY toolchain.bin /toolchain",
    );
    let context = build_context(&dockerfile);
    // xorshift64*: incompressible enough that gzip keeps every byte.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity((mib * MIB) as usize);
    while (bytes.len() as u64) < mib * MIB {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    std::fs::write(context.path().join("toolchain.bin"), bytes).unwrap();
    context
}

#[test]
fn a_view_killed_mid_export_leaves_the_cache_whole_and_the_next_export_succeeds() {
    let Some(first_host) = DockerEngine::start_with_containerd_store() else { return };
    let store = FaultyProxy::start();
    let (coordinator, data_dir, token) = coordinator_behind(&store);
    let app = toolchain_context(16, 1);
    first_host.import_reproducible_busybox_base("base:1");
    let job = Job::start(&coordinator, &first_host, &token, &[]);
    job.build(app.path(), "app:1", &[]);
    assert!(job.stop().contains("view: saved"));

    // Job 2 changes the toolchain: its new 17 MiB layer goes to the store at the export's end.
    // Once the view's upload of it is under way, the store stalls and the view is killed.
    let second_host = DockerEngine::start_with_containerd_store().unwrap();
    second_host.import_reproducible_busybox_base("base:1");
    let changed = toolchain_context(17, 2);
    let job = Job::start(&coordinator, &second_host, &token, &[]);
    let port: u16 = job.address.rsplit(':').next().unwrap().parse().unwrap();
    let view_pid = pid_listening_on(port).expect("the view's process");
    let flags = job.flags();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let stored_before = store.bytes_moved_up();
    let mut building = second_host
        .buildkit_build_command(changed.path(), "app:1", &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut progress = building.stderr.take().unwrap();
    let progress = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = progress.read_to_string(&mut text);
        text
    });
    // Killed once the toolchain's upload is under way and a smaller blob of the save is stored
    // whole (uploaded, never committed: the ledger does not know it), as a crash leaves them.
    let blobs_dir = data_dir.path().join("objects/layer-cache/cache/shop/blobs/sha256");
    let blob_names = || -> HashSet<std::ffi::OsString> {
        std::fs::read_dir(&blobs_dir).into_iter().flatten().flatten().map(|entry| entry.file_name()).collect()
    };
    let stored_blobs = blob_names();
    let deadline = Instant::now() + Duration::from_secs(120);
    while store.bytes_moved_up() < stored_before + MIB || blob_names().is_subset(&stored_blobs) {
        assert!(Instant::now() < deadline, "the view never uploaded the new toolchain layer");
        assert!(building.try_wait().unwrap().is_none(), "the build ended before the upload: {:?}", progress.join());
        std::thread::sleep(Duration::from_millis(5));
    }
    store.freeze();
    let killed = Command::new("kill").args(["-KILL", &view_pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let _ = building.wait();
    store.thaw();
    let progress = progress.join().unwrap();
    eprintln!("the build whose view was killed: {}", progress.lines().rev().take(3).collect::<Vec<_>>().join(" | "));

    // The killed view's host runs the next job's view as if nothing had happened.
    let again = Job::start(&coordinator, &second_host, &token, &[]);
    again.stop();

    // Job 3 on a fresh host: the previous cache imports whole, and this job's export of the
    // same change (the very layer the dead save was uploading, and claimed) commits at once,
    // though the coordinator keeps a dead save's claims for ten minutes here.
    let third_host = DockerEngine::start_with_containerd_store().unwrap();
    third_host.import_reproducible_busybox_base("base:1");
    let job = Job::start(&coordinator, &third_host, &token, &[]);
    assert_all_from_cache(&job.build(app.path(), "app:1", &[]), STEPS);
    job.build(changed.path(), "app:1", &[]);
    let summary = job.stop();
    assert!(summary.contains("view: saved"), "{summary}");

    let fourth_host = DockerEngine::start_with_containerd_store().unwrap();
    fourth_host.import_reproducible_busybox_base("base:1");
    let job = Job::start(&coordinator, &fourth_host, &token, &[]);
    assert_all_from_cache(&job.build(changed.path(), "app:1", &[]), STEPS);
    job.stop();
    coordinator.stop();
}

#[test]
fn with_no_cache_or_no_coordinator_the_wrapped_build_runs_uncached_and_succeeds() {
    let Some(host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(data_dir.path(), &[]);
    let token = coordinator.create_project("shop");
    host.import_reproducible_busybox_base("base:1");
    let app = build_context(&two_stages(1));
    let build = host.buildkit_build_command(app.path(), "app:1", &[INLINE_CACHE]);
    let wrapped = |coordinator_url: &str| {
        let mut command = Command::new(binary("cache-worker"));
        command.args(["--coordinator", coordinator_url, "view", "run", "--service", "app", "--branch", "main", "--"]);
        command.arg(build.get_program()).args(build.get_args());
        for (name, value) in build.get_envs() {
            if let Some(value) = value {
                command.env(name, value);
            }
        }
        command.env("CACHE_TOKEN", &token).env("CACHE_BUILD_CACHE_DIR", host.build_cache_dir());
        output_within(command, Duration::from_secs(180), "cache-worker view run")
    };

    // No cache yet: the build runs every step and exits 0, and so does the wrapper.
    let ran = wrapped(&coordinator.grpc_url);
    assert_eq!(ran.status.code(), Some(0), "{}", stderr_of(&ran));
    let (steps, cached) = steps_and_cached(&stderr_of(&ran));
    assert_eq!((steps.len(), cached.len()), (STEPS, 0), "{}", stderr_of(&ran));

    // The coordinator unreachable: a warning, no cache flags, the build runs and succeeds.
    let (_socket, closed) = closed_port();
    let fresh_host = DockerEngine::start(EngineKind::Engine20).unwrap();
    fresh_host.import_reproducible_busybox_base("base:1");
    let mut start = Command::new(binary("cache-worker"));
    start
        .args(["--coordinator", &format!("http://{closed}"), "view", "start", "--service", "app"])
        .env("CACHE_TOKEN", &token)
        .env("DOCKER_HOST", &fresh_host.host)
        .env("CACHE_BUILD_CACHE_DIR", fresh_host.build_cache_dir());
    let _guard = ViewGuard::of(&fresh_host);
    let started = output_within(start, Duration::from_secs(120), "cache-worker view start");
    assert_eq!(started.status.code(), Some(0), "{}", stderr_of(&started));
    assert_eq!(stdout_of(&started).trim(), "", "no cache flags");
    let warning = stderr_of(&started);
    assert_eq!(warning.lines().count(), 1, "one line: {warning}");
    assert!(
        warning.starts_with("cache-worker: warning: the view of app serves no cache, the build runs without it: "),
        "{warning}"
    );
    let built = super::buildkit::build(&fresh_host, app.path(), "app:1", &[INLINE_CACHE]);
    assert!(steps_and_cached(&built).1.is_empty(), "{built}");
    let mut stop = Command::new(binary("cache-worker"));
    stop.args(["--coordinator", &format!("http://{closed}"), "view", "stop", "--service", "app"])
        .env("CACHE_TOKEN", &token)
        .env("DOCKER_HOST", &fresh_host.host)
        .env("CACHE_BUILD_CACHE_DIR", fresh_host.build_cache_dir());
    let stopped = output_within(stop, Duration::from_secs(120), "cache-worker view stop");
    assert_eq!(stopped.status.code(), Some(0), "{}", stderr_of(&stopped));
    coordinator.stop();
}
