//! `cache-coordinator`: parse flags, start telemetry, load and validate the configuration, then
//! hand over to [`coordinator::run`].

use std::process::ExitCode;

use clap::Parser;
use coordinator::config::{Cli, Command, ConfigError, merge, read_file_config};
use coordinator::{Listeners, open_data_dir, open_state, open_store, run};

/// Exit code for bad configuration or an unusable data directory (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

/// Exit code for a failure of the coordinator's own (a task that panicked): EX_SOFTWARE.
const EXIT_INTERNAL: u8 = 70;

/// The exit code for a start-up error: internal (70) when a task failed, else bad configuration (64).
fn start_up_exit_code(error: &coordinator::error::Error) -> u8 {
    match error {
        coordinator::error::Error::Internal(_) => EXIT_INTERNAL,
        _ => EXIT_BAD_CONFIG,
    }
}

/// The exit code once serving: 70 when a task panicked, else 1.
fn serve_exit_code(error: &anyhow::Error) -> u8 {
    let internal = error.chain().any(|cause| {
        cause.is::<tokio::task::JoinError>()
            || matches!(cause.downcast_ref(), Some(coordinator::error::Error::Internal(_)))
    });
    if internal { EXIT_INTERNAL } else { 1 }
}

/// Reads a secret from `NAME` or from the file named by `NAME_FILE`.
fn secret_from_env(name: &str) -> Result<Option<String>, ConfigError> {
    if let Ok(value) = std::env::var(name) {
        return Ok(Some(value));
    }
    let file_variable = format!("{name}_FILE");
    match std::env::var_os(&file_variable) {
        Some(path) => std::fs::read_to_string(&path)
            .map(|contents| Some(contents.trim().to_owned()))
            .map_err(|error| ConfigError(format!("cannot read {file_variable} {}: {error}", path.to_string_lossy()))),
        None => Ok(None),
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // s3s logs whole requests at debug level, session tokens included: it never goes below warn.
    let _telemetry = telemetry::init("cache-coordinator", "RUST_LOG", "info", &["s3s=off", "s3s_fs=warn"]);
    let Command::Serve(args) = cli.command;
    let fail = |code: u8, message: String| {
        eprintln!("cache-coordinator: {message}");
        ExitCode::from(code)
    };

    let file = match args.config.as_deref().map(read_file_config).transpose() {
        Ok(file) => file.unwrap_or_default(),
        Err(error) => return fail(EXIT_BAD_CONFIG, error.to_string()),
    };
    let config = match merge(args, file) {
        Ok(config) => config,
        Err(error) => return fail(EXIT_BAD_CONFIG, error.to_string()),
    };
    let admin_token = match secret_from_env("CACHE_ADMIN_TOKEN") {
        Ok(token) => token,
        Err(error) => return fail(EXIT_BAD_CONFIG, error.to_string()),
    };
    // Sled is opened (and the data directory locked by it) only when it is the state.
    let with_sled = config.state.is_none();
    let data_dir = match open_data_dir(&config.data_dir, admin_token.as_deref(), &config.bucket, with_sled) {
        Ok(data_dir) => data_dir,
        Err(error) => return fail(start_up_exit_code(&error), error.line()),
    };
    // The state replicas share, or this machine's sled.
    let state = match open_state(&config, &data_dir).await {
        Ok(state) => state,
        Err(error) => return fail(start_up_exit_code(&error), format!("--state: {}", error.line())),
    };
    let listeners = match Listeners::bind(&config).await {
        Ok(listeners) => listeners,
        Err(error) => return fail(EXIT_BAD_CONFIG, format!("{error:#}")),
    };
    let endpoints = match listeners.endpoints(&config) {
        Ok(endpoints) => endpoints,
        Err(error) => return fail(1, error.to_string()),
    };
    // The one clock everything reads time from: key expiry, the ledger's stamps, the sweeps,
    // claims and leases. Replicas read the database's, so they agree without NTP.
    let clock = state.shared_clock().unwrap_or_else(proto::clock::system_clock);
    let store = match open_store(&config, &data_dir, state.clone(), clock.clone(), &endpoints).await {
        Ok(store) => store,
        Err(error) => return fail(start_up_exit_code(&error), error.line()),
    };
    if let Some(path) = &data_dir.admin_token.file {
        println!("admin token: {}", path.display());
    }
    // One line that scripts and tests wait for; with the embedded store it also names the
    // address the S3 endpoint is bound to (behind --s3-public-url it differs).
    let s3_listen = match listeners.s3.as_ref().map(|listener| listener.local_addr()) {
        Some(Ok(address)) => format!(" s3_listen={address}"),
        _ => String::new(),
    };
    println!(
        "cache-coordinator ready: grpc=http://{} s3={} metrics=http://{}{s3_listen}",
        endpoints.grpc, endpoints.s3_url, endpoints.metrics
    );
    match run(config, data_dir, state, listeners, store, clock, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(serve_exit_code(&error), format!("{error:#}")),
    }
}
