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
//! | `redirect_scope_backend` | scope, backend | 1 for the backend each scope runs on (`ebpf` or `proxy`) |
//! | `redirect_proxy_connections_total` | scope | TCP connections accepted by a proxy-backed scope |
//! | `redirect_proxy_connections_active` | scope | TCP connections open through it now |
//! | `redirect_proxy_connections_refused_total` | scope | closed at once: the connection limit |
//! | `redirect_proxy_connect_failures_total` | scope | connects to TO that failed or timed out |
//! | `redirect_proxy_bytes_total` | scope, direction | bytes copied (`up`: to TO, `down`: back) |

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
struct BackendLabels {
    scope: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    scope: String,
    direction: &'static str,
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
    let backend = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "scope_backend",
        "1 for the backend each scope runs on (ebpf or proxy)",
        backend.clone(),
    );
    let proxy_accepted = Family::<ScopeLabels, Counter>::default();
    let proxy_active = Family::<ScopeLabels, Gauge>::default();
    let proxy_refused = Family::<ScopeLabels, Counter>::default();
    let proxy_failed = Family::<ScopeLabels, Counter>::default();
    let proxy_bytes = Family::<BytesLabels, Counter>::default();
    registry.register(
        "proxy_connections",
        "TCP connections accepted by a proxy-backed scope",
        proxy_accepted.clone(),
    );
    registry.register(
        "proxy_connections_active",
        "TCP connections open through a proxy-backed scope",
        proxy_active.clone(),
    );
    registry.register(
        "proxy_connections_refused",
        "TCP connections closed at once because of the connection limit",
        proxy_refused.clone(),
    );
    registry.register(
        "proxy_connect_failures",
        "Connects to TO that failed or timed out",
        proxy_failed.clone(),
    );
    registry.register(
        "proxy_bytes",
        "Bytes copied by a proxy-backed scope (up: to TO, down: back to the client)",
        proxy_bytes.clone(),
    );
    let backends = core.backends();
    scopes.set(backends.len() as i64);
    for (scope, b, _) in backends {
        backend
            .get_or_create(&BackendLabels {
                scope,
                backend: b.as_str().to_owned(),
            })
            .set(1);
    }
    for (scope, s) in core.proxy_stats() {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let labels = ScopeLabels {
            scope: scope.clone(),
        };
        proxy_accepted
            .get_or_create(&labels)
            .inc_by(get(&s.accepted));
        proxy_active
            .get_or_create(&labels)
            .set(get(&s.active) as i64);
        proxy_refused.get_or_create(&labels).inc_by(get(&s.refused));
        proxy_failed
            .get_or_create(&labels)
            .inc_by(get(&s.connect_failed));
        for (direction, c) in [("up", &s.bytes_up), ("down", &s.bytes_down)] {
            proxy_bytes
                .get_or_create(&BytesLabels {
                    scope: scope.clone(),
                    direction,
                })
                .inc_by(get(c));
        }
    }
    let stats = core.scope_stats();
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
    if let Some(Ok(counters)) = core.programs().map(|p| p.counters()) {
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
