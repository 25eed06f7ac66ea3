//! Who already holds a TO port when a scope with an owner starts: the
//! start-up check behind `--owner` (and `--allow-held-target`).
//!
//! The bind guard refuses non-owners from the moment it is attached; a
//! socket bound before that keeps its port, and would receive the
//! scope's redirected connections. So before attaching, for every network
//! namespace the scope serves (the one it steers, and those its processes
//! live in), [`find`] looks for sockets on a TO port, in the protocols
//! the mapping covers: TCP sockets that listen or are only bound, UDP
//! sockets that are bound. Each is traced to the processes holding it
//! (their fds, by socket inode) and described with its pid, command and
//! user.
//!
//! A TO port inside the namespace's `ip_local_port_range` (and not in
//! `ip_local_reserved_ports`) is reported too: any process's `listen()`,
//! `connect()` or `sendto()` without `bind()` may be given it, and no bind
//! hook sees that.
//!
//! The common case costs a few syscalls per namespace: a bind of TO on
//! the wildcard address (no `SO_REUSEADDR`) that succeeds proves nothing
//! holds it (the probe socket holds the port for the length of a `bind`
//! and a `close`). Only when it fails are the fds of the namespace's
//! processes walked, the owner's skipped: each inet socket among them
//! (`/proc/net/{unix,netlink}` name the others) is duplicated with
//! `pidfd_getfd` and asked its address and state. `/proc/net/tcp` is not
//! read: the kernel lists every connection there, which on a busy host
//! takes longer than asking the few sockets of the processes that are not
//! the owner.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    fs::{self, File},
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use socket2::{Domain, Protocol, Socket, Type};

use super::listeners::{dup_from, real_uid, scope_pids};
use crate::{MappingSet, Proto};

/// A socket on a TO port held by a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The process holding it (one of them, when it is shared).
    pub pid: i32,
    /// Its command (`/proc/PID/comm`).
    pub command: String,
    /// Its real uid, when it could be read.
    pub uid: Option<u32>,
    /// The port.
    pub port: u16,
    /// "tcp" or "udp".
    pub proto: &'static str,
    /// Whether the TCP socket listens (else it is only bound).
    pub listening: bool,
    /// The network namespace it is in.
    pub netns: PathBuf,
}

impl Holder {
    /// The user's name, or the uid when it has none.
    pub fn user(&self) -> String {
        match self.uid {
            Some(uid) => crate::user::User::lookup(&uid.to_string())
                .map_or_else(|_| format!("uid {uid}"), |u| u.name),
            None => "an unknown user".to_owned(),
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match (self.proto, self.listening) {
            ("tcp", true) => "listens on",
            _ => "is bound to",
        };
        write!(
            f,
            "pid {} ({}, user {}) {how} port {}/{} in network namespace {}",
            self.pid,
            self.command,
            self.user(),
            self.port,
            self.proto,
            self.netns.display()
        )
    }
}

/// A TO port that the kernel may hand to any process's autobind
/// (`listen()`, `connect()` or `sendto()` without `bind()`, which no bind
/// hook sees): inside `ip_local_port_range` and not in
/// `ip_local_reserved_ports` of a namespace the scope serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Autobind {
    /// The port.
    pub port: u16,
    /// The namespace's `ip_local_port_range`.
    pub range: (u16, u16),
    /// The namespace.
    pub netns: PathBuf,
}

impl fmt::Display for Autobind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "port {} is inside ip_local_port_range {}-{} of network namespace {}",
            self.port,
            self.range.0,
            self.range.1,
            self.netns.display()
        )
    }
}

/// What [`find`] found in the namespaces a scope serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Sockets on a TO port, with who holds them.
    pub holders: Vec<Holder>,
    /// TO ports any process's autobind may take.
    pub autobind: Vec<Autobind>,
}

/// The sockets on the TO ports of `mappings` held in the network
/// namespaces the scope serves (`netns` if given, and those of the
/// processes of `cgroup`; with neither, this process's own) by processes
/// for which `skip` (the owner) is false; and the TO ports autobind may
/// hand out there. A namespace that cannot be entered is skipped with a
/// warning.
pub fn find(
    cgroup: &Path,
    netns: Option<&Path>,
    mappings: &MappingSet,
    skip: &dyn Fn(i32) -> bool,
) -> Findings {
    let mut targets: BTreeMap<u16, (bool, bool)> = BTreeMap::new();
    for m in mappings.iter() {
        let (tcp, udp) = targets.entry(m.to).or_default();
        *tcp |= m.proto != Proto::Udp;
        *udp |= m.proto != Proto::Tcp;
    }
    let mut found = Findings::default();
    if targets.is_empty() {
        return found;
    }
    for (ino, path) in served_namespaces(cgroup, netns) {
        match in_namespace(&path, ino, &targets, skip) {
            Ok((holders, autobind)) => {
                found.holders.extend(holders);
                found.autobind.extend(autobind);
            }
            Err(e) => log::warn!(
                "checking who holds the target ports in network namespace {}: {e}",
                path.display()
            ),
        }
    }
    found
}

/// Inode → a path of each namespace served: `netns`, then one
/// `/proc/PID/ns/net` per namespace of the scope's processes.
fn served_namespaces(cgroup: &Path, netns: Option<&Path>) -> BTreeMap<u64, PathBuf> {
    let mut out = BTreeMap::new();
    if let Some(path) = netns
        && let Ok(m) = fs::metadata(path)
    {
        out.insert(m.ino(), path.to_path_buf());
    }
    let pids = scope_pids(cgroup);
    for pid in &pids {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if let Ok(m) = fs::metadata(&path) {
            out.entry(m.ino()).or_insert(path);
        }
    }
    if out.is_empty() {
        // An empty scope: its processes will most likely start here.
        let path = PathBuf::from("/proc/self/ns/net");
        if let Ok(m) = fs::metadata(&path) {
            out.insert(m.ino(), path);
        }
    }
    out
}

/// What a look from inside one namespace found.
#[derive(Default)]
struct Tables {
    /// (port, proto) of each TO port that a probe bind found taken.
    taken: Vec<(u16, &'static str)>,
    /// The unix and netlink sockets' inodes: no closer look needed.
    not_inet: HashSet<u64>,
    /// TO ports autobind may pick, with `ip_local_port_range`.
    autobind: Vec<(u16, (u16, u16))>,
}

fn in_namespace(
    path: &Path,
    ino: u64,
    targets: &BTreeMap<u16, (bool, bool)>,
    skip: &dyn Fn(i32) -> bool,
) -> io::Result<(Vec<Holder>, Vec<Autobind>)> {
    let file = File::open(path)?;
    let tables = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<Tables> {
            // SAFETY: setns on an fd we own, in a thread of our own that
            // ends right after: the rest of the process is untouched.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(look_inside(targets))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the thread panicked")))
    })?;
    let autobind: Vec<Autobind> = tables
        .autobind
        .iter()
        .map(|&(port, range)| Autobind {
            port,
            range,
            netns: path.to_path_buf(),
        })
        .collect();
    if tables.taken.is_empty() {
        return Ok((Vec::new(), autobind));
    }
    let taken: HashSet<(u16, &'static str)> = tables.taken.iter().copied().collect();
    let mut holders = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    for pid in namespace_pids(ino) {
        if skip(pid) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in fds.flatten() {
            let Some(inode) = fs::read_link(entry.path())
                .ok()
                .and_then(|t| socket_inode(&t.to_string_lossy()))
            else {
                continue;
            };
            if tables.not_inet.contains(&inode) || seen.contains(&inode) {
                continue;
            }
            let found = entry
                .file_name()
                .to_str()
                .and_then(|fd| fd.parse::<i32>().ok())
                .and_then(|fd| holding(pid, fd))
                .filter(|(port, proto, _)| taken.contains(&(*port, *proto)));
            let Some((port, proto, listening)) = found else {
                continue;
            };
            // A socket shared by several processes (a fork) is named once.
            if !seen.insert(inode) {
                continue;
            }
            holders.push(Holder {
                pid,
                command: fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim_end().to_owned())
                    .unwrap_or_default(),
                uid: real_uid(pid),
                port,
                proto,
                listening,
                netns: path.to_path_buf(),
            });
        }
    }
    if holders.is_empty() {
        // The owner, TIME_WAIT connections of an earlier server, or a
        // socket held by a process of another namespace: nobody to name.
        log::debug!(
            "target ports {:?} are taken in {} by no process found there",
            tables.taken,
            path.display()
        );
    }
    Ok((holders, autobind))
}

/// Run inside the namespace: which TO ports are taken, which autobind may
/// hand out, and which sockets are not inet ones.
fn look_inside(targets: &BTreeMap<u16, (bool, bool)>) -> Tables {
    let mut tables = Tables::default();
    // Per-namespace sysctls: read from inside it.
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| parse_range(&t));
    let reserved = fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .map(|t| parse_port_list(&t))
        .unwrap_or_default();
    if let Some((lo, hi)) = range {
        tables.autobind = targets
            .keys()
            .filter(|&&p| (lo..=hi).contains(&p) && !reserved.contains(&p))
            .map(|&p| (p, (lo, hi)))
            .collect();
    }
    for (&port, &(tcp, udp)) in targets {
        if tcp && taken(Type::STREAM, Protocol::TCP, port) {
            tables.taken.push((port, "tcp"));
        }
        if udp && taken(Type::DGRAM, Protocol::UDP, port) {
            tables.taken.push((port, "udp"));
        }
    }
    if tables.taken.is_empty() {
        return tables;
    }
    for file in ["unix", "netlink"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/thread-self/net/{file}")) {
            tables.not_inet.extend(parse_inode_column(&text));
        }
    }
    tables
}

/// Whether binding `port` on the wildcard address (IPv6 dual-stack, else
/// IPv4) fails: some socket holds it. No `SO_REUSEADDR`, so even a socket
/// that set it is seen.
fn taken(ty: Type, proto: Protocol, port: u16) -> bool {
    let try_bind = |domain: Domain, addr: SocketAddr| -> io::Result<()> {
        let socket = Socket::new(domain, ty, Some(proto))?;
        if domain == Domain::IPV6 {
            socket.set_only_v6(false)?;
        }
        socket.bind(&addr.into())
    };
    match try_bind(Domain::IPV6, (Ipv6Addr::UNSPECIFIED, port).into()) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => true,
        // No IPv6 here (disabled, or not built): IPv4 alone.
        Err(_) => try_bind(Domain::IPV4, (Ipv4Addr::UNSPECIFIED, port).into()).is_err(),
    }
}

/// Pids whose network namespace has inode `ino`.
fn namespace_pids(ino: u64) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ino))
        .collect()
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// What an inet socket holds, as `(port, proto, listening)`: a TCP socket
/// that listens or is bound but not connected (a connection's local port
/// is its listener's, or a client's, not a hold of its own), or a bound
/// UDP socket. Asked on a duplicate of fd `fd` of process `pid`.
fn holding(pid: i32, fd: i32) -> Option<(u16, &'static str, bool)> {
    let socket = Socket::from(dup_from(pid, fd).ok()?);
    let domain = socket.domain().ok()?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return None;
    }
    let port = socket.local_addr().ok()?.as_socket()?.port();
    if port == 0 {
        return None;
    }
    match socket.r#type().ok()? {
        Type::STREAM if socket.peer_addr().is_err() => {
            Some((port, "tcp", socket.is_listener().unwrap_or(false)))
        }
        Type::DGRAM => Some((port, "udp", false)),
        _ => None,
    }
}

/// `ip_local_port_range`: "32768\t60999".
fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// `ip_local_reserved_ports`: "8080,9000-9100" (or empty).
fn parse_port_list(text: &str) -> HashSet<u16> {
    let mut out = HashSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
            out.extend(lo..=hi);
        }
    }
    out
}

/// The `Inode` column of `/proc/net/{unix,netlink}`, found by its header.
fn parse_inode_column(text: &str) -> Vec<u64> {
    let mut lines = text.lines();
    let Some(column) = lines
        .next()
        .and_then(|h| h.split_whitespace().position(|c| c == "Inode"))
    else {
        return Vec::new();
    };
    lines
        .filter_map(|l| l.split_whitespace().nth(column)?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_tables_proc_net_keeps() {
        let unix = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 17090 /run/systemd/notify
0000000000000000: 00000003 00000000 00000000 0001 03 17101
";
        assert_eq!(parse_inode_column(unix), vec![17090, 17101]);
        let netlink = "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
0000000000000000 0   1          00000000 0        0        0     2        0        15871
";
        assert_eq!(parse_inode_column(netlink), vec![15871]);
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        let reserved = parse_port_list("8080,9000-9002\n");
        assert_eq!(reserved.len(), 4);
        assert!(reserved.contains(&9001) && !reserved.contains(&9003));
        assert!(parse_port_list("\n").is_empty());
    }
}
