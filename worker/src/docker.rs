//! The local Docker engine, through bollard: the image chain, the classic builder's other build
//! stages, `docker save` as a stream, and `docker load` from a stream. The only file that
//! imports bollard.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use proto::v1 as pb;
use tokio::time::Instant;

/// bollard's own cap on a call, far above any deadline here: a save or load of a large chain
/// can take many minutes, and its 120 s default covers the wait for the export's first byte.
/// A call ends long before on `--stall-timeout` when the engine stops answering ([`watch`]).
const ENGINE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// How often a waiting call asks the engine whether it is alive (`/_ping`), and how long one
/// such ask may take.
const PING_EVERY: Duration = Duration::from_secs(1);
const PING_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the Docker engine at {host}: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("no image {0:?} in the Docker engine")]
    NoSuchImage(String),
    #[error("the Docker engine failed to {action}: {reason}")]
    Failed { action: &'static str, reason: String },
    /// A call made no progress and the engine answered no ping for the whole deadline (a
    /// frozen or wedged dockerd).
    #[error("the Docker engine at {host} did not answer for {seconds} s (--stall-timeout)")]
    Stalled { host: String, seconds: u64 },
}

impl EngineError {
    /// The engine's stall behind an I/O error of a reader of [`Engine::export`], if that is
    /// what ended it (the tar reader passes its source's errors on).
    pub fn stall_behind(error: &std::io::Error) -> Option<EngineError> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = error.get_ref().map(|inner| inner as _);
        while let Some(error) = cause {
            if let Some(EngineError::Stalled { host, seconds }) = error.downcast_ref::<EngineError>() {
                return Some(EngineError::Stalled { host: host.clone(), seconds: *seconds });
            }
            // An I/O error's own `source` skips the error it wraps.
            cause = match error.downcast_ref::<std::io::Error>() {
                Some(io) => io.get_ref().map(|inner| inner as _),
                None => error.source(),
            };
        }
        None
    }
}

/// The last image of a build stage the named images do not contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageLeaf {
    pub id: String,
    /// The image of the named chains the stage grew from (its `FROM`, or a step of one).
    pub base: String,
}

/// One image of a chain, as the engine knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineImage {
    /// `sha256:<hex>` of the config.
    pub id: String,
    /// Empty at the root of a chain.
    pub parent_id: String,
    pub repo_tags: Vec<String>,
    /// Diff IDs, bottom layer first.
    pub diff_ids: Vec<String>,
    /// On the containerd image store, the media type of the index or manifest `id` names.
    pub media_type: String,
}

pub struct Engine {
    docker: bollard::Docker,
    watchdog: Arc<Watchdog>,
}

/// When a call last showed the engine alive: a byte or a message of its own, or an answer to a
/// ping.
struct Signs(std::sync::Mutex<Instant>);

impl Signs {
    fn new() -> Signs {
        Signs(std::sync::Mutex::new(Instant::now()))
    }

    fn mark(&self) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The rule every engine call runs under: `call` is given up (`None`) once, for `stall`, it
/// showed no sign of life (`signs`, marked by the call's own bytes and messages) and the engine
/// answered none of the pings sent every [`PING_EVERY`]. An engine that goes quiet while it
/// works (`docker save` writing its export to a temporary folder first, the containerd store
/// unpacking after a load's last byte) still answers pings; a frozen one answers nothing.
async fn watch<T, P: Future<Output = bool>>(
    call: impl Future<Output = T>,
    signs: &Signs,
    stall: Duration,
    ping: impl Fn() -> P,
) -> Option<T> {
    let pinging = async {
        loop {
            tokio::time::sleep(PING_EVERY).await;
            if tokio::time::timeout(PING_WAIT, ping()).await == Ok(true) {
                signs.mark();
            }
        }
    };
    let expiring = async {
        loop {
            let deadline = signs.last() + stall;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        biased;
        out = call => Some(out),
        () = expiring => None,
        () = pinging => None,
    }
}

/// The engine's deadline, in one place: every call of [`Engine`] goes through [`Watchdog::watch`].
struct Watchdog {
    host: String,
    stall: Duration,
    /// A client of its own, so a ping never queues behind the call it vouches for.
    pinger: bollard::Docker,
    /// Set once a call stalled: every later call fails at once rather than waiting again.
    stalled: AtomicBool,
}

impl Watchdog {
    fn stalled(&self) -> EngineError {
        EngineError::Stalled { host: self.host.clone(), seconds: self.stall.as_secs() }
    }

    /// Runs `call` under [`watch`], with the pings sent on the watchdog's own client.
    async fn watch<T>(&self, call: impl Future<Output = T>, signs: &Signs) -> Result<T, EngineError> {
        if self.stalled.load(Ordering::SeqCst) {
            return Err(self.stalled());
        }
        let ping = || {
            let pinger = self.pinger.clone();
            async move { pinger.ping().await.is_ok() }
        };
        match watch(call, signs, self.stall, ping).await {
            Some(out) => Ok(out),
            None => {
                self.stalled.store(true, Ordering::SeqCst);
                Err(self.stalled())
            }
        }
    }

    /// A call whose only progress is its answer.
    async fn call<T>(&self, call: impl Future<Output = T>) -> Result<T, EngineError> {
        self.watch(call, &Signs::new()).await
    }
}

/// Where and how an engine keeps its images (`docker info`).
#[derive(Debug, Clone)]
pub struct Storage {
    /// The graph driver (`overlay2`), or the snapshotter on the containerd image store.
    pub driver: String,
    /// `DockerRootDir`, as a path on the engine's host.
    pub data_root: std::path::PathBuf,
    pub containerd_store: bool,
    /// `DOCKER_HOST`, or the default socket.
    pub host: String,
    /// The socket of the engine's containerd, as the engine names it (API 1.46 and later), on
    /// the engine's host.
    pub containerd_socket: Option<std::path::PathBuf>,
}

impl Storage {
    /// Whether the engine is reached through a unix socket or loopback, so it may run on this
    /// host.
    pub fn is_local(&self) -> bool {
        is_local(&self.host)
    }
}

fn failed(action: &'static str) -> impl Fn(bollard::errors::Error) -> EngineError {
    move |error| EngineError::Failed { action, reason: error.to_string() }
}

/// Whether `DOCKER_HOST` names an engine on this host: its socket, or a TCP port on loopback
/// (a sidecar engine in the same pod, whose data root a shared volume may hold).
fn is_local(host: &str) -> bool {
    let Some(address) = host.strip_prefix("tcp://") else { return host.is_empty() || host.starts_with("unix://") };
    let name = address.rsplit_once(':').map_or(address, |(name, _)| name);
    matches!(name, "localhost" | "127.0.0.1" | "[::1]")
}

/// Tags worth keeping: the engine reports untagged images as `<none>:<none>`.
/// The longest instruction a step records (the coordinator's bound), cut at a character.
const MOST_INSTRUCTION_BYTES: usize = 4096;

fn truncate_instruction(mut instruction: String) -> String {
    if instruction.len() > MOST_INSTRUCTION_BYTES {
        let mut end = MOST_INSTRUCTION_BYTES;
        while !instruction.is_char_boundary(end) {
            end -= 1;
        }
        instruction.truncate(end);
    }
    instruction
}

/// The path of the Unix socket `host` (`DOCKER_HOST`) names, when it names one that exists; else
/// `None`, and bollard connects as it would (and says why it cannot).
fn unix_socket(host: &str) -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from(host.strip_prefix("unix://")?);
    path.exists().then_some(path)
}

/// A client of the engine's Unix socket that writes request bodies as they are, with vectored
/// writes. bollard's own (hyperlocal's stream) does not tell hyper it can, so hyper copies every
/// byte of a `docker load` stream into one buffer first: 15% of a restore's CPU, on the cores
/// the engine's unpacking needs. The URI is a placeholder: the connector dials the socket. Like
/// bollard's, it keeps no idle connection.
fn connect_unix(socket: std::path::PathBuf) -> Result<bollard::Docker, bollard::errors::Error> {
    let connector = tower::service_fn(move |_: http::Uri| {
        let socket = socket.clone();
        Box::pin(async move { tokio::net::UnixStream::connect(socket).await.map(hyper_util::rt::TokioIo::new) })
    });
    let mut builder = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    builder.pool_max_idle_per_host(0);
    let client = Arc::new(builder.build(connector));
    let transport = move |request: bollard::BollardRequest| {
        let client = Arc::clone(&client);
        async move { client.request(request).await.map_err(bollard::errors::Error::from) }
    };
    bollard::Docker::connect_with_custom_transport(
        transport,
        Some("http://docker.sock"),
        ENGINE_TIMEOUT.as_secs(),
        bollard::API_DEFAULT_VERSION,
    )
}

fn real_tags(tags: &[String]) -> Vec<String> {
    tags.iter().filter(|tag| !tag.contains("<none>")).cloned().collect()
}

impl Engine {
    /// Connects to the engine `DOCKER_HOST` names, or the local socket. Every call, this
    /// connection's first ping too, fails once it went `stall` without progress while the
    /// engine answered no ping (`--stall-timeout`).
    pub async fn connect(stall: Duration) -> Result<Engine, EngineError> {
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|host| !host.is_empty())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let unreachable = |reason: String| EngineError::Unreachable { host: host.clone(), reason };
        let client = || match unix_socket(&host) {
            Some(socket) => connect_unix(socket).map_err(|error| unreachable(error.to_string())),
            None => bollard::Docker::connect_with_defaults().map_err(|error| unreachable(error.to_string())),
        };
        let docker = client()?.with_timeout(ENGINE_TIMEOUT);
        let pinger = client()?.with_timeout(PING_WAIT);
        let watchdog = Arc::new(Watchdog { host: host.clone(), stall, pinger, stalled: AtomicBool::new(false) });
        watchdog.call(docker.ping()).await?.map_err(|error| unreachable(error.to_string()))?;
        Ok(Engine { docker, watchdog })
    }

    /// The engine's version, e.g. "20.10.24+dfsg1".
    pub async fn version(&self) -> Result<String, EngineError> {
        let version = self.watchdog.call(self.docker.version()).await?.map_err(failed("report its version"))?;
        Ok(version.version.unwrap_or_default())
    }

    /// Whether the engine keeps images in the containerd image store (the default of fresh
    /// Engine 29 installs), where image IDs are manifest digests rather than config digests,
    /// `docker save` writes layers as the compressed blobs it holds, and loaded images do not
    /// serve as build cache (README, "Engines").
    pub async fn uses_containerd_store(&self) -> Result<bool, EngineError> {
        Ok(self.storage().await?.containerd_store)
    }

    /// Where and how the engine keeps its images.
    pub async fn storage(&self) -> Result<Storage, EngineError> {
        let info = self.watchdog.call(self.docker.info()).await?.map_err(failed("report its configuration"))?;
        let driver_status = info.driver_status.unwrap_or_default();
        let containerd_store =
            driver_status.iter().any(|pair| pair.iter().any(|value| value.starts_with("io.containerd.snapshotter")));
        Ok(Storage {
            driver: info.driver.unwrap_or_default(),
            data_root: info.docker_root_dir.unwrap_or_default().into(),
            containerd_store,
            host: self.watchdog.host.clone(),
            containerd_socket: info.containerd.and_then(|containerd| containerd.address).map(Into::into),
        })
    }

    /// The image ID a reference (tag or ID) resolves to, if the engine has it.
    pub async fn image_id(&self, reference: &str) -> Result<Option<String>, EngineError> {
        match self.watchdog.call(self.docker.inspect_image(reference)).await? {
            Ok(inspect) => Ok(inspect.id),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(error) => Err(failed("inspect an image")(error)),
        }
    }

    async fn diff_ids(&self, id: &str) -> Result<Vec<String>, EngineError> {
        Ok(self.layers_and_media_type(id).await?.0)
    }

    /// An image's diff IDs and, on the containerd image store, the media type of its index or
    /// manifest (API 1.46 and later report it).
    async fn layers_and_media_type(&self, id: &str) -> Result<(Vec<String>, String), EngineError> {
        let inspect = self.watchdog.call(self.docker.inspect_image(id)).await?.map_err(failed("inspect an image"))?;
        let media_type = inspect.descriptor.and_then(|descriptor| descriptor.media_type).unwrap_or_default();
        Ok((inspect.root_fs.and_then(|root_fs| root_fs.layers).unwrap_or_default(), media_type))
    }

    /// An image's build history, oldest step first, as the engine records it.
    pub async fn history(&self, id: &str) -> Result<Vec<pb::Step>, EngineError> {
        let items =
            self.watchdog.call(self.docker.image_history(id)).await?.map_err(failed("read an image's history"))?;
        Ok(items
            .into_iter()
            .rev()
            .map(|item| pb::Step {
                instruction: truncate_instruction(item.created_by),
                created_unix: item.created,
                size: item.size.max(0) as u64,
            })
            .collect())
    }

    /// The image `id` grew FROM: of the tagged images whose layers begin its layers and whose
    /// history begins its history (`history`), the one with the longest history, with that
    /// history's length. `None`: no such image here (FROM scratch, or a base since removed).
    pub async fn base_of(
        &self,
        id: &str,
        diff_ids: &[String],
        history: &[pb::Step],
    ) -> Result<Option<(String, String, usize)>, EngineError> {
        let listing = self.docker.list_images(None::<bollard::query_parameters::ListImagesOptions>);
        let summaries = self.watchdog.call(listing).await?.map_err(failed("list images"))?;
        let mut best: Option<(String, String, usize)> = None;
        for summary in summaries.iter().filter(|summary| summary.id != id) {
            let Some(tag) = real_tags(&summary.repo_tags).into_iter().min() else { continue };
            let layers = self.diff_ids(&summary.id).await?;
            if layers.len() > diff_ids.len() || diff_ids[..layers.len()] != layers[..] {
                continue;
            }
            let theirs = self.history(&summary.id).await?;
            let longer = best.as_ref().is_none_or(|(_, _, n)| theirs.len() > *n);
            if theirs.len() < history.len() && history[..theirs.len()] == theirs[..] && longer {
                best = Some((tag, summary.id.clone(), theirs.len()));
            }
        }
        Ok(best)
    }

    /// Every image of the chains of `references`: each named image and its parents to the root,
    /// parents before children, each once. The image list carries the parent links (bollard's
    /// inspect lacks `Parent`).
    pub async fn image_chain(&self, references: &[String]) -> Result<Vec<EngineImage>, EngineError> {
        let options = bollard::query_parameters::ListImagesOptions { all: true, ..Default::default() };
        let summaries = self.list_images(options).await?;
        let by_id: HashMap<&str, &bollard::models::ImageSummary> =
            summaries.iter().map(|summary| (summary.id.as_str(), summary)).collect();
        let mut ids = Vec::new();
        for reference in references {
            ids.push(self.image_id(reference).await?.ok_or_else(|| EngineError::NoSuchImage(reference.clone()))?);
        }
        let mut chain: Vec<EngineImage> = Vec::new();
        for id in ids {
            // Walk up to the root, then add the unseen part of the walk root first.
            let mut walk = Vec::new();
            let mut current = Some(id);
            while let Some(id) = current.take() {
                if chain.iter().any(|image| image.id == id) || walk.iter().any(|image: &EngineImage| image.id == id) {
                    break;
                }
                let summary = by_id.get(id.as_str());
                let parent_id = summary.map(|summary| summary.parent_id.clone()).unwrap_or_default();
                let (diff_ids, media_type) = self.layers_and_media_type(&id).await?;
                walk.push(EngineImage {
                    repo_tags: summary.map(|summary| real_tags(&summary.repo_tags)).unwrap_or_default(),
                    diff_ids,
                    media_type,
                    id,
                    parent_id: parent_id.clone(),
                });
                if !parent_id.is_empty() {
                    current = Some(parent_id);
                }
            }
            walk.reverse();
            chain.extend(walk);
        }
        Ok(chain)
    }

    /// The build stages that the chains of `references` do not contain: the leaves of the
    /// untagged images that descend from an image of those chains through untagged images only
    /// (the classic builder leaves each step of each stage as an untagged image), each with
    /// the image of those chains it grew from, sorted by ID.
    pub async fn stage_leaves(&self, references: &[String]) -> Result<Vec<StageLeaf>, EngineError> {
        let options = bollard::query_parameters::ListImagesOptions { all: true, ..Default::default() };
        let summaries = self.list_images(options).await?;
        let parent_of: HashMap<&str, &str> =
            summaries.iter().map(|summary| (summary.id.as_str(), summary.parent_id.as_str())).collect();
        let mut in_chains: HashSet<&str> = HashSet::new();
        for reference in references {
            let id = self.image_id(reference).await?.ok_or_else(|| EngineError::NoSuchImage(reference.clone()))?;
            let mut current = summaries.iter().find(|summary| summary.id == id).map(|summary| summary.id.as_str());
            while let Some(id) = current.take() {
                if in_chains.insert(id) {
                    current = parent_of.get(id).copied().filter(|parent| !parent.is_empty());
                }
            }
        }
        // Each untagged descendant, with the image of the chains its branch grew from.
        let mut base_of: HashMap<&str, &str> = HashMap::new();
        loop {
            let before = base_of.len();
            for summary in summaries.iter().filter(|summary| real_tags(&summary.repo_tags).is_empty()) {
                let parent = summary.parent_id.as_str();
                let base = if in_chains.contains(parent) { Some(parent) } else { base_of.get(parent).copied() };
                if let (Some(base), false) = (base, in_chains.contains(summary.id.as_str())) {
                    base_of.entry(summary.id.as_str()).or_insert(base);
                }
            }
            if base_of.len() == before {
                break;
            }
        }
        let parents: HashSet<&str> = summaries.iter().map(|summary| summary.parent_id.as_str()).collect();
        let mut leaves: Vec<StageLeaf> = base_of
            .iter()
            .filter(|(id, _)| !parents.contains(*id))
            .map(|(id, base)| StageLeaf { id: (*id).to_owned(), base: (*base).to_owned() })
            .collect();
        leaves.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(leaves)
    }

    /// Every image the engine lists, untagged build steps included, by ID.
    pub async fn image_ids(&self) -> Result<HashSet<String>, EngineError> {
        let options = bollard::query_parameters::ListImagesOptions { all: true, ..Default::default() };
        let summaries = self.list_images(options).await?;
        Ok(summaries.into_iter().map(|summary| summary.id).collect())
    }

    /// Every layer chain the engine's layer store holds, as diff IDs from the bottom: each
    /// prefix of each image's layers. `docker load` does not read a layer whose chain is here.
    pub async fn layer_chains(&self) -> Result<std::collections::HashSet<Vec<String>>, EngineError> {
        let options = bollard::query_parameters::ListImagesOptions { all: true, ..Default::default() };
        let summaries = self.list_images(options).await?;
        let mut chains = std::collections::HashSet::new();
        for summary in summaries {
            let diff_ids = self.diff_ids(&summary.id).await?;
            for end in 1..=diff_ids.len() {
                chains.insert(diff_ids[..end].to_vec());
            }
        }
        Ok(chains)
    }

    async fn list_images(
        &self,
        options: bollard::query_parameters::ListImagesOptions,
    ) -> Result<Vec<bollard::models::ImageSummary>, EngineError> {
        self.watchdog.call(self.docker.list_images(Some(options))).await?.map_err(failed("list images"))
    }

    /// `docker save` of `references`, as a byte stream; each piece is waited for under the
    /// deadline, and a stall ends the stream with an error [`EngineError::stall_behind`] finds.
    pub fn export(&self, references: &[String]) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let references: Vec<&str> = references.iter().map(String::as_str).collect();
        let export = self.docker.export_images(&references).map_err(std::io::Error::other).boxed();
        let watchdog = Arc::clone(&self.watchdog);
        futures::stream::unfold(Some(export), move |export| {
            let watchdog = Arc::clone(&watchdog);
            async move {
                let mut export = export?;
                match watchdog.call(export.next()).await {
                    Ok(Some(piece)) => Some((piece, Some(export))),
                    Ok(None) => None,
                    Err(stalled) => Some((Err(std::io::Error::other(stalled)), None)),
                }
            }
        })
    }

    /// `docker load` of a tarball stream. Reads the engine's progress to the end; an error in
    /// it, or in the stream, fails the load. The engine taking the stream's bytes, and each of
    /// its messages, is progress; a stall drops the request, and with it the rest of the stream
    /// (its trailer never sent, the engine loads nothing of it).
    pub async fn load<S>(&self, tarball: S) -> Result<(), EngineError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let signs = Arc::new(Signs::new());
        let taken = Arc::clone(&signs);
        let tarball = tarball.inspect(move |_| taken.mark());
        let options = bollard::query_parameters::ImportImageOptions { quiet: true, ..Default::default() };
        let mut progress = std::pin::pin!(self.docker.import_image_stream(options, tarball, None));
        while let Some(message) = self.watchdog.watch(progress.next(), &signs).await? {
            signs.mark();
            let message = message.map_err(failed("load the restored images"))?;
            if let Some(detail) = message.error_detail {
                return Err(EngineError::Failed {
                    action: "load the restored images",
                    reason: detail.message.unwrap_or_else(|| "unknown error".into()),
                });
            }
        }
        Ok(())
    }

    /// Tags `image_id` as `repo_tag` (`repository:tag`).
    pub async fn tag(&self, image_id: &str, repo_tag: &str) -> Result<(), EngineError> {
        let (repo, tag) = repo_tag.rsplit_once(':').unwrap_or((repo_tag, "latest"));
        let options =
            bollard::query_parameters::TagImageOptions { repo: Some(repo.to_owned()), tag: Some(tag.to_owned()) };
        self.watchdog
            .call(self.docker.tag_image(image_id, Some(options)))
            .await?
            .map_err(failed("tag a restored image"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::{Instant, sleep};

    use super::{Signs, watch};

    const STALL: Duration = Duration::from_secs(10);

    /// A ping to a frozen engine: connected, never answered.
    fn frozen() -> std::future::Pending<bool> {
        std::future::pending()
    }

    #[test]
    fn a_stall_is_found_behind_the_export_reader_s_error() {
        let stalled = super::EngineError::Stalled { host: "unix:///d.sock".into(), seconds: 10 };
        let line = stalled.to_string();
        assert_eq!(line, "the Docker engine at unix:///d.sock did not answer for 10 s (--stall-timeout)");
        // As the export stream yields it, and wrapped once more by a reader passing it on.
        let from_stream = std::io::Error::other(stalled);
        let found = super::EngineError::stall_behind(&from_stream).map(|error| error.to_string());
        assert_eq!(found.as_deref(), Some(line.as_str()));
        let passed_on = std::io::Error::other(std::io::Error::other(super::EngineError::Stalled {
            host: "unix:///d.sock".into(),
            seconds: 10,
        }));
        let found = super::EngineError::stall_behind(&passed_on).map(|error| error.to_string());
        assert_eq!(found.as_deref(), Some(line.as_str()));
        let error = crate::error::WorkerError::from(crate::export::ExportError::Io(from_stream));
        assert_eq!(error.exit_code(), 69, "{error}");
        assert_eq!(error.to_string(), line);
        let other = crate::error::WorkerError::from(crate::export::ExportError::Io(std::io::Error::other("EOF")));
        assert_eq!(other.exit_code(), 1, "{other}");
        // An engine out of reach is what a coordinator out of reach is: 69 under --strict too.
        let unreachable = super::EngineError::Unreachable { host: "unix:///d.sock".into(), reason: "gone".into() };
        assert_eq!(crate::error::WorkerError::from(unreachable).exit_code(), 69);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_engine_that_answers_pings_is_not_stalled() {
        // `docker save` writing a minute's export to its temporary folder before the first byte.
        let quiet_minute = async {
            sleep(Duration::from_secs(60)).await;
            "exported"
        };
        let out = watch(quiet_minute, &Signs::new(), STALL, || async { true }).await;
        assert_eq!(out, Some("exported"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_engine_stalls_at_the_deadline() {
        let started = Instant::now();
        let out = watch(std::future::pending::<()>(), &Signs::new(), STALL, frozen).await;
        assert_eq!(out, None);
        assert_eq!(started.elapsed(), STALL);
        // Pings refused at once (the socket gone) are no answer either.
        let out = watch(std::future::pending::<()>(), &Signs::new(), STALL, || async { false }).await;
        assert_eq!(out, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_moving_bytes_is_alive_while_pings_go_unanswered() {
        let signs = Signs::new();
        let streaming = async {
            for _ in 0..12 {
                sleep(Duration::from_secs(5)).await;
                signs.mark();
            }
        };
        assert_eq!(watch(streaming, &signs, STALL, frozen).await, Some(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_runs_from_the_last_sign_of_life() {
        // Bytes for 15 s, then nothing and no ping answered: given up 10 s after the last byte.
        let started = Instant::now();
        let signs = Signs::new();
        let stopping = async {
            for _ in 0..3 {
                sleep(Duration::from_secs(5)).await;
                signs.mark();
            }
            std::future::pending::<()>().await;
        };
        assert_eq!(watch(stopping, &signs, STALL, frozen).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(25));
        // Pings answered for 20 s, then the engine froze: given up within a ping of 30 s.
        let started = Instant::now();
        let ping = || async move { if started.elapsed() < Duration::from_secs(20) { true } else { frozen().await } };
        assert_eq!(watch(std::future::pending::<()>(), &Signs::new(), STALL, ping).await, None);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(29) && waited <= Duration::from_secs(31), "{waited:?}");
    }

    /// Notes when the bytes it owns are dropped.
    struct DropNote(Vec<u8>, std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl AsRef<[u8]> for DropNote {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for DropNote {
        fn drop(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_load_s_pieces_reach_the_engine_s_socket_as_they_are_not_copied_first() {
        use futures::StreamExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::AsyncReadExt;
        // An engine that reads a load's headers and then nothing: a piece far larger than the
        // socket's buffers cannot all be written, so a client that sends pieces as they are
        // still holds it; one that copies pieces into a buffer of its own has let it go.
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (headers_read, headers_seen) = tokio::sync::oneshot::channel();
        let engine = tokio::spawn(async move {
            let (mut connection, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                let mut buffer = [0u8; 4096];
                let read = connection.read(&mut buffer).await.unwrap();
                assert!(read > 0, "the load's headers ended early");
                request.extend_from_slice(&buffer[..read]);
            }
            let _ = headers_read.send(String::from_utf8_lossy(&request).into_owned());
            connection
        });
        let dropped = std::sync::Arc::new(AtomicBool::new(false));
        let piece = bytes::Bytes::from_owner(DropNote(vec![7u8; 32 << 20], dropped.clone()));
        let docker = super::connect_unix(socket).unwrap();
        let options = bollard::query_parameters::ImportImageOptions { quiet: true, ..Default::default() };
        let tarball = futures::stream::iter([Ok::<_, std::io::Error>(piece)]);
        let mut load = Box::pin(docker.import_image_stream(options, tarball, None));
        let loading = tokio::spawn(async move { load.next().await.map(|answer| answer.is_ok()) });
        let request = tokio::time::timeout(Duration::from_secs(10), headers_seen).await.unwrap().unwrap();
        assert!(request.starts_with("POST /"), "{request}");
        assert!(request.contains("/images/load"), "{request}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!dropped.load(Ordering::SeqCst), "the piece was copied and let go before the engine read it");
        loading.abort();
        drop(engine.await.unwrap());
        let _ = loading.await;
        // The connection's task lets it go once it finds the engine gone.
        let gone = tokio::time::timeout(Duration::from_secs(10), async {
            while !dropped.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(gone.await.is_ok(), "the piece is let go once the load ends");
    }

    #[test]
    fn an_engine_on_its_socket_or_loopback_may_be_on_this_host() {
        for host in
            ["", "unix:///var/run/docker.sock", "tcp://localhost:2375", "tcp://127.0.0.1:2376", "tcp://[::1]:2375"]
        {
            assert!(super::is_local(host), "{host}");
        }
        for host in ["tcp://10.0.0.5:2375", "tcp://docker:2375", "ssh://ci@builder", "npipe:////./pipe/docker_engine"] {
            assert!(!super::is_local(host), "{host}");
        }
    }
}
