//! `cargo xtask bench [--quick]`: every path measured side by side on this
//! machine, as ratios against the direct path measured in the same run.
//!
//! Method: each repetition runs every path once, in an order that changes
//! from one repetition to the next; each figure is divided by the direct
//! path's figure (same side) from the same repetition; the report gives the
//! median and min–max of those ratios, the direct path's absolute figures,
//! and the machine. Every load loop is bounded in time; all traffic stays in
//! two network namespaces the bench creates (see `env.rs`).
//!
//! Outputs: `target/bench/report.md`, `target/bench/ratios.png`.

mod chart;
mod env;
mod paths;
mod report;
mod workloads;

use std::{collections::BTreeMap, time::Instant};

use anyhow::Context as _;

use self::{
    env::Env,
    report::Results,
    workloads::{Durations, Metric},
};
use crate::{cargo, is_root, status, toolchain};

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Options {
    /// A shorter run (under 2 minutes): shorter loops, same repetitions.
    #[arg(long)]
    quick: bool,
    /// Repetitions (at least 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..))]
    reps: u32,
}

/// Filler mappings installed besides the measured one, for the
/// "connection rate with 1, 100 and 10,000 mappings" workload.
const MAPPING_COUNTS: [u32; 3] = [1, 100, 10_000];

pub fn run(opts: Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "the bench creates network namespaces and attaches eBPF programs: run it as root \
         (sudo -E cargo xtask bench)"
    );
    toolchain::ensure()?;
    toolchain::ensure_tools(&BENCH_TOOLS, "the bench")?;
    status(cargo().args([
        "build",
        "--locked",
        "--release",
        "--package",
        "redirect-user",
        "--bin",
        "redirect",
        "--package",
        "redirect-tests",
        "--bin",
        "bench-agent",
    ]))?;
    let target = crate::run::target_dir()?;
    let out_dir = target.join("bench");
    std::fs::create_dir_all(&out_dir)?;

    let durations = if opts.quick {
        Durations {
            iperf_secs: 1,
            loop_secs: 0.5,
        }
    } else {
        Durations {
            iperf_secs: 3,
            loop_secs: 2.0,
        }
    };
    let started = Instant::now();
    let env = Env::new(
        target.join("release/bench-agent"),
        target.join("release/redirect"),
        out_dir.clone(),
    )?;
    let results = measure_all(&env, &opts, durations)?;
    drop(env);

    let mut results = results;
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
const BENCH_TOOLS: [(&str, &str); 8] = [
    ("iperf3", "iperf3"),
    ("socat", "socat"),
    ("haproxy", "haproxy"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    // Not a binary: the chart's font (see chart.rs).
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
];

fn measure_all(env: &Env, opts: &Options, d: Durations) -> anyhow::Result<Results> {
    let paths = paths::all();
    let mut results = Results::new(&paths, opts.reps as usize, opts.quick, d);
    let n = paths.len();
    for rep in 0..opts.reps as usize {
        // A different order each repetition: rotated, and reversed on odd
        // ones, so no path always runs first or right after another.
        let mut order: Vec<usize> = (0..n).collect();
        order.rotate_left(rep % n);
        if rep % 2 == 1 {
            order.reverse();
        }
        let mut figures: BTreeMap<(&'static str, Metric), f64> = BTreeMap::new();
        for i in order {
            let path = paths[i].as_ref();
            eprintln!("xtask: bench {}/{}: {}", rep + 1, opts.reps, path.name());
            let guard = if path.dials_to() {
                path.start(env)?
            } else {
                let (ms, guard) = workloads::setup_ms(env, path)?;
                results.push_setup(path.name(), ms);
                guard
            };
            let measured = workloads::measure(env, path, d)
                .with_context(|| format!("measuring {}", path.name()))?;
            drop(guard);
            for (m, v) in measured {
                figures.insert((path.name(), m), v);
            }
        }
        results.push_rep(&paths, &figures);

        eprintln!("xtask: bench {}/{}: mappings", rep + 1, opts.reps);
        let mut counts = MAPPING_COUNTS;
        counts.rotate_left(rep % MAPPING_COUNTS.len());
        let mut rates = BTreeMap::new();
        for count in counts {
            rates.insert(
                count,
                workloads::conn_rate_with_mappings(env, count - 1, d)?,
            );
        }
        results.push_scale(&rates);
        results.push_add_mapping(workloads::add_mapping_us(env)?);
    }
    results.machine = machine();
    Ok(results)
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
