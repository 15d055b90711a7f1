//! Which Prometheus series carry which engine signal, per engine.
//!
//! vLLM names come first and are the default for an unknown or missing
//! `model.aibrix.ai/engine` label (as in AIBrix); SGLang exports the same
//! signals under its own names. Within a list, the first name the engine
//! exports wins, so newer names go before the ones they replaced.

/// The series names of one engine, each signal in order of preference.
#[derive(Debug)]
pub struct EngineNames {
    /// Gauge: requests in the running batch.
    pub running: &'static [&'static str],
    /// Gauge: requests queued for the batch.
    pub waiting: &'static [&'static str],
    /// Gauge 0..1: KV cache in use (vLLM v1 name first).
    pub kv_cache_usage: &'static [&'static str],
    /// Gauge 0..1: GPU KV cache in use (vLLM v0 name first).
    pub gpu_cache_usage: &'static [&'static str],
    /// Histogram (seconds): arrival to first token, queueing included.
    pub time_to_first_token: &'static [&'static str],
    /// Histogram (seconds): time between two output tokens.
    pub time_per_output_token: &'static [&'static str],
    /// Histogram (seconds): arrival to the end of the request.
    pub e2e_latency: &'static [&'static str],
    /// Histogram (seconds): time spent waiting for the batch.
    pub queue_time: &'static [&'static str],
    /// Histogram (seconds): time spent prefilling the prompt.
    pub prefill_time: &'static [&'static str],
    /// Counter: prompt tokens processed.
    pub prompt_tokens: &'static [&'static str],
    /// Counter: tokens generated.
    pub generation_tokens: &'static [&'static str],
    /// Counter: prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: &'static [&'static str],
    /// Counter: prompt tokens found in the prefix cache.
    pub prefix_cache_hits: &'static [&'static str],
    /// Gauge per `sleep_state` label value (`awake`, `weights_offloaded`,
    /// `discard_all`), 1 for the engine's state: read for `awake`.
    pub sleep_state: Option<&'static str>,
    /// Gauge whose labels say the adapters running (`running_lora_adapters`)
    /// and the adapter slots (`max_lora`), its value the time of the report.
    pub lora_info: Option<&'static str>,
}

const VLLM: EngineNames = EngineNames {
    running: &["vllm:num_requests_running"],
    waiting: &["vllm:num_requests_waiting"],
    kv_cache_usage: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
    gpu_cache_usage: &["vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"],
    time_to_first_token: &["vllm:time_to_first_token_seconds"],
    time_per_output_token: &["vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"],
    e2e_latency: &["vllm:e2e_request_latency_seconds"],
    queue_time: &["vllm:request_queue_time_seconds"],
    prefill_time: &["vllm:request_prefill_time_seconds"],
    prompt_tokens: &["vllm:prompt_tokens_total"],
    generation_tokens: &["vllm:generation_tokens_total"],
    prefix_cache_queries: &["vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"],
    prefix_cache_hits: &["vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"],
    sleep_state: Some("vllm:engine_sleep_state"),
    lora_info: Some("vllm:lora_requests_info"),
};

const SGLANG: EngineNames = EngineNames {
    running: &["sglang:num_running_reqs"],
    waiting: &["sglang:num_queue_reqs"],
    kv_cache_usage: &["sglang:token_usage"],
    gpu_cache_usage: &["sglang:token_usage"],
    time_to_first_token: &["sglang:time_to_first_token_seconds"],
    time_per_output_token: &["sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"],
    e2e_latency: &["sglang:e2e_request_latency_seconds"],
    queue_time: &["sglang:queue_time_seconds"],
    prefill_time: &[],
    prompt_tokens: &["sglang:prompt_tokens_total"],
    generation_tokens: &["sglang:generation_tokens_total"],
    prefix_cache_queries: &[],
    prefix_cache_hits: &[],
    sleep_state: None,
    lora_info: None,
};

impl EngineNames {
    /// The `/metrics` query naming only the samples these series need
    /// (`name[]=…`, a histogram's `_bucket`, `_sum` and `_count`):
    /// prometheus_client, which vLLM and SGLang serve their metrics with,
    /// then renders just those, a page some twenty times smaller for the
    /// engine to write and the gateway to read. A server that ignores the
    /// query serves the whole page, which parses the same.
    pub fn sample_query(&self) -> String {
        let single = [
            self.running,
            self.waiting,
            self.kv_cache_usage,
            self.gpu_cache_usage,
            self.prompt_tokens,
            self.generation_tokens,
            self.prefix_cache_queries,
            self.prefix_cache_hits,
        ];
        let histograms = [
            self.time_to_first_token,
            self.time_per_output_token,
            self.e2e_latency,
            self.queue_time,
            self.prefill_time,
        ];
        let mut samples: Vec<String> = single.iter().copied().flatten().map(|name| (*name).to_owned()).collect();
        samples.extend(self.sleep_state.map(str::to_owned));
        samples.extend(self.lora_info.map(str::to_owned));
        for name in histograms.iter().copied().flatten() {
            samples.extend(["_bucket", "_sum", "_count"].map(|suffix| format!("{name}{suffix}")));
        }
        samples.sort_unstable();
        samples.dedup();
        let pairs: Vec<String> =
            samples.iter().map(|sample| format!("name%5B%5D={}", sample.replace(':', "%3A"))).collect();
        pairs.join("&")
    }
}

/// The names for the engine a pod's `model.aibrix.ai/engine` label names.
pub fn for_engine(engine: &str) -> &'static EngineNames {
    if engine.eq_ignore_ascii_case("sglang") { &SGLANG } else { &VLLM }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sglang_by_label_and_vllm_otherwise() {
        assert_eq!(for_engine("sglang").running, ["sglang:num_running_reqs"]);
        assert_eq!(for_engine("SGLang").waiting, ["sglang:num_queue_reqs"]);
        assert_eq!(for_engine("vllm").running, ["vllm:num_requests_running"]);
        assert_eq!(for_engine("").running, ["vllm:num_requests_running"], "missing label means vLLM");
        assert_eq!(for_engine("trtllm").running, ["vllm:num_requests_running"]);
    }

    #[test]
    fn the_query_names_every_sample_read_and_nothing_else() {
        let query = for_engine("vllm").sample_query();
        let samples: Vec<&str> = query.split('&').filter_map(|pair| pair.strip_prefix("name%5B%5D=")).collect();
        assert_eq!(samples.len(), query.split('&').count(), "only name[] pairs: {query}");
        for sample in [
            "vllm%3Anum_requests_running",
            "vllm%3Akv_cache_usage_perc",
            "vllm%3Agpu_cache_usage_perc",
            "vllm%3Aprompt_tokens_total",
            "vllm%3Atime_to_first_token_seconds_bucket",
            "vllm%3Atime_to_first_token_seconds_sum",
            "vllm%3Atime_to_first_token_seconds_count",
        ] {
            assert!(samples.contains(&sample), "{sample} missing from {query}");
        }
        assert!(!query.contains("python_gc") && !query.contains(':'), "{query}");
        assert!(for_engine("sglang").sample_query().contains("sglang%3Anum_running_reqs"));
    }
}
