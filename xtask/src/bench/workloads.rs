//! The workloads, each measured on every path that supports it.

use std::{collections::BTreeMap, process::Stdio, thread, time::Duration};

use anyhow::Context as _;

use super::{
    env::{ECHO, Env, IPERF, Side, UDP, World, addr, output},
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
#[derive(Clone, Copy, Debug, Default)]
pub struct Durations {
    /// iperf3 runs (whole seconds, at least 1).
    pub iperf_secs: u32,
    /// Connection-rate loops.
    pub conn_secs: f64,
    /// Latency loops (TCP and UDP request/response).
    pub lat_secs: f64,
}

/// Where the bench-agent processes run: fixed CPUs, so that every run sees
/// the same placement (see `bench-agent`'s module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Placement {
    /// CPU of the TCP and UDP servers.
    pub server: Option<usize>,
    /// CPU of the connection-rate client.
    pub conn_client: Option<usize>,
    /// CPU of the latency clients.
    pub lat_client: Option<usize>,
}

impl Placement {
    /// The placement for this machine: with two CPUs or more, servers on
    /// CPU 1; the connection-rate client on CPU 0, so that client and
    /// server run in parallel; the latency clients on the server's CPU, so
    /// that a round trip never waits for a cross-CPU wake-up (an IPI, slow
    /// in a VM) and never sometimes does. One CPU: nothing to choose.
    pub fn for_this_machine() -> Placement {
        let cpus = thread::available_parallelism().map_or(1, usize::from);
        if cpus < 2 {
            return Placement::default();
        }
        Placement {
            server: Some(1),
            conn_client: Some(0),
            lat_client: Some(1),
        }
    }

    /// Text for the report.
    pub fn describe(self) -> String {
        let cpu = |c: Option<usize>| c.map_or("any CPU".into(), |c| format!("CPU {c}"));
        format!(
            "servers on {}, connection-rate client on {}, latency clients on {}",
            cpu(self.server),
            cpu(self.conn_client),
            cpu(self.lat_client)
        )
    }
}

/// `--cpu N` for a bench-agent command line, or nothing.
pub fn cpu_args(cpu: Option<usize>) -> Vec<String> {
    cpu.map_or_else(Vec::new, |c| vec!["--cpu".into(), c.to_string()])
}

/// What one visit of a path measured.
#[derive(Debug, Default)]
pub struct Measured {
    /// The direct path's figures, from the base world, taken in turns with
    /// the path's.
    pub reference: BTreeMap<Metric, f64>,
    /// The path's figures.
    pub figures: BTreeMap<Metric, f64>,
}

/// The order a visit measures in.
const ORDER: [Metric; 5] = [
    Metric::ConnRate,
    Metric::LatP50,
    Metric::UdpP50,
    Metric::Tput1,
    Metric::Tput4,
];

/// Measures every metric `path` (already started in the test world)
/// supports, throughput only when `throughput`, each against the direct
/// path of its side in the base world: the connection rate and the
/// latencies as a duel (the two clients take turns of 100 ms, see
/// [`duel`]), throughput (iperf3) one after the other, `base_first`
/// deciding who starts.
pub fn measure(
    env: &Env,
    path: &dyn BenchPath,
    d: Durations,
    throughput: bool,
    base_first: bool,
) -> anyhow::Result<Measured> {
    let side = path.side();
    let port = |(from, to): (u16, u16)| if path.dials_to() { to } else { from };
    let mut out = Measured::default();
    for m in ORDER {
        if m.udp() && !path.udp() {
            continue;
        }
        match m {
            Metric::Tput1 | Metric::Tput4 => {
                if !throughput {
                    continue;
                }
                let streams = if m == Metric::Tput1 { 1 } else { 4 };
                let mut both = [(World::Base, IPERF.1), (World::Test, port(IPERF))];
                if !base_first {
                    both.reverse();
                }
                for (world, p) in both {
                    let v = iperf(env, world, side, p, streams, d.iperf_secs)?;
                    match world {
                        World::Base => out.reference.insert(m, v),
                        World::Test => out.figures.insert(m, v),
                    };
                }
            }
            Metric::ConnRate => {
                let [b, t] = duel(
                    env,
                    side,
                    "conn-rate",
                    [ECHO.1, port(ECHO)],
                    d.conn_secs,
                    env.placement.conn_client,
                    base_first,
                )?;
                out.reference.insert(m, field(&b, "value")?);
                out.figures.insert(m, field(&t, "value")?);
            }
            Metric::LatP50 | Metric::UdpP50 => {
                let (verb, ports, p99) = if m == Metric::LatP50 {
                    ("latency", [ECHO.1, port(ECHO)], Metric::LatP99)
                } else {
                    ("udp-latency", [UDP.1, port(UDP)], Metric::UdpP99)
                };
                let [b, t] = duel(
                    env,
                    side,
                    verb,
                    ports,
                    d.lat_secs,
                    env.placement.lat_client,
                    base_first,
                )?;
                out.reference.insert(m, field(&b, "p50")?);
                out.reference.insert(p99, field(&b, "p99")?);
                out.figures.insert(m, field(&t, "p50")?);
                out.figures.insert(p99, field(&t, "p99")?);
            }
            // Measured together with p50.
            Metric::LatP99 | Metric::UdpP99 => {}
        }
    }
    Ok(out)
}

/// Runs bench-agent `verb` twice at once, on `side` of the base world
/// against `ports[0]` and of the test world against `ports[1]`, for
/// `secs` each, taking turns of 100 ms through the env's FIFOs, so that
/// both see the same machine: load that comes and goes (other builds)
/// hits both alike. Returns their output lines, base first.
pub fn duel(
    env: &Env,
    side: Side,
    verb: &str,
    ports: [u16; 2],
    secs: f64,
    cpu: Option<usize>,
    base_first: bool,
) -> anyhow::Result<[String; 2]> {
    let agent = env.bench_agent.display().to_string();
    let (fb, ft) = (
        env.fifos.0.display().to_string(),
        env.fifos.1.display().to_string(),
    );
    let spawn = |world: World, port: u16, ours: &str, theirs: &str, first: bool| {
        let mut args = vec![
            agent.clone(),
            verb.to_owned(),
            addr(side, port).to_string(),
            secs.to_string(),
            "--turn".into(),
            ours.to_owned(),
            theirs.to_owned(),
        ];
        if first {
            args.push("--first".into());
        }
        args.extend(cpu_args(cpu));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.client_command_in(world, side, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {args:?}"))
    };
    let base = spawn(World::Base, ports[0], &fb, &ft, base_first)?;
    let test = spawn(World::Test, ports[1], &ft, &fb, !base_first);
    let wait = |c: std::process::Child| -> anyhow::Result<String> {
        let out = c.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "bench-agent {verb} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let test = match test {
        Ok(t) => t,
        Err(e) => {
            // The base client would wait 30 s for a turn: stop it now.
            let mut base = base;
            let _ = base.kill();
            let _ = base.wait();
            return Err(e);
        }
    };
    let (b, t) = (wait(base), wait(test));
    Ok([b?, t?])
}

/// A connection-rate run.
#[derive(Clone, Copy, Debug)]
pub struct ConnRate {
    /// Connections per second completed within the run.
    pub rate: f64,
    /// Connections opened (completed or not): the denominator of the
    /// per-connection eBPF cost.
    pub opened: f64,
}

/// The connection-rate client against `port` of the server.
pub fn conn_rate(env: &Env, side: Side, port: u16, secs: f64) -> anyhow::Result<ConnRate> {
    let mut args = vec![
        "conn-rate".to_owned(),
        addr(side, port).to_string(),
        secs.to_string(),
    ];
    args.extend(cpu_args(env.placement.conn_client));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let line = env.client(side, &args)?;
    Ok(ConnRate {
        rate: field(&line, "value")?,
        opened: field(&line, "opened")?,
    })
}

/// A request/response latency run.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    /// Round trips made, warm-up included: the denominator of the
    /// per-round-trip eBPF cost.
    pub total: f64,
}

/// `verb` (`latency` or `udp-latency`) against `port` of the server.
pub fn latency(env: &Env, side: Side, verb: &str, port: u16, secs: f64) -> anyhow::Result<Latency> {
    let mut args = vec![
        verb.to_owned(),
        addr(side, port).to_string(),
        secs.to_string(),
    ];
    args.extend(cpu_args(env.placement.lat_client));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let line = env.client(side, &args)?;
    Ok(Latency {
        total: field(&line, "total")?,
    })
}

/// iperf3 against `world`'s iperf3 server; Gbit/s received.
fn iperf(
    env: &Env,
    world: World,
    side: Side,
    port: u16,
    streams: u32,
    secs: u32,
) -> anyhow::Result<f64> {
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
        match output(env.client_command_in(world, side, &args)) {
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
        .client_command(side, &[&agent, "first-connect", &target, "10"])
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

/// How long attaching with filler mappings may take.
const HOLD_TIMEOUT: Duration = Duration::from_secs(20);

/// Connection rate through `redirect` with `extra` filler mappings
/// installed besides the measured one.
pub fn conn_rate_with_mappings(env: &Env, extra: u32, d: Durations) -> anyhow::Result<f64> {
    let agent = env.bench_agent.display().to_string();
    let cgroup = env.cgroup.display().to_string();
    let mapping = format!("{}:{}", ECHO.0, ECHO.1);
    let extra_s = extra.to_string();
    let what = format!("attaching redirect with {} mappings", extra + 1);
    conn_rate_holding(
        env,
        &[&agent, "hold-mappings", &cgroup, &mapping, &extra_s],
        &what,
        d,
    )
}

/// Connection rate through `redirect` whose scope is one of `extra` + 1
/// scopes of one program set (the others on sibling cgroups).
pub fn conn_rate_with_scopes(env: &Env, extra: u32, d: Durations) -> anyhow::Result<f64> {
    let agent = env.bench_agent.display().to_string();
    let cgroup = env.cgroup.display().to_string();
    let parent = env
        .cgroup
        .parent()
        .context("the bench cgroup has a parent")?
        .display()
        .to_string();
    let mapping = format!("{}:{}", ECHO.0, ECHO.1);
    let extra_s = extra.to_string();
    let what = format!("attaching {} scopes", extra + 1);
    conn_rate_holding(
        env,
        &[&agent, "hold-scopes", &cgroup, &mapping, &extra_s, &parent],
        &what,
        d,
    )
}

/// Starts a `bench-agent hold-*` command, waits (bounded) for its
/// `ready`, measures the local connection rate, and lets it go.
fn conn_rate_holding(env: &Env, command: &[&str], what: &str, d: Durations) -> anyhow::Result<f64> {
    use std::io::{BufRead as _, BufReader};
    let mut holder = env
        .host_command(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", command[1]))?;
    // Bounded: attaching must not hang the run.
    let stdout = holder.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(HOLD_TIMEOUT) {
        Ok(line) if line.trim() == "ready" => {}
        other => {
            let _ = holder.kill();
            let _ = holder.wait();
            anyhow::bail!(
                "{what}: {}",
                match other {
                    Ok(line) => format!("{} said {line:?}", command[1]),
                    Err(_) => format!("not ready after {} s", HOLD_TIMEOUT.as_secs()),
                }
            );
        }
    }
    let result = conn_rate(env, Side::Local, ECHO.0, d.conn_secs).map(|c| c.rate);
    drop(holder.stdin.take());
    let _ = holder.wait();
    result
}
