//! Serves the distribution API over HTTP/1.1 on a listener until told to stop, then waits for
//! the requests in flight (a manifest `PUT` may be committing a save).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;

/// How a view serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where uploads are spooled while they arrive (deleted once taken or abandoned).
    pub spool_dir: PathBuf,
    /// The largest manifest a `PUT` may carry.
    pub max_manifest_bytes: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

impl ServeOptions {
    pub fn new(spool_dir: PathBuf) -> ServeOptions {
        ServeOptions { spool_dir, max_manifest_bytes: 4 * 1024 * 1024, idle_timeout: Duration::from_secs(300) }
    }
}

/// Serves `backend` on `listener` until `shutdown` completes, then lets the requests in
/// flight finish and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let _ = (listener, backend, options, shutdown);
    unimplemented!("the protocol is being written")
}
