//! Strategy knobs (`turnstile serve` flags), under AIBrix's environment
//! variable names where AIBrix has them.

use clap::{Args, ValueEnum};

/// What prefix-aware strategies hash the prompt as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrefixTokenizer {
    /// The prompt's UTF-8 bytes (AIBrix's default).
    Character,
    /// cl100k tokens, four big-endian bytes each.
    Tiktoken,
}

/// Settings of the routing strategies.
#[derive(Args, Debug, Clone)]
pub struct RoutingArgs {
    /// prefix-cache: bytes of prompt per hashed block (a trailing partial block is not hashed).
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_BLOCK_SIZE", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub prefix_cache_block_size: u32,

    /// prefix-cache: most blocks the index remembers (least recently used go first).
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_BLOCK_NUMBER", default_value_t = 200_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub prefix_cache_block_number: u32,

    /// prefix-cache: what the prompt is hashed as.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE", value_enum, default_value_t = PrefixTokenizer::Character)]
    pub prefix_cache_tokenizer_type: PrefixTokenizer,

    /// prefix-cache: seed of the chained block hash.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_HASH_SEED", default_value_t = 0)]
    pub prefix_cache_hash_seed: u64,

    /// prefix-cache: when the in-flight counts of the model's pods differ by
    /// more than this, only the least loaded pods are considered.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT", default_value_t = 8)]
    pub prefix_cache_imbalance_abs_count: u32,

    /// prefix-cache: a pod holding the prefix is skipped when its in-flight
    /// count exceeds the mean by more than this many standard deviations.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR", default_value_t = 2.0)]
    pub prefix_cache_standard_deviation_factor: f64,

    /// prefix-cache: a pod's blocks unused for this long no longer count as held.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS", default_value_t = 20)]
    pub prefix_cache_eviction_duration_mins: u64,

    /// vtc-basic: the window a user's tokens are counted over, in minutes.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_TOKEN_TRACKER_WINDOW_MINUTES", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub vtc_window_minutes: u64,

    /// vtc-basic: smallest token bucket users are spread over pods by.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_TOKEN_TRACKER_MIN_TOKENS", default_value_t = 1000.0)]
    pub vtc_min_tokens: f64,

    /// vtc-basic: weight of the fairness term (user tokens vs pod index).
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_FAIRNESS_WEIGHT", default_value_t = 0.5)]
    pub vtc_fairness_weight: f64,

    /// vtc-basic: weight of the utilisation term (requests running on the pod).
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_UTILIZATION_WEIGHT", default_value_t = 0.5)]
    pub vtc_utilization_weight: f64,

    /// vtc-basic: running requests at which a pod counts as fully used.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_MAX_POD_LOAD", default_value_t = 100.0)]
    pub vtc_max_pod_load: f64,

    /// vtc-basic: weight of a prompt token in a user's count.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_INPUT_TOKEN_WEIGHT", default_value_t = 1.0)]
    pub vtc_input_token_weight: f64,

    /// vtc-basic: weight of a generated token in a user's count.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_OUTPUT_TOKEN_WEIGHT", default_value_t = 2.0)]
    pub vtc_output_token_weight: f64,

    /// pd: time the prefill pod has to answer the prefill request, in seconds
    /// (503 and no decode request after).
    #[arg(long, env = "AIBRIX_PREFILL_REQUEST_TIMEOUT", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub prefill_request_timeout_seconds: u64,
}

impl Default for RoutingArgs {
    fn default() -> Self {
        Self {
            prefix_cache_block_size: 128,
            prefix_cache_block_number: 200_000,
            prefix_cache_tokenizer_type: PrefixTokenizer::Character,
            prefix_cache_hash_seed: 0,
            prefix_cache_imbalance_abs_count: 8,
            prefix_cache_standard_deviation_factor: 2.0,
            prefix_cache_eviction_duration_mins: 20,
            vtc_window_minutes: 5,
            vtc_min_tokens: 1000.0,
            vtc_fairness_weight: 0.5,
            vtc_utilization_weight: 0.5,
            vtc_max_pod_load: 100.0,
            vtc_input_token_weight: 1.0,
            vtc_output_token_weight: 2.0,
            prefill_request_timeout_seconds: 30,
        }
    }
}
