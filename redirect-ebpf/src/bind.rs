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
//! CAP_NET_BIND_SERVICE check" bit); 6.1 for EACCES rather than EPERM on a
//! refused bind (`bpf_set_retval` reached sock_addr programs in 6.1). The
//! loader loads these programs only for a scope that needs them
//! (`--grant`, `--owner`, inbound UDP), and sets [`HAS_SET_RETVAL`] from
//! the running kernel so that the verifier of an older one never sees the
//! call.

use aya_ebpf::{
    Global,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_uid_gid, bpf_set_retval,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use redirect_common::{ADDR_ANY, Counter, OWNER_NONE, OWNER_UID, ScopePort};

use crate::{
    ALLOW,
    ctx::{self, Family},
    maps::{GRANTS, OWNERS, TARGETS, UDP_BINDS, count, current_scope},
};

/// 1 when the kernel lets sock_addr programs call `bpf_set_retval` (6.1);
/// set by the loader. With 0 the call is dead code the verifier removes,
/// and a refused bind fails with EPERM.
#[unsafe(no_mangle)]
pub static HAS_SET_RETVAL: Global<u8> = Global::new(0);

/// Fail the syscall.
pub const REJECT: i32 = 0;
/// `EACCES`, what an unprivileged bind of a low port gets too.
pub const EACCES: i32 = 13;

/// Allow (bit 0) and skip the CAP_NET_BIND_SERVICE check (bit 1).
const ALLOW_WITHOUT_CAP: i32 = 3;

/// Grants IPv4 binds of granted ports.
#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    grant::<false>(&ctx)
}

/// Grants IPv6 binds of granted ports.
#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    grant::<true>(&ctx)
}

/// Why generic over the family rather than taking it as an argument: with
/// one shared body LLVM merged the v4 and v6 address loads into one load
/// through a computed context pointer, which the verifier rejects
/// ("dereference of modified ctx ptr R4 off=4 disallowed"); a copy per
/// family has one constant address layout.
#[inline(always)]
fn grant<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let family = if V6 { Family::V6 } else { Family::V4 };
    let Some(scope) = current_scope() else {
        return ALLOW;
    };
    let port = ctx::dst_port(ctx);
    let key = ScopePort::new(scope, port);
    // SAFETY: presence check only.
    let reserved = unsafe { TARGETS.get(key) }.is_some();
    let owner = is_owner(scope);
    if reserved && !owner {
        count(Counter::BindRefused);
        debug!(
            ctx,
            "bind{}: port {} is reserved for its owner",
            family.number(),
            port
        );
        // Without this the caller would see EPERM.
        if HAS_SET_RETVAL.load() != 0 {
            // SAFETY: plain helper call.
            let _ = unsafe { bpf_set_retval(-EACCES) };
        }
        return REJECT;
    }
    if ctx::protocol(ctx) == ctx::IPPROTO_UDP
        // SAFETY: copied out at once.
        && let Some(bind) = unsafe { UDP_BINDS.get(key) }.copied()
        // Never wider than the mapping: a mapping for 127.0.0.1 rewrites
        // binds of 127.0.0.1 only, not of the wildcard address.
        && (bind.addr == ADDR_ANY || bind.addr == ctx::dst_addr(ctx, family))
    {
        let from = bind.from;
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
    if unsafe { GRANTS.get(key) }.is_none() {
        return ALLOW;
    }
    count(Counter::BindGranted);
    debug!(ctx, "bind{}: port {} granted", family.number(), port);
    ALLOW_WITHOUT_CAP
}

/// Whether the current process is the owner of `scope`'s TO ports: true
/// when the scope has no owner (anyone in it may bind them).
#[inline(always)]
pub fn is_owner(scope: u32) -> bool {
    // SAFETY: copied out at once.
    let Some(owner) = unsafe { OWNERS.get(scope) }.copied() else {
        return true;
    };
    if owner.kind == OWNER_NONE {
        return true;
    }
    if owner.kind == OWNER_UID {
        // SAFETY: plain helper call; the low half is the real uid.
        return unsafe { bpf_get_current_uid_gid() } as u32 == owner.uid;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_get_current_ancestor_cgroup_id(owner.level as i32) == owner.cgroup_id }
}
