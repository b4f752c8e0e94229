//! The coordinator's listeners and what they withstand from clients that authenticate slowly
//! or never: a cap on open connections per listener (connections beyond it wait in the
//! kernel's queue, costing the process nothing), a deadline for each request's headers, for a
//! connection with no request in flight (whatever frames it sends) and between a request
//! body's pieces, and an accept loop that
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

/// How many of a connection's requests are being answered (from the call until the
/// response's body is sent or dropped), and when one last began or ended. Nothing else a
/// client sends counts: HTTP/2 PINGs, SETTINGS and WINDOW_UPDATEs keep no connection open.
/// On the HTTP listeners it also notes the responses being sent and when one last gave a
/// piece, so a client that stops reading its response does not hold the connection either.
struct Activity {
    epoch: Instant,
    last_millis: AtomicU64,
    in_flight: AtomicUsize,
    streaming: AtomicUsize,
    last_piece_millis: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_millis: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            streaming: AtomicUsize::new(0),
            last_piece_millis: AtomicU64::new(0),
        })
    }

    fn now_millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_millis.store(self.now_millis(), Ordering::Relaxed);
    }

    /// Counts a response body as being sent until the returned guard drops.
    fn streaming(self: &Arc<Self>) -> Streaming {
        self.streaming.fetch_add(1, Ordering::Relaxed);
        self.last_piece_millis.store(self.now_millis(), Ordering::Relaxed);
        Streaming(self.clone())
    }

    /// How long the responses being sent have given no piece (zero when none is being sent):
    /// a client that does not read leaves its response's body unpolled.
    fn stalled_for(&self) -> Duration {
        if self.streaming.load(Ordering::Relaxed) == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(self.now_millis().saturating_sub(self.last_piece_millis.load(Ordering::Relaxed)))
    }

    /// Counts a request as in flight until the returned guard drops.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// How long until the connection has been idle for `idle_timeout`: zero when it has, the
    /// whole timeout while a request is in flight.
    fn idle_left(&self, idle_timeout: Duration) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return idle_timeout;
        }
        let idle_for =
            self.epoch.elapsed().saturating_sub(Duration::from_millis(self.last_millis.load(Ordering::Relaxed)));
        idle_timeout.saturating_sub(idle_for)
    }
}

/// One request in flight on a connection.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// One response body being sent on an HTTP listener's connection.
struct Streaming(Arc<Activity>);

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until it is sent (or dropped), so a long
/// download is not taken for an idle connection; on the HTTP listeners it notes each piece.
pub struct CountedBody<B> {
    inner: Pin<Box<B>>,
    in_flight: Option<InFlight>,
    streaming: Option<Streaming>,
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match (&polled, &self.streaming) {
            (Poll::Ready(None), _) => {
                self.streaming = None;
                self.in_flight = None;
            }
            (Poll::Ready(Some(_)), Some(streaming)) => {
                streaming.0.last_piece_millis.store(streaming.0.now_millis(), Ordering::Relaxed);
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails when its client sends nothing for the body timeout. The clock
/// starts when the handler first waits for it, so a handler that reads late is not punished.
pub struct TimedBody<B = hyper::body::Incoming> {
    inner: B,
    timeout: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
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
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
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

/// A service whose requests are counted in flight from the call until their response's
/// body is sent, their request bodies timed.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    body_timeout: Duration,
}

impl<S, B> hyper::service::Service<http::Request<hyper::body::Incoming>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<TimedBody>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<CountedBody<B>>, S::Error>> + Send>>;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        let timeout = self.body_timeout;
        let answer = self.inner.call(request.map(|inner| TimedBody { inner, timeout, deadline: None }));
        let activity = self.activity.clone();
        Box::pin(async move {
            let response = answer.await?;
            let streaming = Some(activity.streaming());
            Ok(response.map(|body| CountedBody { inner: Box::pin(body), in_flight: Some(in_flight), streaming }))
        })
    }
}

/// A tower layer for the gRPC server counting each call in flight on its connection (found
/// by the [`GrpcConnectInfo`] tonic puts in the request), until its response's body is sent;
/// its request body is timed as the HTTP listeners' are (no RPC streams its request, so a
/// call whose message does not come is a client holding the connection).
#[derive(Clone, Copy)]
pub struct CountGrpcCalls {
    pub body_timeout: Duration,
}

impl<S> tower::Layer<S> for CountGrpcCalls {
    type Service = CountedGrpc<S>;

    fn layer(&self, inner: S) -> CountedGrpc<S> {
        CountedGrpc { inner, body_timeout: self.body_timeout }
    }
}

#[derive(Clone)]
pub struct CountedGrpc<S> {
    inner: S,
    body_timeout: Duration,
}

impl<S, B> tower::Service<http::Request<tonic::body::Body>> for CountedGrpc<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<CountedBody<B>>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let in_flight = request.extensions().get::<GrpcConnectInfo>().map(|info| info.activity.begin());
        let timeout = self.body_timeout;
        let request = request.map(|inner| tonic::body::Body::new(TimedBody { inner, timeout, deadline: None }));
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // A gRPC response may pause by design (a health watch): never taken for stalled.
            Ok(response.map(|body| CountedBody { inner: Box::pin(body), in_flight, streaming: None }))
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
        let io = TokioIo::new(socket);
        let tracked = Tracked { inner: service.clone(), activity: activity.clone(), body_timeout: limits.body_timeout };
        let connection = graceful.watch(builder.serve_connection(io, tracked).into_owned());
        tokio::spawn(watch_connection(connection, activity, limits, permit));
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => tracing::warn!(listener = name, "open connections did not finish within 10 s"),
    }
}

/// Drives a connection to its end, or drops it (closing the socket) once it has had no
/// request in flight for the idle timeout, whatever frames it sent, or once the responses it
/// is sent have given no piece for the body timeout (its client does not read them); its slot
/// frees when this returns.
async fn watch_connection<E: Into<BoxError>>(
    connection: impl Future<Output = Result<(), E>>,
    activity: Arc<Activity>,
    limits: Limits,
    _slot: OwnedSemaphorePermit,
) {
    let idle_timeout = limits.idle_timeout;
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
                if activity.idle_left(idle_timeout).is_zero() {
                    tracing::debug!("closing a connection idle for {} s", idle_timeout.as_secs());
                    return;
                }
                if activity.stalled_for() >= limits.body_timeout {
                    tracing::debug!("closing a connection whose client read none of its response for {} s", limits.body_timeout.as_secs());
                    return;
                }
            }
        }
    }
}

/// A gRPC connection: its socket, its slot under the listener's cap, and the idle deadline
/// (a read fails once no call has been in flight for the idle timeout, whatever the client
/// sent meanwhile; [`CountGrpcCalls`] counts the calls).
pub struct GrpcConnection {
    socket: TcpStream,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
    idle_timeout: Duration,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the client's bytes were last read (the activity's clock, milliseconds).
    last_read_millis: Option<u64>,
    /// Whether this idle spell's one grace was given.
    grace_given: bool,
}

/// How long a connection whose client sent bytes just as its idle deadline passed is kept
/// beyond it, once: a call whose frames were read but not yet dispatched then begins, rather
/// than being dropped with its connection. A client that only pings gains this once per idle
/// spell.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// What tonic puts in each request of a [`GrpcConnection`]: the peer's address, and the
/// connection's count of calls in flight.
#[derive(Clone)]
pub struct GrpcConnectInfo {
    pub tcp: tonic::transport::server::TcpConnectInfo,
    activity: Arc<Activity>,
}

impl tonic::transport::server::Connected for GrpcConnection {
    type ConnectInfo = GrpcConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        GrpcConnectInfo { tcp: self.socket.connect_info(), activity: self.activity.clone() }
    }
}

impl AsyncRead for GrpcConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let filled = buf.filled().len();
        if let ready @ Poll::Ready(_) = Pin::new(&mut this.socket).poll_read(cx, buf) {
            if buf.filled().len() > filled {
                this.last_read_millis = Some(this.activity.now_millis());
            }
            return ready;
        }
        loop {
            let mut remaining = this.activity.idle_left(this.idle_timeout);
            if !remaining.is_zero() {
                this.grace_given = false;
            } else {
                let now = this.activity.now_millis();
                let just_read = this.last_read_millis.is_some_and(|read| now.saturating_sub(read) < 250);
                if this.grace_given || !just_read {
                    return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle connection")));
                }
                this.grace_given = true;
                remaining = IDLE_GRACE;
                this.idle = None;
            }
            let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(remaining)));
            match idle.as_mut().poll(cx) {
                // Calls may have begun or ended meanwhile: look again with what is left.
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

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
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

/// gRPC's incoming connections, within `limits` (the cap and the idle deadline; tonic keeps
/// its own header and keep-alive handling), accepted with the same back-off. The server
/// must carry the [`CountGrpcCalls`] layer, or every connection is idle from its start.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: Limits,
) -> impl futures::Stream<Item = std::io::Result<GrpcConnection>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures::stream::unfold((listener, slots, false), move |(listener, slots, mut failing)| async move {
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let socket = accept(&listener, "grpc", &mut failing).await;
        let connection = GrpcConnection {
            socket,
            activity: Activity::new(),
            _slot: slot,
            idle_timeout: limits.idle_timeout,
            idle: None,
            last_read_millis: None,
            grace_given: false,
        };
        Some((Ok(connection), (listener, slots, failing)))
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn short_idle() -> Limits {
        Limits {
            max_connections: 8,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
        }
    }

    /// Pings every 100 ms until the server closes the connection or 6 s have passed since
    /// `opened`: how long it was kept open.
    async fn ping_until_closed(ping_pong: &mut h2::PingPong, opened: Instant) -> Duration {
        while opened.elapsed() < Duration::from_secs(6) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if ping_pong.ping(h2::Ping::opaque()).await.is_err() {
                break;
            }
        }
        opened.elapsed()
    }

    /// An HTTP/2 client that sends nothing but PINGs (answering the server's own): how long
    /// the server kept its connection open, at most 6 s.
    async fn only_pings(address: std::net::SocketAddr) -> Duration {
        let socket = TcpStream::connect(address).await.unwrap();
        let (send_request, mut connection) = h2::client::handshake(socket).await.unwrap();
        let mut ping_pong = connection.ping_pong().expect("the first ping_pong");
        let opened = Instant::now();
        let driver = tokio::spawn(connection);
        let kept = ping_until_closed(&mut ping_pong, opened).await;
        drop(send_request);
        driver.abort();
        kept
    }

    /// An HTTP/2 client that begins a gRPC call and never sends its message, pinging: how long
    /// the server kept its connection open, at most 6 s.
    async fn never_sends_its_message(address: std::net::SocketAddr) -> Duration {
        let socket = TcpStream::connect(address).await.unwrap();
        let (mut send_request, mut connection) = h2::client::handshake(socket).await.unwrap();
        let mut ping_pong = connection.ping_pong().expect("the first ping_pong");
        let opened = Instant::now();
        let driver = tokio::spawn(connection);
        let request = http::Request::post(format!("http://{address}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (_response, _message) = send_request.send_request(request, false).unwrap();
        let kept = ping_until_closed(&mut ping_pong, opened).await;
        driver.abort();
        kept
    }

    /// An HTTP/2 client that asks for `path` and reads none of the answer's body, pinging: how
    /// long the server kept its connection open, at most 6 s.
    async fn never_reads(address: std::net::SocketAddr, path: &str) -> Duration {
        let socket = TcpStream::connect(address).await.unwrap();
        let (mut send_request, mut connection) = h2::client::handshake(socket).await.unwrap();
        let mut ping_pong = connection.ping_pong().expect("the first ping_pong");
        let opened = Instant::now();
        let driver = tokio::spawn(connection);
        let request = http::Request::get(format!("http://{address}{path}")).body(()).unwrap();
        let (response, _) = send_request.send_request(request, true).unwrap();
        let _unread = response.await.unwrap();
        let kept = ping_until_closed(&mut ping_pong, opened).await;
        driver.abort();
        kept
    }

    /// A client connects to a gRPC listener with a 200 ms idle timeout and, if `written`,
    /// sends bytes just after the deadline passed: how long the server's next read took to fail.
    async fn read_past_the_deadline(
        address: std::net::SocketAddr,
        incoming: &mut (impl futures::Stream<Item = std::io::Result<GrpcConnection>> + Unpin),
        written: bool,
    ) -> Duration {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut client = TcpStream::connect(address).await.unwrap();
        let mut connection = futures::StreamExt::next(incoming).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        if written {
            // A call's first frames, arriving as the deadline passes.
            client.write_all(b"frames").await.unwrap();
            let mut got = [0u8; 6];
            connection.read_exact(&mut got).await.unwrap();
        }
        let started = Instant::now();
        let failed = connection.read(&mut [0u8; 1]).await.unwrap_err();
        assert_eq!(failed.kind(), std::io::ErrorKind::TimedOut);
        started.elapsed()
    }

    #[tokio::test]
    async fn a_grpc_connection_whose_client_writes_just_as_it_goes_idle_is_kept_a_moment_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let limits = Limits { idle_timeout: Duration::from_millis(200), ..short_idle() };
        let mut incoming = Box::pin(grpc_incoming(listener, limits));
        let silent = read_past_the_deadline(address, &mut incoming, false).await;
        assert!(silent < Duration::from_millis(100), "a silent idle connection fails at once: {silent:?}");
        let written = read_past_the_deadline(address, &mut incoming, true).await;
        assert!(written >= Duration::from_millis(900), "bytes just read earn the grace: {written:?}");
        assert!(written < Duration::from_secs(3), "but only once: {written:?}");
    }

    /// A GET over HTTP/2 on its own connection: its body and how long it took.
    async fn get(address: std::net::SocketAddr, path: &str) -> (Vec<u8>, Duration) {
        let started = Instant::now();
        let socket = TcpStream::connect(address).await.unwrap();
        let (mut send_request, connection) = h2::client::handshake(socket).await.unwrap();
        let driver = tokio::spawn(connection);
        let request = http::Request::get(format!("http://{address}{path}")).body(()).unwrap();
        let (response, _) = send_request.send_request(request, true).unwrap();
        let mut body = response.await.unwrap().into_body();
        let mut bytes = Vec::new();
        while let Some(piece) = body.data().await {
            let piece = piece.unwrap();
            let _ = body.flow_control().release_capacity(piece.len());
            bytes.extend_from_slice(&piece);
        }
        driver.abort();
        (bytes, started.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http_connection_that_only_pings_or_never_reads_is_closed_and_one_answering_slowly_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Answers that outlast the idle deadline: a head after 1.5 s, a body in pieces over 3 s.
        let service = hyper::service::service_fn(|request: http::Request<TimedBody>| async move {
            if request.uri().path() == "/slow-head" {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            let path = request.uri().path().to_owned();
            let n_pieces = match path.as_str() {
                "/slow-body" => 6,
                "/big" => 64,
                _ => 1,
            };
            let pieces = futures::stream::unfold(0, move |piece_idx| {
                let path = path.clone();
                async move {
                    if piece_idx == n_pieces {
                        return None;
                    }
                    let piece = match path.as_str() {
                        "/slow-body" => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            Bytes::from_static(b"x")
                        }
                        "/big" => Bytes::from(vec![0u8; 1 << 20]),
                        _ => Bytes::from_static(b"x"),
                    };
                    Some((Ok::<_, Infallible>(http_body::Frame::data(piece)), piece_idx + 1))
                }
            });
            Ok::<_, Infallible>(http::Response::new(http_body_util::StreamBody::new(pieces)))
        });
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve_http(listener, "test", short_idle(), service, shutdown));

        let (pinged, unread, slow_head, slow_body) = tokio::join!(
            only_pings(address),
            never_reads(address, "/big"),
            get(address, "/slow-head"),
            get(address, "/slow-body")
        );
        // A response its client does not read is given up at the body deadline (1 s here).
        assert!(unread < Duration::from_secs(3), "a client that read nothing of its answer held it {unread:?}");
        assert!(pinged < Duration::from_secs(3), "a connection that only pings was kept {pinged:?}");
        assert!(pinged >= Duration::from_millis(900), "it was closed before the deadline: {pinged:?}");
        assert_eq!(slow_head.0, b"x");
        assert_eq!(slow_body.0, b"xxxxxx");
        assert!(slow_head.1 > Duration::from_secs(1) && slow_body.1 > Duration::from_secs(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_grpc_connection_that_only_pings_or_never_sends_its_message_is_closed_and_one_with_a_call_open_is_not() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let server = tonic::transport::Server::builder()
            .layer(CountGrpcCalls { body_timeout: Duration::from_secs(1) })
            .add_service(health)
            .serve_with_incoming(grpc_incoming(listener, short_idle()));
        tokio::spawn(server);

        // A call held open for 2.5 s (a health watch) keeps its connection: the status change
        // still reaches it.
        let watching = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap();
            let mut client = HealthClient::new(channel.connect().await.unwrap());
            let mut updates = client.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
            let first = updates.message().await.unwrap().unwrap();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            (first.status, updates.message().await)
        };
        let (pinged, silent, (first, then)) =
            tokio::join!(only_pings(address), never_sends_its_message(address), watching);
        assert!(pinged < Duration::from_secs(3), "a connection that only pings was kept {pinged:?}");
        // The call fails at the body deadline (1 s), then the connection is idle (1 s more).
        assert!(silent < Duration::from_secs(4), "a call whose message never came held its connection {silent:?}");
        assert!(pinged >= Duration::from_millis(900), "it was closed before the deadline: {pinged:?}");
        assert_eq!(first, ServingStatus::Serving as i32);
        let then = then.expect("the watch's connection is still open").expect("an update");
        assert_eq!(then.status, ServingStatus::NotServing as i32);
    }

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
