//! Accessors for `bpf_sock_addr` that hide the verifier's quirks.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{helpers::generated::bpf_get_socket_cookie, programs::SockAddrContext};
use redirect_common::Addr;

/// `IPPROTO_TCP` from `<netinet/in.h>`.
pub const IPPROTO_TCP: u32 = 6;
/// `IPPROTO_UDP` from `<netinet/in.h>`.
pub const IPPROTO_UDP: u32 = 17;

/// The address family a hook runs for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// connect4, sendmsg4, …: the address is `user_ip4`.
    V4,
    /// connect6, sendmsg6, …: the address is `user_ip6`.
    V6,
}

impl Family {
    /// 4 or 6, for log lines.
    pub const fn number(self) -> u8 {
        match self {
            Family::V4 => 4,
            Family::V6 => 6,
        }
    }
}

/// The destination port of the syscall (the peer port for getpeername, the
/// source port for recvmsg), in host byte order.
///
/// Why volatile: the verifier accepts only a 4-byte load of `user_port`; a
/// plain read lets LLVM narrow it to 2 bytes, which is rejected (Cilium's
/// "missing narrow ctx access" hack, `ctx_dst_port`).
#[inline(always)]
pub fn dst_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let raw = unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) };
    // The port sits in network order in the first two bytes of the word.
    u16::from_be(raw as u16)
}

/// Sets the destination port (host byte order).
///
/// Why a full 4-byte store: `user_port` is only writable as a whole `u32`
/// holding the network-order port in its first two bytes.
#[inline(always)]
pub fn set_dst_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: as in `dst_port`; the field is writable in these hooks.
    unsafe {
        write_volatile(
            addr_of_mut!((*ctx.sock_addr).user_port),
            u32::from(port.to_be()),
        )
    }
}

/// The destination address as four network-order words, IPv4 mapped into
/// `::ffff:a.b.c.d`.
///
/// Why one word at a time: copying `user_ip6` as an array makes LLVM
/// compute a pointer into the context and load through it, which the
/// verifier rejects ("dereference of modified ctx ptr R4 off=8
/// disallowed", aya's sk_storage test).
#[inline(always)]
pub fn dst_addr(ctx: &SockAddrContext, family: Family) -> Addr {
    let sa = ctx.sock_addr;
    // SAFETY: as in `dst_port`; 4-byte loads of these fields are allowed.
    unsafe {
        match family {
            Family::V4 => [
                0,
                0,
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                read_volatile(addr_of!((*sa).user_ip4)),
            ],
            Family::V6 => [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ],
        }
    }
}

/// The socket's protocol (`IPPROTO_*`).
#[inline(always)]
pub fn protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: as in `dst_port`.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) }
}

/// The socket's cookie: a per-boot unique id, stable for its lifetime.
#[inline(always)]
pub fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the context's socket.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}
