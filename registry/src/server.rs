//! Serves the distribution API over HTTP/1.1 on a listener until told to stop, then waits for
//! the requests in flight (a manifest `PUT` may be committing a save).
//!
//! Each request's handler runs as a task of its own, so a client that hangs up never cuts a
//! backend call short (a commit half done), and the stop waits for every one of them. A
//! connection with no request in flight for `idle_timeout` is closed; so is every idle one when
//! the view stops.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proto::clock::SharedClock;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::backend::{Backend, RegistryError};
use crate::handlers::{self, View};
use crate::response::{Body, Failure};
use crate::uploads;

/// How a view serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where uploads are spooled while they arrive (deleted once taken or abandoned).
    pub spool_dir: PathBuf,
    /// The largest manifest a `PUT` may carry.
    pub max_manifest_bytes: usize,
    /// A connection with no request in flight for this long is closed; an upload session
    /// unused for this long is dropped with its file (and at start, spool files a killed view
    /// left that were not written for this long are removed); a request body that sends
    /// nothing for this long is cut off.
    pub idle_timeout: Duration,
    /// How many upload sessions may be open at once.
    pub max_uploads: usize,
    /// How many connections are served at once (more wait until one closes).
    pub max_connections: usize,
    /// The clock upload sessions and idle connections age by.
    pub clock: SharedClock,
}

impl ServeOptions {
    pub fn new(spool_dir: PathBuf) -> ServeOptions {
        ServeOptions {
            spool_dir,
            max_manifest_bytes: 4 * 1024 * 1024,
            idle_timeout: Duration::from_secs(300),
            max_uploads: 256,
            max_connections: 512,
            clock: proto::clock::system_clock(),
        }
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
    tokio::fs::create_dir_all(&options.spool_dir).await?;
    let n_stale =
        uploads::remove_stale_spool_files(&options.spool_dir, options.idle_timeout, options.clock.now_unix_ms());
    if n_stale > 0 {
        tracing::info!(n_stale, "removed upload files a stopped view left behind");
    }
    let sweep_every = (options.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let view = Arc::new(View::new(backend, options));
    let (stop_sender, stop) = watch::channel(false);
    // Every connection and every request handler holds a clone; when the last one is dropped,
    // `recv` below returns `None`: everything in flight is answered.
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    let sweeper = tokio::spawn({
        let view = view.clone();
        async move {
            let mut ticker = tokio::time::interval(sweep_every);
            loop {
                ticker.tick().await;
                let n_dropped = view.uploads.drop_idle();
                if n_dropped > 0 {
                    tracing::info!(n_dropped, "dropped upload sessions left idle");
                }
            }
        }
    });
    // At most `max_connections` are served at once; more wait in the listener's backlog, so a
    // runaway client cannot take the worker's file descriptors.
    let connections = Arc::new(Semaphore::new(view.options.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = serve_connection(view.clone(), stream, stop.clone(), alive.clone());
                    tokio::spawn(async move {
                        connection.await;
                        drop(permit);
                    });
                }
                Err(err) => {
                    // Out of file descriptors, most likely: let the connections in flight end.
                    tracing::warn!(error = %err, "registry view could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    stop_sender.send_replace(true);
    drop(alive);
    let _ = all_done.recv().await;
    sweeper.abort();
    view.uploads.clear();
    Ok(())
}

/// When a connection last had something to do (on the view's clock), and how many of its
/// requests are in flight (a request is in flight from its head until its response body is done
/// or dropped).
struct Activity {
    clock: SharedClock,
    in_flight: AtomicUsize,
    last_active_ms: AtomicI64,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InFlight(self.clone())
    }

    fn touch(&self) {
        self.last_active_ms.store(self.clock.now_unix_ms(), Ordering::SeqCst);
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let idle_ms = self.clock.now_unix_ms() - self.last_active_ms.load(Ordering::SeqCst);
        Duration::from_millis(idle_ms.max(0) as u64)
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that marks its request done when it is finished or dropped.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

async fn serve_connection(
    view: Arc<View>,
    stream: tokio::net::TcpStream,
    mut stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    let clock = view.options.clock.clone();
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last_active_ms: AtomicI64::new(clock.now_unix_ms()),
        clock: clock.clone(),
    });
    let service = hyper::service::service_fn({
        let (view, activity, alive) = (view.clone(), activity.clone(), alive.clone());
        move |request: Request<Incoming>| {
            let in_flight = activity.begin();
            let (view, alive) = (view.clone(), alive.clone());
            async move {
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let handler = tokio::spawn(async move {
                    let _alive = alive;
                    handlers::handle(&view, request).await
                });
                let response = handler.await.unwrap_or_else(|err| {
                    tracing::error!(error = %err, "a registry request's handler failed");
                    Failure::Registry(RegistryError::Internal("the registry view failed on this request".into()))
                        .into_response()
                });
                // Headers are never logged: an Authorization header must not reach a log.
                tracing::debug!(%method, ?path, status = response.status().as_u16(), "registry request");
                Ok::<Response<Body>, Infallible>(
                    response.map(|body| Tracked { body, _in_flight: in_flight }.boxed_unsync()),
                )
            }
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .writev(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let idle_timeout = view.options.idle_timeout;
    // Idleness is measured on the view's clock; this only says how often to look.
    let mut ticker = tokio::time::interval((idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    // When the connection was told to close. A response still streaming to a client that does
    // not read gets `idle_timeout` more; then the connection is dropped, so a stuck client cannot
    // hold the view's stop (handlers are tasks of their own and are waited for regardless).
    let mut closing_since_ms: Option<i64> = None;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(err) = served {
                    tracing::debug!(error = %err, "registry connection ended with an error");
                }
                break;
            }
            _ = stop.wait_for(|stop| *stop), if closing_since_ms.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing_since_ms = Some(clock.now_unix_ms());
            }
            _ = ticker.tick() => match closing_since_ms {
                None if activity.idle_for() >= idle_timeout => {
                    connection.as_mut().graceful_shutdown();
                    closing_since_ms = Some(clock.now_unix_ms());
                }
                Some(since_ms) if clock.now_unix_ms() - since_ms >= idle_timeout.as_millis() as i64 => {
                    tracing::debug!("registry connection dropped: its response did not finish after the close");
                    break;
                }
                _ => {}
            },
        }
    }
    drop(alive);
}
