//! Upgrading the daemon to another build of the programs, with zero failed
//! connections:
//! - to a build with the same maps: the new programs replace the old ones
//!   behind the same links (`BPF_LINK_UPDATE`);
//! - from a build whose programs do not read the scope cell: those links
//!   are re-created (the kernel gives cgroup storage only to programs
//!   attached with it).
//!
//! The other builds are the eBPF object with the `upgrade-test` feature
//! (connect4/6 differ by one harmless helper call) and with the
//! `no-cell-test` feature, which `cargo xtask test` builds and names in
//! `REDIRECT_TEST_UPGRADE_OBJECT` and `REDIRECT_TEST_NO_CELL_OBJECT`; the
//! daemon loads one through `REDIRECT_EBPF_OBJECT`.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use redirect_tests::{
    Pair, RedirectProcess, Spawn, TcpServer, binary,
    daemon::TestDaemon,
    parse_probe, privileged, probe,
    redirect::ebpf::{OBJECT_ENV, attached_programs},
    test_cgroup,
};

/// The object `cargo xtask test` built and named in `env`; required
/// under CI.
fn test_object(env: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from);
    match path {
        Some(p) if p.exists() => Some(p),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: {env} names no file; run `cargo xtask test`"
            );
            eprintln!("skipped: {env} unset (run `cargo xtask test`)");
            None
        }
    }
}

/// hook → (program id, tag) of every program attached to `cgroup`.
fn programs(cgroup: &Path) -> BTreeMap<&'static str, (u32, u64)> {
    attached_programs(cgroup)
        .unwrap()
        .into_iter()
        .map(|p| (p.hook, (p.id, p.tag)))
        .collect()
}

/// The config of one scope, `web`, redirecting `pair` in `cgroup`.
fn web_scope(cgroup: &Path, pair: &Pair<TcpServer>) -> String {
    format!(
        "[[scope]]\nname = \"web\"\ncgroup = {:?}\nmaps = [{:?}]\n",
        cgroup.display().to_string(),
        pair.mapping()
    )
}

/// The ids of the links of the daemon's first scope.
fn links(daemon: &TestDaemon) -> serde_json::Value {
    daemon.status()["scopes"][0]["links"].clone()
}

/// SIGKILLs `daemon` and starts `redirect daemon` on its config again,
/// with the environment `env` (`NAME=value` pairs) if any.
fn replace_daemon(daemon: &mut TestDaemon, env: &[OsString]) {
    daemon.kill();
    let mut args: Vec<OsString> = env.to_vec();
    args.extend([
        binary("redirect").into_os_string(),
        "daemon".into(),
        "--config".into(),
        daemon.config.clone().into_os_string(),
    ]);
    let mut upgraded = RedirectProcess::start_program("env", args);
    upgraded.wait_ready();
    daemon.process = Some(upgraded);
}

/// [`replace_daemon`] while a client, started as `spawn` says, dials
/// `addr` in a loop (2.5 s, from 0.5 s before the replacement): none of
/// its connections may fail.
fn replace_under_load(
    daemon: &mut TestDaemon,
    env: &[OsString],
    spawn: Spawn<'_>,
    addr: SocketAddr,
) {
    let mut loop_cmd = Command::new(binary("probe"));
    loop_cmd
        .args(["loop", &addr.to_string(), "2.5"])
        .stdout(Stdio::piped());
    spawn.apply(&mut loop_cmd);
    let client = loop_cmd.spawn().expect("start the probe loop");
    std::thread::sleep(Duration::from_millis(500));
    replace_daemon(daemon, env);
    let report = parse_probe(&client.wait_with_output().unwrap());
    assert_eq!(
        report.get("failed"),
        "0",
        "no connection may fail: {report:?}"
    );
}

#[test]
fn an_upgrade_replaces_the_programs_in_place_without_a_failed_connection() {
    if !privileged("an_upgrade_replaces_the_programs_in_place_without_a_failed_connection") {
        return;
    }
    let Some(object) = test_object("REDIRECT_TEST_UPGRADE_OBJECT") else {
        return;
    };
    let cg = test_cgroup("daemon-upgrade-build");
    let pair = Pair::tcp("127.0.0.1");
    let mut daemon = TestDaemon::start("upgrade-build", "", &web_scope(cg.path(), &pair));
    let (links_before, before) = (links(&daemon), programs(cg.path()));

    // A client loop in the scope, through the upgrade.
    let mut env_arg = OsString::from(format!("{OBJECT_ENV}="));
    env_arg.push(&object);
    let spawn = Spawn {
        cgroup: Some(&cg),
        unprivileged: true,
    };
    replace_under_load(&mut daemon, &[env_arg], spawn, pair.decoy.addr);

    assert_eq!(links(&daemon), links_before, "the same links");
    let after = programs(cg.path());
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same hooks, once each"
    );
    for (hook, (id, tag)) in &after {
        let (old_id, old_tag) = before[hook];
        assert_ne!(*id, old_id, "{hook}: a new program behind the link");
        if hook.starts_with("connect") {
            assert_ne!(*tag, old_tag, "{hook}: the other build's code runs");
        } else {
            assert_eq!(*tag, old_tag, "{hook}: the same code as before");
        }
    }
    let r = probe(Some(&cg), "tcp", pair.decoy.addr);
    assert!(r.reply().starts_with("to:"), "still redirected: {r:?}");
}

/// A daemon whose links run programs without the scope cell (a build from
/// before it) is upgraded to this build: the kernel gives a cgroup's
/// storage only to programs *attached* with it, so those links must be
/// re-created, not updated. No connection may fail meanwhile, each hook
/// ends up with one program, and the scope still redirects.
#[test]
fn links_made_before_the_scope_cell_are_recreated_without_a_failed_connection() {
    if !privileged("links_made_before_the_scope_cell_are_recreated_without_a_failed_connection") {
        return;
    }
    let Some(object) = test_object("REDIRECT_TEST_NO_CELL_OBJECT") else {
        return;
    };
    let cg = test_cgroup("daemon-upgrade-cell");
    let pair = Pair::tcp("127.0.0.1");
    // The old build: this binary with the object that has no cell.
    let mut daemon = TestDaemon::start_wrapped(
        "upgrade-cell",
        "",
        &web_scope(cg.path(), &pair),
        vec!["env".into(), format!("{OBJECT_ENV}={}", object.display())],
    );
    let (links_before, before) = (links(&daemon), programs(cg.path()));
    let r = probe(Some(&cg), "tcp", pair.decoy.addr);
    assert!(
        r.reply().starts_with("to:"),
        "the old build redirects: {r:?}"
    );

    let spawn = Spawn {
        cgroup: Some(&cg),
        unprivileged: true,
    };
    replace_under_load(&mut daemon, &[], spawn, pair.decoy.addr);

    assert_ne!(links(&daemon), links_before, "new links");
    let after = programs(cg.path());
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same hooks, once each"
    );
    let r = probe(Some(&cg), "tcp", pair.decoy.addr);
    assert!(r.reply().starts_with("to:"), "still redirected: {r:?}");
    // A restart of this build then updates the new links in place.
    let links_now = links(&daemon);
    replace_daemon(&mut daemon, &[]);
    assert_eq!(links(&daemon), links_now, "the same links after a restart");
}
