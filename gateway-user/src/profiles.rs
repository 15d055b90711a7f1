//! Config profiles (annotation `model.aibrix.ai/config`, as AIBrix defines
//! it): parsing the annotation, choosing a profile for a request, and the
//! strategy precedence.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The parsed `model.aibrix.ai/config` annotation.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelConfig {
    /// Pins one strategy for the whole model, above every other source.
    #[serde(default)]
    pub locked_routing_strategy: Option<String>,
    /// Profile used when the request names none (default `"default"`).
    #[serde(default)]
    pub default_profile: Option<String>,
    pub profiles: BTreeMap<String, Profile>,
}

/// One traffic class of a model.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    #[serde(default)]
    pub routing_strategy: Option<String>,
    /// Model-level cap for this profile; absent or `<= 0` means no cap.
    #[serde(default)]
    pub requests_per_second: Option<i64>,
    #[serde(default)]
    pub routing_config: Option<ProfileRouting>,
}

/// A profile's `routingConfig`: strategy-specific settings. Only the `auto` selection hints
/// are typed here; strategies read the rest from `extra`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProfileRouting {
    #[serde(default)]
    pub prompt_tokens_gte: Option<i64>,
    #[serde(default)]
    pub prompt_tokens_lt: Option<i64>,
    #[serde(default)]
    pub max_tokens_gte: Option<i64>,
    #[serde(default)]
    pub max_tokens_lt: Option<i64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Why an annotation was ignored.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no profiles defined")]
    NoProfiles,
}

impl ModelConfig {
    /// Parses the annotation; a config without profiles is rejected, as AIBrix does.
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(raw)?;
        if config.profiles.is_empty() {
            return Err(ConfigError::NoProfiles);
        }
        Ok(config)
    }

    /// A model's config: the first of its pods' annotations, in the order
    /// given, that parses. Each one skipped on the way is passed to
    /// `invalid` with its pod and why.
    pub fn first_valid<'a, P>(
        annotations: impl IntoIterator<Item = (P, &'a str)>,
        mut invalid: impl FnMut(P, &'a str, &ConfigError),
    ) -> Option<Self> {
        for (pod, raw) in annotations {
            match Self::parse(raw) {
                Ok(config) => return Some(config),
                Err(err) => invalid(pod, raw, &err),
            }
        }
        None
    }

    fn default_profile_name(&self) -> &str {
        self.default_profile.as_deref().map(str::trim).filter(|s| !s.is_empty()).unwrap_or(DEFAULT_PROFILE)
    }
}

impl Profile {
    /// The model-level RPS cap, if this profile has one.
    pub fn rps_cap(&self) -> Option<u64> {
        self.requests_per_second.and_then(|n| u64::try_from(n).ok()).filter(|n| *n > 0)
    }
}

impl ProfileRouting {
    fn hint_count(&self) -> usize {
        [self.prompt_tokens_gte, self.prompt_tokens_lt, self.max_tokens_gte, self.max_tokens_lt]
            .iter()
            .filter(|h| h.is_some())
            .count()
    }

    /// True when every hint holds for the request. A hint on a feature the
    /// request does not have (no `max_tokens`) does not hold.
    fn matches(&self, features: &RequestFeatures) -> bool {
        let holds = |hint: Option<i64>, value: Option<i64>, check: fn(i64, i64) -> bool| match hint {
            None => true,
            Some(h) => value.is_some_and(|v| check(v, h)),
        };
        holds(self.prompt_tokens_gte, features.prompt_tokens, |v, h| v >= h)
            && holds(self.prompt_tokens_lt, features.prompt_tokens, |v, h| v < h)
            && holds(self.max_tokens_gte, features.max_tokens, |v, h| v >= h)
            && holds(self.max_tokens_lt, features.max_tokens, |v, h| v < h)
    }
}

/// A profile's `pd` settings, read from its `routingConfig` as AIBrix reads
/// them: a value of the wrong type voids them all (AIBrix's decode into a
/// typed struct fails as a whole).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PdProfile {
    /// `promptLenBucketMinLength`..`promptLenBucketMaxLength`: the prompt
    /// lengths (tokens) a PD pod takes when bucketing is on.
    pub bucket: PromptBucket,
    /// `combined`: a pod serving whole requests, the fallback when no
    /// bucket matches.
    pub combined: bool,
    /// `prefillScorePolicy`, when set.
    pub prefill_score_policy: Option<String>,
    /// `decodeScorePolicy`, when set.
    pub decode_score_policy: Option<String>,
}

/// An inclusive range of prompt lengths in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptBucket {
    pub min: i64,
    pub max: i64,
}

/// AIBrix's "no maximum" (`math.MaxInt32`), also what a maximum of 0 means.
const NO_MAX_LENGTH: i64 = i32::MAX as i64;

impl Default for PromptBucket {
    fn default() -> Self {
        Self { min: 0, max: NO_MAX_LENGTH }
    }
}

impl PromptBucket {
    /// Whether a prompt of `tokens` falls in the range: a minimum above the
    /// maximum takes nothing, the default range everything.
    pub fn fits(&self, tokens: i64) -> bool {
        if self.min > self.max {
            return false;
        }
        (self.min == 0 && self.max == NO_MAX_LENGTH) || (self.min..=self.max).contains(&tokens)
    }
}

impl ProfileRouting {
    /// The profile's `pd` settings.
    pub fn pd(&self) -> PdProfile {
        self.try_pd().unwrap_or_default()
    }

    fn try_pd(&self) -> Option<PdProfile> {
        let int = |key: &str| match self.extra.get(key) {
            None | Some(serde_json::Value::Null) => Some(None),
            Some(value) => value.as_i64().map(Some),
        };
        let text = |key: &str| match self.extra.get(key) {
            None | Some(serde_json::Value::Null) => Some(None),
            Some(serde_json::Value::String(s)) => Some(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
            Some(_) => None,
        };
        let combined = match self.extra.get("combined") {
            None | Some(serde_json::Value::Null) => false,
            Some(value) => value.as_bool()?,
        };
        let min = int("promptLenBucketMinLength")?.unwrap_or(0).max(0);
        let max = match int("promptLenBucketMaxLength")?.unwrap_or(0) {
            0 => NO_MAX_LENGTH,
            max => max,
        };
        Some(PdProfile {
            bucket: PromptBucket { min, max },
            combined,
            prefill_score_policy: text("prefillScorePolicy")?,
            decode_score_policy: text("decodeScorePolicy")?,
        })
    }
}

/// A pod's own `pd` settings per profile of its `model.aibrix.ai/config`
/// annotation: AIBrix buckets each PD pod by its own annotation, resolved
/// for the request's profile.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodPdProfiles {
    default_profile: String,
    profiles: BTreeMap<String, PdProfile>,
}

impl PodPdProfiles {
    /// The settings of every profile in `config`.
    pub fn of(config: &ModelConfig) -> Self {
        Self {
            default_profile: config.default_profile_name().to_owned(),
            profiles: config
                .profiles
                .iter()
                .map(|(name, profile)| {
                    (name.clone(), profile.routing_config.as_ref().map(ProfileRouting::pd).unwrap_or_default())
                })
                .collect(),
        }
    }

    /// The settings of `profile`, else of the pod's default profile (as
    /// AIBrix resolves a pod's profile); `None` when neither exists.
    pub fn get(&self, profile: &str) -> Option<&PdProfile> {
        self.profiles.get(profile).or_else(|| self.profiles.get(&self.default_profile))
    }
}

/// Name of the profile used when nothing else names one.
pub const DEFAULT_PROFILE: &str = "default";
/// `config-profile` value that selects a profile from the request's shape.
pub const AUTO_PROFILE: &str = "auto";

/// What `config-profile: auto` looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestFeatures {
    pub prompt_tokens: Option<i64>,
    pub max_tokens: Option<i64>,
}

/// The profile a request runs under.
#[derive(Debug, Clone, Copy)]
pub struct ResolvedProfile<'a> {
    /// Profile name; `"default"` when the model has no config.
    pub name: &'a str,
    /// The profile itself, when the config defines it.
    pub profile: Option<&'a Profile>,
    /// True when chosen by `config-profile: auto` (echoed in `x-aibrix-config-profile`).
    pub auto_selected: bool,
}

/// Chooses the profile for a request. `features` is only computed for
/// `config-profile: auto`, since counting prompt tokens costs a tokenizer pass.
pub fn resolve_profile<'a>(
    config: Option<&'a ModelConfig>,
    header: Option<&str>,
    features: impl FnOnce() -> RequestFeatures,
) -> ResolvedProfile<'a> {
    let Some(config) = config else {
        return ResolvedProfile { name: DEFAULT_PROFILE, profile: None, auto_selected: false };
    };
    let requested = header.map(str::trim).filter(|h| !h.is_empty());
    if requested.is_some_and(|h| h.eq_ignore_ascii_case(AUTO_PROFILE)) {
        let features = features();
        if let Some((name, profile)) = best_auto_match(config, &features) {
            return ResolvedProfile { name, profile: Some(profile), auto_selected: true };
        }
        let name = config.default_profile_name();
        return ResolvedProfile { name, profile: config.profiles.get(name), auto_selected: true };
    }
    if let Some((name, profile)) = requested.and_then(|h| config.profiles.get_key_value(h)) {
        return ResolvedProfile { name, profile: Some(profile), auto_selected: false };
    }
    let name = config.default_profile_name();
    ResolvedProfile { name, profile: config.profiles.get(name), auto_selected: false }
}

/// AIBrix's ordering: most hints, then the tightest bounds, then the first
/// name (profiles iterate in name order and ties keep the earlier one).
fn best_auto_match<'a>(config: &'a ModelConfig, features: &RequestFeatures) -> Option<(&'a str, &'a Profile)> {
    let key = |rc: &ProfileRouting| {
        (
            rc.hint_count(),
            rc.prompt_tokens_gte.unwrap_or(i64::MIN),
            std::cmp::Reverse(rc.prompt_tokens_lt.unwrap_or(i64::MAX)),
            rc.max_tokens_gte.unwrap_or(i64::MIN),
            std::cmp::Reverse(rc.max_tokens_lt.unwrap_or(i64::MAX)),
        )
    };
    let mut best: Option<(&'a str, &'a Profile, _)> = None;
    for (name, profile) in &config.profiles {
        let Some(rc) = profile.routing_config.as_ref() else { continue };
        if rc.hint_count() == 0 || !rc.matches(features) {
            continue;
        }
        let k = key(rc);
        if best.as_ref().is_none_or(|(_, _, best_key)| k > *best_key) {
            best = Some((name, profile, k));
        }
    }
    best.map(|(name, profile, _)| (name, profile))
}

/// Strategy precedence: `lockedRoutingStrategy` > header `routing-strategy` >
/// profile `routingStrategy` > the gateway default.
pub fn resolve_strategy<'a>(
    config: Option<&'a ModelConfig>,
    profile: Option<&'a Profile>,
    header: Option<&'a str>,
    gateway_default: &'a str,
) -> &'a str {
    let non_blank = |s: Option<&'a str>| s.map(str::trim).filter(|s| !s.is_empty());
    non_blank(config.and_then(|c| c.locked_routing_strategy.as_deref()))
        .or_else(|| non_blank(header))
        .or_else(|| non_blank(profile.and_then(|p| p.routing_strategy.as_deref())))
        .unwrap_or(gateway_default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const CONFIG: &str = r#"{
        "defaultProfile": "default",
        "profiles": {
            "default": {"routingStrategy": "least-latency", "requestsPerSecond": 100},
            "batch": {"routingStrategy": "throughput", "requestsPerSecond": 20},
            "long-prompt": {"routingStrategy": "prefix-cache", "routingConfig": {"promptTokensGte": 8192}},
            "long-generation": {"routingStrategy": "throughput", "routingConfig": {"maxTokensGte": 2048}},
            "short-both": {"routingStrategy": "random", "routingConfig": {"promptTokensLt": 100, "maxTokensLt": 100}}
        }
    }"#;

    fn config() -> ModelConfig {
        ModelConfig::parse(CONFIG).expect("valid config")
    }

    fn features(prompt: i64, max: Option<i64>) -> RequestFeatures {
        RequestFeatures { prompt_tokens: Some(prompt), max_tokens: max }
    }

    #[test]
    fn parses_contract_example() {
        let c = config();
        assert_eq!(c.profiles.len(), 5);
        assert_eq!(c.profiles["batch"].rps_cap(), Some(20));
        assert_eq!(c.profiles["long-prompt"].routing_config.as_ref().and_then(|r| r.prompt_tokens_gte), Some(8192));
    }

    #[rstest]
    #[case::not_json("{")]
    #[case::no_profiles(r#"{"defaultProfile":"x"}"#)]
    #[case::empty_profiles(r#"{"profiles":{}}"#)]
    #[case::wrong_type(r#"{"profiles":{"default":{"requestsPerSecond":"ten"}}}"#)]
    fn invalid_annotations_are_rejected(#[case] raw: &str) {
        assert!(ModelConfig::parse(raw).is_err());
    }

    #[test]
    fn unknown_keys_are_ignored_and_extra_routing_config_kept() {
        let c = ModelConfig::parse(
            r#"{"x":1,"profiles":{"pd":{"routingStrategy":"pd","routingConfig":{"combined":true}}}}"#,
        )
        .expect("valid");
        assert_eq!(c.profiles["pd"].routing_config.as_ref().expect("rc").extra["combined"], true);
    }

    #[rstest]
    #[case::zero(Some(0), None)]
    #[case::negative(Some(-5), None)]
    #[case::absent(None, None)]
    #[case::set(Some(7), Some(7))]
    fn rps_cap_zero_or_absent_disables(#[case] rps: Option<i64>, #[case] cap: Option<u64>) {
        let p = Profile { requests_per_second: rps, ..Profile::default() };
        assert_eq!(p.rps_cap(), cap);
    }

    #[rstest]
    #[case::named(Some("batch"), "batch")]
    #[case::absent(None, "default")]
    #[case::unknown(Some("nope"), "default")]
    #[case::trimmed(Some("  batch "), "batch")]
    fn header_picks_profile(#[case] header: Option<&str>, #[case] expected: &str) {
        let c = config();
        let r = resolve_profile(Some(&c), header, || panic!("features only for auto"));
        assert_eq!(r.name, expected);
        assert!(r.profile.is_some());
        assert!(!r.auto_selected);
    }

    #[rstest]
    #[case::long_prompt(features(9000, None), "long-prompt")]
    #[case::long_generation(features(10, Some(4096)), "long-generation")]
    #[case::two_hints_beat_one(features(10, Some(10)), "short-both")]
    #[case::no_match_falls_back(features(500, Some(500)), "default")]
    #[case::missing_max_tokens_never_matches_max_hints(features(10, None), "default")]
    fn auto_picks_best_matching_profile(#[case] f: RequestFeatures, #[case] expected: &str) {
        let c = config();
        let r = resolve_profile(Some(&c), Some("AUTO"), || f);
        assert_eq!(r.name, expected);
        assert!(r.auto_selected);
    }

    #[test]
    fn auto_tie_prefers_tighter_bound_then_name() {
        let c = ModelConfig::parse(
            r#"{"profiles":{
            "b": {"routingConfig": {"promptTokensGte": 100}},
            "a": {"routingConfig": {"promptTokensGte": 100}},
            "c": {"routingConfig": {"promptTokensGte": 50}}}}"#,
        )
        .expect("valid");
        assert_eq!(resolve_profile(Some(&c), Some("auto"), || features(200, None)).name, "a");
    }

    #[test]
    fn no_config_means_default_profile_without_settings() {
        let r = resolve_profile(None, Some("batch"), RequestFeatures::default);
        assert_eq!(r.name, "default");
        assert!(r.profile.is_none());
    }

    #[test]
    fn missing_default_profile_yields_no_profile() {
        let c = ModelConfig::parse(r#"{"defaultProfile":"gone","profiles":{"x":{}}}"#).expect("valid");
        let r = resolve_profile(Some(&c), None, RequestFeatures::default);
        assert_eq!(r.name, "gone");
        assert!(r.profile.is_none());
    }

    #[rstest]
    #[case::locked_beats_all(Some("pd"), Some("random"), Some("throughput"), "pd")]
    #[case::header_beats_profile(None, Some("random"), Some("throughput"), "random")]
    #[case::blank_header_ignored(None, Some("  "), Some("throughput"), "throughput")]
    #[case::profile_beats_default(None, None, Some("throughput"), "throughput")]
    #[case::gateway_default_last(None, None, None, "least-request")]
    fn strategy_precedence(
        #[case] locked: Option<&str>,
        #[case] header: Option<&str>,
        #[case] profile_strategy: Option<&str>,
        #[case] expected: &str,
    ) {
        let config = ModelConfig {
            locked_routing_strategy: locked.map(str::to_owned),
            default_profile: None,
            profiles: BTreeMap::new(),
        };
        let profile = Profile { routing_strategy: profile_strategy.map(str::to_owned), ..Profile::default() };
        assert_eq!(resolve_strategy(Some(&config), Some(&profile), header, "least-request"), expected);
    }
}
