//! Unconnected UDP: `cgroup/sendmsg4/6` rewrite the destination port of a
//! `sendto()`, and `cgroup/recvmsg4/6` report the reply's source as the
//! original port, so `recvfrom()` shows 53, not 5353.
//!
//! The reverse state follows Cilium's socket load balancer: an LRU hash
//! keyed by {socket cookie, backend address, backend port}, written on the
//! forward path only when it changes, and re-validated against the mapping
//! table on every reply. An entry whose mapping was removed or changed is
//! deleted and the reply's true source is reported, so no reply is ever
//! attributed to a port it did not come from.
//!
//! Minimum kernel version: 4.18 (sendmsg), 5.2 (recvmsg).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use redirect_common::{
    ADDR_ANY, Addr, CELL_EMPTY, CELL_FROM, CELL_SLOW, Counter, FLAG_UDP_BIND, GLOBAL_UDP,
    MappingKey, MappingValue, PROTO_ANY, PROTO_UDP, RevNatKey, RevNatValue,
};

use crate::{
    ALLOW,
    ctx::{self, Family},
    maps::{
        GLOBAL, MAPPINGS, REV_NAT, Stat, add_stat, count, is_from_port, is_to_port, lookup,
        scope_cell, scope_of,
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
    remember(ctx, &addr, key, &target)?;
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

/// Records how to report replies from the backend (`addr`, `target.port`)
/// to this socket. Writes only when the entry differs, so steady traffic
/// does not churn the LRU.
#[inline(always)]
pub fn remember(
    ctx: &SockAddrContext,
    addr: &Addr,
    mapping: MappingKey,
    target: &MappingValue,
) -> Result<(), Counter> {
    let key = RevNatKey {
        cookie: ctx::cookie(ctx),
        addr: *addr,
        port: target.port,
        _pad: [0; 6],
    };
    let value = RevNatValue {
        mapping,
        generation: target.generation,
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
    let key = RevNatKey {
        cookie: ctx::cookie(ctx),
        addr: ctx::dst_addr(ctx, family),
        port: source,
        _pad: [0; 6],
    };
    // SAFETY: copied out at once.
    let entry = *unsafe { REV_NAT.get(key) }?;
    // Still the same mapping, still pointing at this backend? The cell
    // answers when the mapping is its FROM slot's; else the table.
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
    match current {
        Some(v) if v.port == key.port && v.generation == entry.generation => {
            ctx::set_dst_port(ctx, entry.mapping.port);
            Some(Counter::RecvmsgRestored)
        }
        _ => {
            let _ = REV_NAT.remove(key);
            debug!(ctx, "recvmsg{}: stale entry removed", family.number());
            Some(Counter::RevNatStale)
        }
    }
}
