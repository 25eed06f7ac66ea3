//! `sockops` programs.
//!
//! - `sockops_stats` (shared instance): counts TCP connections currently
//!   established through a redirect. A connection rewritten by connect4/6
//!   is counted when it is established and uncounted when it closes (the
//!   state callback, which is enabled only for these sockets).
//! - `sockops_listen` (a scope's steering instance): registers a socket of
//!   the scope that starts listening on one of its TO ports in
//!   `LISTENERS`, for `steer.rs`, when it may serve the mapping: bound to
//!   the wildcard address or the mappings' own address (never a
//!   loopback-only server for a wildcard mapping), keyed by its family, and
//!   never displacing a registered listener (the first keeps the traffic;
//!   the kernel drops a socket from the sockhash when it closes, and the
//!   next listen registers again). Who may listen at all is decided at
//!   bind time (`bind.rs`, `--owner`).
//!
//! Minimum kernel version: 5.3 (`ctx->sk` and sk_storage in sock_ops).

use core::ptr;

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_sk_storage_get, macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{
    ADDR_ANY, AF_INET, AF_INET6, Addr, Counter, OrigDst, ScopePort, listener_key,
};

use crate::maps::{LISTENERS, ORIG_DST, STEER_SCOPE, Stat, TARGETS, add_stat, count};

/// `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`: our connect completed.
const ACTIVE_ESTABLISHED_CB: u32 = 4;
/// `BPF_SOCK_OPS_STATE_CB`: args[0] old state, args[1] new state.
const STATE_CB: u32 = 10;
/// `BPF_SOCK_OPS_STATE_CB_FLAG`: ask for STATE_CB on this socket.
const STATE_CB_FLAG: u32 = 1 << 2;
/// `BPF_TCP_CLOSE`.
const TCP_CLOSE: u32 = 7;
/// `BPF_SOCK_OPS_TCP_LISTEN_CB`: called right after listen().
const TCP_LISTEN_CB: u32 = 11;

/// The sock_ops verdict; the value is ignored for these callbacks.
const SOCK_OPS_OK: u32 = 1;

/// Counts established redirected connections (name: the section is
/// "sockops", so the function must not be).
#[sock_ops]
pub fn sockops_stats(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        STATE_CB if ctx.arg(1) == TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    SOCK_OPS_OK
}

/// Registers the scope's new listeners on TO ports.
#[sock_ops]
pub fn sockops_listen(ctx: SockOpsContext) -> u32 {
    if ctx.op() == TCP_LISTEN_CB {
        on_listen(&ctx);
    }
    SOCK_OPS_OK
}

#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    // local_port is in host byte order in sock_ops (remote_port is not).
    let port = ctx.local_port() as u16;
    // SAFETY: copied out at once.
    let Some(target) = unsafe { TARGETS.get(ScopePort::new(STEER_SCOPE.load(), port)) }.copied()
    else {
        return;
    };
    let family = ctx.family();
    // Read both before choosing (see steer.rs on merged context loads).
    let (ip4, ip6) = (ctx.local_ip4(), ctx.local_ip6());
    let addr: Addr = if family == AF_INET {
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
    } else if family == AF_INET6 {
        ip6
    } else {
        return;
    };
    let wildcard = addr == ADDR_ANY || (family == AF_INET && ip4 == 0);
    if !wildcard && (target.addr == ADDR_ANY || target.addr != addr) {
        count(Counter::ListenerIneligible);
        return;
    }
    // SAFETY: the context is the kernel's, valid for this call.
    let ops = unsafe { &mut *ctx.ops };
    match LISTENERS.update(listener_key(family, port), ops, u64::from(BPF_NOEXIST)) {
        Ok(()) => count(Counter::ListenerRegistered),
        // -EEXIST: an eligible listener is registered already.
        Err(-17) => count(Counter::ListenerTaken),
        Err(_) => count(Counter::ErrListener),
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    // SAFETY: non-null storage returned by the kernel for this socket,
    // which no one else touches while this callback runs on it.
    let Some(orig) = (unsafe { orig_dst(ctx).as_mut() }) else {
        return;
    };
    if orig.orig_port == 0 || orig.established != 0 {
        return;
    }
    orig.established = 1;
    add_stat(orig.slot, orig.generation, Stat::Established, 1);
    // Only redirected sockets pay for state callbacks.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: non-null storage returned by the kernel for this socket,
    // which no one else touches while this callback runs on it.
    let Some(orig) = (unsafe { orig_dst(ctx).as_mut() }) else {
        return;
    };
    if orig.established == 0 {
        return;
    }
    orig.established = 0;
    add_stat(orig.slot, orig.generation, Stat::Established, u64::MAX);
}

/// The socket's redirect record if connect4/6 wrote one, else null.
///
/// Why the raw helper: aya-ebpf's `SkStorage` accessors take a sock_addr
/// context only; `ctx->sk` here may be null and must be checked first.
#[inline(always)]
fn orig_dst(ctx: &SockOpsContext) -> *mut OrigDst {
    // SAFETY: the context is valid; `sk` is a nullable socket pointer.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: the map pointer is the map definition's address (relocated
    // at load); lookup only, no create.
    unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&ORIG_DST).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            0,
        )
    }
    .cast::<OrigDst>()
}
