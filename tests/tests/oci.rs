//! Containers through a real OCI runtime: runc runs busybox containers whose
//! `config.json` calls the built `redirect oci-hook` at createRuntime and
//! poststop, against a real `redirect daemon`.
//!
//! Each container gets a network namespace of the test's own (the server
//! side of a [`NetnsPair`]; the client side stands for "another host") and
//! runs busybox `httpd` on TO as uid 1000 with no capabilities. Everything
//! (bundles, runc's state root, the daemon's control socket and pin
//! directory) lives in directories the test creates and removes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use redirect_tests::{
    NetnsPair, binary, daemon::TestDaemon, privileged, redirect::ebpf::netns_programs,
};

/// The daemon under test, with no static scope: the hook adds them.
fn start_daemon(tag: &str) -> TestDaemon {
    TestDaemon::start(tag, "", "")
}

/// Every file under the daemon's pin directory.
fn pins(daemon: &TestDaemon) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            }
            out.push(path);
        }
    }
    let mut out = Vec::new();
    walk(&daemon.pin_dir, &mut out);
    out.sort();
    out
}

/// A busybox container run by runc; killed and deleted on drop.
struct Container {
    id: String,
    dir: PathBuf,
    deleted: bool,
}

impl Container {
    /// Runs `httpd -f -p PORT` as uid 1000 without capabilities in the
    /// network namespace `netns`, with `annotations` and the hooks; its
    /// index page is `page`, and `/cgi-bin/who` reports the client address.
    fn run(tag: &str, netns: &Path, port: u16, page: &str, map: &str, daemon: &TestDaemon) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "redirect-test-oci-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&id);
        let _ = fs::remove_dir_all(&dir);
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::create_dir_all(rootfs.join("www/cgi-bin")).unwrap();
        // Copied by cp, not fs::copy: a write fd of this process would be
        // inherited by a fork in a parallel test, and exec of the copy
        // would then fail with ETXTBSY ("Text file busy").
        run_ok(
            Command::new("cp")
                .arg(busybox())
                .arg(rootfs.join("bin/busybox")),
        );
        run_ok(Command::new("chroot").arg(&rootfs).args([
            "/bin/busybox",
            "--install",
            "-s",
            "/bin",
        ]));
        fs::write(rootfs.join("www/index.html"), format!("{page}\n")).unwrap();
        let cgi = rootfs.join("www/cgi-bin/who");
        fs::write(
            &cgi,
            "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"remote=$REMOTE_ADDR\"\n",
        )
        .unwrap();
        run_ok(Command::new("chmod").arg("755").arg(&cgi));
        run_ok(Command::new("runc").arg("spec").current_dir(&dir));

        let config_path = dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
        let hook = serde_json::json!([{
            "path": binary("redirect"),
            "args": ["redirect", "oci-hook", "--control", daemon.control],
            "timeout": 10,
        }]);
        let none: Vec<String> = Vec::new();
        config["process"]["terminal"] = false.into();
        config["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
        config["process"]["args"] =
            serde_json::json!(["httpd", "-f", "-p", port.to_string(), "-h", "/www"]);
        config["process"]["capabilities"] = serde_json::json!({
            "bounding": none, "effective": none, "permitted": none,
            "ambient": none, "inheritable": none,
        });
        config["annotations"] = serde_json::json!({ "io.redirect.map": map });
        config["hooks"] = serde_json::json!({ "createRuntime": hook, "poststop": hook });
        let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.retain(|n| n["type"] != "network");
        namespaces.push(serde_json::json!({"type": "network", "path": netns}));
        fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

        let container = Container {
            id,
            dir,
            deleted: false,
        };
        // Detached, with stdio to files: a pipe would be held open by the
        // container's process.
        let log = fs::File::create(container.dir.join("stdio.log")).unwrap();
        let mut run = vec!["run", "-d"];
        if root_is_initramfs() {
            // pivot_root(2) cannot leave an initramfs (the guest of
            // `cargo xtask test --kernel`): move the rootfs and chroot.
            run.push("--no-pivot");
        }
        run.push("--bundle");
        let out = container
            .runc(&run)
            .arg(&container.dir)
            .arg(&container.id)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .unwrap();
        assert!(
            out.success(),
            "runc run {}: {out}; output:\n{}\ndaemon:\n{}",
            container.id,
            container.log(),
            daemon
                .process
                .as_ref()
                .map(|p| p.stderr())
                .unwrap_or_default()
        );
        container.wait_listening(port);
        container
    }

    /// `runc --root STATE ARGS…`, with a state directory of this container's.
    fn runc(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(self.dir.join("runc-state"))
            .args(args);
        cmd
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("stdio.log")).unwrap_or_default()
    }

    /// `wget -O - URL` inside the container, as uid 1000 (without `-T`:
    /// busybox 1.35's static wget crashes with it).
    fn wget(&self, url: &str) -> Output {
        self.runc(&[
            "exec",
            "--user",
            "1000:1000",
            &self.id,
            "wget",
            "-q",
            "-O",
            "-",
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap()
    }

    /// Waits until httpd listens on `port` (its own port, asked directly).
    fn wait_listening(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.wget(&format!("http://127.0.0.1:{port}/"));
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "httpd in {} never served on {port}: {out:?}\n{}",
                self.id,
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `runc delete --force`: kills the container and runs the poststop
    /// hook.
    fn delete(mut self) {
        self.deleted = true;
        let out = self
            .runc(&["delete", "--force", &self.id])
            .output()
            .unwrap();
        assert!(out.status.success(), "runc delete {}: {out:?}", self.id);
        assert!(
            !self.cgroup().exists(),
            "runc left {} behind",
            self.cgroup().display()
        );
    }

    /// Where runc puts the container's cgroup v2 directory when config.json
    /// names none.
    fn cgroup(&self) -> PathBuf {
        redirect::cgroup::cgroup2_root().unwrap().join(&self.id)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = self.runc(&["delete", "--force", &self.id]).output();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether `/` is the kernel's rootfs (an initramfs), not a real mount.
fn root_is_initramfs() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some("/") && l.contains(" - rootfs "))
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// The host's static busybox (Debian's busybox-static), copied into each
/// rootfs.
fn busybox() -> PathBuf {
    let path = PathBuf::from("/bin/busybox");
    assert!(
        path.exists(),
        "busybox not found: install busybox-static (`cargo xtask test` does)"
    );
    path
}

fn text(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `wget` from the client side of `pair` to the container's address.
fn wget_from_outside(pair: &NetnsPair, path: &str) -> Output {
    let url = format!("http://{}:443{path}", NetnsPair::SERVER_IP);
    NetnsPair::command(
        &pair.client,
        &["timeout", "10", "busybox", "wget", "-q", "-O", "-", &url],
    )
    .output()
    .unwrap()
}

/// Whether the JSON mentions `needle` in any string.
fn mentions(v: &serde_json::Value, needle: &str) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains(needle),
        serde_json::Value::Array(a) => a.iter().any(|v| mentions(v, needle)),
        serde_json::Value::Object(m) => m
            .iter()
            .any(|(k, v)| k.contains(needle) || mentions(v, needle)),
        _ => false,
    }
}

#[test]
fn a_container_annotated_443_to_8443_is_served_inside_and_from_outside() {
    if !privileged("oci-runc") {
        return;
    }
    let daemon = start_daemon("one");
    let pins_before = pins(&daemon);
    let pair = NetnsPair::new("oci");
    let ctr = Container::run(
        "one",
        &pair.server_path(),
        8443,
        "page-one",
        "443:8443",
        &daemon,
    );
    let status = daemon.status();
    assert!(mentions(&status, &format!("oci-{}", ctr.id)), "{status:#}");
    let pins_during = pins(&daemon);
    assert!(
        pins_during.len() > pins_before.len(),
        "the container's scope is pinned: {pins_during:?}"
    );

    // Inside: a client of the container reaches its own unprivileged server.
    assert_eq!(text(&ctr.wget("http://127.0.0.1:443/")), "page-one");
    assert_eq!(
        text(&ctr.wget("http://127.0.0.1:443/cgi-bin/who")),
        "remote=[::ffff:127.0.0.1]"
    );
    // Outside: another namespace connects to the container's address on 443,
    // and the server sees that client's real address.
    assert_eq!(text(&wget_from_outside(&pair, "/")), "page-one");
    assert_eq!(
        text(&wget_from_outside(&pair, "/cgi-bin/who")),
        format!("remote=[::ffff:{}]", NetnsPair::CLIENT_IP)
    );
    assert_eq!(netns_programs(&pair.server_path()).unwrap().len(), 1);

    let id = ctr.id.clone();
    ctr.delete();
    // Nothing of it remains: not in the daemon, not pinned, not attached.
    let status = daemon.status();
    assert!(!mentions(&status, &id), "{status:#}");
    assert_eq!(pins(&daemon), pins_before, "pins left behind");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !netns_programs(&pair.server_path()).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "sk_lookup still attached");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_containers_map_the_same_port_differently_without_interfering() {
    if !privileged("oci-runc-two") {
        return;
    }
    let daemon = start_daemon("two");
    let (pair_a, pair_b) = (NetnsPair::new("oci-a"), NetnsPair::new("oci-b"));
    let a = Container::run(
        "a",
        &pair_a.server_path(),
        8443,
        "page-a",
        "443:8443",
        &daemon,
    );
    let b = Container::run(
        "b",
        &pair_b.server_path(),
        9443,
        "page-b",
        "443:9443",
        &daemon,
    );
    for _ in 0..3 {
        assert_eq!(text(&a.wget("http://127.0.0.1:443/")), "page-a");
        assert_eq!(text(&b.wget("http://127.0.0.1:443/")), "page-b");
        assert_eq!(text(&wget_from_outside(&pair_a, "/")), "page-a");
        assert_eq!(text(&wget_from_outside(&pair_b, "/")), "page-b");
    }
    // A's mapping is A's alone: 443:9443 does nothing inside A.
    assert!(!a.wget("http://127.0.0.1:9443/").status.success());
    let (id_a, id_b) = (a.id.clone(), b.id.clone());
    a.delete();
    // B is untouched by A's removal.
    assert_eq!(text(&b.wget("http://127.0.0.1:443/")), "page-b");
    assert_eq!(text(&wget_from_outside(&pair_b, "/")), "page-b");
    b.delete();
    let status = daemon.status();
    assert!(
        !mentions(&status, &id_a) && !mentions(&status, &id_b),
        "{status:#}"
    );
}
