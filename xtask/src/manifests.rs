//! `cargo xtask manifests`: render every kustomization under `deploy/` with `kubectl kustomize`
//! and validate each rendered document against the Kubernetes API schemas, offline.
//!
//! The schemas come with the `kubernetes-validate` Python package (installed by `setup` into a
//! venv of its own), for the oldest Kubernetes the manifests support: [`KUBERNETES_VERSION`]
//! (the gateway's preStop `sleep` action needs 1.30). Strict mode, so a misspelt or misplaced
//! field is an error rather than something the API server silently drops. The rendered files
//! stay in `target/manifests/` for a look.
//!
//! Two more checks on what is rendered:
//! - the Prometheus Operator documents (`deploy/monitoring`), which `kubernetes-validate` has no
//!   schema for, are validated strictly against the operator's models (`validate_monitoring.py`,
//!   in a pinned venv of its own); any other document it has no schema for is an error;
//! - one gateway image: every gateway container names the reference set in
//!   `deploy/components/image`, whose tag is the workspace version, and every other image is one
//!   of [`THIRD_PARTY_IMAGES`].
//!
//! The Helm chart (`deploy/helm/turnstile`) goes through the same: `helm lint --strict` and
//! `helm template` (pinned Helm, installed by `setup`) with its default values and with each
//! `ci/*-values.yaml`, every render validated and image-checked like a kustomization's.
//!
//! What the manifests mean (capabilities, probes, rollout settings, labels, the config
//! annotation, the dashboard's series) is checked by `tests/tests/manifests.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::procs::{self, capture};
use crate::setup;
use crate::ui;

/// The Kubernetes version the manifests are validated against: the oldest they support.
pub const KUBERNETES_VERSION: &str = "1.30.0";

/// Rendering one kustomization, or validating them all.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The images the manifests may name besides the gateway's, each with where and why. A new one
/// is an error until it is listed here, so no manifest runs an image nobody chose.
pub const THIRD_PARTY_IMAGES: &[(&str, &str)] = &[
    ("busybox:1.36", "base/ and the chart: the init container that mounts the bpffs"),
    ("redis:7.4-alpine", "base/ and the chart: the bundled Redis"),
    ("vllm/vllm-openai:v0.10.2", "examples/: the engines"),
];

/// The name gateway workloads give their image; `deploy/components/image` rewrites it.
const GATEWAY_IMAGE_PLACEHOLDER: &str = "turnstile";

/// Where the gateway's image reference is set, relative to `deploy/`.
const IMAGE_COMPONENT: &str = "components/image/kustomization.yaml";

/// The Helm chart, relative to `deploy/`.
const HELM_CHART: &str = "helm/turnstile";

/// The release name and namespace the chart is rendered with (those of the README's
/// `helm install`).
const HELM_RELEASE: &str = "turnstile";

/// The Prometheus Operator documents' validator, run with the venv's Python.
const VALIDATE_MONITORING: &str = include_str!("validate_monitoring.py");

/// Renders and validates; the first failing kustomization or document ends it with an error.
pub fn run() -> Result<()> {
    let tools = setup::ensure_manifest_tools()?;
    let step = ui::step(format!("manifests: render deploy/ and validate against Kubernetes {KUBERNETES_VERSION}"));
    let deploy = procs::workspace_root().join("deploy");
    let kustomizations = find_kustomizations(&deploy)?;
    if kustomizations.is_empty() {
        bail!("no kustomization.yaml under {}", deploy.display());
    }
    let gateway_image = gateway_image(&deploy, &procs::workspace_root())?;
    let out_dir = procs::target_dir().join("manifests");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut renders = Renders { out_dir, gateway_image: &gateway_image, files: Vec::new(), image_problems: Vec::new() };
    for dir in &kustomizations {
        let result = capture(Command::new(&tools.kubectl).arg("kustomize").arg(dir), TOOL_TIMEOUT)
            .with_context(|| format!("running {} kustomize", tools.kubectl.display()))?;
        if !result.status.success() {
            bail!("kubectl kustomize {} failed:\n{}", dir.display(), result.stderr.trim());
        }
        renders.add(&relative(&deploy, dir), &rendered_name(&deploy, dir), &result.stdout)?;
    }
    let chart = deploy.join(HELM_CHART);
    for values in chart_values(&chart)? {
        let label = match &values {
            Some(file) => format!("{HELM_CHART} -f {}", relative(&chart, file)),
            None => HELM_CHART.to_owned(),
        };
        let values_args = values.iter().flat_map(|file| [Path::new("-f"), file.as_path()]);
        let lint = capture(
            Command::new(&tools.helm).args(["lint", "--strict"]).arg(&chart).args(values_args.clone()),
            TOOL_TIMEOUT,
        )
        .context("running helm lint")?;
        if !lint.status.success() {
            bail!("helm lint --strict {label} failed:\n{}{}", lint.stdout.trim(), lint.stderr.trim());
        }
        let template = capture(
            Command::new(&tools.helm)
                .args(["template", HELM_RELEASE])
                .arg(&chart)
                .args(["--namespace", HELM_RELEASE])
                .args(values_args),
            TOOL_TIMEOUT,
        )
        .context("running helm template")?;
        if !template.status.success() {
            bail!("helm template {label} failed:\n{}", template.stderr.trim());
        }
        renders.add(&label, &chart_render_name(values.as_deref()), &template.stdout)?;
    }
    let Renders { files: rendered, image_problems, .. } = renders;
    if !image_problems.is_empty() {
        bail!(
            "gateway containers must run {gateway_image} (set in deploy/{IMAGE_COMPONENT}; the chart's is \
             image.repository in deploy/{HELM_CHART}/values.yaml at its Chart.yaml appVersion), and other \
             images must be listed in THIRD_PARTY_IMAGES (xtask/src/manifests.rs):\n  {}",
            image_problems.join("\n  ")
        );
    }
    ui::info(format!("image    every gateway container runs {gateway_image}"));
    validate_kubernetes(&tools.kubernetes_validate, &rendered)?;
    validate_monitoring(&tools.monitoring_python, &rendered)?;
    step.done();
    Ok(())
}

/// What has been rendered so far, and what the image check found wrong with it.
struct Renders<'a> {
    out_dir: PathBuf,
    gateway_image: &'a str,
    files: Vec<PathBuf>,
    image_problems: Vec<String>,
}

impl Renders<'_> {
    /// Checks the images of one render (`label` says where it came from) and keeps it in
    /// `<out_dir>/<file_name>.yaml` for the validators.
    fn add(&mut self, label: &str, file_name: &str, text: &str) -> Result<()> {
        let out = self.out_dir.join(format!("{file_name}.yaml"));
        let documents = parse_documents(text).with_context(|| format!("parsing {}", out.display()))?;
        self.image_problems
            .extend(check_images(&documents, self.gateway_image).into_iter().map(|p| format!("{label}: {p}")));
        std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
        ui::info(format!("rendered {label:<28} {:>2} objects  -> {}", documents.len(), out.display()));
        self.files.push(out);
        Ok(())
    }
}

/// The chart's values to render with: its defaults (`None`), then each `ci/*-values.yaml`,
/// sorted, so a new variant is checked without being listed anywhere.
fn chart_values(chart: &Path) -> Result<Vec<Option<PathBuf>>> {
    let ci = chart.join("ci");
    let mut files = Vec::new();
    if ci.is_dir() {
        for entry in std::fs::read_dir(&ci).with_context(|| format!("listing {}", ci.display()))? {
            let path = entry?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("-values.yaml")) {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(std::iter::once(None).chain(files.into_iter().map(Some)).collect())
}

/// `None` → `helm-turnstile`; `ci/userspace-values.yaml` → `helm-turnstile-userspace`.
fn chart_render_name(values: Option<&Path>) -> String {
    let base = format!("helm-{}", HELM_CHART.rsplit('/').next().unwrap_or(HELM_CHART));
    let variant = values.and_then(|file| file.file_name()?.to_str()?.strip_suffix("-values.yaml"));
    match variant {
        Some(variant) => format!("{base}-{variant}"),
        None => base,
    }
}

/// Every rendered document against the Kubernetes schemas, strictly. Those it has no schema for
/// must be the Prometheus Operator's, which [`validate_monitoring`] checks.
fn validate_kubernetes(kubernetes_validate: &Path, rendered: &[PathBuf]) -> Result<()> {
    let mut validate = Command::new(kubernetes_validate);
    validate.args(["--kubernetes-version", KUBERNETES_VERSION, "--strict", "--quiet"]).args(rendered);
    let result = capture(&mut validate, TOOL_TIMEOUT).context("running kubernetes-validate")?;
    let output = format!("{}{}", result.stdout, result.stderr);
    if !result.status.success() {
        bail!(
            "kubernetes-validate found documents that Kubernetes {KUBERNETES_VERSION} would reject:\n{}",
            output.trim()
        );
    }
    let unknown = unvalidated_kinds(&output);
    if !unknown.is_empty() {
        bail!(
            "kubernetes-validate has no schema for these, and nothing else validates them:\n  {}",
            unknown.join("\n  ")
        );
    }
    ui::info(format!(
        "valid    {} renders against the Kubernetes {KUBERNETES_VERSION} schemas (strict)",
        rendered.len()
    ));
    Ok(())
}

/// The documents `kubernetes-validate` warned it has no schema for, except the Prometheus
/// Operator's (`monitoring.coreos.com`).
fn unvalidated_kinds(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|line| line.contains("Couldn't find schema") && !line.contains("api version monitoring.coreos.com/"))
        .map(|line| line.trim().to_owned())
        .collect()
}

/// The ServiceMonitors and PodMonitors among the renders, against the operator's models, with
/// unknown fields refused.
fn validate_monitoring(python: &Path, rendered: &[PathBuf]) -> Result<()> {
    let mut validate = Command::new(python);
    validate.arg("-c").arg(VALIDATE_MONITORING).args(rendered);
    let result = capture(&mut validate, TOOL_TIMEOUT).context("running validate_monitoring.py")?;
    if !result.status.success() {
        bail!(
            "Prometheus Operator documents that the operator's CRD schemas reject (strict):\n{}{}",
            result.stdout.trim(),
            result.stderr.trim()
        );
    }
    let count = result.stdout.trim().rsplit(' ').next().unwrap_or("0");
    ui::info(format!("valid    {count} Prometheus Operator documents against its CRD schemas (strict)"));
    Ok(())
}

/// One JSON value per YAML document, empty documents left out.
fn parse_documents(text: &str) -> Result<Vec<Value>> {
    let mut documents = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// The gateway's image reference as `deploy/components/image` sets it, once its tag is checked
/// against the gateway's version.
fn gateway_image(deploy: &Path, root: &Path) -> Result<String> {
    let path = deploy.join(IMAGE_COMPONENT);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let component = parse_documents(&text).with_context(|| format!("parsing {}", path.display()))?;
    let entry = component
        .first()
        .and_then(|c| c["images"].as_array())
        .and_then(|images| images.iter().find(|i| i["name"] == GATEWAY_IMAGE_PLACEHOLDER))
        .ok_or_else(|| anyhow!("{} has no `images:` entry named {GATEWAY_IMAGE_PLACEHOLDER}", path.display()))?;
    let (Some(name), Some(tag)) = (entry["newName"].as_str(), entry["newTag"].as_str()) else {
        bail!("{}: the {GATEWAY_IMAGE_PLACEHOLDER} entry needs newName and newTag (a string)", path.display());
    };
    let version = gateway_version(root)?;
    if tag != version {
        bail!(
            "{}: the gateway image tag is {tag} but the gateway's version is {version}: set newTag: \"{version}\" \
             (the tag of the image `cargo xtask image` builds)",
            path.display()
        );
    }
    Ok(format!("{name}:{tag}"))
}

/// The gateway crate's version (`gateway-user/Cargo.toml`, or the workspace's when it inherits).
fn gateway_version(root: &Path) -> Result<String> {
    let read = |path: PathBuf| std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()));
    let crate_toml = read(root.join("gateway-user/Cargo.toml"))?;
    let version = match toml_value(&crate_toml, "package", "version") {
        Some(version) => Some(version),
        None => toml_value(&read(root.join("Cargo.toml"))?, "workspace.package", "version"),
    };
    version.ok_or_else(|| anyhow!("no version in gateway-user/Cargo.toml nor in [workspace.package]"))
}

/// The string value of `key = "..."` in `[section]` of a Cargo.toml (not `key.workspace = true`).
fn toml_value(text: &str, section: &str, key: &str) -> Option<String> {
    let header = format!("[{section}]");
    let mut in_section = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == header;
        } else if in_section
            && let Some((name, value)) = line.split_once('=')
            && name.trim() == key
        {
            return value.trim().strip_prefix('"')?.split('"').next().map(str::to_owned);
        }
    }
    None
}

/// Each problem with the images of `documents`: a gateway container (named `turnstile`, or
/// running an image named `turnstile`) not on `gateway_image`, or another image not listed in
/// [`THIRD_PARTY_IMAGES`].
fn check_images(documents: &[Value], gateway_image: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for document in documents {
        let owner = format!("{} {}", document["kind"].as_str().unwrap_or("?"), document["metadata"]["name"]);
        let mut containers = Vec::new();
        collect_containers(document, &mut containers);
        for container in containers {
            let name = container["name"].as_str().unwrap_or("?");
            let image = container["image"].as_str().unwrap_or("");
            if name == GATEWAY_IMAGE_PLACEHOLDER || image_name(image) == GATEWAY_IMAGE_PLACEHOLDER {
                if image != gateway_image {
                    problems.push(format!("{owner}, container {name}: image `{image}`, not {gateway_image}"));
                }
            } else if !THIRD_PARTY_IMAGES.iter().any(|(known, _)| *known == image) {
                problems.push(format!("{owner}, container {name}: image `{image}` is not a known third-party image"));
            }
        }
    }
    problems
}

/// Every container, init container and ephemeral container anywhere in a document (pod
/// templates of every workload kind, CronJob job templates, bare Pods).
fn collect_containers<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("containers" | "initContainers" | "ephemeralContainers", Value::Array(items)) => {
                        out.extend(items.iter().filter(|c| c.is_object()));
                    }
                    _ => collect_containers(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_containers(item, out)),
        _ => {}
    }
}

/// `registry:5000/team/turnstile:1.0@sha256:…` → `turnstile`: the last path segment, without tag
/// or digest.
fn image_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

/// Every directory under `deploy` holding a `kustomization.yaml`, sorted, so a new overlay is
/// checked without being listed anywhere.
fn find_kustomizations(deploy: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![deploy.to_path_buf()];
    while let Some(dir) = pending.pop() {
        if dir.join("kustomization.yaml").is_file() {
            found.push(dir.clone());
        }
        for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// `deploy/overlays/userspace` → `overlays-userspace`.
fn rendered_name(deploy: &Path, dir: &Path) -> String {
    let relative = relative(deploy, dir);
    if relative.is_empty() { "deploy".to_owned() } else { relative.replace('/', "-") }
}

fn relative(deploy: &Path, dir: &Path) -> String {
    dir.strip_prefix(deploy).unwrap_or(dir).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_kustomization_in_the_repository() {
        let deploy = procs::workspace_root().join("deploy");
        let found: Vec<String> =
            find_kustomizations(&deploy).unwrap().iter().map(|dir| relative(&deploy, dir)).collect();
        for expected in [
            "base",
            "examples",
            "grafana",
            "monitoring",
            "overlays/gpu-nodes",
            "overlays/privileged",
            "overlays/userspace",
            "rbac",
        ] {
            assert!(found.iter().any(|dir| dir == expected), "{expected} not found in {found:?}");
        }
        // rbac/serviceaccount is a component of the others, and is rendered on its own too.
        assert!(found.iter().any(|dir| dir == "rbac/serviceaccount"), "{found:?}");
    }

    #[test]
    fn renders_the_chart_with_its_defaults_and_every_ci_values_file() {
        let chart = procs::workspace_root().join("deploy").join(HELM_CHART);
        let values = chart_values(&chart).unwrap();
        assert_eq!(values.first(), Some(&None), "the defaults come first");
        let names: Vec<String> = values.iter().map(|v| chart_render_name(v.as_deref())).collect();
        assert!(names.contains(&"helm-turnstile".to_owned()), "{names:?}");
        assert!(names.contains(&"helm-turnstile-userspace".to_owned()), "{names:?}");
    }

    #[test]
    fn names_rendered_files_after_their_directory() {
        let deploy = Path::new("/w/deploy");
        assert_eq!(rendered_name(deploy, Path::new("/w/deploy/overlays/userspace")), "overlays-userspace");
        assert_eq!(rendered_name(deploy, Path::new("/w/deploy/base")), "base");
    }

    const GATEWAY: &str = "localhost/turnstile:0.1.0";

    fn workload(kind: &str, image: &str) -> Value {
        serde_json::json!({
            "kind": kind,
            "metadata": {"name": "turnstile"},
            "spec": {"template": {"spec": {
                "initContainers": [{"name": "mount-bpffs", "image": "busybox:1.36"}],
                "containers": [{"name": "turnstile", "image": image}],
            }}},
        })
    }

    #[test]
    fn image_check_passes_the_gateway_image_and_listed_third_party_images() {
        let redis = serde_json::json!({"kind": "Deployment", "metadata": {"name": "redis"},
            "spec": {"template": {"spec": {"containers": [{"name": "redis", "image": "redis:7.4-alpine"}]}}}});
        let documents = [workload("DaemonSet", GATEWAY), redis, serde_json::json!({"kind": "Service"})];
        assert_eq!(check_images(&documents, GATEWAY), Vec::<String>::new());
    }

    #[test]
    fn image_check_fails_on_the_unrewritten_placeholder() {
        // What overlays/userspace rendered when its Deployment was added after the base's rewrite.
        let problems = check_images(&[workload("Deployment", "turnstile")], GATEWAY);
        assert_eq!(
            problems,
            ["Deployment \"turnstile\", container turnstile: image `turnstile`, not localhost/turnstile:0.1.0"]
        );
    }

    #[test]
    fn image_check_fails_on_another_registry_or_tag_for_the_gateway() {
        for image in ["registry.example.com/turnstile:0.1.0", "localhost/turnstile:0.2.0", "localhost/turnstile"] {
            assert_eq!(check_images(&[workload("DaemonSet", image)], GATEWAY).len(), 1, "{image}");
        }
        // Found by the image's name too, whatever the container is called.
        let renamed = serde_json::json!({"kind": "Pod", "metadata": {"name": "debug"},
            "spec": {"containers": [{"name": "gw", "image": "ghcr.io/x/turnstile:9@sha256:ab"}]}});
        assert_eq!(check_images(&[renamed], GATEWAY).len(), 1);
    }

    #[test]
    fn image_check_fails_on_an_unlisted_image() {
        let job = serde_json::json!({"kind": "CronJob", "metadata": {"name": "backup"}, "spec": {"jobTemplate":
            {"spec": {"template": {"spec": {"containers": [{"name": "dump", "image": "redis:8"}]}}}}}});
        let problems = check_images(&[job], GATEWAY);
        assert_eq!(problems, ["CronJob \"backup\", container dump: image `redis:8` is not a known third-party image"]);
    }

    #[test]
    fn the_image_component_names_the_gateway_at_the_workspace_version() {
        let root = procs::workspace_root();
        let image = gateway_image(&root.join("deploy"), &root).unwrap();
        let version = gateway_version(&root).unwrap();
        assert!(image.ends_with(&format!(":{version}")), "{image}");
    }

    #[test]
    fn reads_versions_from_cargo_toml() {
        let text = "[package]\nname = \"x\"\nversion = \"1.2.3\" # note\n[dependencies]\nversion = \"9\"\n";
        assert_eq!(toml_value(text, "package", "version").as_deref(), Some("1.2.3"));
        assert_eq!(toml_value("[package]\nversion.workspace = true\n", "package", "version"), None);
        assert_eq!(
            toml_value("[workspace.package]\nversion = \"0.4.0\"\n", "workspace.package", "version").as_deref(),
            Some("0.4.0")
        );
    }

    #[test]
    fn only_prometheus_operator_documents_may_lack_a_kubernetes_schema() {
        let output = "WARN a.yaml Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1 for kubernetes version 1.30\n\
                      WARN a.yaml Couldn't find schema for kind Certificate with api version cert-manager.io/v1 for kubernetes version 1.30\n";
        let unknown = unvalidated_kinds(output);
        assert_eq!(unknown.len(), 1);
        assert!(unknown[0].contains("Certificate"), "{unknown:?}");
    }

    #[test]
    fn image_names_drop_registry_tag_and_digest() {
        assert_eq!(image_name("turnstile"), "turnstile");
        assert_eq!(image_name("localhost:5000/team/turnstile:0.1.0@sha256:ab"), "turnstile");
        assert_eq!(image_name("vllm/vllm-openai:v0.10.2"), "vllm-openai");
    }
}
