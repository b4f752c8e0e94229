//! The object-key layout of the store, in one place: `<store prefix>/<project>/` holds a
//! project's objects, `<project prefix>blobs/sha256/<hex>` each blob, addressed by content.
//! The coordinator writes policies and checks keys by it; the worker and the tests address
//! blobs by it under the prefix the coordinator's credentials name.

use crate::digest::digest_hex;

/// The folder of blobs under a project's prefix.
pub const BLOBS_DIR: &str = "blobs/sha256/";

/// Where a project's objects live: `<store prefix>/<project>/` (or `<project>/` without one).
pub fn project_prefix(store_prefix: &str, project: &str) -> String {
    if store_prefix.is_empty() { format!("{project}/") } else { format!("{store_prefix}/{project}/") }
}

/// Where a project's blobs live: `<project prefix>blobs/sha256/`.
pub fn blobs_prefix(project_prefix: &str) -> String {
    format!("{project_prefix}{BLOBS_DIR}")
}

/// Where a blob lives: `<project prefix>blobs/sha256/<hex>`.
pub fn blob_key(project_prefix: &str, digest: &str) -> String {
    format!("{project_prefix}{BLOBS_DIR}{}", digest_hex(digest))
}

/// The hex digest a blob's key names (any prefix before `blobs/sha256/`), if it names one.
pub fn blob_hex_of_key(key: &str) -> Option<&str> {
    key.rsplit_once(&format!("/{BLOBS_DIR}")).map(|(_, hex)| hex).or_else(|| key.strip_prefix(BLOBS_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        let hex = "a".repeat(64);
        assert_eq!(project_prefix("cache", "web"), "cache/web/");
        assert_eq!(project_prefix("", "web"), "web/");
        assert_eq!(blobs_prefix("cache/web/"), "cache/web/blobs/sha256/");
        assert_eq!(blob_key("cache/web/", &format!("sha256:{hex}")), format!("cache/web/blobs/sha256/{hex}"));
        assert_eq!(blob_hex_of_key(&format!("cache/web/blobs/sha256/{hex}")), Some(hex.as_str()));
        assert_eq!(blob_hex_of_key("cache/web/x"), None);
    }
}
