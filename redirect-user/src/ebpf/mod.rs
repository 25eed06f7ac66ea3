//! The eBPF backend: loads the embedded object, attaches it to a cgroup, and
//! owns the attachment for as long as the [`Redirector`] lives.
//!
//! Programs: connect4/6 and getpeername4/6 (TCP, connected UDP),
//! sendmsg4/6 and recvmsg4/6 (unconnected UDP), and a sock_ops program that
//! counts connections established through a redirect.
//!
//! # Lifetime
//!
//! Programs are attached with `bpf_link`s (Linux >= 5.7) held only by this
//! process and never pinned: dropping the [`Redirector`], returning from
//! `main`, or being killed (even by SIGKILL) closes the link fds and the
//! kernel detaches the programs at once. Nothing survives the process.

mod attached;
mod listeners;
mod privileges;

use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

pub use attached::{AttachedProgram, HOOKS, attached_programs, netns_programs};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramType, SkLookup, SockOps},
};
use aya_log::EbpfLogger;
pub use privileges::check_privileges;
use redirect_common::{
    ADDR_ANY, Addr, Counter, FLAG_UDP_BIND, MAX_MAPPINGS, MappingKey, MappingStats, MappingValue,
    PROTO_ANY, PROTO_TCP, PROTO_UDP, maps, programs,
};

use crate::{Error, Mapping, MappingSet, Proto, Result, cgroup::CgroupDir};

/// The eBPF object built by build.rs from the `redirect-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// The cgroup sock_addr programs, in attach order: bind (independent of the
/// rest) first, then the reverse paths
/// (getpeername, recvmsg) before the forward ones (connect, sendmsg), so
/// that nothing is ever rewritten while its reverse cannot be restored yet.
const PROGRAMS: [&str; 10] = [
    programs::BIND4,
    programs::BIND6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::RECVMSG4,
    programs::RECVMSG6,
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
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
    /// Also steer inbound TCP connections for FROM ports in this network
    /// namespace (`/proc/PID/ns/net`, `/run/netns/NAME`) to the listener
    /// registered for TO, with sk_lookup (Linux 5.9). Listeners are
    /// registered when a process of the scope starts listening on a TO port;
    /// existing ones are found when attaching.
    pub netns: Option<PathBuf>,
    /// Reserve the TO ports for this owner: within the scope, only it may
    /// bind them (others get EACCES), and only its listeners are registered.
    pub owner: Option<PortOwner>,
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
    /// The OWNER map entry.
    fn entry(&self) -> Result<redirect_common::Owner> {
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
    fn owns(&self, pid: i32) -> bool {
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

/// The statistics of one mapping, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingCounts {
    /// Connects (TCP and connected UDP) redirected.
    pub connects: u64,
    /// TCP connections established through the mapping and still open.
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

/// The stats slot held by a live mapping.
#[derive(Clone, Copy, Debug)]
struct Slot {
    index: u32,
    generation: u32,
}

/// Hands out [`MappingStats`] slots; a freed slot comes back with a new
/// generation, so late events of its previous mapping are not counted.
#[derive(Debug, Default)]
struct Slots {
    next: u32,
    free: Vec<Slot>,
}

impl Slots {
    fn take(&mut self) -> Option<Slot> {
        if let Some(mut slot) = self.free.pop() {
            slot.generation = slot.generation.wrapping_add(1);
            return Some(slot);
        }
        if self.next >= MAX_MAPPINGS {
            return None;
        }
        self.next += 1;
        Some(Slot {
            index: self.next - 1,
            generation: 1,
        })
    }

    fn give_back(&mut self, slot: Slot) {
        self.free.push(slot);
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
    /// The stats slot of each live mapping.
    slots: StdHashMap<MappingKey, Slot>,
    free_slots: Slots,
    /// How many live mappings have each FROM port (for the PORTS bitmap).
    ports: StdHashMap<u16, u32>,
    /// Ports granted with [`Redirector::grant`], in the order granted.
    grants: Vec<u16>,
    /// How many live mappings target each TO port (the TARGETS map).
    targets: StdHashMap<u16, u32>,
    /// The steered network namespace's path and inode, when steering.
    netns: Option<(PathBuf, u64)>,
    /// Who may bind the TO ports, if reserved.
    owner: Option<PortOwner>,
    /// Inbound UDP mode (with inbound steering): UDP services of the scope
    /// bind FROM instead of TO.
    udp_inbound: bool,
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
        log::debug!("loading the eBPF object");
        // EbpfLoader::new() parses the kernel's BTF (/sys/kernel/btf/vmlinux,
        // ~30 ms here, over half of the setup time) for CO-RE relocations,
        // which these programs do not use; aya 0.14 offers no way to skip
        // the parse, only to discard its result.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
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
            slots: StdHashMap::new(),
            free_slots: Slots::default(),
            ports: StdHashMap::new(),
            grants: Vec::new(),
            targets: StdHashMap::new(),
            netns: None,
            owner: options.owner.clone(),
            udp_inbound: options.netns.is_some(),
            logger,
        };
        if let Some(owner) = &options.owner {
            let entry = owner.entry()?;
            let name = maps::OWNER;
            redirector
                .map_mut::<Array<_, redirect_common::Owner>>(name)?
                .set(0, entry, 0)
                .map_err(|e| map_error("writing", name, e))?;
        }
        for m in mappings.iter() {
            redirector.insert(m)?;
        }
        let load_error = |program| {
            move |e| Error::LoadProgram {
                program,
                source: Box::new(e),
            }
        };
        for name in PROGRAMS {
            redirector
                .program::<CgroupSockAddr>(name)?
                .load()
                .map_err(load_error(name))?;
        }
        let sock_ops = programs::SOCK_OPS;
        redirector
            .program::<SockOps>(sock_ops)?
            .load()
            .map_err(load_error(sock_ops))?;
        // sock_ops only counts: attach it first so that every redirected
        // connection is counted from the start.
        redirector
            .program::<SockOps>(sock_ops)?
            .attach(dir.as_fd(), CgroupAttachMode::Single)
            .map_err(|e| attach_error(sock_ops, dir.path(), e))?;
        for name in PROGRAMS {
            // `Single` means "no flags": a cgroup bpf_link always coexists
            // with other programs on this cgroup and its ancestors (as
            // BPF_F_ALLOW_MULTI would), and the kernel rejects any flag on
            // BPF_LINK_CREATE for cgroups with EINVAL.
            redirector
                .program::<CgroupSockAddr>(name)?
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| attach_error(name, dir.path(), e))?;
        }
        if let Some(path) = &options.netns {
            redirector.steer(path)?;
        }
        log::debug!("attached to {}", redirector.cgroup.display());
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
        let key = table_key(&m);
        let slot = self.free_slots.take().ok_or(crate::MappingError::TooMany {
            count: MAX_MAPPINGS as usize + 1,
            max: MAX_MAPPINGS,
        })?;
        // Stats first, then the port bit, then the mapping itself: when the
        // mapping goes live everything it touches is ready.
        let written = self.reset_stats(slot).and_then(|()| {
            *self.ports.entry(m.from).or_default() += 1;
            self.write_port_word(m.from)?;
            *self.targets.entry(m.to).or_default() += 1;
            self.write_target(m.to)?;
            let udp_bind = self.udp_inbound && m.proto != Proto::Tcp;
            if udp_bind {
                self.map_mut::<HashMap<_, u16, u16>>(maps::UDP_BINDS)?
                    .insert(m.to, m.from, 0)
                    .map_err(|e| map_error("writing", maps::UDP_BINDS, e))?;
            }
            let value = MappingValue {
                port: m.to,
                flags: if udp_bind { FLAG_UDP_BIND } else { 0 },
                slot: slot.index,
                generation: slot.generation,
            };
            self.map_mut::<HashMap<_, MappingKey, MappingValue>>(maps::MAPPINGS)?
                .insert(key, value, 0)
                .map_err(|e| map_error("writing", maps::MAPPINGS, e))
        });
        if let Err(e) = written {
            self.release_port(m.from);
            self.release_target(m.to);
            self.free_slots.give_back(slot);
            return Err(e);
        }
        self.slots.insert(key, slot);
        self.mappings = next;
        if self.netns.is_some() {
            self.register_existing(&[m.to].into())?;
        }
        Ok(())
    }

    /// Removes the mapping with the same source as `m` (address, FROM port
    /// and protocol) at run time; connects and datagrams from now on are
    /// left alone, and replies to earlier datagrams are reported with their
    /// true source. Established connections keep their peer.
    pub fn remove(&mut self, m: &Mapping) -> Result<Option<Mapping>> {
        let Some(existing) = self.mappings.get(m) else {
            return Ok(None);
        };
        let key = table_key(&existing);
        self.map_mut::<HashMap<_, MappingKey, MappingValue>>(maps::MAPPINGS)?
            .remove(&key)
            .map_err(|e| map_error("writing", maps::MAPPINGS, e))?;
        self.release_port(existing.from);
        self.release_target(existing.to);
        if self.udp_inbound && existing.proto != Proto::Tcp {
            match self
                .map_mut::<HashMap<_, u16, u16>>(maps::UDP_BINDS)?
                .remove(&existing.to)
            {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_error("writing", maps::UDP_BINDS, e)),
            }
        }
        if let Some(slot) = self.slots.remove(&key) {
            self.free_slots.give_back(slot);
        }
        Ok(self.mappings.remove(m))
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
        crate::mapping::parse_grant(&port.to_string())?;
        if self.grants.contains(&port) {
            return Ok(());
        }
        let name = maps::GRANTS;
        self.map_mut::<HashMap<_, u16, u8>>(name)?
            .insert(port, 1, 0)
            .map_err(|e| map_error("writing", name, e))?;
        self.grants.push(port);
        Ok(())
    }

    /// Takes back a grant; binds from now on need the capability again
    /// (sockets already bound stay bound).
    pub fn revoke(&mut self, port: u16) -> Result<bool> {
        let Some(i) = self.grants.iter().position(|p| *p == port) else {
            return Ok(false);
        };
        let name = maps::GRANTS;
        self.map_mut::<HashMap<_, u16, u8>>(name)?
            .remove(&port)
            .map_err(|e| map_error("writing", name, e))?;
        self.grants.remove(i);
        Ok(true)
    }

    /// The granted ports.
    pub fn grants(&self) -> &[u16] {
        &self.grants
    }

    /// Each mapping with its statistics, in the order they were added.
    pub fn mapping_counts(&self) -> Result<Vec<(Mapping, MappingCounts)>> {
        let stats = self.map::<PerCpuHashMap<_, u32, MappingStats>>(maps::STATS)?;
        self.mappings
            .iter()
            .map(|m| {
                let Some(slot) = self.slots.get(&table_key(&m)) else {
                    return Ok((m, MappingCounts::default()));
                };
                let per_cpu = stats
                    .get(&slot.index, 0)
                    .map_err(|e| map_error("reading", maps::STATS, e))?;
                let mut counts = MappingCounts::default();
                for s in per_cpu.iter().filter(|s| s.generation == slot.generation) {
                    counts.connects = counts.connects.wrapping_add(s.connects);
                    counts.established = counts.established.wrapping_add(s.established);
                    counts.datagrams = counts.datagrams.wrapping_add(s.datagrams);
                }
                Ok((m, counts))
            })
            .collect()
    }

    /// A snapshot for `redirect status`: mappings with their counters,
    /// global counters, and the programs with whether the kernel reports
    /// them attached right now.
    pub fn status(&self, kind: &str, started_unix: u64) -> Result<crate::status::InstanceStatus> {
        use crate::status::{InstanceStatus, MappingStatus, ProgramStatus};
        let attached = attached_programs(&self.cgroup)?;
        let programs = self
            .program_ids()
            .into_iter()
            .map(|(name, id)| ProgramStatus {
                name: name.to_owned(),
                id,
                // sk_lookup hangs off the netns, not the cgroup; its link
                // is ours for as long as we run.
                attached: attached.iter().any(|p| p.id == id)
                    || (name == programs::STEER && self.netns.is_some()),
            })
            .collect();
        let mappings = self
            .mapping_counts()?
            .into_iter()
            .map(|(m, c)| MappingStatus {
                mapping: m.to_string(),
                from: m.from,
                to: m.to,
                proto: m.proto.as_str().to_owned(),
                address: m.addr.map(|a| a.to_string()),
                redirected: c.redirected(),
                connects: c.connects,
                established: c.established,
                datagrams: c.datagrams,
            })
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
            started_unix,
            programs,
            mappings,
            grants: self.grants.clone(),
            counters,
        })
    }

    /// The kernel's ids of the loaded programs, by name.
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        PROGRAMS
            .iter()
            .chain(&[programs::SOCK_OPS, programs::STEER])
            .filter_map(|&name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((name, info.id()))
            })
            .collect()
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let array = self.map::<PerCpuArray<_, u64>>(maps::COUNTERS)?;
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

    /// The map `name`, as its typed view `M` (read-only).
    fn map<'a, M>(&'a self, name: &'static str) -> Result<M>
    where
        M: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .ok_or(Error::Missing { kind: "map", name })?;
        M::try_from(map).map_err(|e| map_error("opening", name, e))
    }

    /// The map `name`, as its typed view `M`.
    fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::Missing { kind: "map", name })?;
        M::try_from(map).map_err(|e| map_error("opening", name, e))
    }

    /// The program `name`, as its type `P`.
    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(Error::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(|e| Error::LoadProgram {
                program: name,
                source: Box::new(e),
            })
    }

    /// Zeroes the stats of `slot` on every CPU and stamps its generation.
    fn reset_stats(&mut self, slot: Slot) -> Result<()> {
        let name = maps::STATS;
        let cpus =
            aya::util::nr_cpus().map_err(|(path, source)| Error::io("reading", path, source))?;
        let fresh = MappingStats {
            generation: slot.generation,
            ..MappingStats::default()
        };
        let values = PerCpuValues::try_from(vec![fresh; cpus])
            .map_err(|e| Error::io("building per-CPU stats for", name, e))?;
        self.map_mut::<PerCpuHashMap<_, u32, MappingStats>>(name)?
            .insert(slot.index, values, 0)
            .map_err(|e| map_error("writing", name, e))
    }

    /// Attaches the sk_lookup program to the network namespace at `path`,
    /// after registering the listeners that already exist there.
    fn steer(&mut self, path: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let netns = std::fs::File::open(path).map_err(|e| {
            Error::io(
                "opening network namespace (pass --netns /proc/PID/ns/net or /run/netns/NAME)",
                path,
                e,
            )
        })?;
        let ino = netns
            .metadata()
            .map_err(|e| Error::io("reading", path, e))?
            .ino();
        self.netns = Some((path.to_path_buf(), ino));
        let name = programs::STEER;
        let program = self.program::<SkLookup>(name)?;
        program.load().map_err(|e| Error::LoadProgram {
            program: name,
            source: Box::new(e),
        })?;
        let targets = self.targets.keys().copied().collect();
        self.register_existing(&targets)?;
        self.program::<SkLookup>(name)?
            .attach(netns)
            .map_err(|e| attach_error(name, path, e))?;
        Ok(())
    }

    /// Registers the listeners on `ports` that processes of the scope
    /// already have in the steered namespace.
    fn register_existing(&mut self, ports: &std::collections::HashSet<u16>) -> Result<()> {
        let Some((_, ino)) = &self.netns else {
            return Ok(());
        };
        let mut found = listeners::find(&self.cgroup, *ino, ports);
        if let Some(owner) = &self.owner {
            found.retain(|l| {
                let owned = owner.owns(l.pid);
                if !owned {
                    log::warn!(
                        "not registering the listener on port {} of pid {}: it is not the owner",
                        l.port,
                        l.pid
                    );
                }
                owned
            });
        } else {
            listeners::warn_mixed_owners(&found);
        }
        let name = maps::LISTENERS;
        let mut hash = self.map_mut::<aya::maps::SockHash<_, u32>>(name)?;
        for l in found {
            use std::os::fd::AsRawFd as _;
            hash.insert(u32::from(l.port), l.fd.as_raw_fd(), 0)
                .map_err(|e| map_error("writing", name, e))?;
            log::info!(
                "registered the listener on port {} of pid {}",
                l.port,
                l.pid
            );
        }
        Ok(())
    }

    /// Writes TARGETS[port] from `self.targets` (or removes it).
    fn write_target(&mut self, port: u16) -> Result<()> {
        let name = maps::TARGETS;
        let count = self.targets.get(&port).copied().unwrap_or(0);
        let mut targets = self.map_mut::<HashMap<_, u16, u32>>(name)?;
        if count == 0 {
            match targets.remove(&port) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_error("writing", name, e)),
            }
        } else {
            targets
                .insert(port, count, 0)
                .map_err(|e| map_error("writing", name, e))
        }
    }

    /// Drops one reference to TO port `port`.
    fn release_target(&mut self, port: u16) {
        release(&mut self.targets, port);
        if let Err(e) = self.write_target(port) {
            log::warn!("{e}");
        }
    }

    /// Drops one reference to FROM port `port` and updates its bit.
    fn release_port(&mut self, port: u16) {
        release(&mut self.ports, port);
        if let Err(e) = self.write_port_word(port) {
            // A stale bit only costs a few hash lookups that miss.
            log::warn!("{e}");
        }
    }

    /// Writes the PORTS word holding `port`'s bit from `self.ports`.
    fn write_port_word(&mut self, port: u16) -> Result<()> {
        let index = u32::from(port / 64);
        let base = index * 64;
        let word = (0..64u32)
            .filter(|bit| self.ports.contains_key(&((base + bit) as u16)))
            .fold(0u64, |w, bit| w | (1 << bit));
        let name = maps::PORTS;
        self.map_mut::<Array<_, u64>>(name)?
            .set(index, word, 0)
            .map_err(|e| map_error("writing", name, e))
    }
}

/// Drops one reference to `port` in a reference count, forgetting it at 0.
fn release(counts: &mut StdHashMap<u16, u32>, port: u16) {
    if let Some(n) = counts.get_mut(&port) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&port);
        }
    }
}

/// The MAPPINGS key of `m`: IPv4 as `::ffff:a.b.c.d`, in network order
/// words, as the programs read `user_ip4`/`user_ip6`.
fn table_key(m: &Mapping) -> MappingKey {
    let addr: Addr = match m.addr {
        None => ADDR_ANY,
        Some(ip) => {
            let v6 = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let b = v6.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            })
        }
    };
    let proto = match m.proto {
        Proto::Any => PROTO_ANY,
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    };
    MappingKey::new(addr, m.from, proto)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name in redirect-common exists in the embedded object, so the
    /// two sides cannot drift. Parsing needs no privileges.
    #[test]
    fn ipv4_keys_are_v4_mapped_in_network_order() {
        let m: Mapping = "127.0.0.1:443:8443/tcp".parse().unwrap();
        let key = table_key(&m);
        let bytes: Vec<u8> = key.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
        assert_eq!((key.port, key.proto), (443, PROTO_TCP));
        assert_eq!(table_key(&"443:8443".parse().unwrap()).addr, ADDR_ANY);
    }

    #[test]
    fn freed_slots_come_back_with_a_new_generation() {
        let mut slots = Slots::default();
        let a = slots.take().unwrap();
        let b = slots.take().unwrap();
        assert_ne!(a.index, b.index);
        slots.give_back(a);
        let c = slots.take().unwrap();
        assert_eq!(c.index, a.index);
        assert_ne!(c.generation, a.generation);
    }

    #[test]
    fn embedded_object_has_every_shared_name() {
        let obj = aya_obj::Object::parse(OBJECT).expect("parse embedded object");
        for name in PROGRAMS
            .iter()
            .chain(&[programs::SOCK_OPS, programs::STEER])
        {
            assert!(obj.programs.contains_key(*name), "program {name} missing");
        }
        for name in [
            maps::MAPPINGS,
            maps::PORTS,
            maps::ORIG_DST,
            maps::REV_NAT,
            maps::STATS,
            maps::COUNTERS,
            maps::GRANTS,
            maps::LISTENERS,
            maps::TARGETS,
            maps::OWNER,
            maps::UDP_BINDS,
        ] {
            assert!(obj.maps.contains_key(name), "map {name} missing");
        }
    }
}
