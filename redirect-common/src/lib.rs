//! Names and layouts shared by the redirect eBPF programs and their loader.
//!
//! Everything the two sides must agree on lives here and nowhere else: map
//! names, program names, key and value layouts, counter indices. The crate is
//! `no_std` so that the eBPF side can use it; the userspace side enables the
//! `user` feature, which implements [`aya::Pod`] for the map types.
//!
//! Byte order is stated on every port field. Ports in maps are in **host**
//! order: the eBPF side converts once, at the context accessor.

#![no_std]
#![deny(missing_docs)]

/// Names of the BPF maps, as the loader looks them up in the object.
///
/// Each name is at most 15 bytes so that the kernel (and `bpftool`) shows it
/// whole; the eBPF side names its statics exactly like this.
pub mod maps {
    /// Hash map from [`MappingKey`](crate::MappingKey) to
    /// [`MappingValue`](crate::MappingValue): the active mappings.
    pub const MAPPINGS: &str = "MAPPINGS";
    /// Socket storage holding an [`OrigDst`](crate::OrigDst) for every
    /// socket whose connect was rewritten; freed with the socket.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// Per-CPU array of `u64`, indexed by [`Counter`](crate::Counter).
    pub const COUNTERS: &str = "COUNTERS";
}

/// Names of the eBPF programs, as the loader looks them up in the object.
pub mod programs {
    /// `cgroup/connect4`: rewrites the destination port of IPv4 connects.
    pub const CONNECT4: &str = "connect4";
    /// `cgroup/connect6`: rewrites the destination port of IPv6 connects,
    /// including IPv4-mapped destinations (`::ffff:a.b.c.d`).
    pub const CONNECT6: &str = "connect6";
    /// `cgroup/getpeername4`: reports the original port to the client.
    pub const GETPEERNAME4: &str = "getpeername4";
    /// `cgroup/getpeername6`: reports the original port to the client.
    pub const GETPEERNAME6: &str = "getpeername6";
}

/// Upper bound on the number of mappings one redirector holds.
///
/// The mapping table is a preallocated hash map of this size; lookups stay
/// O(1) whatever the number of mappings.
pub const MAX_MAPPINGS: u32 = 16_384;

/// Key of the [`maps::MAPPINGS`] table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MappingKey {
    /// Destination port the client asked for (FROM), host byte order.
    pub port: u16,
    /// Always zero; keeps the key free of uninitialised padding, which would
    /// make otherwise equal keys hash differently.
    pub _pad: u16,
}

impl MappingKey {
    /// The key for destination port `port` (host byte order).
    pub const fn new(port: u16) -> Self {
        Self { port, _pad: 0 }
    }
}

/// Value of the [`maps::MAPPINGS`] table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingValue {
    /// Port the connection is sent to instead (TO), host byte order.
    pub port: u16,
    /// Always zero; see [`MappingKey::_pad`].
    pub _pad: u16,
}

impl MappingValue {
    /// The value that redirects to `port` (host byte order).
    pub const fn new(port: u16) -> Self {
        Self { port, _pad: 0 }
    }
}

/// Per-socket record of a rewritten connect, kept in [`maps::ORIG_DST`].
///
/// getpeername restores `orig_port` only while the socket's peer port is
/// still `new_port`, so a socket that reconnects elsewhere is never touched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Port the client asked for (FROM), host byte order; 0 when the socket's
    /// last connect was not rewritten.
    pub orig_port: u16,
    /// Port the connect was rewritten to (TO), host byte order.
    pub new_port: u16,
}

/// Index of each counter in [`maps::COUNTERS`].
///
/// Every path through a program that does not rewrite is counted, so that a
/// redirect that "does nothing" can be explained from userspace.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connect whose destination port was rewritten.
    ConnectRedirected = 0,
    /// A connect whose destination port has no mapping (passed unchanged).
    ConnectUnmapped = 1,
    /// A connect skipped because the socket is neither TCP nor UDP.
    SkipProtocol = 2,
    /// A connect left unchanged because the original destination could not
    /// be stored (sk_storage allocation failed): failing open.
    ErrStorage = 3,
    /// A getpeername whose reported port was restored to the original.
    PeerRestored = 4,
}

impl Counter {
    /// Number of counters; the length of [`maps::COUNTERS`].
    pub const COUNT: u32 = 5;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::ConnectRedirected,
        Counter::ConnectUnmapped,
        Counter::SkipProtocol,
        Counter::ErrStorage,
        Counter::PeerRestored,
    ];

    /// Stable snake_case name, used in logs and status output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectRedirected => "connect_redirected",
            Counter::ConnectUnmapped => "connect_unmapped",
            Counter::SkipProtocol => "skip_protocol",
            Counter::ErrStorage => "err_storage",
            Counter::PeerRestored => "peer_restored",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made of fixed-width integers only,
    // with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::MappingKey {}
    unsafe impl aya::Pod for super::MappingValue {}
    unsafe impl aya::Pod for super::OrigDst {}
}
