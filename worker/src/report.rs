//! Formatting shared by save and restore: sizes, and the per-layer metrics report.

use proto::v1 as pb;

use crate::coordinator::Coordinator;

pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// Sends the per-layer figures of one save or restore. A cache never breaks a build: a failed
/// report is logged, not raised.
pub async fn send_metrics(coordinator: &mut Coordinator, report: pb::ReportMetricsRequest) {
    if let Err(status) = coordinator.client.report_metrics(report).await {
        tracing::warn!(error = %status.message(), "reporting metrics to the coordinator failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_a_person_wrote_them() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
