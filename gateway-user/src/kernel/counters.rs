//! The kernel-assist series on `/metrics`, read at scrape time.
//!
//! With kernel assist active they come from the per-CPU maps (summed over
//! CPUs); userspace-only they come from [`UserCounters`], which
//! [`super::tagging::TaggedStream`] fills by the same rules. Bytes differ in
//! one way: the kernel counts IP packets (payload plus IP and TCP headers,
//! handshake excluded), userspace counts payload; "packets" in userspace are
//! the reads and writes that moved data.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gateway_common::{MAX_MODELS, ModelStats, RefuseStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;

use super::penalties::{PenaltyReason, PenaltyTable};
use super::tagging::{ModelIds, Side};

/// Per-model tallies kept in userspace when kernel assist is not active.
#[derive(Debug)]
pub struct UserCounters {
    /// `MAX_MODELS` rows of the ten [`ModelStats`] fields, in field order.
    cells: Box<[AtomicU64]>,
}

const FIELDS: usize = 10;

impl Default for UserCounters {
    fn default() -> Self {
        Self { cells: (0..MAX_MODELS as usize * FIELDS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl UserCounters {
    fn cell(&self, model: u32, field: usize) -> Option<&AtomicU64> {
        (model < MAX_MODELS).then(|| self.cells.get(model as usize * FIELDS + field)).flatten()
    }

    /// Counts traffic of one connection.
    pub fn add(&self, model: u32, side: Side, inbound: bool, packets: u64, bytes: u64) {
        // Field order of ModelStats: client in p/b, client out p/b, upstream in p/b, upstream out p/b.
        let base = match (side, inbound) {
            (Side::Client, true) => 0,
            (Side::Client, false) => 2,
            (Side::Upstream, true) => 4,
            (Side::Upstream, false) => 6,
        };
        if let (Some(p), Some(b)) = (self.cell(model, base), self.cell(model, base + 1)) {
            p.fetch_add(packets, Ordering::Relaxed);
            b.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts a connection that carried `model`'s traffic.
    pub fn connection(&self, model: u32, side: Side) {
        let field = match side {
            Side::Client => 8,
            Side::Upstream => 9,
        };
        if let Some(cell) = self.cell(model, field) {
            cell.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One model's tallies.
    pub fn snapshot(&self, model: u32) -> ModelStats {
        let get = |field| self.cell(model, field).map_or(0, |c| c.load(Ordering::Relaxed));
        ModelStats {
            client_in_packets: get(0),
            client_in_bytes: get(1),
            client_out_packets: get(2),
            client_out_bytes: get(3),
            upstream_in_packets: get(4),
            upstream_in_bytes: get(5),
            upstream_out_packets: get(6),
            upstream_out_bytes: get(7),
            client_connections: get(8),
            upstream_connections: get(9),
        }
    }
}

/// Where the collector reads from at scrape time.
pub trait CounterSource: Send + Sync + std::fmt::Debug {
    /// Totals for one model id.
    fn model_stats(&self, model: u32) -> ModelStats;
    /// Connections refused in the kernel (zero userspace-only).
    fn refused_in_kernel(&self) -> RefuseStats;
}

impl CounterSource for UserCounters {
    fn model_stats(&self, model: u32) -> ModelStats {
        self.snapshot(model)
    }

    fn refused_in_kernel(&self) -> RefuseStats {
        RefuseStats::default()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct TrafficLabels {
    model: Arc<str>,
    side: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ConnectionLabels {
    model: Arc<str>,
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct HookLabels {
    /// sk_lookup | xdp | userspace
    hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OriginLabels {
    /// local | redis
    origin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabels {
    /// flood | flood_behind_proxy | exempt
    reason: &'static str,
}

/// Tallies kept by the kernel-assist façade itself, in both modes.
#[derive(Debug, Default)]
pub struct AssistTallies {
    /// Connections closed right after accept because the client is penalised.
    pub refused_userspace: AtomicU64,
    /// Penalties this replica decided.
    pub penalties_local: AtomicU64,
    /// Penalties received from other replicas through Redis.
    pub penalties_redis: AtomicU64,
    /// This replica's decisions about flooding clients, by [`PenaltyReason`].
    decisions: [AtomicU64; PenaltyReason::ALL.len()],
}

impl AssistTallies {
    /// Counts one decision.
    pub fn decided(&self, reason: PenaltyReason) {
        self.decisions[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Decisions so far for `reason`.
    pub fn decisions(&self, reason: PenaltyReason) -> u64 {
        self.decisions[reason as usize].load(Ordering::Relaxed)
    }
}

/// Packets and bytes of every model from `source`, by side and direction.
fn traffic(source: &dyn CounterSource, models: &ModelIds) -> (TrafficFamily, TrafficFamily) {
    let packets = TrafficFamily::default();
    let bytes = TrafficFamily::default();
    for (id, model) in models.all() {
        let stats = source.model_stats(id);
        let rows = [
            (Side::Client, "in", stats.client_in_packets, stats.client_in_bytes),
            (Side::Client, "out", stats.client_out_packets, stats.client_out_bytes),
            (Side::Upstream, "in", stats.upstream_in_packets, stats.upstream_in_bytes),
            (Side::Upstream, "out", stats.upstream_out_packets, stats.upstream_out_bytes),
        ];
        for (side, direction, p, b) in rows {
            let labels = TrafficLabels { model: Arc::clone(&model), side: side.label(), direction };
            packets.get_or_create(&labels).inc_by(p);
            bytes.get_or_create(&labels).inc_by(b);
        }
    }
    (packets, bytes)
}

type TrafficFamily = Family<TrafficLabels, Counter>;

/// The scrape-time collector of every kernel-assist series.
#[derive(Debug)]
pub struct KernelCollector {
    pub(crate) source: Arc<dyn CounterSource>,
    pub(crate) models: Arc<ModelIds>,
    pub(crate) tallies: Arc<AssistTallies>,
    pub(crate) active: bool,
    /// Clients penalised right now.
    pub(crate) penalties: Arc<PenaltyTable>,
    /// `--userspace-counters`: payload counted in userspace beside the kernel.
    pub(crate) userspace: Option<Arc<UserCounters>>,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let active = ConstGauge::new(i64::from(self.active));
        active.encode(encoder.encode_descriptor(
            "aibrix_gateway_kernel_assist_active",
            "1 when the eBPF programs are loaded and attached, 0 when the gateway runs userspace-only",
            None,
            active.metric_type(),
        )?)?;

        let (packets, bytes) = traffic(self.source.as_ref(), &self.models);
        let connections = Family::<ConnectionLabels, Counter>::default();
        for (id, model) in self.models.all() {
            let stats = self.source.model_stats(id);
            for (side, n) in [(Side::Client, stats.client_connections), (Side::Upstream, stats.upstream_connections)] {
                connections
                    .get_or_create(&ConnectionLabels { model: Arc::clone(&model), side: side.label() })
                    .inc_by(n);
            }
        }
        packets.encode(encoder.encode_descriptor(
            "aibrix_gateway_kernel_packets",
            "Packets of the proxy's client and upstream connections, per model, side and direction",
            None,
            packets.metric_type(),
        )?)?;
        bytes.encode(encoder.encode_descriptor(
            "aibrix_gateway_kernel_bytes",
            "Bytes of the proxy's client and upstream connections, per model, side and direction \
             (kernel: IP packet lengths; userspace-only: payload)",
            None,
            bytes.metric_type(),
        )?)?;
        connections.encode(encoder.encode_descriptor(
            "aibrix_gateway_kernel_connections",
            "Connections that started carrying a model's traffic (new, or a keep-alive connection switching to \
             the model), per model and side",
            None,
            connections.metric_type(),
        )?)?;
        if let Some(userspace) = &self.userspace {
            let (packets, bytes) = traffic(userspace.as_ref(), &self.models);
            packets.encode(encoder.encode_descriptor(
                "aibrix_gateway_userspace_packets",
                "--userspace-counters: reads and writes that moved a model's data, per side and direction",
                None,
                packets.metric_type(),
            )?)?;
            bytes.encode(encoder.encode_descriptor(
                "aibrix_gateway_userspace_bytes",
                "--userspace-counters: payload bytes of a model's traffic counted in userspace, per side and direction",
                None,
                bytes.metric_type(),
            )?)?;
        }

        let refused = Family::<HookLabels, Counter>::default();
        let kernel = self.source.refused_in_kernel();
        refused.get_or_create(&HookLabels { hook: "sk_lookup" }).inc_by(kernel.sk_lookup);
        refused.get_or_create(&HookLabels { hook: "xdp" }).inc_by(kernel.xdp);
        refused
            .get_or_create(&HookLabels { hook: "userspace" })
            .inc_by(self.tallies.refused_userspace.load(Ordering::Relaxed));
        refused.encode(encoder.encode_descriptor(
            "aibrix_gateway_kernel_refused_connections",
            "New connections from penalised clients refused: in the kernel (sk_lookup, xdp) or closed right \
             after accept (userspace)",
            None,
            refused.metric_type(),
        )?)?;

        let penalties = Family::<OriginLabels, Counter>::default();
        penalties
            .get_or_create(&OriginLabels { origin: "local" })
            .inc_by(self.tallies.penalties_local.load(Ordering::Relaxed));
        penalties
            .get_or_create(&OriginLabels { origin: "redis" })
            .inc_by(self.tallies.penalties_redis.load(Ordering::Relaxed));
        penalties.encode(encoder.encode_descriptor(
            "aibrix_gateway_kernel_penalties",
            "Client penalties applied: decided here after repeated 429s (local) or received from other replicas (redis)",
            None,
            penalties.metric_type(),
        )?)?;

        let decisions = Family::<ReasonLabels, Counter>::default();
        for reason in PenaltyReason::ALL {
            decisions.get_or_create(&ReasonLabels { reason: reason.as_str() }).inc_by(self.tallies.decisions(reason));
        }
        decisions.encode(encoder.encode_descriptor(
            "aibrix_gateway_penalty_decisions",
            "Decisions about clients over the flood threshold, by reason: flood (refused), flood_behind_proxy \
             (answered 429, behind a trusted proxy), exempt (in --penalty-exempt-cidrs, not penalised)",
            None,
            decisions.metric_type(),
        )?)?;

        let penalised = ConstGauge::new(i64::try_from(self.penalties.len()).unwrap_or(i64::MAX));
        penalised.encode(encoder.encode_descriptor(
            "aibrix_gateway_kernel_penalised_clients",
            "Client addresses under a penalty right now",
            None,
            penalised.metric_type(),
        )?)?;
        Ok(())
    }
}
