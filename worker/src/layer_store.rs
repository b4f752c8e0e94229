//! Reads the graph driver's layers (overlay2) straight from the engine's data root, without
//! `docker save`: each layer's tar is reassembled from `tar-split.json.gz` (the exact headers
//! and padding of the tar the engine received) and the files in the layer's folder, the way the
//! engine itself produces it for `docker save` and `docker push`, so it hashes to the diff ID.
//! Image configs are read as their exact bytes from the image database.
//!
//! Nothing read here is trusted: the caller checks every layer against its diff ID as it
//! streams, and a config against its image ID, before anything is committed. Files are opened
//! without following symlinks, inside the layer's folder only.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The most one line of a tar-split file may hold: a segment is a few tar headers (a long name
/// is one more), so anything near this is not the engine's.
const LINE_LIMIT: usize = 16 << 20;

/// The engine's layer and image stores of one graph driver.
#[derive(Debug, Clone)]
pub struct LayerStore {
    /// `<data root>/image/overlay2`: `layerdb/` and `imagedb/`.
    metadata: PathBuf,
    /// `<data root>/overlay2`: each layer's folder, `<cache-id>/diff`.
    layers: PathBuf,
}

/// One layer's tar, ready to stream.
pub struct LayerTar {
    /// Its length in bytes.
    pub size: u64,
    pub reader: TarAssembler,
}

/// A line of `tar-split.json.gz`.
#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    name: Option<String>,
    /// The name, when it is not UTF-8 (base64 of its bytes).
    #[serde(default)]
    name_raw: Option<String>,
    #[serde(default)]
    size: u64,
    /// A segment's bytes (base64); a file's CRC (unused: the layer's sha256 is checked).
    #[serde(default)]
    payload: Option<String>,
}

const FILE_ENTRY: u8 = 1;
const SEGMENT_ENTRY: u8 = 2;

fn decode(text: &str) -> std::io::Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|error| std::io::Error::other(format!("a tar-split line holds bad base64: {error}")))
}

/// The chain ID of each layer: the layer store's names for "these layers, in this order".
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{parent} {diff_id}")))),
        };
        chain.push(next);
    }
    chain
}

fn hex_of(digest: &str) -> Result<&str, String> {
    proto::names::validate_digest(digest).map_err(|error| error.to_string())?;
    Ok(digest.trim_start_matches("sha256:"))
}

impl LayerStore {
    /// The stores of `driver` under `data_root`, if this worker can read them; otherwise why
    /// not, in words for the log.
    pub fn open(data_root: &Path, driver: &str) -> Result<LayerStore, String> {
        if driver != "overlay2" {
            return Err(format!(
                "the engine's storage driver is {driver}, and only overlay2's layers are read directly"
            ));
        }
        let store = LayerStore { metadata: data_root.join("image").join(driver), layers: data_root.join(driver) };
        for dir in
            [store.metadata.join("layerdb/sha256"), store.metadata.join("imagedb/content/sha256"), store.layers.clone()]
        {
            if let Err(error) = std::fs::read_dir(&dir) {
                return Err(format!("this worker cannot read the engine's data root ({}: {error})", dir.display()));
            }
        }
        Ok(store)
    }

    /// An image's config, exactly as the engine stored it, checked against its ID.
    pub fn config(&self, image_id: &str) -> std::io::Result<Vec<u8>> {
        let hex = hex_of(image_id).map_err(std::io::Error::other)?;
        let path = self.metadata.join("imagedb/content/sha256").join(hex);
        let size = std::fs::metadata(&path)?.len();
        if size > crate::export::JSON_LIMIT {
            return Err(std::io::Error::other(format!("{} is {size} bytes, too big for a config", path.display())));
        }
        let bytes = std::fs::read(&path)?;
        if hex::encode(Sha256::digest(&bytes)) != hex {
            return Err(std::io::Error::other(format!("{} does not hash to the image ID", path.display())));
        }
        Ok(bytes)
    }

    /// The tar of the layer `chain_id` names, which must be the layer `diff_id`.
    pub fn layer(&self, chain_id: &str, diff_id: &str) -> std::io::Result<LayerTar> {
        let dir = self.metadata.join("layerdb/sha256").join(hex_of(chain_id).map_err(std::io::Error::other)?);
        let recorded = std::fs::read_to_string(dir.join("diff"))?;
        if recorded.trim() != diff_id {
            return Err(std::io::Error::other(format!(
                "{} records layer {}, not {diff_id}",
                dir.display(),
                recorded.trim()
            )));
        }
        let cache_id = std::fs::read_to_string(dir.join("cache-id"))?;
        let cache_id = cache_id.trim();
        if cache_id.is_empty() || !cache_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(std::io::Error::other(format!("{} names no layer folder", dir.display())));
        }
        let files = self.layers.join(cache_id).join("diff");
        let tar_split = dir.join("tar-split.json.gz");
        // A first pass for the length (an upload states it before its first byte).
        let mut size = 0u64;
        let mut lines = open_lines(&tar_split)?;
        while let Some(entry) = next_entry(&mut lines)? {
            size += match entry.kind {
                FILE_ENTRY => entry.size,
                SEGMENT_ENTRY => decode(entry.payload.as_deref().unwrap_or_default())?.len() as u64,
                _ => 0,
            };
        }
        let reader = TarAssembler {
            lines: open_lines(&tar_split)?,
            root: files,
            safe_dirs: HashSet::new(),
            pending: Vec::new(),
            offset: 0,
            file: None,
        };
        Ok(LayerTar { size, reader })
    }
}

type Lines = BufReader<flate2::read::GzDecoder<std::fs::File>>;

fn open_lines(path: &Path) -> std::io::Result<Lines> {
    Ok(BufReader::with_capacity(64 << 10, flate2::read::GzDecoder::new(std::fs::File::open(path)?)))
}

fn next_entry(lines: &mut Lines) -> std::io::Result<Option<Entry>> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = lines.by_ref().take(LINE_LIMIT as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if line.len() > LINE_LIMIT {
            return Err(std::io::Error::other("a tar-split line is longer than the engine writes"));
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&line)
            .map(Some)
            .map_err(|error| std::io::Error::other(format!("a tar-split line is not an entry: {error}")));
    }
}

/// Streams a layer's tar: each segment's bytes, then each file's content from the layer folder.
pub struct TarAssembler {
    lines: Lines,
    root: PathBuf,
    /// Folders under `root` already checked to be real folders, not symlinks.
    safe_dirs: HashSet<PathBuf>,
    /// The segment being handed out, from `offset`.
    pending: Vec<u8>,
    offset: usize,
    /// The file being handed out, with the bytes still to come.
    file: Option<(std::io::Take<std::fs::File>, u64, PathBuf)>,
}

impl TarAssembler {
    /// Opens `name` inside the layer folder: every folder on the way must be a real one, and
    /// the file itself is opened without following a symlink.
    fn open_inside(&mut self, name: &[u8]) -> std::io::Result<(std::fs::File, PathBuf)> {
        let relative = Path::new(std::ffi::OsStr::from_bytes(name));
        let mut path = self.root.clone();
        // The engine joins the name to the folder as it is, so `./a` and `/a` are `a` there too.
        let mut parts =
            relative.components().filter(|part| !matches!(part, Component::CurDir | Component::RootDir)).peekable();
        while let Some(part) = parts.next() {
            let Component::Normal(part) = part else {
                return Err(std::io::Error::other(format!(
                    "the layer names a file outside it: {}",
                    relative.display()
                )));
            };
            path.push(part);
            if parts.peek().is_some() && !self.safe_dirs.contains(&path) {
                if !std::fs::symlink_metadata(&path)?.is_dir() {
                    return Err(std::io::Error::other(format!("{} is not a folder", path.display())));
                }
                self.safe_dirs.insert(path.clone());
            }
        }
        // Non-blocking, so a fifo where a file should be cannot hang the save.
        let file =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other(format!("{} is not a regular file", path.display())));
        }
        Ok((file, path))
    }

    /// Moves on to the next entry with bytes; false at the end.
    fn advance(&mut self) -> std::io::Result<bool> {
        while let Some(entry) = next_entry(&mut self.lines)? {
            match entry.kind {
                SEGMENT_ENTRY => {
                    self.pending = decode(entry.payload.as_deref().unwrap_or_default())?;
                    self.offset = 0;
                    if !self.pending.is_empty() {
                        return Ok(true);
                    }
                }
                FILE_ENTRY if entry.size > 0 => {
                    let name = match (entry.name_raw.as_deref(), entry.name.as_deref()) {
                        (Some(raw), _) => decode(raw)?,
                        (None, Some(name)) => name.as_bytes().to_vec(),
                        (None, None) => return Err(std::io::Error::other("a tar-split file entry has no name")),
                    };
                    let (file, path) = self.open_inside(&name)?;
                    self.file = Some((file.take(entry.size), entry.size, path));
                    return Ok(true);
                }
                _ => {}
            }
        }
        Ok(false)
    }
}

impl Read for TarAssembler {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        loop {
            if self.offset < self.pending.len() {
                let n = buffer.len().min(self.pending.len() - self.offset);
                buffer[..n].copy_from_slice(&self.pending[self.offset..self.offset + n]);
                self.offset += n;
                return Ok(n);
            }
            if let Some((file, left, path)) = self.file.as_mut() {
                let n = file.read(buffer)?;
                if n == 0 {
                    if *left > 0 {
                        let message = format!("{} is {left} bytes shorter than the layer recorded", path.display());
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, message));
                    }
                    self.file = None;
                    continue;
                }
                *left -= n as u64;
                return Ok(n);
            }
            if !self.advance()? {
                return Ok(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_split(lines: &[serde_json::Value]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for line in lines {
            writeln!(encoder, "{line}").unwrap();
        }
        encoder.finish().unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A layer store with one layer whose tar-split names `files`.
    fn store_with(lines: &[serde_json::Value], files: &[(&str, &[u8])]) -> (tempfile::TempDir, LayerStore) {
        let root = tempfile::tempdir().unwrap();
        let chain = root.path().join("image/overlay2/layerdb/sha256").join("a".repeat(64));
        std::fs::create_dir_all(&chain).unwrap();
        std::fs::create_dir_all(root.path().join("image/overlay2/imagedb/content/sha256")).unwrap();
        std::fs::write(chain.join("diff"), format!("sha256:{}", "b".repeat(64))).unwrap();
        std::fs::write(chain.join("cache-id"), "c0ffee").unwrap();
        std::fs::write(chain.join("tar-split.json.gz"), tar_split(lines)).unwrap();
        let diff = root.path().join("overlay2/c0ffee/diff");
        std::fs::create_dir_all(&diff).unwrap();
        for (name, content) in files {
            let path = diff.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        let store = LayerStore::open(root.path(), "overlay2").unwrap();
        (root, store)
    }

    fn assemble(store: &LayerStore) -> std::io::Result<(u64, Vec<u8>)> {
        let mut layer = store.layer(&format!("sha256:{}", "a".repeat(64)), &format!("sha256:{}", "b".repeat(64)))?;
        let mut bytes = Vec::new();
        layer.reader.read_to_end(&mut bytes)?;
        Ok((layer.size, bytes))
    }

    #[test]
    fn segments_and_files_interleave_in_order_and_the_length_is_known_first() {
        let lines = [
            serde_json::json!({"type": 2, "payload": b64(b"HEAD1"), "position": 0}),
            serde_json::json!({"type": 1, "name": "d/f", "size": 3, "payload": null, "position": 1}),
            serde_json::json!({"type": 1, "name": "empty", "size": 0, "payload": null, "position": 2}),
            serde_json::json!({"type": 2, "payload": b64(b"PAD"), "position": 3}),
            serde_json::json!({"type": 1, "name_raw": b64(b"caf\xe9"), "size": 2, "position": 4}),
            serde_json::json!({"type": 2, "payload": b64(b"END"), "position": 5}),
        ];
        let (_root, store) = store_with(&lines, &[("d/f", b"abc"), ("caf\u{e9}", b"zz")]);
        // The non-UTF-8 name is not the file written above (that one is UTF-8): it is missing.
        assert_eq!(assemble(&store).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        let lines = [lines[0].clone(), lines[1].clone(), lines[2].clone(), lines[3].clone(), lines[5].clone()];
        let (_root, store) = store_with(&lines, &[("d/f", b"abc")]);
        let (size, bytes) = assemble(&store).unwrap();
        assert_eq!(bytes, b"HEAD1abcPADEND");
        assert_eq!(size, bytes.len() as u64);
    }

    #[test]
    fn a_short_file_a_symlinked_folder_and_a_name_outside_the_layer_are_refused() {
        let short = [serde_json::json!({"type": 1, "name": "f", "size": 10, "position": 0})];
        let (_root, store) = store_with(&short, &[("f", b"abc")]);
        assert!(assemble(&store).unwrap_err().to_string().contains("shorter"));

        let outside = [serde_json::json!({"type": 1, "name": "../../../etc/passwd", "size": 1, "position": 0})];
        let (_root, store) = store_with(&outside, &[]);
        assert!(assemble(&store).unwrap_err().to_string().contains("outside"));

        let through_link = [serde_json::json!({"type": 1, "name": "link/passwd", "size": 1, "position": 0})];
        let (root, store) = store_with(&through_link, &[]);
        std::os::unix::fs::symlink("/etc", root.path().join("overlay2/c0ffee/diff/link")).unwrap();
        assert!(assemble(&store).unwrap_err().to_string().contains("not a folder"));

        let fifo = [serde_json::json!({"type": 1, "name": "fifo", "size": 1, "position": 0})];
        let (root, store) = store_with(&fifo, &[]);
        let made = std::process::Command::new("mkfifo").arg(root.path().join("overlay2/c0ffee/diff/fifo")).status();
        assert!(made.unwrap().success());
        assert!(assemble(&store).unwrap_err().to_string().contains("not a regular file"));

        let link_itself = [serde_json::json!({"type": 1, "name": "passwd", "size": 1, "position": 0})];
        let (root, store) = store_with(&link_itself, &[]);
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("overlay2/c0ffee/diff/passwd")).unwrap();
        assert!(assemble(&store).is_err(), "a symlink is never followed");
    }

    #[test]
    fn a_layer_recorded_as_another_diff_id_is_refused() {
        let (_root, store) = store_with(&[], &[]);
        let error = store.layer(&format!("sha256:{}", "a".repeat(64)), &format!("sha256:{}", "d".repeat(64))).err();
        assert!(error.unwrap().to_string().contains("records layer"));
    }

    #[test]
    fn chain_ids_follow_the_layer_store_rule() {
        let diff_ids = vec![format!("sha256:{}", "1".repeat(64)), format!("sha256:{}", "2".repeat(64))];
        let chain = chain_ids(&diff_ids);
        assert_eq!(chain[0], diff_ids[0]);
        let expected = Sha256::digest(format!("{} {}", diff_ids[0], diff_ids[1]));
        assert_eq!(chain[1], format!("sha256:{}", hex::encode(expected)));
    }

    #[test]
    fn only_overlay2_is_read_and_a_missing_root_says_so() {
        let root = tempfile::tempdir().unwrap();
        assert!(LayerStore::open(root.path(), "vfs").unwrap_err().contains("only overlay2"));
        assert!(LayerStore::open(root.path(), "overlay2").unwrap_err().contains("cannot read the engine's data root"));
    }
}
