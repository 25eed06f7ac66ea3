//! `cgroup/bind4` and `cgroup/bind6`: who may bind what, in the scope.
//!
//! - `--grant PORT`, the authbind equivalent: a process may bind a granted
//!   port below 1024 without CAP_NET_BIND_SERVICE.
//! - `--owner`: a mapping's TO port may be bound only by its owner (a uid or
//!   a cgroup); anyone else gets EACCES, so no one can squat the port that
//!   redirected traffic goes to.
//! - inbound UDP: with inbound steering on, a UDP bind of a mapping's TO is
//!   rewritten to a bind of its FROM (capability check skipped), so that
//!   datagrams from other hosts reach the service and its replies leave
//!   from FROM. No hook can rewrite a UDP reply's source port, which is why
//!   the service must really sit on FROM.
//!
//! Every other bind is left to the kernel's usual checks.
//!
//! Minimum kernel version: 5.12 (the return value's "skip the
//! CAP_NET_BIND_SERVICE check" bit); 5.18 for EACCES rather than EPERM on a
//! refused bind (`bpf_set_retval`).

use aya_ebpf::{
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_uid_gid, bpf_set_retval,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use redirect_common::{Counter, OWNER_NONE, OWNER_UID};

use crate::{
    ALLOW,
    ctx::{self, Family},
    maps::{GRANTS, OWNER, TARGETS, UDP_BINDS, count},
};

/// Fail the syscall.
const REJECT: i32 = 0;
/// `EACCES`, what an unprivileged bind of a low port gets too.
const EACCES: i32 = 13;

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
    if !may_bind(port) {
        count(Counter::BindRefused);
        debug!(
            ctx,
            "bind{}: port {} is reserved for its owner",
            family.number(),
            port
        );
        // Without this the caller would see EPERM; older kernels lack the
        // helper's effect and still refuse, with EPERM.
        // SAFETY: plain helper call.
        let _ = unsafe { bpf_set_retval(-EACCES) };
        return REJECT;
    }
    if ctx::protocol(ctx) == ctx::IPPROTO_UDP
        // SAFETY: copied out at once.
        && let Some(from) = unsafe { UDP_BINDS.get(port) }.copied()
    {
        ctx::set_dst_port(ctx, from);
        count(Counter::BindRewritten);
        debug!(
            ctx,
            "bind{}: udp port {} -> {}",
            family.number(),
            port,
            from
        );
        return ALLOW_WITHOUT_CAP;
    }
    // SAFETY: presence check only.
    if unsafe { GRANTS.get(port) }.is_none() {
        return ALLOW;
    }
    count(Counter::BindGranted);
    debug!(ctx, "bind{}: port {} granted", family.number(), port);
    ALLOW_WITHOUT_CAP
}

/// Whether the current process may bind `port`: always, unless `--owner`
/// reserves it (it is some mapping's TO) for someone else.
#[inline(always)]
fn may_bind(port: u16) -> bool {
    let Some(owner) = OWNER.get(0) else {
        return true;
    };
    // SAFETY: presence check only.
    if owner.kind == OWNER_NONE || unsafe { TARGETS.get(port) }.is_none() {
        return true;
    }
    if owner.kind == OWNER_UID {
        // SAFETY: plain helper call; the low half is the real uid.
        return unsafe { bpf_get_current_uid_gid() } as u32 == owner.uid;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_get_current_ancestor_cgroup_id(owner.level as i32) == owner.cgroup_id }
}
