//! One engine `/metrics` answer (Prometheus text format) reduced to the
//! signals routing uses.
//!
//! The text is parsed by the `prom_text_format_parser` crate, which follows the
//! exposition format's grammar (names with colons, escaped label values,
//! `+Inf`/`NaN`) rather than a hand-rolled split. The better known
//! `prometheus-parse` matches metric names with `\w+`, so it silently drops
//! every series whose name has a colon: all of vLLM's and SGLang's.
//!
//! An engine may export one series per label set (vLLM labels by model and,
//! with data parallelism, by engine rank): counts and counters are summed,
//! cache usage takes the fullest rank.

use std::collections::HashMap;

use prom_text_format_parser::{Metric, Type, ValueType};

use super::names::EngineNames;

/// The running sum and count of a histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HistogramTotals {
    pub sum: f64,
    pub count: f64,
}

/// The signals of one scrape; `None` where the engine exports no such series.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scraped {
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_cache_usage: Option<f64>,
    pub gpu_cache_usage: Option<f64>,
    pub time_to_first_token: Option<HistogramTotals>,
    pub time_per_output_token: Option<HistogramTotals>,
    pub e2e_latency: Option<HistogramTotals>,
    pub queue_time: Option<HistogramTotals>,
    pub prompt_tokens: Option<f64>,
    pub generation_tokens: Option<f64>,
    pub prefix_cache_queries: Option<f64>,
    pub prefix_cache_hits: Option<f64>,
}

/// Why a scrape body gave nothing usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not in the Prometheus text format: {0}")]
    Syntax(String),
}

/// Reduces a `/metrics` body to [`Scraped`], reading the series `names` lists.
///
/// A family that does not assemble (a HELP or TYPE line without samples, as
/// Python clients print for a labelled metric never observed) is skipped; only
/// a body with no usable family at all is an error.
pub fn parse(text: &str, names: &EngineNames) -> Result<Scraped, ParseError> {
    let (metrics, error) = prom_text_format_parser::parse_scrape(text);
    if metrics.is_empty() {
        let reason = error.map(|e| format!("{e:?}")).unwrap_or_else(|| "no metrics".to_owned());
        // Keep the log line short: the parser's message can quote the whole body.
        return Err(ParseError::Syntax(reason.chars().take(200).collect()));
    }
    let by_name: HashMap<&str, &Metric> = metrics.iter().map(|m| (m.name.as_str(), m)).collect();
    let family = |candidates: &[&str]| candidates.iter().find_map(|name| by_name.get(name).copied());
    Ok(Scraped {
        running: family(names.running).and_then(|m| fold(m, Fold::Sum)),
        waiting: family(names.waiting).and_then(|m| fold(m, Fold::Sum)),
        kv_cache_usage: family(names.kv_cache_usage).and_then(|m| fold(m, Fold::Max)),
        gpu_cache_usage: family(names.gpu_cache_usage).and_then(|m| fold(m, Fold::Max)),
        time_to_first_token: histogram(&by_name, names.time_to_first_token),
        time_per_output_token: histogram(&by_name, names.time_per_output_token),
        e2e_latency: histogram(&by_name, names.e2e_latency),
        queue_time: histogram(&by_name, names.queue_time),
        prompt_tokens: family(names.prompt_tokens).and_then(|m| fold(m, Fold::Sum)),
        generation_tokens: family(names.generation_tokens).and_then(|m| fold(m, Fold::Sum)),
        prefix_cache_queries: family(names.prefix_cache_queries).and_then(|m| fold(m, Fold::Sum)),
        prefix_cache_hits: family(names.prefix_cache_hits).and_then(|m| fold(m, Fold::Sum)),
    })
}

#[derive(Clone, Copy)]
enum Fold {
    Sum,
    Max,
}

fn value(sample: &prom_text_format_parser::Sample) -> Option<f64> {
    // The crate keeps the text; its own `as_f64` unwraps, this does not.
    sample.value.value.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Sums (or takes the largest of) the plain samples of a gauge or counter.
fn fold(metric: &Metric, how: Fold) -> Option<f64> {
    let mut values = metric.samples.iter().filter(|s| s.value.value_type == ValueType::Sample).filter_map(value);
    let first = values.next()?;
    Some(values.fold(first, |acc, v| match how {
        Fold::Sum => acc + v,
        Fold::Max => acc.max(v),
    }))
}

/// `_sum` and `_count` of the first histogram of `candidates` found, whether
/// typed (one family) or untyped (separate `_sum` and `_count` families).
fn histogram(by_name: &HashMap<&str, &Metric>, candidates: &[&str]) -> Option<HistogramTotals> {
    candidates.iter().find_map(|name| {
        if let Some(metric) = by_name.get(name).filter(|m| m.kind == Type::Histogram) {
            let total = |kind: ValueType| -> Option<f64> {
                let mut found = false;
                let sum = metric
                    .samples
                    .iter()
                    .filter(|s| s.value.value_type == kind)
                    .filter_map(value)
                    .inspect(|_| found = true)
                    .sum();
                found.then_some(sum)
            };
            return Some(HistogramTotals { sum: total(ValueType::Sum)?, count: total(ValueType::Count)? });
        }
        let sum = by_name.get(format!("{name}_sum").as_str()).and_then(|m| fold(m, Fold::Sum))?;
        let count = by_name.get(format!("{name}_count").as_str()).and_then(|m| fold(m, Fold::Sum))?;
        Some(HistogramTotals { sum, count })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_metrics::names;

    /// What a vLLM v1 engine prints, trimmed: two data-parallel ranks, a
    /// labelled family without samples yet, the `_created` gauges Python adds.
    const VLLM: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 1.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.5
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="llama"} 100.0
vllm:prompt_tokens_total{engine="1",model_name="llama"} 50.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="llama"} 1.7e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.001",model_name="llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="llama"} 1.0
vllm:time_to_first_token_seconds_count{engine="1",model_name="llama"} 1.0
vllm:time_to_first_token_seconds_sum{engine="1",model_name="llama"} 0.5
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="llama \"q\", x"} 80.0
"#;

    #[test]
    fn reads_vllm_series_summed_over_label_sets() {
        let scraped = parse(VLLM, names::for_engine("vllm")).expect("parses");
        assert_eq!(scraped.running, Some(5.0));
        assert_eq!(scraped.waiting, Some(1.0));
        assert_eq!(scraped.kv_cache_usage, Some(0.5), "the fullest rank");
        assert_eq!(scraped.gpu_cache_usage, Some(0.5), "v1 name stands in for the v0 one");
        assert_eq!(scraped.prompt_tokens, Some(150.0));
        assert_eq!(scraped.time_to_first_token, Some(HistogramTotals { sum: 2.5, count: 5.0 }));
        assert_eq!(scraped.prefix_cache_queries, Some(80.0), "escaped label values parse");
        assert_eq!(scraped.generation_tokens, None, "not exported");
        assert_eq!(scraped.time_per_output_token, None);
    }

    #[test]
    fn reads_sglang_names_and_untyped_histograms() {
        let text = "sglang:num_running_reqs{model_name=\"m\"} 7\nsglang:num_queue_reqs{model_name=\"m\"} 2\n\
                    sglang:token_usage{model_name=\"m\"} 0.75\n\
                    sglang:time_to_first_token_seconds_sum{model_name=\"m\"} 3\n\
                    sglang:time_to_first_token_seconds_count{model_name=\"m\"} 6\n";
        let scraped = parse(text, names::for_engine("sglang")).expect("parses");
        assert_eq!(scraped.running, Some(7.0));
        assert_eq!(scraped.waiting, Some(2.0));
        assert_eq!(scraped.kv_cache_usage, Some(0.75));
        assert_eq!(scraped.time_to_first_token, Some(HistogramTotals { sum: 3.0, count: 6.0 }));
        // The same text read as vLLM has none of its series.
        assert_eq!(parse(text, names::for_engine("vllm")).expect("parses").running, None);
    }

    /// The benchmark's pages: what a vLLM 0.34 pod serves whole, and for the
    /// gateway's `name[]` query.
    const FULL_PAGE: &str = include_str!("../../benches/fixtures/vllm-metrics.prom");
    const FILTERED_PAGE: &str = include_str!("../../benches/fixtures/vllm-metrics-filtered.prom");

    /// `page` as prometheus_client renders it for `query`: only the samples
    /// named, with the HELP and TYPE lines of each family that keeps one.
    fn restricted(page: &str, query: &str) -> String {
        let named: Vec<String> = query
            .split('&')
            .filter_map(|pair| pair.strip_prefix("name%5B%5D="))
            .map(|n| n.replace("%3A", ":"))
            .collect();
        let lines: Vec<&str> = page.split_inclusive('\n').collect();
        let mut kept = String::new();
        for family in lines.chunk_by(|_, line| !line.starts_with("# HELP")) {
            let (comments, samples): (Vec<&str>, Vec<&str>) = family.iter().partition(|line| line.starts_with('#'));
            let sample_name = |line: &&str| line.split(['{', ' ']).next().unwrap_or_default().to_owned();
            let samples: Vec<&str> = samples.into_iter().filter(|line| named.contains(&sample_name(line))).collect();
            if !samples.is_empty() {
                kept.extend(comments);
                kept.extend(samples);
            }
        }
        kept
    }

    #[test]
    fn the_filtered_fixture_is_the_full_one_restricted_to_the_query() {
        let query = names::for_engine("vllm").sample_query();
        assert!(FILTERED_PAGE == restricted(FULL_PAGE, &query), "regenerate vllm-metrics-filtered.prom for {query}");
    }

    #[test]
    fn the_full_and_the_filtered_fixture_read_the_same() {
        let names = names::for_engine("vllm");
        let full = parse(FULL_PAGE, names).expect("the full page parses");
        assert_eq!(parse(FILTERED_PAGE, names).expect("the filtered page parses"), full);
        assert_eq!((full.running, full.waiting), (Some(14.0), Some(3.0)));
        assert_eq!(full.kv_cache_usage, Some(0.418_701_171_875_000_1));
        assert_eq!(full.time_to_first_token, Some(HistogramTotals { sum: 2210.78289251821, count: 12887.0 }));
        assert_eq!(full.e2e_latency.map(|h| h.count), Some(12887.0));
        assert_eq!(full.prefix_cache_hits, Some(9_481_344.0));
        assert!(full.time_per_output_token.is_some() && full.queue_time.is_some() && full.generation_tokens.is_some());
    }

    #[test]
    fn garbage_is_an_error_and_nan_is_no_value() {
        assert!(parse("<html>not metrics</html>", names::for_engine("vllm")).is_err());
        assert!(parse("", names::for_engine("vllm")).is_err());
        let scraped = parse("vllm:num_requests_running NaN\n", names::for_engine("vllm")).expect("parses");
        assert_eq!(scraped.running, None);
    }
}
