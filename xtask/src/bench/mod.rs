//! `cargo xtask bench [--quick]`: every path measured side by side on this
//! machine, as ratios against the direct path measured in the same round.
//!
//! Method, built to stay readable on a small, shared VM:
//! - **Two worlds, clients in turns**: the bench builds two identical
//!   worlds (namespaces, cgroup, servers; `env.rs`). A path is set up in
//!   the test world only; while it runs, the direct path of the same side
//!   is measured in the base world at the same time, the two clients
//!   taking turns of 100 ms (`workloads::duel`). Each figure is divided by
//!   a reference taken in the same second: load that comes and goes
//!   (other builds) hits both alike.
//! - **Rounds**: each round visits every path once, in an order rotated
//!   and reversed from one round to the next, and the two worlds swap
//!   roles from one round to the next (`Env::swap_worlds`); the report gives the median
//!   of the per-round ratios and a trimmed range (the single best and
//!   worst round dropped from 5 rounds up), so a burst that hits one round
//!   is discarded.
//! - **A/A control**: a visit whose path is the test world's direct path;
//!   its ratios are the run's noise band, and a target whose margin is
//!   within it is reported as too noisy to judge.
//! - **Placement and priority**: servers and clients are pinned to fixed
//!   CPUs (`workloads::Placement`), and every process the bench starts
//!   runs in a scheduler autogroup of its own at a raised priority
//!   (`--nice`, default -10; `env::prioritize`), so compile jobs running
//!   beside it take less of its CPU.
//! - **eBPF cost**: a pass of its own with `bpf_stats` on (`bpfstats.rs`).
//! - **The proxy's memory**: once, after the rounds: RSS with 1,000 idle
//!   connections through `redirect run --backend proxy` and over a 60 s
//!   connection-rate run (`memory.rs`).
//!
//! Every load loop is bounded in time; all traffic stays in two network
//! namespaces the bench creates (see `env.rs`).
//!
//! Outputs: `target/bench/report.md`, `target/bench/ratios.png`.

mod bpfstats;
mod chart;
mod control;
mod env;
mod memory;
mod paths;
mod report;
mod workloads;

use std::{collections::BTreeMap, time::Instant};

use anyhow::Context as _;

use self::{
    env::{ECHO, Env, UDP},
    paths::BenchPath,
    report::{CostTable, Results},
    workloads::{Durations, Placement},
};
use crate::{cargo, is_root, status, toolchain};

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Options {
    /// A shorter run (under 2 minutes): 3 rounds, shorter loops, throughput
    /// in one round.
    #[arg(long)]
    quick: bool,
    /// Rounds (at least 3; default 7, or 3 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(3..))]
    rounds: Option<u32>,
    /// Nice value of the bench's processes (negative: ahead of builds
    /// running beside it; 0 to leave the priority alone).
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    nice: i32,
}

/// Filler mappings installed besides the measured one, for the
/// "connection rate with 1, 100 and 10,000 mappings" workload.
const MAPPING_COUNTS: [u32; 3] = [1, 100, 10_000];
/// Scopes of one program set for the scope-scale workload (issue 10:
/// through one of 1,000 against one of one).
const SCOPE_COUNTS: [u32; 2] = [1, 1_000];

pub fn run(opts: Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "the bench creates network namespaces and attaches eBPF programs: run it as root \
         (sudo -E cargo xtask bench)"
    );
    toolchain::ensure()?;
    toolchain::ensure_tools(&BENCH_TOOLS, "the bench")?;
    // At the lowest priority: this machine may be building other things.
    let nice_cargo = || {
        let mut c = std::process::Command::new("nice");
        c.args(["-n", "19"]).arg(cargo().get_program());
        c
    };
    // The binary users run (`cargo xtask run` builds the same).
    crate::run::build_release(nice_cargo())?;
    status(nice_cargo().args([
        "build",
        "--locked",
        "--release",
        "--package",
        "redirect-tests",
        "--bin",
        "bench-agent",
    ]))?;
    let target = crate::run::target_dir()?;
    let out_dir = target.join("bench");
    std::fs::create_dir_all(&out_dir)?;

    let (durations, rounds, tput_rounds) = if opts.quick {
        let d = Durations {
            iperf_secs: 1,
            conn_secs: 0.6,
            lat_secs: 0.3,
        };
        (d, opts.rounds.unwrap_or(3) as usize, 1)
    } else {
        // Long enough for the A/A control to fit a 3 % band: this VM's
        // connection rate moves by ±5–25 % from one 100 ms turn to the
        // next, and a visit averages 40 turns per side (docs/BENCHMARKS.md,
        // "Where the connection-rate A/A noise comes from"); 1 s of
        // turns left a 13–17 % band.
        let d = Durations {
            iperf_secs: 1,
            conn_secs: 4.0,
            lat_secs: 1.5,
        };
        (d, opts.rounds.unwrap_or(7) as usize, 3)
    };
    let load_start = loadavg();
    eprintln!("xtask: bench: load average {}", load_start.trim());
    let started = Instant::now();
    let placement = Placement::for_this_machine();
    let env = Env::new(
        target.join("release/bench-agent"),
        target.join("release/redirect"),
        out_dir.clone(),
        placement,
        opts.nice,
    )?;
    let paths = paths::all();
    let mut results = Results::new(&paths, rounds, tput_rounds, opts.quick, durations);
    results.load_start = load_start;
    results.placement = placement.describe();
    results.nice = opts.nice;
    let mut env = env;
    measure_all(&mut env, &paths, &mut results)?;
    measure_costs(&env, &paths, durations, &mut results);
    measure_proxy_memory(&env, opts.quick, &mut results);
    drop(env);

    results.load_end = loadavg();
    results.machine = machine();
    results.elapsed_secs = started.elapsed().as_secs_f64();
    let report = report::markdown(&results);
    let report_path = out_dir.join("report.md");
    std::fs::write(&report_path, &report)?;
    let chart_path = out_dir.join("ratios.png");
    chart::draw(&results, &chart_path).context("drawing the chart")?;
    println!("{report}");
    println!(
        "xtask: wrote {} and {}",
        report_path.display(),
        chart_path.display()
    );
    Ok(())
}

/// The Debian packages the bench runs, keyed by the binary it needs.
const BENCH_TOOLS: [(&str, &str); 9] = [
    ("iperf3", "iperf3"),
    ("socat", "socat"),
    ("haproxy", "haproxy"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    // Removes the iptables nat table after the iptables paths (paths.rs).
    ("nft", "nftables"),
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    // Not a binary: the chart's font (see chart.rs).
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
];

fn measure_all(
    env: &mut Env,
    paths: &[Box<dyn BenchPath>],
    results: &mut Results,
) -> anyhow::Result<()> {
    let d = results.durations;
    let mut available = Vec::new();
    for p in paths {
        match p.unavailable(env) {
            None => available.push(p.as_ref()),
            Some(why) => {
                eprintln!("xtask: bench: skipping {}: {why}", p.name());
                results.skipped.push((p.name(), why));
            }
        }
    }
    let visited: Vec<&dyn BenchPath> = available
        .iter()
        .copied()
        .filter(|p| !p.is_direct())
        .collect();
    let n = visited.len();
    for round in 0..results.reps {
        // A different order each round: rotated, and reversed on odd ones,
        // so no path always runs first or right after another.
        let mut order: Vec<usize> = (0..n).collect();
        order.rotate_left((round * 3) % n);
        if round % 2 == 1 {
            order.reverse();
        }
        let throughput = round < results.tput_reps;
        if round > 0 {
            env.swap_worlds();
        }
        let env: &Env = env;
        for i in order {
            let path = visited[i];
            let direct = available
                .iter()
                .copied()
                .find(|p| p.is_direct() && p.side() == path.side())
                .context("no direct path for this side")?;
            eprintln!(
                "xtask: bench round {}/{}: {}",
                round + 1,
                results.reps,
                path.name()
            );
            if results.skipped.iter().any(|(n, _)| *n == path.name()) {
                continue;
            }
            env.forget_time_wait();
            results.load.push(load1());
            // A path that fails to start (a bug in what it runs, say) is
            // dropped from the rest of the run with the reason in the
            // report, instead of ending the run.
            let started = if path.dials_to() {
                path.start(env)
            } else {
                workloads::setup_ms(env, path).map(|(ms, guard)| {
                    results.push_setup(path.name(), ms);
                    guard
                })
            };
            let guard = match started {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("xtask: bench: {} failed to start: {e:#}", path.name());
                    results
                        .skipped
                        .push((path.name(), format!("failed to start: {e:#}")));
                    continue;
                }
            };
            // Alternate who starts each duel, by round and by path.
            let base_first = (round + i) % 2 == 0;
            let measured = workloads::measure(env, path, d, throughput, base_first)
                .with_context(|| format!("measuring {}", path.name()))?;
            drop(guard);
            let show = |f: &BTreeMap<workloads::Metric, f64>| {
                f.iter()
                    .map(|(m, v)| format!("{m:?}={v:.1}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            eprintln!(
                "xtask: bench   reference {}\nxtask: bench   path      {}",
                show(&measured.reference),
                show(&measured.figures)
            );
            results.push_visit(
                round,
                path.name(),
                direct.name(),
                &measured.reference,
                &measured.figures,
            );
        }

        if throughput {
            eprintln!(
                "xtask: bench round {}/{}: mappings",
                round + 1,
                results.reps
            );
            // Failures here become notes in the report: the ratios are
            // the main result.
            let mut counts = MAPPING_COUNTS;
            counts.rotate_left(round % MAPPING_COUNTS.len());
            let mut rates = BTreeMap::new();
            for count in counts {
                match workloads::conn_rate_with_mappings(env, count - 1, d) {
                    Ok(rate) => {
                        rates.insert(count, rate);
                    }
                    Err(e) => results.notes.push(format!("round {}: {e:#}", round + 1)),
                }
            }
            results.push_scale(&rates);
            let mut counts = SCOPE_COUNTS;
            counts.rotate_left(round % SCOPE_COUNTS.len());
            let mut rates = BTreeMap::new();
            for count in counts {
                match workloads::conn_rate_with_scopes(env, count - 1, d) {
                    Ok(rate) => {
                        rates.insert(count, rate);
                    }
                    Err(e) => results.notes.push(format!("round {}: {e:#}", round + 1)),
                }
            }
            results.push_scope_scale(&rates);
            for w in control::all() {
                match w.run(env) {
                    Ok(figures) => {
                        for (name, us) in figures {
                            results.control.entry(name).or_default().push(us);
                        }
                    }
                    Err(e) => results.notes.push(format!("round {}: {e:#}", round + 1)),
                }
            }
        }
    }
    Ok(())
}

/// The per-program eBPF cost pass: every path whose cost is eBPF programs,
/// with statistics on. Failures become notes in the report, not errors:
/// the ratios are the main result.
fn measure_costs(env: &Env, paths: &[Box<dyn BenchPath>], d: Durations, results: &mut Results) {
    let before = bpfstats::sysctl_value();
    let stats = match bpfstats::enable_stats() {
        Ok(s) => s,
        Err(e) => {
            results.cost_notes.push(format!("no cost table: {e:#}"));
            return;
        }
    };
    let during = bpfstats::sysctl_value();
    for path in paths.iter().filter(|p| p.ebpf()) {
        if results.skipped.iter().any(|(n, _)| *n == path.name()) {
            continue;
        }
        eprintln!("xtask: bench: eBPF cost of {}", path.name());
        match cost_tables(env, path.as_ref(), d) {
            Ok(tables) => results.costs.extend(tables),
            Err(e) => results
                .cost_notes
                .push(format!("{}: no cost table: {e:#}", path.name())),
        }
    }
    drop(stats);
    results.cost_notes.push(format!(
        "The sysctl `kernel.bpf_stats_enabled` read {before} before this pass, {during} during \
         it and {} after it: `BPF_ENABLE_STATS` turns the accounting on without writing the \
         sysctl, and nothing is left to restore if the bench is killed.",
        bpfstats::sysctl_value()
    ));
}

fn cost_tables(env: &Env, path: &dyn BenchPath, d: Durations) -> anyhow::Result<Vec<CostTable>> {
    let guard = path.start(env)?;
    let progs = bpfstats::attached(&env.cgroup, Some(&env.srv_netns_path()))?;
    anyhow::ensure!(
        !progs.is_empty(),
        "no program attached to {} or the server namespace",
        env.cgroup.display()
    );
    let side = path.side();
    let mut tables = Vec::new();
    let before = bpfstats::snapshot(&progs)?;
    let c = workloads::conn_rate(env, side, ECHO.0, d.conn_secs)?;
    let after = bpfstats::snapshot(&progs)?;
    tables.push(CostTable {
        path: path.name(),
        unit: "connection",
        units: c.opened,
        rows: bpfstats::costs(&progs, &before, &after, c.opened),
    });
    if path.udp() {
        let before = bpfstats::snapshot(&progs)?;
        let l = workloads::latency(env, side, "udp-latency", UDP.0, d.lat_secs)?;
        let after = bpfstats::snapshot(&progs)?;
        tables.push(CostTable {
            path: path.name(),
            unit: "UDP round trip",
            units: l.total,
            rows: bpfstats::costs(&progs, &before, &after, l.total),
        });
    }
    drop(guard);
    Ok(tables)
}

/// The fallback proxy's memory, once (see `memory.rs`): 60 s of
/// connection rate, 6 s with `--quick`. A failure becomes a note.
fn measure_proxy_memory(env: &Env, quick: bool, results: &mut Results) {
    if results.skipped.iter().any(|(n, _)| *n == "redirect-proxy") {
        return;
    }
    let secs = if quick { 6.0 } else { 60.0 };
    results.memory_secs = secs;
    eprintln!("xtask: bench: the proxy's memory ({secs} s)");
    match memory::measure(env, secs) {
        Ok(figures) => {
            for (name, kib) in figures {
                results.control.entry(name).or_default().push(kib);
            }
        }
        Err(e) => results.notes.push(format!("the proxy's memory: {e:#}")),
    }
}

/// /proc/loadavg as it reads.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
}

/// The 1-minute load average.
fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Kernel, cores and CPU model of this machine.
fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("Linux {}, {cores} cores, {model}", kernel.trim())
}
