//! Getting finished spans to the collector without ever holding a request
//! up: the span processor only offers each span to a bounded queue (a full
//! queue drops it, counted), and one task sends batches with the OTLP
//! exporter, one at a time, each within the export timeout (a failed batch
//! is dropped, counted, and the next waits one batch delay: a collector
//! that is down costs one export a delay, with the exporter's own few
//! retries, not one a batch).
//!
//! This replaces the SDK's batch processor, whose drops are only logged.

use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{mpsc, oneshot};

use super::{OtlpProtocol, QueueConfig, TraceConfig};
use crate::metrics::{SpanDrop, TraceMetrics};

/// The processor the tracer provider calls as spans end.
#[derive(Debug)]
pub struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
    metrics: TraceMetrics,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.metrics.dropped(SpanDrop::QueueFull, 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Flushing waits for the collector: see `ExportHandle::flush`.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Asks the export task to send everything queued.
#[derive(Clone)]
pub struct ExportHandle {
    flush: mpsc::Sender<oneshot::Sender<()>>,
}

impl ExportHandle {
    /// Sends what is queued now, waiting at most `within`.
    pub async fn flush(&self, within: Duration) {
        let (done, flushed) = oneshot::channel();
        if self.flush.try_send(done).is_ok() {
            let _ = tokio::time::timeout(within, flushed).await;
        }
    }
}

/// Builds the OTLP exporter for `endpoint` and starts the export task.
pub fn start(
    config: &TraceConfig,
    endpoint: &str,
    resource: &Resource,
    metrics: TraceMetrics,
) -> anyhow::Result<(QueueProcessor, ExportHandle)> {
    let timeout = config.queue.export_timeout;
    let mut exporter = match config.protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build()?,
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build()?,
    };
    exporter.set_resource(resource);
    let (queue, spans) = mpsc::channel(config.queue.max_spans);
    let (flush, flushes) = mpsc::channel(1);
    tokio::spawn(export_loop(exporter, spans, flushes, config.queue, metrics.clone()));
    Ok((QueueProcessor { queue, metrics }, ExportHandle { flush }))
}

/// Sends batches until every sender is gone.
async fn export_loop<E: SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
    queue: QueueConfig,
    metrics: TraceMetrics,
) {
    let mut sender = Sender { exporter, timeout: queue.export_timeout, metrics, failing: false };
    loop {
        let mut batch = Vec::new();
        // A flush is answered whatever the loop is waiting for: a first
        // span, a batch to fill, or the back-off after a failed export.
        let mut flush = tokio::select! {
            biased;
            Some(done) = flushes.recv() => Some(done),
            span = spans.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    None
                }
                None => return,
            },
        };
        let deadline = tokio::time::Instant::now() + queue.delay;
        while flush.is_none() && batch.len() < queue.max_batch {
            let room = queue.max_batch - batch.len();
            tokio::select! {
                biased;
                Some(done) = flushes.recv() => flush = Some(done),
                got = spans.recv_many(&mut batch, room) => if got == 0 { break },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Some(done) = flush {
            sender.drain(batch, &mut spans, queue.max_batch).await;
            let _ = done.send(());
            continue;
        }
        if !sender.send(batch).await {
            // The collector is down or refusing: wait a batch delay before
            // the next try; meanwhile the queue fills and drops, counted.
            tokio::select! {
                biased;
                Some(done) = flushes.recv() => {
                    sender.drain(Vec::new(), &mut spans, queue.max_batch).await;
                    let _ = done.send(());
                }
                () = tokio::time::sleep(queue.delay) => {}
            }
        }
    }
}

/// One exporter and what its exports came to.
struct Sender<E> {
    exporter: E,
    timeout: Duration,
    metrics: TraceMetrics,
    /// The last export failed (logged once until one succeeds).
    failing: bool,
}

impl<E: SpanExporter> Sender<E> {
    /// Exports `batch` and everything queued now (a flush).
    async fn drain(&mut self, batch: Vec<SpanData>, spans: &mut mpsc::Receiver<SpanData>, max_batch: usize) {
        if !batch.is_empty() {
            self.send(batch).await;
        }
        while !spans.is_empty() {
            let mut batch = Vec::with_capacity(max_batch.min(spans.len()));
            spans.recv_many(&mut batch, max_batch).await;
            self.send(batch).await;
        }
    }

    /// Exports `batch`; false when it was dropped.
    async fn send(&mut self, batch: Vec<SpanData>) -> bool {
        let spans = batch.len() as u64;
        let outcome = match tokio::time::timeout(self.timeout, self.exporter.export(batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        };
        match outcome {
            Ok(()) => {
                self.metrics.exported(spans);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("trace export works again");
                }
                true
            }
            Err(reason) => {
                self.metrics.dropped(SpanDrop::ExportFailed, spans);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(%reason, spans, "trace export failed; spans are dropped (counted in turnstile_trace_spans_dropped_total) until the collector answers");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::SystemTime;

    use opentelemetry::InstrumentationScope;
    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::error::OTelSdkError;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prometheus_client::registry::Registry;

    use super::*;

    fn span(n: u64) -> SpanData {
        let context = SpanContext::new(
            TraceId::from(u128::from(n) + 1),
            SpanId::from(n + 1),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        SpanData {
            span_context: context,
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "test".into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::default(),
        }
    }

    /// A collector: answers, refuses, or never answers.
    #[derive(Debug, Clone)]
    struct Collector {
        mode: Arc<Mutex<&'static str>>,
        batches: Arc<Mutex<Vec<usize>>>,
    }

    impl SpanExporter for Collector {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let mode = *self.mode.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match mode {
                "up" => {
                    self.batches.lock().map(|mut b| b.push(batch.len())).unwrap_or(());
                    Ok(())
                }
                "refusing" => Err(OTelSdkError::InternalFailure("connection refused".into())),
                _ => std::future::pending().await,
            }
        }
    }

    fn queue() -> QueueConfig {
        QueueConfig {
            max_spans: 8,
            max_batch: 3,
            delay: Duration::from_millis(100),
            export_timeout: Duration::from_secs(1),
        }
    }

    fn start_with(collector: &Collector, queue: QueueConfig) -> (QueueProcessor, ExportHandle, TraceMetrics) {
        let metrics = TraceMetrics::register(&mut Registry::default());
        let (tx, spans) = mpsc::channel(queue.max_spans);
        let (flush, flushes) = mpsc::channel(1);
        tokio::spawn(export_loop(collector.clone(), spans, flushes, queue, metrics.clone()));
        (QueueProcessor { queue: tx, metrics: metrics.clone() }, ExportHandle { flush }, metrics)
    }

    fn collector(mode: &'static str) -> Collector {
        Collector { mode: Arc::new(Mutex::new(mode)), batches: Arc::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn spans_go_out_in_bounded_batches_and_a_flush_sends_the_rest() {
        let up = collector("up");
        let (processor, handle, metrics) = start_with(&up, queue());
        for n in 0..7 {
            processor.on_end(span(n));
        }
        tokio::time::sleep(Duration::from_millis(350)).await;
        let batches = up.batches.lock().map(|b| b.clone()).unwrap_or_default();
        assert_eq!(batches.iter().sum::<usize>(), 7, "{batches:?}");
        assert!(batches.iter().all(|&b| b <= 3), "batches of at most OTEL_BSP_MAX_EXPORT_BATCH_SIZE: {batches:?}");
        assert_eq!(metrics.counts(), (7, 0, 0));

        // A span that has not waited its batch delay yet goes out on flush,
        // at once: the loop is already filling its batch when the flush comes.
        processor.on_end(span(99));
        tokio::task::yield_now().await;
        let began = tokio::time::Instant::now();
        handle.flush(Duration::from_secs(1)).await;
        assert_eq!(metrics.counts().0, 8);
        assert!(began.elapsed() < Duration::from_millis(50), "the flush did not wait for the batch delay");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_during_the_back_off_after_a_failure_sends_what_is_queued() {
        let flaky = collector("refusing");
        let (processor, handle, metrics) = start_with(&flaky, QueueConfig { delay: Duration::from_secs(5), ..queue() });
        for n in 0..3 {
            processor.on_end(span(n));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(metrics.counts().2, 3, "the first batch failed; the loop backs off for 5 s");
        *flaky.mode.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = "up";
        processor.on_end(span(7));
        let began = tokio::time::Instant::now();
        handle.flush(Duration::from_secs(1)).await;
        assert_eq!(metrics.counts().0, 1);
        assert!(began.elapsed() < Duration::from_millis(50), "the flush cut the back-off short");
    }

    #[tokio::test(start_paused = true)]
    async fn a_collector_that_is_down_costs_spans_not_waiting_and_is_counted() {
        let down = collector("hanging");
        let (processor, _handle, metrics) = start_with(&down, queue());
        // The request path never waits: past the queue's bound spans are dropped at once.
        for n in 0..40 {
            processor.on_end(span(n));
        }
        let (exported, queue_full, _) = metrics.counts();
        assert_eq!(exported, 0);
        assert!(queue_full >= 40 - 8 - 3, "the queue holds 8 and one batch is out: {queue_full}");
        // Each batch held by the silent collector is dropped after the export timeout.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (_, queue_full, failed) = metrics.counts();
        assert_eq!(queue_full + failed, 40, "every span is exported or counted: {:?}", metrics.counts());

        // Back up: new spans go out again.
        *down.mode.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = "up";
        processor.on_end(span(1000));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(metrics.counts().0, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusing_collector_is_tried_once_a_delay_not_once_a_batch() {
        let refusing = collector("refusing");
        let (processor, _handle, metrics) = start_with(&refusing, queue());
        for n in 0..6 {
            processor.on_end(span(n));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(metrics.counts().2, 3, "one batch failed, the next waits a batch delay (100 ms)");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(metrics.counts().2, 6);
    }
}
