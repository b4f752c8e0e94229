//! cache-worker as a library: the pieces the `cache-worker` binary runs on a build host.

pub mod credentials;
