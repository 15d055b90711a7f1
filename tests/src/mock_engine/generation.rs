//! One request's life on the simulated engine: queue for a running slot, prefill (time to
//! first token), then one token per inter-token delay, feeding the load model and the
//! metrics as it goes.
//!
//! It is a poll-driven state machine rather than an `async fn` so a streaming body can
//! drive it directly, emitting each token the moment it is due, with no task or channel
//! per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::load::{LoadModel, RunningSlot};
use super::metrics::EngineMetrics;

/// How long a request takes once it runs: the time to first token grows with the batch it
/// joins (and, decided before it runs, with the prompt tokens it must compute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTiming {
    /// From the start of running to the first token, in an otherwise empty batch.
    pub ttft: Duration,
    /// Between two tokens.
    pub itl: Duration,
    /// Added to the time to first token per other request running when this one starts.
    pub per_running: Duration,
}

impl TokenTiming {
    /// When the first token is due for a request starting to run now, `running` requests
    /// (itself included) in the batch.
    fn first_token_due(&self, running: u64) -> Instant {
        let others = u32::try_from(running.saturating_sub(1)).unwrap_or(u32::MAX);
        Instant::now() + self.ttft + self.per_running.saturating_mul(others)
    }
}

type Admission = Pin<Box<dyn Future<Output = RunningSlot> + Send>>;

enum Phase {
    Queued(Admission),
    Running { slot: RunningSlot, first_token_due: Instant },
    Finished,
}

/// A request being generated. Dropping it early (client gone, fault) frees its slot.
pub struct Generation {
    load: Arc<LoadModel>,
    metrics: Arc<EngineMetrics>,
    timing: TokenTiming,
    arrival: Instant,
    prompt_tokens: u64,
    completion_tokens: u32,
    produced: u32,
    last_token_at: Instant,
    phase: Phase,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Generation {
    /// Queues a request that arrived at `arrival` for `completion_tokens` tokens (0 for a
    /// request that only runs prefill, like embeddings).
    pub fn start(
        load: &Arc<LoadModel>,
        metrics: Arc<EngineMetrics>,
        timing: TokenTiming,
        arrival: Instant,
        prompt_tokens: u64,
        completion_tokens: u32,
    ) -> Self {
        let phase = match load.try_admit(prompt_tokens) {
            Some(slot) => Phase::Running { slot, first_token_due: timing.first_token_due(load.snapshot().running) },
            None => Phase::Queued(Box::pin(load.admit(prompt_tokens))),
        };
        Self {
            load: Arc::clone(load),
            metrics,
            timing,
            arrival,
            prompt_tokens,
            completion_tokens,
            produced: 0,
            last_token_at: arrival,
            phase,
            sleep: None,
        }
    }

    /// Prompt tokens of this request.
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens
    }

    /// Tokens this request generates.
    pub fn completion_tokens(&self) -> u32 {
        self.completion_tokens
    }

    /// The index of the next token once it is due, or `None` when the request has finished.
    /// The running slot is given back with the last token, before the caller sends it.
    pub fn poll_next_token(&mut self, cx: &mut Context<'_>) -> Poll<Option<u32>> {
        loop {
            let first_token_due = match &mut self.phase {
                Phase::Finished => return Poll::Ready(None),
                Phase::Queued(admission) => {
                    let slot = ready!(admission.as_mut().poll(cx));
                    let first_token_due = self.timing.first_token_due(self.load.snapshot().running);
                    self.phase = Phase::Running { slot, first_token_due };
                    continue;
                }
                Phase::Running { first_token_due, .. } => *first_token_due,
            };
            let due = first_token_due + self.timing.itl.saturating_mul(self.produced);
            ready!(self.poll_until(cx, due));
            return Poll::Ready(self.advance());
        }
    }

    /// Drives the request to its end, for non-streaming answers.
    pub async fn run_to_end(&mut self) {
        while std::future::poll_fn(|cx| self.poll_next_token(cx)).await.is_some() {}
    }

    fn poll_until(&mut self, cx: &mut Context<'_>, due: Instant) -> Poll<()> {
        if Instant::now() >= due {
            return Poll::Ready(());
        }
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if sleep.deadline() != due {
            sleep.as_mut().reset(due);
        }
        sleep.as_mut().poll(cx)
    }

    /// The due token (or, without tokens, the prefill) is done: account it.
    fn advance(&mut self) -> Option<u32> {
        let now = Instant::now();
        if self.completion_tokens == 0 {
            self.metrics.prompt_processed(self.prompt_tokens);
            self.finish(now);
            return None;
        }
        let index = self.produced;
        if index == 0 {
            self.metrics.prefill_done(self.prompt_tokens, now - self.arrival);
        } else {
            self.metrics.inter_token(now - self.last_token_at);
        }
        self.metrics.token_generated();
        if let Phase::Running { slot, .. } = &mut self.phase {
            slot.add_generated(1);
        }
        self.produced += 1;
        self.last_token_at = now;
        if self.produced >= self.completion_tokens {
            self.finish(now);
        }
        Some(index)
    }

    fn finish(&mut self, now: Instant) {
        self.metrics.request_succeeded(now - self.arrival);
        // Drops the running slot: the engine is done with this request even if the client
        // is still reading.
        self.phase = Phase::Finished;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(ttft_ms: u64, itl_ms: u64) -> TokenTiming {
        TokenTiming {
            ttft: Duration::from_millis(ttft_ms),
            itl: Duration::from_millis(itl_ms),
            per_running: Duration::ZERO,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_busier_batch_delays_the_first_token() {
        let load = Arc::new(LoadModel::new(4, 100));
        let metrics = Arc::new(EngineMetrics::default());
        let timing = TokenTiming { per_running: Duration::from_millis(5), ..timing(10, 1) };
        let start = Instant::now();
        let mut first = Generation::start(&load, Arc::clone(&metrics), timing, start, 1, 1);
        let mut second = Generation::start(&load, Arc::clone(&metrics), timing, start, 1, 1);
        let mut third = Generation::start(&load, Arc::clone(&metrics), timing, start, 1, 1);
        first.run_to_end().await;
        assert_eq!(start.elapsed(), Duration::from_millis(10), "alone in the batch");
        second.run_to_end().await;
        assert_eq!(start.elapsed(), Duration::from_millis(15), "one other running");
        third.run_to_end().await;
        assert_eq!(start.elapsed(), Duration::from_millis(20), "two others running");
    }

    fn metric(metrics: &EngineMetrics, series: &str) -> String {
        let load = super::super::load::LoadSnapshot { running: 0, waiting: 0, kv_usage: 0.0 };
        let lora = super::super::lora::LoraSnapshot::idle();
        let text = metrics.render("m", load, super::super::sleep::SleepState::Awake, &lora);
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')).unwrap().to_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_come_at_ttft_then_every_itl() {
        let load = Arc::new(LoadModel::new(4, 100));
        let metrics = Arc::new(EngineMetrics::default());
        let start = Instant::now();
        let mut generation = Generation::start(&load, Arc::clone(&metrics), timing(100, 10), start, 5, 3);
        assert_eq!(load.snapshot().running, 1);

        let mut at = Vec::new();
        while let Some(index) = std::future::poll_fn(|cx| generation.poll_next_token(cx)).await {
            at.push((index, start.elapsed().as_millis()));
            if index == 1 {
                assert!((load.snapshot().kv_usage - 0.07).abs() < 1e-9, "prompt + 2 tokens");
            }
        }
        assert_eq!(at, [(0, 100), (1, 110), (2, 120)]);
        assert_eq!(load.snapshot().running, 0);
        assert_eq!(metric(&metrics, r#"vllm:generation_tokens_total{model_name="m"}"#), "3");
        assert_eq!(metric(&metrics, r#"vllm:prompt_tokens_total{model_name="m"}"#), "5");
        assert_eq!(metric(&metrics, r#"vllm:time_per_output_token_seconds_count{model_name="m"}"#), "2");
        assert_eq!(metric(&metrics, r#"vllm:e2e_request_latency_seconds_sum{model_name="m"}"#), "0.12");
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_runs_when_a_slot_frees() {
        let load = Arc::new(LoadModel::new(1, 100));
        let metrics = Arc::new(EngineMetrics::default());
        let start = Instant::now();
        let mut first = Generation::start(&load, Arc::clone(&metrics), timing(50, 0), start, 1, 1);
        let mut second = Generation::start(&load, Arc::clone(&metrics), timing(50, 0), start, 1, 1);
        assert_eq!((load.snapshot().running, load.snapshot().waiting), (1, 1));

        first.run_to_end().await;
        second.run_to_end().await;
        assert_eq!(start.elapsed(), Duration::from_millis(100), "second waited for the first");
        // TTFT counts the queueing, as vLLM's does.
        assert_eq!(metric(&metrics, r#"vllm:time_to_first_token_seconds_sum{model_name="m"}"#), "0.15");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_mid_way_frees_the_slot_without_success() {
        let load = Arc::new(LoadModel::new(1, 100));
        let metrics = Arc::new(EngineMetrics::default());
        let mut generation = Generation::start(&load, Arc::clone(&metrics), timing(0, 10), Instant::now(), 1, 5);
        let first = std::future::poll_fn(|cx| generation.poll_next_token(cx)).await;
        assert_eq!(first, Some(0));
        drop(generation);
        assert_eq!(load.snapshot().running, 0);
        assert_eq!(load.snapshot().kv_usage, 0.0);
        assert_eq!(metric(&metrics, r#"vllm:request_success_total{model_name="m",finished_reason="length"}"#), "0");
    }

    #[tokio::test(start_paused = true)]
    async fn prefill_only_request_waits_ttft_and_yields_no_token() {
        let load = Arc::new(LoadModel::new(1, 100));
        let metrics = Arc::new(EngineMetrics::default());
        let start = Instant::now();
        let mut generation = Generation::start(&load, Arc::clone(&metrics), timing(20, 5), start, 4, 0);
        assert_eq!(std::future::poll_fn(|cx| generation.poll_next_token(cx)).await, None);
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert_eq!(metric(&metrics, r#"vllm:prompt_tokens_total{model_name="m"}"#), "4");
        assert_eq!(load.snapshot().running, 0);
    }
}
