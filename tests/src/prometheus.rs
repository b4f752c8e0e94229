//! A real Prometheus scraping one target, and a plain HTTP GET to read what it and the
//! coordinator's metrics listener answer.

use std::process::{Child, Command};
use std::time::Duration;

use crate::*;

/// A plain HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(host, path)| (host, format!("/{path}")));
    let mut stream = std::net::TcpStream::connect(host).unwrap_or_else(|error| panic!("connect {host}: {error}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("send the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, body.to_owned())
}

/// A real Prometheus (Debian's package, which `.ci/run` installs) scraping one target every
/// second, with its own storage. `None` (with a note) when it is not installed here; in CI its
/// absence fails the test.
pub struct PrometheusProcess {
    child: Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

impl PrometheusProcess {
    pub fn start(scrape_target: &str) -> Option<PrometheusProcess> {
        let installed =
            Command::new("prometheus").arg("--version").output().is_ok_and(|output| output.status.success());
        if !installed {
            assert!(!in_ci(), "prometheus is missing: .ci/run installs Debian's package");
            eprintln!("skipping: prometheus is not installed here");
            return None;
        }
        let dir = tempfile::tempdir().expect("prometheus folder");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: layer-cache\n    static_configs:\n      - targets: [\"{scrape_target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        // Prometheus cannot be handed a bound socket, and says nothing of a port the kernel
        // picked: pick one, and should another process take it first (Prometheus then exits,
        // or someone else answers), pick again. Only our own Prometheus names our storage path.
        let storage = dir.path().join("data");
        for _attempt in 0..5 {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", storage.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let url = format!("http://127.0.0.1:{port}");
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let ours = loop {
                if child.try_wait().expect("prometheus status").is_some() {
                    break false;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && http_get(&format!("{url}/-/ready")).0 == 200
                {
                    let (_, flags) = http_get(&format!("{url}/api/v1/status/flags"));
                    break flags.contains(&storage.display().to_string());
                }
                assert!(std::time::Instant::now() < deadline, "prometheus did not get ready within 60 s");
                std::thread::sleep(Duration::from_millis(200));
            };
            if ours {
                return Some(PrometheusProcess { child, url, _dir: dir });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("prometheus found no free port in 5 tries");
    }

    /// Evaluates `expr` now: the API's JSON answer.
    pub fn query(&self, expr: &str) -> serde_json::Value {
        let query: String = form_urlencoded::Serializer::new(String::new()).append_pair("query", expr).finish();
        let (status, body) = http_get(&format!("{}/api/v1/query?{query}", self.url));
        let answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON ({status}): {body}"));
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        answer
    }
}

impl Drop for PrometheusProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
