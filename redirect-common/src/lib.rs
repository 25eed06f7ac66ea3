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
    /// Hash from a cgroup id (`u64`, the cgroup directory's inode) to the
    /// id (`u32`) of the scope attached there: how a program learns whose
    /// mappings apply.
    pub const SCOPES: &str = "SCOPES";
    /// Array of one `u32`: bit `n` is set when some scope's cgroup is at
    /// depth `n` below the cgroup v2 root, so a program only asks for the
    /// ancestors that can be scopes.
    pub const LEVELS: &str = "LEVELS";
    /// Hash map from [`MappingKey`](crate::MappingKey) to
    /// [`MappingValue`](crate::MappingValue): the active mappings.
    pub const MAPPINGS: &str = "MAPPINGS";
    /// Hash from a [`ScopePort`](crate::ScopePort) (a scope and a FROM
    /// port) to the `SHAPE_*` bits of the mapping keys present for it, so
    /// that a connect does exactly the lookups that can hit.
    pub const PORTS: &str = "PORTS";
    /// Socket storage holding an [`OrigDst`](crate::OrigDst) for every
    /// socket whose connect was rewritten; freed with the socket.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// Hash from a [`ScopePort`](crate::ScopePort) (a TO port) to its
    /// [`Reverse`](crate::Reverse): how getpeername reports FROM for a
    /// socket whose connect was rewritten, without any per-socket state.
    pub const REVERSE: &str = "REVERSE";
    /// Array of [`TO_PORT_WORDS`](crate::TO_PORT_WORDS) `u32`: bit `p` is
    /// set whenever some scope has a `REVERSE` entry for port `p` (a bit
    /// left over from an earlier process may stay set: harmless), so that
    /// getpeername on any other port (every accept in a scope asks it)
    /// returns after one array read instead of finding its scope first.
    pub const TO_PORTS: &str = "TO_PORTS";
    /// Array of one `u32` of `GLOBAL_*` bits about every scope.
    pub const GLOBAL: &str = "GLOBAL";
    /// Array of [`TO_PORT_WORDS`](crate::TO_PORT_WORDS) `u32`: bit `p` is
    /// set whenever some scope has a mapping whose FROM is port `p` (a
    /// bit left over may stay set: harmless), so that sendmsg to any other
    /// port (every datagram a scope's server sends to its clients) returns
    /// after one array read.
    pub const FROM_PORTS: &str = "FROM_PORTS";
    /// LRU hash from [`RevNatKey`](crate::RevNatKey) to
    /// [`RevNatValue`](crate::RevNatValue): how to report the source of a
    /// UDP reply to a rewritten datagram.
    pub const REV_NAT: &str = "REV_NAT";
    /// Socket storage holding a [`UdpPeers`](crate::UdpPeers) for every
    /// socket whose `sendto()` was rewritten: the reverse entries of up to
    /// [`UDP_PEER_SLOTS`](crate::UDP_PEER_SLOTS) backends, read by recvmsg
    /// before [`REV_NAT`]; freed with the socket.
    pub const UDP_PEERS: &str = "UDP_PEERS";
    /// Per-CPU hash from a mapping's slot (`u32`) to its
    /// [`MappingStats`](crate::MappingStats).
    pub const STATS: &str = "STATS";
    /// Array of [`SlotCounts`](crate::SlotCounts), indexed by a mapping's
    /// slot: the connects and datagrams it rewrote, added to atomically.
    /// Preallocated (one allocation for every slot) and reached with one
    /// inlined array access, where a [`STATS`] lookup (a per-CPU hash)
    /// cost ~230 ns per connect on the bench VM. Userspace zeroes a slot's
    /// entry before giving the slot to a new mapping; [`STATS`] keeps what
    /// builds before this map counted.
    pub const COUNTS: &str = "COUNTS";
    /// Per-CPU array of `u64`, indexed by [`Counter`](crate::Counter).
    pub const COUNTERS: &str = "COUNTERS";
    /// Hash from a [`ScopePort`](crate::ScopePort) to `1`: ports the
    /// scope's processes may bind without CAP_NET_BIND_SERVICE (`--grant`).
    pub const GRANTS: &str = "GRANTS";
    /// Sockhash from [`listener_key`](crate::listener_key) (family and TO
    /// port) to the listening socket registered for it: where sk_lookup
    /// steers inbound connections. One per steering instance (scope).
    pub const LISTENERS: &str = "LISTENERS";
    /// Array of one [`SteerConfig`](crate::SteerConfig): the scope and the
    /// network namespace a steering instance serves. One per steering
    /// instance, written before its programs are attached, so that
    /// instances can be loaded ahead of time and handed to any scope.
    pub const STEER: &str = "STEER";
    /// Hash from a [`ScopePort`](crate::ScopePort) (a TO port) to the
    /// number of the scope's mappings that target it: listeners on these
    /// are registered, and with an owner only the owner may bind them.
    pub const TARGETS: &str = "TARGETS";
    /// Hash from a scope id (`u32`) to its [`Owner`](crate::Owner): who
    /// may bind the scope's TO ports.
    pub const OWNERS: &str = "OWNERS";
    /// Hash from a [`ScopePort`](crate::ScopePort) (a TO port) to the
    /// [`UdpBind`](crate::UdpBind) of a UDP mapping in inbound mode: a UDP
    /// bind of TO in the scope is rewritten to a bind of FROM.
    pub const UDP_BINDS: &str = "UDP_BINDS";
    /// Hash from a [`GuardKey`](crate::GuardKey) (a network namespace
    /// cookie and a TO port) to the id (`u32`) of the scope whose owner
    /// alone may bind that port there: the namespace-wide guard read by
    /// [`programs::GUARD4`](crate::programs::GUARD4)/`GUARD6`.
    pub const GUARDS: &str = "GUARDS";
    /// Cgroup storage (`BPF_MAP_TYPE_CGROUP_STORAGE`, key: the cgroup id,
    /// `u64`, shared by every program of the cgroup) holding each scope's
    /// [`ScopeCell`](crate::ScopeCell): the connect path's one read. The
    /// kernel creates a scope's value when the first program using this
    /// map is attached to its cgroup and frees it with the last one.
    pub const SCOPE_CELL: &str = "SCOPE_CELL";
    /// Array of one [`ScopeCell`](crate::ScopeCell) in each steering
    /// instance: its scope's cell, so that sk_lookup finds a plain
    /// mapping's TO in one array read instead of two hash lookups.
    pub const STEER_CELL: &str = "STEER_CELL";
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
    /// `cgroup/sendmsg4`: rewrites the destination of unconnected UDP.
    pub const SENDMSG4: &str = "sendmsg4";
    /// `cgroup/sendmsg6`: rewrites the destination of unconnected UDP.
    pub const SENDMSG6: &str = "sendmsg6";
    /// `cgroup/recvmsg4`: reports the original port as a reply's source.
    pub const RECVMSG4: &str = "recvmsg4";
    /// `cgroup/recvmsg6`: reports the original port as a reply's source.
    pub const RECVMSG6: &str = "recvmsg6";
    /// `cgroup/bind4`: lets granted ports be bound without privilege.
    pub const BIND4: &str = "bind4";
    /// `cgroup/bind6`: lets granted ports be bound without privilege.
    pub const BIND6: &str = "bind6";
    /// `sk_lookup`: steers inbound connections for FROM to TO's listener.
    pub const STEER: &str = "steer";
    /// `sockops` of a steering instance: registers the scope's new
    /// listeners on TO ports for [`STEER`].
    pub const SOCK_LISTEN: &str = "sockops_listen";
    /// `cgroup/post_bind4` of a steering instance: marks sockets the
    /// scope's owner binds to a TO port.
    pub const POST_BIND4: &str = "post_bind4";
    /// `cgroup/post_bind6`: as [`POST_BIND4`] for IPv6.
    pub const POST_BIND6: &str = "post_bind6";
    /// `cgroup/bind4` attached above a scope (`--guard-cgroup`): refuses a
    /// bind of a guarded TO port in its namespace to all but the owner.
    pub const GUARD4: &str = "guard4";
    /// `cgroup/bind6`: as [`GUARD4`] for IPv6.
    pub const GUARD6: &str = "guard6";
}

/// Names of the globals the loader sets before loading.
pub mod globals {
    /// `u8`: 1 when the running kernel lets sock_addr programs call
    /// `bpf_set_retval` (Linux 6.1), so bind4/6 refuse with EACCES rather
    /// than EPERM; 0 keeps the call away from an older verifier.
    pub const HAS_SET_RETVAL: &str = "HAS_SET_RETVAL";
}

/// Version of the layout of every map above and of the pinned state
/// directory (`<pin_dir>/v<LAYOUT_VERSION>/`). Bumped whenever a key or
/// value layout, a map type or a map's meaning changes: a loader never
/// reuses pinned maps of another version.
pub const LAYOUT_VERSION: u32 = 1;

/// Upper bound on the number of scopes one program set serves.
pub const MAX_SCOPES: u32 = 4096;

/// Deepest cgroup level (the root is 0) at which a scope may sit; bounds
/// the programs' walk up the cgroup tree.
pub const MAX_LEVEL: u32 = 31;

/// How many different cgroup depths may hold scopes at once (the
/// programs ask one ancestor per depth). Bounding the walk by the depths in
/// use rather than by [`MAX_LEVEL`] keeps the verifier's work, hence the
/// program set's load time, small: the connect program verified 11,269
/// instructions with a 32-step walk and ~1,900 with 8.
pub const MAX_SCOPE_DEPTHS: u32 = 8;

/// A scope and a port: the key of the per-scope port tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScopePort {
    /// The scope's id (the value in [`maps::SCOPES`]).
    pub scope: u32,
    /// A port, host byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}

impl ScopePort {
    /// The key for `port` (host order) in `scope`.
    pub const fn new(scope: u32, port: u16) -> Self {
        Self {
            scope,
            port,
            _pad: 0,
        }
    }
}

/// A network namespace and a port: the key of [`maps::GUARDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuardKey {
    /// The namespace's cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`).
    pub netns: u64,
    /// A port, host byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: [u16; 3],
}

impl GuardKey {
    /// The key for `port` (host order) in the namespace with `netns` as
    /// cookie.
    pub const fn new(netns: u64, port: u16) -> Self {
        Self {
            netns,
            port,
            _pad: [0; 3],
        }
    }
}

/// [`maps::PORTS`] bit: the port is some mapping's TO in the scope, so a
/// connect that dials it directly is marked, and getpeername never reports
/// it as FROM.
pub const SHAPE_TARGET: u8 = 1 << 6;

/// [`maps::GLOBAL`] bit: some scope has a mapping that covers UDP (else
/// recvmsg returns at once).
pub const GLOBAL_UDP: u32 = 1;

/// Words of [`maps::TO_PORTS`]: one bit per port.
pub const TO_PORT_WORDS: u32 = 65_536 / 32;

/// [`Reverse::flags`]: several mappings of the scope share this TO, so
/// the table cannot say which FROM a socket dialled; those connects keep a
/// per-socket record instead.
pub const REVERSE_SHARED: u8 = 1;

/// Value of [`maps::REVERSE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reverse {
    /// FROM, host byte order.
    pub from: u16,
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_ANY`]: the mapping's.
    pub proto: u8,
    /// `REVERSE_*` bits.
    pub flags: u8,
    /// The mapping's address, or [`ADDR_ANY`].
    pub addr: Addr,
}

/// [`maps::PORTS`] bit: a mapping keyed (address, TCP) exists.
pub const SHAPE_ADDR_TCP: u8 = 1 << 0;
/// [`maps::PORTS`] bit: a mapping keyed (address, UDP) exists.
pub const SHAPE_ADDR_UDP: u8 = 1 << 1;
/// [`maps::PORTS`] bit: a mapping keyed (address, any protocol) exists.
pub const SHAPE_ADDR_ANY: u8 = 1 << 2;
/// [`maps::PORTS`] bit: a mapping keyed (any address, TCP) exists.
pub const SHAPE_ANY_TCP: u8 = 1 << 3;
/// [`maps::PORTS`] bit: a mapping keyed (any address, UDP) exists.
pub const SHAPE_ANY_UDP: u8 = 1 << 4;
/// [`maps::PORTS`] bit: a mapping keyed (any address, any protocol) exists.
pub const SHAPE_ANY_ANY: u8 = 1 << 5;

/// The [`maps::PORTS`] bit of a mapping key with (`has_addr`, `proto`).
pub const fn shape(has_addr: bool, proto: u8) -> u8 {
    match (has_addr, proto) {
        (true, PROTO_TCP) => SHAPE_ADDR_TCP,
        (true, PROTO_UDP) => SHAPE_ADDR_UDP,
        (true, _) => SHAPE_ADDR_ANY,
        (false, PROTO_TCP) => SHAPE_ANY_TCP,
        (false, PROTO_UDP) => SHAPE_ANY_UDP,
        (false, _) => SHAPE_ANY_ANY,
    }
}

/// `AF_INET`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;

/// The [`maps::LISTENERS`] key of a listener of `family` (`AF_INET` or
/// `AF_INET6`) on `port` (host order): IPv4 and IPv6 listeners on one TO
/// port are registered side by side.
pub const fn listener_key(family: u32, port: u16) -> u32 {
    let v6 = if family == AF_INET6 { 1 << 16 } else { 0 };
    v6 | port as u32
}

/// Upper bound on the number of mappings one redirector holds; also the
/// number of [`MappingStats`] slots.
///
/// The mapping table is a preallocated hash map of this size; lookups stay
/// O(1) whatever the number of mappings.
pub const MAX_MAPPINGS: u32 = 16_384;

/// Upper bound on the number of registered listeners.
pub const MAX_LISTENERS: u32 = 4096;

/// Upper bound on the number of granted ports (there are 1023 privileged
/// ones).
pub const MAX_GRANTS: u32 = 1024;

/// Entries of [`maps::REV_NAT`]; the least recently used is evicted.
pub const REV_NAT_ENTRIES: u32 = 65_536;

/// [`MappingKey::proto`] for a mapping that applies to TCP and UDP.
pub const PROTO_ANY: u8 = 0;
/// [`MappingKey::proto`] for TCP (`IPPROTO_TCP`).
pub const PROTO_TCP: u8 = 6;
/// [`MappingKey::proto`] for UDP (`IPPROTO_UDP`).
pub const PROTO_UDP: u8 = 17;

/// An address as four 32-bit words in network byte order, the layout of
/// `bpf_sock_addr.user_ip6`. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`), so that one key serves connect4 and a dual-stack
/// connect6 to the same destination. All zeroes means "any address".
pub type Addr = [u32; 4];

/// The "any address" [`Addr`].
pub const ADDR_ANY: Addr = [0; 4];

/// Key of the [`maps::MAPPINGS`] table.
///
/// The programs look up, in order: (address, port, protocol), (address,
/// port, any protocol), (any address, port, protocol), (any, port, any),
/// each only when [`maps::PORTS`] says that shape exists for the port.
/// Userspace rejects overlapping mappings, so at most one of these exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MappingKey {
    /// The scope the mapping belongs to.
    pub scope: u32,
    /// Destination address the mapping is scoped to, or [`ADDR_ANY`].
    pub addr: Addr,
    /// Destination port the client asked for (FROM), host byte order.
    pub port: u16,
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_ANY`].
    pub proto: u8,
    /// Always zero; keeps the key free of uninitialised padding, which would
    /// make otherwise equal keys hash differently.
    pub _pad: u8,
}

impl MappingKey {
    /// The key for `addr`, `port` (host byte order) and `proto` in `scope`.
    pub const fn new(scope: u32, addr: Addr, port: u16, proto: u8) -> Self {
        Self {
            scope,
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// Slots of a [`ScopeCell`]; port `p` lives in slot [`cell_index`]`(p)`.
pub const CELL_SLOTS: usize = 64;

/// The slot of `port` in a [`ScopeCell`]: the top 6 bits of the port times
/// 40503 (2^16 divided by the golden ratio), modulo 2^16. Not `port % 64`:
/// 443 and 8443, or 80 and 8080, would share a slot, and those are the
/// mappings people make.
#[inline(always)]
pub const fn cell_index(port: u16) -> usize {
    (((port as u32).wrapping_mul(40503) & 0xffff) >> 10) as usize
}

/// [`CellSlot::kind`]: no port of the scope falls in this slot, so a port
/// that does is neither a FROM nor a TO of the scope.
pub const CELL_EMPTY: u8 = 0;
/// [`CellSlot::kind`]: `port` is the FROM of exactly one mapping, on any
/// address, whose TO no other mapping shares; `other` is its TO.
pub const CELL_FROM: u8 = 1;
/// [`CellSlot::kind`]: `port` is the TO of exactly one mapping, on any
/// address, and no mapping's FROM; `other` is that mapping's FROM.
pub const CELL_TO: u8 = 2;
/// [`CellSlot::kind`]: anything else (two ports in one slot, an address
/// mapping, a port that is FROM and TO, a shared TO): ask the maps.
pub const CELL_SLOW: u8 = 3;

/// One slot of a [`ScopeCell`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CellSlot {
    /// The port the slot describes, host byte order.
    pub port: u16,
    /// For [`CELL_FROM`], the TO; for [`CELL_TO`], the FROM.
    pub other: u16,
    /// `CELL_*`.
    pub kind: u8,
    /// The mapping's protocol (`PROTO_*`).
    pub proto: u8,
    /// The mapping's [`MappingValue::flags`].
    pub flags: u16,
    /// The mapping's [`MappingValue::slot`].
    pub slot: u32,
    /// The mapping's [`MappingValue::generation`].
    pub generation: u32,
}

/// Value of [`maps::SCOPE_CELL`]: what the hot paths need to know about
/// the scope whose cgroup the running program is attached to, found
/// without a single hash lookup (`bpf_get_local_storage` reads a pointer
/// of the program's run context).
///
/// It summarises the maps, which stay the truth: a slot of kind
/// [`CELL_SLOW`], or a cell userspace has not written yet (`scope` 0),
/// sends the program to them. Userspace rewrites the whole value on every
/// change; the kernel swaps it in at once (a reader sees the old or the
/// new value, never a mix).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopeCell {
    /// The scope's id; 0 until userspace has written the cell.
    pub scope: u32,
    /// Always zero.
    pub _pad: u32,
    /// The scope's ports, by [`cell_index`].
    pub slots: [CellSlot; CELL_SLOTS],
}

impl Default for ScopeCell {
    fn default() -> Self {
        ScopeCell {
            scope: 0,
            _pad: 0,
            slots: [CellSlot::default(); CELL_SLOTS],
        }
    }
}

impl CellSlot {
    /// The [`MappingValue`] of a [`CELL_FROM`] slot's mapping, as the
    /// `MAPPINGS` table holds it.
    #[inline(always)]
    pub fn value(&self) -> MappingValue {
        MappingValue {
            port: self.other,
            flags: self.flags,
            slot: self.slot,
            generation: self.generation,
        }
    }
}

impl ScopeCell {
    /// The slot of `port`.
    #[inline(always)]
    pub fn slot(&self, port: u16) -> &CellSlot {
        &self.slots[cell_index(port) % CELL_SLOTS]
    }
}

/// Value of [`maps::TARGETS`]: a TO port of a scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// How many of the scope's mappings send traffic to this port.
    pub count: u32,
    /// Always zero.
    pub _pad: u32,
    /// Where an eligible listener may be bound besides the wildcard
    /// address: the mappings' address when they all have the same one,
    /// else [`ADDR_ANY`] (then only a wildcard listener serves them, so a
    /// loopback-only server is never exposed through FROM).
    pub addr: Addr,
}

/// [`MappingValue::flags`]: another mapping of the scope has the same TO,
/// so a connect through this one keeps a per-socket [`OrigDst`] record
/// for getpeername (see [`REVERSE_SHARED`]).
pub const FLAG_SHARED_TO: u16 = 2;

/// Value of [`maps::UDP_BINDS`]: a UDP bind of TO by the scope is rewritten
/// to FROM, but only on the mapping's address (or any address for a
/// wildcard mapping), so a mapping never widens a bind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpBind {
    /// FROM, host byte order.
    pub from: u16,
    /// Always zero.
    pub _pad: u16,
    /// The mapping's address, or [`ADDR_ANY`].
    pub addr: Addr,
}

/// [`MappingValue::flags`]: the mapping's UDP side is served inbound by
/// binding the service to FROM (see [`maps::UDP_BINDS`]), so local UDP to
/// FROM is left alone: the service is there.
pub const FLAG_UDP_BIND: u16 = 1;

/// Value of the [`maps::MAPPINGS`] table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingValue {
    /// Port the connection is sent to instead (TO), host byte order.
    pub port: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Index of this mapping's [`MappingStats`] in [`maps::STATS`].
    pub slot: u32,
    /// Generation of the slot: bumped by userspace each time the slot is
    /// given to a new mapping, so that late events of a removed mapping are
    /// never counted against its successor.
    pub generation: u32,
}

/// Value of [`maps::COUNTS`]: what a mapping rewrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounts {
    /// Connects (TCP and connected UDP) rewritten.
    pub connects: u64,
    /// Unconnected UDP datagrams rewritten (sendmsg).
    pub datagrams: u64,
}

/// Per-mapping statistics, one copy per CPU in [`maps::STATS`]; userspace
/// sums the copies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingStats {
    /// The generation of the mapping these counts belong to; an event whose
    /// generation differs is not counted here.
    pub generation: u32,
    /// Always zero.
    pub _pad: u32,
    /// Connects (TCP and connected UDP) rewritten.
    pub connects: u64,
    /// Unconnected UDP datagrams rewritten (sendmsg).
    pub datagrams: u64,
}

/// [`OrigDst::flags`]: the socket dialled a TO port directly; getpeername
/// must report the true peer.
pub const ORIG_DIRECT: u32 = 1;

/// Per-socket record, kept in [`maps::ORIG_DST`] only for the rare sockets
/// the [`maps::REVERSE`] table cannot answer for: a connect through a
/// mapping whose TO another mapping shares, and a direct dial of a TO port.
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
    /// `ORIG_*` bits.
    pub flags: u32,
}

/// Key of [`maps::REV_NAT`]: a socket and the backend it sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    /// `bpf_get_socket_cookie()` of the client socket (unique per boot).
    pub cookie: u64,
    /// Backend address (the destination, unchanged by the rewrite).
    pub addr: Addr,
    /// Backend port (TO), host byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: [u8; 6],
}

/// Value of [`maps::REV_NAT`]: what to report instead, and the mapping it
/// came from, re-checked on every use so an entry never outlives a change.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    /// The mapping that rewrote the datagram; `mapping.port` (FROM) is the
    /// port reported as the reply's source.
    pub mapping: MappingKey,
    /// The mapping's slot generation when the entry was written.
    pub generation: u32,
}

/// Entries in one socket's [`UdpPeers`] (a power of two): each backend
/// may use one, [`udp_peer_index`]; a backend whose entry another backend
/// holds has its reverse entry in [`maps::REV_NAT`].
pub const UDP_PEER_SLOTS: usize = 4;
const _: () = assert!(UDP_PEER_SLOTS.is_power_of_two());

/// The entry of a socket's [`UdpPeers`] that the backend (`addr`, `port`)
/// may use: every byte of both folded together, so that backends differing
/// in any byte (127.0.0.1 and 127.0.0.2, or ports 5353 and 5354) spread.
/// One entry to compare, where scanning them all would cost the verifier
/// (and the load) more than it saves.
#[inline(always)]
pub fn udp_peer_index(addr: &Addr, port: u16) -> usize {
    let mut h = addr[0] ^ addr[1] ^ addr[2] ^ addr[3] ^ u32::from(port);
    h ^= h >> 16;
    h ^= h >> 8;
    (h as usize) & (UDP_PEER_SLOTS - 1)
}

/// One backend a socket sent rewritten datagrams to, in its [`UdpPeers`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpPeer {
    /// Backend address (the destination, unchanged by the rewrite).
    pub addr: Addr,
    /// Backend port (TO), host byte order; 0 marks a free entry.
    pub port: u16,
    /// Always zero.
    pub _pad: [u8; 2],
    /// What to report instead, checked against the mapping on every use,
    /// as a [`maps::REV_NAT`] entry is.
    pub value: RevNatValue,
}

/// Value of [`maps::UDP_PEERS`]: the reverse entries of one socket that
/// sends with `sendto()`, in socket storage instead of [`maps::REV_NAT`].
/// Reading them needs neither the socket cookie nor a hash lookup, and
/// they are freed with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpPeers {
    /// The entries, in no order.
    pub peers: [UdpPeer; UDP_PEER_SLOTS],
}

/// [`Owner::kind`]: anyone may bind the TO ports.
pub const OWNER_NONE: u32 = 0;
/// [`Owner::kind`]: only processes whose real uid is [`Owner::uid`].
pub const OWNER_UID: u32 = 1;
/// [`Owner::kind`]: only processes in cgroup [`Owner::cgroup_id`] (at depth
/// [`Owner::level`]) or below it.
pub const OWNER_CGROUP: u32 = 2;

/// What a steering instance serves; the value of [`maps::STEER`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// The scope whose mappings and listeners it uses.
    pub scope: u32,
    /// Always zero.
    pub _pad: u32,
    /// The cookie (`SO_NETNS_COOKIE`) of the network namespace it steers:
    /// the scope's listeners in any other namespace are never registered.
    pub netns: u64,
}

/// Who may bind the TO ports of a scope's mappings (`--owner`), so that no
/// one else can squat them; the value of [`maps::OWNERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// [`OWNER_NONE`], [`OWNER_UID`] or [`OWNER_CGROUP`].
    pub kind: u32,
    /// The owner's uid, for [`OWNER_UID`].
    pub uid: u32,
    /// The owner cgroup's id (its directory's inode), for [`OWNER_CGROUP`].
    pub cgroup_id: u64,
    /// The owner cgroup's depth below the cgroup v2 root (the root is 0).
    pub level: u32,
    /// Always zero.
    pub _pad: u32,
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
    /// A connect whose destination has no mapping (passed unchanged).
    ConnectUnmapped = 1,
    /// A connect skipped because the socket is neither TCP nor UDP.
    SkipProtocol = 2,
    /// A connect left unchanged because the original destination could not
    /// be stored (sk_storage allocation failed): failing open.
    ErrStorage = 3,
    /// A getpeername whose reported port was restored to the original.
    PeerRestored = 4,
    /// A UDP connect or sendto to port 0 (glibc's source-address probe),
    /// skipped.
    SkipPortZero = 5,
    /// An unconnected UDP datagram whose destination port was rewritten.
    SendmsgRedirected = 6,
    /// A UDP reply whose source was reported as the original port.
    RecvmsgRestored = 7,
    /// A reverse entry whose mapping was removed or changed: deleted, and
    /// the reply's true source reported.
    RevNatStale = 8,
    /// A datagram left unchanged because its reverse entry could not be
    /// written: failing open.
    ErrRevNat = 9,
    /// A bind of a granted port allowed without CAP_NET_BIND_SERVICE.
    BindGranted = 10,
    /// An inbound connection handed to a registered listener.
    SteerAssigned = 11,
    /// An inbound connection for a mapped port refused: no listener is
    /// registered for its TO port.
    SteerNoListener = 12,
    /// A listener on a TO port registered for inbound steering.
    ListenerRegistered = 13,
    /// A listener on a TO port that could not be registered.
    ErrListener = 14,
    /// A bind of a reserved TO port by someone other than its owner,
    /// refused with EACCES.
    BindRefused = 15,
    /// A UDP bind of TO rewritten to a bind of FROM (inbound UDP).
    BindRewritten = 16,
    /// UDP to FROM left alone because the service itself is bound to FROM
    /// (inbound UDP mode).
    SkipUdpServed = 17,
    /// A program ran for a process whose cgroup belongs to no scope (a
    /// scope being added or removed): nothing done.
    SkipNoScope = 18,
    /// A listener on a TO port not registered because its address or
    /// family does not serve the mapping (a loopback-only listener, say).
    ListenerIneligible = 19,
    /// A listener not registered because an eligible one is registered
    /// already for that family and port: the first one keeps the traffic.
    ListenerTaken = 20,
    /// sk_lookup could not hand the connection to the registered socket
    /// (wrong family or protocol, or not listening): refused.
    SteerBadSocket = 21,
    /// A listener on a TO port not registered because the scope has an
    /// owner and the owner did not bind it (bound by someone else before
    /// the mapping existed, or autobound by `listen()`).
    ListenerNotOwner = 22,
}

impl Counter {
    /// Number of counters; the length of [`maps::COUNTERS`].
    pub const COUNT: u32 = 23;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::ConnectRedirected,
        Counter::ConnectUnmapped,
        Counter::SkipProtocol,
        Counter::ErrStorage,
        Counter::PeerRestored,
        Counter::SkipPortZero,
        Counter::SendmsgRedirected,
        Counter::RecvmsgRestored,
        Counter::RevNatStale,
        Counter::ErrRevNat,
        Counter::BindGranted,
        Counter::SteerAssigned,
        Counter::SteerNoListener,
        Counter::ListenerRegistered,
        Counter::ErrListener,
        Counter::BindRefused,
        Counter::BindRewritten,
        Counter::SkipUdpServed,
        Counter::SkipNoScope,
        Counter::ListenerIneligible,
        Counter::ListenerTaken,
        Counter::SteerBadSocket,
        Counter::ListenerNotOwner,
    ];

    /// Stable snake_case name, used in logs and status output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectRedirected => "connect_redirected",
            Counter::ConnectUnmapped => "connect_unmapped",
            Counter::SkipProtocol => "skip_protocol",
            Counter::ErrStorage => "err_storage",
            Counter::PeerRestored => "peer_restored",
            Counter::SkipPortZero => "skip_port_zero",
            Counter::SendmsgRedirected => "sendmsg_redirected",
            Counter::RecvmsgRestored => "recvmsg_restored",
            Counter::RevNatStale => "revnat_stale",
            Counter::ErrRevNat => "err_revnat",
            Counter::BindGranted => "bind_granted",
            Counter::SteerAssigned => "steer_assigned",
            Counter::SteerNoListener => "steer_no_listener",
            Counter::ListenerRegistered => "listener_registered",
            Counter::ErrListener => "err_listener",
            Counter::BindRefused => "bind_refused",
            Counter::BindRewritten => "bind_rewritten",
            Counter::SkipUdpServed => "skip_udp_served",
            Counter::SkipNoScope => "skip_no_scope",
            Counter::ListenerIneligible => "listener_ineligible",
            Counter::ListenerTaken => "listener_taken",
            Counter::SteerBadSocket => "steer_bad_socket",
            Counter::ListenerNotOwner => "listener_not_owner",
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
    unsafe impl aya::Pod for super::MappingStats {}
    unsafe impl aya::Pod for super::RevNatKey {}
    unsafe impl aya::Pod for super::RevNatValue {}
    unsafe impl aya::Pod for super::Owner {}
    unsafe impl aya::Pod for super::ScopePort {}
    unsafe impl aya::Pod for super::UdpBind {}
    unsafe impl aya::Pod for super::Target {}
    unsafe impl aya::Pod for super::Reverse {}
    unsafe impl aya::Pod for super::SteerConfig {}
    unsafe impl aya::Pod for super::GuardKey {}
    unsafe impl aya::Pod for super::ScopeCell {}
    unsafe impl aya::Pod for super::SlotCounts {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ip: [u8; 4]) -> Addr {
        [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes(ip),
        ]
    }

    #[test]
    fn backends_that_differ_in_one_byte_get_their_own_udp_peer_entries() {
        for port in [53, 5353, 8053] {
            let mut used = [false; UDP_PEER_SLOTS];
            for i in 1..=UDP_PEER_SLOTS as u8 {
                let index = udp_peer_index(&v4([127, 0, 0, i]), port);
                assert!(!used[index], "127.0.0.{i}:{port} shares entry {index}");
                used[index] = true;
            }
        }
        let a = udp_peer_index(&v4([10, 0, 0, 1]), 5353);
        assert_ne!(a, udp_peer_index(&v4([10, 0, 0, 1]), 5354));
    }
}
