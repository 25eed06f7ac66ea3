//! Connect-time redirection through the library: a client in a child cgroup
//! connects to FROM and reaches the listener on TO; getpeername reports
//! FROM; clients outside the cgroup are untouched; mappings change at run
//! time without reattaching.

use std::net::SocketAddr;

use redirect_tests::{
    Pair, attach, attached, privileged, probe,
    redirect::{Counter, Mapping, ebpf::HOOKS},
    test_cgroup, wait_detached,
};

fn with_port(addr: SocketAddr, ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), addr.port())
}

/// The client's bytes reach the listener on TO and the reply comes back;
/// the client's getpeername reports FROM; the listener sees the client's
/// real address.
fn check_tcp(listen_ip: &str, dial_ip: &str, tag: &str) {
    if !privileged(tag) {
        return;
    }
    let servers = Pair::tcp(listen_ip);
    let cgroup = test_cgroup(tag);
    let _redirector = attach(cgroup.path(), &servers.mapping());

    let from = with_port(servers.decoy.addr, dial_ip);
    let report = probe(Some(&cgroup), "tcp", from);
    assert!(report.ok, "probe failed: {report:?}");
    assert_eq!(report.reply(), "to:hello", "bytes reached TO and came back");
    assert_eq!(report.peer(), from, "getpeername reports FROM");
    assert_eq!(
        servers.target.peers(),
        vec![canonical(report.local())],
        "the listener sees the client's real address"
    );
    assert!(servers.decoy.peers().is_empty(), "nothing reached FROM");
}

/// `[::ffff:127.0.0.1]:p` as the IPv4 listener sees it, `127.0.0.1:p`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[test]
fn tcp_ipv4_is_redirected() {
    check_tcp("127.0.0.1", "127.0.0.1", "tcp4");
}

#[test]
fn tcp_ipv6_is_redirected() {
    check_tcp("::1", "::1", "tcp6");
}

/// A dual-stack socket connecting to `::ffff:127.0.0.1` goes through
/// connect6, not connect4.
#[test]
fn tcp_ipv4_mapped_is_redirected() {
    check_tcp("127.0.0.1", "::ffff:127.0.0.1", "tcp4m");
}

#[test]
fn client_outside_the_scope_is_not_redirected() {
    if !privileged("outside") {
        return;
    }
    let servers = Pair::tcp("127.0.0.1");
    let cgroup = test_cgroup("outside");
    let _redirector = attach(cgroup.path(), &servers.mapping());

    let report = probe(None, "tcp", servers.decoy.addr);
    assert!(report.ok, "probe failed: {report:?}");
    assert_eq!(report.reply(), "decoy:hello", "reached FROM itself");
    assert!(servers.target.peers().is_empty());
}

#[test]
fn connected_udp_is_redirected() {
    if !privileged("udp") {
        return;
    }
    let servers = Pair::udp("127.0.0.1");
    let cgroup = test_cgroup("udp");
    let _redirector = attach(cgroup.path(), &servers.mapping());

    let report = probe(Some(&cgroup), "udp", servers.decoy.addr);
    assert!(report.ok, "probe failed: {report:?}");
    assert_eq!(
        report.reply(),
        "to:hello",
        "datagram reached TO, reply came back"
    );
    assert_eq!(
        report.peer(),
        servers.decoy.addr,
        "getpeername reports FROM"
    );
    assert_eq!(servers.target.peers(), vec![report.local()]);
    assert!(servers.decoy.peers().is_empty());
}

#[test]
fn mappings_change_at_run_time_without_reattaching() {
    if !privileged("runtime") {
        return;
    }
    let servers = Pair::tcp("127.0.0.1");
    let cgroup = test_cgroup("runtime");
    let mut redirector = attach(cgroup.path(), &servers.mapping());
    let programs = attached(cgroup.path());
    assert_eq!(programs.len(), HOOKS.len(), "{programs:?}");

    let from = servers.decoy.addr;
    assert_eq!(probe(Some(&cgroup), "tcp", from).reply(), "to:hello");

    let removed = redirector
        .remove(&Mapping::new(from.port(), 0))
        .expect("remove");
    assert!(removed.is_some());
    assert_eq!(
        probe(Some(&cgroup), "tcp", from).reply(),
        "decoy:hello",
        "no redirect once the mapping is gone"
    );

    redirector
        .insert(Mapping::new(from.port(), servers.target.addr.port()))
        .expect("insert");
    assert_eq!(probe(Some(&cgroup), "tcp", from).reply(), "to:hello");
    assert_eq!(
        attached(cgroup.path()),
        programs,
        "same programs, no reattach"
    );

    let counters = redirector.counters().expect("counters");
    assert_eq!(counters.get(Counter::ConnectRedirected), 2, "{counters:?}");
    assert!(counters.get(Counter::PeerRestored) >= 2, "{counters:?}");
}

#[test]
fn dropping_the_redirector_detaches() {
    if !privileged("drop") {
        return;
    }
    let cgroup = test_cgroup("drop");
    let redirector = attach(cgroup.path(), "1443:18443");
    assert_eq!(attached(cgroup.path()).len(), HOOKS.len());
    drop(redirector);
    assert_eq!(wait_detached(cgroup.path()), Vec::<String>::new());
}

#[test]
fn a_runtime_insert_is_validated() {
    if !privileged("validate") {
        return;
    }
    let cgroup = test_cgroup("validate");
    let mut redirector = attach(cgroup.path(), "1443:18443");
    let err = redirector.insert(Mapping::new(18443, 1443)).unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    assert!(err.to_string().contains("loop"), "{err}");
    assert_eq!(redirector.mappings().len(), 1);
}

/// getpeername answers from the scope's reverse table, with no per-socket
/// state: a client that dials TO itself must still see TO, and two FROMs
/// sharing one TO each see their own (those connects keep a record).
#[test]
fn getpeername_tells_direct_dials_and_shared_targets_apart() {
    if !privileged("getpeername-reverse") {
        return;
    }
    let servers = Pair::tcp("127.0.0.1");
    let other = redirect_tests::TcpServer::start("127.0.0.1:0", "other");
    let cgroup = test_cgroup("getpeername-reverse");
    let to = servers.target.addr;
    let mappings = redirect::MappingSet::parse([
        servers.mapping(),
        format!("{}:{}", other.addr.port(), to.port()),
    ])
    .unwrap();
    let redirector =
        redirect::Redirector::attach(cgroup.path(), mappings, &redirect::Options::default())
            .expect("attach");

    let direct = probe(Some(&cgroup), "tcp", to);
    assert_eq!(direct.reply(), "to:hello");
    assert_eq!(direct.peer(), to, "a direct dial of TO reports TO");

    let via_first = probe(Some(&cgroup), "tcp", servers.decoy.addr);
    assert_eq!(via_first.reply(), "to:hello");
    assert_eq!(via_first.peer(), servers.decoy.addr, "its own FROM");
    let via_second = probe(Some(&cgroup), "tcp", other.addr);
    assert_eq!(via_second.reply(), "to:hello");
    assert_eq!(via_second.peer(), other.addr, "its own FROM");

    // With one mapping left, its TO is unambiguous again: no record.
    let mut redirector = redirector;
    redirector
        .remove(&Mapping::new(other.addr.port(), 0))
        .unwrap();
    let again = probe(Some(&cgroup), "tcp", servers.decoy.addr);
    assert_eq!(again.peer(), servers.decoy.addr);
    let direct = probe(Some(&cgroup), "tcp", to);
    assert_eq!(direct.peer(), to, "still TO for a direct dial");
}
