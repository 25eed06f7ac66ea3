//! A `redirect daemon` started by a test, with a pin directory, control
//! socket and config file of its own; on drop it is killed and
//! `redirect reset` removes everything it pinned.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{RedirectProcess, redirect_output};

/// A daemon under test.
pub struct TestDaemon {
    /// Its process, while running.
    pub process: Option<RedirectProcess>,
    /// Its config file.
    pub config: PathBuf,
    /// Its pin directory (on bpffs, owned by the test).
    pub pin_dir: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
    dir: PathBuf,
    /// A program (and its arguments) that runs `redirect`, such as
    /// `setpriv …`; empty: `redirect` is run directly.
    wrapper: Vec<String>,
}

impl TestDaemon {
    /// Writes a config with `scopes` (TOML `[[scope]]` tables, appended
    /// as is) and `extra` top-level keys, and starts the daemon.
    pub fn start(tag: &str, extra: &str, scopes: &str) -> Self {
        Self::start_wrapped(tag, extra, scopes, Vec::new())
    }

    /// [`TestDaemon::start`], with `redirect` run by `wrapper` (a program
    /// and its arguments, such as `setpriv --bounding-set=…`).
    pub fn start_wrapped(tag: &str, extra: &str, scopes: &str, wrapper: Vec<String>) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "redirect-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).expect("create the daemon's directory");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&id);
        let control = dir.join("control.sock");
        let config = dir.join("redirect.toml");
        let mut daemon = TestDaemon {
            process: None,
            config,
            pin_dir,
            control,
            dir,
            wrapper,
        };
        daemon.write_config(extra, scopes);
        daemon.restart();
        daemon
    }

    /// Rewrites the config file (not applied until a reload).
    pub fn write_config(&self, extra: &str, scopes: &str) {
        let text = format!(
            "pin_dir = {:?}\ncontrol = {:?}\n{extra}\n{scopes}",
            self.pin_dir.display().to_string(),
            self.control.display().to_string()
        );
        std::fs::write(&self.config, text).expect("write the config");
    }

    /// Starts the daemon (again) and waits for its ready line.
    pub fn restart(&mut self) {
        let args = [
            "daemon".to_owned(),
            "--config".to_owned(),
            self.config.display().to_string(),
        ];
        let mut p = match self.wrapper.split_first() {
            None => RedirectProcess::start(args),
            Some((program, rest)) => {
                let mut all = rest.to_vec();
                all.push(crate::binary("redirect").display().to_string());
                all.extend(args);
                RedirectProcess::start_program(program, all)
            }
        };
        p.wait_ready();
        self.process = Some(p);
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal(libc::SIGKILL);
            p.wait_exit();
        }
    }

    /// `redirect ARGS… --control SOCKET` as root: (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        let control = self.control.display().to_string();
        all.extend(["--control", &control]);
        let out = redirect_output(all, false);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The daemon's status (the control socket's `status` result).
    pub fn status(&self) -> serde_json::Value {
        let client = redirect::control::Client::new(&self.control);
        client
            .request(&redirect::control::Request::Status)
            .expect("daemon status")
            .expect("a status")
    }

    /// Where the daemon's files live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until `check` holds, up to 5 s.
    pub fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill();
        let pin = self.pin_dir.display().to_string();
        let control = self.control.display().to_string();
        let _ = redirect_output(["reset", "--pin-dir", &pin], false);
        let _ = std::fs::remove_file(control);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
