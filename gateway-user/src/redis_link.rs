//! How every part of the gateway reaches Redis: one place that turns the
//! configured URL into a client, so limits, penalties, shared scrapes and
//! shared routing all speak TLS and authenticate the same way.
//!
//! - `rediss://` is TLS (rustls). The server's certificate is checked
//!   against the system's roots, or against the PEM bundle `--redis-ca-file`
//!   names (a private CA, as managed Redis services and self-made
//!   certificates use).
//! - ACL credentials come from the URL (`rediss://user:password@host`) or,
//!   when the URL has none, from `REDIS_USERNAME` / `REDIS_PASSWORD`, so a
//!   Kubernetes Secret can hold the password while the URL sits in plain
//!   configuration.

use std::sync::OnceLock;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};

/// What every Redis client of this process is built with.
#[derive(Clone, Default)]
pub struct Settings {
    /// PEM certificates the server's chain must lead to, instead of the
    /// system's roots (TLS only).
    pub ca_pem: Option<Vec<u8>>,
    /// ACL user, when the URL names none.
    pub username: Option<String>,
    /// Password, when the URL carries none.
    pub password: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets what every client is built with; the first call wins (the process
/// reads its flags once). Without a call, clients use the URL alone.
pub fn configure(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

fn settings() -> &'static Settings {
    static NONE: Settings = Settings { ca_pem: None, username: None, password: None };
    SETTINGS.get().unwrap_or(&NONE)
}

/// The connection details of `url`, with the configured credentials filled
/// in where the URL has none.
pub fn connection_info(url: &str) -> Result<ConnectionInfo, String> {
    let info = url.into_connection_info().map_err(|e| format!("invalid Redis URL: {e}"))?;
    Ok(with_credentials(info, settings()))
}

fn with_credentials(info: ConnectionInfo, settings: &Settings) -> ConnectionInfo {
    let mut redis = info.redis_settings().clone();
    // `redis://:pw@host` names the default user: no user is added to it.
    let url_credentials = redis.password().is_some();
    if redis.password().is_none()
        && let Some(password) = settings.password.as_deref().filter(|p| !p.is_empty())
    {
        redis = redis.set_password(password);
    }
    if redis.username().is_none()
        && !url_credentials
        && let Some(username) = settings.username.as_deref().filter(|u| !u.is_empty())
    {
        redis = redis.set_username(username);
    }
    info.set_redis_settings(redis)
}

/// A client for `info` (from [`connection_info`]): TLS against the
/// configured CA when the address is `rediss://` and a CA is set.
pub fn client(info: ConnectionInfo) -> Result<redis::Client, String> {
    let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    match settings().ca_pem.as_ref().filter(|_| tls) {
        Some(ca) => {
            redis::Client::build_with_tls(info, TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) })
                .map_err(|e| format!("Redis TLS settings: {e}"))
        }
        None => redis::Client::open(info).map_err(|e| format!("invalid Redis URL: {e}")),
    }
}

/// [`client`] of [`connection_info`]`(url)`.
pub fn open(url: &str) -> Result<redis::Client, String> {
    client(connection_info(url)?)
}

/// The keys matching `pattern`, sorted and without repeats, by `SCAN` with
/// `count` keys a call; at most `limit` (the bool says whether more were left).
pub async fn scan_keys<C: redis::aio::ConnectionLike>(
    connection: &mut C,
    pattern: &str,
    count: usize,
    limit: usize,
) -> redis::RedisResult<(Vec<String>, bool)> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count)
            .query_async(connection)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 || keys.len() >= limit {
            break;
        }
    }
    keys.sort_unstable();
    keys.dedup();
    let more = keys.len() > limit || (cursor != 0 && keys.len() >= limit);
    keys.truncate(limit);
    Ok((keys, more))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(url: &str, settings: &Settings) -> (Option<String>, Option<String>) {
        let info = with_credentials(url.into_connection_info().unwrap_or_else(|e| panic!("{url}: {e}")), settings);
        (info.redis_settings().username().map(str::to_owned), info.redis_settings().password().map(str::to_owned))
    }

    #[test]
    fn the_secret_fills_in_what_the_url_leaves_out() {
        let secret = Settings { ca_pem: None, username: Some("gw".into()), password: Some("s3cret".into()) };
        assert_eq!(credentials("rediss://redis:6380/0", &secret), (Some("gw".into()), Some("s3cret".into())));
        assert_eq!(
            credentials("redis://alice:url-pass@redis:6379", &secret),
            (Some("alice".into()), Some("url-pass".into())),
            "the URL's own credentials win"
        );
        assert_eq!(credentials("redis://redis:6379", &Settings::default()), (None, None));
        assert_eq!(
            credentials("redis://:url-pass@redis:6379", &secret),
            (None, Some("url-pass".into())),
            "a password-only URL is the default user's"
        );
        assert_eq!(credentials("redis://alice@redis:6379", &secret), (Some("alice".into()), Some("s3cret".into())));
        let empty = Settings { ca_pem: None, username: Some(String::new()), password: Some(String::new()) };
        assert_eq!(credentials("redis://redis:6379", &empty), (None, None), "empty variables set nothing");
    }

    #[test]
    fn settings_never_print_the_password() {
        let settings = Settings { ca_pem: Some(vec![1, 2]), username: None, password: Some("s3cret".into()) };
        assert!(!format!("{settings:?}").contains("s3cret"));
    }

    #[test]
    fn a_bad_url_says_so() {
        assert!(open("http://not-redis").is_err_and(|e| e.contains("invalid Redis URL")));
        assert!(open("rediss://redis.example:6380").is_ok());
    }
}
