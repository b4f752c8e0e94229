//! Progress of transfers: on a terminal, a bar per transfer (indicatif) on stderr; elsewhere (a
//! CI log) nothing until the command's one-line summary.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where the bars of one command go.
#[derive(Clone)]
pub struct Progress(Option<MultiProgress>);

impl Progress {
    /// Bars when stderr is a terminal, none otherwise.
    pub fn for_stderr() -> Progress {
        Progress(std::io::stderr().is_terminal().then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())))
    }

    /// A bar for one transfer of `total` bytes.
    pub fn bar(&self, label: &str, total: u64) -> Bar {
        let Some(multi) = &self.0 else { return Bar(None) };
        let style =
            ProgressStyle::with_template("{msg:<24} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}")
                .expect("a valid template")
                .progress_chars("=> ");
        let bar = multi.add(ProgressBar::new(total).with_style(style).with_message(label.to_owned()));
        Bar(Some(bar))
    }
}

/// One transfer's bar; does nothing when there are no bars.
#[derive(Clone)]
pub struct Bar(Option<ProgressBar>);

impl Bar {
    pub fn none() -> Bar {
        Bar(None)
    }

    pub fn add(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish();
        }
    }
}

/// Throughput for the summary lines: "123.4 MB/s".
pub fn rate(bytes: u64, seconds: f64) -> String {
    format!("{:.1} MB/s", bytes as f64 / 1e6 / seconds.max(0.001))
}

/// "layer 0123456789ab" for a progress bar.
pub(crate) fn short_digest(digest: &str) -> String {
    format!("layer {}", proto::digest::digest_hex(digest).get(..12).unwrap_or(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_bars_do_nothing_and_rates_read_in_megabytes() {
        let bar = Progress(None).bar("layer", 10);
        bar.add(5);
        bar.finish();
        assert_eq!(rate(250_000_000, 2.0), "125.0 MB/s");
        assert_eq!(rate(1, 0.0), "0.0 MB/s");
    }
}
