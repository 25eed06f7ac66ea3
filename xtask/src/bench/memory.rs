//! The fallback proxy's memory (issue 12's targets: ≤ 20 MiB with 1,000
//! idle connections open, and no growth over a 60 s connection-rate run).
//!
//! Measured once per bench, after the rounds: `redirect run --backend
//! proxy` for the echo service in the server namespace, and `bench-agent
//! proxy-memory` against it (1,000 idle connections held, then a
//! connection-rate run sampling the proxy's RSS every second). The figures
//! join the "Control plane" table (in KiB) and the targets.

use super::{
    env::{ECHO, Env, Side, addr},
    paths::start_proxy,
    report::{PROXY_HWM, PROXY_RSS_END, PROXY_RSS_IDLE, PROXY_RSS_WARM},
    workloads::{cpu_args, field},
};

/// Idle connections held open through the proxy.
pub const IDLE_CONNS: u32 = 1000;

/// `(name, KiB)` figures of one measurement, with a connection-rate run
/// of `secs`.
pub fn measure(env: &Env, secs: f64) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let (pid, guard) = start_proxy(env, &[ECHO])?;
    let mut args = vec![
        "proxy-memory".to_owned(),
        pid.to_string(),
        addr(Side::Local, ECHO.0).to_string(),
        IDLE_CONNS.to_string(),
        secs.to_string(),
    ];
    args.extend(cpu_args(env.placement.conn_client));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let line = env.client(Side::Local, &args)?;
    drop(guard);
    Ok(vec![
        (
            "redirect-proxy: RSS before (KiB)",
            field(&line, "rss_before_kib")?,
        ),
        (PROXY_RSS_IDLE, field(&line, "rss_idle_kib")?),
        (PROXY_RSS_WARM, field(&line, "rss_warm_kib")?),
        (PROXY_RSS_END, field(&line, "rss_end_kib")?),
        (PROXY_HWM, field(&line, "peak_kib")?),
    ])
}
