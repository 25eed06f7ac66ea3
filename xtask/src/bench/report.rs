//! Results, their statistics, the markdown report and the targets.

use std::collections::BTreeMap;

use super::{
    MAPPING_COUNTS,
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
    /// Repetitions.
    pub reps: usize,
    /// `--quick`.
    pub quick: bool,
    /// Loop lengths.
    pub iperf_secs: u32,
    /// Loop lengths.
    pub loop_secs: f64,
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
    /// Run-time insert of one mapping: (p50 µs, p99 µs) per repetition.
    pub add_mapping_us: Vec<(f64, f64)>,
    /// Kernel, cores, CPU.
    pub machine: String,
    /// Wall-clock time of the whole run.
    pub elapsed_secs: f64,
}

impl Results {
    pub fn new(paths: &[Box<dyn BenchPath>], reps: usize, quick: bool, d: Durations) -> Self {
        Results {
            paths: paths
                .iter()
                .map(|p| PathInfo {
                    name: p.name(),
                    is_direct: p.is_direct(),
                })
                .collect(),
            reps,
            quick,
            iperf_secs: d.iperf_secs,
            loop_secs: d.loop_secs,
            ..Results::default()
        }
    }

    pub fn push_setup(&mut self, path: &'static str, ms: f64) {
        self.setup_ms.entry(path).or_default().push(ms);
    }

    /// Records one repetition's figures and their ratios to direct.
    pub fn push_rep(
        &mut self,
        paths: &[Box<dyn BenchPath>],
        figures: &BTreeMap<(&'static str, Metric), f64>,
    ) {
        for ((path, metric), value) in figures {
            self.values.entry((path, *metric)).or_default().push(*value);
            let side = paths.iter().find(|p| p.name() == *path).map(|p| p.side());
            let direct = paths
                .iter()
                .find(|p| p.is_direct() && Some(p.side()) == side)
                .and_then(|d| figures.get(&(d.name(), *metric)));
            if let Some(direct) = direct
                && *direct > 0.0
            {
                self.ratios
                    .entry((path, *metric))
                    .or_default()
                    .push(value / direct);
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

    pub fn push_add_mapping(&mut self, us: (f64, f64)) {
        self.add_mapping_us.push(us);
    }

    /// Median ratio of `path` on `metric`.
    pub fn ratio(&self, path: &str, metric: Metric) -> Option<Stat> {
        self.ratios
            .iter()
            .find(|((p, m), _)| *p == path && *m == metric)
            .map(|(_, v)| Stat::of(v))
    }
}

/// Median and range of a sample.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Stat {
    pub fn of(v: &[f64]) -> Stat {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let median = if s.is_empty() {
            f64::NAN
        } else if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
        };
        Stat {
            median,
            min: s.first().copied().unwrap_or(f64::NAN),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn ratio_cell(self) -> String {
        format!("{:.3} ({:.3}–{:.3})", self.median, self.min, self.max)
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

/// One target the report checks: a description and whether it holds.
pub struct Target {
    /// What is checked, with the measured figure.
    pub text: String,
    /// Whether it holds.
    pub pass: bool,
}

/// The targets of the issue, checked against the medians.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let mut ratio_target = |metric: Metric, what: &str| {
        if let Some(s) = r.ratio("redirect", metric) {
            let noise = r.ratio("direct (A/A)", metric).map_or(String::new(), |a| {
                format!(" (A/A control: {:.3}, {:.3}–{:.3})", a.median, a.min, a.max)
            });
            out.push(Target {
                text: format!(
                    "redirect (eBPF, local) {what} ≥ 0.98× direct: {:.3}× ({:.3}–{:.3}){noise}",
                    s.median, s.min, s.max
                ),
                pass: s.median >= 0.98,
            });
        }
    };
    ratio_target(Metric::ConnRate, "connection rate");
    ratio_target(Metric::Tput1, "throughput (1 stream)");
    ratio_target(Metric::Tput4, "throughput (4 streams)");
    if let (Some(ebpf), Some(ipt)) = (
        r.ratio("redirect", Metric::ConnRate),
        r.ratio("iptables", Metric::ConnRate),
    ) {
        out.push(Target {
            text: format!(
                "redirect connection rate ahead of iptables REDIRECT: {:.3}× vs {:.3}× direct",
                ebpf.median, ipt.median
            ),
            pass: ebpf.median > ipt.median,
        });
    }
    for (metric, what) in [
        (Metric::ConnRate, "connection rate"),
        (Metric::Tput1, "throughput (1 stream)"),
    ] {
        if let Some(s) = r.ratio("redirect-in", metric) {
            let ipt = r.ratio("iptables-in", metric).map_or(String::new(), |i| {
                format!("; iptables PREROUTING: {:.3}×", i.median)
            });
            out.push(Target {
                text: format!(
                    "redirect inbound (sk_lookup) {what} ≥ 0.97× direct: {:.3}× ({:.3}–{:.3}){ipt}",
                    s.median, s.min, s.max
                ),
                pass: s.median >= 0.97,
            });
        }
    }
    if let Some(v) = r.setup_ms.get("redirect") {
        let s = Stat::of(v);
        out.push(Target {
            text: format!("redirect setup ≤ 50 ms: {:.1} ms", s.median),
            pass: s.median <= 50.0,
        });
    }
    if !r.add_mapping_us.is_empty() {
        let p50: Vec<f64> = r.add_mapping_us.iter().map(|(p50, _)| *p50).collect();
        let s = Stat::of(&p50);
        out.push(Target {
            text: format!(
                "adding a mapping at run time ≤ 1 ms: {:.1} µs (p50)",
                s.median
            ),
            pass: s.median <= 1000.0,
        });
    }
    if let Some(v) = r.scale_ratios.get(&MAPPING_COUNTS[2]) {
        let s = Stat::of(v);
        out.push(Target {
            text: format!(
                "connection rate with {} mappings ≥ 0.98× that with 1: {:.3}×",
                MAPPING_COUNTS[2], s.median
            ),
            pass: s.median >= 0.98,
        });
    }
    out
}

/// The markdown report.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let date = chrono_free_date();
    s += &format!("# redirect benchmark, {date}\n\n");
    s += &format!("- Machine: {}\n", r.machine);
    s += &format!(
        "- Mode: {} ({} repetitions; iperf3 runs of {} s, rate and latency loops of {} s); \
         whole run {:.0} s\n",
        if r.quick { "--quick" } else { "full" },
        r.reps,
        r.iperf_secs,
        r.loop_secs,
        r.elapsed_secs
    );
    s += "- Local clients talk over loopback in a namespace of the bench's own; inbound \
          clients come from a second namespace over a veth pair. Clients dial 443/444/53 \
          (8443/8444/5353 for the direct paths).\n\n";

    s += "## Direct path, absolute (median over repetitions)\n\n";
    s += "| workload | direct (local) | direct-in (inbound) |\n|---|---|---|\n";
    for m in Metric::ALL {
        let cell = |path: &str| {
            r.values
                .iter()
                .find(|((p, mm), _)| *p == path && *mm == m)
                .map_or("–".into(), |(_, v)| {
                    format!("{} {}", num(Stat::of(v).median), m.unit())
                })
        };
        s += &format!(
            "| {} | {} | {} |\n",
            m.label(),
            cell("direct"),
            cell("direct-in")
        );
    }

    s += "\n## Ratios against the direct path of the same run\n\n";
    s += "Median (min–max) over repetitions of path ÷ direct. For throughput and connection \
          rate higher is better (1.000 = as fast as direct); for latency the ratio is also \
          path ÷ direct, so lower is better (1.000 = no added latency). – means the path \
          does not carry that traffic (HAProxy has no UDP) or the workload is not run \
          inbound.\n\n";
    s += "`direct (A/A)` is the direct path measured a second time in each repetition: \
          its spread around 1.000 is this machine's noise floor, against which the other \
          rows should be read.\n\n";
    s += "| path |";
    for m in Metric::ALL {
        s += &format!(" {} |", m.label());
    }
    s += "\n|---|";
    s += &"---|".repeat(Metric::ALL.len());
    s += "\n";
    for p in r.paths.iter().filter(|p| !p.is_direct) {
        s += &format!("| {} |", p.name);
        for m in Metric::ALL {
            let cell = r.ratio(p.name, m).map_or("–".into(), Stat::ratio_cell);
            s += &format!(" {cell} |");
        }
        s += "\n";
    }

    s += "\n## Setup time\n\nFrom the start of the path's setup command to the first \
          request that reaches the server through it (ms, median (min–max)).\n\n";
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

    s += "\n## Changing mappings\n\n";
    if !r.add_mapping_us.is_empty() {
        let p50: Vec<f64> = r.add_mapping_us.iter().map(|(a, _)| *a).collect();
        let p99: Vec<f64> = r.add_mapping_us.iter().map(|(_, b)| *b).collect();
        s += &format!(
            "Adding one mapping to a live redirector (`Redirector::insert`, 200 inserts per \
             repetition): p50 {:.1} µs, p99 {:.1} µs (medians over repetitions).\n\n",
            Stat::of(&p50).median,
            Stat::of(&p99).median
        );
    }
    s += "Connection rate through redirect with N mappings installed (ratio to 1 mapping, \
          same repetition):\n\n| mappings | conn/s | ratio to 1 |\n|---|---|---|\n";
    for (count, v) in &r.scale {
        let ratio = r
            .scale_ratios
            .get(count)
            .map_or("–".into(), |v| Stat::of(v).ratio_cell());
        s += &format!("| {count} | {} | {ratio} |\n", num(Stat::of(v).median));
    }

    s += "\n## Targets\n\n";
    for t in targets(r) {
        s += &format!(
            "- **{}** {}\n",
            if t.pass { "PASS" } else { "FALL SHORT" },
            t.text
        );
    }
    s += "\nThe chart (`ratios.png`) shows the median ratios with min–max bars.\n";
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
}
