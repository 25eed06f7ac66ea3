//! What each eBPF program attached to the bench's scope costs, from the
//! kernel's own accounting (`kernel.bpf_stats_enabled`).
//!
//! The programs are found by what is attached, not by name (names change):
//! every program attached directly to the bench's cgroup, for every cgroup
//! attach type, and every sk_lookup program of the server's namespace
//! (`BPF_PROG_QUERY`). For each, `BPF_OBJ_GET_INFO_BY_FD` gives `run_cnt`
//! and `run_time_ns`; the deltas over a workload give ns per run and, with
//! the number of connections (or round trips) the client made, runs per
//! connection.
//!
//! Statistics are switched on with `BPF_ENABLE_STATS`, which returns a file
//! descriptor: they stay on while it is open and the kernel restores the
//! previous state when it is closed, even if the bench is killed. They are
//! on only during this phase: the extra clock reads they cost would
//! otherwise be charged to the ratio rounds.
//!
//! xtask links no workspace crate (aya included), and neither rustix nor
//! nix wraps bpf(2): hence the raw syscalls, with the attribute layouts of
//! `include/uapi/linux/bpf.h` (offsets checked against the header).

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use anyhow::Context as _;

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;
const BPF_SK_LOOKUP: u32 = 36;
/// Attach types are small integers (44 in 6.1's header, a few more
/// since): query them all and keep what the kernel answers.
const MAX_ATTACH_TYPE: u32 = 64;

/// Size of the attribute buffer passed to bpf(2): larger than any kernel's
/// `union bpf_attr` needs for these commands, zero-filled (the kernel
/// accepts a larger, zero-tailed buffer).
const ATTR_WORDS: usize = 18;

fn bpf(cmd: libc::c_long, attr: &mut [u64; ATTR_WORDS]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable buffer of the size passed; the
    // commands used here read and write only within it and in the
    // buffers it points to, which the callers keep alive.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            size_of::<[u64; ATTR_WORDS]>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Keeps `kernel.bpf_stats_enabled` on while alive.
pub struct StatsEnabled(#[allow(dead_code)] OwnedFd);

/// Switches run-time statistics on until the returned guard is dropped.
pub fn enable_stats() -> anyhow::Result<StatsEnabled> {
    let mut attr = [0u64; ATTR_WORDS];
    attr[0] = u64::from(BPF_STATS_RUN_TIME);
    let fd = bpf(BPF_ENABLE_STATS, &mut attr)
        .context("bpf(BPF_ENABLE_STATS): needs Linux 5.8 and CAP_SYS_ADMIN")?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(StatsEnabled(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

/// The current value of the `kernel.bpf_stats_enabled` sysctl.
pub fn sysctl_value() -> String {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .map_or_else(|e| format!("unreadable ({e})"), |s| s.trim().to_owned())
}

/// One attached program.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prog {
    /// Where it is attached (`connect4`, `sock_ops`, `sk_lookup`…).
    pub hook: &'static str,
    /// Its name as the kernel knows it (at most 15 bytes).
    pub name: String,
    /// Its id.
    pub id: u32,
}

/// Counters of one program at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Times it ran.
    pub run_cnt: u64,
    /// Total time it ran, ns (counted only while statistics are on).
    pub run_time_ns: u64,
}

/// Every program attached to `cgroup` (directly) and, if given, to the
/// namespace `netns` (sk_lookup).
pub fn attached(cgroup: &Path, netns: Option<&Path>) -> anyhow::Result<Vec<Prog>> {
    let mut out = Vec::new();
    let cg = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    for attach_type in 0..MAX_ATTACH_TYPE {
        if attach_type == BPF_SK_LOOKUP {
            continue;
        }
        for id in query(cg.as_raw_fd(), attach_type).unwrap_or_default() {
            out.push(prog(id, hook_name(attach_type))?);
        }
    }
    if let Some(netns) = netns {
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let ids = query(ns.as_raw_fd(), BPF_SK_LOOKUP)
            .with_context(|| format!("BPF_PROG_QUERY sk_lookup on {}", netns.display()))?;
        for id in ids {
            out.push(prog(id, "sk_lookup")?);
        }
    }
    out.sort();
    Ok(out)
}

fn query(target_fd: RawFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = [0u64; ATTR_WORDS];
    // target_fd @0, attach_type @4, query_flags @8 (0: attached here, not
    // inherited), prog_ids @16, prog_cnt @24.
    attr[0] = u64::from(target_fd as u32) | (u64::from(attach_type) << 32);
    attr[2] = ids.as_mut_ptr() as u64;
    attr[3] = ids.len() as u64;
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let cnt = (attr[3] & 0xffff_ffff) as usize;
    Ok(ids[..cnt.min(ids.len())].to_vec())
}

fn prog_fd(id: u32) -> anyhow::Result<OwnedFd> {
    let mut attr = [0u64; ATTR_WORDS];
    attr[0] = u64::from(id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
        .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `struct bpf_prog_info` up to `run_cnt` (offsets from the uapi header).
fn info(id: u32) -> anyhow::Result<[u8; 232]> {
    let fd = prog_fd(id)?;
    let mut info = [0u8; 232];
    let mut attr = [0u64; ATTR_WORDS];
    // bpf_fd @0, info_len @4, info @8.
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD for program {id}"))?;
    Ok(info)
}

fn prog(id: u32, hook: &'static str) -> anyhow::Result<Prog> {
    let info = info(id)?;
    let name = &info[64..80];
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(Prog {
        hook,
        name: String::from_utf8_lossy(&name[..len]).into_owned(),
        id,
    })
}

/// The counters of every program in `progs` now.
pub fn snapshot(progs: &[Prog]) -> anyhow::Result<BTreeMap<u32, Counters>> {
    let u64_at = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap());
    progs
        .iter()
        .map(|p| {
            let info = info(p.id)?;
            Ok((
                p.id,
                Counters {
                    run_time_ns: u64_at(&info, 192),
                    run_cnt: u64_at(&info, 200),
                },
            ))
        })
        .collect()
}

/// One program's cost over a workload.
#[derive(Clone, Debug)]
pub struct Cost {
    /// Hook and name.
    pub prog: Prog,
    /// Runs during the workload.
    pub runs: u64,
    /// Mean ns per run.
    pub ns_per_run: f64,
    /// Runs per unit of work (connection, round trip).
    pub runs_per_unit: f64,
}

impl Cost {
    /// ns per unit of work.
    pub fn ns_per_unit(&self) -> f64 {
        self.ns_per_run * self.runs_per_unit
    }
}

/// Per-program cost between two snapshots, for `units` units of work.
pub fn costs(
    progs: &[Prog],
    before: &BTreeMap<u32, Counters>,
    after: &BTreeMap<u32, Counters>,
    units: f64,
) -> Vec<Cost> {
    progs
        .iter()
        .filter_map(|p| {
            let (b, a) = (before.get(&p.id)?, after.get(&p.id)?);
            let runs = a.run_cnt.saturating_sub(b.run_cnt);
            let ns = a.run_time_ns.saturating_sub(b.run_time_ns);
            Some(Cost {
                prog: p.clone(),
                runs,
                ns_per_run: if runs == 0 {
                    0.0
                } else {
                    ns as f64 / runs as f64
                },
                runs_per_unit: if units > 0.0 {
                    runs as f64 / units
                } else {
                    0.0
                },
            })
        })
        .collect()
}

/// The kernel's name for a cgroup attach type (`enum bpf_attach_type`),
/// shortened as bpftool prints it.
fn hook_name(t: u32) -> &'static str {
    match t {
        0 => "ingress",
        1 => "egress",
        2 => "sock_create",
        3 => "sock_ops",
        6 => "device",
        8 => "bind4",
        9 => "bind6",
        10 => "connect4",
        11 => "connect6",
        12 => "post_bind4",
        13 => "post_bind6",
        14 => "sendmsg4",
        15 => "sendmsg6",
        18 => "sysctl",
        19 => "recvmsg4",
        20 => "recvmsg6",
        21 => "getsockopt",
        22 => "setsockopt",
        29 => "getpeername4",
        30 => "getpeername6",
        31 => "getsockname4",
        32 => "getsockname6",
        34 => "sock_release",
        _ => "other",
    }
}
