//! Who gets registered for inbound steering: only listeners that may serve
//! the mapping. The attacker is `nobody` inside the scope; every namespace
//! is the test's own.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use redirect_tests::{
    NetnsPair, RedirectProcess, Spawn, binary, parse_probe, privileged,
    redirect::cgroup::ChildCgroup, test_cgroup,
};

const FROM: u16 = 443;
const TO: u16 = 8443;

/// `probe MODE ADDR` in the server namespace inside `scope`; returns the
/// child, its stdin and its output lines.
fn start(
    pair: &NetnsPair,
    scope: &ChildCgroup,
    mode: &str,
    addr: &str,
    unprivileged: bool,
) -> (Child, mpsc::Receiver<String>) {
    let probe = binary("probe").display().to_string();
    // `ip netns exec` needs root, so the drop to nobody happens after it.
    let as_nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let mut args: Vec<&str> = if unprivileged {
        as_nobody.to_vec()
    } else {
        Vec::new()
    };
    args.extend([probe.as_str(), mode, addr]);
    let mut cmd = NetnsPair::command(&pair.server, &args);
    cmd.stdout(Stdio::piped()).stdin(Stdio::piped());
    Spawn {
        cgroup: Some(scope),
        unprivileged: false,
    }
    .apply(&mut cmd);
    let mut child = cmd.spawn().expect("start probe");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

fn next(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("a line from the probe")
}

fn client(pair: &NetnsPair) -> redirect_tests::ProbeReport {
    let probe = binary("probe").display().to_string();
    let addr = format!("{}:{FROM}", NetnsPair::SERVER_IP);
    parse_probe(
        &NetnsPair::command(&pair.client, &[&probe, "tcp", &addr, "hello"])
            .output()
            .expect("run client"),
    )
}

fn run(pair: &NetnsPair, scope: &ChildCgroup, map: &str, extra: &[&str]) -> RedirectProcess {
    let mut args = vec![
        "run".to_owned(),
        "--map".into(),
        map.into(),
        "--cgroup".into(),
        scope.path().display().to_string(),
        "--netns".into(),
        pair.server_path().display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let mut r = RedirectProcess::start(args);
    r.wait_ready();
    r
}

#[test]
fn a_socket_a_non_owner_bound_before_the_mapping_is_never_registered() {
    if !privileged("a_socket_a_non_owner_bound_before_the_mapping_is_never_registered") {
        return;
    }
    let pair = NetnsPair::new("bindlisten");
    let scope = test_cgroup("bindlisten");
    // The attacker binds TO before redirect starts (no guard yet)...
    let (mut attacker, lines) = start(&pair, &scope, "bindlisten", &format!("0.0.0.0:{TO}"), true);
    assert_eq!(next(&lines), "bound");
    // ...redirect starts with root as the owner (told to start although
    // TO is held: security::a_target_held_by_a_non_owner_refuses_run_unless_allowed
    // shows that it refuses otherwise)...
    let _run = run(
        &pair,
        &scope,
        &format!("{FROM}:{TO}"),
        &["--owner", "root", "--allow-held-target"],
    );
    // ...and the attacker listens only now.
    attacker.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(next(&lines), "listening");
    let report = client(&pair);
    assert!(
        !report.ok,
        "the squatter must not receive FROM's traffic: {report:?}"
    );
    let _ = attacker.kill();
    let _ = attacker.wait();
}

#[test]
fn a_loopback_only_listener_is_not_exposed_through_a_wildcard_mapping() {
    if !privileged("a_loopback_only_listener_is_not_exposed_through_a_wildcard_mapping") {
        return;
    }
    let pair = NetnsPair::new("loopback");
    let scope = test_cgroup("loopback");
    let _run = run(&pair, &scope, &format!("{FROM}:{TO}"), &[]);
    let (mut server, lines) = start(&pair, &scope, "serve", &format!("127.0.0.1:{TO}"), false);
    assert_eq!(next(&lines), "listening");
    let report = client(&pair);
    assert!(
        !report.ok,
        "a 127.0.0.1-only server stays local: {report:?}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_second_listener_never_displaces_the_first_and_a_restart_is_picked_up() {
    if !privileged("a_second_listener_never_displaces_the_first_and_a_restart_is_picked_up") {
        return;
    }
    let pair = NetnsPair::new("displace");
    let scope = test_cgroup("displace");
    let map = format!("{}:{FROM}:{TO}", NetnsPair::SERVER_IP);
    let _run = run(&pair, &scope, &map, &[]);
    let legit = format!("{}:{TO}", NetnsPair::SERVER_IP);
    let (mut first, lines) = start(&pair, &scope, "serve", &legit, false);
    assert_eq!(next(&lines), "listening");
    // Another user of the scope listens on TO on another address.
    let (mut squatter, squatter_lines) = start(
        &pair,
        &scope,
        "bindlisten",
        &format!("127.0.0.1:{TO}"),
        true,
    );
    assert_eq!(next(&squatter_lines), "bound");
    squatter.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(next(&squatter_lines), "listening");
    let report = client(&pair);
    assert_eq!(
        report.reply(),
        "to:hello",
        "the first listener keeps the traffic"
    );
    let _ = first.wait();
    // The legitimate server restarts: it is registered again.
    let (mut again, lines) = start(&pair, &scope, "serve", &legit, false);
    assert_eq!(next(&lines), "listening");
    let report = client(&pair);
    assert_eq!(report.reply(), "to:hello", "{report:?}");
    let _ = again.wait();
    let _ = squatter.kill();
    let _ = squatter.wait();
}

#[test]
fn a_steering_scope_takes_several_mappings() {
    if !privileged("a_steering_scope_takes_several_mappings") {
        return;
    }
    let pair = NetnsPair::new("several");
    let scope = test_cgroup("several");
    let mut args = vec![
        "run".to_owned(),
        "--cgroup".into(),
        scope.path().display().to_string(),
        "--netns".into(),
        pair.server_path().display().to_string(),
    ];
    for m in [
        format!("{FROM}:{TO}"),
        "80:8080".into(),
        "53:5353/udp".into(),
    ] {
        args.extend(["--map".to_owned(), m]);
    }
    let mut r = RedirectProcess::start(args);
    r.wait_ready();
    let (mut server, lines) = start(&pair, &scope, "serve", &format!("0.0.0.0:{TO}"), false);
    assert_eq!(next(&lines), "listening");
    assert_eq!(client(&pair).reply(), "to:hello");
    let _ = server.wait();
}

#[test]
fn a_socket_autobound_to_to_is_never_registered_for_an_owner() {
    if !privileged("a_socket_autobound_to_to_is_never_registered_for_an_owner") {
        return;
    }
    let pair = NetnsPair::new("autobind");
    let scope = test_cgroup("autobind");
    // Autobind can only pick TO in the server namespace (a per-namespace
    // setting, in a namespace of the test's own).
    let out = NetnsPair::command(
        &pair.server,
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_local_port_range={TO} {TO}"),
        ],
    )
    .output()
    .expect("sysctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Told to start although autobind may take TO (refused otherwise:
    // security::an_owner_s_to_that_autobind_may_take_is_refused_unless_reserved).
    let _run = run(
        &pair,
        &scope,
        &format!("{FROM}:{TO}"),
        &["--owner", "root", "--allow-held-target"],
    );
    let (mut squatter, lines) = start(&pair, &scope, "autolisten", "0.0.0.0:0", true);
    assert_eq!(
        next(&lines),
        format!("listening port={TO}"),
        "autobind took TO"
    );
    let report = client(&pair);
    assert!(!report.ok, "an autobound squatter gets nothing: {report:?}");
    let _ = squatter.kill();
    let _ = squatter.wait();
}

#[test]
fn the_udp_bind_rewrite_never_widens_a_bind() {
    if !privileged("the_udp_bind_rewrite_never_widens_a_bind") {
        return;
    }
    let pair = NetnsPair::new("udpwide");
    let scope = test_cgroup("udpwide");
    let _run = run(&pair, &scope, &format!("127.0.0.1:{FROM}:{TO}/udp"), &[]);
    // The wildcard bind of TO is not the mapping's address: it stays TO.
    let (mut wide, lines) = start(&pair, &scope, "udp-serve", &format!("0.0.0.0:{TO}"), false);
    assert_eq!(next(&lines), format!("listening local=0.0.0.0:{TO}"));
    let _ = wide.kill();
    let _ = wide.wait();
    // A bind of the mapping's own address is moved to FROM.
    let (mut exact, lines) = start(
        &pair,
        &scope,
        "udp-serve",
        &format!("127.0.0.1:{TO}"),
        false,
    );
    assert_eq!(next(&lines), format!("listening local=127.0.0.1:{FROM}"));
    let _ = exact.kill();
    let _ = exact.wait();
}

#[test]
fn with_an_owner_only_the_owner_s_udp_bind_is_moved_to_from() {
    if !privileged("with_an_owner_only_the_owner_s_udp_bind_is_moved_to_from") {
        return;
    }
    let pair = NetnsPair::new("udpowner");
    let scope = test_cgroup("udpowner");
    let _run = run(
        &pair,
        &scope,
        &format!("{FROM}:{TO}/udp"),
        &["--owner", "root"],
    );
    let (mut other, lines) = start(&pair, &scope, "udp-serve", &format!("0.0.0.0:{TO}"), true);
    // Its bind fails (EACCES): it exits without ever listening.
    let status = other.wait().expect("wait");
    assert!(!status.success(), "a non-owner's bind of TO is refused");
    assert!(
        lines.try_iter().all(|l| !l.starts_with("listening")),
        "the non-owner never got a socket"
    );
    let (mut owner, lines) = start(&pair, &scope, "udp-serve", &format!("0.0.0.0:{TO}"), false);
    assert_eq!(next(&lines), format!("listening local=0.0.0.0:{FROM}"));
    let _ = owner.kill();
    let _ = owner.wait();
}

#[test]
fn a_listener_in_a_private_namespace_of_the_scope_is_never_registered() {
    if !privileged("a_listener_in_a_private_namespace_of_the_scope_is_never_registered") {
        return;
    }
    let pair = NetnsPair::new("privns");
    let scope = test_cgroup("privns");
    let _run = run(&pair, &scope, &format!("{FROM}:{TO}"), &[]);
    // A process of the scope listens on TO inside a namespace of its own.
    let probe = binary("probe").display().to_string();
    let addr = format!("0.0.0.0:{TO}");
    let mut cmd = NetnsPair::command(&pair.server, &["unshare", "-n", &probe, "serve", &addr]);
    cmd.stdout(Stdio::piped());
    Spawn {
        cgroup: Some(&scope),
        unprivileged: false,
    }
    .apply(&mut cmd);
    let mut private = cmd.spawn().expect("start the private listener");
    let mut out = BufReader::new(private.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let report = client(&pair);
    assert!(
        !report.ok,
        "never handed a connection of another namespace: {report:?}"
    );
    let _ = private.kill();
    let _ = private.wait();
    // The namespace's own listener still is.
    let (mut server, lines) = start(&pair, &scope, "serve", &addr, false);
    assert_eq!(next(&lines), "listening");
    assert_eq!(client(&pair).reply(), "to:hello");
    let _ = server.wait();
}

/// `ip ARGS…` (in the test's own namespaces), asserting success.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ipv4_and_ipv6_listeners_on_one_to_each_get_their_family_s_clients() {
    if !privileged("ipv4_and_ipv6_listeners_on_one_to_each_get_their_family_s_clients") {
        return;
    }
    const SERVER6: &str = "2001:db8:9::1";
    const CLIENT6: &str = "2001:db8:9::2";
    let pair = NetnsPair::new("dual");
    for (ns, addr) in [(&pair.server, SERVER6), (&pair.client, CLIENT6)] {
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "veth0",
            "nodad",
        ]);
    }
    // [::]:TO and 0.0.0.0:TO side by side: the IPv6 one must be v6-only
    // (a setting of the test's own namespace).
    let out = NetnsPair::command(&pair.server, &["sysctl", "-qw", "net.ipv6.bindv6only=1"])
        .output()
        .expect("sysctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scope = test_cgroup("dual");
    let _run = run(&pair, &scope, &format!("{FROM}:{TO}"), &[]);
    let (mut v4, v4_lines) = start(&pair, &scope, "serve", &format!("0.0.0.0:{TO}"), false);
    assert_eq!(next(&v4_lines), "listening");
    let (mut v6, v6_lines) = start(&pair, &scope, "serve", &format!("[::]:{TO}"), false);
    assert_eq!(next(&v6_lines), "listening");

    let probe = binary("probe").display().to_string();
    let dial = |addr: String| {
        parse_probe(
            &NetnsPair::command(&pair.client, &[&probe, "tcp", &addr, "hello"])
                .output()
                .expect("run client"),
        )
    };
    // IPv6 first: registered second, it must not have displaced IPv4's,
    // nor been displaced by it.
    let report = dial(format!("[{SERVER6}]:{FROM}"));
    assert_eq!(report.reply(), "to:hello", "IPv6 client: {report:?}");
    assert_eq!(next(&v6_lines), format!("local=[{SERVER6}]:{FROM}"));
    assert!(next(&v6_lines).starts_with(&format!("peer=[{CLIENT6}]:")));
    let report = dial(format!("{}:{FROM}", NetnsPair::SERVER_IP));
    assert_eq!(report.reply(), "to:hello", "IPv4 client: {report:?}");
    assert_eq!(
        next(&v4_lines),
        format!("local={}:{FROM}", NetnsPair::SERVER_IP)
    );
    assert!(next(&v4_lines).starts_with(&format!("peer={}:", NetnsPair::CLIENT_IP)));
    let _ = v4.wait();
    let _ = v6.wait();
}
