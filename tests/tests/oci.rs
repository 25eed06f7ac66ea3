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
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use redirect_tests::{
    NetnsPair, RedirectProcess, binary, privileged,
    redirect::{
        control::{Client, Request},
        ebpf::netns_programs,
    },
};

/// A `redirect daemon` with its own control socket, pin directory and
/// metrics port; stopped, and its pins removed, on drop.
struct Daemon {
    process: RedirectProcess,
    dir: PathBuf,
    control: PathBuf,
    pin_dir: PathBuf,
}

impl Daemon {
    fn start(tag: &str) -> Self {
        ensure_bpffs();
        let name = format!("redirect-test-oci-{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let pin_dir = Path::new("/sys/fs/bpf").join(&name);
        let _ = fs::remove_dir_all(&pin_dir);
        let control = dir.join("control.sock");
        // A port of our own for the metrics endpoint.
        let metrics = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = dir.join("redirect.toml");
        fs::write(
            &config,
            format!(
                "pin_dir = {:?}\ncontrol = {:?}\nmetrics = \"{metrics}\"\n",
                pin_dir.display().to_string(),
                control.display().to_string()
            ),
        )
        .unwrap();
        let mut process =
            RedirectProcess::start(["daemon".as_ref(), "--config".as_ref(), config.as_os_str()]);
        process.wait_ready();
        let daemon = Daemon {
            process,
            dir,
            control,
            pin_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while daemon.status().is_none() {
            assert!(
                Instant::now() < deadline,
                "the daemon never answered on {}; stderr:\n{}",
                daemon.control.display(),
                daemon.process.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// The daemon's status, or `None` while it does not answer.
    fn status(&self) -> Option<serde_json::Value> {
        Client::new(&self.control)
            .request(&Request::Status)
            .ok()
            .map(Option::unwrap_or_default)
    }

    /// Every file under the pin directory.
    fn pins(&self) -> Vec<PathBuf> {
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
        walk(&self.pin_dir, &mut out);
        out.sort();
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM, then the pins go: links pinned for an in-place upgrade
        // would otherwise outlive the test.
        self.process.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.process.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_dir_all(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there (it is not by
/// default on this machine; the daemon pins under it).
fn ensure_bpffs() {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounted = info
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if !mounted {
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .output()
            .unwrap();
        assert!(out.status.success(), "mount bpffs: {out:?}");
    }
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
    fn run(tag: &str, netns: &Path, port: u16, page: &str, map: &str, daemon: &Daemon) -> Self {
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
        fs::copy(busybox(), rootfs.join("bin/busybox")).unwrap();
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
        let out = container
            .runc(&["run", "-d", "--bundle"])
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
            daemon.process.stderr()
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
    let daemon = Daemon::start("one");
    let pins_before = daemon.pins();
    let pair = NetnsPair::new("oci");
    let ctr = Container::run(
        "one",
        &pair.server_path(),
        8443,
        "page-one",
        "443:8443",
        &daemon,
    );
    let status = daemon.status().unwrap();
    assert!(mentions(&status, &format!("oci-{}", ctr.id)), "{status:#}");
    let pins_during = daemon.pins();
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
    let status = daemon.status().unwrap();
    assert!(!mentions(&status, &id), "{status:#}");
    assert_eq!(daemon.pins(), pins_before, "pins left behind");
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
    let daemon = Daemon::start("two");
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
    let status = daemon.status().unwrap();
    assert!(
        !mentions(&status, &id_a) && !mentions(&status, &id_b),
        "{status:#}"
    );
}
