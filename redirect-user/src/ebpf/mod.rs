//! The eBPF backend: a loaded program set ([`Programs`]) attached to any
//! number of scopes ([`Scope`]), and [`Redirector`], one program set with
//! one scope, which is what `redirect run` and `redirect exec` use.
//!
//! Programs: connect4/6 and getpeername4/6 (TCP, connected UDP),
//! sendmsg4/6 and recvmsg4/6 (unconnected UDP), bind4/6 (grants, owners,
//! inbound UDP), a sock_ops program that counts connections established
//! through a redirect, and per steered namespace sk_lookup plus a sock_ops
//! program that registers listeners.
//!
//! # Lifetime
//!
//! Without a pin directory, programs are attached with `bpf_link`s held
//! only by this process: dropping the handles, returning from `main`, or
//! being killed (even by SIGKILL) closes the link fds and the kernel
//! detaches the programs at once. With [`LoadOptions::pin_dir`], links and
//! maps are pinned on bpffs and outlive the process (see [`pin`]).

mod adopt;
mod attached;
mod cell;
mod established;
pub mod holders;
mod listeners;
mod loader;
pub mod pin;
mod port_bits;
mod privileges;
mod programs;
pub use programs::OBJECT_ENV;
pub(crate) use programs::object;
mod scope;
mod steering;

use std::path::{Path, PathBuf};

pub use attached::{AttachedProgram, HOOKS, STEER_HOOKS, attached_programs, netns_programs};
use aya::programs::ProgramType;
use aya_log::EbpfLogger;
pub use privileges::check_privileges;
pub use programs::{BASE_PROGRAMS, BIND_PROGRAMS, GUARD_PROGRAMS, LoadOptions, Programs};
use redirect_common::{Counter, programs as names};
pub use scope::{Scope, ScopeBuilder, ScopeStats};

use crate::{Error, Mapping, MappingSet, Result, cgroup::CgroupDir};

/// A logger that forwards the eBPF side's aya-log records to the `log`
/// crate. It must be polled: wait until its fd is readable, then call
/// `flush()`.
pub type Logger = EbpfLogger<&'static dyn log::Log>;

/// How [`Redirector::attach`] loads and attaches.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Log each rewrite from the eBPF side (aya-log, debug level). Off by
    /// default: the verifier then removes the logging code entirely.
    pub ebpf_debug_log: bool,
    /// Also steer inbound TCP connections for FROM ports in this network
    /// namespace (`/proc/PID/ns/net`, `/run/netns/NAME`) to the listener
    /// registered for TO, with sk_lookup (Linux 5.9). Listeners are
    /// registered when a process of the scope starts listening on a TO port;
    /// existing ones are found when attaching.
    pub netns: Option<PathBuf>,
    /// Reserve the TO ports for this owner: within the scope, only it may
    /// bind them (others get EACCES), and only its listeners are registered.
    pub owner: Option<PortOwner>,
    /// Attach even when another instance's programs are on the cgroup, a
    /// parent or child of it, or the namespace (see [`crate::stacking`]);
    /// by default that is refused with [`Error::Stacking`].
    pub allow_stacking: bool,
    /// With an owner, attach even when another process already holds a
    /// TO port in a namespace the scope serves (see
    /// [`ScopeBuilder::allow_held_target`]); by default that is refused
    /// with [`Error::TargetHeld`].
    pub allow_held_target: bool,
    /// With an owner, keep the TO ports for it against processes outside
    /// the scope too, with guard programs on this cgroup (see
    /// [`ScopeBuilder::guard_cgroup`]).
    pub guard_cgroup: Option<PathBuf>,
}

/// Who may bind the TO ports (`--owner`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortOwner {
    /// Processes with this real uid.
    Uid(u32),
    /// Processes in this cgroup v2 directory or below it.
    Cgroup(PathBuf),
}

impl PortOwner {
    /// Parses `--owner`/`owner =`: a cgroup v2 directory (an absolute
    /// path), else a user name or uid.
    pub fn parse(text: &str) -> std::result::Result<Self, crate::MappingError> {
        if text.starts_with('/') {
            return Ok(PortOwner::Cgroup(PathBuf::from(text)));
        }
        // A uid is taken as is: a container's uid (mapped to the host by
        // the OCI hook) need not have a passwd entry on the host.
        if let Ok(uid) = text.parse::<u32>() {
            return Ok(PortOwner::Uid(uid));
        }
        Ok(PortOwner::Uid(
            crate::user::User::lookup_for(text, "--owner")?.uid,
        ))
    }

    /// The OWNERS map entry.
    pub(crate) fn entry(&self) -> Result<redirect_common::Owner> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(match self {
            PortOwner::Uid(uid) => redirect_common::Owner {
                kind: redirect_common::OWNER_UID,
                uid: *uid,
                ..Default::default()
            },
            PortOwner::Cgroup(path) => {
                let dir = CgroupDir::open(path)?;
                let root = crate::cgroup::cgroup2_root()?;
                let level = dir
                    .path()
                    .strip_prefix(&root)
                    .map_err(|_| Error::NotCgroup2 {
                        path: path.clone(),
                        reason: format!("it is not below {}", root.display()),
                        hint: format!(", such as {}", root.display()),
                    })?
                    .components()
                    .count() as u32;
                let ino = std::fs::metadata(dir.path())
                    .map_err(|e| Error::io("reading", dir.path(), e))?
                    .ino();
                redirect_common::Owner {
                    kind: redirect_common::OWNER_CGROUP,
                    cgroup_id: ino,
                    level,
                    ..Default::default()
                }
            }
        })
    }

    /// Whether process `pid` is this owner (for listeners found in /proc).
    pub(crate) fn owns(&self, pid: i32) -> bool {
        match self {
            PortOwner::Uid(uid) => listeners::real_uid(pid) == Some(*uid),
            PortOwner::Cgroup(path) => {
                let Ok(root) = crate::cgroup::cgroup2_root() else {
                    return false;
                };
                let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
                    return false;
                };
                text.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .is_some_and(|rel| root.join(rel.trim_start_matches('/')).starts_with(path))
            }
        }
    }
}

impl std::fmt::Display for PortOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortOwner::Uid(uid) => {
                let name = crate::user::User::lookup(&uid.to_string()).map(|u| u.name);
                match name {
                    Ok(name) => write!(f, "user {name}"),
                    Err(_) => write!(f, "uid {uid}"),
                }
            }
            PortOwner::Cgroup(path) => write!(f, "cgroup {}", path.display()),
        }
    }
}

/// Sums of the per-CPU counters kept by the programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `(counter, value)` for every [`Counter`], in index order.
    pub values: Vec<(Counter, u64)>,
}

impl Counters {
    /// Adds `v` to counter `c`.
    pub fn add(&mut self, c: Counter, v: u64) {
        match self.values.iter_mut().find(|(k, _)| *k == c) {
            Some((_, x)) => *x += v,
            None => self.values.push((c, v)),
        }
    }

    /// The value of one counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.values
            .iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| *v)
    }
}

/// The statistics of one mapping, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingCounts {
    /// Connects (TCP and connected UDP) redirected.
    pub connects: u64,
    /// TCP connections of the scope's processes open right now to the
    /// mapping's TO (read from `/proc` when asked, not counted per
    /// connection: see `established.rs`).
    pub established: u64,
    /// Unconnected UDP datagrams redirected.
    pub datagrams: u64,
}

impl MappingCounts {
    /// Everything redirected: connects plus datagrams.
    pub fn redirected(&self) -> u64 {
        self.connects + self.datagrams
    }
}

/// Live redirection in one cgroup: a program set of its own with one
/// scope, owned by this process (nothing is pinned).
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
    // Declared first so that it is dropped first: the scope's links go,
    // then the program set.
    scope: Scope,
    programs: Programs,
    cgroup: PathBuf,
    steering: bool,
    netns_inode: Option<u64>,
    stacked: Vec<String>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("cgroup", &self.cgroup)
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
        crate::kernel::check_version()?;
        let dir = CgroupDir::open(cgroup)?;
        // Held until attached, so that two instances starting together
        // cannot both find the other absent.
        let _lock = crate::stacking::lock();
        let found = crate::stacking::find(dir.path(), options.netns.as_deref())?;
        let stacked = crate::stacking::refuse_unless(&found, options.allow_stacking)?;
        let programs = Programs::load(&LoadOptions {
            pin_dir: None,
            ebpf_debug_log: options.ebpf_debug_log,
            steer_pool: 0,
        })?;
        let mut builder = programs.scope(dir.path()).mappings(mappings);
        if let Some(netns) = &options.netns {
            builder = builder.netns(netns);
        }
        if let Some(owner) = &options.owner {
            builder = builder.owner(owner.clone());
        }
        if let Some(guard) = &options.guard_cgroup {
            builder = builder.guard_cgroup(guard);
        }
        let scope = builder
            .allow_held_target(options.allow_held_target)
            .attach()?;
        log::debug!("attached to {}", dir.path().display());
        Ok(Redirector {
            scope,
            programs,
            cgroup: dir.path().to_path_buf(),
            steering: options.netns.is_some(),
            netns_inode: options.netns.as_ref().and_then(|p| {
                use std::os::unix::fs::MetadataExt as _;
                std::fs::metadata(p).ok().map(|m| m.ino())
            }),
            stacked,
        })
    }

    /// The processes other than the owner that held a TO port when it
    /// attached ([`Options::allow_held_target`]).
    pub fn held_targets(&self) -> &[String] {
        self.scope.held_targets()
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The active mappings.
    pub fn mappings(&self) -> MappingSet {
        self.scope.mappings()
    }

    /// Adds a mapping at run time; connects made from now on use it. No
    /// program is reattached.
    pub fn insert(&mut self, m: Mapping) -> Result<()> {
        self.scope.add(m)
    }

    /// Removes the mapping with the same source as `m` (address, FROM port
    /// and protocol) at run time; connects and datagrams from now on are
    /// left alone, and replies to earlier datagrams are reported with their
    /// true source. Established connections keep their peer.
    pub fn remove(&mut self, m: &Mapping) -> Result<Option<Mapping>> {
        self.scope.remove(m)
    }

    /// Lets processes in the cgroup bind `port` (below 1024) without
    /// CAP_NET_BIND_SERVICE, like authbind: the bind4/6 programs return "allow,
    /// and skip the capability check" for it. Takes effect for the next
    /// `bind()`.
    ///
    /// # Minimum kernel version
    ///
    /// Linux 5.12.
    pub fn grant(&mut self, port: u16) -> Result<()> {
        self.scope.grant(port)
    }

    /// Takes back a grant; binds from now on need the capability again
    /// (sockets already bound stay bound).
    pub fn revoke(&mut self, port: u16) -> Result<bool> {
        self.scope.revoke(port)
    }

    /// The granted ports.
    pub fn grants(&self) -> Vec<u16> {
        self.scope.grants()
    }

    /// Each mapping with its statistics, in the order they were added.
    pub fn mapping_counts(&self) -> Result<Vec<(Mapping, MappingCounts)>> {
        Ok(self.scope.stats()?.mappings)
    }

    /// A snapshot for `redirect status`: mappings with their counters,
    /// global counters, and the programs with whether the kernel reports
    /// them attached right now.
    pub fn status(&self, kind: &str, started_unix: u64) -> Result<crate::status::InstanceStatus> {
        use crate::status::{InstanceStatus, MappingStatus, ProgramStatus};
        // A removed cgroup takes its programs with it; the instance still
        // runs and must still be seen (and said to be doing nothing).
        let (attached, scope_gone) = match attached_programs(&self.cgroup) {
            Ok(attached) => (attached, false),
            Err(_) if !self.cgroup.exists() => (Vec::new(), true),
            Err(e) => return Err(e),
        };
        let mut programs: Vec<ProgramStatus> = self
            .program_ids()
            .into_iter()
            .map(|(name, id)| ProgramStatus {
                name: name.to_owned(),
                id,
                attached: attached.iter().any(|p| p.id == id),
            })
            .collect();
        if self.steering {
            // sk_lookup hangs off the netns, not the cgroup; its link is
            // ours for as long as we run.
            programs.push(ProgramStatus {
                name: names::STEER.to_owned(),
                id: 0,
                attached: true,
            });
        }
        let mappings = self
            .mapping_counts()?
            .into_iter()
            .map(|(m, c)| MappingStatus::new(&m, &c))
            .collect();
        let counters = self
            .counters()?
            .values
            .into_iter()
            .map(|(c, v)| (c.name().to_owned(), v))
            .collect();
        Ok(InstanceStatus {
            pid: std::process::id(),
            kind: kind.to_owned(),
            scope: self.cgroup.clone(),
            scope_gone,
            netns_inode: self.netns_inode,
            stacked_with: self.stacked.clone(),
            held_targets: self.held_targets().to_vec(),
            started_unix,
            programs,
            mappings,
            grants: self.grants(),
            counters,
        })
    }

    /// The kernel's ids of the loaded programs, by name.
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        self.programs.program_ids()
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        self.programs.counters()
    }

    /// Takes the eBPF logger (present when [`Options::ebpf_debug_log`] was
    /// set); the caller polls it.
    pub fn take_logger(&mut self) -> Option<Logger> {
        self.programs.take_logger()
    }
}

/// The cookie of the network namespace at `path` (`SO_NETNS_COOKIE`,
/// Linux 5.14), read from a socket made in it by a short-lived thread: a
/// thread's `setns` does not touch the rest of the process.
fn netns_cookie(path: &Path) -> Result<u64> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let file = std::fs::File::open(path).map_err(|e| Error::NetnsPath {
        path: path.to_path_buf(),
        source: e,
    })?;
    let read = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<u64> {
            // SAFETY: plain syscalls on fds we own; the thread ends after.
            unsafe {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let socket = OwnedFd::from_raw_fd(fd);
                let mut cookie = 0u64;
                let mut len = size_of::<u64>() as libc::socklen_t;
                // SO_NETNS_COOKIE: not in every libc's constants yet.
                const SO_NETNS_COOKIE: libc::c_int = 71;
                if libc::getsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_NETNS_COOKIE,
                    (&raw mut cookie).cast(),
                    &mut len,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(cookie)
            }
        })
        .join()
    });
    match read {
        Ok(Ok(cookie)) => Ok(cookie),
        Ok(Err(e)) => Err(Error::io(
            "reading the cookie of network namespace",
            path,
            e,
        )),
        Err(_) => Err(Error::io(
            "reading the cookie of network namespace",
            path,
            std::io::Error::other("the thread panicked"),
        )),
    }
}

fn attach_error(program: &'static str, path: &Path, e: aya::programs::ProgramError) -> Error {
    let hint = attach_hint(&e);
    Error::Attach {
        program,
        path: path.to_path_buf(),
        source: Box::new(e),
        hint,
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
    use aya::sys;
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
    // Socket storage (Linux >= 5.2) is not probed: the probe costs ~40 ms
    // (a third of the setup budget), and creating ORIG_DST fails on such a
    // kernel anyway, with the map named in the error.
    Ok(())
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
