//! `cgroup/getpeername4` and `cgroup/getpeername6`: report the original port
//! to a client whose connect was rewritten, so it cannot tell.
//!
//! Minimum kernel version: 5.8.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::Counter;

use crate::{
    ALLOW, ctx,
    maps::{ORIG_DST, count},
};

/// Restores the original peer port of an IPv4 socket.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx);
    ALLOW
}

/// Restores the original peer port of an IPv6 (or v4-mapped) socket.
#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx);
    ALLOW
}

/// Sockets that were never redirected are the common case and are not
/// counted: getpeername is called far more often than connect.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext) {
    // SAFETY: lookup only (no create); a null result means no record.
    let slot = unsafe { ORIG_DST.get_ptr_mut(ctx) };
    if slot.is_null() {
        return;
    }
    // SAFETY: non-null storage returned by the kernel for this socket.
    let orig = unsafe { *slot };
    // Only while the peer is still the port we rewrote to.
    if orig.orig_port != 0 && ctx::dst_port(ctx) == orig.new_port {
        ctx::set_dst_port(ctx, orig.orig_port);
        count(Counter::PeerRestored);
    }
}
