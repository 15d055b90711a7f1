//! Discovery from a local pods file: a Kubernetes `v1 List` of Pods, exactly
//! what `kubectl get pods -l model.aibrix.ai/name -o yaml` prints (YAML or JSON).
//!
//! The file is polled rather than watched with inotify: polling also sees
//! ConfigMap-style symlink swaps and editors that replace the file, and
//! reading a few kilobytes a few times a second costs nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::pod::PodInfo;
use super::store::PodStore;

/// Why a pods file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PodsFileError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("not a Kubernetes list of pods: {0}")]
    Parse(String),
    #[error("kind {0:?} is not a List or PodList")]
    WrongKind(String),
    /// An empty file, or one cut short: a rewrite in progress
    /// (`kubectl get pods -o yaml > pods.yaml` truncates, then writes, and
    /// prints `kind` last), never "no pods".
    #[error("the file looks incomplete ({0}); `items: []` is how to remove every pod")]
    Incomplete(&'static str),
}

#[derive(Deserialize)]
struct PodListDoc {
    #[serde(default)]
    kind: Option<String>,
    /// `None` when missing or `null`: only an explicit list counts.
    #[serde(default)]
    items: Option<Vec<Pod>>,
}

/// Parses the text of a pods file into the pods that serve a model.
/// Pods without the model label are skipped; pods with unusable labels are
/// skipped with a warning, since one bad pod must not hide the others.
pub fn parse_pods(text: &str) -> Result<Vec<PodInfo>, PodsFileError> {
    if text.trim().is_empty() {
        return Err(PodsFileError::Incomplete("it is empty"));
    }
    let doc: PodListDoc = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| PodsFileError::Parse(e.to_string()))?
    } else {
        serde_norway::from_str(text).map_err(|e| PodsFileError::Parse(e.to_string()))?
    };
    match doc.kind.as_deref() {
        Some("List") | Some("PodList") => {}
        None => return Err(PodsFileError::Incomplete("no `kind: List`, which kubectl writes last")),
        Some(other) => return Err(PodsFileError::WrongKind(other.to_owned())),
    }
    let Some(items) = doc.items else {
        return Err(PodsFileError::Incomplete("no `items` list"));
    };
    let mut pods = Vec::with_capacity(items.len());
    for pod in &items {
        match PodInfo::from_pod(pod) {
            Ok(Some(info)) => pods.push(info),
            Ok(None) => {}
            Err(err) => {
                let name = pod.metadata.name.as_deref().unwrap_or("<unnamed>");
                tracing::warn!(pod = name, error = %err, "skipping pod");
            }
        }
    }
    Ok(pods)
}

/// Loads the pods file once into the store.
pub fn load_once(path: &Path, store: &PodStore) -> Result<usize, PodsFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PodsFileError::Read { path: path.to_owned(), source })?;
    let pods = parse_pods(&text)?;
    let count = pods.len();
    store.replace_all(pods);
    Ok(count)
}

/// Keeps the store in step with the file until shutdown. An unreadable or
/// invalid file leaves the last good state in place; the reason is logged
/// once per distinct file content.
pub async fn watch(path: PathBuf, store: Arc<PodStore>, poll: Duration, shutdown: CancellationToken) {
    super::follow_file(&path, poll, None, &shutdown, |current, _| {
        match current {
            Ok(text) => match parse_pods(&text) {
                Ok(pods) => {
                    let (total, ready) = (pods.len(), pods.iter().filter(|p| p.ready).count());
                    store.replace_all(pods);
                    tracing::info!(path = %path.display(), pods = total, ready, "pods file loaded");
                }
                Err(err) => tracing::error!(path = %path.display(), error = %err,
                    "pods file is invalid; keeping the last good pod set"),
            },
            Err(err) => tracing::error!(path = %path.display(), error = %err,
                "cannot read pods file; keeping the last good pod set"),
        }
        std::future::ready(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    const LIST: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: a-0
    labels: {model.aibrix.ai/name: a, model.aibrix.ai/port: "8001"}
  status: {podIP: 127.0.0.1, conditions: [{type: Ready, status: "True"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, labels: {app: web}}
- apiVersion: v1
  kind: Pod
  metadata:
    name: bad-port
    labels: {model.aibrix.ai/name: a, model.aibrix.ai/port: "eighty"}
"#;

    #[test]
    fn yaml_list_keeps_model_pods_only() {
        let pods = parse_pods(LIST).expect("valid list");
        let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a-0", "bad-port"], "a bad port label falls back to 8000");
        assert_eq!(pods[0].addr_text, "127.0.0.1:8001");
    }

    #[test]
    fn json_list_is_accepted() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"metadata":{"name":"j","labels":{"model.aibrix.ai/name":"m"}},"status":{"podIP":"10.1.1.1","conditions":[{"type":"Ready","status":"True"}]}}]}"#;
        let pods = parse_pods(json).expect("valid");
        assert_eq!(pods[0].addr_text, "10.1.1.1:8000");
        assert!(pods[0].ready);
    }

    /// What a reader sees while `kubectl get pods -o yaml > pods.yaml` runs:
    /// nothing, then a prefix (kubectl writes `items` first, `kind` last).
    #[test]
    fn empty_and_cut_short_files_are_incomplete_not_empty() {
        let kubectl = LIST.replace("kind: List\n", "") + "kind: List\nmetadata:\n  resourceVersion: \"\"\n";
        assert_eq!(parse_pods(&kubectl).expect("whole file").len(), 2);
        for cut in [0, 1, 20, kubectl.find("- apiVersion").unwrap(), kubectl.find("kind: List").unwrap()] {
            let prefix = &kubectl[..cut];
            let parsed = parse_pods(prefix);
            assert!(
                matches!(parsed, Err(PodsFileError::Incomplete(_) | PodsFileError::Parse(_))),
                "cut at {cut} must not be a pod set: {parsed:?}"
            );
        }
        assert!(matches!(parse_pods(" \n"), Err(PodsFileError::Incomplete(_))));
        assert!(matches!(parse_pods("apiVersion: v1\nkind: List\nitems:\n"), Err(PodsFileError::Incomplete(_))));
        assert_eq!(parse_pods("apiVersion: v1\nkind: List\nitems: []\n").expect("explicitly empty").len(), 0);
        assert!(matches!(parse_pods("{}"), Err(PodsFileError::Incomplete(_))));
    }

    #[test]
    fn garbage_and_wrong_kind_are_errors() {
        assert!(matches!(parse_pods("items: [1, 2"), Err(PodsFileError::Parse(_))));
        assert!(matches!(parse_pods("kind: Deployment\nitems: []"), Err(PodsFileError::WrongKind(_))));
        assert!(matches!(parse_pods("kind: List\nitems: 5"), Err(PodsFileError::Parse(_))));
    }

    async fn wait_until(store: &PodStore, pred: impl Fn(&PodStore) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !pred(store) {
            assert!(tokio::time::Instant::now() < deadline, "store never reached the expected state");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn invalid_rewrite_keeps_last_good_state_and_valid_rewrite_applies() {
        let dir = std::env::temp_dir().join(format!("turnstile-podsfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("pods.yaml");
        std::fs::write(&path, LIST).expect("write");
        let store = Arc::new(PodStore::new(Arc::new(Metrics::new())));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch(path.clone(), Arc::clone(&store), Duration::from_millis(10), shutdown.clone()));

        wait_until(&store, |s| s.snapshot().model("a").is_some()).await;
        std::fs::write(&path, "items: [oops").expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.snapshot().model("a").expect("last good state kept").pods[0].name, "a-0");

        std::fs::write(&path, LIST.replace("name: a-0", "name: a-1")).expect("write");
        wait_until(&store, |s| s.snapshot().model("a").is_some_and(|m| m.pods[0].name == "a-1")).await;

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("watcher stops on shutdown").expect("join");
        let _ = std::fs::remove_dir_all(dir);
    }
}
