//! Prometheus metrics of the daemon, in the text exposition format, built
//! with `prometheus-client` (the official Rust client) from a fresh
//! snapshot at every scrape.
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `redirect_connections_redirected_total` | scope, mapping | connects rewritten |
//! | `redirect_datagrams_redirected_total` | scope, mapping | unconnected UDP datagrams rewritten |
//! | `redirect_connections_established` | scope, mapping | TCP connections open through the mapping |
//! | `redirect_events_total` | event | skips and errors by reason (`redirect_common::Counter`) |
//! | `redirect_scopes` | | scopes attached |

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::core::Core;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MappingLabels {
    scope: String,
    mapping: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

/// The metrics of `core` in Prometheus' text format.
pub fn render(core: &Core) -> String {
    let mut registry = Registry::with_prefix("redirect");
    let redirected = Family::<MappingLabels, Counter>::default();
    let datagrams = Family::<MappingLabels, Counter>::default();
    let established = Family::<MappingLabels, Gauge>::default();
    let events = Family::<EventLabels, Counter>::default();
    let scopes = Gauge::<i64>::default();
    registry.register(
        "connections_redirected",
        "Connects (TCP and connected UDP) rewritten",
        redirected.clone(),
    );
    registry.register(
        "datagrams_redirected",
        "Unconnected UDP datagrams rewritten",
        datagrams.clone(),
    );
    registry.register(
        "connections_established",
        "TCP connections established through the mapping and still open",
        established.clone(),
    );
    registry.register(
        "events",
        "Program events by reason: rewrites, skips and errors",
        events.clone(),
    );
    registry.register("scopes", "Scopes attached", scopes.clone());
    let stats = core.scope_stats();
    scopes.set(stats.len() as i64);
    for s in &stats {
        for (m, c) in &s.mappings {
            let labels = MappingLabels {
                scope: s.name.clone(),
                mapping: m.to_string(),
            };
            redirected.get_or_create(&labels).inc_by(c.connects);
            datagrams.get_or_create(&labels).inc_by(c.datagrams);
            established.get_or_create(&labels).set(c.established as i64);
        }
    }
    if let Ok(counters) = core.programs().counters() {
        for (c, v) in counters.values {
            events
                .get_or_create(&EventLabels {
                    event: c.name().to_owned(),
                })
                .inc_by(v);
        }
    }
    let mut out = String::new();
    if encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}
