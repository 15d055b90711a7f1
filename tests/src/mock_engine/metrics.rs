//! vLLM's Prometheus series, rendered by hand in the text exposition format.
//!
//! Only the families the gateway scrapes are exported, with vLLM's names, units and
//! buckets, so the gateway's scraper sees what it would see from a real engine.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::load::LoadSnapshot;
use super::lora::LoraSnapshot;
use super::sleep::SleepState;

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];

/// vLLM's `vllm:time_per_output_token_seconds` buckets.
const TPOT_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];

/// vLLM's request latency buckets.
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

/// Counters and histograms observed from the engine's real request timings.
#[derive(Debug)]
pub struct EngineMetrics {
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    request_success: AtomicU64,
    prefix_cache_queries: AtomicU64,
    prefix_cache_hits: AtomicU64,
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
    e2e_request_latency: Histogram,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            request_success: AtomicU64::new(0),
            prefix_cache_queries: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            time_per_output_token: Histogram::new(TPOT_BUCKETS),
            e2e_request_latency: Histogram::new(E2E_BUCKETS),
        }
    }
}

impl EngineMetrics {
    /// A request's prefill finished after `since_arrival` (queueing included, as in vLLM).
    pub fn prefill_done(&self, prompt_tokens: u64, since_arrival: Duration) {
        self.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        self.time_to_first_token.observe(since_arrival);
    }

    /// Prompt tokens of a request that produced no token (embeddings), counted without a
    /// time to first token.
    pub fn prompt_processed(&self, prompt_tokens: u64) {
        self.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
    }

    /// A prompt of `queried` tokens was looked up in the prefix cache, `hits` of them found.
    pub fn prefix_cache_lookup(&self, queried: u64, hits: u64) {
        self.prefix_cache_queries.fetch_add(queried, Ordering::Relaxed);
        self.prefix_cache_hits.fetch_add(hits, Ordering::Relaxed);
    }

    /// One token was generated.
    pub fn token_generated(&self) {
        self.generation_tokens.fetch_add(1, Ordering::Relaxed);
    }

    /// One token after the first was generated, `since_previous` after the one before.
    pub fn inter_token(&self, since_previous: Duration) {
        self.time_per_output_token.observe(since_previous);
    }

    /// A request finished successfully after `since_arrival`.
    pub fn request_succeeded(&self, since_arrival: Duration) {
        self.request_success.fetch_add(1, Ordering::Relaxed);
        self.e2e_request_latency.observe(since_arrival);
    }

    /// The Prometheus text exposition of these metrics, `load`, the `sleep` state and the
    /// `lora` adapters running, labelled with `model`.
    pub fn render(&self, model: &str, load: LoadSnapshot, sleep: SleepState, lora: &LoraSnapshot) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = self.write(&mut out, &escape_label_value(model), load, sleep, lora);
        out
    }

    fn write(
        &self,
        out: &mut String,
        model: &str,
        load: LoadSnapshot,
        sleep: SleepState,
        lora: &LoraSnapshot,
    ) -> fmt::Result {
        let labels = format!("model_name=\"{model}\"");
        let LoadSnapshot { running, waiting, kv_usage } = load;
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}")
        };

        family(out, "vllm:num_requests_running", "gauge", "Number of requests in model execution batches.")?;
        writeln!(out, "vllm:num_requests_running{{{labels}}} {running}")?;
        family(out, "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")?;
        writeln!(out, "vllm:num_requests_waiting{{{labels}}} {waiting}")?;
        family(out, "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")?;
        writeln!(out, "vllm:kv_cache_usage_perc{{{labels}}} {kv_usage:?}")?;
        // Older engines export the same value under this name; the gateway falls back to it.
        family(out, "vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage. 1 means 100 percent usage.")?;
        writeln!(out, "vllm:gpu_cache_usage_perc{{{labels}}} {kv_usage:?}")?;
        // One sample per state, 1 for the current one. vLLM labels this family with its
        // engine index too, and prometheus_client writes labels sorted by name.
        let name = "vllm:engine_sleep_state";
        family(
            out,
            name,
            "gauge",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; \
             weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
        )?;
        for state in SleepState::ALL {
            let value = if state == sleep { 1.0_f64 } else { 0.0 };
            let label = state.label();
            writeln!(out, "{name}{{engine=\"0\",{labels},sleep_state=\"{label}\"}} {value:?}")?;
        }
        // vLLM's one sample is the time of its last update, labelled with the adapters of
        // the running and waiting requests (comma-joined); no model_name label.
        let name = "vllm:lora_requests_info";
        family(out, name, "gauge", "Running stats on lora requests.")?;
        let LoraSnapshot { max_loras, running, at } = lora;
        let running = escape_label_value(&running.join(","));
        writeln!(
            out,
            "{name}{{max_lora=\"{max_loras}\",running_lora_adapters=\"{running}\",waiting_lora_adapters=\"\"}} {at:?}"
        )?;

        let counters = [
            ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", &self.prompt_tokens, ""),
            ("vllm:generation_tokens_total", "Number of generation tokens processed.", &self.generation_tokens, ""),
            (
                "vllm:request_success_total",
                "Count of successfully processed requests.",
                &self.request_success,
                ",finished_reason=\"length\"",
            ),
            (
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                &self.prefix_cache_queries,
                "",
            ),
            (
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                &self.prefix_cache_hits,
                "",
            ),
        ];
        for (name, help, counter, extra_labels) in counters {
            family(out, name, "counter", help)?;
            let value = counter.load(Ordering::Relaxed);
            writeln!(out, "{name}{{{labels}{extra_labels}}} {value}")?;
        }

        let histograms = [
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &self.time_to_first_token,
            ),
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of end to end request latency in seconds.",
                &self.e2e_request_latency,
            ),
            (
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds.",
                &self.time_per_output_token,
            ),
        ];
        for (name, help, histogram) in histograms {
            family(out, name, "histogram", help)?;
            histogram.write(out, name, &labels)?;
        }
        Ok(())
    }
}

/// A fixed-bucket histogram updated with relaxed atomics: a scrape may see a sample in
/// `_count` a moment before `_sum`, which Prometheus tolerates.
#[derive(Debug)]
struct Histogram {
    upper_bounds: &'static [f64],
    /// Per-bucket (not cumulative) counts; the last entry is the `+Inf` overflow.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(upper_bounds: &'static [f64]) -> Self {
        Self {
            upper_bounds,
            counts: (0..=upper_bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = self.upper_bounds.partition_point(|bound| *bound < seconds);
        if let Some(count) = self.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) -> fmt::Result {
        let mut cumulative = 0;
        for (index, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            match self.upper_bounds.get(index) {
                Some(bound) => writeln!(out, "{name}_bucket{{{labels},le=\"{bound:?}\"}} {cumulative}")?,
                None => writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}")?,
            }
        }
        let sum = Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        writeln!(out, "{name}_sum{{{labels}}} {sum:?}")?;
        writeln!(out, "{name}_count{{{labels}}} {cumulative}")
    }
}

/// Escapes a label value as the text format requires.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            _ => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle() -> LoadSnapshot {
        LoadSnapshot { running: 0, waiting: 0, kv_usage: 0.0 }
    }

    /// The value of the sample line starting with `series` followed by a space.
    fn sample(text: &str, series: &str) -> String {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .to_owned()
    }

    #[test]
    fn renders_load_state() {
        let load = LoadSnapshot { running: 3, waiting: 2, kv_usage: 0.25 };
        let text = EngineMetrics::default().render("m", load, SleepState::Awake, &LoraSnapshot::idle());
        assert_eq!(sample(&text, r#"vllm:num_requests_running{model_name="m"}"#), "3");
        assert_eq!(sample(&text, r#"vllm:num_requests_waiting{model_name="m"}"#), "2");
        assert_eq!(sample(&text, r#"vllm:kv_cache_usage_perc{model_name="m"}"#), "0.25");
        assert_eq!(sample(&text, r#"vllm:gpu_cache_usage_perc{model_name="m"}"#), "0.25");
        for family in [
            "# TYPE vllm:num_requests_running gauge",
            "# TYPE vllm:prompt_tokens_total counter",
            "# TYPE vllm:time_to_first_token_seconds histogram",
        ] {
            assert!(text.lines().any(|line| line == family), "{family}");
        }
    }

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let metrics = EngineMetrics::default();
        metrics.prefill_done(7, Duration::from_millis(30));
        metrics.prefill_done(3, Duration::from_secs(5000));
        metrics.token_generated();
        metrics.token_generated();
        metrics.request_succeeded(Duration::from_millis(400));
        metrics.prefix_cache_lookup(12, 8);
        let text = metrics.render("m", idle(), SleepState::Awake, &LoraSnapshot::idle());
        assert_eq!(sample(&text, r#"vllm:prefix_cache_queries_total{model_name="m"}"#), "12");
        assert_eq!(sample(&text, r#"vllm:prefix_cache_hits_total{model_name="m"}"#), "8");

        let labels = r#"{model_name="m"}"#;
        assert_eq!(sample(&text, &format!("vllm:prompt_tokens_total{labels}")), "10");
        assert_eq!(sample(&text, &format!("vllm:generation_tokens_total{labels}")), "2");
        assert_eq!(sample(&text, r#"vllm:request_success_total{model_name="m",finished_reason="length"}"#), "1");
        let ttft = "vllm:time_to_first_token_seconds";
        assert_eq!(sample(&text, &format!(r#"{ttft}_bucket{{model_name="m",le="0.02"}}"#)), "0");
        assert_eq!(sample(&text, &format!(r#"{ttft}_bucket{{model_name="m",le="0.04"}}"#)), "1");
        assert_eq!(sample(&text, &format!(r#"{ttft}_bucket{{model_name="m",le="2560.0"}}"#)), "1");
        assert_eq!(sample(&text, &format!(r#"{ttft}_bucket{{model_name="m",le="+Inf"}}"#)), "2");
        assert_eq!(sample(&text, &format!("{ttft}_count{labels}")), "2");
        assert_eq!(sample(&text, &format!("{ttft}_sum{labels}")), "5000.03");
        let e2e = "vllm:e2e_request_latency_seconds";
        assert_eq!(sample(&text, &format!(r#"{e2e}_bucket{{model_name="m",le="0.3"}}"#)), "0");
        assert_eq!(sample(&text, &format!(r#"{e2e}_bucket{{model_name="m",le="0.5"}}"#)), "1");
    }

    #[test]
    fn renders_one_sleep_state_sample_per_state() {
        let text = EngineMetrics::default().render("m", idle(), SleepState::Awake, &LoraSnapshot::idle());
        let family: Vec<&str> = text.lines().filter(|line| line.contains("vllm:engine_sleep_state")).collect();
        assert_eq!(
            family,
            [
                "# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is sleeping; \
                 awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; \
                 discard_all = 1 means sleep level 2.",
                "# TYPE vllm:engine_sleep_state gauge",
                r#"vllm:engine_sleep_state{engine="0",model_name="m",sleep_state="awake"} 1.0"#,
                r#"vllm:engine_sleep_state{engine="0",model_name="m",sleep_state="weights_offloaded"} 0.0"#,
                r#"vllm:engine_sleep_state{engine="0",model_name="m",sleep_state="discard_all"} 0.0"#,
            ]
        );
        for state in [SleepState::WeightsOffloaded, SleepState::DiscardAll] {
            let text = EngineMetrics::default().render("m", idle(), state, &LoraSnapshot::idle());
            for other in SleepState::ALL {
                let series =
                    format!(r#"vllm:engine_sleep_state{{engine="0",model_name="m",sleep_state="{}"}}"#, other.label());
                let expected = if other == state { "1.0" } else { "0.0" };
                assert_eq!(sample(&text, &series), expected, "{state:?}: {series}");
            }
        }
    }

    #[test]
    fn renders_the_running_lora_adapters_with_the_time() {
        let text = EngineMetrics::default().render("m", idle(), SleepState::Awake, &LoraSnapshot::idle());
        let family: Vec<&str> = text.lines().filter(|line| line.contains("vllm:lora_requests_info")).collect();
        assert_eq!(
            family,
            [
                "# HELP vllm:lora_requests_info Running stats on lora requests.",
                "# TYPE vllm:lora_requests_info gauge",
                r#"vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 0.0"#,
            ]
        );
        let lora = LoraSnapshot { max_loras: 0, running: vec!["a".to_owned(), "b\"c".to_owned()], at: 1712345678.25 };
        let text = EngineMetrics::default().render("m", idle(), SleepState::Awake, &lora);
        assert_eq!(
            sample(
                &text,
                r#"vllm:lora_requests_info{max_lora="0",running_lora_adapters="a,b\"c",waiting_lora_adapters=""}"#
            ),
            "1712345678.25"
        );
    }

    #[test]
    fn bucket_bounds_are_inclusive() {
        let histogram = Histogram::new(&[0.5, 1.0]);
        histogram.observe(Duration::from_millis(500));
        let mut out = String::new();
        histogram.write(&mut out, "h", "a=\"b\"").unwrap();
        assert!(out.contains("h_bucket{a=\"b\",le=\"0.5\"} 1\n"), "{out}");
    }

    #[test]
    fn escapes_model_label() {
        let text = EngineMetrics::default().render("a\"b\\c", idle(), SleepState::Awake, &LoraSnapshot::idle());
        assert!(text.contains(r#"vllm:num_requests_running{model_name="a\"b\\c"} 0"#));
    }
}
