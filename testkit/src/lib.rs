//! What the integration tests (`tests/`) and the developer commands (`xtask/`) share to run
//! Turnstile on one machine: free loopback ports, child processes that never outlive their
//! owner, and the pods file the gateway discovers engines from.
//!
//! Light on purpose: std, serde_json and rustix only, no async runtime and no HTTP client, so
//! both sides keep their own (blocking test helpers, tokio in xtask) around these pieces.

pub mod http1;
pub mod netns;
pub mod pods;
pub mod ports;
pub mod process;

pub use pods::{EngineEndpoint, PodSpec, pods_yaml, write_atomically, write_pods};
pub use ports::{free_port, port_is_free};
pub use process::{Proc, listening_addr};
