//! The workloads, each measured on every path that supports it.

use std::{collections::BTreeMap, process::Stdio, thread, time::Duration};

use anyhow::Context as _;

use super::{
    env::{ECHO, Env, IPERF, Side, UDP, addr, output},
    paths::BenchPath,
};

/// A measured quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// iperf3, one stream, Gbit/s.
    Tput1,
    /// iperf3, four streams, Gbit/s.
    Tput4,
    /// Connect, 64-byte request, reply, close: connections per second.
    ConnRate,
    /// 64-byte request/response on one TCP connection, median µs.
    LatP50,
    /// Same, 99th percentile µs.
    LatP99,
    /// 64-byte UDP request/response, median µs.
    UdpP50,
    /// Same, 99th percentile µs.
    UdpP99,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 7] = [
        Metric::Tput1,
        Metric::Tput4,
        Metric::ConnRate,
        Metric::LatP50,
        Metric::LatP99,
        Metric::UdpP50,
        Metric::UdpP99,
    ];

    /// Column title.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Tput1 => "throughput, 1 stream",
            Metric::Tput4 => "throughput, 4 streams",
            Metric::ConnRate => "connections/s",
            Metric::LatP50 => "TCP latency p50",
            Metric::LatP99 => "TCP latency p99",
            Metric::UdpP50 => "UDP latency p50",
            Metric::UdpP99 => "UDP latency p99",
        }
    }

    /// Unit of the absolute figure.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Tput1 | Metric::Tput4 => "Gbit/s",
            Metric::ConnRate => "conn/s",
            _ => "µs",
        }
    }

    /// Whether a larger figure is better (throughput, rate) or worse
    /// (latency).
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Tput1 | Metric::Tput4 | Metric::ConnRate)
    }

    fn udp(self) -> bool {
        matches!(self, Metric::UdpP50 | Metric::UdpP99)
    }
}

/// How long each measurement runs.
#[derive(Clone, Copy, Debug)]
pub struct Durations {
    /// iperf3 runs (whole seconds, at least 1).
    pub iperf_secs: u32,
    /// Rate and latency loops.
    pub loop_secs: f64,
}

/// Measures every metric `path` supports; the path is already started.
pub fn measure(
    env: &Env,
    path: &dyn BenchPath,
    d: Durations,
) -> anyhow::Result<BTreeMap<Metric, f64>> {
    let side = path.side();
    let port = |(from, to): (u16, u16)| if path.dials_to() { to } else { from };
    let secs = format!("{}", d.loop_secs);
    let mut out = BTreeMap::new();
    for m in Metric::ALL {
        if m.udp() && !path.udp() {
            continue;
        }
        let value = match m {
            Metric::Tput1 | Metric::Tput4 => {
                let streams = if m == Metric::Tput1 { 1 } else { 4 };
                iperf(env, side, port(IPERF), streams, d.iperf_secs)?
            }
            Metric::ConnRate => {
                let line = env.client(
                    side,
                    &["conn-rate", &addr(side, port(ECHO)).to_string(), &secs],
                )?;
                field(&line, "value")?
            }
            Metric::LatP50 | Metric::LatP99 => {
                if m == Metric::LatP99 {
                    continue; // measured together with p50
                }
                let line = env.client(
                    side,
                    &["latency", &addr(side, port(ECHO)).to_string(), &secs],
                )?;
                out.insert(Metric::LatP99, field(&line, "p99")?);
                field(&line, "p50")?
            }
            Metric::UdpP50 | Metric::UdpP99 => {
                if m == Metric::UdpP99 {
                    continue;
                }
                let line = env.client(
                    side,
                    &["udp-latency", &addr(side, port(UDP)).to_string(), &secs],
                )?;
                out.insert(Metric::UdpP99, field(&line, "p99")?);
                field(&line, "p50")?
            }
        };
        out.insert(m, value);
    }
    Ok(out)
}

/// iperf3 against the server namespace's iperf3 server; Gbit/s received.
fn iperf(env: &Env, side: Side, port: u16, streams: u32, secs: u32) -> anyhow::Result<f64> {
    let ip = addr(side, port).ip().to_string();
    let (port, streams, secs) = (port.to_string(), streams.to_string(), secs.to_string());
    let args = [
        "iperf3",
        "-c",
        &ip,
        "-p",
        &port,
        "-P",
        &streams,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    // The server takes a moment to accept the next test after the last.
    let mut last = None;
    for _ in 0..3 {
        match output(env.command(side, true, &args)) {
            Ok(json) => {
                let v: serde_json::Value =
                    serde_json::from_str(&json).context("iperf3 -J output")?;
                let bps = v["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .context("iperf3 reported no received rate")?;
                return Ok(bps / 1e9);
            }
            Err(e) => last = Some(e),
        }
        thread::sleep(Duration::from_millis(300));
    }
    Err(last.expect("tried"))
}

/// Setup time in ms: from the moment the path's setup starts to the first
/// request that reaches the server through it. A client polls FROM (where
/// nothing listens yet) every 200 µs meanwhile.
pub fn setup_ms(env: &Env, path: &dyn BenchPath) -> anyhow::Result<(f64, Box<dyn std::any::Any>)> {
    let side = path.side();
    let agent = env.bench_agent.display().to_string();
    let target = addr(side, ECHO.0).to_string();
    let poller = env
        .command(side, true, &[&agent, "first-connect", &target, "10"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the first-connect poller")?;
    // Let it start polling before the clock starts.
    thread::sleep(Duration::from_millis(100));
    let t0 = now_us();
    let guard = path.start(env)?;
    let out = poller.wait_with_output()?;
    let line = String::from_utf8_lossy(&out.stdout);
    let at = field(&line, "at_us")
        .with_context(|| format!("{}: first connection never made", path.name()))?;
    Ok(((at - t0 as f64) / 1e3, guard))
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// The number after `key=` in a bench-agent output line.
pub fn field(line: &str, key: &str) -> anyhow::Result<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key}= in {line:?}"))?
        .parse()
        .with_context(|| format!("{key} in {line:?}"))
}

/// Connection rate through `redirect` with `extra` filler mappings
/// installed besides the measured one.
pub fn conn_rate_with_mappings(env: &Env, extra: u32, d: Durations) -> anyhow::Result<f64> {
    use std::io::{BufRead as _, BufReader};
    let agent = env.bench_agent.display().to_string();
    let cgroup = env.cgroup.display().to_string();
    let mapping = format!("{}:{}", ECHO.0, ECHO.1);
    let extra_s = extra.to_string();
    let mut holder = env
        .host_command(&[&agent, "hold-mappings", &cgroup, &mapping, &extra_s])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting hold-mappings")?;
    let mut line = String::new();
    BufReader::new(holder.stdout.take().context("stdout")?).read_line(&mut line)?;
    anyhow::ensure!(line.trim() == "ready", "hold-mappings: {line}");
    let secs = format!("{}", d.loop_secs);
    let result = env
        .client(
            Side::Local,
            &["conn-rate", &addr(Side::Local, ECHO.0).to_string(), &secs],
        )
        .and_then(|l| field(&l, "value"));
    drop(holder.stdin.take());
    let _ = holder.wait();
    result
}

/// Time to add one mapping at run time: (p50 µs, p99 µs).
pub fn add_mapping_us(env: &Env) -> anyhow::Result<(f64, f64)> {
    let agent = env.bench_agent.display().to_string();
    let cgroup = env.cgroup.display().to_string();
    let line = output(env.host_command(&[&agent, "add-mapping", &cgroup, "200"]))?;
    Ok((field(&line, "p50")?, field(&line, "p99")?))
}
