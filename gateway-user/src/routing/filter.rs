//! `external-filter: <label selector>`: restricts the candidate pods before
//! a strategy sees them, with Kubernetes label-selector syntax.
//!
//! Requirements are comma-joined and must all hold: `k=v` (or `k==v`),
//! `k!=v` (also true when the label is absent), `k in (a,b)`,
//! `k notin (a,b)` (also true when absent), `k` (the label exists) and `!k`
//! (it does not). An empty selector matches every pod.

use std::collections::BTreeMap;

/// A parsed label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelSelector {
    /// Parses `text`, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err("empty requirement".to_owned());
            }
            requirements.push(Requirement::parse(part)?);
        }
        Ok(Self { requirements })
    }

    /// Whether a pod with `labels` satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    fn parse(text: &str) -> Result<Self, String> {
        if let Some(key) = text.strip_prefix('!') {
            let key = key.trim();
            check_key(key)?;
            return Ok(Self::DoesNotExist(key.to_owned()));
        }
        let key_len = text.find(|c: char| !is_key_char(c)).unwrap_or(text.len());
        let (key, rest) = text.split_at(key_len);
        check_key(key)?;
        let key = key.to_owned();
        let rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(Self::Exists(key));
        }
        if let Some(value) = rest.strip_prefix("!=") {
            return Ok(Self::NotEquals(key, value_of(value)?));
        }
        if let Some(value) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
            return Ok(Self::Equals(key, value_of(value)?));
        }
        if let Some(set) = word(rest, "notin") {
            return Ok(Self::NotIn(key, set_of(set)?));
        }
        if let Some(set) = word(rest, "in") {
            return Ok(Self::In(key, set_of(set)?));
        }
        Err(format!("unexpected {rest:?} after key {key:?}"))
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => labels.get(k) == Some(v),
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::In(k, set) => labels.get(k).is_some_and(|v| set.contains(v)),
            Self::NotIn(k, set) => labels.get(k).is_none_or(|v| !set.contains(v)),
            Self::Exists(k) => labels.contains_key(k),
            Self::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// Splits on commas outside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err("nested parentheses".to_owned()),
            ')' if depth == 1 => depth = 0,
            ')' => return Err("unbalanced ')'".to_owned()),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unclosed '('".to_owned());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

/// `rest` without the operator word `op`, if it starts with it as a whole word.
fn word<'a>(rest: &'a str, op: &str) -> Option<&'a str> {
    let after = rest.strip_prefix(op)?;
    (after.starts_with(|c: char| c.is_whitespace() || c == '(')).then_some(after)
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// A label key: an optional DNS prefix and `/`, then a name of at most 63 characters.
fn check_key(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) if !prefix.is_empty() && prefix.len() <= 253 && !name.contains('/') => name,
        Some(_) => return Err(format!("invalid label key {key:?}")),
        None => key,
    };
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && key.chars().all(is_key_char);
    if ok { Ok(()) } else { Err(format!("invalid label key {key:?}")) }
}

fn value_of(text: &str) -> Result<String, String> {
    let value = text.trim();
    if value.len() <= 63 && value.chars().all(is_value_char) {
        Ok(value.to_owned())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

fn set_of(text: &str) -> Result<Vec<String>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised value list, got {:?}", text.trim()))?;
    let values = inner.split(',').map(value_of).collect::<Result<Vec<_>, _>>()?;
    if values.iter().all(String::is_empty) {
        return Err("empty value list".to_owned());
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[rstest]
    #[case::equals("zone=a", &[("zone", "a")], true)]
    #[case::double_equals("zone == a", &[("zone", "a")], true)]
    #[case::equals_other("zone=a", &[("zone", "b")], false)]
    #[case::equals_absent("zone=a", &[], false)]
    #[case::not_equals("zone!=a", &[("zone", "b")], true)]
    #[case::not_equals_absent("zone!=a", &[], true)]
    #[case::not_equals_same("zone!=a", &[("zone", "a")], false)]
    #[case::in_set("zone in (a, b)", &[("zone", "b")], true)]
    #[case::in_set_no_space("zone in(a,b)", &[("zone", "c")], false)]
    #[case::in_absent("zone in (a)", &[], false)]
    #[case::notin("zone notin (a,b)", &[("zone", "c")], true)]
    #[case::notin_absent("zone notin (a,b)", &[], true)]
    #[case::notin_member("zone notin (a,b)", &[("zone", "a")], false)]
    #[case::exists("gpu", &[("gpu", "")], true)]
    #[case::exists_absent("gpu", &[], false)]
    #[case::does_not_exist("!gpu", &[], true)]
    #[case::does_not_exist_present("!gpu", &[("gpu", "h100")], false)]
    #[case::conjunction("zone in (a,b),gpu=h100,!spot", &[("zone", "a"), ("gpu", "h100")], true)]
    #[case::conjunction_fails("zone in (a,b),gpu=h100", &[("zone", "a"), ("gpu", "a100")], false)]
    #[case::prefixed_key("model.aibrix.ai/engine=vllm", &[("model.aibrix.ai/engine", "vllm")], true)]
    #[case::empty_matches_all("", &[], true)]
    #[case::empty_value("tier=", &[("tier", "")], true)]
    fn selects(#[case] selector: &str, #[case] pod: &[(&str, &str)], #[case] expected: bool) {
        let parsed = LabelSelector::parse(selector).unwrap_or_else(|e| panic!("{selector:?}: {e}"));
        assert_eq!(parsed.matches(&labels(pod)), expected, "{selector:?} on {pod:?}");
    }

    #[rstest]
    #[case::unclosed("zone in (a,b")]
    #[case::no_parens("zone in a,b")]
    #[case::bad_operator("zone > 3")]
    #[case::trailing_comma("zone=a,")]
    #[case::bad_key("-zone=a")]
    #[case::bad_value("zone=a b")]
    #[case::empty_set("zone in ()")]
    #[case::nested("zone in ((a))")]
    #[case::stray_close("zone=a)")]
    #[case::double_slash("a/b/c=d")]
    fn rejects(#[case] selector: &str) {
        assert!(LabelSelector::parse(selector).is_err(), "{selector:?} should not parse");
    }
}
