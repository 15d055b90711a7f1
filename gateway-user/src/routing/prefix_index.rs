//! What prefix-aware strategies remember: which pods recently served which
//! prompt prefixes.
//!
//! A prompt is cut into fixed-size blocks (of its UTF-8 bytes, or of its
//! cl100k tokens at four bytes each) and each block hashed with xxhash64
//! chained over the previous block's hash, as AIBrix does:
//! `h_i = xxh64(seed, le64(h_{i-1}) || block_i)`, `h_{-1} = seed`. A block's
//! hash thus names the whole prefix up to it, so the flat map from block hash
//! to pods below is a prefix tree with its edges left implicit: walking a
//! prompt's hashes in order walks down the tree.
//!
//! The map is an LRU bounded in blocks; a pod's hold on a block also lapses
//! when the block has not been routed to that pod for the eviction duration.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use xxhash_rust::xxh64::Xxh64;

use super::config::{PrefixTokenizer, RoutingConfig};

/// Pods remembered per block; the longest unused is replaced beyond this.
const MAX_HOLDERS: usize = 16;
/// Prompt bytes cut into blocks and hashed; the rest of a prompt is ignored.
pub const HASHED_PROMPT_BYTES: usize = 256 * 1024;
/// Block hashes other replicas are told per prompt, at most (besides the
/// last); see [`shared_blocks`].
pub const SHARED_BLOCKS: usize = 64;
/// Of a short prompt's blocks, every this many (and the last) are told.
pub const MIN_SHARED_STRIDE: usize = 8;

/// Every how many blocks of an `n`-block prompt other replicas are told:
/// [`MIN_SHARED_STRIDE`], or wider so that [`SHARED_BLOCKS`] span the
/// whole prompt.
pub fn shared_stride(n: usize) -> usize {
    n.div_ceil(SHARED_BLOCKS).max(MIN_SHARED_STRIDE)
}

/// The blocks of a prompt other replicas are told: every
/// [`shared_stride`]-th and the last, so at most [`SHARED_BLOCKS`] + 1
/// whatever the prompt's length. With them a replica finds the depth a pod
/// holds to the block ([`PrefixIndex::match_depths`]) from about a
/// kilobyte per request.
pub fn shared_blocks(hashes: &[u64]) -> impl Iterator<Item = u64> + '_ {
    let stride = shared_stride(hashes.len());
    let last = hashes.len().checked_sub(1);
    hashes.iter().enumerate().filter(move |(i, _)| (i + 1) % stride == 0 || Some(*i) == last).map(|(_, hash)| *hash)
}

/// Seed of pod ids, apart from the block hash seed.
const POD_ID_SEED: u64 = 0x706f_6469;

/// Cuts prompts into blocks and hashes them.
#[derive(Debug)]
pub struct PrefixHasher {
    block_size: usize,
    seed: u64,
    tokenizer: PrefixTokenizer,
}

impl PrefixHasher {
    pub fn new(config: &RoutingConfig) -> Self {
        Self {
            block_size: usize::try_from(config.prefix_cache_block_size).unwrap_or(128).max(1),
            seed: config.prefix_cache_hash_seed,
            tokenizer: config.prefix_cache_tokenizer_type,
        }
    }

    /// The chained hashes of the whole blocks of the prompt's first
    /// [`HASHED_PROMPT_BYTES`]: routing by a longer shared prefix gains
    /// nothing, and an 8 MB prompt must not cost 8 MB of hashing and
    /// 60,000 index entries.
    pub fn hashes(&self, prompt: &str) -> Vec<u64> {
        let prompt = crate::tokens::char_prefix(prompt, HASHED_PROMPT_BYTES);
        match self.tokenizer {
            PrefixTokenizer::Character => self.chain(prompt.as_bytes()),
            PrefixTokenizer::Tiktoken => match crate::tokens::cl100k() {
                Some(bpe) => {
                    // In bounded pieces, as token counting does (see `profiles`).
                    let bytes: Vec<u8> = crate::tokens::tokenizer_pieces(prompt)
                        .flat_map(|piece| bpe.encode_ordinary(piece))
                        .flat_map(|t| t.to_be_bytes())
                        .collect();
                    self.chain(&bytes)
                }
                // The tokenizer failed to load (logged once): hash the text.
                None => self.chain(prompt.as_bytes()),
            },
        }
    }

    fn chain(&self, bytes: &[u8]) -> Vec<u64> {
        let mut previous = self.seed;
        bytes
            .chunks_exact(self.block_size)
            .map(|block| {
                let mut hasher = Xxh64::new(self.seed);
                hasher.update(&previous.to_le_bytes());
                hasher.update(block);
                previous = hasher.digest();
                previous
            })
            .collect()
    }
}

/// A pod's identity in the index: a hash of its key, so a pod that comes back
/// under the same name keeps what it learned.
pub fn pod_id(key: &str) -> u64 {
    xxhash_rust::xxh64::xxh64(key.as_bytes(), POD_ID_SEED)
}

/// The pods holding a block, and how many different ways prompts went on
/// past it (up to a few): a block many went on past ends a prefix several
/// conversations share, such as a system prompt; one none went on past
/// ends a conversation's history, before its next turn.
#[derive(Debug)]
struct Holders {
    pods: Vec<(u64, Instant)>,
    continuations: u8,
}

/// Different continuations past which a block ends a shared prefix: a
/// conversation whose last turn was retried or edited has two.
const SHARED_CONTINUATIONS: u8 = 3;

impl Holders {
    fn holds(&self, pod: u64, now: Instant, idle_limit: Duration) -> bool {
        self.pods.iter().any(|(id, at)| *id == pod && now.saturating_duration_since(*at) <= idle_limit)
    }

    /// Marks `pod` as holding the block since `now` (a later hold already
    /// recorded stays); true if it already held it.
    fn touch(&mut self, pod: u64, now: Instant, idle_limit: Duration) -> bool {
        if let Some(entry) = self.pods.iter_mut().find(|(id, _)| *id == pod) {
            let held = now.saturating_duration_since(entry.1) <= idle_limit;
            entry.1 = entry.1.max(now);
            return held;
        }
        if self.pods.len() >= MAX_HOLDERS {
            // A hold older than every one kept (told late) displaces none.
            if let Some(oldest) = self.pods.iter_mut().min_by_key(|(_, at)| *at).filter(|(_, at)| *at < now) {
                *oldest = (pod, now);
            }
            return false;
        }
        self.pods.push((pod, now));
        false
    }
}

/// Block hash → pods that were sent a prompt containing that block.
#[derive(Debug)]
pub struct PrefixIndex {
    /// Unbounded to the `lru` crate (which would allocate the whole capacity up
    /// front); [`PrefixIndex::record`] keeps it within `capacity`.
    blocks: Mutex<LruCache<u64, Holders>>,
    capacity: usize,
    idle_limit: Duration,
}

impl PrefixIndex {
    pub fn new(capacity_blocks: usize, idle_limit: Duration) -> Self {
        Self { blocks: Mutex::new(LruCache::unbounded()), capacity: capacity_blocks.max(1), idle_limit }
    }

    /// How long a pod's hold on a block lasts without being renewed.
    pub fn idle_limit(&self) -> Duration {
        self.idle_limit
    }

    /// For each of `pods`, how many leading blocks of `hashes` it holds.
    ///
    /// A block's hash names its whole prefix, so a pod holding block `i` was
    /// sent blocks `0..=i`: its depth is one past the deepest block it holds,
    /// whether or not the blocks before are still remembered (other
    /// replicas tell some blocks and the last, see [`shared_blocks`]). The
    /// walk ends a [`shared_stride`] of this prompt past the last block any
    /// of `pods` holds: a shorter prompt told before had no wider stride.
    pub fn match_depths(&self, hashes: &[u64], pods: &[u64], depths: &mut Vec<usize>) {
        self.match_prefix(hashes, pods, depths, &mut Vec::new());
    }

    /// [`Self::match_depths`], and for each of `pods` whether the deepest
    /// block it holds ends a prefix several prompts went on past in
    /// different ways ([`SHARED_CONTINUATIONS`]; `false` when it holds none).
    pub fn match_prefix(&self, hashes: &[u64], pods: &[u64], depths: &mut Vec<usize>, shared: &mut Vec<bool>) {
        depths.clear();
        depths.resize(pods.len(), 0);
        shared.clear();
        shared.resize(pods.len(), false);
        let now = Instant::now();
        let stride = shared_stride(hashes.len());
        let mut misses = 0;
        let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, hash) in hashes.iter().enumerate() {
            let mut held = false;
            if let Some(holders) = blocks.get(hash) {
                for ((depth, shared), pod) in depths.iter_mut().zip(shared.iter_mut()).zip(pods) {
                    if holders.holds(*pod, now, self.idle_limit) {
                        *depth = i + 1;
                        *shared = holders.continuations >= SHARED_CONTINUATIONS;
                        held = true;
                    }
                }
            }
            misses = if held { 0 } else { misses + 1 };
            if misses >= stride {
                break;
            }
        }
    }

    /// Records that `pod` was sent these blocks; returns how many leading
    /// blocks it already held.
    pub fn record(&self, hashes: &[u64], pod: u64) -> usize {
        self.record_at(hashes, pod, Instant::now())
    }

    /// Records that `pod` was sent these blocks at `now` (another replica's
    /// decision, told later); returns how many leading blocks it already held.
    pub fn record_at(&self, hashes: &[u64], pod: u64, now: Instant) -> usize {
        let mut held = 0;
        let mut leading = true;
        let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut previous = None;
        for hash in hashes {
            let had = match blocks.get_mut(hash) {
                Some(holders) => holders.touch(pod, now, self.idle_limit),
                None => {
                    // A block not seen before: the prompt went on past the one before it.
                    if let Some(before) = previous.and_then(|before| blocks.peek_mut(&before)) {
                        before.continuations = before.continuations.saturating_add(1);
                    }
                    if blocks.len() >= self.capacity {
                        blocks.pop_lru();
                    }
                    blocks.put(*hash, Holders { pods: vec![(pod, now)], continuations: 0 });
                    false
                }
            };
            previous = Some(*hash);
            leading &= had;
            if leading {
                held += 1;
            }
        }
        held
    }

    /// Blocks remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.blocks.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher(block_size: u32) -> PrefixHasher {
        PrefixHasher::new(&RoutingConfig { prefix_cache_block_size: block_size, ..RoutingConfig::default() })
    }

    #[test]
    fn hashes_whole_blocks_chained() {
        let h = hasher(4);
        let abc = h.hashes("aaaabbbbcc");
        assert_eq!(abc.len(), 2, "the partial block is not hashed");
        assert_eq!(h.hashes("aaaabbbbzz"), abc, "only whole blocks count");
        let other_start = h.hashes("zzzzbbbb");
        assert_ne!(other_start[1], abc[1], "a block's hash depends on everything before it");
        // The AIBrix chain: h0 = xxh64(seed, le64(seed) || block0).
        let mut expected = Xxh64::new(0);
        expected.update(&0u64.to_le_bytes());
        expected.update(b"aaaa");
        assert_eq!(abc[0], expected.digest());
        assert!(h.hashes("abc").is_empty());
    }

    #[test]
    fn tiktoken_blocks_are_four_bytes_per_token() {
        let h = PrefixHasher::new(&RoutingConfig {
            prefix_cache_block_size: 8,
            prefix_cache_tokenizer_type: PrefixTokenizer::Tiktoken,
            ..RoutingConfig::default()
        });
        let text = "hello world, this is a prompt with several tokens";
        let tokens = crate::tokens::count_tokens(text) as usize;
        assert_eq!(h.hashes(text).len(), tokens / 2);
    }

    #[test]
    fn only_the_head_of_a_huge_prompt_is_hashed() {
        let h = hasher(128);
        let huge = "x".repeat(8 << 20);
        assert_eq!(h.hashes(&huge).len(), HASHED_PROMPT_BYTES / 128);
        let differs_late = format!("{}y", &huge[..HASHED_PROMPT_BYTES + 10]);
        assert_eq!(h.hashes(&differs_late), h.hashes(&huge));
    }

    #[test]
    fn depths_follow_the_longest_held_prefix() {
        let index = PrefixIndex::new(100, Duration::from_secs(60));
        let h = hasher(2);
        let long = h.hashes("aabbccdd");
        let (a, b, c) = (pod_id("ns/a"), pod_id("ns/b"), pod_id("ns/c"));
        assert_eq!(index.record(&long, a), 0);
        assert_eq!(index.record(&long[..2], b), 0);
        assert_eq!(index.record(&long, a), 4, "a held all four");
        let mut depths = Vec::new();
        index.match_depths(&long, &[a, b, c], &mut depths);
        assert_eq!(depths, [4, 2, 0]);
        let diverging = h.hashes("aabbxxdd");
        index.match_depths(&diverging, &[a, b, c], &mut depths);
        assert_eq!(depths, [2, 2, 0], "shared prefix only");
    }

    #[test]
    fn bounded_in_blocks_and_in_time() {
        let h = hasher(1);
        let pod = pod_id("ns/a");
        let index = PrefixIndex::new(3, Duration::from_secs(60));
        index.record(&h.hashes("abcdef"), pod);
        assert_eq!(index.len(), 3, "least recently used blocks went");
        let mut depths = Vec::new();
        index.match_depths(&h.hashes("abcdef"), &[pod], &mut depths);
        assert_eq!(depths, [6], "the last block remembered names the whole prefix");
        index.record(&h.hashes("xyz"), pod);
        index.match_depths(&h.hashes("abcdef"), &[pod], &mut depths);
        assert_eq!(depths, [0], "all of its blocks were evicted");

        let lapsing = PrefixIndex::new(100, Duration::from_millis(1));
        lapsing.record(&h.hashes("ab"), pod);
        lapsing.match_depths(&h.hashes("ab"), &[pod], &mut depths);
        assert_eq!(depths, [2]);
        std::thread::sleep(Duration::from_millis(5));
        lapsing.match_depths(&h.hashes("ab"), &[pod], &mut depths);
        assert_eq!(depths, [0], "idle holds lapse");
        assert_eq!(lapsing.record(&h.hashes("ab"), pod), 0, "a lapsed hold is no hit");
    }

    #[test]
    fn a_pod_told_every_eighth_block_and_the_last_matches_to_the_block() {
        let h = hasher(1);
        let index = PrefixIndex::new(1000, Duration::from_secs(60));
        let (a, b) = (pod_id("ns/a"), pod_id("ns/b"));
        let shared_prefix = "s".repeat(30);
        let told_a: Vec<u64> = shared_blocks(&h.hashes(&format!("{shared_prefix}{}", "a".repeat(21)))).collect();
        assert_eq!(told_a.len(), 51 / MIN_SHARED_STRIDE + 1, "every eighth and the last");
        index.record_at(&told_a, a, Instant::now());
        index.record_at(&shared_blocks(&h.hashes(&shared_prefix)).collect::<Vec<_>>(), b, Instant::now());
        // The next turn of `a`'s conversation: `a` holds all 51 blocks, `b` the 30 shared.
        let next = h.hashes(&format!("{shared_prefix}{}{}", "a".repeat(21), "next turn".repeat(5)));
        let mut depths = Vec::new();
        index.match_depths(&next, &[a, b], &mut depths);
        assert_eq!(depths, [51, 30]);
        // Another conversation under the same system prompt: only the shared part.
        index.match_depths(&h.hashes(&format!("{shared_prefix}{}", "z".repeat(40))), &[a, b], &mut depths);
        assert_eq!(depths, [24, 30], "`a` was told of block 23 of the shared part, `b` of its last");
        assert_eq!(shared_blocks(&[]).count(), 0);
    }

    #[test]
    fn a_long_prompt_is_told_in_a_bounded_number_of_blocks_spanning_all_of_it() {
        let h = hasher(1);
        let index = PrefixIndex::new(100_000, Duration::from_secs(60));
        let (a, b) = (pod_id("ns/a"), pod_id("ns/b"));
        // Two conversations sharing 40 KB of tools, told of by other replicas.
        let tools = "t".repeat(40_000);
        let first_a = h.hashes(&format!("{tools}{}", "a".repeat(3000)));
        let first_b = h.hashes(&format!("{tools}{}", "b".repeat(3000)));
        let told: Vec<u64> = shared_blocks(&first_a).collect();
        assert!(told.len() <= SHARED_BLOCKS + 1, "{} told", told.len());
        assert_eq!(told.last(), first_a.last(), "the last block is told");
        index.record_at(&told, a, Instant::now());
        index.record_at(&shared_blocks(&first_b).collect::<Vec<_>>(), b, Instant::now());
        let next_a = h.hashes(&format!("{tools}{}{}", "a".repeat(3000), "more".repeat(100)));
        let mut depths = Vec::new();
        index.match_depths(&next_a, &[a, b], &mut depths);
        assert_eq!(depths[0], first_a.len(), "`a` holds its whole first turn");
        assert!(depths[1] <= 40_000, "`b` only the tools: {}", depths[1]);
    }

    #[test]
    fn a_prefix_other_prompts_went_on_past_is_shared_a_history_is_not() {
        let h = hasher(2);
        let index = PrefixIndex::new(100, Duration::from_secs(60));
        let (a, b) = (pod_id("ns/a"), pod_id("ns/b"));
        let (mut depths, mut shared) = (Vec::new(), Vec::new());
        index.record(&h.hashes("SYSTEMturn1"), a);
        // The conversation's next turn: its history ends where the last turn did.
        index.match_prefix(&h.hashes("SYSTEMturn1turn2"), &[a, b], &mut depths, &mut shared);
        assert_eq!((depths.as_slice(), shared.as_slice()), ([5, 0].as_slice(), [false, false].as_slice()));
        // A second conversation under the same system prompt (or the first one's
        // turn retried with other words): not yet a shared prefix.
        index.record(&h.hashes("SYSTEMother"), b);
        index.match_prefix(&h.hashes("SYSTEMthird"), &[a, b], &mut depths, &mut shared);
        assert_eq!((depths.as_slice(), shared.as_slice()), ([3, 3].as_slice(), [false, false].as_slice()));
        // A third: the system prompt is shared.
        index.record(&h.hashes("SYSTEMthird"), a);
        index.match_prefix(&h.hashes("SYSTEMfourth"), &[a, b], &mut depths, &mut shared);
        assert_eq!((depths.as_slice(), shared.as_slice()), ([3, 3].as_slice(), [true, true].as_slice()));
    }

    #[test]
    fn holders_per_block_are_capped() {
        let index = PrefixIndex::new(10, Duration::from_secs(60));
        let hashes = hasher(1).hashes("a");
        for i in 0..(MAX_HOLDERS + 4) {
            index.record(&hashes, pod_id(&format!("ns/p{i}")));
        }
        let last = pod_id(&format!("ns/p{}", MAX_HOLDERS + 3));
        let first = pod_id("ns/p0");
        let mut depths = Vec::new();
        index.match_depths(&hashes, &[first, last], &mut depths);
        assert_eq!(depths, [0, 1]);
    }
}
