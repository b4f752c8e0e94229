//! The worker's connection to the coordinator's gRPC API, with the project token attached.

use proto::client::{BearerToken, ClientError, connect};
use proto::v1::worker_client::WorkerClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Client = WorkerClient<InterceptedService<Channel, BearerToken>>;

/// A connected client plus the URL, for error messages.
pub struct Coordinator {
    pub client: Client,
    pub url: String,
}

impl Coordinator {
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Coordinator, ClientError> {
        let token =
            token.ok_or_else(|| ClientError::Invalid("no project token: pass --token or set CACHE_TOKEN".into()))?;
        let token = BearerToken::new(token)?;
        Ok(Coordinator { client: WorkerClient::with_interceptor(connect(url).await?, token), url: url.to_owned() })
    }

    /// Sends the per-layer figures of one save or restore. A cache never breaks a build: a
    /// failed report is logged, not raised.
    pub async fn report_metrics(&mut self, report: proto::v1::ReportMetricsRequest) {
        if let Err(status) = self.client.report_metrics(report).await {
            tracing::warn!(error = %status.message(), "reporting metrics to the coordinator failed");
        }
    }

    /// Turns a failed call into the worker's error.
    pub fn failed(&self, status: tonic::Status) -> ClientError {
        ClientError::from_status(&self.url, &status)
    }
}
