//! The system under test, as the demo and the benchmark run it: mock engines and one gateway
//! discovering them from a pods file, each a child process with its own log file.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use testkit::{EngineEndpoint, PodSpec};

use crate::client::Client;
use crate::procs::{self, ChildGuard, ServerSpec, StdoutTo, run_streaming};
use crate::ui;

/// How long an engine may take to print its `listening on` line.
const ENGINE_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the gateway may take to answer `/readyz` with 200.
const GATEWAY_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long building the binaries may take (a cold release build on a small machine).
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// The cargo profile the binaries are built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `dev`, in `target/debug`: quick to build, for the demo and the soak.
    Dev,
    /// `release`, in `target/release`: what benchmarks measure.
    Release,
}

/// The freshly built binaries (`turnstile`, `mock-engine`) in one cargo profile.
pub struct Binaries {
    /// The gateway.
    pub gateway: PathBuf,
    /// The mock engine.
    pub engine: PathBuf,
}

impl Binaries {
    /// Builds the gateway and the mock engine in `profile`, shown as a step of `what`.
    pub fn build(profile: Profile, what: &str) -> Result<Self> {
        let (flags, dir, name): (&[&str], _, _) = match profile {
            Profile::Dev => (&[], "debug", "dev profile"),
            Profile::Release => (&["--release"], "release", "release"),
        };
        let step = ui::step(format!("{what}: build gateway and mock engine ({name})"));
        let mut command = procs::cargo_command(["build", "-p", "gateway-user", "-p", "turnstile-tests", "--bins"]);
        run_streaming(command.args(flags), BUILD_TIMEOUT)?;
        let binaries = Self::of_profile(dir)?;
        step.done();
        Ok(binaries)
    }

    /// The binaries of the `debug` or `release` profile; fails when one is missing.
    pub fn of_profile(profile_dir: &str) -> Result<Self> {
        let dir = procs::target_dir().join(profile_dir);
        let binaries = Self { gateway: dir.join("turnstile"), engine: dir.join("mock-engine") };
        for path in [&binaries.gateway, &binaries.engine] {
            if !path.is_file() {
                bail!("{} was not built", path.display());
            }
        }
        Ok(binaries)
    }
}

/// A runtime with two workers, for the demo and the soak: requests, load and the watch over
/// the children run side by side.
pub fn two_worker_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// How to run one mock engine.
pub struct EngineSpec {
    /// Pod name it answers as.
    pub pod: String,
    /// Model it serves.
    pub model: String,
    /// Time to first token, milliseconds.
    pub ttft_ms: u64,
    /// Inter-token latency, milliseconds.
    pub itl_ms: u64,
    /// Tokens per answer.
    pub tokens: u32,
    /// Worker threads, when not the engine's default.
    pub threads: Option<u32>,
    /// Further `mock-engine` flags (load and prefix-cache models).
    pub extra_args: Vec<String>,
}

/// A running mock engine.
pub struct Engine {
    /// Pod name.
    pub pod: String,
    /// Model served.
    pub model: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The process.
    pub child: ChildGuard,
}

impl EngineEndpoint for Engine {
    fn pod_name(&self) -> &str {
        &self.pod
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Each engine as a ready pod of the model it serves.
pub fn engine_pods(engines: &[Engine]) -> Vec<PodSpec> {
    engines.iter().map(|engine| PodSpec::for_engine(engine, &engine.model)).collect()
}

/// Writes the pods file the gateway discovers the engines from, atomically (a running
/// gateway polls it).
pub fn write_pods(path: &Path, pods: &[PodSpec]) -> Result<()> {
    testkit::write_pods(path, pods).with_context(|| format!("writing {}", path.display()))
}

/// A free loopback address for a listener a child binds a moment later.
pub fn free_addr() -> Result<SocketAddr> {
    let port = testkit::free_port().context("choosing a loopback port")?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Starts a mock engine on an ephemeral port and waits for its `listening on` line.
pub async fn start_engine(binary: &Path, spec: &EngineSpec, log_dir: &Path, cpu: Option<usize>) -> Result<Engine> {
    let EngineSpec { pod, model, ttft_ms, itl_ms, tokens, threads, extra_args } = spec;
    let mut args: Vec<OsString> = [
        "--listen",
        "127.0.0.1:0",
        "--name",
        pod,
        "--model",
        model,
        "--ttft-ms",
        &ttft_ms.to_string(),
        "--itl-ms",
        &itl_ms.to_string(),
        "--tokens",
        &tokens.to_string(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    if let Some(threads) = threads {
        args.extend(["--threads".into(), threads.to_string().into()]);
    }
    args.extend(extra_args.iter().map(OsString::from));
    let mut child = ChildGuard::spawn(ServerSpec {
        name: format!("engine {pod}"),
        program: binary.to_path_buf(),
        args,
        log: log_dir.join(format!("engine-{pod}.log")),
        stdout: StdoutTo::Pipe,
        env: Vec::new(),
        env_remove: Vec::new(),
        cpu,
    })?;
    let line = child.read_stdout_line("mock-engine listening on", ENGINE_START_TIMEOUT).await?;
    let addr = procs::parse_listening_line(&line)?;
    Ok(Engine { pod: pod.clone(), model: model.clone(), addr, child })
}

/// How to run the gateway.
pub struct GatewaySpec<'a> {
    /// The `turnstile` binary.
    pub binary: &'a Path,
    /// Proxy listener.
    pub listen: SocketAddr,
    /// Admin listener (`/readyz`, `/metrics`).
    pub admin: SocketAddr,
    /// The pods file for `--discovery file:PATH`.
    pub pods_file: &'a Path,
    /// `--routing-algorithm`, when given.
    pub routing_algorithm: Option<&'a str>,
    /// `--log-format` (`text` or `json`).
    pub log_format: &'a str,
    /// Log file.
    pub log: PathBuf,
    /// Extra environment (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// Pin to this CPU with taskset.
    pub cpu: Option<usize>,
    /// Further `turnstile serve` flags, after the ones above.
    pub extra_args: Vec<OsString>,
}

impl<'a> GatewaySpec<'a> {
    /// `binary` on free loopback ports, discovering from `pods_file`, logging text to `log`,
    /// with the gateway's default routing and no pinning or extra environment.
    pub fn on_free_ports(binary: &'a Path, pods_file: &'a Path, log: PathBuf) -> Result<Self> {
        Ok(Self {
            binary,
            listen: free_addr()?,
            admin: free_addr()?,
            pods_file,
            routing_algorithm: None,
            log_format: "text",
            log,
            env: Vec::new(),
            cpu: None,
            extra_args: Vec::new(),
        })
    }
}

/// A running, ready gateway.
pub struct Gateway {
    /// Proxy listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// The process.
    pub child: ChildGuard,
}

/// Starts `turnstile serve` and waits until `/readyz` answers 200.
pub async fn start_gateway(spec: GatewaySpec<'_>, client: &Client) -> Result<Gateway> {
    let GatewaySpec { binary, listen, admin, pods_file, routing_algorithm, log_format, log, env, cpu, extra_args } =
        spec;
    let mut discovery = OsString::from("file:");
    discovery.push(pods_file);
    let mut args: Vec<OsString> = vec![
        "serve".into(),
        "--listen".into(),
        listen.to_string().into(),
        "--admin-listen".into(),
        admin.to_string().into(),
        "--discovery".into(),
        discovery,
        "--log-format".into(),
        log_format.into(),
    ];
    if let Some(algorithm) = routing_algorithm {
        args.extend(["--routing-algorithm".into(), algorithm.into()]);
    }
    args.extend(extra_args);
    // `Command::env_remove` after `envs` would drop a setting the caller passed on purpose
    // when the shell happens to carry the same variable.
    let env_remove =
        inherited_gateway_settings().into_iter().filter(|key| !env.iter().any(|(set, _)| set == key)).collect();
    let mut child = ChildGuard::spawn(ServerSpec {
        name: "gateway".into(),
        program: binary.to_path_buf(),
        args,
        log,
        stdout: StdoutTo::Log,
        env,
        env_remove,
        cpu,
    })?;
    wait_ready(&mut child, admin, client).await?;
    Ok(Gateway { listen, admin, child })
}

/// Gateway settings a developer's shell might carry (every flag has an env var), removed so
/// the demo and the benchmark always run the configuration they print.
fn inherited_gateway_settings() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(key, _)| key.into_string().ok())
        .filter(|key| {
            key.starts_with("TURNSTILE_")
                || key.starts_with("AIBRIX_")
                || key.starts_with("REDIS_")
                // OTEL_EXPORTER_OTLP_ENDPOINT and friends turn tracing on, which costs CPU.
                || key.starts_with("OTEL_")
                || key == "ROUTING_ALGORITHM"
        })
        .collect()
}

/// Polls `GET /readyz` on the admin port until 200, the child exits, or the timeout passes.
pub async fn wait_ready(child: &mut ChildGuard, admin: SocketAddr, client: &Client) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.exited() {
            bail!(
                "the gateway exited before it was ready ({status}); log {}:\n{}",
                child.log().display(),
                child.log_tail(20)
            );
        }
        let last = match client.get(admin, "/readyz", Duration::from_secs(1)).await {
            Ok(reply) if reply.status.is_success() => return Ok(()),
            Ok(reply) => format!("/readyz answered {}", reply.status),
            Err(err) => format!("{err:#}"),
        };
        if started.elapsed() > GATEWAY_READY_TIMEOUT {
            bail!(
                "the gateway was not ready within {} (last: {last}); log {}:\n{}",
                ui::human(GATEWAY_READY_TIMEOUT),
                child.log().display(),
                child.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `GET /v1/models` on the proxy port until every model is listed (discovery may lag
/// readiness by a reload), bounded by `timeout`.
pub async fn wait_models_listed(client: &Client, proxy: SocketAddr, models: &[&str], timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let reply = client.get(proxy, "/v1/models", Duration::from_secs(2)).await;
        let missing: Vec<&str> = match &reply {
            Ok(reply) if reply.status.is_success() => {
                let listed: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
                let ids: Vec<&str> = listed["data"]
                    .as_array()
                    .map(|models| models.iter().filter_map(|m| m["id"].as_str()).collect())
                    .unwrap_or_default();
                models.iter().copied().filter(|model| !ids.contains(model)).collect()
            }
            _ => models.to_vec(),
        };
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            let last = match reply {
                Ok(reply) => format!("{} {}", reply.status, reply.text()),
                Err(err) => format!("{err:#}"),
            };
            return Err(anyhow!(
                "GET /v1/models did not list {missing:?} within {} (last answer: {last})",
                ui::human(timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Engines and gateway, stopped together.
pub struct Stack {
    /// Mock engines, in start order.
    pub engines: Vec<Engine>,
    /// The gateway, once started.
    pub gateway: Option<Gateway>,
}

impl Stack {
    /// The first child that has exited, with its status, if any.
    pub fn exited_child(&mut self) -> Option<String> {
        let gateway = self.gateway.iter_mut().map(|gateway| &mut gateway.child);
        let engines = self.engines.iter_mut().map(|engine| &mut engine.child);
        gateway.chain(engines).find_map(|child| {
            child.exited().map(|status| {
                format!("{} exited ({status}); log {}:\n{}", child.name(), child.log().display(), child.log_tail(20))
            })
        })
    }

    /// Stops the gateway first (so it sees no engine vanish under it), then the engines.
    pub async fn stop(self) -> Result<()> {
        let step = ui::step("stop children");
        let Self { engines, gateway } = self;
        let children =
            gateway.map(|gateway| gateway.child).into_iter().chain(engines.into_iter().map(|engine| engine.child));
        for child in children {
            let name = child.name().to_owned();
            let outcome = child.stop(STOP_GRACE).await.with_context(|| format!("stopping {name}"))?;
            ui::info(format!("{name}: {outcome}"));
        }
        step.done();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gateway_that_dies_is_reported_with_its_log() {
        // `sh serve ...` fails at once: sh cannot open a script named `serve`.
        let dir = std::env::temp_dir().join(format!("xtask-stack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = GatewaySpec {
            binary: Path::new("sh"),
            listen: "127.0.0.1:9".parse().unwrap(),
            admin: "127.0.0.1:9".parse().unwrap(),
            pods_file: &dir.join("pods.yaml"),
            routing_algorithm: None,
            log_format: "text",
            log: dir.join("gateway.log"),
            env: Vec::new(),
            cpu: None,
            extra_args: Vec::new(),
        };
        let started = Instant::now();
        let err = start_gateway(spec, &Client::new()).await.err().expect("must fail");
        let message = format!("{err:#}");
        assert!(message.contains("exited before it was ready"), "{message}");
        assert!(message.contains("gateway.log"), "{message}");
        assert!(message.contains("serve"), "the log tail names the problem: {message}");
        assert!(started.elapsed() < Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
