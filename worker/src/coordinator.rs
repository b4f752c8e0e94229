//! The worker's connection to the coordinator's gRPC API, with the project token attached.

use proto::client::{BearerToken, ClientError, connect};
use proto::v1::worker_client::WorkerClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

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
    pub url: String,
    /// The transfer plan's lease this process holds, given back with its metrics report.
    pub lease_id: String,
}

impl Coordinator {
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Coordinator, ClientError> {
        let token =
            token.ok_or_else(|| ClientError::Invalid("no project token: pass --token or set CACHE_TOKEN".into()))?;
        let token = BearerToken::new(token)?;
        let client = WorkerClient::with_interceptor(connect(url).await?, CallMetadata(token));
        Ok(Coordinator { client, url: url.to_owned(), lease_id: String::new() })
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
