//! The part of the OCI distribution API that BuildKit, containerd and the Docker CLI speak to
//! a registry (`/v2/` ping; manifests by tag and digest; blobs with `Range`; uploads, monolithic
//! and chunked), over any `Backend` that keeps the bytes: the worker serves a project's cache
//! through it on the build host, and the coordinator could serve it the same way later.
//!
//! This crate owns the protocol: routes, names, digests, upload sessions spooled and verified
//! before a backend sees them, and the OCI error bodies. A backend only answers what it holds
//! and takes what was verified.

pub mod backend;
mod handlers;
pub mod names;
mod response;
mod routes;
pub mod server;
mod uploads;

pub use backend::{Backend, BlobRead, ByteRange, ManifestBody, Reference, RegistryError, UploadedBlob};
pub use server::{ServeOptions, serve};
