//! Users and their RPM/TPM limits: AIBrix's records `aibrix-users/<user>` in
//! Redis (JSON `{"name","rpm","tpm"}`), a users file, and the defaults for
//! users found in neither. Also the `turnstile users` commands.
//!
//! Turnstile's rules: a limit that is absent or below 1 in a record means
//! "the default" for that dimension; the defaults themselves are none unless
//! configured. AIBrix's rules ([`UserRecord::aibrix_limits`]): rpm 0 is 100,
//! tpm 0 is rpm × 1000, and a user without a record is refused.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{UserCheck, UserLimits, UserLimitsMode, user_record_key};

/// AIBrix's answer for a user without a record: Go's text for a missing
/// Redis key.
pub const NO_RECORD: &str = "redis: nil";
/// AIBrix's RPM of a record whose rpm is 0 (or absent).
pub const AIBRIX_DEFAULT_RPM: i64 = 100;
/// AIBrix's TPM of a record whose tpm is 0 (or absent), per request per minute.
pub const AIBRIX_TPM_PER_RPM: i64 = 1000;

/// A user record as AIBrix stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<i64>,
}

/// Why a users file was refused.
#[derive(Debug, thiserror::Error)]
pub enum UsersFileError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not a JSON or YAML list of {{name, rpm, tpm}}: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}: user {name:?} appears twice")]
    Duplicate { path: String, name: String },
    #[error("{path}: a user has an empty name")]
    EmptyName { path: String },
}

/// Parses a users file: a JSON or YAML list of records.
pub fn parse_users(text: &str, path: &str) -> Result<Vec<UserRecord>, UsersFileError> {
    let parse_error = |reason: String| UsersFileError::Parse { path: path.to_owned(), reason };
    let records: Vec<UserRecord> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(|e| parse_error(e.to_string()))?
    } else {
        serde_norway::from_str(text).map_err(|e| parse_error(e.to_string()))?
    };
    let mut seen = std::collections::HashSet::new();
    for record in &records {
        if record.name.trim().is_empty() {
            return Err(UsersFileError::EmptyName { path: path.to_owned() });
        }
        if !seen.insert(record.name.as_str()) {
            return Err(UsersFileError::Duplicate { path: path.to_owned(), name: record.name.clone() });
        }
    }
    Ok(records)
}

/// Reads and parses a users file.
pub fn load_users_file(path: &Path) -> Result<Vec<UserRecord>, UsersFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| UsersFileError::Read { path: shown.clone(), source })?;
    parse_users(&text, &shown)
}

fn positive(n: Option<i64>) -> Option<u64> {
    n.and_then(|n| u64::try_from(n).ok()).filter(|n| *n > 0)
}

impl UserRecord {
    /// The record's limits, with `defaults` where it sets none.
    pub fn limits(&self, defaults: UserLimits) -> UserLimits {
        UserLimits { rpm: positive(self.rpm).or(defaults.rpm), tpm: positive(self.tpm).or(defaults.tpm) }
    }

    /// The record's limits under AIBrix's rules: rpm 0 (or absent) is 100,
    /// tpm 0 (or absent) is rpm × 1000. Both are always limited. A negative
    /// limit refuses every request, as in AIBrix (whose message shows the
    /// negative number where this one shows 0).
    pub fn aibrix_limits(&self) -> UserLimits {
        let rpm = match self.rpm.unwrap_or(0) {
            0 => AIBRIX_DEFAULT_RPM,
            rpm => rpm,
        };
        let tpm = match self.tpm.unwrap_or(0) {
            0 => rpm.saturating_mul(AIBRIX_TPM_PER_RPM),
            tpm => tpm,
        };
        let limit = |n: i64| Some(u64::try_from(n).unwrap_or(0));
        UserLimits { rpm: limit(rpm), tpm: limit(tpm) }
    }

    /// The record itself sets a TPM (not a default): AIBrix then requires
    /// usage on the user's streamed chats.
    pub fn sets_tpm(&self) -> bool {
        self.tpm.is_some_and(|tpm| tpm > 0)
    }
}

/// A user of the users file, as the rules in force see them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileUser {
    limits: UserLimits,
    record_tpm: bool,
}

/// Most users whose last-known limits are remembered for the backstop.
const LAST_KNOWN_CAP: usize = 10_000;

/// Where each user's limits come from.
#[derive(Debug)]
pub struct UserDirectory {
    file: HashMap<String, FileUser>,
    defaults: UserLimits,
    mode: UserLimitsMode,
    /// Read `aibrix-users/<user>` records from Redis.
    redis_records: bool,
    /// Limits last read from Redis, so the local backstop keeps enforcing
    /// them while Redis is unreachable.
    last_known: Mutex<HashMap<String, UserLimits>>,
}

impl UserDirectory {
    /// `defaults` apply under Turnstile's rules only (AIBrix has none for a
    /// user without a record).
    pub fn new(file: &[UserRecord], defaults: UserLimits, redis_records: bool, mode: UserLimitsMode) -> Self {
        let file = file
            .iter()
            .map(|r| {
                let limits = match mode {
                    UserLimitsMode::Turnstile => r.limits(defaults),
                    UserLimitsMode::Aibrix => r.aibrix_limits(),
                };
                (r.name.clone(), FileUser { limits, record_tpm: r.sets_tpm() })
            })
            .collect();
        Self { file, defaults, mode, redis_records, last_known: Mutex::new(HashMap::new()) }
    }

    /// Whose rules the directory applies.
    pub fn mode(&self) -> UserLimitsMode {
        self.mode
    }

    /// What to check for `user` in the shared store (Turnstile's rules). The
    /// users file wins over Redis records; `None` when the user has no limit
    /// anywhere, so nothing needs to be counted.
    pub fn check<'a>(&self, user: &'a str) -> Option<UserCheck<'a>> {
        let (limits, lookup_record) = match self.file.get(user) {
            Some(known) => (known.limits, false),
            None => (self.defaults, self.redis_records),
        };
        (lookup_record || limits.any()).then_some(UserCheck {
            user,
            limits,
            lookup_record,
            mode: UserLimitsMode::Turnstile,
            record_tpm: false,
        })
    }

    /// What to check for `user` under AIBrix's rules: the users file's
    /// record, else the Redis record (read by the check). `None`: the user has
    /// no record anywhere (no Redis to read one from).
    pub fn aibrix_check<'a>(&self, user: &'a str) -> Option<UserCheck<'a>> {
        let mode = UserLimitsMode::Aibrix;
        match self.file.get(user) {
            Some(known) => {
                Some(UserCheck { user, limits: known.limits, lookup_record: false, mode, record_tpm: known.record_tpm })
            }
            None if self.redis_records => {
                Some(UserCheck { user, limits: UserLimits::default(), lookup_record: true, mode, record_tpm: false })
            }
            None => None,
        }
    }

    /// What the local backstop checks while Redis is unreachable: the
    /// limits last read from Redis, else the file or the defaults.
    pub fn backstop_check<'a>(&self, user: &'a str) -> Option<UserCheck<'a>> {
        let limits = match self.file.get(user) {
            Some(known) => known.limits,
            None => self.lock_last_known().get(user).copied().unwrap_or(self.defaults),
        };
        limits.any().then_some(UserCheck {
            user,
            limits,
            lookup_record: false,
            mode: UserLimitsMode::Turnstile,
            record_tpm: false,
        })
    }

    /// Remembers the limits Redis answered with for `user`.
    pub fn remember(&self, user: &str, limits: UserLimits) {
        if !self.redis_records || self.file.contains_key(user) {
            return;
        }
        let mut known = self.lock_last_known();
        if known.get(user) == Some(&limits) {
            return;
        }
        if known.len() >= LAST_KNOWN_CAP {
            known.clear();
        }
        known.insert(user.to_owned(), limits);
    }

    fn lock_last_known(&self) -> std::sync::MutexGuard<'_, HashMap<String, UserLimits>> {
        self.last_known.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `turnstile users set`: creates or updates a record; fields not given keep
/// their stored value.
pub async fn set_user(url: &str, name: &str, rpm: Option<i64>, tpm: Option<i64>) -> anyhow::Result<UserRecord> {
    let mut connection = connect(url).await?;
    let key = user_record_key(name);
    let existing: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut connection).await?;
    let mut record = match existing {
        Some(raw) => serde_json::from_str::<UserRecord>(&raw).unwrap_or(UserRecord {
            name: name.to_owned(),
            rpm: None,
            tpm: None,
        }),
        None => UserRecord { name: name.to_owned(), rpm: None, tpm: None },
    };
    record.name = name.to_owned();
    record.rpm = rpm.or(record.rpm);
    record.tpm = tpm.or(record.tpm);
    let () = redis::cmd("SET").arg(&key).arg(serde_json::to_string(&record)?).query_async(&mut connection).await?;
    Ok(record)
}

/// `turnstile users show`: the stored record, if any.
pub async fn show_user(url: &str, name: &str) -> anyhow::Result<Option<String>> {
    let mut connection = connect(url).await?;
    Ok(redis::cmd("GET").arg(user_record_key(name)).query_async(&mut connection).await?)
}

/// `turnstile users list`: every stored record, sorted by key.
pub async fn list_users(url: &str) -> anyhow::Result<Vec<String>> {
    let mut connection = connect(url).await?;
    let (keys, _) = crate::redis_link::scan_keys(&mut connection, &user_record_key("*"), 500, usize::MAX).await?;
    let mut records = Vec::with_capacity(keys.len());
    for key in keys {
        let raw: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut connection).await?;
        if let Some(raw) = raw {
            records.push(raw);
        }
    }
    Ok(records)
}

async fn connect(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = super::redis_store::client(url)?;
    let connect = client.get_multiplexed_async_connection();
    match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(connection) => Ok(connection?),
        Err(_) => anyhow::bail!("no answer from Redis at {} within 5 s", super::redis_store::redacted(url)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const NONE: UserLimits = UserLimits { rpm: None, tpm: None };

    #[rstest]
    #[case::json(r#"[{"name":"alice","rpm":10,"tpm":1000},{"name":"bob","rpm":5}]"#)]
    #[case::yaml("- name: alice\n  rpm: 10\n  tpm: 1000\n- name: bob\n  rpm: 5\n")]
    fn users_file_in_json_or_yaml(#[case] text: &str) {
        let users = parse_users(text, "users").expect("parses");
        assert_eq!(users[0], UserRecord { name: "alice".into(), rpm: Some(10), tpm: Some(1000) });
        assert_eq!(users[1], UserRecord { name: "bob".into(), rpm: Some(5), tpm: None });
    }

    #[rstest]
    #[case::not_a_list(r#"{"name":"alice"}"#)]
    #[case::no_name("- rpm: 3\n")]
    #[case::empty_name(r#"[{"name":" "}]"#)]
    #[case::duplicate(r#"[{"name":"a"},{"name":"a"}]"#)]
    #[case::wrong_type(r#"[{"name":"a","rpm":"ten"}]"#)]
    fn bad_users_files_are_refused(#[case] text: &str) {
        assert!(parse_users(text, "users").is_err(), "{text}");
    }

    #[test]
    fn record_limits_fall_back_to_defaults_below_one() {
        let defaults = UserLimits { rpm: Some(100), tpm: None };
        let r = UserRecord { name: "a".into(), rpm: Some(0), tpm: Some(50) };
        assert_eq!(r.limits(defaults), UserLimits { rpm: Some(100), tpm: Some(50) });
        let r = UserRecord { name: "a".into(), rpm: Some(-1), tpm: None };
        assert_eq!(r.limits(NONE), NONE);
    }

    #[test]
    fn file_wins_then_redis_record_then_defaults() {
        let file = [UserRecord { name: "alice".into(), rpm: Some(1), tpm: None }];
        let dir = UserDirectory::new(&file, NONE, true, UserLimitsMode::Turnstile);
        let alice = dir.check("alice").expect("alice limited");
        assert_eq!((alice.limits.rpm, alice.lookup_record), (Some(1), false));
        let bob = dir.check("bob").expect("bob looked up in Redis");
        assert!(bob.lookup_record);

        let no_redis = UserDirectory::new(&file, NONE, false, UserLimitsMode::Turnstile);
        assert!(no_redis.check("bob").is_none(), "no limit anywhere: nothing to count");
        let defaults =
            UserDirectory::new(&file, UserLimits { rpm: Some(7), tpm: None }, false, UserLimitsMode::Turnstile);
        assert_eq!(defaults.check("bob").map(|c| c.limits.rpm), Some(Some(7)));
    }

    #[test]
    fn backstop_uses_limits_last_read_from_redis() {
        let dir = UserDirectory::new(&[], NONE, true, UserLimitsMode::Turnstile);
        assert!(dir.backstop_check("carol").is_none());
        dir.remember("carol", UserLimits { rpm: Some(3), tpm: Some(30) });
        let c = dir.backstop_check("carol").expect("remembered");
        assert_eq!(c.limits, UserLimits { rpm: Some(3), tpm: Some(30) });
        assert!(!c.lookup_record);
    }

    fn record(rpm: Option<i64>, tpm: Option<i64>) -> UserRecord {
        UserRecord { name: "u".into(), rpm, tpm }
    }

    #[rstest]
    #[case::all_defaults(None, None, 100, 100_000)]
    #[case::zeros_are_defaults(Some(0), Some(0), 100, 100_000)]
    #[case::tpm_follows_the_rpm(Some(7), None, 7, 7000)]
    #[case::both_set(Some(7), Some(50), 7, 50)]
    #[case::tpm_only(None, Some(50), 100, 50)]
    #[case::negative_refuses_all(Some(-5), None, 0, 0)]
    fn aibrix_defaults_rpm_100_and_tpm_rpm_times_1000(
        #[case] rpm: Option<i64>,
        #[case] tpm: Option<i64>,
        #[case] want_rpm: u64,
        #[case] want_tpm: u64,
    ) {
        assert_eq!(record(rpm, tpm).aibrix_limits(), UserLimits { rpm: Some(want_rpm), tpm: Some(want_tpm) });
    }

    #[test]
    fn aibrix_rules_refuse_users_without_a_record_and_ignore_defaults() {
        let file = [record(Some(5), Some(0)), UserRecord { name: "t".into(), rpm: None, tpm: Some(9) }];
        let defaults = UserLimits { rpm: Some(1), tpm: Some(1) };
        let dir = UserDirectory::new(&file, defaults, false, UserLimitsMode::Aibrix);
        let u = dir.aibrix_check("u").expect("in the file");
        assert_eq!(
            (u.limits, u.lookup_record, u.record_tpm),
            (UserLimits { rpm: Some(5), tpm: Some(5000) }, false, false)
        );
        assert!(dir.aibrix_check("t").expect("in the file").record_tpm, "the record sets a TPM");
        assert!(dir.aibrix_check("nobody").is_none(), "no record, no Redis: refused");

        let with_redis = UserDirectory::new(&file, defaults, true, UserLimitsMode::Aibrix);
        let nobody = with_redis.aibrix_check("nobody").expect("looked up in Redis");
        assert!(nobody.lookup_record);
        assert_eq!(nobody.mode, UserLimitsMode::Aibrix);
    }
}
