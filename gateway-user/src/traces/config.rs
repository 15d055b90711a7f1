//! Where traces go and how many: `--otlp-*` flags and OpenTelemetry's
//! standard environment variables, resolved once into a plain struct.

use std::time::Duration;

/// The OTLP transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (collector port 4317): AIBrix's gateway default, kept so
    /// its `OTEL_EXPORTER_OTLP_ENDPOINT` works unchanged.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (collector port 4318).
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The protocol an `OTEL_EXPORTER_OTLP_PROTOCOL` value names.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            "grpc" => Ok(Self::Grpc),
            // AIBrix takes `http` for HTTP/protobuf as well.
            "http/protobuf" | "http" => Ok(Self::HttpProtobuf),
            other => Err(format!("OTLP protocol {other:?} is not supported (grpc, http/protobuf)")),
        }
    }
}

/// The export queue (OpenTelemetry's batch span processor variables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Most finished spans waiting for export; more are dropped and counted
    /// (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub max_spans: usize,
    /// Most spans in one export (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    pub max_batch: usize,
    /// Longest a span waits for a batch to fill (`OTEL_BSP_SCHEDULE_DELAY`).
    pub delay: Duration,
    /// Longest one export may take before its spans count as dropped
    /// (`OTEL_EXPORTER_OTLP_TIMEOUT`).
    pub export_timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { max_spans: 2048, max_batch: 512, delay: Duration::from_secs(5), export_timeout: Duration::from_secs(10) }
    }
}

/// Request tracing, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// The collector: for HTTP the whole traces URL, for gRPC its address.
    /// `None`: tracing is off.
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// `OTEL_SERVICE_NAME`, which wins over a `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`; with neither, [`DEFAULT_SERVICE_NAME`].
    pub service_name: Option<String>,
    /// Share of new traces sampled; a client's sampled flag decides for
    /// its own trace.
    pub sampling_ratio: f64,
    pub queue: QueueConfig,
    /// Why tracing is off although an endpoint was given (logged at start).
    pub refused: Option<String>,
}

/// `service.name` when `OTEL_SERVICE_NAME` is unset.
pub const DEFAULT_SERVICE_NAME: &str = "turnstile";

impl TraceConfig {
    /// Resolves the flags against the environment `env` reads.
    ///
    /// The endpoint is `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is when set,
    /// else `endpoint` (the flag or `OTEL_EXPORTER_OTLP_ENDPOINT`), a base
    /// URL to which HTTP appends `/v1/traces`. `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none` turn tracing off.
    pub fn resolve(
        endpoint: Option<&str>,
        protocol: Option<&str>,
        sampling_ratio: Option<f64>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let var = |name: &str| env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        let traces_endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let base = endpoint.map(str::trim).filter(|base| !base.is_empty());
        if disabled || (traces_endpoint.is_none() && base.is_none()) {
            // Off: the other variables may be meant for other programs and
            // are not read (a value this gateway does not take is no error).
            return Ok(Self::off(sampling_ratio, None));
        }
        match var("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some(other) => return Err(format!("OTEL_TRACES_EXPORTER={other:?} is not supported (otlp, none)")),
        }
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").as_deref().or(protocol) {
            Some(value) => OtlpProtocol::parse(value)?,
            None => OtlpProtocol::default(),
        };
        let endpoint = match (traces_endpoint, base) {
            (Some(traces), _) => Some(traces),
            (None, Some(base)) => Some(match protocol {
                OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
                OtlpProtocol::Grpc => base.to_owned(),
            }),
            (None, None) => None,
        };
        if let Some(url) = endpoint.as_deref()
            && !url.starts_with("http://")
        {
            // Often set for a whole pod by others (an operator's injection,
            // AIBrix's TLS default): the gateway runs, untraced, and says why.
            let why = format!(
                "OTLP endpoint {url:?}: only plaintext http:// collectors are supported (a node-local collector \
                 or agent can forward over TLS)"
            );
            return Ok(Self::off(sampling_ratio, Some(why)));
        }
        let sampling_ratio = match sampling_ratio {
            Some(ratio) => ratio,
            None => sampler_ratio(var("OTEL_TRACES_SAMPLER").as_deref(), var("OTEL_TRACES_SAMPLER_ARG").as_deref())?,
        };
        if !(0.0..=1.0).contains(&sampling_ratio) {
            return Err(format!("trace sampling ratio {sampling_ratio} is not between 0 and 1"));
        }
        let millis = |name: &str, default: Duration| -> Result<Duration, String> {
            match var(name) {
                Some(v) => {
                    v.parse().map(Duration::from_millis).map_err(|_| format!("{name}={v:?} is not milliseconds"))
                }
                None => Ok(default),
            }
        };
        let count = |name: &str, default: usize| -> Result<usize, String> {
            match var(name) {
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!("{name}={v:?} is not a positive count")),
                },
                None => Ok(default),
            }
        };
        let defaults = QueueConfig::default();
        let timeout = match var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") {
            Some(_) => millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", defaults.export_timeout)?,
            None => millis("OTEL_EXPORTER_OTLP_TIMEOUT", defaults.export_timeout)?,
        };
        let max_spans = count("OTEL_BSP_MAX_QUEUE_SIZE", defaults.max_spans)?;
        let queue = QueueConfig {
            max_spans,
            max_batch: count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", defaults.max_batch)?.min(max_spans),
            delay: millis("OTEL_BSP_SCHEDULE_DELAY", defaults.delay)?,
            export_timeout: timeout,
        };
        let service_name = var("OTEL_SERVICE_NAME");
        Ok(Self { endpoint, protocol, service_name, sampling_ratio, queue, refused: None })
    }

    /// Tracing off (`refused`: though an endpoint was given).
    fn off(sampling_ratio: Option<f64>, refused: Option<String>) -> Self {
        Self {
            endpoint: None,
            protocol: OtlpProtocol::default(),
            service_name: None,
            sampling_ratio: sampling_ratio.unwrap_or(1.0),
            queue: QueueConfig::default(),
            refused,
        }
    }
}

/// The ratio `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` ask for. The
/// gateway always samples parent-based: a sampler without the
/// `parentbased_` prefix is taken as its parent-based form.
fn sampler_ratio(sampler: Option<&str>, arg: Option<&str>) -> Result<f64, String> {
    let ratio_arg = || match arg {
        Some(v) => v.parse::<f64>().map_err(|_| format!("OTEL_TRACES_SAMPLER_ARG={v:?} is not a ratio")),
        None => Ok(1.0),
    };
    match sampler.map(|s| s.trim_start_matches("parentbased_")) {
        None | Some("always_on") => Ok(1.0),
        Some("always_off") => Ok(0.0),
        Some("traceidratio") => ratio_arg(),
        Some(other) => Err(format!("OTEL_TRACES_SAMPLER={other:?} is not supported")),
    }
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }

    #[rstest]
    #[case::off_when_nothing_is_set(None, &[], None)]
    #[case::http_appends_the_traces_path(Some("http://otel:4318/"), &[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")], Some("http://otel:4318/v1/traces"))]
    #[case::aibrix_http_is_http_protobuf(Some("http://otel:4318"), &[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http")], Some("http://otel:4318/v1/traces"))]
    #[case::grpc_by_default_takes_the_address(Some("http://otel:4317"), &[], Some("http://otel:4317"))]
    #[case::the_traces_variable_is_used_as_is(Some("http://a:4318"), &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:9/x")], Some("http://b:9/x"))]
    #[case::sdk_disabled(Some("http://a:4318"), &[("OTEL_SDK_DISABLED", "true")], None)]
    #[case::exporter_none(Some("http://a:4318"), &[("OTEL_TRACES_EXPORTER", "none")], None)]
    #[case::blank_is_unset(Some("  "), &[], None)]
    #[case::others_variables_are_not_read_when_off(None, &[("OTEL_TRACES_SAMPLER", "xray"), ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")], None)]
    fn endpoint(#[case] flag: Option<&str>, #[case] vars: &[(&str, &str)], #[case] expected: Option<&str>) {
        let config = TraceConfig::resolve(flag, None, None, env(vars)).unwrap();
        assert_eq!(config.endpoint.as_deref(), expected);
    }

    #[rstest]
    #[case::default_all(None, &[], 1.0)]
    #[case::the_flag_wins(Some(0.25), &[("OTEL_TRACES_SAMPLER", "always_off")], 0.25)]
    #[case::ratio_sampler(None, &[("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.01")], 0.01)]
    #[case::always_off(None, &[("OTEL_TRACES_SAMPLER", "always_off")], 0.0)]
    fn sampling(#[case] flag: Option<f64>, #[case] vars: &[(&str, &str)], #[case] expected: f64) {
        let config = TraceConfig::resolve(Some("http://a"), None, flag, env(vars)).unwrap();
        assert!((config.sampling_ratio - expected).abs() < f64::EPSILON);
    }

    #[rstest]
    #[case::ratio_above_one(Some(1.5), &[])]
    #[case::unknown_sampler(None, &[("OTEL_TRACES_SAMPLER", "jaeger_remote")])]
    #[case::json_protocol(None, &[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")])]
    #[case::bad_queue(None, &[("OTEL_BSP_MAX_QUEUE_SIZE", "0")])]
    #[case::bad_delay(None, &[("OTEL_BSP_SCHEDULE_DELAY", "soon")])]
    #[case::console_exporter(None, &[("OTEL_TRACES_EXPORTER", "console")])]
    fn refused(#[case] flag: Option<f64>, #[case] vars: &[(&str, &str)]) {
        assert!(TraceConfig::resolve(Some("http://a"), None, flag, env(vars)).is_err());
    }

    #[test]
    fn queue_and_service_from_the_environment() {
        let vars = [
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
            ("OTEL_SERVICE_NAME", "edge-gw"),
        ];
        let config = TraceConfig::resolve(Some("http://a"), None, None, env(&vars)).unwrap();
        let expected = QueueConfig {
            max_spans: 100,
            max_batch: 100,
            delay: Duration::from_millis(50),
            export_timeout: Duration::from_secs(2),
        };
        assert_eq!(config.queue, expected);
        assert_eq!(config.service_name.as_deref(), Some("edge-gw"));
        let plain = TraceConfig::resolve(Some("http://a"), None, None, env(&[])).unwrap();
        assert_eq!(plain.service_name, None);
        assert_eq!(plain.queue, QueueConfig::default());
    }

    #[test]
    fn a_tls_collector_leaves_tracing_off_and_says_why() {
        let vars = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://otel:4318/v1/traces")];
        let config = TraceConfig::resolve(None, None, None, env(&vars)).unwrap();
        assert_eq!(config.endpoint, None);
        assert!(config.refused.is_some_and(|why| why.contains("https://otel:4318/v1/traces")));
    }
}
