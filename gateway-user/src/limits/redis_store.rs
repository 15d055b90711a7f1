//! Counters in Redis, shared by every gateway replica.
//!
//! Each check is one Lua script, so reading the window from Redis `TIME`,
//! comparing and incrementing happen in one atomic step: replicas agree on the
//! window and exactly `limit` requests get in per window, whatever the clock
//! skew between gateway hosts.
//!
//! The scripts build the windowed key from `TIME` inside Redis, so that key
//! is not declared in `KEYS`: fine for a standalone Redis (what AIBrix uses),
//! not for Redis Cluster.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::{
    CounterStore, Quota, Slot, StoreError, UserCheck, UserLimits, UserLimitsMode, UserVerdict, WindowVerdict,
    rpm_counter_key, tpm_counter_key, user_record_key, users,
};

/// Lifetime of an RPS window key: the window itself plus one second for
/// a late rollback; within the contract's "TTL ≤ 2 s".
const RPS_KEY_TTL_MS: u64 = 2000;

/// Old Redis versions (< 5) need effects replication before writing after
/// `TIME`; newer ones always do it and keep the call as a no-op.
const PRELUDE: &str = "if redis.replicate_commands then redis.replicate_commands() end\n";

/// KEYS[1] = counter key without the window; ARGV[1] = limit, ARGV[2] = TTL ms.
/// Returns {admitted 0|1, count, unix second, ms into the second}. A refused
/// request is not counted, so a rollback of an admitted one frees a slot for
/// someone else.
const WINDOW_SCRIPT: &str = r"
local now = redis.call('TIME')
local second = now[1]
local ms = math.floor(tonumber(now[2]) / 1000)
local key = KEYS[1] .. ':' .. second
local count = tonumber(redis.call('GET', key) or '0')
if count >= tonumber(ARGV[1]) then
  return {0, count, tonumber(second), ms}
end
count = redis.call('INCR', key)
redis.call('PEXPIRE', key, ARGV[2])
return {1, count, tonumber(second), ms}
";

/// KEYS[1] = full counter key. Decrements only a key that still exists, so
/// a late rollback never creates a counter without a TTL.
const RELEASE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('DECR', KEYS[1])
end
return 0
";

/// KEYS[1] = user record (`aibrix-users/<user>`), KEYS[2] / KEYS[3] = RPM /
/// TPM counters without the minute bin. ARGV[1] / ARGV[2] = RPM / TPM limits
/// to use when the record has none (0 = none), ARGV[3] = '1' to read the
/// record, ARGV[4] = '1' for AIBrix's rules. Bins are AIBrix's:
/// `(unix / 60) % 64`, TTL 60 s, from Redis time.
/// Returns {verdict 0 ok | 1 rpm | 2 tpm, rpm limit, tpm limit, bin, rpm counted 0|1,
/// requests counted in the bin, tokens charged in the bin, ms into the minute,
/// record sets a tpm 0|1}, or under AIBrix's rules {3} for no record, {4} for
/// a record that is not a JSON object, {5} for an rpm or tpm that is not an
/// integer.
///
/// AIBrix's rules: the record must exist; rpm 0 is 100, tpm 0 is rpm × 1000
/// (a negative limit refuses everything: 0 here); limits of 0 refuse; the
/// request counts against RPM before TPM is checked, and stays counted.
const USER_SCRIPT: &str = r"
local rpm_limit = tonumber(ARGV[1])
local tpm_limit = tonumber(ARGV[2])
local aibrix = ARGV[4] == '1'
local record_tpm = 0
if ARGV[3] == '1' then
  local raw = redis.call('GET', KEYS[1])
  if aibrix then
    if not raw then return {3} end
    local ok, record = pcall(cjson.decode, raw)
    if not ok or type(record) ~= 'table' then return {4} end
    local function field(value)
      if value == nil or value == cjson.null then return 0 end
      if type(value) ~= 'number' or value ~= math.floor(value) then return nil end
      return value
    end
    local rpm, tpm = field(record.rpm), field(record.tpm)
    if rpm == nil or tpm == nil then return {5} end
    if tpm > 0 then record_tpm = 1 end
    if rpm == 0 then rpm = 100 end
    if tpm == 0 then tpm = rpm * 1000 end
    rpm_limit = math.max(rpm, 0)
    tpm_limit = math.max(tpm, 0)
  elseif raw then
    local ok, record = pcall(cjson.decode, raw)
    if ok and type(record) == 'table' then
      if type(record.rpm) == 'number' and record.rpm >= 1 then rpm_limit = math.floor(record.rpm) end
      if type(record.tpm) == 'number' and record.tpm >= 1 then tpm_limit = math.floor(record.tpm) end
    end
  end
end
local now = redis.call('TIME')
local seconds = tonumber(now[1])
local into = (seconds % 60) * 1000 + math.floor(tonumber(now[2]) / 1000)
local bin = math.floor(seconds / 60) % 64
local rpm_key = KEYS[2] .. ':' .. bin
local requests = tonumber(redis.call('GET', rpm_key) or '0')
local tokens = tonumber(redis.call('GET', KEYS[3] .. ':' .. bin) or '0')
if aibrix then
  if requests >= rpm_limit then
    return {1, rpm_limit, tpm_limit, bin, 0, requests, tokens, into, record_tpm}
  end
  requests = redis.call('INCR', rpm_key)
  redis.call('EXPIRE', rpm_key, 60)
  if tokens >= tpm_limit then
    return {2, rpm_limit, tpm_limit, bin, 1, requests, tokens, into, record_tpm}
  end
  return {0, rpm_limit, tpm_limit, bin, 1, requests, tokens, into, record_tpm}
end
if rpm_limit > 0 and requests >= rpm_limit then
  return {1, rpm_limit, tpm_limit, bin, 0, requests, tokens, into, record_tpm}
end
if tpm_limit > 0 and tokens >= tpm_limit then
  return {2, rpm_limit, tpm_limit, bin, 0, requests, tokens, into, record_tpm}
end
if rpm_limit > 0 then
  requests = redis.call('INCR', rpm_key)
  redis.call('EXPIRE', rpm_key, 60)
  return {0, rpm_limit, tpm_limit, bin, 1, requests, tokens, into, record_tpm}
end
return {0, rpm_limit, tpm_limit, bin, 0, requests, tokens, into, record_tpm}
";

/// KEYS[1] = TPM counter without the bin; ARGV[1] = tokens.
const CHARGE_SCRIPT: &str = r"
local bin = math.floor(tonumber(redis.call('TIME')[1]) / 60) % 64
local key = KEYS[1] .. ':' .. bin
local total = redis.call('INCRBY', key, ARGV[1])
redis.call('EXPIRE', key, 60)
return total
";

/// The limiter's scripts over one auto-reconnecting connection.
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    window: Script,
    release: Script,
    user: Script,
    charge: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

/// Opens a client for `url` (`redis://[:password@]host:port[/db]`).
pub fn client(url: &str) -> Result<redis::Client, StoreError> {
    crate::redis_link::open(url).map_err(StoreError::Redis)
}

impl RedisStore {
    /// Creates the store without connecting: the first call connects, so a
    /// gateway starts (and fails open or closed) while Redis is still down.
    /// Must run inside the tokio runtime.
    ///
    /// `call_timeout` bounds each command; the caller also bounds each call.
    pub fn connect_lazily(url: &str, call_timeout: Duration) -> Result<Self, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(call_timeout))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            // One connect attempt per trigger: the circuit breaker paces the
            // calls (and so the reconnects) while Redis is down.
            .set_number_of_retries(0);
        let connection = ConnectionManager::new_lazy_with_config(client(url)?, config).map_err(StoreError::from)?;
        Ok(Self {
            connection,
            window: Script::new(&format!("{PRELUDE}{WINDOW_SCRIPT}")),
            release: Script::new(RELEASE_SCRIPT),
            user: Script::new(&format!("{PRELUDE}{USER_SCRIPT}")),
            charge: Script::new(&format!("{PRELUDE}{CHARGE_SCRIPT}")),
        })
    }

    /// Runs one script invocation. A connection refused means the command
    /// never left: the manager is reconnecting (a failed earlier attempt is
    /// what this call saw), so one immediate retry waits on the fresh attempt.
    /// That makes the first probe after Redis returns succeed.
    async fn invoke<T: redis::FromRedisValue>(&self, invocation: redis::ScriptInvocation<'_>) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        match invocation.invoke_async(&mut connection).await {
            Err(err) if err.is_connection_refusal() => Ok(invocation.invoke_async(&mut connection).await?),
            result => Ok(result?),
        }
    }
}

impl From<RedisError> for StoreError {
    fn from(err: RedisError) -> Self {
        Self::Redis(err.to_string())
    }
}

fn bad_reply(what: &str, reply: &[i64]) -> StoreError {
    StoreError::Redis(format!("unexpected {what} script reply {reply:?}"))
}

fn limit(raw: i64) -> Option<u64> {
    u64::try_from(raw).ok().filter(|n| *n > 0)
}

/// Time left in a window of `length_ms` that is `into_ms` old (as the script
/// read it from Redis `TIME`).
fn time_left(into_ms: i64, length_ms: u64) -> Duration {
    let into = u64::try_from(into_ms).unwrap_or(0).min(length_ms - 1);
    Duration::from_millis(length_ms - into)
}

impl CounterStore for RedisStore {
    async fn admit_window(&self, key: &str, limit: u64) -> Result<WindowVerdict, StoreError> {
        let mut invocation = self.window.prepare_invoke();
        invocation.key(key).arg(limit).arg(RPS_KEY_TTL_MS);
        let reply: Vec<i64> = self.invoke(invocation).await?;
        let &[admitted, count, second, ms] = reply.as_slice() else {
            return Err(bad_reply("window", &reply));
        };
        let reset = time_left(ms, 1000);
        let count = u64::try_from(count).unwrap_or(0);
        match admitted {
            1 => {
                let window = u64::try_from(second).map_err(|_| bad_reply("window", &reply))?;
                let quota = Quota { limit, remaining: limit.saturating_sub(count), reset };
                Ok(WindowVerdict::Admitted { slot: Slot { key: key.to_owned(), window }, quota })
            }
            0 => Ok(WindowVerdict::Limited { quota: Quota { limit, remaining: 0, reset } }),
            _ => Err(bad_reply("window", &reply)),
        }
    }

    async fn admit_user(&self, check: &UserCheck<'_>) -> Result<UserVerdict, StoreError> {
        let aibrix = check.mode == UserLimitsMode::Aibrix;
        let rpm_key = rpm_counter_key(check.user);
        let mut invocation = self.user.prepare_invoke();
        invocation
            .key(user_record_key(check.user))
            .key(&rpm_key)
            .key(tpm_counter_key(check.user))
            .arg(check.limits.rpm.unwrap_or(0))
            .arg(check.limits.tpm.unwrap_or(0))
            .arg(if check.lookup_record { "1" } else { "0" })
            .arg(if aibrix { "1" } else { "0" });
        let reply: Vec<i64> = self.invoke(invocation).await?;
        let no_record = |reason: &str| Ok(UserVerdict::NoRecord { reason: reason.to_owned() });
        let &[verdict, rpm, tpm, bin, rpm_counted, requests, tokens, into_minute, record_tpm] = reply.as_slice() else {
            return match reply.as_slice() {
                [3] => no_record(users::NO_RECORD),
                [4] => no_record("invalid user record: not a JSON object"),
                [5] => no_record("invalid user record: rpm and tpm must be integers"),
                _ => Err(bad_reply("user", &reply)),
            };
        };
        // Under AIBrix's rules every user is limited, 0 refusing everything.
        let limit_of = |raw: i64| if aibrix { u64::try_from(raw).ok() } else { limit(raw) };
        let limits = UserLimits { rpm: limit_of(rpm), tpm: limit_of(tpm) };
        let reset = time_left(into_minute, 60_000);
        let left = |limit: u64, used: i64| Quota {
            limit,
            remaining: limit.saturating_sub(u64::try_from(used).unwrap_or(0)),
            reset,
        };
        match (verdict, limits) {
            (0, _) => {
                let window = u64::try_from(bin).map_err(|_| bad_reply("user", &reply))?;
                let rpm_slot = (rpm_counted == 1).then_some(Slot { key: rpm_key, window });
                Ok(UserVerdict::Admitted {
                    limits,
                    rpm_slot,
                    requests: limits.rpm.map(|limit| left(limit, requests)),
                    tokens: limits.tpm.map(|limit| left(limit, tokens)),
                    record_tpm: record_tpm == 1 || check.record_tpm,
                })
            }
            (1, UserLimits { rpm: Some(limit), .. }) => Ok(UserVerdict::RpmExceeded { quota: left(limit, i64::MAX) }),
            (2, UserLimits { tpm: Some(limit), .. }) => Ok(UserVerdict::TpmExceeded { quota: left(limit, i64::MAX) }),
            _ => Err(bad_reply("user", &reply)),
        }
    }

    async fn release(&self, slot: &Slot) -> Result<(), StoreError> {
        let mut invocation = self.release.prepare_invoke();
        invocation.key(format!("{}:{}", slot.key, slot.window));
        let _: i64 = self.invoke(invocation).await?;
        Ok(())
    }

    async fn charge_tokens(&self, user: &str, tokens: u64) -> Result<(), StoreError> {
        let mut invocation = self.charge.prepare_invoke();
        invocation.key(tpm_counter_key(user)).arg(tokens);
        let _: i64 = self.invoke(invocation).await?;
        Ok(())
    }
}

/// A Redis URL from AIBrix's `REDIS_HOST` / `REDIS_PORT` / `REDIS_PASSWORD`.
pub fn url_from_parts(host: &str, port: Option<&str>, password: Option<&str>) -> String {
    let port = port.map(str::trim).filter(|p| !p.is_empty()).unwrap_or("6379");
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
    match password.filter(|p| !p.is_empty()) {
        Some(password) => format!("redis://:{}@{host}:{port}/", percent_encode(password)),
        None => format!("redis://{host}:{port}/"),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The URL without its password, for logs.
pub fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() => {
            let host = &url[at + 1..];
            let user = rest.split_once(':').map_or("", |(user, _)| user);
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aibrix_env_parts_make_a_url() {
        assert_eq!(url_from_parts("redis.svc", None, None), "redis://redis.svc:6379/");
        assert_eq!(url_from_parts("10.0.0.1", Some("6380"), Some("")), "redis://10.0.0.1:6380/");
        assert_eq!(url_from_parts("h", Some("1"), Some("p@ss:w/rd")), "redis://:p%40ss%3Aw%2Frd@h:1/");
        assert_eq!(url_from_parts("::1", None, None), "redis://[::1]:6379/");
        let client = client(&url_from_parts("h", Some("1"), Some("p@ss:w/rd"))).expect("parses");
        assert_eq!(client.get_connection_info().redis_settings().password(), Some("p@ss:w/rd"));
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(redacted("redis://:secret@h:6379/"), "redis://:***@h:6379/");
        assert_eq!(redacted("redis://u:secret@h:6379/0"), "redis://u:***@h:6379/0");
        assert_eq!(redacted("redis://h:6379/"), "redis://h:6379/");
    }
}
