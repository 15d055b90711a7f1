//! Where a limit stands for a client, in the headers OpenAI's SDKs read:
//! `Retry-After` on every 429, and `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
//! on 429s and on the answers of users with limits.

use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};

/// One limit's window as a request found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Requests or tokens the window allows.
    pub limit: u64,
    /// Left in the window after this request (0 when it was refused).
    pub remaining: u64,
    /// Until the window resets.
    pub reset: Duration,
}

/// What a quota counts, naming the header suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaUnit {
    Requests,
    Tokens,
}

impl Quota {
    /// `Retry-After` for a refusal by this quota: whole seconds until the
    /// window resets, at least 1.
    pub fn retry_after_seconds(&self) -> u64 {
        retry_after_seconds(self.reset)
    }

    /// Writes the three `x-ratelimit-*` headers of `unit`.
    pub fn insert_headers(&self, unit: QuotaUnit, headers: &mut HeaderMap) {
        let [limit, remaining, reset] = match unit {
            QuotaUnit::Requests => {
                ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"]
            }
            QuotaUnit::Tokens => {
                ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]
            }
        };
        headers.insert(HeaderName::from_static(limit), HeaderValue::from(self.limit));
        headers.insert(HeaderName::from_static(remaining), HeaderValue::from(self.remaining));
        if let Ok(value) = HeaderValue::from_str(&format_reset(self.reset)) {
            headers.insert(HeaderName::from_static(reset), value);
        }
    }
}

/// Whole seconds to wait for `wait`, rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

/// Sets `Retry-After` to `wait` in whole seconds (at least 1).
pub fn insert_retry_after(wait: Duration, headers: &mut HeaderMap) {
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_seconds(wait)));
}

/// A reset time as OpenAI writes it: `250ms`, `1.5s`, `59s`, `1m0s`.
pub fn format_reset(reset: Duration) -> String {
    let ms = reset.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (minutes, ms) = (ms / 60_000, ms % 60_000);
    let seconds = match ms % 1000 {
        0 => format!("{}s", ms / 1000),
        frac => format!("{}.{}s", ms / 1000, format!("{frac:03}").trim_end_matches('0')),
    };
    if minutes == 0 { seconds } else { format!("{minutes}m{seconds}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::under_a_second(Duration::from_millis(250), "250ms")]
    #[case::zero(Duration::ZERO, "0ms")]
    #[case::whole_seconds(Duration::from_secs(59), "59s")]
    #[case::fraction(Duration::from_millis(1500), "1.5s")]
    #[case::fraction_keeps_leading_zero(Duration::from_millis(2050), "2.05s")]
    #[case::a_minute(Duration::from_secs(60), "1m0s")]
    #[case::minutes_and_seconds(Duration::from_millis(372_500), "6m12.5s")]
    fn reset_reads_like_openais(#[case] reset: Duration, #[case] text: &str) {
        assert_eq!(format_reset(reset), text);
    }

    #[rstest]
    #[case::a_moment(Duration::from_millis(1), 1)]
    #[case::zero_is_still_one(Duration::ZERO, 1)]
    #[case::exact(Duration::from_secs(2), 2)]
    #[case::rounds_up(Duration::from_millis(2001), 3)]
    #[case::rest_of_a_minute(Duration::from_millis(37_250), 38)]
    fn retry_after_is_whole_seconds_rounded_up(#[case] wait: Duration, #[case] seconds: u64) {
        assert_eq!(retry_after_seconds(wait), seconds);
    }

    #[test]
    fn headers_name_the_unit() {
        let mut headers = HeaderMap::new();
        let quota = Quota { limit: 60, remaining: 12, reset: Duration::from_millis(30_500) };
        quota.insert_headers(QuotaUnit::Requests, &mut headers);
        Quota { limit: 1000, remaining: 0, reset: Duration::from_secs(3) }
            .insert_headers(QuotaUnit::Tokens, &mut headers);
        assert_eq!(headers["x-ratelimit-limit-requests"], "60");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "12");
        assert_eq!(headers["x-ratelimit-reset-requests"], "30.5s");
        assert_eq!(headers["x-ratelimit-limit-tokens"], "1000");
        assert_eq!(headers["x-ratelimit-remaining-tokens"], "0");
        assert_eq!(headers["x-ratelimit-reset-tokens"], "3s");
        assert_eq!(quota.retry_after_seconds(), 31);
    }
}
