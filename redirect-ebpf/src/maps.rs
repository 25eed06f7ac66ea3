//! Every map of the object, in one place.
//!
//! Each static's identifier is the map's name, spelled as in
//! `redirect_common::maps`.

use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{HashMap, PerCpuArray},
};
use redirect_common::{Counter, MAX_MAPPINGS, MappingKey, MappingValue, OrigDst};

/// The active mappings, written by userspace at any time.
#[map]
pub static MAPPINGS: HashMap<MappingKey, MappingValue> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// Original destination of every rewritten socket; freed with the socket,
/// so nothing here outlives the connection.
#[btf_map]
pub static ORIG_DST: SkStorage<OrigDst> = SkStorage::new();

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
