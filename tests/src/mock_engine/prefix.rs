//! A model of vLLM's automatic prefix caching: prompts are cut into blocks of words (the
//! mock's tokens), each block named by a hash chained over the blocks before it, and the
//! engine remembers the most recently used blocks. A new prompt's leading blocks found in the
//! cache are "cached tokens": they cost no prefill time, and `/metrics` counts them in
//! `vllm:prefix_cache_hits_total` against `vllm:prefix_cache_queries_total`.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};

use lru::LruCache;
use serde_json::Value;

/// The blocks an engine holds.
#[derive(Debug)]
pub struct PrefixCache {
    block_words: usize,
    /// `None` when caching is off: nothing is ever a hit.
    blocks: Option<Mutex<LruCache<u64, ()>>>,
}

impl PrefixCache {
    /// A cache of `capacity_blocks` blocks of `block_words` words; 0 blocks turns it off.
    pub fn new(capacity_blocks: u64, block_words: u32) -> Self {
        let capacity = usize::try_from(capacity_blocks).ok().and_then(NonZeroUsize::new);
        Self {
            block_words: usize::try_from(block_words).unwrap_or(1).max(1),
            blocks: capacity.map(|capacity| Mutex::new(LruCache::new(capacity))),
        }
    }

    /// Whether prompts are looked up at all.
    pub fn enabled(&self) -> bool {
        self.blocks.is_some()
    }

    /// Looks the request body's prompt up and then holds all its whole blocks; returns how
    /// many leading words were already cached.
    pub fn lookup_and_insert(&self, body: &[u8]) -> u64 {
        let Some(blocks) = &self.blocks else { return 0 };
        let Ok(request) = serde_json::from_slice::<Value>(body) else { return 0 };
        let mut words = Vec::new();
        for field in ["instructions", "messages", "prompt", "input"] {
            if let Some(value) = request.get(field) {
                collect_words(value, &mut words);
            }
        }
        let mut blocks = blocks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut previous = 0u64;
        let mut cached = 0u64;
        let mut leading = true;
        for block in words.chunks_exact(self.block_words) {
            let mut hasher = DefaultHasher::new();
            previous.hash(&mut hasher);
            block.hash(&mut hasher);
            previous = hasher.finish();
            let hit = blocks.get(&previous).is_some();
            if !hit {
                blocks.put(previous, ());
            }
            leading &= hit;
            if leading {
                cached += block.len() as u64;
            }
        }
        cached
    }
}

/// The words of a prompt-like value in order, counted as `request::WordCount` counts them.
fn collect_words<'a>(value: &'a Value, words: &mut Vec<&'a str>) {
    match value {
        Value::String(text) => words.extend(text.split_whitespace()),
        Value::Number(_) => words.push("#"),
        Value::Array(items) => items.iter().for_each(|item| collect_words(item, words)),
        Value::Object(map) => {
            for (key, value) in map {
                if key == "content" || key == "text" {
                    collect_words(value, words);
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(messages: &[&str]) -> Vec<u8> {
        let messages: Vec<Value> = messages.iter().map(|m| serde_json::json!({"role": "user", "content": m})).collect();
        serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages})).unwrap()
    }

    #[test]
    fn leading_blocks_seen_before_are_cached() {
        let cache = PrefixCache::new(100, 2);
        let system = "one two three four five";
        assert_eq!(cache.lookup_and_insert(&chat(&[system, "six seven"])), 0);
        // The same conversation one turn later: the first 3 whole blocks (6 words) are held.
        assert_eq!(cache.lookup_and_insert(&chat(&[system, "six seven", "eight nine ten"])), 6);
        // Another prompt sharing the first two blocks only.
        assert_eq!(cache.lookup_and_insert(&chat(&[system, "other words here"])), 4);
        // A different start shares nothing, even with equal later blocks.
        assert_eq!(cache.lookup_and_insert(&chat(&["zero", system])), 0);
    }

    #[test]
    fn off_by_default_and_bounded() {
        let off = PrefixCache::new(0, 2);
        assert!(!off.enabled());
        let body = chat(&["a b c d"]);
        off.lookup_and_insert(&body);
        assert_eq!(off.lookup_and_insert(&body), 0);

        let small = PrefixCache::new(2, 1);
        small.lookup_and_insert(&chat(&["a b c"]));
        assert_eq!(small.lookup_and_insert(&chat(&["a b c"])), 0, "the first block was evicted");
        assert_eq!(small.lookup_and_insert(&serde_json::to_vec(&serde_json::json!({"prompt": "x"})).unwrap()), 0);
    }
}
