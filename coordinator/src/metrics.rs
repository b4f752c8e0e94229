//! The coordinator's Prometheus metrics (prometheus-client), fed by the workers' reports, the
//! admin and credential paths, the embedded endpoint's refusals and every gRPC call. Labels are
//! projects, services, operations and outcomes only: never digests or hosts, so cardinality
//! stays bounded by what operators create.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{self, Atomic};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use proto::v1 as pb;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectLabels {
    pub project: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabels {
    pub project: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub project: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestoreLabels {
    pub project: String,
    pub service: String,
    /// hit, partial, miss or error.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabels {
    pub project: String,
    pub service: String,
    /// save or restore.
    pub operation: String,
    /// found (already stored, or already on the host) or transferred.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrantLabels {
    pub project: String,
    /// read or write.
    pub access: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub method: String,
    pub code: String,
}

/// A counter's value that stops at `u64::MAX` instead of wrapping: workers' reports are added
/// to it, and a counter that wrapped would go backwards on every dashboard.
#[derive(Debug, Default)]
pub struct Saturating(AtomicU64);

impl Atomic<u64> for Saturating {
    fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    fn inc_by(&self, v: u64) -> u64 {
        let add = |old: u64| Some(old.saturating_add(v));
        self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, add).unwrap_or_else(|old| old)
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The values of the labels that name kinds rather than tenants: every series a project can
/// have is one of these per project (and service), so a deleted project's can all be removed.
const OPERATIONS: [&str; 2] = ["save", "restore"];
const LAYER_OUTCOMES: [&str; 2] = ["found", "transferred"];
const RESTORE_OUTCOMES: [&str; 4] = ["hit", "partial", "miss", "error"];
const STEP_OUTCOMES: [&str; 2] = ["reused", "rebuilt"];
pub const EVICTION_REASONS: [&str; 5] = ["unreferenced", "uncommitted", "expired", "quota", "lost"];
const ACCESSES: [&str; 2] = ["read", "write"];

/// Every counter here saturates ([`Saturating`]).
pub type Counter = counter::Counter<u64, Saturating>;

/// The shortest a transfer that moved bytes is taken to have lasted: a report of less (down to
/// the smallest positive float) would put an infinite throughput into the histogram every
/// project shares.
const SHORTEST_TRANSFER_SECONDS: f64 = 0.001;

fn duration_histogram() -> Histogram {
    // 0.1 s to about 27 minutes.
    Histogram::new(exponential_buckets(0.1, 2.0, 15))
}

fn throughput_histogram() -> Histogram {
    // 1 MB/s to about 4 GB/s.
    Histogram::new(exponential_buckets(1e6, 2.0, 13))
}

/// Every metric, registered once; each family is safe to update from any task.
pub struct Metrics {
    registry: Registry,
    pub restores: Family<RestoreLabels, Counter>,
    pub saves: Family<ServiceLabels, Counter>,
    /// Build steps of saved images, reused or rebuilt (`outcome` is `reused` or `rebuilt`).
    pub build_steps: Family<RestoreLabels, Counter>,
    pub layers: Family<LayerLabels, Counter>,
    pub layer_bytes: Family<LayerLabels, Counter>,
    pub save_duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub restore_duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub transfer_throughput: Family<OperationLabels, Histogram, fn() -> Histogram>,
    pub store_bytes: Family<ProjectLabels, Gauge>,
    /// Everything under the project's prefix, committed or not, as last counted.
    pub store_usage_bytes: Family<ProjectLabels, Gauge>,
    pub evicted_blobs: Family<EvictionLabels, Counter>,
    pub evicted_bytes: Family<EvictionLabels, Counter>,
    pub evicted_caches: Family<EvictionLabels, Counter>,
    pub store_blobs: Family<ProjectLabels, Gauge>,
    pub flushes: Family<ProjectLabels, Counter>,
    pub credential_grants: Family<GrantLabels, Counter>,
    pub storage_refusals: Family<ProjectLabels, Counter>,
    pub grpc_requests: Family<GrpcLabels, Counter>,
    /// Requests in flight the live transfer leases allow, all workers together.
    pub transfer_granted: Gauge,
    /// The global budget those leases share (`--transfer-budget`).
    pub transfer_budget: Gauge,
    /// 1 while the state (the database) answers the coordinator's probes, 0 while it does not.
    pub state_up: Gauge,
    /// Times the state was found down or restarted since the coordinator started.
    pub state_outages: Counter,
    /// How far the clock the coordinator keeps (the database's, with PostgreSQL) runs ahead of
    /// this machine's, in seconds.
    pub state_clock_offset: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("layer_cache");
        let metrics = Metrics {
            restores: Family::default(),
            saves: Family::default(),
            build_steps: Family::default(),
            layers: Family::default(),
            layer_bytes: Family::default(),
            save_duration: Family::new_with_constructor(duration_histogram),
            restore_duration: Family::new_with_constructor(duration_histogram),
            transfer_throughput: Family::new_with_constructor(throughput_histogram),
            store_bytes: Family::default(),
            store_usage_bytes: Family::default(),
            evicted_blobs: Family::default(),
            evicted_bytes: Family::default(),
            evicted_caches: Family::default(),
            store_blobs: Family::default(),
            flushes: Family::default(),
            credential_grants: Family::default(),
            storage_refusals: Family::default(),
            grpc_requests: Family::default(),
            transfer_granted: Gauge::default(),
            transfer_budget: Gauge::default(),
            state_up: Gauge::default(),
            state_outages: Counter::default(),
            state_clock_offset: Gauge::default(),
            registry: Registry::default(),
        };
        // Counter names carry no `_total`: the encoder adds it.
        registry.register("restores", "Restores by outcome", metrics.restores.clone());
        registry.register("saves", "Committed or unchanged saves reported by workers", metrics.saves.clone());
        registry.register(
            "build_steps",
            "Build steps of saved images: reused from the cache the key held, or rebuilt",
            metrics.build_steps.clone(),
        );
        registry.register("layers", "Layers and configs by operation and outcome", metrics.layers.clone());
        registry.register(
            "layer_bytes",
            "Bytes of layers and configs by operation and outcome",
            metrics.layer_bytes.clone(),
        );
        registry.register("save_duration_seconds", "Duration of saves", metrics.save_duration.clone());
        registry.register("restore_duration_seconds", "Duration of restores", metrics.restore_duration.clone());
        registry.register(
            "transfer_throughput_bytes_per_second",
            "Throughput of saves and restores that moved bytes",
            metrics.transfer_throughput.clone(),
        );
        registry.register("store_bytes", "Bytes stored per project", metrics.store_bytes.clone());
        registry.register(
            "evicted_blobs",
            "Blobs removed from the store, by reason (unreferenced: garbage collection; uncommitted: uploads no save committed; expired; quota; lost: missing or corrupt in the store)",
            metrics.evicted_blobs.clone(),
        );
        registry.register("evicted_bytes", "Bytes removed from the store, by reason", metrics.evicted_bytes.clone());
        registry.register(
            "evicted_caches",
            "Caches evicted, by reason (expired; quota; lost: they named a blob the store lost)",
            metrics.evicted_caches.clone(),
        );
        registry.register(
            "store_usage_bytes",
            "Bytes under each project's prefix in the store, committed or not (counted every 5 minutes)",
            metrics.store_usage_bytes.clone(),
        );
        registry.register("store_blobs", "Blobs stored per project", metrics.store_blobs.clone());
        registry.register("flushes", "Project flushes", metrics.flushes.clone());
        registry.register("credential_grants", "Storage credentials handed out", metrics.credential_grants.clone());
        registry.register(
            "storage_refusals",
            "Requests the embedded endpoint refused",
            metrics.storage_refusals.clone(),
        );
        registry.register("grpc_requests", "gRPC calls by method and status code", metrics.grpc_requests.clone());
        registry.register(
            "transfer_requests_granted",
            "Requests in flight the live transfer leases allow, all workers together",
            metrics.transfer_granted.clone(),
        );
        registry.register(
            "transfer_budget_requests",
            "The global budget of requests in flight the leases share",
            metrics.transfer_budget.clone(),
        );
        registry.register(
            "state_up",
            "1 while the coordinator's state (its database) answers, 0 while it does not",
            metrics.state_up.clone(),
        );
        registry.register(
            "state_outages",
            "Times the coordinator found its database down or restarted",
            metrics.state_outages.clone(),
        );
        registry.register(
            "state_clock_offset_seconds",
            "How far the clock the coordinator keeps (the database's, with PostgreSQL) runs ahead of this machine's",
            metrics.state_clock_offset.clone(),
        );
        Metrics { registry, ..metrics }
    }

    /// Adds one worker report.
    pub fn record_report(&self, project: &str, report: &pb::ReportMetricsRequest) {
        let service = ServiceLabels { project: project.to_owned(), service: report.service.clone() };
        let operation = match report.operation() {
            pb::Operation::Save => "save",
            pb::Operation::Restore => "restore",
            pb::Operation::Unspecified => return,
        };
        let mut bytes_moved = 0u64;
        for layer in &report.layers {
            let outcome = match layer.outcome() {
                pb::LayerOutcome::Found => "found",
                pb::LayerOutcome::Transferred => {
                    bytes_moved = bytes_moved.saturating_add(layer.bytes);
                    "transferred"
                }
                pb::LayerOutcome::Failed | pb::LayerOutcome::Unspecified => continue,
            };
            let labels = LayerLabels {
                project: project.to_owned(),
                service: report.service.clone(),
                operation: operation.to_owned(),
                outcome: outcome.to_owned(),
            };
            self.layers.get_or_create(&labels).inc();
            self.layer_bytes.get_or_create(&labels).inc_by(layer.bytes);
        }
        match report.operation() {
            pb::Operation::Save => {
                self.saves.get_or_create(&service).inc();
                self.save_duration.get_or_create(&service).observe(report.total_seconds);
                for (outcome, steps) in [("reused", report.steps_reused), ("rebuilt", report.steps_rebuilt)] {
                    let labels = RestoreLabels {
                        project: project.to_owned(),
                        service: report.service.clone(),
                        outcome: outcome.to_owned(),
                    };
                    self.build_steps.get_or_create(&labels).inc_by(u64::from(steps));
                }
            }
            _ => {
                let outcome = match report.restore_outcome() {
                    pb::RestoreOutcome::Hit => "hit",
                    pb::RestoreOutcome::Partial => "partial",
                    pb::RestoreOutcome::Miss => "miss",
                    pb::RestoreOutcome::Error | pb::RestoreOutcome::Unspecified => "error",
                };
                let labels = RestoreLabels {
                    project: project.to_owned(),
                    service: report.service.clone(),
                    outcome: outcome.to_owned(),
                };
                self.restores.get_or_create(&labels).inc();
                if outcome != "miss" {
                    self.restore_duration.get_or_create(&service).observe(report.total_seconds);
                }
            }
        }
        let throughput = bytes_moved as f64 / report.total_seconds.max(SHORTEST_TRANSFER_SECONDS);
        if bytes_moved > 0 && throughput.is_finite() {
            self.transfer_throughput
                .get_or_create(&OperationLabels { operation: operation.to_owned() })
                .observe(throughput);
        }
    }

    /// Removes every series of a deleted project (`services`: those it reported for), so a
    /// project's name leaves `/metrics` with it.
    pub fn forget_project(&self, project: &str, services: &[String]) {
        let project = project.to_owned();
        for service in services {
            let service = ServiceLabels { project: project.clone(), service: service.clone() };
            self.saves.remove(&service);
            self.save_duration.remove(&service);
            self.restore_duration.remove(&service);
            for outcome in RESTORE_OUTCOMES.into_iter().chain(STEP_OUTCOMES) {
                let labels = RestoreLabels {
                    project: project.clone(),
                    service: service.service.clone(),
                    outcome: outcome.into(),
                };
                self.restores.remove(&labels);
                self.build_steps.remove(&labels);
            }
            for (operation, outcome) in
                OPERATIONS.into_iter().flat_map(|operation| LAYER_OUTCOMES.map(|outcome| (operation, outcome)))
            {
                let labels = LayerLabels {
                    project: project.clone(),
                    service: service.service.clone(),
                    operation: operation.into(),
                    outcome: outcome.into(),
                };
                self.layers.remove(&labels);
                self.layer_bytes.remove(&labels);
            }
        }
        let labels = ProjectLabels { project: project.clone() };
        for family in [&self.store_bytes, &self.store_usage_bytes, &self.store_blobs] {
            family.remove(&labels);
        }
        self.flushes.remove(&labels);
        self.storage_refusals.remove(&labels);
        for reason in EVICTION_REASONS {
            let labels = EvictionLabels { project: project.clone(), reason: reason.into() };
            self.evicted_blobs.remove(&labels);
            self.evicted_bytes.remove(&labels);
            self.evicted_caches.remove(&labels);
        }
        for access in ACCESSES {
            self.credential_grants.remove(&GrantLabels { project: project.clone(), access: access.into() });
        }
    }

    pub fn record_grpc(&self, method: &str, code: tonic::Code) {
        let labels = GrpcLabels { method: method.to_owned(), code: format!("{code:?}") };
        self.grpc_requests.get_or_create(&labels).inc();
    }

    /// The text exposition, after `set_store_totals` brought the gauges up to date.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// Blobs removed for `reason` (`unreferenced`, `uncommitted`, `expired`, `quota`, `lost`) and their bytes.
    pub fn record_eviction(&self, project: &str, reason: &str, blobs: u64, bytes: u64) {
        debug_assert!(EVICTION_REASONS.contains(&reason), "{reason} is not in EVICTION_REASONS");
        let labels = EvictionLabels { project: project.to_owned(), reason: reason.to_owned() };
        self.evicted_blobs.get_or_create(&labels).inc_by(blobs);
        self.evicted_bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// Caches evicted for `reason`.
    pub fn record_cache_evictions(&self, project: &str, reason: &str, caches: u64) {
        debug_assert!(EVICTION_REASONS.contains(&reason), "{reason} is not in EVICTION_REASONS");
        if caches > 0 {
            let labels = EvictionLabels { project: project.to_owned(), reason: reason.to_owned() };
            self.evicted_caches.get_or_create(&labels).inc_by(caches);
        }
    }

    pub fn set_store_usage(&self, project: &str, bytes: u64) {
        self.store_usage_bytes.get_or_create(&ProjectLabels { project: project.to_owned() }).set(bytes as i64);
    }

    pub fn set_store_totals(&self, project: &str, blobs: u64, bytes: u64) {
        let labels = ProjectLabels { project: project.to_owned() };
        self.store_blobs.get_or_create(&labels).set(blobs as i64);
        self.store_bytes.get_or_create(&labels).set(bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_become_labelled_counters() {
        let metrics = Metrics::new();
        let layer =
            |bytes, outcome: pb::LayerOutcome| pb::LayerMetric { bytes, outcome: outcome as i32, ..Default::default() };
        metrics.record_report(
            "shop",
            &pb::ReportMetricsRequest {
                service: "web".into(),
                operation: pb::Operation::Restore as i32,
                restore_outcome: pb::RestoreOutcome::Hit as i32,
                layers: vec![layer(100, pb::LayerOutcome::Transferred)],
                total_seconds: 0.5,
                ..Default::default()
            },
        );
        metrics.record_report(
            "shop",
            &pb::ReportMetricsRequest {
                service: "web".into(),
                operation: pb::Operation::Save as i32,
                layers: vec![layer(7, pb::LayerOutcome::Found)],
                total_seconds: 0.1,
                ..Default::default()
            },
        );
        metrics.set_store_totals("shop", 3, 42);
        metrics.record_grpc("Lookup", tonic::Code::Ok);
        let text = metrics.encode();
        for line in [
            "layer_cache_restores_total{project=\"shop\",service=\"web\",outcome=\"hit\"} 1",
            "layer_cache_layer_bytes_total{project=\"shop\",service=\"web\",operation=\"restore\",outcome=\"transferred\"} 100",
            "layer_cache_layer_bytes_total{project=\"shop\",service=\"web\",operation=\"save\",outcome=\"found\"} 7",
            "layer_cache_saves_total{project=\"shop\",service=\"web\"} 1",
            "layer_cache_store_bytes{project=\"shop\"} 42",
            "layer_cache_grpc_requests_total{method=\"Lookup\",code=\"Ok\"} 1",
            "layer_cache_transfer_throughput_bytes_per_second_count{operation=\"restore\"} 1",
        ] {
            // Whole lines: "… 1" must not pass for "… 10".
            assert!(text.lines().any(|exposed| exposed == line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn counters_saturate_and_a_forgotten_project_leaves_no_series() {
        let metrics = Metrics::new();
        let counter = Counter::default();
        counter.inc_by(u64::MAX - 1);
        counter.inc_by(5);
        counter.inc();
        assert_eq!(counter.get(), u64::MAX);
        for operation in [pb::Operation::Save, pb::Operation::Restore] {
            for outcome in [pb::LayerOutcome::Found, pb::LayerOutcome::Transferred] {
                metrics.record_report(
                    "gone",
                    &pb::ReportMetricsRequest {
                        service: "web".into(),
                        operation: operation as i32,
                        restore_outcome: pb::RestoreOutcome::Partial as i32,
                        steps_reused: 3,
                        layers: vec![pb::LayerMetric { bytes: 9, outcome: outcome as i32, ..Default::default() }],
                        total_seconds: 2.0,
                        ..Default::default()
                    },
                );
            }
        }
        for reason in EVICTION_REASONS {
            metrics.record_eviction("gone", reason, 1, 2);
            metrics.record_cache_evictions("gone", reason, 1);
        }
        for access in ACCESSES {
            metrics
                .credential_grants
                .get_or_create(&GrantLabels { project: "gone".into(), access: access.into() })
                .inc();
        }
        metrics.set_store_totals("gone", 1, 2);
        metrics.set_store_usage("gone", 2);
        metrics.set_store_totals("kept", 1, 2);
        metrics.flushes.get_or_create(&ProjectLabels { project: "gone".into() }).inc();
        metrics.storage_refusals.get_or_create(&ProjectLabels { project: "gone".into() }).inc();
        assert!(metrics.encode().lines().filter(|line| line.contains("project=\"gone\"")).count() > 30);

        metrics.forget_project("gone", &["web".to_owned()]);
        let text = metrics.encode();
        let left: Vec<&str> = text.lines().filter(|line| line.contains("project=\"gone\"")).collect();
        assert!(left.is_empty(), "{left:#?}");
        assert!(text.contains("layer_cache_store_bytes{project=\"kept\"} 2"), "{text}");
    }
}
