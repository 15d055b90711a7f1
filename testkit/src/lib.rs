//! What the integration tests (`tests/`) and the developer commands (`xtask/`) share to run
//! Turnstile on one machine: free loopback ports, child processes that never outlive their
//! owner, the pods file the gateway discovers engines from, network namespaces, and raw
//! HTTP/1 for clients that need their own socket.
//!
//! Light on purpose: std, serde_json and rustix only, no async runtime and no HTTP client, so
//! each side keeps its own (hyper in both, tokio's blocking pool in xtask) around these pieces.
//! The product never depends on it.

pub mod http1;
pub mod netns;
pub mod pods;
pub mod ports;
pub mod process;

pub use pods::{EngineEndpoint, PodSpec, pods_yaml, write_atomically, write_pods};
pub use ports::{free_port, port_is_free};
pub use process::{Proc, listening_addr};
