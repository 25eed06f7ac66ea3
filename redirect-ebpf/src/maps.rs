//! Every map of the object, in one place, with the lookups shared by the
//! hooks.
//!
//! Each static's identifier is the map's name, spelled as in
//! `redirect_common::maps`.

use core::{cell::UnsafeCell, ffi::c_void};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_map_def, bpf_map_type::BPF_MAP_TYPE_CGROUP_STORAGE},
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_local_storage},
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use redirect_common::{
    ADDR_ANY, Addr, Counter, GuardKey, MAX_GRANTS, MAX_LISTENERS, MAX_MAPPINGS, MAX_SCOPE_DEPTHS,
    MAX_SCOPES, MappingKey, MappingStats, MappingValue, OrigDst, Owner, PROTO_ANY, PROTO_TCP,
    PROTO_UDP, REV_NAT_ENTRIES, RevNatKey, RevNatValue, Reverse, SHAPE_ADDR_ANY, SHAPE_ADDR_TCP,
    SHAPE_ADDR_UDP, SHAPE_ANY_ANY, SHAPE_ANY_TCP, SHAPE_ANY_UDP, ScopeCell, ScopePort, SlotCounts,
    SteerConfig, TO_PORT_WORDS, Target, UdpBind, UdpPeers,
};

/// The scope a steering instance serves; set by the loader (0 in the
/// shared instance, whose programs find their scope through [`SCOPES`]).
/// What this steering instance serves (one entry; see `SteerConfig`).
#[map]
pub static STEER: Array<SteerConfig> = Array::with_max_entries(1, 0);

/// The steering instance's scope and namespace cookie, or `None` before
/// userspace wrote them (then the instance steers nothing: fail open).
#[inline(always)]
pub fn steer_config() -> Option<SteerConfig> {
    STEER.get(0).copied().filter(|c| c.netns != 0)
}

/// A cgroup storage map: one value per cgroup a program using the map is
/// attached to, found by `bpf_get_local_storage` (aya-ebpf has no type for
/// it). The key is the cgroup id alone (`u64`), so every program attached
/// to one cgroup shares one value (Linux 5.9).
#[repr(transparent)]
pub struct CgroupStorage<T> {
    def: UnsafeCell<bpf_map_def>,
    _t: core::marker::PhantomData<T>,
}

// SAFETY: the definition is only read, by the loader; values are reached
// through the helper, which the kernel serialises with updates (RCU).
unsafe impl<T: Sync> Sync for CgroupStorage<T> {}

impl<T> CgroupStorage<T> {
    const fn new() -> Self {
        CgroupStorage {
            def: UnsafeCell::new(bpf_map_def {
                type_: BPF_MAP_TYPE_CGROUP_STORAGE,
                key_size: size_of::<u64>() as u32,
                value_size: size_of::<T>() as u32,
                max_entries: 0,
                map_flags: 0,
                id: 0,
                pinning: 0,
            }),
            _t: core::marker::PhantomData,
        }
    }

    /// The value of the cgroup the running program is attached to.
    #[inline(always)]
    pub fn get(&self) -> &T {
        // SAFETY: the verifier types the result as a non-null pointer to a
        // value of this map; the kernel keeps it alive for the program's
        // run (a userspace update swaps in a new buffer and frees the old
        // one after an RCU grace period).
        unsafe { &*bpf_get_local_storage(self.def.get().cast::<c_void>(), 0).cast::<T>() }
    }
}

/// Every scope's [`ScopeCell`], in its cgroup's storage.
#[map]
pub static SCOPE_CELL: CgroupStorage<ScopeCell> = CgroupStorage::new();

/// The scope of the running program: its cell's, or, before userspace
/// wrote the cell, the one [`current_scope`] finds.
#[inline(always)]
pub fn scope_of(cell: Option<&ScopeCell>) -> Option<u32> {
    match cell {
        Some(cell) => Some(cell.scope),
        None => current_scope(),
    }
}

/// The running program's scope cell, if userspace has written it.
#[inline(always)]
pub fn scope_cell() -> Option<&'static ScopeCell> {
    // A test build that stands for the builds before the cell.
    if cfg!(feature = "no-cell-test") {
        return None;
    }
    let cell = SCOPE_CELL.get();
    (cell.scope != 0).then_some(cell)
}

/// A steering instance's copy of its scope's cell (sk_lookup runs in the
/// namespace, not in a cgroup, so it has no cgroup storage).
#[map]
pub static STEER_CELL: Array<ScopeCell> = Array::with_max_entries(1, 0);

/// cgroup id → scope id of every attached scope.
#[map]
pub static SCOPES: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SCOPES, 0);

/// Bit n: some scope sits at cgroup depth n.
#[map]
pub static LEVELS: Array<u32> = Array::with_max_entries(1, 0);

/// The active mappings of every scope, written by userspace at any time.
#[map]
pub static MAPPINGS: HashMap<MappingKey, MappingValue> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// Ports a scope may bind without CAP_NET_BIND_SERVICE (`--grant`).
#[map]
pub static GRANTS: HashMap<ScopePort, u8> = HashMap::with_max_entries(MAX_GRANTS * 4, 0);

/// Listening sockets registered for inbound steering, keyed by family and
/// port (`listener_key`). The kernel removes a socket when it closes.
#[map]
pub static LISTENERS: SockHash<u32> = SockHash::with_max_entries(MAX_LISTENERS, 0);

/// TO ports of each scope's live mappings: listeners on these are
/// registered, and with an owner only the owner may bind them.
#[map]
pub static TARGETS: HashMap<ScopePort, Target> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// Who may bind a scope's TO ports (`--owner`); no entry: anyone.
#[map]
pub static OWNERS: HashMap<u32, Owner> = HashMap::with_max_entries(MAX_SCOPES, 0);

/// (namespace cookie, TO port) → the scope whose owner alone may bind it
/// there, for binds outside the scope (`guard.rs`). Allocated per entry.
#[map]
pub static GUARDS: HashMap<GuardKey, u32> =
    HashMap::with_max_entries(MAX_MAPPINGS, BPF_F_NO_PREALLOC);

/// TO → FROM of UDP mappings in inbound mode (see `bind.rs`).
#[map]
pub static UDP_BINDS: HashMap<ScopePort, UdpBind> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// For each scope's TO ports, the mapping they come from, for getpeername.
#[map]
pub static REVERSE: HashMap<ScopePort, Reverse> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// `GLOBAL_*` bits about every scope.
/// Bit per port: some scope has a REVERSE entry for it.
#[map]
pub static TO_PORTS: Array<u32> = Array::with_max_entries(TO_PORT_WORDS, 0);

/// Whether any scope has a REVERSE entry for `port` (one array read).
#[inline(always)]
pub fn is_to_port(port: u16) -> bool {
    port_bit(&TO_PORTS, port)
}

/// Bit `port` of a port bitmap (`TO_PORTS`, `FROM_PORTS`).
#[inline(always)]
fn port_bit(bitmap: &Array<u32>, port: u16) -> bool {
    bitmap
        .get(u32::from(port >> 5))
        .is_some_and(|word| word & (1 << (port & 31)) != 0)
}

/// Bit per port: some scope has a mapping from it.
#[map]
pub static FROM_PORTS: Array<u32> = Array::with_max_entries(TO_PORT_WORDS, 0);

/// Whether any scope maps from `port` (one array read).
#[inline(always)]
pub fn is_from_port(port: u16) -> bool {
    port_bit(&FROM_PORTS, port)
}

#[map]
pub static GLOBAL: Array<u32> = Array::with_max_entries(1, 0);

/// For each scope's FROM ports, which key shapes have a mapping: the fast
/// path for misses, and one MAPPINGS lookup for hits.
#[map]
pub static PORTS: HashMap<ScopePort, u8> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// The rare per-socket records (see `OrigDst`); freed with the socket, so
/// nothing here outlives the connection.
#[btf_map]
pub static ORIG_DST: SkStorage<OrigDst> = SkStorage::new();

/// Reverse translation for the backends a socket sent to with `sendto()`
/// (see `UdpPeers`); freed with the socket. Read before `REV_NAT`, which
/// holds a backend whose entry another backend holds, and what connect
/// remembers.
#[btf_map]
pub static UDP_PEERS: SkStorage<UdpPeers> = SkStorage::new();

/// Reverse translation for UDP replies that `UDP_PEERS` does not hold
/// (connected sockets, a backend whose entry is taken), keyed by socket
/// cookie and backend (Cilium's `LB4_REVERSE_NAT_SK_MAP`). Bounded: LRU.
#[map]
pub static REV_NAT: LruHashMap<RevNatKey, RevNatValue> =
    LruHashMap::with_max_entries(REV_NAT_ENTRIES, 0);

/// Per-mapping statistics, keyed by slot; userspace inserts a slot's entry
/// when its mapping goes live. No program writes it any more ([`COUNTS`]
/// replaced it on the hot paths); userspace still adds what earlier
/// builds counted here.
///
/// Why a hash without preallocation rather than a per-CPU array: the
/// kernel takes ~20 ms to allocate a 16,384-entry per-CPU array up front, a
/// third of the setup budget; this map allocates per live mapping.
#[map]
pub static STATS: PerCpuHashMap<u32, MappingStats> =
    PerCpuHashMap::with_max_entries(MAX_MAPPINGS, BPF_F_NO_PREALLOC);

/// What each mapping slot rewrote (see `redirect_common::maps::COUNTS`).
#[map]
pub static COUNTS: Array<SlotCounts> = Array::with_max_entries(MAX_MAPPINGS, 0);

/// A counter of [`SlotCounts`].
#[derive(Clone, Copy)]
pub enum Stat {
    /// `connects`.
    Connects,
    /// `datagrams`.
    Datagrams,
}

/// Adds one to a counter of the mapping in `slot`, atomically: the entry
/// is shared by every CPU.
#[inline(always)]
pub fn add_stat(slot: u32, stat: Stat) {
    if let Some(counts) = COUNTS.get_ptr_mut(slot) {
        // SAFETY: a valid entry of the map, alive for the run.
        let n = unsafe {
            match stat {
                Stat::Connects => &raw mut (*counts).connects,
                Stat::Datagrams => &raw mut (*counts).datagrams,
            }
        };
        // SAFETY: a valid, aligned u64 of the map, alive for the run;
        // every writer (programs on other CPUs, userspace's reset) goes
        // through atomics or a single 8-byte store. The result is unused,
        // so LLVM emits the plain atomic add every BPF kernel has (the
        // BPF target has no `AtomicU64::fetch_add`: it lacks CAS).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                n, 1,
            );
        }
    }
}

/// Per-CPU event counters, indexed by [`Counter`].
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Adds one to counter `c` on this CPU.
#[inline(always)]
pub fn count(c: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}

/// The scope of the calling process: the id of the first of its cgroup's
/// ancestors (itself included) that is a scope.
///
/// Only the depths marked in [`LEVELS`] are asked, so a host whose scopes
/// all sit at one depth (containers, services) pays one helper call and
/// one hash lookup. Scopes never nest (userspace refuses it), so at most
/// one ancestor matches.
#[inline(always)]
pub fn current_scope() -> Option<u32> {
    let mut levels = *LEVELS.get(0)?;
    // One step per depth in use, shallowest first: userspace keeps at most
    // MAX_SCOPE_DEPTHS bits set.
    let mut step = 0;
    while step < MAX_SCOPE_DEPTHS && levels != 0 {
        let lowest = levels & levels.wrapping_neg();
        levels ^= lowest;
        // SAFETY: plain helper call.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(depth_of(lowest) as i32) };
        // SAFETY: copied out at once.
        if let Some(scope) = unsafe { SCOPES.get(id) } {
            return Some(*scope);
        }
        step += 1;
    }
    None
}

/// The index of the single bit set in `bit` (its population count minus
/// one), without branches: each branch would double what the verifier
/// walks.
#[inline(always)]
fn depth_of(bit: u32) -> u32 {
    let mut x = bit.wrapping_sub(1);
    x -= (x >> 1) & 0x5555_5555;
    x = (x & 0x3333_3333) + ((x >> 2) & 0x3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f;
    x.wrapping_mul(0x0101_0101) >> 24
}

#[inline(always)]
pub fn lookup(scope: u32, addr: &Addr, port: u16, proto: u8) -> Option<(MappingKey, MappingValue)> {
    lookup_shapes(scope, addr, port, proto, port_shapes(scope, port)?)
}

/// The `SHAPE_*` bits of (`scope`, `port`), if the port is a FROM or a TO
/// of the scope.
#[inline(always)]
pub fn port_shapes(scope: u32, port: u16) -> Option<u8> {
    // SAFETY: copied out at once.
    unsafe { PORTS.get(ScopePort::new(scope, port)) }.copied()
}

/// [`lookup`] with the port's shapes already read.
#[inline(always)]
pub fn lookup_shapes(
    scope: u32,
    addr: &Addr,
    port: u16,
    proto: u8,
    shapes: u8,
) -> Option<(MappingKey, MappingValue)> {
    let (addr_proto, any_proto) = match proto {
        PROTO_TCP => (SHAPE_ADDR_TCP, SHAPE_ANY_TCP),
        PROTO_UDP => (SHAPE_ADDR_UDP, SHAPE_ANY_UDP),
        _ => (0, 0),
    };
    // Four explicit candidates: the verifier needs no loop bound this way.
    let candidates = [
        (addr_proto, MappingKey::new(scope, *addr, port, proto)),
        (
            SHAPE_ADDR_ANY,
            MappingKey::new(scope, *addr, port, PROTO_ANY),
        ),
        (any_proto, MappingKey::new(scope, ADDR_ANY, port, proto)),
        (
            SHAPE_ANY_ANY,
            MappingKey::new(scope, ADDR_ANY, port, PROTO_ANY),
        ),
    ];
    for (shape, key) in candidates {
        if shapes & shape == 0 {
            continue;
        }
        // SAFETY: the value is copied out at once; userspace may replace it
        // concurrently, which at worst yields the old or the new target.
        if let Some(v) = unsafe { MAPPINGS.get(key) } {
            return Some((key, *v));
        }
    }
    None
}
