//! Counters and `redirect status`: what an operator sees of a live
//! redirector, asked from another process.

use std::{
    thread,
    time::{Duration, Instant},
};

use redirect_tests::{
    Interactive, Pair, RedirectProcess, patience, privileged, probe, redirect, status_json,
    status_mappings, test_cgroup,
};

const N: u64 = 5;

/// After N connections the status shows N redirected; established rises to
/// N while they are open and drops back to 0 once they close; the entry
/// disappears when `run` exits.
#[test]
fn status_counts_connections_and_forgets_finished_instances() {
    if !privileged("status") {
        return;
    }
    let servers = Pair::tcp("127.0.0.1");
    let cgroup = test_cgroup("status");
    let mapping = format!("{}/tcp", servers.mapping());
    let mut run = RedirectProcess::run(&mapping, cgroup.path());
    let pid = run.child.id();

    let entries = status_mappings(pid);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    assert_eq!(entry["from"], servers.decoy.addr.port());
    assert_eq!(entry["to"], servers.target.addr.port());
    assert_eq!(entry["proto"], "tcp");
    assert_eq!(entry["redirected"], 0);

    let mut held = Interactive::start(
        &cgroup,
        &["hold", &servers.decoy.addr.to_string(), &N.to_string()],
    );
    assert_eq!(held.line(), format!("open {N}"));
    let entry = wait_for(pid, |e| e["established"] == N);
    assert_eq!(entry["redirected"], N, "{entry}");
    assert_eq!(entry["connects"], N, "{entry}");

    held.finish();
    let entry = wait_for(pid, |e| e["established"] == 0);
    assert_eq!(entry["redirected"], N, "{entry}");

    // The instance lists its programs, all attached, and its scope.
    let status = status_json();
    let instance = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["pid"] == pid)
        .expect("instance listed")
        .clone();
    assert_eq!(instance["scope"], cgroup.path().display().to_string());
    let programs = instance["programs"].as_array().unwrap();
    assert_eq!(programs.len(), redirect::ebpf::HOOKS.len(), "{programs:?}");
    assert!(
        programs.iter().all(|p| p["attached"] == true),
        "{programs:?}"
    );

    run.signal(libc::SIGTERM);
    assert!(run.wait_exit().success());
    assert!(status_mappings(pid).is_empty(), "entry gone after exit");
}

/// UDP datagrams are counted per mapping, and the human output names the
/// mapping.
#[test]
fn status_counts_datagrams_and_prints_a_table() {
    if !privileged("status-udp") {
        return;
    }
    let servers = Pair::udp("127.0.0.1");
    let cgroup = test_cgroup("status-udp");
    let mapping = format!("{}/udp", servers.mapping());
    let mut run = RedirectProcess::run(&mapping, cgroup.path());
    let pid = run.child.id();
    for _ in 0..3 {
        assert_eq!(
            probe(Some(&cgroup), "sendto", servers.decoy.addr).reply(),
            "to:hello"
        );
    }
    let entry = wait_for(pid, |e| e["datagrams"] == 3);
    assert_eq!(entry["redirected"], 3);

    let out = redirect_tests::redirect_output(["status"], false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("(pid {pid})")), "{text}");
    assert!(text.contains(&mapping), "{text}");

    run.signal(libc::SIGTERM);
    assert!(run.wait_exit().success());
}

/// A SIGKILLed instance leaves a socket file; status skips it (and removes
/// it) instead of failing.
#[test]
fn status_skips_a_killed_instance() {
    if !privileged("status-kill") {
        return;
    }
    let cgroup = test_cgroup("status-kill");
    let mut run = RedirectProcess::run("1443:18443", cgroup.path());
    let pid = run.child.id();
    assert!(!status_mappings(pid).is_empty());
    run.signal(libc::SIGKILL);
    run.wait_exit();
    assert!(status_mappings(pid).is_empty());
    assert!(!redirect::status::socket_path(pid).exists());
}

/// Polls `status --json` (up to 5 s, see [`patience`]) until the instance's single mapping
/// satisfies `done`; returns it.
fn wait_for(pid: u32, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    loop {
        let entries = status_mappings(pid);
        let entry = entries.first().cloned().expect("instance listed");
        if done(&entry) {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "status never reached the expected state: {entry}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}
