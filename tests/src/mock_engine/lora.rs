//! LoRA adapters, as vLLM serves them: adapters named at start (`--lora-modules`) or loaded
//! and unloaded at run time (`POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`,
//! which vLLM serves with `VLLM_ALLOW_RUNTIME_LORA_UPDATING`), listed by `/v1/models` with
//! their base model as `parent`, and served as models of their own: a request naming a
//! loaded adapter is answered like one for the base model, under the adapter's name.
//! `vllm:lora_requests_info` names the adapters with requests running.
//!
//! The mock holds no weights: a path is only a name, never read, so every load succeeds
//! unless the adapter name is taken. `max_loras` (vLLM's cap on adapters in one batch) is
//! reported, not enforced: every adapter request runs as soon as the load model lets it,
//! counts as running from arrival to its last byte, and no adapter is ever waiting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

/// Where `--lora-modules NAME` (no `=PATH`) says an adapter lives.
const DEFAULT_ADAPTER_DIR: &str = "/adapters";

/// An adapter named on the command line: `NAME` or `NAME=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraModule {
    /// The model id requests name it by.
    pub name: String,
    /// Where its weights would be; `/adapters/NAME` when not given.
    pub path: String,
}

impl LoraModule {
    /// Reads `NAME` or `NAME=PATH` (the path may hold `=`, the name may not).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, path) = match text.split_once('=') {
            Some((name, path)) => (name, path.to_owned()),
            None => (text, format!("{DEFAULT_ADAPTER_DIR}/{text}")),
        };
        if name.is_empty() {
            return Err(format!("a LoRA module needs a name: NAME or NAME=PATH, got {text:?}"));
        }
        if path.is_empty() {
            return Err(format!("LoRA module {name:?} has an empty path"));
        }
        Ok(Self { name: name.to_owned(), path })
    }
}

/// A loaded adapter, as `/v1/models` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedAdapter {
    /// Its model id.
    pub name: String,
    /// The path it was loaded from (`root` in `/v1/models`).
    pub path: String,
    /// When it was loaded, in Unix seconds.
    pub created: u64,
}

/// Why a load or unload is refused, in vLLM's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The answer's status.
    pub status: StatusCode,
    /// vLLM's exception name.
    pub kind: &'static str,
    /// The message.
    pub message: String,
}

impl Refusal {
    fn bad_request(message: String) -> Self {
        Self { status: StatusCode::BAD_REQUEST, kind: "BadRequestError", message }
    }
}

/// The body of `POST /v1/load_lora_adapter`; other fields are ignored, as vLLM does.
#[derive(Debug, Deserialize)]
struct LoadRequest {
    lora_name: Option<String>,
    lora_path: Option<String>,
}

/// The body of `POST /v1/unload_lora_adapter`.
#[derive(Debug, Deserialize)]
struct UnloadRequest {
    lora_name: Option<String>,
}

/// What `vllm:lora_requests_info` shows at one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSnapshot {
    /// The `max_lora` label.
    pub max_loras: u32,
    /// Adapters with at least one request in flight, sorted.
    pub running: Vec<String>,
    /// The gauge's value: when it was read, in Unix seconds (vLLM sets it to the time of
    /// its last stats update).
    pub at: f64,
}

#[cfg(test)]
impl LoraSnapshot {
    /// No adapter running, `max_loras` 4 (the default), read at the epoch.
    pub fn idle() -> Self {
        Self { max_loras: 4, running: Vec::new(), at: 0.0 }
    }
}

/// Everything behind one lock: loads, unloads and request counts are rare next to the
/// work of a request.
#[derive(Debug, Default)]
struct Registry {
    /// Loaded adapters, in load order (the order `/v1/models` lists them).
    loaded: Vec<LoadedAdapter>,
    /// Requests in flight per adapter; an entry leaves at 0. Kept apart from `loaded`, so a
    /// request that outlives its adapter's unload still ends cleanly.
    running: BTreeMap<String, u64>,
    /// Requests accepted per adapter ever loaded, unloads included.
    served: BTreeMap<String, u64>,
    /// Successful `POST /v1/load_lora_adapter` calls.
    loads: u64,
    /// Successful `POST /v1/unload_lora_adapter` calls.
    unloads: u64,
}

impl Registry {
    fn find(&self, name: &str) -> Option<usize> {
        self.loaded.iter().position(|adapter| adapter.name == name)
    }

    fn add(&mut self, name: &str, path: &str) -> Result<(), Refusal> {
        if self.find(name).is_some() {
            return Err(Refusal::bad_request(format!("The lora adapter '{name}' has already been loaded.")));
        }
        self.loaded.push(LoadedAdapter { name: name.to_owned(), path: path.to_owned(), created: unix_seconds() });
        self.served.entry(name.to_owned()).or_insert(0);
        Ok(())
    }
}

/// The engine's adapters, shared by all connections.
#[derive(Debug)]
pub struct LoraAdapters {
    max_loras: u32,
    /// Plain data, so a panic elsewhere cannot leave it half-written.
    registry: Mutex<Registry>,
}

impl LoraAdapters {
    /// Adapters `modules` loaded (not counted as loads), reporting `max_loras`; refused when
    /// two modules share a name, as vLLM refuses to start.
    pub fn new(max_loras: u32, modules: &[LoraModule]) -> Result<Self, String> {
        let mut registry = Registry::default();
        for module in modules {
            registry
                .add(&module.name, &module.path)
                .map_err(|refusal| format!("--lora-modules: {}", refusal.message))?;
        }
        Ok(Self { max_loras, registry: Mutex::new(registry) })
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads adapter `name` from `path`; the answer's text, or why it is refused.
    pub fn load(&self, name: &str, path: &str) -> Result<String, Refusal> {
        if name.is_empty() || path.is_empty() {
            return Err(Refusal::bad_request("Both 'lora_name' and 'lora_path' must be provided.".to_owned()));
        }
        let mut registry = self.registry();
        registry.add(name, path)?;
        registry.loads += 1;
        Ok(format!("Success: LoRA adapter '{name}' added successfully."))
    }

    /// Unloads adapter `name`; the answer's text, or why it is refused. Its requests in
    /// flight finish.
    pub fn unload(&self, name: &str) -> Result<String, Refusal> {
        if name.is_empty() {
            return Err(Refusal::bad_request("'lora_name' must be provided.".to_owned()));
        }
        let mut registry = self.registry();
        let Some(index) = registry.find(name) else {
            return Err(Refusal {
                status: StatusCode::NOT_FOUND,
                kind: "NotFoundError",
                message: format!("The lora adapter '{name}' cannot be found."),
            });
        };
        registry.loaded.remove(index);
        registry.unloads += 1;
        Ok(format!("Success: LoRA adapter '{name}' removed successfully."))
    }

    /// `POST /v1/load_lora_adapter` with JSON `body`.
    pub fn load_body(&self, body: &[u8]) -> Result<String, Refusal> {
        let request: LoadRequest = parse(body)?;
        self.load(request.lora_name.as_deref().unwrap_or(""), request.lora_path.as_deref().unwrap_or(""))
    }

    /// `POST /v1/unload_lora_adapter` with JSON `body`.
    pub fn unload_body(&self, body: &[u8]) -> Result<String, Refusal> {
        let request: UnloadRequest = parse(body)?;
        self.unload(request.lora_name.as_deref().unwrap_or(""))
    }

    /// Starts a request on adapter `name`, counted as served and running until the guard is
    /// dropped; `None` when no such adapter is loaded.
    pub fn start_request(self: &Arc<Self>, name: &str) -> Option<AdapterRequest> {
        let mut registry = self.registry();
        registry.find(name)?;
        *registry.running.entry(name.to_owned()).or_insert(0) += 1;
        *registry.served.entry(name.to_owned()).or_insert(0) += 1;
        Some(AdapterRequest { adapters: Arc::clone(self), name: name.to_owned() })
    }

    /// The loaded adapters, in load order.
    pub fn loaded(&self) -> Vec<LoadedAdapter> {
        self.registry().loaded.clone()
    }

    /// What `vllm:lora_requests_info` shows now.
    pub fn snapshot(&self) -> LoraSnapshot {
        let running = self.registry().running.keys().cloned().collect();
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |elapsed| elapsed.as_secs_f64());
        LoraSnapshot { max_loras: self.max_loras, running, at }
    }

    /// The `lora` part of `/mock/stats`.
    pub fn to_json(&self) -> Value {
        let registry = self.registry();
        let mut loaded: Vec<&str> = registry.loaded.iter().map(|adapter| adapter.name.as_str()).collect();
        loaded.sort_unstable();
        json!({
            "loaded": loaded,
            "max_loras": self.max_loras,
            "served": registry.served,
            "loads": registry.loads,
            "unloads": registry.unloads,
        })
    }
}

/// A request running on an adapter; dropping it (answer done, stream ended or client gone)
/// ends it.
#[derive(Debug)]
pub struct AdapterRequest {
    adapters: Arc<LoraAdapters>,
    name: String,
}

impl Drop for AdapterRequest {
    fn drop(&mut self) {
        let mut registry = self.adapters.registry();
        if let Some(count) = registry.running.get_mut(&self.name) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                registry.running.remove(&self.name);
            }
        }
    }
}

/// A load or unload body, or the 400 vLLM answers for one it cannot read.
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|err| Refusal::bad_request(format!("Invalid JSON in request body: {err}")))
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapters(modules: &[&str]) -> Arc<LoraAdapters> {
        let modules: Vec<LoraModule> = modules.iter().map(|text| LoraModule::parse(text).unwrap()).collect();
        Arc::new(LoraAdapters::new(4, &modules).unwrap())
    }

    fn names(adapters: &LoraAdapters) -> Vec<String> {
        adapters.loaded().into_iter().map(|adapter| adapter.name).collect()
    }

    #[test]
    fn modules_parse_with_a_default_path() {
        let module = |name: &str, path: &str| LoraModule { name: name.to_owned(), path: path.to_owned() };
        assert_eq!(LoraModule::parse("sql"), Ok(module("sql", "/adapters/sql")));
        assert_eq!(LoraModule::parse("sql=/models/sql-lora"), Ok(module("sql", "/models/sql-lora")));
        assert_eq!(LoraModule::parse("a=b=c"), Ok(module("a", "b=c")));
        for bad in ["", "=/x", "a="] {
            assert!(LoraModule::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn modules_load_at_start_and_a_repeated_name_is_refused() {
        let adapters = adapters(&["b=/p/b", "a"]);
        assert_eq!(names(&adapters), ["b", "a"], "load order");
        assert_eq!(adapters.loaded()[0].path, "/p/b");
        assert_eq!(
            adapters.to_json(),
            json!({"loaded": ["a", "b"], "max_loras": 4, "served": {"a": 0, "b": 0}, "loads": 0, "unloads": 0})
        );

        let twice = [LoraModule::parse("a").unwrap(), LoraModule::parse("a=/other").unwrap()];
        let err = LoraAdapters::new(4, &twice).unwrap_err();
        assert_eq!(err, "--lora-modules: The lora adapter 'a' has already been loaded.");
    }

    #[test]
    fn loads_and_unloads_answer_as_vllm_does() {
        let adapters = adapters(&[]);
        assert_eq!(
            adapters.load_body(br#"{"lora_name": "sql", "lora_path": "/p/sql", "load_inplace": false}"#),
            Ok("Success: LoRA adapter 'sql' added successfully.".to_owned())
        );
        let duplicate = adapters.load_body(br#"{"lora_name": "sql", "lora_path": "/elsewhere"}"#).unwrap_err();
        assert_eq!(
            duplicate,
            Refusal::bad_request("The lora adapter 'sql' has already been loaded.".to_owned()),
            "a loaded name is refused whatever the path"
        );
        for missing in
            [&br#"{"lora_name": "x"}"#[..], br#"{"lora_path": "/p"}"#, br#"{"lora_name": "", "lora_path": "/p"}"#]
        {
            let refusal = adapters.load_body(missing).unwrap_err();
            assert_eq!(refusal.message, "Both 'lora_name' and 'lora_path' must be provided.");
            assert_eq!((refusal.status, refusal.kind), (StatusCode::BAD_REQUEST, "BadRequestError"));
        }
        for bad in [&b"{"[..], b"[]", br#"{"lora_name": 5, "lora_path": "/p"}"#] {
            let refusal = adapters.load_body(bad).unwrap_err();
            assert!(refusal.message.starts_with("Invalid JSON in request body: "), "{refusal:?}");
        }

        let unknown = adapters.unload_body(br#"{"lora_name": "chat"}"#).unwrap_err();
        assert_eq!(
            (unknown.status, unknown.kind, unknown.message.as_str()),
            (StatusCode::NOT_FOUND, "NotFoundError", "The lora adapter 'chat' cannot be found.")
        );
        assert_eq!(adapters.unload_body(b"{}").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(
            adapters.unload_body(br#"{"lora_name": "sql"}"#),
            Ok("Success: LoRA adapter 'sql' removed successfully.".to_owned())
        );
        assert!(names(&adapters).is_empty());
        // Unloaded, it can be loaded again.
        assert!(adapters.load("sql", "/p/sql2").is_ok());
        assert_eq!(
            adapters.to_json(),
            json!({"loaded": ["sql"], "max_loras": 4, "served": {"sql": 0}, "loads": 2, "unloads": 1})
        );
    }

    #[test]
    fn requests_run_on_loaded_adapters_only_and_end_with_their_guard() {
        let adapters = adapters(&["b", "a"]);
        assert!(adapters.start_request("c").is_none());
        let first = adapters.start_request("b").unwrap();
        let second = adapters.start_request("b").unwrap();
        let third = adapters.start_request("a").unwrap();
        let snapshot = adapters.snapshot();
        assert_eq!((snapshot.max_loras, snapshot.running), (4, vec!["a".to_owned(), "b".to_owned()]));
        assert!(snapshot.at > 1.0e9, "Unix time: {}", snapshot.at);

        drop(third);
        drop(first);
        assert_eq!(adapters.snapshot().running, ["b"]);

        // Unloaded while running: the request runs on until it ends (through a reload of
        // the same name too), and no new one starts meanwhile.
        adapters.unload("b").unwrap();
        assert!(adapters.start_request("b").is_none());
        assert_eq!(adapters.snapshot().running, ["b"]);
        adapters.load("b", "/p/b").unwrap();
        drop(second);
        assert!(adapters.snapshot().running.is_empty());
        let stats = adapters.to_json();
        assert_eq!(stats["served"], json!({"a": 1, "b": 2}));
    }
}
