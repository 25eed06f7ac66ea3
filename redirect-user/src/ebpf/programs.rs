//! The loaded program set: the object is loaded once (aya parses the
//! kernel's BTF once, ~30 ms) and its programs are attached to as many
//! scopes as asked, each scope's mappings, grants, owner and counters
//! keyed by its scope id in shared maps.
//!
//! What is per scope and what is shared:
//!
//! - shared (one copy): every map the cgroup programs use, keyed by scope
//!   id (`MAPPINGS`, `PORTS`, `TARGETS`, `GRANTS`, `OWNERS`, `UDP_BINDS`),
//!   plus `SCOPES` (cgroup id → scope id), `LEVELS`, `STATS`, `REV_NAT`,
//!   `ORIG_DST`, `UDP_PEERS`, `COUNTERS`;
//! - per scope: one `bpf_link` per cgroup hook on the scope's cgroup, and,
//!   when the scope steers a network namespace, a small *steering
//!   instance*: `sk_lookup` on the namespace and `sockops_listen` on the
//!   cgroup, loaded with the scope id as a constant and with maps of their
//!   own. Why: an sk_lookup program cannot tell which namespace it runs in
//!   (its context has no netns, and `bpf_get_netns_cookie` is not offered
//!   to it), so one program per namespace is the only way to keep two
//!   namespaces' mappings for the same port apart (tubular also runs one
//!   dispatcher per namespace).
//!
//! Everything here is synchronous and quick (map writes, a few syscalls);
//! callers on a tokio runtime should still use `spawn_blocking` for
//! attaching, which reads /proc and may load a steering instance.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, PerCpuValues, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, Program, links::FdLink},
};
use aya_log::EbpfLogger;
use redirect_common::{
    ADDR_ANY, Addr, Counter, FLAG_SHARED_TO, FLAG_UDP_BIND, GLOBAL_UDP, GuardKey, MAX_LEVEL,
    MAX_MAPPINGS, MAX_SCOPE_DEPTHS, MAX_SCOPES, MappingKey, MappingStats, MappingValue, Owner,
    PROTO_ANY, PROTO_TCP, PROTO_UDP, REVERSE_SHARED, Reverse, SHAPE_TARGET, ScopeCell, ScopePort,
    SlotCounts, SteerConfig, Target, UdpBind, globals, listener_key, maps, programs, shape,
};

use super::{
    Counters, Logger, MappingCounts, PortOwner, attach_error,
    cell::{CellState, Uses},
    check_privileges, listeners, map_error, pin,
    port_bits::PortBits,
    probe_kernel, raise_memlock_limit,
    steering::SteerPool,
};
use crate::{Error, Mapping, MappingSet, Proto, Result, cgroup::CgroupDir};

/// The eBPF object built by build.rs from the `redirect-ebpf` crate.
static EMBEDDED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// The environment variable naming an eBPF object file to load instead of
/// the embedded one: how the upgrade test runs the daemon on another
/// build of the programs (tests/tests/upgrade.rs). The object must be a
/// build of this version's `redirect-ebpf` (same maps and layout); a root
/// process's environment is its own to set, so this grants nothing.
pub const OBJECT_ENV: &str = "REDIRECT_EBPF_OBJECT";

/// The object to load: the file [`OBJECT_ENV`] names, read once, or the
/// embedded one (also when the file cannot be read, with a warning).
pub(crate) fn object() -> &'static [u8] {
    static OBJECT: std::sync::OnceLock<&'static [u8]> = std::sync::OnceLock::new();
    OBJECT.get_or_init(|| {
        let Some(path) = std::env::var_os(OBJECT_ENV) else {
            return EMBEDDED;
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                log::info!(
                    "loading the eBPF object {} ({OBJECT_ENV})",
                    Path::new(&path).display()
                );
                // 8-byte aligned, as the ELF parser wants (a Vec<u8> is
                // only guaranteed 1).
                let mut words = vec![0u64; bytes.len().div_ceil(8)];
                // SAFETY: u64 has no invalid bit patterns; the byte view
                // covers exactly the words' memory.
                let view = unsafe {
                    std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8)
                };
                view[..bytes.len()].copy_from_slice(&bytes);
                let words: &'static [u64] = Vec::leak(words);
                // SAFETY: as above, read-only from now on.
                unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), bytes.len()) }
            }
            Err(e) => {
                log::warn!(
                    "{OBJECT_ENV}={}: {e}; loading the embedded object",
                    Path::new(&path).display()
                );
                EMBEDDED
            }
        }
    })
}

/// The programs every scope links, in attach order: the reverse paths
/// (getpeername, recvmsg) before the forward ones (connect, sendmsg), so
/// that nothing is ever rewritten while its reverse cannot be restored yet.
/// bind4/6 ([`BIND_PROGRAMS`]) are loaded and linked only for a scope that
/// needs them (grants, an owner, inbound UDP): they return 3 (Linux 5.12),
/// which an older verifier refuses, and nothing else needs them.
pub const BASE_PROGRAMS: [&str; 8] = [
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::RECVMSG4,
    programs::RECVMSG6,
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
];

/// bind4/6: grants, owners, inbound UDP.
pub const BIND_PROGRAMS: [&str; 2] = [programs::BIND4, programs::BIND6];

/// guard4/6: the owner's TO for a whole namespace, linked above the scope
/// (`--guard-cgroup`).
pub const GUARD_PROGRAMS: [&str; 2] = [programs::GUARD4, programs::GUARD6];

/// The maps of the shared instance that are pinned and reused.
const SHARED_MAPS: [&str; 20] = [
    maps::FROM_PORTS,
    maps::SCOPE_CELL,
    maps::COUNTS,
    maps::SCOPES,
    maps::REVERSE,
    maps::TO_PORTS,
    maps::GLOBAL,
    maps::LEVELS,
    maps::MAPPINGS,
    maps::PORTS,
    maps::GRANTS,
    maps::TARGETS,
    maps::OWNERS,
    maps::UDP_BINDS,
    maps::REV_NAT,
    maps::STATS,
    maps::COUNTERS,
    maps::ORIG_DST,
    maps::UDP_PEERS,
    maps::GUARDS,
];

/// aya's loader keeps `&'a` references to global values; these live for
/// the whole program.
pub(super) static LOG_OFF: u8 = 0;
pub(super) static LOG_DEBUG: u8 = 4;
pub(super) static ONE: u8 = 1;

/// How to load the program set.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin maps and links under this directory (on bpffs; see
    /// [`pin::DEFAULT_PIN_DIR`]) so that they outlive the process: what is
    /// pinned there already is adopted, never attached twice. `None`: the
    /// process owns everything and the kernel detaches it when the process
    /// exits.
    pub pin_dir: Option<PathBuf>,
    /// Log each rewrite from the eBPF side (aya-log, debug level). Off by
    /// default: the verifier then removes the logging code entirely.
    pub ebpf_debug_log: bool,
    /// Steering instances (what a scope with a network namespace needs)
    /// to keep loaded ahead of time, refilled on a thread of the program
    /// set's own: a steered scope then attaches in well under a
    /// millisecond instead of ~15 ms. For programs sets that add steered
    /// scopes often (the daemon uses 2); 0, the default, loads each when
    /// its scope is attached and starts no thread.
    pub steer_pool: usize,
}

/// The loaded program set, shared by every [`Scope`](super::Scope) made
/// from it. Cheap to clone (a reference count).
///
/// # Minimum kernel version
///
/// Linux 5.8 (getpeername hooks); 5.9 for steering.
#[derive(Clone)]
pub struct Programs {
    pub(super) shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programs").finish_non_exhaustive()
    }
}

/// What one attached scope is made of.
pub(super) struct ScopeState {
    pub(super) id: u32,
    pub(super) name: String,
    pub(super) cgroup: PathBuf,
    pub(super) cgroup_id: u64,
    pub(super) level: u32,
    pub(super) netns: Option<(PathBuf, u64)>,
    pub(super) owner: Option<PortOwner>,
    pub(super) mappings: MappingSet,
    /// `mappings` by port.
    index: PortIndex,
    pub(super) slots: StdHashMap<MappingKey, Slot>,
    pub(super) grants: Vec<u16>,
    /// Whether bind4/6 are linked to the scope's cgroup.
    bind_linked: bool,
    links: Vec<ScopeLink>,
    steer: Option<Ebpf>,
    /// With `--guard-cgroup`: the cookie of the namespace whose TO ports
    /// are guarded (see [`Shared::attach_guard`]).
    pub(super) guard: Option<u64>,
    /// The scope's cell (see `cell.rs`), kept up to date with `index`.
    cell: CellState,
    /// Whether the scope's cell exists (its programs are linked) and so
    /// is rewritten on every change.
    cell_live: bool,
}

/// The scope's mappings by FROM and by TO port, so that writing the tables
/// of one port never walks every mapping (10,000 mappings would make each
/// insert quadratic).
#[derive(Default)]
pub(super) struct PortIndex {
    by_from: StdHashMap<u16, Vec<Mapping>>,
    by_to: StdHashMap<u16, Vec<Mapping>>,
}

impl PortIndex {
    fn add(&mut self, m: Mapping) {
        self.by_from.entry(m.from).or_default().push(m);
        self.by_to.entry(m.to).or_default().push(m);
    }

    fn remove(&mut self, m: &Mapping) {
        for (map, port) in [(&mut self.by_from, m.from), (&mut self.by_to, m.to)] {
            if let Some(list) = map.get_mut(&port) {
                list.retain(|o| o != m);
                if list.is_empty() {
                    map.remove(&port);
                }
            }
        }
    }

    fn from(&self, port: u16) -> &[Mapping] {
        self.by_from.get(&port).map_or(&[], Vec::as_slice)
    }

    fn to(&self, port: u16) -> &[Mapping] {
        self.by_to.get(&port).map_or(&[], Vec::as_slice)
    }

    /// Every port some mapping uses, as FROM or as TO (a port may come
    /// twice).
    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.by_from.keys().chain(self.by_to.keys()).copied()
    }
}

/// One link of a scope: owned by this process (closing it detaches), or
/// pinned (it stays until its pin is removed).
enum ScopeLink {
    Owned(FdLink),
    Pinned(PathBuf),
}

/// The stats slot held by a live mapping.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub(super) index: u32,
    pub(super) generation: u32,
}

/// Hands out [`MappingStats`] slots. Generations come from one counter
/// seeded above every generation in use (and the clock), so a reused
/// slot never matches a late event of its previous mapping, across
/// restarts too.
#[derive(Debug)]
pub(super) struct Slots {
    next: u32,
    free: Vec<u32>,
    generation: u32,
}

impl Slots {
    fn new(used: &[Slot]) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        let max_gen = used.iter().map(|s| s.generation).max().unwrap_or(0);
        let next = used.iter().map(|s| s.index + 1).max().unwrap_or(0);
        let in_use: HashSet<u32> = used.iter().map(|s| s.index).collect();
        Slots {
            next,
            free: (0..next).filter(|i| !in_use.contains(i)).collect(),
            generation: max_gen.max(now).wrapping_add(1),
        }
    }

    pub(super) fn take(&mut self) -> Option<Slot> {
        let index = match self.free.pop() {
            Some(i) => i,
            None if self.next < MAX_MAPPINGS => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.generation = self.generation.wrapping_add(1).max(1);
        Some(Slot {
            index,
            generation: self.generation,
        })
    }

    pub(super) fn give_back(&mut self, slot: Slot) {
        self.free.push(slot.index);
    }
}

/// Everything behind the [`Programs`] lock.
pub(super) struct Shared {
    ebpf: Ebpf,
    steer_pool: Arc<SteerPool>,
    pin_dir: Option<PathBuf>,
    pub(super) scopes: BTreeMap<u32, ScopeState>,
    /// How many scopes sit at each cgroup depth (the LEVELS bitmask).
    levels: [u32; MAX_LEVEL as usize + 1],
    slots: Slots,
    /// Whether any mapping covering UDP ever existed in this program set
    /// (the GLOBAL_UDP bit). Never cleared: the reverse entries of a
    /// removed mapping must still be found stale and deleted by recvmsg.
    udp_seen: bool,
    logger: Option<Logger>,
    /// Possible CPUs (the per-CPU values' count), read once.
    cpus: usize,
    /// The REVERSE keys of the shared instance (scope, TO port), and how
    /// many there are per port: the TO_PORTS bits (read once at load).
    to_ports: PortBits,
    /// The (scope, port) pairs with a FROM, behind the FROM_PORTS bits.
    from_ports: PortBits,
    /// Scope ids in use: this process's scopes and those pinned (read once
    /// at load, then kept up to date, so that a new scope's id is found
    /// without walking the SCOPES map).
    taken: HashSet<u32>,
    /// The kernel's id of the SCOPE_CELL map: a pinned link whose program
    /// does not use this map was made by an older build and is re-created
    /// rather than updated (see [`link_or_adopt`]).
    cell_map_id: u32,
}

impl Programs {
    /// Loads the program set. With [`LoadOptions::pin_dir`], maps are
    /// pinned (and reused when pinned already, after a layout check).
    ///
    /// Checks privileges and the kernel first; loads every cgroup program,
    /// attaches nothing.
    pub fn load(options: &LoadOptions) -> Result<Self> {
        check_privileges()?;
        crate::kernel::check_version()?;
        probe_kernel()?;
        raise_memlock_limit();
        if let Some(dir) = &options.pin_dir {
            pin::prepare(dir)?;
        }
        // Without parsing the kernel's BTF, which these programs do not need.
        let mut loader = super::loader::without_kernel_btf();
        let level = if options.ebpf_debug_log {
            &LOG_DEBUG
        } else {
            &LOG_OFF
        };
        loader.override_global("AYA_LOG_LEVEL", level, true);
        // bpf_set_retval reached sock_addr programs in 6.1: below that the
        // call must be dead code the verifier removes.
        let set_retval = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 1, 0));
        loader.override_global(
            globals::HAS_SET_RETVAL,
            if set_retval { &ONE } else { &LOG_OFF },
            true,
        );
        if let Some(dir) = &options.pin_dir {
            for name in SHARED_MAPS {
                let path = pin::map_path(dir, name);
                pin::check_pinned_map(&path, name)?;
                loader.map_pin_path(name, path);
            }
        }
        log::debug!("loading the eBPF object");
        let mut ebpf = loader
            .load(object())
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
        load_in_parallel(&mut ebpf, &BASE_PROGRAMS)?;
        let used = used_slots(&ebpf)?;
        let cpus =
            aya::util::nr_cpus().map_err(|(path, source)| Error::io("reading", path, source))?;
        let mut taken: HashSet<u32> = map::<HashMap<_, u64, u32>>(&ebpf, maps::SCOPES)?
            .iter()
            .filter_map(|r| r.ok())
            .map(|(_, s)| s)
            .collect();
        if let Some(dir) = &options.pin_dir
            && let Ok(entries) = std::fs::read_dir(pin::layout_dir(dir).join("scopes"))
        {
            taken.extend(
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok()),
            );
        }
        // TO_PORTS from REVERSE (a pin directory made before TO_PORTS
        // existed, or any restart: the bits are rebuilt, never trusted).
        let to_ports = PortBits::new(
            map::<HashMap<_, ScopePort, Reverse>>(&ebpf, maps::REVERSE)?
                .keys()
                .filter_map(|k| k.ok())
                .map(|k| (k.scope, k.port)),
        );
        write_port_bits(&mut ebpf, maps::TO_PORTS, &to_ports)?;
        // FROM_PORTS likewise, from the PORTS entries with a FROM shape.
        let from_ports = PortBits::new(
            map::<HashMap<_, ScopePort, u8>>(&ebpf, maps::PORTS)?
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(_, shapes)| shapes & !SHAPE_TARGET != 0)
                .map(|(k, _)| (k.scope, k.port)),
        );
        write_port_bits(&mut ebpf, maps::FROM_PORTS, &from_ports)?;
        let cell_map_id = cell_map(&ebpf)?
            .info()
            .map_err(|e| map_error("reading", maps::SCOPE_CELL, e))?
            .id();
        let steer_pool = SteerPool::new(options.steer_pool, options.ebpf_debug_log, set_retval);
        steer_pool.fill(std::time::Duration::ZERO);
        Ok(Programs {
            shared: Arc::new(Mutex::new(Shared {
                ebpf,
                steer_pool,
                pin_dir: options.pin_dir.clone(),
                scopes: BTreeMap::new(),
                levels: [0; MAX_LEVEL as usize + 1],
                slots: Slots::new(&used),
                udp_seen: false,
                logger,
                cpus,
                taken,
                to_ports,
                from_ports,
                cell_map_id,
            })),
        })
    }

    /// Loads the program set from the pin directory of `options` (which
    /// must name one) and adopts every scope pinned there, as it is: each
    /// keeps its links (their programs are swapped for this build's with
    /// `BPF_LINK_UPDATE`, never detached), its maps and counters; nothing
    /// is written that the pins do not already say. For a process that
    /// restarts without a record of its scopes; one that has one (the
    /// daemon) declares them with [`Programs::scope`] instead.
    ///
    /// A pinned scope whose cgroup is gone is removed; one whose steered
    /// namespace can no longer be named is adopted without steering being
    /// re-created (its pinned links stay). Scope names are not pinned: each
    /// adopted scope is named after its cgroup.
    pub fn open_pinned(options: &LoadOptions) -> Result<(Programs, Vec<super::Scope>)> {
        let Some(dir) = &options.pin_dir else {
            return Err(Error::PinDir {
                path: PathBuf::new(),
                reason: "open_pinned needs a pin directory".into(),
                hint: "set LoadOptions::pin_dir".into(),
            });
        };
        let programs = Programs::load(options)?;
        let root = crate::cgroup::cgroup2_root()?;
        let pinned = programs.lock().pinned_scopes()?;
        let mut scopes = Vec::with_capacity(pinned.len());
        for (cgroup_id, id) in pinned {
            let Some(cgroup) = super::adopt::cgroup_by_id(&root, cgroup_id) else {
                log::info!("pinned scope {id}: its cgroup is gone; removing it");
                programs.remove_pinned_scope(id)?;
                continue;
            };
            let (mappings, grants, owner) = programs.lock().pinned_spec(id, &root)?;
            let mut builder = programs
                .scope(&cgroup)
                .mappings(mappings)
                .allow_held_target(true);
            for port in grants {
                builder = builder.grant(port);
            }
            if let Some(owner) = owner {
                builder = builder.owner(owner);
            }
            let steer = pin::scope_dir(dir, id).join("steer/maps").join(maps::STEER);
            if let Some(cookie) = pinned_steer_cookie(&steer) {
                match super::adopt::netns_by_cookie(cookie) {
                    Some(netns) => builder = builder.netns(netns),
                    None => log::warn!(
                        "pinned scope {id}: its network namespace cannot be named any more; \
                         adopted without steering"
                    ),
                }
            }
            scopes.push(builder.attach()?);
        }
        Ok((programs, scopes))
    }

    /// Starts describing a scope on the cgroup v2 directory `cgroup`.
    pub fn scope(&self, cgroup: impl AsRef<Path>) -> super::ScopeBuilder {
        super::ScopeBuilder::new(self.clone(), cgroup.as_ref())
    }

    /// Scope ids present in the pinned state that no scope of this process
    /// has adopted yet (after a restart: scopes to re-declare or remove).
    pub fn unclaimed_pinned_scopes(&self) -> Result<Vec<u32>> {
        let shared = self.lock();
        let Some(dir) = &shared.pin_dir else {
            return Ok(Vec::new());
        };
        let scopes_dir = pin::layout_dir(dir).join("scopes");
        let mut ids = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&scopes_dir) {
            for e in entries.flatten() {
                if let Ok(id) = e.file_name().to_string_lossy().parse::<u32>()
                    && !shared.scopes.contains_key(&id)
                {
                    ids.push(id);
                }
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Detaches and forgets a pinned scope no one claimed (see
    /// [`Programs::unclaimed_pinned_scopes`]).
    pub fn remove_pinned_scope(&self, id: u32) -> Result<()> {
        let mut shared = self.lock();
        let Some(dir) = shared.pin_dir.clone() else {
            return Ok(());
        };
        // Its links first: the hooks stop running for it.
        let scope_dir = pin::scope_dir(&dir, id);
        let _ = pin::reset(&scope_dir);
        shared.forget_scope_maps(id, None)?;
        Ok(())
    }

    /// The programs' global counters (every scope), summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let shared = self.lock();
        let mut counters = counters_of(&shared.ebpf)?;
        for scope in shared.scopes.values() {
            if let Some(steer) = &scope.steer {
                for (c, v) in counters_of(steer)?.values {
                    counters.add(c, v);
                }
            }
        }
        Ok(counters)
    }

    /// Takes the eBPF logger (present with [`LoadOptions::ebpf_debug_log`]);
    /// the caller polls it.
    pub fn take_logger(&self) -> Option<Logger> {
        self.lock().logger.take()
    }

    /// The kernel's ids of the loaded cgroup programs, by name.
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        let shared = self.lock();
        BIND_PROGRAMS
            .iter()
            .chain(&BASE_PROGRAMS)
            .filter_map(|&name| {
                let info = shared.ebpf.program(name)?.info().ok()?;
                Some((name, info.id()))
            })
            .collect()
    }

    /// The pin directory, when state is pinned.
    pub fn pin_dir(&self) -> Option<PathBuf> {
        self.lock().pin_dir.clone()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves maps as consistent as any
        // crash would: keep going.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a scope is asked to be.
pub(super) struct ScopeRequest {
    pub(super) name: String,
    pub(super) cgroup: PathBuf,
    pub(super) netns: Option<PathBuf>,
    pub(super) owner: Option<PortOwner>,
    pub(super) mappings: MappingSet,
    pub(super) grants: Vec<u16>,
    pub(super) guard_cgroup: Option<PathBuf>,
}

impl Shared {
    /// Attaches (or adopts, when pinned state for its cgroup exists) a
    /// scope; on error nothing of it stays attached.
    pub(super) fn attach_scope(&mut self, req: ScopeRequest) -> Result<u32> {
        use std::os::unix::fs::MetadataExt as _;
        let dir = CgroupDir::open(&req.cgroup)?;
        let cgroup = dir.path().to_path_buf();
        let root = crate::cgroup::cgroup2_root()?;
        let level = cgroup
            .strip_prefix(&root)
            .map(|rel| rel.components().count() as u32)
            .map_err(|_| Error::NotCgroup2 {
                path: cgroup.clone(),
                reason: format!("it is not below {}", root.display()),
                hint: format!(", such as {}", root.display()),
            })?;
        if level > MAX_LEVEL {
            return Err(Error::ScopeConflict(format!(
                "scope {}: cgroup {} is {level} levels deep; at most {MAX_LEVEL} are supported",
                req.name,
                cgroup.display()
            )));
        }
        let depths = self.levels.iter().filter(|n| **n > 0).count() as u32;
        if self.levels[level as usize] == 0 && depths >= MAX_SCOPE_DEPTHS {
            return Err(Error::ScopeConflict(format!(
                "scope {}: cgroup {} is {level} levels deep, and scopes already sit at \
                 {MAX_SCOPE_DEPTHS} different depths, the most one program set serves; \
                 put it beside an existing scope's cgroup (same depth)",
                req.name,
                cgroup.display()
            )));
        }
        let cgroup_id = std::fs::metadata(&cgroup)
            .map_err(|e| Error::io("reading", &cgroup, e))?
            .ino();
        let netns = match &req.netns {
            Some(path) => {
                let ino = std::fs::metadata(path)
                    .map_err(|e| Error::NetnsPath {
                        path: path.clone(),
                        source: e,
                    })?
                    .ino();
                Some((path.clone(), ino))
            }
            None => None,
        };
        // What this kernel cannot do is said before anything is attached.
        if req.netns.is_some() {
            crate::kernel::require("inbound steering (sk_lookup, --netns)", (5, 9))?;
            crate::kernel::require(
                "inbound steering's listener check (the netns cookie in sock_ops)",
                (5, 15),
            )?;
        }
        if !req.grants.is_empty() {
            crate::kernel::require("--grant (a bind program returning 3)", (5, 12))?;
        }
        if req.owner.is_some() {
            crate::kernel::require("--owner (a bind program returning 3)", (5, 12))?;
        }
        if req.netns.is_some() && req.mappings.iter().any(|m| m.proto != Proto::Tcp) {
            crate::kernel::require("inbound UDP (the service's bind moved to FROM)", (5, 12))?;
        }
        for other in self.scopes.values() {
            if other.name == req.name {
                return Err(Error::ScopeConflict(format!(
                    "a scope named {} is attached already; remove it first or pick another name",
                    req.name
                )));
            }
            if cgroup.starts_with(&other.cgroup) || other.cgroup.starts_with(&cgroup) {
                return Err(Error::ScopeConflict(format!(
                    "scope {}: cgroup {} is {} the cgroup {} of scope {}; scopes may not nest \
                     (a connection would be rewritten twice): give each its own cgroup",
                    req.name,
                    cgroup.display(),
                    if cgroup == other.cgroup {
                        "the same as"
                    } else {
                        "nested with"
                    },
                    other.cgroup.display(),
                    other.name
                )));
            }
            if let (Some((_, a)), Some((path, b))) = (&netns, &other.netns)
                && a == b
            {
                return Err(Error::ScopeConflict(format!(
                    "scope {}: network namespace {} is steered by scope {} already; one scope \
                     per namespace steers inbound traffic",
                    req.name,
                    path.display(),
                    other.name
                )));
            }
        }
        let adopted = self.pinned_scope_id(cgroup_id)?;
        let id = match adopted {
            Some(id) => id,
            None => self.free_scope_id()?,
        };
        let mut scope = ScopeState {
            id,
            name: req.name.clone(),
            cgroup: cgroup.clone(),
            cgroup_id,
            level,
            netns,
            owner: req.owner.clone(),
            mappings: MappingSet::default(),
            index: PortIndex::default(),
            slots: StdHashMap::new(),
            grants: Vec::new(),
            bind_linked: false,
            links: Vec::new(),
            steer: None,
            guard: None,
            cell: CellState::new(id),
            cell_live: false,
        };
        let result = self.build_scope(&mut scope, &dir, &req, adopted.is_some());
        match result {
            Ok(()) => {
                if scope.steer.is_some() {
                    self.steer_pool.refill();
                }
                self.scopes.insert(id, scope);
                Ok(id)
            }
            Err(e) => {
                // Undo: links close (owned) or unpin (new pins), entries go.
                let pinned = scope
                    .links
                    .iter()
                    .any(|l| matches!(l, ScopeLink::Pinned(_)));
                if adopted.is_none() {
                    for link in scope.links.drain(..) {
                        if let ScopeLink::Pinned(path) = link {
                            let _ = std::fs::remove_file(path);
                        }
                    }
                    let _ = self.forget_scope_maps(id, Some(&scope));
                    if pinned && let Some(dir) = &self.pin_dir {
                        let _ = pin::reset(&pin::scope_dir(dir, id));
                    }
                }
                Err(e)
            }
        }
    }

    fn build_scope(
        &mut self,
        scope: &mut ScopeState,
        dir: &CgroupDir,
        req: &ScopeRequest,
        adopted: bool,
    ) -> Result<()> {
        let id = scope.id;
        // Owner first: the TO ports are reserved before anyone is steered
        // to them.
        {
            let mut owners = map_mut::<HashMap<_, u32, Owner>>(&mut self.ebpf, maps::OWNERS)?;
            match &req.owner {
                Some(owner) => owners
                    .insert(id, owner.entry()?, 0)
                    .map_err(|e| map_error("writing", maps::OWNERS, e))?,
                None => remove_key(&mut owners, &id, maps::OWNERS)?,
            }
        }
        if let Some((path, _)) = scope.netns.clone() {
            self.load_steer(scope, &path)?;
        }
        // Mappings: adopt what is pinned for this scope, then apply the
        // difference with what is asked (kept mappings keep their counters).
        if adopted {
            for (key, value) in self.pinned_mappings(id)? {
                let m = mapping_of(&key, &value);
                scope.mappings.insert(m)?;
                scope.index.add(m);
                if m.proto != Proto::Tcp && !self.udp_seen {
                    self.udp_seen = true;
                    self.write_global()?;
                }
                scope.slots.insert(
                    key,
                    Slot {
                        index: value.slot,
                        generation: value.generation,
                    },
                );
            }
            for m in scope.mappings.clone().iter() {
                if req.mappings.get(&m) != Some(m) {
                    self.remove_mapping(scope, &m)?;
                }
            }
            let granted = self.pinned_grants(id)?;
            for port in granted {
                if !req.grants.contains(&port) {
                    let mut g = map_mut::<HashMap<_, ScopePort, u8>>(&mut self.ebpf, maps::GRANTS)?;
                    remove_key(&mut g, &ScopePort::new(id, port), maps::GRANTS)?;
                } else {
                    scope.grants.push(port);
                }
            }
        }
        for m in req.mappings.iter() {
            if scope.mappings.get(&m) != Some(m) {
                self.insert_mapping(scope, m)?;
            }
        }
        for port in &req.grants {
            self.grant(scope, *port)?;
        }
        // The scope goes live for its processes.
        map_mut::<HashMap<_, u64, u32>>(&mut self.ebpf, maps::SCOPES)?
            .insert(scope.cgroup_id, id, 0)
            .map_err(|e| map_error("writing", maps::SCOPES, e))?;
        self.levels[scope.level as usize] += 1;
        self.write_levels()?;
        // Links: bind first when the scope needs it, then the sock_addr
        // hooks in their order (reverse paths first).
        let needs_bind = req.owner.is_some()
            || !scope.grants.is_empty()
            || (scope.netns.is_some() && scope.mappings.iter().any(|m| m.proto != Proto::Tcp))
            || self.bind_pinned(id);
        if needs_bind {
            self.link_bind(scope, dir)?;
        }
        for name in BASE_PROGRAMS {
            let link = self.link_cgroup(id, name, dir)?;
            scope.links.push(link);
        }
        // The programs are linked, so the cell exists: fill it from every
        // mapping (adopted ones included).
        scope.cell_live = true;
        let ports: Vec<u16> = scope.index.ports().collect();
        self.update_cell(scope, &ports)?;
        if scope.netns.is_some() {
            self.attach_steer(scope, dir)?;
        }
        match &req.guard_cgroup {
            Some(guard) => self.attach_guard(scope, guard)?,
            None => self.forget_guard(id)?,
        }
        log::debug!(
            "scope {} (id {id}) attached to {}",
            scope.name,
            scope.cgroup.display()
        );
        Ok(())
    }

    /// Attaches program `name` of the shared instance to the scope's
    /// cgroup, or adopts and upgrades its pinned link.
    fn link_cgroup(&mut self, id: u32, name: &'static str, dir: &CgroupDir) -> Result<ScopeLink> {
        let pin_path = self
            .pin_dir
            .as_ref()
            .map(|d| pin::scope_dir(d, id).join("links").join(name));
        let cell = BASE_PROGRAMS.contains(&name).then_some(self.cell_map_id);
        link_or_adopt(&mut self.ebpf, name, AttachTo::Cgroup(dir), pin_path, cell)
    }

    /// Gets the scope's steering instance (maps of its own; its `STEER`
    /// map says which scope and namespace it serves) from the pool, or
    /// loads it; attaches nothing yet.
    fn load_steer(&mut self, scope: &mut ScopeState, netns: &Path) -> Result<()> {
        let id = scope.id;
        let steer_dir = self
            .pin_dir
            .as_ref()
            .map(|d| pin::scope_dir(d, id).join("steer"));
        if let Some(dir) = &steer_dir {
            for sub in ["maps", "links"] {
                std::fs::create_dir_all(dir.join(sub))
                    .map_err(|e| Error::io("creating", dir.join(sub), e))?;
            }
        }
        let owner = scope.owner.as_ref().map(|o| o.entry()).transpose()?;
        let steer = self.steer_pool.instance(
            id,
            super::netns_cookie(netns)?,
            owner,
            steer_dir.map(|d| d.join("maps")).as_deref(),
        )?;
        log::debug!(
            "steering instance of scope {id} ready for {}",
            netns.display()
        );
        scope.steer = Some(steer);
        Ok(())
    }

    /// Registers the existing listeners and attaches the steering
    /// instance: `sockops_listen` to the cgroup, `steer` to the namespace.
    fn attach_steer(&mut self, scope: &mut ScopeState, dir: &CgroupDir) -> Result<()> {
        let id = scope.id;
        let targets: HashSet<u16> = scope.mappings.iter().map(|m| m.to).collect();
        self.register_existing(scope, &targets)?;
        let Some((netns_path, _)) = scope.netns.clone() else {
            return Ok(());
        };
        let steer_links = self
            .pin_dir
            .as_ref()
            .map(|d| pin::scope_dir(d, id).join("steer").join("links"));
        let steer = scope.steer.as_mut().expect("loaded by load_steer");
        let pin = |name: &str| steer_links.as_ref().map(|d| d.join(name));
        // post_bind first (owner marks), then sock_ops (a listener created
        // from now on is registered), then sk_lookup on the namespace.
        for name in [
            programs::POST_BIND4,
            programs::POST_BIND6,
            programs::SOCK_LISTEN,
        ] {
            let link = link_or_adopt(steer, name, AttachTo::Cgroup(dir), pin(name), None)?;
            scope.links.push(link);
        }
        let link = link_or_adopt(
            steer,
            programs::STEER,
            AttachTo::Netns(&netns_path),
            pin(programs::STEER),
            None,
        )?;
        scope.links.push(link);
        Ok(())
    }

    /// Registers the listeners on `ports` that processes of the scope
    /// already have in its namespace, under the same rules as the
    /// sock_ops program: the owner's only, on the wildcard address or the
    /// mappings' address, never displacing a registered one.
    fn register_existing(&mut self, scope: &mut ScopeState, ports: &HashSet<u16>) -> Result<()> {
        let (Some((_, ino)), Some(_)) = (&scope.netns, &scope.steer) else {
            return Ok(());
        };
        let mut found = listeners::find(&scope.cgroup, *ino, ports);
        if let Some(owner) = &scope.owner {
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
        let targets: StdHashMap<u16, Target> = ports
            .iter()
            .map(|&p| (p, target_of(&scope.index, scope.id, p)))
            .collect();
        let steer = scope.steer.as_mut().expect("checked above");
        let mut hash = map_mut::<SockHash<_, u32>>(steer, maps::LISTENERS)?;
        for l in found {
            let Some(target) = targets.get(&l.port) else {
                continue;
            };
            if !l.is_wildcard() && (target.addr == ADDR_ANY || target.addr != l.addr) {
                log::warn!(
                    "not registering the listener on port {} of pid {}: it is bound to one \
                     address, and the mapping serves {}",
                    l.port,
                    l.pid,
                    if target.addr == ADDR_ANY {
                        "every address".to_owned()
                    } else {
                        "another".to_owned()
                    }
                );
                continue;
            }
            use std::os::fd::AsRawFd as _;
            let key = listener_key(l.family, l.port);
            if hash.get(&key, 0).is_ok() {
                continue; // one is registered: it keeps the traffic
            }
            match hash.insert(key, l.fd.as_raw_fd(), 0) {
                Ok(()) => log::info!(
                    "registered the listener on port {} of pid {}",
                    l.port,
                    l.pid
                ),
                // It may have closed meanwhile.
                Err(e) => log::warn!(
                    "skipping the listener on port {} of pid {}: {e}",
                    l.port,
                    l.pid
                ),
            }
        }
        Ok(())
    }

    /// Adds mapping `m` to `scope`: stats slot, port shapes, target,
    /// then the mapping itself (so that when it goes live everything it
    /// touches is ready), in the shared and the steering instance.
    pub(super) fn insert_mapping(&mut self, scope: &mut ScopeState, m: Mapping) -> Result<()> {
        let key = table_key(scope.id, &m);
        let slot = self.slots.take().ok_or(crate::MappingError::TooMany {
            count: MAX_MAPPINGS as usize + 1,
            max: MAX_MAPPINGS,
        })?;
        if let Err(e) = scope.mappings.insert(m) {
            self.slots.give_back(slot);
            return Err(e.into());
        }
        scope.index.add(m);
        let udp_bind = scope.netns.is_some() && m.proto != Proto::Tcp;
        if udp_bind {
            self.link_bind_if_live(scope)?;
        }
        if m.proto != Proto::Tcp {
            // recvmsg must still reach this TO's reverse entries after
            // the mapping is gone, to find them stale and delete them.
            self.to_ports.stick(m.to);
        }
        let value = value_of(scope, &m, slot);
        let written = self.reset_stats(slot).and_then(|()| {
            self.write_shared_tables(scope.id, &scope.index, m.from, m.to)?;
            if let Some(steer) = scope.steer.as_mut() {
                write_tables(steer, scope.id, &scope.index, m.from, m.to)?;
                map_mut::<HashMap<_, MappingKey, MappingValue>>(steer, maps::MAPPINGS)?
                    .insert(key, value, 0)
                    .map_err(|e| map_error("writing", maps::MAPPINGS, e))?;
            }
            if udp_bind {
                map_mut::<HashMap<_, ScopePort, UdpBind>>(&mut self.ebpf, maps::UDP_BINDS)?
                    .insert(
                        ScopePort::new(scope.id, m.to),
                        UdpBind {
                            from: m.from,
                            _pad: 0,
                            addr: key.addr,
                        },
                        0,
                    )
                    .map_err(|e| map_error("writing", maps::UDP_BINDS, e))?;
            }
            map_mut::<HashMap<_, MappingKey, MappingValue>>(&mut self.ebpf, maps::MAPPINGS)?
                .insert(key, value, 0)
                .map_err(|e| map_error("writing", maps::MAPPINGS, e))
        });
        if let Err(e) = written {
            scope.mappings.remove(&m);
            scope.index.remove(&m);
            let _ = self.write_shared_tables(scope.id, &scope.index, m.from, m.to);
            if let Some(steer) = scope.steer.as_mut() {
                let _ = write_tables(steer, scope.id, &scope.index, m.from, m.to);
            }
            self.slots.give_back(slot);
            return Err(e);
        }
        scope.slots.insert(key, slot);
        if m.proto != Proto::Tcp && !self.udp_seen {
            self.udp_seen = true;
            self.write_global()?;
        }
        // A mapping that now shares its TO with this one needs its flag;
        // only the second mapping to a TO changes the others' (a third
        // finds them flagged already), so adding stays O(1) per mapping.
        let mut changed = vec![m.from, m.to];
        if scope.index.to(m.to).len() == 2 {
            self.refresh_values(scope, m.to)?;
            // The other mapping to this TO leaves the fast path.
            changed.extend(scope.index.to(m.to).iter().map(|o| o.from));
        }
        self.update_cell(scope, &changed)?;
        if scope.netns.is_some() && !scope.links.is_empty() {
            self.register_existing(scope, &[m.to].into())?;
        }
        self.guard_port(scope, m.to)?;
        Ok(())
    }

    /// Recomputes the cell slots of `ports` (see `cell.rs`) and, once the
    /// scope's programs are linked, writes the cell to its cgroup's
    /// storage: the last step of a change, so that the fast paths only
    /// see a mapping once the maps behind it are complete.
    fn update_cell(&mut self, scope: &mut ScopeState, ports: &[u16]) -> Result<()> {
        let id = scope.id;
        let steers = scope.netns.is_some();
        let ScopeState {
            cell, index, slots, ..
        } = scope;
        let uses = |port: u16| -> Uses {
            let from = index
                .from(port)
                .iter()
                .map(|m| {
                    // A mapping without a slot (none is expected) counts
                    // nothing: generation 0 never matches.
                    let slot = slots.get(&table_key(id, m)).copied().unwrap_or(Slot {
                        index: 0,
                        generation: 0,
                    });
                    (*m, value_in(steers, index, m, slot))
                })
                .collect();
            (from, index.to(port).to_vec())
        };
        for port in ports {
            cell.update(*port, uses);
        }
        if let Some(steer) = scope.steer.as_mut() {
            map_mut::<Array<_, ScopeCell>>(steer, maps::STEER_CELL)?
                .set(0, scope.cell.cell, 0)
                .map_err(|e| map_error("writing", maps::STEER_CELL, e))?;
        }
        if scope.cell_live {
            self.write_cell(scope)?;
        }
        Ok(())
    }

    /// Writes the scope's cell to its cgroup's storage (which exists
    /// while the scope's programs are linked).
    ///
    /// No storage (ENOENT) means the linked programs do not read the cell
    /// (an object given with `REDIRECT_EBPF_OBJECT` from a build before
    /// it): they answer everything from the maps, so there is nothing to
    /// write.
    fn write_cell(&self, scope: &ScopeState) -> Result<()> {
        let map = cell_map(&self.ebpf)?;
        match pin::map_update(map.fd().as_fd(), &scope.cgroup_id, &scope.cell.cell) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                log::debug!("scope {}: its programs use no scope cell", scope.name);
                Ok(())
            }
            Err(e) => Err(Error::io(
                "writing the scope's cell (cgroup storage) for",
                &scope.cgroup,
                e,
            )),
        }
    }

    /// Loads bind4/6 (once per program set) and links them to the scope's
    /// cgroup (once per scope), or adopts their pinned links.
    fn link_bind(&mut self, scope: &mut ScopeState, dir: &CgroupDir) -> Result<()> {
        if scope.bind_linked {
            return Ok(());
        }
        load_in_parallel(&mut self.ebpf, &BIND_PROGRAMS)?;
        for name in BIND_PROGRAMS {
            let link = self.link_cgroup(scope.id, name, dir)?;
            scope.links.push(link);
        }
        scope.bind_linked = true;
        Ok(())
    }

    /// [`Shared::link_bind`] for a scope that is attached already (a grant
    /// or an inbound UDP mapping added at run time); during attach,
    /// `build_scope` decides.
    fn link_bind_if_live(&mut self, scope: &mut ScopeState) -> Result<()> {
        if scope.bind_linked || scope.links.is_empty() {
            return Ok(());
        }
        let dir = CgroupDir::open(&scope.cgroup)?;
        self.link_bind(scope, &dir)
    }

    /// Whether a bind link of scope `id` is pinned (a restart adopts it).
    fn bind_pinned(&self, id: u32) -> bool {
        self.pin_dir.as_ref().is_some_and(|d| {
            BIND_PROGRAMS
                .iter()
                .any(|name| pin::scope_dir(d, id).join("links").join(name).exists())
        })
    }

    /// Rewrites the MAPPINGS values of the scope's mappings to `to` (their
    /// FLAG_SHARED_TO changes when another mapping to `to` comes or goes).
    fn refresh_values(&mut self, scope: &ScopeState, to: u16) -> Result<()> {
        for m in scope.index.to(to) {
            let key = table_key(scope.id, m);
            let Some(slot) = scope.slots.get(&key).copied() else {
                continue;
            };
            let value = value_of(scope, m, slot);
            map_mut::<HashMap<_, MappingKey, MappingValue>>(&mut self.ebpf, maps::MAPPINGS)?
                .insert(key, value, 0)
                .map_err(|e| map_error("writing", maps::MAPPINGS, e))?;
        }
        Ok(())
    }

    /// Writes GLOBAL from what the scopes hold.
    fn write_global(&mut self) -> Result<()> {
        let bits = if self.udp_seen { GLOBAL_UDP } else { 0 };
        map_mut::<Array<_, u32>>(&mut self.ebpf, maps::GLOBAL)?
            .set(0, bits, 0)
            .map_err(|e| map_error("writing", maps::GLOBAL, e))
    }

    /// Removes the mapping with the same source as `m`; connects and
    /// datagrams from now on are left alone.
    pub(super) fn remove_mapping(
        &mut self,
        scope: &mut ScopeState,
        m: &Mapping,
    ) -> Result<Option<Mapping>> {
        let Some(existing) = scope.mappings.get(m) else {
            return Ok(None);
        };
        let key = table_key(scope.id, &existing);
        {
            let mut table =
                map_mut::<HashMap<_, MappingKey, MappingValue>>(&mut self.ebpf, maps::MAPPINGS)?;
            remove_key(&mut table, &key, maps::MAPPINGS)?;
        }
        if let Some(steer) = scope.steer.as_mut() {
            let mut table = map_mut::<HashMap<_, MappingKey, MappingValue>>(steer, maps::MAPPINGS)?;
            remove_key(&mut table, &key, maps::MAPPINGS)?;
        }
        scope.mappings.remove(&existing);
        scope.index.remove(&existing);
        if existing.proto != Proto::Tcp {
            scope.cell.retire(existing.to);
        }
        let mut changed = vec![existing.from, existing.to];
        // The last mapping left on a TO comes back to the fast path.
        if let [other] = scope.index.to(existing.to) {
            changed.push(other.from);
        }
        self.update_cell(scope, &changed)?;
        self.write_shared_tables(scope.id, &scope.index, existing.from, existing.to)?;
        if let Some(steer) = scope.steer.as_mut() {
            write_tables(steer, scope.id, &scope.index, existing.from, existing.to)?;
        }
        if !scope
            .index
            .to(existing.to)
            .iter()
            .any(|o| o.proto != Proto::Tcp)
        {
            let mut binds =
                map_mut::<HashMap<_, ScopePort, UdpBind>>(&mut self.ebpf, maps::UDP_BINDS)?;
            remove_key(
                &mut binds,
                &ScopePort::new(scope.id, existing.to),
                maps::UDP_BINDS,
            )?;
        }
        if let Some(slot) = scope.slots.remove(&key) {
            self.slots.give_back(slot);
        }
        // The last mapping left on a TO loses its "shared" flag.
        if scope.index.to(existing.to).len() == 1 {
            self.refresh_values(scope, existing.to)?;
        }
        self.guard_port(scope, existing.to)?;
        Ok(Some(existing))
    }

    /// Lets the scope bind `port` without CAP_NET_BIND_SERVICE.
    pub(super) fn grant(&mut self, scope: &mut ScopeState, port: u16) -> Result<()> {
        crate::mapping::parse_grant(&port.to_string())?;
        crate::kernel::require("--grant (a bind program returning 3)", (5, 12))?;
        if scope.grants.contains(&port) {
            return Ok(());
        }
        self.link_bind_if_live(scope)?;
        map_mut::<HashMap<_, ScopePort, u8>>(&mut self.ebpf, maps::GRANTS)?
            .insert(ScopePort::new(scope.id, port), 1, 0)
            .map_err(|e| map_error("writing", maps::GRANTS, e))?;
        scope.grants.push(port);
        Ok(())
    }

    /// Takes a grant back.
    pub(super) fn revoke(&mut self, scope: &mut ScopeState, port: u16) -> Result<bool> {
        let Some(i) = scope.grants.iter().position(|p| *p == port) else {
            return Ok(false);
        };
        let mut g = map_mut::<HashMap<_, ScopePort, u8>>(&mut self.ebpf, maps::GRANTS)?;
        remove_key(&mut g, &ScopePort::new(scope.id, port), maps::GRANTS)?;
        scope.grants.remove(i);
        Ok(true)
    }

    /// Detaches scope `id` and removes everything it wrote.
    pub(super) fn detach_scope(&mut self, id: u32) -> Result<()> {
        let Some(mut scope) = self.scopes.remove(&id) else {
            return Ok(());
        };
        // The scope stops being live for its processes first.
        {
            let mut scopes = map_mut::<HashMap<_, u64, u32>>(&mut self.ebpf, maps::SCOPES)?;
            remove_key(&mut scopes, &scope.cgroup_id, maps::SCOPES)?;
        }
        self.levels[scope.level as usize] -= 1;
        self.write_levels()?;
        for link in scope.links.drain(..).rev() {
            match link {
                ScopeLink::Owned(fd) => drop(fd),
                ScopeLink::Pinned(path) => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        for m in scope.mappings.clone().iter() {
            self.remove_mapping(&mut scope, &m)?;
        }
        for port in scope.grants.clone() {
            self.revoke(&mut scope, port)?;
        }
        let mut owners = map_mut::<HashMap<_, u32, Owner>>(&mut self.ebpf, maps::OWNERS)?;
        remove_key(&mut owners, &id, maps::OWNERS)?;
        if let Some(dir) = &self.pin_dir {
            let _ = pin::reset(&pin::scope_dir(dir, id));
        }
        self.taken.remove(&id);
        Ok(())
    }

    /// Forgets what the shared maps hold for scope `id` (used for a pinned
    /// scope nobody claims, and to undo a failed attach).
    fn forget_scope_maps(&mut self, id: u32, scope: Option<&ScopeState>) -> Result<()> {
        let cgroup_id = scope.map(|s| s.cgroup_id);
        {
            let mut scopes = map_mut::<HashMap<_, u64, u32>>(&mut self.ebpf, maps::SCOPES)?;
            let keys: Vec<u64> = scopes
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(c, s)| *s == id || Some(*c) == cgroup_id)
                .map(|(c, _)| c)
                .collect();
            for k in keys {
                remove_key(&mut scopes, &k, maps::SCOPES)?;
            }
        }
        macro_rules! purge {
            ($name:expr, $k:ty, $v:ty, $scope_of:expr) => {{
                let mut m = map_mut::<HashMap<_, $k, $v>>(&mut self.ebpf, $name)?;
                let keys: Vec<$k> = m
                    .keys()
                    .filter_map(|k| k.ok())
                    .filter(|k| $scope_of(k) == id)
                    .collect();
                for k in keys {
                    remove_key(&mut m, &k, $name)?;
                }
            }};
        }
        purge!(
            maps::MAPPINGS,
            MappingKey,
            MappingValue,
            |k: &MappingKey| k.scope
        );
        purge!(maps::PORTS, ScopePort, u8, |k: &ScopePort| k.scope);
        purge!(maps::TARGETS, ScopePort, Target, |k: &ScopePort| k.scope);
        purge!(maps::GRANTS, ScopePort, u8, |k: &ScopePort| k.scope);
        purge!(maps::UDP_BINDS, ScopePort, UdpBind, |k: &ScopePort| k.scope);
        purge!(maps::REVERSE, ScopePort, Reverse, |k: &ScopePort| k.scope);
        for port in self.to_ports.ports_of(id) {
            self.sync_port(maps::TO_PORTS, id, port, false)?;
        }
        for port in self.from_ports.ports_of(id) {
            self.sync_port(maps::FROM_PORTS, id, port, false)?;
        }
        purge!(maps::OWNERS, u32, Owner, |k: &u32| *k);
        self.taken.remove(&id);
        self.forget_guard(id)?;
        self.recompute_levels()?;
        Ok(())
    }

    /// The statistics of each mapping of `scope`, in order.
    pub(super) fn mapping_counts(
        &self,
        scope: &ScopeState,
    ) -> Result<Vec<(Mapping, MappingCounts)>> {
        let stats = map::<PerCpuHashMap<_, u32, MappingStats>>(&self.ebpf, maps::STATS)?;
        let fast = map::<Array<_, SlotCounts>>(&self.ebpf, maps::COUNTS)?;
        let established = super::established::count(&scope.cgroup, &scope.mappings);
        scope
            .mappings
            .iter()
            .map(|m| {
                let Some(slot) = scope.slots.get(&table_key(scope.id, &m)) else {
                    return Ok((m, MappingCounts::default()));
                };
                let now = fast
                    .get(&slot.index, 0)
                    .map_err(|e| map_error("reading", maps::COUNTS, e))?;
                let mut counts = MappingCounts {
                    connects: now.connects,
                    datagrams: now.datagrams,
                    ..MappingCounts::default()
                };
                let per_cpu = match stats.get(&slot.index, 0) {
                    Ok(v) => v,
                    Err(aya::maps::MapError::KeyNotFound) => {
                        counts.established = established.get(&m).copied().unwrap_or(0);
                        return Ok((m, counts));
                    }
                    Err(e) => return Err(map_error("reading", maps::STATS, e)),
                };
                for s in per_cpu.iter().filter(|s| s.generation == slot.generation) {
                    counts.connects = counts.connects.wrapping_add(s.connects);
                    counts.datagrams = counts.datagrams.wrapping_add(s.datagrams);
                }
                counts.established = established.get(&m).copied().unwrap_or(0);
                Ok((m, counts))
            })
            .collect()
    }

    /// The kernel ids of the links of a scope: (program name, link id).
    pub(super) fn link_ids(&self, scope: &ScopeState) -> Vec<u32> {
        scope
            .links
            .iter()
            .filter_map(|l| match l {
                ScopeLink::Owned(fd) => fd.info().ok().map(|i| i.id()),
                ScopeLink::Pinned(path) => pin::adopt_link(path).ok().flatten().map(|a| a.id),
            })
            .collect()
    }

    pub(super) fn pinned_scope_id(&self, cgroup_id: u64) -> Result<Option<u32>> {
        if self.pin_dir.is_none() {
            return Ok(None);
        }
        let scopes = map::<HashMap<_, u64, u32>>(&self.ebpf, maps::SCOPES)?;
        match scopes.get(&cgroup_id, 0) {
            Ok(id) if !self.scopes.contains_key(&id) => Ok(Some(id)),
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error("reading", maps::SCOPES, e)),
        }
    }

    fn free_scope_id(&mut self) -> Result<u32> {
        let id = (1..MAX_SCOPES)
            .find(|i| !self.taken.contains(i) && !self.scopes.contains_key(i))
            .ok_or_else(|| {
                Error::ScopeConflict(format!("at most {} scopes are supported", MAX_SCOPES - 1))
            })?;
        self.taken.insert(id);
        Ok(id)
    }

    fn pinned_mappings(&self, id: u32) -> Result<Vec<(MappingKey, MappingValue)>> {
        let table = map::<HashMap<_, MappingKey, MappingValue>>(&self.ebpf, maps::MAPPINGS)?;
        Ok(table
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.scope == id)
            .collect())
    }

    /// Every (cgroup id, scope id) of the pinned SCOPES map.
    fn pinned_scopes(&self) -> Result<Vec<(u64, u32)>> {
        let scopes = map::<HashMap<_, u64, u32>>(&self.ebpf, maps::SCOPES)?;
        let mut all: Vec<(u64, u32)> = scopes.iter().filter_map(|r| r.ok()).collect();
        all.sort_unstable_by_key(|(_, id)| *id);
        Ok(all)
    }

    /// What the pins say of scope `id`: its mappings, grants and owner.
    fn pinned_spec(
        &self,
        id: u32,
        root: &Path,
    ) -> Result<(MappingSet, Vec<u16>, Option<PortOwner>)> {
        let mut mappings = MappingSet::default();
        for (key, value) in self.pinned_mappings(id)? {
            mappings.insert(mapping_of(&key, &value))?;
        }
        let owner = map::<HashMap<_, u32, Owner>>(&self.ebpf, maps::OWNERS)?
            .get(&id, 0)
            .ok()
            .and_then(|o| match o.kind {
                redirect_common::OWNER_UID => Some(PortOwner::Uid(o.uid)),
                redirect_common::OWNER_CGROUP => {
                    super::adopt::cgroup_by_id(root, o.cgroup_id).map(PortOwner::Cgroup)
                }
                _ => None,
            });
        Ok((mappings, self.pinned_grants(id)?, owner))
    }

    fn pinned_grants(&self, id: u32) -> Result<Vec<u16>> {
        let g = map::<HashMap<_, ScopePort, u8>>(&self.ebpf, maps::GRANTS)?;
        Ok(g.keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.scope == id)
            .map(|k| k.port)
            .collect())
    }

    fn write_levels(&mut self) -> Result<()> {
        let bits = self
            .levels
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .fold(0u32, |b, (i, _)| b | (1 << i));
        map_mut::<Array<_, u32>>(&mut self.ebpf, maps::LEVELS)?
            .set(0, bits, 0)
            .map_err(|e| map_error("writing", maps::LEVELS, e))
    }

    /// Rebuilds LEVELS from the scopes this process holds plus those still
    /// pinned (after removing an unclaimed one).
    fn recompute_levels(&mut self) -> Result<()> {
        let root = crate::cgroup::cgroup2_root().ok();
        let mut levels = [0u32; MAX_LEVEL as usize + 1];
        for s in self.scopes.values() {
            levels[s.level as usize] += 1;
        }
        // Scopes still pinned but not claimed keep their level: their
        // cgroup ids are in SCOPES; depth is found from the directory.
        let _ = root;
        let scopes = map::<HashMap<_, u64, u32>>(&self.ebpf, maps::SCOPES)?;
        let unclaimed = scopes
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, id)| !self.scopes.contains_key(id))
            .count();
        if unclaimed > 0 {
            // Keep every level bit that was set: a spare bit costs one
            // lookup that misses, a missing one breaks a scope.
            let old = map::<Array<_, u32>>(&self.ebpf, maps::LEVELS)?
                .get(&0, 0)
                .unwrap_or(0);
            for (i, l) in levels.iter_mut().enumerate() {
                if old & (1 << i) != 0 && *l == 0 {
                    *l = 1;
                }
            }
        }
        self.levels = levels;
        self.write_levels()
    }

    /// [`write_tables`] on the shared instance, keeping TO_PORTS in step
    /// with its REVERSE entries and FROM_PORTS with its FROM ports.
    fn write_shared_tables(
        &mut self,
        id: u32,
        index: &PortIndex,
        from: u16,
        to: u16,
    ) -> Result<()> {
        write_tables(&mut self.ebpf, id, index, from, to)?;
        self.sync_port(maps::TO_PORTS, id, to, reverse_of(index, id, to).is_some())?;
        for port in [from, to] {
            self.sync_port(maps::FROM_PORTS, id, port, !index.from(port).is_empty())?;
        }
        Ok(())
    }

    /// Records whether scope `id` has `port` in the role of bitmap `name`
    /// (`TO_PORTS`: a REVERSE entry; `FROM_PORTS`: a mapping's FROM), and
    /// writes the port's word when its bit flips.
    fn sync_port(&mut self, name: &'static str, id: u32, port: u16, present: bool) -> Result<()> {
        let bits = if name == maps::TO_PORTS {
            &mut self.to_ports
        } else {
            &mut self.from_ports
        };
        if let Some((word, value)) = bits.set(id, port, present) {
            map_mut::<Array<_, u32>>(&mut self.ebpf, name)?
                .set(word, value, 0)
                .map_err(|e| map_error("writing", name, e))?;
        }
        Ok(())
    }

    /// Zeroes the stats of `slot` on every CPU and stamps its generation.
    fn reset_stats(&mut self, slot: Slot) -> Result<()> {
        let name = maps::STATS;
        let cpus = self.cpus;
        let fresh = MappingStats {
            generation: slot.generation,
            ..MappingStats::default()
        };
        let values = PerCpuValues::try_from(vec![fresh; cpus])
            .map_err(|e| Error::io("building per-CPU stats for", name, e))?;
        map_mut::<PerCpuHashMap<_, u32, MappingStats>>(&mut self.ebpf, name)?
            .insert(slot.index, values, 0)
            .map_err(|e| map_error("writing", name, e))?;
        map_mut::<Array<_, SlotCounts>>(&mut self.ebpf, maps::COUNTS)?
            .set(slot.index, SlotCounts::default(), 0)
            .map_err(|e| map_error("writing", maps::COUNTS, e))
    }
}

/// The namespace cookie in a steering instance's pinned STEER map.
fn pinned_steer_cookie(path: &Path) -> Option<u64> {
    if !path.exists() {
        return None;
    }
    let data = aya::maps::MapData::from_pin(path).ok()?;
    let array = Array::<_, SteerConfig>::try_from(aya::maps::Map::Array(data)).ok()?;
    array.get(&0, 0).ok().map(|c| c.netns).filter(|c| *c != 0)
}

/// Rewrites, from the scope's current mappings, PORTS for `from` and `to`,
/// TARGETS and REVERSE for `to` (removing entries nothing uses any more).
fn write_tables(ebpf: &mut Ebpf, id: u32, index: &PortIndex, from: u16, to: u16) -> Result<()> {
    for port in [from, to] {
        let mut shapes = index.from(port).iter().fold(0u8, |s, m| {
            s | shape(m.addr.is_some(), proto_number(m.proto))
        });
        if !index.to(port).is_empty() {
            shapes |= SHAPE_TARGET;
        }
        let mut ports = map_mut::<HashMap<_, ScopePort, u8>>(ebpf, maps::PORTS)?;
        let key = ScopePort::new(id, port);
        if shapes == 0 {
            remove_key(&mut ports, &key, maps::PORTS)?;
        } else {
            ports
                .insert(key, shapes, 0)
                .map_err(|e| map_error("writing", maps::PORTS, e))?;
        }
    }
    let key = ScopePort::new(id, to);
    {
        let target = target_of(index, id, to);
        let mut targets = map_mut::<HashMap<_, ScopePort, Target>>(ebpf, maps::TARGETS)?;
        if target.count == 0 {
            remove_key(&mut targets, &key, maps::TARGETS)?;
        } else {
            targets
                .insert(key, target, 0)
                .map_err(|e| map_error("writing", maps::TARGETS, e))?;
        }
    }
    let mut reverse = map_mut::<HashMap<_, ScopePort, Reverse>>(ebpf, maps::REVERSE)?;
    match reverse_of(index, id, to) {
        None => remove_key(&mut reverse, &key, maps::REVERSE),
        Some(r) => reverse
            .insert(key, r, 0)
            .map_err(|e| map_error("writing", maps::REVERSE, e)),
    }
}

/// Writes every word of bitmap `name` (TO_PORTS, FROM_PORTS) with a bit
/// set in `bits`.
fn write_port_bits(ebpf: &mut Ebpf, name: &'static str, bits: &PortBits) -> Result<()> {
    let mut array = map_mut::<Array<_, u32>>(ebpf, name)?;
    // Only words with a bit to set are written. The other words are not
    // read back to be cleared (that was 2,048 lookups on every load): a
    // fresh array is all zeroes, and a bit a previous process left set
    // for a port nobody has any more only sends a program on to its cell
    // or tables, which miss. A missing bit would be wrong; an extra one
    // costs a lookup.
    for (i, w) in bits.words() {
        array
            .set(i, w, 0)
            .map_err(|e| map_error("writing", name, e))?;
    }
    Ok(())
}

/// REVERSE entry of TO port `to`: the one mapping that targets it, or
/// "shared" when several do.
fn reverse_of(index: &PortIndex, id: u32, to: u16) -> Option<Reverse> {
    let targeting = index.to(to);
    let first = targeting.first()?;
    Some(Reverse {
        from: first.from,
        proto: proto_number(first.proto),
        flags: if targeting.len() > 1 {
            REVERSE_SHARED
        } else {
            0
        },
        addr: table_key(id, first).addr,
    })
}

/// The MAPPINGS value of `m` in `scope`, with stats slot `slot`.
fn value_of(scope: &ScopeState, m: &Mapping, slot: Slot) -> MappingValue {
    value_in(scope.netns.is_some(), &scope.index, m, slot)
}

/// [`value_of`] from the parts of a scope it reads: whether the scope
/// steers a namespace, and its index.
fn value_in(steers: bool, index: &PortIndex, m: &Mapping, slot: Slot) -> MappingValue {
    let mut flags = 0;
    if steers && m.proto != Proto::Tcp {
        flags |= FLAG_UDP_BIND;
    }
    if index.to(m.to).len() > 1 {
        flags |= FLAG_SHARED_TO;
    }
    MappingValue {
        port: m.to,
        flags,
        slot: slot.index,
        generation: slot.generation,
    }
}

/// TARGETS entry of port `to`: how many mappings target it, and the
/// address an eligible listener may be bound to besides the wildcard.
fn target_of(index: &PortIndex, id: u32, to: u16) -> Target {
    let mut addr: Option<Addr> = None;
    let mut mixed = false;
    let targeting = index.to(to);
    for m in targeting {
        let a = table_key(id, m).addr;
        match addr {
            None => addr = Some(a),
            Some(prev) if prev != a => mixed = true,
            _ => {}
        }
    }
    Target {
        count: targeting.len() as u32,
        _pad: 0,
        addr: if mixed {
            ADDR_ANY
        } else {
            addr.unwrap_or(ADDR_ANY)
        },
    }
}

pub(super) fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Any => PROTO_ANY,
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    }
}

/// The MAPPINGS key of `m` in scope `id`: IPv4 as `::ffff:a.b.c.d`, in
/// network order words, as the programs read `user_ip4`/`user_ip6`.
pub(super) fn table_key(id: u32, m: &Mapping) -> MappingKey {
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
    MappingKey::new(id, addr, m.from, proto_number(m.proto))
}

/// The mapping a pinned MAPPINGS entry stands for.
pub(super) fn mapping_of(key: &MappingKey, value: &MappingValue) -> Mapping {
    let addr = (key.addr != ADDR_ANY).then(|| {
        let mut b = [0u8; 16];
        for (i, w) in key.addr.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = std::net::Ipv6Addr::from(b);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    });
    let proto = match key.proto {
        PROTO_TCP => Proto::Tcp,
        PROTO_UDP => Proto::Udp,
        _ => Proto::Any,
    };
    let m = Mapping::new(key.port, value.port).with_proto(proto);
    match addr {
        Some(a) => m.with_addr(a),
        None => m,
    }
}

/// Every stats slot in use in the (possibly pinned) MAPPINGS table.
fn used_slots(ebpf: &Ebpf) -> Result<Vec<Slot>> {
    let table = map::<HashMap<_, MappingKey, MappingValue>>(ebpf, maps::MAPPINGS)?;
    Ok(table
        .iter()
        .filter_map(|r| r.ok())
        .map(|(_, v)| Slot {
            index: v.slot,
            generation: v.generation,
        })
        .collect())
}

fn counters_of(ebpf: &Ebpf) -> Result<Counters> {
    let array = map::<PerCpuArray<_, u64>>(ebpf, maps::COUNTERS)?;
    let mut values = Vec::with_capacity(Counter::ALL.len());
    for c in Counter::ALL {
        let per_cpu = array
            .get(&(c as u32), 0)
            .map_err(|e| map_error("reading", maps::COUNTERS, e))?;
        values.push((c, per_cpu.iter().sum()));
    }
    Ok(Counters { values })
}

/// What a program is attached to.
enum AttachTo<'a> {
    /// A cgroup (sock_addr, sock_ops, post_bind programs).
    Cgroup(&'a CgroupDir),
    /// A network namespace file (sk_lookup).
    Netns(&'a Path),
}

/// Links program `name` of `ebpf` to `target`, or, when a link is pinned at
/// `pin_path` already, adopts it and replaces its program in place. A new
/// link is pinned at `pin_path` when given.
/// The namespace-wide guard (`--guard-cgroup`, `redirect-ebpf/src/guard.rs`).
impl Shared {
    /// Loads guard4/6 (once per program set), links them to the cgroup
    /// `guard` (or adopts their pinned links), and writes a `GUARDS` entry
    /// for each TO port of the scope in the namespace it serves (the one
    /// it steers, else this process's).
    fn attach_guard(&mut self, scope: &mut ScopeState, guard: &Path) -> Result<()> {
        if scope.owner.is_none() {
            return Err(Error::ScopeConflict(format!(
                "scope {}: a guard cgroup keeps TO for the owner, and the scope has none: \
                 pass --owner too",
                scope.name
            )));
        }
        let netns = scope
            .netns
            .as_ref()
            .map_or_else(|| PathBuf::from("/proc/self/ns/net"), |(p, _)| p.clone());
        scope.guard = Some(super::netns_cookie(&netns)?);
        let ports: HashSet<u16> = scope.mappings.iter().map(|m| m.to).collect();
        for port in ports {
            self.guard_port(scope, port)?;
        }
        let dir = CgroupDir::open(guard)?;
        load_in_parallel(&mut self.ebpf, &GUARD_PROGRAMS)?;
        for name in GUARD_PROGRAMS {
            let link = self.link_cgroup(scope.id, name, &dir)?;
            scope.links.push(link);
        }
        log::debug!(
            "scope {}: TO ports guarded in {} for binds in {}",
            scope.name,
            netns.display(),
            dir.path().display()
        );
        Ok(())
    }

    /// Writes or removes the `GUARDS` entry of `port` after a mapping to
    /// it came or went (nothing without a guard). Two scopes cannot guard
    /// one port of one namespace.
    fn guard_port(&mut self, scope: &ScopeState, port: u16) -> Result<()> {
        let Some(netns) = scope.guard else {
            return Ok(());
        };
        let key = GuardKey::new(netns, port);
        let mut guards = map_mut::<HashMap<_, GuardKey, u32>>(&mut self.ebpf, maps::GUARDS)?;
        if scope.index.to(port).is_empty() {
            if guards.get(&key, 0).is_ok_and(|id| id == scope.id) {
                remove_key(&mut guards, &key, maps::GUARDS)?;
            }
            return Ok(());
        }
        match guards.get(&key, 0) {
            Ok(id) if id == scope.id => Ok(()),
            Ok(id) => Err(Error::ScopeConflict(format!(
                "scope {}: port {port} of its namespace is guarded by scope #{id} already; one \
                 scope guards a port of a namespace",
                scope.name
            ))),
            Err(_) => guards
                .insert(key, scope.id, 0)
                .map_err(|e| map_error("writing", maps::GUARDS, e)),
        }
    }

    /// Removes scope `id`'s `GUARDS` entries and pinned guard links (a
    /// scope attached, or adopted, without a guard).
    fn forget_guard(&mut self, id: u32) -> Result<()> {
        let mut guards = map_mut::<HashMap<_, GuardKey, u32>>(&mut self.ebpf, maps::GUARDS)?;
        let keys: Vec<GuardKey> = guards
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, s)| *s == id)
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            remove_key(&mut guards, &k, maps::GUARDS)?;
        }
        if let Some(dir) = &self.pin_dir {
            for name in GUARD_PROGRAMS {
                let _ = std::fs::remove_file(pin::scope_dir(dir, id).join("links").join(name));
            }
        }
        Ok(())
    }
}

/// Links program `name` to `target`, or adopts the link pinned at
/// `pin_path` and swaps its program for this build's in place.
///
/// `cell` is the id of the SCOPE_CELL map when the program uses it. The
/// kernel creates a cgroup's storage when a program using the map is
/// *attached*, not when a link's program is replaced, so a pinned link
/// whose program does not use that map (made by a build before the cell)
/// must not be updated to one that does: its program would find no
/// storage. Such a link is re-created instead: the new link is attached
/// and pinned in its place, then the old one is closed. For that moment
/// both run, one after the other; the new program leaves a connect the
/// old one already rewrote alone, since its cell is not written yet and
/// the maps path records the dial of a TO port as direct, so at worst
/// getpeername reports TO for a connection made in that instant.
fn link_or_adopt(
    ebpf: &mut Ebpf,
    name: &'static str,
    target: AttachTo<'_>,
    pin_path: Option<PathBuf>,
    cell: Option<u32>,
) -> Result<ScopeLink> {
    let mut replaced = None;
    if let Some(path) = &pin_path
        && let Some(adopted) = pin::adopt_link(path)?
    {
        let compatible = match cell {
            None => true,
            Some(id) => pin::prog_fd_by_id(adopted.prog_id)
                .and_then(|old| pin::prog_map_ids(old.as_fd()))
                .map_err(|e| Error::io("reading the program of the pinned link", path, e))?
                .contains(&id),
        };
        if compatible {
            let prog = ebpf
                .program(name)
                .ok_or(Error::Missing {
                    kind: "program",
                    name,
                })?
                .fd()
                .map_err(load_error(name))?;
            pin::replace_program(&adopted, prog.as_fd(), path)?;
            return Ok(ScopeLink::Pinned(path.clone()));
        }
        log::info!(
            "{}: made by an older build (no scope cell): linking anew",
            path.display()
        );
        replaced = Some((adopted, path.clone()));
    }
    let program = ebpf.program_mut(name).ok_or(Error::Missing {
        kind: "program",
        name,
    })?;
    // `Single` means "no flags": a cgroup bpf_link always coexists with
    // other programs (as BPF_F_ALLOW_MULTI would), and the kernel rejects
    // any flag on BPF_LINK_CREATE for cgroups with EINVAL.
    let mode = CgroupAttachMode::Single;
    // The three cgroup program types attach alike, through inherent
    // methods of each type (aya has no trait for them).
    macro_rules! cgroup_link {
        ($p:expr, $dir:expr) => {{
            let id = $p
                .attach($dir.as_fd(), mode)
                .map_err(|e| attach_error(name, $dir.path(), e))?;
            let link = $p.take_link(id).map_err(load_error(name))?;
            link.try_into().map_err(|e| link_error(name, e))?
        }};
    }
    let link: FdLink = match (program, target) {
        (Program::CgroupSockAddr(p), AttachTo::Cgroup(dir)) => cgroup_link!(p, dir),
        (Program::SockOps(p), AttachTo::Cgroup(dir)) => cgroup_link!(p, dir),
        (Program::CgroupSock(p), AttachTo::Cgroup(dir)) => cgroup_link!(p, dir),
        (Program::SkLookup(p), AttachTo::Netns(path)) => {
            let netns = std::fs::File::open(path).map_err(|e| Error::NetnsPath {
                path: path.to_path_buf(),
                source: e,
            })?;
            let id = p.attach(netns).map_err(|e| attach_error(name, path, e))?;
            FdLink::from(p.take_link(id).map_err(load_error(name))?)
        }
        _ => {
            return Err(Error::Missing {
                kind: "program of the expected type",
                name,
            });
        }
    };
    let Some((old, path)) = replaced else {
        return pin_link(link, pin_path);
    };
    // Pinned beside the old link, then renamed over its pin: the scope is
    // never without a pinned link. Closing the old link's last fd (here)
    // detaches it.
    // bpffs refuses names with a dot.
    let fresh = path.with_file_name(format!("{name}_new"));
    let _ = std::fs::remove_file(&fresh);
    pin_link(link, Some(fresh.clone()))?;
    std::fs::rename(&fresh, &path).map_err(|e| Error::io("renaming", &fresh, e))?;
    drop(old);
    Ok(ScopeLink::Pinned(path))
}

/// Pins `link` at `path` when given (it then outlives the process), or
/// keeps it owned.
fn pin_link(link: FdLink, path: Option<PathBuf>) -> Result<ScopeLink> {
    match path {
        None => Ok(ScopeLink::Owned(link)),
        Some(path) => {
            // Exists for all but a scope's first link: one statx, not a
            // mkdir and a statx.
            if let Some(parent) = path.parent()
                && !parent.is_dir()
            {
                std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
            }
            link.pin(&path).map_err(|e| Error::PinDir {
                path: path.clone(),
                reason: format!("pinning the link: {e}"),
                hint: "check that the pin directory is on bpffs and writable".into(),
            })?;
            Ok(ScopeLink::Pinned(path))
        }
    }
}

/// The SCOPE_CELL map of `ebpf` (aya 0.14 has no typed view of cgroup
/// storage).
fn cell_map(ebpf: &Ebpf) -> Result<&aya::maps::MapData> {
    match ebpf.map(maps::SCOPE_CELL) {
        Some(aya::maps::Map::CgroupStorage(data)) => Ok(data),
        _ => Err(Error::Missing {
            kind: "cgroup storage map",
            name: maps::SCOPE_CELL,
        }),
    }
}

fn remove_key<K: aya::Pod, V: aya::Pod>(
    m: &mut HashMap<&mut aya::maps::MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<()> {
    match m.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        // aya reports a missing key on delete as the syscall's ENOENT.
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(map_error("writing", name, e)),
    }
}

pub(super) fn load_error(program: &'static str) -> impl Fn(aya::programs::ProgramError) -> Error {
    move |e| Error::LoadProgram {
        program,
        source: Box::new(e),
    }
}

fn link_error(program: &'static str, e: aya::programs::links::LinkError) -> Error {
    Error::Link {
        program,
        source: Box::new(e),
    }
}

/// The map `name` of `ebpf`, as its typed view `M` (read-only).
fn map<'a, M>(ebpf: &'a Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.map(name).ok_or(Error::Missing { kind: "map", name })?;
    M::try_from(map).map_err(|e| map_error("opening", name, e))
}

/// The map `name` of `ebpf`, as its typed view `M`.
pub(super) fn map_mut<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .map_mut(name)
        .ok_or(Error::Missing { kind: "map", name })?;
    M::try_from(map).map_err(|e| map_error("opening", name, e))
}

/// Loads the named sock_addr programs that are not loaded yet, on as many
/// threads as there are CPUs (at most 4).
///
/// Why: loading is mostly the verifier (~19 ms for the 8 base programs on
/// the 2-CPU bench VM, 1–4 ms each), and the kernel verifies privileged
/// loads side by side (only unprivileged ones share a lock), so a cold
/// start waits for the longest share instead of the sum.
fn load_in_parallel(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<()> {
    let mut found = Vec::with_capacity(names.len());
    let mut todo: Vec<(&'static str, &mut CgroupSockAddr)> = Vec::with_capacity(names.len());
    for (object_name, p) in ebpf.programs_mut() {
        let Some(&name) = names.iter().find(|&&n| n == object_name) else {
            continue;
        };
        found.push(name);
        let p: &mut CgroupSockAddr = p.try_into().map_err(load_error(name))?;
        if p.fd().is_err() {
            todo.push((name, p));
        }
    }
    if let Some(&name) = names.iter().find(|n| !found.contains(n)) {
        return Err(Error::Missing {
            kind: "program",
            name,
        });
    }
    if todo.is_empty() {
        return Ok(());
    }
    // In the order given, dealt round-robin: names listed in pairs (the
    // IPv4 and IPv6 program of a hook, alike in size) spread evenly.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(todo.len());
    let mut shares: Vec<Vec<(&'static str, &mut CgroupSockAddr)>> =
        (0..threads).map(|_| Vec::new()).collect();
    todo.sort_by_key(|(name, _)| names.iter().position(|n| n == name));
    for (i, item) in todo.into_iter().enumerate() {
        shares[i % threads].push(item);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                s.spawn(move || {
                    for (name, p) in share {
                        p.load().map_err(load_error(name))?;
                    }
                    Ok(())
                })
            })
            .collect();
        // The scope joins every thread; the first error is returned.
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })
}

/// The program `name` of `ebpf`, as its type `P`.
pub(super) fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(load_error(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_keys_are_v4_mapped_in_network_order_and_come_back() {
        let m: Mapping = "127.0.0.1:443:8443/tcp".parse().unwrap();
        let key = table_key(7, &m);
        let bytes: Vec<u8> = key.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
        assert_eq!((key.scope, key.port, key.proto), (7, 443, PROTO_TCP));
        let value = MappingValue {
            port: 8443,
            flags: 0,
            slot: 0,
            generation: 1,
        };
        assert_eq!(mapping_of(&key, &value), m);
        let any: Mapping = "[::1]:53:5353/udp".parse().unwrap();
        assert_eq!(
            mapping_of(
                &table_key(1, &any),
                &MappingValue {
                    port: 5353,
                    ..value
                }
            ),
            any
        );
        assert_eq!(table_key(1, &"443:8443".parse().unwrap()).addr, ADDR_ANY);
    }

    #[test]
    fn freed_slots_come_back_with_a_new_generation() {
        let mut slots = Slots::new(&[]);
        let a = slots.take().unwrap();
        let b = slots.take().unwrap();
        assert_ne!(a.index, b.index);
        slots.give_back(a);
        let c = slots.take().unwrap();
        assert_eq!(c.index, a.index);
        assert_ne!(c.generation, a.generation);
    }

    #[test]
    fn slots_in_use_after_a_restart_are_not_handed_out_again() {
        let used = [
            Slot {
                index: 0,
                generation: 5,
            },
            Slot {
                index: 2,
                generation: u32::MAX - 3,
            },
        ];
        let mut slots = Slots::new(&used);
        let a = slots.take().unwrap();
        assert_eq!(a.index, 1);
        let b = slots.take().unwrap();
        assert_eq!(b.index, 3);
        assert!(![5, u32::MAX - 3].contains(&a.generation));
    }

    #[test]
    fn a_target_serves_one_address_only_when_every_mapping_agrees() {
        let index = |texts: &[&str]| {
            let mut index = PortIndex::default();
            for m in MappingSet::parse(texts).unwrap().iter() {
                index.add(m);
            }
            index
        };
        let t = target_of(&index(&["127.0.0.1:443:8443"]), 1, 8443);
        assert_eq!(t.count, 1);
        assert_ne!(t.addr, ADDR_ANY);
        assert_eq!(target_of(&index(&["443:8443"]), 1, 8443).addr, ADDR_ANY);
        let shared = index(&["443:8443", "444:8443"]);
        assert_eq!(reverse_of(&shared, 1, 8443).unwrap().flags, REVERSE_SHARED);
        let mut one = index(&["443:8443", "444:8443"]);
        one.remove(&"444:8443".parse().unwrap());
        assert_eq!(reverse_of(&one, 1, 8443).unwrap().from, 443);
    }

    #[test]
    fn embedded_object_has_every_shared_name() {
        let obj = aya_obj::Object::parse(EMBEDDED).expect("parse embedded object");
        for name in BIND_PROGRAMS
            .iter()
            .chain(&BASE_PROGRAMS)
            .chain(&GUARD_PROGRAMS)
            .chain(&[
                programs::STEER,
                programs::SOCK_LISTEN,
                programs::POST_BIND4,
                programs::POST_BIND6,
            ])
        {
            assert!(obj.programs.contains_key(*name), "program {name} missing");
        }
        for name in SHARED_MAPS.iter().chain(&[maps::LISTENERS]) {
            assert!(obj.maps.contains_key(*name), "map {name} missing");
        }
    }
}
