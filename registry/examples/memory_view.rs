//! A registry view over memory, for checking the protocol by hand against real clients (the
//! Docker CLI, BuildKit, skopeo) and comparing its answers with the reference registry's:
//! `cargo run -p registry --example memory_view [ADDR] [--read-only]` prints `listening on ADDR`, serves
//! until interrupted (SIGINT), then prints what was stored and served; it prints
//! each backend call as it comes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use proto::digest::sha256_digest;
use registry::{Backend, BlobRead, ByteRange, ManifestBody, Reference, RegistryError, ServeOptions, UploadedBlob};

#[derive(Default)]
struct Memory {
    /// With `--read-only`: every push is refused before it begins, as a view whose token may
    /// not write the branch refuses it.
    read_only: bool,
    blobs: Mutex<HashMap<String, Bytes>>,
    manifests: Mutex<HashMap<(String, String), ManifestBody>>,
    n_blobs_served: AtomicU64,
    n_bytes_served: AtomicU64,
}

#[async_trait::async_trait]
impl Backend for Memory {
    async fn manifest(&self, repository: &str, reference: &Reference) -> Result<Option<ManifestBody>, RegistryError> {
        let key = match reference {
            Reference::Tag(tag) | Reference::Digest(tag) => tag.clone(),
        };
        let found = self.manifests.lock().unwrap().get(&(repository.to_owned(), key.clone())).cloned();
        println!("manifest {repository}:{key} -> {}", found.is_some());
        Ok(found)
    }

    async fn blob_size(&self, _repository: &str, digest: &str) -> Result<Option<u64>, RegistryError> {
        let size = self.blobs.lock().unwrap().get(digest).map(|bytes| bytes.len() as u64);
        println!("blob size {digest} -> {size:?}");
        Ok(size)
    }

    async fn read_blob(
        &self,
        _repository: &str,
        digest: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobRead>, RegistryError> {
        let Some(bytes) = self.blobs.lock().unwrap().get(digest).cloned() else { return Ok(None) };
        let size = bytes.len() as u64;
        let part = match range {
            Some(ByteRange { start, end }) => bytes.slice(start as usize..=end as usize),
            None => bytes,
        };
        println!("read blob {digest} {range:?}");
        self.n_blobs_served.fetch_add(1, Ordering::SeqCst);
        self.n_bytes_served.fetch_add(part.len() as u64, Ordering::SeqCst);
        let pieces: Vec<std::io::Result<Bytes>> =
            part.chunks(1024 * 1024).map(|chunk| Ok(part.slice_ref(chunk))).collect();
        Ok(Some(BlobRead { size, body: futures::stream::iter(pieces).boxed() }))
    }

    async fn blob_uploaded(&self, _repository: &str, blob: UploadedBlob) -> Result<(), RegistryError> {
        let bytes =
            Bytes::from(tokio::fs::read(&blob.path).await.map_err(|err| RegistryError::Internal(err.to_string()))?);
        println!("uploaded {} ({} bytes)", blob.digest, blob.size);
        self.blobs.lock().unwrap().insert(blob.digest, bytes);
        Ok(())
    }

    async fn check_push(&self, repository: &str) -> Result<(), RegistryError> {
        if self.read_only {
            println!("push to {repository} refused");
            return Err(RegistryError::Denied(format!(
                "this view may not write {repository}: its token may save to pr-* only, not to branch \"main\""
            )));
        }
        Ok(())
    }

    async fn put_manifest(
        &self,
        repository: &str,
        reference: &Reference,
        manifest: ManifestBody,
    ) -> Result<(), RegistryError> {
        let key = match reference {
            Reference::Tag(tag) | Reference::Digest(tag) => tag.clone(),
        };
        println!(
            "stored {} {repository}:{key} {} ({} bytes)",
            manifest.media_type,
            manifest.digest,
            manifest.bytes.len()
        );
        assert_eq!(sha256_digest(&manifest.bytes), manifest.digest);
        let mut manifests = self.manifests.lock().unwrap();
        manifests.insert((repository.to_owned(), manifest.digest.clone()), manifest.clone());
        manifests.insert((repository.to_owned(), key), manifest);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let read_only = args.iter().any(|arg| arg == "--read-only");
    let addr = args.iter().find(|arg| !arg.starts_with("--")).cloned().unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let memory = Arc::new(Memory { read_only, ..Memory::default() });
    let spool = tempfile::tempdir()?;
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    registry::serve(listener, memory.clone(), ServeOptions::new(spool.path().to_owned()), interrupted).await?;
    println!(
        "served {} blobs ({} bytes); holds {} blobs",
        memory.n_blobs_served.load(Ordering::SeqCst),
        memory.n_bytes_served.load(Ordering::SeqCst),
        memory.blobs.lock().unwrap().len()
    );
    Ok(())
}
