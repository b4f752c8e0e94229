//! From a request's path, query and headers to what it asks for: the route (split on the last
//! `/manifests/`, `/blobs/` or `/blobs/uploads/`, since names hold `/`), query parameters, and
//! the byte ranges of `Range` and `Content-Range`. Nothing here touches a backend.

use crate::backend::{ByteRange, RegistryError};
use crate::names::{self, shown};

/// What a path names. Every name, reference and digest in it is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`.
    Ping,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest { repository: String, reference: crate::backend::Reference },
    /// `/v2/<name>/blobs/<digest>`.
    Blob { repository: String, digest: String },
    /// `/v2/<name>/blobs/uploads/` (with or without the last `/`).
    UploadStart { repository: String },
    /// `/v2/<name>/blobs/uploads/<id>`.
    Upload { repository: String, id: String },
    /// `/v2/<name>/tags/list`.
    Tags { repository: String },
    /// `/v2/_catalog`: known to the API, not offered by this view.
    Catalog,
}

/// Why a path is not a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// A route of the API whose name, reference or digest is refused.
    Invalid(RegistryError),
    /// Not a route of the API at all.
    NotFound,
}

impl From<RegistryError> for RouteError {
    fn from(err: RegistryError) -> RouteError {
        RouteError::Invalid(err)
    }
}

/// Parses a request path (as sent: still percent-encoded).
pub fn parse_path(path: &str) -> Result<Route, RouteError> {
    let Some(rest) = path.strip_prefix("/v2") else { return Err(RouteError::NotFound) };
    if rest.is_empty() || rest == "/" {
        return Ok(Route::Ping);
    }
    let Some(rest) = rest.strip_prefix('/') else { return Err(RouteError::NotFound) };
    // No encoded characters and no dot segments reach a name: `%2F` would smuggle a `/` past the
    // split, `..` a path past the store's layout.
    if rest.contains('%') || rest.contains("..") || rest.contains("//") || rest.contains('\\') {
        return Err(RouteError::Invalid(RegistryError::NameInvalid(format!(
            "invalid path {}: encoded characters, '..', '//' and '\\' are refused",
            shown(path)
        ))));
    }
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let n_segments = segments.len();
    let name_of = |n_tail: usize| -> Result<String, RouteError> {
        if n_segments <= n_tail {
            return Err(RouteError::NotFound);
        }
        let repository = segments[..n_segments - n_tail].join("/");
        names::validate_repository(&repository)?;
        Ok(repository)
    };
    // The last segments decide the route; everything before them is the name.
    if n_segments >= 3 && segments[n_segments - 3] == "blobs" && segments[n_segments - 2] == "uploads" {
        let repository = name_of(3)?;
        let id = segments[n_segments - 1];
        if id.is_empty() {
            return Ok(Route::UploadStart { repository });
        }
        return Ok(Route::Upload { repository, id: id.to_owned() });
    }
    if n_segments >= 2 {
        let (kind, last) = (segments[n_segments - 2], segments[n_segments - 1]);
        match (kind, last) {
            ("blobs", "uploads") => return Ok(Route::UploadStart { repository: name_of(2)? }),
            ("tags", "list") => return Ok(Route::Tags { repository: name_of(2)? }),
            ("manifests", reference) => {
                let repository = name_of(2)?;
                return Ok(Route::Manifest { repository, reference: names::parse_reference(reference)? });
            }
            ("blobs", digest) => {
                let repository = name_of(2)?;
                names::validate_digest(digest)?;
                return Ok(Route::Blob { repository, digest: digest.to_owned() });
            }
            _ => {}
        }
    }
    Err(RouteError::NotFound)
}

/// The value of query parameter `key`, percent-decoded; `None` when absent. A value that does not
/// decode to UTF-8 is refused by the caller's validation (it decodes to a replacement character).
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(name) == key).then(|| percent_decode(value))
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut idx = 0;
    while idx < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[idx] {
            b'%' if idx + 2 < bytes.len() => match (hex(bytes[idx + 1]), hex(bytes[idx + 2])) {
                (Some(high), Some(low)) => {
                    decoded.push((high * 16 + low) as u8);
                    idx += 3;
                    continue;
                }
                _ => decoded.push(b'%'),
            },
            b'+' => decoded.push(b' '),
            other => decoded.push(other),
        }
        idx += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No header, or one this view ignores (several ranges, another unit): the whole blob.
    Whole,
    /// One satisfiable range, clamped to the blob.
    Part(ByteRange),
    /// One range that lies outside the blob: 416.
    Unsatisfiable,
}

/// Reads `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` against a blob of `size` bytes. Forms this
/// view does not serve are ignored (HTTP lets a server answer the whole body instead).
pub fn parse_range(header: Option<&str>, size: u64) -> RangeAsk {
    let Some(spec) = header.and_then(|value| value.trim().strip_prefix("bytes=")) else { return RangeAsk::Whole };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeAsk::Whole };
    let parse = |text: &str| text.trim().parse::<u64>().ok();
    let (start, end) = match (first.trim().is_empty(), last.trim().is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => {
            let Some(suffix) = parse(last) else { return RangeAsk::Whole };
            if suffix == 0 || size == 0 {
                return RangeAsk::Unsatisfiable;
            }
            (size.saturating_sub(suffix), size - 1)
        }
        (false, true) => {
            let Some(start) = parse(first) else { return RangeAsk::Whole };
            (start, u64::MAX)
        }
        (false, false) => {
            let (Some(start), Some(end)) = (parse(first), parse(last)) else { return RangeAsk::Whole };
            if end < start {
                return RangeAsk::Whole;
            }
            (start, end)
        }
        (true, true) => return RangeAsk::Whole,
    };
    if start >= size {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Part(ByteRange { start, end: end.min(size - 1) })
}

/// Reads a `PATCH`'s `Content-Range`: `<start>-<end>` as distribution's clients send it, also
/// with a `bytes ` unit and a `/<total>` tail. Returns the start and the end (inclusive).
pub fn parse_content_range(header: &str) -> Option<(u64, u64)> {
    let spec = header.trim();
    let spec = spec.strip_prefix("bytes ").unwrap_or(spec).trim();
    let spec = spec.split_once('/').map_or(spec, |(range, _)| range);
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim().parse::<u64>().ok()?, end.trim().parse::<u64>().ok()?);
    (end >= start).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reference;

    fn digest() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    #[test]
    fn paths_split_on_the_last_route_segment_so_names_may_hold_slashes() {
        assert_eq!(parse_path("/v2/"), Ok(Route::Ping));
        assert_eq!(parse_path("/v2"), Ok(Route::Ping));
        assert_eq!(
            parse_path("/v2/c/web/manifests/latest"),
            Ok(Route::Manifest { repository: "c/web".into(), reference: Reference::Tag("latest".into()) })
        );
        // A name may itself hold "manifests" or "blobs" as a component.
        assert_eq!(
            parse_path("/v2/a/manifests/b/manifests/1"),
            Ok(Route::Manifest { repository: "a/manifests/b".into(), reference: Reference::Tag("1".into()) })
        );
        assert_eq!(
            parse_path(&format!("/v2/a/blobs/b/blobs/{}", digest())),
            Ok(Route::Blob { repository: "a/blobs/b".into(), digest: digest() })
        );
        assert_eq!(parse_path("/v2/app/blobs/uploads/"), Ok(Route::UploadStart { repository: "app".into() }));
        assert_eq!(parse_path("/v2/app/blobs/uploads"), Ok(Route::UploadStart { repository: "app".into() }));
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            parse_path(&format!("/v2/x/y/blobs/uploads/{id}")),
            Ok(Route::Upload { repository: "x/y".into(), id: id.into() })
        );
        assert_eq!(parse_path("/v2/_catalog"), Ok(Route::Catalog));
        assert_eq!(parse_path("/v2/c/web/tags/list"), Ok(Route::Tags { repository: "c/web".into() }));
    }

    #[test]
    fn unknown_paths_are_not_routes() {
        for path in ["/", "/v1/", "/v2x", "/v2/app", "/v2/app/other/x", "/v2/manifests/latest", "/v2/blobs/uploads/"] {
            assert_eq!(parse_path(path), Err(RouteError::NotFound), "{path}");
        }
    }

    #[test]
    fn encoded_and_dot_paths_and_bad_names_are_invalid() {
        for path in [
            "/v2/a%2Fb/manifests/latest",
            "/v2/a/../b/manifests/latest",
            "/v2/a//b/manifests/latest",
            "/v2/App/manifests/latest",
            "/v2/app/manifests/..",
            "/v2/app/manifests/%2e%2e",
            "/v2/app/blobs/sha256:abc",
            "/v2/app/blobs/md5:abc",
            "/v2/a\\b/blobs/uploads/",
        ] {
            assert!(matches!(parse_path(path), Err(RouteError::Invalid(_))), "{path}");
        }
    }

    #[test]
    fn query_parameters_are_found_and_decoded() {
        let query = Some("mount=sha256%3Aab&from=c%2Fweb&digest=sha256:cd&flag");
        assert_eq!(query_param(query, "mount").as_deref(), Some("sha256:ab"));
        assert_eq!(query_param(query, "from").as_deref(), Some("c/web"));
        assert_eq!(query_param(query, "digest").as_deref(), Some("sha256:cd"));
        assert_eq!(query_param(query, "flag").as_deref(), Some(""));
        assert_eq!(query_param(query, "missing"), None);
        assert_eq!(query_param(None, "digest"), None);
        assert_eq!(query_param(Some("digest=%zz%4"), "digest").as_deref(), Some("%zz%4"));
    }

    #[test]
    fn ranges_are_one_range_of_bytes_clamped_to_the_blob() {
        let part = |start, end| RangeAsk::Part(ByteRange { start, end });
        assert_eq!(parse_range(None, 10), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=0-3"), 10), part(0, 3));
        assert_eq!(parse_range(Some("bytes=4-"), 10), part(4, 9));
        assert_eq!(parse_range(Some("bytes=4-100"), 10), part(4, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), part(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), part(0, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeAsk::Unsatisfiable);
        for ignored in ["bytes=0-1,3-4", "items=0-1", "bytes=5-2", "bytes=x-", "bytes=-"] {
            assert_eq!(parse_range(Some(ignored), 10), RangeAsk::Whole, "{ignored}");
        }
    }

    #[test]
    fn content_ranges_take_the_bare_and_the_unit_forms() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, 199)));
        assert_eq!(parse_content_range("5-4"), None);
        assert_eq!(parse_content_range("x"), None);
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_path_parses_without_panic_and_names_only_valid_repositories(path in "(/v2/)?[a-zA-Z0-9._:/%-]{0,80}") {
            match parse_path(&path) {
                Ok(Route::Manifest { repository, .. })
                | Ok(Route::Blob { repository, .. })
                | Ok(Route::UploadStart { repository })
                | Ok(Route::Upload { repository, .. })
                | Ok(Route::Tags { repository }) => {
                    prop_assert!(names::validate_repository(&repository).is_ok());
                    prop_assert!(!path.contains('%') && !path.contains(".."));
                }
                _ => {}
            }
        }

        #[test]
        fn any_range_header_gives_a_range_inside_the_blob(header in "(bytes=)?[0-9,-]{0,24}", size in 0u64..1_000_000) {
            if let RangeAsk::Part(ByteRange { start, end }) = parse_range(Some(&header), size) {
                prop_assert!(start <= end && end < size);
            }
            if let Some((start, end)) = parse_content_range(&header) {
                prop_assert!(start <= end);
            }
        }

        #[test]
        fn any_manifest_body_is_judged_without_panic(body in proptest::collection::vec(any::<u8>(), 0..200), content_type in "[a-z./+;= -]{0,40}") {
            let _ = names::manifest_media_type(&body, Some(&content_type));
        }
    }
}
