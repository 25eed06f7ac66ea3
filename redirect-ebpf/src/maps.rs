//! Every map of the object, in one place, with the lookups shared by the
//! hooks.
//!
//! Each static's identifier is the map's name, spelled as in
//! `redirect_common::maps`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use redirect_common::{
    ADDR_ANY, Addr, Counter, MAX_GRANTS, MAX_LISTENERS, MAX_MAPPINGS, MappingKey, MappingStats,
    MappingValue, OrigDst, Owner, PORT_WORDS, PROTO_ANY, REV_NAT_ENTRIES, RevNatKey, RevNatValue,
};

/// The active mappings, written by userspace at any time.
#[map]
pub static MAPPINGS: HashMap<MappingKey, MappingValue> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// Ports the cgroup may bind without CAP_NET_BIND_SERVICE (`--grant`).
#[map]
pub static GRANTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_GRANTS, 0);

/// Listening sockets registered for inbound steering, keyed by their port
/// (a mapping's TO). The kernel removes a socket when it closes.
#[map]
pub static LISTENERS: SockHash<u32> = SockHash::with_max_entries(MAX_LISTENERS, 0);

/// TO ports of the live mappings: listeners on these are registered.
#[map]
pub static TARGETS: HashMap<u16, u32> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// Who may bind the TO ports (`--owner`); kind `OWNER_NONE`: anyone.
#[map]
pub static OWNER: Array<Owner> = Array::with_max_entries(1, 0);

/// TO → FROM of UDP mappings in inbound mode (see `bind.rs`).
#[map]
pub static UDP_BINDS: HashMap<u16, u16> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// One bit per FROM port that has a mapping: the fast path for misses.
#[map]
pub static PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

/// Original destination of every rewritten socket; freed with the socket,
/// so nothing here outlives the connection.
#[btf_map]
pub static ORIG_DST: SkStorage<OrigDst> = SkStorage::new();

/// Reverse translation for unconnected UDP, keyed by socket cookie and
/// backend (Cilium's `LB4_REVERSE_NAT_SK_MAP`). Bounded: LRU.
#[map]
pub static REV_NAT: LruHashMap<RevNatKey, RevNatValue> =
    LruHashMap::with_max_entries(REV_NAT_ENTRIES, 0);

/// Per-mapping statistics, keyed by slot; userspace inserts a slot's entry
/// when its mapping goes live.
///
/// Why a hash without preallocation rather than a per-CPU array: the
/// kernel takes ~20 ms to allocate a 16,384-entry per-CPU array up front, a
/// third of the setup budget; this map allocates per live mapping.
#[map]
pub static STATS: PerCpuHashMap<u32, MappingStats> =
    PerCpuHashMap::with_max_entries(MAX_MAPPINGS, BPF_F_NO_PREALLOC);

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

/// A counter of [`MappingStats`].
#[derive(Clone, Copy)]
pub enum Stat {
    /// `connects`.
    Connects,
    /// `established`.
    Established,
    /// `datagrams`.
    Datagrams,
}

/// Adds `delta` (wrapping: pass `u64::MAX` to subtract one) to this CPU's
/// copy of a counter of the mapping in `slot`, if the slot still belongs to
/// `generation`.
#[inline(always)]
pub fn add_stat(slot: u32, generation: u32, stat: Stat, delta: u64) {
    let Some(stats) = STATS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: this CPU's copy, valid for the program's run.
    let stats = unsafe { &mut *stats };
    if stats.generation != generation {
        return;
    }
    let field = match stat {
        Stat::Connects => &mut stats.connects,
        Stat::Established => &mut stats.established,
        Stat::Datagrams => &mut stats.datagrams,
    };
    *field = field.wrapping_add(delta);
}

/// Whether any mapping has FROM port `port`: one array lookup.
#[inline(always)]
fn port_mapped(port: u16) -> bool {
    let word = u32::from(port / 64);
    let bit = u64::from(port % 64);
    PORTS.get(word).is_some_and(|w| w & (1 << bit) != 0)
}

/// The mapping for a connection to (`addr`, `port`) over `proto`, most
/// specific first; at most one can exist (userspace rejects overlaps).
#[inline(always)]
pub fn lookup(addr: &Addr, port: u16, proto: u8) -> Option<(MappingKey, MappingValue)> {
    if !port_mapped(port) {
        return None;
    }
    // Four explicit lookups: the verifier needs no loop bound this way.
    let candidates = [
        MappingKey::new(*addr, port, proto),
        MappingKey::new(*addr, port, PROTO_ANY),
        MappingKey::new(ADDR_ANY, port, proto),
        MappingKey::new(ADDR_ANY, port, PROTO_ANY),
    ];
    for key in candidates {
        // SAFETY: the value is copied out at once; userspace may replace it
        // concurrently, which at worst yields the old or the new target.
        if let Some(v) = unsafe { MAPPINGS.get(key) } {
            return Some((key, *v));
        }
    }
    None
}
