//! What one pod's engine reported: the readings routing compares pods by.
//! Plain data, shared by the scraper that fills it (`engine_metrics`), the
//! pod that holds its latest (`discovery`'s `PodLoad`) and the strategies
//! and request path that read it; it uses no other module.

use std::time::Instant;

/// What one pod's engine reported at its last scrape, with recent-window
/// means and rates. `None` where the engine exports no such series (or, for
/// means, where no request finished within the window).
///
/// Laid out in the order written, the scrape time and the readings most
/// strategies compare first: a strategy choosing among pods reads those from
/// each pod's report, and with many pods they are rarely still in cache.
#[derive(Clone, Debug, PartialEq)]
#[repr(C)]
pub struct PodMetrics {
    pub scraped_at: Instant,
    /// KV cache in use, 0..1 (`vllm:kv_cache_usage_perc`, else the v0 name).
    pub kv_cache_usage: Option<f64>,
    /// GPU KV cache in use, 0..1 (`vllm:gpu_cache_usage_perc`, else the v1 name).
    pub gpu_cache_usage: Option<f64>,
    /// Requests in the running batch.
    pub running: Option<f64>,
    /// Requests queued for the batch.
    pub waiting: Option<f64>,
    /// Mean time to first token, seconds, over the window.
    pub time_to_first_token: Option<f64>,
    /// Mean time per output token, seconds, over the window.
    pub time_per_output_token: Option<f64>,
    /// Mean end-to-end request latency, seconds, over the window.
    pub e2e_latency: Option<f64>,
    /// Mean queueing time, seconds, over the window (newer engines only).
    pub queue_time: Option<f64>,
    /// Mean prefill time, seconds, over the window (vLLM only).
    pub prefill_time: Option<f64>,
    /// Prompt tokens processed per second over the window.
    pub prompt_tokens_per_second: Option<f64>,
    /// Tokens generated per second over the window.
    pub generation_tokens_per_second: Option<f64>,
    /// Requests finished per second over the window.
    pub requests_finished_per_second: Option<f64>,
    /// Tokens generated per finished request over the window.
    pub generation_tokens_per_request: Option<f64>,
    /// Share of the window with at least one request running.
    pub busy_fraction: Option<f64>,
    /// Prompt tokens found in the engine's prefix cache over those looked up.
    pub prefix_cache_hit_rate: Option<f64>,
    /// The engine says it sleeps (vLLM's sleep mode): it refuses requests.
    pub sleeping: bool,
    /// The engine's LoRA adapter slots and running adapters (vLLM only).
    pub lora: Option<LoraSlots>,
}

impl PodMetrics {
    /// Metrics of a pod that reported nothing but a scrape time; tests fill
    /// in the fields they need.
    pub fn empty(scraped_at: Instant) -> Self {
        Self {
            scraped_at,
            running: None,
            waiting: None,
            kv_cache_usage: None,
            gpu_cache_usage: None,
            time_to_first_token: None,
            time_per_output_token: None,
            e2e_latency: None,
            queue_time: None,
            prefill_time: None,
            prompt_tokens_per_second: None,
            generation_tokens_per_second: None,
            requests_finished_per_second: None,
            generation_tokens_per_request: None,
            busy_fraction: None,
            prefix_cache_hit_rate: None,
            sleeping: false,
            lora: None,
        }
    }
}

/// Most running adapters remembered per pod; vLLM runs at most `max_loras`
/// adapters in a batch, rarely more than a few.
pub const MAX_RUNNING_LORAS: usize = 16;

/// An engine's LoRA slots at its last report, kept without allocating: the
/// running adapters as hashes of their names.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSlots {
    /// Adapters the engine can hold in GPU memory at once (`max_lora`).
    pub max_lora: u32,
    /// Adapters with requests running (`running_lora_adapters`).
    pub running: u32,
    /// [`lora_hash`] of the first [`MAX_RUNNING_LORAS`] running adapters.
    pub hashes: [u64; MAX_RUNNING_LORAS],
    /// The sample's value: vLLM sets it to the time of the report.
    pub reported: f64,
}

impl LoraSlots {
    /// Whether `hash` (of [`lora_hash`]) is among the running adapters.
    pub fn runs(&self, hash: u64) -> bool {
        let known = usize::try_from(self.running).unwrap_or(MAX_RUNNING_LORAS).min(MAX_RUNNING_LORAS);
        self.hashes.get(..known).is_some_and(|hashes| hashes.contains(&hash))
    }

    /// Whether another adapter could be loaded without evicting one.
    pub fn has_free_slot(&self) -> bool {
        self.running < self.max_lora
    }
}

/// The hash [`LoraSlots`] keeps an adapter name as.
pub fn lora_hash(name: &str) -> u64 {
    xxhash_rust::xxh64::xxh64(name.as_bytes(), 0x4c6f5241)
}
