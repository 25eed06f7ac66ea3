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
//! Measured: `Redirector::insert` (`add-mapping`), the library's loaded
//! program set attaching scopes and adding mappings to one (`add-scope`),
//! and a running `redirect daemon` (`daemon`): its cold start, scopes and
//! mappings added through its control socket, its RSS, and 100 stand-in
//! containers through `redirect oci-hook` (the hook's time, the daemon's
//! RSS and pinned links before and after).

use super::{
    env::Env,
    report::{
        ADD_MAPPING, DAEMON_ADD, DAEMON_COLD, DAEMON_RSS, DAEMON_SCOPE, HOOK_CREATE,
        HOOK_LINKS_AFTER, HOOK_LINKS_BEFORE, HOOK_RSS_AFTER, HOOK_RSS_BEFORE,
    },
    workloads::field,
};

/// One control-plane timing.
pub trait ControlWorkload {
    /// Measures once; returns `(name, µs)` figures.
    fn run(&self, env: &Env) -> anyhow::Result<Vec<(&'static str, f64)>>;
}

/// Every control-plane workload.
pub fn all() -> Vec<Box<dyn ControlWorkload>> {
    vec![Box::new(AddMapping), Box::new(AddScope), Box::new(Daemon)]
}

/// `redirect daemon` with one configured scope: cold start, 100 scopes and
/// 200 mappings added through the control socket, then 100 stand-in
/// containers (a process in a cgroup and network namespace of its own)
/// through `redirect oci-hook` createRuntime and poststop, as runc calls
/// it, 25 ms apart (what a runtime spends around the hook).
struct Daemon;

impl ControlWorkload for Daemon {
    fn run(&self, env: &Env) -> anyhow::Result<Vec<(&'static str, f64)>> {
        let agent = env.bench_agent.display().to_string();
        let redirect = env.redirect.display().to_string();
        let parent = env.cgroup.display().to_string();
        let line = super::env::output(
            env.host_command(&[&agent, "daemon", &redirect, &parent, "100", "100"]),
        )?;
        Ok(vec![
            (DAEMON_COLD, field(&line, "cold_us")?),
            (DAEMON_SCOPE, field(&line, "scope_p50")?),
            (
                "daemon: add a scope via the control socket (p99, µs)",
                field(&line, "scope_p99")?,
            ),
            (DAEMON_ADD, field(&line, "session_add_p50")?),
            (
                "daemon: add a mapping in a control session (p99, µs)",
                field(&line, "session_add_p99")?,
            ),
            (
                "daemon: add a mapping, one connection each (p50, µs)",
                field(&line, "add_p50")?,
            ),
            (
                "daemon: add a mapping, one connection each (p99, µs)",
                field(&line, "add_p99")?,
            ),
            (DAEMON_RSS, field(&line, "rss_scopes_kib")?),
            (HOOK_CREATE, field(&line, "hook_p50")?),
            (
                "oci-hook createRuntime, start to exit (p99, µs)",
                field(&line, "hook_p99")?,
            ),
            (HOOK_RSS_BEFORE, field(&line, "rss_before_kib")?),
            (HOOK_RSS_AFTER, field(&line, "rss_after_kib")?),
            (HOOK_LINKS_BEFORE, field(&line, "links_before")?),
            (HOOK_LINKS_AFTER, field(&line, "links_after")?),
        ])
    }
}

/// The library's loaded program set (what the daemon holds): load once,
/// attach 20 scopes to child cgroups of the test world's cgroup, add 200
/// mappings to one. Through the library, not the daemon's control socket:
/// a lower bound for the daemon's figures.
struct AddScope;

impl ControlWorkload for AddScope {
    fn run(&self, env: &Env) -> anyhow::Result<Vec<(&'static str, f64)>> {
        let agent = env.bench_agent.display().to_string();
        let cgroup = env.cgroup.display().to_string();
        let line = super::env::output(env.host_command(&[&agent, "add-scope", &cgroup, "20"]))?;
        Ok(vec![
            ("load the program set once", field(&line, "load_ms")? * 1e3),
            ("attach a scope (p50)", field(&line, "scope_p50")?),
            ("attach a scope (p99)", field(&line, "scope_p99")?),
            (
                "add a mapping to a live scope (p50)",
                field(&line, "add_p50")?,
            ),
            (
                "add a mapping to a live scope (p99)",
                field(&line, "add_p99")?,
            ),
        ])
    }
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
