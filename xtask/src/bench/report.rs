//! Results, their statistics, the markdown report and the targets.

use std::collections::BTreeMap;

use super::{
    MAPPING_COUNTS, SCOPE_COUNTS,
    bpfstats::Cost,
    paths::BenchPath,
    workloads::{Durations, Metric},
};

/// One path as the report sees it.
#[derive(Clone, Debug)]
pub struct PathInfo {
    /// Its name.
    pub name: &'static str,
    /// Whether it is its side's direct path.
    pub is_direct: bool,
}

/// Everything measured.
#[derive(Debug, Default)]
pub struct Results {
    /// The paths, in registry order.
    pub paths: Vec<PathInfo>,
    /// Rounds (every path visited once per round).
    pub reps: usize,
    /// Rounds that also measured throughput and the mapping workloads.
    pub tput_reps: usize,
    /// `--quick`.
    pub quick: bool,
    /// Loop lengths.
    pub durations: Durations,
    /// Every round's ratios to direct, by path and metric.
    pub rounds: Vec<BTreeMap<(&'static str, Metric), f64>>,
    /// Paths not measured, and why.
    pub skipped: Vec<(&'static str, String)>,
    /// 1-minute load average, sampled before every path's measurement.
    pub load: Vec<f64>,
    /// /proc/loadavg at the start and at the end.
    pub load_start: String,
    /// See `load_start`.
    pub load_end: String,
    /// CPU placement, as text.
    pub placement: String,
    /// Nice value the bench ran at.
    pub nice: i32,
    /// Per-program eBPF cost tables.
    pub costs: Vec<CostTable>,
    /// Why the cost tables are missing or partial, if they are.
    pub cost_notes: Vec<String>,
    /// Workloads that failed (and were left out), with the reason.
    pub notes: Vec<String>,
    /// Control-plane timings (µs) per round, by workload name; also the
    /// proxy's memory figures (KiB, see `memory.rs`).
    pub control: BTreeMap<&'static str, Vec<f64>>,
    /// The length of the proxy memory measurement's connection-rate run
    /// (s).
    pub memory_secs: f64,
    /// Absolute figures per repetition.
    pub values: BTreeMap<(&'static str, Metric), Vec<f64>>,
    /// Ratios against the same side's direct path, per repetition.
    pub ratios: BTreeMap<(&'static str, Metric), Vec<f64>>,
    /// Setup time (ms) per repetition.
    pub setup_ms: BTreeMap<&'static str, Vec<f64>>,
    /// Connection rate with N mappings, absolute, per repetition.
    pub scale: BTreeMap<u32, Vec<f64>>,
    /// Connection rate with N mappings over that with 1, per repetition.
    pub scale_ratios: BTreeMap<u32, Vec<f64>>,
    /// Connection rate through one of N scopes of one program set,
    /// absolute, per repetition.
    pub scope_scale: BTreeMap<u32, Vec<f64>>,
    /// The same over that with 1 scope, per repetition.
    pub scope_scale_ratios: BTreeMap<u32, Vec<f64>>,
    /// Kernel, cores, CPU.
    pub machine: String,
    /// Wall-clock time of the whole run.
    pub elapsed_secs: f64,
}

impl Results {
    pub fn new(
        paths: &[Box<dyn BenchPath>],
        reps: usize,
        tput_reps: usize,
        quick: bool,
        d: Durations,
    ) -> Self {
        Results {
            paths: paths
                .iter()
                .map(|p| PathInfo {
                    name: p.name(),
                    is_direct: p.is_direct(),
                })
                .collect(),
            reps,
            tput_reps,
            quick,
            durations: d,
            ..Results::default()
        }
    }

    pub fn push_setup(&mut self, path: &'static str, ms: f64) {
        self.setup_ms.entry(path).or_default().push(ms);
    }

    /// Records one visit of `path`: its figures and those of its side's
    /// direct path measured just before it (the reference), and their
    /// ratios, under round `round`.
    pub fn push_visit(
        &mut self,
        round: usize,
        path: &'static str,
        direct: &'static str,
        reference: &BTreeMap<Metric, f64>,
        figures: &BTreeMap<Metric, f64>,
    ) {
        while self.rounds.len() <= round {
            self.rounds.push(BTreeMap::new());
        }
        for (m, v) in reference {
            self.values.entry((direct, *m)).or_default().push(*v);
        }
        for (m, v) in figures {
            self.values.entry((path, *m)).or_default().push(*v);
            if let Some(r) = reference.get(m).filter(|r| **r > 0.0) {
                self.ratios.entry((path, *m)).or_default().push(v / r);
                self.rounds[round].insert((path, *m), v / r);
            }
        }
    }

    pub fn push_scale(&mut self, rates: &BTreeMap<u32, f64>) {
        let base = rates.get(&MAPPING_COUNTS[0]).copied().unwrap_or(0.0);
        for (count, rate) in rates {
            self.scale.entry(*count).or_default().push(*rate);
            if base > 0.0 {
                self.scale_ratios
                    .entry(*count)
                    .or_default()
                    .push(rate / base);
            }
        }
    }

    pub fn push_scope_scale(&mut self, rates: &BTreeMap<u32, f64>) {
        let base = rates.get(&SCOPE_COUNTS[0]).copied().unwrap_or(0.0);
        for (count, rate) in rates {
            self.scope_scale.entry(*count).or_default().push(*rate);
            if base > 0.0 {
                self.scope_scale_ratios
                    .entry(*count)
                    .or_default()
                    .push(rate / base);
            }
        }
    }

    /// Median and trimmed range of `path`'s ratios to direct on `metric`.
    pub fn ratio(&self, path: &str, metric: Metric) -> Option<Stat> {
        self.ratios
            .iter()
            .find(|((p, m), _)| *p == path && *m == metric)
            .map(|(_, v)| Stat::of(v))
    }

    /// Median of `path`'s absolute figures on `metric`.
    pub fn value(&self, path: &str, metric: Metric) -> Option<Stat> {
        self.values
            .iter()
            .find(|((p, m), _)| *p == path && *m == metric)
            .map(|(_, v)| Stat::of(v))
    }

    /// `a ÷ b` on `metric` (each first divided by its own direct
    /// reference), per round where both were measured.
    pub fn cross(&self, a: &str, b: &str, metric: Metric) -> Option<Stat> {
        let v: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|r| {
                let x = r.iter().find(|((p, m), _)| *p == a && *m == metric)?.1;
                let y = r.iter().find(|((p, m), _)| *p == b && *m == metric)?.1;
                (*y > 0.0).then(|| x / y)
            })
            .collect();
        (!v.is_empty()).then(|| Stat::of(&v))
    }

    /// The noise band of `metric`: how far from 1.0 the A/A control's
    /// ratios reach (trimmed), e.g. 0.02 for 0.985–1.020.
    pub fn noise(&self, metric: Metric) -> Option<f64> {
        let aa = self.ratio(AA, metric)?;
        Some((aa.max - 1.0).abs().max((1.0 - aa.min).abs()))
    }
}

/// The A/A control path's name.
pub const AA: &str = "direct (A/A)";

/// One per-program cost table: what redirect's programs cost per unit of
/// work (a connection, a round trip) on one path.
#[derive(Clone, Debug)]
pub struct CostTable {
    /// The path measured.
    pub path: &'static str,
    /// The unit: "connection", "UDP round trip".
    pub unit: &'static str,
    /// Units of work done while measuring.
    pub units: f64,
    /// One row per attached program.
    pub rows: Vec<Cost>,
}

impl CostTable {
    /// The sum over programs of ns per run × runs per unit.
    pub fn total_ns(&self) -> f64 {
        self.rows.iter().map(Cost::ns_per_unit).sum()
    }
}

/// Median and trimmed range of a sample.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Smallest, once the single lowest is dropped (from 5 samples up).
    pub min: f64,
    /// Largest, once the single highest is dropped (from 5 samples up).
    pub max: f64,
    /// Samples.
    pub n: usize,
}

/// Samples from which the range drops its lowest and highest value: one
/// round hit by a burst of someone else's work should not set the spread.
pub const TRIM_FROM: usize = 5;

impl Stat {
    pub fn of(v: &[f64]) -> Stat {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = median_sorted(&s);
        if n >= TRIM_FROM {
            s = s[1..n - 1].to_vec();
        }
        Stat {
            median,
            min: s.first().copied().unwrap_or(f64::NAN),
            max: s.last().copied().unwrap_or(f64::NAN),
            n,
        }
    }

    /// Trimmed max − min, as a fraction (0.03 = 3 %).
    pub fn spread(self) -> f64 {
        self.max - self.min
    }

    fn ratio_cell(self) -> String {
        format!("{:.3} ({:.3}–{:.3})", self.median, self.min, self.max)
    }
}

fn median_sorted(s: &[f64]) -> f64 {
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// A figure with a sensible number of digits.
fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A target's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Met, by more than the noise.
    Pass,
    /// Missed, by more than the noise.
    FallShort,
    /// The measured figure is closer to the target than the A/A control's
    /// spread: this run cannot tell.
    TooNoisy,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::FallShort => "FALL SHORT",
            Verdict::TooNoisy => "TOO NOISY TO JUDGE",
        }
    }
}

/// One target the report checks.
pub struct Target {
    /// What is checked, with the measured figure.
    pub text: String,
    /// The outcome.
    pub verdict: Verdict,
}

/// Judges `value` against `limit` (`at_least`: value ≥ limit, otherwise
/// value ≤ limit), calling it too noisy when the margin is within `noise`
/// (a fraction of the limit; `None` when the figure has no noise band).
fn judge(value: f64, limit: f64, at_least: bool, noise: Option<f64>) -> Verdict {
    let pass = if at_least {
        value >= limit
    } else {
        value <= limit
    };
    match noise {
        Some(n) if (value - limit).abs() <= n * limit => Verdict::TooNoisy,
        _ if pass => Verdict::Pass,
        _ => Verdict::FallShort,
    }
}

fn noise_note(noise: Option<f64>) -> String {
    noise.map_or(String::new(), |n| {
        format!("; A/A noise ±{:.1} %", n * 100.0)
    })
}

/// The targets of the issues, checked against the medians.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    // The bench's own precision (issue 11).
    if let Some(d) = r.value("direct", Metric::ConnRate) {
        out.push(Target {
            text: format!(
                "direct connection rate ≥ 40,000/s (the load generator measures the path, \
                 not itself): {:.0}/s",
                d.median
            ),
            verdict: judge(d.median, 40_000.0, true, None),
        });
    }
    for m in [Metric::ConnRate, Metric::LatP50, Metric::UdpP50] {
        if let Some(aa) = r.ratio(AA, m) {
            out.push(Target {
                text: format!(
                    "A/A spread of {} ≤ 3 %: {:.1} % ({:.3}–{:.3}, trimmed, {} rounds)",
                    m.label(),
                    aa.spread() * 100.0,
                    aa.min,
                    aa.max,
                    aa.n
                ),
                verdict: judge(aa.spread(), 0.03, false, None),
            });
        }
    }
    // The datapath (issue 11).
    let mut ratio_target = |path: &str, what: &str, metric: Metric, limit: f64| {
        if let Some(s) = r.ratio(path, metric) {
            let noise = r.noise(metric);
            let at_least = metric.higher_is_better();
            out.push(Target {
                text: format!(
                    "{path} {} {} {limit:.2}× direct: {:.3}× ({:.3}–{:.3}){}",
                    what,
                    if at_least { "≥" } else { "≤" },
                    s.median,
                    s.min,
                    s.max,
                    noise_note(noise)
                ),
                verdict: judge(s.median, limit, at_least, noise),
            });
        }
    };
    ratio_target("redirect", "connection rate", Metric::ConnRate, 0.98);
    ratio_target("redirect-in", "connection rate", Metric::ConnRate, 0.98);
    ratio_target("redirect", "UDP p50", Metric::UdpP50, 1.02);
    ratio_target("redirect", "throughput (1 stream)", Metric::Tput1, 0.98);
    for t in &r.costs {
        if t.unit == "connection" {
            out.push(Target {
                text: format!(
                    "{}: eBPF cost per connection ≤ 300 ns (bpf_stats): {:.0} ns",
                    t.path,
                    t.total_ns()
                ),
                verdict: judge(t.total_ns(), 300.0, false, None),
            });
        }
    }
    if let (Some(ebpf), Some(ipt)) = (
        r.ratio("redirect", Metric::ConnRate),
        r.ratio("iptables", Metric::ConnRate),
    ) {
        out.push(Target {
            text: format!(
                "redirect connection rate ahead of iptables REDIRECT: {:.3}× vs {:.3}× direct",
                ebpf.median, ipt.median
            ),
            verdict: judge(ebpf.median, ipt.median, true, r.noise(Metric::ConnRate)),
        });
    }
    // The fallback proxy (issue 12), against the userspace proxies of the
    // same rounds.
    let proxy = "redirect-proxy";
    for (other, metric, limit) in [
        ("haproxy", Metric::ConnRate, 1.15),
        ("socat", Metric::ConnRate, 3.0),
        ("haproxy", Metric::Tput1, 1.0),
        ("haproxy", Metric::Tput4, 1.0),
        ("haproxy", Metric::LatP50, 1.0),
    ] {
        if let Some(s) = r.cross(proxy, other, metric) {
            let at_least = metric.higher_is_better();
            let noise = r.noise(metric);
            out.push(Target {
                text: format!(
                    "{proxy} {} {} {limit:.2}× {other}'s: {:.3}× ({:.3}–{:.3}){}",
                    metric.label(),
                    if at_least { "≥" } else { "≤" },
                    s.median,
                    s.min,
                    s.max,
                    noise_note(noise)
                ),
                verdict: judge(s.median, limit, at_least, noise),
            });
        }
    }
    // Control plane (issue 10 and earlier).
    if let Some(v) = r.setup_ms.get("redirect") {
        let s = Stat::of(v);
        out.push(Target {
            text: format!("redirect setup ≤ 50 ms: {:.1} ms", s.median),
            verdict: judge(s.median, 50.0, false, None),
        });
    }
    if let Some(v) = r.control.get(ADD_MAPPING) {
        let s = Stat::of(v);
        out.push(Target {
            text: format!(
                "adding a mapping at run time ≤ 100 µs: {:.1} µs (p50)",
                s.median
            ),
            verdict: judge(s.median, 100.0, false, None),
        });
    }
    for (name, limit, what) in [
        (
            "attach a scope (p50)",
            2000.0,
            "attaching a scope to a loaded program set ≤ 2 ms (library; the daemon adds its socket)",
        ),
        (
            "add a mapping to a live scope (p50)",
            100.0,
            "adding a mapping to a live scope ≤ 100 µs (library)",
        ),
    ] {
        if let Some(v) = r.control.get(name) {
            let s = Stat::of(v);
            out.push(Target {
                text: format!("{what}: {} µs (p50)", num(s.median)),
                verdict: judge(s.median, limit, false, None),
            });
        }
    }
    if let Some(v) = r.scope_scale_ratios.get(&SCOPE_COUNTS[1]) {
        let s = Stat::of(v);
        out.push(Target {
            text: format!(
                "connection rate through one of {} scopes ≥ 0.98× that with 1: {:.3}×{}",
                SCOPE_COUNTS[1],
                s.median,
                noise_note(r.noise(Metric::ConnRate))
            ),
            verdict: judge(s.median, 0.98, true, r.noise(Metric::ConnRate)),
        });
    }
    // The daemon and the OCI hook (issues 10 and 13).
    for (name, limit, what) in [
        (
            DAEMON_COLD,
            40_000.0,
            "daemon cold start (load + one scope) ≤ 40 ms",
        ),
        (
            DAEMON_SCOPE,
            2_000.0,
            "adding a scope to a running daemon ≤ 2 ms (p50, control socket)",
        ),
        (
            DAEMON_ADD,
            100.0,
            "adding a mapping to a running daemon ≤ 100 µs (p50, in a control session)",
        ),
        (
            HOOK_CREATE,
            5_000.0,
            "time the OCI hook adds to a container's creation ≤ 5 ms (p50)",
        ),
    ] {
        if let Some(v) = r.control.get(name) {
            let s = Stat::of(v);
            out.push(Target {
                text: format!("{what}: {} µs", num(s.median)),
                verdict: judge(s.median, limit, false, None),
            });
        }
    }
    if let Some(v) = r.control.get(DAEMON_RSS) {
        let s = Stat::of(v);
        out.push(Target {
            text: format!("daemon RSS with 100 scopes ≤ 8 MiB: {} KiB", num(s.median)),
            verdict: judge(s.median, 8192.0, false, None),
        });
    }
    if let (Some(before), Some(after)) = (
        r.control.get(HOOK_RSS_BEFORE),
        r.control.get(HOOK_RSS_AFTER),
    ) {
        let (b, a) = (Stat::of(before).median, Stat::of(after).median);
        out.push(Target {
            text: format!(
                "100 containers leave the daemon's RSS where it started (within 5 %): {} → {} KiB",
                num(b),
                num(a)
            ),
            verdict: judge(a, b * 1.05, false, None),
        });
    }
    if let Some(v) = r.control.get(PROXY_HWM) {
        let s = Stat::of(v);
        let idle = r
            .control
            .get(PROXY_RSS_IDLE)
            .map_or(f64::NAN, |v| Stat::of(v).median);
        out.push(Target {
            text: format!(
                "redirect-proxy peak RSS ≤ 20 MiB with 1,000 idle connections open: {} KiB \
                 (with them open: {} KiB)",
                num(s.max),
                num(idle)
            ),
            verdict: judge(s.max, 20_480.0, false, None),
        });
    }
    if let (Some(warm), Some(end)) = (r.control.get(PROXY_RSS_WARM), r.control.get(PROXY_RSS_END)) {
        let (w, e) = (Stat::of(warm).median, Stat::of(end).median);
        out.push(Target {
            text: format!(
                "redirect-proxy RSS does not grow over a {:.0} s connection-rate run (within 5 %): \
                 {} → {} KiB",
                r.memory_secs,
                num(w),
                num(e)
            ),
            verdict: judge(e, w * 1.05, false, None),
        });
    }
    if let (Some(before), Some(after)) = (
        r.control.get(HOOK_LINKS_BEFORE),
        r.control.get(HOOK_LINKS_AFTER),
    ) {
        let (b, a) = (Stat::of(before).max, Stat::of(after).max);
        out.push(Target {
            text: format!(
                "100 containers leave the number of pinned links where it started: {b:.0} → {a:.0}"
            ),
            verdict: judge(a, b, false, None),
        });
    }
    if let Some(v) = r.scale_ratios.get(&MAPPING_COUNTS[2]) {
        let s = Stat::of(v);
        out.push(Target {
            text: format!(
                "connection rate with {} mappings ≥ 0.98× that with 1: {:.3}×{}",
                MAPPING_COUNTS[2],
                s.median,
                noise_note(r.noise(Metric::ConnRate))
            ),
            verdict: judge(s.median, 0.98, true, r.noise(Metric::ConnRate)),
        });
    }
    out
}

/// Control-plane figures of the daemon workload (`control::Daemon`).
pub const DAEMON_COLD: &str = "daemon: cold start, load + one scope (µs)";
/// See [`DAEMON_COLD`].
pub const DAEMON_SCOPE: &str = "daemon: add a scope via the control socket (p50, µs)";
/// See [`DAEMON_COLD`].
pub const DAEMON_ADD: &str = "daemon: add a mapping in a control session (p50, µs)";
/// See [`DAEMON_COLD`].
pub const DAEMON_RSS: &str = "daemon: RSS with 101 scopes (KiB)";
/// See [`DAEMON_COLD`].
pub const HOOK_CREATE: &str = "oci-hook createRuntime, start to exit (p50, µs)";
/// See [`DAEMON_COLD`].
pub const HOOK_RSS_BEFORE: &str = "daemon: RSS before 100 containers (KiB)";
/// See [`DAEMON_COLD`].
pub const HOOK_RSS_AFTER: &str = "daemon: RSS after 100 containers (KiB)";
/// See [`DAEMON_COLD`].
pub const HOOK_LINKS_BEFORE: &str = "daemon: pinned links before 100 containers";
/// See [`DAEMON_COLD`].
pub const HOOK_LINKS_AFTER: &str = "daemon: pinned links after 100 containers";

/// Name of the control-plane timing of `Redirector::insert`.
pub const ADD_MAPPING: &str = "add a mapping (p50)";
/// The proxy's RSS with [`memory::IDLE_CONNS`](super::memory::IDLE_CONNS)
/// idle connections open.
pub const PROXY_RSS_IDLE: &str = "redirect-proxy: RSS with 1,000 idle connections (KiB)";
/// The proxy's RSS 5 s into the long connection-rate run.
pub const PROXY_RSS_WARM: &str = "redirect-proxy: RSS 5 s into the connection-rate run (KiB)";
/// The proxy's RSS at the end of the long connection-rate run.
pub const PROXY_RSS_END: &str = "redirect-proxy: RSS at the end of the connection-rate run (KiB)";
/// The proxy's peak RSS over the whole measurement (VmHWM, or a larger
/// sample).
pub const PROXY_HWM: &str = "redirect-proxy: peak RSS (KiB)";

/// The markdown report.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let d = r.durations;
    let date = chrono_free_date();
    s += &format!("# redirect benchmark, {date}\n\n");
    s += &format!("- Machine: {}\n", r.machine);
    s += &format!(
        "- Mode: {} ({} rounds; connection rate {} s, latency {} s per visit; throughput \
         (iperf3, {} s) and the mapping workloads in {} of the rounds); whole run {:.0} s\n",
        if r.quick { "--quick" } else { "full" },
        r.reps,
        d.conn_secs,
        d.lat_secs,
        d.iperf_secs,
        r.tput_reps,
        r.elapsed_secs
    );
    let load = Stat::of(&r.load);
    s += &format!(
        "- Load: /proc/loadavg `{}` at the start, `{}` at the end; 1-minute load before each \
         measurement: median {:.2} (range {:.2}–{:.2}, trimmed). Bench processes ran at nice {}.\n",
        r.load_start.trim(),
        r.load_end.trim(),
        load.median,
        load.min,
        load.max,
        r.nice
    );
    s += &format!("- Placement: {}.\n", r.placement);
    s += "- Local clients talk over loopback in a namespace of the bench's own; inbound \
          clients come from a second namespace over a veth pair. Clients dial 443/444/53 \
          (8443/8444/5353 for the direct paths).\n";
    for (path, why) in &r.skipped {
        s += &format!("- **Skipped** `{path}`: {why}\n");
    }
    for note in &r.notes {
        s += &format!("- **Failed, left out**: {note}\n");
    }

    s += "\n## Direct path, absolute (median over every reference measurement, base world)\n\n";
    s += "| workload | direct (local) | direct-in (inbound) |\n|---|---|---|\n";
    for m in Metric::ALL {
        let cell = |path: &str| {
            r.value(path, m)
                .map_or("–".into(), |v| format!("{} {}", num(v.median), m.unit()))
        };
        s += &format!(
            "| {} | {} | {} |\n",
            m.label(),
            cell("direct"),
            cell("direct-in")
        );
    }

    s += "\n## Ratios against the direct path measured at the same time\n\n";
    s += "Median (trimmed min–max) over rounds of path ÷ direct of the same side. The path \
          is set up in the bench's test world while the direct path is measured in an \
          identical, untouched base world, the two clients taking turns of 100 ms, so each \
          ratio compares figures taken in the same second (iperf3 runs one after the \
          other). For throughput and connection rate higher is better \
          (1.000 = as fast as direct); for latency the ratio is also path ÷ direct, so \
          lower is better (1.000 = no added latency). – means the path does not carry that \
          traffic (HAProxy has no UDP) or the workload is not run inbound. The range drops \
          each row's single lowest and highest round when there are 5 rounds or more.\n\n";
    s += "`direct (A/A)` is a visit like the others whose \"path\" is the test world's \
          direct path: its spread around 1.000 is the noise floor of this run, against which \
          the other rows should be read.\n\n";
    s += "| path |";
    for m in Metric::ALL {
        s += &format!(" {} |", m.label());
    }
    s += "\n|---|";
    s += &"---|".repeat(Metric::ALL.len());
    s += "\n";
    for p in r.paths.iter().filter(|p| !p.is_direct) {
        if r.skipped.iter().any(|(n, _)| *n == p.name) {
            continue;
        }
        s += &format!("| {} |", p.name);
        for m in Metric::ALL {
            let cell = r.ratio(p.name, m).map_or("–".into(), Stat::ratio_cell);
            s += &format!(" {cell} |");
        }
        s += "\n";
    }
    s += "| **A/A spread** (trimmed max − min) |";
    for m in Metric::ALL {
        let cell = r
            .ratio(AA, m)
            .map_or("–".into(), |a| format!("{:.1} %", a.spread() * 100.0));
        s += &format!(" {cell} |");
    }
    s += "\n";

    s += "\n## What redirect's eBPF programs cost (bpf_stats)\n\n";
    s += "Measured in a pass of its own after the rounds, with `kernel.bpf_stats_enabled` \
          switched on only for that pass (`BPF_ENABLE_STATS`; the kernel restores the \
          previous setting when the bench exits). Every program attached to the bench's \
          cgroup and, for the inbound path, the server namespace's sk_lookup programs. \
          Local clients and the servers are in the scope, so a local connection's \
          programs run on both of its ends; inbound clients are not (they stand for \
          other hosts). ns per run is `run_time_ns / run_cnt` over the workload; \
          runs per unit is `run_cnt` over the connections (or round trips) the client \
          made. The kernel's accounting leaves out work done outside the program's run \
          (a socket-storage allocation freed by RCU at close, LRU bookkeeping): judge \
          changes by the connection rate, with this as the second view.\n\n";
    for note in &r.cost_notes {
        s += &format!("- {note}\n");
    }
    for t in &r.costs {
        s += &format!(
            "\n**{}**, per {} ({:.0} {}s):\n\n| hook | program | runs | ns per run | runs per {} | \
             ns per {} |\n|---|---|---|---|---|---|\n",
            t.path, t.unit, t.units, t.unit, t.unit, t.unit
        );
        for c in &t.rows {
            s += &format!(
                "| {} | {} | {} | {:.0} | {:.2} | {:.0} |\n",
                c.prog.hook,
                c.prog.name,
                c.runs,
                c.ns_per_run,
                c.runs_per_unit,
                c.ns_per_unit()
            );
        }
        s += &format!("| **sum** | | | | | **{:.0}** |\n", t.total_ns());
    }

    s += "\n## Setup time\n\nFrom the start of the path's setup command to the first \
          request that reaches the server through it (ms, median (trimmed min–max)).\n\n";
    s += "| path | setup |\n|---|---|\n";
    for p in r.paths.iter().filter(|p| !p.is_direct) {
        if let Some(v) = r.setup_ms.get(p.name) {
            let st = Stat::of(v);
            s += &format!(
                "| {} | {:.1} ({:.1}–{:.1}) |\n",
                p.name, st.median, st.min, st.max
            );
        }
    }

    s += "\n## Control plane\n\nTimings of changing what is redirected, µs, median \
          (trimmed min–max) over the rounds that ran them (see \"Adding a control-plane \
          workload\" in docs/BENCHMARKS.md); in µs unless the name says otherwise.\n\n| workload | value |\n|---|---|\n";
    for (name, v) in &r.control {
        let st = Stat::of(v);
        s += &format!(
            "| {name} | {} ({}–{}) |\n",
            num(st.median),
            num(st.min),
            num(st.max)
        );
    }
    s += "\nConnection rate through redirect with N mappings installed (ratio to 1 mapping, \
          same round):\n\n| mappings | conn/s | ratio to 1 |\n|---|---|---|\n";
    for (count, v) in &r.scale {
        let ratio = r
            .scale_ratios
            .get(count)
            .map_or("–".into(), |v| Stat::of(v).ratio_cell());
        s += &format!("| {count} | {} | {ratio} |\n", num(Stat::of(v).median));
    }

    s += "\nConnection rate through redirect with its scope one of N scopes of one loaded \
          program set (ratio to 1 scope, same round):\n\n| scopes | conn/s | ratio to 1 |\n|---|---|---|\n";
    for (count, v) in &r.scope_scale {
        let ratio = r
            .scope_scale_ratios
            .get(count)
            .map_or("–".into(), |v| Stat::of(v).ratio_cell());
        s += &format!("| {count} | {} | {ratio} |\n", num(Stat::of(v).median));
    }

    s += "\n## Targets\n\nA target whose margin is within the A/A control's noise band \
          (how far the control's trimmed ratios reach from 1.000) is reported as too noisy \
          to judge rather than passed or failed.\n\n";
    for t in targets(r) {
        s += &format!("- **{}** {}\n", t.verdict.label(), t.text);
    }
    s += "\nThe chart (`ratios.png`) shows the median ratios with trimmed min–max bars.\n";
    s
}

/// Today's date (UTC) as YYYY-MM-DD, without a date crate.
fn chrono_free_date() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[1.0, 2.0, 3.0, 4.0]).median, 2.5);
    }

    #[test]
    fn range_is_trimmed_from_five_samples() {
        let s = Stat::of(&[0.5, 1.0, 1.01, 0.99, 2.0]);
        assert_eq!((s.median, s.min, s.max), (1.0, 0.99, 1.01));
        assert!((s.spread() - 0.02).abs() < 1e-9);
    }

    #[test]
    fn verdict_within_noise_is_too_noisy() {
        assert_eq!(judge(0.97, 0.98, true, Some(0.02)), Verdict::TooNoisy);
        assert_eq!(judge(0.93, 0.98, true, Some(0.02)), Verdict::FallShort);
        assert_eq!(judge(0.995, 0.98, true, Some(0.01)), Verdict::Pass);
        assert_eq!(judge(250.0, 300.0, false, None), Verdict::Pass);
    }
}
