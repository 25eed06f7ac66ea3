//! The PROXY protocol header (HAProxy's, v1 text or v2 binary) that tells
//! the backend who the real client is, built with the `ppp` crate.
//!
//! A userspace proxy opens a new connection to the backend, so the backend
//! sees the proxy's address as its peer; with `--proxy-protocol` the proxy
//! writes one header first, and a backend configured for it (nginx
//! `listen … proxy_protocol`, haproxy `accept-proxy`, Postfix, Dovecot…)
//! takes the client and original destination from it.

use std::{fmt, net::SocketAddr, str::FromStr};

use ppp::v2::{Builder, Command, Protocol, Version};

use super::canonical;

/// Which PROXY protocol version to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// The human-readable `PROXY TCP4 src dst sport dport\r\n` line.
    V1,
    /// The binary header (also carries the addresses of other protocols).
    V2,
}

impl ProxyProtocol {
    /// The header announcing a TCP connection from `client` to `original`
    /// (the address the client connected to, FROM).
    pub fn header(self, client: SocketAddr, original: SocketAddr) -> Vec<u8> {
        let (client, original) = same_family(client, original);
        match self {
            ProxyProtocol::V1 => ppp::v1::Addresses::from((client, original))
                .to_string()
                .into_bytes(),
            ProxyProtocol::V2 => {
                Builder::with_addresses(
                    Version::Two | Command::Proxy,
                    Protocol::Stream,
                    (client, original),
                )
                .build()
                // Only a write into a Vec, which cannot fail.
                .expect("building a PROXY v2 header in memory")
            }
        }
    }
}

/// Both addresses in one family: IPv4-mapped IPv6 addresses (a dual-stack
/// listener's IPv4 clients) become IPv4; a remaining mix is announced as
/// IPv6 (IPv4 mapped), which the header formats require.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (a, b) = (canonical(a), canonical(b));
    match (a, b) {
        (SocketAddr::V4(_), SocketAddr::V6(_)) => (to_v6(a), b),
        (SocketAddr::V6(_), SocketAddr::V4(_)) => (a, to_v6(b)),
        _ => (a, b),
    }
}

fn to_v6(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

impl FromStr for ProxyProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" | "1" => Ok(ProxyProtocol::V1),
            "v2" | "2" => Ok(ProxyProtocol::V2),
            _ => Err(format!(
                "unknown PROXY protocol version {s:?}: use v1 or v2"
            )),
        }
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_the_text_line() {
        let h = ProxyProtocol::V1.header(
            "192.0.2.2:40000".parse().unwrap(),
            "[::ffff:192.0.2.1]:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.2 192.0.2.1 40000 443\r\n");
    }

    #[test]
    fn v2_starts_with_the_signature_and_carries_ipv4() {
        let h = ProxyProtocol::V2.header(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:443".parse().unwrap(),
        );
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        // Version 2, PROXY; TCP over IPv4; 12 address bytes.
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(h.len(), 28);
    }
}
