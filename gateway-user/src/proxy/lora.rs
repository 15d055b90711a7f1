//! LoRA affinity: among the pods serving an adapter, the model's strategy
//! chooses within the best tier that has a pod: those where the adapter is
//! already running (vLLM's `vllm:lora_requests_info` `running_lora_adapters`),
//! then those with a free adapter slot (fewer running than `max_lora`), then
//! the rest (a pod without a fresh report is in the rest). Loading an adapter
//! costs the engine a swap; a pod that runs it already does not pay it.

use std::borrow::Cow;
use std::sync::Arc;

use crate::discovery::PodInfo;
use crate::engine_metrics::{MetricsView, Reading, lora_hash};

/// Which tier the pods a request was routed among were in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The adapter runs there already.
    Running,
    /// It has a free adapter slot.
    FreeSlot,
    /// Neither, or no fresh report.
    Other,
}

impl Tier {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::FreeSlot => "free_slot",
            Self::Other => "other",
        }
    }
}

/// The pods of the best tier for `adapter` among `pods`, and that tier.
pub fn best_tier<'a>(
    pods: Cow<'a, [Arc<PodInfo>]>,
    adapter: &str,
    view: &MetricsView,
) -> (Cow<'a, [Arc<PodInfo>]>, Tier) {
    let hash = lora_hash(adapter);
    let tier_of = |pod: &PodInfo| match view.reading(&pod.key) {
        Reading::Fresh(metrics) => match metrics.lora {
            Some(lora) if lora.runs(hash) => Tier::Running,
            Some(lora) if lora.has_free_slot() => Tier::FreeSlot,
            _ => Tier::Other,
        },
        Reading::Stale | Reading::Missing => Tier::Other,
    };
    let tiers: Vec<Tier> = pods.iter().map(|pod| tier_of(pod)).collect();
    for tier in [Tier::Running, Tier::FreeSlot] {
        if tiers.contains(&tier) {
            let chosen = pods.iter().zip(&tiers).filter(|(_, t)| **t == tier).map(|(p, _)| Arc::clone(p)).collect();
            return (Cow::Owned(chosen), tier);
        }
    }
    (pods, Tier::Other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::store::tests::test_pod;
    use crate::engine_metrics::{LoraSlots, PodMetrics};
    use std::time::{Duration, Instant};

    fn slots(max_lora: u32, running: &[&str]) -> LoraSlots {
        let mut slots = LoraSlots { max_lora, running: running.len() as u32, ..LoraSlots::default() };
        for (slot, name) in slots.hashes.iter_mut().zip(running) {
            *slot = lora_hash(name);
        }
        slots
    }

    fn view(reports: &[(&str, Option<LoraSlots>)]) -> MetricsView {
        let readings = reports.iter().map(|(name, lora)| {
            let mut metrics = PodMetrics::empty(Instant::now());
            metrics.lora = *lora;
            (format!("default/{name}"), metrics)
        });
        MetricsView::fixed(readings, Duration::from_secs(60))
    }

    fn pods(names: &[&str]) -> Vec<Arc<PodInfo>> {
        names.iter().enumerate().map(|(i, n)| Arc::new(test_pod("llama", n, 1000 + i as u16, true))).collect()
    }

    fn names(pods: &[Arc<PodInfo>]) -> Vec<&str> {
        pods.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn running_first_then_a_free_slot_then_the_rest() {
        let all = pods(&["a", "b", "c", "d"]);
        let reports = [
            ("a", Some(slots(1, &["chat"]))),
            ("b", Some(slots(2, &["sql"]))),
            ("c", Some(slots(2, &[]))),
            ("d", None),
        ];
        let (chosen, tier) = best_tier(Cow::Borrowed(&all), "sql", &view(&reports));
        assert_eq!((names(&chosen), tier), (vec!["b"], Tier::Running));
        let (chosen, tier) = best_tier(Cow::Borrowed(&all), "math", &view(&reports));
        assert_eq!((names(&chosen), tier), (vec!["b", "c"], Tier::FreeSlot), "a is full, d says nothing");
        let full = [("a", Some(slots(1, &["chat"]))), ("b", Some(slots(1, &["sql"])))];
        let (chosen, tier) = best_tier(Cow::Borrowed(&all[..2]), "math", &view(&full));
        assert_eq!((names(&chosen), tier), (vec!["a", "b"], Tier::Other));
    }

    #[test]
    fn a_stale_report_counts_for_nothing() {
        let all = pods(&["a", "b"]);
        let mut old = PodMetrics::empty(Instant::now().checked_sub(Duration::from_secs(10)).expect("past"));
        old.lora = Some(slots(4, &["sql"]));
        let mut fresh = PodMetrics::empty(Instant::now());
        fresh.lora = Some(slots(1, &["chat"]));
        let view = MetricsView::fixed(
            [("default/a".to_owned(), old), ("default/b".to_owned(), fresh)],
            Duration::from_secs(2),
        );
        let (chosen, tier) = best_tier(Cow::Borrowed(&all), "sql", &view);
        assert_eq!((names(&chosen), tier), (vec!["a", "b"], Tier::Other));
    }
}
