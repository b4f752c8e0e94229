//! What the next build's command line carries after a restore: `--cache-from` flags from
//! a manifest's images (graph drivers) or BuildKit's local cache sources (containerd image
//! store), and the build stages a save later takes.

use std::collections::HashSet;

use proto::v1 as pb;

use crate::build_dirs::BuildDirs;

/// The flags as one piece of a build command line.
pub fn build_flags(flags: &[String]) -> String {
    flags.join(" ")
}

/// Graph-driver engines: `--cache-from IMAGE` for every tag of the chain and every untagged
/// image no other image of it grew from (the classic builder's other stages; an untagged
/// chain is named by its last image).
pub(super) fn cache_from_images(manifest: &pb::Manifest) -> Vec<String> {
    let parents: HashSet<&str> = manifest.images.iter().map(|image| image.parent_id.as_str()).collect();
    manifest
        .images
        .iter()
        .flat_map(|image| {
            if !image.repo_tags.is_empty() {
                image.repo_tags.clone()
            } else if !parents.contains(image.id.as_str()) {
                vec![image.id.clone()]
            } else {
                Vec::new()
            }
        })
        .map(|image| format!("--cache-from {image}"))
        .collect()
}

/// The untagged images no other image of the manifest grew from: build stages.
pub(super) fn stage_leaves(manifest: &pb::Manifest) -> HashSet<String> {
    let parents: HashSet<&str> = manifest.images.iter().map(|image| image.parent_id.as_str()).collect();
    manifest
        .images
        .iter()
        .filter(|image| image.repo_tags.is_empty() && !image.build_cache && !parents.contains(image.id.as_str()))
        .map(|image| image.id.clone())
        .collect()
}

/// The containerd image store with BuildKit: each restored image's inline cache read from the
/// restored layout, or the restored `mode=max` cache, and the build's own cache written for the
/// next save. Only when the saved images say BuildKit built them: the classic builder refuses
/// `--cache-to` (`unknown flag`), and on a miss nothing says which builder runs.
///
/// The `mode=max` cache holds everything the images' inline cache does, and BuildKit reads
/// overlapping sources unreliably (measured on 28.5: a step whose parent matched in the inline
/// source, which keeps no result for a stage's inner steps, missed in about half the builds on
/// a busy host), so when there is one it is the only source.
pub(super) fn buildkit_local_flags(manifest: &pb::Manifest, dirs: &BuildDirs) -> Vec<String> {
    let images = manifest.images.as_slice();
    let mut flags = Vec::new();
    if let Some(cache) = images.iter().find(|image| image.build_cache) {
        flags.push(format!("--cache-from type=local,src={},digest={}", dirs.cache().display(), cache.id));
    } else {
        for image in images.iter().filter(|image| image.inline_cache) {
            flags.push(format!("--cache-from type=local,src={},digest={}", dirs.images().display(), image.id));
        }
    }
    flags.push(format!("--cache-to type=local,dest={},mode=max", dirs.export().display()));
    flags
}

/// Whether a manifest was saved from the containerd image store (its images are OCI blobs).
pub(super) fn saved_as_oci(manifest: &pb::Manifest) -> bool {
    manifest.images.iter().any(|image| !image.oci_media_type.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tag_of_the_chain_becomes_a_cache_from_flag() {
        let manifest = pb::Manifest {
            images: vec![
                pb::Image { id: "sha256:1".into(), repo_tags: vec!["base:1".into()], ..Default::default() },
                pb::Image { id: "sha256:2".into(), parent_id: "sha256:1".into(), ..Default::default() },
                pb::Image {
                    id: "sha256:3".into(),
                    parent_id: "sha256:2".into(),
                    repo_tags: vec!["app:latest".into()],
                    ..Default::default()
                },
                // A build stage: untagged, no image grew from it.
                pb::Image { id: "sha256:4".into(), parent_id: "sha256:1".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        assert_eq!(
            build_flags(&cache_from_images(&manifest)),
            "--cache-from base:1 --cache-from app:latest --cache-from sha256:4"
        );
        assert_eq!(stage_leaves(&manifest), HashSet::from(["sha256:4".to_string()]));
        let untagged = pb::Manifest { images: vec![manifest.images[1].clone()], ..Default::default() };
        assert_eq!(cache_from_images(&untagged), vec!["--cache-from sha256:2".to_string()]);
    }
}
