//! `redirect daemon`: pinned state that survives SIGKILL and restarts with
//! zero failed connections, one link per hook per scope, scopes that map
//! one port differently, reload by difference, a root-only control socket,
//! metrics that match the traffic, and `reset` leaving nothing behind.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use redirect_tests::{
    NOBODY, Pair, Spawn, TcpServer, attached, binary, daemon::TestDaemon, parse_probe, privileged,
    probe, redirect::ebpf::attached_programs, redirect_output, test_cgroup, wait_detached,
};

fn scope(name: &str, cgroup: &std::path::Path, maps: &[String]) -> String {
    let maps: Vec<String> = maps.iter().map(|m| format!("{m:?}")).collect();
    format!(
        "[[scope]]\nname = {name:?}\ncgroup = {:?}\nmaps = [{}]\n",
        cgroup.display().to_string(),
        maps.join(", ")
    )
}

/// Runs `probe loop ADDR SECS` in `cgroup` as nobody, in the background.
fn start_loop(
    cgroup: &redirect::cgroup::ChildCgroup,
    addr: std::net::SocketAddr,
    secs: f64,
) -> std::process::Child {
    let mut cmd = Command::new(binary("probe"));
    cmd.args(["loop", &addr.to_string(), &secs.to_string()])
        .stdout(Stdio::piped());
    Spawn {
        cgroup: Some(cgroup),
        unprivileged: true,
    }
    .apply(&mut cmd);
    cmd.spawn().expect("start the probe loop")
}

use redirect_tests::redirect;

/// Every hook attached to `cgroup`, with how many times.
fn hook_counts(cgroup: &std::path::Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for name in attached(cgroup) {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

#[test]
fn sigkill_and_restart_five_times_without_a_failed_connection() {
    if !privileged("sigkill_and_restart_five_times_without_a_failed_connection") {
        return;
    }
    let cg = test_cgroup("daemon-kill");
    let pair = Pair::tcp("127.0.0.1");
    let mut daemon = TestDaemon::start("kill", "", &scope("web", cg.path(), &[pair.mapping()]));
    let before = hook_counts(cg.path());
    assert_eq!(
        before.len(),
        redirect::ebpf::BASE_PROGRAMS.len(),
        "every hook attached once: {before:?}"
    );
    let client = start_loop(&cg, pair.decoy.addr, 6.0);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(400));
        daemon.kill();
        std::thread::sleep(Duration::from_millis(200));
        daemon.restart();
    }
    let out = client.wait_with_output().expect("probe loop");
    let report = parse_probe(&out);
    let ok: u64 = report.get("ok").parse().unwrap();
    let failed: u64 = report.get("failed").parse().unwrap();
    eprintln!(
        "probe loop: {ok} connections in 6 s ({} per second), {failed} failed",
        ok / 6
    );
    assert_eq!(failed, 0, "no connection may fail: {report:?}");
    assert!(ok > 0);
    assert!(pair.decoy.peers().is_empty(), "nothing leaked to FROM");
    // Exactly one link per hook for the scope, as before.
    assert_eq!(hook_counts(cg.path()), before);
}

#[test]
fn a_restart_replaces_the_programs_behind_the_same_links() {
    if !privileged("a_restart_replaces_the_programs_behind_the_same_links") {
        return;
    }
    let cg = test_cgroup("daemon-upgrade");
    let pair = Pair::tcp("127.0.0.1");
    let mut daemon = TestDaemon::start("upgrade", "", &scope("web", cg.path(), &[pair.mapping()]));
    let links = |d: &TestDaemon| d.status()["scopes"][0]["links"].clone();
    let programs = || -> Vec<u32> {
        let mut ids: Vec<u32> = attached_programs(cg.path())
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect();
        ids.sort_unstable();
        ids
    };
    let (links_before, progs_before) = (links(&daemon), programs());
    let client = start_loop(&cg, pair.decoy.addr, 2.0);
    std::thread::sleep(Duration::from_millis(500));
    daemon.kill();
    daemon.restart();
    let report = parse_probe(&client.wait_with_output().unwrap());
    assert_eq!(report.get("failed"), "0", "{report:?}");
    assert_eq!(links(&daemon), links_before, "the same links");
    let progs_after = programs();
    assert_eq!(progs_after.len(), progs_before.len());
    assert!(
        progs_after.iter().all(|id| !progs_before.contains(id)),
        "every program replaced in place: {progs_before:?} -> {progs_after:?}"
    );
    let r = probe(Some(&cg), "tcp", pair.decoy.addr);
    assert!(r.reply().starts_with("to:"), "{r:?}");
}

#[test]
fn two_scopes_send_one_port_to_different_targets() {
    if !privileged("two_scopes_send_one_port_to_different_targets") {
        return;
    }
    let (cg_a, cg_b) = (test_cgroup("daemon-a"), test_cgroup("daemon-b"));
    let decoy = TcpServer::start("127.0.0.1:0", "decoy");
    let a = TcpServer::start("127.0.0.1:0", "a");
    let b = TcpServer::start("127.0.0.1:0", "b");
    let from = decoy.addr.port();
    let scopes = scope("a", cg_a.path(), &[format!("{from}:{}", a.addr.port())])
        + &scope("b", cg_b.path(), &[format!("{from}:{}", b.addr.port())]);
    let daemon = TestDaemon::start("two", "", &scopes);
    assert!(
        probe(Some(&cg_a), "tcp", decoy.addr)
            .reply()
            .starts_with("a:")
    );
    assert!(
        probe(Some(&cg_b), "tcp", decoy.addr)
            .reply()
            .starts_with("b:")
    );
    let (code, _, err) = daemon.ctl(&["remove", "a", &format!("{from}:{}", a.addr.port())]);
    assert_eq!(code, 0, "{err}");
    assert!(
        probe(Some(&cg_a), "tcp", decoy.addr)
            .reply()
            .starts_with("decoy:")
    );
    assert!(
        probe(Some(&cg_b), "tcp", decoy.addr)
            .reply()
            .starts_with("b:"),
        "b untouched"
    );
    // A third scope nested in one of them is refused, naming the other.
    let nested = cg_b.path().join("inner");
    std::fs::create_dir(&nested).unwrap();
    let req = redirect::control::Request::AddScope {
        scope: redirect::control::ScopeSpec {
            name: Some("inner".into()),
            cgroup: nested.clone(),
            maps: vec!["1:2".into()],
            ..Default::default()
        },
    };
    let err = redirect::control::Client::new(&daemon.control)
        .request(&req)
        .unwrap_err();
    assert_eq!(
        err.kind(),
        Some(redirect::control::ErrorKind::Conflict),
        "{err}"
    );
    assert!(err.to_string().contains("scope b"), "{err}");
    std::fs::remove_dir(&nested).unwrap();
}

#[test]
fn reload_applies_only_the_difference_and_a_bad_file_changes_nothing() {
    if !privileged("reload_applies_only_the_difference_and_a_bad_file_changes_nothing") {
        return;
    }
    let cg = test_cgroup("daemon-reload");
    let (kept, removed, added) = (
        Pair::tcp("127.0.0.1"),
        Pair::tcp("127.0.0.1"),
        Pair::tcp("127.0.0.1"),
    );
    let daemon = TestDaemon::start(
        "reload",
        "",
        &scope("web", cg.path(), &[kept.mapping(), removed.mapping()]),
    );
    for _ in 0..3 {
        assert!(
            probe(Some(&cg), "tcp", kept.decoy.addr)
                .reply()
                .starts_with("to:")
        );
    }
    daemon.write_config(
        "",
        &scope("web", cg.path(), &[kept.mapping(), added.mapping()]),
    );
    let (code, out, err) = daemon.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        probe(Some(&cg), "tcp", added.decoy.addr)
            .reply()
            .starts_with("to:"),
        "added works"
    );
    assert!(
        probe(Some(&cg), "tcp", removed.decoy.addr)
            .reply()
            .starts_with("decoy:"),
        "removed stops"
    );
    let status = daemon.status();
    let kept_status = status["scopes"][0]["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mapping"] == kept.mapping().as_str())
        .cloned()
        .expect("kept mapping");
    assert_eq!(
        kept_status["connects"], 3,
        "untouched mapping kept its counters"
    );

    daemon.write_config("", "[[scope]]\nname = \"web\"\ncgroup = \"relative\"\n");
    let (code, _, err) = daemon.ctl(&["reload"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("redirect.toml:4:1:"),
        "the error names its line: {err}"
    );
    assert!(
        probe(Some(&cg), "tcp", kept.decoy.addr)
            .reply()
            .starts_with("to:"),
        "state kept"
    );
}

#[test]
fn the_control_socket_refuses_non_root_peers() {
    if !privileged("the_control_socket_refuses_non_root_peers") {
        return;
    }
    let cg = test_cgroup("daemon-perm");
    let pair = Pair::tcp("127.0.0.1");
    let daemon = TestDaemon::start("perm", "", &scope("web", cg.path(), &[]));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&daemon.control)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // Even with the socket opened up, the peer's credentials are checked.
    std::fs::set_permissions(&daemon.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(daemon.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let control = daemon.control.display().to_string();
    let out = redirect_output(["add", "web", &pair.mapping(), "--control", &control], true);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only root"), "{err}");
    assert!(
        probe(Some(&cg), "tcp", pair.decoy.addr)
            .reply()
            .starts_with("decoy:")
    );
    let _ = NOBODY;
}

#[test]
fn metrics_match_the_traffic() {
    if !privileged("metrics_match_the_traffic") {
        return;
    }
    let cg = test_cgroup("daemon-metrics");
    let pair = Pair::tcp("127.0.0.1");
    // A free port, picked by the kernel.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let daemon = TestDaemon::start(
        "metrics",
        &format!("metrics = \"127.0.0.1:{port}\""),
        &scope("web", cg.path(), &[pair.mapping()]),
    );
    for _ in 0..4 {
        probe(Some(&cg), "tcp", pair.decoy.addr);
    }
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    // Exposition format: comments, then `name{labels} value` lines.
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("value of {line}"));
        assert!(series.starts_with("redirect_"), "{line}");
    }
    let wanted = format!(
        "redirect_connections_redirected_total{{scope=\"web\",mapping=\"{}\"}} 4",
        pair.mapping()
    );
    assert!(body.lines().any(|l| l == wanted), "{wanted} in\n{body}");
    assert!(body.contains("redirect_scopes 1"), "{body}");
    drop(daemon);
}

#[test]
fn reset_leaves_nothing_attached_or_pinned() {
    if !privileged("reset_leaves_nothing_attached_or_pinned") {
        return;
    }
    let cg = test_cgroup("daemon-reset");
    let pair = Pair::tcp("127.0.0.1");
    let mut daemon = TestDaemon::start("reset", "", &scope("web", cg.path(), &[pair.mapping()]));
    let pin = daemon.pin_dir.display().to_string();
    let control = daemon.control.display().to_string();
    let out = redirect_output(["reset", "--pin-dir", &pin, "--control", &control], false);
    assert_eq!(out.status.code(), Some(1), "refused while the daemon runs");
    daemon.kill();
    assert!(
        probe(Some(&cg), "tcp", pair.decoy.addr)
            .reply()
            .starts_with("to:"),
        "pinned state in force"
    );
    // Without a daemon, status (as root) reads the pins.
    let out = redirect_output(
        ["status", "--json", "--pin-dir", &pin, "--control", &control],
        false,
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["daemon"]["scopes"][0]["mappings"][0]["mapping"],
        pair.mapping().as_str()
    );
    let out = redirect_output(["reset", "--pin-dir", &pin, "--control", &control], false);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_detached(cg.path()), Vec::<String>::new());
    assert!(!daemon.pin_dir.exists(), "pin directory removed");
    assert!(
        probe(Some(&cg), "tcp", pair.decoy.addr)
            .reply()
            .starts_with("decoy:")
    );
}

/// A port the kernel picked as free on loopback (the test's own).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn metrics_text(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// A scope with `backend = "proxy"` runs the library's proxy inside the
/// daemon: a real connection from any process reaches TO through FROM,
/// and status and metrics say which backend runs and why. A reload that
/// changes the backend stops the proxy and attaches eBPF (FROM no longer
/// listens; the cgroup's connects are rewritten), and back; removing the
/// scope stops the proxy.
#[test]
fn a_proxy_backed_scope_forwards_and_reload_switches_its_backend() {
    if !privileged("a_proxy_backed_scope_forwards_and_reload_switches_its_backend") {
        return;
    }
    let cg = test_cgroup("daemon-proxy");
    let target = TcpServer::start("127.0.0.1:0", "to");
    let from: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mapping = format!("127.0.0.1:{}:{}", from.port(), target.addr.port());
    let proxy_scope =
        format!("[[scope]]\nname = \"px\"\nbackend = \"proxy\"\nmaps = [{mapping:?}]\n");
    let metrics_port = free_port();
    let metrics = format!("metrics = \"127.0.0.1:{metrics_port}\"");
    let daemon = TestDaemon::start("proxy", &metrics, &proxy_scope);

    // Any process (not in a cgroup of the scope) goes through the proxy.
    let r = probe(None, "tcp", from);
    assert_eq!(r.reply(), "to:hello", "through the daemon's proxy");
    assert!(
        target.peers().iter().all(|p| p.ip().is_loopback()),
        "the backend sees the proxy's loopback address"
    );
    let status = daemon.status();
    let s = &status["scopes"][0];
    assert_eq!(s["name"], "px");
    assert_eq!(s["backend"], "proxy", "{s}");
    assert!(
        s["backend_reason"]
            .as_str()
            .unwrap()
            .contains("backend = \"proxy\""),
        "{s}"
    );
    assert_eq!(s["proxy"]["accepted"], 1, "{s}");
    let text = metrics_text(metrics_port);
    assert!(
        text.contains("redirect_scope_backend{scope=\"px\",backend=\"proxy\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("redirect_proxy_connections_total{scope=\"px\"} 1"),
        "{text}"
    );
    let (code, out, err) = daemon.ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("backend proxy"), "{out}");

    // Reload with backend = "ebpf" on a cgroup: the proxy stops, eBPF
    // rewrites the cgroup's connects.
    let ebpf_scope = format!(
        "[[scope]]\nname = \"px\"\nbackend = \"ebpf\"\ncgroup = {:?}\nmaps = [{mapping:?}]\n",
        cg.path().display().to_string()
    );
    daemon.write_config(&metrics, &ebpf_scope);
    let (code, out, err) = daemon.ctl(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("backend proxy → ebpf"), "{out}");
    assert_eq!(daemon.status()["scopes"][0]["backend"], "ebpf");
    assert!(!attached(cg.path()).is_empty(), "eBPF attached");
    daemon.eventually("FROM to close", || TcpStream::connect(from).is_err());
    assert_eq!(
        probe(Some(&cg), "tcp", from).reply(),
        "to:hello",
        "rewritten in the kernel"
    );

    // And back: eBPF detached, the proxy listens again.
    daemon.write_config(&metrics, &proxy_scope);
    let (code, out, err) = daemon.ctl(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("backend ebpf → proxy"), "{out}");
    assert_eq!(wait_detached(cg.path()), Vec::<String>::new());
    assert_eq!(probe(None, "tcp", from).reply(), "to:hello");

    // A new mapping in the file gives the scope a new proxy.
    let target2 = TcpServer::start("127.0.0.1:0", "two");
    let from2: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mapping2 = format!("127.0.0.1:{}:{}", from2.port(), target2.addr.port());
    daemon.write_config(
        &metrics,
        &format!(
            "[[scope]]\nname = \"px\"\nbackend = \"proxy\"\nmaps = [{mapping:?}, {mapping2:?}]\n"
        ),
    );
    let (code, _, err) = daemon.ctl(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(probe(None, "tcp", from2).reply(), "two:hello");
    assert_eq!(probe(None, "tcp", from).reply(), "to:hello");

    // Removed from the file: the proxy stops.
    daemon.write_config(&metrics, "");
    let (code, out, err) = daemon.ctl(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed scope px"), "{out}");
    daemon.eventually("FROM to close", || {
        TcpStream::connect(from).is_err() && TcpStream::connect(from2).is_err()
    });
}

/// Where eBPF cannot load (the daemon runs without CAP_BPF, CAP_SYS_ADMIN,
/// CAP_NET_ADMIN and CAP_PERFMON), a host-wide `auto` scope falls back to
/// the proxy and says why; a scope on a cgroup is not silently widened to
/// the whole host: it fails, naming the missing eBPF.
#[test]
fn auto_falls_back_to_the_proxy_for_a_host_wide_scope_without_bpf_capabilities() {
    if !privileged("auto_falls_back_to_the_proxy_for_a_host_wide_scope_without_bpf_capabilities") {
        return;
    }
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("setpriv (util-linux) is installed");
    let wrapper = vec![
        setpriv.to_owned(),
        "--bounding-set=-bpf,-sys_admin,-net_admin,-perfmon".to_owned(),
        "--inh-caps=-all".to_owned(),
    ];
    let target = TcpServer::start("127.0.0.1:0", "to");
    let from: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mapping = format!("127.0.0.1:{}:{}", from.port(), target.addr.port());
    let daemon = TestDaemon::start_wrapped(
        "auto",
        "",
        &format!("[[scope]]\nname = \"host\"\nmaps = [{mapping:?}]\n"),
        wrapper,
    );
    assert_eq!(probe(None, "tcp", from).reply(), "to:hello");
    let status = daemon.status();
    assert_eq!(status["daemon"]["ebpf"]["available"], false, "{status}");
    let s = &status["scopes"][0];
    assert_eq!(s["backend"], "proxy", "{s}");
    let why = s["backend_reason"].as_str().unwrap();
    assert!(
        why.starts_with("auto, because eBPF is unavailable") && why.contains("CAP_BPF"),
        "{why}"
    );

    // A scoped one is refused with the eBPF error, not widened.
    let cg = test_cgroup("daemon-auto");
    let req = redirect::control::Request::AddScope {
        scope: redirect::control::ScopeSpec {
            name: Some("scoped".into()),
            cgroup: cg.path().to_path_buf(),
            maps: vec![format!("127.0.0.1:{}:1", free_port())],
            ..Default::default()
        },
    };
    let err = redirect::control::Client::new(&daemon.control)
        .request(&req)
        .unwrap_err();
    assert_eq!(
        err.kind(),
        Some(redirect::control::ErrorKind::Kernel),
        "{err}"
    );
    assert!(err.to_string().contains("needs the eBPF backend"), "{err}");
}

#[test]
fn open_pinned_adopts_every_pinned_scope_as_it_is() {
    if !privileged("open_pinned_adopts_every_pinned_scope_as_it_is") {
        return;
    }
    let cg = test_cgroup("open-pinned");
    let pair = Pair::tcp("127.0.0.1");
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf")
        .join(format!("redirect-test-open-pinned-{}", std::process::id()));
    let options = redirect::LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        ..redirect::LoadOptions::default()
    };
    let mappings = redirect::MappingSet::parse([pair.mapping()]).unwrap();
    let links_before = {
        let programs = redirect::Programs::load(&options).unwrap();
        let scope = programs
            .scope(cg.path())
            .mappings(mappings.clone())
            .attach()
            .unwrap();
        scope.stats().unwrap().link_ids
        // Dropped here: a pinned scope stays attached.
    };
    let r = probe(Some(&cg), "tcp", pair.decoy.addr);
    assert!(r.reply().starts_with("to:"), "still redirected: {r:?}");

    // A process that knows nothing of it adopts it as it is.
    let (programs, scopes) = redirect::Programs::open_pinned(&options).unwrap();
    assert_eq!(scopes.len(), 1, "one pinned scope");
    assert_eq!(scopes[0].cgroup(), cg.path());
    assert_eq!(scopes[0].mappings(), mappings);
    assert_eq!(
        scopes[0].stats().unwrap().link_ids,
        links_before,
        "the same links: nothing detached or attached again"
    );
    let r = probe(Some(&cg), "tcp", pair.decoy.addr);
    assert!(
        r.reply().starts_with("to:"),
        "redirected after adoption: {r:?}"
    );

    for scope in scopes {
        scope.detach().unwrap();
    }
    drop(programs);
    redirect::ebpf::pin::reset(&pin_dir).unwrap();
    let _ = std::fs::remove_dir(&pin_dir);
}

#[test]
fn runtime_scopes_survive_a_restart_and_removal_forgets_them() {
    if !privileged("runtime_scopes_survive_a_restart_and_removal_forgets_them") {
        return;
    }
    use redirect::control::{Client, Request, ScopeSpec};
    let (cg_a, cg_b) = (test_cgroup("runtime-a"), test_cgroup("runtime-b"));
    let (a, b) = (Pair::tcp("127.0.0.1"), Pair::tcp("127.0.0.1"));
    let mut daemon = TestDaemon::start("runtime", "", "");
    let spec = |name: &str, cg: &redirect::cgroup::ChildCgroup, mapping: String| ScopeSpec {
        name: Some(name.into()),
        cgroup: cg.path().to_path_buf(),
        maps: vec![mapping],
        ..Default::default()
    };
    Client::new(&daemon.control)
        .request(&Request::AddScope {
            scope: spec("rt-a", &cg_a, a.mapping()),
        })
        .expect("add rt-a");
    // An earlier version kept every runtime scope in one scopes.json: a
    // scope only it names is restored too.
    daemon.kill();
    let legacy = daemon.control.with_file_name("scopes.json");
    std::fs::write(
        &legacy,
        serde_json::to_vec(&[spec("rt-b", &cg_b, b.mapping())]).unwrap(),
    )
    .unwrap();
    daemon.restart();
    for (cg, pair, name) in [(&cg_a, &a, "rt-a"), (&cg_b, &b, "rt-b")] {
        let r = probe(Some(cg), "tcp", pair.decoy.addr);
        assert!(r.reply().starts_with("to:"), "{name} restored: {r:?}");
    }
    assert!(!legacy.exists(), "the old file is folded into scopes.d");

    // Removed, then a restart: it stays removed, the other stays.
    Client::new(&daemon.control)
        .request(&Request::RemoveScope {
            name: "rt-a".into(),
        })
        .expect("remove rt-a");
    daemon.kill();
    daemon.restart();
    let r = probe(Some(&cg_a), "tcp", a.decoy.addr);
    assert!(r.reply().starts_with("decoy:"), "rt-a stays removed: {r:?}");
    let r = probe(Some(&cg_b), "tcp", b.decoy.addr);
    assert!(r.reply().starts_with("to:"), "rt-b stays: {r:?}");
    let names: Vec<String> = daemon.status()["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["rt-b"]);
}
