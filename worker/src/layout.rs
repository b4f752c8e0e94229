//! The OCI image layout's paths, in one place: a blob at `blobs/sha256/<hex>` (the store's rule
//! for a blob's key, `proto::object_keys`, under an empty prefix), `oci-layout` and
//! `index.json` beside them.

use std::path::{Path, PathBuf};

use proto::digest::SHA256_PREFIX;
use proto::object_keys::{BLOBS_DIR, blob_key};

/// A blob's path inside a layout (or a layout tarball): `blobs/sha256/<hex>`.
pub fn blob_path(digest: &str) -> String {
    blob_key("", digest)
}

/// A blob's file in the layout folder `layout`.
pub fn blob_file(layout: &Path, digest: &str) -> PathBuf {
    layout.join(blob_path(digest))
}

/// The digest a path inside a layout names, when it is a blob's (`blobs/sha256/<hex>`).
pub fn digest_of_blob_path(path: &str) -> Option<String> {
    path.strip_prefix(BLOBS_DIR).map(|hex| format!("{SHA256_PREFIX}{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_path_names_its_digest_back() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(blob_path(&digest), format!("blobs/sha256/{}", "ab".repeat(32)));
        assert_eq!(digest_of_blob_path(&blob_path(&digest)), Some(digest.clone()));
        assert_eq!(blob_file(Path::new("/l"), &digest), Path::new("/l").join(blob_path(&digest)));
        assert_eq!(digest_of_blob_path("manifest.json"), None);
    }
}
