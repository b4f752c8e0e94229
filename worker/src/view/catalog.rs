//! What a view serves by name, worked out once from the cache it looked up: each tagged image
//! at `<repository>:<tag>` (the stored index or manifest of a containerd-store image; for a
//! graph-driver image an OCI manifest made here from its config and its uncompressed layers,
//! which are stored by diff ID), BuildKit's cache export at `buildcache:<any tag>`, and every
//! blob those name. Also the other way: a pushed BuildKit cache manifest as the image a save
//! commits. Pure functions, no I/O.

use std::collections::HashMap;

use bytes::Bytes;
use proto::digest::sha256_digest;
use proto::v1 as pb;
use registry::{ManifestBody, Reference, RegistryError};
use serde::Deserialize;

/// The repository BuildKit's cache export is served and pushed under.
pub const BUILD_CACHE_REPOSITORY: &str = "buildcache";
/// The tag the printed flags import it from.
pub const BUILD_CACHE_TAG: &str = "latest";
/// The tag the printed flags export it to, which reads never find: BuildKit skips the push of
/// a manifest a registry already holds, and a job importing its fallback branch's cache
/// unchanged must still save it to its own branch.
pub const BUILD_CACHE_EXPORT_TAG: &str = "export";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const BUILDKIT_CACHE_CONFIG: &str = "application/vnd.buildkit.cacheconfig.v0";

/// Where a served manifest's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestSource {
    /// Made here (a graph-driver image's manifest).
    Made(ManifestBody),
    /// A blob of the store, with its media type (`None`: read it from the bytes).
    Stored { digest: String, media_type: Option<String>, size: u64 },
}

/// Everything a view serves from one cache.
#[derive(Debug, Default)]
pub struct Catalog {
    /// By (repository, tag).
    tags: HashMap<(String, String), ManifestSource>,
    /// Manifests by digest: the tagged ones, and the platform manifests of stored indexes.
    digests: HashMap<String, ManifestSource>,
    /// Every blob the served manifests name, with its stored size.
    blobs: HashMap<String, u64>,
    /// The build cache is served at any tag of `buildcache`.
    build_cache: Option<ManifestSource>,
    /// The images a build can import, as `repository:tag`, in the cache's order.
    pub importable: Vec<String>,
}

impl Catalog {
    /// The catalog of a looked-up cache.
    pub fn of(manifest: &pb::Manifest) -> Catalog {
        let mut catalog = Catalog::default();
        for image in &manifest.images {
            if image.build_cache {
                let source = stored(&image.id, &image.oci_media_type, image.config_size);
                catalog.digests.insert(image.id.clone(), source.clone());
                catalog.build_cache = Some(source);
                catalog.add_oci_blobs(image);
                continue;
            }
            let source = if image.oci_media_type.is_empty() {
                let made = graph_manifest(image);
                catalog.blobs.insert(image.id.clone(), image.config_size);
                catalog.blobs.extend(image.layers.iter().map(|layer| (layer.digest.clone(), layer.stored_size)));
                ManifestSource::Made(made)
            } else {
                catalog.add_oci_blobs(image);
                stored(&image.id, &image.oci_media_type, image.config_size)
            };
            let digest = source_digest(&source).to_owned();
            catalog.digests.insert(digest, source.clone());
            for repo_tag in &image.repo_tags {
                let Some((repository, tag)) = split_repo_tag(repo_tag) else { continue };
                if image.inline_cache {
                    catalog.importable.push(format!("{repository}:{tag}"));
                }
                catalog.tags.insert((repository, tag), source.clone());
            }
        }
        catalog
    }

    /// The OCI blobs of a stored image: its nested manifests are served by digest too.
    fn add_oci_blobs(&mut self, image: &pb::Image) {
        for blob in &image.oci_blobs {
            self.blobs.insert(blob.digest.clone(), blob.stored_size);
            self.digests.entry(blob.digest.clone()).or_insert_with(|| stored(&blob.digest, "", blob.stored_size));
        }
        self.blobs.extend(image.layers.iter().map(|layer| (layer.digest.clone(), layer.stored_size)));
        self.blobs.insert(image.id.clone(), image.config_size);
    }

    /// The manifest `reference` names in `repository`, if served.
    pub fn manifest(&self, repository: &str, reference: &Reference) -> Option<&ManifestSource> {
        let repository = short_repository(repository);
        match reference {
            Reference::Tag(tag) if repository == BUILD_CACHE_REPOSITORY => {
                self.build_cache.as_ref().filter(|_| tag != BUILD_CACHE_EXPORT_TAG)
            }
            Reference::Tag(tag) => self.tags.get(&(repository.to_owned(), tag.clone())),
            Reference::Digest(digest) => self.digests.get(digest),
        }
    }

    /// The stored size of a blob a served manifest names.
    pub fn blob_size(&self, digest: &str) -> Option<u64> {
        self.blobs.get(digest).copied()
    }

    /// The tags served in `repository`, sorted.
    pub fn tags(&self, repository: &str) -> Vec<String> {
        let repository = short_repository(repository);
        if repository == BUILD_CACHE_REPOSITORY {
            return self.build_cache.iter().map(|_| BUILD_CACHE_TAG.to_owned()).collect();
        }
        let mut tags: Vec<String> =
            self.tags.keys().filter(|(name, _)| name == repository).map(|(_, tag)| tag.clone()).collect();
        tags.sort();
        tags
    }

    /// Whether the cache holds BuildKit's cache export.
    pub fn has_build_cache(&self) -> bool {
        self.build_cache.is_some()
    }
}

fn stored(digest: &str, media_type: &str, size: u64) -> ManifestSource {
    let media_type = (!media_type.is_empty()).then(|| media_type.to_owned());
    ManifestSource::Stored { digest: digest.to_owned(), media_type, size }
}

fn source_digest(source: &ManifestSource) -> &str {
    match source {
        ManifestSource::Made(body) => &body.digest,
        ManifestSource::Stored { digest, .. } => digest,
    }
}

/// `app:1` → (`app`, `1`); `example.com:5000/team/app:1` → (`example.com:5000/team/app`, `1`),
/// which no distribution name matches, so it is not served; `docker.io/library/app:1` → `app`.
fn split_repo_tag(repo_tag: &str) -> Option<(String, String)> {
    let (repository, tag) = repo_tag.rsplit_once(':')?;
    if tag.contains('/') {
        return None;
    }
    Some((short_repository(repository).to_owned(), tag.to_owned()))
}

/// The name a client gives after the view's address: Docker Hub's prefixes dropped, as the
/// engine's own tags drop them.
fn short_repository(repository: &str) -> &str {
    repository
        .strip_prefix("docker.io/library/")
        .or_else(|| repository.strip_prefix("docker.io/"))
        .unwrap_or(repository)
}

/// A graph-driver image as an OCI manifest: its config as stored, and its layers uncompressed,
/// named by diff ID (how a save stores them). BuildKit's inline cache names layers by their
/// place in the manifest, so it reads the same through these.
pub fn graph_manifest(image: &pb::Image) -> ManifestBody {
    let layers: Vec<serde_json::Value> = image
        .layers
        .iter()
        .map(|layer| serde_json::json!({"mediaType": OCI_LAYER, "digest": layer.digest, "size": layer.stored_size}))
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": image.id, "size": image.config_size},
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
    ManifestBody { media_type: OCI_MANIFEST.to_owned(), digest: sha256_digest(&bytes), bytes: Bytes::from(bytes) }
}

/// The media type a stored manifest says it is (`mediaType`), else what its fields say.
pub fn sniff_media_type(bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Sniffed {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Sniffed>(bytes) {
        Ok(Sniffed { media_type: Some(media_type), .. }) => media_type,
        Ok(Sniffed { manifests: Some(_), .. }) => OCI_INDEX.to_owned(),
        _ => OCI_MANIFEST.to_owned(),
    }
}

#[derive(Deserialize)]
struct PushedDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct Pushed {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Option<PushedDescriptor>,
    #[serde(default)]
    layers: Vec<PushedDescriptor>,
    #[serde(default)]
    manifests: Vec<PushedDescriptor>,
}

/// The most blobs one pushed cache may name (a save's own cap is larger; this keeps the
/// manifest's parse bounded).
const MOST_PUSHED_BLOBS: usize = 20_000;

/// A pushed BuildKit cache export (`--cache-to type=registry`: an image manifest whose config
/// is the cache config with `image-manifest=true`, else an index naming the layers and the
/// cache config) as the image a save commits. Anything else is refused in one line: images are
/// saved with `cache-worker save`.
pub fn pushed_cache(manifest: &ManifestBody) -> Result<pb::Image, RegistryError> {
    let pushed: Pushed = serde_json::from_slice(&manifest.bytes)
        .map_err(|error| RegistryError::ManifestInvalid(format!("the manifest does not parse: {error}")))?;
    let media_type = pushed.media_type.clone().unwrap_or_else(|| manifest.media_type.clone());
    let (config, layers): (Vec<PushedDescriptor>, Vec<PushedDescriptor>) = match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = pushed.config.filter(|config| config.media_type == BUILDKIT_CACHE_CONFIG);
            (config.into_iter().collect(), pushed.layers)
        }
        OCI_INDEX | DOCKER_LIST => {
            pushed.manifests.into_iter().partition(|descriptor| descriptor.media_type == BUILDKIT_CACHE_CONFIG)
        }
        other => {
            return Err(RegistryError::ManifestInvalid(format!(
                "a manifest of media type {other:?} is not one this view takes"
            )));
        }
    };
    if config.len() != 1 {
        return Err(RegistryError::Unsupported(
            "this view keeps BuildKit cache exports only (--cache-to type=registry); save images with cache-worker save".into(),
        ));
    }
    if config.len() + layers.len() > MOST_PUSHED_BLOBS {
        return Err(RegistryError::ManifestInvalid(format!("the cache names more than {MOST_PUSHED_BLOBS} blobs")));
    }
    for descriptor in config.iter().chain(&layers) {
        proto::names::validate_digest(&descriptor.digest)
            .map_err(|error| RegistryError::ManifestInvalid(format!("the manifest names a bad digest: {error}")))?;
    }
    let plain = |descriptor: &PushedDescriptor| pb::Layer {
        digest: descriptor.digest.clone(),
        size: descriptor.size,
        stored_size: descriptor.size,
        ..Default::default()
    };
    Ok(pb::Image {
        id: manifest.digest.clone(),
        oci_media_type: media_type,
        config_size: manifest.bytes.len() as u64,
        layers: layers.iter().map(plain).collect(),
        oci_blobs: config.iter().map(plain).collect(),
        build_cache: true,
        builder: pb::Builder::Buildkit as i32,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(digest: &str, size: u64) -> pb::Layer {
        pb::Layer { digest: digest.into(), size, stored_size: size, ..Default::default() }
    }

    fn digest(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    #[test]
    fn a_graph_images_manifest_names_its_config_and_uncompressed_layers_by_diff_id() {
        let image = pb::Image {
            id: digest(1),
            config_size: 700,
            layers: vec![layer(&digest(2), 10), layer(&digest(3), 20)],
            repo_tags: vec!["app:1".into(), "docker.io/library/base:2".into()],
            inline_cache: true,
            ..Default::default()
        };
        let manifest = pb::Manifest { images: vec![image.clone()], ..Default::default() };
        let catalog = Catalog::of(&manifest);
        let Some(ManifestSource::Made(made)) = catalog.manifest("app", &Reference::Tag("1".into())) else {
            panic!("app:1 is served");
        };
        let json: serde_json::Value = serde_json::from_slice(&made.bytes).unwrap();
        assert_eq!(json["config"]["digest"], digest(1));
        assert_eq!(json["config"]["size"], 700);
        assert_eq!(json["layers"][1]["digest"], digest(3));
        assert_eq!(json["layers"][1]["mediaType"], OCI_LAYER);
        assert_eq!(made.digest, sha256_digest(&made.bytes));
        assert!(catalog.manifest("base", &Reference::Tag("2".into())).is_some());
        assert!(catalog.manifest("app", &Reference::Digest(made.digest.clone())).is_some());
        assert!(catalog.manifest("app", &Reference::Tag("2".into())).is_none());
        assert_eq!(catalog.blob_size(&digest(3)), Some(20));
        assert_eq!(catalog.blob_size(&digest(1)), Some(700));
        assert_eq!(catalog.blob_size(&digest(9)), None);
        assert_eq!(catalog.importable, vec!["app:1".to_string(), "base:2".to_string()]);
        assert_eq!(catalog.tags("app"), vec!["1".to_string()]);
        assert!(catalog.tags(BUILD_CACHE_REPOSITORY).is_empty());
    }

    #[test]
    fn a_pushed_cache_manifest_becomes_a_build_cache_image_and_is_served_back() {
        let bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": BUILDKIT_CACHE_CONFIG, "digest": digest(4), "size": 99},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(5), "size": 1000}],
        }))
        .unwrap();
        let body = ManifestBody { media_type: OCI_MANIFEST.into(), digest: sha256_digest(&bytes), bytes: bytes.into() };
        let image = pushed_cache(&body).unwrap();
        assert!(image.build_cache);
        assert_eq!(image.id, body.digest);
        assert_eq!(image.layers, vec![layer(&digest(5), 1000)]);
        assert_eq!(image.oci_blobs, vec![layer(&digest(4), 99)]);
        let catalog = Catalog::of(&pb::Manifest { images: vec![image], ..Default::default() });
        assert!(catalog.has_build_cache());
        let exported = catalog.manifest(BUILD_CACHE_REPOSITORY, &Reference::Tag(BUILD_CACHE_EXPORT_TAG.into()));
        assert_eq!(exported, None, "a push never finds its manifest already there");
        let served = catalog.manifest(BUILD_CACHE_REPOSITORY, &Reference::Tag("anything".into()));
        assert_eq!(
            served,
            Some(&ManifestSource::Stored {
                digest: body.digest.clone(),
                media_type: Some(OCI_MANIFEST.into()),
                size: body.bytes.len() as u64
            })
        );
        assert_eq!(catalog.blob_size(&digest(5)), Some(1000));
    }

    #[test]
    fn an_image_push_or_a_bad_manifest_is_refused_in_one_line() {
        let image = serde_json::to_vec(&serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest(4), "size": 99},
            "layers": [],
        }))
        .unwrap();
        let body = ManifestBody { media_type: OCI_MANIFEST.into(), digest: sha256_digest(&image), bytes: image.into() };
        assert!(matches!(pushed_cache(&body), Err(RegistryError::Unsupported(_))));
        let bad = ManifestBody {
            media_type: OCI_MANIFEST.into(),
            digest: digest(1),
            bytes: Bytes::from_static(b"{\"config\":"),
        };
        let refused = pushed_cache(&bad).unwrap_err();
        assert!(!refused.to_string().contains('\n'));
        let evil = serde_json::to_vec(&serde_json::json!({
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": BUILDKIT_CACHE_CONFIG, "digest": "sha256:../../x", "size": 1}],
        }))
        .unwrap();
        let body = ManifestBody { media_type: OCI_INDEX.into(), digest: sha256_digest(&evil), bytes: evil.into() };
        assert!(matches!(pushed_cache(&body), Err(RegistryError::ManifestInvalid(_))));
    }
}
