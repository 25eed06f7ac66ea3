//! Inbound steering (sk_lookup): a client in another network namespace
//! connects to FROM on the server namespace's address and reaches the
//! listener that a process of the scope has on TO. Every namespace here is
//! the test's own.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use redirect_tests::{
    NetnsPair, RedirectProcess, Spawn, binary, parse_probe, privileged,
    redirect::{cgroup::ChildCgroup, ebpf::netns_programs},
    test_cgroup,
};

const FROM: u16 = 443;
const TO: u16 = 8443;

/// `probe serve 0.0.0.0:TO` in the server namespace, inside `scope` if
/// given; returns once it listens.
fn start_server(pair: &NetnsPair, scope: Option<&ChildCgroup>) -> (Child, mpsc::Receiver<String>) {
    let probe = binary("probe").display().to_string();
    let addr = format!("0.0.0.0:{TO}");
    let mut cmd = NetnsPair::command(&pair.server, &[&probe, "serve", &addr]);
    cmd.stdout(Stdio::piped());
    // As root: `ip netns exec` needs it (the server's privileges do not
    // matter to steering; the clients' do not either).
    Spawn {
        cgroup: scope,
        unprivileged: false,
    }
    .apply(&mut cmd);
    let mut child = cmd.spawn().expect("start server");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "listening"
    );
    (child, rx)
}

/// `probe tcp SERVER_IP:FROM` from the client namespace.
fn connect_from_client(pair: &NetnsPair) -> redirect_tests::ProbeReport {
    let probe = binary("probe").display().to_string();
    let addr = format!("{}:{FROM}", NetnsPair::SERVER_IP);
    let out = NetnsPair::command(&pair.client, &[&probe, "tcp", &addr, "hello"])
        .output()
        .expect("run client");
    parse_probe(&out)
}

fn run_steering(pair: &NetnsPair, scope: &ChildCgroup) -> RedirectProcess {
    run_steering_with(pair, scope, &[])
}

fn run_steering_with(pair: &NetnsPair, scope: &ChildCgroup, extra: &[&str]) -> RedirectProcess {
    let mut args = vec![
        "run".to_owned(),
        "--map".into(),
        format!("{FROM}:{TO}"),
        "--cgroup".into(),
        scope.path().display().to_string(),
        "--netns".into(),
        pair.server_path().display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let mut run = RedirectProcess::start(args);
    run.wait_ready();
    run
}

/// The accepted socket reports FROM as its local port and the client's real
/// address as its peer; the client's getpeername reports FROM.
fn check_steered(pair: &NetnsPair, server: (Child, mpsc::Receiver<String>)) {
    let (mut child, lines) = server;
    let report = connect_from_client(pair);
    assert!(report.ok, "client failed: {report:?}");
    assert_eq!(report.reply(), "hello".replace("hello", "to:hello"));
    let from = format!("{}:{FROM}", NetnsPair::SERVER_IP);
    assert_eq!(report.peer().to_string(), from, "client sees FROM");
    let local = lines.recv_timeout(Duration::from_secs(5)).unwrap();
    let peer = lines.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        local,
        format!("local={from}"),
        "server's getsockname reports FROM"
    );
    assert_eq!(
        peer,
        format!("peer={}", report.local()),
        "server sees the real client"
    );
    let _ = child.wait();
}

#[test]
fn a_listener_started_after_redirect_is_reached_from_another_namespace() {
    if !privileged("inbound-after") {
        return;
    }
    let pair = NetnsPair::new("in-after");
    let scope = test_cgroup("in-after");
    let mut run = run_steering(&pair, &scope);
    let server = start_server(&pair, Some(&scope));
    check_steered(&pair, server);

    let path = pair.server_path();
    assert_eq!(
        netns_programs(&path).unwrap().len(),
        1,
        "sk_lookup attached"
    );
    run.signal(libc::SIGTERM);
    assert!(run.wait_exit().success());
    assert!(
        netns_programs(&path).unwrap().is_empty(),
        "no sk_lookup program left attached after exit"
    );
}

#[test]
fn a_listener_started_before_redirect_is_reached_too() {
    if !privileged("inbound-before") {
        return;
    }
    let pair = NetnsPair::new("in-before");
    let scope = test_cgroup("in-before");
    let server = start_server(&pair, Some(&scope));
    let _run = run_steering(&pair, &scope);
    check_steered(&pair, server);
}

/// With a mapping but no registered listener, the connection is refused,
/// even though a process outside the scope listens on TO: it is never
/// handed to whatever else is bound.
#[test]
fn without_a_registered_listener_the_connection_is_refused() {
    if !privileged("inbound-none") {
        return;
    }
    let pair = NetnsPair::new("in-none");
    let scope = test_cgroup("in-none");
    let (mut outsider, _lines) = start_server(&pair, None);
    let _run = run_steering(&pair, &scope);
    let report = connect_from_client(&pair);
    assert!(!report.ok, "{report:?}");
    assert!(report.get("error").contains("refused"), "{report:?}");
    let _ = outsider.kill();
    let _ = outsider.wait();
}

/// With `--owner`, a listener of the scope that does not belong to the owner
/// (here: root's, started before redirect, while the owner is nobody) is not
/// registered, so inbound connections are refused rather than handed to it.
#[test]
fn only_the_owner_s_listeners_are_registered() {
    if !privileged("inbound-owner") {
        return;
    }
    let pair = NetnsPair::new("in-owner");
    let scope = test_cgroup("in-owner");
    let (mut root_listener, _lines) = start_server(&pair, Some(&scope));
    // Without --allow-held-target, run would refuse to start at all
    // (security::a_target_held_by_a_non_owner_refuses_run_unless_allowed).
    let run = run_steering_with(&pair, &scope, &["--owner", "nobody", "--allow-held-target"]);
    let report = connect_from_client(&pair);
    assert!(!report.ok, "{report:?}");
    assert!(report.get("error").contains("refused"), "{report:?}");
    // The warning was logged before `ready`; its reader thread may lag.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !run.stderr().contains("not the owner") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(run.stderr().contains("not the owner"), "{}", run.stderr());
    let _ = root_listener.kill();
    let _ = root_listener.wait();
}

/// Inbound UDP: a UDP service of the scope that binds TO is bound to FROM
/// instead (inbound mode), so a client in the other namespace sending to
/// FROM reaches it and gets replies whose source port is FROM.
#[test]
fn inbound_udp_reaches_the_service_and_replies_come_from_from() {
    if !privileged("inbound-udp") {
        return;
    }
    let pair = NetnsPair::new("in-udp");
    let scope = test_cgroup("in-udp");
    let _run = run_steering_with(&pair, &scope, &[]);

    let probe = binary("probe").display().to_string();
    let mut cmd = NetnsPair::command(
        &pair.server,
        &[&probe, "udp-serve", &format!("0.0.0.0:{TO}")],
    );
    cmd.stdout(Stdio::piped());
    Spawn {
        cgroup: Some(&scope),
        unprivileged: false,
    }
    .apply(&mut cmd);
    let mut server = cmd.spawn().expect("start udp server");
    let mut line = String::new();
    BufReader::new(server.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        format!("listening local=0.0.0.0:{FROM}"),
        "bound to FROM"
    );

    let addr = format!("{}:{FROM}", NetnsPair::SERVER_IP);
    let out = NetnsPair::command(&pair.client, &[&probe, "sendto", &addr, "hello"])
        .output()
        .expect("run client");
    let report = parse_probe(&out);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.reply(), "to:hello");
    assert_eq!(
        report.peer().to_string(),
        addr,
        "the reply's source port is FROM"
    );
    let _ = server.wait();
}
