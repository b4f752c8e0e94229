//! `cachectl`: the operator's CLI over the coordinator's admin API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proto::client::{BearerToken, ClientError, connect};
use proto::format::format_bytes;
use proto::names::{self, printable};
use proto::v1 as pb;
use proto::v1::admin_client::AdminClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// cachectl: manage the layer cache's projects and caches.
#[derive(Debug, Parser)]
#[command(name = "cachectl", version)]
struct Cli {
    /// URL of the coordinator's gRPC API
    #[arg(long, env = "CACHE_COORDINATOR", default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// The admin token [default: the contents of --admin-token-file]
    #[arg(long, env = "CACHE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// File holding the admin token, read when --admin-token is not given
    #[arg(long, env = "CACHE_ADMIN_TOKEN_FILE", default_value = "./cache-data/admin-token")]
    admin_token_file: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage projects.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// List projects, or the caches of one project.
    Ls { project: Option<String> },
    /// Show one cache: images, tags, layers and sizes.
    Show {
        project: String,
        service: String,
        /// The branch of the cache key
        #[arg(long, default_value = "")]
        branch: String,
    },
    /// Remove a project's manifests and stored blobs; the project and its token stay.
    Flush { project: String },
    /// Restore and save counters per project and service.
    Stats { project: Option<String> },
    /// Remove blobs no cache names (unreferenced for longer than the coordinator's --gc-grace,
    /// named by no save in progress) from every project, or one.
    Gc {
        project: Option<String>,
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Manage a project's tokens scoped to branches.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print storage credentials for a project's cache as `export` lines for a POSIX shell.
    Credentials {
        project: String,
        /// Write access (put and multipart, never delete) instead of read-only
        #[arg(long)]
        write: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Create a project; its token is printed as the last line of stdout, once.
    Create {
        name: String,
        /// Quota of the project's store, e.g. 512MiB, 10GiB (0: none) [default: the coordinator's --default-quota]
        #[arg(long, alias = "quota-bytes", value_name = "SIZE", value_parser = proto::format::parse_size_bytes)]
        quota: Option<u64>,
    },
    /// Set a project's quota, e.g. 512MiB, 10GiB (0: none); a project over its new quota has
    /// its least recently used caches evicted at once.
    SetQuota {
        name: String,
        #[arg(value_name = "SIZE", value_parser = proto::format::parse_size_bytes)]
        quota: u64,
    },
    /// Replace the project token; the new one is printed as the last line of stdout, once. The
    /// old one, and the storage keys issued to it, stop working at once.
    RotateToken { name: String },
    /// Delete a project: its caches, stored blobs, tokens, keys and counters.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token that may read and write only some branches; it is printed as the last
    /// line of stdout, once. A pattern is a branch name with `*` for any run of characters;
    /// `*` or '' (empty) matches the default branch. A branch it may write it may also read.
    Create {
        project: String,
        /// Branches whose caches it may save (and read); repeatable
        #[arg(long = "write-branch", value_name = "PATTERN")]
        write_branches: Vec<String>,
        /// Branches whose caches it may restore; repeatable
        #[arg(long = "read-branch", value_name = "PATTERN")]
        read_branches: Vec<String>,
        /// How long it works: e.g. 90m, 12h, 30d (0: until revoked)
        #[arg(long, default_value = "0", value_parser = proto::format::parse_duration_seconds)]
        expires: u64,
    },
    /// List a project's scoped tokens (never their secrets).
    Ls { project: String },
    /// Revoke a scoped token and the storage keys issued to it.
    Revoke { project: String, token_id: String },
}

fn print_tokens(tokens: &[pb::ScopedToken]) {
    let patterns = |patterns: &[String]| {
        if patterns.is_empty() {
            return "-".to_owned();
        }
        patterns.iter().map(|p| if p.is_empty() { "''".to_owned() } else { p.clone() }).collect::<Vec<_>>().join(",")
    };
    println!("{:<22} {:<24} {:<24} {:<25}  EXPIRES", "TOKEN", "WRITE", "READ", "CREATED");
    for token in tokens {
        println!(
            "{:<22} {:<24} {:<24} {:<25}  {}",
            token.id,
            patterns(&token.write_branches),
            patterns(&token.read_branches),
            format_time(token.created_unix),
            if token.expires_unix == 0 { "never".to_owned() } else { format_time(token.expires_unix) }
        );
    }
}

type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;

fn format_time(unix: i64) -> String {
    if unix == 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn admin_token(cli: &Cli) -> Result<String, ClientError> {
    if let Some(token) = &cli.admin_token {
        return Ok(token.clone());
    }
    std::fs::read_to_string(&cli.admin_token_file).map(|contents| contents.trim().to_owned()).map_err(|error| {
        ClientError::Invalid(format!(
            "no admin token: pass --admin-token, set CACHE_ADMIN_TOKEN, or point --admin-token-file at the coordinator's \
             data directory ({}: {error})",
            cli.admin_token_file.display()
        ))
    })
}

fn validate(result: Result<(), names::InvalidName>) -> Result<(), ClientError> {
    result.map_err(|error| ClientError::Invalid(error.to_string()))
}

fn print_projects(projects: &[pb::Project]) {
    // Columns only ever added at the end: scripts read them by position.
    println!(
        "{:<32} {:>7} {:>7} {:>12} {:>4}  {:<25}  QUOTA",
        "PROJECT", "CACHES", "BLOBS", "STORED", "GEN", "CREATED"
    );
    for project in projects {
        println!(
            "{:<32} {:>7} {:>7} {:>12} {:>4}  {:<25}  {}",
            project.name,
            project.cache_count,
            project.blob_count,
            format_bytes(project.stored_bytes),
            project.generation,
            format_time(project.created_unix),
            format_quota(project.quota_bytes)
        );
    }
}

fn format_quota(quota_bytes: u64) -> String {
    if quota_bytes == 0 { "none".to_owned() } else { format_bytes(quota_bytes) }
}

/// `web, api (branch dev)`.
fn cache_names(keys: &[pb::CacheKey]) -> String {
    let name = |key: &pb::CacheKey| {
        if key.branch.is_empty() { key.service.clone() } else { format!("{} (branch {})", key.service, key.branch) }
    };
    keys.iter().map(name).collect::<Vec<_>>().join(", ")
}

fn print_evicted(project: &str, evicted: &pb::Evicted) {
    if !evicted.caches.is_empty() || evicted.blobs > 0 {
        println!(
            "project {project}: evicted {} cache{} ({}) and removed {} blobs ({}) to fit its quota",
            evicted.caches.len(),
            if evicted.caches.len() == 1 { "" } else { "s" },
            if evicted.caches.is_empty() { "none".to_owned() } else { cache_names(&evicted.caches) },
            evicted.blobs,
            format_bytes(evicted.bytes)
        );
    }
}

fn print_caches(response: &pb::ListCachesResponse) {
    let project = response.project.clone().unwrap_or_default();
    let quota = match project.quota_bytes {
        0 => "no quota".to_owned(),
        quota => format!(
            "{:.0}% of its quota of {}",
            project.stored_bytes as f64 * 100.0 / quota as f64,
            format_bytes(quota)
        ),
    };
    println!(
        "project {}: caches name {} in {} blobs, {quota}; the store holds {} in {} objects (uploads no save committed included)",
        project.name,
        format_bytes(project.stored_bytes),
        project.blob_count,
        format_bytes(project.usage_bytes),
        project.usage_objects
    );
    println!(
        "{:<32} {:<20} {:>6} {:>6} {:>12}  {:<25}  {:<25}  STORED",
        "SERVICE", "BRANCH", "IMAGES", "LAYERS", "SIZE", "CREATED", "LAST USED"
    );
    for cache in &response.caches {
        let key = cache.key.clone().unwrap_or_default();
        println!(
            "{:<32} {:<20} {:>6} {:>6} {:>12}  {:<25}  {:<25}  {}",
            key.service,
            if key.branch.is_empty() { "-" } else { &key.branch },
            cache.image_count,
            cache.layer_count,
            format_bytes(cache.total_bytes),
            format_time(cache.created_unix),
            format_time(cache.last_used_unix),
            format_bytes(cache.stored_bytes)
        );
    }
}

fn print_manifest(project: &str, manifest: &pb::Manifest) {
    let key = manifest.key.clone().unwrap_or_default();
    println!(
        "project {project}, service {}{}",
        key.service,
        if key.branch.is_empty() { String::new() } else { format!(", branch {}", key.branch) }
    );
    println!(
        "engine {}, saved {}, last used {}",
        printable(&manifest.engine_version),
        format_time(manifest.created_unix),
        format_time(manifest.last_used_unix)
    );
    if let Some(origin) = manifest.origin.as_ref().filter(|origin| !origin.save_id.is_empty()) {
        let host = if origin.host.is_empty() { "an unnamed host".into() } else { printable(&origin.host) };
        let save_id = origin.save_id.get(..12).unwrap_or(&origin.save_id);
        println!("saved from {host} by save {}", printable(save_id));
    }
    for image in &manifest.images {
        let tags = if image.repo_tags.is_empty() { "<no tag>".to_owned() } else { image.repo_tags.join(", ") };
        let tags = printable(&tags);
        let builder = match image.builder() {
            pb::Builder::Classic => "classic builder",
            pb::Builder::Buildkit => "BuildKit",
            pb::Builder::Other => "imported",
            pb::Builder::Unspecified => "unknown builder",
        };
        println!("image {} ({tags}; {builder}{})", image.id, if image.inline_cache { ", inline cache" } else { "" });
        if !image.parent_id.is_empty() {
            println!("  parent {}", image.parent_id);
        }
        for layer in &image.layers {
            let encoding = if layer.encoding.is_empty() {
                String::new()
            } else {
                format!(", stored {} as {}", format_bytes(layer.stored_size), layer.encoding)
            };
            println!("  layer {} {}{encoding}", layer.digest, format_bytes(layer.size));
        }
    }
    for line in &manifest.save_log {
        println!("log: {}", printable(line));
    }
}

/// `2 of 5 (40%)`: the build steps of the saved images the builds reused; `-` before any.
fn steps_reused(reused: u64, rebuilt: u64) -> String {
    // In u128: saturated counters still add up.
    let (reused, steps) = (u128::from(reused), u128::from(reused) + u128::from(rebuilt));
    if steps == 0 {
        return "-".into();
    }
    format!("{reused} of {steps} ({}%)", reused * 100 / steps)
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    validate_names(&cli.command)?;
    let token = BearerToken::new(&admin_token(&cli)?)?;
    let url = cli.coordinator.clone();
    let mut admin: Admin = AdminClient::with_interceptor(connect(&url).await?, token);
    let failed = |status: tonic::Status| ClientError::from_status(&url, &status);

    match cli.command {
        Command::Project(command) => project_command(&mut admin, &url, command).await?,
        Command::Token(command) => token_command(&mut admin, &url, command).await?,
        Command::Gc { project, dry_run } => {
            let request = pb::CollectGarbageRequest { project: project.unwrap_or_default(), dry_run };
            print_collected(admin.collect_garbage(request).await.map_err(failed)?.into_inner());
        }
        Command::Ls { project: None } => {
            let response = admin.list_projects(pb::ListProjectsRequest {}).await.map_err(failed)?.into_inner();
            print_projects(&response.projects);
        }
        Command::Ls { project: Some(project) } => {
            let response = admin.list_caches(pb::ListCachesRequest { project }).await.map_err(failed)?.into_inner();
            print_caches(&response);
        }
        Command::Show { project, service, branch } => {
            let request =
                pb::ShowCacheRequest { project: project.clone(), key: Some(pb::CacheKey { service, branch }) };
            let response = admin.show_cache(request).await.map_err(failed)?.into_inner();
            print_manifest(&project, &response.manifest.unwrap_or_default());
        }
        Command::Flush { project } => {
            let response = admin
                .flush_project(pb::FlushProjectRequest { project: project.clone() })
                .await
                .map_err(failed)?
                .into_inner();
            println!(
                "flushed project {project}: {} manifests and {} objects ({}) removed",
                response.manifests_removed,
                response.objects_removed,
                format_bytes(response.bytes_removed)
            );
        }
        Command::Credentials { project, write } => {
            let access = if write { pb::Access::Write } else { pb::Access::Read };
            let request = pb::IssueCredentialsRequest { project, access: access as i32 };
            let response = admin.issue_credentials(request).await.map_err(failed)?.into_inner();
            print!("{}", proto::credentials::format_env(&response.credentials.unwrap_or_default()));
        }
        Command::Stats { project } => {
            let request = pb::StatsRequest { project: project.unwrap_or_default() };
            print_stats(admin.stats(request).await.map_err(failed)?.into_inner());
        }
    }
    Ok(())
}

/// Checks every name the command carries before anything is sent: one clear line, exit 64.
fn validate_names(command: &Command) -> Result<(), ClientError> {
    match command {
        Command::Project(
            ProjectCommand::Create { name, .. }
            | ProjectCommand::SetQuota { name, .. }
            | ProjectCommand::RotateToken { name }
            | ProjectCommand::Delete { name },
        )
        | Command::Token(
            TokenCommand::Create { project: name, .. }
            | TokenCommand::Ls { project: name }
            | TokenCommand::Revoke { project: name, .. },
        ) => validate(names::validate_project_name(name))?,
        Command::Ls { project: Some(project) }
        | Command::Flush { project }
        | Command::Credentials { project, .. }
        | Command::Stats { project: Some(project) } => validate(names::validate_project_name(project))?,
        Command::Show { project, service, branch } => {
            validate(names::validate_project_name(project))?;
            validate(names::validate_service_name(service))?;
            validate(names::validate_branch_name(branch))?;
        }
        Command::Gc { project: Some(project), .. } => validate(names::validate_project_name(project))?,
        Command::Ls { project: None } | Command::Stats { project: None } | Command::Gc { project: None, .. } => {}
    }
    Ok(())
}

/// `cachectl project …`.
async fn project_command(admin: &mut Admin, url: &str, command: ProjectCommand) -> Result<(), ClientError> {
    let failed = |status: tonic::Status| ClientError::from_status(url, &status);
    match command {
        ProjectCommand::Create { name, quota } => {
            let response = admin
                .create_project(pb::CreateProjectRequest { name, quota_bytes: quota })
                .await
                .map_err(failed)?
                .into_inner();
            let project = response.project.unwrap_or_default();
            println!("created project {}; its token (shown once) follows:", project.name);
            println!("{}", response.token);
        }
        ProjectCommand::SetQuota { name, quota } => {
            let request = pb::SetQuotaRequest { project: name.clone(), quota_bytes: quota };
            let response = admin.set_quota(request).await.map_err(failed)?.into_inner();
            let project = response.project.unwrap_or_default();
            println!(
                "project {name}: quota {}, the caches name {}",
                format_quota(project.quota_bytes),
                format_bytes(project.stored_bytes)
            );
            print_evicted(&name, &response.evicted.unwrap_or_default());
        }
        ProjectCommand::RotateToken { name } => {
            let request = pb::RotateProjectTokenRequest { project: name.clone() };
            let response = admin.rotate_project_token(request).await.map_err(failed)?.into_inner();
            println!(
                "rotated the token of project {name}; the old one no longer works; the new one (shown once) follows:"
            );
            println!("{}", response.token);
        }
        ProjectCommand::Delete { name } => {
            let request = pb::DeleteProjectRequest { project: name.clone() };
            let response = admin.delete_project(request).await.map_err(failed)?.into_inner();
            println!(
                "deleted project {name}: {} manifests and {} objects ({}) removed, its tokens revoked",
                response.manifests_removed,
                response.objects_removed,
                format_bytes(response.bytes_removed)
            );
        }
    }
    Ok(())
}

/// `cachectl token …`.
async fn token_command(admin: &mut Admin, url: &str, command: TokenCommand) -> Result<(), ClientError> {
    let failed = |status: tonic::Status| ClientError::from_status(url, &status);
    match command {
        TokenCommand::Create { project, write_branches, read_branches, expires } => {
            let request = pb::CreateTokenRequest {
                project: project.clone(),
                read_branches,
                write_branches,
                expires_seconds: expires,
            };
            let response = admin.create_token(request).await.map_err(failed)?.into_inner();
            let token = response.token.unwrap_or_default();
            println!("created token {} of project {project}; the token (shown once) follows:", token.id);
            println!("{}", response.secret);
        }
        TokenCommand::Ls { project } => {
            let response = admin.list_tokens(pb::ListTokensRequest { project }).await.map_err(failed)?.into_inner();
            print_tokens(&response.tokens);
        }
        TokenCommand::Revoke { project, token_id } => {
            let request = pb::RevokeTokenRequest { project: project.clone(), token_id: token_id.clone() };
            admin.revoke_token(request).await.map_err(failed)?;
            println!("revoked token {token_id} of project {project} and its storage keys");
        }
    }
    Ok(())
}

/// What `cachectl gc` removed (or would), a line a project.
fn print_collected(response: pb::CollectGarbageResponse) {
    for collected in response.projects {
        let verb = if collected.dry_run { "would remove" } else { "removed" };
        let expired = match collected.expired.len() {
            0 => String::new(),
            n => format!(
                ", {} {n} expired cache{} ({})",
                if collected.dry_run { "would evict" } else { "evicted" },
                if n == 1 { "" } else { "s" },
                cache_names(&collected.expired)
            ),
        };
        println!(
            "gc {}: {verb} {} blobs ({}){expired}",
            collected.project,
            collected.blobs,
            format_bytes(collected.bytes)
        );
    }
}

/// `cachectl stats`: a row a service.
fn print_stats(response: pb::StatsResponse) {
    // Columns are only ever added at the end: scripts read them by position.
    println!(
        "{:<24} {:<24} {:>5} {:>5} {:>5} {:>5} {:>6} {:>12} {:>12} {:>18}",
        "PROJECT", "SERVICE", "HIT", "PART", "MISS", "ERR", "SAVES", "FOUND", "MOVED", "STEPS REUSED"
    );
    for s in response.services {
        println!(
            "{:<24} {:<24} {:>5} {:>5} {:>5} {:>5} {:>6} {:>12} {:>12} {:>18}",
            s.project,
            s.service,
            s.restores_hit,
            s.restores_partial,
            s.restores_miss,
            s.restores_error,
            s.saves,
            format_bytes(s.bytes_found),
            format_bytes(s.bytes_transferred),
            steps_reused(s.steps_reused, s.steps_rebuilt)
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cachectl: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_counts_at_their_largest_still_print() {
        assert_eq!(steps_reused(0, 0), "-");
        assert_eq!(steps_reused(2, 3), "2 of 5 (40%)");
        assert_eq!(steps_reused(u64::MAX, u64::MAX), format!("{} of {} (50%)", u64::MAX, u128::from(u64::MAX) * 2));
    }
}
