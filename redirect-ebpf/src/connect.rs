//! `cgroup/connect4` and `cgroup/connect6`: rewrite the destination port of a
//! TCP or UDP `connect()` whose destination is mapped.
//!
//! The rewrite happens once, at connect time; no packet of the connection is
//! touched afterwards, and for an ordinary redirect **nothing is stored**:
//! getpeername finds FROM again from the scope's `REVERSE` table (see
//! `getpeername.rs`). Writing per-socket state was the whole cost of a
//! redirected connection (socket storage or an LRU insert on every
//! connect, plus its free at close: 7–9 % of the connection rate), so only
//! the rare sockets the table cannot answer for get a record: a connect
//! through a mapping whose TO another mapping shares, and a direct dial of
//! a TO port (marked, so it is never reported as FROM).
//!
//! The common case never reaches a hash map: the scope cell (the scope
//! cgroup's storage, `maps::SCOPE_CELL`) says in one read whether the port
//! is one of the scope's and, for a plain TCP mapping (any address, its
//! own TO), where to send it; the connect is counted in the mapping's
//! `COUNTS` entry (one array access). Everything else (UDP, address
//! mappings, shared TOs, dials of a TO, a cell not written yet) takes the
//! table path below it. Measured on the bench VM, connect4 went from
//! 650–780 ns per run to 235–310 ns (docs/BENCHMARKS.md).
//!
//! One worker serves both families: a dual-stack socket connecting to
//! `::ffff:a.b.c.d` arrives here through connect6, and its address is
//! already in the mapped form the table uses for IPv4.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use redirect_common::{
    CELL_FROM, CELL_SLOW, CELL_TO, Counter, FLAG_SHARED_TO, FLAG_UDP_BIND, ORIG_DIRECT, OrigDst,
    PROTO_ANY, PROTO_TCP, SHAPE_TARGET,
};

use crate::{
    ALLOW,
    ctx::{self, Family, IPPROTO_TCP, IPPROTO_UDP},
    maps::{ORIG_DST, Stat, add_stat, count, lookup_shapes, port_shapes, scope_cell, scope_of},
    udp,
};

/// Minimum kernel version: 4.17 (sk_storage from connect: 5.2).
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    count(redirect_connect::<4>(&ctx));
    ALLOW
}

/// Minimum kernel version: 4.17 (sk_storage from connect: 5.2).
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    count(redirect_connect::<6>(&ctx));
    ALLOW
}

/// Rewrites the port if it is mapped; returns what happened, to be counted.
///
/// `F` is the family's number (4 or 6), a constant of each program: with a
/// `Family` argument LLVM kept the family in a stack slot and, with the
/// log call of the fast path, merged the IPv4 and IPv6 address loads into
/// one load through a computed context pointer, which the verifier
/// refuses ("dereference of modified ctx ptr").
#[inline(always)]
fn redirect_connect<const F: u8>(ctx: &SockAddrContext) -> Counter {
    // Changes the program's instructions (its tag), not what it does.
    #[cfg(feature = "upgrade-test")]
    // SAFETY: a helper call without arguments or side effects.
    unsafe {
        aya_ebpf::helpers::generated::bpf_ktime_get_ns();
    }
    match try_redirect_connect::<F>(ctx) {
        Ok(c) => c,
        Err(c) => {
            debug!(ctx, "connect{}: skipped: {}", F, c.name());
            c
        }
    }
}

#[inline(always)]
fn try_redirect_connect<const F: u8>(ctx: &SockAddrContext) -> Result<Counter, Counter> {
    let family = if F == 4 { Family::V4 } else { Family::V6 };
    let proto = ctx::protocol(ctx);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Counter::SkipProtocol);
    }
    let from = ctx::dst_port(ctx);
    if from == 0 {
        // glibc's getaddrinfo connects a UDP socket to port 0 to learn the
        // source address; never anything to redirect.
        return Err(Counter::SkipPortZero);
    }
    let cell = scope_cell();
    if let Some(cell) = cell {
        let slot = cell.slot(from);
        match slot.kind {
            CELL_SLOW => {}
            CELL_FROM
                if slot.port == from
                    && proto == IPPROTO_TCP
                    && (slot.proto == PROTO_ANY || slot.proto == PROTO_TCP) =>
            {
                // The common redirect: one FROM, one TO, any address, TCP;
                // nothing to record (getpeername reads the cell too).
                ctx::set_dst_port(ctx, slot.other);
                add_stat(slot.slot, Stat::Connects);
                debug!(ctx, "connect{}: port {} -> {}", F, from, slot.other);
                return Ok(Counter::ConnectRedirected);
            }
            // The port is one of the scope's, in a case the maps answer
            // (UDP, dialling a TO directly).
            CELL_FROM | CELL_TO if slot.port == from => {}
            // Neither a FROM nor a TO of the scope.
            _ => {
                if proto == IPPROTO_UDP {
                    forget(ctx);
                }
                return Ok(Counter::ConnectUnmapped);
            }
        }
    }
    let scope = scope_of(cell).ok_or(Counter::SkipNoScope)?;
    let Some(shapes) = port_shapes(scope, from) else {
        // The common case: a port the scope does not map. A UDP socket may
        // connect again, so an earlier record must not outlive it.
        if proto == IPPROTO_UDP {
            forget(ctx);
        }
        return Ok(Counter::ConnectUnmapped);
    };
    let addr = ctx::dst_addr(ctx, family);
    let Some((key, target)) = lookup_shapes(scope, &addr, from, proto as u8, shapes) else {
        if shapes & SHAPE_TARGET != 0 {
            // Dialling TO directly: getpeername must not say FROM.
            record(
                ctx,
                OrigDst {
                    orig_port: 0,
                    new_port: from,
                    flags: ORIG_DIRECT,
                },
            )?;
        } else if proto == IPPROTO_UDP {
            forget(ctx);
        }
        return Ok(Counter::ConnectUnmapped);
    };
    if proto == IPPROTO_UDP && target.flags & FLAG_UDP_BIND != 0 {
        // The service itself is bound to FROM (inbound UDP mode).
        forget(ctx);
        return Err(Counter::SkipUdpServed);
    }
    if target.flags & FLAG_SHARED_TO != 0 {
        // Without the record getpeername could not tell which FROM: leave
        // the connect alone rather than let it be revealed.
        record(
            ctx,
            OrigDst {
                orig_port: from,
                new_port: target.port,
                flags: 0,
            },
        )?;
    } else if proto == IPPROTO_UDP {
        forget(ctx);
    }
    if proto == IPPROTO_UDP {
        // A connected UDP socket may still ask recvfrom() for the source.
        udp::remember(ctx, &addr, key, &target, udp::Record::Shared)?;
    }
    ctx::set_dst_port(ctx, target.port);
    add_stat(target.slot, Stat::Connects);
    debug!(ctx, "connect{}: port {} -> {}", F, from, target.port);
    Ok(Counter::ConnectRedirected)
}

/// Writes the socket's record, creating it.
#[inline(always)]
fn record(ctx: &SockAddrContext, value: OrigDst) -> Result<(), Counter> {
    // SAFETY: `ctx` is this program's context; the helper checks the socket.
    let slot = unsafe { ORIG_DST.get_or_insert_ptr_mut(ctx, None) };
    if slot.is_null() {
        return Err(Counter::ErrStorage);
    }
    // SAFETY: non-null storage returned by the kernel for this socket.
    unsafe { *slot = value };
    Ok(())
}

/// A socket that connects again (UDP can) must not keep the record of an
/// earlier connect, or getpeername would lie about the new peer.
#[inline(always)]
fn forget(ctx: &SockAddrContext) {
    // SAFETY: lookup only (no create); a null result means no record.
    let slot = unsafe { ORIG_DST.get_ptr_mut(ctx) };
    if !slot.is_null() {
        // SAFETY: non-null storage returned by the kernel for this socket.
        unsafe {
            (*slot).orig_port = 0;
            (*slot).flags = 0;
        }
    }
}
