//! What an image's config JSON says about how it was made: by the classic builder, by BuildKit
//! (and then whether it carries inline cache metadata, which `--cache-from` needs), or neither
//! (`docker import`, for example).

use proto::v1 as pb;
use serde::Deserialize;

/// How an image was built, read from its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageFacts {
    pub builder: pb::Builder,
    pub inline_cache: bool,
}

#[derive(Deserialize)]
struct HistoryEntry {
    #[serde(default)]
    created_by: String,
}

#[derive(Deserialize)]
struct ConfigJson {
    /// Set by the classic builder, which commits a container per step.
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    history: Vec<HistoryEntry>,
    /// BuildKit's inline cache (`--build-arg BUILDKIT_INLINE_CACHE=1`).
    #[serde(rename = "moby.buildkit.cache.v0", default)]
    inline_cache: Option<serde_json::Value>,
    #[serde(rename = "moby.buildkit.buildinfo.v1", default)]
    build_info: Option<serde_json::Value>,
}

/// Reads the facts from a config; a config that does not parse says nothing (`Unspecified`).
pub fn image_facts(config_json: &[u8]) -> ImageFacts {
    let Ok(config) = serde_json::from_slice::<ConfigJson>(config_json) else {
        return ImageFacts { builder: pb::Builder::Unspecified, inline_cache: false };
    };
    let inline_cache = config.inline_cache.is_some();
    let buildkit = inline_cache
        || config.build_info.is_some()
        || config.history.iter().any(|entry| entry.created_by.ends_with("# buildkit"));
    let classic = config.container.is_some_and(|container| !container.is_empty())
        || config.history.iter().any(|entry| entry.created_by.contains("#(nop)"));
    let builder = match (buildkit, classic) {
        (true, _) => pb::Builder::Buildkit,
        (false, true) => pb::Builder::Classic,
        (false, false) => pb::Builder::Other,
    };
    ImageFacts { builder, inline_cache }
}

/// How the save log names a builder.
pub fn builder_name(builder: pb::Builder) -> &'static str {
    match builder {
        pb::Builder::Classic => "classic builder",
        pb::Builder::Buildkit => "BuildKit",
        pb::Builder::Other => "imported",
        pb::Builder::Unspecified => "unknown builder",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_are_told_apart_by_their_configs() {
        let buildkit =
            br#"{"history":[{"created_by":"RUN /bin/sh -c echo one # buildkit"}],"moby.buildkit.cache.v0":"e30="}"#;
        assert_eq!(image_facts(buildkit), ImageFacts { builder: pb::Builder::Buildkit, inline_cache: true });
        let buildkit_without_cache = br#"{"history":[{"created_by":"COPY x /x # buildkit"}]}"#;
        assert_eq!(
            image_facts(buildkit_without_cache),
            ImageFacts { builder: pb::Builder::Buildkit, inline_cache: false }
        );
        let classic = br#"{"container":"4cfe","history":[{"created_by":"/bin/sh -c #(nop)  ENV A=b"}]}"#;
        assert_eq!(image_facts(classic).builder, pb::Builder::Classic);
        let imported = br#"{"comment":"Imported from -","history":[{"created_by":""}]}"#;
        assert_eq!(image_facts(imported).builder, pb::Builder::Other);
        assert_eq!(image_facts(b"not json").builder, pb::Builder::Unspecified);
    }
}
