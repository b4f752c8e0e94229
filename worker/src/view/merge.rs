//! Merging two BuildKit cache exports of one job (`--cache-to type=registry,…,mode=max`, one
//! per build: a `--target test` build, then the image's) into one, so the second does not
//! replace the first: the cache configs' layers and records united (a layer is its chain of
//! blobs, a record its cache key digest, as BuildKit itself merges them), and the manifest
//! naming every blob either names.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// BuildKit's cache config (`application/vnd.buildkit.cacheconfig.v0`), the fields it reads.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct CacheConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    layers: Vec<CacheLayer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    records: Vec<CacheRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheLayer {
    #[serde(default)]
    blob: String,
    /// The parent layer's index, -1 for none; BuildKit leaves a 0 out.
    #[serde(default)]
    parent: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CacheRecord {
    #[serde(default, rename = "layers", skip_serializing_if = "Vec::is_empty")]
    results: Vec<CacheResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chains: Vec<ChainedResult>,
    #[serde(default)]
    digest: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    inputs: Vec<Vec<CacheInput>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheResult {
    layer: usize,
    #[serde(rename = "createdAt", default, skip_serializing_if = "Option::is_none")]
    created_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChainedResult {
    layers: Vec<usize>,
    #[serde(rename = "createdAt", default, skip_serializing_if = "Option::is_none")]
    created_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheInput {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    selector: String,
    link: usize,
}

/// The merged config being built: layers by their chain of blobs, records by digest.
#[derive(Default)]
struct Merged {
    config: CacheConfig,
    layers: HashMap<Vec<String>, usize>,
    records: HashMap<String, usize>,
}

impl Merged {
    /// The merged index of layer `index` of `config` (its parents added first).
    fn layer(&mut self, config: &CacheConfig, index: usize) -> Result<usize, String> {
        let mut chain = Vec::new();
        let mut at = index as i64;
        while at >= 0 {
            let layer =
                config.layers.get(at as usize).ok_or_else(|| format!("the cache names layer {at}, not there"))?;
            chain.push(layer.blob.clone());
            if chain.len() > config.layers.len() {
                return Err("the cache's layers loop".into());
            }
            at = layer.parent;
        }
        chain.reverse();
        self.chain(config, index, chain)
    }

    fn chain(&mut self, config: &CacheConfig, index: usize, chain: Vec<String>) -> Result<usize, String> {
        if let Some(merged) = self.layers.get(&chain) {
            return Ok(*merged);
        }
        let layer = &config.layers[index];
        let parent = if layer.parent < 0 {
            -1
        } else {
            self.chain(config, layer.parent as usize, chain[..chain.len() - 1].to_vec())? as i64
        };
        self.config.layers.push(CacheLayer {
            blob: layer.blob.clone(),
            parent,
            annotations: layer.annotations.clone(),
        });
        let merged = self.config.layers.len() - 1;
        self.layers.insert(chain, merged);
        Ok(merged)
    }

    /// Adds every record of `config`, uniting those of the same digest.
    fn add(&mut self, config: &CacheConfig) -> Result<(), String> {
        for record in &config.records {
            if !self.records.contains_key(&record.digest) {
                self.config.records.push(CacheRecord { digest: record.digest.clone(), ..Default::default() });
                self.records.insert(record.digest.clone(), self.config.records.len() - 1);
            }
        }
        for record in &config.records {
            let at = self.records[&record.digest];
            for result in &record.results {
                let layer = self.layer(config, result.layer)?;
                let results = &mut self.config.records[at].results;
                if !results.iter().any(|kept| kept.layer == layer) {
                    results.push(CacheResult { layer, created_at: result.created_at.clone() });
                }
            }
            for chained in &record.chains {
                let layers =
                    chained.layers.iter().map(|layer| self.layer(config, *layer)).collect::<Result<Vec<_>, _>>()?;
                let chains = &mut self.config.records[at].chains;
                if !chains.iter().any(|kept| kept.layers == layers) {
                    chains.push(ChainedResult { layers, created_at: chained.created_at.clone() });
                }
            }
            for (input, links) in record.inputs.iter().enumerate() {
                for link in links {
                    let target = config
                        .records
                        .get(link.link)
                        .ok_or_else(|| format!("the cache links record {}, not there", link.link))?;
                    let merged = CacheInput { selector: link.selector.clone(), link: self.records[&target.digest] };
                    let inputs = &mut self.config.records[at].inputs;
                    if inputs.len() <= input {
                        inputs.resize(input + 1, Vec::new());
                    }
                    if !inputs[input].contains(&merged) {
                        inputs[input].push(merged);
                    }
                }
            }
        }
        Ok(())
    }
}

/// One cache config holding both `first`'s and `second`'s layers and records.
pub fn merge_configs(first: &[u8], second: &[u8]) -> Result<Vec<u8>, String> {
    let parse = |bytes: &[u8]| {
        serde_json::from_slice::<CacheConfig>(bytes).map_err(|error| format!("a cache config does not parse: {error}"))
    };
    let mut merged = Merged::default();
    merged.add(&parse(first)?)?;
    merged.add(&parse(second)?)?;
    serde_json::to_vec(&merged.config).map_err(|error| error.to_string())
}

/// `second`'s manifest naming `config` (digest, size) and every layer either manifest names.
pub fn merge_manifests(first: &[u8], second: &[u8], config: (&str, u64)) -> Result<Vec<u8>, String> {
    let parse = |bytes: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|error| format!("a manifest does not parse: {error}"))
    };
    let (first, mut merged) = (parse(first)?, parse(second)?);
    let digest_of = |layer: &serde_json::Value| layer["digest"].as_str().unwrap_or_default().to_owned();
    let mut layers = merged["layers"].as_array().cloned().unwrap_or_default();
    let named: std::collections::HashSet<String> = layers.iter().map(digest_of).collect();
    for layer in first["layers"].as_array().into_iter().flatten() {
        if !named.contains(&digest_of(layer)) {
            layers.push(layer.clone());
        }
    }
    merged["layers"] = serde_json::Value::Array(layers);
    merged["config"]["digest"] = config.0.into();
    merged["config"]["size"] = config.1.into();
    serde_json::to_vec(&merged).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config of a chain of layers `blobs` (each on the one before), one record a layer, each
    /// record's input the record before it.
    fn chain(blobs: &[&str], records: &[&str]) -> Vec<u8> {
        let layers: Vec<serde_json::Value> = blobs
            .iter()
            .enumerate()
            .map(|(index, blob)| {
                // As BuildKit writes them: a parent of 0 left out.
                let mut layer = serde_json::json!({ "blob": blob });
                if index != 1 {
                    layer["parent"] = (index as i64 - 1).into();
                }
                layer
            })
            .collect();
        let records: Vec<serde_json::Value> = records
            .iter()
            .enumerate()
            .map(|(index, digest)| {
                let mut record =
                    serde_json::json!({ "digest": digest, "layers": [{ "layer": index, "createdAt": "t" }] });
                if index > 0 {
                    record["inputs"] = serde_json::json!([[{ "selector": "s", "link": index - 1 }]]);
                }
                record
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({ "layers": layers, "records": records })).unwrap()
    }

    fn parsed(bytes: &[u8]) -> CacheConfig {
        serde_json::from_slice(bytes).unwrap()
    }

    /// A record as it means: its digest, its results' layer chains, its inputs' digests.
    type Meaning = (String, Vec<Vec<String>>, Vec<Vec<String>>);

    /// Each record's meaning, whatever the order.
    fn meaning(config: &CacheConfig) -> Vec<Meaning> {
        let chain_of = |mut at: i64| {
            let mut chain = Vec::new();
            while at >= 0 {
                chain.push(config.layers[at as usize].blob.clone());
                at = config.layers[at as usize].parent;
            }
            chain
        };
        let mut meaning: Vec<_> = config
            .records
            .iter()
            .map(|record| {
                let mut results: Vec<Vec<String>> =
                    record.results.iter().map(|result| chain_of(result.layer as i64)).collect();
                results.sort();
                let inputs = record
                    .inputs
                    .iter()
                    .map(|links| {
                        let mut digests: Vec<String> =
                            links.iter().map(|link| config.records[link.link].digest.clone()).collect();
                        digests.sort();
                        digests
                    })
                    .collect();
                (record.digest.clone(), results, inputs)
            })
            .collect();
        meaning.sort();
        meaning
    }

    #[test]
    fn a_shared_stem_is_kept_once_and_both_branches_kept() {
        // The builder stage (a, b), then the test stage's step (t) in one export and the final
        // stage's (f) in the other.
        let tested = chain(&["a", "b", "t"], &["ra", "rb", "rt"]);
        let built = chain(&["a", "b", "f"], &["ra", "rb", "rf"]);
        let merged = parsed(&merge_configs(&tested, &built).unwrap());
        assert_eq!(merged.layers.len(), 4, "{merged:?}");
        assert_eq!(merged.records.len(), 4, "{merged:?}");
        let expected = {
            let mut both = meaning(&parsed(&tested));
            both.extend(meaning(&parsed(&built)));
            both.sort();
            both.dedup();
            both
        };
        assert_eq!(meaning(&merged), expected);
    }

    #[test]
    fn merging_a_config_with_itself_changes_nothing() {
        let config = chain(&["a", "b", "c"], &["ra", "rb", "rc"]);
        let merged = parsed(&merge_configs(&config, &config).unwrap());
        assert_eq!(meaning(&merged), meaning(&parsed(&config)));
        assert_eq!(merged.layers.len(), 3);
    }

    #[test]
    fn a_config_naming_what_is_not_there_is_refused() {
        let bad = br#"{"layers":[{"blob":"a","parent":5}],"records":[{"digest":"r","layers":[{"layer":0}]}]}"#;
        assert!(merge_configs(bad, bad).unwrap_err().contains("layer 5"));
        let looping =
            br#"{"layers":[{"blob":"a","parent":1},{"blob":"b"}],"records":[{"digest":"r","layers":[{"layer":0}]}]}"#;
        assert!(merge_configs(looping, looping).unwrap_err().contains("loop"));
        let linked = br#"{"records":[{"digest":"r","inputs":[[{"link":3}]]}]}"#;
        assert!(merge_configs(linked, linked).unwrap_err().contains("record 3"));
    }

    #[test]
    fn the_merged_manifest_names_every_layer_once_and_the_merged_config() {
        let first = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"sha256:c1","size":1},"layers":[{"digest":"sha256:a","size":1},{"digest":"sha256:t","size":2}]}"#;
        let second = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"sha256:c2","size":1},"layers":[{"digest":"sha256:a","size":1},{"digest":"sha256:f","size":3}]}"#;
        let merged: serde_json::Value =
            serde_json::from_slice(&merge_manifests(first, second, ("sha256:c3", 42)).unwrap()).unwrap();
        let digests: Vec<&str> =
            merged["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap()).collect();
        assert_eq!(digests, ["sha256:a", "sha256:f", "sha256:t"]);
        assert_eq!(
            (merged["config"]["digest"].as_str(), merged["config"]["size"].as_u64()),
            (Some("sha256:c3"), Some(42))
        );
        assert_eq!(merged["config"]["mediaType"], "application/vnd.buildkit.cacheconfig.v0");
    }
}
