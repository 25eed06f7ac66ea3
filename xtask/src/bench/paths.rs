//! The paths a client's traffic can take to the server, measured side by
//! side.
//!
//! # Adding a path
//!
//! 1. Write a struct implementing [`BenchPath`]: its name, its [`Side`]
//!    (local clients over loopback, or inbound clients in the second
//!    namespace), whether it carries UDP, and `start`, which sets it up in
//!    the bench's namespaces and returns a guard that tears it down when
//!    dropped. Clients of a non-direct path dial the FROM ports (443, 444,
//!    53); the path must bring them to the TO ports (8443, 8444, 5353).
//! 2. Add it to [`all`]. Every workload then measures it, as a ratio
//!    against the direct path of the same side in the same repetition, and
//!    the report and chart pick it up.

use std::{
    any::Any,
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::env::{ECHO, Env, IPERF, Side, UDP, run};

/// One way for traffic to get from the client to the server.
pub trait BenchPath {
    /// Short name, used in the report and the chart.
    fn name(&self) -> &'static str;
    /// Where its clients are.
    fn side(&self) -> Side;
    /// Whether this is the direct path of its side, the one every ratio
    /// divides by.
    fn is_direct(&self) -> bool {
        false
    }
    /// Whether its clients dial the TO ports (no redirection involved).
    fn dials_to(&self) -> bool {
        self.is_direct()
    }
    /// Whether it carries UDP.
    fn udp(&self) -> bool {
        true
    }
    /// Why it cannot run here (a flag this `redirect` build lacks, say),
    /// or `None`. An unavailable path is skipped, and the report says why.
    fn unavailable(&self, _env: &Env) -> Option<String> {
        None
    }
    /// Whether its cost is eBPF programs attached to the bench's scope, so
    /// that the per-program cost table (`bpfstats.rs`) measures it.
    fn ebpf(&self) -> bool {
        false
    }
    /// Sets the path up; it lasts until the returned guard is dropped.
    fn start(&self, env: &Env) -> anyhow::Result<Box<dyn Any>>;
}

/// Every path, local ones first.
pub fn all() -> Vec<Box<dyn BenchPath>> {
    vec![
        Box::new(Direct(Side::Local)),
        Box::new(DirectAgain),
        Box::new(RedirectLocal),
        Box::new(Iptables(Side::Local)),
        Box::new(Socat),
        Box::new(Haproxy),
        Box::new(RedirectProxy),
        Box::new(Direct(Side::Remote)),
        Box::new(RedirectInbound),
        Box::new(Iptables(Side::Remote)),
    ]
}

/// Clients dial TO: the physical limit.
struct Direct(Side);

impl BenchPath for Direct {
    fn name(&self) -> &'static str {
        match self.0 {
            Side::Local => "direct",
            Side::Remote => "direct-in",
        }
    }
    fn side(&self) -> Side {
        self.0
    }
    fn is_direct(&self) -> bool {
        true
    }
    fn start(&self, _env: &Env) -> anyhow::Result<Box<dyn Any>> {
        Ok(Box::new(()))
    }
}

/// The direct path measured a second time, as if it were another path: an
/// A/A control whose spread around 1.0 is the noise floor of this machine.
struct DirectAgain;

impl BenchPath for DirectAgain {
    fn name(&self) -> &'static str {
        "direct (A/A)"
    }
    fn side(&self) -> Side {
        Side::Local
    }
    fn dials_to(&self) -> bool {
        true
    }
    fn start(&self, _env: &Env) -> anyhow::Result<Box<dyn Any>> {
        Ok(Box::new(()))
    }
}

/// `redirect run`: cgroup connect/sendmsg rewrite, for local clients.
struct RedirectLocal;

impl BenchPath for RedirectLocal {
    fn name(&self) -> &'static str {
        "redirect"
    }
    fn side(&self) -> Side {
        Side::Local
    }
    fn ebpf(&self) -> bool {
        true
    }
    fn start(&self, env: &Env) -> anyhow::Result<Box<dyn Any>> {
        let maps = [ECHO, IPERF, UDP].map(|(from, to)| format!("{from}:{to}"));
        start_redirect(env, &maps, &[])
    }
}

/// `redirect run --netns`: sk_lookup steering for clients in the other
/// namespace, to the (already running) servers, which it registers. TCP
/// only.
struct RedirectInbound;

impl BenchPath for RedirectInbound {
    fn name(&self) -> &'static str {
        "redirect-in"
    }
    fn side(&self) -> Side {
        Side::Remote
    }
    fn udp(&self) -> bool {
        false
    }
    fn ebpf(&self) -> bool {
        true
    }
    fn start(&self, env: &Env) -> anyhow::Result<Box<dyn Any>> {
        let maps = [ECHO, IPERF].map(|(from, to)| format!("{from}:{to}/tcp"));
        let netns = format!("/run/netns/{}", env.srv);
        start_redirect(env, &maps, &["--netns", &netns])
    }
}

/// `redirect run --backend proxy`: redirect's userspace fallback (issue
/// 12), for local clients. It runs inside the server namespace (it binds
/// FROM there, like socat and HAProxy) and needs no cgroup. Skipped, with
/// the reason in the report, when this `redirect` has no `--backend` flag.
struct RedirectProxy;

impl BenchPath for RedirectProxy {
    fn name(&self) -> &'static str {
        "redirect-proxy"
    }
    fn side(&self) -> Side {
        Side::Local
    }
    fn unavailable(&self, env: &Env) -> Option<String> {
        let redirect = env.redirect.display().to_string();
        // clap rejects an unknown flag before it prints the help.
        let out = env
            .host_command(&[&redirect, "run", "--backend", "proxy", "--help"])
            .output();
        match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "this `redirect` rejects `run --backend proxy` ({}); the path is measured once \
                 the proxy backend (issue 12) is merged",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("no message")
                    .trim()
            )),
            Err(e) => Some(format!("running {redirect}: {e}")),
        }
    }
    fn start(&self, env: &Env) -> anyhow::Result<Box<dyn Any>> {
        start_proxy(env, &[ECHO, IPERF, UDP]).map(|(_, guard)| guard)
    }
}

/// `redirect run --backend proxy` for `maps` (FROM, TO) in the server
/// namespace, once it listens: its pid (`ip netns exec` execs it) and a
/// guard that stops it.
pub fn start_proxy(env: &Env, maps_in: &[(u16, u16)]) -> anyhow::Result<(u32, Box<dyn Any>)> {
    let redirect = env.redirect.display().to_string();
    let maps: Vec<String> = maps_in
        .iter()
        .map(|(from, to)| format!("{from}:{to}"))
        .collect();
    let mut args = vec![redirect.as_str(), "run", "--backend", "proxy"];
    for m in &maps {
        args.extend(["--map", m]);
    }
    let mut child = env
        .command(Side::Local, false, &args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting redirect run --backend proxy")?;
    let pid = child.id();
    wait_ready(&mut child)?;
    let proc = Process(child);
    let tcp: Vec<u16> = maps_in
        .iter()
        .filter(|m| **m != UDP)
        .map(|(from, _)| *from)
        .collect();
    wait_listening(env, &tcp)?;
    Ok((pid, Box::new(proc)))
}

/// `redirect run --cgroup BENCH --map M… EXTRA…`, once it is ready.
fn start_redirect(env: &Env, maps: &[String], extra: &[&str]) -> anyhow::Result<Box<dyn Any>> {
    let redirect = env.redirect.display().to_string();
    let cgroup = env.cgroup.display().to_string();
    let mut args = vec![redirect.as_str(), "run", "--cgroup", &cgroup];
    args.extend_from_slice(extra);
    for m in maps {
        args.extend(["--map", m]);
    }
    let mut child = env
        .host_command(&args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting redirect run")?;
    wait_ready(&mut child)?;
    Ok(Box::new(Process(child)))
}

/// Waits (up to 10 s) for the `ready` line of `redirect run`.
fn wait_ready(child: &mut Child) -> anyhow::Result<()> {
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("redirect run never printed its ready line")
}

/// iptables `nat` REDIRECT: OUTPUT for local clients, PREROUTING for
/// inbound ones. Rules live in the bench's server namespace only.
struct Iptables(Side);

impl Iptables {
    fn chain(&self) -> [&'static str; 3] {
        match self.0 {
            Side::Local => ["OUTPUT", "-o", "lo"],
            Side::Remote => ["PREROUTING", "-i", "veth-srv"],
        }
    }
}

impl BenchPath for Iptables {
    fn name(&self) -> &'static str {
        match self.0 {
            Side::Local => "iptables",
            Side::Remote => "iptables-in",
        }
    }
    fn side(&self) -> Side {
        self.0
    }
    fn start(&self, env: &Env) -> anyhow::Result<Box<dyn Any>> {
        let [chain, dir, dev] = self.chain();
        for (proto, (from, to)) in [("tcp", ECHO), ("tcp", IPERF), ("udp", UDP)] {
            let (from, to) = (from.to_string(), to.to_string());
            env.in_srv(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                chain,
                dir,
                dev,
                "-p",
                proto,
                "--dport",
                &from,
                "-j",
                "REDIRECT",
                "--to-ports",
                &to,
            ])?;
        }
        Ok(Box::new(IptablesGuard {
            ns: env.srv.clone(),
            chain,
        }))
    }
}

struct IptablesGuard {
    ns: String,
    chain: &'static str,
}

impl Drop for IptablesGuard {
    fn drop(&mut self) {
        let _ = run(&[
            "ip", "netns", "exec", &self.ns, "iptables", "-t", "nat", "-F", self.chain,
        ]);
        // Delete the (now empty) nat table itself: while it exists, its
        // hooks keep conntrack running on every packet of the namespace,
        // which would slow every later path measured in the test world
        // (the base world never has it). iptables cannot delete a table;
        // with iptables-nft it is the nftables table `ip nat`.
        let _ = run(&[
            "ip", "netns", "exec", &self.ns, "nft", "delete", "table", "ip", "nat",
        ]);
        // Forget the NAT state too, so the next path starts clean.
        let _ = run(&["ip", "netns", "exec", &self.ns, "conntrack", "-F"]);
    }
}

/// socat: a userspace copy, one process per connection (`fork`).
struct Socat;

impl BenchPath for Socat {
    fn name(&self) -> &'static str {
        "socat"
    }
    fn side(&self) -> Side {
        Side::Local
    }
    fn start(&self, env: &Env) -> anyhow::Result<Box<dyn Any>> {
        let mut procs = Vec::new();
        for (listen, connect) in [
            (
                format!(
                    "TCP4-LISTEN:{},fork,reuseaddr,backlog=1024,bind=127.0.0.1",
                    ECHO.0
                ),
                format!("TCP4:127.0.0.1:{}", ECHO.1),
            ),
            (
                format!(
                    "TCP4-LISTEN:{},fork,reuseaddr,backlog=1024,bind=127.0.0.1",
                    IPERF.0
                ),
                format!("TCP4:127.0.0.1:{}", IPERF.1),
            ),
            (
                format!("UDP4-LISTEN:{},fork,reuseaddr,bind=127.0.0.1", UDP.0),
                format!("UDP4:127.0.0.1:{}", UDP.1),
            ),
        ] {
            procs.push(spawn_group(env, &["socat", "-T", "10", &listen, &connect])?);
        }
        wait_listening(env, &[ECHO.0, IPERF.0])?;
        Ok(Box::new(procs))
    }
}

/// HAProxy `mode tcp`: a userspace copy, event-driven. TCP only.
struct Haproxy;

impl BenchPath for Haproxy {
    fn name(&self) -> &'static str {
        "haproxy"
    }
    fn side(&self) -> Side {
        Side::Local
    }
    fn udp(&self) -> bool {
        false
    }
    fn start(&self, env: &Env) -> anyhow::Result<Box<dyn Any>> {
        let mut cfg = String::from(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 60s\n  timeout server 60s\n",
        );
        for (i, (from, to)) in [ECHO, IPERF].iter().enumerate() {
            cfg.push_str(&format!(
                "frontend f{i}\n  bind 127.0.0.1:{from}\n  default_backend b{i}\n\
                 backend b{i}\n  server s 127.0.0.1:{to}\n"
            ));
        }
        let path = env.write_file("haproxy.cfg", &cfg)?;
        let path = path.display().to_string();
        let proc = spawn_group(env, &["haproxy", "-db", "-f", &path])?;
        wait_listening(env, &[ECHO.0, IPERF.0])?;
        Ok(Box::new(proc))
    }
}

/// A process group we started; killed (the whole group) on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let pid = self.0.id() as libc::pid_t;
        // SAFETY: plain syscalls on our own child (and its group, which
        // `spawn_group` made it lead).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
            libc::killpg(pid, libc::SIGTERM);
        }
        let _ = self.0.wait();
        // SAFETY: as above; leftovers of the group, if any.
        unsafe { libc::killpg(pid, libc::SIGKILL) };
    }
}

/// Spawns `args` in the server namespace as the leader of a new process
/// group (every bench command is, see `env::prioritize`), so that its
/// forked children are stopped with it.
fn spawn_group(env: &Env, args: &[&str]) -> anyhow::Result<Process> {
    let child = env
        .command(Side::Local, false, args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {args:?}"))?;
    Ok(Process(child))
}

/// Waits (up to 10 s) until each of `ports` accepts on 127.0.0.1.
fn wait_listening(env: &Env, ports: &[u16]) -> anyhow::Result<()> {
    for port in ports {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = env
                .command(
                    Side::Local,
                    false,
                    &["bash", "-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")],
                )
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "nothing listens on :{port}");
            thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}
