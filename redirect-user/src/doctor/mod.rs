//! `redirect doctor`: what works on this host, and what to do about the
//! rest. Each probe is a small function returning [`Check`] rows; the
//! [`Report`] is data (serialised as is for `--json`), and the text table
//! is rendering left to the caller.
//!
//! On Linux the eBPF hooks are not guessed from the kernel version: each
//! program of the embedded object is loaded and attached to a throwaway
//! child cgroup (sk_lookup to a throwaway network namespace) and removed
//! again ([`hooks`]). Sockets are read from `/proc/net` ([`sockets`]).

#[cfg(with_ebpf)]
pub mod hooks;
#[cfg(target_os = "linux")]
pub mod sockets;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use serde::Serialize;

use crate::mapping::{MappingSet, Proto};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Works.
    Ok,
    /// Works, with something worth knowing.
    Warn,
    /// Does not work.
    Fail,
    /// Information only.
    Info,
}

impl Status {
    /// "ok", "warn", "FAIL", "info".
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Info => "info",
        }
    }
}

/// One row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked ("kernel", "hook connect4", "map 443:8443 TO").
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do when it is not ok (empty otherwise).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Check {
    /// A row.
    pub fn new(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    /// The same row with what to do.
    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = fix.into();
        self
    }
}

/// Whether a backend can run here, and why not.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// It can run.
    pub can_run: bool,
    /// Why (or why not), in one sentence.
    pub why: String,
}

/// Everything `doctor` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `linux`, `macos`, `windows`…
    pub os: &'static str,
    /// Every check, in order.
    pub checks: Vec<Check>,
    /// The eBPF backend.
    pub ebpf: Verdict,
    /// The proxy backend.
    pub proxy: Verdict,
}

impl Report {
    /// Whether `backend` ("auto", "ebpf", "proxy") can run.
    pub fn can_run(&self, backend: &str) -> bool {
        match backend {
            "ebpf" => self.ebpf.can_run,
            "proxy" => self.proxy.can_run,
            _ => self.ebpf.can_run || self.proxy.can_run,
        }
    }
}

/// Runs every check, for `mappings` (possibly empty).
pub fn diagnose(mappings: &MappingSet) -> Report {
    let mut checks = Vec::new();
    #[cfg(target_os = "linux")]
    let ebpf = linux::checks(mappings, &mut checks);
    #[cfg(not(target_os = "linux"))]
    let ebpf = Verdict {
        can_run: false,
        why: format!(
            "eBPF redirection exists only on Linux; this is {}",
            std::env::consts::OS
        ),
    };
    let proxy = proxy_checks(mappings, &mut checks);
    Report {
        os: std::env::consts::OS,
        checks,
        ebpf,
        proxy,
    }
}

/// Can the proxy listen on every FROM? Tries to bind each (and closes it
/// at once): the only test that accounts for privileges, sysctls,
/// sandboxes and sockets already there.
fn proxy_checks(mappings: &MappingSet, checks: &mut Vec<Check>) -> Verdict {
    if mappings.is_empty() {
        checks.push(Check::new(
            "proxy",
            Status::Info,
            "give --map FROM:TO to check that the proxy can listen on FROM",
        ));
        return Verdict {
            can_run: true,
            why: "no --map given: nothing to bind".into(),
        };
    }
    let mut failed = Vec::new();
    for m in mappings.iter() {
        let addr = SocketAddr::new(m.addr.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), m.from);
        for (proto, name) in [(Proto::Tcp, "tcp"), (Proto::Udp, "udp")] {
            if m.proto != Proto::Any && m.proto != proto {
                continue;
            }
            let res = if proto == Proto::Tcp {
                std::net::TcpListener::bind(addr).map(drop)
            } else {
                std::net::UdpSocket::bind(addr).map(drop)
            };
            let row = format!("proxy bind {name} {addr}");
            match res {
                Ok(()) => checks.push(Check::new(row, Status::Ok, "the proxy can listen on FROM")),
                Err(e) => {
                    let hint = crate::proxy::bind_hint(addr, &e);
                    failed.push(format!("{name} {addr}: {e}"));
                    checks.push(
                        Check::new(row, Status::Fail, e.to_string())
                            .fix(hint.trim_start_matches("; ").to_owned()),
                    );
                }
            }
        }
    }
    if failed.is_empty() {
        Verdict {
            can_run: true,
            why: "every FROM can be bound".into(),
        }
    } else {
        Verdict {
            can_run: false,
            why: format!("cannot bind {}", failed.join(", ")),
        }
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::{fs, path::Path, process::Command};

    use super::{Check, Status, Verdict};
    use crate::mapping::MappingSet;

    /// (capability, bit) that matter to redirect.
    const CAPS: [(&str, u32); 5] = [
        ("CAP_NET_BIND_SERVICE", 10),
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_PERFMON", 38),
        ("CAP_BPF", 39),
    ];

    /// The Linux checks; returns whether the eBPF backend can run.
    pub(super) fn checks(mappings: &MappingSet, checks: &mut Vec<Check>) -> Verdict {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let version = kernel_version(&release);
        let kernel_ok = version >= (5, 9);
        checks.push(if kernel_ok {
            Check::new("kernel", Status::Ok, format!("Linux {release}"))
        } else {
            Check::new(
                "kernel",
                Status::Fail,
                format!("Linux {release}; eBPF redirection needs >= 5.9"),
            )
            .fix("upgrade the kernel, or use --backend proxy")
        });

        let bpf = bpf_syscall();
        checks.push(match &bpf {
            Ok(()) => Check::new("bpf syscall", Status::Ok, "present"),
            Err(why) => Check::new("bpf syscall", Status::Fail, why.clone())
                .fix("a kernel built with CONFIG_BPF_SYSCALL=y, and no seccomp filter blocking bpf(2) (containers: --privileged or a seccomp profile allowing it); or --backend proxy"),
        });

        let cgroup = crate::cgroup::cgroup2_mount().ok().flatten();
        checks.push(match &cgroup {
            Some(path) => Check::new(
                "cgroup v2",
                Status::Ok,
                format!("mounted at {}", path.display()),
            ),
            None => Check::new(
                "cgroup v2",
                Status::Warn,
                "not mounted; `redirect run` mounts it at /sys/fs/cgroup/unified",
            )
            .fix(
                "mount -t cgroup2 none /sys/fs/cgroup/unified (redirect does this itself as root)",
            ),
        });

        checks.push(match mount_of_type("bpf") {
            Some(path) => Check::new("bpffs", Status::Ok, format!("mounted at {path}")),
            None => Check::new(
                "bpffs",
                Status::Info,
                "not mounted (only the daemon's pinned state needs it)",
            )
            .fix("mount -t bpf bpf /sys/fs/bpf"),
        });

        let eff = effective_caps();
        let held: Vec<&str> = CAPS
            .iter()
            .filter(|(_, bit)| eff & (1 << bit) != 0)
            .map(|(n, _)| *n)
            .collect();
        let has = |name: &str| held.contains(&name);
        let bpf_caps = (has("CAP_BPF") || has("CAP_SYS_ADMIN")) && has("CAP_NET_ADMIN");
        checks.push(if bpf_caps {
            Check::new("capabilities", Status::Ok, format!("held: {}", held.join(", ")))
        } else {
            let missing: Vec<&str> = ["CAP_BPF", "CAP_NET_ADMIN"].into_iter().filter(|c| !has(c)).collect();
            Check::new(
                "capabilities",
                Status::Fail,
                format!("missing {} (held: {})", missing.join(", "), if held.is_empty() { "none".into() } else { held.join(", ") }),
            )
            .fix("run as root (sudo), or grant CAP_BPF and CAP_NET_ADMIN (systemd AmbientCapabilities=, `setcap cap_bpf,cap_net_admin+ep`); or --backend proxy")
        });

        let hooks_ok = hook_checks(bpf_caps && bpf.is_ok() && cgroup.is_some(), checks);

        let start = fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(start) = start {
            let low: Vec<u16> = mappings
                .iter()
                .map(|m| m.from)
                .filter(|p| u32::from(*p) < start)
                .collect();
            let row = Check::new(
                "ip_unprivileged_port_start",
                Status::Info,
                format!(
                    "{start} (in this network namespace): ports below it need CAP_NET_BIND_SERVICE to bind"
                ),
            );
            checks.push(if low.is_empty() || has("CAP_NET_BIND_SERVICE") {
                row
            } else {
                let first = low[0];
                Check {
                    status: Status::Warn,
                    ..row
                }
                .fix(format!(
                    "the proxy backend cannot bind FROM {low:?} without CAP_NET_BIND_SERVICE: \
                     `sysctl net.ipv4.ip_unprivileged_port_start={first}` (per network namespace), \
                     `setcap cap_net_bind_service=+ep`, or the eBPF backend"
                ))
            });
        }

        firewall_checks(mappings, checks);
        super::sockets::map_checks(mappings, checks);

        let can_run = kernel_ok && bpf.is_ok() && bpf_caps && hooks_ok;
        Verdict {
            can_run,
            why: if can_run {
                "every hook loads and attaches".into()
            } else if !bpf_caps {
                "missing CAP_BPF/CAP_NET_ADMIN".into()
            } else if !kernel_ok {
                format!("kernel {release} is older than 5.9")
            } else if bpf.is_err() {
                "no bpf(2)".into()
            } else {
                "a hook does not load or attach (see above)".into()
            },
        }
    }

    #[cfg(with_ebpf)]
    fn hook_checks(possible: bool, checks: &mut Vec<Check>) -> bool {
        if !possible {
            checks.push(Check::new(
                "hooks",
                Status::Fail,
                "not tried: no privileges, no bpf(2) or no cgroup v2 (see above)",
            ));
            return false;
        }
        let results = super::hooks::try_all();
        let mut all = true;
        for r in results {
            let name = format!("hook {}", r.program);
            checks.push(match r.result {
                Ok(detail) => Check::new(name, Status::Ok, detail),
                Err(e) => {
                    all &= !r.required_for_connect;
                    Check::new(
                        name,
                        if r.required_for_connect {
                            Status::Fail
                        } else {
                            Status::Warn
                        },
                        e,
                    )
                    .fix(format!(
                        "{} needs Linux >= {}: {}",
                        r.hook, r.min_kernel, r.used_for
                    ))
                }
            });
        }
        all
    }

    #[cfg(not(with_ebpf))]
    fn hook_checks(_possible: bool, checks: &mut Vec<Check>) -> bool {
        checks.push(
            Check::new(
                "hooks",
                Status::Fail,
                "this build has no eBPF backend (built without the `ebpf` feature)",
            )
            .fix("use --backend proxy, or a build with the default features"),
        );
        false
    }

    /// (major, minor) of "6.18.0-1-amd64".
    pub(super) fn kernel_version(release: &str) -> (u32, u32) {
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty());
        let major = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let minor = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        (major, minor)
    }

    /// Whether bpf(2) exists: an invalid command gets EINVAL from a kernel
    /// that has it, ENOSYS without, EPERM under a seccomp filter.
    fn bpf_syscall() -> Result<(), String> {
        // SAFETY: command -1 is rejected before any pointer is read.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, -1i64, std::ptr::null::<u8>(), 0u32) };
        let err = std::io::Error::last_os_error();
        match (rc, err.raw_os_error()) {
            (_, Some(libc::EINVAL)) => Ok(()),
            (_, Some(libc::ENOSYS)) => {
                Err("bpf(2) is not implemented by this kernel (ENOSYS)".into())
            }
            (_, Some(libc::EPERM)) => Err(
                "bpf(2) is blocked (EPERM: seccomp, or a container without the capability)".into(),
            ),
            (rc, _) => Err(format!("unexpected answer to bpf(-1): {rc}, {err}")),
        }
    }

    /// The mount point of the first file system of `fstype`.
    fn mount_of_type(fstype: &str) -> Option<String> {
        let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
        info.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == fstype)
                .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
        })
    }

    fn effective_caps() -> u64 {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .unwrap_or(0)
    }

    /// iptables and nftables rules that mention a mapped port (they would
    /// redirect or drop the same traffic first).
    fn firewall_checks(mappings: &MappingSet, checks: &mut Vec<Check>) {
        if mappings.is_empty() {
            return;
        }
        let mut ports: Vec<u16> = mappings.iter().flat_map(|m| [m.from, m.to]).collect();
        ports.sort_unstable();
        ports.dedup();
        let mut found = Vec::new();
        let mut looked = Vec::new();
        for (tool, args) in [
            ("nft", &["list", "ruleset"][..]),
            ("iptables-save", &[][..]),
            ("ip6tables-save", &[][..]),
        ] {
            let Some(path) = ["/usr/sbin", "/sbin", "/usr/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.exists())
            else {
                continue;
            };
            let Ok(out) = Command::new(path).args(args).output() else {
                continue;
            };
            if !out.status.success() {
                continue;
            }
            looked.push(tool);
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if ports.iter().any(|p| mentions_port(line, *p)) {
                    found.push(format!("{tool}: {}", line.trim()));
                }
            }
        }
        if looked.is_empty() {
            checks.push(Check::new(
                "firewall rules",
                Status::Info,
                "neither nft nor iptables-save is installed: not checked",
            ));
        } else if found.is_empty() {
            checks.push(Check::new(
                "firewall rules",
                Status::Ok,
                format!("no rule of {} mentions {ports:?}", looked.join(", ")),
            ));
        } else {
            checks.push(
                Check::new("firewall rules", Status::Warn, found.join("; "))
                    .fix("these rules see the same traffic (a REDIRECT/DNAT of FROM wins over eBPF for remote clients; a DROP of TO breaks both backends): check they are intended"),
            );
        }
    }

    /// Whether a firewall rule line names `port` as a port (`dport 443`,
    /// `--dport 443`, `--to-ports 443`, `:443`, `443,` …).
    pub(super) fn mentions_port(line: &str, port: u16) -> bool {
        let p = port.to_string();
        let names_port = line
            .split(|c: char| c.is_whitespace() || matches!(c, ',' | '{' | '}'))
            .any(|w| {
                w == p
                    || w.strip_suffix(&p).is_some_and(|rest| rest.ends_with(':'))
                    || w.strip_prefix(&p)
                        .is_some_and(|rest| rest.starts_with([':', '-']))
            });
        names_port
            && ["port", "dpt", "to-ports", "redirect"]
                .iter()
                .any(|k| line.contains(k))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::{kernel_version, mentions_port};

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), (6, 18));
        assert_eq!(kernel_version("5.4.0"), (5, 4));
    }

    #[test]
    fn firewall_lines() {
        assert!(mentions_port(
            "-A OUTPUT -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 8443",
            443
        ));
        assert!(mentions_port("tcp dport 443 redirect to :8443", 8443));
        assert!(!mentions_port(
            "-A INPUT -p tcp --dport 4430 -j ACCEPT",
            443
        ));
        assert!(!mentions_port("counter packets 443 bytes 1000", 443));
    }
}
