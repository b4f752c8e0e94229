//! The worker's connection to the coordinator's gRPC API, with the project token attached.

use std::time::Duration;

use proto::client::{BearerToken, ClientError, connect_watched, connect_with_deadline};
use proto::v1::worker_client::WorkerClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::transfer::{AFTER_FAILURE, body_deadline};

/// The channel deadline of commits; each commit's own is shorter (see `Coordinator::commit_save`).
const LONGEST_COMMIT: Duration = Duration::from_secs(24 * 3600);

pub type Client = WorkerClient<InterceptedService<Channel, CallMetadata>>;

/// What every call carries: the project token, and the trace context of the current span so
/// the coordinator's spans join the worker's trace.
#[derive(Clone)]
pub struct CallMetadata(BearerToken);

impl tonic::service::Interceptor for CallMetadata {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut request = self.0.call(request)?;
        telemetry::inject_trace_context(request.metadata_mut());
        Ok(request)
    }
}

/// A connected client plus the URL, for error messages.
pub struct Coordinator {
    pub client: Client,
    /// Commits only: a commit may take longer than the stall timeout while the coordinator
    /// checks large new blobs in the store, so it has a deadline of its own, and the connection
    /// is watched with pings instead (see [`connect_watched`]).
    commits: Client,
    pub url: String,
    /// How long any call, and any transfer, may go without progress (`--stall-timeout`).
    pub stall_timeout: Duration,
}

impl Coordinator {
    /// Connects; every call has `stall_timeout` as its deadline.
    pub async fn connect(url: &str, token: Option<&str>, stall_timeout: Duration) -> Result<Coordinator, ClientError> {
        let token =
            token.ok_or_else(|| ClientError::Invalid("no project token: pass --token or set CACHE_TOKEN".into()))?;
        let token = BearerToken::new(token)?;
        let client = WorkerClient::with_interceptor(
            connect_with_deadline(url, stall_timeout).await?,
            CallMetadata(token.clone()),
        );
        let commits =
            WorkerClient::with_interceptor(connect_watched(url, stall_timeout, LONGEST_COMMIT)?, CallMetadata(token));
        Ok(Coordinator { client, commits, url: url.to_owned(), stall_timeout })
    }

    /// Holds the begun save `save_id`: says every `interval` that it is alive, so its claims on
    /// the blobs it uploads hold, until the lease is dropped, and follows each answer's share
    /// of the transfer budget (`first_share` until the first answer).
    pub fn lease_save(&self, save_id: &str, interval: Duration, first_share: u32) -> SaveLease {
        let (shares, followed) = tokio::sync::watch::channel(first_share);
        SaveLease {
            save_id: save_id.to_owned(),
            shares: followed,
            _keep_alive: self.keep_save_alive(save_id, interval, shares),
        }
    }

    /// Says every `interval` that the save `save_id` is alive until the returned guard is
    /// dropped; each answer's share of the transfer budget goes to `shares`.
    fn keep_save_alive(&self, save_id: &str, interval: Duration, shares: tokio::sync::watch::Sender<u32>) -> KeepAlive {
        let (mut client, save_id) = (self.client.clone(), save_id.to_owned());
        let task = tokio::spawn(async move {
            let mut warned = false;
            loop {
                tokio::time::sleep(interval).await;
                let request = proto::v1::KeepSaveAliveRequest { save_id: save_id.clone() };
                match client.keep_save_alive(request).await {
                    Ok(answer) => {
                        warned = false;
                        if let Some(plan) = answer.into_inner().plan {
                            shares.send_if_modified(|share| {
                                std::mem::replace(share, plan.max_concurrency) != plan.max_concurrency
                            });
                        }
                    }
                    // The commit reports what went wrong (the save's one line); the claims may
                    // lapse meanwhile. Logged once, not at every interval of a long outage.
                    Err(status) if !warned => {
                        warned = true;
                        tracing::debug!(error = %status.message(), "telling the coordinator the save is alive failed");
                    }
                    Err(status) => tracing::debug!(error = %status.message(), "the save is still not kept alive"),
                }
            }
        });
        KeepAlive(task)
    }

    /// Gives a save that will not commit back to the coordinator (its claims, its share of the
    /// budget), best effort and briefly: the coordinator may be the reason it failed.
    pub async fn abandon_save(&mut self, save_id: &str) {
        abandon_save(self.client.clone(), save_id, self.stall_timeout).await;
    }

    /// Sends the per-layer figures of one save or restore. A cache never breaks a build: a
    /// failed report is logged at debug, not raised, and not warned about: it fails when the
    /// coordinator is gone, and the command's own line already says so.
    pub async fn report_metrics(&mut self, report: proto::v1::ReportMetricsRequest) {
        self.send_report(tonic::Request::new(report)).await;
    }

    /// The same for a command that failed: within [`AFTER_FAILURE`], since the coordinator
    /// (or the store it serves) may be what failed.
    pub async fn report_failure_metrics(&mut self, report: proto::v1::ReportMetricsRequest) {
        let mut request = tonic::Request::new(report);
        request.set_timeout(self.stall_timeout.min(AFTER_FAILURE));
        self.send_report(request).await;
    }

    async fn send_report(&mut self, request: tonic::Request<proto::v1::ReportMetricsRequest>) {
        if let Err(status) = self.client.report_metrics(request).await {
            tracing::debug!(error = %status.message(), "reporting metrics to the coordinator failed");
        }
    }

    /// Begins a save: what the project lacks, the credentials and the plan to upload it with.
    pub async fn begin_save(
        &mut self,
        request: proto::v1::BeginSaveRequest,
    ) -> Result<proto::v1::BeginSaveResponse, ClientError> {
        Ok(self.client.begin_save(request).await.map_err(|status| self.failed(status))?.into_inner())
    }

    /// Asks once to commit a save, as a domain outcome: stored (or kept out by a newer
    /// cache, which the answer says), still waiting for blobs other saves upload, or to be
    /// begun again. `waited_on_others` says the save read past blobs other saves were
    /// uploading, whose loss is then a reason to begin again rather than a failure.
    pub async fn commit_save(
        &mut self,
        request: proto::v1::CommitSaveRequest,
        waited_on_others: bool,
    ) -> Result<CommitOutcome, ClientError> {
        // The coordinator checks each new blob, reading it whole when the store cannot tell
        // its checksum (multipart uploads to S3): the commit may take the stall timeout plus
        // every blob the save names at 1 MiB/s, while the coordinator answers pings.
        let bytes: u64 =
            request.images.iter().flat_map(|image| &image.layers).map(|layer| layer.stored_size.max(layer.size)).sum();
        let mut call = tonic::Request::new(request);
        call.set_timeout(body_deadline(self.stall_timeout, bytes));
        let status = match self.commits.commit_save(call).await {
            Ok(response) if response.get_ref().waiting_for_digests.is_empty() => {
                return Ok(CommitOutcome::Committed(Box::new(response.into_inner())));
            }
            Ok(_) => return Ok(CommitOutcome::Waiting),
            Err(status) => status,
        };
        let again = match status.code() {
            tonic::Code::NotFound => format!("the coordinator no longer knows this save ({})", status.message()),
            // A blob in the store did not match its digest (another token planted it) and the
            // coordinator deleted it: the save uploads it again.
            tonic::Code::DataLoss => status.message().to_owned(),
            // The project was flushed since the save began (through another replica): again.
            tonic::Code::Aborted => status.message().to_owned(),
            tonic::Code::FailedPrecondition if waited_on_others => {
                format!("a concurrent save stopped before uploading what this one waited for ({})", status.message())
            }
            _ => return Err(self.failed(status)),
        };
        Ok(CommitOutcome::BeginAgain(again))
    }

    /// Read credentials for the project's store, asked for now.
    pub async fn read_credentials(&mut self) -> Result<proto::v1::Credentials, ClientError> {
        let request = proto::v1::GetCredentialsRequest { access: proto::v1::Access::Read as i32, ..Default::default() };
        let answer = self.client.get_credentials(request).await.map_err(|status| self.failed(status))?;
        Ok(answer.into_inner().credentials.unwrap_or_default())
    }

    /// Turns a failed call into the worker's error.
    pub fn failed(&self, status: tonic::Status) -> ClientError {
        ClientError::from_status_with_deadline(&self.url, &status, self.stall_timeout)
    }
}

/// Gives a begun save back, waiting at most [`AFTER_FAILURE`] (or `stall_timeout`, if
/// shorter). A failure is logged at debug: the save's own line says what went wrong, and its
/// claims lapse by themselves.
pub async fn abandon_save(mut client: Client, save_id: &str, stall_timeout: Duration) {
    let mut request = tonic::Request::new(proto::v1::AbandonSaveRequest { save_id: save_id.to_owned() });
    request.set_timeout(stall_timeout.min(AFTER_FAILURE));
    if let Err(status) = client.abandon_save(request).await {
        tracing::debug!(error = %status.message(), "giving the save back to the coordinator failed");
    }
}

/// The coordinator as a save sees it: a seam a test fakes.
pub trait SaveCoordinator {
    /// Asks once to commit a save (see [`Coordinator::commit_save`]).
    fn commit_save(
        &mut self,
        request: proto::v1::CommitSaveRequest,
        waited_on_others: bool,
    ) -> impl std::future::Future<Output = Result<CommitOutcome, ClientError>> + Send;
}

impl SaveCoordinator for Coordinator {
    async fn commit_save(
        &mut self,
        request: proto::v1::CommitSaveRequest,
        waited_on_others: bool,
    ) -> Result<CommitOutcome, ClientError> {
        Coordinator::commit_save(self, request, waited_on_others).await
    }
}

/// What one request to commit a save came to.
#[derive(Debug)]
pub enum CommitOutcome {
    /// The commit is decided: `stored` says whether this save became the cache or a newer
    /// one was kept.
    Committed(Box<proto::v1::CommitSaveResponse>),
    /// Blobs other saves are still uploading: ask again (those saves are alive).
    Waiting,
    /// The save cannot commit as begun, for the reason given: begin it again.
    BeginAgain(String),
}

/// A begun save this worker holds (see [`Coordinator::lease_save`]): alive while it lives, with
/// its current share of the transfer budget.
pub struct SaveLease {
    pub save_id: String,
    shares: tokio::sync::watch::Receiver<u32>,
    _keep_alive: KeepAlive,
}

impl SaveLease {
    /// The save's share of the transfer budget, as the coordinator last answered (see
    /// `BlobStore::follow`).
    pub fn shares(&self) -> tokio::sync::watch::Receiver<u32> {
        self.shares.clone()
    }
}

/// Keeps a save alive while it lives (see [`Coordinator::lease_save`]).
struct KeepAlive(tokio::task::JoinHandle<()>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A coordinator that takes HTTP/2 connections, says its settings, reads what comes first
    /// and then freezes (as SIGSTOP leaves it: connections open, nothing read or answered).
    async fn frozen_coordinator() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                // An empty SETTINGS frame: the handshake completes.
                socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
                let _ = socket.read(&mut [0u8; 16 << 10]).await;
                held.push(socket);
            }
        });
        url
    }

    #[tokio::test]
    async fn a_commit_to_a_frozen_coordinator_fails_within_the_stall_timeout_not_its_own_deadline() {
        let url = frozen_coordinator().await;
        let stall = Duration::from_secs(2);
        let token = format!("cct_web_{}", "ab".repeat(32));
        let mut coordinator = Coordinator::connect(&url, Some(&token), stall).await.unwrap();
        // A save of a 1 GiB layer: its commit may take 2 s plus 1024 s while the coordinator
        // answers pings.
        let layer = proto::v1::Layer { size: 1 << 30, ..Default::default() };
        let image = proto::v1::Image { layers: vec![layer], ..Default::default() };
        let request = proto::v1::CommitSaveRequest { save_id: "save-1".into(), images: vec![image], save_log: vec![] };
        let started = Instant::now();
        let failed = coordinator.commit_save(request, false).await.unwrap_err();
        let seconds = started.elapsed().as_secs_f64();
        assert!(matches!(failed, ClientError::Stalled { seconds: 2, .. }), "{failed:?}");
        assert_eq!(failed.exit_code(), 69);
        assert!(seconds < 4.0, "the commit gave up after {seconds:.1} s");
    }
}
