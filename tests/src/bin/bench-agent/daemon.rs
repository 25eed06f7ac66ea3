//! `bench-agent daemon` and `bench-agent hold-scopes`: the daemon's and the
//! OCI hook's figures (issues 10 and 13), and the connection rate through
//! one of many scopes of one program set.

use std::{
    io::{self, BufRead as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use redirect::{
    LoadOptions, MappingSet, Programs,
    cgroup::ChildCgroup,
    control::{Client, Request, ScopeSpec},
};

/// How long the daemon may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// What a runtime spends creating a container around its createRuntime
/// hook (runc: tens of ms), left between two containers of the loop.
const RUNTIME_GAP: Duration = Duration::from_millis(25);

/// Starts `redirect daemon` (binary `redirect`) with one configured scope
/// on a child of `parent`, then: adds `scopes` scopes and 200 mappings
/// through its control socket, and runs `containers` stand-in containers
/// (a process in a network namespace and a cgroup of its own) through
/// `redirect oci-hook` createRuntime and poststop, as runc calls it.
/// Prints one `key=value` line; removes everything it made.
pub fn daemon(redirect: &str, parent: &str, scopes: u32, containers: u32) {
    let tag = format!("redirect-bench-{}", std::process::id());
    let run = PathBuf::from("/run").join(&tag);
    let pins = PathBuf::from("/sys/fs/bpf").join(&tag);
    std::fs::create_dir_all(&run).expect("run dir");
    let control = run.join("control.sock");
    let config = run.join("redirect.toml");
    let parent = Path::new(parent);
    let first = ChildCgroup::create(parent, "daemon-0").expect("cgroup");
    std::fs::write(
        &config,
        format!(
            "pin_dir = {:?}\ncontrol = {:?}\n\n[[scope]]\nname = \"bench\"\ncgroup = {:?}\n\
             maps = [\"443:8443\"]\n",
            pins.display().to_string(),
            control.display().to_string(),
            first.path().display().to_string()
        ),
    )
    .expect("config");

    let start = Instant::now();
    let mut daemon = Command::new(redirect)
        .args(["daemon", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting redirect daemon");
    let client = Client::new(&control).with_timeout(Duration::from_secs(5));
    while client.request(&Request::Status).is_err() {
        if start.elapsed() > START_TIMEOUT {
            let _ = daemon.kill();
            panic!("the daemon did not answer within {START_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_micros(200));
    }
    let cold = start.elapsed();
    let pid = daemon.id();

    // Scopes and mappings through the control socket.
    let mut children = Vec::new();
    let mut scope_times = Vec::new();
    for i in 0..scopes {
        let dir = ChildCgroup::create(parent, &format!("daemon-s{i}")).expect("cgroup");
        let spec = ScopeSpec {
            name: Some(format!("s{i}")),
            cgroup: dir.path().to_path_buf(),
            maps: vec!["443:8443".into()],
            ..ScopeSpec::default()
        };
        let t = Instant::now();
        client
            .request(&Request::AddScope { scope: spec })
            .expect("add a scope");
        scope_times.push(t.elapsed());
        children.push(dir);
    }
    let mut add_times = Vec::new();
    for i in 0..200u16 {
        let t = Instant::now();
        client
            .request(&Request::Add {
                scope: "bench".into(),
                mapping: format!("{}:{}/tcp", 10_000 + i, 20_000 + i),
            })
            .expect("add a mapping");
        add_times.push(t.elapsed());
    }
    // The same through one open session (Client::session), as a runtime
    // adding many mappings would.
    let mut session = client.session().expect("a control session");
    let mut session_times = Vec::new();
    for i in 0..200u16 {
        let t = Instant::now();
        session
            .request(&Request::Add {
                scope: "bench".into(),
                mapping: format!("{}:{}/tcp", 10_200 + i, 20_200 + i),
            })
            .expect("add a mapping in a session");
        session_times.push(t.elapsed());
    }
    drop(session);
    let rss_scopes = rss_kib(pid);

    // Containers through the OCI hook.
    let (rss_before, links_before, fds_before) = (rss_kib(pid), links(&pins), fds(pid));
    let mut hook_times = Vec::new();
    for i in 0..containers {
        let dir = ChildCgroup::create(parent, &format!("ctr-{i}")).expect("cgroup");
        let mut container = in_own_netns();
        dir.add_pid(container.id()).expect("cgroup.procs");
        let id = format!("{tag}-ctr-{i}");
        let create = serde_json::json!({
            "ociVersion": "1.0.2", "id": id, "status": "creating",
            "pid": container.id(), "bundle": "/nonexistent",
            "annotations": {"io.redirect.map": "443:8443"},
        });
        hook_times.push(hook(redirect, &control, &create));
        let stop = serde_json::json!({
            "ociVersion": "1.0.2", "id": id, "status": "stopped",
            "bundle": "/nonexistent",
            "annotations": {"io.redirect.map": "443:8443"},
        });
        hook(redirect, &control, &stop);
        let _ = container.kill();
        let _ = container.wait();
        dir.remove().expect("removing the container's cgroup");
        thread::sleep(RUNTIME_GAP);
    }
    let (rss_after, links_after, fds_after) = (rss_kib(pid), links(&pins), fds(pid));

    // SAFETY: kill(2) on the daemon this function started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    let reset = Command::new(redirect)
        .args(["reset", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .status()
        .expect("redirect reset");
    assert!(reset.success(), "redirect reset failed");
    let _ = std::fs::remove_dir(&pins);
    let _ = std::fs::remove_dir_all(&run);
    for dir in children {
        let _ = dir.remove();
    }
    let _ = first.remove();

    let p = |mut v: Vec<Duration>, q: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6
    };
    println!(
        "cold_us={:.0} scope_p50={:.1} scope_p99={:.1} add_p50={:.1} add_p99={:.1} \
         session_add_p50={:.1} session_add_p99={:.1} \
         rss_scopes_kib={rss_scopes} hook_p50={:.1} hook_p99={:.1} rss_before_kib={rss_before} \
         rss_after_kib={rss_after} links_before={links_before} links_after={links_after} \
         fds_before={fds_before} fds_after={fds_after}",
        cold.as_secs_f64() * 1e6,
        p(scope_times.clone(), 0.5),
        p(scope_times, 0.99),
        p(add_times.clone(), 0.5),
        p(add_times, 0.99),
        p(session_times.clone(), 0.5),
        p(session_times, 0.99),
        p(hook_times.clone(), 0.5),
        p(hook_times, 0.99),
    );
}

/// A stand-in container: `sleep` in a network namespace of its own,
/// returned once it is there (never in ours: the hook would steer it).
#[expect(
    clippy::zombie_processes,
    reason = "the child is returned; the caller kills and waits for it"
)]
fn in_own_netns() -> Child {
    let ours = std::fs::read_link("/proc/self/ns/net").expect("our netns");
    let mut child = Command::new("unshare")
        .args(["--net", "sleep", "30"])
        .spawn()
        .expect("unshare --net sleep");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ns = std::fs::read_link(format!("/proc/{}/ns/net", child.id()));
        if ns.is_ok_and(|ns| ns != ours) {
            return child;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("unshare --net did not start");
        }
        thread::sleep(Duration::from_micros(100));
    }
}

/// Runs `redirect oci-hook` with `state` on stdin; its wall time, start to
/// exit.
fn hook(redirect: &str, control: &Path, state: &serde_json::Value) -> Duration {
    let t = Instant::now();
    let mut child = Command::new(redirect)
        .arg("oci-hook")
        .arg("--control")
        .arg(control)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("redirect oci-hook");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(state.to_string().as_bytes())
        .expect("writing the state");
    let status = child.wait().expect("waiting for the hook");
    let elapsed = t.elapsed();
    assert!(status.success(), "the hook failed: {status}");
    elapsed
}

fn rss_kib(pid: u32) -> u64 {
    redirect_tests::proc_status_kib(pid, "VmRSS:").unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Links pinned under `dir` (the files under every `links` directory).
fn links(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let path = e.path();
            if !path.is_dir() {
                usize::from(dir.file_name().is_some_and(|n| n == "links"))
            } else {
                links(&path)
            }
        })
        .sum()
}

/// Loads one program set, attaches `cgroup` with `mapping`, then `extra`
/// more scopes (children of `parent`, one mapping each), prints `ready`,
/// and holds until stdin closes.
pub fn hold_scopes(cgroup: &str, mapping: &str, extra: u32, parent: &str) {
    let programs = Programs::load(&LoadOptions::default()).expect("load the program set");
    let _scope = programs
        .scope(cgroup)
        .mappings(MappingSet::parse([mapping]).expect("mapping"))
        .attach()
        .expect("attach");
    let tag = format!("redirect-bench-extra-{}", std::process::id());
    let mut held = Vec::new();
    for i in 0..extra {
        let dir = ChildCgroup::create(Path::new(parent), &format!("{tag}-{i}")).expect("cgroup");
        let scope = programs
            .scope(dir.path())
            .mappings(MappingSet::parse(["1:2"]).expect("mapping"))
            .attach()
            .expect("attach an extra scope");
        held.push((scope, dir));
    }
    println!("ready");
    let _ = io::stdin().lock().lines().count();
    for (scope, dir) in held {
        drop(scope);
        let _ = dir.remove();
    }
}
