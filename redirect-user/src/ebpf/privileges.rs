//! The capabilities needed to load and attach the programs, checked up front
//! so that a missing one is named instead of surfacing as an EPERM from deep
//! inside the loader.

use std::fs;

use crate::{Error, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Fails with [`Error::Privileges`] unless this process may load networking
/// BPF programs and attach them to cgroups: CAP_BPF (or, before Linux 5.8,
/// CAP_SYS_ADMIN) and CAP_NET_ADMIN. Root has all of them.
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::io("reading", "/proc/self/status", e))?;
    let caps = parse_cap_eff(&status).unwrap_or(0);
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Privileges {
            missing: missing.join(" and "),
        })
    }
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }
}
