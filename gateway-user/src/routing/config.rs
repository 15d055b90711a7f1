//! Strategy knobs. The `turnstile serve` flags that set them (under AIBrix's
//! environment variable names where AIBrix has them) live in `cli`, and take
//! their defaults from here.

/// What prefix-aware strategies hash the prompt as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixTokenizer {
    /// The prompt's UTF-8 bytes (AIBrix's default).
    Character,
    /// cl100k tokens, four big-endian bytes each.
    Tiktoken,
}

/// The unit of vtc-basic's token window (AIBrix's
/// `AIBRIX_ROUTER_VTC_TOKEN_TRACKER_TIME_UNIT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtcTimeUnit {
    Minutes,
    Seconds,
    Milliseconds,
}

impl VtcTimeUnit {
    /// `size` of this unit.
    pub fn times(self, size: u64) -> std::time::Duration {
        match self {
            Self::Minutes => std::time::Duration::from_secs(size.saturating_mul(60)),
            Self::Seconds => std::time::Duration::from_secs(size),
            Self::Milliseconds => std::time::Duration::from_millis(size),
        }
    }
}

/// Settings of the routing strategies.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    /// prefix-cache: bytes of prompt per hashed block (a trailing partial block is not hashed).
    pub prefix_cache_block_size: u32,
    /// prefix-cache: most blocks the index remembers (least recently used go first).
    pub prefix_cache_block_number: u32,
    /// prefix-cache: what the prompt is hashed as.
    pub prefix_cache_tokenizer_type: PrefixTokenizer,
    /// prefix-cache: seed of the chained block hash.
    pub prefix_cache_hash_seed: u64,
    /// prefix-cache: when the in-flight counts of the model's pods differ by
    /// more than this, only the least loaded pods are considered.
    pub prefix_cache_imbalance_abs_count: u32,
    /// prefix-cache: a pod holding the prefix is skipped when its in-flight
    /// count exceeds the mean by more than this many standard deviations.
    pub prefix_cache_standard_deviation_factor: f64,
    /// prefix-cache: a pod's blocks unused for this long no longer count as held.
    pub prefix_cache_eviction_duration_mins: u64,
    /// vtc-basic: the window a user's tokens are counted over, in `vtc_time_unit`s.
    pub vtc_window_size: u64,
    /// vtc-basic: the unit of `vtc_window_size`.
    pub vtc_time_unit: VtcTimeUnit,
    /// vtc-basic: smallest token bucket users are spread over pods by.
    pub vtc_min_tokens: f64,
    /// vtc-basic: weight of the fairness term (user tokens vs pod index).
    pub vtc_fairness_weight: f64,
    /// vtc-basic: weight of the utilisation term (requests running on the pod).
    pub vtc_utilization_weight: f64,
    /// vtc-basic: running requests at which a pod counts as fully used.
    pub vtc_max_pod_load: f64,
    /// vtc-basic: weight of a prompt token in a user's count.
    pub vtc_input_token_weight: f64,
    /// vtc-basic: weight of a generated token in a user's count.
    pub vtc_output_token_weight: f64,
    /// pd: buckets, score policies, imbalance limits, KV connector.
    pub pd: super::pd::PdSettings,
}

impl RoutingConfig {
    /// vtc-basic's token window.
    pub fn vtc_window(&self) -> std::time::Duration {
        self.vtc_time_unit.times(self.vtc_window_size)
    }
}

impl Default for RoutingConfig {
    /// AIBrix's defaults, and the flags'.
    fn default() -> Self {
        Self {
            prefix_cache_block_size: 128,
            prefix_cache_block_number: 200_000,
            prefix_cache_tokenizer_type: PrefixTokenizer::Character,
            prefix_cache_hash_seed: 0,
            prefix_cache_imbalance_abs_count: 8,
            prefix_cache_standard_deviation_factor: 2.0,
            prefix_cache_eviction_duration_mins: 20,
            vtc_window_size: 5,
            vtc_time_unit: VtcTimeUnit::Minutes,
            vtc_min_tokens: 1000.0,
            vtc_fairness_weight: 1.0,
            vtc_utilization_weight: 1.0,
            vtc_max_pod_load: 100.0,
            vtc_input_token_weight: 1.0,
            vtc_output_token_weight: 2.0,
            pd: super::pd::PdSettings::default(),
        }
    }
}
