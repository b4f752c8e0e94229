//! The coordinator's listeners and what they withstand from clients that authenticate slowly
//! or never: a cap on open connections per listener (connections beyond it wait in the
//! kernel's queue, costing the process nothing), a deadline for each request's headers, for a
//! connection that does nothing and between a request body's pieces, and an accept loop that
//! backs off, logging once, while the process is out of file descriptors.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one listener allows each client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; the next waits until one closes.
    pub max_connections: usize,
    /// From a connection's first byte (or the end of its last response) to the end of a
    /// request's headers.
    pub header_timeout: Duration,
    /// A connection with no request in progress and no bytes moving is closed after this.
    pub idle_timeout: Duration,
    /// A request body that sends nothing for this long fails.
    pub body_timeout: Duration,
}

/// The caps of the three listeners, sized to the process's open-file limit.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    pub s3: Limits,
    pub metrics: Limits,
    pub grpc: Limits,
}

/// Descriptors kept out of every listener's cap: the database, the object files being read
/// and written, the coordinator's own connections to S3 and STS.
const RESERVED_FILES: u64 = 256;
/// No listener holds more connections than this, whatever the limit allows.
const MOST_CONNECTIONS: u64 = 4096;

impl ListenerLimits {
    /// Splits `open_files` (the process's limit) between the listeners: the metrics listener a
    /// few for Prometheus and probes, the rest three parts to the S3 endpoint (a save opens
    /// several connections) and one to gRPC (one per worker), each at least 16.
    pub fn for_open_files(open_files: u64) -> ListenerLimits {
        let metrics = 64;
        let spare = open_files.saturating_sub(RESERVED_FILES + metrics);
        let cap = |share: u64| (share.clamp(16, MOST_CONNECTIONS)) as usize;
        let limits = |max_connections: usize, idle_seconds: u64| Limits {
            max_connections,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(idle_seconds),
            body_timeout: Duration::from_secs(30),
        };
        ListenerLimits {
            s3: limits(cap(spare / 4 * 3), 30),
            metrics: limits(metrics as usize, 30),
            // Workers keep their channel open through a save, calling at least every few
            // seconds while it runs.
            grpc: limits(cap(spare / 4), 300),
        }
    }
}

/// Raises the soft open-file limit to the hard one, so the caps can be generous, and returns
/// the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (current, maximum) = (limit.current.unwrap_or(u64::MAX), limit.maximum);
    if maximum.is_none_or(|maximum| current < maximum)
        && setrlimit(Resource::Nofile, Rlimit { current: maximum, maximum }).is_ok()
    {
        return maximum.unwrap_or(u64::MAX);
    }
    current
}

/// Accepts the next connection. While accepting fails (out of descriptors, most often) it
/// waits 10 ms, doubling to 1 s, and logs the first failure of each run of them only.
async fn accept(listener: &TcpListener, name: &'static str, failing: &mut bool) -> TcpStream {
    let mut pause = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                if *failing {
                    tracing::info!(listener = name, "accepting connections works again");
                    *failing = false;
                }
                let _ = socket.set_nodelay(true);
                return socket;
            }
            Err(error) => {
                if !*failing {
                    tracing::warn!(
                        listener = name,
                        %error,
                        "accepting a connection failed; retrying with pauses up to 1 s, not logged again until it works"
                    );
                    *failing = true;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are being answered.
struct Activity {
    epoch: Instant,
    last_millis: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity { epoch: Instant::now(), last_millis: AtomicU64::new(0), in_flight: AtomicUsize::new(0) })
    }

    fn touch(&self) {
        self.last_millis.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_millis(self.last_millis.load(Ordering::Relaxed)))
    }
}

/// A socket that notes each byte it moves in its connection's [`Activity`].
struct Watched {
    socket: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.socket).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.socket).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.socket).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// A request body that fails when its client sends nothing for the body timeout. The clock
/// starts when the handler first waits for it, so a handler that reads late is not punished.
pub struct TimedBody {
    inner: hyper::body::Incoming,
    timeout: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.deadline = None;
                Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BoxError::from(format!(
                        "the request body sent nothing for {} s",
                        timeout.as_secs()
                    ))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A service counted as in flight from its call to its answer, its request body timed.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    body_timeout: Duration,
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl<S, B> hyper::service::Service<http::Request<hyper::body::Incoming>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<TimedBody>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<B>, S::Error>> + Send>>;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight(self.activity.clone());
        let timeout = self.body_timeout;
        let answer = self.inner.call(request.map(|inner| TimedBody { inner, timeout, deadline: None }));
        Box::pin(async move {
            let _in_flight = in_flight;
            answer.await
        })
    }
}

/// Serves HTTP/1 and HTTP/2 connections with `service` within `limits` until `shutdown`
/// flips, then lets open connections finish (10 s at most).
pub async fn serve_http<S, B>(
    listener: TcpListener,
    name: &'static str,
    limits: Limits,
    service: S,
    mut shutdown: watch::Receiver<bool>,
) where
    S: hyper::service::Service<http::Request<TimedBody>, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(128);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut failing = false;
    loop {
        let next = async {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            (permit, accept(&listener, name, &mut failing).await)
        };
        let (permit, socket) = tokio::select! {
            next = next => next,
            _ = shutdown.changed() => break,
        };
        let activity = Activity::new();
        let io = TokioIo::new(Watched { socket, activity: activity.clone() });
        let tracked = Tracked { inner: service.clone(), activity: activity.clone(), body_timeout: limits.body_timeout };
        let connection = graceful.watch(builder.serve_connection(io, tracked).into_owned());
        tokio::spawn(watch_connection(connection, activity, limits.idle_timeout, permit));
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => tracing::warn!(listener = name, "open connections did not finish within 10 s"),
    }
}

/// Drives a connection to its end, or drops it (closing the socket) once it has had nothing
/// in flight and moved no byte for `idle_timeout`; its slot frees when this returns.
async fn watch_connection<E: Into<BoxError>>(
    connection: impl Future<Output = Result<(), E>>,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    _slot: OwnedSemaphorePermit,
) {
    tokio::pin!(connection);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ended = &mut connection => {
                if let Err(error) = ended {
                    tracing::debug!(error = %error.into(), "connection ended with an error");
                }
                return;
            }
            _ = check.tick() => {
                if activity.in_flight.load(Ordering::Relaxed) == 0 && activity.idle_for() >= idle_timeout {
                    tracing::debug!("closing a connection idle for {} s", idle_timeout.as_secs());
                    return;
                }
            }
        }
    }
}

/// A gRPC connection: its socket, its slot under the listener's cap, and the idle deadline
/// (a read that waits longer than the idle timeout with no byte moved either way fails).
pub struct GrpcConnection {
    socket: Watched,
    _slot: OwnedSemaphorePermit,
    idle_timeout: Duration,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tonic::transport::server::Connected for GrpcConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.socket.socket.connect_info()
    }
}

impl AsyncRead for GrpcConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let ready @ Poll::Ready(_) = Pin::new(&mut this.socket).poll_read(cx, buf) {
            this.idle = None;
            return ready;
        }
        loop {
            let remaining = this.idle_timeout.saturating_sub(this.socket.activity.idle_for());
            if remaining.is_zero() {
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle connection")));
            }
            let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(remaining)));
            match idle.as_mut().poll(cx) {
                // Writes may have moved bytes meanwhile: look again with what is left.
                Poll::Ready(()) => this.idle = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for GrpcConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// gRPC's incoming connections, within `limits` (the cap and the idle deadline; tonic keeps
/// its own header and keep-alive handling), accepted with the same back-off.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: Limits,
) -> impl futures::Stream<Item = std::io::Result<GrpcConnection>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures::stream::unfold((listener, slots, false), move |(listener, slots, mut failing)| async move {
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let socket = accept(&listener, "grpc", &mut failing).await;
        let socket = Watched { socket, activity: Activity::new() };
        let connection = GrpcConnection { socket, _slot: slot, idle_timeout: limits.idle_timeout, idle: None };
        Some((Ok(connection), (listener, slots, failing)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caps_follow_the_open_file_limit_within_bounds() {
        let small = ListenerLimits::for_open_files(1024);
        assert_eq!((small.s3.max_connections, small.grpc.max_connections), (528, 176));
        let tiny = ListenerLimits::for_open_files(100);
        assert_eq!((tiny.s3.max_connections, tiny.grpc.max_connections), (16, 16));
        let large = ListenerLimits::for_open_files(1 << 20);
        assert_eq!((large.s3.max_connections, large.grpc.max_connections), (4096, 4096));
        assert!(large.s3.max_connections + large.grpc.max_connections + large.metrics.max_connections < 1 << 20);
    }
}
