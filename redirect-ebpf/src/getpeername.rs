//! `cgroup/getpeername4` and `cgroup/getpeername6`: report the original port
//! to a client whose connect was rewritten, so it cannot tell.
//!
//! No per-socket state is needed for an ordinary redirect: a socket of the
//! scope whose peer is a TO port got there through the one mapping that
//! targets it (`REVERSE`), unless it dialled TO directly, which connect
//! marks. The rare socket connect kept a record for is answered from it.
//!
//! Minimum kernel version: 5.8.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{
    ADDR_ANY, CELL_SLOW, CELL_TO, Counter, ORIG_DIRECT, PROTO_ANY, REVERSE_SHARED, ScopePort,
};

use crate::{
    ALLOW,
    ctx::{self, Family},
    maps::{ORIG_DST, REVERSE, count, is_to_port, scope_cell, scope_of},
};

/// Restores the original peer port of an IPv4 socket.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, Family::V4);
    ALLOW
}

/// Restores the original peer port of an IPv6 (or v4-mapped) socket.
#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, Family::V6);
    ALLOW
}

/// Sockets that were never redirected are the common case and are not
/// counted: getpeername is called far more often than connect.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, family: Family) {
    let peer = ctx::dst_port(ctx);
    // Every restore below needs the peer to be some mapping's TO port:
    // the common call (accept in a scope: the peer is a client's port)
    // stops here, after one read of a global bitmap (cheaper than the
    // cell's two cache lines).
    if !is_to_port(peer) {
        return;
    }
    let cell = scope_cell();
    let fast = match cell {
        Some(cell) => {
            let slot = cell.slot(peer);
            match slot.kind {
                CELL_SLOW => None,
                CELL_TO if slot.port == peer => Some(*slot),
                _ => return,
            }
        }
        None => None,
    };
    // SAFETY: lookup only (no create); a null result means no record.
    let slot = unsafe { ORIG_DST.get_ptr_mut(ctx) };
    if !slot.is_null() {
        // SAFETY: non-null storage returned by the kernel for this socket.
        let orig = unsafe { *slot };
        if orig.flags & ORIG_DIRECT != 0 && orig.new_port == peer {
            return; // dialled TO itself
        }
        // Only while the peer is still the port we rewrote to.
        if orig.orig_port != 0 && peer == orig.new_port {
            ctx::set_dst_port(ctx, orig.orig_port);
            count(Counter::PeerRestored);
            return;
        }
    }
    if let Some(slot) = fast {
        // The one mapping that targets this port, on any address.
        if slot.proto == PROTO_ANY || u32::from(slot.proto) == ctx::protocol(ctx) {
            ctx::set_dst_port(ctx, slot.other);
            count(Counter::PeerRestored);
        }
        return;
    }
    let Some(scope) = scope_of(cell) else {
        return;
    };
    // SAFETY: copied out at once.
    let Some(rev) = unsafe { REVERSE.get(ScopePort::new(scope, peer)) }.copied() else {
        return;
    };
    if rev.flags & REVERSE_SHARED != 0 {
        return; // such connects kept a record, read above
    }
    if rev.proto != PROTO_ANY && u32::from(rev.proto) != ctx::protocol(ctx) {
        return;
    }
    if rev.addr != ADDR_ANY && rev.addr != ctx::dst_addr(ctx, family) {
        return;
    }
    ctx::set_dst_port(ctx, rev.from);
    count(Counter::PeerRestored);
}
