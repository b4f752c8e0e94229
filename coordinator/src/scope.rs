//! What a minted storage key may do on the embedded S3 endpoint: a pure function of the
//! request (operation, bucket, object key or list prefix) and the key's scope.
//!
//! Architecture Invariant: a key reaches only `<bucket>/<prefix>/<project>/`, never deletes,
//! a read key never writes, and a write key writes only blobs (`blobs/sha256/<64 hex>`).

use crate::state::KeyAccess;

/// Where a minted key may act.
#[derive(Debug, Clone, Copy)]
pub struct KeyScope<'a> {
    pub bucket: &'a str,
    /// The project's key prefix, ending in `/`, e.g. `cache/web/`.
    pub project_prefix: &'a str,
    pub access: KeyAccess,
}

/// What a request addresses.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Root,
    /// A bucket-level request; `list_prefix` is the `prefix` query parameter of a listing.
    Bucket {
        bucket: &'a str,
        list_prefix: Option<&'a str>,
    },
    Object {
        bucket: &'a str,
        key: &'a str,
    },
}

const READ_OBJECT_OPERATIONS: &[&str] = &["GetObject", "HeadObject"];
const WRITE_OBJECT_OPERATIONS: &[&str] = &[
    "PutObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "ListParts",
];
const LIST_OPERATIONS: &[&str] = &["ListObjectsV2", "ListObjects"];

/// A key with only safe segments: no empty, `.` or `..` segment, only `A-Za-z0-9._-`.
pub(crate) fn is_safe_key_path(path: &str, allow_trailing_slash: bool) -> bool {
    let path = if allow_trailing_slash { path.strip_suffix('/').unwrap_or(path) } else { path };
    path.len() <= 1024
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// `Ok` when the scope allows `operation` on `target`; otherwise the reason, for the log and the
/// `AccessDenied` message.
pub fn authorize(scope: KeyScope<'_>, operation: &str, target: Target<'_>) -> Result<(), String> {
    match target {
        Target::Root => Err(format!("{operation} on the service root is outside the key's scope")),
        Target::Bucket { bucket, list_prefix } => {
            if bucket != scope.bucket {
                return Err(format!("bucket {bucket:?} is outside the key's scope"));
            }
            if !LIST_OPERATIONS.contains(&operation) {
                return Err(format!("{operation} is not allowed for this key"));
            }
            match list_prefix {
                Some(prefix) if prefix.starts_with(scope.project_prefix) && is_safe_key_path(prefix, true) => Ok(()),
                _ => Err(format!("listing is allowed only under {:?}", scope.project_prefix)),
            }
        }
        Target::Object { bucket, key } => {
            if bucket != scope.bucket {
                return Err(format!("bucket {bucket:?} is outside the key's scope"));
            }
            let inside = key.strip_prefix(scope.project_prefix).is_some_and(|rest| !rest.is_empty());
            if !inside || !is_safe_key_path(key, false) {
                return Err(format!("key is outside {:?}", scope.project_prefix));
            }
            if READ_OBJECT_OPERATIONS.contains(&operation) {
                return Ok(());
            }
            if scope.access != KeyAccess::Write || !WRITE_OBJECT_OPERATIONS.contains(&operation) {
                return Err(format!("{operation} is not allowed for this key"));
            }
            // Anything else under the prefix would be bytes no ledger counts and no save names.
            let blob = key
                .strip_prefix(scope.project_prefix)
                .and_then(|rest| rest.strip_prefix(proto::object_keys::BLOBS_DIR));
            match blob {
                Some(hex) if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => Ok(()),
                _ => Err(format!(
                    "a write key writes only blobs: {}<64 hex>",
                    proto::object_keys::blobs_prefix(scope.project_prefix)
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: KeyScope<'static> =
        KeyScope { bucket: "layer-cache", project_prefix: "cache/web/", access: KeyAccess::Read };
    const WRITE: KeyScope<'static> = KeyScope { access: KeyAccess::Write, ..READ };

    fn object(key: &str) -> Target<'_> {
        Target::Object { bucket: "layer-cache", key }
    }

    #[test]
    fn read_keys_read_inside_the_prefix_only() {
        assert_eq!(authorize(READ, "GetObject", object("cache/web/blobs/sha256/ab")), Ok(()));
        assert_eq!(authorize(READ, "HeadObject", object("cache/web/x")), Ok(()));
        for operation in ["PutObject", "CreateMultipartUpload", "UploadPart", "DeleteObject", "CopyObject"] {
            assert!(authorize(READ, operation, object("cache/web/x")).is_err(), "{operation}");
        }
    }

    #[test]
    fn write_keys_write_but_never_delete() {
        // What a worker's save does, named here rather than taken from the list under test.
        let save_operations = [
            "PutObject",
            "CreateMultipartUpload",
            "UploadPart",
            "CompleteMultipartUpload",
            "AbortMultipartUpload",
            "ListParts",
            "GetObject",
            "HeadObject",
        ];
        let blob = format!("cache/web/blobs/sha256/{}", "ab".repeat(32));
        for operation in save_operations {
            assert_eq!(authorize(WRITE, operation, object(&blob)), Ok(()), "{operation}");
        }
        // Writes anywhere else under the prefix are refused; reads are not.
        let upper = format!("cache/web/blobs/sha256/{}", "AB".repeat(32));
        for key in ["cache/web/x", "cache/web/blobs/sha256/ab", &upper] {
            assert!(authorize(WRITE, "PutObject", object(key)).is_err(), "{key}");
            assert!(authorize(WRITE, "CreateMultipartUpload", object(key)).is_err(), "{key}");
            assert_eq!(authorize(WRITE, "GetObject", object(key)), Ok(()), "{key}");
        }
        // Everything else S3 offers on an object or bucket is refused.
        for operation in [
            "DeleteObject",
            "DeleteObjects",
            "CopyObject",
            "UploadPartCopy",
            "PutObjectAcl",
            "GetObjectAcl",
            "PutObjectTagging",
            "DeleteObjectTagging",
            "GetObjectTagging",
            "PutObjectRetention",
            "PutObjectLegalHold",
            "RestoreObject",
            "SelectObjectContent",
            "GetObjectAttributes",
            "ListMultipartUploads",
            "ListObjectVersions",
            "CreateBucket",
            "DeleteBucket",
            "PutBucketPolicy",
            "PutBucketAcl",
            "PutBucketLifecycleConfiguration",
            "PutBucketVersioning",
        ] {
            assert!(authorize(WRITE, operation, object(&blob)).is_err(), "{operation}");
        }
    }

    #[test]
    fn nothing_escapes_the_prefix() {
        for key in [
            "cache/web",
            "cache/web/",
            "cache/web2/x",
            "cache/other/x",
            "cache/web/../other/x",
            "cache/web/./x",
            "cache/web//x",
            "cache/web/x/..",
            "cache/web/a\\..\\b",
            "x/cache/web/y",
        ] {
            assert!(authorize(WRITE, "GetObject", object(key)).is_err(), "{key}");
        }
        assert!(authorize(WRITE, "GetObject", Target::Object { bucket: "other", key: "cache/web/x" }).is_err());
    }

    #[test]
    fn listing_only_under_the_prefix() {
        let list = |list_prefix| Target::Bucket { bucket: "layer-cache", list_prefix };
        assert_eq!(authorize(READ, "ListObjectsV2", list(Some("cache/web/"))), Ok(()));
        assert_eq!(authorize(READ, "ListObjectsV2", list(Some("cache/web/blobs/sha256/"))), Ok(()));
        for prefix in [None, Some(""), Some("cache/"), Some("cache/web"), Some("cache/web/../")] {
            assert!(authorize(READ, "ListObjectsV2", list(prefix)).is_err(), "{prefix:?}");
        }
        assert!(authorize(READ, "ListBuckets", Target::Root).is_err());
        assert!(authorize(READ, "DeleteBucket", list(Some("cache/web/"))).is_err());
    }
}
