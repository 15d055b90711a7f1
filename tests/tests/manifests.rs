//! deploy/ as an operator meets it: the manifests `kubectl kustomize` renders
//! mean what the README says (capabilities, probes, ports, rollout settings,
//! labels), the example config annotations are accepted by the real gateway,
//! and every series the Grafana dashboard queries is one the gateway exports.
//!
//! Schema validation of every rendered document is `cargo xtask manifests`.
//! These tests need `kubectl`, `redis-server` and the pinned Helm (`cargo xtask setup` installs
//! them); the chart (`deploy/helm/turnstile`) is held to the Kustomize directories it mirrors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use turnstile_tests::fake_apiserver::FakeApiServer;
use turnstile_tests::harness::{
    Discovery, Engine, Gateway, PodSpec, chat_body, eventually, free_port, get_json, post, scratch_dir, send,
    turnstile_bin,
};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").join("deploy")
}

/// `kubectl kustomize deploy/<dir>`, one JSON value per rendered document.
fn render(dir: &str) -> Vec<Value> {
    let path = deploy_dir().join(dir);
    let output = match Command::new("kubectl").arg("kustomize").arg(&path).output() {
        Ok(output) => output,
        Err(err) => panic!(
            "kubectl could not be run ({err}): these tests render deploy/ with `kubectl kustomize`; \
             `cargo xtask setup` installs kubectl"
        ),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("rendered YAML is UTF-8");
    serde_norway::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("rendered document parses"))
        .filter(|document| !document.is_null())
        .collect()
}

/// The pinned Helm `cargo xtask setup` installs.
fn helm() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME");
    let helm = PathBuf::from(home).join(".local/share/turnstile/helm-3.17.3/helm");
    assert!(helm.is_file(), "no {}: `cargo xtask setup` installs Helm", helm.display());
    helm
}

/// `helm template turnstile deploy/helm/turnstile -n turnstile --set ...`, as the README's
/// `helm install` would apply it.
fn render_chart(sets: &[&str]) -> Vec<Value> {
    let mut helm = Command::new(helm());
    helm.args(["template", "turnstile"]).arg(deploy_dir().join("helm/turnstile")).args(["--namespace", "turnstile"]);
    for set in sets {
        helm.args(["--set", set]);
    }
    let output = helm.output().expect("run helm");
    assert!(output.status.success(), "helm template {sets:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).expect("rendered YAML is UTF-8");
    serde_norway::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("rendered document parses"))
        .filter(|document| !document.is_null())
        .map(|mut document| {
            // Helm leaves the release namespace out of namespaced objects; `helm install -n` puts
            // them there.
            if document["kind"] != "ClusterRole" && document["kind"] != "ClusterRoleBinding" {
                document["metadata"]["namespace"] = json!("turnstile");
            }
            document
        })
        .collect()
}

/// The object of `kind` labelled `app.kubernetes.io/component: component` (gateway, redis).
fn component<'a>(documents: &'a [Value], kinds: &[&str], component: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| {
            kinds.contains(&d["kind"].as_str().unwrap_or(""))
                && d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        })
        .unwrap_or_else(|| panic!("no {kinds:?} of component {component} among {:?}", names(documents)))
}

fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", names(documents)))
}

fn names(documents: &[Value]) -> Vec<String> {
    documents.iter().map(|d| format!("{}/{}", d["kind"].as_str().unwrap_or(""), d["metadata"]["name"])).collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The value of `--name=VALUE` or `--name VALUE` in a container's args.
fn flag(args: &[String], name: &str) -> Option<String> {
    let long = format!("--{name}");
    args.iter().enumerate().find_map(|(i, arg)| {
        if let Some(value) = arg.strip_prefix(&format!("{long}=")) {
            Some(value.to_owned())
        } else if *arg == long {
            args.get(i + 1).cloned()
        } else {
            None
        }
    })
}

fn port_of(listen: &str) -> u64 {
    listen.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {listen}"))
}

/// The number of the container port a probe or Service names (by name or number).
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    let name = port.as_str().expect("port is a name or a number");
    container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container {} has no port named {name}", container["name"]))
}

/// What an operator relies on in a gateway workload, base or overlay.
fn check_gateway_workload(documents: &[Value], workload: &Value) {
    let pod = &workload["spec"]["template"]["spec"];
    let gateway = container(workload, "turnstile");
    let args = strings(&gateway["args"]);
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{args:?}");

    // Every flag is one `turnstile serve` knows.
    let help = Command::new(turnstile_bin()).args(["serve", "--help"]).output().expect("turnstile serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let name = arg.split('=').next().unwrap_or(arg);
        assert!(help.contains(&format!("{name} ")), "`turnstile serve` has no flag {name}");
    }

    // The Service and the probes reach the ports the gateway listens on.
    let proxy_port = port_of(&flag(&args, "listen").unwrap_or_else(|| "0.0.0.0:8888".into()));
    let admin_port = port_of(&flag(&args, "admin-listen").unwrap_or_else(|| "0.0.0.0:8080".into()));
    let service = find(documents, "Service", "turnstile");
    let selector = service["spec"]["selector"].as_object().expect("selector");
    for (key, value) in selector {
        assert_eq!(&workload["spec"]["template"]["metadata"]["labels"][key], value, "Service selector {key}");
    }
    for port in service["spec"]["ports"].as_array().expect("ports") {
        let target = resolve_port(gateway, &port["targetPort"]);
        let expected = if port["name"] == "proxy" { proxy_port } else { admin_port };
        assert_eq!(target, expected, "Service port {} does not reach the gateway", port["name"]);
    }
    assert_eq!(gateway["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(resolve_port(gateway, &gateway["readinessProbe"]["httpGet"]["port"]), admin_port);
    assert_eq!(gateway["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(resolve_port(gateway, &gateway["livenessProbe"]["httpGet"]["port"]), admin_port);

    // Redis is the one in the same namespace, on its Service's port.
    let redis_url = gateway["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "TURNSTILE_REDIS_URL"))
        .and_then(|e| e["value"].as_str())
        .expect("TURNSTILE_REDIS_URL");
    let redis = component(documents, &["Service"], "redis");
    let expected = format!(
        "redis://{}.{}.svc.cluster.local:{}/",
        redis["metadata"]["name"].as_str().expect("name"),
        redis["metadata"]["namespace"].as_str().expect("namespace"),
        redis["spec"]["ports"][0]["port"]
    );
    assert_eq!(redis_url, expected);

    // Draining finishes before the kubelet kills the gateway.
    let grace: u64 = flag(&args, "shutdown-grace-seconds").map_or(30, |g| g.parse().expect("grace"));
    let pre_stop = gateway["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap_or(0);
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(termination > pre_stop + grace, "terminationGracePeriodSeconds {termination} <= {pre_stop} + {grace}");

    // Its ServiceAccount is the one the RBAC binds.
    let account = pod["serviceAccountName"].as_str().expect("serviceAccountName");
    let binding = find(documents, "ClusterRoleBinding", "turnstile-pod-reader");
    assert_eq!(binding["subjects"][0]["name"], account);
    assert_eq!(binding["subjects"][0]["namespace"], workload["metadata"]["namespace"]);
}

#[test]
fn base_runs_the_gateway_per_node_with_bpf_net_admin_and_perfmon_only() {
    let documents = render("base");
    let daemonset = find(&documents, "DaemonSet", "turnstile");
    check_gateway_workload(&documents, daemonset);
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");

    let gateway = container(daemonset, "turnstile");
    let security = &gateway["securityContext"];
    let added: BTreeSet<String> = strings(&security["capabilities"]["add"]).into_iter().collect();
    let expected: BTreeSet<String> = ["BPF", "NET_ADMIN", "PERFMON"].map(String::from).into();
    assert_eq!(added, expected, "capabilities added to the gateway");
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_ne!(security["privileged"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    let args = strings(&gateway["args"]);
    assert_eq!(flag(&args, "ebpf").as_deref(), Some("auto"));
    assert_eq!(flag(&args, "discovery").as_deref(), Some("kubernetes"));

    // The bpffs: a hostPath at /sys/fs/bpf, mounted by a privileged init step if missing.
    let bpffs = pod["volumes"]
        .as_array()
        .and_then(|volumes| volumes.iter().find(|v| v["hostPath"]["path"] == "/sys/fs/bpf"))
        .expect("a hostPath volume at /sys/fs/bpf");
    let mounted_at =
        |c: &Value| c["volumeMounts"].as_array().and_then(|m| m.iter().find(|m| m["name"] == bpffs["name"])).cloned();
    let gateway_mount = mounted_at(gateway).expect("the gateway mounts the bpffs");
    let bpffs_dir = flag(&args, "bpffs-dir").unwrap_or_else(|| "/sys/fs/bpf/turnstile".into());
    assert!(bpffs_dir.starts_with(gateway_mount["mountPath"].as_str().expect("mountPath")), "{bpffs_dir}");
    let init = &pod["initContainers"][0];
    assert!(init["command"].to_string().contains("mount -t bpf bpf /sys/fs/bpf"), "{init}");
    assert_eq!(mounted_at(init).expect("the init container mounts the bpffs")["mountPropagation"], "Bidirectional");

    // Redis, and read-only RBAC on pods and AIBrix's ModelAdapters, in the chart as here.
    find(&documents, "Deployment", "redis");
    let role = find(&documents, "ClusterRole", "turnstile-pod-reader");
    let rules = json!([
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["model.aibrix.ai"], "resources": ["modeladapters"], "verbs": ["get", "list", "watch"]},
    ]);
    assert_eq!(role["rules"], rules);
    assert_eq!(find(&render("rbac/namespaced"), "Role", "turnstile-pod-reader")["rules"], rules);
    assert_eq!(find(&render_chart(&[]), "ClusterRole", "turnstile-pod-reader")["rules"], rules);
    // No engine comes with the gateway.
    assert!(!documents.iter().any(|d| d["spec"]["template"]["metadata"]["labels"]["model.aibrix.ai/name"].is_string()));
}

#[test]
fn overlays_make_the_gateway_privileged_or_userspace_only() {
    let documents = render("overlays/privileged");
    let daemonset = find(&documents, "DaemonSet", "turnstile");
    check_gateway_workload(&documents, daemonset);
    assert_eq!(container(daemonset, "turnstile")["securityContext"]["privileged"], true);

    let documents = render("overlays/userspace");
    assert!(!documents.iter().any(|d| d["kind"] == "DaemonSet"), "{:?}", names(&documents));
    let deployment = find(&documents, "Deployment", "turnstile");
    check_gateway_workload(&documents, deployment);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_ne!(pod["hostNetwork"], true);
    assert!(pod["initContainers"].is_null() && !pod["volumes"].to_string().contains("hostPath"), "{pod}");
    let gateway = container(deployment, "turnstile");
    assert!(gateway["securityContext"]["capabilities"]["add"].is_null(), "no capability added");
    assert_eq!(strings(&gateway["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(flag(&strings(&gateway["args"]), "ebpf").as_deref(), Some("off"));
    assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"], json!({"maxUnavailable": 0, "maxSurge": 1}));
    let namespace = find(&documents, "Namespace", "turnstile");
    assert_eq!(namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");
}

/// The example model Deployments, each with its pod template's labels and config annotation.
fn example_models() -> Vec<Value> {
    let documents = render("examples");
    assert!(!documents.is_empty());
    for deployment in &documents {
        assert_eq!(deployment["kind"], "Deployment", "examples hold engine Deployments only");
    }
    documents
}

#[test]
fn example_models_carry_the_labels_probe_and_rollout_settings_of_the_seed() {
    let mut roles: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for deployment in example_models() {
        let name = &deployment["metadata"]["name"];
        assert_eq!(
            deployment["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}),
            "{name}: a rollout must not lose capacity"
        );
        let template = &deployment["spec"]["template"];
        let labels = &template["metadata"]["labels"];
        assert!(labels["model.aibrix.ai/name"].is_string(), "{name}: model name label");
        let port: u64 = labels["model.aibrix.ai/port"].as_str().and_then(|p| p.parse().ok()).expect("port label");
        let engine = &template["spec"]["containers"][0];
        assert!(
            engine["ports"].as_array().expect("ports").iter().any(|p| p["containerPort"] == port),
            "{name}: the port label names a container port"
        );
        assert_eq!(
            engine["readinessProbe"],
            json!({"httpGet": {"path": "/health", "port": port}, "initialDelaySeconds": 60, "periodSeconds": 10,
                   "failureThreshold": 30}),
            "{name}: the seed's readiness probe"
        );
        let config = template["metadata"]["annotations"]["model.aibrix.ai/config"].as_str().expect("config");
        let config: Value = serde_json::from_str(config).expect("config annotation is JSON");
        assert!(config["profiles"].as_object().is_some_and(|p| !p.is_empty()), "{name}: profiles");
        if let Some(roleset) = labels["roleset-name"].as_str() {
            let role = labels["role-name"].as_str().expect("role-name beside roleset-name");
            assert!(["prefill", "decode"].contains(&role), "{name}: role {role}");
            roles.entry(roleset.to_owned()).or_default().insert(role.to_owned());
        }
    }
    assert!(!roles.is_empty(), "a PD example");
    for (roleset, present) in roles {
        assert_eq!(present.len(), 2, "roleset {roleset} needs a prefill and a decode Deployment: {present:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_accepts_the_example_config_annotations_and_enforces_their_caps() {
    let models = example_models();
    let mut engines = Vec::new();
    let mut pods = Vec::new();
    for deployment in &models {
        let template = &deployment["spec"]["template"];
        let labels = template["metadata"]["labels"].as_object().expect("labels");
        let model = labels["model.aibrix.ai/name"].as_str().expect("model");
        let name = deployment["metadata"]["name"].as_str().expect("name");
        let engine = Engine::start(&format!("{name}-0"), model, &[]);
        let mut pod = PodSpec::for_engine(&engine, model);
        for (key, value) in labels {
            if !key.starts_with("model.aibrix.ai/name") && key != "model.aibrix.ai/port" {
                pod = pod.label(key, value.as_str().expect("label value"));
            }
        }
        let config = template["metadata"]["annotations"]["model.aibrix.ai/config"].as_str().expect("config");
        pods.push(pod.config(config));
        engines.push(engine);
    }
    let gw = Gateway::start(&pods, &[]).await;

    // The gateway's own parser took every annotation.
    let endpoints = get_json(&gw.admin_url("/debug/endpoints")).await;
    for pod in &pods {
        assert_eq!(endpoints[&pod.model]["has_config"], true, "{}: annotation ignored:\n{}", pod.model, gw.log());
    }
    assert!(!gw.metrics().await.contains("aibrix_gateway_invalid_config_total{"), "{}", gw.log());

    // Each profile of the plain model routes with its strategy.
    let plain = models.iter().find(|d| d["spec"]["template"]["metadata"]["labels"]["role-name"].is_null());
    let template = &plain.expect("a model without PD roles")["spec"]["template"];
    let model = template["metadata"]["labels"]["model.aibrix.ai/name"].as_str().expect("model");
    let config: Value =
        serde_json::from_str(template["metadata"]["annotations"]["model.aibrix.ai/config"].as_str().expect("config"))
            .expect("json");
    let profiles = config["profiles"].as_object().expect("profiles");
    for (profile, settings) in profiles {
        let reply = gw.chat(model, &[("config-profile", profile)]).await;
        assert_eq!(reply.status, StatusCode::OK, "profile {profile}: {}", reply.text());
        assert_eq!(reply.header("routing-strategy"), settings["routingStrategy"], "profile {profile}");
    }

    // The lowest requestsPerSecond is enforced: a burst of well over two windows' worth gets 429s.
    let (profile, cap) = profiles
        .iter()
        .filter_map(|(name, p)| Some((name.clone(), p["requestsPerSecond"].as_u64().filter(|n| *n > 0)?)))
        .min_by_key(|(_, cap)| *cap)
        .expect("a profile with requestsPerSecond");
    let burst = usize::try_from(cap).expect("cap") * 3;
    let replies = futures_burst(&gw, model, &profile, burst).await;
    let limited = replies.iter().filter(|(status, rps)| *status == 429 && *rps).count();
    let served = replies.iter().filter(|(status, _)| *status == 200).count();
    assert!(limited > 0, "no 429 with x-error-model-rps-exceeded among {burst} requests capped at {cap}/s");
    assert!(served > 0, "none served");
    assert_eq!(served + limited, burst, "every request either served or refused by the cap: {replies:?}");
    drop(engines);
}

/// Sends `count` requests under `profile`, eight at a time; (status, rps-exceeded header) each.
async fn futures_burst(gw: &Gateway, model: &str, profile: &str, count: usize) -> Vec<(u16, bool)> {
    let mut replies = Vec::with_capacity(count);
    let body = chat_body(model, false);
    let url = gw.url("/v1/chat/completions");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let (url, body, profile) = (url.clone(), body.clone(), profile.to_owned());
        tasks.spawn(async move {
            let reply = send(post(&url, &body, &[("config-profile", &profile)])).await;
            (reply.status.as_u16(), reply.header("x-error-model-rps-exceeded") == "true")
        });
        if i % 8 == 7 || i + 1 == count {
            while let Some(result) = tasks.join_next().await {
                replies.push(result.expect("request task"));
            }
        }
    }
    replies
}

/// The `aibrix_gateway_*` names in PromQL text.
fn series_names(promql: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = promql;
    while let Some(start) = rest.find("aibrix_gateway_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        found.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

/// Every PromQL string of a Grafana dashboard: panel targets and variable queries.
fn dashboard_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query" | "definition", Value::String(text)) => out.push(text.clone()),
                    _ => dashboard_queries(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| dashboard_queries(item, out)),
        _ => {}
    }
}

/// The sample names in Prometheus text.
fn exported_series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_uses_series_the_gateway_exports() {
    let path = deploy_dir().join("grafana/turnstile-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let used: BTreeSet<String> = queries.iter().flat_map(|q| series_names(q)).collect();
    // The seed's observability checklist, one series each at least.
    for needed in [
        "aibrix_gateway_requests_total",
        "aibrix_gateway_routing_latency_seconds_bucket",
        "aibrix_gateway_ratelimit_rejections_total",
        "aibrix_gateway_pod_readiness_transitions_total",
        "aibrix_gateway_pd_prefill_errors_total",
        "aibrix_gateway_kernel_assist_active",
        "aibrix_gateway_kernel_bytes_total",
    ] {
        assert!(used.contains(needed), "the dashboard has no panel on {needed}");
    }

    // A gateway as deployed (Kubernetes discovery), made to produce every
    // kind of series once: traffic, a stream, 429s, a readiness flip, an
    // ignored annotation, a strategy fallback, a failed PD prefill, Redis errors.
    let chat = Engine::start("chat-0", "chat", &[]);
    let chat_b = Engine::start("chat-1", "chat", &[]);
    let capped = Engine::start("capped-0", "capped", &[]);
    let prefill = Engine::start("pd-prefill-0", "pd-model", &["--fail-status", "500"]);
    let decode = Engine::start("pd-decode-0", "pd-model", &[]);
    let api = FakeApiServer::start().await;
    api.add_pod(&PodSpec::for_engine(&chat, "chat"));
    api.add_pod(&PodSpec::for_engine(&chat_b, "chat"));
    api.add_pod(&PodSpec::for_engine(&capped, "capped").config(r#"{"profiles":{"default":{"requestsPerSecond":1}}}"#));
    api.add_pod(&PodSpec::new("broken-0", "broken", chat.port()).config("{not json"));
    let pd_config = r#"{"profiles":{"default":{"routingStrategy":"pd"}}}"#;
    for (engine, role) in [(&prefill, "prefill"), (&decode, "decode")] {
        let pod = PodSpec::for_engine(engine, "pd-model").config(pd_config);
        api.add_pod(&pod.label("roleset-name", "rs-0").label("role-name", role));
    }
    let kubeconfig = api.write_kubeconfig(&scratch_dir("kube"));
    // Redis that refuses connections: limit checks fail open and are counted as store errors.
    let args = ["--redis-url", "redis://127.0.0.1:1/"];
    let gw = Gateway::spawn_with_discovery(Discovery::Kubernetes { kubeconfig: &kubeconfig }, &args, &[]);
    gw.wait_ready().await;

    assert_eq!(gw.chat("chat", &[]).await.status, StatusCode::OK);
    let stream = send(post(&gw.url("/v1/chat/completions"), &chat_body("chat", true), &[])).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(gw.chat("chat", &[("routing-strategy", "vtc-basic")]).await.status, StatusCode::OK);
    let statuses: Vec<u16> = futures_burst(&gw, "capped", "default", 4).await.iter().map(|r| r.0).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    let pd = gw.chat("pd-model", &[]).await;
    assert_eq!(pd.status, StatusCode::SERVICE_UNAVAILABLE, "failed prefill: {}", pd.text());
    api.set_ready("chat-1", false);
    eventually(Duration::from_secs(5), "the readiness flip is counted", || async {
        gw.metrics().await.contains("aibrix_gateway_pod_readiness_transitions_total{")
    })
    .await;
    // Scrape ages appear once an engine's /metrics was first read.
    eventually(Duration::from_secs(5), "an engine scrape is reported", || async {
        gw.metrics().await.contains("aibrix_gateway_pod_metrics_age_seconds{")
    })
    .await;

    let metrics = gw.metrics().await;
    let exported = exported_series(&metrics);
    let missing: Vec<&String> = used.iter().filter(|name| !exported.contains(*name)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries series the gateway does not export: {missing:?}\nexported: {exported:?}"
    );
}

/// Whether every `matchLabels` pair of a label selector is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let Some(wanted) = selector["matchLabels"].as_object() else { return false };
    !wanted.is_empty() && wanted.iter().all(|(key, value)| &labels[key] == value)
}

/// The gateway container's proxy and admin ports, from its flags.
fn gateway_ports(workload: &Value) -> (u64, u64) {
    let args = strings(&container(workload, "turnstile")["args"]);
    let proxy = port_of(&flag(&args, "listen").unwrap_or_else(|| "0.0.0.0:8888".into()));
    let admin = port_of(&flag(&args, "admin-listen").unwrap_or_else(|| "0.0.0.0:8080".into()));
    (proxy, admin)
}

#[test]
fn userspace_gateways_are_evicted_one_at_a_time() {
    let documents = render("overlays/userspace");
    let deployment = find(&documents, "Deployment", "turnstile");
    let budget = find(&documents, "PodDisruptionBudget", "turnstile");
    assert_eq!(budget["metadata"]["namespace"], deployment["metadata"]["namespace"]);
    assert!(selects(&budget["spec"]["selector"], &deployment["spec"]["template"]["metadata"]["labels"]));
    // Nothing else in the namespace falls under the budget (Redis has its own labels).
    let redis = find(&documents, "Deployment", "redis");
    assert!(!selects(&budget["spec"]["selector"], &redis["spec"]["template"]["metadata"]["labels"]));
    let replicas = deployment["spec"]["replicas"].as_u64().expect("replicas");
    let unavailable = budget["spec"]["maxUnavailable"].as_u64().expect("maxUnavailable as a number");
    assert!(unavailable >= 1 && unavailable < replicas, "a drain must evict, and leave one of {replicas} serving");
}

#[test]
fn the_daemonset_rolls_node_by_node_without_surge() {
    for dir in ["base", "overlays/privileged", "overlays/gpu-nodes"] {
        let documents = render(dir);
        let daemonset = find(&documents, "DaemonSet", "turnstile");
        assert_eq!(daemonset["spec"]["template"]["spec"]["hostNetwork"], true);
        let strategy = &daemonset["spec"]["updateStrategy"];
        assert_eq!(strategy["type"], "RollingUpdate", "{dir}");
        // A surge pod could not bind the host ports the old one holds.
        assert_eq!(strategy["rollingUpdate"]["maxSurge"], 0, "{dir}");
        assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 1, "{dir}");
    }
}

/// The ports (number, protocol) a NetworkPolicy rule opens.
fn rule_ports(rule: &Value) -> BTreeSet<(u64, String)> {
    rule["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    (p["port"].as_u64().expect("numeric port"), p["protocol"].as_str().unwrap_or("TCP").to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn network_policies_open_exactly_the_ports_the_pods_listen_on() {
    let documents = render("overlays/userspace");
    let gateway = find(&documents, "Deployment", "turnstile");
    let gateway_labels = &gateway["spec"]["template"]["metadata"]["labels"];
    let redis = find(&documents, "Deployment", "redis");
    let redis_labels = &redis["spec"]["template"]["metadata"]["labels"];
    let redis_port = resolve_port(container(redis, "redis"), &json!("redis"));
    let (proxy, admin) = gateway_ports(gateway);

    let policy = find(&documents, "NetworkPolicy", "turnstile-gateway");
    assert!(selects(&policy["spec"]["podSelector"], gateway_labels));
    assert_eq!(strings(&policy["spec"]["policyTypes"]), ["Ingress", "Egress"]);
    let ingress = policy["spec"]["ingress"].as_array().expect("ingress");
    let opened: BTreeSet<u64> = ingress.iter().flat_map(rule_ports).map(|(port, _)| port).collect();
    assert_eq!(opened, BTreeSet::from([proxy, admin]), "ingress ports: the proxy and admin ports, nothing else");
    // The proxy is open to every client; the admin port (/metrics, /debug) to Prometheus only.
    assert!(ingress.iter().any(|r| r["from"].is_null() && rule_ports(r).contains(&(proxy, "TCP".into()))));
    let admin_rule = ingress.iter().find(|r| rule_ports(r).contains(&(admin, "TCP".into()))).expect("admin rule");
    assert_eq!(admin_rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "monitoring");

    let egress = policy["spec"]["egress"].as_array().expect("egress");
    let to_redis = egress
        .iter()
        .find(|r| r["to"].as_array().is_some_and(|to| to.iter().any(|t| selects(&t["podSelector"], redis_labels))))
        .expect("an egress rule to Redis");
    assert_eq!(rule_ports(to_redis), BTreeSet::from([(redis_port, "TCP".to_owned())]));
    assert!(egress.iter().any(|r| rule_ports(r).contains(&(53, "UDP".into()))), "DNS");
    assert!(egress.iter().any(|r| rule_ports(r).contains(&(443, "TCP".into()))), "the API server");
    // Engines in any namespace, any port (each pod names its own in model.aibrix.ai/port).
    assert!(egress.iter().any(|r| {
        r["ports"].is_null()
            && r["to"][0]["namespaceSelector"] == json!({})
            && r["to"][0]["podSelector"]["matchExpressions"][0]
                == json!({"key": "model.aibrix.ai/name", "operator": "Exists"})
    }));

    // Redis takes its port from the gateway pods only, and sends nothing.
    let policy = find(&documents, "NetworkPolicy", "redis");
    assert!(selects(&policy["spec"]["podSelector"], redis_labels));
    let ingress = policy["spec"]["ingress"].as_array().expect("ingress");
    assert_eq!(ingress.len(), 1);
    assert_eq!(rule_ports(&ingress[0]), BTreeSet::from([(redis_port, "TCP".to_owned())]));
    assert!(selects(&ingress[0]["from"][0]["podSelector"], gateway_labels));
    assert!(
        strings(&policy["spec"]["policyTypes"]).contains(&"Egress".to_owned()) && policy["spec"]["egress"].is_null()
    );

    // The base's gateways are on the host network, which no pod selector matches: Redis must
    // take its port from any source there, or they could not reach it.
    let documents = render("base");
    let policy = find(&documents, "NetworkPolicy", "redis");
    assert!(policy["spec"]["ingress"][0]["from"].is_null(), "{policy}");
}

/// Whether the scheduler may put a pod on a node with these labels and NoSchedule taint keys:
/// required node affinity (In, NotIn, Exists, DoesNotExist) and tolerations.
fn schedulable(pod: &Value, labels: &[(&str, &str)], taints: &[&str]) -> bool {
    let label = |key: &str| labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let terms = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    let affinity_ok = terms.as_array().is_none_or(|terms| {
        terms.iter().any(|term| {
            term["matchExpressions"].as_array().expect("matchExpressions").iter().all(|e| {
                let key = e["key"].as_str().expect("key");
                let values = strings(&e["values"]);
                match e["operator"].as_str().expect("operator") {
                    "In" => label(key).is_some_and(|v| values.iter().any(|x| x == v)),
                    "NotIn" => label(key).is_none_or(|v| !values.iter().any(|x| x == v)),
                    "Exists" => label(key).is_some(),
                    "DoesNotExist" => label(key).is_none(),
                    other => panic!("operator {other}"),
                }
            })
        })
    });
    let tolerated = |taint: &str| {
        pod["tolerations"].as_array().is_some_and(|all| {
            all.iter().any(|t| {
                (t["key"] == taint || t["key"].is_null())
                    && t["operator"] == "Exists"
                    && (t["effect"] == "NoSchedule" || t["effect"].is_null())
            })
        })
    };
    affinity_ok && taints.iter().all(|taint| tolerated(taint))
}

#[test]
fn the_daemonset_avoids_gpu_nodes_unless_the_gpu_overlay_is_used() {
    let cpu_node: &[(&str, &str)] = &[("kubernetes.io/os", "linux")];
    let gpu_operator_node: &[(&str, &str)] = &[("nvidia.com/gpu.present", "true")];
    let nfd_node: &[(&str, &str)] = &[("feature.node.kubernetes.io/pci-10de.present", "true")];
    let gpu_taint: &[&str] = &["nvidia.com/gpu"];
    for dir in ["base", "overlays/privileged"] {
        let documents = render(dir);
        let pod = &find(&documents, "DaemonSet", "turnstile")["spec"]["template"]["spec"];
        assert!(schedulable(pod, cpu_node, &[]), "{dir}: a node without a GPU");
        assert!(!schedulable(pod, gpu_operator_node, &[]), "{dir}: a GPU node, untainted");
        assert!(!schedulable(pod, nfd_node, &[]), "{dir}: a GPU node found by node feature discovery");
        assert!(!schedulable(pod, gpu_operator_node, gpu_taint), "{dir}: a tainted GPU node");
    }
    let documents = render("overlays/gpu-nodes");
    let daemonset = find(&documents, "DaemonSet", "turnstile");
    check_gateway_workload(&documents, daemonset);
    let pod = &daemonset["spec"]["template"]["spec"];
    assert!(schedulable(pod, cpu_node, &[]), "gpu-nodes: a node without a GPU");
    assert!(schedulable(pod, gpu_operator_node, gpu_taint), "gpu-nodes: a tainted GPU node");
    assert!(schedulable(pod, nfd_node, &[]), "gpu-nodes: an untainted GPU node");
}

#[test]
fn monitoring_scrapes_the_admin_port_that_serves_metrics() {
    let monitors = render("monitoring");
    let monitor = find(&monitors, "ServiceMonitor", "turnstile");
    // kube-prometheus-stack selects ServiceMonitors by its release label.
    assert!(monitor["metadata"]["labels"]["release"].is_string(), "{monitor}");
    for dir in ["base", "overlays/userspace"] {
        let documents = render(dir);
        let service = find(&documents, "Service", "turnstile");
        assert_eq!(monitor["metadata"]["namespace"], service["metadata"]["namespace"], "{dir}");
        assert!(selects(&monitor["spec"]["selector"], &service["metadata"]["labels"]), "{dir}: selects the Service");
        let redis = find(&documents, "Service", "redis");
        assert!(!selects(&monitor["spec"]["selector"], &redis["metadata"]["labels"]), "{dir}: not Redis");
        let workload = documents
            .iter()
            .find(|d| {
                ["DaemonSet", "Deployment"].contains(&d["kind"].as_str().unwrap_or(""))
                    && d["metadata"]["name"] == "turnstile"
            })
            .expect("the gateway workload");
        let (_, admin) = gateway_ports(workload);
        let endpoints = monitor["spec"]["endpoints"].as_array().expect("endpoints");
        assert_eq!(endpoints.len(), 1);
        let endpoint = &endpoints[0];
        assert_eq!(endpoint["path"], "/metrics");
        let port = service["spec"]["ports"]
            .as_array()
            .and_then(|ports| ports.iter().find(|p| p["name"] == endpoint["port"]))
            .unwrap_or_else(|| panic!("{dir}: the Service has no port {}", endpoint["port"]));
        assert_eq!(resolve_port(container(workload, "turnstile"), &port["targetPort"]), admin, "{dir}");
    }
}

/// The Secret and key an environment variable of a container comes from.
fn secret_source(container: &Value, var: &str) -> Option<(String, String)> {
    let entry = container["env"].as_array()?.iter().find(|e| e["name"] == var)?;
    let reference = &entry["valueFrom"]["secretKeyRef"];
    Some((reference["name"].as_str()?.to_owned(), reference["key"].as_str()?.to_owned()))
}

/// The base64 `data` of a Secret's key, decoded.
fn secret_value(secret: &Value, key: &str) -> String {
    let encoded = secret["data"][key].as_str().unwrap_or_else(|| panic!("Secret has no key {key}: {secret}"));
    let mut decode = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run base64");
    std::io::Write::write_all(&mut decode.stdin.take().expect("stdin"), encoded.as_bytes()).expect("write base64");
    let output = decode.wait_with_output().expect("base64 -d");
    assert!(output.status.success(), "{encoded} is not base64");
    String::from_utf8(output.stdout).expect("a UTF-8 password")
}

/// A `redis-server` the test started, killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-cli -p PORT ping`'s answer, with `password` in REDISCLI_AUTH when given.
fn redis_ping(port: u16, password: Option<&str>) -> String {
    let mut cli = Command::new("redis-cli");
    cli.args(["-p", &port.to_string(), "ping"]);
    if let Some(password) = password {
        cli.env("REDISCLI_AUTH", password);
    }
    let output = cli.output().expect("run redis-cli (`cargo xtask setup` installs redis-server)");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn the_gateways_hold_the_password_the_bundled_redis_requires() {
    for (dir, documents) in [
        ("base", render("base")),
        ("overlays/userspace", render("overlays/userspace")),
        ("the chart", render_chart(&[])),
        ("the chart, userspace", render_chart(&["mode=userspace"])),
    ] {
        let redis = component(&documents, &["Deployment"], "redis");
        let server = container(redis, "redis");
        let args = strings(&server["args"]);
        let requirepass = flag(&args, "requirepass").unwrap_or_else(|| panic!("{dir}: Redis runs without a password"));
        // Expanded by the kubelet from the container's env: the password is not in the manifest.
        let var = requirepass
            .strip_prefix("$(")
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{dir}: --requirepass is written in the manifest"));
        let source = secret_source(server, var).unwrap_or_else(|| panic!("{dir}: ${var} is not from a Secret"));
        let gateway = component(&documents, &["DaemonSet", "Deployment"], "gateway");
        assert_eq!(secret_source(container(gateway, "turnstile"), "REDIS_PASSWORD"), Some(source.clone()), "{dir}");
        // The readiness probe authenticates with the same password, and only a PONG passes it
        // (redis-cli exits 0 on NOAUTH).
        assert_eq!(secret_source(server, "REDISCLI_AUTH"), Some(source.clone()), "{dir}");
        assert!(server["readinessProbe"]["exec"]["command"].to_string().contains("PONG"), "{dir}");

        let secret = find(&documents, "Secret", &source.0);
        assert_eq!(secret["metadata"]["namespace"], redis["metadata"]["namespace"], "{dir}");
        assert_eq!(gateway["metadata"]["namespace"], redis["metadata"]["namespace"], "{dir}");
        let password = secret_value(secret, &source.1);
        assert!(!password.is_empty(), "{dir}: empty password");

        // Redis started with those args refuses a client without the password and answers
        // one with it.
        let port = free_port();
        let expanded: Vec<String> = args.iter().map(|a| a.replace(&requirepass, &password)).collect();
        let _server = KillOnDrop(
            Command::new("redis-server")
                .args(&expanded)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .current_dir(scratch_dir("redis-password"))
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("run redis-server (`cargo xtask setup` installs it)"),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while redis_ping(port, Some(&password)) != "PONG" {
            assert!(std::time::Instant::now() < deadline, "{dir}: Redis never answered the password");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(redis_ping(port, None).starts_with("NOAUTH"), "{dir}: Redis answers without the password");
        assert_ne!(redis_ping(port, Some("wrong")), "PONG", "{dir}");
    }
}

/// What a gateway pod runs and where: everything but labels, names and the image (checked by
/// `cargo xtask manifests`).
fn gateway_pod(workload: &Value) -> Value {
    let pod = &workload["spec"]["template"]["spec"];
    let mut gateway = container(workload, "turnstile").clone();
    // Which variables, not their values: generated Secret names differ between Kustomize and Helm.
    let env_names: Vec<Value> =
        gateway["env"].as_array().map(|env| env.iter().map(|e| e["name"].clone()).collect()).unwrap_or_default();
    let object = gateway.as_object_mut().expect("container");
    for field in ["image", "imagePullPolicy", "env"] {
        object.remove(field);
    }
    json!({
        "container": gateway,
        "env": env_names,
        "init": pod["initContainers"],
        "hostNetwork": pod["hostNetwork"],
        "dnsPolicy": pod["dnsPolicy"],
        "securityContext": pod["securityContext"],
        "terminationGracePeriodSeconds": pod["terminationGracePeriodSeconds"],
        "volumes": pod["volumes"],
        "affinity": pod["affinity"],
        "tolerations": pod["tolerations"],
    })
}

#[test]
fn the_chart_deploys_the_gateway_of_base_or_of_the_overlays() {
    // Default values: the DaemonSet of base/, off GPU nodes.
    let chart = render_chart(&[]);
    let daemonset = find(&chart, "DaemonSet", "turnstile");
    check_gateway_workload(&chart, daemonset);
    let base = render("base");
    assert_eq!(gateway_pod(daemonset), gateway_pod(find(&base, "DaemonSet", "turnstile")));
    let strategy = &daemonset["spec"]["updateStrategy"];
    assert_eq!(strategy, &find(&base, "DaemonSet", "turnstile")["spec"]["updateStrategy"]);
    assert!(!chart.iter().any(|d| d["kind"] == "PodDisruptionBudget"), "{:?}", names(&chart));

    // On GPU nodes too, as overlays/gpu-nodes.
    let chart = render_chart(&["placement.gpuNodes=true"]);
    let gpu = render("overlays/gpu-nodes");
    assert_eq!(gateway_pod(find(&chart, "DaemonSet", "turnstile")), gateway_pod(find(&gpu, "DaemonSet", "turnstile")));

    // mode=userspace: the Deployment of overlays/userspace and its budget. The chart keeps it
    // off GPU nodes too (the overlay's Deployment has no placement).
    let chart = render_chart(&["mode=userspace"]);
    assert!(!chart.iter().any(|d| d["kind"] == "DaemonSet"), "{:?}", names(&chart));
    let deployment = find(&chart, "Deployment", "turnstile");
    check_gateway_workload(&chart, deployment);
    let overlay = render("overlays/userspace");
    let expected = find(&overlay, "Deployment", "turnstile");
    let mut pod = gateway_pod(deployment);
    pod["affinity"] = Value::Null;
    assert_eq!(pod, gateway_pod(expected));
    assert_eq!(deployment["spec"]["strategy"], expected["spec"]["strategy"]);
    assert_eq!(deployment["spec"]["replicas"], expected["spec"]["replicas"]);
    let budget = find(&chart, "PodDisruptionBudget", "turnstile");
    assert!(selects(&budget["spec"]["selector"], &deployment["spec"]["template"]["metadata"]["labels"]));
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    // Redis takes connections from the gateway pods only, as in the overlay.
    let policy = component(&chart, &["NetworkPolicy"], "redis");
    assert!(selects(
        &policy["spec"]["ingress"][0]["from"][0]["podSelector"],
        &deployment["spec"]["template"]["metadata"]["labels"]
    ));
}

#[test]
fn the_chart_points_the_gateways_at_a_managed_redis_with_the_operators_secret() {
    let chart = render_chart(&[
        "mode=userspace",
        "redis.bundled=false",
        "redis.url=rediss://redis.example.com:6380/0",
        "redis.existingSecret=my-redis",
        "redis.caConfigMap=my-redis-ca",
    ]);
    assert!(
        !chart.iter().any(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"),
        "{:?}",
        names(&chart)
    );
    assert!(!chart.iter().any(|d| d["kind"] == "Secret"), "the operator's Secret is used, not made");
    let gateway = container(find(&chart, "Deployment", "turnstile"), "turnstile");
    let env = |name: &str| gateway["env"].as_array().and_then(|env| env.iter().find(|e| e["name"] == name)).cloned();
    assert_eq!(env("TURNSTILE_REDIS_URL").expect("url")["value"], "rediss://redis.example.com:6380/0");
    assert_eq!(secret_source(gateway, "REDIS_PASSWORD"), Some(("my-redis".into(), "password".into())));
    let ca_file = env("TURNSTILE_REDIS_CA_FILE").expect("the CA file")["value"].as_str().expect("a path").to_owned();
    let mount = gateway["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| ca_file.starts_with(m["mountPath"].as_str().unwrap_or("-"))))
        .expect("the CA is mounted");
    let pod = &find(&chart, "Deployment", "turnstile")["spec"]["template"]["spec"];
    let volume = pod["volumes"].as_array().and_then(|v| v.iter().find(|v| v["name"] == mount["name"])).expect("volume");
    assert_eq!(volume["configMap"]["name"], "my-redis-ca");
    // The userspace gateway's policy lets it reach the managed Redis's port.
    let policy = component(&chart, &["NetworkPolicy"], "gateway");
    assert!(
        policy["spec"]["egress"]
            .as_array()
            .expect("egress")
            .iter()
            .any(|rule| rule_ports(rule).contains(&(6380, "TCP".to_owned()))),
        "{policy}"
    );
}

#[test]
fn the_chart_turns_tracing_on_with_its_collector_and_lets_its_port_out() {
    let off = render_chart(&["mode=userspace"]);
    let gateway = container(find(&off, "Deployment", "turnstile"), "turnstile");
    let names: Vec<String> =
        gateway["env"].as_array().map(|env| env.iter().map(|e| e["name"].to_string()).collect()).unwrap_or_default();
    assert!(!names.iter().any(|n| n.contains("OTEL_")), "tracing is off by default: {names:?}");

    let chart = render_chart(&[
        "mode=userspace",
        "tracing.otlpEndpoint=http://otel-collector.observability:4318",
        "tracing.protocol=http/protobuf",
    ]);
    let gateway = container(find(&chart, "Deployment", "turnstile"), "turnstile");
    let env = |name: &str| {
        gateway["env"].as_array().and_then(|env| env.iter().find(|e| e["name"] == name)).map(|e| e["value"].clone())
    };
    assert_eq!(env("OTEL_EXPORTER_OTLP_ENDPOINT"), Some("http://otel-collector.observability:4318".into()));
    assert_eq!(env("OTEL_EXPORTER_OTLP_PROTOCOL"), Some("http/protobuf".into()));
    assert_eq!(env("TURNSTILE_TRACE_SAMPLING_RATIO"), Some("0.05".into()));
    let policy = component(&chart, &["NetworkPolicy"], "gateway");
    let egress = policy["spec"]["egress"].as_array().expect("egress");
    assert!(egress.iter().any(|rule| rule_ports(rule).contains(&(4318, "TCP".to_owned()))), "{policy}");
}
