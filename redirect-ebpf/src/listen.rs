//! Registering listeners for inbound steering, in a scope's steering
//! instance (its scope and namespace are in its own `STEER` map).
//!
//! - `sockops_listen`: a socket of the scope that starts listening on one
//!   of its TO ports goes into `LISTENERS` (for `steer.rs`) when it may
//!   serve the mapping: bound to the wildcard address or to the mappings'
//!   own address (a loopback-only server is never exposed through a
//!   wildcard mapping); keyed by its family, so IPv4 and IPv6 listeners sit
//!   side by side; never displacing a registered listener (the first one
//!   keeps the traffic; the kernel drops a socket from the sockhash when it
//!   closes, and the next listen registers again); and, when the scope has
//!   an owner, only if the owner bound it (below).
//! - `post_bind4/6`: when the scope has an owner, marks a TCP socket bound
//!   to a TO port by the owner (`OWNER_BOUND`, socket storage). sock_ops
//!   cannot tell who listens (it runs with no usable current task), so the
//!   mark made at bind time is what proves ownership at listen time: a
//!   socket a non-owner bound before the mapping existed, or one that got
//!   TO by autobind (`listen()` without `bind()`, which runs no bind hook),
//!   carries no mark and is never registered.
//!
//! - Only sockets of the steered network namespace are registered
//!   (`STEER`'s cookie, compared with `bpf_get_netns_cookie`, sock_ops
//!   5.15).
//!
//! Minimum kernel version: 5.9 (sk_lookup), 5.15 (netns cookie in
//! sock_ops), 6.1 verified for the
//! owner-bound mark (sk_storage and the current task's uid/cgroup in
//! `cgroup/post_bind`).

use core::ptr::{self, addr_of, read_volatile};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_storage_get},
    macros::{btf_map, cgroup_sock, sock_ops},
    programs::{SockContext, SockOpsContext},
};
use redirect_common::{
    ADDR_ANY, AF_INET, AF_INET6, Addr, Counter, PROTO_TCP, ScopePort, listener_key,
};

use crate::{
    bind::is_owner,
    maps::{LISTENERS, OWNERS, TARGETS, count, steer_config},
};

/// The sock_ops verdict; the value is ignored for this callback.
const SOCK_OPS_OK: u32 = 1;

/// `BPF_SOCK_OPS_TCP_LISTEN_CB`: called right after listen().
const TCP_LISTEN_CB: u32 = 11;
/// `EEXIST`.
const EEXIST: i32 = 17;

/// 1 on a TCP socket that the scope's owner bound to a TO port.
#[btf_map]
pub static OWNER_BOUND: SkStorage<u32> = SkStorage::new();

/// Registers the scope's new listeners on TO ports.
#[sock_ops]
pub fn sockops_listen(ctx: SockOpsContext) -> u32 {
    if ctx.op() == TCP_LISTEN_CB {
        count(match try_register(&ctx) {
            Ok(c) | Err(c) => c,
        });
    }
    SOCK_OPS_OK
}

fn try_register(ctx: &SockOpsContext) -> Result<Counter, Counter> {
    let config = steer_config().ok_or(Counter::ListenerIneligible)?;
    let scope = config.scope;
    // local_port is in host byte order in sock_ops (remote_port is not).
    let port = ctx.local_port() as u16;
    // SAFETY: copied out at once.
    let target = unsafe { TARGETS.get(ScopePort::new(scope, port)) }
        .copied()
        .ok_or(Counter::ListenerIneligible)?;
    // SAFETY: the helper reads the context's socket's namespace.
    if unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } != config.netns {
        return Err(Counter::ListenerIneligible);
    }
    let family = ctx.family();
    // Read both before choosing (see steer.rs on merged context loads).
    let (ip4, ip6) = (ctx.local_ip4(), ctx.local_ip6());
    let addr: Addr = if family == AF_INET {
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
    } else if family == AF_INET6 {
        ip6
    } else {
        return Err(Counter::ListenerIneligible);
    };
    let wildcard = addr == ADDR_ANY || (family == AF_INET && ip4 == 0);
    if !wildcard && (target.addr == ADDR_ANY || target.addr != addr) {
        return Err(Counter::ListenerIneligible);
    }
    // SAFETY: presence check only.
    if unsafe { OWNERS.get(scope) }.is_some() && !owner_bound(ctx) {
        return Err(Counter::ListenerNotOwner);
    }
    // SAFETY: the context is the kernel's, valid for this call.
    let ops = unsafe { &mut *ctx.ops };
    match LISTENERS.update(listener_key(family, port), ops, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(Counter::ListenerRegistered),
        Err(e) if e == -EEXIST => Err(Counter::ListenerTaken),
        Err(_) => Err(Counter::ErrListener),
    }
}

/// Whether the owner bound this socket (post_bind left its mark).
fn owner_bound(ctx: &SockOpsContext) -> bool {
    // SAFETY: the context is valid; `sk` is a nullable socket pointer.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: lookup only, no create; the map pointer is relocated at load.
    let mark = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&OWNER_BOUND).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            0,
        )
    }
    .cast::<u32>();
    // SAFETY: non-null storage of this socket.
    !mark.is_null() && unsafe { *mark } == 1
}

/// Marks IPv4 sockets the owner binds to a TO port.
#[cgroup_sock(post_bind4)]
pub fn post_bind4(ctx: SockContext) -> i32 {
    mark_owner_bound(&ctx);
    1
}

/// Marks IPv6 sockets the owner binds to a TO port.
#[cgroup_sock(post_bind6)]
pub fn post_bind6(ctx: SockContext) -> i32 {
    mark_owner_bound(&ctx);
    1
}

#[inline(always)]
fn mark_owner_bound(ctx: &SockContext) {
    let Some(config) = steer_config() else {
        return;
    };
    let scope = config.scope;
    let sk = ctx.sock;
    // SAFETY: 4-byte loads of a valid context; src_port is host order.
    let (protocol, port) = unsafe {
        (
            read_volatile(addr_of!((*sk).protocol)),
            read_volatile(addr_of!((*sk).src_port)),
        )
    };
    if protocol != u32::from(PROTO_TCP) {
        return;
    }
    // SAFETY: presence checks only.
    if unsafe { TARGETS.get(ScopePort::new(scope, port as u16)) }.is_none()
        || unsafe { OWNERS.get(scope) }.is_none()
        || !is_owner(scope)
    {
        return;
    }
    // SAFETY: the socket of this program's context; create the entry.
    let mark = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&OWNER_BOUND).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<u32>();
    if !mark.is_null() {
        // SAFETY: non-null storage of this socket.
        unsafe { *mark = 1 };
    }
}
