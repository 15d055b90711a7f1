//! The log's own series: lines written, lines dropped because the log could
//! not keep up, and bytes waiting to be written. Read at scrape time from
//! whatever `cli` wired in (the log sink); nothing is counted here.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// What the log has done since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogLines {
    pub written: u64,
    pub dropped: u64,
    pub pending_bytes: u64,
}

/// Reads the log's counts when `/metrics` is scraped.
#[derive(Debug)]
pub struct LogCollector(pub fn() -> LogLines);

impl Collector for LogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let lines = (self.0)();
        ConstCounter::new(lines.written).encode(encoder.encode_descriptor(
            "turnstile_log_lines_written",
            "Log lines written to stderr",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(lines.dropped).encode(encoder.encode_descriptor(
            "turnstile_log_lines_dropped",
            "Log lines dropped because the log buffer was full (stderr slower than the gateway) or stderr \
             refused them; requests are never held for the log",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(lines.pending_bytes as i64).encode(encoder.encode_descriptor(
            "turnstile_log_pending_bytes",
            "Bytes of log lines taken and not yet written",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}
