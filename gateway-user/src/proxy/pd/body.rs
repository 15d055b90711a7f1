//! A JSON object edited at its top level only: every value the gateway does
//! not set keeps the client's bytes (nested key order, number spelling), so
//! the prefill and decode bodies render the same prompt as the client's
//! request would, and an engine's prefix cache and tokenisation see no
//! difference. Repeated keys are kept as sent until one is set or removed,
//! so a check for them can say which.

use std::fmt::Write as _;

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON object's top-level members, in order, values unparsed.
#[derive(Debug, Clone)]
pub struct TopLevel {
    members: Vec<(String, Box<RawValue>)>,
}

impl TopLevel {
    /// Reads `bytes` as a JSON object.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let members = de.deserialize_map(MembersVisitor).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok(Self { members })
    }

    /// The first of `keys` that appears more than once.
    pub fn repeated<'k>(&self, keys: &[&'k str]) -> Option<&'k str> {
        keys.iter().copied().find(|key| self.members.iter().filter(|(k, _)| k == key).nth(1).is_some())
    }

    /// The raw value of `key` (its last occurrence, as JSON parsers read it).
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }

    /// Sets `key` to `value` (JSON text), in place of its first occurrence
    /// (later ones go), or at the end.
    pub fn set_raw(&mut self, key: &str, value: Box<RawValue>) {
        match self.members.iter().position(|(k, _)| k == key) {
            Some(first) => {
                let mut index = 0;
                self.members.retain(|(k, _)| {
                    let keep = k != key || index == first;
                    index += 1;
                    keep
                });
                if let Some(member) = self.members.get_mut(first) {
                    member.1 = value;
                }
            }
            None => self.members.push((key.to_owned(), value)),
        }
    }

    /// Sets `key` to `value`.
    pub fn set(&mut self, key: &str, value: &impl serde::Serialize) -> Result<(), String> {
        let raw = serde_json::value::to_raw_value(value).map_err(|e| e.to_string())?;
        self.set_raw(key, raw);
        Ok(())
    }

    /// Removes every occurrence of `key`.
    pub fn remove(&mut self, key: &str) {
        self.members.retain(|(k, _)| k != key);
    }

    /// The object as JSON text.
    pub fn to_bytes(&self) -> Bytes {
        let size = self.members.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum::<usize>() + 2;
        let mut out = String::with_capacity(size);
        out.push('{');
        for (i, (key, value)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // A key serialises infallibly; the fallback only keeps the text valid.
            let quoted = serde_json::to_string(key).unwrap_or_else(|_| String::from("\"\""));
            let _ = write!(out, "{quoted}:{}", value.get());
        }
        out.push('}');
        Bytes::from(out)
    }
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Vec<(String, Box<RawValue>)>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
        while let Some((key, value)) = map.next_entry::<String, Box<RawValue>>()? {
            members.push((key, value));
        }
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_members_keep_the_clients_bytes() {
        let body = br#"{"model":"m","tools":[{"z":1,"a":2.50}],"max_tokens":9,"stream":true}"#;
        let mut object = TopLevel::parse(body).expect("object");
        object.set("max_tokens", &1).expect("set");
        object.set("bootstrap_room", &7_u64).expect("set");
        object.remove("stream");
        assert_eq!(
            &object.to_bytes()[..],
            br#"{"model":"m","tools":[{"z":1,"a":2.50}],"max_tokens":1,"bootstrap_room":7}"#
        );
    }

    #[test]
    fn repeated_keys_are_found_and_setting_one_leaves_one() {
        let mut object = TopLevel::parse(br#"{"min_tokens":1,"a":"x","min_tokens":2}"#).expect("object");
        assert_eq!(object.repeated(&["a", "min_tokens"]), Some("min_tokens"));
        assert_eq!(object.get("min_tokens").map(RawValue::get), Some("2"), "the last one, as parsers read it");
        object.set("min_tokens", &5).expect("set");
        assert_eq!(object.repeated(&["min_tokens"]), None);
        assert_eq!(&object.to_bytes()[..], br#"{"min_tokens":5,"a":"x"}"#);
    }

    #[test]
    fn keys_are_escaped_and_non_objects_refused() {
        let object = TopLevel::parse(br#"{"a\"b\u00e9":null}"#).expect("object");
        let again = TopLevel::parse(&object.to_bytes()).expect("round trip");
        assert!(again.get("a\"bé").is_some());
        assert!(TopLevel::parse(b"[1]").is_err());
        assert!(TopLevel::parse(br#"{"a":1} x"#).is_err());
        assert!(TopLevel::parse(br#"{"a":1"#).is_err());
    }
}
