//! The OCI hook through podman: `podman run --annotation
//! io.redirect.map=443:8443` with the hook installed in a hooks directory
//! (as `dist/oci-hooks.d/redirect.json` installs it), against a real
//! `redirect daemon`. No registry: the image is imported from a busybox
//! tarball the test makes, into a podman storage of the test's own
//! (`--root`, `--runroot`, vfs driver), removed afterwards.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use redirect_tests::{
    binary,
    daemon::TestDaemon,
    privileged,
    redirect::{
        cgroup,
        control::{Client, Request},
    },
};

/// A podman with everything under `dir`.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "redirect-test-podman-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("containers.conf"), "[engine]\n").unwrap();
        Podman { dir }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        // The hooks directory through a containers.conf of the test's own:
        // podman's cleanup process (started by conmon when the container
        // exits, and the one that runs poststop) reads the config, but is
        // not given a --hooks-dir flag.
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        cmd.arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        cmd
    }

    /// A busybox image with an index page, imported from a tarball.
    fn busybox_image(&self, page: &str) -> String {
        let rootfs = self.dir.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::create_dir_all(rootfs.join("www")).unwrap();
        run_ok(
            Command::new("cp")
                .arg("/bin/busybox")
                .arg(rootfs.join("bin/busybox")),
        );
        run_ok(Command::new("chroot").arg(&rootfs).args([
            "/bin/busybox",
            "--install",
            "-s",
            "/bin",
        ]));
        fs::write(rootfs.join("www/index.html"), format!("{page}\n")).unwrap();
        let tar = self.dir.join("rootfs.tar");
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        let image = "localhost/redirect-test-busybox:latest".to_owned();
        run_ok(self.command().arg("import").arg(&tar).arg(&image));
        image
    }

    /// Installs redirect's hook, as dist/oci-hooks.d has it but pointing
    /// at the built binary and the test daemon's socket, in a hooks
    /// directory that only this test's podman uses.
    fn install_hook(&self, daemon: &TestDaemon) {
        let dir = self.dir.join("hooks.d");
        fs::create_dir_all(&dir).unwrap();
        let dist: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/oci-hooks.d/redirect.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let mut hook = dist.clone();
        hook["hook"]["path"] = binary("redirect").display().to_string().into();
        hook["hook"]["args"] = serde_json::json!([
            "redirect",
            "oci-hook",
            "--control",
            daemon.control.display().to_string()
        ]);
        fs::write(
            dir.join("redirect.json"),
            serde_json::to_vec_pretty(&hook).unwrap(),
        )
        .unwrap();
        self.write_conf(&dir);
    }

    /// The containers.conf naming `hooks` as the hooks directory.
    fn write_conf(&self, hooks: &Path) {
        fs::write(
            self.dir.join("containers.conf"),
            format!(
                "[engine]\nhooks_dir = [{:?}]\n",
                hooks.display().to_string()
            ),
        )
        .unwrap();
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.command().args(["rm", "--all", "--force"]).output();
        let _ = self.command().args(["system", "reset", "--force"]).output();
        let _ = fs::remove_dir_all(&self.dir);
        // podman's parent cgroup, when nothing else uses it (rmdir refuses
        // a cgroup with children).
        if let Ok(root) = cgroup::cgroup2_root() {
            let _ = fs::remove_dir(root.join("libpod_parent"));
        }
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    out
}

#[test]
fn podman_run_with_the_annotation_serves_443_from_8443_inside() {
    if !privileged("podman_run_with_the_annotation_serves_443_from_8443_inside") {
        return;
    }
    let daemon = TestDaemon::start("podman", "", "");
    let podman = Podman::new("run");
    let image = podman.busybox_image("served through podman");
    podman.install_hook(&daemon);
    // httpd on 8443 as uid 1000 with no capability; a request to 443
    // inside the same container must reach it. podman's default rlimits exceed
    // this VM's hard limits, hence --ulimit.
    let out = podman
        .command()
        .arg("run")
        .arg("--name")
        .arg("redirect-test-annotated")
        .args([
            "--annotation",
            "io.redirect.map=443:8443",
            "--network",
            "none",
            "--user",
            "1000:1000",
            "--cap-drop",
            "all",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            &image,
            "/bin/sh",
            "-c",
            // nc, not wget: busybox's static wget segfaults in podman's
            // /etc (glibc NSS), with or without redirect.
            // httpd in the foreground and stopped before the shell exits:
            // a daemonized one left behind made podman lose the exit code.
            "httpd -f -p 8443 -h /www & sleep 0.3; \
             printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 443; r=$?; \
             kill $!; wait; exit $r",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("served through podman"),
        "podman run: {out:?}\ndaemon:\n{}",
        daemon
            .process
            .as_ref()
            .map(|p| p.stderr())
            .unwrap_or_default()
    );
    // The daemon served the container through its own scope.
    let id = String::from_utf8_lossy(
        &run_ok(podman.command().args([
            "inspect",
            "--format",
            "{{.Id}}",
            "redirect-test-annotated",
        ]))
        .stdout,
    )
    .trim()
    .to_owned();
    let scope = format!("oci-{id}");
    // The daemon has no scope of its own, so a redirected connect was the
    // container's scope at work. The scope itself may already be gone: the
    // container has exited, and the daemon detaches a scope whose cgroup
    // podman removed (or podman's cleanup ran poststop) — both are right.
    let status = daemon.status();
    assert!(
        status["counters"]["connect_redirected"].as_u64() >= Some(1),
        "the daemon redirected nothing: {status}"
    );
    let listed = status["scopes"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["name"] == scope.as_str()));
    let cgroup_gone = cgroup::cgroup2_root()
        .is_ok_and(|root| !root.join(format!("libpod_parent/libpod-{id}")).exists());
    assert!(
        listed || cgroup_gone,
        "scope {scope} is missing while its container's cgroup is still there: {status}"
    );
    // podman's own cleanup process may still hold the container's shm
    // mount for a moment ("device or resource busy"): removal is retried
    // for up to 5 s. The test's claims are above; this is housekeeping.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let rm = podman
            .command()
            .args(["rm", "--force", "redirect-test-annotated"])
            .output()
            .unwrap();
        if rm.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "podman rm kept failing: {rm:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // podman 4.3 with this private setup (--root, a hooks_dir from
    // CONTAINERS_CONF) ran createRuntime but not poststop, and left the
    // container's cgroup: the scope is removed here, as poststop would,
    // and the cgroup with it. The runc tests (oci.rs) cover poststop.
    let _ = Client::new(&daemon.control).request(&Request::RemoveScope {
        name: scope.clone(),
    });
    if let Ok(root) = cgroup::cgroup2_root() {
        let _ = fs::remove_dir(root.join(format!("libpod_parent/libpod-{id}")));
    }
}

#[test]
fn podman_run_without_the_annotation_runs_no_hook() {
    if !privileged("podman_run_without_the_annotation_runs_no_hook") {
        return;
    }
    // No daemon at all: an unannotated container must not even call the
    // hook (the hook would fail createRuntime with the daemon down).
    let podman = Podman::new("plain");
    let image = podman.busybox_image("plain");
    let daemon_dir = podman.dir.join("no-daemon");
    fs::create_dir_all(&daemon_dir).unwrap();
    let hooks = podman.dir.join("hooks.d");
    fs::create_dir_all(&hooks).unwrap();
    let mut hook: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/oci-hooks.d/redirect.json"),
        )
        .unwrap(),
    )
    .unwrap();
    hook["hook"]["path"] = binary("redirect").display().to_string().into();
    hook["hook"]["args"] = serde_json::json!([
        "redirect",
        "oci-hook",
        "--control",
        daemon_dir.join("control.sock").display().to_string()
    ]);
    fs::write(hooks.join("redirect.json"), hook.to_string()).unwrap();
    podman.write_conf(&hooks);
    let out = podman
        .command()
        .arg("run")
        .arg("--rm")
        .args([
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            &image,
            "/bin/echo",
            "ran",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ran"),
        "{out:?}"
    );
}
