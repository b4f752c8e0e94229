//! cache-coordinator as a library: [`open_data_dir`] takes the data directory, [`open_state`]
//! the state and [`open_store`] the object store, [`run`] serves
//! the gRPC API, the embedded S3 endpoint and the health listener until shutdown.

pub mod api;
pub mod budget;
pub mod claims;
pub mod config;
pub mod credentials;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod s3_endpoint;
pub mod scope;
pub mod service;
pub mod state;
pub mod store;
pub mod tokens;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use proto::clock::SharedClock;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::credentials::{EmbeddedBroker, EmbeddedStoreSettings, SigningKey};
use crate::error::Error;
use crate::service::CacheService;
use crate::state::Database;
use crate::store::EmbeddedStore;
use crate::tokens::AdminToken;

/// The data directory, opened for this process (and locked, by sled, when sled is the state).
pub struct DataDir {
    pub path: PathBuf,
    /// The data directory's sled database: opened only when it is the state (`--state` unset).
    pub db: Option<Database>,
    pub signing_key: Arc<SigningKey>,
    pub admin_token: AdminToken,
    /// s3s-fs's root: one folder per bucket, plus its metadata files.
    pub objects_root: PathBuf,
}

/// Creates the data directory if needed, checks it is writable, opens its sled database when
/// `with_sled` (taking the directory's lock) and loads or creates the admin token and the
/// signing key. Fails without touching stored data.
pub fn open_data_dir(
    path: &Path,
    admin_token_from_env: Option<&str>,
    bucket: &str,
    with_sled: bool,
) -> Result<DataDir, Error> {
    let data_dir_error = |reason: String| Error::DataDir { path: path.to_path_buf(), reason };
    std::fs::create_dir_all(path).map_err(|error| data_dir_error(error.to_string()))?;
    let probe = path.join(".write-probe");
    std::fs::write(&probe, b"probe")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|error| data_dir_error(format!("not writable: {error}")))?;
    let db = if with_sled { Some(Database::open(path)?) } else { None };
    let admin_token = tokens::load_or_create_admin_token(path, admin_token_from_env)?;
    let signing_key = Arc::new(SigningKey::load_or_create(path)?);
    let objects_root = path.join("objects");
    std::fs::create_dir_all(objects_root.join(bucket)).map_err(|error| data_dir_error(error.to_string()))?;
    Ok(DataDir { path: path.to_path_buf(), db, signing_key, admin_token, objects_root })
}

/// The listeners, bound before `run` so that a taken port is a start-up error and tests can
/// bind port 0. The embedded S3 endpoint listens only with the embedded store.
pub struct Listeners {
    pub grpc: TcpListener,
    pub s3: Option<TcpListener>,
    pub metrics: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        // A listen queue of 1,024 (std's is 128): connections beyond a listener's cap wait
        // there, and a burst of build hosts connecting at once is not turned away.
        let bind = |flag: &'static str, address: SocketAddr| async move {
            let socket =
                if address.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
            socket
                .and_then(|socket| {
                    socket.set_reuseaddr(true)?;
                    socket.bind(address)?;
                    socket.listen(1024)
                })
                .with_context(|| format!("cannot listen on {flag} {address}"))
        };
        Ok(Listeners {
            grpc: bind("--listen", config.listen).await?,
            s3: match config.s3 {
                None => Some(bind("--s3-listen", config.s3_listen).await?),
                Some(_) => None,
            },
            metrics: bind("--metrics-listen", config.metrics_listen).await?,
        })
    }
}

/// The HTTPS client of the AWS SDKs: rustls with ring, one stack for the whole process.
pub fn aws_http_client() -> aws_sdk_s3::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// Where blobs live and who hands out credentials for them, as the configuration chose.
pub struct Store {
    pub objects: Arc<dyn store::ObjectStore>,
    pub broker: Arc<dyn credentials::CredentialBroker>,
    /// The embedded endpoint's HTTP service; `None` with an S3 store.
    pub embedded_endpoint: Option<s3_endpoint::Gate>,
    pub metrics: Arc<metrics::Metrics>,
    /// Shared by the embedded endpoint's uploads and the flushes (see `s3_endpoint.rs`).
    pub publish_lock: s3_endpoint::PublishLock,
}

/// The state the configuration chose: the PostgreSQL database replicas share (`--state`), or
/// the data directory's sled (opened by [`open_data_dir`] with `with_sled`).
pub async fn open_state(config: &Config, data_dir: &DataDir) -> Result<Arc<dyn state::State>, Error> {
    match (&config.state, &data_dir.db) {
        (Some(url), _) => Ok(Arc::new(state::postgres::Postgres::connect(&url.0).await?)),
        (None, Some(db)) => Ok(Arc::new(db.clone())),
        (None, None) => Err(Error::DataDir {
            path: data_dir.path.clone(),
            reason: "its database was not opened (open_data_dir without sled)".into(),
        }),
    }
}

/// Sets up the store. With an S3 store it loads the coordinator's own AWS credentials (the
/// standard chain), checks the bucket and assumes the role once, so bad configuration is a
/// start-up error, not a failure at the first build. The embedded store's broker and endpoint
/// keep their key records in `state` and read their expiry by `clock`.
pub async fn open_store(
    config: &Config,
    data_dir: &DataDir,
    state: Arc<dyn state::State>,
    clock: SharedClock,
    endpoints: &Endpoints,
) -> Result<Store, Error> {
    let metrics = Arc::new(metrics::Metrics::new());
    let publish_lock = s3_endpoint::PublishLock::default();
    match &config.s3 {
        None => {
            let broker = EmbeddedBroker {
                state: state.clone(),
                clock: clock.clone(),
                signing_key: data_dir.signing_key.clone(),
                settings: EmbeddedStoreSettings {
                    endpoint_url: endpoints.s3_url.clone(),
                    region: config.region.clone(),
                    bucket: config.bucket.clone(),
                    prefix: config.prefix.clone(),
                },
                ttl: config.credential_ttl,
            };
            let endpoint = s3_endpoint::build_service(
                metrics.clone(),
                &data_dir.objects_root,
                s3_endpoint::MintedKeys { state, clock, signing_key: data_dir.signing_key.clone() },
                &config.bucket,
                &config.prefix,
                publish_lock.clone(),
            )
            .map_err(|error| Error::store_cause("starting the embedded S3 endpoint", error))?;
            Ok(Store {
                objects: Arc::new(EmbeddedStore::new(&data_dir.objects_root, &config.bucket)?),
                broker: Arc::new(broker),
                embedded_endpoint: Some(endpoint),
                metrics,
                publish_lock,
            })
        }
        Some(settings) => {
            let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .http_client(aws_http_client())
                .region(aws_config::Region::new(config.region.clone()))
                .load()
                .await;
            let objects = store::s3::S3Store::new(&sdk_config, settings, &config.bucket);
            objects.check().await?;
            let broker = credentials::StsBroker::new(
                &sdk_config,
                settings.clone(),
                &config.bucket,
                &config.prefix,
                &config.region,
                config.credential_ttl,
            );
            broker.check().await?;
            Ok(Store {
                objects: Arc::new(objects),
                broker: Arc::new(broker),
                embedded_endpoint: None,
                metrics,
                publish_lock,
            })
        }
    }
}

/// Where a started coordinator can be reached.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub grpc: SocketAddr,
    pub s3_url: String,
    pub metrics: SocketAddr,
}

impl Listeners {
    pub fn endpoints(&self, config: &Config) -> std::io::Result<Endpoints> {
        let s3_url = match (&self.s3, &config.s3) {
            (Some(listener), _) => config
                .s3_public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", listener.local_addr().expect("bound"))),
            (None, Some(settings)) => {
                settings.endpoint.clone().unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", config.region))
            }
            (None, None) => String::new(),
        };
        Ok(Endpoints { grpc: self.grpc.local_addr()?, s3_url, metrics: self.metrics.local_addr()? })
    }
}

/// How often the state is probed: the `state_up` gauge, the database's clock sampled again,
/// and the lead of the background work taken again after the database went down or restarted.
const PROBE_SECONDS: u64 = 5;

/// The longest a probe waits for the state (its own waits are bounded shorter).
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the probes of the state found.
#[derive(Debug, Default)]
struct StateHealth {
    /// The state's epoch at the last probe that reached it (see [`state::State::probe`]).
    epoch: std::sync::Mutex<Option<i64>>,
    /// Outages and restarts seen: a lead taken before one may have been dropped by the database.
    changes: std::sync::atomic::AtomicU64,
}

/// Probes the state now: the gauges brought up to date, and a change (down, back, restarted)
/// logged once.
async fn probe_state(service: &CacheService, health: &StateHealth) -> Result<(), Error> {
    use std::sync::atomic::Ordering;
    let probed = match tokio::time::timeout(PROBE_TIMEOUT, service.db.probe()).await {
        Ok(probed) => probed,
        Err(elapsed) => Err(Error::DatabaseUnavailable { what: "the state's probe", source: Box::new(elapsed) }),
    };
    let metrics = &service.metrics;
    let was_up = metrics.state_up.get() == 1;
    let changed = || {
        metrics.state_outages.inc();
        health.changes.fetch_add(1, Ordering::SeqCst);
    };
    match probed {
        Ok(epoch) => {
            let last = health.epoch.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).replace(epoch);
            if was_up && last.is_some_and(|last| last != epoch) {
                changed();
                tracing::warn!("the coordinator's database restarted since it was last asked; it answers again");
            } else if !was_up {
                tracing::info!("the coordinator's database answers again");
            }
            metrics.state_up.set(1);
            use proto::clock::Clock;
            let offset_ms = service.clock.now_unix_ms() - proto::clock::SystemClock.now_unix_ms();
            metrics.state_clock_offset.set(offset_ms as f64 / 1000.0);
            Ok(())
        }
        Err(error) => {
            if was_up {
                changed();
                tracing::warn!(error = %error.line(), "the coordinator's database is unavailable: calls fail until it is back");
            }
            metrics.state_up.set(0);
            Err(error)
        }
    }
}

/// The metrics listener: `/metrics` (Prometheus text), `/healthz` (the process runs) and
/// `/readyz` (its database answers: probed at each request).
async fn metrics_listener(path: &str, service: &CacheService, health: &StateHealth) -> http::Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            http::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            service.metrics_text().await,
        ),
        "/healthz" => (http::StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => match probe_state(service, health).await {
            Ok(()) => (http::StatusCode::OK, "text/plain", "ready\n".to_owned()),
            Err(error) => {
                (http::StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {}\n", error.line()))
            }
        },
        _ => (http::StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
    };
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

/// How long a key's record outlives its expiry, so a late request hears "expired" rather than
/// "unknown key".
const EXPIRED_KEY_GRACE_SECONDS: i64 = 3600;

/// How often every project's store usage is counted.
const USAGE_COUNT_SECONDS: u64 = 300;

/// Serves until `shutdown` resolves, reading every time it stamps or compares, its
/// background sweeps' included, from `clock`.
pub async fn run(
    config: Config,
    data_dir: DataDir,
    state: Arc<dyn state::State>,
    listeners: Listeners,
    store: Store,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let service = Arc::new(CacheService {
        db: state.clone(),
        broker: store.broker,
        store: store.objects,
        store_prefix: config.prefix.clone(),
        admin_token_sha256_hex: data_dir.admin_token.sha256_hex.clone(),
        pending_saves: crate::claims::PendingSaves::new(config.claim_ttl, state.clone()),
        budget: crate::budget::TransferBudget::new(config.plan, state.clone()),
        metrics: store.metrics,
        publish_lock: store.publish_lock,
        usage: Default::default(),
        bad_blob_checks: Default::default(),
        gc_grace: config.gc_grace,
        cache_expiry: config.cache_expiry,
        default_quota: config.default_quota,
        clock,
        recent_tokens: Default::default(),
    });
    let mut limits = listener::ListenerLimits::for_open_files(listener::raise_open_file_limit());
    limits.s3.idle_timeout = config.idle_timeout;
    limits.metrics.idle_timeout = config.idle_timeout;
    limits.grpc.idle_timeout = config.grpc_idle_timeout;
    let (stop_sender, stop_receiver) = watch::channel(false);
    let s3_task = match (listeners.s3, store.embedded_endpoint) {
        (Some(socket), Some(endpoint)) => {
            Some(tokio::spawn(listener::serve_http(socket, "s3", limits.s3, endpoint, stop_receiver.clone())))
        }
        _ => None,
    };
    // The state answered at start-up (it was opened): up until a probe finds otherwise.
    service.metrics.state_up.set(1);
    let health = Arc::new(StateHealth::default());
    let metrics_service = service.clone();
    let metrics_health = health.clone();
    let metrics_handler = hyper::service::service_fn(move |request: http::Request<listener::TimedBody>| {
        let (path, service, health) =
            (request.uri().path().to_owned(), metrics_service.clone(), metrics_health.clone());
        async move { Ok::<_, Infallible>(metrics_listener(&path, &service, &health).await) }
    });
    let mut probe_stop = stop_receiver.clone();
    let (probing_service, probe_health) = (service.clone(), health.clone());
    let probe_task = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(PROBE_SECONDS));
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    let _ = probe_state(&probing_service, &probe_health).await;
                }
                _ = probe_stop.changed() => break,
            }
        }
    });
    let health_task = tokio::spawn(listener::serve_http(
        listeners.metrics,
        "metrics",
        limits.metrics,
        metrics_handler,
        stop_receiver.clone(),
    ));
    let mut sweeper_stop = stop_receiver.clone();
    let sweeping_service = service.clone();
    let gc_every = config.gc_interval.as_secs();
    let sweeper_task = tokio::spawn(async move {
        // Each second: post-flush sweeps that fell due, and the budget shares of saves whose
        // workers fell silent; each minute: expired keys; every five
        // minutes: the store's usage; every `--gc-interval`: garbage. Of replicas sharing a
        // state, one leads the work on the shared store and records (the others count usage
        // only), and another takes the lead when it goes.
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        let mut n_ticks: u64 = 0;
        // The lead's guard, and the state's changes seen when it was taken: a database that went
        // down or restarted since may have released the lock it stands for.
        let mut lead = None;
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    if n_ticks.is_multiple_of(USAGE_COUNT_SECONDS) {
                        sweeping_service.refresh_usage().await;
                    }
                    n_ticks += 1;
                    // While the database is down the work would only fail, and say so every second.
                    if sweeping_service.metrics.state_up.get() == 0 {
                        continue;
                    }
                    let changes = health.changes.load(std::sync::atomic::Ordering::SeqCst);
                    if lead.as_ref().is_some_and(|(_, taken_at)| *taken_at != changes) {
                        tracing::info!("the database went down or restarted: the lead of the background work is taken again");
                        lead = None;
                    }
                    if lead.is_none() {
                        lead = match sweeping_service.db.lead_background_work().await {
                            Ok(Some(guard)) => {
                                tracing::info!("this coordinator leads the background work (collections, sweeps)");
                                Some((guard, changes))
                            }
                            Ok(None) => None,
                            Err(error) => {
                                tracing::warn!(error = %error.line(), "taking the lead of the background work failed; tried again");
                                None
                            }
                        };
                    }
                    if lead.is_none() {
                        continue;
                    }
                    sweeping_service.run_due_sweeps().await;
                    sweeping_service.release_silent_saves().await;
                    if gc_every > 0 && n_ticks > 1 && (n_ticks - 1).is_multiple_of(gc_every) {
                        let _ = sweeping_service.collect_all_garbage(false).await;
                    }
                    if (n_ticks - 1).is_multiple_of(60)
                        && let Err(error) =
                            sweeping_service
                                .db
                                .remove_expired_keys(sweeping_service.clock.now_unix() - EXPIRED_KEY_GRACE_SECONDS)
                                .await
                    {
                        tracing::warn!(error = %error.line(), "sweeping expired storage keys failed");
                    }
                }
                _ = sweeper_stop.changed() => break,
            }
        }
    });

    let mut grpc_stop = stop_receiver;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<proto::v1::worker_server::WorkerServer<api::WorkerApi>>().await;
    health_reporter.set_serving::<proto::v1::admin_server::AdminServer<api::AdminApi>>().await;
    // One connection may not open streams without end, a peer that stopped answering is
    // noticed by its missing pings, and one with no call in flight for the idle timeout is
    // closed (its calls counted by the layer).
    let grpc = tonic::transport::Server::builder()
        .layer(listener::CountGrpcCalls { body_timeout: limits.grpc.body_timeout })
        .max_concurrent_streams(128)
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .trace_fn(telemetry::grpc_server_span)
        .add_service(health_service)
        .add_service(proto::v1::worker_server::WorkerServer::new(api::WorkerApi(service.clone())))
        .add_service(proto::v1::admin_server::AdminServer::new(api::AdminApi(service)))
        .serve_with_incoming_shutdown(listener::grpc_incoming(listeners.grpc, limits.grpc), async move {
            let _ = grpc_stop.changed().await;
        });
    let grpc_task = tokio::spawn(grpc);

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_sender.send(true);
    let grpc_result = grpc_task.await.context("gRPC server task")?;
    if let Some(s3_task) = s3_task {
        let _ = s3_task.await;
    }
    let _ = tokio::join!(health_task, sweeper_task, probe_task);
    state.durable().await?;
    grpc_result.context("gRPC server")?;
    Ok(())
}
