//! Routing one request as the fleet grows: 2, 100 and 1,000 ready pods with
//! fresh engine metrics (in the store the scraper fills, read as requests
//! read them), for a strategy on the gateway's own counts (`least-request`)
//! and one on engine metrics (`least-kv-cache`). Issue 23 asks that this not
//! grow with the pods.
//!
//! `cargo bench -p gateway-user --bench routing`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gateway_user::discovery::{PodInfo, PodLoad, Role};
use gateway_user::engine_metrics::{EngineMetrics, PodMetrics};
use gateway_user::metrics::Metrics;
use gateway_user::routing::{Route, RouteRequest, Router, RoutingConfig};

fn pod(i: usize) -> Arc<PodInfo> {
    let addr: std::net::SocketAddr = ([10, 0, (i / 250) as u8, (i % 250) as u8], 8000).into();
    Arc::new(PodInfo {
        key: format!("default/vllm-{i}"),
        name: format!("vllm-{i}"),
        namespace: "default".into(),
        model: "m".into(),
        addr: Some(addr),
        addr_text: addr.to_string(),
        metric_port: 8000,
        engine: "vllm".into(),
        roleset: None,
        role: Role::Combined,
        labels: BTreeMap::new(),
        config_annotation: None,
        pd: Default::default(),
        custom_paths: Vec::new(),
        data_parallel: 1,
        ready: true,
        load: Arc::new(PodLoad::default()),
        series: Default::default(),
    })
}

fn fleet(c: &mut Criterion) {
    let metrics = Metrics::new();
    let router = Router::new(&RoutingConfig::default(), &metrics.routing);
    let model: Arc<str> = Arc::from("m");
    let mut group = c.benchmark_group("routing/route");
    for pods in [2, 100, 1000] {
        let candidates: Vec<Arc<PodInfo>> = (0..pods).map(pod).collect();
        let now = Instant::now();
        let store = EngineMetrics::new(Duration::from_secs(3600));
        for (i, pod) in candidates.iter().enumerate() {
            let usage = (i % 10) as f64 / 10.0;
            store.record(pod, PodMetrics { kv_cache_usage: Some(usage), ..PodMetrics::empty(now) });
        }
        for name in ["least-request", "least-kv-cache"] {
            let strategy = router.strategy(name).expect("registered");
            group.bench_with_input(BenchmarkId::new(name, pods), &candidates, |b, candidates| {
                b.iter(|| {
                    let request = RouteRequest::new(&model, b"{}").with_metrics(store.view());
                    match router.route(strategy.as_ref(), &request, black_box(candidates)) {
                        Ok(Route::Single { pod, .. }) => black_box(pod),
                        other => panic!("not routed: {other:?}"),
                    }
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, fleet);
criterion_main!(benches);
