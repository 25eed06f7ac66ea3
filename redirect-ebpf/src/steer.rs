//! `sk_lookup`: inbound steering. A TCP connection arriving in the network
//! namespace for a mapped FROM port (from another host, another namespace,
//! or this host's loopback) is handed to the listening socket registered
//! for its TO port. Nothing is rewritten: the accepted socket's local port
//! is FROM, and the server sees the client's real address.
//!
//! When a mapping exists but no listener is registered for its TO port, the
//! connection is refused (SK_DROP: the kernel answers with a reset), never
//! handed to whatever else is bound to FROM or TO (tubular's rule).
//!
//! Minimum kernel version: 5.9.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use aya_log_ebpf::debug;
use redirect_common::{
    AF_INET6, Addr, CELL_FROM, CELL_SLOW, Counter, PROTO_ANY, PROTO_TCP, listener_key,
};

use crate::maps::{LISTENERS, STEER_CELL, count, lookup, steer_config};

/// `SK_PASS`: carry on with the kernel's normal socket lookup.
const SK_PASS: u32 = 1;
/// `SK_DROP`: refuse the connection.
const SK_DROP: u32 = 0;
use redirect_common::AF_INET;

/// Steers connections for mapped ports to registered listeners.
#[sk_lookup]
pub fn steer(ctx: SkLookupContext) -> u32 {
    let lk = ctx.lookup;
    // SAFETY: 4-byte loads of a valid context.
    let (protocol, family, port) = unsafe {
        (
            read_volatile(addr_of!((*lk).protocol)),
            read_volatile(addr_of!((*lk).family)),
            read_volatile(addr_of!((*lk).local_port)),
        )
    };
    if protocol != u32::from(PROTO_TCP) {
        return SK_PASS;
    }
    // local_port is in host byte order here (unlike remote_port).
    let port = port as u16;
    let Some(config) = steer_config() else {
        return SK_PASS;
    };
    // The cell answers for a plain mapping (any address) and for a port
    // that is no FROM of the scope; the tables for the rest.
    let cell = STEER_CELL.get(0).filter(|c| c.scope != 0);
    let to = match cell.map(|c| c.slot(port)) {
        Some(slot) if slot.kind == CELL_SLOW => None,
        Some(slot)
            if slot.kind == CELL_FROM
                && slot.port == port
                && (slot.proto == PROTO_ANY || slot.proto == PROTO_TCP) =>
        {
            Some(slot.other)
        }
        Some(_) => return SK_PASS,
        None => None,
    };
    let to = match to {
        Some(to) => to,
        None => {
            let addr = local_addr(&ctx, family);
            match lookup(config.scope, &addr, port, PROTO_TCP) {
                Some((_, target)) => target.port,
                None => return SK_PASS,
            }
        }
    };
    // The listener of the connection's own family first; an IPv4
    // connection may also go to a dual-stack IPv6 listener.
    let own = listener_key(family, to);
    let dual = listener_key(AF_INET6, to);
    let mut result = LISTENERS.redirect_sk_lookup(&ctx, own, 0);
    if result.is_err() && family == AF_INET {
        result = LISTENERS.redirect_sk_lookup(&ctx, dual, 0);
    }
    match result {
        Ok(()) => {
            count(Counter::SteerAssigned);
            SK_PASS
        }
        Err(e) => {
            // -ENOENT: nothing registered; anything else: the registered
            // socket could not take it (tubular's errors__bad_socket).
            count(if e == -ENOENT {
                Counter::SteerNoListener
            } else {
                Counter::SteerBadSocket
            });
            debug!(
                &ctx,
                "sk_lookup: port {} has no listener on {}, refused", port, to
            );
            SK_DROP
        }
    }
}

/// `ENOENT`: the sockhash has no socket under the key.
const ENOENT: i32 = 2;

/// The destination address, IPv4 mapped into `::ffff:a.b.c.d` (as in
/// `ctx::dst_addr`).
///
/// Why every word is read before choosing: with the loads inside an
/// if/else, LLVM merges the v4 and v6 branches into one load through a
/// computed context pointer, which the verifier rejects ("dereference of
/// modified ctx ptr R2 off=56 disallowed").
#[inline(always)]
fn local_addr(ctx: &SkLookupContext, family: u32) -> Addr {
    let lk = ctx.lookup;
    // SAFETY: 4-byte loads of a valid context.
    let (ip4, ip6) = unsafe {
        (
            read_volatile(addr_of!((*lk).local_ip4)),
            [
                read_volatile(addr_of!((*lk).local_ip6[0])),
                read_volatile(addr_of!((*lk).local_ip6[1])),
                read_volatile(addr_of!((*lk).local_ip6[2])),
                read_volatile(addr_of!((*lk).local_ip6[3])),
            ],
        )
    };
    if family == AF_INET {
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
    } else {
        ip6
    }
}
