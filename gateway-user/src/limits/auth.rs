//! Optional gateway bearer auth (`AIBRIX_AUTH_BEARER_TOKEN`).
//!
//! Both tokens are hashed with SHA-256 and the digests compared in constant
//! time, as AIBrix does: the comparison takes the same time whatever the
//! given token, its length included.

use http::HeaderMap;
use http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The configured token, kept only as its digest.
pub struct BearerAuth {
    expected: [u8; 32],
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(..)")
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl BearerAuth {
    /// `None` when no token is configured (auth off). Surrounding whitespace
    /// (a trailing newline from a mounted secret) is not part of the token.
    pub fn new(token: Option<&str>) -> Option<Self> {
        let token = token.map(str::trim).filter(|t| !t.is_empty())?;
        Some(Self { expected: digest(token.as_bytes()) })
    }

    /// True when `Authorization: Bearer <token>` (scheme case-insensitive)
    /// carries the configured token.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let given = headers
            .get(AUTHORIZATION)
            .map(|value| value.as_bytes())
            .and_then(|value| {
                let (scheme, rest) = value.split_at_checked(6)?;
                let separated = rest.first().is_some_and(|b| *b == b' ' || *b == b'\t');
                (scheme.eq_ignore_ascii_case(b"bearer") && separated).then_some(rest)
            })
            .map(<[u8]>::trim_ascii)
            .filter(|token| !token.is_empty());
        match given {
            Some(token) => digest(token).ct_eq(&self.expected).into(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use rstest::rstest;

    fn headers(authorization: Option<&'static str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = authorization {
            h.insert(AUTHORIZATION, HeaderValue::from_static(v));
        }
        h
    }

    #[rstest]
    #[case::exact(Some("Bearer s3cret"), true)]
    #[case::scheme_any_case(Some("bEaReR s3cret"), true)]
    #[case::extra_spaces(Some("Bearer   s3cret "), true)]
    #[case::wrong(Some("Bearer s3cre"), false)]
    #[case::longer(Some("Bearer s3cret!"), false)]
    #[case::other_scheme(Some("Basic s3cret"), false)]
    #[case::no_space(Some("Bearers3cret"), false)]
    #[case::scheme_only(Some("Bearer"), false)]
    #[case::empty_token(Some("Bearer  "), false)]
    #[case::absent(None, false)]
    fn bearer_token_compare(#[case] authorization: Option<&'static str>, #[case] allowed: bool) {
        let auth = BearerAuth::new(Some("s3cret\n")).expect("configured");
        assert_eq!(auth.allows(&headers(authorization)), allowed);
    }

    #[test]
    fn blank_token_means_auth_off() {
        assert!(BearerAuth::new(None).is_none());
        assert!(BearerAuth::new(Some("  ")).is_none());
    }
}
