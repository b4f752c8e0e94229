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
    use proptest::prelude::*;
    use serde_json::Value;

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

    // A config comes from whoever built the image: whatever its bytes, reading it returns facts
    // that agree with each other, and never panics.

    /// Proptest's own settings with a modest number of cases, and no regression files written
    /// beside the source.
    fn cases(cases: u32) -> ProptestConfig {
        ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// Inline cache is something only BuildKit writes.
    fn consistent(facts: ImageFacts) -> Result<(), TestCaseError> {
        prop_assert!(!facts.inline_cache || facts.builder == pb::Builder::Buildkit, "{facts:?}");
        prop_assert!(!builder_name(facts.builder).is_empty());
        Ok(())
    }

    fn config_key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![
                "container",
                "history",
                "created_by",
                "moby.buildkit.cache.v0",
                "moby.buildkit.buildinfo.v1",
                "rootfs",
            ])
            .prop_map(str::to_owned),
            1 => any::<String>(),
        ]
    }

    /// A JSON object with a config's field names, each holding a value of any type.
    fn config_like() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop::sample::select(vec!["", "4cfe", "/bin/sh -c #(nop)  ENV A=b", "RUN true # buildkit", "e30="])
                .prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((config_key(), inner), 0..4)
                    .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        });
        prop::collection::vec((config_key(), value), 0..6)
            .prop_map(|fields| Value::Object(fields.into_iter().collect()))
    }

    const BUILDKIT_CONFIG: &[u8] =
        br#"{"container":"","history":[{"created_by":"RUN true # buildkit"}],"moby.buildkit.cache.v0":"e30="}"#;

    proptest! {
        #![proptest_config(cases(256))]

        #[test]
        fn any_bytes_read_as_consistent_facts(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            consistent(image_facts(&bytes))?;
        }

        #[test]
        fn a_config_with_overwritten_bytes_reads_as_consistent_facts(
            overwrites in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..5),
        ) {
            let mut config = BUILDKIT_CONFIG.to_vec();
            for (position, value) in &overwrites {
                config[position.index(BUILDKIT_CONFIG.len())] = *value;
            }
            consistent(image_facts(&config))?;
        }

        #[test]
        fn a_config_of_any_shape_reads_as_consistent_facts(config in config_like()) {
            let facts = image_facts(config.to_string().as_bytes());
            consistent(facts)?;
            // A config that parsed says inline cache exactly when it holds some.
            if facts.builder != pb::Builder::Unspecified {
                let holds_cache = config.get("moby.buildkit.cache.v0").is_some_and(|cache| !cache.is_null());
                prop_assert_eq!(facts.inline_cache, holds_cache);
            }
        }
    }

    #[test]
    fn deeply_nested_configs_are_read_without_exhausting_the_stack() {
        let depth = 100_000;
        let nested = |field: &str| format!(r#"{{"{field}":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
        // serde_json stops at 128 levels (or the first wrong type) in the fields it parses, and
        // skips an unknown field without recursing.
        assert_eq!(image_facts(nested("moby.buildkit.cache.v0").as_bytes()).builder, pb::Builder::Unspecified);
        assert_eq!(image_facts(nested("history").as_bytes()).builder, pb::Builder::Unspecified);
        assert_eq!(image_facts(nested("unknown").as_bytes()).builder, pb::Builder::Other);
    }
}
