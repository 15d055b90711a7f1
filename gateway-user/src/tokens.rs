//! Prompt tokens: counting them as AIBrix does (cl100k), bounded whatever
//! the prompt, and the pieces the tokenizer is given. The request path
//! counts prompt tokens for `config-profile: auto` and limits; prefix-aware
//! routing may hash tokens instead of bytes.

use std::sync::OnceLock;

/// Prompt bytes whose tokens are counted; a longer prompt's count is
/// extrapolated from them (profile thresholds are a few thousand tokens, far
/// below this).
pub const COUNTED_PROMPT_BYTES: usize = 128 * 1024;
/// Longest text the BPE tokenizer is given at once. Its cost grows with the
/// square of a run without spaces (7 MB of one "word" took 6 s), so text is
/// cut into pieces of at most this, at a space where there is one.
const TOKENIZE_PIECE_BYTES: usize = 2048;

/// Counts prompt tokens with the cl100k tokenizer AIBrix uses, exactly up to
/// [`COUNTED_PROMPT_BYTES`] and extrapolated past it, so the work is bounded
/// whatever the prompt. The BPE tables load on first use (only
/// `config-profile: auto` needs them).
pub fn count_tokens(text: &str) -> i64 {
    let count = match cl100k() {
        Some(bpe) => {
            let head = char_prefix(text, COUNTED_PROMPT_BYTES);
            let counted: usize = tokenizer_pieces(head).map(|piece| bpe.encode_ordinary(piece).len()).sum();
            if head.len() == text.len() || head.is_empty() {
                counted
            } else {
                // The rest is assumed as dense as the head.
                let scaled = counted as u128 * text.len() as u128 / head.len() as u128;
                usize::try_from(scaled).unwrap_or(usize::MAX)
            }
        }
        // A rough, documented fallback: about four bytes per token.
        None => text.len().div_ceil(4),
    };
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Counts every prompt token with cl100k (no extrapolation): for
/// prompt-length buckets, whose boundaries may sit at long-context sizes.
/// Linear in the prompt (the tokenizer sees bounded pieces); callers run it
/// off the async workers for large bodies.
pub fn count_tokens_exact(text: &str) -> i64 {
    let count = match cl100k() {
        Some(bpe) => tokenizer_pieces(text).map(|piece| bpe.encode_ordinary(piece).len()).sum(),
        None => text.len().div_ceil(4),
    };
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
pub fn char_prefix(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` cut into pieces of at most [`TOKENIZE_PIECE_BYTES`], each ending
/// after the last whitespace of its window when the window has one in its
/// second half (so words stay whole), else at a character boundary. The
/// cuts depend only on the text before them, so two prompts sharing a
/// prefix are cut, and tokenized, alike over it.
pub fn tokenizer_pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = char_prefix(rest, TOKENIZE_PIECE_BYTES);
        let window = if window.is_empty() { &rest[..rest.chars().next().map_or(0, char::len_utf8)] } else { window };
        let cut = if window.len() == rest.len() {
            window.len()
        } else {
            match window.rfind(char::is_whitespace) {
                Some(at) if at >= window.len() / 2 => at,
                _ => window.len(),
            }
        };
        let (piece, tail) = rest.split_at(cut.max(1).min(rest.len()));
        rest = tail;
        Some(piece)
    })
}

/// The cl100k tokenizer, loaded on first use and shared (prompt tokens are
/// counted with it, prefix-aware routing may hash its tokens); `None`
/// if its tables failed to load, which is logged once.
pub fn cl100k() -> Option<&'static tiktoken_rs::CoreBPE> {
    static BPE: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| match tiktoken_rs::cl100k_base() {
        Ok(bpe) => Some(bpe),
        Err(err) => {
            tracing::error!(error = %err, "cl100k tokenizer failed to load; estimating tokens from length");
            None
        }
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_tokens_with_cl100k() {
        assert_eq!(count_tokens("hello world"), 2);
        assert_eq!(count_tokens(""), 0);
        assert!(count_tokens(&"lorem ipsum ".repeat(1000)) >= 2000);
    }

    #[test]
    fn long_prompts_are_counted_in_bounded_pieces() {
        // Pieces cover the text exactly, never exceed the bound, and cut at
        // character boundaries (a 2-byte character straddles every window).
        let text = format!("{}{}", "é".repeat(5000), "word ".repeat(2000));
        let pieces: Vec<&str> = tokenizer_pieces(&text).collect();
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= TOKENIZE_PIECE_BYTES));
        assert!(pieces.iter().skip(5).all(|p| p.starts_with(' ') || p.starts_with('w')), "cut at spaces");
        // Counting in pieces stays close to counting whole.
        let prose = "The quick brown fox jumps over the lazy dog. ".repeat(200);
        let whole = cl100k().map(|bpe| bpe.encode_ordinary(&prose).len() as i64).unwrap_or(0);
        let pieces = count_tokens(&prose);
        assert!((pieces - whole).abs() * 100 <= whole, "{pieces} vs {whole}");
        // Past the counted head the count is extrapolated, not computed.
        let long = "a".repeat(7 << 20);
        let estimate = count_tokens(&long);
        let head = count_tokens(&long[..COUNTED_PROMPT_BYTES]);
        assert_eq!(estimate, head * (7 << 20) / COUNTED_PROMPT_BYTES as i64);
    }
}
