//! `cgroup/bind4` and `cgroup/bind6`: `--grant PORT`, the authbind
//! equivalent. A process in the cgroup may bind a granted port below 1024
//! without CAP_NET_BIND_SERVICE; every other bind is left to the kernel's
//! usual checks.
//!
//! Minimum kernel version: 5.12 (the return value's "skip the
//! CAP_NET_BIND_SERVICE check" bit).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use redirect_common::Counter;

use crate::{
    ALLOW,
    ctx::{self, Family},
    maps::{GRANTS, count},
};

/// Allow (bit 0) and skip the CAP_NET_BIND_SERVICE check (bit 1).
const ALLOW_WITHOUT_CAP: i32 = 3;

/// Grants IPv4 binds of granted ports.
#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    grant(&ctx, Family::V4)
}

/// Grants IPv6 binds of granted ports.
#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    grant(&ctx, Family::V6)
}

#[inline(always)]
fn grant(ctx: &SockAddrContext, family: Family) -> i32 {
    let port = ctx::dst_port(ctx);
    // SAFETY: presence check only.
    if unsafe { GRANTS.get(port) }.is_none() {
        return ALLOW;
    }
    count(Counter::BindGranted);
    debug!(ctx, "bind{}: port {} granted", family.number(), port);
    ALLOW_WITHOUT_CAP
}
