//! Unconnected UDP: `cgroup/sendmsg4/6` rewrite the destination port of a
//! `sendto()`, and `cgroup/recvmsg4/6` report the reply's source as the
//! original port, so `recvfrom()` shows 53, not 5353.
//!
//! The reverse state is one entry per {socket, backend address, backend
//! port}, written on the forward path only when it changes, and
//! re-validated against the mapping table on every reply. An entry whose
//! mapping was removed or changed is deleted and the reply's true source is
//! reported, so no reply is ever attributed to a port it did not come from.
//!
//! - A `sendto()` socket keeps its entries in its own storage
//!   (`UDP_PEERS`, `UDP_PEER_SLOTS` entries, one per backend chosen by its
//!   address and port, freed with the socket): a reply is answered with
//!   one socket-storage read and one entry compared, where the
//!   shared table cost the socket cookie and a hash lookup on each side
//!   (−12 % of eBPF time per round trip on the bench VM).
//! - A backend whose entry another holds, and every connected socket's
//!   entry, go to `REV_NAT`, an LRU
//!   hash keyed by socket cookie (Cilium's socket load balancer): a
//!   connected UDP socket often lives for one query, where creating socket
//!   storage costs more than an LRU entry.
//!
//! Minimum kernel version: 4.18 (sendmsg), 5.2 (recvmsg).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use redirect_common::{
    ADDR_ANY, Addr, CELL_EMPTY, CELL_FROM, CELL_SLOW, Counter, FLAG_UDP_BIND, GLOBAL_UDP,
    MappingKey, MappingValue, PROTO_ANY, PROTO_UDP, RevNatKey, RevNatValue, ScopeCell, UdpPeer,
    udp_peer_index,
};

use crate::{
    ALLOW,
    ctx::{self, Family},
    maps::{
        GLOBAL, MAPPINGS, REV_NAT, Stat, UDP_PEERS, add_stat, count, is_from_port, is_to_port,
        lookup, scope_cell, scope_of,
    },
};

/// Rewrites the destination of an IPv4 `sendto()`.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    count(redirect_sendmsg(&ctx, Family::V4));
    ALLOW
}

/// Rewrites the destination of an IPv6 (or v4-mapped) `sendto()`.
#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    count(redirect_sendmsg(&ctx, Family::V6));
    ALLOW
}

/// Reports the original port as the source of an IPv4 reply.
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    if let Some(c) = restore_source(&ctx, Family::V4) {
        count(c);
    }
    ALLOW
}

/// Reports the original port as the source of an IPv6 reply.
#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    if let Some(c) = restore_source(&ctx, Family::V6) {
        count(c);
    }
    ALLOW
}

#[inline(always)]
fn redirect_sendmsg(ctx: &SockAddrContext, family: Family) -> Counter {
    match try_redirect_sendmsg(ctx, family) {
        Ok(c) => c,
        Err(c) => {
            debug!(ctx, "sendmsg{}: skipped: {}", family.number(), c.name());
            c
        }
    }
}

#[inline(always)]
fn try_redirect_sendmsg(ctx: &SockAddrContext, family: Family) -> Result<Counter, Counter> {
    let from = ctx::dst_port(ctx);
    if from == 0 {
        return Err(Counter::SkipPortZero);
    }
    // The common datagram (a server answering its clients) goes to a
    // port no scope maps: one array read and out.
    if !is_from_port(from) {
        return Ok(Counter::ConnectUnmapped);
    }
    let cell = scope_cell();
    let addr = ctx::dst_addr(ctx, family);
    let fast = match cell {
        Some(cell) => {
            let slot = cell.slot(from);
            match slot.kind {
                CELL_SLOW => None,
                CELL_FROM
                    if slot.port == from
                        && (slot.proto == PROTO_ANY || slot.proto == PROTO_UDP) =>
                {
                    // The mapping the maps would find: any address, this
                    // protocol shape.
                    Some((
                        MappingKey::new(cell.scope, ADDR_ANY, from, slot.proto),
                        slot.value(),
                    ))
                }
                CELL_FROM if slot.port == from => None,
                // Any other port, a TO included (a datagram sent to TO
                // directly needs no record: recvmsg reports its true
                // source unless this socket has a reverse entry for it).
                _ => return Ok(Counter::ConnectUnmapped),
            }
        }
        None => None,
    };
    let found = match fast {
        Some(found) => Some(found),
        None => {
            let scope = scope_of(cell).ok_or(Counter::SkipNoScope)?;
            lookup(scope, &addr, from, PROTO_UDP)
        }
    };
    let Some((key, target)) = found else {
        return Ok(Counter::ConnectUnmapped);
    };
    if target.flags & FLAG_UDP_BIND != 0 {
        // The service itself is bound to FROM (inbound UDP mode).
        return Err(Counter::SkipUdpServed);
    }
    remember(ctx, &addr, key, &target, Record::PerSocket)?;
    ctx::set_dst_port(ctx, target.port);
    add_stat(target.slot, Stat::Datagrams);
    debug!(
        ctx,
        "sendmsg{}: port {} -> {}",
        family.number(),
        from,
        target.port
    );
    Ok(Counter::SendmsgRedirected)
}

/// Where [`remember`] keeps a socket's reverse entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// In the socket's own `UDP_PEERS` storage, `REV_NAT` when another
    /// backend holds the entry this one would use: for `sendto()`, whose sockets are usually long-lived, so that each
    /// reply is answered without the socket cookie or a hash lookup.
    PerSocket,
    /// In `REV_NAT`: for connect, whose UDP sockets often live for one
    /// query (glibc's resolver), where creating socket storage would cost
    /// more than the LRU entry.
    Shared,
}

/// Records how to report replies from the backend (`addr`, `target.port`)
/// to this socket. Writes only when the entry differs, so steady traffic
/// does not churn the LRU.
#[inline(always)]
pub fn remember(
    ctx: &SockAddrContext,
    addr: &Addr,
    mapping: MappingKey,
    target: &MappingValue,
    record: Record,
) -> Result<(), Counter> {
    let value = RevNatValue {
        mapping,
        generation: target.generation,
    };
    if record == Record::PerSocket && remember_per_socket(ctx, addr, target.port, value) {
        return Ok(());
    }
    let key = RevNatKey {
        cookie: ctx::cookie(ctx),
        addr: *addr,
        port: target.port,
        _pad: [0; 6],
    };
    // SAFETY: copied out at once.
    if let Some(old) = unsafe { REV_NAT.get(key) }
        && *old == value
    {
        return Ok(());
    }
    REV_NAT
        .insert(key, value, 0)
        .map_err(|_| Counter::ErrRevNat)
}

/// Puts the entry in the socket's `UDP_PEERS` (creating them on its first
/// rewritten datagram), in the one entry its backend may use
/// ([`udp_peer_index`]); false when another backend holds that entry or
/// the storage cannot be made. The program runs under the socket's lock
/// (`BPF_CGROUP_RUN_SA_PROG_LOCK`), so entries are never written by two
/// runs at once.
#[inline(always)]
fn remember_per_socket(ctx: &SockAddrContext, addr: &Addr, port: u16, value: RevNatValue) -> bool {
    // SAFETY: `ctx` is this program's context; the helper checks the socket.
    let peers = unsafe { UDP_PEERS.get_or_insert_ptr_mut(ctx, None) };
    if peers.is_null() {
        return false;
    }
    // SAFETY: non-null storage returned by the kernel for this socket.
    let peer = unsafe { &mut (*peers).peers[udp_peer_index(addr, port)] };
    if peer.port == port && peer.addr == *addr {
        if peer.value != value {
            peer.value = value;
        }
        return true;
    }
    if peer.port != 0 {
        // Never displaced: its backend's replies would find no entry.
        return false;
    }
    *peer = UdpPeer {
        addr: *addr,
        port,
        _pad: [0; 2],
        value,
    };
    true
}

#[inline(always)]
fn restore_source(ctx: &SockAddrContext, family: Family) -> Option<Counter> {
    // Every UDP receive of the scope comes here. Only a reply from some
    // scope's TO can need its source restored: one array read for the
    // rest (a removed UDP mapping's TO keeps its bit, so that its stale
    // reverse entries are still found and deleted).
    let source = ctx::dst_port(ctx);
    if !is_to_port(source) {
        return None;
    }
    let cell = scope_cell();
    match cell {
        Some(cell) => {
            let slot = cell.slot(source);
            // Only a reply from one of the scope's TO ports can need its
            // source restored: any other receive stops here, with no
            // cookie and no LRU lookup.
            if slot.kind == CELL_EMPTY || (slot.kind != CELL_SLOW && slot.port != source) {
                return None;
            }
        }
        // Without a cell: with no UDP mapping anywhere, one array read
        // and out.
        None => {
            if GLOBAL.get(0).is_none_or(|g| g & GLOBAL_UDP == 0) {
                return None;
            }
        }
    }
    let addr = ctx::dst_addr(ctx, family);
    // The socket's own entries first: no cookie, no hash lookup.
    // SAFETY: lookup only (no create); a null result means no entries.
    let peers = unsafe { UDP_PEERS.get_ptr_mut(ctx) };
    if !peers.is_null() {
        // SAFETY: non-null storage returned by the kernel for this socket;
        // the program runs under the socket's lock.
        let peer = unsafe { &mut (*peers).peers[udp_peer_index(&addr, source)] };
        if peer.port == source && peer.addr == addr {
            if still_current(&peer.value, source, cell) {
                ctx::set_dst_port(ctx, peer.value.mapping.port);
                return Some(Counter::RecvmsgRestored);
            }
            // Stale: free the entry; REV_NAT may still hold a current one
            // (a connect of the same socket).
            peer.port = 0;
            count(Counter::RevNatStale);
        }
    }
    let key = RevNatKey {
        cookie: ctx::cookie(ctx),
        addr,
        port: source,
        _pad: [0; 6],
    };
    // SAFETY: copied out at once.
    let entry = *unsafe { REV_NAT.get(key) }?;
    if still_current(&entry, source, cell) {
        ctx::set_dst_port(ctx, entry.mapping.port);
        Some(Counter::RecvmsgRestored)
    } else {
        let _ = REV_NAT.remove(key);
        debug!(ctx, "recvmsg{}: stale entry removed", family.number());
        Some(Counter::RevNatStale)
    }
}

/// Whether a reverse entry's mapping still exists, unchanged, and still
/// points at this backend port. The cell answers when the mapping is its
/// FROM slot's; else the table.
#[inline(always)]
fn still_current(entry: &RevNatValue, port: u16, cell: Option<&ScopeCell>) -> bool {
    let from = cell.map(|c| c.slot(entry.mapping.port)).filter(|s| {
        s.kind == CELL_FROM
            && s.port == entry.mapping.port
            && s.proto == entry.mapping.proto
            && entry.mapping.addr == ADDR_ANY
    });
    let current = match from {
        Some(s) => Some(s.value()),
        // SAFETY: copied out at once.
        None => unsafe { MAPPINGS.get(entry.mapping) }.copied(),
    };
    current.is_some_and(|v| v.port == port && v.generation == entry.generation)
}
