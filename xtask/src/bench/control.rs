//! Control-plane workloads: how long it takes to change what is
//! redirected, in µs, measured in the rounds that also run throughput.
//!
//! # Adding a control-plane workload
//!
//! Implement [`ControlWorkload`] (a name and `run`, which returns one or
//! more `(name, µs)` figures measured against the bench's cgroup and
//! namespaces) and add it to [`all`]. The report's "Control plane" table
//! picks every figure up, as a median (trimmed min–max) over rounds.
//! Figures that need the library rather than the `redirect` binary are
//! measured by a `bench-agent` verb, as `add-mapping` is, so that xtask
//! keeps linking no workspace crate.
//!
//! Planned here (issue 10, from the daemon's API when it lands): adding a
//! scope to a running daemon (≤ 2 ms p50), adding a mapping through it
//! (≤ 100 µs p50), and the connection rate through one of 1,000 attached
//! scopes against that with one (a ratio, measured like
//! `workloads::conn_rate_with_mappings`).

use super::{env::Env, report::ADD_MAPPING, workloads::field};

/// One control-plane timing.
pub trait ControlWorkload {
    /// Measures once; returns `(name, µs)` figures.
    fn run(&self, env: &Env) -> anyhow::Result<Vec<(&'static str, f64)>>;
}

/// Every control-plane workload.
pub fn all() -> Vec<Box<dyn ControlWorkload>> {
    vec![Box::new(AddMapping)]
}

/// `Redirector::insert` on a live redirector: 200 inserts, p50 and p99.
struct AddMapping;

impl ControlWorkload for AddMapping {
    fn run(&self, env: &Env) -> anyhow::Result<Vec<(&'static str, f64)>> {
        let agent = env.bench_agent.display().to_string();
        let cgroup = env.cgroup.display().to_string();
        let line = super::env::output(env.host_command(&[&agent, "add-mapping", &cgroup, "200"]))?;
        Ok(vec![
            (ADD_MAPPING, field(&line, "p50")?),
            ("add a mapping (p99)", field(&line, "p99")?),
            (
                "attach a redirector (load + attach)",
                field(&line, "attach_ms")? * 1e3,
            ),
        ])
    }
}
