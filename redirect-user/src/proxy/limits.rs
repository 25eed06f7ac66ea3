//! The open-files limit a proxy lives within. Every connection through
//! the proxy holds two sockets (and, while a direction splices, a pipe of
//! two descriptors), so the usual soft limit of 1,024 (256 on macOS) caps
//! it at a few hundred clients, far below
//! [`ProxyOptions::max_connections`](super::ProxyOptions::max_connections).

use std::io;

/// Where the hard limit is "unlimited", the soft limit is raised to this:
/// Linux refuses more than `fs.nr_open` (1,048,576 by default).
#[cfg(target_os = "linux")]
const UNLIMITED_CAP: u64 = 1 << 20;

/// macOS refuses a soft limit above `OPEN_MAX` (10,240) when the hard
/// limit is unlimited, as it is by default.
#[cfg(target_os = "macos")]
const UNLIMITED_CAP: u64 = 10_240;

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its
/// hard limit, as HAProxy and Go programs do at start, and returns the soft
/// limit in force afterwards (`None`: the OS has no such limit, as on
/// Windows).
///
/// Only the soft limit moves, which needs no privilege; the hard limit
/// (`ulimit -Hn`, `LimitNOFILE=` in a systemd unit, `--ulimit` for a
/// container) stays the operator's ceiling. Processes started afterwards
/// inherit the raised limit, so a program that starts commands (such as
/// `redirect exec`) should not call this.
///
/// # Errors
///
/// The limit could not be read or set; the limit in force is unchanged.
#[cfg(any(target_os = "linux", target_os = "macos"))]
pub fn raise_open_files_limit() -> io::Result<Option<u64>> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.map_or(UNLIMITED_CAP, |h| {
        if cfg!(target_os = "macos") {
            h.min(UNLIMITED_CAP)
        } else {
            h
        }
    });
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= hard {
        return Ok(Some(soft));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        },
    )?;
    Ok(Some(hard))
}

/// Raises this process's soft limit on open files to its hard limit (see
/// the Linux and macOS version); other systems have no such limit.
///
/// # Errors
///
/// Never, here.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub fn raise_open_files_limit() -> io::Result<Option<u64>> {
    Ok(None)
}
