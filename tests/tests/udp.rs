//! Unconnected UDP (`sendto()` without `connect()`): the datagram reaches TO,
//! and `recvfrom()` reports the reply as coming from FROM. Reverse state is
//! never stale: after a mapping is removed, the next datagram is not
//! rewritten and a late reply is reported with its true source.

use std::{process::Command, thread, time::Duration};

use redirect_tests::{
    Interactive, Pair, Spawn, UdpServer, attach, privileged, probe,
    redirect::{Counter, Mapping, Proto},
    test_cgroup,
};

fn check_sendto(ip: &str, tag: &str) {
    if !privileged(tag) {
        return;
    }
    let servers = Pair::udp(ip);
    let cgroup = test_cgroup(tag);
    let redirector = attach(cgroup.path(), &format!("{}/udp", servers.mapping()));

    let report = probe(Some(&cgroup), "sendto", servers.decoy.addr);
    assert!(report.ok, "probe failed: {report:?}");
    assert_eq!(
        report.reply(),
        "to:hello",
        "datagram reached TO, reply came back"
    );
    assert_eq!(report.peer(), servers.decoy.addr, "recvfrom reports FROM");
    assert!(servers.decoy.peers().is_empty(), "nothing reached FROM");

    let counters = redirector.counters().unwrap();
    assert_eq!(counters.get(Counter::SendmsgRedirected), 1, "{counters:?}");
    assert_eq!(counters.get(Counter::RecvmsgRestored), 1, "{counters:?}");
    let counts = redirector.mapping_counts().unwrap();
    assert_eq!(counts[0].1.datagrams, 1, "{counts:?}");
}

#[test]
fn unconnected_udp_ipv4_is_redirected_and_replies_come_from_from() {
    check_sendto("127.0.0.1", "sendto4");
}

#[test]
fn unconnected_udp_ipv6_is_redirected_and_replies_come_from_from() {
    check_sendto("::1", "sendto6");
}

/// Removing a UDP mapping while a client socket stays open: a reply already
/// in flight is reported with its true source (TO), not FROM, and the next
/// datagram goes to FROM unchanged.
#[test]
fn removing_a_udp_mapping_leaves_no_stale_reverse_state() {
    if !privileged("udp-remove") {
        return;
    }
    let servers = Pair::udp("127.0.0.1");
    let cgroup = test_cgroup("udp-remove");
    let mapping = format!("{}/udp", servers.mapping());
    let mut redirector = attach(cgroup.path(), &mapping);
    let from = servers.decoy.addr;
    let to = servers.target.addr;

    let mut client = Interactive::start(&cgroup, &["session", &from.to_string()]);
    client.send("send a");
    assert_eq!(client.line(), "sent");
    client.send("recv");
    assert_eq!(client.line(), format!("from={from} data=to:a"));

    // A reply is in flight (the server answers "slow…" late) when the
    // mapping goes away.
    client.send("send slow");
    assert_eq!(client.line(), "sent");
    let removed = redirector
        .remove(&Mapping::new(from.port(), 0).with_proto(Proto::Udp))
        .unwrap();
    assert!(removed.is_some());
    client.send("recv");
    assert_eq!(
        client.line(),
        format!("from={to} data=to:slow"),
        "a reply from TO after the removal is not attributed to FROM"
    );

    client.send("send b");
    assert_eq!(client.line(), "sent");
    client.send("recv");
    assert_eq!(
        client.line(),
        format!("from={from} data=decoy:b"),
        "the next datagram is not rewritten"
    );
    client.finish();

    let counters = redirector.counters().unwrap();
    assert!(counters.get(Counter::RevNatStale) >= 1, "{counters:?}");
}

/// Changing a mapping's target (remove, then add it again to another port)
/// never reports replies from the old target as FROM.
#[test]
fn changing_a_udp_target_invalidates_the_old_reverse_entries() {
    if !privileged("udp-change") {
        return;
    }
    let servers = Pair::udp("127.0.0.1");
    let other = UdpServer::start("127.0.0.1:0", "other");
    let cgroup = test_cgroup("udp-change");
    let mut redirector = attach(cgroup.path(), &format!("{}/udp", servers.mapping()));
    let from = servers.decoy.addr;

    let mut client = Interactive::start(&cgroup, &["session", &from.to_string()]);
    client.send("send slow");
    assert_eq!(client.line(), "sent");
    let udp = Mapping::new(from.port(), 0).with_proto(Proto::Udp);
    redirector.remove(&udp).unwrap();
    redirector
        .insert(Mapping::new(from.port(), other.addr.port()).with_proto(Proto::Udp))
        .unwrap();
    client.send("recv");
    assert_eq!(
        client.line(),
        format!("from={} data=to:slow", servers.target.addr),
        "the old target's late reply keeps its true source"
    );
    client.send("send c");
    assert_eq!(client.line(), "sent");
    client.send("recv");
    assert_eq!(client.line(), format!("from={from} data=other:c"));
    client.finish();
}

/// One socket sending through a mapping to more backends than its own
/// reverse entries hold (`UDP_PEER_SLOTS`; a backend whose entry another
/// holds goes to `REV_NAT`): every reply is reported from FROM on its
/// backend's address, the first time and every time after.
#[test]
fn one_socket_talking_to_many_backends_gets_every_source_restored() {
    if !privileged("udp-many") {
        return;
    }
    const BACKENDS: u8 = 6;
    let servers = Pair::udp("127.0.0.1");
    let to = servers.target.addr.port();
    // The same TO port on other loopback addresses; kept alive to the end.
    let others: Vec<UdpServer> = (2..=BACKENDS)
        .map(|i| UdpServer::start(&format!("127.0.0.{i}:{to}"), "to"))
        .collect();
    let cgroup = test_cgroup("udp-many");
    let redirector = attach(cgroup.path(), &format!("{}/udp", servers.mapping()));
    let from = servers.decoy.addr.port();

    let mut client = Interactive::start(&cgroup, &["session", &servers.decoy.addr.to_string()]);
    for round in 0..2 {
        for i in 1..=BACKENDS {
            let via = format!("127.0.0.{i}:{from}");
            client.send(&format!("sendto {via} r{round}"));
            assert_eq!(client.line(), "sent");
            client.send("recv");
            assert_eq!(
                client.line(),
                format!("from={via} data=to:r{round}"),
                "backend {i}, round {round}"
            );
        }
    }
    client.finish();
    assert!(servers.decoy.peers().is_empty(), "nothing reached FROM");
    assert!(others.iter().all(|s| s.peers().len() == 2));

    let counters = redirector.counters().unwrap();
    let n = 2 * u64::from(BACKENDS);
    assert_eq!(counters.get(Counter::RecvmsgRestored), n, "{counters:?}");
    assert_eq!(counters.get(Counter::RevNatStale), 0, "{counters:?}");
}

/// A real DNS exchange: `dig @127.0.0.1 -p FROM` from inside the scope is
/// answered by a dnsmasq listening on an unprivileged port TO.
#[test]
fn dig_through_a_redirect_gets_dnsmasq_s_answer() {
    if !privileged("dns") {
        return;
    }
    let dns = Dnsmasq::start();
    let from = free_udp_port();
    let cgroup = test_cgroup("dns");
    let _redirector = attach(cgroup.path(), &format!("{from}:{}/udp", dns.port));

    let mut cmd = Command::new("dig");
    cmd.args([
        "@127.0.0.1",
        "-p",
        &from.to_string(),
        "redirect.test",
        "A",
        "+short",
        "+time=3",
        "+tries=1",
    ]);
    Spawn {
        cgroup: Some(&cgroup),
        unprivileged: true,
    }
    .apply(&mut cmd);
    let out = cmd
        .output()
        .expect("run dig (apt-get install bind9-dnsutils)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dig failed: {stdout}");
    assert_eq!(stdout.trim(), Dnsmasq::ANSWER, "dig got dnsmasq's answer");
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A dnsmasq answering `redirect.test` on 127.0.0.1, on a free port; killed
/// on drop.
struct Dnsmasq {
    child: std::process::Child,
    port: u16,
}

impl Dnsmasq {
    const ANSWER: &str = "192.0.2.53";

    fn start() -> Self {
        for _ in 0..5 {
            let port = free_udp_port();
            let mut child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--pid-file=",
                    "--user=nobody",
                    "--group=nogroup",
                    &format!("--port={port}"),
                    &format!("--address=/redirect.test/{}", Self::ANSWER),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start dnsmasq (apt-get install dnsmasq-base)");
            // Wait until it answers directly on its own port.
            for _ in 0..50 {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken; try another
                }
                if dnsmasq_answers(port) {
                    return Dnsmasq { child, port };
                }
                thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("dnsmasq did not start");
    }
}

fn dnsmasq_answers(port: u16) -> bool {
    Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "redirect.test",
            "+short",
            "+time=1",
            "+tries=1",
        ])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == Dnsmasq::ANSWER)
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
