//! The coordinator's configuration: command-line flags (each also read from an environment
//! variable), an optional TOML file, and the one pure function that merges them into a
//! validated [`Config`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

/// cache-coordinator: projects, manifests and scoped storage credentials for the layer cache.
#[derive(Debug, Parser)]
#[command(name = "cache-coordinator", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API, the embedded S3 endpoint and the metrics listener.
    Serve(ServeArgs),
}

#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// Directory for the database, stored objects and generated keys [default: ./cache-data]
    #[arg(long, env = "CACHE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the gRPC API [default: 127.0.0.1:7400]
    #[arg(long, env = "CACHE_LISTEN")]
    pub listen: Option<String>,
    /// Address of the embedded S3 endpoint [default: 127.0.0.1:7401]
    #[arg(long, env = "CACHE_S3_LISTEN")]
    pub s3_listen: Option<String>,
    /// URL at which build hosts reach the embedded S3 endpoint [default: http://<s3-listen>]
    #[arg(long, env = "CACHE_S3_PUBLIC_URL")]
    pub s3_public_url: Option<String>,
    /// Address of the metrics and health listener [default: 127.0.0.1:9400]
    #[arg(long, env = "CACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Lifetime of the storage credentials handed to workers, in seconds [default: 900]
    #[arg(long, env = "CACHE_CREDENTIAL_TTL")]
    pub credential_ttl: Option<u64>,
    /// How long a save's claim on the blobs it uploads outlives its worker's last sign of life, in seconds (3 to 600); others wait for a claimed blob rather than upload it again [default: 15]
    #[arg(long, env = "CACHE_CLAIM_TTL")]
    pub claim_ttl: Option<u64>,
    /// How often unreferenced blobs are collected, e.g. 10m, 1h (0: never in the background; `cachectl gc` still works) [default: 1h]
    #[arg(long, env = "CACHE_GC_INTERVAL")]
    pub gc_interval: Option<String>,
    /// How long a blob stays after no cache names it any more, e.g. 0s, 90s, 1h [default: 1h]
    #[arg(long, env = "CACHE_GC_GRACE")]
    pub gc_grace: Option<String>,
    /// Caches neither restored nor saved for this long are evicted, e.g. 7d, 12h (0: never) [default: 7d]
    #[arg(long, env = "CACHE_CACHE_EXPIRY")]
    pub cache_expiry: Option<String>,
    /// The byte quota of projects created without --quota, e.g. 512MiB, 10GiB (0: none) [default: 0]
    #[arg(long, env = "CACHE_DEFAULT_QUOTA")]
    pub default_quota: Option<String>,
    /// Smallest part of multipart uploads and ranged downloads, in MiB (8 to 5120); bigger blobs get bigger parts [default: 8]
    #[arg(long, env = "CACHE_PART_SIZE_MIB")]
    pub part_size_mib: Option<u64>,
    /// Blobs this big or bigger are uploaded in parts, in MiB (8 to 5120) [default: 5120 on the embedded store, else the part size]
    #[arg(long, env = "CACHE_MULTIPART_THRESHOLD_MIB")]
    pub multipart_threshold_mib: Option<u64>,
    /// Requests one worker may have in flight at once (1 to 64) [default: 8]
    #[arg(long, env = "CACHE_WORKER_CONCURRENCY")]
    pub worker_concurrency: Option<u32>,
    /// Requests all workers together may have in flight, shared fairly between projects [default: 256]
    #[arg(long, env = "CACHE_TRANSFER_BUDGET")]
    pub transfer_budget: Option<u32>,
    /// Where blobs live: the embedded S3 endpoint, or an S3 (or S3-compatible) bucket [default: embedded]
    #[arg(long, env = "CACHE_STORE", value_enum)]
    pub store: Option<StoreKind>,
    /// Where projects, manifests and the ledger live: `sled` (the data directory, one machine) or a PostgreSQL URL that replicas share, postgres://USER[:PASSWORD]@HOST:PORT/DATABASE (needs --store s3) [default: sled]
    #[arg(long, env = "CACHE_STATE", hide_env_values = true)]
    pub state: Option<String>,
    /// Bucket of the S3 store (--store s3)
    #[arg(long, env = "CACHE_STORE_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Key prefix in the bucket; a project's blobs live under PREFIX/PROJECT/ [default: cache]
    #[arg(long, env = "CACHE_STORE_PREFIX")]
    pub s3_prefix: Option<String>,
    /// Endpoint URL of an S3-compatible store (MinIO, Ceph RGW, R2) [default: AWS]
    #[arg(long, env = "CACHE_STORE_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Region of the S3 store [default: us-east-1]
    #[arg(long, env = "CACHE_STORE_REGION")]
    pub s3_region: Option<String>,
    /// Address buckets by path (BUCKET in the URL path), as most S3-compatible stores need
    #[arg(long, env = "CACHE_STORE_PATH_STYLE")]
    pub s3_path_style: bool,
    /// When clients add checksums to uploads [default: when-supported]
    #[arg(long, env = "CACHE_STORE_CHECKSUMS", value_enum)]
    pub s3_checksums: Option<ChecksumMode>,
    /// Role that workers' session credentials are assumed from (--store s3)
    #[arg(long, env = "CACHE_STS_ROLE_ARN")]
    pub sts_role_arn: Option<String>,
    /// Endpoint URL of STS [default: AWS]
    #[arg(long, env = "CACHE_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,
    /// A connection to the S3 endpoint or the metrics listener with no request in flight for this long is closed, whatever else it sends (pings, settings), e.g. 30s, 2m (1s to 1h) [default: 30s]
    #[arg(long, env = "CACHE_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// The same for gRPC connections: workers keep theirs between calls (1s to 1h) [default: 5m]
    #[arg(long, env = "CACHE_GRPC_IDLE_TIMEOUT")]
    pub grpc_idle_timeout: Option<String>,
    /// TOML file with the same settings; flags and environment variables win over it
    #[arg(long, env = "CACHE_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The coordinator's own S3 endpoint, objects under the data directory
    Embedded,
    /// An S3 or S3-compatible bucket, with credentials from STS AssumeRole
    S3,
}

/// When S3 clients add checksums to uploads. aws-sdk-s3's default adds CRC32 to every upload,
/// which some S3-compatible stores reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumMode {
    WhenSupported,
    WhenRequired,
}

impl ChecksumMode {
    /// The name the API carries to workers.
    pub fn api_name(self) -> &'static str {
        match self {
            ChecksumMode::WhenSupported => "when_supported",
            ChecksumMode::WhenRequired => "when_required",
        }
    }
}

/// The TOML file: the same settings as the flags, plus the embedded store's layout.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub s3_listen: Option<String>,
    pub s3_public_url: Option<String>,
    pub metrics_listen: Option<String>,
    pub credential_ttl: Option<u64>,
    pub claim_ttl: Option<u64>,
    pub gc_interval: Option<String>,
    pub gc_grace: Option<String>,
    pub cache_expiry: Option<String>,
    pub default_quota: Option<String>,
    pub part_size_mib: Option<u64>,
    pub multipart_threshold_mib: Option<u64>,
    pub worker_concurrency: Option<u32>,
    pub transfer_budget: Option<u32>,
    pub idle_timeout: Option<String>,
    pub grpc_idle_timeout: Option<String>,
    pub store: Option<StoreKind>,
    pub state: Option<String>,
    #[serde(default)]
    pub embedded: EmbeddedFileConfig,
    #[serde(default)]
    pub s3: S3FileConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3FileConfig {
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub checksums: Option<ChecksumMode>,
    pub sts_role_arn: Option<String>,
    pub sts_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedFileConfig {
    pub bucket: Option<String>,
    pub prefix: Option<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub s3_listen: SocketAddr,
    /// `None`: derived from the bound S3 address (which may use port 0 in tests).
    pub s3_public_url: Option<String>,
    pub metrics_listen: SocketAddr,
    pub credential_ttl: Duration,
    /// How long a save's claims outlive its worker's last sign of life.
    pub claim_ttl: Duration,
    /// How often the background garbage collection runs; zero: never.
    pub gc_interval: Duration,
    /// How long an unreferenced blob stays before a collection removes it.
    pub gc_grace: Duration,
    /// Caches unused this long are evicted by the collection; zero: never.
    pub cache_expiry: Duration,
    /// The quota of a project created without one, in bytes; zero: none.
    pub default_quota: u64,
    /// How long an S3 or metrics connection, and a gRPC one, may have no request in flight.
    pub idle_timeout: Duration,
    pub grpc_idle_timeout: Duration,
    /// Part size and concurrency of the transfer plans.
    pub plan: crate::budget::PlanSettings,
    /// The store's bucket and key prefix, and its region (both stores).
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    /// Set with `--store s3`.
    pub s3: Option<S3Settings>,
    /// The PostgreSQL URL of `--state`; `None`: sled in the data directory.
    pub state: Option<StateUrl>,
}

/// A PostgreSQL URL, which may carry a password: its `Debug` shows neither.
#[derive(Clone)]
pub struct StateUrl(pub String);

impl std::fmt::Debug for StateUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateUrl(postgres://…)")
    }
}

/// `--state`: `None` for sled, the URL for PostgreSQL, which replicas share and which needs a
/// store they share too.
fn parse_state(state: Option<String>, store: StoreKind) -> Result<Option<StateUrl>, ConfigError> {
    match state.as_deref() {
        None | Some("sled") => Ok(None),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            if store == StoreKind::Embedded {
                return Err(ConfigError(
                    "--state postgres://… needs --store s3: the embedded S3 endpoint keeps its objects on this \
                     machine's disk, which replicas cannot share"
                        .into(),
                ));
            }
            url.parse::<tokio_postgres::Config>().map_err(|error| {
                ConfigError(format!("invalid --state URL: {error}; expected postgres://USER@HOST:PORT/DATABASE"))
            })?;
            Ok(Some(StateUrl(url.to_owned())))
        }
        Some(other) => Err(ConfigError(format!(
            "invalid --state {:?}: expected sled or postgres://USER@HOST:PORT/DATABASE",
            other.split('@').next_back().unwrap_or_default()
        ))),
    }
}

/// How to reach an S3 store and hand out its credentials.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub path_style: bool,
    pub checksums: ChecksumMode,
    pub sts_role_arn: String,
    pub sts_endpoint: Option<String>,
}

/// A configuration problem, reported on one line; `main` exits with 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn validate_url(flag: &str, url: &str) -> Result<String, ConfigError> {
    let ok = (url.starts_with("http://") || url.starts_with("https://"))
        && url.len() > 10
        && !url.contains(char::is_whitespace);
    if ok {
        Ok(url.trim_end_matches('/').to_owned())
    } else {
        Err(ConfigError(format!("invalid {flag} {url:?}: expected http://HOST:PORT or https://HOST")))
    }
}

/// An IAM role ARN: `arn:PARTITION:iam::ACCOUNT:role/NAME`.
fn validate_role_arn(arn: &str) -> Result<(), ConfigError> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5].strip_prefix("role/").is_some_and(|name| !name.is_empty());
    if ok {
        Ok(())
    } else {
        Err(ConfigError(format!("invalid --sts-role-arn {arn:?}: expected arn:aws:iam::ACCOUNT:role/NAME")))
    }
}

fn parse_address(flag: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    let invalid =
        || ConfigError(format!("invalid {flag} address {value:?}: expected HOST:PORT such as 127.0.0.1:7400"));
    value.to_socket_addrs().map_err(|_| invalid())?.next().ok_or_else(invalid)
}

/// Bucket names as S3 allows them (3 to 63 of `a-z0-9.-`).
fn validate_bucket(bucket: &str) -> Result<(), ConfigError> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ConfigError(format!("invalid bucket name {bucket:?}: use 3 to 63 characters of a-z, 0-9, '.' or '-'")))
    }
}

/// A key prefix of safe segments without slashes at either end (may be empty).
fn validate_prefix(prefix: &str) -> Result<(), ConfigError> {
    // The same segments the endpoint accepts in object keys.
    let ok = prefix.is_empty() || crate::scope::is_safe_key_path(prefix, false);
    if ok {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "invalid key prefix {prefix:?}: use segments of A-Z, a-z, 0-9, '.', '_' or '-' joined by '/'"
        )))
    }
}

/// Reads the TOML file named by `--config`.
pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| ConfigError(format!("cannot read config file {}: {error}", path.display())))?;
    toml::from_str(&text).map_err(|error| {
        let message = error.message().to_owned();
        ConfigError(format!("invalid config file {}: {message}", path.display()))
    })
}

/// Merges flags (which win) over the file, applies defaults and validates everything.
pub fn merge(args: ServeArgs, file: FileConfig) -> Result<Config, ConfigError> {
    let listen = args.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:7400".into());
    let s3_listen = args.s3_listen.or(file.s3_listen).unwrap_or_else(|| "127.0.0.1:7401".into());
    let metrics_listen = args.metrics_listen.or(file.metrics_listen).unwrap_or_else(|| "127.0.0.1:9400".into());
    let s3_listen = parse_address("--s3-listen", &s3_listen)?;
    let s3_public_url = args.s3_public_url.or(file.s3_public_url);
    match &s3_public_url {
        Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 => {
            return Err(ConfigError(format!(
                "invalid --s3-public-url {url:?}: expected http://HOST:PORT or https://HOST"
            )));
        }
        None if s3_listen.ip().is_unspecified() => {
            return Err(ConfigError(format!(
                "--s3-listen {s3_listen} listens on every interface: give --s3-public-url, the URL build hosts reach it at"
            )));
        }
        _ => {}
    }
    let claim_ttl = args.claim_ttl.or(file.claim_ttl).unwrap_or(15);
    if !(3..=600).contains(&claim_ttl) {
        return Err(ConfigError(format!("invalid --claim-ttl {claim_ttl}: expected 3 to 600 seconds")));
    }
    let duration = |flag: &str, value: Option<String>, default: &str| {
        let value = value.unwrap_or_else(|| default.to_owned());
        proto::format::parse_duration_seconds(&value)
            .map(Duration::from_secs)
            .map_err(|error| ConfigError(format!("{flag}: {error}")))
    };
    let gc_interval = duration("--gc-interval", args.gc_interval.or(file.gc_interval), "1h")?;
    let gc_grace = duration("--gc-grace", args.gc_grace.or(file.gc_grace), "1h")?;
    let cache_expiry = duration("--cache-expiry", args.cache_expiry.or(file.cache_expiry), "7d")?;
    let idle = |flag: &str, value: Option<String>, default: &str| {
        let timeout = duration(flag, value, default)?;
        if !(1..=3600).contains(&timeout.as_secs()) {
            return Err(ConfigError(format!("invalid {flag} {} s: expected 1s to 1h", timeout.as_secs())));
        }
        Ok(timeout)
    };
    let idle_timeout = idle("--idle-timeout", args.idle_timeout.or(file.idle_timeout), "30s")?;
    let grpc_idle_timeout = idle("--grpc-idle-timeout", args.grpc_idle_timeout.or(file.grpc_idle_timeout), "5m")?;
    let default_quota = args.default_quota.or(file.default_quota).unwrap_or_else(|| "0".into());
    let default_quota = proto::format::parse_size_bytes(&default_quota)
        .map_err(|error| ConfigError(format!("--default-quota: {error}")))?;
    let credential_ttl = args.credential_ttl.or(file.credential_ttl).unwrap_or(900);
    if !(1..=43_200).contains(&credential_ttl) {
        return Err(ConfigError(format!("invalid --credential-ttl {credential_ttl}: expected 1 to 43200 seconds")));
    }
    let part_size_mib = args.part_size_mib.or(file.part_size_mib).unwrap_or(8);
    let part_sizes_mib = proto::parts::MIN_PART_SIZE >> 20..=proto::parts::MAX_PART_SIZE >> 20;
    if !part_sizes_mib.contains(&part_size_mib) {
        return Err(ConfigError(format!(
            "invalid --part-size-mib {part_size_mib}: expected {} to {} MiB",
            part_sizes_mib.start(),
            part_sizes_mib.end()
        )));
    }
    let store = args.store.or(file.store).unwrap_or(StoreKind::Embedded);
    let state = parse_state(args.state.or(file.state), store)?;
    // The embedded endpoint (s3s-fs) completes a multipart upload by reading, hashing and
    // copying every part once more: there one PUT per blob does half the work.
    let default_threshold_mib = if store == StoreKind::Embedded { *part_sizes_mib.end() } else { part_size_mib };
    let multipart_threshold_mib =
        args.multipart_threshold_mib.or(file.multipart_threshold_mib).unwrap_or(default_threshold_mib);
    if !part_sizes_mib.contains(&multipart_threshold_mib) {
        return Err(ConfigError(format!(
            "invalid --multipart-threshold-mib {multipart_threshold_mib}: expected {} to {} MiB",
            part_sizes_mib.start(),
            part_sizes_mib.end()
        )));
    }
    let worker_concurrency = args.worker_concurrency.or(file.worker_concurrency).unwrap_or(8);
    if !(1..=64).contains(&worker_concurrency) {
        return Err(ConfigError(format!("invalid --worker-concurrency {worker_concurrency}: expected 1 to 64")));
    }
    let transfer_budget = args.transfer_budget.or(file.transfer_budget).unwrap_or(256);
    if !(1..=100_000).contains(&transfer_budget) {
        return Err(ConfigError(format!("invalid --transfer-budget {transfer_budget}: expected 1 to 100000")));
    }
    let plan = crate::budget::PlanSettings {
        part_size: part_size_mib << 20,
        multipart_threshold: multipart_threshold_mib << 20,
        worker_concurrency,
        transfer_budget,
    };
    let (bucket, prefix, region, s3) = match store {
        StoreKind::Embedded => (
            file.embedded.bucket.unwrap_or_else(|| "layer-cache".into()),
            file.embedded.prefix.unwrap_or_else(|| "cache".into()),
            "us-east-1".to_owned(),
            None,
        ),
        StoreKind::S3 => {
            let bucket = args
                .s3_bucket
                .or(file.s3.bucket)
                .ok_or_else(|| ConfigError("--store s3 needs --s3-bucket (CACHE_STORE_BUCKET)".into()))?;
            let sts_role_arn = args.sts_role_arn.or(file.s3.sts_role_arn).ok_or_else(|| {
                ConfigError(
                    "--store s3 needs --sts-role-arn (CACHE_STS_ROLE_ARN): workers get credentials from that role"
                        .into(),
                )
            })?;
            validate_role_arn(&sts_role_arn)?;
            // AWS refuses AssumeRole sessions shorter than 15 minutes.
            if credential_ttl < 900 {
                return Err(ConfigError(format!(
                    "invalid --credential-ttl {credential_ttl}: STS needs 900 to 43200 seconds"
                )));
            }
            let region = args.s3_region.or(file.s3.region).unwrap_or_else(|| "us-east-1".into());
            if region.is_empty() || !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(ConfigError(format!("invalid --s3-region {region:?}")));
            }
            let settings = S3Settings {
                endpoint: args
                    .s3_endpoint
                    .or(file.s3.endpoint)
                    .map(|url| validate_url("--s3-endpoint", &url))
                    .transpose()?,
                path_style: args.s3_path_style || file.s3.path_style.unwrap_or(false),
                checksums: args.s3_checksums.or(file.s3.checksums).unwrap_or(ChecksumMode::WhenSupported),
                sts_role_arn,
                sts_endpoint: args
                    .sts_endpoint
                    .or(file.s3.sts_endpoint)
                    .map(|url| validate_url("--sts-endpoint", &url))
                    .transpose()?,
            };
            (bucket, args.s3_prefix.or(file.s3.prefix).unwrap_or_else(|| "cache".into()), region, Some(settings))
        }
    };
    validate_bucket(&bucket)?;
    validate_prefix(&prefix)?;
    Ok(Config {
        data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("./cache-data")),
        listen: parse_address("--listen", &listen)?,
        s3_listen,
        s3_public_url: s3_public_url.map(|url| url.trim_end_matches('/').to_owned()),
        metrics_listen: parse_address("--metrics-listen", &metrics_listen)?,
        credential_ttl: Duration::from_secs(credential_ttl),
        claim_ttl: Duration::from_secs(claim_ttl),
        gc_interval,
        gc_grace,
        cache_expiry,
        idle_timeout,
        grpc_idle_timeout,
        default_quota,
        plan,
        bucket,
        prefix,
        region,
        s3,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serve_one_machine() {
        let config = merge(ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("./cache-data"));
        assert_eq!(config.listen.to_string(), "127.0.0.1:7400");
        assert_eq!(config.s3_listen.to_string(), "127.0.0.1:7401");
        assert_eq!(config.metrics_listen.to_string(), "127.0.0.1:9400");
        assert_eq!(config.credential_ttl, Duration::from_secs(900));
        assert_eq!(config.claim_ttl, Duration::from_secs(15));
        assert_eq!((config.gc_interval, config.gc_grace), (Duration::from_secs(3600), Duration::from_secs(3600)));
        assert_eq!((config.cache_expiry, config.default_quota), (Duration::from_secs(7 * 86_400), 0));
        assert_eq!((config.bucket.as_str(), config.prefix.as_str()), ("layer-cache", "cache"));
        assert_eq!(
            (config.idle_timeout, config.grpc_idle_timeout),
            (Duration::from_secs(30), Duration::from_secs(300))
        );
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig =
            toml::from_str("listen = \"127.0.0.1:1\"\nmetrics_listen = \"127.0.0.1:2\"\n[embedded]\nprefix = \"a/b\"")
                .unwrap();
        let args = ServeArgs { listen: Some("127.0.0.1:3".into()), ..ServeArgs::default() };
        let config = merge(args, file).unwrap();
        assert_eq!(config.listen.port(), 3);
        assert_eq!(config.metrics_listen.port(), 2);
        assert_eq!(config.prefix, "a/b");
    }

    #[test]
    fn bad_values_are_one_clear_line() {
        let bad = |args: ServeArgs| merge(args, FileConfig::default()).unwrap_err().to_string();
        assert_eq!(
            bad(ServeArgs { listen: Some("nowhere".into()), ..ServeArgs::default() }),
            "invalid --listen address \"nowhere\": expected HOST:PORT such as 127.0.0.1:7400"
        );
        assert!(
            bad(ServeArgs { s3_listen: Some("0.0.0.0:7401".into()), ..ServeArgs::default() })
                .contains("--s3-public-url")
        );
        assert!(bad(ServeArgs { credential_ttl: Some(0), ..ServeArgs::default() }).contains("--credential-ttl"));
        assert!(bad(ServeArgs { claim_ttl: Some(1), ..ServeArgs::default() }).contains("--claim-ttl"));
        assert!(bad(ServeArgs { gc_grace: Some("1 hour".into()), ..ServeArgs::default() }).contains("--gc-grace"));
        assert!(bad(ServeArgs { gc_interval: Some("-1m".into()), ..ServeArgs::default() }).contains("--gc-interval"));
        assert!(
            bad(ServeArgs { cache_expiry: Some("7 days".into()), ..ServeArgs::default() }).contains("--cache-expiry")
        );
        assert!(
            bad(ServeArgs { default_quota: Some("10GB".into()), ..ServeArgs::default() }).contains("--default-quota")
        );
        assert!(bad(ServeArgs { part_size_mib: Some(5), ..ServeArgs::default() }).contains("expected 8 to 5120 MiB"));
        assert!(bad(ServeArgs { part_size_mib: Some(5121), ..ServeArgs::default() }).contains("--part-size-mib"));
        assert!(
            bad(ServeArgs { worker_concurrency: Some(0), ..ServeArgs::default() }).contains("--worker-concurrency")
        );
        assert!(bad(ServeArgs { transfer_budget: Some(0), ..ServeArgs::default() }).contains("--transfer-budget"));
        assert_eq!(
            bad(ServeArgs { idle_timeout: Some("0s".into()), ..ServeArgs::default() }),
            "invalid --idle-timeout 0 s: expected 1s to 1h"
        );
        assert!(
            bad(ServeArgs { grpc_idle_timeout: Some("2h".into()), ..ServeArgs::default() }).contains("--grpc-idle")
        );
        assert!(toml::from_str::<FileConfig>("listn = \"x\"").is_err());
        assert!(validate_prefix("a/../b").is_err());
        assert!(validate_prefix("/a").is_err());
        assert!(validate_bucket("Bad_Bucket").is_err());
    }

    fn s3_args() -> ServeArgs {
        ServeArgs {
            store: Some(StoreKind::S3),
            s3_bucket: Some("platform-cache".into()),
            sts_role_arn: Some("arn:aws:iam::123456789012:role/layer-cache".into()),
            ..ServeArgs::default()
        }
    }

    #[test]
    fn the_s3_store_needs_a_bucket_and_a_role() {
        let config = merge(s3_args(), FileConfig::default()).unwrap();
        let s3 = config.s3.unwrap();
        assert_eq!(
            (config.bucket.as_str(), config.prefix.as_str(), config.region.as_str()),
            ("platform-cache", "cache", "us-east-1")
        );
        assert_eq!((s3.path_style, s3.checksums, s3.endpoint), (false, ChecksumMode::WhenSupported, None));
        let bad = |args: ServeArgs| merge(args, FileConfig::default()).unwrap_err().to_string();
        assert!(bad(ServeArgs { s3_bucket: None, ..s3_args() }).contains("needs --s3-bucket"));
        assert!(bad(ServeArgs { sts_role_arn: None, ..s3_args() }).contains("needs --sts-role-arn"));
        assert!(bad(ServeArgs { sts_role_arn: Some("role/x".into()), ..s3_args() }).contains("invalid --sts-role-arn"));
        assert!(bad(ServeArgs { credential_ttl: Some(60), ..s3_args() }).contains("STS needs 900"));
        assert!(
            bad(ServeArgs { s3_endpoint: Some("minio:9000".into()), ..s3_args() }).contains("invalid --s3-endpoint")
        );
        let file: FileConfig =
            toml::from_str("store = \"s3\"\n[s3]\nbucket = \"b-1\"\nsts_role_arn = \"arn:aws:iam::123456789012:role/r\"\npath_style = true\nchecksums = \"when-required\"").unwrap();
        let config = merge(ServeArgs::default(), file).unwrap();
        assert_eq!(config.s3.map(|s3| (s3.path_style, s3.checksums)), Some((true, ChecksumMode::WhenRequired)));
    }

    #[test]
    fn postgres_state_needs_a_shared_store_and_hides_its_password() {
        let url = "postgres://cache:s3cret@db.internal:5432/layer_cache";
        let config = merge(ServeArgs { state: Some(url.into()), ..s3_args() }, FileConfig::default()).unwrap();
        assert_eq!(config.state.as_ref().map(|state| state.0.as_str()), Some(url));
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(
            merge(ServeArgs { state: Some("sled".into()), ..s3_args() }, FileConfig::default())
                .unwrap()
                .state
                .is_none()
        );
        let bad = |args: ServeArgs| merge(args, FileConfig::default()).unwrap_err().to_string();
        let embedded = bad(ServeArgs { state: Some(url.into()), ..ServeArgs::default() });
        assert!(embedded.contains("needs --store s3") && !embedded.contains("s3cret"), "{embedded}");
        let unknown = bad(ServeArgs { state: Some("mysql://root:s3cret@db/x".into()), ..s3_args() });
        assert!(unknown.starts_with("invalid --state") && !unknown.contains("s3cret"), "{unknown}");
        let malformed = bad(ServeArgs { state: Some("postgres://a:s3cret@db:notaport/x".into()), ..s3_args() });
        assert!(malformed.starts_with("invalid --state URL") && !malformed.contains("s3cret"), "{malformed}");
    }
}
