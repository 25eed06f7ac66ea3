//! Which programs are attached to a cgroup, asked of the kernel
//! (`BPF_PROG_QUERY`), so that tests and `status` can see what is really
//! there rather than what a process believes it attached.

use std::{fs::File, io, os::fd::AsRawFd as _, path::Path};

use crate::{Error, Result};

/// `BPF_PROG_QUERY` from `<linux/bpf.h>`.
const BPF_PROG_QUERY: libc::c_long = 16;

/// The cgroup hooks every scope uses, with their `enum bpf_attach_type`
/// values (kernel ABI, stable).
pub const HOOKS: [(&str, u32); 10] = [
    ("bind4", 8),
    ("bind6", 9),
    ("connect4", 10),
    ("connect6", 11),
    ("sendmsg4", 14),
    ("sendmsg6", 15),
    ("recvmsg4", 19),
    ("recvmsg6", 20),
    ("getpeername4", 29),
    ("getpeername6", 30),
];

/// The cgroup hooks a scope that steers a namespace adds (its steering
/// instance registers listeners), with their attach types.
pub const STEER_HOOKS: [(&str, u32); 3] = [("sock_ops", 3), ("post_bind4", 12), ("post_bind6", 13)];

/// A program attached directly to a cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedProgram {
    /// The hook, such as "connect4".
    pub hook: &'static str,
    /// The kernel's program id.
    pub id: u32,
    /// The program's name as the kernel knows it (at most 15 bytes).
    pub name: String,
    /// The program's tag: a hash of its instructions, the same for two
    /// loads of one build, different for another build.
    pub tag: u64,
}

/// The `union bpf_attr` member used by `BPF_PROG_QUERY`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// Every program attached directly to cgroup `path` on one of [`HOOKS`]
/// or [`STEER_HOOKS`],
/// whoever attached it (programs inherited from parent cgroups are not
/// listed).
pub fn attached_programs(path: &Path) -> Result<Vec<AttachedProgram>> {
    let dir = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut found = Vec::new();
    for &(hook, attach_type) in HOOKS.iter().chain(&STEER_HOOKS) {
        let ids = query(&dir, attach_type).map_err(|e| Error::io("BPF_PROG_QUERY on", path, e))?;
        found.extend(ids.into_iter().map(|id| AttachedProgram {
            hook,
            id,
            name: String::new(),
            tag: 0,
        }));
    }
    if !found.is_empty() {
        // One walk over the loaded programs names them all.
        for info in aya::programs::loaded_programs().filter_map(Result::ok) {
            for p in found.iter_mut().filter(|p| p.id == info.id()) {
                p.name = info.name_as_str().unwrap_or_default().to_owned();
                p.tag = info.tag();
            }
        }
    }
    Ok(found)
}

fn query(dir: &File, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = QueryAttr {
            target_fd: dir.as_raw_fd() as u32,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..Default::default()
        };
        // SAFETY: attr is a valid prefix of union bpf_attr for this command,
        // and prog_ids points at prog_cnt writable u32s.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut QueryAttr,
                size_of::<QueryAttr>(),
            )
        };
        if rc == 0 {
            ids.truncate(attr.prog_cnt as usize);
            return Ok(ids);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOSPC) && (attr.prog_cnt as usize) > ids.len() {
            ids.resize(attr.prog_cnt as usize, 0);
            continue;
        }
        return Err(err);
    }
}

/// `BPF_SK_LOOKUP` from `enum bpf_attach_type`.
const BPF_SK_LOOKUP: u32 = 36;

/// Ids of the sk_lookup programs attached to the network namespace at
/// `path` (`/proc/PID/ns/net`, `/run/netns/NAME`), whoever attached them.
pub fn netns_programs(path: &Path) -> Result<Vec<u32>> {
    let netns = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    query(&netns, BPF_SK_LOOKUP).map_err(|e| Error::io("BPF_PROG_QUERY on", path, e))
}
