//! `guard4` and `guard6` (`cgroup/bind4`, `cgroup/bind6`): the owner's
//! reservation of TO for a whole network namespace (`--guard-cgroup`).
//!
//! The scope's own bind programs (`bind.rs`) only see binds made in the
//! scope's cgroup. These are attached to a cgroup above it (in production
//! the cgroup2 root), and refuse a bind of a guarded TO port, in the
//! guarded namespace, to anyone but the owner, with EACCES. A process
//! outside every scope has no scope to look its mappings up in, so the
//! port is found by namespace instead: `GUARDS` is keyed by the cookie of
//! the namespace (`bpf_get_netns_cookie`, sock_addr since 5.7) and the
//! port, and names the scope whose owner may bind it. A bind in any other
//! namespace meets no entry and is left alone; so is one made inside the
//! guarded scope, which its own bind programs decide.
//!
//! Minimum kernel version: 5.7 (netns cookie in sock_addr programs); 6.1
//! for EACCES rather than EPERM (`bpf_set_retval`, as in `bind.rs`).

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{Counter, GuardKey};

use crate::{
    ALLOW,
    bind::{EACCES, HAS_SET_RETVAL, REJECT, is_owner},
    ctx,
    maps::{GUARDS, count, current_scope},
};

/// Guards IPv4 binds of guarded TO ports.
#[cgroup_sock_addr(bind4)]
pub fn guard4(ctx: SockAddrContext) -> i32 {
    guard(&ctx)
}

/// Guards IPv6 binds of guarded TO ports.
#[cgroup_sock_addr(bind6)]
pub fn guard6(ctx: SockAddrContext) -> i32 {
    guard(&ctx)
}

#[inline(always)]
fn guard(ctx: &SockAddrContext) -> i32 {
    let port = ctx::dst_port(ctx);
    // SAFETY: the helper reads the namespace of the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    let Some(scope) = unsafe { GUARDS.get(GuardKey::new(netns, port)) }.copied() else {
        return ALLOW;
    };
    // Inside the scope its own bind programs decide (and may rewrite).
    if current_scope() == Some(scope) || is_owner(scope) {
        return ALLOW;
    }
    count(Counter::BindRefused);
    if HAS_SET_RETVAL.load() != 0 {
        // SAFETY: plain helper call.
        let _ = unsafe { bpf_set_retval(-EACCES) };
    }
    REJECT
}
