//! The kernel version redirect needs, checked before anything is attached.
//!
//! aya 0.14 attaches cgroup programs with a `bpf_link` only when it can
//! read a kernel version of at least 5.7 (`KernelVersion::at_least`); when
//! it cannot read one (an unusual `uname -r`, such as `6.18-rc1` with no
//! patch level), it silently falls back to legacy `BPF_PROG_ATTACH`, whose
//! attachment lives as long as the cgroup, not the process: a crash would
//! leave the redirect in place. So the version aya will read is required to
//! be readable and at least [`MINIMUM`] (the documented minimum, for the
//! getpeername hooks) before anything is attached.

use aya::util::KernelVersion;

use crate::{Error, Result};

/// The oldest kernel redirect runs on: cgroup storage shared by every
/// program of a cgroup (the scope cell, 5.9), getpeername4/6 hooks (5.8),
/// and cgroup `bpf_link`s (5.7).
pub const MINIMUM: (u8, u8) = (5, 9);

/// Overrides the running kernel's version for [`require`]
/// (`REDIRECT_KERNEL_VERSION=5.10.0`): how the tests show what an older
/// kernel is told, on a machine that runs a newer one. Never raises what
/// the kernel really has: a feature it lacks still fails to load.
pub const VERSION_OVERRIDE: &str = "REDIRECT_KERNEL_VERSION";

/// The running kernel's version, or the override.
fn running() -> Option<KernelVersion> {
    if let Ok(text) = std::env::var(VERSION_OVERRIDE) {
        let mut parts = text.split('.').map(|p| p.parse::<u16>().ok());
        let (Some(Some(a)), Some(Some(b))) = (parts.next(), parts.next()) else {
            return None;
        };
        let c = parts.next().flatten().unwrap_or(0);
        return Some(KernelVersion::new(a as u8, b as u8, c));
    }
    KernelVersion::current().ok()
}

/// Fails with [`Error::KernelFeature`] when the running kernel is older
/// than `min`, naming `feature` and the minimum: checked before anything
/// of a scope is attached, so an older kernel gets a sentence, not a
/// verifier log.
pub fn require(feature: &'static str, min: (u8, u8)) -> Result<()> {
    match running() {
        Some(v) if v < KernelVersion::new(min.0, min.1, 0) => Err(Error::KernelFeature {
            feature,
            minimum: format!("{}.{}", min.0, min.1),
            running: v.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Fails unless the kernel's version is readable (as aya reads it) and at
/// least [`MINIMUM`]. The error names `uname -r` and the minimum.
pub fn check_version() -> Result<()> {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    check(
        &release,
        KernelVersion::current().map_err(|e| e.to_string()),
    )
}

fn check(release: &str, version: std::result::Result<KernelVersion, String>) -> Result<()> {
    let reason = match version {
        Ok(v) if v >= KernelVersion::new(MINIMUM.0, MINIMUM.1, 0) => return Ok(()),
        Ok(v) => format!("version {v} is too old"),
        Err(e) => format!("its version cannot be read ({e})"),
    };
    Err(Error::KernelVersion {
        release: crate::error::clip(release),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_passes() {
        check_version().expect("the test machine runs Linux >= 5.9");
    }

    #[test]
    fn an_old_or_unreadable_version_is_refused_naming_the_minimum() {
        let old = check("5.4.0-150-generic", Ok(KernelVersion::new(5, 4, 0))).unwrap_err();
        let text = old.to_string();
        assert!(text.contains("5.4.0-150-generic"), "{text}");
        assert!(text.contains("Linux >= 5.9"), "{text}");
        let unreadable = check("6.18-rc1", Err("ParseError".into())).unwrap_err();
        assert!(
            unreadable.to_string().contains("cannot be read"),
            "{unreadable}"
        );
        assert!(check("5.9.0", Ok(KernelVersion::new(5, 9, 0))).is_ok());
        assert!(check("5.8.0", Ok(KernelVersion::new(5, 8, 0))).is_err());
    }
}
