//! LoRA affinity: among the pods serving an adapter, the model's strategy
//! chooses within the best tier that has a pod: those where the adapter is
//! already running (vLLM's `vllm:lora_requests_info` `running_lora_adapters`),
//! then those with a free adapter slot (fewer running than `max_lora`, or no
//! request running at all; a pod not scraped yet, new, is taken to have one),
//! then the rest (among them pods whose scrapes have gone stale). Loading an adapter costs the engine a swap; a pod that runs it
//! already does not pay it.
//!
//! Affinity never queues behind a backlog: a tier whose every pod has
//! requests waiting in its engine is passed over while a lower tier has a pod
//! with none waiting.

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
    // Each pod's tier, and whether its engine has requests waiting.
    let judged: Vec<(Tier, bool)> = pods
        .iter()
        .map(|pod| match view.reading_of(pod) {
            Reading::Fresh(metrics) => {
                let idle = metrics.running.is_some_and(|running| running <= 0.0);
                let tier = match metrics.lora {
                    Some(lora) if lora.runs(hash) => Tier::Running,
                    Some(lora) if lora.has_free_slot() || (idle && lora.max_lora > 0) => Tier::FreeSlot,
                    _ => Tier::Other,
                };
                (tier, metrics.waiting.is_some_and(|waiting| waiting > 0.0))
            }
            Reading::Missing => (Tier::FreeSlot, false),
            // Silent lately: not taken for a pod with nothing waiting.
            Reading::Stale => (Tier::Other, true),
        })
        .collect();
    let tiers = [Tier::Running, Tier::FreeSlot, Tier::Other];
    for (at, &tier) in tiers.iter().enumerate() {
        let mut members = judged.iter().filter(|(t, _)| *t == tier);
        let Some(_) = members.clone().next() else { continue };
        let backed_up = members.all(|(_, waiting)| *waiting);
        let lower_free = judged.iter().any(|(t, waiting)| tiers[at + 1..].contains(t) && !*waiting);
        if backed_up && lower_free {
            continue;
        }
        if tier == Tier::Other && judged.iter().all(|(t, _)| *t == Tier::Other) {
            return (pods, tier);
        }
        let chosen = pods.iter().zip(&judged).filter(|(_, (t, _))| *t == tier).map(|(p, _)| Arc::clone(p)).collect();
        return (Cow::Owned(chosen), tier);
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
        view_with(&reports.iter().map(|(name, lora)| (*name, *lora, 1.0, 0.0)).collect::<Vec<_>>())
    }

    /// Reports of (pod, slots, requests running, requests waiting).
    fn view_with(reports: &[(&str, Option<LoraSlots>, f64, f64)]) -> MetricsView {
        let readings = reports.iter().map(|(name, lora, running, waiting)| {
            let mut metrics = PodMetrics::empty(Instant::now());
            metrics.lora = *lora;
            metrics.running = Some(*running);
            metrics.waiting = Some(*waiting);
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
        let unscraped = view(&[("a", Some(slots(1, &["chat"]))), ("b", Some(slots(1, &["sql"])))]);
        let (chosen, tier) = best_tier(Cow::Borrowed(&all[..3]), "math", &unscraped);
        assert_eq!((names(&chosen), tier), (vec!["c"], Tier::FreeSlot), "c is new: not scraped yet");
        let full = [("a", Some(slots(1, &["chat"]))), ("b", Some(slots(1, &["sql"])))];
        let (chosen, tier) = best_tier(Cow::Borrowed(&all[..2]), "math", &view(&full));
        assert_eq!((names(&chosen), tier), (vec!["a", "b"], Tier::Other));
    }

    #[test]
    fn an_idle_engine_has_a_free_slot_and_a_backlog_is_passed_over() {
        let all = pods(&["a", "b", "c"]);
        // b last ran chat and is idle now: its slot is free for sql.
        let idle = [("a", Some(slots(1, &["chat"])), 2.0, 0.0), ("b", Some(slots(1, &["chat"])), 0.0, 0.0)];
        let (chosen, tier) = best_tier(Cow::Borrowed(&all[..2]), "sql", &view_with(&idle));
        assert_eq!((names(&chosen), tier), (vec!["b"], Tier::FreeSlot));
        // a runs sql but has requests queued; b has a free slot and none waiting.
        let backlog = [
            ("a", Some(slots(2, &["sql"])), 8.0, 3.0),
            ("b", Some(slots(2, &[])), 1.0, 0.0),
            ("c", Some(slots(1, &["x"])), 1.0, 0.0),
        ];
        let (chosen, tier) = best_tier(Cow::Borrowed(&all), "sql", &view_with(&backlog));
        assert_eq!((names(&chosen), tier), (vec!["b"], Tier::FreeSlot));
        // Every pod queues: affinity holds.
        let everywhere = [("a", Some(slots(2, &["sql"])), 8.0, 3.0), ("b", Some(slots(2, &[])), 8.0, 1.0)];
        let (chosen, tier) = best_tier(Cow::Borrowed(&all[..2]), "sql", &view_with(&everywhere));
        assert_eq!((names(&chosen), tier), (vec!["a"], Tier::Running));
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
