//! Images of the containerd image store (Engine 29's default) and BuildKit's local cache
//! exports, as OCI image layouts: reading the blobs of a `docker save` from that store or of a
//! cache folder (each blob checked against the digest that names it), resolving an image's
//! index or manifest to the blobs it reaches, and the `index.json` of a layout written back
//! (the folder a BuildKit build reads with `--cache-from type=local`, and the tarball `docker
//! load` takes, which `load.rs` streams).
//!
//! Blobs are kept exactly as the engine holds them (compressed layers are never recompressed),
//! so a restored image keeps its ID (the digest of its index or manifest).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use proto::digest::{digest_hex as hex_of, sha256_hex};
use proto::object_keys::BLOBS_DIR;
use proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::content_store::ContentStore;
use crate::export::{ExportError, JSON_LIMIT, read_json, spool as spool_blob};

/// The blobs of an OCI layout: small JSON ones (indexes, manifests, configs, attestations) in
/// memory, the rest (layers) in files.
#[derive(Debug, Default)]
pub struct OciBlobs {
    pub json: HashMap<String, Vec<u8>>,
    pub files: HashMap<String, (PathBuf, u64)>,
    /// Blobs (layers) left in the content store or folder they were found in, and their sizes.
    stored: HashMap<String, u64>,
    /// That store.
    store: Option<ContentStore>,
    /// The layout's own `index.json`: the images (or the cache) it names.
    pub index: Vec<Descriptor>,
    /// The spooled files of an export, deleted with these blobs.
    spooled: Vec<tempfile::TempPath>,
}

/// An OCI descriptor: what a layout's index and manifests point at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// An index, a manifest, or anything else JSON: the fields that point at other blobs.
#[derive(Deserialize)]
struct Node {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct IndexJson {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

fn blob_digest(path: &str) -> Option<String> {
    let digest = crate::layout::digest_of_blob_path(path)?;
    proto::names::validate_digest(&digest).ok().map(|()| digest)
}

/// A digest from the layout, checked before it names a file.
fn valid_digest(digest: &str) -> Result<(), ExportError> {
    proto::names::validate_digest(digest).map_err(|error| ExportError::Format(error.to_string()))
}

fn mismatch(path: &str, expected: &str, actual_hex: &str) -> ExportError {
    ExportError::DigestMismatch {
        path: path.to_owned(),
        expected: expected.to_owned(),
        actual: format!("sha256:{actual_hex}"),
    }
}

impl OciBlobs {
    /// Reads a `docker save` of the containerd image store: JSON blobs into memory, the others
    /// spooled into `spool`. Every blob must hash to its name.
    pub fn read_export<R: Read>(reader: R, spool: &Path) -> Result<OciBlobs, ExportError> {
        let mut blobs = OciBlobs::default();
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries()? {
            let mut entry = entry?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path()?.to_string_lossy().trim_start_matches("./").to_owned();
            let size = entry.size();
            if path == "index.json" {
                let bytes = read_json(&mut entry, size, &path)?;
                blobs.index = parse_index(&bytes)?;
                continue;
            }
            let Some(digest) = blob_digest(&path) else { continue };
            let mut head = Vec::new();
            (&mut entry).take(1).read_to_end(&mut head)?;
            if head == b"{" && size <= JSON_LIMIT {
                let mut bytes = head;
                bytes.extend(read_json(&mut entry, size - 1, &path)?);
                let actual = sha256_hex(&bytes);
                if actual != hex_of(&digest) {
                    return Err(mismatch(&path, &digest, &actual));
                }
                blobs.json.insert(digest, bytes);
            } else {
                let spooled = spool_blob(&head, &mut entry, spool, false)?;
                if spooled.digest != digest {
                    return Err(ExportError::DigestMismatch { path, expected: digest, actual: spooled.digest });
                }
                blobs.files.insert(digest, (spooled.path.to_path_buf(), spooled.size));
                blobs.spooled.push(spooled.path);
            }
        }
        if blobs.index.is_empty() {
            return Err(ExportError::Format("the export has no index.json naming its images".into()));
        }
        Ok(blobs)
    }

    /// Reads an OCI layout folder (BuildKit's `--cache-to type=local` export) in place: the
    /// blobs its index reaches (JSON ones checked now, layers when they are uploaded). `None`
    /// when the folder holds no layout.
    pub fn read_dir(dir: &Path) -> Result<Option<OciBlobs>, ExportError> {
        let index = match std::fs::read(dir.join("index.json")) {
            Ok(bytes) => parse_index(&bytes)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let mut blobs = OciBlobs { index, ..Default::default() };
        // Each build of a job writes its cache manifest into the folder, and `index.json` names
        // only the last: the others (a `--target test` build's, say) are kept too.
        for descriptor in cache_manifests(&dir.join(BLOBS_DIR))? {
            if !blobs.index.iter().any(|listed| listed.digest == descriptor.digest) {
                blobs.index.push(descriptor);
            }
        }
        blobs.walk(ContentStore::Folder(dir.join(BLOBS_DIR)))?;
        Ok(Some(blobs))
    }

    /// Reads the blobs the images `tops` reach from the engine's own containerd content store
    /// (its folder, or containerd's socket), in place, as [`OciBlobs::read_dir`] does. Blocks.
    pub fn read_content_store(store: &ContentStore, tops: &[Descriptor]) -> Result<OciBlobs, ExportError> {
        let mut blobs = OciBlobs { index: tops.to_vec(), ..Default::default() };
        blobs.walk(store.clone())?;
        Ok(blobs)
    }

    /// Finds every blob in `store` the index reaches (absent ones are left out): JSON ones are
    /// read into memory and checked against their digests; the others (layers) are only
    /// measured, and whoever reads one checks it as it goes (`direct.rs` does, uploading it).
    fn walk(&mut self, store: ContentStore) -> Result<(), ExportError> {
        let mut pending: Vec<String> = self.index.iter().map(|descriptor| descriptor.digest.clone()).collect();
        let mut seen = HashSet::new();
        while let Some(digest) = pending.pop() {
            if !seen.insert(digest.clone()) {
                continue;
            }
            valid_digest(&digest)?;
            let (size, mut reader) = match store.open(&digest) {
                Ok(opened) => opened,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error.into()),
            };
            let mut head = Vec::new();
            (&mut reader).take(1).read_to_end(&mut head)?;
            if head == b"{" && size <= JSON_LIMIT {
                let mut bytes = head;
                reader.take(JSON_LIMIT).read_to_end(&mut bytes)?;
                let actual = sha256_hex(&bytes);
                if actual != hex_of(&digest) {
                    return Err(mismatch(&format!("{} in {}", digest, store.describe()), &digest, &actual));
                }
                if let Ok(node) = serde_json::from_slice::<Node>(&bytes) {
                    let children = node.manifests.iter().chain(node.config.iter()).chain(node.layers.iter());
                    pending.extend(children.map(|child| child.digest.clone()));
                }
                self.json.insert(digest, bytes);
            } else {
                self.stored.insert(digest, size);
            }
        }
        self.store = Some(store);
        Ok(())
    }

    fn size_of(&self, digest: &str) -> Option<u64> {
        self.json
            .get(digest)
            .map(|bytes| bytes.len() as u64)
            .or_else(|| self.files.get(digest).map(|(_, size)| *size))
            .or_else(|| self.stored.get(digest).copied())
    }

    /// Everything the blob `top` reaches: its layers (tar blobs under a manifest's `layers`)
    /// and every other blob (indexes, manifests, configs, attestations), each once, as stored.
    /// Children the layout lacks (other platforms' manifests) are left out; a layer or config
    /// a present manifest names must be here.
    pub fn resolve(&self, top: &str) -> Result<OciImage, ExportError> {
        let Some(top_json) = self.json.get(top) else {
            return Err(ExportError::Format(format!("the index or manifest {top} is missing from the export")));
        };
        let mut image = OciImage::default();
        let mut seen: HashSet<String> = HashSet::from([top.to_owned()]);
        let mut pending: Vec<(String, Vec<u8>)> = vec![(top.to_owned(), top_json.clone())];
        while let Some((digest, bytes)) = pending.pop() {
            let node: Node = serde_json::from_slice(&bytes).map_err(|error| {
                ExportError::Format(format!("blob {digest} is not an OCI index or manifest: {error}"))
            })?;
            let is_manifest = node.config.is_some();
            for child in node.manifests.iter().chain(node.config.iter()).chain(node.layers.iter()) {
                valid_digest(&child.digest)?;
                if !seen.insert(child.digest.clone()) {
                    continue;
                }
                let Some(size) = self.size_of(&child.digest) else {
                    if is_manifest {
                        return Err(ExportError::Format(format!(
                            "blob {} of manifest {digest} is missing from the export",
                            child.digest
                        )));
                    }
                    continue;
                };
                if size != child.size {
                    return Err(ExportError::Format(format!(
                        "blob {} is {size} bytes, its descriptor says {}",
                        child.digest, child.size
                    )));
                }
                let blob = pb::Layer { digest: child.digest.clone(), size, stored_size: size, ..Default::default() };
                let is_layer = is_manifest
                    && node.layers.iter().any(|layer| layer.digest == child.digest)
                    && (child.media_type.contains(".tar") || child.media_type.contains("rootfs"));
                if is_layer {
                    image.layers.push(blob);
                    continue;
                }
                image.oci_blobs.push(blob);
                if let Some(json) = self.json.get(&child.digest) {
                    if node.config.as_ref().is_some_and(|config| config.digest == child.digest) {
                        image.configs.push(json.clone());
                    } else if child.media_type.contains("manifest") || child.media_type.contains("index") {
                        pending.push((child.digest.clone(), json.clone()));
                    }
                }
            }
        }
        Ok(image)
    }

    /// The path or bytes of a blob, for its upload.
    pub fn source(&self, digest: &str) -> Option<LayoutBlob> {
        if let Some(bytes) = self.json.get(digest) {
            return Some(LayoutBlob::Bytes(bytes.clone()));
        }
        if let Some((path, size)) = self.files.get(digest) {
            return Some(LayoutBlob::File(path.clone(), *size));
        }
        let store = self.store.as_ref().filter(|_| self.stored.contains_key(digest))?;
        Some(LayoutBlob::Stored(store.clone()))
    }
}

/// Where a blob of a layout is.
pub enum LayoutBlob {
    Bytes(Vec<u8>),
    File(PathBuf, u64),
    /// In the content store or folder it was found in.
    Stored(ContentStore),
}

/// What an image's index or manifest reaches.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OciImage {
    /// Layer blobs, addressed by their own (compressed) digest, in the order manifests name them.
    pub layers: Vec<pb::Layer>,
    /// Every other blob.
    pub oci_blobs: Vec<pb::Layer>,
    /// The configs of its platform manifests (the image's config, or a cache's), for what
    /// they say about the build.
    pub configs: Vec<Vec<u8>>,
}

/// The cache manifests BuildKit wrote into a `type=local` cache folder's blobs, sorted.
fn cache_manifests(blobs_dir: &Path) -> Result<Vec<Descriptor>, ExportError> {
    let entries = match std::fs::read_dir(blobs_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error.into()),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(digest) = entry.file_name().to_str().map(|hex| format!("sha256:{hex}")) else { continue };
        let size = entry.metadata()?.len();
        if proto::names::validate_digest(&digest).is_err() || size > 64 * 1024 {
            continue;
        }
        let bytes = std::fs::read(entry.path())?;
        let Ok(node) = serde_json::from_slice::<Node>(&bytes) else { continue };
        if node.config.is_some_and(|config| config.media_type == BUILDKIT_CACHE_CONFIG) {
            let media_type = "application/vnd.oci.image.manifest.v1+json".to_owned();
            found.push(Descriptor { media_type, digest, size, annotations: HashMap::new() });
        }
    }
    found.sort_by(|a, b| a.digest.cmp(&b.digest));
    Ok(found)
}

const BUILDKIT_CACHE_CONFIG: &str = "application/vnd.buildkit.cacheconfig.v0";

impl OciBlobs {
    /// The cache manifests of a `type=local` cache folder as one: BuildKit reads several
    /// `--cache-from` sources unreliably (a step whose records sit in one source and whose
    /// parent step matched in another misses now and then), so the caches every build of a job
    /// exported are merged into one manifest and one cache config, added to these blobs.
    pub fn merge_caches(&mut self) -> Result<Option<Descriptor>, ExportError> {
        if self.index.len() <= 1 {
            return Ok(self.index.first().cloned());
        }
        let mut merged = CacheMerge::default();
        let mut layer_descriptors: std::collections::BTreeMap<String, Descriptor> = Default::default();
        for top in &self.index {
            let manifest = self.json.get(&top.digest).ok_or_else(|| missing_blob(&top.digest))?;
            let node: Node = serde_json::from_slice(manifest).map_err(|error| bad_cache(&top.digest, error))?;
            let config = node.config.ok_or_else(|| bad_cache(&top.digest, "no config"))?;
            let config = self.json.get(&config.digest).ok_or_else(|| missing_blob(&config.digest))?;
            let config: serde_json::Value =
                serde_json::from_slice(config).map_err(|error| bad_cache(&top.digest, error))?;
            merged.add(&config).map_err(|error| bad_cache(&top.digest, error))?;
            for layer in node.layers {
                layer_descriptors.entry(layer.digest.clone()).or_insert(layer);
            }
        }
        let config = serde_json::to_vec(&merged.into_config()).expect("the cache config serializes");
        let config_digest = format!("sha256:{}", sha256_hex(&config));
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": BUILDKIT_CACHE_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": layer_descriptors.into_values().collect::<Vec<_>>(),
        }))
        .expect("the manifest serializes");
        let digest = format!("sha256:{}", sha256_hex(&manifest));
        let descriptor = Descriptor {
            media_type: OCI_MANIFEST.to_owned(),
            digest: digest.clone(),
            size: manifest.len() as u64,
            annotations: HashMap::new(),
        };
        self.json.insert(config_digest, config);
        self.json.insert(digest, manifest);
        Ok(Some(descriptor))
    }
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn missing_blob(digest: &str) -> ExportError {
    ExportError::Format(format!("blob {digest} of the build cache is missing"))
}

fn bad_cache(digest: &str, error: impl std::fmt::Display) -> ExportError {
    ExportError::Format(format!("the build cache {digest} does not read as BuildKit's: {error}"))
}

/// BuildKit cache configs (`layers`: blobs with their parent's index, -1 for none and 0 when
/// absent; `records`: a digest each, with results naming layers and inputs naming other
/// records) merged: layers the same by blob and parent, records the same by digest, every
/// index renumbered.
#[derive(Default)]
struct CacheMerge {
    /// (blob, merged parent index or -1), with the layer's other fields.
    layers: Vec<(String, i64, serde_json::Map<String, serde_json::Value>)>,
    /// By digest: results (merged layer index, the result's other fields), chains, and per
    /// input position the alternatives (selector, linked record's digest).
    records: std::collections::BTreeMap<String, MergedRecord>,
}

#[derive(Default)]
struct MergedRecord {
    results: Vec<(i64, serde_json::Value)>,
    chains: Vec<serde_json::Value>,
    inputs: Vec<Vec<(Option<String>, String)>>,
}

impl CacheMerge {
    fn add(&mut self, config: &serde_json::Value) -> Result<(), String> {
        let empty = Vec::new();
        let layers = config.get("layers").and_then(|layers| layers.as_array()).unwrap_or(&empty);
        let records = config.get("records").and_then(|records| records.as_array()).unwrap_or(&empty);
        let mut mapped: HashMap<usize, i64> = HashMap::new();
        for index in 0..layers.len() {
            self.map_layer(layers, index, &mut mapped, 0)?;
        }
        let digest_of = |index: i64| -> Result<String, String> {
            let record = usize::try_from(index).ok().and_then(|index| records.get(index));
            let digest = record.and_then(|record| record.get("digest")).and_then(|digest| digest.as_str());
            digest.map(str::to_owned).ok_or_else(|| format!("a link to record {index}, which is not there"))
        };
        let layer_of = |value: &serde_json::Value| -> Result<i64, String> {
            let index = value.as_u64().ok_or("a layer index that is not a number")? as usize;
            mapped.get(&index).copied().ok_or_else(|| format!("a result in layer {index}, which is not there"))
        };
        for record in records {
            let digest = record.get("digest").and_then(|digest| digest.as_str()).ok_or("a record without a digest")?;
            let merged = self.records.entry(digest.to_owned()).or_default();
            for result in record.get("layers").and_then(|results| results.as_array()).unwrap_or(&empty) {
                let layer = layer_of(result.get("layer").unwrap_or(&serde_json::Value::from(0)))?;
                if !merged.results.iter().any(|(known, _)| *known == layer) {
                    merged.results.push((layer, result.clone()));
                }
            }
            for chain in record.get("chains").and_then(|chains| chains.as_array()).unwrap_or(&empty) {
                let mut chain = chain.clone();
                if let Some(indexes) = chain.get_mut("layers").and_then(|layers| layers.as_array_mut()) {
                    for index in indexes.iter_mut() {
                        *index = serde_json::Value::from(layer_of(index)?);
                    }
                }
                if !merged.chains.contains(&chain) {
                    merged.chains.push(chain);
                }
            }
            let inputs = record.get("inputs").and_then(|inputs| inputs.as_array()).unwrap_or(&empty);
            for (position, alternatives) in inputs.iter().enumerate() {
                if merged.inputs.len() <= position {
                    merged.inputs.resize(position + 1, Vec::new());
                }
                for alternative in alternatives.as_array().unwrap_or(&empty) {
                    let selector = alternative.get("selector").and_then(|s| s.as_str()).map(str::to_owned);
                    let link = digest_of(alternative.get("link").and_then(|link| link.as_i64()).unwrap_or(0))?;
                    if !merged.inputs[position].contains(&(selector.clone(), link.clone())) {
                        merged.inputs[position].push((selector, link));
                    }
                }
            }
        }
        Ok(())
    }

    /// The merged index of layer `index` of one config, its parents first.
    fn map_layer(
        &mut self,
        layers: &[serde_json::Value],
        index: usize,
        mapped: &mut HashMap<usize, i64>,
        depth: usize,
    ) -> Result<i64, String> {
        if let Some(known) = mapped.get(&index) {
            return Ok(*known);
        }
        if depth > layers.len() {
            return Err("layers whose parents form a loop".into());
        }
        let layer = layers.get(index).and_then(|layer| layer.as_object()).ok_or("a layer that is not there")?;
        let blob = layer.get("blob").and_then(|blob| blob.as_str()).ok_or("a layer without a blob")?;
        let parent = match layer.get("parent").and_then(|parent| parent.as_i64()).unwrap_or(0) {
            -1 => -1,
            parent => {
                self.map_layer(layers, usize::try_from(parent).map_err(|_| "a bad parent index")?, mapped, depth + 1)?
            }
        };
        let merged =
            match self.layers.iter().position(|(known, known_parent, _)| known == blob && *known_parent == parent) {
                Some(position) => position as i64,
                None => {
                    self.layers.push((blob.to_owned(), parent, layer.clone()));
                    self.layers.len() as i64 - 1
                }
            };
        mapped.insert(index, merged);
        Ok(merged)
    }

    fn into_config(self) -> serde_json::Value {
        let index_of: HashMap<&String, usize> =
            self.records.keys().enumerate().map(|(index, digest)| (digest, index)).collect();
        let layers: Vec<serde_json::Value> = self
            .layers
            .iter()
            .map(|(_, parent, fields)| {
                let mut fields = fields.clone();
                fields.insert("parent".into(), serde_json::Value::from(*parent));
                serde_json::Value::Object(fields)
            })
            .collect();
        let records: Vec<serde_json::Value> = self
            .records
            .iter()
            .map(|(digest, record)| {
                let mut fields = serde_json::Map::new();
                fields.insert("digest".into(), serde_json::Value::from(digest.clone()));
                if !record.results.is_empty() {
                    let results = record.results.iter().map(|(layer, result)| {
                        let mut result = result.clone();
                        result["layer"] = serde_json::Value::from(*layer);
                        result
                    });
                    fields.insert("layers".into(), serde_json::Value::Array(results.collect()));
                }
                if !record.chains.is_empty() {
                    fields.insert("chains".into(), serde_json::Value::Array(record.chains.clone()));
                }
                if !record.inputs.is_empty() {
                    let inputs = record.inputs.iter().map(|alternatives| {
                        let alternatives = alternatives.iter().map(|(selector, link)| {
                            let mut input = serde_json::Map::new();
                            if let Some(selector) = selector {
                                input.insert("selector".into(), serde_json::Value::from(selector.clone()));
                            }
                            input.insert("link".into(), serde_json::Value::from(index_of[link]));
                            serde_json::Value::Object(input)
                        });
                        serde_json::Value::Array(alternatives.collect())
                    });
                    fields.insert("inputs".into(), serde_json::Value::Array(inputs.collect()));
                }
                serde_json::Value::Object(fields)
            })
            .collect();
        serde_json::json!({"layers": layers, "records": records})
    }
}

fn parse_index(bytes: &[u8]) -> Result<Vec<Descriptor>, ExportError> {
    let index: IndexJson =
        serde_json::from_slice(bytes).map_err(|error| ExportError::Format(format!("index.json: {error}")))?;
    for descriptor in &index.manifests {
        valid_digest(&descriptor.digest)?;
    }
    Ok(index.manifests)
}

/// The full name containerd gives a tag: `app:1` is `docker.io/library/app:1`.
pub fn full_image_name(repo_tag: &str) -> String {
    let first = repo_tag.split('/').next().unwrap_or_default();
    let has_registry = repo_tag.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry {
        repo_tag.to_owned()
    } else if repo_tag.contains('/') {
        format!("docker.io/{repo_tag}")
    } else {
        format!("docker.io/library/{repo_tag}")
    }
}

/// The `index.json` of a layout holding `images` (by their tags; an untagged one by digest
/// alone) or, for a cache, naming it `latest` as BuildKit's local cache reader expects.
pub fn index_json(images: &[&pb::Image]) -> Vec<u8> {
    let mut manifests = Vec::new();
    for image in images {
        let descriptor = |annotations: HashMap<String, String>| Descriptor {
            media_type: image.oci_media_type.clone(),
            digest: image.id.clone(),
            size: image.config_size,
            annotations,
        };
        if image.build_cache {
            manifests.push(descriptor(HashMap::from([(REF_NAME.to_owned(), "latest".to_owned())])));
        } else if image.repo_tags.is_empty() {
            manifests.push(descriptor(HashMap::new()));
        }
        for tag in &image.repo_tags {
            let short = tag.rsplit_once(':').map(|(_, tag)| tag).unwrap_or("latest");
            manifests.push(descriptor(HashMap::from([
                ("io.containerd.image.name".to_owned(), full_image_name(tag)),
                (REF_NAME.to_owned(), short.to_owned()),
            ])));
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    serde_json::to_vec(&index).expect("index.json serializes")
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The `oci-layout` file every layout begins with.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Every blob of `image` as stored: the one its ID names, then the others and the layers.
pub fn image_blobs(image: &pb::Image) -> impl Iterator<Item = (String, u64)> + '_ {
    std::iter::once((image.id.clone(), image.config_size))
        .chain(image.oci_blobs.iter().chain(image.layers.iter()).map(|blob| (blob.digest.clone(), blob.stored_size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(bytes: &[u8]) -> String {
        format!("sha256:{}", sha256_hex(bytes))
    }

    /// A containerd-store export of one image: an index with a platform manifest and an
    /// attestation manifest, as Engine 28.5 writes it.
    fn export_fixture() -> (Vec<u8>, String, Vec<u8>) {
        let layer = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3];
        let config = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"history":[{"created_by":"RUN x # buildkit"}],"moby.buildkit.cache.v0":"e30="}"#.to_vec();
        let statement = br#"{"_type":"https://in-toto.io/Statement/v0.1"}"#.to_vec();
        let attestation_config = br#"{"architecture":"unknown"}"#.to_vec();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest_of(&layer), "size": layer.len()}],
        }))
        .unwrap();
        let attestation = serde_json::to_vec(&serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(&attestation_config), "size": attestation_config.len()},
            "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": digest_of(&statement), "size": statement.len()}],
        }))
        .unwrap();
        let index = serde_json::to_vec(&serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest_of(&manifest), "size": manifest.len()},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest_of(&attestation), "size": attestation.len()},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "size": 10},
            ],
        }))
        .unwrap();
        let top = digest_of(&index);
        let mut tar = tar::Builder::new(Vec::new());
        for blob in [&layer, &config, &statement, &attestation_config, &manifest, &attestation, &index] {
            let mut header = tar::Header::new_gnu();
            header.set_size(blob.len() as u64);
            header.set_mode(0o444);
            header.set_cksum();
            tar.append_data(&mut header, crate::layout::blob_path(&digest_of(blob)), blob.as_slice()).unwrap();
        }
        let index_json = format!(
            r#"{{"manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{top}","size":{}}}]}}"#,
            index.len()
        );
        let mut header = tar::Header::new_gnu();
        header.set_size(index_json.len() as u64);
        header.set_cksum();
        tar.append_data(&mut header, "index.json", index_json.as_bytes()).unwrap();
        (tar.into_inner().unwrap(), top, layer)
    }

    #[test]
    fn an_export_resolves_to_its_layers_and_every_other_blob_it_reaches() {
        let (tarball, top, layer) = export_fixture();
        let spool = tempfile::tempdir().unwrap();
        let blobs = OciBlobs::read_export(tarball.as_slice(), spool.path()).unwrap();
        assert_eq!(blobs.index.len(), 1);
        assert_eq!(blobs.files.len(), 1, "only the gzip layer is spooled");
        let image = blobs.resolve(&top).unwrap();
        assert_eq!(image.layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(), vec![digest_of(&layer)]);
        // Two manifests, two configs and the statement; the absent platform is left out.
        assert_eq!(image.oci_blobs.len(), 5, "{:?}", image.oci_blobs);
        assert!(image.oci_blobs.iter().all(|blob| blobs.json.contains_key(&blob.digest)));
        assert_eq!(image.configs.len(), 2);
        assert!(
            crate::image_config::image_facts(&image.configs[0]).inline_cache
                || crate::image_config::image_facts(&image.configs[1]).inline_cache
        );
    }

    #[test]
    fn a_blob_that_does_not_hash_to_its_name_is_refused() {
        let (mut tarball, _, _) = export_fixture();
        // The gzip layer's last byte, inside the first entry's data.
        tarball[512 + 12] ^= 0xff;
        let spool = tempfile::tempdir().unwrap();
        let error = OciBlobs::read_export(tarball.as_slice(), spool.path()).unwrap_err();
        assert!(matches!(error, ExportError::DigestMismatch { .. }), "{error}");
    }

    #[test]
    fn cache_configs_merge_by_blob_and_parent_and_by_record_digest() {
        use serde_json::json;
        let mut merge = CacheMerge::default();
        // An absent parent is layer 0; -1 is none.
        merge
            .add(&json!({
                "layers": [{"blob": "b0", "parent": -1}, {"blob": "b1"}],
                "records": [
                    {"digest": "r0", "layers": [{"layer": 0, "createdAt": "t0"}]},
                    {"digest": "r1", "layers": [{"layer": 1, "createdAt": "t1"}], "inputs": [[{"link": 0}]]},
                ],
            }))
            .unwrap();
        // The same layers and records in another order, and one more step.
        merge
            .add(&json!({
                "layers": [{"blob": "b1", "parent": 1}, {"blob": "b0", "parent": -1}, {"blob": "b2"}],
                "records": [
                    {"digest": "r1", "layers": [{"layer": 0, "createdAt": "t1"}], "inputs": [[{"link": 1}]]},
                    {"digest": "r0", "layers": [{"layer": 1, "createdAt": "t0"}]},
                    {"digest": "r2", "layers": [{"layer": 2, "createdAt": "t2"}], "inputs": [[{"selector": "s", "link": 0}]]},
                ],
            }))
            .unwrap();
        assert_eq!(
            merge.into_config(),
            json!({
                "layers": [{"blob": "b0", "parent": -1}, {"blob": "b1", "parent": 0}, {"blob": "b2", "parent": 1}],
                "records": [
                    {"digest": "r0", "layers": [{"layer": 0, "createdAt": "t0"}]},
                    {"digest": "r1", "layers": [{"layer": 1, "createdAt": "t1"}], "inputs": [[{"link": 0}]]},
                    {"digest": "r2", "layers": [{"layer": 2, "createdAt": "t2"}], "inputs": [[{"selector": "s", "link": 1}]]},
                ],
            })
        );
        let mut broken = CacheMerge::default();
        assert!(broken.add(&json!({"layers": [{"blob": "b0", "parent": 0}]})).is_err(), "a layer its own parent");
        assert!(broken.add(&json!({"records": [{"digest": "r", "inputs": [[{"link": 5}]]}]})).is_err());
    }

    #[test]
    fn tags_get_the_names_containerd_gives_them() {
        assert_eq!(full_image_name("app:1"), "docker.io/library/app:1");
        assert_eq!(full_image_name("team/app:1"), "docker.io/team/app:1");
        assert_eq!(full_image_name("registry.example:5000/app:1"), "registry.example:5000/app:1");
        assert_eq!(full_image_name("localhost/app:1"), "localhost/app:1");
        let image = pb::Image {
            id: "sha256:ab".into(),
            repo_tags: vec!["app:1".into(), "app:latest".into()],
            oci_media_type: "application/vnd.oci.image.index.v1+json".into(),
            config_size: 7,
            ..Default::default()
        };
        let index: serde_json::Value = serde_json::from_slice(&index_json(&[&image])).unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
        assert_eq!(index["manifests"][1]["annotations"]["io.containerd.image.name"], "docker.io/library/app:latest");
        assert_eq!(index["manifests"][1]["annotations"][REF_NAME], "latest");
        assert_eq!(index["manifests"][0]["size"], 7);
    }
}
