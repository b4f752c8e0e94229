//! The coordinator's durable state in PostgreSQL, for replicas sharing one database: the same
//! operations as `sled.rs`, each one transaction. Every write that changes a project's
//! manifests or ledger first locks the project's row (`FOR UPDATE`), so those writes serialize
//! per project across replicas as the publish lock serializes them inside one process, and no
//! transaction is retried for a conflict.
//!
//! Tables (`lc_` in front, so the schema can share a database):
//! - `lc_schema`: the schema's version; a coordinator refuses a database newer than itself
//! - `lc_projects`, `lc_minted_keys`, `lc_scoped_tokens`, `lc_counters`: records as JSON, as in
//!   sled, with the columns their lookups need
//! - `lc_manifests`: protobuf bodies by (project, service, branch)
//! - `lc_blobs`: the ledger, each record as JSON and its reference count as a column
//! - `lc_totals`: a project's totals, kept in step by the transactions that change them
//! - `lc_open_saves`, `lc_leases` (version 2): open saves with their single-flight claims, and
//!   transfer leases, as JSON; each change is one transaction under an advisory lock (a
//!   project's for its open saves, a project's for its leases), so a rule in `saves.rs` or
//!   `budget.rs` sees one consistent view of a project's records across replicas
//! - `lc_leases.reads`, `lc_lease_demand` (version 3): the blobs a restore's lease protects,
//!   apart, so a change of leases never reads them; and each project's demand on the transfer
//!   budget, written with its leases, which is all a change of another project's leases reads
//!   of them
//! - `lc_manifests.digests` (version 4): the blobs a manifest names, so a commit locks those of
//!   the manifest it replaces without reading it first
//!
//! A call's transaction is [`Pipelined`]: its `BEGIN` goes out with its first statements and its
//! `COMMIT` with its writes, so a begin, a commit and a lookup's hit cost two round trips each.
//! A project's begins, commits of recorded blobs and lookups, which the database would run one
//! at a time, queue in the replica instead and go in batches (`postgres/batches.rs`): the
//! calls queued while one batch is in the database are one transaction next.
//!
//! A server that stops (a restart, `pg_ctl -m immediate`, a failover) costs the calls made
//! while it is down one clear error each ([`Error::DatabaseUnavailable`], gRPC `UNAVAILABLE`),
//! never a hang: every wait for it is bounded (see [`CONNECT_TIMEOUT`] and the constants after
//! it), and the pools reconnect by themselves once it is back. The database's clock is the one
//! replicas agree on: sampled at connect and at each [`Postgres::probe`] (see [`SampledClock`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use futures::TryFutureExt;
use prost::Message;
use proto::clock::{SampledClock, SharedClock};
use proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

use super::{
    BlobRecord, Committed, FlushedRecords, Holder, KeyAccess, MintedKeyRecord, ProjectRecord, ProjectTotals,
    ScopedTokenRecord, ServiceCounters, State, ledger, manifest_digests,
};
use crate::error::Error;

mod batches;
mod begins;
mod commits;
mod lookups;

/// Connections one replica opens at most: for its transactions (a batch of a project's begins,
/// commits of blobs the ledger records or lookups holds one for its one transaction, the
/// publish lock inside it, as do the other calls), for the session locks it holds (one each while held; more callers wait for
/// one: a commit that checks the store, flushes, evictions and collections, the lead), and one
/// for the health probe. 41 a replica: PostgreSQL's default `max_connections` of 100 serves
/// two replicas; raise it for more.
const STATE_CONNECTIONS: usize = 24;
const LOCK_CONNECTIONS: usize = 16;

/// The schema this coordinator writes; bumped with each migration below.
const SCHEMA_VERSION: i32 = 4;

/// Version 1.
const SCHEMA_1: &str = "
CREATE TABLE lc_projects (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE lc_minted_keys (access_key_id TEXT PRIMARY KEY, project TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX lc_minted_keys_project ON lc_minted_keys (project);
CREATE TABLE lc_scoped_tokens (sha256 TEXT PRIMARY KEY, project TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX lc_scoped_tokens_project ON lc_scoped_tokens (project);
CREATE TABLE lc_manifests (
    project TEXT NOT NULL, service TEXT NOT NULL, branch TEXT NOT NULL, body BYTEA NOT NULL,
    PRIMARY KEY (project, service, branch));
CREATE TABLE lc_blobs (
    project TEXT NOT NULL, digest TEXT NOT NULL, refs BIGINT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (project, digest));
CREATE INDEX lc_blobs_unreferenced ON lc_blobs (project) WHERE refs = 0;
CREATE TABLE lc_counters (
    project TEXT NOT NULL, service TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (project, service));
CREATE TABLE lc_totals (
    project TEXT PRIMARY KEY, blobs BIGINT NOT NULL, stored_bytes BIGINT NOT NULL, manifests BIGINT NOT NULL);
";

/// Version 2: the ephemeral records replicas share. Unlogged (no write-ahead log, emptied
/// should the server crash): they live as long as a transfer, and losing them costs what a
/// coordinator's restart costs on sled, each open save begun again.
const SCHEMA_2: &str = "
CREATE UNLOGGED TABLE lc_open_saves (id TEXT PRIMARY KEY, project TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX lc_open_saves_project ON lc_open_saves (project);
CREATE UNLOGGED TABLE lc_leases (id TEXT PRIMARY KEY, project TEXT NOT NULL, record TEXT NOT NULL);
";

/// Version 3: leases partitioned by project. A restore's `reads` move out of its record (the
/// hot part every change of its project's leases reads and writes) into a column; each
/// project's demand is kept beside. Leases from before count in other projects' shares from
/// their project's next change of leases on.
const SCHEMA_3: &str = "
ALTER TABLE lc_leases ADD COLUMN reads TEXT[] NOT NULL DEFAULT '{}';
UPDATE lc_leases SET reads = ARRAY(SELECT jsonb_array_elements_text(COALESCE(record::jsonb -> 'reads', '[]'))),
    record = (record::jsonb - 'reads')::text;
CREATE INDEX lc_leases_project ON lc_leases (project);
CREATE UNLOGGED TABLE lc_lease_demand (
    project TEXT PRIMARY KEY, demand BIGINT NOT NULL, lapses_unix_ms BIGINT NOT NULL);
";

/// Version 4: the blobs each manifest names, beside its body, so that a commit locks those of
/// the manifest it replaces with its own, in its first round trip. NULL for a manifest written
/// before: its replacement reads them from the body, one round trip more.
const SCHEMA_4: &str = "
ALTER TABLE lc_manifests ADD COLUMN digests TEXT[];
";

/// Transaction advisory locks (the two-key space, apart from the projects' publish locks):
/// one project's open saves, and one project's leases. No lock covers every project's.
const PROJECT_OPEN_SAVES_LOCK: &str = "SELECT pg_advisory_xact_lock(7402, hashtext($1))";
const PROJECT_LEASES_LOCK: &str = "SELECT pg_advisory_xact_lock(7403, hashtext($1))";

/// A begin's locks in one statement (`$1` the publish lock's key, `$2` the project): the publish
/// lock (`project_lock`'s, shared, for this transaction only), then the open saves'.
const BEGIN_LOCKS: &str = "SELECT pg_advisory_xact_lock_shared($1), pg_advisory_xact_lock(7402, hashtext($2))";

/// A project's record (`$1` the project), and the same with its row locked for the rest of the
/// transaction.
const PROJECT_RECORD: &str = "SELECT record FROM lc_projects WHERE name = $1";
const PROJECT_RECORD_LOCKED: &str = "SELECT record FROM lc_projects WHERE name = $1 FOR UPDATE";

/// The ledger's records of blobs (`$2`) of a project (`$1`).
const BLOBS_OF: &str = "SELECT digest, record FROM lc_blobs WHERE project = $1 AND digest = ANY($2)";

/// A project's manifests (`$1` the project), in the order of their keys.
const PROJECT_MANIFESTS: &str = "SELECT body FROM lc_manifests WHERE project = $1 ORDER BY service, branch";

/// A commit's first lock (`$1` the publish lock's key): the publish lock of `project_lock`,
/// shared, for the transaction only; the project's row is locked next (see `commits.rs`).
const COMMIT_LOCK: &str = "SELECT pg_advisory_xact_lock_shared($1)";

/// A lookup's locks in one statement (`$1` the project, `$2` the publish lock's key, `$3` and
/// `$4` the keys' services and branches), taken only when the project holds a manifest of one
/// of the keys (a row then, none otherwise: a miss waits for no lock): the publish lock,
/// shared, then the leases'; with them its commit does not wait for the disk (a use's time is a
/// hint for expiry and eviction, and leases live in unlogged tables). Each key is one look-up of
/// the primary key, not a join over the project's manifests.
const LOOKUP_LOCKS: &str = "SELECT set_config('synchronous_commit', 'off', true),
    pg_advisory_xact_lock_shared($2), pg_advisory_xact_lock(7403, hashtext($1))
    WHERE EXISTS (SELECT 1 FROM UNNEST($3::text[], $4::text[]) AS wanted (service, branch)
        CROSS JOIN LATERAL (SELECT 1 FROM lc_manifests
            WHERE project = $1 AND service = wanted.service AND branch = wanted.branch OFFSET 0) m)";

/// What a lookup's [`LOOKUP_LOCKS`] need: the publish lock's key and the keys looked up.
struct LookupKeys<'a> {
    lock_key: i64,
    services: &'a [&'a str],
    branches: &'a [&'a str],
}

/// Statements prepared once per connection (deadpool's statement cache): each later use is one
/// round trip, not two (a prepare, then the execution), and an autocommit read one
/// transaction, not two.
#[async_trait::async_trait]
trait Cached: GenericClient {
    async fn cached_query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.query(&statement, params).await
    }

    async fn cached_query_opt(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.query_opt(&statement, params).await
    }

    async fn cached_query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.query_one(&statement, params).await
    }

    async fn cached_execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.execute(&statement, params).await
    }
}

impl<T: GenericClient> Cached for T {}

/// A statement's parameter, owned, so a [`Write`] can be built before it is sent.
type Param = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

/// One statement of the writes a transaction ends with, built before any of them is sent (see
/// [`send_writes`]).
struct Write {
    sql: std::borrow::Cow<'static, str>,
    params: Vec<Param>,
}

impl Write {
    fn new(sql: impl Into<std::borrow::Cow<'static, str>>, params: Vec<Param>) -> Write {
        Write { sql: sql.into(), params }
    }
}

/// Sends `writes` in their order and waits for all their answers: one round trip once the
/// connection has prepared them (see [`prepare_writes`]).
async fn send_writes(client: &impl GenericClient, writes: &[Write]) -> Result<(), Error> {
    let statements = prepare_writes(client, writes).await?;
    execute_writes(client, &statements, writes).await
}

/// `writes`' statements, from the connection's statement cache (see [`prepare_all`]).
async fn prepare_writes(
    client: &impl GenericClient,
    writes: &[Write],
) -> Result<Vec<tokio_postgres::Statement>, Error> {
    prepare_all(client, writes.iter().map(|write| &*write.sql)).await
}

/// `statements` prepared on the connection, from its statement cache: a round trip only the
/// first time the connection uses one. Prepare what must run first before joining a
/// transaction's statements: a statement not yet prepared goes on the wire only once its
/// preparation is answered, behind the statements sent meanwhile (on a connection that had
/// prepared a read and not the lock it must follow, the read would run first).
async fn prepare_all<'a>(
    client: &impl GenericClient,
    statements: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<tokio_postgres::Statement>, Error> {
    futures::future::try_join_all(statements.into_iter().map(|sql| client.prepare_cached(sql))).await.map_err(pg_error)
}

/// Executes `writes` with their prepared `statements`. Each goes on the wire when first polled,
/// in order (`try_join_all` polls up to 30 futures in order; a change set makes at most 9
/// writes), so whatever a caller joins after this (a `COMMIT`) goes out after them all.
async fn execute_writes(
    client: &impl GenericClient,
    statements: &[tokio_postgres::Statement],
    writes: &[Write],
) -> Result<(), Error> {
    debug_assert!(writes.len() <= 30, "{} writes: more than are sent in order", writes.len());
    let sent = statements.iter().zip(writes).map(|(statement, write)| {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            write.params.iter().map(|param| param.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        async move { client.execute(statement, &params).await }
    });
    futures::future::try_join_all(sent).await.map_err(pg_error)?;
    Ok(())
}

/// A transaction on a connection of `pool`, not begun yet (see [`Pipelined`]), with `first`
/// prepared: the statements that must run before the ones joined after them (its locks; see
/// [`prepare_all`]). A batch names all its first round trip's statements, so they run in the
/// order it joins them.
async fn pipelined(pool: &Pool, first: &[&str]) -> Result<Pipelined, Error> {
    let client = pool.get().await.map_err(pg_error)?;
    prepare_all(&client, first.iter().copied()).await?;
    Ok(Pipelined::new(client))
}

/// A transaction whose `BEGIN` goes out with its first statements ([`Pipelined::begin`], joined
/// first with them) and whose `COMMIT` goes out with its writes ([`Pipelined::commit_with`]):
/// the transaction costs the round trips its statements need, none of its own. Dropped
/// unfinished (an error, a caller that went away), it is rolled back before its connection
/// goes back to the pool.
struct Pipelined {
    client: Option<deadpool_postgres::Object>,
    begun: AtomicBool,
    done: AtomicBool,
}

impl Pipelined {
    fn new(client: deadpool_postgres::Object) -> Pipelined {
        Pipelined { client: Some(client), begun: AtomicBool::new(false), done: AtomicBool::new(false) }
    }

    /// The connection, for the transaction's statements.
    fn client(&self) -> &deadpool_postgres::Object {
        self.client.as_ref().expect("held until dropped")
    }

    /// Opens the transaction: join it before the statements that belong in it (a simple
    /// query, on the wire when first polled).
    async fn begin(&self) -> Result<(), Error> {
        debug_assert!(!self.begun.swap(true, Ordering::Relaxed), "a transaction begun twice");
        self.client().batch_execute("BEGIN").await.map_err(pg_error)
    }

    /// Rolls the transaction back (one round trip), for a step that found it must change nothing.
    async fn rollback(&self) -> Result<(), Error> {
        self.client().batch_execute("ROLLBACK").await.map_err(pg_error)?;
        self.done.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Sends `writes` and `COMMIT` after them in one round trip. A write that fails makes the
    /// `COMMIT` a rollback, and its error is returned.
    async fn commit_with(&self, writes: &[Write]) -> Result<(), Error> {
        // Prepared first: a write prepared while the `COMMIT` went out would run after it.
        let statements = prepare_writes(self.client(), writes).await?;
        let commit = self.client().batch_execute("COMMIT").map_err(pg_error);
        futures::try_join!(execute_writes(self.client(), &statements, writes), commit)?;
        self.done.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        if self.done.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Not back into the pool: closing the session rolls the transaction back.
            drop(deadpool_postgres::Object::take(client));
            return;
        };
        runtime.spawn(async move {
            if client.batch_execute("ROLLBACK").await.is_err() {
                drop(deadpool_postgres::Object::take(client));
            }
        });
    }
}

/// How long connecting may take (TCP and PostgreSQL's start-up, which answer in milliseconds
/// on a LAN): longer is a server that is down or unreachable, and the call fails. Shorter than a
/// worker's own deadline on a call (`--stall-timeout`, 10 s by default), so the worker hears
/// the database's error rather than its own timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a call waits for a free connection of the state's pool (8, each held for one
/// transaction of milliseconds): longer is a database too busy to answer, and the call fails.
const STATE_POOL_WAIT: Duration = Duration::from_secs(5);

/// The same for the project locks' pool, whose connections are held while a lock is.
const LOCK_POOL_WAIT: Duration = Duration::from_secs(10);

/// A query sent and not acknowledged for this long (`TCP_USER_TIMEOUT`), or an answer awaited
/// on a connection whose keep-alive probes (after [`KEEPALIVE_IDLE`]) go unanswered, means the
/// server's host is gone: the connection closes and the call waiting on it fails, instead of
/// waiting for the kernel's retransmissions (about 15 minutes). A server that stopped or
/// restarted closes its connections itself, and the call fails at once.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;

/// How long [`Postgres::probe`] waits for the database's answer to a trivial query. A server
/// that takes longer is frozen (its process stopped or stuck while its host's kernel still
/// acknowledges what is sent, so no TCP bound fires) or too overwhelmed to serve anyone
/// (workers' calls give up after 10 s): every connection is then cut, which fails the calls
/// waiting on one at once, and until a probe is answered again new calls fail at once too.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Asked of the server by each connection of the locks' pool: keep-alive probes of its own, so
/// that the session locks of a replica whose host vanished are released within about 25 s,
/// not the kernel's two hours. Said after connecting rather than in the start-up packet,
/// which some poolers refuse options in.
const SERVER_KEEPALIVES: &str = "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
                                 SET tcp_keepalives_count = 3";

fn pg_error(error: impl Into<crate::error::Cause>) -> Error {
    let error = error.into();
    match unavailable(&*error) {
        true => Error::DatabaseUnavailable { what: "PostgreSQL", source: error },
        false => Error::database("PostgreSQL", error),
    }
}

/// Whether `error` says the server cannot be reached or is going away (stopped, restarting,
/// its connection lost, no connection free in time), rather than that it refused a statement.
fn unavailable(error: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use deadpool_postgres::PoolError;
    match error.downcast_ref::<PoolError>() {
        Some(PoolError::Timeout(_)) => true,
        Some(PoolError::Backend(error)) => postgres_unavailable(error),
        Some(_) => false,
        None => error.downcast_ref::<tokio_postgres::Error>().is_some_and(postgres_unavailable),
    }
}

fn postgres_unavailable(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        // Connection exceptions (class 08); the server shutting down, crashed or still starting.
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || ["57P01", "57P02", "57P03"].contains(&code)
        }
        // No answer at all: the connection closed, failed, or timed out.
        None => {
            error.is_closed()
                || std::error::Error::source(error).is_some_and(|cause| cause.is::<std::io::Error>())
                || error.to_string().starts_with("timeout")
        }
    }
}

/// Connects as deadpool's own `ConfigConnectImpl` does, but ends each connection's task (and
/// so closes its socket, failing the calls waiting on it) when `cut` changes.
struct CuttableConnect {
    cut: tokio::sync::watch::Receiver<u64>,
}

type Connected = (tokio_postgres::Client, tokio::task::JoinHandle<()>);

impl deadpool_postgres::Connect for CuttableConnect {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Connected, tokio_postgres::Error>> + Send + '_>> {
        let (config, mut cut) = (config.clone(), self.cut.clone());
        Box::pin(async move {
            let (client, connection) = config.connect(NoTls).await?;
            cut.borrow_and_update();
            let task = tokio::spawn(async move {
                tokio::select! {
                    ended = connection => {
                        if let Err(error) = ended {
                            tracing::debug!(error = %error, "a connection to the database ended");
                        }
                    }
                    _ = cut.changed() => {}
                }
            });
            Ok((client, task))
        })
    }
}

/// Said to each connection of the state's pool once connected (not in the start-up packet,
/// which some poolers refuse options in), each unless the URL's `options` set it themselves:
/// - `plan_cache_mode`: every statement is prepared once per connection and run with the plan
///   made then. The statements name rows by key (a project, a digest, a save), so one plan
///   serves every value, and the server's default would plan many of them again at each
///   execution (a tenth of the machine's CPU at 100 simulated workers).
/// - `enable_bitmapscan`: a project's open saves and leases are rows written and deleted many
///   times a second, and autovacuum visits a table at most once a minute. A plain index scan
///   marks the dead entries it meets so later scans skip them; a bitmap scan (the planner's
///   choice for a project's few rows) visits them all again each time: 8% of the server's CPU
///   at 100 simulated workers. The state's statements read rows by key, never enough of a
///   table for a bitmap to pay.
const STATE_SESSION: [(&str, &str); 2] = [("plan_cache_mode", "force_generic_plan"), ("enable_bitmapscan", "off")];

/// The `SET` statements of [`STATE_SESSION`] the URL's `options` leave to us; none when they
/// set them all.
fn state_session(config: &tokio_postgres::Config) -> Option<String> {
    let options = config.get_options().unwrap_or_default();
    let statements: Vec<String> = STATE_SESSION
        .iter()
        .filter(|(name, _)| !options.contains(name))
        .map(|(name, value)| format!("SET {name} = {value}"))
        .collect();
    (!statements.is_empty()).then(|| statements.join("; "))
}

/// `config` with the bounds above, where the URL did not set its own.
fn bounded(mut config: tokio_postgres::Config) -> tokio_postgres::Config {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES);
    config
}

/// A pool of at most `max_size` connections to `config`'s server, every wait in it bounded.
/// `RecyclingMethod::Fast` hands a pooled connection out again after checking only that it is
/// still open (no query per call): one the server closed (a restart, a crash) is dropped and a
/// new one made, so the pool reconnects by itself. A connection that fails a call (the server
/// went away under it) is closed by then, and dropped at its next checkout the same way.
fn bounded_pool(
    config: tokio_postgres::Config,
    cut: &tokio::sync::watch::Sender<u64>,
    max_size: usize,
    wait: Duration,
    post_create: Option<String>,
) -> Result<Pool, Error> {
    let connect = CuttableConnect { cut: cut.subscribe() };
    let manager =
        Manager::from_connect(bounded(config), connect, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let mut builder = Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT));
    if let Some(statements) = post_create {
        builder = builder.post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
            let statements = statements.clone();
            Box::pin(
                async move { client.batch_execute(&statements).await.map_err(deadpool_postgres::HookError::Backend) },
            )
        }));
    }
    builder.build().map_err(pg_error)
}

/// The database's clock: `clock_timestamp()` as unix milliseconds, with the instants the
/// question left and the answer came (the reading is taken to be of their midpoint), and when
/// the server started (its epoch: a restart changes it).
async fn read_clock(client: &impl GenericClient) -> Result<(Instant, Instant, i64, i64), Error> {
    let sent = Instant::now();
    let row = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
                    (extract(epoch FROM pg_postmaster_start_time()) * 1000)::bigint",
            &[],
        )
        .await
        .map_err(pg_error)?;
    Ok((sent, Instant::now(), row.get(0), row.get(1)))
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize to JSON")
}

fn from_json<T: for<'de> Deserialize<'de>>(table: &str, text: &str) -> Result<T, Error> {
    serde_json::from_str(text).map_err(|error| Error::corrupt(table, error))
}

fn decode_manifest(body: &[u8]) -> Result<pb::Manifest, Error> {
    pb::Manifest::decode(body).map_err(|error| Error::corrupt("lc_manifests", error))
}

/// The state in one PostgreSQL database, through a pool of connections, and another for the
/// project locks replicas share (advisory locks, each held by a connection of its own while it
/// is held, released by the server if the replica dies).
pub struct Postgres {
    pool: Pool,
    locks: Pool,
    /// One connection of the probe's own, so a busy pool never reads as an outage.
    probes: Pool,
    /// The database's clock, sampled at connect and at each probe.
    clock: Arc<SampledClock>,
    /// False from a probe the database did not answer in time to one it answered: calls then
    /// fail at once (see [`PROBE_TIMEOUT`]).
    answering: AtomicBool,
    /// Changed to cut every connection of the three pools.
    cut: tokio::sync::watch::Sender<u64>,
    /// A project's begins waiting for its next batch (see `batches.rs`).
    begins: Arc<batches::Queues<begins::QueuedBegin>>,
    /// A project's commits of recorded blobs waiting for its next batch.
    commits: Arc<batches::Queues<commits::QueuedCommit>>,
    /// A project's lookups waiting for its next batch.
    lookups: Arc<batches::Queues<lookups::QueuedLookup>>,
}

/// The advisory lock key the replica leading the background work holds.
const LEADER_LOCK_KEY: i64 = 7404;

/// The advisory lock key of a project: the first 8 bytes of the SHA-256 of its name.
fn lock_key(project: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("layer-cache project {project}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// A held advisory lock; dropping it unlocks (or, should that fail, closes its connection,
/// which unlocks too).
struct AdvisoryLock {
    client: Option<deadpool_postgres::Object>,
    key: i64,
    exclusive: bool,
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        let (Some(client), key, exclusive) = (self.client.take(), self.key, self.exclusive) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let unlock =
                if exclusive { "SELECT pg_advisory_unlock($1)" } else { "SELECT pg_advisory_unlock_shared($1)" };
            if client.cached_query_one(unlock, &[&key]).await.is_err() {
                // Not back into the pool: closing the session releases whatever it holds.
                drop(deadpool_postgres::Object::take(client));
            }
        });
    }
}

impl Postgres {
    /// Connects to `url` (`postgres://user@host:port/database`), creates or migrates the
    /// schema, and refuses a database whose schema is newer than this coordinator's.
    pub async fn connect(url: &str) -> Result<Postgres, Error> {
        let config: tokio_postgres::Config =
            url.parse().map_err(|error| Error::InvalidArgument(format!("invalid --state URL: {error}")))?;
        let cut = tokio::sync::watch::Sender::new(0);
        let session = state_session(&config);
        let pool = bounded_pool(config.clone(), &cut, STATE_CONNECTIONS, STATE_POOL_WAIT, session)?;
        let locks =
            bounded_pool(config.clone(), &cut, LOCK_CONNECTIONS, LOCK_POOL_WAIT, Some(SERVER_KEEPALIVES.to_owned()))?;
        let probes = bounded_pool(config, &cut, 1, PROBE_TIMEOUT, None)?;
        let (sent, received, database_unix_ms, _) = read_clock(&probes.get().await.map_err(pg_error)?).await?;
        let clock = SampledClock::new(sent, received, database_unix_ms);
        let state = Postgres {
            pool,
            locks,
            probes,
            clock,
            answering: AtomicBool::new(true),
            cut,
            begins: Arc::default(),
            commits: Arc::default(),
            lookups: Arc::default(),
        };
        state.migrate().await?;
        let offset_ms = state.clock.offset_ms();
        if offset_ms.abs() > 1_000 {
            tracing::warn!(
                offset_ms,
                "the database's clock differs from this machine's by more than a second: the coordinator keeps the database's time"
            );
        }
        Ok(state)
    }

    /// The database's clock, which every replica sharing the database reads.
    pub fn clock(&self) -> SharedClock {
        self.clock.clone()
    }

    /// Asks the database for its clock: once it answers, the clock sampled again and when the
    /// server started (unix milliseconds: a restart changes it); [`Error::DatabaseUnavailable`]
    /// while it cannot be reached.
    pub async fn probe(&self) -> Result<i64, Error> {
        let asked = async { read_clock(&self.probes.get().await.map_err(pg_error)?).await };
        let Ok(answer) = tokio::time::timeout(PROBE_TIMEOUT, asked).await else {
            // The calls waiting on the server fail now, not when their callers give up.
            if self.answering.swap(false, Ordering::SeqCst) {
                self.cut.send_modify(|cuts| *cuts += 1);
            }
            let silence = format!("it did not answer within {} s", PROBE_TIMEOUT.as_secs());
            return Err(Error::DatabaseUnavailable { what: "PostgreSQL", source: silence.into() });
        };
        let (sent, received, database_unix_ms, started_unix_ms) = answer?;
        self.answering.store(true, Ordering::SeqCst);
        self.clock.sample(sent, received, database_unix_ms);
        Ok(started_unix_ms)
    }

    /// `Ok` unless the last probe went unanswered.
    fn answering(&self) -> Result<(), Error> {
        match self.answering.load(Ordering::SeqCst) {
            true => Ok(()),
            false => Err(Error::DatabaseUnavailable {
                what: "PostgreSQL",
                source: "it did not answer the last probe in time".into(),
            }),
        }
    }

    /// A connection of the locks' pool (see [`Postgres::client`]).
    async fn lock_client(&self) -> Result<deadpool_postgres::Object, Error> {
        self.answering()?;
        self.locks.get().await.map_err(pg_error)
    }

    /// A connection of the state's pool, or at once [`Error::DatabaseUnavailable`] while the
    /// database does not answer its probes.
    async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        self.answering()?;
        self.pool.get().await.map_err(pg_error)
    }

    /// [`pipelined`] on the state's pool, or at once [`Error::DatabaseUnavailable`] while the
    /// database does not answer its probes.
    async fn pipelined(&self, first: &[&str]) -> Result<Pipelined, Error> {
        self.answering()?;
        pipelined(&self.pool, first).await
    }

    async fn migrate(&self) -> Result<(), Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // Replicas starting together migrate one at a time.
        tx.batch_execute(
            "SET LOCAL client_min_messages = warning; SELECT pg_advisory_xact_lock(7400);
             CREATE TABLE IF NOT EXISTS lc_schema (version INTEGER NOT NULL)",
        )
        .await
        .map_err(pg_error)?;
        let version: Option<i32> =
            tx.cached_query_opt("SELECT version FROM lc_schema", &[]).await.map_err(pg_error)?.map(|row| row.get(0));
        match version {
            Some(version) if version > SCHEMA_VERSION => {
                return Err(Error::Database {
                    what: format!(
                        "the database's schema is version {version}, newer than this coordinator's {SCHEMA_VERSION}: \
                         run a coordinator at least as new as the one that wrote it"
                    ),
                    source: None,
                });
            }
            Some(SCHEMA_VERSION) => {}
            Some(version) => {
                if version < 2 {
                    tx.batch_execute(SCHEMA_2).await.map_err(pg_error)?;
                }
                if version < 3 {
                    tx.batch_execute(SCHEMA_3).await.map_err(pg_error)?;
                }
                if version < 4 {
                    tx.batch_execute(SCHEMA_4).await.map_err(pg_error)?;
                }
                tx.cached_execute("UPDATE lc_schema SET version = $1", &[&SCHEMA_VERSION]).await.map_err(pg_error)?;
            }
            None => {
                tx.batch_execute(SCHEMA_1).await.map_err(pg_error)?;
                tx.batch_execute(SCHEMA_2).await.map_err(pg_error)?;
                tx.batch_execute(SCHEMA_3).await.map_err(pg_error)?;
                tx.batch_execute(SCHEMA_4).await.map_err(pg_error)?;
                tx.cached_execute("INSERT INTO lc_schema (version) VALUES ($1)", &[&SCHEMA_VERSION])
                    .await
                    .map_err(pg_error)?;
            }
        }
        tx.commit().await.map_err(pg_error)
    }
}

/// Locks a project's row for the rest of the transaction; its record, if there is one.
async fn lock_project(tx: &Transaction<'_>, project: &str) -> Result<Option<ProjectRecord>, Error> {
    let row = tx.cached_query_opt(PROJECT_RECORD_LOCKED, &[&project]).await.map_err(pg_error)?;
    row.map(|row| from_json("lc_projects", row.get::<_, &str>(0))).transpose()
}

const PUT_PROJECT: &str = "UPDATE lc_projects SET record = $2 WHERE name = $1";

async fn put_project(tx: &impl GenericClient, record: &ProjectRecord) -> Result<(), Error> {
    tx.cached_execute(PUT_PROJECT, &[&record.name, &to_json(record)]).await.map_err(pg_error)?;
    Ok(())
}

/// The ledger's records among `rows` of (digest, record).
fn blob_records<C: FromIterator<(String, BlobRecord)>>(rows: &[tokio_postgres::Row]) -> Result<C, Error> {
    rows.iter().map(|row| Ok((row.get::<_, String>(0), from_json("lc_blobs", row.get::<_, &str>(1))?))).collect()
}

/// The ledger's records of `digests`, locked for the rest of the transaction.
async fn lock_blobs(
    tx: &impl GenericClient,
    project: &str,
    digests: &[String],
) -> Result<HashMap<String, BlobRecord>, Error> {
    let rows = tx
        .cached_query(
            "SELECT digest, record FROM lc_blobs WHERE project = $1 AND digest = ANY($2) FOR UPDATE",
            &[&project, &digests],
        )
        .await
        .map_err(pg_error)?;
    blob_records(&rows)
}

/// The writes that apply a ledger rule's change set (see [`ledger::ChangeSet`]), in order: at
/// most 9 statements, whatever its size.
fn change_writes(project: &str, change: &ledger::ChangeSet) -> Vec<Write> {
    let by_project = || -> Param { Box::new(project.to_owned()) };
    let mut writes = Vec::new();
    if let Some(record) = &change.put_project {
        writes.push(Write::new(PUT_PROJECT, vec![Box::new(record.name.clone()), Box::new(to_json(record))]));
    }
    if !change.remove_manifests.is_empty() {
        let services: Vec<String> = change.remove_manifests.iter().map(|key| key.service.clone()).collect();
        let branches: Vec<String> = change.remove_manifests.iter().map(|key| key.branch.clone()).collect();
        writes.push(Write::new(
            "DELETE FROM lc_manifests m USING UNNEST($2::text[], $3::text[]) AS gone (service, branch)
             WHERE m.project = $1 AND m.service = gone.service AND m.branch = gone.branch",
            vec![by_project(), Box::new(services), Box::new(branches)],
        ));
    }
    writes.extend(manifests_write(project, change.put_manifest.as_slice()));
    if !change.put_blobs.is_empty() {
        // One statement may change a row once: a digest's last record is the one that stands,
        // as it would written one after another.
        let blobs: std::collections::BTreeMap<&str, &BlobRecord> =
            change.put_blobs.iter().map(|(digest, record)| (digest.as_str(), record)).collect();
        let digests: Vec<String> = blobs.keys().map(|digest| (*digest).to_owned()).collect();
        let references: Vec<i64> = blobs.values().map(|record| record.references as i64).collect();
        let records: Vec<String> = blobs.values().map(|record| to_json(*record)).collect();
        writes.push(Write::new(
            "INSERT INTO lc_blobs (project, digest, refs, record)
                 SELECT $1, digest, refs, record FROM UNNEST($2::text[], $3::bigint[], $4::text[]) AS given (digest, refs, record)
             ON CONFLICT (project, digest) DO UPDATE SET refs = EXCLUDED.refs, record = EXCLUDED.record",
            vec![by_project(), Box::new(digests), Box::new(references), Box::new(records)],
        ));
    }
    if !change.remove_blobs.is_empty() {
        writes.push(Write::new(
            "DELETE FROM lc_blobs WHERE project = $1 AND digest = ANY($2)",
            vec![by_project(), Box::new(change.remove_blobs.clone())],
        ));
    }
    if !change.remove_keys.is_empty() {
        writes.push(Write::new(
            "DELETE FROM lc_minted_keys WHERE access_key_id = ANY($1)",
            vec![Box::new(change.remove_keys.clone())],
        ));
    }
    if change.reset_totals {
        writes.push(Write::new(
            "UPDATE lc_totals SET blobs = 0, stored_bytes = 0, manifests = 0 WHERE project = $1",
            vec![by_project()],
        ));
    }
    let deltas = [change.blobs_delta, change.stored_bytes_delta, change.manifests_delta];
    if change.reset_totals || deltas != [0; 3] {
        // Added to a project's totals, never below zero.
        writes.push(Write::new(
            "INSERT INTO lc_totals (project, blobs, stored_bytes, manifests)
                 VALUES ($1, GREATEST($2::bigint, 0), GREATEST($3::bigint, 0), GREATEST($4::bigint, 0))
             ON CONFLICT (project) DO UPDATE SET blobs = GREATEST(lc_totals.blobs + $2::bigint, 0),
                 stored_bytes = GREATEST(lc_totals.stored_bytes + $3::bigint, 0),
                 manifests = GREATEST(lc_totals.manifests + $4::bigint, 0)",
            vec![by_project(), Box::new(deltas[0]), Box::new(deltas[1]), Box::new(deltas[2])],
        ));
    }
    writes
}

/// The write that records uses of manifests: each (as it was, as used) stored only if the
/// manifest is still the one it was (a lost race means a newer one is there, with its own
/// times); none when there are none.
fn touches_write(project: &str, touched: &[(&pb::Manifest, pb::Manifest)]) -> Option<Write> {
    if touched.is_empty() {
        return None;
    }
    let keys: Vec<pb::CacheKey> = touched.iter().map(|(was, _)| was.key.clone().unwrap_or_default()).collect();
    let services: Vec<String> = keys.iter().map(|key| key.service.clone()).collect();
    let branches: Vec<String> = keys.iter().map(|key| key.branch.clone()).collect();
    let was: Vec<Vec<u8>> = touched.iter().map(|(was, _)| was.encode_to_vec()).collect();
    let used: Vec<Vec<u8>> = touched.iter().map(|(_, used)| used.encode_to_vec()).collect();
    Some(Write::new(
        "UPDATE lc_manifests m SET body = given.used
         FROM UNNEST($2::text[], $3::text[], $4::bytea[], $5::bytea[]) AS given (service, branch, was, used)
         WHERE m.project = $1 AND m.service = given.service AND m.branch = given.branch AND m.body = given.was",
        vec![Box::new(project.to_owned()), Box::new(services), Box::new(branches), Box::new(was), Box::new(used)],
    ))
}

/// The write that makes `manifests` their keys' (one of each key), with the blobs each names
/// beside it; none when there are none.
fn manifests_write(project: &str, manifests: &[pb::Manifest]) -> Option<Write> {
    if manifests.is_empty() {
        return None;
    }
    let keys: Vec<pb::CacheKey> = manifests.iter().map(|manifest| manifest.key.clone().unwrap_or_default()).collect();
    let services: Vec<String> = keys.iter().map(|key| key.service.clone()).collect();
    let branches: Vec<String> = keys.iter().map(|key| key.branch.clone()).collect();
    let bodies: Vec<Vec<u8>> = manifests.iter().map(Message::encode_to_vec).collect();
    // Each manifest's blobs as one JSON text (a text[][] cannot be ragged).
    let digests: Vec<String> =
        manifests.iter().map(|manifest| to_json(&manifest_digests(manifest).into_iter().collect::<Vec<_>>())).collect();
    Some(Write::new(
        "INSERT INTO lc_manifests (project, service, branch, body, digests)
             SELECT $1, service, branch, body, ARRAY(SELECT jsonb_array_elements_text(digests::jsonb))
             FROM UNNEST($2::text[], $3::text[], $4::bytea[], $5::text[]) AS given (service, branch, body, digests)
         ON CONFLICT (project, service, branch) DO UPDATE SET body = EXCLUDED.body, digests = EXCLUDED.digests",
        vec![Box::new(project.to_owned()), Box::new(services), Box::new(branches), Box::new(bodies), Box::new(digests)],
    ))
}

/// Applies a ledger rule's change set inside the transaction `tx` is in, in one round trip.
async fn apply(tx: &impl GenericClient, project: &str, change: &ledger::ChangeSet) -> Result<(), Error> {
    send_writes(tx, &change_writes(project, change)).await
}

async fn manifest_of(
    tx: &impl GenericClient,
    project: &str,
    key: &pb::CacheKey,
    lock: bool,
) -> Result<Option<pb::Manifest>, Error> {
    let query = if lock {
        "SELECT body FROM lc_manifests WHERE project = $1 AND service = $2 AND branch = $3 FOR UPDATE"
    } else {
        "SELECT body FROM lc_manifests WHERE project = $1 AND service = $2 AND branch = $3"
    };
    let row = tx.cached_query_opt(query, &[&project, &key.service, &key.branch]).await.map_err(pg_error)?;
    row.map(|row| decode_manifest(row.get::<_, &[u8]>(0))).transpose()
}

/// Locks `project`'s leases for the rest of the transaction; whether it did, its leases
/// (`reads` left empty) and every other project's demand. The lock and both reads go in one
/// round trip.
///
/// With `lookup`, [`LOOKUP_LOCKS`] are taken instead of the leases' (none for a miss).
async fn locked_leases(
    tx: &impl GenericClient,
    project: &str,
    lookup: Option<LookupKeys<'_>>,
) -> Result<(bool, super::Leases, super::LeaseDemands), Error> {
    let by_project: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&project];
    let lock = async {
        match &lookup {
            Some(keys) => {
                let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
                    &[&project, &keys.lock_key, &keys.services, &keys.branches];
                Ok(tx.cached_query_opt(LOOKUP_LOCKS, params).await?.is_some())
            }
            None => tx.cached_execute(PROJECT_LEASES_LOCK, by_project).await.map(|_| true),
        }
    };
    let (locked, leases, demands) = futures::try_join!(
        lock,
        tx.cached_query("SELECT id, record FROM lc_leases WHERE project = $1", by_project),
        tx.cached_query("SELECT project, demand, lapses_unix_ms FROM lc_lease_demand WHERE project <> $1", by_project),
    )
    .map_err(pg_error)?;
    let leases = leases
        .iter()
        .map(|row| Ok((row.get::<_, String>(0), from_json("lc_leases", row.get::<_, &str>(1))?)))
        .collect::<Result<_, Error>>()?;
    let demands = demands
        .iter()
        .map(|row| {
            let demand = u32::try_from(row.get::<_, i64>(1)).unwrap_or(u32::MAX);
            (row.get(0), super::LeaseDemand { demand, lapses_unix_ms: row.get(2) })
        })
        .collect();
    Ok((locked, leases, demands))
}

/// The writes that store what a change made of `project`'s leases (`before` it, `after` it)
/// and the project's `demand`.
fn lease_writes(
    project: &str,
    before: &super::Leases,
    after: &super::Leases,
    demand: super::LeaseDemand,
) -> Vec<Write> {
    let gone: Vec<String> = before.keys().filter(|id| !after.contains_key(*id)).cloned().collect();
    // What is written is the record without `reads`: a change to a field never stored writes
    // nothing, and a lease's `reads` are written once, with the lease.
    let changed: Vec<(&String, &super::Lease, bool)> = after
        .iter()
        .filter(|(_, lease)| lease.project == project)
        .filter_map(|(id, lease)| match before.get(id) {
            None => Some((id, lease, true)),
            Some(was) if stored_lease(was) != stored_lease(lease) => Some((id, lease, false)),
            Some(_) => None,
        })
        .collect();
    let lapses_unix_ms = if after.is_empty() { 0 } else { demand.lapses_unix_ms };
    let demand = if after.is_empty() { 0 } else { i64::from(demand.demand) };
    let mut writes = vec![Write::new(
        "INSERT INTO lc_lease_demand (project, demand, lapses_unix_ms) VALUES ($1, $2, $3)
         ON CONFLICT (project) DO UPDATE SET demand = EXCLUDED.demand, lapses_unix_ms = EXCLUDED.lapses_unix_ms",
        vec![Box::new(project.to_owned()), Box::new(demand), Box::new(lapses_unix_ms)],
    )];
    if !gone.is_empty() {
        writes.push(Write::new(
            "DELETE FROM lc_leases WHERE project = $1 AND id = ANY($2)",
            vec![Box::new(project.to_owned()), Box::new(gone)],
        ));
    }
    if !changed.is_empty() {
        let ids: Vec<String> = changed.iter().map(|(id, _, _)| (*id).clone()).collect();
        let bodies: Vec<String> = changed.iter().map(|(_, lease, _)| to_json(&stored_lease(lease))).collect();
        // A new lease's reads, as one JSON text (a text[][] cannot be ragged); a kept lease's: NULL.
        let reads: Vec<Option<String>> =
            changed.iter().map(|(_, lease, new)| new.then(|| to_json(&lease.reads))).collect();
        writes.push(Write::new(
            "INSERT INTO lc_leases (id, project, record, reads)
             SELECT id, $1, record, COALESCE(ARRAY(SELECT jsonb_array_elements_text(reads::jsonb)), '{}')
             FROM UNNEST($2::text[], $3::text[], $4::text[]) AS given (id, record, reads)
             ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record,
                 reads = CASE WHEN EXCLUDED.reads = '{}' THEN lc_leases.reads ELSE EXCLUDED.reads END
             WHERE lc_leases.project = EXCLUDED.project",
            vec![Box::new(project.to_owned()), Box::new(ids), Box::new(bodies), Box::new(reads)],
        ));
    }
    writes
}

/// A project's record (`$1`) and the scoped token's under a hash (`$2`).
const HOLDERS_RECORD: &str = "SELECT p.record, s.record FROM lc_projects p
    LEFT JOIN lc_scoped_tokens s ON s.sha256 = $2 AND s.project = p.name WHERE p.name = $1";

/// `project`'s record while `holder` is one of its live tokens, in one statement; refused as
/// revoked otherwise.
async fn holders_record(
    client: &impl GenericClient,
    project: &str,
    holder: Holder<'_>,
) -> Result<ProjectRecord, Error> {
    let row = client.cached_query_opt(HOLDERS_RECORD, &[&project, &holder.token_sha256_hex]).await.map_err(pg_error)?;
    let row = row.ok_or_else(super::revoked)?;
    let record: ProjectRecord = from_json("lc_projects", row.get::<_, &str>(0))?;
    let scoped: Option<ScopedTokenRecord> =
        row.get::<_, Option<&str>>(1).map(|json| from_json("lc_scoped_tokens", json)).transpose()?;
    if holder.is_live(&record, scoped.as_ref()) { Ok(record) } else { Err(super::revoked()) }
}

/// What of a lease is stored in its record: not its `reads`, which are a column of their own,
/// nor its `concurrency`, which is derived.
fn stored_lease(lease: &super::Lease) -> super::Lease {
    super::Lease {
        project: lease.project.clone(),
        kind: lease.kind,
        fixed: lease.fixed,
        concurrency: 0,
        order: lease.order,
        renewed_unix_ms: lease.renewed_unix_ms,
        reads: Default::default(),
        holder: lease.holder.clone(),
    }
}

/// Ephemeral records of `table` (all of them, or `project`'s), by ID.
async fn ephemeral_records<T: for<'de> Deserialize<'de>>(
    client: &impl GenericClient,
    table: &'static str,
    project: Option<&str>,
) -> Result<HashMap<String, T>, Error> {
    let rows = match project {
        Some(project) => {
            client.cached_query(&format!("SELECT id, record FROM {table} WHERE project = $1"), &[&project]).await
        }
        None => client.cached_query(&format!("SELECT id, record FROM {table}"), &[]).await,
    };
    rows.map_err(pg_error)?
        .iter()
        .map(|row| Ok((row.get::<_, String>(0), from_json(table, row.get::<_, &str>(1))?)))
        .collect()
}

/// The writes that store what a change made of the records of `table` (all, or `project`'s):
/// `before` it and `after` it.
fn ephemeral_writes<T: Serialize + PartialEq>(
    table: &'static str,
    project: Option<&str>,
    before: &HashMap<String, T>,
    after: &HashMap<String, T>,
    project_of: fn(&T) -> &str,
) -> Vec<Write> {
    let mut writes = Vec::new();
    let gone: Vec<String> = before.keys().filter(|id| !after.contains_key(*id)).cloned().collect();
    if !gone.is_empty() {
        writes.push(Write::new(format!("DELETE FROM {table} WHERE id = ANY($1)"), vec![Box::new(gone)]));
    }
    // Only the records it changed are written: new ones inserted, those that were there updated,
    // never written again (one deleted meanwhile, as a commit takes its save by its row alone,
    // stays deleted). Each kind is one statement, sent only when it has records.
    let changed = after.iter().filter(|(id, record)| before.get(*id).is_none_or(|was| was != *record));
    let (new, kept): (Vec<_>, Vec<_>) = changed.partition(|(id, _)| !before.contains_key(*id));
    debug_assert!(
        new.iter().chain(&kept).all(|(_, record)| project.is_none_or(|project| project_of(record) == project))
    );
    let columns = |records: &[(&String, &T)]| -> Vec<Param> {
        let ids: Vec<String> = records.iter().map(|(id, _)| (*id).clone()).collect();
        let projects: Vec<String> = records.iter().map(|(_, record)| project_of(record).to_owned()).collect();
        let bodies: Vec<String> = records.iter().map(|(_, record)| to_json(record)).collect();
        vec![Box::new(ids), Box::new(projects), Box::new(bodies)]
    };
    if !kept.is_empty() {
        writes.push(Write::new(
            format!(
                "UPDATE {table} SET project = given.project, record = given.record
                 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS given (id, project, record) WHERE {table}.id = given.id"
            ),
            columns(&kept),
        ));
    }
    if !new.is_empty() {
        writes.push(Write::new(
            format!(
                "INSERT INTO {table} (id, project, record) SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])
                 ON CONFLICT (id) DO UPDATE SET project = EXCLUDED.project, record = EXCLUDED.record"
            ),
            columns(&new),
        ));
    }
    writes
}

/// The write that adds each of `changes` to a project's service's counters (made, all zero, if
/// it had none): one statement, nothing read first, the rows locked only from it to the
/// commit. Each counter stops at `u64::MAX` rather than wrap, as [`ServiceCounters::add`] does;
/// a counter a record has and the change does not (one a newer replica added) is kept. Only the
/// counters a change moves are added (a commit's is one), and each record is parsed once. A
/// service appears once in `changes`.
fn counters_write(project: &str, changes: &[(String, ServiceCounters)]) -> Write {
    let services: Vec<String> = changes.iter().map(|(service, _)| service.clone()).collect();
    let records: Vec<String> = changes.iter().map(|(_, change)| to_json(change)).collect();
    Write::new(
        "INSERT INTO lc_counters (project, service, record)
             SELECT $1, service, record FROM UNNEST($2::text[], $3::text[]) AS given (service, record)
         ON CONFLICT (project, service) DO UPDATE SET record = (
             SELECT (was.record || COALESCE(jsonb_object_agg(added.key, LEAST(
                     COALESCE((was.record ->> added.key)::numeric, 0) + added.value::numeric, 18446744073709551615))
                 FILTER (WHERE added.value <> '0'), '{}'))::text
             FROM (SELECT lc_counters.record::jsonb) AS was (record)
                 LEFT JOIN jsonb_each_text(EXCLUDED.record::jsonb) AS added ON true
             GROUP BY was.record)",
        vec![Box::new(project.to_owned()), Box::new(services), Box::new(records)],
    )
}

impl Postgres {
    /// Runs `change` on `project`'s open saves, under the project's open-saves lock, and writes
    /// back what it changed: one transaction of two round trips.
    async fn update_project_open_saves(
        &self,
        project: &str,
        change: &mut (dyn for<'a> FnMut(&'a mut super::OpenSaves) + Send),
    ) -> Result<(), Error> {
        let tx = self.pipelined(&[PROJECT_OPEN_SAVES_LOCK]).await?;
        // Only an unlogged table is written: the commit has no WAL to wait for.
        let by_project: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&project];
        let (_, _, before) = futures::try_join!(
            tx.begin(),
            tx.client().cached_execute(PROJECT_OPEN_SAVES_LOCK, by_project).map_err(pg_error),
            ephemeral_records::<super::OpenSave>(tx.client(), "lc_open_saves", Some(project)),
        )?;
        let mut records = before.clone();
        change(&mut records);
        tx.commit_with(&ephemeral_writes("lc_open_saves", Some(project), &before, &records, |save| &save.project)).await
    }
}

#[async_trait::async_trait]
impl super::Ephemeral for Postgres {
    async fn update_open_saves(
        &self,
        project: &str,
        change: &mut (dyn for<'a> FnMut(&'a mut super::OpenSaves) + Send),
    ) -> Result<(), Error> {
        self.update_project_open_saves(project, change).await
    }

    async fn read_open_saves(
        &self,
        project: Option<&str>,
        read: &mut (dyn for<'a> FnMut(&'a super::OpenSaves) + Send),
    ) -> Result<(), Error> {
        read(&ephemeral_records(&self.client().await?, "lc_open_saves", project).await?);
        Ok(())
    }

    async fn update_leases(
        &self,
        project: &str,
        change: &mut (dyn for<'a> FnMut(&'a mut super::Leases, &'a super::LeaseDemands) -> super::LeaseDemand + Send),
    ) -> Result<(), Error> {
        let tx = self.pipelined(&[PROJECT_LEASES_LOCK]).await?;
        // Only unlogged tables are written: the commit has no WAL to wait for. One round trip
        // for the lock and both reads, one for the writes.
        let (_, (_, before, demands)) = futures::try_join!(tx.begin(), locked_leases(tx.client(), project, None))?;
        let mut leases = before.clone();
        let demand = change(&mut leases, &demands);
        tx.commit_with(&lease_writes(project, &before, &leases, demand)).await
    }

    async fn read_leases(
        &self,
        project: Option<&str>,
        read: &mut (dyn for<'a> FnMut(&'a super::Leases) + Send),
    ) -> Result<(), Error> {
        let client = self.client().await?;
        let leases: super::Leases = match project {
            Some(project) => {
                let rows = client
                    .query("SELECT id, record, reads FROM lc_leases WHERE project = $1", &[&project])
                    .await
                    .map_err(pg_error)?;
                rows.iter()
                    .map(|row| {
                        let mut lease: super::Lease = from_json("lc_leases", row.get::<_, &str>(1))?;
                        lease.reads = row.get::<_, Vec<String>>(2).into_iter().collect();
                        Ok((row.get::<_, String>(0), lease))
                    })
                    .collect::<Result<_, Error>>()?
            }
            None => ephemeral_records(&client, "lc_leases", None).await?,
        };
        read(&leases);
        Ok(())
    }
}

#[async_trait::async_trait]
impl State for Postgres {
    async fn project_lock(&self, project: &str, exclusive: bool) -> Result<Option<Box<dyn Send + Sync>>, Error> {
        let key = lock_key(project);
        let lock = if exclusive { "SELECT pg_advisory_lock($1)" } else { "SELECT pg_advisory_lock_shared($1)" };
        // The guard exists before the lock is asked for: a caller that stops waiting (its
        // request cancelled) drops it, and its unlock, queued behind the lock on the same
        // connection, releases the lock once granted.
        let guard = AdvisoryLock { client: Some(self.lock_client().await?), key, exclusive };
        guard.client.as_ref().expect("held").query_one(lock, &[&key]).await.map_err(pg_error)?;
        Ok(Some(Box::new(guard)))
    }

    async fn lead_background_work(&self) -> Result<Option<Box<dyn Send + Sync>>, Error> {
        let client = self.lock_client().await?;
        let row =
            client.cached_query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK_KEY]).await.map_err(pg_error)?;
        if !row.get::<_, bool>(0) {
            return Ok(None);
        }
        Ok(Some(Box::new(AdvisoryLock { client: Some(client), key: LEADER_LOCK_KEY, exclusive: true })))
    }

    async fn probe(&self) -> Result<i64, Error> {
        Postgres::probe(self).await
    }

    fn shared_clock(&self) -> Option<SharedClock> {
        Some(self.clock())
    }

    // Every transaction is durable once committed (PostgreSQL's synchronous commit).
    async fn durable(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn key_durable(&self, _access: KeyAccess) -> Result<(), Error> {
        Ok(())
    }

    async fn create_project(&self, record: &ProjectRecord) -> Result<(), Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let inserted = tx
            .execute(
                "INSERT INTO lc_projects (name, record) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&record.name, &to_json(record)],
            )
            .await
            .map_err(pg_error)?;
        if inserted == 0 {
            return Err(Error::ProjectExists(record.name.clone()));
        }
        tx.cached_execute(
            "INSERT INTO lc_totals (project, blobs, stored_bytes, manifests) VALUES ($1, 0, 0, 0)
             ON CONFLICT (project) DO UPDATE SET blobs = 0, stored_bytes = 0, manifests = 0",
            &[&record.name],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }

    async fn project(&self, name: &str) -> Result<Option<ProjectRecord>, Error> {
        let client = self.client().await?;
        let row = client.cached_query_opt(PROJECT_RECORD, &[&name]).await.map_err(pg_error)?;
        row.map(|row| from_json("lc_projects", row.get::<_, &str>(0))).transpose()
    }

    async fn holders_project(&self, project: &str, holder: Holder<'_>) -> Result<ProjectRecord, Error> {
        holders_record(&self.client().await?, project, holder).await
    }

    async fn projects(&self) -> Result<Vec<ProjectRecord>, Error> {
        let client = self.client().await?;
        let rows = client.cached_query("SELECT record FROM lc_projects ORDER BY name", &[]).await.map_err(pg_error)?;
        rows.iter().map(|row| from_json("lc_projects", row.get::<_, &str>(0))).collect()
    }

    async fn set_quota(&self, project: &str, quota_bytes: u64) -> Result<ProjectRecord, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let mut record = lock_project(&tx, project).await?.ok_or_else(|| Error::NoSuchProject(project.to_owned()))?;
        record.quota_bytes = quota_bytes;
        put_project(&tx, &record).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(record)
    }

    async fn set_project_token(&self, project: &str, sha256_hex: &str) -> Result<(), Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let mut record = lock_project(&tx, project).await?.ok_or_else(|| Error::NoSuchProject(project.to_owned()))?;
        record.token_sha256_hex = sha256_hex.to_owned();
        put_project(&tx, &record).await?;
        tx.commit().await.map_err(pg_error)
    }

    async fn remove_project(&self, project: &str) -> Result<(), Error> {
        let client = self.client().await?;
        client
            .cached_execute("DELETE FROM lc_scoped_tokens WHERE project = $1", &[&project])
            .await
            .map_err(pg_error)?;
        client.cached_execute("DELETE FROM lc_counters WHERE project = $1", &[&project]).await.map_err(pg_error)?;
        client.cached_execute("DELETE FROM lc_totals WHERE project = $1", &[&project]).await.map_err(pg_error)?;
        client.cached_execute("DELETE FROM lc_projects WHERE name = $1", &[&project]).await.map_err(pg_error)?;
        Ok(())
    }

    async fn insert_minted_key(&self, access_key_id: &str, record: &MintedKeyRecord) -> Result<(), Error> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO lc_minted_keys (access_key_id, project, record) VALUES ($1, $2, $3)
                 ON CONFLICT (access_key_id) DO UPDATE SET project = EXCLUDED.project, record = EXCLUDED.record",
                &[&access_key_id, &record.project, &to_json(record)],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn minted_key(&self, access_key_id: &str) -> Result<Option<MintedKeyRecord>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT record FROM lc_minted_keys WHERE access_key_id = $1", &[&access_key_id])
            .await
            .map_err(pg_error)?;
        row.map(|row| from_json("lc_minted_keys", row.get::<_, &str>(0))).transpose()
    }

    async fn revoke_keys(&self, project: &str, token_id: &str) -> Result<Vec<MintedKeyRecord>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                "DELETE FROM lc_minted_keys WHERE project = $1 AND record::jsonb ->> 'token_id' = $2 RETURNING record",
                &[&project, &token_id],
            )
            .await
            .map_err(pg_error)?;
        rows.iter().map(|row| from_json("lc_minted_keys", row.get::<_, &str>(0))).collect()
    }

    async fn remove_expired_keys(&self, now_unix: i64) -> Result<usize, Error> {
        let client = self.client().await?;
        let removed = client
            .execute("DELETE FROM lc_minted_keys WHERE (record::jsonb ->> 'expires_unix')::bigint < $1", &[&now_unix])
            .await
            .map_err(pg_error)?;
        Ok(removed as usize)
    }

    async fn sweeps_due(&self, now_unix: i64) -> Result<Vec<(String, i64)>, Error> {
        Ok(ledger::sweeps_due(self.projects().await?, now_unix))
    }

    async fn sweep_done(&self, project: &str, due_unix: i64) -> Result<(), Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        if let Some(record) = lock_project(&tx, project).await?.and_then(|record| ledger::sweep_done(&record, due_unix))
        {
            put_project(&tx, &record).await?;
        }
        tx.commit().await.map_err(pg_error)
    }

    async fn insert_scoped_token(&self, sha256_hex: &str, record: &ScopedTokenRecord) -> Result<(), Error> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO lc_scoped_tokens (sha256, project, record) VALUES ($1, $2, $3)
                 ON CONFLICT (sha256) DO UPDATE SET project = EXCLUDED.project, record = EXCLUDED.record",
                &[&sha256_hex, &record.project, &to_json(record)],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn scoped_token(&self, sha256_hex: &str) -> Result<Option<ScopedTokenRecord>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT record FROM lc_scoped_tokens WHERE sha256 = $1", &[&sha256_hex])
            .await
            .map_err(pg_error)?;
        row.map(|row| from_json("lc_scoped_tokens", row.get::<_, &str>(0))).transpose()
    }

    async fn scoped_tokens(&self, project: &str) -> Result<Vec<ScopedTokenRecord>, Error> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT record FROM lc_scoped_tokens WHERE project = $1", &[&project])
            .await
            .map_err(pg_error)?;
        let mut records: Vec<ScopedTokenRecord> =
            rows.iter().map(|row| from_json("lc_scoped_tokens", row.get::<_, &str>(0))).collect::<Result<_, _>>()?;
        records.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(records)
    }

    async fn remove_scoped_tokens(&self, project: &str, id: Option<&str>) -> Result<Vec<ScopedTokenRecord>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                "DELETE FROM lc_scoped_tokens WHERE project = $1 AND ($2::text IS NULL OR record::jsonb ->> 'id' = $2)
                 RETURNING record",
                &[&project, &id],
            )
            .await
            .map_err(pg_error)?;
        rows.iter().map(|row| from_json("lc_scoped_tokens", row.get::<_, &str>(0))).collect()
    }

    async fn manifest(&self, project: &str, service: &str, branch: &str) -> Result<Option<pb::Manifest>, Error> {
        let client = self.client().await?;
        let key = pb::CacheKey { service: service.to_owned(), branch: branch.to_owned() };
        manifest_of(&client, project, &key, false).await
    }

    async fn manifests(&self, project: &str) -> Result<Vec<pb::Manifest>, Error> {
        let client = self.client().await?;
        let rows = client.query(PROJECT_MANIFESTS, &[&project]).await.map_err(pg_error)?;
        rows.iter().map(|row| decode_manifest(row.get::<_, &[u8]>(0))).collect()
    }

    async fn touch_manifest(&self, project: &str, manifest: &pb::Manifest, now_unix: i64) -> Result<(), Error> {
        let Some(touched) = ledger::touched(manifest, now_unix) else { return Ok(()) };
        send_writes(
            &self.client().await?,
            &touches_write(project, &[(manifest, touched)]).into_iter().collect::<Vec<_>>(),
        )
        .await
    }

    async fn look_up(
        &self,
        project: &str,
        holder: Holder<'_>,
        keys: &[pb::CacheKey],
        now_unix: i64,
        grant: &mut super::LookupGrant<'_>,
    ) -> Result<Option<pb::Manifest>, Error> {
        // In the project's next batch (see `lookups.rs`): a miss one round trip, a hit two,
        // whatever the batch's size.
        self.answering()?;
        lookups::look_up(&self.lookups, &self.pool, project, holder, keys, now_unix, grant).await
    }

    async fn commit_manifest(
        &self,
        project: &str,
        manifest: &pb::Manifest,
        generation: u64,
        new_blobs: &HashMap<String, BlobRecord>,
        now_unix: i64,
    ) -> Result<Committed, Error> {
        let key = manifest.key.clone().unwrap_or_default();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let record = lock_project(&tx, project).await?.ok_or_else(|| Error::NoSuchProject(project.to_owned()))?;
        let old = manifest_of(&tx, project, &key, true).await?;
        let digests: Vec<String> = ledger::commit_digests(manifest, old.as_ref()).into_iter().collect();
        let known = lock_blobs(&tx, project, &digests).await?;
        let view = ledger::CommitView { project: &record, old, known: &known };
        let (committed, change) = ledger::commit(view, manifest, generation, new_blobs, now_unix)?;
        apply(&tx, project, &change).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(committed)
    }

    async fn begin_save(
        &self,
        project: &str,
        holder: Holder<'_>,
        digests: &[String],
        register: &mut super::BeginRegister<'_>,
    ) -> Result<(), Error> {
        // In the project's next batch (see `begins.rs`): two round trips, whatever the
        // batch's size.
        self.answering()?;
        begins::begin(&self.begins, &self.pool, project, holder, digests, register).await
    }

    async fn commit_known(
        &self,
        project: &str,
        holder: Holder<'_>,
        manifest: &pb::Manifest,
        generation: u64,
        new_blobs: &HashMap<String, BlobRecord>,
        now_unix: i64,
        check: &mut super::CommitCheck<'_>,
        save_id: &str,
    ) -> Result<Option<Committed>, Error> {
        // In the project's next batch (see `commits.rs`): two round trips, whatever the
        // batch's size.
        self.answering()?;
        let queues = &self.commits;
        commits::commit(queues, &self.pool, project, holder, manifest, generation, new_blobs, now_unix, check, save_id)
            .await
    }

    async fn remove_manifest(
        &self,
        project: &str,
        key: &pb::CacheKey,
        now_unix: i64,
    ) -> Result<Option<Vec<String>>, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        lock_project(&tx, project).await?;
        let row = tx
            .query_opt(
                "DELETE FROM lc_manifests WHERE project = $1 AND service = $2 AND branch = $3 RETURNING body",
                &[&project, &key.service, &key.branch],
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = row else { return Ok(None) };
        let manifest = decode_manifest(row.get::<_, &[u8]>(0))?;
        let digests: Vec<String> = manifest_digests(&manifest).into_iter().collect();
        let known = lock_blobs(&tx, project, &digests).await?;
        // The manifest is deleted above (its row read as it went): the change set's removal finds none.
        let (unreferenced, change) = ledger::evict(&manifest, &known, now_unix);
        apply(&tx, project, &change).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(Some(unreferenced))
    }

    async fn totals(&self, project: &str) -> Result<ProjectTotals, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT blobs, stored_bytes, manifests FROM lc_totals WHERE project = $1", &[&project])
            .await
            .map_err(pg_error)?;
        Ok(row.map_or_else(ProjectTotals::default, |row| ProjectTotals {
            blobs: row.get::<_, i64>(0) as u64,
            stored_bytes: row.get::<_, i64>(1) as u64,
            manifests: row.get::<_, i64>(2) as u64,
        }))
    }

    async fn service_counters(&self, project: Option<&str>) -> Result<Vec<(String, String, ServiceCounters)>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT project, service, record FROM lc_counters WHERE $1::text IS NULL OR project = $1
                 ORDER BY project, service",
                &[&project],
            )
            .await
            .map_err(pg_error)?;
        rows.iter().map(|row| Ok((row.get(0), row.get(1), from_json("lc_counters", row.get::<_, &str>(2))?))).collect()
    }

    async fn add_to_counters(&self, project: &str, service: &str, change: &ServiceCounters) -> Result<(), Error> {
        // One statement, its own transaction.
        send_writes(&self.client().await?, &[counters_write(project, &[(service.to_owned(), change.clone())])]).await
    }

    async fn flush_project(&self, project: &str) -> Result<FlushedRecords, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let record = lock_project(&tx, project).await?.ok_or_else(|| Error::NoSuchProject(project.to_owned()))?;
        let rows = tx
            .query("SELECT service, branch FROM lc_manifests WHERE project = $1 FOR UPDATE", &[&project])
            .await
            .map_err(pg_error)?;
        let manifests = rows.iter().map(|row| pb::CacheKey { service: row.get(0), branch: row.get(1) }).collect();
        let rows = tx
            .query("SELECT digest FROM lc_blobs WHERE project = $1 FOR UPDATE", &[&project])
            .await
            .map_err(pg_error)?;
        let blobs = rows.iter().map(|row| row.get(0)).collect();
        let rows = tx
            .query("SELECT access_key_id, record FROM lc_minted_keys WHERE project = $1 FOR UPDATE", &[&project])
            .await
            .map_err(pg_error)?;
        let keys = rows
            .iter()
            .map(|row| Ok((row.get::<_, String>(0), from_json("lc_minted_keys", row.get::<_, &str>(1))?)))
            .collect::<Result<_, Error>>()?;
        let (flushed, change) = ledger::flush(ledger::FlushView { project: &record, manifests, blobs, keys });
        apply(&tx, project, &change).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(flushed)
    }

    async fn stored_blobs(&self, project: &str, digests: &[String]) -> Result<HashMap<String, BlobRecord>, Error> {
        let client = self.client().await?;
        let rows = client.query(BLOBS_OF, &[&project, &digests]).await.map_err(pg_error)?;
        blob_records(&rows)
    }

    async fn ledger_digests(&self, project: &str) -> Result<HashSet<String>, Error> {
        let client = self.client().await?;
        let rows = client
            .cached_query("SELECT digest FROM lc_blobs WHERE project = $1", &[&project])
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    async fn drop_blob(&self, project: &str, digest: &str, now_unix: i64) -> Result<u64, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        lock_project(&tx, project).await?;
        let rows = tx
            .query("SELECT service, branch, body FROM lc_manifests WHERE project = $1 FOR UPDATE", &[&project])
            .await
            .map_err(pg_error)?;
        let mut naming = Vec::new();
        for row in &rows {
            let manifest = decode_manifest(row.get::<_, &[u8]>(2))?;
            if manifest_digests(&manifest).contains(digest) {
                naming.push(manifest);
            }
        }
        let digests: Vec<String> = ledger::drop_digests(&naming, digest).into_iter().collect();
        let known = lock_blobs(&tx, project, &digests).await?;
        let change = ledger::drop_blob(&naming, &known, digest, now_unix);
        apply(&tx, project, &change).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(naming.len() as u64)
    }

    async fn unreferenced_blobs(&self, project: &str, now_unix: i64) -> Result<Vec<(String, BlobRecord)>, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let rows = tx
            .query(
                "SELECT digest, record FROM lc_blobs WHERE project = $1 AND refs = 0 ORDER BY digest FOR UPDATE",
                &[&project],
            )
            .await
            .map_err(pg_error)?;
        let records = blob_records(&rows)?;
        let (unreferenced, change) = ledger::unreferenced(records, now_unix);
        apply(&tx, project, &change).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(unreferenced)
    }

    async fn forget_unreferenced(&self, project: &str, digests: &[String]) -> Result<Vec<(String, BlobRecord)>, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        lock_project(&tx, project).await?;
        let known = lock_blobs(&tx, project, digests).await?;
        let (forgotten, change) = ledger::forget_unreferenced(&known, digests);
        apply(&tx, project, &change).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(forgotten)
    }
}

/// Creates a database of its own on the server at `server_url` (a test's), returning its URL.
#[cfg(test)]
pub(crate) async fn new_test_database(server_url: &str) -> String {
    let config: tokio_postgres::Config = server_url.parse().expect("CACHE_TEST_POSTGRES_URL");
    let (client, connection) = config.connect(NoTls).await.expect("connect to the test server");
    tokio::spawn(connection);
    let name = format!("lc_test_{}_{}", std::process::id(), crate::tokens::random_hex_32().get(..12).unwrap_or("0"));
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create a test database");
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
    };
    let user = config.get_user().unwrap_or("postgres");
    format!("postgres://{user}@{host}:{}/{name}", config.get_ports().first().copied().unwrap_or(5432))
}

#[cfg(test)]
mod tests {
    use proto::clock::Clock;

    use super::*;
    use crate::state::State;

    /// The server `CACHE_TEST_POSTGRES_URL` names; `None` outside CI when it is unset.
    fn test_server() -> Option<String> {
        let Ok(server) = std::env::var("CACHE_TEST_POSTGRES_URL") else {
            let in_ci = std::env::var("CI").is_ok_and(|value| value == "true" || value == "1");
            assert!(!in_ci, "CACHE_TEST_POSTGRES_URL is not set: .ci/run starts PostgreSQL and sets it");
            eprintln!("skipping: CACHE_TEST_POSTGRES_URL is not set");
            return None;
        };
        Some(server)
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_at_once_as_unavailable_in_words_that_blame_the_database() {
        // A port bound but not listening: connections are refused.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        let started = Instant::now();
        let error = Postgres::connect(&format!("postgres://cache@127.0.0.1:{port}/cache")).await.err().unwrap();
        assert!(started.elapsed() < CONNECT_TIMEOUT, "{:?}", started.elapsed());
        assert!(matches!(error, Error::DatabaseUnavailable { .. }), "{error:?}");
        assert!(error.line().ends_with("Connection refused (os error 111)"), "{}", error.line());
        // The caller hears UNAVAILABLE without the connection's words, which a worker would
        // read as the coordinator itself being unreachable.
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.message(),
            "database error: PostgreSQL: the coordinator's database is unavailable (stopped, restarting or too busy): \
             try again once it is back"
        );
        // No connection free in time is the same; a refused statement is not.
        assert!(unavailable(&deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)));
    }

    /// A pool of one connection to a new database with a table `t (n int)` (with the sender
    /// that would cut its connection: kept, or they are cut), and a connection of its own to
    /// look at it from outside.
    async fn one_connection_pool(server: &str) -> (Pool, tokio::sync::watch::Sender<u64>, tokio_postgres::Client) {
        let url = new_test_database(server).await;
        let (outside, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(connection);
        outside.batch_execute("CREATE TABLE t (n INTEGER NOT NULL)").await.unwrap();
        let cut = tokio::sync::watch::Sender::new(0);
        (bounded_pool(url.parse().unwrap(), &cut, 1, STATE_POOL_WAIT, None).unwrap(), cut, outside)
    }

    async fn rows_of_t(outside: &tokio_postgres::Client) -> Vec<i32> {
        let rows = outside.query("SELECT n FROM t ORDER BY n", &[]).await.unwrap();
        rows.iter().map(|row| row.get(0)).collect()
    }

    #[tokio::test]
    async fn a_statement_prepared_first_runs_before_those_joined_after_it_even_ones_prepared_earlier() {
        let Some(server) = test_server() else { return };
        let (pool, _cut, _outside) = one_connection_pool(&server).await;
        // Each time a write and a read the connection has not seen: it prepares the read first
        // (as another call's would be), not the write the read follows.
        let joined = |prepare_first: bool, first: &'static str, after: &'static str| {
            let pool = pool.clone();
            async move {
                let tx = Pipelined::new(pool.get().await.unwrap());
                tx.client().prepare_cached(after).await.unwrap();
                if prepare_first {
                    prepare_all(tx.client(), [first]).await.unwrap();
                }
                let (_, _, count) = futures::try_join!(
                    tx.begin(),
                    tx.client().cached_execute(first, &[]).map_err(pg_error),
                    tx.client().cached_query_one(after, &[]).map_err(pg_error),
                )
                .unwrap();
                tx.rollback().await.unwrap();
                count.get::<_, i64>(0)
            }
        };
        // Without it the read overtakes the write: the order it keeps is not a given.
        assert_eq!(joined(false, "INSERT INTO t (n) VALUES (1)", "SELECT count(*) FROM t").await, 0);
        assert_eq!(joined(true, "INSERT INTO t (n) VALUES (2)", "SELECT count(*) FROM t WHERE n > 0").await, 1);
    }

    #[tokio::test]
    async fn a_pipelined_transactions_writes_are_all_in_it_even_on_a_connection_that_never_prepared_them() {
        let Some(server) = test_server() else { return };
        let (pool, _cut, outside) = one_connection_pool(&server).await;
        // Statements this connection never prepared: were the COMMIT sent while they were
        // being prepared, they would run after it, each on its own, and the first would stay.
        let tx = Pipelined::new(pool.get().await.unwrap());
        tx.begin().await.unwrap();
        let writes = [
            Write::new("INSERT INTO t (n) VALUES ($1)", vec![Box::new(1i32)]),
            Write::new("INSERT INTO t (n) VALUES ($1 / 0)", vec![Box::new(2i32)]),
        ];
        let error = tx.commit_with(&writes).await.unwrap_err();
        assert!(format!("{error:?}").contains("division by zero"), "{error:?}");
        drop(tx);
        assert_eq!(rows_of_t(&outside).await, Vec::<i32>::new(), "a failed write rolls all of them back");

        let tx = Pipelined::new(pool.get().await.unwrap());
        let (_, count) = futures::try_join!(
            tx.begin(),
            tx.client().cached_query_one("SELECT count(*) FROM t", &[]).map_err(pg_error)
        )
        .unwrap();
        assert_eq!(count.get::<_, i64>(0), 0);
        tx.commit_with(&[Write::new("INSERT INTO t (n) VALUES ($1), ($2)", vec![Box::new(3i32), Box::new(4i32)])])
            .await
            .unwrap();
        assert_eq!(rows_of_t(&outside).await, vec![3, 4]);
    }

    #[tokio::test]
    async fn sessions_keep_the_plan_made_when_a_statement_was_prepared_and_scan_indexes_unless_the_url_says_otherwise()
    {
        let Some(server) = test_server() else { return };
        let url = new_test_database(&server).await;
        let cut = tokio::sync::watch::Sender::new(0);
        let modes = |url: String| {
            let config: tokio_postgres::Config = url.parse().unwrap();
            let pool = bounded_pool(config.clone(), &cut, 1, STATE_POOL_WAIT, state_session(&config)).unwrap();
            async move {
                let client = pool.get().await.unwrap();
                let plans = client.query_one("SHOW plan_cache_mode", &[]).await.unwrap();
                let bitmaps = client.query_one("SHOW enable_bitmapscan", &[]).await.unwrap();
                (plans.get::<_, String>(0), bitmaps.get::<_, String>(0))
            }
        };
        assert_eq!(modes(url.clone()).await, ("force_generic_plan".into(), "off".into()));
        assert_eq!(modes(format!("{url}?options=-c%20plan_cache_mode%3Dauto")).await, ("auto".into(), "off".into()));
        let both = format!("{url}?options=-c%20plan_cache_mode%3Dauto%20-c%20enable_bitmapscan%3Don");
        assert_eq!(modes(both).await, ("auto".into(), "on".into()));
    }

    #[tokio::test]
    async fn a_pipelined_transaction_dropped_unfinished_is_rolled_back_before_its_connection_is_used_again() {
        let Some(server) = test_server() else { return };
        let (pool, _cut, outside) = one_connection_pool(&server).await;
        let tx = Pipelined::new(pool.get().await.unwrap());
        let (_, inserted) = futures::try_join!(
            tx.begin(),
            tx.client().cached_execute("INSERT INTO t (n) VALUES (1)", &[]).map_err(pg_error)
        )
        .unwrap();
        assert_eq!(inserted, 1);
        // A caller that went away (its request cancelled) drops the transaction unfinished.
        drop(tx);
        // The pool's one connection comes back only once rolled back: what it runs next is not
        // inside the abandoned transaction, and commits on its own.
        let client = tokio::time::timeout(Duration::from_secs(5), pool.get()).await.unwrap().unwrap();
        client.batch_execute("INSERT INTO t (n) VALUES (2)").await.unwrap();
        assert_eq!(rows_of_t(&outside).await, vec![2]);
    }

    #[tokio::test]
    async fn counters_are_added_in_one_statement_stop_at_the_largest_count_and_keep_fields_they_do_not_name() {
        let Some(server) = test_server() else { return };
        let url = new_test_database(&server).await;
        let state = Postgres::connect(&url).await.unwrap();
        let (outside, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(connection);
        let change = ServiceCounters { saves: 1, bytes_found: 7, ..Default::default() };
        state.add_to_counters("p", "web", &change).await.unwrap();
        async fn stored(outside: &tokio_postgres::Client) -> serde_json::Value {
            let query = "SELECT record FROM lc_counters WHERE project = 'p' AND service = 'web'";
            serde_json::from_str(outside.query_one(query, &[]).await.unwrap().get::<_, &str>(0)).unwrap()
        }
        assert_eq!(stored(&outside).await["saves"], 1, "made with the first change");
        // A record with a count near the largest and a counter a newer replica added.
        let mut record = stored(&outside).await;
        record["bytes_found"] = serde_json::json!(u64::MAX - 2);
        record["from_a_newer_replica"] = serde_json::json!(5);
        outside
            .execute("UPDATE lc_counters SET record = $1 WHERE project = 'p'", &[&record.to_string()])
            .await
            .unwrap();
        state.add_to_counters("p", "web", &change).await.unwrap();
        let record = stored(&outside).await;
        assert_eq!(record["saves"], 2);
        assert_eq!(record["bytes_found"], u64::MAX, "stops at the largest count rather than wrap");
        assert_eq!(record["from_a_newer_replica"], 5);
        state.add_to_counters("p", "web", &ServiceCounters::default()).await.unwrap();
        assert_eq!(stored(&outside).await, record, "a change of nothing changes nothing");
        let counters = state.service_counters(Some("p")).await.unwrap();
        assert_eq!(counters[0].2.bytes_found, u64::MAX);
        assert_eq!(counters[0].2.saves, 2);
    }

    #[tokio::test]
    async fn sessions_the_server_ended_are_replaced_and_their_locks_do_not_wedge_a_project() {
        let Some(server) = test_server() else { return };
        let url = new_test_database(&server).await;
        let (state, other) = (Postgres::connect(&url).await.unwrap(), Postgres::connect(&url).await.unwrap());
        // The database's clock, on this machine: the same as the system's, to within the test's pace.
        let offset = state.clock().now_unix_ms() - proto::clock::SystemClock.now_unix_ms();
        assert!(offset.abs() < 1_000, "{offset} ms");
        let epoch = state.probe().await.unwrap();
        assert_eq!(state.probe().await.unwrap(), epoch, "the server did not restart");

        let record = ProjectRecord {
            name: "a".into(),
            token_sha256_hex: String::new(),
            created_unix: 0,
            generation: 0,
            quota_bytes: 0,
            sweep_after_unix: 0,
        };
        state.create_project(&record).await.unwrap();
        let held = state.project_lock("a", true).await.unwrap();
        // The server ends every session of this database (as a restart does, to the client).
        let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(connection);
        let ended: i64 = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ended >= 3, "{ended} sessions ended");
        // The lock went with its session: another replica takes it at once.
        let taken = tokio::time::timeout(Duration::from_secs(5), other.project_lock("a", true)).await;
        let taken = taken.expect("the dead session's lock is free").unwrap();
        drop((held, taken));

        // A pooled connection whose end was not seen yet fails one call, as unavailable; then
        // the pool has made new ones, with no restart of anything.
        let mut failures = 0;
        for _ in 0..2 * STATE_CONNECTIONS {
            match state.project("a").await {
                Ok(found) => assert_eq!(found, Some(record.clone())),
                Err(Error::DatabaseUnavailable { .. }) => failures += 1,
                Err(error) => panic!("{error:?}"),
            }
        }
        assert!(failures <= STATE_CONNECTIONS, "{failures} calls failed");
        assert_eq!(state.project("a").await.unwrap(), Some(record));
        assert!(state.project_lock("a", false).await.is_ok());
        assert_eq!(state.probe().await.unwrap(), epoch);
        // A statement the server refuses is an error of its own, not an outage.
        let refused = client.batch_execute("SELECT no_such_column FROM lc_projects").await.unwrap_err();
        assert!(matches!(pg_error(refused), Error::Database { .. }));
    }
}
