//! Reads a `docker save` tarball as it streams, in both formats engines write: the legacy one
//! (Engine 20.10: `<v1 id>/layer.tar`, `<config hex>.json`, `manifest.json`) and the OCI layout
//! (Engines 25+: `blobs/sha256/<digest>`, `index.json`, and a `manifest.json` too).
//!
//! Blobs the store lacks are hashed while they are spooled to a temporary file and handed to
//! the caller to upload; everything else is read past. The result maps every image's config
//! and layers to digests and sizes, checked against the diff IDs the engine reported.
//!
//! The containerd image store exports layers as the compressed blobs it holds (gzip): those are
//! kept compressed (never recompressed), addressed by their diff ID, which is checked by
//! decompressing once while spooling.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use proto::v1 as pb;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::image_config::{ImageFacts, image_facts};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("reading the engine's export failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the engine's export is not in a format this worker reads: {0}")]
    Format(String),
    #[error("blob {path} of the export hashes to {actual}, not {expected}")]
    DigestMismatch { path: String, expected: String, actual: String },
}

/// A blob the store lacks, hashed and ready to upload.
pub enum SpooledBlob {
    /// A layer, in a temporary file deleted when this is dropped; `layer` says how it is stored
    /// (the file holds `layer.stored_size` bytes).
    File { layer: pb::Layer, path: tempfile::TempPath },
    /// A config JSON.
    Bytes { digest: String, bytes: Vec<u8> },
    /// A layer whose digest is certain before it is read: its bytes stream straight to the
    /// upload (`layer.stored_size` of them), hashed as they pass, with no spool. The last piece
    /// is held back until the digest matches, so on a mismatch the upload fails before the
    /// store keeps anything.
    Stream { layer: pb::Layer, body: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>> },
}

impl SpooledBlob {
    pub fn digest(&self) -> &str {
        match self {
            SpooledBlob::File { layer, .. } => &layer.digest,
            SpooledBlob::Bytes { digest, .. } => digest,
            SpooledBlob::Stream { layer, .. } => &layer.digest,
        }
    }
}

/// What the export held.
#[derive(Debug, Default, PartialEq)]
pub struct ExportSummary {
    /// Every config and layer this export described and this reader measured, as it will be
    /// stored, by digest (a config's `size` is its length). Compressed layers that were read
    /// past (already stored) are absent: the coordinator's ledger describes them.
    pub blobs: HashMap<String, pb::Layer>,
    /// What each config read says about how its image was built.
    pub facts: HashMap<String, ImageFacts>,
    /// The format the engine wrote: "legacy" or "oci".
    pub format: &'static str,
}

fn plain(digest: &str, size: u64) -> pb::Layer {
    pb::Layer { digest: digest.to_owned(), size, stored_size: size, ..Default::default() }
}

/// One entry of `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ManifestEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

const CHUNK: usize = 1024 * 1024;

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Hashes and counts what is written to it: the decompressed side of a gzip layer.
#[derive(Default)]
struct HashingWriter {
    hasher: Sha256,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A blob spooled to a temporary file: the sha256 and size of the bytes in the file and, for a
/// gzip blob, of its decompressed content.
struct Spooled {
    digest: String,
    size: u64,
    decompressed: Option<(String, u64)>,
    path: tempfile::TempPath,
}

/// Copies `head` and then the rest of `reader` into a new temporary file in `spool_dir`,
/// hashing along (and, with `gunzip`, hashing the decompressed bytes too).
fn spool<R: Read>(head: &[u8], reader: &mut R, spool_dir: &Path, gunzip: bool) -> std::io::Result<Spooled> {
    let mut file = tempfile::NamedTempFile::new_in(spool_dir)?;
    let mut hasher = Sha256::new();
    let mut decoder = gunzip.then(|| flate2::write::GzDecoder::new(HashingWriter::default()));
    let mut buffer = vec![0u8; CHUNK];
    let mut size = 0u64;
    let mut chunk: &[u8] = head;
    loop {
        if !chunk.is_empty() {
            hasher.update(chunk);
            file.write_all(chunk)?;
            if let Some(decoder) = decoder.as_mut() {
                decoder.write_all(chunk)?;
            }
            size += chunk.len() as u64;
        }
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        chunk = &buffer[..n];
    }
    file.flush()?;
    let decompressed = match decoder {
        Some(decoder) => {
            let inner = decoder.finish()?;
            Some((format!("sha256:{}", hex::encode(inner.hasher.finalize())), inner.size))
        }
        None => None,
    };
    Ok(Spooled {
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        size,
        decompressed,
        path: file.into_temp_path(),
    })
}

/// Streams an entry that must hash to `layer.digest` to the upload behind `on_blob`, holding
/// the last piece back until the digest is checked.
fn stream_entry<R: Read>(
    reader: &mut R,
    layer: pb::Layer,
    path: &str,
    on_blob: &mut impl FnMut(SpooledBlob) -> std::io::Result<()>,
) -> Result<(), ExportError> {
    let (sender, body) = tokio::sync::mpsc::channel(STREAM_PIECES);
    let digest = layer.digest.clone();
    on_blob(SpooledBlob::Stream { layer, body })?;
    // A closed channel means the upload failed: the save reports that error.
    let closed = || std::io::Error::other("an upload failed");
    let mut hasher = Sha256::new();
    let mut held: Option<bytes::Bytes> = None;
    loop {
        let mut piece = vec![0u8; CHUNK];
        let n = read_full(reader, &mut piece)?;
        if n == 0 {
            break;
        }
        piece.truncate(n);
        hasher.update(&piece);
        if let Some(previous) = held.replace(bytes::Bytes::from(piece)) {
            sender.blocking_send(Ok(previous)).map_err(|_| closed())?;
        }
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != digest {
        let _ = sender.blocking_send(Err(std::io::Error::other(format!("blob {digest} hashes to {actual}"))));
        return Err(ExportError::DigestMismatch { path: path.to_owned(), expected: digest, actual });
    }
    if let Some(last) = held {
        sender.blocking_send(Ok(last)).map_err(|_| closed())?;
    }
    Ok(())
}

/// Fills `buffer` unless the reader ends first; returns how many bytes it read.
fn read_full<R: Read>(reader: &mut R, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Pieces of a streamed layer between the export's reader and its upload: memory is this many
/// times [`CHUNK`].
const STREAM_PIECES: usize = 4;

/// Reads up to `limit` bytes: enough to tell a gzip stream from JSON.
fn read_head<R: Read>(reader: &mut R, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(limit);
    reader.take(limit as u64).read_to_end(&mut head)?;
    Ok(head)
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The digest a path names in the OCI layout (`blobs/sha256/<hex>`) or the legacy config
/// name (`<hex>.json`).
fn digest_in_path(path: &str) -> Option<String> {
    let hex = path.strip_prefix("blobs/sha256/").or_else(|| path.strip_suffix(".json"))?;
    let digest = format!("sha256:{hex}");
    proto::names::validate_digest(&digest).ok().map(|()| digest)
}

/// Normalises `dir/../other/layer.tar`-style symlink targets of the legacy format.
fn resolve_link(entry_path: &str, target: &str) -> String {
    let mut parts: Vec<&str> = entry_path.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            ".." => {
                parts.pop();
            }
            "." | "" => {}
            other => parts.push(other),
        }
    }
    parts.join("/")
}

/// Reads the export from `reader`. `diff_ids` maps each image ID of the chain to its layers'
/// diff IDs as the engine reported them; `missing` holds the digests the store lacks, each of
/// which is handed to `on_blob` once, verified.
pub fn read_export<R: Read>(
    reader: R,
    diff_ids: &HashMap<String, Vec<String>>,
    missing: &HashSet<String>,
    spool_dir: &Path,
    mut on_blob: impl FnMut(SpooledBlob) -> std::io::Result<()>,
) -> Result<ExportSummary, ExportError> {
    let layer_digests: HashSet<&String> = diff_ids.values().flatten().collect();
    let mut emitted: HashSet<String> = HashSet::new();
    let missing_layers = missing.iter().filter(|digest| layer_digests.contains(digest)).count();
    let mut manifest_json: Option<Vec<u8>> = None;
    // Sizes of entries by path; what hashing found for the entries it read, by path; symlinks
    // by path to their target.
    let mut path_sizes: HashMap<String, u64> = HashMap::new();
    let mut path_layers: HashMap<String, pb::Layer> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    let mut summary = ExportSummary { format: "legacy", ..Default::default() };
    let mut layer_files_seen = 0;

    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().trim_start_matches("./").to_owned();
        let entry_type = entry.header().entry_type();
        if entry_type.is_symlink() || entry_type.is_hard_link() {
            if let Some(target) = entry.link_name()? {
                let target = target.to_string_lossy().into_owned();
                let resolved = if entry_type.is_symlink() { resolve_link(&path, &target) } else { target };
                links.insert(path, resolved);
            }
            continue;
        }
        if !entry_type.is_file() {
            continue;
        }
        let size = entry.size();
        if path == "manifest.json" {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            manifest_json = Some(bytes);
            continue;
        }
        if path == "oci-layout" {
            summary.format = "oci";
            continue;
        }
        // Legacy layers are named by v1 IDs, compressed ones by their compressed digest: hash
        // them only while a missing layer may be among them.
        let layers_outstanding =
            emitted.iter().filter(|digest| layer_digests.contains(digest)).count() < missing_layers;
        if let Some(digest) = digest_in_path(&path) {
            path_sizes.insert(path.clone(), size);
            if diff_ids.contains_key(&digest) {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes)?;
                let actual = sha256_digest(&bytes);
                if actual != digest {
                    return Err(ExportError::DigestMismatch { path, expected: digest, actual });
                }
                summary.facts.insert(digest.clone(), image_facts(&bytes));
                summary.blobs.insert(digest.clone(), plain(&digest, size));
                if missing.contains(&digest) && emitted.insert(digest.clone()) {
                    on_blob(SpooledBlob::Bytes { digest: digest.clone(), bytes })?;
                }
            } else if layer_digests.contains(&digest) {
                if missing.contains(&digest) && !emitted.contains(&digest) {
                    // The OCI layout names the blob: no spool needed.
                    stream_entry(&mut entry, plain(&digest, size), &path, &mut on_blob)?;
                    emitted.insert(digest.clone());
                }
                path_layers.insert(path, plain(&digest, size));
            } else if layers_outstanding {
                // An OCI manifest or index (JSON), or a compressed layer.
                let head = read_head(&mut entry, 2)?;
                if head.starts_with(&GZIP_MAGIC) {
                    let spooled = spool(&head, &mut entry, spool_dir, true)?;
                    if spooled.digest != digest {
                        return Err(ExportError::DigestMismatch { path, expected: digest, actual: spooled.digest });
                    }
                    let (diff_id, uncompressed_size) = spooled.decompressed.clone().expect("gunzipped");
                    let layer = pb::Layer {
                        digest: diff_id.clone(),
                        size: uncompressed_size,
                        encoding: "gzip".into(),
                        stored_size: spooled.size,
                        stored_digest: spooled.digest.clone(),
                    };
                    if missing.contains(&diff_id) && emitted.insert(diff_id) {
                        on_blob(SpooledBlob::File { layer: layer.clone(), path: spooled.path })?;
                    }
                    path_layers.insert(path, layer);
                }
            }
            continue;
        }
        if path.ends_with("/layer.tar") {
            path_sizes.insert(path.clone(), size);
            layer_files_seen += 1;
            // Engine 20.10 names layers by v1 ID and writes each distinct layer once (repeats
            // are symlinks): when this is the last layer file and one missing layer is still
            // unseen, this is it, and it can stream without a spool.
            let unseen: Vec<&String> =
                missing.iter().filter(|digest| layer_digests.contains(digest) && !emitted.contains(*digest)).collect();
            if layer_files_seen == layer_digests.len() && unseen.len() == 1 {
                let digest = unseen[0].clone();
                stream_entry(&mut entry, plain(&digest, size), &path, &mut on_blob)?;
                emitted.insert(digest.clone());
                path_layers.insert(path, plain(&digest, size));
            } else if layers_outstanding {
                let spooled = spool(&[], &mut entry, spool_dir, false)?;
                let layer = plain(&spooled.digest, size);
                if missing.contains(&spooled.digest) && emitted.insert(spooled.digest.clone()) {
                    on_blob(SpooledBlob::File { layer: layer.clone(), path: spooled.path })?;
                }
                path_layers.insert(path, layer);
            }
        }
    }

    let manifest_json = manifest_json.ok_or_else(|| ExportError::Format("no manifest.json".into()))?;
    let entries: Vec<ManifestEntry> = serde_json::from_slice(&manifest_json)
        .map_err(|error| ExportError::Format(format!("manifest.json: {error}")))?;
    for entry in entries {
        let config_digest = digest_in_path(&entry.config)
            .ok_or_else(|| ExportError::Format(format!("unexpected config path {:?}", entry.config)))?;
        if !path_sizes.contains_key(&entry.config) {
            return Err(ExportError::Format(format!("config {} is missing from the export", entry.config)));
        }
        let Some(expected) = diff_ids.get(&config_digest) else { continue };
        if expected.len() != entry.layers.len() {
            return Err(ExportError::Format(format!(
                "image {config_digest} has {} layers in the export, {} in the engine",
                entry.layers.len(),
                expected.len()
            )));
        }
        for (layer_path, diff_id) in entry.layers.iter().zip(expected) {
            let resolved = links.get(layer_path).unwrap_or(layer_path);
            let size = *path_sizes
                .get(resolved)
                .ok_or_else(|| ExportError::Format(format!("layer {layer_path} is missing from the export")))?;
            match path_layers.get(resolved) {
                Some(layer) if &layer.digest != diff_id => {
                    return Err(ExportError::DigestMismatch {
                        path: layer_path.clone(),
                        expected: diff_id.clone(),
                        actual: layer.digest.clone(),
                    });
                }
                Some(layer) => {
                    summary.blobs.insert(diff_id.clone(), layer.clone());
                }
                // Read past: a plain layer's size is its entry's; a compressed one the ledger
                // already describes.
                None if digest_in_path(resolved).is_none_or(|digest| &digest == diff_id) => {
                    summary.blobs.insert(diff_id.clone(), plain(diff_id, size));
                }
                None => {}
            }
        }
    }
    for digest in missing {
        if !emitted.contains(digest) {
            return Err(ExportError::Format(format!("blob {digest} is not in the export")));
        }
    }
    Ok(summary)
}

/// Bytes the blocking reader of an export receives at a time.
const HANDOFF_CHUNK: usize = 1 << 20;

/// A blocking reader of an async byte stream (the engine's export) for the tar parser on a
/// blocking thread. The stream's small chunks are gathered into 1 MiB pieces first: handing
/// each chunk across threads (as `SyncIoBridge` does) cost more CPU in context switches than
/// hashing the bytes. Must be called inside the runtime.
pub fn blocking_reader<S>(stream: S) -> impl Read + Send + 'static
where
    S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
{
    use futures::StreamExt;
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut piece = bytes::BytesMut::with_capacity(HANDOFF_CHUNK);
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => piece.extend_from_slice(&chunk),
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
            }
            if piece.len() >= HANDOFF_CHUNK {
                let full = std::mem::replace(&mut piece, bytes::BytesMut::with_capacity(HANDOFF_CHUNK));
                if sender.send(Ok(full.freeze())).await.is_err() {
                    return;
                }
            }
        }
        if !piece.is_empty() {
            let _ = sender.send(Ok(piece.freeze())).await;
        }
    });
    HandoffReader { receiver, current: bytes::Bytes::new() }
}

struct HandoffReader {
    receiver: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl Read for HandoffReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(piece) => self.current = piece?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Where spooled layers go: `CACHE_SPOOL_DIR`, else the system's temporary folder.
pub fn spool_dir() -> PathBuf {
    std::env::var_os("CACHE_SPOOL_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tarball builder for fixtures.
    pub(crate) struct Fixture(tar::Builder<Vec<u8>>);

    impl Fixture {
        pub(crate) fn new() -> Fixture {
            Fixture(tar::Builder::new(Vec::new()))
        }

        pub(crate) fn file(&mut self, path: &str, bytes: &[u8]) -> &mut Fixture {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            self.0.append_data(&mut header, path, bytes).unwrap();
            self
        }

        fn symlink(&mut self, path: &str, target: &str) -> &mut Fixture {
            let mut header = tar::Header::new_gnu();
            header.set_size(0);
            header.set_entry_type(tar::EntryType::Symlink);
            self.0.append_link(&mut header, path, target).unwrap();
            self
        }

        pub(crate) fn finish(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    /// A small layer tar with one file.
    pub(crate) fn layer(content: &[u8]) -> Vec<u8> {
        let mut fixture = Fixture::new();
        fixture.file("file", content);
        fixture.finish()
    }

    fn hex(digest: &str) -> &str {
        digest.strip_prefix("sha256:").unwrap()
    }

    /// The parts of a two-image chain: base has one layer; app has base's layer plus one.
    struct Chain {
        base_layer: Vec<u8>,
        app_layer: Vec<u8>,
        base_config: Vec<u8>,
        app_config: Vec<u8>,
        diff_ids: HashMap<String, Vec<String>>,
    }

    /// The same chain for both formats.
    fn chain() -> Chain {
        let base_layer = layer(b"base");
        let app_layer = layer(b"app");
        let (base_diff, app_diff) = (sha256_digest(&base_layer), sha256_digest(&app_layer));
        let base_config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{base_diff}"]}}}}"#).into_bytes();
        let app_config =
            format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{base_diff}","{app_diff}"]}}}}"#).into_bytes();
        let diff_ids = HashMap::from([
            (sha256_digest(&base_config), vec![base_diff.clone()]),
            (sha256_digest(&app_config), vec![base_diff, app_diff]),
        ]);
        Chain { base_layer, app_layer, base_config, app_config, diff_ids }
    }

    fn legacy_export() -> (Vec<u8>, HashMap<String, Vec<String>>) {
        let Chain { base_layer, app_layer, base_config, app_config, diff_ids } = chain();
        let (base_id, app_id) = (sha256_digest(&base_config), sha256_digest(&app_config));
        let manifest = format!(
            r#"[{{"Config":"{b}.json","RepoTags":["base:1"],"Layers":["v1a/layer.tar"]}},
               {{"Config":"{a}.json","RepoTags":null,"Layers":["v1b/layer.tar","v1c/layer.tar"],"Parent":"{base_id}"}}]"#,
            b = hex(&base_id),
            a = hex(&app_id),
        );
        let mut fixture = Fixture::new();
        fixture
            .file("v1a/VERSION", b"1.0")
            .file("v1a/layer.tar", &base_layer)
            .symlink("v1b/layer.tar", "../v1a/layer.tar")
            .file("v1c/layer.tar", &app_layer)
            .file(&format!("{}.json", hex(&base_id)), &base_config)
            .file(&format!("{}.json", hex(&app_id)), &app_config)
            .file("manifest.json", manifest.as_bytes())
            .file("repositories", b"{}");
        (fixture.finish(), diff_ids)
    }

    /// The OCI layout as Engines 25+ write it, made here rather than committed.
    fn oci_export() -> (Vec<u8>, HashMap<String, Vec<String>>) {
        let Chain { base_layer, app_layer, base_config, app_config, diff_ids } = chain();
        let (base_id, app_id) = (sha256_digest(&base_config), sha256_digest(&app_config));
        let (base_diff, app_diff) = (sha256_digest(&base_layer), sha256_digest(&app_layer));
        let oci_manifest = format!(r#"{{"schemaVersion":2,"config":{{"digest":"{app_id}"}}}}"#).into_bytes();
        let manifest = format!(
            r#"[{{"Config":"blobs/sha256/{b}","RepoTags":["base:1"],"Layers":["blobs/sha256/{bd}"]}},
               {{"Config":"blobs/sha256/{a}","RepoTags":null,"Layers":["blobs/sha256/{bd}","blobs/sha256/{ad}"]}}]"#,
            b = hex(&base_id),
            a = hex(&app_id),
            bd = hex(&base_diff),
            ad = hex(&app_diff),
        );
        let mut fixture = Fixture::new();
        fixture
            .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
            .file(&format!("blobs/sha256/{}", hex(&base_diff)), &base_layer)
            .file(&format!("blobs/sha256/{}", hex(&app_diff)), &app_layer)
            .file(&format!("blobs/sha256/{}", hex(&base_id)), &base_config)
            .file(&format!("blobs/sha256/{}", hex(&app_id)), &app_config)
            .file(&format!("blobs/sha256/{}", hex(&sha256_digest(&oci_manifest))), &oci_manifest)
            .file("index.json", b"{}")
            .file("manifest.json", manifest.as_bytes());
        (fixture.finish(), diff_ids)
    }

    fn read(
        tarball: &[u8],
        diff_ids: &HashMap<String, Vec<String>>,
        missing: &HashSet<String>,
    ) -> (ExportSummary, Vec<(String, u64)>) {
        let spool_dir = tempfile::tempdir().unwrap();
        let mut blobs = Vec::new();
        let mut streams = Vec::new();
        let summary = read_export(tarball, diff_ids, missing, spool_dir.path(), |blob| {
            let size = match &blob {
                SpooledBlob::File { path, layer } => {
                    let bytes = std::fs::read(path).unwrap();
                    let stored_digest =
                        if layer.stored_digest.is_empty() { &layer.digest } else { &layer.stored_digest };
                    assert_eq!(&sha256_digest(&bytes), stored_digest);
                    layer.stored_size
                }
                SpooledBlob::Bytes { bytes, .. } => bytes.len() as u64,
                SpooledBlob::Stream { .. } => {
                    streams.push(blob);
                    return Ok(());
                }
            };
            blobs.push((blob.digest().to_owned(), size));
            Ok(())
        })
        .unwrap();
        // Streamed layers arrive whole and verified once the reader is done with them.
        for blob in streams {
            let SpooledBlob::Stream { layer, mut body } = blob else { unreachable!() };
            let mut bytes = Vec::new();
            while let Some(piece) = body.blocking_recv() {
                bytes.extend_from_slice(&piece.unwrap());
            }
            assert_eq!(sha256_digest(&bytes), layer.digest);
            assert_eq!(bytes.len() as u64, layer.stored_size);
            blobs.push((layer.digest, layer.stored_size));
        }
        blobs.sort();
        (summary, blobs)
    }

    #[test]
    fn both_formats_read_into_the_same_shape() {
        let (legacy, diff_ids) = legacy_export();
        let (oci, oci_diff_ids) = oci_export();
        assert_eq!(diff_ids, oci_diff_ids);
        let everything: HashSet<String> = diff_ids.keys().chain(diff_ids.values().flatten()).cloned().collect();
        let (legacy_summary, legacy_blobs) = read(&legacy, &diff_ids, &everything);
        let (oci_summary, oci_blobs) = read(&oci, &diff_ids, &everything);
        assert_eq!((legacy_summary.format, oci_summary.format), ("legacy", "oci"));
        assert_eq!(legacy_summary.blobs, oci_summary.blobs);
        assert_eq!(legacy_summary.blobs.len(), 4, "two configs, two distinct layers");
        assert_eq!(legacy_summary.facts, oci_summary.facts);
        // Each missing blob once, even where the legacy format repeats a layer.
        assert_eq!(legacy_blobs, oci_blobs);
        assert_eq!(legacy_blobs.len(), 4);
    }

    #[test]
    fn only_missing_blobs_are_handed_over() {
        let (legacy, diff_ids) = legacy_export();
        let app_layer = sha256_digest(&layer(b"app"));
        let missing = HashSet::from([app_layer.clone()]);
        let (summary, blobs) = read(&legacy, &diff_ids, &missing);
        assert_eq!(blobs, vec![(app_layer, layer(b"app").len() as u64)]);
        assert_eq!(summary.blobs.len(), 4);
        let (summary, blobs) = read(&legacy, &diff_ids, &HashSet::new());
        assert!(blobs.is_empty());
        assert_eq!(summary.blobs.len(), 4);
    }

    #[test]
    fn gzip_layers_stay_compressed_and_are_addressed_by_their_diff_id() {
        let layer_tar = layer(b"compressed");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&layer_tar).unwrap();
        let gzipped = encoder.finish().unwrap();
        let (diff_id, stored_digest) = (sha256_digest(&layer_tar), sha256_digest(&gzipped));
        let config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#).into_bytes();
        let config_id = sha256_digest(&config);
        let manifest = format!(
            r#"[{{"Config":"blobs/sha256/{c}","RepoTags":["app:1"],"Layers":["blobs/sha256/{l}"]}}]"#,
            c = hex(&config_id),
            l = hex(&stored_digest),
        );
        let mut fixture = Fixture::new();
        fixture
            .file("oci-layout", b"{}")
            .file(&format!("blobs/sha256/{}", hex(&config_id)), &config)
            .file(&format!("blobs/sha256/{}", hex(&stored_digest)), &gzipped)
            .file("manifest.json", manifest.as_bytes());
        let diff_ids = HashMap::from([(config_id, vec![diff_id.clone()])]);
        let (summary, blobs) = read(&fixture.finish(), &diff_ids, &HashSet::from([diff_id.clone()]));
        assert_eq!(blobs, vec![(diff_id.clone(), gzipped.len() as u64)], "the compressed bytes, as they were");
        let stored = &summary.blobs[&diff_id];
        assert_eq!(
            (stored.encoding.as_str(), stored.size, stored.stored_size, stored.stored_digest.as_str()),
            ("gzip", layer_tar.len() as u64, gzipped.len() as u64, stored_digest.as_str())
        );
    }

    #[test]
    fn a_layer_that_does_not_match_the_engines_diff_id_is_an_error() {
        let (legacy, mut diff_ids) = legacy_export();
        let app_id = diff_ids.iter().find(|(_, layers)| layers.len() == 2).unwrap().0.clone();
        diff_ids.get_mut(&app_id).unwrap()[1] = format!("sha256:{}", "0".repeat(64));
        let wanted = HashSet::from([format!("sha256:{}", "0".repeat(64))]);
        let spool_dir = tempfile::tempdir().unwrap();
        let mut bodies = Vec::new();
        let result = read_export(legacy.as_slice(), &diff_ids, &wanted, spool_dir.path(), |blob| {
            bodies.push(blob);
            Ok(())
        });
        assert!(matches!(result, Err(ExportError::DigestMismatch { .. })), "{result:?}");
        // A streamed layer that did not match ends in an error, so its upload fails before the
        // store keeps it.
        for blob in bodies {
            if let SpooledBlob::Stream { mut body, .. } = blob {
                let mut pieces = Vec::new();
                while let Some(piece) = body.blocking_recv() {
                    pieces.push(piece);
                }
                assert!(pieces.last().is_some_and(|piece| piece.is_err()), "the body ends in an error");
            }
        }
    }

    #[test]
    fn the_last_missing_layer_of_a_legacy_export_and_every_oci_layer_stream_without_a_spool() {
        let (legacy, diff_ids) = legacy_export();
        let (oci, _) = oci_export();
        let layers: HashSet<String> = diff_ids.values().flatten().cloned().collect();
        let spool_dir = tempfile::tempdir().unwrap();
        let kinds = |tarball: &[u8], missing: &HashSet<String>| {
            let mut kinds = Vec::new();
            let mut keep = Vec::new();
            read_export(tarball, &diff_ids, missing, spool_dir.path(), |blob| {
                kinds.push(matches!(blob, SpooledBlob::Stream { .. }));
                keep.push(blob);
                Ok(())
            })
            .unwrap();
            kinds.sort();
            kinds
        };
        // Legacy: of two missing layers, the second one read is known to be the last unseen.
        assert_eq!(kinds(&legacy, &layers), vec![false, true]);
        // OCI: the layout names every layer.
        assert_eq!(kinds(&oci, &layers), vec![true, true]);
    }
}
