//! Finding listeners that already existed when redirect started, so that
//! inbound steering reaches them too.
//!
//! New listeners are registered by the sock_ops program at
//! `TCP_LISTEN_CB`; one created before the program was attached never
//! passes there. For those, as tubular's `register-pid` does: for every
//! process of the scope (the cgroup and its descendants) that lives in the
//! steered network namespace, find its listening TCP sockets on a TO port
//! (`/proc/PID/net/tcp{,6}`, state 0A, matched to the process's fds by
//! socket inode), and duplicate each into this process with `pidfd_getfd`
//! (Linux 5.6; needs ptrace rights over the process, which root has) so that
//! it can be put in the sockhash.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

/// A listening socket found in a process: a duplicate of its fd, and its
/// port.
#[derive(Debug)]
pub struct FoundListener {
    /// Our duplicate of the socket (closing it leaves the process's own).
    pub fd: OwnedFd,
    /// The port it listens on.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// The address it is bound to, as the programs see addresses (IPv4
    /// mapped); all zeroes for the IPv6 wildcard.
    pub addr: redirect_common::Addr,
    /// The process it belongs to.
    pub pid: i32,
}

impl FoundListener {
    /// Whether it is bound to the wildcard address (0.0.0.0 or ::).
    pub fn is_wildcard(&self) -> bool {
        self.addr == redirect_common::ADDR_ANY
            || (self.family == redirect_common::AF_INET && self.addr[3] == 0)
    }
}

/// Listening TCP sockets on one of `ports`, owned by processes of cgroup
/// `scope` (recursively) whose network namespace has inode `netns_ino`.
/// Processes that vanish or cannot be read meanwhile are skipped.
pub fn find(scope: &Path, netns_ino: u64, ports: &HashSet<u16>) -> Vec<FoundListener> {
    let mut found = Vec::new();
    if ports.is_empty() {
        return found;
    }
    // The sockets of the scope's processes in that namespace first: the
    // namespace's socket tables are read only when there are some, and
    // once. Reading /proc/PID/net/tcp walks the kernel's whole TCP hash
    // table (every namespace's): ~10 ms per file on a host with a large
    // one, which a new container (no socket yet) should not pay.
    let mut sockets: Vec<(i32, i32, u64)> = Vec::new();
    for pid in scope_pids(scope) {
        let proc_dir = format!("/proc/{pid}");
        let same_netns =
            fs::metadata(format!("{proc_dir}/ns/net")).is_ok_and(|m| m.ino() == netns_ino);
        if !same_netns {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("{proc_dir}/fd")) else {
            continue;
        };
        for entry in fds.flatten() {
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() {
                sockets.push((pid, fd, inode));
            }
        }
    }
    let Some(&(first, _, _)) = sockets.first() else {
        return found;
    };
    let listening = listening_inodes(&format!("/proc/{first}"), ports);
    for (pid, fd, inode) in sockets {
        let Some(&(port, family, addr)) = listening.get(&inode) else {
            continue;
        };
        match dup_from(pid, fd) {
            Ok(fd) => found.push(FoundListener {
                fd,
                port,
                family,
                addr,
                pid,
            }),
            // It may have closed since /proc was read: skip it.
            Err(e) => log::warn!("skipping the listener on :{port} of pid {pid}: {e}"),
        }
    }
    found
}

/// The real uid of process `pid`.
pub fn real_uid(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Without `--owner`, warns when one TO port is held by processes of
/// different users: one of them may be squatting it.
pub fn warn_mixed_owners(found: &[FoundListener]) {
    let mut by_port: HashMap<u16, HashSet<u32>> = HashMap::new();
    for l in found {
        if let Some(uid) = real_uid(l.pid) {
            by_port.entry(l.port).or_default().insert(uid);
        }
    }
    for (port, uids) in by_port {
        if uids.len() > 1 {
            let mut uids: Vec<u32> = uids.into_iter().collect();
            uids.sort_unstable();
            log::warn!(
                "port {port} is bound by processes of different users (uids {uids:?}): \
                 one may be squatting it; pass --owner to reserve it"
            );
        }
    }
}

/// Every pid in `scope` and its descendant cgroups.
pub(super) fn scope_pids(scope: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut dirs = vec![scope.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    // d_type from getdents: no statx per control file.
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

/// What a listening socket is: its port, family and address.
type Listening = (u16, u32, redirect_common::Addr);

/// Socket inode → port, family and address of the listening sockets on
/// `ports` in the process's network namespace.
fn listening_inodes(proc_dir: &str, ports: &HashSet<u16>) -> HashMap<u64, Listening> {
    let mut out = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("{proc_dir}/net/{table}")) else {
            continue;
        };
        out.extend(parse_proc_net_tcp(&text, ports));
    }
    out
}

/// The address field of `/proc/net/tcp{,6}`: 8 or 32 hex digits, each
/// group of 8 being a network-order word printed as a native integer.
pub(super) fn parse_proc_addr(hex: &str) -> Option<(u32, redirect_common::Addr)> {
    let word = |i: usize| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok();
    match hex.len() {
        8 => Some((
            redirect_common::AF_INET,
            [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), word(0)?],
        )),
        32 => Some((
            redirect_common::AF_INET6,
            [word(0)?, word(1)?, word(2)?, word(3)?],
        )),
        _ => None,
    }
}

/// Parses `/proc/net/tcp{,6}`: `sl local rem st … inode`.
fn parse_proc_net_tcp(text: &str, ports: &HashSet<u16>) -> Vec<(u64, Listening)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            if *state != "0A" {
                return None; // not TCP_LISTEN
            }
            let (addr, port) = local.rsplit_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let (family, addr) = parse_proc_addr(addr)?;
            ports
                .contains(&port)
                .then(|| Some((inode.parse().ok()?, (port, family, addr))))?
        })
        .collect()
}

pub(super) fn dup_from(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; each returned fd is owned exactly once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        use std::os::fd::AsRawFd as _;
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(dup as i32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_sockets() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:20FB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:20FB 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 100 0 0 10 0
   2: 00000000:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 100 0 0 10 0
";
        let ports: HashSet<u16> = [8443].into();
        let found = parse_proc_net_tcp(text, &ports);
        assert_eq!(found.len(), 1);
        let (inode, (port, family, addr)) = found[0];
        assert_eq!(
            (inode, port, family),
            (4242, 8443, redirect_common::AF_INET)
        );
        assert_eq!(addr[3], 0);
        let lo = parse_proc_addr("0100007F").unwrap().1;
        let bytes: Vec<u8> = lo.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(&bytes[12..], &[127, 0, 0, 1]);
    }
}
