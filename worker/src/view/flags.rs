//! The flags a build command carries to read through a view (and, where the engine's builder
//! exports caches, to write through it).

use super::Opened;
use super::catalog::{BUILD_CACHE_EXPORT_TAG, BUILD_CACHE_REPOSITORY, BUILD_CACHE_TAG, Catalog};

/// The flags for `address` (`HOST:PORT`): nothing when the view serves no cache (the
/// coordinator or the engine did not answer); on the containerd image store, BuildKit's cache
/// export read and written `mode=max` (or, before the first export, the inline cache of the
/// saved images); on a graph driver, whose docker driver exports no cache, the saved images'
/// inline cache.
///
/// A refused or failed export (a pull request's token exporting to the default branch) fails no
/// build: `ignore-error=true`, and BuildKit still prints the view's one line.
///
/// The `mode=max` export holds everything the inline cache does, and BuildKit reads
/// overlapping sources unreliably, so when there is one it is the only source (as `restore`).
pub fn view_flags(address: &str, opened: Opened, catalog: &Catalog) -> Vec<String> {
    let Some(containerd_store) = opened.containerd_store else { return Vec::new() };
    if !opened.coordinator {
        return Vec::new();
    }
    let build_cache = format!("{address}/{BUILD_CACHE_REPOSITORY}:{BUILD_CACHE_TAG}");
    let export = format!("{address}/{BUILD_CACHE_REPOSITORY}:{BUILD_CACHE_EXPORT_TAG}");
    let mut flags = Vec::new();
    if containerd_store && catalog.has_build_cache() {
        flags.push(format!("--cache-from type=registry,ref={build_cache}"));
    } else {
        flags.extend(catalog.importable.iter().map(|image| format!("--cache-from {address}/{image}")));
    }
    if containerd_store {
        flags.push(format!(
            "--cache-to type=registry,ref={export},mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true"
        ));
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1 as pb;

    fn catalog(images: Vec<pb::Image>) -> Catalog {
        Catalog::of(&pb::Manifest { images, ..Default::default() })
    }

    fn inline(tag: &str, oci: bool) -> pb::Image {
        pb::Image {
            id: format!("sha256:{}", "1".repeat(64)),
            repo_tags: vec![tag.into()],
            inline_cache: true,
            oci_media_type: if oci { "application/vnd.oci.image.index.v1+json".into() } else { String::new() },
            ..Default::default()
        }
    }

    #[test]
    fn each_engine_gets_the_flags_it_can_use() {
        let graph = Opened { containerd_store: Some(false), coordinator: true };
        let oci = Opened { containerd_store: Some(true), coordinator: true };
        let address = "127.0.0.1:5000";
        assert_eq!(
            view_flags(address, graph, &catalog(vec![inline("app:1", false)])),
            vec!["--cache-from 127.0.0.1:5000/app:1".to_string()]
        );
        assert!(view_flags(address, graph, &Catalog::default()).is_empty());
        let to = "--cache-to type=registry,ref=127.0.0.1:5000/buildcache:export,mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true";
        assert_eq!(view_flags(address, oci, &Catalog::default()), vec![to.to_string()]);
        assert_eq!(
            view_flags(address, oci, &catalog(vec![inline("app:1", true)])),
            vec!["--cache-from 127.0.0.1:5000/app:1".to_string(), to.to_string()]
        );
        let cache = pb::Image {
            id: format!("sha256:{}", "2".repeat(64)),
            build_cache: true,
            oci_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            ..Default::default()
        };
        assert_eq!(
            view_flags(address, oci, &catalog(vec![inline("app:1", true), cache])),
            vec!["--cache-from type=registry,ref=127.0.0.1:5000/buildcache:latest".to_string(), to.to_string()]
        );
        let unreachable = Opened { containerd_store: Some(true), coordinator: false };
        assert!(view_flags(address, unreachable, &Catalog::default()).is_empty());
        let no_engine = Opened { containerd_store: None, coordinator: true };
        assert!(view_flags(address, no_engine, &Catalog::default()).is_empty());
    }
}
