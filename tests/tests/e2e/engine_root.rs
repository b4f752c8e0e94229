//! A worker that reaches the engine's socket but sees its data root at another path (a worker
//! in a container with the data root mounted elsewhere; here the data root is hidden under an
//! empty tmpfs in the worker's own mount namespace and bind-mounted, read-only, at another
//! path): with `--engine-root` a save reads the engine's stores in place and a one-layer change
//! uploads that layer alone; without it, or with a folder that is not the engine's, it saves
//! through `docker save` and says why in one line. On the containerd image store, with the
//! content store's files out of sight, a save reads the blobs through containerd's socket
//! (`--containerd-socket`), and a fresh host restored from it rebuilds fully cached.

use std::path::Path;
use std::process::{Command, Output};

use super::incremental_save::{
    Built, assert_restores_fully_cached, assert_stored_like_the_export, build_app, built_on, new_layers,
};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, stderr_of, stdout_of};

const EXPORT_LINE: &str = "cache-worker: reading the images through docker save: ";

/// `cache-worker GLOBAL_FLAGS save --service app app:1 base:1` in a mount namespace of its own
/// where the engine's data root is an empty tmpfs and its files are at `mounted` (read-only),
/// when given.
fn save_with_the_data_root_moved(
    coordinator: &CoordinatorProcess,
    host: &DockerEngine,
    token: &str,
    mounted: Option<&Path>,
    global_flags: &[&str],
) -> Output {
    let mut args = global_flags.to_vec();
    args.extend(["save", "--service", "app", "app:1", "base:1"]);
    let worker = coordinator.cache_worker_command_on(host, token, &args);
    with_the_data_root_moved(&worker, host, mounted)
}

/// Runs `worker` in a mount namespace of its own where `host`'s data root is an empty tmpfs
/// and its files are at `mounted` (read-only), when given.
pub(super) fn with_the_data_root_moved(worker: &Command, host: &DockerEngine, mounted: Option<&Path>) -> Output {
    let script = match mounted {
        Some(_) => {
            r#"mount --bind "$0" "$1" && mount -o remount,bind,ro "$1" && mount -t tmpfs none "$0" && shift && exec "$@""#
        }
        None => r#"mount -t tmpfs none "$0" && shift && exec "$@""#,
    };
    let mut moved = Command::new("unshare");
    moved.args(["--mount", "--propagation", "private", "sh", "-c", script]).arg(host.data_root());
    moved.arg(mounted.unwrap_or(Path::new("-"))).arg(worker.get_program()).args(worker.get_args());
    for (name, value) in worker.get_envs() {
        if let Some(value) = value {
            moved.env(name, value);
        }
    }
    moved.output().expect("unshare")
}

fn export_lines(output: &Output) -> Vec<String> {
    stderr_of(output).lines().filter(|line| line.starts_with(EXPORT_LINE)).map(str::to_owned).collect()
}

fn assert_read_in_place(saved: &Output) {
    assert!(saved.status.success(), "save: {}", stderr_of(saved));
    assert!(!stderr_of(saved).contains("docker save"), "read in place: {}", stderr_of(saved));
    assert!(stdout_of(saved).contains(", read from the engine's store)"), "{}", stdout_of(saved));
}

fn assert_read_from_the_export(saved: &Output, why: &str) {
    assert!(saved.status.success(), "save: {}", stderr_of(saved));
    let lines = export_lines(saved);
    assert_eq!(lines.len(), 1, "{}", stderr_of(saved));
    assert!(lines[0].contains(why), "{}", lines[0]);
    assert!(stdout_of(saved).contains(", read from docker save)"), "{}", stdout_of(saved));
}

/// Changes the build's one-line file and rebuilds.
fn change_one_line(host: &DockerEngine, app: &Path, text: &str) {
    std::fs::write(app.join("file.txt"), text).unwrap();
    build_app(host, app, &[]);
}

#[test]
fn with_the_data_root_mounted_elsewhere_engine_20_10_saves_in_place_given_engine_root() {
    let Some(host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let Built { coordinator, data_dir, token, app } = built_on(&host);
    let mounted = tempfile::tempdir().unwrap();
    let root_flag = ["--engine-root", mounted.path().to_str().unwrap()];

    // Without the flag: the data root is out of sight, so the save reads the export.
    let cold = save_with_the_data_root_moved(&coordinator, &host, &token, Some(mounted.path()), &[]);
    assert_read_from_the_export(&cold, "this worker cannot read the engine's data root");
    assert!(export_lines(&cold)[0].contains("--engine-root"), "the line names the flag: {}", stderr_of(&cold));

    // With it: in place, and a one-line change uploads that layer alone.
    change_one_line(&host, app.path(), "changed\n");
    let started = std::time::Instant::now();
    let incremental = save_with_the_data_root_moved(&coordinator, &host, &token, Some(mounted.path()), &root_flag);
    let took = started.elapsed();
    assert_read_in_place(&incremental);
    assert_eq!(new_layers(&stdout_of(&incremental)), 1, "only the COPY layer: {}", stdout_of(&incremental));
    assert_stored_like_the_export(data_dir.path(), &host, "app:1");
    eprintln!("a one-layer save through --engine-root took {took:?}");

    // A folder that is not the engine's: one line naming the flag, and the save still works.
    change_one_line(&host, app.path(), "changed again\n");
    let elsewhere = tempfile::tempdir().unwrap();
    let wrong = ["--engine-root", elsewhere.path().to_str().unwrap()];
    let saved = save_with_the_data_root_moved(&coordinator, &host, &token, Some(mounted.path()), &wrong);
    assert_read_from_the_export(&saved, "given by --engine-root");
    assert_eq!(new_layers(&stdout_of(&saved)), 1, "{}", stdout_of(&saved));
    assert_stored_like_the_export(data_dir.path(), &host, "app:1");

    // A path that is no folder at all is bad input: one line, exit 64, nothing saved.
    let bad = coordinator.cache_worker_on(
        &host,
        &token,
        &["--engine-root", "var/lib/docker", "save", "--service", "app", "app:1"],
    );
    assert_eq!(bad.status.code(), Some(64), "{}", stderr_of(&bad));
    assert_eq!(
        stderr_of(&bad).trim(),
        "cache-worker: saving app failed: --engine-root var/lib/docker is not an absolute path"
    );
    coordinator.stop();
}

/// The socket of the containerd the engine started for itself, under its exec root.
#[test]
fn with_the_content_store_out_of_sight_the_containerd_store_is_read_through_containerds_socket() {
    let Some(host) = DockerEngine::start_with_containerd_store() else { return };
    let Built { coordinator, data_dir, token, app } = built_on(&host);
    let socket = host.containerd_socket();
    assert!(socket.exists(), "the engine's containerd listens at {}", socket.display());

    let socket_flag = ["--containerd-socket", socket.to_str().unwrap()];

    // Through the socket: every blob (a 72 MiB layer among them) read in place.
    let cold = save_with_the_data_root_moved(&coordinator, &host, &token, None, &socket_flag);
    assert_read_in_place(&cold);
    assert_stored_like_the_export(data_dir.path(), &host, "app:1");

    // Neither the files nor a socket in the usual places: the export, saying what to pass.
    change_one_line(&host, app.path(), "changed\n");
    let without = save_with_the_data_root_moved(&coordinator, &host, &token, None, &[]);
    assert_read_from_the_export(&without, "this worker cannot read the engine's content store");
    assert!(export_lines(&without)[0].contains("--containerd-socket"), "{}", stderr_of(&without));

    // Through the socket again: a one-line change uploads that layer alone.
    change_one_line(&host, app.path(), "changed again\n");
    let incremental = save_with_the_data_root_moved(&coordinator, &host, &token, None, &socket_flag);
    assert_read_in_place(&incremental);
    assert_eq!(new_layers(&stdout_of(&incremental)), 1, "only the COPY layer: {}", stdout_of(&incremental));
    assert_stored_like_the_export(data_dir.path(), &host, "app:1");

    // What was read through the socket restores on a fresh host, which rebuilds fully cached.
    let fresh = DockerEngine::start_with_containerd_store().unwrap();
    assert_restores_fully_cached(&coordinator, &token, &fresh, app.path());
    coordinator.stop();
}

#[test]
fn with_the_data_root_mounted_elsewhere_the_containerd_store_is_read_in_place_given_engine_root() {
    let Some(host) = DockerEngine::start_with_containerd_store() else { return };
    let Built { coordinator, data_dir, token, app } = built_on(&host);
    let mounted = tempfile::tempdir().unwrap();
    change_one_line(&host, app.path(), "changed\n");
    let root_flag = ["--engine-root", mounted.path().to_str().unwrap(), "--containerd-socket", "/nonexistent.sock"];
    let saved = save_with_the_data_root_moved(&coordinator, &host, &token, Some(mounted.path()), &root_flag);
    assert_read_in_place(&saved);
    assert_stored_like_the_export(data_dir.path(), &host, "app:1");
    coordinator.stop();
}
