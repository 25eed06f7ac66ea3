//! Network namespace files (`--netns /run/netns/NAME`, `/proc/PID/ns/net`),
//! checked before anything is attached: a wrong path is the user's input
//! (exit code 2), never an attach failure that blames the kernel.

use std::{fs::File, io, os::fd::AsRawFd as _, path::Path};

use crate::{Error, Result};

/// `NSFS_MAGIC` from `<linux/magic.h>`.
const NSFS_MAGIC: u32 = 0x6e73_6673;
/// `NS_GET_NSTYPE` from `<linux/nsfs.h>`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens the network namespace file at `path`, checking that it is one:
/// anything else is [`Error::NetnsPath`], which is bad input.
pub fn open(path: &Path) -> Result<File> {
    let bad = |source: io::Error| Error::NetnsPath {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(bad)?;
    let magic = rustix::fs::fstatfs(&file)
        .map_err(|e| bad(e.into()))?
        .f_type as u32;
    if magic != NSFS_MAGIC {
        return Err(bad(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a namespace file",
        )));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and returns the type.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(bad(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a namespace, but not a network namespace",
        )));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_network_namespace_and_refuses_the_rest() {
        open(Path::new("/proc/self/ns/net")).expect("our own netns");
        for path in ["/nonexistent/netns", "/etc/hostname", "/proc/self/ns/mnt"] {
            let e = open(Path::new(path)).unwrap_err();
            assert!(e.is_bad_input(), "{path}: {e}");
            assert!(e.to_string().contains("/run/netns/NAME"), "{path}: {e}");
        }
    }
}
