//! The local Docker engine, through bollard: the image chain, the classic builder's other build
//! stages, `docker save` as a stream, and `docker load` from a stream. The only file that
//! imports bollard.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use proto::v1 as pb;

/// A save or load of a large chain can take many minutes; bollard's 120 s default covers the
/// wait for the export's first byte and would cut it off.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the Docker engine at {host}: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("no image {0:?} in the Docker engine")]
    NoSuchImage(String),
    #[error("the Docker engine failed to {action}: {reason}")]
    Failed { action: &'static str, reason: String },
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

fn real_tags(tags: &[String]) -> Vec<String> {
    tags.iter().filter(|tag| !tag.contains("<none>")).cloned().collect()
}

impl Engine {
    /// Connects to the engine `DOCKER_HOST` names, or the local socket.
    pub async fn connect() -> Result<Engine, EngineError> {
        let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
        let unreachable = |reason: String| EngineError::Unreachable { host: host.clone(), reason };
        let docker = bollard::Docker::connect_with_defaults()
            .map_err(|error| unreachable(error.to_string()))?
            .with_timeout(ENGINE_TIMEOUT);
        docker.ping().await.map_err(|error| unreachable(error.to_string()))?;
        Ok(Engine { docker })
    }

    /// The engine's version, e.g. "20.10.24+dfsg1".
    pub async fn version(&self) -> Result<String, EngineError> {
        let version = self.docker.version().await.map_err(failed("report its version"))?;
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
        let info = self.docker.info().await.map_err(failed("report its configuration"))?;
        let driver_status = info.driver_status.unwrap_or_default();
        let containerd_store =
            driver_status.iter().any(|pair| pair.iter().any(|value| value.starts_with("io.containerd.snapshotter")));
        let host = std::env::var("DOCKER_HOST").unwrap_or_default();
        Ok(Storage {
            driver: info.driver.unwrap_or_default(),
            data_root: info.docker_root_dir.unwrap_or_default().into(),
            containerd_store,
            host: if host.is_empty() { "unix:///var/run/docker.sock".into() } else { host },
        })
    }

    /// The image ID a reference (tag or ID) resolves to, if the engine has it.
    pub async fn image_id(&self, reference: &str) -> Result<Option<String>, EngineError> {
        match self.docker.inspect_image(reference).await {
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
        let inspect = self.docker.inspect_image(id).await.map_err(failed("inspect an image"))?;
        let media_type = inspect.descriptor.and_then(|descriptor| descriptor.media_type).unwrap_or_default();
        Ok((inspect.root_fs.and_then(|root_fs| root_fs.layers).unwrap_or_default(), media_type))
    }

    /// An image's build history, oldest step first, as the engine records it.
    pub async fn history(&self, id: &str) -> Result<Vec<pb::Step>, EngineError> {
        let items = self.docker.image_history(id).await.map_err(failed("read an image's history"))?;
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
        let summaries = self.docker.list_images(None::<bollard::query_parameters::ListImagesOptions>).await;
        let summaries = summaries.map_err(failed("list images"))?;
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
        let summaries = self.docker.list_images(Some(options)).await.map_err(failed("list images"))?;
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
        let summaries = self.docker.list_images(Some(options)).await.map_err(failed("list images"))?;
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
        let summaries = self.docker.list_images(Some(options)).await.map_err(failed("list images"))?;
        Ok(summaries.into_iter().map(|summary| summary.id).collect())
    }

    /// Every layer chain the engine's layer store holds, as diff IDs from the bottom: each
    /// prefix of each image's layers. `docker load` does not read a layer whose chain is here.
    pub async fn layer_chains(&self) -> Result<std::collections::HashSet<Vec<String>>, EngineError> {
        let options = bollard::query_parameters::ListImagesOptions { all: true, ..Default::default() };
        let summaries = self.docker.list_images(Some(options)).await.map_err(failed("list images"))?;
        let mut chains = std::collections::HashSet::new();
        for summary in summaries {
            let diff_ids = self.diff_ids(&summary.id).await?;
            for end in 1..=diff_ids.len() {
                chains.insert(diff_ids[..end].to_vec());
            }
        }
        Ok(chains)
    }

    /// `docker save` of `references`, as a byte stream.
    pub fn export(&self, references: &[String]) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let references: Vec<&str> = references.iter().map(String::as_str).collect();
        self.docker.export_images(&references).map_err(std::io::Error::other)
    }

    /// `docker load` of a tarball stream. Reads the engine's progress to the end; an error in
    /// it, or in the stream, fails the load.
    pub async fn load<S>(&self, tarball: S) -> Result<(), EngineError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let options = bollard::query_parameters::ImportImageOptions { quiet: true, ..Default::default() };
        let mut progress = std::pin::pin!(self.docker.import_image_stream(options, tarball, None));
        while let Some(message) = progress.next().await {
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
        self.docker.tag_image(image_id, Some(options)).await.map_err(failed("tag a restored image"))
    }
}

#[cfg(test)]
mod tests {
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
