//! Accessors for `bpf_sock_addr` that hide the verifier's quirks.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::programs::SockAddrContext;

/// `IPPROTO_TCP` from `<netinet/in.h>`.
pub const IPPROTO_TCP: u32 = 6;
/// `IPPROTO_UDP` from `<netinet/in.h>`.
pub const IPPROTO_UDP: u32 = 17;

/// The destination port of the syscall (the peer port for getpeername), in
/// host byte order.
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

/// The socket's protocol (`IPPROTO_*`).
#[inline(always)]
pub fn protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: as in `dst_port`.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) }
}
