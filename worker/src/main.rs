//! `cache-worker`: the build host's side of the layer cache.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use proto::client::ClientError;
use proto::v1 as pb;
use tracing::Instrument;
use worker::coordinator::Coordinator;
use worker::docker::Engine;
use worker::error::WorkerError;
use worker::restore::seams::Lease;
use worker::restore::{RestoreOptions, Restored, build_flags, report_failure, restore};
use worker::save::{SaveCleanup, SaveOptions, save};

/// cache-worker: save and restore Docker layer caches for this build host.
#[derive(Debug, Parser)]
#[command(name = "cache-worker", version)]
struct Cli {
    /// URL of the coordinator's gRPC API; several, comma-separated, for replicas: the first that
    /// answers serves the command, and one that stops answering mid-command hands it to the next
    #[arg(long, env = "CACHE_COORDINATOR", default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// The project's token, from `cachectl project create`
    #[arg(long, env = "CACHE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Seconds any call to the coordinator, the store or the Docker engine may go without
    /// progress before the command gives up (a restore then warns and exits 0; a save fails):
    /// a frozen dependency costs a build about this long, once (5 to 3600)
    #[arg(long, env = "CACHE_STALL_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(5..=3600))]
    stall_timeout: u64,
    /// Where a restore writes what the build reads (BuildKit's local cache sources on the
    /// containerd image store) and what it restored, and where the build writes its own cache
    /// for the next save; one folder per service
    #[arg(long, env = "CACHE_BUILD_CACHE_DIR", default_value_os_t = worker::build_dirs::default_root())]
    build_cache_dir: std::path::PathBuf,
    /// The engine's data root as this worker sees it, when not at the engine's own path (a
    /// worker in a container with the data root mounted elsewhere, read-only will do): a save
    /// reads the blobs it uploads there in place instead of through `docker save`, and a
    /// restore on the containerd image store skips the blobs the host's content store holds
    #[arg(long, env = "CACHE_ENGINE_ROOT")]
    engine_root: Option<std::path::PathBuf>,
    /// The socket of the engine's containerd (containerd image store), where a save reads blobs
    /// whose files it cannot see; unset: /var/run/docker/containerd/containerd.sock, then
    /// /run/containerd/containerd.sock
    #[arg(long, env = "CACHE_CONTAINERD_SOCKET")]
    containerd_socket: Option<std::path::PathBuf>,
    /// The CI job this command runs in (any text; unset: the platform's own job variables,
    /// e.g. GitLab's CI_JOB_ID): a save takes BuildKit's cache export only in the job whose
    /// restore printed the flag that writes it
    #[arg(long, env = "CACHE_JOB_ID")]
    job_id: Option<String>,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    fn stall(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stall_timeout)
    }

    /// Where this worker reaches the engine's stores (`--engine-root`, `--containerd-socket`).
    fn engine_stores(&self) -> worker::save_source::EngineStores {
        worker::save_source::EngineStores {
            engine_root: self.engine_root.clone(),
            containerd_socket: self.containerd_socket.clone(),
            stall_timeout: self.stall(),
        }
    }

    /// The coordinator URLs of `--coordinator`, in the order they are tried.
    fn coordinator_urls(&self) -> Vec<&str> {
        self.coordinator.split(',').map(str::trim).filter(|url| !url.is_empty()).collect()
    }
}

/// Whether the next coordinator URL may do what this one could not: it did not answer (a
/// replica stopped or killed), rather than refusing or failing the request.
fn hand_to_next(error: &WorkerError, url: &str, next: Option<&&str>) -> bool {
    let unanswered =
        matches!(error, WorkerError::Coordinator(ClientError::Unreachable { .. } | ClientError::Stalled { .. }));
    match next {
        Some(next) if unanswered => {
            eprintln!("cache-worker: warning: coordinator {url} did not answer ({error}); trying {next}");
            true
        }
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CredentialsFormat {
    /// `export NAME='value'` lines for a POSIX shell
    Env,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Save images with their parent chains and tags to the project's cache.
    Save {
        /// The service the cache is kept for
        #[arg(long, env = "CACHE_SERVICE")]
        service: String,
        /// Keep the cache per branch
        #[arg(long, env = "CACHE_BRANCH", default_value = "")]
        branch: String,
        /// Images to save (tags or IDs); each is saved with its parent chain
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Bring the service's cached images into the engine before a build.
    Restore {
        #[command(flatten)]
        key: KeyArgs,
        /// Fail (exit 69 unreachable, 77 refused, else 1) when the restore fails, instead of warning and building without cache
        #[arg(long, env = "CACHE_STRICT")]
        strict: bool,
        /// Print only the flags for the build on stdout: `--cache-from` (and, on the containerd
        /// image store with BuildKit, `--cache-to`); empty on a miss or when the build can use none
        #[arg(long)]
        print_cache_from: bool,
    },
    /// Serve the service's cache to BuildKit as a registry on this host for a CI job: builds
    /// fetch only the blobs they use, and BuildKit's cache export is saved as it is pushed.
    View {
        #[command(subcommand)]
        command: ViewCommand,
    },
    /// Print read-only storage credentials for this project's cache.
    Credentials {
        #[arg(long, value_enum, default_value = "env")]
        format: CredentialsFormat,
    },
}

/// Which cache a restore or a view reads.
#[derive(Debug, clap::Args)]
struct KeyArgs {
    /// The service the cache is kept for
    #[arg(long, env = "CACHE_SERVICE")]
    service: String,
    /// The branch whose cache to read (a view saves a pushed cache export to it too)
    #[arg(long, env = "CACHE_BRANCH", default_value = "")]
    branch: String,
    /// Branches to try, in order, when the branch has no cache (repeatable)
    #[arg(long = "fallback-branch")]
    fallback_branches: Vec<String>,
}

/// Which cache a view serves and where it listens.
#[derive(Debug, clap::Args)]
struct ViewArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// Where the view listens: loopback, which every engine reaches over plain HTTP without
    /// configuration (port 0: any free port)
    #[arg(long, env = "CACHE_VIEW_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,
}

impl ViewArgs {
    fn options(&self) -> worker::view::ViewOptions {
        worker::view::ViewOptions {
            service: self.key.service.clone(),
            branch: self.key.branch.clone(),
            fallback_branches: self.key.fallback_branches.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum ViewCommand {
    /// Start the view in the background and print the flags for the build command (one line)
    Start(ViewArgs),
    /// Stop the service's view: wait for its pending saves, print what it served and saved
    Stop {
        /// The service whose view to stop
        #[arg(long, env = "CACHE_SERVICE")]
        service: String,
    },
    /// Run a build command with the view's flags appended, serving while it runs
    Run {
        #[command(flatten)]
        view: ViewArgs,
        /// The build command and its arguments, after `--`
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Serve in the foreground until SIGTERM or SIGINT (what `start` runs)
    Serve(ViewArgs),
}

/// The first coordinator of `--coordinator` that answers.
async fn connected(cli: &Cli) -> Result<Coordinator, WorkerError> {
    let (coordinator, result) = with_failover(cli, async |_: &mut Coordinator| Ok(())).await;
    result.map(|()| coordinator.expect("connected"))
}

async fn run_view(cli: &Cli, command: &ViewCommand) -> ExitCode {
    use worker::view::process;
    let dirs = |service: &str| worker::build_dirs::BuildDirs::new(&cli.build_cache_dir, service);
    let result = match command {
        ViewCommand::Start(args) => {
            let settings = process::Settings {
                coordinator: &cli.coordinator,
                token: cli.token.as_deref(),
                stall_timeout: cli.stall_timeout,
                build_cache_dir: &cli.build_cache_dir,
                job_id: cli.job_id.as_deref(),
            };
            match process::start(&args.options(), &args.listen, &settings, &dirs(&args.key.service)).await {
                Ok(flags) => {
                    println!("{}", build_flags(&flags));
                    Ok(())
                }
                // A cache never breaks a build: a view that cannot start is a warning.
                Err(error) if !matches!(error, WorkerError::Invalid(_)) => {
                    eprintln!(
                        "cache-worker: warning: the view of {} did not start, the build runs without cache: {error}",
                        args.key.service
                    );
                    println!();
                    Ok(())
                }
                Err(error) => Err(error),
            }
        }
        ViewCommand::Stop { service } => process::stop(service, &dirs(service)).await,
        ViewCommand::Serve(args) => {
            match process::open(connected(cli).await, args.options(), &args.listen, cli.stall()).await {
                Ok(running) => process::serve(running, &dirs(&args.key.service)).await,
                Err(error) => Err(error),
            }
        }
        ViewCommand::Run { view, command } => {
            match process::open(connected(cli).await, view.options(), &view.listen, cli.stall()).await {
                Ok(running) => match process::run(running, command).await {
                    Ok(code) => return ExitCode::from(u8::try_from(code).unwrap_or(1)),
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cache-worker: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

async fn run_restore(cli: &Cli, options: RestoreOptions, strict: bool, print_cache_from: bool) -> ExitCode {
    let say = |line: &str| {
        if print_cache_from {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    // A restore reports its own failures to the coordinator; an engine out of reach too.
    let restoring = async |coordinator: &mut Coordinator| match Engine::connect(cli.stall()).await {
        Ok(engine) => restore(coordinator, &engine, &options, &say).await,
        Err(error) => Err(report_failure(coordinator, &options.service, Lease::default(), error.into()).await),
    };
    let (_, result) = with_failover(cli, restoring).await;
    match result {
        Ok(Restored::Hit { flags }) => {
            if print_cache_from && !flags.is_empty() {
                println!("{}", build_flags(&flags));
            }
            ExitCode::SUCCESS
        }
        Ok(Restored::Miss) => ExitCode::SUCCESS,
        Err(error) => restore_failed(&options.service, strict, error),
    }
}

/// A cache never breaks a build: without `--strict` a failed restore is one warning, exit 0.
fn restore_failed(service: &str, strict: bool, error: WorkerError) -> ExitCode {
    if strict {
        eprintln!("cache-worker: restoring {service} failed: {error}");
        ExitCode::from(error.exit_code().max(1))
    } else {
        eprintln!("cache-worker: warning: restoring {service} failed, the build runs without cache: {error}");
        ExitCode::SUCCESS
    }
}

async fn run(cli: Cli) -> Result<(), WorkerError> {
    match &cli.command {
        Command::Credentials { format: CredentialsFormat::Env } => {
            let (coordinator, connected) = with_failover(&cli, async |_: &mut Coordinator| Ok(())).await;
            connected?;
            let mut coordinator = coordinator.expect("connected");
            let request = pb::GetCredentialsRequest { access: pb::Access::Read as i32, ..Default::default() };
            let response = coordinator.client.get_credentials(request).await.map_err(|s| coordinator.failed(s))?;
            let credentials = response.into_inner().credentials.unwrap_or_default();
            print!("{}", proto::credentials::format_env(&credentials));
            Ok(())
        }
        Command::Save { service, branch, images } => {
            let options = SaveOptions {
                service: service.clone(),
                branch: branch.clone(),
                images: images.clone(),
                build_cache_dir: cli.build_cache_dir.clone(),
                owner: worker::build_dirs::owner_of(cli.token.as_deref().unwrap_or_default()),
                job: worker::build_dirs::job_of(cli.job_id.as_deref()),
                stores: cli.engine_stores(),
            };
            proto::names::validate_service_name(service)?;
            options.stores.validate().map_err(WorkerError::Invalid)?;
            let engine = Engine::connect(cli.stall()).await?;
            let cleanup = SaveCleanup::default();
            // A save begun through a replica that stops answering starts over through the next.
            let saved = async {
                let saving = async |coordinator: &mut Coordinator| save(coordinator, &engine, &options, &cleanup).await;
                with_failover(&cli, saving).await.1.map(|_| ())
            };
            tokio::select! {
                saved = saved => saved,
                (signal, code) = worker::signals::interrupted() => {
                    // The save's future is gone, so nothing commits; its uploads are aborted so
                    // the store keeps no part of them.
                    let aborted = cleanup.run().await;
                    let plural = if aborted == 1 { "" } else { "s" };
                    eprintln!(
                        "cache-worker: saving {service} interrupted by {signal}: aborted {aborted} unfinished upload{plural}, nothing saved"
                    );
                    // Without waiting for the export's reader thread, which the engine may hold.
                    std::process::exit(code);
                }
            }
        }
        Command::Restore { .. } => unreachable!("restores run through run_restore"),
        Command::View { .. } => unreachable!("views run through run_view"),
    }
}

/// Runs `attempt` through the first coordinator of `--coordinator` that answers, and again
/// through the next while one stops answering: the coordinator it ended with, and its result.
async fn with_failover<T>(
    cli: &Cli,
    mut attempt: impl AsyncFnMut(&mut Coordinator) -> Result<T, WorkerError>,
) -> (Option<Coordinator>, Result<T, WorkerError>) {
    let urls = cli.coordinator_urls();
    let mut last = (None, Err(WorkerError::Invalid("no --coordinator URL".into())));
    for (i, url) in urls.iter().enumerate() {
        last = match Coordinator::connect(url, cli.token.as_deref(), cli.stall()).await {
            Ok(mut coordinator) => {
                let result = attempt(&mut coordinator).await;
                (Some(coordinator), result)
            }
            Err(error) => (None, Err(error.into())),
        };
        match &last.1 {
            Err(error) if hand_to_next(error, url, urls.get(i + 1)) => continue,
            _ => break,
        }
    }
    last
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _telemetry = telemetry::init("cache-worker", "CACHE_LOG", "warn", &[]);
    if let Command::Restore { key: KeyArgs { service, branch, fallback_branches }, strict, print_cache_from } =
        &cli.command
    {
        let options = RestoreOptions {
            service: service.clone(),
            branch: branch.clone(),
            fallback_branches: fallback_branches.clone(),
            build_cache_dir: cli.build_cache_dir.clone(),
            owner: worker::build_dirs::owner_of(cli.token.as_deref().unwrap_or_default()),
            job: worker::build_dirs::job_of(cli.job_id.as_deref()),
            stores: cli.engine_stores(),
        };
        let (strict, print_cache_from) = (*strict, *print_cache_from);
        let span = tracing::info_span!("restore", service = %service);
        return run_restore(&cli, options, strict, print_cache_from).instrument(span).await;
    }
    if let Command::View { command } = &cli.command {
        let span = tracing::info_span!("view");
        return run_view(&cli, command).instrument(span).await;
    }
    let saving = match &cli.command {
        Command::Save { service, .. } => Some(service.clone()),
        _ => None,
    };
    let span = match &cli.command {
        Command::Save { service, .. } => tracing::info_span!("save", service = %service),
        _ => tracing::info_span!("credentials"),
    };
    match run(cli).instrument(span).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            match saving {
                Some(service) => eprintln!("cache-worker: saving {service} failed: {error}"),
                None => eprintln!("cache-worker: {error}"),
            }
            ExitCode::from(error.exit_code())
        }
    }
}
