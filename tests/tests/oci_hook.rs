//! `redirect oci-hook` at the protocol level: the built binary is given a
//! container state on stdin, the way runc gives it, and talks to a stand-in
//! for the daemon that records the request and answers a chosen response.
//! (The real daemon with a real runtime is tests/tests/oci.rs.)

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use redirect_tests::{
    binary, privileged,
    redirect::control::{ErrorKind, Request, Response, ScopeSpec},
    test_cgroup,
};

/// A stand-in daemon on a socket of its own, answering each request with
/// the next of `answers`; the requests it got come out of the receiver.
struct FakeDaemon {
    path: PathBuf,
    requests: mpsc::Receiver<Request>,
}

impl FakeDaemon {
    fn start(tag: &str, answers: Vec<Response>) -> Self {
        let dir =
            std::env::temp_dir().join(format!("redirect-test-hook-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, requests) = mpsc::channel();
        thread::spawn(move || {
            for answer in answers {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let _ = tx.send(serde_json::from_str::<Request>(&line).expect("one JSON request"));
                let mut text = serde_json::to_vec(&answer).unwrap();
                text.push(b'\n');
                (&stream).write_all(&text).unwrap();
            }
        });
        FakeDaemon { path, requests }
    }

    /// The next request (waits up to 5 s).
    fn request(&self) -> Request {
        self.requests
            .recv_timeout(Duration::from_secs(5))
            .expect("the hook sent no request")
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs `redirect oci-hook --control CONTROL` with `state` on stdin.
fn hook(control: &Path, state: &serde_json::Value) -> Output {
    let mut child = Command::new(binary("redirect"))
        .args(["oci-hook", "--control"])
        .arg(control)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redirect oci-hook");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(state.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn state(status: &str, pid: Option<u32>, annotations: serde_json::Value) -> serde_json::Value {
    let mut s = serde_json::json!({
        "ociVersion": "1.0.2-dev", "id": "ctr1", "status": status,
        "bundle": "/nonexistent/bundle", "annotations": annotations,
    });
    if let Some(pid) = pid {
        s["pid"] = pid.into();
    }
    s
}

#[test]
fn create_asks_for_the_containers_cgroup_and_namespace() {
    if !privileged("oci-hook-create") {
        return;
    }
    // A stand-in for the container's process, in a cgroup of its own.
    let cgroup = test_cgroup("hook");
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    cgroup.add_pid(sleeper.id()).unwrap();
    let daemon = FakeDaemon::start("create", vec![Response::success(None)]);
    let annotations = serde_json::json!({
        "io.redirect.map": "443:8443,53:5353/udp", "io.redirect.grant": "80",
        "io.redirect.owner": "0", "unrelated": "x",
    });
    let out = hook(
        &daemon.path,
        &state("creating", Some(sleeper.id()), annotations),
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(out.status.success(), "hook failed: {}", stderr(&out));
    assert_eq!(
        daemon.request(),
        Request::AddScope {
            scope: ScopeSpec {
                name: Some("oci-ctr1".into()),
                cgroup: cgroup.path().to_path_buf(),
                netns: Some(format!("/proc/{}/ns/net", sleeper.id()).into()),
                maps: vec!["443:8443".into(), "53:5353/udp".into()],
                owner: Some("0".into()),
                grant: vec![80],
                backend: Default::default(),
            }
        }
    );
}

#[test]
fn poststop_removes_the_scope_and_a_gone_scope_is_fine() {
    let daemon = FakeDaemon::start(
        "stop",
        vec![Response::failure(
            ErrorKind::NotFound,
            "no scope named oci-ctr1",
        )],
    );
    let annotations = serde_json::json!({"io.redirect.map": "443:8443"});
    let out = hook(&daemon.path, &state("stopped", None, annotations));
    assert!(out.status.success(), "hook failed: {}", stderr(&out));
    assert_eq!(
        daemon.request(),
        Request::RemoveScope {
            name: "oci-ctr1".into()
        }
    );
}

#[test]
fn with_no_daemon_the_container_fails_with_the_reason() {
    if !privileged("oci-hook-no-daemon") {
        return;
    }
    let missing = std::env::temp_dir().join("redirect-test-hook-no-daemon.sock");
    let cgroup = test_cgroup("hook-down");
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    cgroup.add_pid(sleeper.id()).unwrap();
    let annotations = serde_json::json!({"io.redirect.map": "443:8443"});
    let out = hook(
        &missing,
        &state("creating", Some(sleeper.id()), annotations),
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("no redirect daemon answers"), "{err}");
    assert!(err.contains("redirect daemon --config"), "{err}");
    assert!(err.contains("container ctr1"), "{err}");
    assert!(err.contains("not started"), "{err}");
}

#[test]
fn a_refusal_is_reported_with_the_daemons_message() {
    let daemon = FakeDaemon::start(
        "refused",
        vec![Response::failure(
            ErrorKind::Internal,
            "the pin directory is full; free it",
        )],
    );
    let annotations = serde_json::json!({"io.redirect.map": "443:8443"});
    let out = hook(&daemon.path, &state("stopped", None, annotations));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the pin directory is full; free it"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_input_exits_2_without_asking_and_unannotated_containers_cost_nothing() {
    let daemon = FakeDaemon::start("bad", vec![Response::success(None)]);
    let bad = serde_json::json!({"io.redirect.map": "443:443"});
    let out = hook(&daemon.path, &state("creating", Some(1), bad));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("io.redirect.map"), "{}", stderr(&out));

    let plain = serde_json::json!({"other": "x"});
    let out = hook(&daemon.path, &state("creating", Some(1), plain));
    assert!(out.status.success(), "{}", stderr(&out));

    let garbage = serde_json::json!({"hello": 1});
    let out = hook(&daemon.path, &garbage);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("OCI state"), "{}", stderr(&out));

    assert!(
        daemon
            .requests
            .recv_timeout(Duration::from_millis(200))
            .is_err(),
        "no request may be sent for bad or unannotated containers"
    );
}

/// Not a timed assertion: prints the hook's start-to-exit time against the
/// stand-in (the protocol and process cost, without the daemon's work).
#[test]
fn hook_time_against_a_stand_in() {
    const N: usize = 50;
    let daemon = FakeDaemon::start("time", vec![Response::success(None); N]);
    let annotations = serde_json::json!({"io.redirect.map": "443:8443"});
    let s = state("stopped", None, annotations);
    let mut times: Vec<Duration> = (0..N)
        .map(|_| {
            let start = Instant::now();
            let out = hook(&daemon.path, &s);
            assert!(out.status.success(), "{}", stderr(&out));
            start.elapsed()
        })
        .collect();
    times.sort();
    eprintln!(
        "oci-hook against a stand-in daemon: p50 {:?}, p90 {:?} over {N} runs",
        times[N / 2],
        times[N * 9 / 10]
    );
}
