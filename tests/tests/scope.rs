//! Scoped mappings: `/tcp` and `/udp` limit a mapping to one protocol, and
//! an address (`127.0.0.1:443:8443`, `[::1]:443:8443`) to one destination;
//! everything else is left alone.

use redirect_tests::{Pair, TcpServer, attach, privileged, probe, socket_addr, test_cgroup};

/// With the same ports open for TCP and UDP, a `/proto` mapping redirects
/// that protocol only.
fn check_protocol_scope(proto: &str) {
    let tag = format!("scope-{proto}");
    if !privileged(&tag) {
        return;
    }
    let tcp = Pair::tcp("127.0.0.1");
    // Kept alive for the whole test: the UDP servers on the same ports.
    let _udp = Pair::udp_beside(&tcp);
    let cgroup = test_cgroup(&tag);
    let _redirector = attach(cgroup.path(), &format!("{}/{proto}", tcp.mapping()));
    let from = tcp.decoy.addr;

    let (tcp_reply, udp_reply) = if proto == "tcp" {
        ("to:hello", "decoy:hello")
    } else {
        ("decoy:hello", "to:hello")
    };
    assert_eq!(probe(Some(&cgroup), "tcp", from).reply(), tcp_reply);
    assert_eq!(probe(Some(&cgroup), "udp", from).reply(), udp_reply);
    assert_eq!(probe(Some(&cgroup), "sendto", from).reply(), udp_reply);
}

#[test]
fn a_tcp_mapping_leaves_udp_alone() {
    check_protocol_scope("tcp");
}

#[test]
fn a_udp_mapping_leaves_tcp_alone() {
    check_protocol_scope("udp");
}

/// A mapping scoped to `scoped_ip` redirects connections to that address
/// (the address stays, the port changes) and leaves `other_ip` alone.
fn check_address_scope(scoped_ip: &str, other_ip: &str, tag: &str) {
    if !privileged(tag) {
        return;
    }
    let servers = Pair::tcp(scoped_ip);
    let from = servers.decoy.addr.port();
    // Another listener on FROM at the other address.
    let other = TcpServer::start(&socket_addr(other_ip, from), "other");
    let cgroup = test_cgroup(tag);
    let mapping = format!(
        "{}:{}",
        socket_addr(scoped_ip, from),
        servers.target.addr.port()
    );
    let _redirector = attach(cgroup.path(), &mapping);

    let report = probe(Some(&cgroup), "tcp", servers.decoy.addr);
    assert_eq!(
        report.reply(),
        "to:hello",
        "the scoped address is redirected"
    );
    assert_eq!(report.peer(), servers.decoy.addr);
    let report = probe(Some(&cgroup), "tcp", other.addr);
    assert_eq!(
        report.reply(),
        "other:hello",
        "another address is untouched"
    );
}

#[test]
fn an_ipv4_address_scope_leaves_other_addresses_alone() {
    check_address_scope("127.0.0.1", "127.0.0.2", "addr4");
}

#[test]
fn an_ipv6_address_scope_leaves_ipv4_alone() {
    check_address_scope("::1", "127.0.0.1", "addr6");
}

/// `127.0.0.1:FROM:TO` also covers a dual-stack client dialing
/// `::ffff:127.0.0.1`, which is the same destination.
#[test]
fn an_ipv4_scope_covers_the_v4_mapped_form() {
    if !privileged("addr4m") {
        return;
    }
    let servers = Pair::tcp("127.0.0.1");
    let cgroup = test_cgroup("addr4m");
    let _redirector = attach(cgroup.path(), &format!("127.0.0.1:{}", servers.mapping()));
    let mapped = format!("[::ffff:127.0.0.1]:{}", servers.decoy.addr.port());
    let report = probe(Some(&cgroup), "tcp", mapped.parse().unwrap());
    assert_eq!(report.reply(), "to:hello");
}
