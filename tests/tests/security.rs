//! The security promises of docs/SECURITY.md that userspace keeps, tried as
//! an attacker would: a separate unprivileged uid (`nobody`) against a
//! `redirect` run as root. Each test names the row of that table it backs.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use redirect_tests::{
    Interactive, RedirectProcess, privileged, redirect, status_json, test_cgroup, vm_rss_kib,
};

/// `redirect run ARGS… --cgroup CGROUP`, ready.
fn run_on(cgroup: &Path, args: &[String]) -> RedirectProcess {
    let mut all = vec!["run".to_owned()];
    all.extend(args.iter().cloned());
    all.extend(["--cgroup".to_owned(), cgroup.display().to_string()]);
    let mut process = RedirectProcess::start(all);
    process.wait_ready();
    process
}

/// Status service: 1,000 clients of another user that connect and never
/// read keep `redirect run` under 64 MiB resident, and root's
/// `redirect status` still answers within a second, with a reply made
/// large by 2,000 mappings (about half a megabyte of JSON).
#[test]
fn idle_status_clients_cannot_exhaust_an_instance() {
    if !privileged("security-status-flood") {
        return;
    }
    const MAPPINGS: u16 = 2000;
    const CLIENTS: usize = 1000;
    const MAX_RSS_KIB: u64 = 64 * 1024;
    let cgroup = test_cgroup("sec-flood");
    let maps: Vec<String> = (0..MAPPINGS)
        .flat_map(|i| ["--map".to_owned(), format!("{}:{}", 20000 + i, 40000 + i)])
        .collect();
    let run = run_on(cgroup.path(), &maps);
    let pid = run.child.id();
    let before = vm_rss_kib(pid);

    let socket = redirect::status::socket_path(pid);
    let mut flood = Interactive::start(
        &cgroup,
        &[
            "idle-unix",
            &socket.display().to_string(),
            &CLIENTS.to_string(),
        ],
    );
    assert_eq!(flood.line(), format!("open={CLIENTS}"));

    // While the clients sit there: memory stays bounded, status answers
    // every time. The fastest answer is what is compared with the bound:
    // on a loaded machine (CI runners, other builds) one slow answer says
    // more about the scheduler than about the service.
    let mut worst = 0;
    let mut times = Vec::new();
    for _ in 0..5 {
        thread::sleep(Duration::from_millis(300));
        worst = worst.max(vm_rss_kib(pid));
        // `status` gives an instance 2 s to answer; a TCG guest under the
        // flood may miss that once, so a listing gets three tries.
        let mut last = serde_json::Value::Null;
        let (took, instance) = (0..3)
            .find_map(|_| {
                let started = Instant::now();
                let status = status_json();
                let took = started.elapsed();
                let found = status["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|i| i["pid"] == pid)
                    .cloned();
                last = status;
                found.map(|i| (took, i))
            })
            .unwrap_or_else(|| panic!("instance {pid} not listed under attack: {last}"));
        assert_eq!(
            instance["mappings"].as_array().unwrap().len(),
            usize::from(MAPPINGS)
        );
        times.push(took);
        worst = worst.max(vm_rss_kib(pid));
    }
    eprintln!(
        "VmRSS of run: {before} KiB before, at most {worst} KiB with {CLIENTS} idle clients; \
         status answered in {times:?}"
    );
    let fastest = times.iter().min().unwrap();
    assert!(
        *fastest < redirect_tests::patience(Duration::from_secs(1)),
        "status took {times:?} under attack"
    );
    assert!(
        worst < MAX_RSS_KIB,
        "VmRSS {worst} KiB with {CLIENTS} idle status clients (before: {before} KiB)"
    );
    flood.finish();
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Polls `done` for up to `secs` seconds.
fn eventually(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    // Scaled like every wait on a redirect process (the TCG guest is
    // several times slower to load the programs).
    let deadline = Instant::now() + redirect_tests::patience(Duration::from_secs(secs));
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// Lifetimes: a SIGKILLed `redirect exec` takes its command with it (the
/// command runs as another user, which must not lose the parent-death
/// signal), and the next `redirect status` removes the cgroup it left.
#[test]
fn a_killed_exec_kills_its_command_and_its_cgroup_is_cleaned_up() {
    if !privileged("security-exec-kill") {
        return;
    }
    let mut exec = std::process::Command::new(redirect_tests::binary("redirect"))
        .args([
            "exec",
            "--map",
            "1443:18443",
            "--user",
            "nobody",
            "--",
            "sleep",
            "60",
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start redirect exec");
    let exec_pid = exec.id();
    let root = redirect::cgroup::cgroup2_root().unwrap();
    let scope = redirect::cgroup::own_cgroup(&root)
        .unwrap()
        .join(redirect::cgroup::exec_cgroup_name(exec_pid));
    let mut sleeper = None;
    assert!(
        eventually(10, || {
            sleeper = redirect::cgroup::cgroup_pids(&scope)
                .ok()
                .and_then(|p| p.first().copied());
            sleeper.is_some()
        }),
        "the command never appeared in {}",
        scope.display()
    );
    let sleeper = sleeper.unwrap();

    // SAFETY: plain syscall on our own child.
    assert_eq!(unsafe { libc::kill(exec_pid as i32, libc::SIGKILL) }, 0);
    exec.wait().unwrap();
    assert!(
        eventually(5, || dead(sleeper)),
        "the command (pid {sleeper}) outlived its SIGKILLed exec"
    );
    // A SIGKILLed exec cannot remove its cgroup itself; the next `run`,
    // `exec` or `status` does. Another test of this file running at the
    // same time may be that next one, so the cgroup may be gone already:
    // what matters is that it is gone once `status` has run.
    let out = redirect_tests::redirect_output(["status"], false);
    assert!(out.status.success());
    assert!(
        !scope.exists(),
        "status left the stale cgroup {}: {}",
        scope.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let record = Path::new(redirect::cgroup::EXEC_RECORDS).join(exec_pid.to_string());
    assert!(!record.exists(), "record {} left", record.display());
}

/// Lifetimes: `status` still lists a `run` whose cgroup was removed under
/// it, and says the cgroup is gone.
#[test]
fn status_reports_a_run_whose_cgroup_was_removed() {
    if !privileged("security-cgroup-gone") {
        return;
    }
    let cgroup = test_cgroup("sec-gone");
    let mut run = RedirectProcess::run("1443:18443", cgroup.path());
    let pid = run.child.id();
    std::fs::remove_dir(cgroup.path()).expect("remove the empty cgroup");

    let status = status_json();
    let instance = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["pid"] == pid)
        .unwrap_or_else(|| panic!("run {pid} not listed once its cgroup is gone: {status}"))
        .clone();
    assert_eq!(instance["scope_gone"], true, "{instance}");
    let out = redirect_tests::redirect_output(["status"], false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("(pid {pid})")), "{text}");
    assert!(text.contains("the cgroup is gone"), "{text}");

    run.signal(libc::SIGTERM);
    assert!(run.wait_exit().success(), "{}", run.stderr());
}

/// Messages: bad input gets exit code 2 and a message that names the
/// option, says what to pass, and quotes at most a short prefix of what
/// it was given, before anything is attached (as `nobody` too: none of
/// this needs privileges to be refused).
#[test]
fn bad_input_is_named_and_never_echoed_whole() {
    // Never attached to: if some input were accepted, run would fail on
    // this path with exit code 1, and the test with it.
    let cgroup = "/nonexistent/redirect-test-cgroup";
    let huge = "1".repeat(100_000);
    let huge_map = format!("{huge}:8443");
    let huge_netns = "/x".repeat(50_000);
    let cases: [(&[&str], &str); 6] = [
        (
            &["--owner", "nosuchuser"],
            "unknown user `nosuchuser` for --owner",
        ),
        (
            &["--netns", "/bogus"],
            "network namespace /bogus: No such file",
        ),
        // A file every system has, the emulated test guest included.
        (&["--netns", "/proc/self/status"], "not a namespace file"),
        (&["--netns", "/proc/self/ns/mnt"], "not a network namespace"),
        (&["--netns", &huge_netns], "network namespace /x/x"),
        (&["--map", &huge_map], "invalid port"),
    ];
    for unprivileged in [false, true] {
        for (args, message) in &cases {
            let mut all = vec!["run", "--cgroup", cgroup];
            if !args.contains(&"--map") {
                all.extend(["--map", "1443:18443"]);
            }
            all.extend(args.iter());
            let out = redirect_tests::redirect_output(&all, unprivileged);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let shown: String = stderr.chars().take(300).collect();
            assert_eq!(out.status.code(), Some(2), "{shown}");
            assert!(stderr.contains(message), "{message}: {shown}");
            assert!(stderr.len() < 1000, "input echoed whole: {shown}…");
            assert!(out.stdout.is_empty(), "printed ready: {shown}");
            if !stderr.contains("unknown user") {
                assert!(!stderr.contains("--user"), "{shown}");
            }
            // The OS error is said once, not once more as a cause.
            assert!(stderr.matches("os error").count() <= 1, "{shown}");
            if args.contains(&"--map") || args.contains(&huge_netns.as_str()) {
                assert!(stderr.contains('…'), "{shown}");
            }
        }
    }
}

/// `redirect ARGS…` to completion as root; (exit code, stderr).
fn refused(args: &[String]) -> (Option<i32>, String) {
    let out = redirect_tests::redirect_output(args, false);
    assert!(
        out.stdout.is_empty(),
        "printed ready: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_args(map: &str, cgroup: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "run".to_owned(),
        "--map".to_owned(),
        map.to_owned(),
        "--cgroup".to_owned(),
        cgroup.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Stacking: a second `run` on the same cgroup is refused with exit code
/// 2, naming the first by pid, and nothing of it is attached; with
/// `--allow-stacking` it starts, and `status` shows the stacking.
#[test]
fn a_second_run_on_one_cgroup_is_refused() {
    if !privileged("security-stack-same") {
        return;
    }
    let cgroup = test_cgroup("sec-stack");
    let first = run_on(cgroup.path(), &["--map".into(), "1443:18443".into()]);
    let pid = first.child.id();
    let before = redirect_tests::attached(cgroup.path());

    let (code, stderr) = refused(&run_args("1443:19443", cgroup.path(), &[]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("redirect run (pid {pid}) on the same cgroup")),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-stacking"), "{stderr}");
    assert_eq!(redirect_tests::attached(cgroup.path()), before);

    let mut second =
        RedirectProcess::start(run_args("2443:19443", cgroup.path(), &["--allow-stacking"]));
    second.wait_ready();
    let status = status_json();
    let instance = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["pid"] == second.child.id())
        .expect("second instance listed")
        .clone();
    let stacked = instance["stacked_with"].to_string();
    assert!(stacked.contains(&format!("(pid {pid})")), "{instance}");
    assert!(
        second.stderr().contains("stacking with"),
        "{}",
        second.stderr()
    );
}

/// Stacking across the hierarchy: a `run` on a child cgroup of another
/// run's cgroup, a `run` on its parent, and an `exec` started inside its
/// scope (the double rewrite) are all refused.
#[test]
fn a_run_or_exec_nested_in_another_runs_scope_is_refused() {
    if !privileged("security-stack-nested") {
        return;
    }
    let outer = test_cgroup("sec-nest");
    let inner = redirect::cgroup::ChildCgroup::create(outer.path(), "inner").unwrap();
    let run = run_on(outer.path(), &["--map".into(), "8443:9443".into()]);
    let pid = run.child.id();

    let (code, stderr) = refused(&run_args("443:8443", inner.path(), &[]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("redirect run (pid {pid}) on the parent cgroup")),
        "{stderr}"
    );
    assert_eq!(redirect_tests::attached(inner.path()), Vec::<String>::new());

    // exec inside the scope: its cgroup would be a child of the run's.
    let mut exec = std::process::Command::new(redirect_tests::binary("redirect"));
    exec.args(["exec", "--map", "443:8443", "--", "true"]);
    redirect_tests::Spawn {
        cgroup: Some(&outer),
        unprivileged: false,
    }
    .apply(&mut exec);
    let out = exec.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("(pid {pid})")), "{stderr}");
    drop(run);

    // The other way round: a run on the parent of a run's cgroup.
    let run = run_on(inner.path(), &["--map".into(), "8443:9443".into()]);
    let pid = run.child.id();
    let (code, stderr) = refused(&run_args("443:8443", outer.path(), &[]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("redirect run (pid {pid}) on the child cgroup")),
        "{stderr}"
    );
    drop(run);
    drop(inner);
}

/// Stacking on a namespace: a second `run` steering the same network
/// namespace (from another cgroup) is refused, naming the first.
#[test]
fn two_runs_steering_one_namespace_are_refused() {
    if !privileged("security-stack-netns") {
        return;
    }
    let pair = redirect_tests::NetnsPair::new("secst");
    let netns = pair.server_path().display().to_string();
    let a = test_cgroup("sec-ns-a");
    let b = test_cgroup("sec-ns-b");
    let first = run_on(
        a.path(),
        &[
            "--map".into(),
            "1443:18443/tcp".into(),
            "--netns".into(),
            netns.clone(),
        ],
    );
    let pid = first.child.id();
    let (code, stderr) = refused(&run_args("2443:28443/tcp", b.path(), &["--netns", &netns]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "redirect run (pid {pid}) on the network namespace {netns}"
        )),
        "{stderr}"
    );
    assert_eq!(redirect_tests::attached(b.path()), Vec::<String>::new());
}

/// `probe MODE ADDR` as `nobody` (or root) in network namespace `ns`,
/// outside any test cgroup, with its first output line.
fn hold_in(ns: &str, mode: &str, addr: &str, unprivileged: bool) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let probe = redirect_tests::binary("probe").display().to_string();
    // `ip netns exec` needs root: the drop to nobody comes after it.
    let mut args = if unprivileged {
        vec![
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
    } else {
        Vec::new()
    };
    args.extend([probe.as_str(), mode, addr]);
    let mut child = redirect_tests::NetnsPair::command(ns, &args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start probe");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .expect("a line from the probe");
    (child, line.trim().to_owned())
}

fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Start-up check: with `--owner`, a TO port already held by another user
/// in the namespace the scope serves (bound only, listening, or a bound
/// UDP socket; from outside the scope's cgroup) makes `run` refuse with
/// exit code 2, naming the pid, the command and the user, and attach
/// nothing. With `--allow-held-target` it starts and the ready line and
/// `status` name the holder. The owner's own listener is no reason to
/// refuse.
#[test]
fn a_target_held_by_a_non_owner_refuses_run_unless_allowed() {
    if !privileged("security-held-target") {
        return;
    }
    let pair = redirect_tests::NetnsPair::new("secheld");
    let netns = pair.server_path().display().to_string();
    let scope = test_cgroup("sec-held");
    let owner = ["--netns", netns.as_str(), "--owner", "root"];
    let cases = [
        ("bindlisten", "1443:18443/tcp", "0.0.0.0:18443", "bound"),
        ("serve", "1443:18443", "[::]:18443", "listening"),
        (
            "udp-serve",
            "1053:15353/udp",
            "127.0.0.1:15353",
            "listening local=127.0.0.1:15353",
        ),
    ];
    for (mode, map, addr, first) in cases {
        let (holder, line) = hold_in(&pair.server, mode, addr, true);
        assert_eq!(line, first, "{mode}");
        let (code, stderr) = refused(&run_args(map, scope.path(), &owner));
        assert_eq!(code, Some(2), "{mode}: {stderr}");
        let named = format!("pid {} (probe, user nobody)", holder.id());
        assert!(stderr.contains(&named), "{mode}: {named}: {stderr}");
        assert!(stderr.contains("--allow-held-target"), "{stderr}");
        assert!(stderr.contains(&netns), "{stderr}");
        assert_eq!(
            redirect_tests::attached(scope.path()),
            Vec::<String>::new(),
            "{mode}: attached although refused"
        );
        stop(holder);
    }

    // Allowed: it starts, and says so.
    let (holder, _) = hold_in(&pair.server, "bindlisten", "0.0.0.0:18443", true);
    let named = format!("pid {} (probe, user nobody)", holder.id());
    let mut allowed = RedirectProcess::start(run_args(
        "1443:18443/tcp",
        scope.path(),
        &[&owner[..], &["--allow-held-target"]].concat(),
    ));
    let ready = allowed.wait_ready();
    assert!(
        ready.contains("TARGET HELD") && ready.contains(&named),
        "{ready}"
    );
    let status = status_json();
    let instance = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["pid"] == allowed.child.id())
        .expect("instance listed")
        .clone();
    assert!(
        instance["held_targets"].to_string().contains(&named),
        "{instance}"
    );
    drop(allowed);
    stop(holder);

    // The owner's own server holding TO is what an owner is for.
    let (server, line) = hold_in(&pair.server, "serve", "0.0.0.0:18443", false);
    assert_eq!(line, "listening");
    let mut run = RedirectProcess::start(run_args("1443:18443/tcp", scope.path(), &owner));
    let ready = run.wait_ready();
    assert!(!ready.contains("TARGET HELD"), "{ready}");
    drop(run);
    stop(server);
}

/// `probe bind ADDR` in namespace `ns` and cgroup `cgroup`, as `nobody`
/// or root: its output (`bound=…` or `error=…`).
fn bind_in(ns: &str, cgroup: &redirect::cgroup::ChildCgroup, addr: &str, nobody: bool) -> String {
    let probe = redirect_tests::binary("probe").display().to_string();
    let mut args = if nobody {
        vec![
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
    } else {
        Vec::new()
    };
    args.extend([probe.as_str(), "bind", addr]);
    let mut cmd = redirect_tests::NetnsPair::command(ns, &args);
    redirect_tests::Spawn {
        cgroup: Some(cgroup),
        unprivileged: false,
    }
    .apply(&mut cmd);
    let out = cmd.output().expect("run probe bind");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The namespace-wide guard: with `--owner` and `--guard-cgroup P`, a
/// process outside the scope (P/s) but under P (in P/o), in the namespace
/// the scope serves, gets EACCES binding TO, on either family; another
/// port is untouched, the owner may still bind TO from outside the scope,
/// and a process of another namespace (in P/o too) binds the same port
/// freely. Without the option the outsider binds TO (the documented
/// limit), and the guard ends with `run`.
#[test]
fn a_guard_cgroup_keeps_to_for_the_owner_in_the_whole_namespace() {
    if !privileged("security-guard-cgroup") {
        return;
    }
    let pair = redirect_tests::NetnsPair::new("secguard");
    let netns = pair.server_path().display().to_string();
    let parent = test_cgroup("sec-guard");
    let scope = redirect::cgroup::ChildCgroup::create(parent.path(), "s").unwrap();
    let outside = redirect::cgroup::ChildCgroup::create(parent.path(), "o").unwrap();
    let guard = parent.path().display().to_string();
    let owner = ["--netns", netns.as_str(), "--owner", "root"];
    let (server, client) = (pair.server.as_str(), pair.client.as_str());

    // Without the guard: the outsider takes TO (docs/SECURITY.md).
    let run = RedirectProcess::start(run_args("1443:18443", scope.path(), &owner));
    let mut run = run;
    run.wait_ready();
    assert_eq!(
        bind_in(server, &outside, "0.0.0.0:18443", true),
        "bound=0.0.0.0:18443"
    );
    drop(run);

    let mut run = RedirectProcess::start(run_args(
        "1443:18443",
        scope.path(),
        &[&owner[..], &["--guard-cgroup", &guard]].concat(),
    ));
    run.wait_ready();
    for addr in ["0.0.0.0:18443", "127.0.0.1:18443", "[::]:18443"] {
        let out = bind_in(server, &outside, addr, true);
        assert!(out.contains("Permission denied"), "{addr}: {out}");
    }
    assert_eq!(
        bind_in(server, &outside, "0.0.0.0:18444", true),
        "bound=0.0.0.0:18444",
        "another port"
    );
    assert_eq!(
        bind_in(server, &outside, "0.0.0.0:18443", false),
        "bound=0.0.0.0:18443",
        "the owner, outside the scope"
    );
    assert_eq!(
        bind_in(client, &outside, "0.0.0.0:18443", true),
        "bound=0.0.0.0:18443",
        "another namespace"
    );
    // Inside the scope, the scope's own guard still refuses.
    let inside = bind_in(server, &scope, "0.0.0.0:18443", true);
    assert!(inside.contains("Permission denied"), "{inside}");

    run.signal(libc::SIGTERM);
    assert!(run.wait_exit().success(), "{}", run.stderr());
    assert_eq!(
        bind_in(server, &outside, "0.0.0.0:18443", true),
        "bound=0.0.0.0:18443",
        "the guard ends with run"
    );
    assert_eq!(
        redirect_tests::attached(parent.path()),
        Vec::<String>::new(),
        "nothing left on the guard cgroup"
    );
    drop(scope);
    drop(outside);
}

/// `probe ARGS…` in namespace `ns`, in `cgroup` when given, as root; its
/// parsed report.
fn probe_in(
    ns: &str,
    cgroup: Option<&redirect::cgroup::ChildCgroup>,
    args: &[&str],
) -> redirect_tests::ProbeReport {
    let probe = redirect_tests::binary("probe").display().to_string();
    let mut all = vec![probe.as_str()];
    all.extend(args);
    let mut cmd = redirect_tests::NetnsPair::command(ns, &all);
    redirect_tests::Spawn {
        cgroup,
        unprivileged: false,
    }
    .apply(&mut cmd);
    redirect_tests::parse_probe(&cmd.output().expect("run probe"))
}

/// Local rewrite, with and without `--owner`: a process of the scope that
/// lives in another network namespace is rewritten there (cgroup programs
/// follow the cgroup), and a remote client dialling FROM meets whatever
/// listens on FROM, untouched.
#[test]
fn a_scope_process_elsewhere_is_rewritten_there_and_remote_clients_are_untouched() {
    if !privileged("security-local-other-netns") {
        return;
    }
    for extra in [&[][..], &["--owner", "root"][..]] {
        let pair = redirect_tests::NetnsPair::new("seclocal");
        let scope = test_cgroup("sec-local");
        let mut run = RedirectProcess::start(run_args("1443:18443", scope.path(), extra));
        run.wait_ready();
        let (target, line) = hold_in(&pair.server, "serve", "127.0.0.1:18443", false);
        assert_eq!(line, "listening");
        let report = probe_in(&pair.server, Some(&scope), &["tcp", "127.0.0.1:1443", "hi"]);
        assert_eq!(report.reply(), "to:hi", "{extra:?}: {report:?}");
        assert_eq!(report.peer().port(), 1443, "getpeername says FROM");
        stop(target);

        let (from, line) = hold_in(&pair.server, "serve", "0.0.0.0:1443", false);
        assert_eq!(line, "listening");
        let remote = format!("{}:1443", redirect_tests::NetnsPair::SERVER_IP);
        let report = probe_in(&pair.client, None, &["tcp", &remote, "hi"]);
        assert_eq!(report.reply(), "to:hi", "{extra:?}: {report:?}");
        let out = from.wait_with_output().expect("FROM's server");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("local={remote}")), "{text}");
        drop(run);
    }
}

/// UDP in inbound mode: a process outside the scope, in the steered
/// namespace, that binds TO gets TO: the bind rewrite is the scope's only.
#[test]
fn an_outsider_s_udp_bind_of_to_stays_to() {
    if !privileged("security-udp-outsider") {
        return;
    }
    let pair = redirect_tests::NetnsPair::new("secudp");
    let scope = test_cgroup("sec-udp");
    let netns = pair.server_path().display().to_string();
    let mut run = RedirectProcess::start(run_args(
        "1053:15353/udp",
        scope.path(),
        &["--netns", &netns],
    ));
    run.wait_ready();
    let (outsider, line) = hold_in(&pair.server, "udp-serve", "0.0.0.0:15353", true);
    assert_eq!(line, "listening local=0.0.0.0:15353");
    stop(outsider);
    drop(run);
}

/// Status sockets: any user may read them, none may plant one: the
/// directory belongs to root and only root writes there.
#[test]
fn no_user_can_plant_a_status_socket() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    if !privileged("security-status-dir") {
        return;
    }
    let cgroup = test_cgroup("sec-statusdir");
    let _run = RedirectProcess::run("1443:18443", cgroup.path());
    let dir = Path::new(redirect::status::RUNTIME_DIR);
    let meta = std::fs::metadata(dir).expect("the status directory exists");
    assert_eq!(meta.uid(), 0, "{}", dir.display());
    assert_eq!(
        meta.permissions().mode() & 0o022,
        0,
        "{} is writable by others: {:o}",
        dir.display(),
        meta.permissions().mode()
    );
    let planted = dir.join("999999999.sock");
    let mut touch = std::process::Command::new("touch");
    touch.arg(&planted);
    redirect_tests::Spawn {
        cgroup: None,
        unprivileged: true,
    }
    .apply(&mut touch);
    let status = touch.status().expect("run touch");
    assert!(!status.success(), "nobody created {}", planted.display());
    assert!(!planted.exists());
}

/// `sysctl -qw SETTING` in namespace `ns` (the test's own).
fn sysctl_in(ns: &str, setting: &str) {
    let out = redirect_tests::NetnsPair::command(ns, &["sysctl", "-qw", setting])
        .output()
        .expect("sysctl");
    assert!(
        out.status.success(),
        "{setting}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Start-up check: with `--owner`, a TO inside the served namespace's
/// `ip_local_port_range` (which any process's autobind may be given, and
/// no bind hook sees) is refused with exit code 2 and the fixes; once TO
/// is in `ip_local_reserved_ports` it starts, and `--allow-held-target`
/// starts anyway, saying so.
#[test]
fn an_owner_s_to_that_autobind_may_take_is_refused_unless_reserved() {
    if !privileged("security-autobind-range") {
        return;
    }
    let pair = redirect_tests::NetnsPair::new("secauto");
    let netns = pair.server_path().display().to_string();
    let scope = test_cgroup("sec-auto");
    sysctl_in(&pair.server, "net.ipv4.ip_local_port_range=40000 40100");
    let owner = ["--netns", netns.as_str(), "--owner", "root"];
    let (code, stderr) = refused(&run_args("1443:40001", scope.path(), &owner));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("port 40001 is inside ip_local_port_range 40000-40100"),
        "{stderr}"
    );
    assert!(stderr.contains("ip_local_reserved_ports"), "{stderr}");
    assert!(stderr.contains("--allow-held-target"), "{stderr}");
    // Outside the range: no question.
    let mut run = RedirectProcess::start(run_args("1443:18443", scope.path(), &owner));
    run.wait_ready();
    drop(run);
    let mut run = RedirectProcess::start(run_args(
        "1443:40001",
        scope.path(),
        &[&owner[..], &["--allow-held-target"]].concat(),
    ));
    let ready = run.wait_ready();
    assert!(ready.contains("ip_local_port_range"), "{ready}");
    drop(run);
    sysctl_in(&pair.server, "net.ipv4.ip_local_reserved_ports=40001");
    let mut run = RedirectProcess::start(run_args("1443:40001", scope.path(), &owner));
    let ready = run.wait_ready();
    assert!(!ready.contains("TARGET HELD"), "{ready}");
}

/// The daemon: adding a scope with an owner while another user holds TO
/// is refused (kind `conflict`, naming the pid); once the holder is gone
/// the scope attaches with `guard_cgroup`, which keeps TO from outsiders
/// of the same namespace across a daemon restart (the pinned guard is
/// adopted), until the scope is removed.
#[test]
fn the_daemon_checks_held_targets_and_keeps_its_guard_across_a_restart() {
    use redirect::control::{Client, ErrorKind, Request, ScopeSpec};
    if !privileged("security-daemon-guard") {
        return;
    }
    let pair = redirect_tests::NetnsPair::new("secdmn");
    let parent = test_cgroup("sec-dmn");
    let scope = redirect::cgroup::ChildCgroup::create(parent.path(), "s").unwrap();
    let outside = redirect::cgroup::ChildCgroup::create(parent.path(), "o").unwrap();
    let server = pair.server.as_str();
    let mut daemon = redirect_tests::daemon::TestDaemon::start("secdmn", "", "");
    let spec = ScopeSpec {
        name: Some("guarded".into()),
        cgroup: scope.path().to_path_buf(),
        netns: Some(pair.server_path()),
        maps: vec!["1443:18443".into()],
        owner: Some("root".into()),
        guard_cgroup: Some(parent.path().to_path_buf()),
        ..ScopeSpec::default()
    };
    let add = Request::AddScope {
        scope: spec.clone(),
    };

    let (holder, line) = hold_in(server, "bindlisten", "0.0.0.0:18443", true);
    assert_eq!(line, "bound");
    let err = Client::new(&daemon.control).request(&add).unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Conflict), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("pid {} (probe, user nobody)", holder.id())),
        "{err}"
    );
    stop(holder);

    Client::new(&daemon.control)
        .request(&add)
        .expect("attached once TO is free");
    let refused = |what: &str| {
        let out = bind_in(server, &outside, "0.0.0.0:18443", true);
        assert!(out.contains("Permission denied"), "{what}: {out}");
    };
    refused("guarded");
    daemon.kill();
    refused("while the daemon is down: the guard is pinned");
    daemon.restart();
    refused("after a restart");
    assert_eq!(
        daemon.status()["scopes"][0]["guard_cgroup"],
        parent.path().display().to_string()
    );
    Client::new(&daemon.control)
        .request(&Request::RemoveScope {
            name: "guarded".into(),
        })
        .expect("remove the scope");
    // An unpinned link is detached a moment later, not at once.
    let mut last = String::new();
    assert!(
        eventually(3, || {
            last = bind_in(server, &outside, "0.0.0.0:18443", true);
            last == "bound=0.0.0.0:18443"
        }),
        "the guard goes with the scope: {last}"
    );
    drop(daemon);
    assert_eq!(
        redirect_tests::wait_detached(parent.path()),
        Vec::<String>::new()
    );
}
