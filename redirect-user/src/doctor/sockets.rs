//! Who listens on a port: `/proc/net/{tcp,tcp6,udp,udp6}` of this network
//! namespace, matched to processes through `/proc/PID/fd` socket inodes.

use std::{collections::HashMap, fs};

use super::{Check, Status};
use crate::mapping::{MappingSet, Proto};

/// A socket bound to a port.
#[derive(Clone, Debug)]
pub struct Bound {
    /// "tcp" or "udp".
    pub proto: &'static str,
    /// The local address, as text.
    pub addr: String,
    /// Owner uid.
    pub uid: u32,
    /// Socket inode.
    pub inode: u64,
}

/// Listening TCP sockets and bound UDP sockets on `port`.
pub fn bound_on(port: u16, proto: Proto) -> Vec<Bound> {
    let mut found = Vec::new();
    let files: &[(&str, &'static str, &str)] = &[
        ("/proc/net/tcp", "tcp", "0A"),
        ("/proc/net/tcp6", "tcp", "0A"),
        ("/proc/net/udp", "udp", "07"),
        ("/proc/net/udp6", "udp", "07"),
    ];
    for (file, p, state) in files {
        if (proto == Proto::Tcp && *p != "tcp") || (proto == Proto::Udp && *p != "udp") {
            continue;
        }
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != *state {
                continue;
            }
            let Some((addr_hex, port_hex)) = f[1].split_once(':') else {
                continue;
            };
            if u16::from_str_radix(port_hex, 16).ok() != Some(port) {
                continue;
            }
            found.push(Bound {
                proto: p,
                addr: format!("{}:{port}", decode_addr(addr_hex)),
                uid: f[7].parse().unwrap_or(u32::MAX),
                inode: f[9].parse().unwrap_or(0),
            });
        }
    }
    found
}

/// The `/proc/net` hex address (host-order 32-bit words) as text.
fn decode_addr(hex: &str) -> String {
    let words: Vec<u32> = (0..hex.len() / 8)
        .filter_map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&bytes);
            let v6 = std::net::Ipv6Addr::from(b);
            v6.to_ipv4_mapped()
                .map_or_else(|| format!("[{v6}]"), |v4| v4.to_string())
        }
        _ => hex.to_owned(),
    }
}

/// socket inode → (pid, command) for every process this one can see.
fn socket_owners() -> HashMap<u64, (u32, String)> {
    let mut owners = HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return owners;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let comm = fs::read_to_string(entry.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if let Some(Ok(inode)) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .map(str::parse)
            {
                owners.entry(inode).or_insert((pid, comm.clone()));
            }
        }
    }
    owners
}

fn user_name(uid: u32) -> String {
    crate::user::User::lookup(&uid.to_string()).map_or_else(|_| format!("uid {uid}"), |u| u.name)
}

fn describe(b: &Bound, owners: &HashMap<u64, (u32, String)>) -> String {
    let who = owners.get(&b.inode).map_or_else(
        || "process not visible".to_owned(),
        |(pid, comm)| format!("pid {pid} ({comm})"),
    );
    format!(
        "{} {} by {}, user {}",
        b.proto,
        b.addr,
        who,
        user_name(b.uid)
    )
}

/// For each mapping: does TO have a listener (whose), is FROM already bound.
pub fn map_checks(mappings: &MappingSet, checks: &mut Vec<Check>) {
    if mappings.is_empty() {
        return;
    }
    let owners = socket_owners();
    for m in mappings.iter() {
        let to = bound_on(m.to, m.proto);
        let name = format!("map {m}: TO {}", m.to);
        checks.push(if to.is_empty() {
            Check::new(
                name,
                Status::Warn,
                "nothing listens on TO in this network namespace",
            )
            .fix(format!(
                "start the service on port {} before clients connect",
                m.to
            ))
        } else {
            let who: Vec<String> = to.iter().map(|b| describe(b, &owners)).collect();
            Check::new(name, Status::Ok, who.join("; "))
        });
        let from = bound_on(m.from, m.proto);
        let name = format!("map {m}: FROM {}", m.from);
        checks.push(if from.is_empty() {
            Check::new(name, Status::Ok, "not bound")
        } else {
            let who: Vec<String> = from.iter().map(|b| describe(b, &owners)).collect();
            Check::new(name, Status::Warn, format!("already bound: {}", who.join("; "))).fix(
                "the proxy backend cannot listen there while it is bound; with eBPF, local clients \
                 are redirected before they reach it, remote ones still do (unless steered with --netns)",
            )
        });
    }
}
