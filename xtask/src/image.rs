//! `cargo xtask image [--run]`: the gateway's container image, built without a Docker daemon.
//!
//! buildah assembles it FROM scratch out of a root filesystem staged in `target/image/rootfs`:
//! the release `turnstile` without its debug info, exactly the shared libraries `ldd` says it
//! loads, Debian's CA bundle, and `image/rootfs/` as it is (passwd, group, nsswitch.conf). The
//! image lands in the local containers store as `localhost/turnstile:<version>` and in an OCI
//! archive, `target/image/turnstile-<version>.oci.tar`, which is read back with skopeo and
//! checked: user, entrypoint, ports, labels and compressed size. `--run` then runs it with
//! podman on the host network in front of two mock engines.
//!
//! The root `Dockerfile` builds the same layout with Docker; a test below keeps the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::client::{Client, header_text, json_request};
use crate::procs::{self, ChildGuard, ServerSpec, StdoutTo, capture, run_streaming};
use crate::stack::{self, Binaries, EngineSpec};
use crate::ui;

/// Options of `cargo xtask image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Also run the image with podman on the host network in front of two mock engines and
    /// check that it answers; where containers cannot run here, say why and skip only this.
    #[arg(long)]
    pub run: bool,
}

/// Where the gateway lives in the image; the entrypoint.
const BINARY: &str = "/usr/local/bin/turnstile";
/// Debian's CA bundle, at the path rustls-native-certs and OpenSSL-built tools read first.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The image's default arguments: a bare `podman run` starts the gateway.
const CMD: &[&str] = &["serve"];
/// `uid:gid` the image runs as: the `runAsUser` / `runAsGroup` of the userspace overlay
/// (`deploy/overlays/userspace/deployment.yaml`), named `turnstile` in `image/rootfs/etc/passwd`.
/// Numeric, so Kubernetes can verify `runAsNonRoot` without reading the image's passwd.
const USER: &str = "65534:65534";
/// Proxy and admin ports, as the manifests declare them.
const PORTS: [u16; 2] = [8888, 8080];
/// The OCI label and annotation keys the image carries.
const LABEL_KEYS: [&str; 5] = [
    "org.opencontainers.image.title",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.source",
    "org.opencontainers.image.created",
];
/// Ceiling on the sum of the gzip'd layers: what a node pulls.
const MAX_COMPRESSED_BYTES: u64 = 25_000_000;
/// Files copied into the image as they are, relative to the workspace root.
const STATIC_ROOTFS: &str = "image/rootfs";
/// Where the image name points in the local containers store (`localhost/turnstile:<version>`).
const REPOSITORY: &str = "localhost/turnstile";

/// A buildah, skopeo or podman call that is quick (config, inspect, rm).
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Committing and pushing the image (compressing ~10 MB).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long building the binaries may take (a cold release build on a small machine).
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// Bound on each request of `--run`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the container gets to stop after SIGTERM (podman passes it on).
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Builds the image, checks it, and with `--run` runs it.
pub fn run(args: &ImageArgs) -> Result<()> {
    let out_dir = procs::target_dir().join("image");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let tools = Tools::find(&out_dir)?;
    let binary = build_release()?;
    let meta = Metadata::read(&binary)?;
    let rootfs = out_dir.join("rootfs");
    stage_rootfs(&binary, &rootfs)?;
    let image = format!("{REPOSITORY}:{}", meta.version);
    let archive = out_dir.join(format!("turnstile-{}.oci.tar", meta.version));
    build_image(&tools, &rootfs, &meta, &image, &archive)?;
    inspect_archive(&tools, &archive, &meta)?;
    if args.run {
        run_image(&tools, &image, &meta, &out_dir.join("run"))?;
    }
    println!("==> image {image} and {}", archive.display());
    Ok(())
}

/// The container tools, all pointed at one containers.conf under `target/image/`.
struct Tools {
    buildah: PathBuf,
    skopeo: PathBuf,
    podman: Option<PathBuf>,
    containers_conf: PathBuf,
}

/// What this machine's runtime needs: no default ulimits (raising them fails in this VM).
const CONTAINERS_CONF: &str = "# Written by `cargo xtask image`: containers started here set no ulimits of their own.\n\
                               [containers]\n\
                               default_ulimits = []\n";

impl Tools {
    fn find(out_dir: &Path) -> Result<Self> {
        let need = |name: &str| {
            procs::find_program(name)
                .ok_or_else(|| anyhow!("{name} is not installed (`cargo xtask setup` installs it)"))
        };
        let containers_conf = out_dir.join("containers.conf");
        std::fs::write(&containers_conf, CONTAINERS_CONF)
            .with_context(|| format!("writing {}", containers_conf.display()))?;
        Ok(Self {
            buildah: need("buildah")?,
            skopeo: need("skopeo")?,
            podman: procs::find_program("podman"),
            containers_conf,
        })
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command.env("CONTAINERS_CONF", &self.containers_conf);
        command
    }

    fn buildah<const N: usize>(&self, args: [&str; N]) -> Command {
        let mut command = self.command(&self.buildah);
        command.args(args);
        command
    }

    fn skopeo<const N: usize>(&self, args: [&str; N]) -> Command {
        let mut command = self.command(&self.skopeo);
        command.args(args);
        command
    }

    /// podman with the runtime and cgroup manager this machine supports (runc, cgroupfs).
    fn podman(&self, podman: &Path) -> Command {
        let mut command = self.command(podman);
        command.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
        command
    }
}

/// Runs a quick command and returns its stdout; a failure carries its stderr.
fn output(command: &mut Command, timeout: Duration) -> Result<String> {
    let shown = procs::display_command(command);
    let out = capture(command, timeout)?;
    if !out.status.success() {
        bail!("`{shown}` failed ({}): {}", out.status, out.stderr.trim());
    }
    Ok(out.stdout)
}

/// Builds the release `turnstile` (the image's only build: `--run` reuses the dev mock engine).
fn build_release() -> Result<PathBuf> {
    let step = ui::step("image: build turnstile (release)");
    run_streaming(
        &mut procs::cargo_command(["build", "--release", "-p", "gateway-user", "--bin", "turnstile"]),
        BUILD_TIMEOUT,
    )?;
    let binary = procs::target_dir().join("release/turnstile");
    ui::info(format!("{} ({})", binary.display(), megabytes(file_size(&binary)?)));
    step.done();
    Ok(binary)
}

/// What the labels say about this build.
struct Metadata {
    /// The binary's own `--version`.
    version: String,
    /// git HEAD.
    revision: String,
    /// HEAD's commit time, RFC 3339: the image's creation time, so a rebuild of one commit
    /// makes the same image.
    created: String,
    /// HEAD's commit time in Unix seconds, for `buildah commit --timestamp`.
    created_unix: String,
    /// The `origin` remote, when there is one.
    source: Option<String>,
}

impl Metadata {
    fn read(binary: &Path) -> Result<Self> {
        let version_line = output(Command::new(binary).arg("--version"), TOOL_TIMEOUT)?;
        let version = parse_version(&version_line)?;
        let git = |args: &[&str]| output(&mut procs::git_command(args), TOOL_TIMEOUT).map(|out| out.trim().to_owned());
        let revision = git(&["rev-parse", "HEAD"])?;
        let created = git(&["log", "-1", "--format=%cI", "HEAD"])?;
        let created_unix = git(&["log", "-1", "--format=%ct", "HEAD"])?;
        let source = git(&["remote", "get-url", "origin"]).ok().filter(|url| !url.is_empty());
        if !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
            ui::warn(format!("the work tree has uncommitted changes: the image is labelled {revision} all the same"));
        }
        Ok(Self { version, revision, created, created_unix, source })
    }

    /// The labels (and manifest annotations), in [`LABEL_KEYS`] order; the source only when known.
    fn labels(&self) -> Vec<(&'static str, String)> {
        let Self { version, revision, created, created_unix: _, source } = self;
        let values = [
            Some("turnstile".to_owned()),
            Some(version.clone()),
            Some(revision.clone()),
            source.clone(),
            Some(created.clone()),
        ];
        LABEL_KEYS.into_iter().zip(values).filter_map(|(key, value)| value.map(|value| (key, value))).collect()
    }
}

/// The version out of `turnstile --version` (`turnstile 0.1.0 (1a2b3c4d5e6f)`).
fn parse_version(line: &str) -> Result<String> {
    line.split_whitespace()
        .nth(1)
        .filter(|version| version.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no version in `turnstile --version` output {line:?}"))
}

/// Stages the image's root filesystem in `rootfs`, from scratch each time.
fn stage_rootfs(binary: &Path, rootfs: &Path) -> Result<()> {
    let step = ui::step(format!("image: root filesystem in {}", rootfs.display()));
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs).with_context(|| format!("clearing {}", rootfs.display()))?;
    }
    let inside = |path: &str| rootfs.join(path.trim_start_matches('/'));

    // Line tables stay out of the image: panics still name their functions (the symbol table
    // is kept), at a third of the size.
    let image_binary = inside(BINARY);
    create_parent(&image_binary)?;
    output(Command::new("strip").arg("--strip-debug").arg("-o").arg(&image_binary).arg(binary), TOOL_TIMEOUT)?;
    ui::info(format!("{BINARY:<45} {}", megabytes(file_size(&image_binary)?)));

    let ldd = output(Command::new("ldd").arg(binary), TOOL_TIMEOUT)?;
    for library in parse_ldd(&ldd)? {
        let library = library.to_str().ok_or_else(|| anyhow!("non-UTF-8 library path {}", library.display()))?;
        copy_file(Path::new(library), &inside(library))?;
        ui::info(format!("{library:<45} {}", megabytes(file_size(&inside(library))?)));
    }

    copy_file(Path::new(CA_BUNDLE), &inside(CA_BUNDLE)).context("Debian's ca-certificates package provides it")?;
    ui::info(format!("{CA_BUNDLE:<45} {}", megabytes(file_size(&inside(CA_BUNDLE))?)));

    let static_root = procs::workspace_root().join(STATIC_ROOTFS);
    for file in files_under(&static_root)? {
        let relative = file.strip_prefix(&static_root).context("a file outside image/rootfs")?;
        copy_file(&file, &rootfs.join(relative))?;
        ui::info(format!("/{:<44} from {STATIC_ROOTFS}/", relative.display()));
    }
    step.done();
    Ok(())
}

/// The absolute paths of the shared objects in `ldd` output, the ELF interpreter included;
/// the vDSO (no file) is left out, and a library `ldd` cannot find is an error.
fn parse_ldd(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("ldd cannot find {}", name.trim());
                }
                target.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

fn create_parent(path: &Path) -> Result<()> {
    let parent = path.parent().ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
}

/// Copies the file `from` points at (symlinks followed), with its mode, to `to`.
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    create_parent(to)?;
    std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Every regular file under `dir`, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len())
}

/// Bytes as megabytes with two decimals (`9.87 MB`).
fn megabytes(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// A buildah working container, removed on drop.
struct WorkingContainer<'a> {
    tools: &'a Tools,
    name: String,
}

impl Drop for WorkingContainer<'_> {
    fn drop(&mut self) {
        let _ = capture(&mut self.tools.buildah(["rm", &self.name]), TOOL_TIMEOUT);
    }
}

/// Commits the root filesystem as `image` in the containers store and writes it to `archive`.
fn build_image(tools: &Tools, rootfs: &Path, meta: &Metadata, image: &str, archive: &Path) -> Result<()> {
    let step = ui::step(format!("image: buildah from scratch → {image}"));
    let previous = output(&mut tools.buildah(["images", "--quiet", "--no-trunc", image]), TOOL_TIMEOUT)
        .ok()
        .map(|id| id.trim().trim_start_matches("sha256:").to_owned());
    let name = format!("turnstile-image-{}", std::process::id());
    output(&mut tools.buildah(["from", "--name", &name, "scratch"]), TOOL_TIMEOUT)?;
    let container = WorkingContainer { tools, name };
    let mut rootfs_dir = rootfs.as_os_str().to_owned();
    rootfs_dir.push("/");
    output(tools.buildah(["copy", &container.name]).arg(&rootfs_dir).arg("/"), TOOL_TIMEOUT)?;

    let mut config = tools.buildah(["config"]);
    config
        .args(["--entrypoint", &serde_json::to_string(&[BINARY])?])
        .args(["--cmd", &serde_json::to_string(CMD)?])
        .args(["--user", USER])
        .args(["--workingdir", "/"])
        .args(["--created-by", "cargo xtask image"]);
    for port in PORTS {
        config.args(["--port", &format!("{port}/tcp")]);
    }
    for (key, value) in meta.labels() {
        config.args(["--label", &format!("{key}={value}")]).args(["--annotation", &format!("{key}={value}")]);
    }
    output(config.arg(&container.name), TOOL_TIMEOUT)?;
    ui::info(format!("entrypoint {BINARY}, cmd {CMD:?}, user {USER}, ports {PORTS:?}"));
    for (key, value) in meta.labels() {
        ui::info(format!("{key}={value}"));
    }

    // The commit time is HEAD's, so one commit always makes the same image id.
    let committed = output(
        &mut tools.buildah([
            "commit",
            "--quiet",
            "--format",
            "oci",
            "--timestamp",
            &meta.created_unix,
            &container.name,
            image,
        ]),
        COMMIT_TIMEOUT,
    )?;
    let id = committed.trim().trim_start_matches("sha256:").to_owned();
    ui::info(format!("{image} = {}", &id[..id.len().min(12)]));
    if let Some(previous) = previous.filter(|previous| !previous.is_empty() && *previous != id) {
        // The image this tag named before, now unnamed; kept when a container still uses it.
        let _ = capture(&mut tools.buildah(["rmi", &previous]), TOOL_TIMEOUT);
    }

    if archive.exists() {
        std::fs::remove_file(archive).with_context(|| format!("replacing {}", archive.display()))?;
    }
    let destination = format!("oci-archive:{}:turnstile:{}", archive.display(), meta.version);
    output(&mut tools.buildah(["push", "--quiet", image, &destination]), COMMIT_TIMEOUT)?;
    ui::info(format!("{} ({})", archive.display(), megabytes(file_size(archive)?)));
    step.done();
    Ok(())
}

/// Reads the archive back with skopeo and checks what a user of the image relies on.
fn inspect_archive(tools: &Tools, archive: &Path, meta: &Metadata) -> Result<()> {
    let step = ui::step("image: inspect the OCI archive");
    let reference = format!("oci-archive:{}", archive.display());
    let parse = |text: String, what: &str| -> Result<Value> {
        serde_json::from_str(&text).with_context(|| format!("skopeo's {what} is not JSON"))
    };
    let manifest = parse(output(&mut tools.skopeo(["inspect", "--raw", &reference]), TOOL_TIMEOUT)?, "manifest")?;
    let config = parse(output(&mut tools.skopeo(["inspect", "--config", &reference]), TOOL_TIMEOUT)?, "config")?;
    let layers = compressed_layer_bytes(&manifest)?;
    let compressed: u64 = layers.iter().sum();
    ui::info(format!(
        "compressed {} in {} layer(s) (ceiling {})",
        megabytes(compressed),
        layers.len(),
        megabytes(MAX_COMPRESSED_BYTES)
    ));
    let problems = layout_problems(&config, &manifest, &meta.labels());
    if !problems.is_empty() {
        bail!("the image is not what it should be:\n  {}", problems.join("\n  "));
    }
    if compressed > MAX_COMPRESSED_BYTES {
        bail!(
            "the image is {} compressed, over the {} ceiling",
            megabytes(compressed),
            megabytes(MAX_COMPRESSED_BYTES)
        );
    }
    ui::info(format!("user {USER}, entrypoint {BINARY}, ports {PORTS:?}, {} labels: as built", meta.labels().len()));
    step.done();
    Ok(())
}

/// The sizes of the manifest's layers, which are gzip'd in an OCI archive.
fn compressed_layer_bytes(manifest: &Value) -> Result<Vec<u64>> {
    let layers = manifest["layers"].as_array().ok_or_else(|| anyhow!("the manifest lists no layers"))?;
    layers
        .iter()
        .map(|layer| {
            let media_type = layer["mediaType"].as_str().unwrap_or("");
            if !media_type.ends_with("+gzip") && !media_type.ends_with("+zstd") {
                bail!("layer of type {media_type:?} is not compressed");
            }
            layer["size"].as_u64().ok_or_else(|| anyhow!("a layer without a size"))
        })
        .collect()
}

/// Where the image's config and manifest differ from the layout above (empty when they agree).
fn layout_problems(config: &Value, manifest: &Value, labels: &[(&str, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let settings = &config["config"];
    let mut expect = |what: &str, found: &Value, wanted: Value| {
        if *found != wanted {
            problems.push(format!("{what}: {found} instead of {wanted}"));
        }
    };
    expect("user", &settings["User"], json!(USER));
    expect("entrypoint", &settings["Entrypoint"], json!([BINARY]));
    expect("cmd", &settings["Cmd"], json!(CMD));
    let ports: serde_json::Map<String, Value> = PORTS.iter().map(|port| (format!("{port}/tcp"), json!({}))).collect();
    expect("exposed ports", &settings["ExposedPorts"], Value::Object(ports));
    expect("os", &config["os"], json!("linux"));
    for (key, value) in labels {
        expect(&format!("label {key}"), &settings["Labels"][key], json!(value));
        expect(&format!("annotation {key}"), &manifest["annotations"][key], json!(value));
    }
    problems
}

/// Why containers cannot run on this machine, if they cannot.
fn why_containers_cannot_run(tools: &Tools) -> Option<String> {
    if tools.podman.is_none() {
        return Some("podman is not installed (`cargo xtask setup` installs it)".into());
    }
    if !rustix::process::geteuid().is_root() {
        return Some("not root: this machine's podman runs containers as root only".into());
    }
    None
}

/// Runs the image against two mock engines on loopback and checks a plain and a streamed
/// answer, the fallback to userspace-only, and that it runs as the image's user with no
/// capabilities. Where containers cannot run here, warns why and returns.
fn run_image(tools: &Tools, image: &str, meta: &Metadata, run_dir: &Path) -> Result<()> {
    let step = ui::step(format!("image: run {image} against mock engines"));
    let podman = match (why_containers_cannot_run(tools), &tools.podman) {
        (None, Some(podman)) => podman,
        (reason, _) => {
            ui::warn(format!("not run: {}; the image was built and inspected", reason.unwrap_or_default()));
            return Ok(());
        }
    };
    // The first container tells a runtime that cannot run anything here from a broken image.
    let probe =
        capture(tools.podman(podman).args(["run", "--rm", "--network", "host", image, "--version"]), TOOL_TIMEOUT)?;
    if !probe.status.success() {
        let stderr = probe.stderr.trim();
        if probe.status.code() == Some(125) || stderr.contains("OCI runtime") {
            ui::warn(format!("not run: the container runtime fails here ({}): {stderr}", probe.status));
            ui::warn("the image was built and inspected");
            return Ok(());
        }
        bail!("`turnstile --version` in the image failed ({}): {stderr}", probe.status);
    }
    if parse_version(&probe.stdout)? != meta.version {
        bail!("the image's turnstile says {:?}, not version {}", probe.stdout.trim(), meta.version);
    }
    ui::info(format!("turnstile --version in the image: {}", probe.stdout.trim()));

    // The mock engine of the dev build: a no-op where `cargo xtask ci` has just built it.
    run_streaming(&mut procs::cargo_command(["build", "--workspace", "--bins"]), BUILD_TIMEOUT)?;
    let engine = Binaries::of_profile("debug")?.engine;
    if run_dir.exists() {
        std::fs::remove_dir_all(run_dir).with_context(|| format!("clearing {}", run_dir.display()))?;
    }
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    stack::two_worker_runtime()?.block_on(run_against_engines(tools, podman, image, &engine, run_dir))?;
    step.done();
    Ok(())
}

const RUN_MODEL: &str = "image-llama";

async fn run_against_engines(tools: &Tools, podman: &Path, image: &str, engine: &Path, run_dir: &Path) -> Result<()> {
    let client = Client::new();
    let mut engines = Vec::new();
    for pod in ["image-0", "image-1"] {
        let spec = EngineSpec {
            pod: pod.into(),
            model: RUN_MODEL.into(),
            ttft_ms: 20,
            itl_ms: 5,
            tokens: 8,
            threads: Some(1),
            extra_args: Vec::new(),
        };
        engines.push(stack::start_engine(engine, &spec, run_dir, None).await?);
    }
    // The directory is mounted, not the file: the gateway sees the file replaced atomically.
    let pods_dir = run_dir.join("config");
    std::fs::create_dir_all(&pods_dir)?;
    stack::write_pods(&pods_dir.join("pods.yaml"), &stack::engine_pods(&engines))?;
    let (listen, admin) = (stack::free_addr()?, stack::free_addr()?);
    let name = format!("turnstile-image-run-{}", std::process::id());
    let args: Vec<String> = [
        "run",
        "--rm",
        "--name",
        &name,
        "--network",
        "host",
        "--volume",
        &format!("{}:/etc/turnstile:ro", pods_dir.display()),
        image,
        "serve",
        "--listen",
        &listen.to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--ebpf",
        "auto",
        "--pods-file-poll-ms",
        "200",
        "--shutdown-grace-seconds",
        "1",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let mut shown = tools.podman(podman);
    shown.args(&args);
    ui::info(format!("engines on {} and {}", engines[0].addr, engines[1].addr));
    ui::info(format!("CONTAINERS_CONF={} {}", tools.containers_conf.display(), procs::display_command(&shown)));

    let _container = ContainerGuard { tools, podman, name: name.clone() };
    let mut podman_args = vec!["--runtime".into(), "runc".into(), "--cgroup-manager".into(), "cgroupfs".into()];
    podman_args.extend(args.iter().map(Into::into));
    let mut gateway = ChildGuard::spawn(ServerSpec {
        name: "turnstile container".into(),
        program: podman.to_path_buf(),
        args: podman_args,
        log: run_dir.join("gateway.log"),
        stdout: StdoutTo::Log,
        env: vec![("CONTAINERS_CONF".into(), tools.containers_conf.display().to_string())],
        env_remove: Vec::new(),
        cpu: None,
    })?;
    stack::wait_ready(&mut gateway, admin, &client).await?;
    let checked = check_running_gateway(tools, podman, &name, &client, listen, admin, &engines).await;
    let stopped = gateway.stop(STOP_GRACE).await;
    for engine in engines {
        engine.child.stop(STOP_GRACE).await?;
    }
    checked.with_context(|| format!("container log {}", run_dir.join("gateway.log").display()))?;
    ui::info(format!("container {}", stopped?));
    Ok(())
}

/// Force-removes the container on drop, should podman have been killed before it.
struct ContainerGuard<'a> {
    tools: &'a Tools,
    podman: &'a Path,
    name: String,
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        let _ = capture(
            self.tools.podman(self.podman).args(["rm", "--force", "--ignore", "--time", "0", &self.name]),
            TOOL_TIMEOUT,
        );
    }
}

async fn check_running_gateway(
    tools: &Tools,
    podman: &Path,
    name: &str,
    client: &Client,
    listen: SocketAddr,
    admin: SocketAddr,
    engines: &[stack::Engine],
) -> Result<()> {
    let readyz = client.get(admin, "/readyz", REQUEST_TIMEOUT).await?;
    let readiness: Value = serde_json::from_slice(&readyz.body).context("/readyz is not JSON")?;
    let kernel = &readiness["kernel_assist"];
    if kernel["mode"] != "userspace" || kernel["active"] != false {
        bail!("with no capabilities, /readyz should say userspace-only: {readiness}");
    }
    ui::info(format!("/readyz {}: kernel_assist {kernel}", readyz.status.as_u16()));

    let pid = output(tools.podman(podman).args(["inspect", "--format", "{{.State.Pid}}", name]), TOOL_TIMEOUT)?;
    let status_path = format!("/proc/{}/status", pid.trim());
    let status = std::fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
    let (uid, capabilities) = process_identity(&status)?;
    let wanted_uid = USER.split(':').next().unwrap_or_default();
    if uid != wanted_uid || capabilities != 0 {
        bail!("the gateway runs as uid {uid} with capabilities {capabilities:#x}, not as {wanted_uid} with none");
    }
    ui::info(format!("the gateway runs as uid {uid}, effective capabilities none"));

    stack::wait_models_listed(client, listen, &[RUN_MODEL], Duration::from_secs(10)).await?;
    let pods: Vec<&str> = engines.iter().map(|engine| engine.pod.as_str()).collect();
    let body = |stream: bool| json!({"model": RUN_MODEL, "messages": [{"role": "user", "content": "Hello from a container"}], "stream": stream});
    let reply = client.post_json(listen, "/v1/chat/completions", &[], &body(false), REQUEST_TIMEOUT).await?;
    if !reply.status.is_success() || !pods.contains(&reply.header("target-pod").as_str()) {
        bail!("chat answered {} from target-pod {}: {}", reply.status, reply.header("target-pod"), reply.text());
    }
    ui::info(format!("chat: {} from {}", reply.status.as_u16(), reply.header("target-pod")));

    let request = json_request(listen, "/v1/chat/completions", &[], &body(true))?;
    let response = client.send_streaming(request, REQUEST_TIMEOUT).await?;
    let (status, pod) = (response.status(), header_text(response.headers(), "target-pod"));
    let content_type = header_text(response.headers(), "content-type");
    let mut stream = response.into_body();
    let (mut frames, mut text) = (0, String::new());
    while let Some(frame) = tokio::time::timeout(REQUEST_TIMEOUT, stream.frame()).await.context("the stream stalled")? {
        if let Ok(data) = frame.context("reading the stream")?.into_data() {
            frames += 1;
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let events = sse_data(&text);
    if !status.is_success()
        || !content_type.starts_with("text/event-stream")
        || events.last() != Some(&"[DONE]")
        || events.len() < 3
    {
        bail!(
            "streamed chat: {status}, content-type {content_type}, {} events, ending {:?}: {text}",
            events.len(),
            events.last()
        );
    }
    ui::info(format!(
        "streamed chat: {} from {pod}, {} SSE events in {frames} frames, ending `data: [DONE]`",
        status.as_u16(),
        events.len()
    ));
    Ok(())
}

/// The payloads of the `data:` lines of an SSE body, in order.
fn sse_data(body: &str) -> Vec<&str> {
    body.lines().filter_map(|line| line.strip_prefix("data:")).map(str::trim).collect()
}

/// The real uid and the effective capability mask out of `/proc/<pid>/status`.
fn process_identity(status: &str) -> Result<(String, u64)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .ok_or_else(|| anyhow!("no {name} line in /proc/PID/status"))
    };
    let uid = field("Uid:")?.split_whitespace().next().unwrap_or_default().to_owned();
    let capabilities = u64::from_str_radix(field("CapEff:")?, 16).context("CapEff is not hex")?;
    Ok((uid, capabilities))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LDD: &str = "\tlinux-vdso.so.1 (0x00007ffd4b5f2000)\n\
        \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1a9e0000)\n\
        \tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f0c1a900000)\n\
        \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1a600000)\n\
        \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1aa10000)\n";

    #[test]
    fn ldd_gives_every_library_and_the_interpreter() {
        let paths: Vec<String> = parse_ldd(LDD).unwrap().iter().map(|path| path.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        let err = parse_ldd("\tlibssl.so.3 => not found\n").unwrap_err();
        assert!(format!("{err:#}").contains("libssl.so.3"), "{err:#}");
    }

    #[test]
    fn version_comes_from_the_binary() {
        assert_eq!(parse_version("turnstile 0.1.0 (1a2b3c4d5e6f)\n").unwrap(), "0.1.0");
        assert!(parse_version("error: unexpected argument").is_err());
    }

    #[test]
    fn process_identity_reads_uid_and_capabilities() {
        let status = "Name:\tturnstile\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
                      CapInh:\t0000000000000000\nCapEff:\t00000000a80425fb\n";
        assert_eq!(process_identity(status).unwrap(), ("65534".to_owned(), 0xa804_25fb));
        assert!(process_identity("Name:\tx\n").is_err());
    }

    #[test]
    fn sse_payloads_in_order() {
        let body = "data: {\"a\":1}\n\ndata: {\"a\":2}\n\n: keep-alive\n\ndata: [DONE]\n\n";
        assert_eq!(sse_data(body), ["{\"a\":1}", "{\"a\":2}", "[DONE]"]);
    }

    fn labels() -> Vec<(&'static str, String)> {
        Metadata {
            version: "0.1.0".into(),
            revision: "abc".into(),
            created: "2026-01-01T00:00:00+00:00".into(),
            created_unix: "1767225600".into(),
            source: None,
        }
        .labels()
    }

    #[test]
    fn labels_leave_out_an_unknown_source() {
        let keys: Vec<&str> = labels().iter().map(|(key, _)| *key).collect();
        assert_eq!(
            keys,
            [
                "org.opencontainers.image.title",
                "org.opencontainers.image.version",
                "org.opencontainers.image.revision",
                "org.opencontainers.image.created"
            ]
        );
    }

    #[test]
    fn layout_check_names_each_difference() {
        let labels = labels();
        let label_map: serde_json::Map<String, Value> =
            labels.iter().map(|(key, value)| ((*key).to_owned(), json!(value))).collect();
        let manifest = json!({"annotations": label_map});
        let mut config = json!({"os": "linux", "config": {
            "User": USER, "Entrypoint": [BINARY], "Cmd": CMD,
            "ExposedPorts": {"8888/tcp": {}, "8080/tcp": {}}, "Labels": label_map}});
        assert!(layout_problems(&config, &manifest, &labels).is_empty());

        config["config"]["User"] = json!("0:0");
        config["config"]["Labels"]["org.opencontainers.image.revision"] = json!("other");
        let problems = layout_problems(&config, &manifest, &labels);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("user: \"0:0\""), "{problems:?}");
        assert!(problems[1].contains("label org.opencontainers.image.revision"), "{problems:?}");
    }

    #[test]
    fn compressed_size_counts_only_compressed_layers() {
        let manifest = json!({"layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 7},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 5}]});
        assert_eq!(compressed_layer_bytes(&manifest).unwrap(), [7, 5]);
        let raw = json!({"layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 7}]});
        assert!(compressed_layer_bytes(&raw).is_err());
    }

    /// The instructions of one Dockerfile stage: `(INSTRUCTION, arguments)`, continuation
    /// lines joined and comments dropped.
    fn instructions(stage: &str) -> Vec<(String, String)> {
        let joined = stage
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("\\\n", " ");
        joined
            .lines()
            .filter_map(|line| line.trim().split_once(' '))
            .map(|(instruction, arguments)| (instruction.to_uppercase(), arguments.trim().to_owned()))
            .collect()
    }

    #[test]
    fn the_dockerfile_builds_the_same_layout() {
        let dockerfile = std::fs::read_to_string(procs::workspace_root().join("Dockerfile")).unwrap();
        let final_from = dockerfile.rfind("\nFROM ").expect("a FROM line");
        let (builder, last) = dockerfile.split_at(final_from);
        let last = instructions(last);
        let only = |name: &str| -> String {
            let found: Vec<&String> =
                last.iter().filter(|(instruction, _)| instruction == name).map(|(_, a)| a).collect();
            assert_eq!(found.len(), 1, "the final stage has {} {name} lines", found.len());
            found[0].clone()
        };
        assert_eq!(only("FROM"), "scratch");
        assert_eq!(only("COPY"), "--from=build /rootfs/ /", "the final stage copies the builder's root filesystem");
        assert_eq!(only("USER"), USER);
        assert_eq!(only("WORKDIR"), "/");
        assert_eq!(serde_json::from_str::<Value>(&only("ENTRYPOINT")).unwrap(), json!([BINARY]));
        assert_eq!(serde_json::from_str::<Value>(&only("CMD")).unwrap(), json!(CMD));
        let ports: Vec<String> = PORTS.iter().map(|port| format!("{port}/tcp")).collect();
        assert_eq!(only("EXPOSE").split_whitespace().collect::<Vec<_>>(), ports);
        let label_keys: Vec<String> = only("LABEL")
            .split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, _)| key.to_owned())
            .collect();
        assert_eq!(label_keys, LABEL_KEYS);

        // The builder puts each file where `stage_rootfs` does.
        let builder = instructions(builder);
        let runs: String =
            builder.iter().filter(|(i, _)| i == "RUN").map(|(_, a)| a.as_str()).collect::<Vec<_>>().join("\n");
        assert!(runs.contains(&format!("strip --strip-debug -o /rootfs{BINARY} ")), "{runs}");
        assert!(runs.contains(&format!("cp {CA_BUNDLE} /rootfs{CA_BUNDLE}")), "{runs}");
        assert!(runs.contains("ldd "), "{runs}");
        assert!(builder.contains(&("COPY".to_owned(), format!("{STATIC_ROOTFS}/ /rootfs/"))), "{builder:?}");
    }

    #[test]
    fn the_image_user_is_the_userspace_overlays() {
        let root = procs::workspace_root();
        let deployment = std::fs::read_to_string(root.join("deploy/overlays/userspace/deployment.yaml")).unwrap();
        let (uid, gid) = USER.split_once(':').unwrap();
        assert!(deployment.contains(&format!("runAsUser: {uid}")), "deployment.yaml's runAsUser is not {uid}");
        assert!(deployment.contains(&format!("runAsGroup: {gid}")), "deployment.yaml's runAsGroup is not {gid}");
        let passwd = std::fs::read_to_string(root.join(STATIC_ROOTFS).join("etc/passwd")).unwrap();
        assert!(passwd.lines().any(|line| line.starts_with(&format!("turnstile:x:{uid}:{gid}:"))), "{passwd}");
        let group = std::fs::read_to_string(root.join(STATIC_ROOTFS).join("etc/group")).unwrap();
        assert!(group.lines().any(|line| line.starts_with(&format!("turnstile:x:{gid}:"))), "{group}");
    }
}
