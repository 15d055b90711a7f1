//! The engine `/metrics` parser on a vLLM-shaped page, whole and filtered.
//!
//! `fixtures/vllm-metrics.prom` is the page a vLLM 0.34 (v1 engine) pod serves
//! with its defaults: the Python collector families, its gauges and counters
//! with their `_created` gauges, and 16 histograms with their real buckets.
//! `fixtures/vllm-metrics-filtered.prom` is the same page as prometheus_client
//! renders it for the gateway's `name[]` query. Issue 23 budgets 50 µs for the
//! first and 10 µs for the second.
//!
//! `cargo bench -p gateway-user --bench parse`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gateway_user::engine_metrics::{for_engine, parse};

const FULL_PAGE: &str = include_str!("fixtures/vllm-metrics.prom");
const FILTERED_PAGE: &str = include_str!("fixtures/vllm-metrics-filtered.prom");

fn pages(c: &mut Criterion) {
    let names = for_engine("vllm");
    let mut group = c.benchmark_group("engine_metrics/parse");
    for (id, page) in [("vllm_full_page", FULL_PAGE), ("vllm_filtered_page", FILTERED_PAGE)] {
        let scraped = parse(page, names).expect("the fixture parses");
        assert!(scraped.running.is_some() && scraped.e2e_latency.is_some(), "{id}: the signals are read");
        group.throughput(Throughput::Bytes(page.len() as u64));
        group.bench_function(id, |b| b.iter(|| parse(black_box(page), names)));
    }
    group.finish();
}

criterion_group!(benches, pages);
criterion_main!(benches);
