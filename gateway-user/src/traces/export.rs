//! Getting finished spans to the collector without ever holding a request
//! up: the span processor only offers each span to a bounded queue (a full
//! queue drops it, counted), and one task sends batches with the OTLP
//! exporter, one at a time, each within the export timeout (a failed batch
//! is dropped, counted, and the next waits one batch delay: a collector
//! that is down costs a failed connect per delay, not one per batch).
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
        let first = tokio::select! {
            biased;
            Some(done) = flushes.recv() => {
                while !spans.is_empty() {
                    let mut batch = Vec::with_capacity(queue.max_batch.min(spans.len()));
                    spans.recv_many(&mut batch, queue.max_batch).await;
                    sender.send(batch).await;
                }
                let _ = done.send(());
                continue;
            }
            span = spans.recv() => match span {
                Some(span) => span,
                None => return,
            },
        };
        let mut batch = Vec::with_capacity(queue.max_batch.min(spans.len() + 1));
        batch.push(first);
        let deadline = tokio::time::Instant::now() + queue.delay;
        while batch.len() < queue.max_batch {
            let room = queue.max_batch - batch.len();
            tokio::select! {
                got = spans.recv_many(&mut batch, room) => if got == 0 { break },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !sender.send(batch).await {
            // The collector is down or refusing: wait a batch delay before
            // the next try; meanwhile the queue fills and drops, counted.
            tokio::time::sleep(queue.delay).await;
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
