//! How many TCP connections are open through each mapping, read on demand.
//!
//! Counting them in the datapath cost a sock_ops program on every TCP
//! callback of every socket of the scope (8 runs per connection, ~376 ns)
//! plus a per-socket record to know which sockets were redirected. Asked
//! for far less often than connections are made, the number is now read
//! when `status` or metrics ask: the established TCP sockets of the
//! scope's processes (`/proc/PID/fd`, `/proc/PID/net/tcp{,6}` once per
//! network namespace) whose peer is a mapping's TO (and its address, when
//! the mapping has one). A client of the scope that dials TO directly is
//! counted too; that is rare and the count is documented as such.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use redirect_common::ADDR_ANY;

use super::{
    listeners::{parse_proc_addr, scope_pids},
    programs::table_key,
};
use crate::{Mapping, MappingSet, Proto};

/// `TCP_ESTABLISHED` in `/proc/net/tcp`.
const ESTABLISHED: &str = "01";

/// Open connections from the scope's processes to each TCP mapping's TO.
pub fn count(cgroup: &Path, mappings: &MappingSet) -> HashMap<Mapping, u64> {
    let tcp: Vec<Mapping> = mappings.iter().filter(|m| m.proto != Proto::Udp).collect();
    let mut counts = HashMap::new();
    if tcp.is_empty() {
        return counts;
    }
    let mut inodes = HashSet::new();
    let mut namespaces: HashMap<u64, i32> = HashMap::new();
    for pid in scope_pids(cgroup) {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in fds.flatten() {
            if let Some(inode) = fs::read_link(entry.path()).ok().and_then(|t| {
                t.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            }) {
                inodes.insert(inode);
            }
        }
        if let Ok(ns) = fs::metadata(format!("/proc/{pid}/ns/net")) {
            namespaces.entry(ns.ino()).or_insert(pid);
        }
    }
    for pid in namespaces.values() {
        for table in ["tcp", "tcp6"] {
            let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (Some(remote), Some(state), Some(inode)) = (f.get(2), f.get(3), f.get(9))
                else {
                    continue;
                };
                if *state != ESTABLISHED || !inode.parse::<u64>().is_ok_and(|i| inodes.contains(&i))
                {
                    continue;
                }
                let Some((addr, port)) = remote.rsplit_once(':') else {
                    continue;
                };
                let (Some((_, addr)), Ok(port)) =
                    (parse_proc_addr(addr), u16::from_str_radix(port, 16))
                else {
                    continue;
                };
                for m in tcp.iter().filter(|m| m.to == port) {
                    let want = table_key(0, m).addr;
                    if want == ADDR_ANY || want == addr {
                        *counts.entry(*m).or_insert(0) += 1;
                    }
                }
            }
        }
    }
    counts
}
