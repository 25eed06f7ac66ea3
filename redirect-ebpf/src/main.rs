//! eBPF programs of redirect: connect-time port rewriting in a cgroup.
//!
//! - `connect.rs`: connect4/6 rewrite TCP and connected UDP;
//! - `getpeername.rs`: getpeername4/6 report the original port;
//! - `udp.rs`: sendmsg4/6 and recvmsg4/6 for unconnected UDP;
//! - `listen.rs`: registers a scope's listeners for steering (sock_ops,
//!   and post_bind marks proving the owner bound them);
//! - `bind.rs`: bind4/6 let granted ports be bound without privilege;
//! - `guard.rs`: guard4/6, attached above a scope, keep TO for its owner
//!   in the whole namespace;
//! - `steer.rs`: sk_lookup hands inbound connections for FROM to the
//!   listener registered for TO.
//!
//! Each hook lives in its own module with a thin entry point; maps are in
//! [`maps`], context quirks in [`ctx`]. Names and layouts come from
//! `redirect-common`, so the loader and these programs cannot drift.
//!
//! Every program fails open: a miss or an error lets the syscall proceed
//! unchanged, and is counted in `COUNTERS`.

#![no_std]
#![no_main]
// The atomic add of `maps::add_stat` (see there).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod bind;
mod connect;
mod ctx;
mod getpeername;
mod guard;
mod listen;
mod maps;
mod steer;
mod udp;

/// Verdict of a cgroup sock_addr program that lets the syscall proceed.
///
/// Returning 0 would fail the syscall with EPERM; redirect never does that.
const ALLOW: i32 = 1;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never executed.
    loop {}
}

/// The kernel only lets GPL-compatible programs call some helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
