//! A TCP proxy in front of the embedded endpoint (or any HTTP peer) that freezes, answers
//! `503 Slow Down`, notes each request's `Range` and counts the bytes it moves each way: a
//! stalled or throttling store on demand, and a meter of what crossed it.

use std::time::Duration;

/// A TCP proxy on loopback in front of `upstream` that can freeze: while frozen it moves no
/// byte in either direction and keeps every connection open, as a stalled store or network
/// does. It also notes the `Range` headers of the requests it passes.
pub struct FaultyProxy {
    pub address: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    upstream: std::sync::Arc<std::sync::Mutex<String>>,
    /// Bytes moved from the upstream to clients so far.
    moved_down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Bytes moved from clients to the upstream so far.
    moved_up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The `Range` headers of the requests that passed, as sent (e.g. `bytes=0-8388607`).
    ranges: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// How many of the next connections are answered `503 Slow Down` instead of forwarded.
    failing: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

/// Answers one request on `client` with S3's `503 Slow Down` and closes the connection.
fn slow_down(mut client: std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && client.read(&mut byte).is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
    let body = "<Error><Code>SlowDown</Code><Message>injected by the test</Message></Error>";
    let _ = write!(
        client,
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Takes the complete lines out of `pending`; returns the values of `Range:` header lines.
fn range_headers(pending: &mut Vec<u8>) -> Vec<String> {
    let mut ranges = Vec::new();
    while let Some(end) = pending.windows(2).position(|pair| pair == b"\r\n") {
        let line = String::from_utf8_lossy(&pending[..end]).into_owned();
        pending.drain(..end + 2);
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            ranges.push(value.trim().to_owned());
        }
    }
    // A body without line breaks is not kept whole.
    if pending.len() > 64 * 1024 {
        pending.clear();
    }
    ranges
}

impl FaultyProxy {
    /// Listens now; forwards to the address [`FaultyProxy::forward_to`] sets.
    pub fn start() -> FaultyProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let address = listener.local_addr().expect("address");
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let upstream = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let moved_down = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let moved_up = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let accept_moved_up = moved_up.clone();
        let ranges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (accept_upstream, accept_frozen, accept_moved) = (upstream.clone(), frozen.clone(), moved_down.clone());
        let accept_ranges = ranges.clone();
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let accept_failing = failing.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let fail = accept_failing
                    .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| {
                        n.checked_sub(1)
                    })
                    .is_ok();
                if fail {
                    std::thread::spawn(move || slow_down(client));
                    continue;
                }
                let upstream = accept_upstream.lock().expect("upstream").clone();
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let directions = [
                    (
                        client.try_clone(),
                        server.try_clone(),
                        Some(accept_moved_up.clone()),
                        Some(accept_ranges.clone()),
                    ),
                    (server.try_clone(), client.try_clone(), Some(accept_moved.clone()), None),
                ];
                for (from, to, counter, ranges) in directions {
                    let (Ok(mut from), Ok(mut to)) = (from, to) else { continue };
                    let frozen = accept_frozen.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buffer = vec![0u8; 64 * 1024];
                        let mut pending = Vec::new();
                        loop {
                            while frozen.load(std::sync::atomic::Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            match from.read(&mut buffer) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    while frozen.load(std::sync::atomic::Ordering::SeqCst) {
                                        std::thread::sleep(Duration::from_millis(50));
                                    }
                                    if to.write_all(&buffer[..n]).is_err() {
                                        break;
                                    }
                                    if let Some(counter) = &counter {
                                        counter.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                                    }
                                    if let Some(ranges) = &ranges {
                                        pending.extend_from_slice(&buffer[..n]);
                                        ranges.lock().expect("ranges").extend(range_headers(&mut pending));
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        FaultyProxy { address, frozen, upstream, moved_down, moved_up, ranges, failing }
    }

    pub fn forward_to(&self, upstream: &str) {
        *self.upstream.lock().expect("upstream") = upstream.to_owned();
    }

    /// Answers the next `n` connections with `503 Slow Down` (each then closes).
    pub fn fail_next(&self, n: u32) {
        self.failing.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The `Range` headers of every request so far.
    pub fn ranges(&self) -> Vec<String> {
        self.ranges.lock().expect("ranges").clone()
    }

    pub fn bytes_moved_down(&self) -> u64 {
        self.moved_down.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn bytes_moved_up(&self) -> u64 {
        self.moved_up.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Moves bytes again after [`FaultyProxy::freeze`].
    pub fn thaw(&self) {
        self.frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
