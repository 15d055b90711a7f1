//! `cargo xtask manifests`: render every kustomization under `deploy/` with `kubectl kustomize`
//! and validate each rendered document against the Kubernetes API schemas, offline.
//!
//! The schemas come with the `kubernetes-validate` Python package (installed by `setup` into a
//! venv of its own), for the oldest Kubernetes the manifests support: [`KUBERNETES_VERSION`]
//! (the gateway's preStop `sleep` action needs 1.30). Strict mode, so a misspelt or misplaced
//! field is an error rather than something the API server silently drops. The rendered files
//! stay in `target/manifests/` for a look.
//!
//! What the manifests mean (capabilities, probes, rollout settings, labels, the config
//! annotation, the dashboard's series) is checked by `tests/tests/manifests.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::procs::{self, capture};
use crate::setup;
use crate::ui;

/// The Kubernetes version the manifests are validated against: the oldest they support.
pub const KUBERNETES_VERSION: &str = "1.30.0";

/// Rendering one kustomization, or validating them all.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Renders and validates; the first failing kustomization or document ends it with an error.
pub fn run() -> Result<()> {
    let tools = setup::ensure_manifest_tools()?;
    let step = ui::step(format!("manifests: render deploy/ and validate against Kubernetes {KUBERNETES_VERSION}"));
    let deploy = procs::workspace_root().join("deploy");
    let kustomizations = find_kustomizations(&deploy)?;
    if kustomizations.is_empty() {
        bail!("no kustomization.yaml under {}", deploy.display());
    }
    let out_dir = procs::target_dir().join("manifests");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut rendered = Vec::new();
    for dir in &kustomizations {
        let name = rendered_name(&deploy, dir);
        let out = out_dir.join(format!("{name}.yaml"));
        let result = capture(Command::new(&tools.kubectl).arg("kustomize").arg(dir), TOOL_TIMEOUT)
            .with_context(|| format!("running {} kustomize", tools.kubectl.display()))?;
        if !result.status.success() {
            bail!("kubectl kustomize {} failed:\n{}", dir.display(), result.stderr.trim());
        }
        let documents = result.stdout.matches("\nkind: ").count() + usize::from(result.stdout.starts_with("kind: "));
        std::fs::write(&out, &result.stdout).with_context(|| format!("writing {}", out.display()))?;
        ui::info(format!("rendered {:<28} {documents:>2} objects  -> {}", relative(&deploy, dir), out.display()));
        rendered.push(out);
    }
    let mut validate = Command::new(&tools.kubernetes_validate);
    validate.args(["--kubernetes-version", KUBERNETES_VERSION, "--strict", "--quiet"]).args(&rendered);
    let result = capture(&mut validate, TOOL_TIMEOUT).context("running kubernetes-validate")?;
    if !result.status.success() {
        bail!(
            "kubernetes-validate found documents that Kubernetes {KUBERNETES_VERSION} would reject:\n{}{}",
            result.stdout.trim(),
            result.stderr.trim()
        );
    }
    ui::info(format!(
        "valid    {} kustomizations against the Kubernetes {KUBERNETES_VERSION} schemas (strict)",
        rendered.len()
    ));
    step.done();
    Ok(())
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
        for expected in ["base", "examples", "grafana", "overlays/privileged", "overlays/userspace", "rbac"] {
            assert!(found.iter().any(|dir| dir == expected), "{expected} not found in {found:?}");
        }
        // rbac/serviceaccount is a component of the others, and is rendered on its own too.
        assert!(found.iter().any(|dir| dir == "rbac/serviceaccount"), "{found:?}");
    }

    #[test]
    fn names_rendered_files_after_their_directory() {
        let deploy = Path::new("/w/deploy");
        assert_eq!(rendered_name(deploy, Path::new("/w/deploy/overlays/userspace")), "overlays-userspace");
        assert_eq!(rendered_name(deploy, Path::new("/w/deploy/base")), "base");
    }
}
