//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, one save and one restore are each one trace
//! across the worker and the coordinator, received here by an OTLP receiver inside the test.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use tests::{CoordinatorProcess, DockerEngine, EngineKind, binary, stderr_of};

/// One span as received.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    /// The `service.name` of the process that sent it.
    service: String,
    trace_id: Vec<u8>,
    name: String,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| attribute.value.as_ref())
                .and_then(|value| match &value.value {
                    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(name)) => {
                        Some(name.clone())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push(ReceivedSpan { service: service.clone(), trace_id: span.trace_id, name: span.name });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_save_and_one_restore_are_each_one_trace_across_worker_and_coordinator() {
    let Some(host) = DockerEngine::start(EngineKind::Engine20) else { return };
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    let data_dir = tempfile::tempdir().unwrap();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let coordinator = CoordinatorProcess::start_with_env(data_dir.path(), &[], &env);
    let token = coordinator.create_project("shop");
    host.import_busybox_base("base:1");
    let grpc_url = coordinator.grpc_url.clone();
    let host_url = host.host.clone();
    let worker = move |args: &'static [&'static str]| {
        let (grpc_url, host_url, token, endpoint) =
            (grpc_url.clone(), host_url.clone(), token.clone(), endpoint.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary("cache-worker"))
                .args(["--coordinator", &grpc_url])
                .args(args)
                .env("CACHE_TOKEN", &token)
                .env("DOCKER_HOST", &host_url)
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
                .output()
                .unwrap()
        })
    };
    let saved = worker(&["save", "--service", "web", "base:1"]).await.unwrap();
    assert!(saved.status.success(), "{}", stderr_of(&saved));
    let restored = worker(&["restore", "--service", "web"]).await.unwrap();
    assert!(restored.status.success(), "{}", stderr_of(&restored));
    // Stopping flushes the coordinator's spans; the worker flushed its own when it exited.
    tokio::task::spawn_blocking(move || coordinator.stop()).await.unwrap();
    server.abort();

    let spans = receiver.0.lock().unwrap().clone();
    let mut services_by_trace: HashMap<Vec<u8>, HashSet<String>> = HashMap::new();
    for span in &spans {
        services_by_trace.entry(span.trace_id.clone()).or_default().insert(span.service.clone());
    }
    let restore_trace = spans
        .iter()
        .find(|span| span.service == "cache-worker" && span.name == "restore")
        .map(|span| span.trace_id.clone())
        .unwrap_or_else(|| panic!("no restore span from the worker in {spans:?}"));
    let services = &services_by_trace[&restore_trace];
    assert!(
        services.contains("cache-coordinator"),
        "the coordinator's spans are not in the restore's trace: {spans:?}"
    );
    let coordinator_spans: Vec<&str> = spans
        .iter()
        .filter(|span| span.service == "cache-coordinator" && span.trace_id == restore_trace)
        .map(|span| span.name.as_str())
        .collect();
    assert!(coordinator_spans.contains(&"lookup"), "{coordinator_spans:?}");

    // One save is one trace too: its begin and its commit on the coordinator join it.
    let save_trace = spans
        .iter()
        .find(|span| span.service == "cache-worker" && span.name == "save")
        .map(|span| span.trace_id.clone())
        .unwrap_or_else(|| panic!("no save span from the worker in {spans:?}"));
    assert_ne!(save_trace, restore_trace);
    let coordinator_spans: Vec<&str> = spans
        .iter()
        .filter(|span| span.service == "cache-coordinator" && span.trace_id == save_trace)
        .map(|span| span.name.as_str())
        .collect();
    assert!(coordinator_spans.contains(&"begin_save"), "{coordinator_spans:?}");
    assert!(coordinator_spans.contains(&"commit_save"), "{coordinator_spans:?}");
}
