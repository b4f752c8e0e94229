//! cache-worker as a library: the pieces the `cache-worker` binary runs on a build host.

pub mod build_dirs;
pub mod containerd;
pub mod content_store;
pub mod coordinator;
pub mod direct;
pub mod docker;
pub mod error;
pub mod export;
pub mod image_config;
pub mod layer_store;
pub mod layout;
pub mod load;
pub mod oci;
pub mod progress;
pub mod restore;
pub mod save;
pub mod save_source;
pub mod signals;
pub mod steps;
pub mod transfer;
pub mod upload;
pub mod view;
