//! One engine `/metrics` answer (Prometheus text format) reduced to the
//! signals routing uses.
//!
//! Every ready pod is scraped many times a second, so a page is read the
//! cheap way: a line is judged by the metric name it starts with, and one
//! that routing does not read (HELP and TYPE comments, the Python collector
//! families, histogram buckets, `_created` gauges: nearly all of a vLLM page)
//! is skipped to the next newline without being tokenised. Only the few
//! wanted samples have their label block stepped over and their value
//! parsed, and nothing is allocated per line. A general-purpose parser would
//! build every family and sample of the page first, and a regex one like
//! `prometheus-parse` (`\w+` names) drops every `vllm:`/`sglang:` series.
//!
//! Lines are those of the exposition format: names with colons, label values
//! with escaped quotes and braces, `NaN` and `+Inf`, an optional timestamp
//! after the value, `\n` or `\r\n` endings, the last one possibly unended.
//!
//! An engine may export one series per label set (vLLM labels by model and,
//! with data parallelism, by engine rank): counts and counters are summed,
//! cache usage takes the fullest rank.

use memchr::{memchr, memchr3};

use super::names::EngineNames;
use crate::engine_report::{LoraSlots, lora_hash};

/// The running sum and count of a histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HistogramTotals {
    pub sum: f64,
    pub count: f64,
}

/// The signals of one scrape; `None` where the engine exports no such series.
/// Replicas sharing scrapes publish these (see `sharing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scraped {
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_cache_usage: Option<f64>,
    pub gpu_cache_usage: Option<f64>,
    pub time_to_first_token: Option<HistogramTotals>,
    pub time_per_output_token: Option<HistogramTotals>,
    pub e2e_latency: Option<HistogramTotals>,
    pub queue_time: Option<HistogramTotals>,
    pub prefill_time: Option<HistogramTotals>,
    pub prompt_tokens: Option<f64>,
    pub generation_tokens: Option<f64>,
    pub prefix_cache_queries: Option<f64>,
    pub prefix_cache_hits: Option<f64>,
    /// The engine's `awake` sleep-state gauge: 1 awake, 0 asleep (the
    /// largest over data-parallel ranks: awake if any rank is).
    #[serde(default)]
    pub awake: Option<f64>,
    /// vLLM's `vllm:lora_requests_info`: adapter slots and the adapters of
    /// running requests, from its newest sample.
    #[serde(default)]
    pub lora: Option<LoraSlots>,
}

/// A [`LoraSlots`] from one sample's label block (inside the braces) and value.
fn lora_slots(labels: &str, reported: f64) -> Option<LoraSlots> {
    let max_lora = label_value(labels, "max_lora").or_else(|| label_value(labels, "max_loras"))?;
    let mut slots = LoraSlots { max_lora: max_lora.trim().parse().ok()?, reported, ..LoraSlots::default() };
    let running = label_value(labels, "running_lora_adapters").unwrap_or_default();
    for name in running.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        if let Some(slot) = slots.hashes.get_mut(usize::try_from(slots.running).unwrap_or(usize::MAX)) {
            *slot = lora_hash(&unescape(name));
        }
        slots.running = slots.running.saturating_add(1);
    }
    Some(slots)
}

/// A label value as written (`\\\\`, `\\"` and `\\n` escaped) as the text it stands for.
fn unescape(raw: &str) -> std::borrow::Cow<'_, str> {
    if !raw.contains('\\') {
        return std::borrow::Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The raw value of label `wanted` in a label block (without its braces).
fn label_value<'a>(labels: &'a str, wanted: &str) -> Option<&'a str> {
    let mut rest = labels;
    loop {
        rest = rest.trim_start_matches([',', ' ', '\t']);
        let (name, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let bytes = after.as_bytes();
        let mut end = 0;
        let mut escaped = false;
        while let Some(&byte) = bytes.get(end) {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => break,
                _ => {}
            }
            end += 1;
        }
        let value = after.get(..end)?;
        if name.trim() == wanted {
            return Some(value);
        }
        rest = after.get(end + 1..)?;
    }
}

/// Why a scrape body gave nothing usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not in the Prometheus text format: {0}")]
    Syntax(String),
}

/// Reduces a `/metrics` body to [`Scraped`], reading the series `names` lists.
///
/// Of a signal's names, the first one the page has a sample of wins; a
/// histogram name wins when it has both a `_sum` and a `_count` (typed
/// `histogram` or not). NaN, infinite and unparseable values count as no
/// value. Lines that are not samples are skipped; only a body without a
/// single sample line (an HTML error page, an empty body) is an error.
pub fn parse(text: &str, names: &EngineNames) -> Result<Scraped, ParseError> {
    let signals = Signals::of(names);
    let mut totals = [[Candidate::default(); MAX_CANDIDATES]; SIGNALS];
    // Until one line proves the body is a metrics page, unwanted lines are
    // tokenised too; after it they are only skipped.
    let mut has_sample = false;
    let mut awake: Option<f64> = None;
    let mut lora: Option<LoraSlots> = None;
    for line in lines(text) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = memchr3(b'{', b' ', b'\t', line.as_bytes()).unwrap_or(line.len());
        let Some(name) = line.get(..name_end) else { continue };
        if names.sleep_state == Some(name) {
            if let Some(value) = sample_value(line, name_end) {
                has_sample = true;
                let labels = line.get(name_end..).unwrap_or_default();
                if value.is_finite() && labels.contains("sleep_state=\"awake\"") {
                    awake = Some(awake.map_or(value, |a| a.max(value)));
                }
            }
            continue;
        }
        if names.lora_info == Some(name) {
            if let Some(value) = sample_value(line, name_end) {
                has_sample = true;
                let labels = line.get(name_end..).unwrap_or_default().trim_start_matches([' ', '\t']);
                let labels =
                    labels.strip_prefix('{').and_then(|l| l.get(..label_block_len(l.as_bytes())?.checked_sub(1)?));
                // The gauge keeps every label set it ever had: the newest report wins.
                if value.is_finite()
                    && let Some(slots) = labels.and_then(|labels| lora_slots(labels, value))
                    && lora.is_none_or(|best| value >= best.reported)
                {
                    lora = Some(slots);
                }
            }
            continue;
        }
        let wanted = signals.reads(name);
        if !wanted && has_sample {
            continue;
        }
        let Some(value) = sample_value(line, name_end) else { continue };
        has_sample = has_sample || is_metric_name(name);
        if wanted {
            for Wanted { signal, candidate, part, kind } in signals.feeds(name) {
                if let Some(slot) = totals.get_mut(signal).and_then(|candidates| candidates.get_mut(candidate)) {
                    slot.add(part, value, kind);
                }
            }
        }
    }
    if !has_sample {
        let start: String = text.chars().take(40).collect();
        return Err(ParseError::Syntax(format!("no sample line in {} bytes starting {start:?}", text.len())));
    }
    Ok(Scraped { awake, lora, ..scraped(&totals) })
}

/// Most names read per signal (the lists in `names.rs` hold two at most; a
/// test keeps them within this).
const MAX_CANDIDATES: usize = 4;
/// The signals of [`Scraped`].
const SIGNALS: usize = 13;

/// How a signal's samples over label sets become one value.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Counts and counters: the sum.
    Sum,
    /// Cache usage: the fullest.
    Max,
    /// `_sum` and `_count`, each summed.
    Histogram,
}

/// One signal: its names in order of preference, and how it folds.
#[derive(Clone, Copy)]
struct Signal {
    names: &'static [&'static str],
    kind: Kind,
}

/// Which of a signal's samples a line is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    /// A gauge's or counter's sample.
    Value,
    Sum,
    Count,
}

/// Where a wanted line's value goes.
#[derive(Debug, PartialEq)]
struct Wanted {
    signal: usize,
    candidate: usize,
    part: Part,
    kind: Kind,
}

/// The signals of one engine, in the order of [`Scraped`]'s fields (as
/// [`scraped`] reads them).
struct Signals {
    signals: [Signal; SIGNALS],
    /// Bit `n` is set when a sample name read is `n` bytes long (127: 127 or
    /// more): most lines that are not read fail this test alone.
    lengths: u128,
}

/// The bit of [`Signals::lengths`] for a name `len` bytes long.
fn length_bit(len: usize) -> u128 {
    1 << len.min(127)
}

impl Signals {
    fn of(names: &EngineNames) -> Self {
        // Exhaustive: a new signal in EngineNames must be read here.
        let EngineNames {
            running,
            waiting,
            kv_cache_usage,
            gpu_cache_usage,
            time_to_first_token,
            time_per_output_token,
            e2e_latency,
            queue_time,
            prefill_time,
            prompt_tokens,
            generation_tokens,
            prefix_cache_queries,
            prefix_cache_hits,
            sleep_state: _,
            lora_info: _,
        } = *names;
        let signal = |names, kind| Signal { names, kind };
        let signals = [
            signal(running, Kind::Sum),
            signal(waiting, Kind::Sum),
            signal(kv_cache_usage, Kind::Max),
            signal(gpu_cache_usage, Kind::Max),
            signal(time_to_first_token, Kind::Histogram),
            signal(time_per_output_token, Kind::Histogram),
            signal(e2e_latency, Kind::Histogram),
            signal(queue_time, Kind::Histogram),
            signal(prefill_time, Kind::Histogram),
            signal(prompt_tokens, Kind::Sum),
            signal(generation_tokens, Kind::Sum),
            signal(prefix_cache_queries, Kind::Sum),
            signal(prefix_cache_hits, Kind::Sum),
        ];
        let mut lengths = 0;
        for Signal { names, kind } in signals {
            for name in names.iter().take(MAX_CANDIDATES) {
                lengths |= match kind {
                    Kind::Histogram => length_bit(name.len() + "_sum".len()) | length_bit(name.len() + "_count".len()),
                    Kind::Sum | Kind::Max => length_bit(name.len()),
                };
            }
        }
        Self { signals, lengths }
    }

    /// Whether a sample named `name` feeds any signal.
    fn reads(&self, name: &str) -> bool {
        self.lengths & length_bit(name.len()) != 0 && self.feeds(name).next().is_some()
    }

    /// The signals, names and parts a sample named `name` feeds: one name
    /// may feed two signals (vLLM's v0 and v1 cache usage stand in for each
    /// other).
    fn feeds<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Wanted> + 'a {
        self.signals.iter().enumerate().flat_map(move |(signal, &Signal { names, kind })| {
            names.iter().take(MAX_CANDIDATES).enumerate().filter_map(move |(candidate, wanted)| {
                // Suffix first: a `_bucket` line goes no further.
                let part = match kind {
                    Kind::Histogram if name.len() == wanted.len() + "_sum".len() && name.ends_with("_sum") => Part::Sum,
                    Kind::Histogram if name.len() == wanted.len() + "_count".len() && name.ends_with("_count") => {
                        Part::Count
                    }
                    Kind::Sum | Kind::Max if name.len() == wanted.len() => Part::Value,
                    _ => return None,
                };
                name.starts_with(wanted).then_some(Wanted { signal, candidate, part, kind })
            })
        })
    }
}

/// The totals of each signal (in the order of [`Signals::of`]) as [`Scraped`].
fn scraped(totals: &[[Candidate; MAX_CANDIDATES]; SIGNALS]) -> Scraped {
    let [
        running,
        waiting,
        kv_cache_usage,
        gpu_cache_usage,
        time_to_first_token,
        time_per_output_token,
        e2e_latency,
        queue_time,
        prefill_time,
        prompt_tokens,
        generation_tokens,
        prefix_cache_queries,
        prefix_cache_hits,
    ] = totals;
    // The first name sampled, even if only with NaN: the engine exports it.
    let single = |candidates: &[Candidate]| candidates.iter().find(|c| c.value.sampled).and_then(|c| c.value.total());
    // The first name with both a `_sum` and a `_count`.
    let histogram = |candidates: &[Candidate]| {
        candidates.iter().find_map(|c| Some(HistogramTotals { sum: c.sum.total()?, count: c.count.total()? }))
    };
    Scraped {
        running: single(running),
        waiting: single(waiting),
        kv_cache_usage: single(kv_cache_usage),
        gpu_cache_usage: single(gpu_cache_usage),
        time_to_first_token: histogram(time_to_first_token),
        time_per_output_token: histogram(time_per_output_token),
        e2e_latency: histogram(e2e_latency),
        queue_time: histogram(queue_time),
        prefill_time: histogram(prefill_time),
        prompt_tokens: single(prompt_tokens),
        generation_tokens: single(generation_tokens),
        prefix_cache_queries: single(prefix_cache_queries),
        prefix_cache_hits: single(prefix_cache_hits),
        awake: None,
        lora: None,
    }
}

/// The samples of one series name, over its label sets.
#[derive(Clone, Copy, Default)]
struct Series {
    /// The page has a sample of this name (whatever its value).
    sampled: bool,
    /// Sum or largest of the finite values.
    folded: Option<f64>,
}

impl Series {
    fn add(&mut self, value: f64, kind: Kind) {
        self.sampled = true;
        if !value.is_finite() {
            return;
        }
        self.folded = Some(match self.folded {
            None => value,
            Some(max) if kind == Kind::Max => max.max(value),
            Some(sum) => sum + value,
        });
    }

    /// The folded value, unless a sum overflowed.
    fn total(&self) -> Option<f64> {
        self.folded.filter(|v| v.is_finite())
    }
}

/// One name of a signal: its samples, or a histogram's `_sum` and `_count`.
#[derive(Clone, Copy, Default)]
struct Candidate {
    value: Series,
    sum: Series,
    count: Series,
}

impl Candidate {
    fn add(&mut self, part: Part, value: f64, kind: Kind) {
        let series = match part {
            Part::Value => &mut self.value,
            Part::Sum => &mut self.sum,
            Part::Count => &mut self.count,
        };
        series.add(value, kind);
    }
}

/// The lines of `text` without their `\n` or `\r\n`.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, next) = match memchr(b'\n', rest.as_bytes()) {
            // `\n` is one byte: both sides are on character boundaries.
            Some(end) => (rest.get(..end)?, rest.get(end + 1..)?),
            None => (rest, ""),
        };
        rest = next;
        Some(line.strip_suffix('\r').unwrap_or(line))
    })
}

/// The value of a sample line whose metric name ends at `name_end`: the
/// token after the label block, followed by nothing but an optional
/// timestamp. `None` if the line is not a sample.
fn sample_value(line: &str, name_end: usize) -> Option<f64> {
    let mut rest = line.get(name_end..)?.trim_start_matches([' ', '\t']);
    if let Some(labels) = rest.strip_prefix('{') {
        rest = labels.get(label_block_len(labels.as_bytes())?..)?;
    }
    let mut tokens = rest.split([' ', '\t']).filter(|token| !token.is_empty());
    let value = tokens.next()?.parse::<f64>().ok()?;
    let timestamp_ok = tokens.next().is_none_or(|timestamp| timestamp.parse::<f64>().is_ok());
    (timestamp_ok && tokens.next().is_none()).then_some(value)
}

/// Length of a label block up to and including its closing `}`, the opening
/// `{` already consumed. Neither a `}` inside a quoted value nor an escaped
/// `\"` closes anything.
fn label_block_len(labels: &[u8]) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (at, &byte) in labels.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted {
            match byte {
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
        } else if byte == b'"' {
            quoted = true;
        } else if byte == b'}' {
            return Some(at + 1);
        }
    }
    None
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`, the exposition format's metric name.
fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|first| first.is_ascii_alphabetic() || first == b'_' || first == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

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
    fn the_sleep_state_is_read_from_its_awake_sample() {
        let vllm = names::for_engine("vllm");
        let page = |awake: &str, offloaded: &str| {
            format!(
                "vllm:num_requests_running 0\n\
                 vllm:engine_sleep_state{{engine=\"0\",model_name=\"m\",sleep_state=\"awake\"}} {awake}\n\
                 vllm:engine_sleep_state{{engine=\"0\",model_name=\"m\",sleep_state=\"weights_offloaded\"}} {offloaded}\n"
            )
        };
        assert_eq!(parse(&page("0.0", "1.0"), vllm).map(|s| s.awake), Ok(Some(0.0)));
        assert_eq!(parse(&page("1.0", "0.0"), vllm).map(|s| s.awake), Ok(Some(1.0)));
        assert_eq!(parse("vllm:num_requests_running 0\n", vllm).map(|s| s.awake), Ok(None), "no gauge: not known");
        // Data-parallel ranks: awake while any rank is.
        let ranks = "vllm:engine_sleep_state{engine=\"0\",sleep_state=\"awake\"} 0\n\
                     vllm:engine_sleep_state{engine=\"1\",sleep_state=\"awake\"} 1\n";
        assert_eq!(parse(ranks, vllm).map(|s| s.awake), Ok(Some(1.0)));
        assert_eq!(parse(FULL_PAGE, vllm).map(|s| s.awake), Ok(Some(1.0)));
    }

    #[test]
    fn lora_slots_come_from_the_newest_lora_requests_info_sample() {
        let vllm = names::for_engine("vllm");
        // The gauge keeps old label sets; the newest report (largest value) holds.
        let page = "vllm:num_requests_running 1\n\
                    vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"} 1.7e9\n\
                    vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"sql, chat\",waiting_lora_adapters=\"x\"} 1.8e9\n\
                    vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 1.6e9\n";
        let lora = parse(page, vllm).expect("page").lora.expect("lora");
        assert_eq!((lora.max_lora, lora.running), (2, 2));
        assert!(lora.runs(lora_hash("sql")) && lora.runs(lora_hash("chat")));
        assert!(!lora.runs(lora_hash("old")) && !lora.runs(lora_hash("x")), "only the newest running list");
        assert!(!lora.has_free_slot());
        let idle = "vllm:lora_requests_info{running_lora_adapters=\"\",max_lora=\"1\",waiting_lora_adapters=\"\"} 5\n";
        let idle = parse(idle, vllm).expect("page").lora.expect("lora");
        assert!(idle.has_free_slot() && idle.running == 0 && !idle.runs(lora_hash("")));
        // More adapters than are kept; escaped names; a NaN report is no report.
        let many: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
        let page =
            format!("vllm:lora_requests_info{{max_lora=\"32\",running_lora_adapters=\"{}\"}} 9\n", many.join(","));
        let lora = parse(&page, vllm).expect("page").lora.expect("lora");
        assert_eq!(lora.running, 20);
        assert!(lora.runs(lora_hash("a0")) && lora.runs(lora_hash("a15")) && !lora.runs(lora_hash("a16")));
        let escaped = r#"vllm:lora_requests_info{max_lora="2",running_lora_adapters="q\"x\\y"} 3"#;
        assert!(parse(escaped, vllm).expect("page").lora.expect("lora").runs(lora_hash(r#"q"x\y"#)));
        let nan = "vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a\"} NaN\n\
                   vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"b\"} 1\n";
        assert!(parse(nan, vllm).expect("page").lora.expect("lora").runs(lora_hash("b")));
        assert_eq!(parse("vllm:num_requests_running 0\n", vllm).map(|s| s.lora), Ok(None));
        assert_eq!(parse("vllm:lora_requests_info{running_lora_adapters=\"a\"} 1\n", vllm).map(|s| s.lora), Ok(None));
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

    /// One rule of the line format per case: the page and everything it reads as vLLM.
    #[rstest]
    #[case::name_with_colons("vllm:num_requests_running 3\n", Scraped { running: Some(3.0), ..Scraped::default() })]
    #[case::summed_over_label_sets(
        "vllm:num_requests_running{engine=\"0\"} 3\nvllm:num_requests_running{engine=\"1\"} 4\n",
        Scraped { running: Some(7.0), ..Scraped::default() }
    )]
    #[case::cache_usage_takes_the_fullest(
        "vllm:kv_cache_usage_perc{engine=\"0\"} 0.5\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.25\n",
        Scraped { kv_cache_usage: Some(0.5), gpu_cache_usage: Some(0.5), ..Scraped::default() }
    )]
    #[case::first_name_exported_wins(
        "vllm:gpu_cache_usage_perc 0.75\nvllm:kv_cache_usage_perc 0.5\n",
        Scraped { kv_cache_usage: Some(0.5), gpu_cache_usage: Some(0.75), ..Scraped::default() }
    )]
    #[case::escaped_quote_and_brace_in_a_label_value(
        "vllm:num_requests_running{model_name=\"a \\\"}\\\" {b}\",engine=\"0\"} 2\n",
        Scraped { running: Some(2.0), ..Scraped::default() }
    )]
    #[case::escaped_backslash_ends_a_label_value(
        "vllm:num_requests_running{path=\"C:\\\\\",engine=\"0\"} 2\n",
        Scraped { running: Some(2.0), ..Scraped::default() }
    )]
    #[case::crlf_line_endings(
        "# TYPE vllm:num_requests_running gauge\r\nvllm:num_requests_running 3\r\nvllm:num_requests_waiting 1\r\n",
        Scraped { running: Some(3.0), waiting: Some(1.0), ..Scraped::default() }
    )]
    #[case::timestamp_after_the_value(
        "vllm:num_requests_running{engine=\"0\"} 3 1712345678000\nvllm:num_requests_waiting 1\t1712345678000\n",
        Scraped { running: Some(3.0), waiting: Some(1.0), ..Scraped::default() }
    )]
    #[case::last_line_without_newline(
        "vllm:num_requests_waiting 1\nvllm:num_requests_running 3",
        Scraped { running: Some(3.0), waiting: Some(1.0), ..Scraped::default() }
    )]
    #[case::blanks_between_tokens(
        "vllm:num_requests_running {engine=\"0\"}  3\n",
        Scraped { running: Some(3.0), ..Scraped::default() }
    )]
    #[case::created_gauges_ignored(
        "vllm:prompt_tokens_total 5\nvllm:prompt_tokens_created 1.7e+09\n\
         vllm:e2e_request_latency_seconds_sum 2\nvllm:e2e_request_latency_seconds_count 4\n\
         vllm:e2e_request_latency_seconds_created 1.7e+09\n",
        Scraped {
            prompt_tokens: Some(5.0),
            e2e_latency: Some(HistogramTotals { sum: 2.0, count: 4.0 }),
            ..Scraped::default()
        }
    )]
    #[case::a_longer_name_is_another_series(
        "vllm:num_requests_running_foo 9\nvllm:num_requests_running:bar 9\nvllm:num_requests_runnin 9\n",
        Scraped::default()
    )]
    #[case::typed_histogram_buckets_ignored(
        "# TYPE vllm:request_queue_time_seconds histogram\n\
         vllm:request_queue_time_seconds_bucket{le=\"0.3\"} 3\nvllm:request_queue_time_seconds_bucket{le=\"+Inf\"} 4\n\
         vllm:request_queue_time_seconds_count 4\nvllm:request_queue_time_seconds_sum 1.5\n",
        Scraped { queue_time: Some(HistogramTotals { sum: 1.5, count: 4.0 }), ..Scraped::default() }
    )]
    #[case::untyped_histogram(
        "vllm:request_queue_time_seconds_sum{engine=\"0\"} 1\nvllm:request_queue_time_seconds_sum{engine=\"1\"} 2\n\
         vllm:request_queue_time_seconds_count{engine=\"0\"} 3\nvllm:request_queue_time_seconds_count{engine=\"1\"} 3\n",
        Scraped { queue_time: Some(HistogramTotals { sum: 3.0, count: 6.0 }), ..Scraped::default() }
    )]
    #[case::histogram_needs_sum_and_count(
        "vllm:inter_token_latency_seconds_sum 9\n\
         vllm:time_per_output_token_seconds_sum 1\nvllm:time_per_output_token_seconds_count 2\n\
         vllm:e2e_request_latency_seconds_count 2\n",
        Scraped { time_per_output_token: Some(HistogramTotals { sum: 1.0, count: 2.0 }), ..Scraped::default() }
    )]
    #[case::nan_and_inf_are_no_value(
        "vllm:num_requests_running NaN\nvllm:num_requests_waiting +Inf\n\
         vllm:prompt_tokens_total{engine=\"0\"} NaN\nvllm:prompt_tokens_total{engine=\"1\"} 1.7e+09\n",
        Scraped { prompt_tokens: Some(1.7e9), ..Scraped::default() }
    )]
    #[case::a_name_with_only_nan_still_wins(
        "vllm:kv_cache_usage_perc NaN\nvllm:gpu_cache_usage_perc 0.5\n",
        Scraped { gpu_cache_usage: Some(0.5), ..Scraped::default() }
    )]
    #[case::an_overflowing_sum_is_no_value(
        "vllm:prompt_tokens_total{engine=\"0\"} 1e308\nvllm:prompt_tokens_total{engine=\"1\"} 1e308\n",
        Scraped::default()
    )]
    #[case::malformed_lines_skipped(
        "vllm:num_requests_running{engine=\"0\" 5\nvllm:num_requests_running 5 6 7\nvllm:num_requests_running five\n\
         vllm:num_requests_running\nvllm:num_requests_waiting 2\n",
        Scraped { waiting: Some(2.0), ..Scraped::default() }
    )]
    fn reads_one_rule(#[case] page: &str, #[case] expected: Scraped) {
        assert_eq!(parse(page, names::for_engine("vllm")), Ok(expected));
    }

    /// Bodies that are not a metrics page.
    #[rstest]
    #[case::empty("")]
    #[case::blank_lines("\n\r\n\n")]
    #[case::html("<html><body>502 Bad Gateway</body></html>\n")]
    #[case::json("{\"error\": \"not found\"}")]
    #[case::plain_text("Not Found\n")]
    #[case::status_line("404 page not found\n")]
    #[case::comments_only("# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n")]
    fn not_a_metrics_page(#[case] body: &str) {
        assert!(matches!(parse(body, names::for_engine("vllm")), Err(ParseError::Syntax(_))), "{body:?}");
    }

    #[test]
    fn an_error_names_the_start_of_the_body_only() {
        let body = format!("<html>{}</html>", "x".repeat(10_000));
        let Err(ParseError::Syntax(reason)) = parse(&body, names::for_engine("vllm")) else { panic!("an error") };
        assert!(reason.len() < 100 && reason.contains("<html>"), "{reason}");
    }

    #[test]
    fn every_name_list_fits() {
        for engine in ["vllm", "sglang"] {
            for Signal { names: list, .. } in Signals::of(names::for_engine(engine)).signals {
                assert!(list.len() <= MAX_CANDIDATES, "{engine}: {list:?}");
            }
        }
    }

    /// Every prefix of a page with each kind of line, cut anywhere (a
    /// truncated body), parses without a panic and reads no more than the
    /// whole page.
    #[test]
    fn truncated_pages_never_panic() {
        let page = "# HELP vllm:num_requests_running Number of requests.\r\n\
                    vllm:num_requests_running{model_name=\"é \\\"}\\\\\",engine=\"0\"} 3 1712345678000\r\n\
                    vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\"} 4\n\
                    vllm:e2e_request_latency_seconds_sum 2.5e+00\nvllm:e2e_request_latency_seconds_count 4\n";
        let whole = parse(page, names::for_engine("vllm")).expect("parses");
        assert_eq!(whole.running, Some(3.0));
        for (cut, _) in page.char_indices() {
            if let Ok(scraped) = parse(&page[..cut], names::for_engine("vllm")) {
                assert!(scraped.running.is_none_or(|r| r == 3.0), "cut at {cut}: {scraped:?}");
            }
        }
    }
}
