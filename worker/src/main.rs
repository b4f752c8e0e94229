//! `cache-worker`: the build host's side of the layer cache.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use proto::client::{BearerToken, ClientError, connect};
use proto::v1 as pb;
use proto::v1::worker_client::WorkerClient;

/// cache-worker: save and restore Docker layer caches for this build host.
#[derive(Debug, Parser)]
#[command(name = "cache-worker", version)]
struct Cli {
    /// URL of the coordinator's gRPC API
    #[arg(long, env = "CACHE_COORDINATOR", default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// The project's token, from `cachectl project create`
    #[arg(long, env = "CACHE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CredentialsFormat {
    /// `export NAME='value'` lines for a POSIX shell
    Env,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print read-only storage credentials for this project's cache.
    Credentials {
        #[arg(long, value_enum, default_value = "env")]
        format: CredentialsFormat,
    },
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    let token = cli
        .token
        .as_deref()
        .ok_or_else(|| ClientError::Invalid("no project token: pass --token or set CACHE_TOKEN".into()))?;
    let token = BearerToken::new(token)?;
    let url = cli.coordinator.clone();
    let mut client = WorkerClient::with_interceptor(connect(&url).await?, token);
    match cli.command {
        Command::Credentials { format: CredentialsFormat::Env } => {
            let request = pb::GetCredentialsRequest { access: pb::Access::Read as i32 };
            let response =
                client.get_credentials(request).await.map_err(|status| ClientError::from_status(&url, &status))?;
            let credentials = response.into_inner().credentials.unwrap_or_default();
            print!("{}", worker::credentials::format_env(&credentials));
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cache-worker: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
