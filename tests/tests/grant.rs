//! `--grant PORT`, the authbind equivalent: processes in the scope bind a
//! privileged port without CAP_NET_BIND_SERVICE; nobody else does.
//!
//! Every bind happens in a network namespace of the test's own
//! (`unshare --net`), so no port of the host is ever taken.

use std::process::{Command, Output};

use redirect_tests::{
    RedirectProcess, Spawn, binary, privileged, redirect::cgroup::ChildCgroup, redirect_output,
    test_cgroup,
};

/// `unshare --net ARGS…` (as root), inside `cgroup` if given.
fn in_new_netns(cgroup: Option<&ChildCgroup>, args: &[&str]) -> Output {
    let mut cmd = Command::new("unshare");
    cmd.arg("--net").args(args);
    Spawn {
        cgroup,
        unprivileged: false,
    }
    .apply(&mut cmd);
    cmd.output().expect("run unshare")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `redirect exec [--grant 443] --user nobody -- probe bind ADDR`.
fn exec_bind(grant: Option<&str>, addr: &str) -> Output {
    let redirect = binary("redirect").display().to_string();
    let probe = binary("probe").display().to_string();
    let mut args = vec![redirect.as_str(), "exec"];
    if let Some(port) = grant {
        args.extend(["--grant", port]);
    }
    args.extend(["--user", "nobody", "--", &probe, "bind", addr]);
    in_new_netns(None, &args)
}

#[test]
fn exec_grant_lets_nobody_bind_443_and_without_it_bind_fails() {
    if !privileged("grant-exec") {
        return;
    }
    for addr in ["0.0.0.0:443", "[::]:443"] {
        let out = exec_bind(Some("443"), addr);
        assert!(
            out.status.success(),
            "{addr}: {} {}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout(&out).trim(), format!("bound={addr}"));
    }

    let out = exec_bind(None, "0.0.0.0:443");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("Permission denied"),
        "{}",
        stdout(&out)
    );

    // Only the granted port.
    let out = exec_bind(Some("443"), "0.0.0.0:444");
    assert!(
        stdout(&out).contains("Permission denied"),
        "{}",
        stdout(&out)
    );
}

/// `redirect run --cgroup DIR --grant 443` grants an existing cgroup: its
/// processes may bind 443, others may not, and after `run` ends neither.
#[test]
fn run_grant_covers_an_existing_cgroup_only_while_it_runs() {
    if !privileged("grant-run") {
        return;
    }
    let cgroup = test_cgroup("grant-run");
    let probe = binary("probe").display().to_string();
    let bind_as_nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        probe.as_str(),
        "bind",
        "0.0.0.0:443",
    ];
    let mut run = RedirectProcess::start([
        "run",
        "--cgroup",
        &cgroup.path().display().to_string(),
        "--grant",
        "443",
    ]);
    let ready = run.wait_ready();
    assert!(ready.contains("granting port 443"), "{ready}");

    let inside = in_new_netns(Some(&cgroup), &bind_as_nobody);
    assert_eq!(stdout(&inside).trim(), "bound=0.0.0.0:443");
    let outside = in_new_netns(None, &bind_as_nobody);
    assert!(
        stdout(&outside).contains("Permission denied"),
        "{}",
        stdout(&outside)
    );

    run.signal(libc::SIGTERM);
    assert!(run.wait_exit().success());
    let after = in_new_netns(Some(&cgroup), &bind_as_nobody);
    assert!(
        stdout(&after).contains("Permission denied"),
        "{}",
        stdout(&after)
    );
}

#[test]
fn bad_grants_and_users_are_rejected_with_exit_code_2() {
    if !privileged("grant-bad") {
        return;
    }
    let cgroup = test_cgroup("grant-bad");
    let dir = cgroup.path().display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--cgroup", &dir, "--grant", "8443"],
            "without a grant",
        ),
        (&["run", "--cgroup", &dir, "--grant", "0"], "port 0"),
        (
            &["run", "--cgroup", &dir, "--grant", "https"],
            "not a number",
        ),
        (&["run", "--grant", "443"], "--grant needs --cgroup"),
        (&["run", "--cgroup", &dir], "no mapping given"),
        (
            &["exec", "--user", "no-such-user", "--", "true"],
            "unknown user",
        ),
    ];
    for (args, message) in cases {
        let out = redirect_output(*args, false);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    assert_eq!(
        redirect_tests::wait_detached(cgroup.path()),
        Vec::<String>::new()
    );
}

/// `probe bind 0.0.0.0:PORT`, as `nobody` when `as_nobody`.
fn bind_args(probe: &str, port: u16, as_nobody: bool) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    if as_nobody {
        args.extend(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ]
            .map(String::from),
        );
    }
    args.extend([probe.to_owned(), "bind".into(), format!("0.0.0.0:{port}")]);
    args
}

fn bind_in(cgroup: &ChildCgroup, port: u16, as_nobody: bool) -> String {
    let probe = binary("probe").display().to_string();
    let args = bind_args(&probe, port, as_nobody);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stdout(&in_new_netns(Some(cgroup), &args))
}

/// `--owner nobody`: within the scope only nobody may bind TO (8443);
/// root gets EACCES; other ports are untouched; the reservation ends with
/// `run`.
#[test]
fn owner_reserves_the_target_port_for_its_user() {
    if !privileged("owner-uid") {
        return;
    }
    let scope = test_cgroup("owner-uid");
    let dir = scope.path().display().to_string();
    let mut run = RedirectProcess::start([
        "run", "--map", "443:8443", "--cgroup", &dir, "--owner", "nobody",
    ]);
    run.wait_ready();
    assert_eq!(bind_in(&scope, 8443, true).trim(), "bound=0.0.0.0:8443");
    let squatter = bind_in(&scope, 8443, false);
    assert!(squatter.contains("Permission denied"), "{squatter}");
    assert_eq!(bind_in(&scope, 8444, false).trim(), "bound=0.0.0.0:8444");

    run.signal(libc::SIGTERM);
    assert!(run.wait_exit().success());
    assert_eq!(bind_in(&scope, 8443, false).trim(), "bound=0.0.0.0:8443");
}

/// `--owner CGROUP_DIR`: only processes of that cgroup may bind TO.
#[test]
fn owner_cgroup_reserves_the_target_port_for_that_cgroup() {
    if !privileged("owner-cgroup") {
        return;
    }
    let scope = test_cgroup("owner-cgroup");
    let owner = ChildCgroup::create(scope.path(), "owner").unwrap();
    let other = ChildCgroup::create(scope.path(), "other").unwrap();
    let mut run = RedirectProcess::start([
        "run",
        "--map",
        "443:8443",
        "--cgroup",
        &scope.path().display().to_string(),
        "--owner",
        &owner.path().display().to_string(),
    ]);
    run.wait_ready();
    assert_eq!(bind_in(&owner, 8443, false).trim(), "bound=0.0.0.0:8443");
    let squatter = bind_in(&other, 8443, false);
    assert!(squatter.contains("Permission denied"), "{squatter}");
    run.signal(libc::SIGTERM);
    assert!(run.wait_exit().success());
}
