//! `redirect doctor` on this machine: every hook loads and attaches (tried
//! for real on a throwaway cgroup and network namespace), a missing
//! capability is reported as such, and per-mapping checks name the process
//! listening on TO. Mappings use ports the test picked (bound to port 0).

use std::process::{Command, Output};

use redirect_tests::{TcpServer, binary};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {report:#}"))
}

/// `redirect doctor ARGS` with CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN and
/// CAP_PERFMON dropped from the bounding set.
fn doctor_without_bpf_caps(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--bounding-set=-bpf,-sys_admin,-net_admin,-perfmon",
            "--inh-caps=-all",
        ])
        .arg(binary("redirect"))
        .arg("doctor")
        .args(args)
        .output()
        .expect("run setpriv (util-linux)")
}

#[cfg(feature = "ebpf")]
#[test]
fn doctor_reports_every_hook_working_here() {
    if !redirect_tests::privileged("doctor-hooks") {
        return;
    }
    let server = TcpServer::start("127.0.0.1:0", "to");
    let map = format!("127.0.0.1:{}:{}/tcp", free_port(), server.addr.port());
    let out = Command::new(binary("redirect"))
        .args(["doctor", "--json", "--backend", "ebpf", "--map", &map])
        .output()
        .unwrap();
    let report = json(&out);
    assert!(out.status.success(), "exit 0 when eBPF can run: {report:#}");
    let hooks: Vec<&serde_json::Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("hook "))
        .collect();
    assert_eq!(
        hooks.len(),
        14,
        "every program of the object is tried: {report:#}"
    );
    // Every program of the object is tried; the core ones by name.
    for core in [
        "hook connect4",
        "hook getpeername4",
        "hook sendmsg4",
        "hook steer",
    ] {
        assert!(
            hooks.iter().any(|h| h["name"] == core),
            "{core} tried: {report:#}"
        );
    }
    for h in &hooks {
        assert_eq!(h["status"], "ok", "{h:#}");
    }
    assert_eq!(report["ebpf"]["can_run"], true);
    assert_eq!(report["auto_runs"], "ebpf");
    assert_eq!(check(&report, "capabilities")["status"], "ok");
    // The listener on TO is this test process.
    let to = check(&report, &format!("map {map}: TO {}", server.addr.port()));
    assert_eq!(to["status"], "ok", "{to:#}");
    let me = format!("pid {}", std::process::id());
    assert!(to["detail"].as_str().unwrap().contains(&me), "{to:#}");
    // Nothing is left behind.
    let root = redirect::cgroup::cgroup2_root().unwrap();
    let left: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("redirect-doctor-"))
        .collect();
    assert!(left.is_empty(), "doctor left cgroups behind: {left:?}");
}

#[test]
fn doctor_reports_a_missing_capability() {
    let server = TcpServer::start("127.0.0.1:0", "to");
    let map = format!("127.0.0.1:{}:{}/tcp", free_port(), server.addr.port());
    let out = doctor_without_bpf_caps(&["--json", "--backend", "ebpf", "--map", &map]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(1), "eBPF cannot run: {report:#}");
    let caps = check(&report, "capabilities");
    assert_eq!(caps["status"], "fail", "{caps:#}");
    assert!(
        caps["detail"].as_str().unwrap().contains("missing CAP_BPF"),
        "{caps:#}"
    );
    assert!(
        caps["fix"].as_str().unwrap().contains("--backend proxy"),
        "{caps:#}"
    );
    assert_eq!(report["ebpf"]["can_run"], false);

    // The proxy can still run, so auto (the default) exits 0 and says so.
    let out = doctor_without_bpf_caps(&["--map", &map]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("missing CAP_BPF"), "{text}");
    assert!(text.contains("--backend auto runs: proxy"), "{text}");
}

#[test]
fn doctor_rejects_a_bad_mapping_with_exit_2() {
    let out = Command::new(binary("redirect"))
        .args(["doctor", "--map", "443:443"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
