//! Logs and traces for the coordinator and the worker: a `tracing` subscriber that logs to
//! stderr and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, exports spans over OTLP (gRPC); and the
//! W3C trace context carried in gRPC metadata, so one restore is one trace across both
//! processes. Without the variable nothing is exported and no exporter runs.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; dropping it flushes the spans not yet sent.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("telemetry: flushing spans failed: {error}");
        }
    }
}

/// Starts logging (filter from `filter_variable`, else `default_filter`, plus `extra_directives`
/// that always apply) and, with `OTEL_EXPORTER_OTLP_ENDPOINT`, the OTLP span exporter naming
/// this process `service_name`.
pub fn init(
    service_name: &'static str,
    filter_variable: &str,
    default_filter: &str,
    extra_directives: &[&str],
) -> Telemetry {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env(filter_variable)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    for directive in extra_directives {
        filter = filter.add_directive(directive.parse().expect("static directive"));
    }
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|endpoint| !endpoint.is_empty());
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry().with(filter).with(log_layer()).init();
        return Telemetry { provider: None };
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint.clone()).build();
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(error) => {
            tracing_subscriber::registry().with(filter).with(log_layer()).init();
            tracing::warn!(%error, endpoint, "OTLP export is off: the exporter could not start");
            return Telemetry { provider: None };
        }
    };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name).build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer(service_name);
    // Spans go to OTLP at info and above whatever the log filter says.
    let spans =
        tracing_opentelemetry::layer().with_tracer(tracer).with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let logs = log_layer().with_filter(filter);
    tracing_subscriber::registry().with(logs).with(spans).init();
    Telemetry { provider: Some(provider) }
}

use tracing_subscriber::Layer as _;

/// Log lines to stderr, coloured only on a terminal: a log written to a file, journald,
/// Kubernetes or a CI log gets plain text, never escape codes.
fn log_layer<S>() -> tracing_subscriber::fmt::Layer<
    S,
    tracing_subscriber::fmt::format::DefaultFields,
    tracing_subscriber::fmt::format::Format,
    fn() -> std::io::Stderr,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr as fn() -> std::io::Stderr)
        .with_ansi(std::io::stderr().is_terminal())
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(value))
        {
            self.0.insert(key, value);
        }
    }
}

/// Adds the current span's trace context (`traceparent`) to an outgoing call's metadata.
pub fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The span of one incoming gRPC call, a child of the caller's trace when its metadata carries
/// one. For tonic's `Server::trace_fn`.
pub fn grpc_server_span<B>(request: &http::Request<B>) -> tracing::Span {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let span = tracing::info_span!("grpc", rpc.method = %request.uri().path());
    let _ = span.set_parent(parent);
    span
}
