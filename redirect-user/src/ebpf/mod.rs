//! The eBPF backend: loads the embedded object, attaches it to a cgroup, and
//! owns the attachment for as long as the [`Redirector`] lives.
//!
//! # Lifetime
//!
//! Programs are attached with `bpf_link`s (Linux >= 5.7) held only by this
//! process and never pinned: dropping the [`Redirector`], returning from
//! `main`, or being killed (even by SIGKILL) closes the link fds and the
//! kernel detaches the programs at once. Nothing survives the process.

mod attached;
mod privileges;

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

pub use attached::{AttachedProgram, HOOKS, attached_programs};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramType},
};
use aya_log::EbpfLogger;
pub use privileges::check_privileges;
use redirect_common::{Counter, MappingKey, MappingValue, maps, programs};

use crate::{Error, Mapping, MappingSet, Result, cgroup::CgroupDir};

/// The eBPF object built by build.rs from the `redirect-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// The programs, in attach order: getpeername before connect, so that no
/// connect is ever rewritten while getpeername cannot restore it yet.
const PROGRAMS: [&str; 4] = [
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::CONNECT4,
    programs::CONNECT6,
];

/// A logger that forwards the eBPF side's aya-log records to the `log`
/// crate. It must be polled: wait until its fd is readable, then call
/// `flush()`.
pub type Logger = EbpfLogger<&'static dyn log::Log>;

/// How to load the programs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Log each rewrite from the eBPF side (aya-log, debug level). Off by
    /// default: the verifier then removes the logging code entirely.
    pub ebpf_debug_log: bool,
}

/// Sums of the per-CPU counters kept by the programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `(counter, value)` for every [`Counter`], in index order.
    pub values: Vec<(Counter, u64)>,
}

impl Counters {
    /// The value of one counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.values
            .iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| *v)
    }
}

/// Live connect-time redirection in one cgroup.
///
/// Every TCP or UDP `connect()` made by a process in the cgroup (or its
/// descendants) to a mapped port goes to the mapped target instead, and
/// `getpeername()` on that socket reports the original port.
///
/// # Minimum kernel version
///
/// Linux 5.8 (getpeername hooks); cgroup v2; CAP_BPF and CAP_NET_ADMIN.
#[doc(alias = "BPF_PROG_TYPE_CGROUP_SOCK_ADDR")]
pub struct Redirector {
    // Declared first so that it is dropped first: the links go, then the
    // maps.
    ebpf: Ebpf,
    cgroup: PathBuf,
    mappings: MappingSet,
    logger: Option<Logger>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("cgroup", &self.cgroup)
            .field("mappings", &self.mappings)
            .finish_non_exhaustive()
    }
}

impl Redirector {
    /// Loads the programs and attaches them to the cgroup v2 directory
    /// `cgroup`, with `mappings` active.
    ///
    /// Either everything is attached or nothing is: on error, whatever was
    /// attached is detached again before returning.
    pub fn attach(cgroup: &Path, mappings: MappingSet, options: &Options) -> Result<Self> {
        check_privileges()?;
        let dir = CgroupDir::open(cgroup)?;
        probe_kernel()?;
        raise_memlock_limit();

        // aya-log levels: 0 is off, 4 is debug.
        let log_level: u8 = if options.ebpf_debug_log { 4 } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .load(OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        let logger = if options.ebpf_debug_log {
            match EbpfLogger::init(&mut ebpf) {
                Ok(logger) => Some(logger),
                Err(e) => {
                    log::warn!("eBPF logging unavailable: {e}");
                    None
                }
            }
        } else {
            None
        };

        let mut redirector = Redirector {
            ebpf,
            cgroup: dir.path().to_path_buf(),
            mappings: MappingSet::default(),
            logger,
        };
        for m in mappings.iter() {
            redirector.insert(m)?;
        }
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = redirector
                .ebpf
                .program_mut(name)
                .ok_or(Error::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(|e| Error::LoadProgram {
                    program: name,
                    source: Box::new(e),
                })?;
            program.load().map_err(|e| Error::LoadProgram {
                program: name,
                source: Box::new(e),
            })?;
        }
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = redirector
                .ebpf
                .program_mut(name)
                .expect("loaded above")
                .try_into()
                .expect("checked above");
            // `Single` means "no flags": a cgroup bpf_link always coexists
            // with other programs on this cgroup and its ancestors (as
            // BPF_F_ALLOW_MULTI would), and the kernel rejects any flag on
            // BPF_LINK_CREATE for cgroups with EINVAL.
            program
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| {
                    let hint = attach_hint(&e);
                    Error::Attach {
                        program: name,
                        path: dir.path().to_path_buf(),
                        source: Box::new(e),
                        hint,
                    }
                })?;
        }
        Ok(redirector)
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The active mappings.
    pub fn mappings(&self) -> &MappingSet {
        &self.mappings
    }

    /// Adds a mapping at run time; connects made from now on use it. No
    /// program is reattached.
    pub fn insert(&mut self, m: Mapping) -> Result<()> {
        let mut next = self.mappings.clone();
        next.insert(m)?;
        self.table()?
            .insert(MappingKey::new(m.from), MappingValue::new(m.to), 0)
            .map_err(|e| map_error("writing", maps::MAPPINGS, e))?;
        self.mappings = next;
        Ok(())
    }

    /// Removes the mapping for port `from` at run time; connects made from
    /// now on are left alone. Established connections keep their peer.
    pub fn remove(&mut self, from: u16) -> Result<Option<Mapping>> {
        if self.mappings.get(from).is_none() {
            return Ok(None);
        }
        self.table()?
            .remove(&MappingKey::new(from))
            .map_err(|e| map_error("writing", maps::MAPPINGS, e))?;
        Ok(self.mappings.remove(from))
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map = self.ebpf.map(maps::COUNTERS).ok_or(Error::Missing {
            kind: "map",
            name: maps::COUNTERS,
        })?;
        let array = PerCpuArray::<&MapData, u64>::try_from(map)
            .map_err(|e| map_error("reading", maps::COUNTERS, e))?;
        let mut values = Vec::with_capacity(Counter::ALL.len());
        for c in Counter::ALL {
            let per_cpu = array
                .get(&(c as u32), 0)
                .map_err(|e| map_error("reading", maps::COUNTERS, e))?;
            values.push((c, per_cpu.iter().sum()));
        }
        Ok(Counters { values })
    }

    /// Takes the eBPF logger (present when [`Options::ebpf_debug_log`] was
    /// set); the caller polls it.
    pub fn take_logger(&mut self) -> Option<Logger> {
        self.logger.take()
    }

    fn table(&mut self) -> Result<HashMap<&mut MapData, MappingKey, MappingValue>> {
        let map = self.ebpf.map_mut(maps::MAPPINGS).ok_or(Error::Missing {
            kind: "map",
            name: maps::MAPPINGS,
        })?;
        HashMap::try_from(map).map_err(|e| map_error("opening", maps::MAPPINGS, e))
    }
}

fn map_error(op: &'static str, map: &'static str, e: aya::maps::MapError) -> Error {
    Error::Map {
        op,
        map,
        source: Box::new(e),
    }
}

/// Checks, before anything is loaded, that the kernel has the program and
/// map types we need, so a missing one is reported by name.
fn probe_kernel() -> Result<()> {
    use aya::{maps::MapType, sys};
    match sys::is_program_supported(ProgramType::CgroupSockAddr) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::KernelUnsupported {
                feature: "cgroup sock_addr programs",
                detail: String::new(),
            });
        }
        Err(e) => {
            return Err(Error::KernelUnsupported {
                feature: "cgroup sock_addr programs",
                detail: format!("; probe failed: {e}"),
            });
        }
    }
    match sys::is_map_supported(MapType::SkStorage) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::KernelUnsupported {
            feature: "socket storage maps (Linux >= 5.2)",
            detail: String::new(),
        }),
        Err(e) => Err(Error::KernelUnsupported {
            feature: "socket storage maps (Linux >= 5.2)",
            detail: format!("; probe failed: {e}"),
        }),
    }
}

fn attach_hint(e: &aya::programs::ProgramError) -> &'static str {
    let errno = match e {
        aya::programs::ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::EBADF) => "; the directory is not a cgroup v2 directory: pass --cgroup with one",
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "; run as root or grant CAP_BPF and CAP_NET_ADMIN"
        }
        Some(libc::EINVAL) => "; the kernel lacks cgroup BPF links (Linux >= 5.7 needed)",
        _ => "",
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK, whose default
/// (64 KiB or 8 MiB) is too small for our maps; later kernels use memory
/// cgroup accounting and ignore it. Raising the hard limit needs
/// CAP_SYS_RESOURCE, so without it the soft limit goes up to the hard one.
/// Failing is not fatal. <https://lwn.net/Articles/837122/>
fn raise_memlock_limit() {
    let mut rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) == 0 {
            return;
        }
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rlim) == 0 {
            rlim.rlim_cur = rlim.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name in redirect-common exists in the embedded object, so the
    /// two sides cannot drift. Parsing needs no privileges.
    #[test]
    fn embedded_object_has_every_shared_name() {
        let obj = aya_obj::Object::parse(OBJECT).expect("parse embedded object");
        for name in PROGRAMS {
            assert!(obj.programs.contains_key(name), "program {name} missing");
        }
        for name in [maps::MAPPINGS, maps::ORIG_DST, maps::COUNTERS] {
            assert!(obj.maps.contains_key(name), "map {name} missing");
        }
    }
}
