//! The `redirect` command as a user runs it: `run` until a signal, `exec`
//! around a command, and rejection of bad input and bad environments.

use std::path::PathBuf;

use redirect_tests::{
    Pair, RedirectProcess, binary, parse_probe, privileged, probe, redirect, redirect_output,
    test_cgroup, wait_detached,
};

fn run_args(mapping: &str, cgroup: &std::path::Path) -> Vec<String> {
    vec![
        "run".into(),
        "--map".into(),
        mapping.into(),
        "--cgroup".into(),
        cgroup.display().to_string(),
    ]
}

/// `redirect run` redirects once ready, and leaves nothing attached after
/// `signal` ends it.
fn run_then_signal(signal: i32, tag: &str) {
    if !privileged(tag) {
        return;
    }
    let servers = Pair::tcp("127.0.0.1");
    let cgroup = test_cgroup(tag);
    let mut process = RedirectProcess::start(run_args(&servers.mapping(), cgroup.path()));
    let ready = process.wait_ready();
    assert!(
        ready.contains(&servers.mapping().replace(':', "->")),
        "{ready}"
    );

    let report = probe(Some(&cgroup), "tcp", servers.decoy.addr);
    assert_eq!(report.reply(), "to:hello", "{report:?}");

    process.signal(signal);
    let status = process.wait_exit();
    if signal == libc::SIGTERM {
        assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    }
    assert_eq!(
        wait_detached(cgroup.path()),
        Vec::<String>::new(),
        "programs left attached after {tag}"
    );
    let report = probe(Some(&cgroup), "tcp", servers.decoy.addr);
    assert_eq!(report.reply(), "decoy:hello", "no redirect after exit");
}

#[test]
fn run_detaches_on_sigterm() {
    run_then_signal(libc::SIGTERM, "sigterm");
}

#[test]
fn run_detaches_on_sigint() {
    run_then_signal(libc::SIGINT, "sigint");
}

#[test]
fn run_leaves_nothing_attached_after_sigkill() {
    run_then_signal(libc::SIGKILL, "sigkill");
}

/// The scope `redirect exec` creates for its child with pid `pid`.
fn exec_scope(pid: u32) -> PathBuf {
    let root = redirect::cgroup::cgroup2_root().unwrap();
    redirect::cgroup::own_cgroup(&root)
        .unwrap()
        .join(format!("redirect-exec-{pid}"))
}

#[test]
fn exec_redirects_only_its_command() {
    if !privileged("exec") {
        return;
    }
    let servers = Pair::tcp("127.0.0.1");
    let probe_bin = binary("probe");
    let out = std::process::Command::new(binary("redirect"))
        .args(["exec", "--map", &servers.mapping(), "--"])
        .arg(&probe_bin)
        .args(["tcp", &servers.decoy.addr.to_string(), "hello"])
        .output()
        .unwrap();
    let report = parse_probe(&out);
    assert!(
        out.status.success(),
        "{report:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report.reply(), "to:hello");
    assert_eq!(report.peer(), servers.decoy.addr);

    // This test process is outside the scope.
    let report = probe(None, "tcp", servers.decoy.addr);
    assert_eq!(report.reply(), "decoy:hello");
}

#[test]
fn exec_returns_the_command_status_and_removes_its_cgroup() {
    if !privileged("exec-status") {
        return;
    }
    let mut child = std::process::Command::new(binary("redirect"))
        .args(["exec", "--map", "1443:18443", "--", "sh", "-c", "exit 7"])
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(7));
    assert!(!exec_scope(pid).exists(), "exec left its cgroup behind");

    // A command killed by a signal: the shell convention, 128 + signal.
    let out = redirect_output(
        [
            "exec",
            "--map",
            "1443:18443",
            "--",
            "sh",
            "-c",
            "kill -TERM $$",
        ],
        false,
    );
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
}

#[test]
fn exec_kills_what_the_command_leaves_behind() {
    if !privileged("exec-leftover") {
        return;
    }
    // The command backgrounds a sleeper and exits at once.
    let mut child = std::process::Command::new(binary("redirect"))
        .args([
            "exec",
            "--map",
            "1443:18443",
            "--",
            "sh",
            "-c",
            "sleep 600 & exit 0",
        ])
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(child.wait().unwrap().success());
    assert!(!exec_scope(pid).exists(), "exec left its cgroup behind");
}

#[test]
fn exec_of_a_missing_command_exits_127() {
    if !privileged("exec-missing") {
        return;
    }
    let out = redirect_output(
        ["exec", "--map", "1443:18443", "--", "/nonexistent/command"],
        false,
    );
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/command"));
}

/// Each bad input gives its message and exit code 2, and leaves nothing
/// attached to the cgroup it named.
#[test]
fn bad_input_is_rejected_with_exit_code_2_and_nothing_attached() {
    if !privileged("bad-input") {
        return;
    }
    let cgroup = test_cgroup("bad-input");
    let cases: &[(&[&str], &str)] = &[
        (&["https:8443"], "not a number"),
        (&["443:"], "not a number"),
        (&["443"], "expected FROM:TO"),
        (&["0:8443"], "port 0"),
        (&["443:65536"], "above 65535"),
        (&["443:443"], "FROM and TO must differ"),
        (&["443:8443", "443:9443"], "mapped twice"),
        (&["443:8443", "8443:443"], "loop"),
        (&["443:8443", "8443:9443"], "chain"),
        (&["443:8443", "127.0.0.1:443:9443"], "mapped twice"),
        (&["443:8443", "443:9443/tcp"], "mapped twice"),
        (&["127.0.0.1:443:8443", "8443:9443/tcp"], "chain"),
        (&["443:8443/sctp"], "/tcp or /udp"),
        (&["::1:443:8443"], "brackets"),
        (&["300.0.0.1:443:8443"], "not an IPv4 address"),
    ];
    for (maps, message) in cases {
        let mut args = vec!["run".to_owned()];
        for m in *maps {
            args.extend(["--map".to_owned(), (*m).to_owned()]);
        }
        args.extend(["--cgroup".to_owned(), cgroup.path().display().to_string()]);
        let out = redirect_output(&args, false);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{maps:?}: {stderr}");
        assert!(stderr.contains(message), "{maps:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{maps:?}: printed ready");
        assert_eq!(
            wait_detached(cgroup.path()),
            Vec::<String>::new(),
            "{maps:?}"
        );

        // exec rejects the same input before running anything.
        args[0] = "exec".into();
        args.truncate(args.len() - 2);
        args.extend(["--".into(), "true".into()]);
        let out = redirect_output(&args, false);
        assert_eq!(out.status.code(), Some(2), "exec {maps:?}");
    }
    // A missing --map is a usage error too.
    let out = redirect_output(["run"], false);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn without_privileges_run_says_what_is_missing() {
    if !privileged("unprivileged") {
        return;
    }
    let cgroup = test_cgroup("unprivileged");
    let out = redirect_output(run_args("1443:18443", cgroup.path()), true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
    assert!(stderr.contains("run as root"), "{stderr}");
    assert_eq!(wait_detached(cgroup.path()), Vec::<String>::new());
}

#[test]
fn a_directory_that_is_not_cgroup_v2_is_refused() {
    if !privileged("not-cgroup") {
        return;
    }
    let dir = std::env::temp_dir();
    let out = redirect_output(run_args("1443:18443", &dir), false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a cgroup v2 directory"), "{stderr}");
    assert!(stderr.contains("--cgroup"), "{stderr}");

    let out = redirect_output(run_args("1443:18443", "/nonexistent".as_ref()), false);
    assert_eq!(out.status.code(), Some(1));
}

/// With no cgroup2 mounted (in a private mount namespace), redirect mounts
/// one, says where, and works. `exec` is used so that only a child cgroup is
/// ever attached to.
#[test]
fn a_missing_cgroup2_mount_is_mounted_and_reported() {
    if !privileged("mount") {
        return;
    }
    let servers = Pair::tcp("127.0.0.1");
    let script = format!(
        "findmnt -rn -t cgroup2 -o TARGET | while read -r m; do umount -l \"$m\" || exit 99; done; \
         exec {redirect} exec --map {map} -- {probe} tcp {addr} hello",
        redirect = binary("redirect").display(),
        map = servers.mapping(),
        probe = binary("probe").display(),
        addr = servers.decoy.addr,
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The mount died with the namespace; remove the directories it needed.
    let mount = std::path::Path::new(redirect::cgroup::FALLBACK_MOUNT);
    let _ = std::fs::remove_dir(mount);
    let _ = mount.parent().map(std::fs::remove_dir);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "mounted one at {}",
            redirect::cgroup::FALLBACK_MOUNT
        )),
        "{stderr}"
    );
    assert_eq!(parse_probe(&out).reply(), "to:hello");
}

/// Quiet by default; `-v` shows each rewrite logged by the eBPF programs.
#[test]
fn verbose_run_logs_each_rewrite_and_quiet_run_does_not() {
    if !privileged("verbose") {
        return;
    }
    let servers = Pair::tcp("127.0.0.1");
    for verbose in [false, true] {
        let cgroup = test_cgroup("verbose");
        let mut args = run_args(&servers.mapping(), cgroup.path());
        if verbose {
            args.insert(0, "-v".into());
        }
        let mut process = RedirectProcess::start(args);
        process.wait_ready();
        assert_eq!(
            probe(Some(&cgroup), "tcp", servers.decoy.addr).reply(),
            "to:hello"
        );
        let line = format!(
            "connect4: port {} -> {}",
            servers.decoy.addr.port(),
            servers.target.addr.port()
        );
        // Give the log pump a moment, then end the process.
        std::thread::sleep(std::time::Duration::from_millis(200));
        process.signal(libc::SIGTERM);
        assert!(process.wait_exit().success());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let stderr = process.stderr();
        assert_eq!(
            stderr.contains(&line),
            verbose,
            "verbose={verbose}: {stderr}"
        );
        if !verbose {
            assert!(stderr.is_empty(), "quiet by default: {stderr}");
        }
    }
}
