//! Upgrading the daemon to another build of the programs: the new programs
//! replace the old ones behind the same links (`BPF_LINK_UPDATE`), with
//! zero failed connections.
//!
//! The other build is the eBPF object with the `upgrade-test` feature
//! (connect4/6 differ by one harmless helper call), which `cargo xtask
//! test` builds and names in `REDIRECT_TEST_UPGRADE_OBJECT`; the daemon
//! loads it through `REDIRECT_EBPF_OBJECT`.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use redirect_tests::{
    Pair, RedirectProcess, Spawn, binary,
    daemon::TestDaemon,
    parse_probe, privileged, probe,
    redirect::ebpf::{OBJECT_ENV, attached_programs},
    test_cgroup,
};

/// The upgrade object `cargo xtask test` built; required under CI.
fn upgrade_object() -> Option<PathBuf> {
    let path = std::env::var_os("REDIRECT_TEST_UPGRADE_OBJECT").map(PathBuf::from);
    match path {
        Some(p) if p.exists() => Some(p),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: REDIRECT_TEST_UPGRADE_OBJECT names no file; run `cargo xtask test`"
            );
            eprintln!("skipped: REDIRECT_TEST_UPGRADE_OBJECT unset (run `cargo xtask test`)");
            None
        }
    }
}

/// hook → (program id, tag) of every program attached to `cgroup`.
fn programs(cgroup: &std::path::Path) -> BTreeMap<&'static str, (u32, u64)> {
    attached_programs(cgroup)
        .unwrap()
        .into_iter()
        .map(|p| (p.hook, (p.id, p.tag)))
        .collect()
}

/// A `probe loop` client dialing `addr` for 2.5 s, started now as `spawn`
/// says.
fn client_loop(spawn: Spawn<'_>, addr: std::net::SocketAddr) -> std::process::Child {
    let mut loop_cmd = Command::new(binary("probe"));
    loop_cmd
        .args(["loop", &addr.to_string(), "2.5"])
        .stdout(Stdio::piped());
    spawn.apply(&mut loop_cmd);
    loop_cmd.spawn().expect("start the probe loop")
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

#[test]
fn an_upgrade_replaces_the_programs_in_place_without_a_failed_connection() {
    if !privileged("an_upgrade_replaces_the_programs_in_place_without_a_failed_connection") {
        return;
    }
    let Some(object) = upgrade_object() else {
        return;
    };
    let cg = test_cgroup("daemon-upgrade-build");
    let pair = Pair::tcp("127.0.0.1");
    let scopes = format!(
        "[[scope]]\nname = \"web\"\ncgroup = {:?}\nmaps = [{:?}]\n",
        cg.path().display().to_string(),
        pair.mapping()
    );
    let mut daemon = TestDaemon::start("upgrade-build", "", &scopes);
    let links = |d: &TestDaemon| d.status()["scopes"][0]["links"].clone();
    let (links_before, before) = (links(&daemon), programs(cg.path()));

    // A client loop in the scope, through the upgrade.
    let client = client_loop(
        Spawn {
            cgroup: Some(&cg),
            unprivileged: true,
        },
        pair.decoy.addr,
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut env_arg = OsString::from(format!("{OBJECT_ENV}="));
    env_arg.push(&object);
    replace_daemon(&mut daemon, &[env_arg]);

    let report = parse_probe(&client.wait_with_output().unwrap());
    assert_eq!(
        report.get("failed"),
        "0",
        "no connection may fail: {report:?}"
    );
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

/// The build of the programs from before the scope cell that `cargo xtask
/// test` built; required under CI.
fn no_cell_object() -> Option<PathBuf> {
    let path = std::env::var_os("REDIRECT_TEST_NO_CELL_OBJECT").map(PathBuf::from);
    match path {
        Some(p) if p.exists() => Some(p),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: REDIRECT_TEST_NO_CELL_OBJECT names no file; run `cargo xtask test`"
            );
            eprintln!("skipped: REDIRECT_TEST_NO_CELL_OBJECT unset (run `cargo xtask test`)");
            None
        }
    }
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
    let Some(object) = no_cell_object() else {
        return;
    };
    let cg = test_cgroup("daemon-upgrade-cell");
    let pair = Pair::tcp("127.0.0.1");
    let scopes = format!(
        "[[scope]]\nname = \"web\"\ncgroup = {:?}\nmaps = [{:?}]\n",
        cg.path().display().to_string(),
        pair.mapping()
    );
    // The old build: this binary with the object that has no cell.
    let mut daemon = TestDaemon::start_wrapped(
        "upgrade-cell",
        "",
        &scopes,
        vec!["env".into(), format!("{OBJECT_ENV}={}", object.display())],
    );
    let links = |d: &TestDaemon| d.status()["scopes"][0]["links"].clone();
    let (links_before, before) = (links(&daemon), programs(cg.path()));
    let r = probe(Some(&cg), "tcp", pair.decoy.addr);
    assert!(
        r.reply().starts_with("to:"),
        "the old build redirects: {r:?}"
    );

    let client = client_loop(
        Spawn {
            cgroup: Some(&cg),
            unprivileged: true,
        },
        pair.decoy.addr,
    );
    std::thread::sleep(Duration::from_millis(500));
    replace_daemon(&mut daemon, &[]);

    let report = parse_probe(&client.wait_with_output().unwrap());
    assert_eq!(
        report.get("failed"),
        "0",
        "no connection may fail: {report:?}"
    );
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
