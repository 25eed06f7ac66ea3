//! `sockops_stats` (shared instance): counts TCP connections currently
//! established through a redirect. A connection rewritten by connect4/6 is
//! counted when it is established and uncounted when it closes (the state
//! callback, which is enabled only for these sockets).
//!
//! Minimum kernel version: 5.3 (`ctx->sk` and sk_storage in sock_ops).

use core::ptr;

use aya_ebpf::{
    helpers::generated::bpf_sk_storage_get, macros::sock_ops, programs::SockOpsContext,
};
use redirect_common::OrigDst;

use crate::maps::{ORIG_DST, Stat, add_stat};

/// `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`: our connect completed.
const ACTIVE_ESTABLISHED_CB: u32 = 4;
/// `BPF_SOCK_OPS_STATE_CB`: args[0] old state, args[1] new state.
const STATE_CB: u32 = 10;
/// `BPF_SOCK_OPS_STATE_CB_FLAG`: ask for STATE_CB on this socket.
const STATE_CB_FLAG: u32 = 1 << 2;
/// `BPF_TCP_CLOSE`.
const TCP_CLOSE: u32 = 7;
/// The sock_ops verdict; the value is ignored for these callbacks.
pub const SOCK_OPS_OK: u32 = 1;

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
