//! Request work whose cost grows with the body, done off the async workers.
//!
//! Parsing a multi-megabyte JSON body, extracting its prompt, counting its
//! tokens and hashing its prefix blocks take milliseconds each; on the
//! workers that serve every connection, two such requests would stall every
//! other client (and, before the admin listener got its own thread, the
//! liveness probe). Bodies of [`OFFLOAD_BYTES`] or more are therefore
//! prepared on tokio's blocking threads, at most one job per CPU at a time so
//! a burst of large prompts queues instead of oversubscribing the machine.
//! The work itself is bounded too (see `tokens::count_tokens` and
//! `PrefixHasher::hashes`).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::request::{Endpoint, ParsedRequest};
use crate::errors::GatewayError;
use crate::routing::prefix_index::PrefixHasher;
use crate::tokens;

/// Bodies at least this large are prepared off the async workers.
pub const OFFLOAD_BYTES: usize = 64 * 1024;

/// What the proxy needs from a request body before it routes it.
#[derive(Debug)]
pub struct Prepared {
    pub request: ParsedRequest,
    /// The prompt's prefix hashes, when worked out up front.
    pub prefix_hashes: Option<Vec<u64>>,
    /// Prompt tokens, when `config-profile: auto` needs them and they were
    /// counted up front.
    pub prompt_tokens: Option<i64>,
    /// An upload streaming from the client, sent instead of `request.body`.
    pub upload: Option<super::form::Upload>,
}

impl Prepared {
    /// A request whose body needs no preparing.
    pub fn plain(request: ParsedRequest) -> Self {
        Self { request, prefix_hashes: None, prompt_tokens: None, upload: None }
    }
}

impl Prepared {
    /// The prompt's tokens (counted now, unless they were up front).
    pub fn prompt_tokens(&self) -> i64 {
        self.prompt_tokens.unwrap_or_else(|| tokens::count_tokens(self.request.prompt()))
    }
}

/// Runs body-sized work on blocking threads, a bounded number at a time.
#[derive(Debug)]
pub struct Offload {
    permits: Arc<Semaphore>,
}

impl Default for Offload {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        Self { permits: Arc::new(Semaphore::new(cpus)) }
    }
}

/// Which prompt-token count routing needs before it starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum TokenCount {
    /// None: counted on demand, if at all.
    #[default]
    Skip,
    /// Exact up to [`tokens::COUNTED_PROMPT_BYTES`], extrapolated past it.
    Estimate,
    /// Every token (prompt-length buckets).
    Exact,
}

impl Offload {
    /// Inspects `body` (and, when large, extracts its prompt, counts its
    /// tokens if `count_tokens`, and hashes its prefix) without blocking a
    /// worker for longer than a small body takes.
    pub async fn prepare(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        count_tokens: TokenCount,
        hasher: Arc<PrefixHasher>,
    ) -> Result<Prepared, GatewayError> {
        if body.len() < OFFLOAD_BYTES {
            let request = ParsedRequest::parse(endpoint, body)?;
            return Ok(Prepared::plain(request));
        }
        // Closed only when the proxy is dropped. The permit goes with the job:
        // a client that resets its stream drops this future, not the job.
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok();
        let job = move || {
            let _permit = permit;
            let request = ParsedRequest::parse(endpoint, body)?;
            let prompt = request.prompt();
            let prompt_tokens = match count_tokens {
                TokenCount::Skip => None,
                TokenCount::Estimate => Some(tokens::count_tokens(prompt)),
                TokenCount::Exact => Some(tokens::count_tokens_exact(prompt)),
            };
            let prefix_hashes = Some(hasher.hashes(prompt));
            Ok(Prepared { request, prefix_hashes, prompt_tokens, upload: None })
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(prepared) => prepared,
            Err(err) => match err.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Cancelled: only when the runtime shuts down.
                Err(_) => Err(GatewayError::ShuttingDown),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingConfig;

    fn body(prompt: &str) -> Bytes {
        Bytes::from(serde_json::json!({"model": "m", "prompt": prompt}).to_string())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn large_bodies_are_prepared_whole_and_small_ones_lazily() {
        let offload = Offload::default();
        let hasher = Arc::new(PrefixHasher::new(&RoutingConfig::default()));
        let small = offload
            .prepare(Endpoint::Completions, body("hi"), TokenCount::Estimate, Arc::clone(&hasher))
            .await
            .unwrap();
        assert_eq!(small.request.model, "m");
        assert!(small.prefix_hashes.is_none() && small.prompt_tokens.is_none(), "small bodies keep the lazy path");

        // Runs on a current-thread runtime: the job must not need this thread.
        let prompt = "lorem ipsum ".repeat(OFFLOAD_BYTES / 8);
        let large = offload
            .prepare(Endpoint::Completions, body(&prompt), TokenCount::Estimate, Arc::clone(&hasher))
            .await
            .unwrap();
        assert_eq!(large.request.prompt(), prompt);
        assert_eq!(large.prefix_hashes.expect("hashed up front"), hasher.hashes(&prompt));
        assert_eq!(large.prompt_tokens, Some(tokens::count_tokens(&prompt)));
        let unasked =
            offload.prepare(Endpoint::Completions, body(&prompt), TokenCount::Skip, Arc::clone(&hasher)).await.unwrap();
        assert_eq!(unasked.prompt_tokens, None);
        // Past the counted bytes an estimate extrapolates; buckets count every token.
        let long = "lorem ipsum, ".repeat(tokens::COUNTED_PROMPT_BYTES / 6) + &"x".repeat(64 * 1024);
        let exact =
            offload.prepare(Endpoint::Completions, body(&long), TokenCount::Exact, Arc::clone(&hasher)).await.unwrap();
        assert_eq!(exact.prompt_tokens, Some(tokens::count_tokens_exact(&long)));
        assert_ne!(exact.prompt_tokens, Some(tokens::count_tokens(&long)), "the estimate differs here");

        let broken = Bytes::from(format!("{{\"model\": \"m\", \"prompt\": \"{prompt}"));
        let hasher = Arc::new(PrefixHasher::new(&RoutingConfig::default()));
        assert!(matches!(
            offload.prepare(Endpoint::Completions, broken, TokenCount::Estimate, hasher).await,
            Err(GatewayError::BodyNotJson)
        ));
    }
}
