//! What a request may name, checked before anything else sees it: repository names (the
//! distribution grammar), tags, digests (`sha256:` only) and manifest media types.
//! Each refusal is one line that shows the refused value escaped and cut short.

use crate::backend::{Reference, RegistryError};

/// The longest repository name distribution accepts.
pub const MAX_REPOSITORY_LEN: usize = 255;

/// The manifest media types a `PUT` may carry: the ones BuildKit, containerd, the Docker CLI and
/// skopeo push. Anything else is refused rather than stored and served back under a type a
/// client does not expect.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// A value from outside as a message may show it: escaped (no control characters reach a
/// build log) and at most 80 characters.
pub fn shown(value: &str) -> String {
    let cut: String = value.chars().take(80).collect();
    let escaped = format!("{cut:?}");
    if value.chars().count() > 80 { format!("{escaped}...") } else { escaped }
}

/// Checks a repository name: components of `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*` joined by
/// `/`, at most 255 characters (distribution's grammar).
pub fn validate_repository(name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty() && name.len() <= MAX_REPOSITORY_LEN && name.split('/').all(valid_path_component);
    if ok {
        Ok(())
    } else {
        Err(RegistryError::NameInvalid(format!(
            "invalid repository name {}: use lower-case components of a-z and 0-9 separated by '.', '_', '__' or \
             dashes, joined by '/', at most {MAX_REPOSITORY_LEN} characters",
            shown(name)
        )))
    }
}

fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    // Between two runs of [a-z0-9]: exactly ".", "_" or "__", or any number of "-".
    let mut idx = 0;
    while idx < bytes.len() {
        if alnum(bytes[idx]) {
            idx += 1;
            continue;
        }
        let start = idx;
        while idx < bytes.len() && !alnum(bytes[idx]) {
            idx += 1;
        }
        let separator = &component[start..idx];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Checks a tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), RegistryError> {
    let bytes = tag.as_bytes();
    let ok = bytes.first().is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_')
        && bytes.len() <= 128
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::TagInvalid(format!(
            "invalid tag {}: use 1 to 128 characters of A-Z, a-z, 0-9, '_', '.' or '-', not starting with '.' or '-'",
            shown(tag)
        )))
    }
}

/// Checks a digest: `sha256:` and 64 lower-case hex digits. Other algorithms are refused with a
/// line that says so (the cache keys everything by sha256).
pub fn validate_digest(digest: &str) -> Result<(), RegistryError> {
    match proto::names::validate_digest(digest) {
        Ok(()) => Ok(()),
        Err(_) => {
            let algorithm = digest.split_once(':').map(|(algorithm, _)| algorithm).unwrap_or("");
            let message = if !algorithm.is_empty() && algorithm != "sha256" {
                format!("unsupported digest algorithm in {}: this registry only takes sha256 digests", shown(digest))
            } else {
                format!("invalid digest {}: expected sha256: and 64 lower-case hex digits", shown(digest))
            };
            Err(RegistryError::DigestInvalid(message))
        }
    }
}

/// A manifest reference from a path: a digest when it holds a `:`, else a tag.
pub fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    if reference.contains(':') {
        validate_digest(reference)?;
        Ok(Reference::Digest(reference.to_owned()))
    } else {
        validate_tag(reference)?;
        Ok(Reference::Tag(reference.to_owned()))
    }
}

/// The media type of a pushed manifest: its `mediaType` field, or the `Content-Type` it was
/// sent with when the field is absent; both given must agree. Only [`MANIFEST_MEDIA_TYPES`] are
/// taken.
pub fn manifest_media_type(bytes: &[u8], content_type: Option<&str>) -> Result<String, RegistryError> {
    let invalid = |message: String| Err(RegistryError::ManifestInvalid(message));
    let json: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(json) => json,
        Err(err) => return invalid(format!("the manifest is not valid JSON: {err}")),
    };
    let Some(object) = json.as_object() else {
        return invalid("the manifest is not a JSON object".to_owned());
    };
    if let Some(version) = object.get("schemaVersion")
        && version.as_u64() != Some(2)
    {
        return invalid(format!("unsupported manifest schemaVersion {version}: only 2 is taken"));
    }
    let in_body = match object.get("mediaType") {
        None => None,
        Some(serde_json::Value::String(media_type)) => Some(media_type.as_str()),
        Some(_) => return invalid("the manifest's mediaType is not a string".to_owned()),
    };
    // Content-Type may carry parameters; a generic JSON type says nothing about the manifest.
    let sent_as = content_type
        .map(|value| value.split(';').next().unwrap_or("").trim())
        .filter(|value| !value.is_empty() && *value != "application/json" && *value != "application/octet-stream");
    let media_type = match (in_body, sent_as) {
        (Some(body), Some(header)) if body != header => {
            return invalid(format!(
                "the manifest says mediaType {} but was sent as Content-Type {}",
                shown(body),
                shown(header)
            ));
        }
        (Some(body), _) => body,
        (None, Some(header)) => header,
        (None, None) => {
            return invalid("the manifest has no mediaType and was sent without a manifest Content-Type".to_owned());
        }
    };
    if !MANIFEST_MEDIA_TYPES.contains(&media_type) {
        return invalid(format!(
            "unsupported manifest media type {}: expected one of {}",
            shown(media_type),
            MANIFEST_MEDIA_TYPES.join(", ")
        ));
    }
    Ok(media_type.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_distribution_grammar() {
        for good in ["app", "buildcache", "c/web", "a.b_c__d---e/f-0", "library/debian", "a/b/c/d"] {
            assert_eq!(validate_repository(good), Ok(()), "{good}");
        }
        let long = "a".repeat(256);
        for bad in
            ["", "App", "a//b", "/a", "a/", "-a", "a-", "a..b", "a.-b", "a___b", "..", "a/../b", "a%2Fb", "a b", &long]
        {
            assert!(matches!(validate_repository(bad), Err(RegistryError::NameInvalid(_))), "{bad:?}");
        }
        assert_eq!(validate_repository(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn tags_are_at_most_128_characters_of_the_tag_alphabet() {
        for good in ["latest", "1", "_x", "v1.2-rc_3", &"a".repeat(128)] {
            assert_eq!(validate_tag(good), Ok(()), "{good}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a\nb", &"a".repeat(129)] {
            assert!(matches!(validate_tag(bad), Err(RegistryError::TagInvalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn digests_are_sha256_only_and_other_algorithms_say_so() {
        let good = format!("sha256:{}", "0a".repeat(32));
        assert_eq!(validate_digest(&good), Ok(()));
        let Err(RegistryError::DigestInvalid(message)) = validate_digest(&format!("sha512:{}", "0a".repeat(64))) else {
            panic!("sha512 was taken");
        };
        assert!(message.starts_with("unsupported digest algorithm"), "{message}");
        for bad in [format!("sha256:{}", "0A".repeat(32)), "sha256:abc".to_owned(), "sha256".to_owned()] {
            let Err(RegistryError::DigestInvalid(message)) = validate_digest(&bad) else { panic!("{bad} was taken") };
            assert!(message.starts_with("invalid digest"), "{message}");
        }
    }

    #[test]
    fn a_reference_with_a_colon_is_a_digest_and_anything_else_a_tag() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(parse_reference(&digest), Ok(Reference::Digest(digest.clone())));
        assert_eq!(parse_reference("latest"), Ok(Reference::Tag("latest".to_owned())));
        assert!(matches!(parse_reference("md5:abc"), Err(RegistryError::DigestInvalid(_))));
        assert!(matches!(parse_reference(".."), Err(RegistryError::TagInvalid(_))));
    }

    #[test]
    fn a_shown_value_is_escaped_and_cut_short() {
        assert_eq!(shown("a\u{1b}[31m"), "\"a\\u{1b}[31m\"");
        let long = shown(&"x".repeat(500));
        assert!(long.len() < 100 && long.ends_with("..."), "{long}");
    }

    #[test]
    fn a_manifest_media_type_comes_from_the_body_or_the_header_and_both_must_agree() {
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let index = "application/vnd.oci.image.index.v1+json";
        let with_type = format!(r#"{{"schemaVersion":2,"mediaType":"{oci}","layers":[]}}"#);
        assert_eq!(manifest_media_type(with_type.as_bytes(), None).unwrap(), oci);
        assert_eq!(manifest_media_type(with_type.as_bytes(), Some("application/json")).unwrap(), oci);
        assert_eq!(manifest_media_type(with_type.as_bytes(), Some(&format!("{oci}; charset=utf-8"))).unwrap(), oci);
        assert!(matches!(
            manifest_media_type(with_type.as_bytes(), Some(index)),
            Err(RegistryError::ManifestInvalid(_))
        ));
        let without = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(manifest_media_type(without, Some(index)).unwrap(), index);
        for (bytes, content_type) in [
            (&without[..], None),
            (&b"not json"[..], Some(oci)),
            (&b"[]"[..], Some(oci)),
            (&br#"{"schemaVersion":1,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#[..], None),
            (&br#"{"mediaType":"text/html"}"#[..], None),
            (&br#"{"mediaType":7}"#[..], None),
        ] {
            assert!(
                matches!(manifest_media_type(bytes, content_type), Err(RegistryError::ManifestInvalid(_))),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
