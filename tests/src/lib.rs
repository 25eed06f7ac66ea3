//! Helpers for redirect's integration tests.
//!
//! Tests own their world: every cgroup is a `redirect-test-*` child that the
//! test creates and removes, every port is picked free at run time (by
//! binding port 0), and every client runs in its own process (cgroup
//! membership is per process) as the unprivileged user `nobody`, which is
//! the whole point of redirecting.
//!
//! Off CI, a test that lacks privileges says so and returns; under
//! `CI=true` it panics, because a skipped privileged test is a failure.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

pub use redirect;

pub mod daemon;
use redirect::cgroup::ChildCgroup;
#[cfg(feature = "ebpf")]
use redirect::{cgroup::cgroup2_root, ebpf::attached_programs};

/// uid and gid of `nobody` on Debian.
pub const NOBODY: u32 = 65534;

#[cfg(feature = "ebpf")]
/// Whether privileged tests can run here. Off CI, prints why not and
/// returns false (the caller returns early); under `CI=true`, panics.
pub fn privileged(test: &str) -> bool {
    match redirect::ebpf::check_privileges() {
        Ok(()) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true: privileged test {test} cannot run (a skip is a failure): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            false
        }
    }
}

/// `base` times `REDIRECT_TEST_PATIENCE` (a whole factor, default 1): the
/// bound of every wait on a `redirect` or `probe` process. `cargo xtask test
/// --kernel` raises it in its emulated guest, where a debug `redirect` takes
/// seconds to parse the kernel's BTF and load its programs.
pub fn patience(base: Duration) -> Duration {
    let factor = std::env::var("REDIRECT_TEST_PATIENCE")
        .ok()
        .and_then(|f| f.parse().ok())
        .unwrap_or(1);
    base * factor
}

#[cfg(feature = "ebpf")]
/// A fresh `redirect-test-<tag>-<pid>-<n>` child of the cgroup v2 root,
/// removed (with anything left inside killed) on drop.
pub fn test_cgroup(tag: &str) -> ChildCgroup {
    static N: AtomicU32 = AtomicU32::new(0);
    let root = cgroup2_root().expect("cgroup v2 root");
    let name = format!(
        "redirect-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    ChildCgroup::create(&root, &name).expect("create test cgroup")
}

#[cfg(feature = "ebpf")]
/// A [`redirect::Redirector`] for one mapping (given as text) attached to
/// `cgroup`, with default options.
pub fn attach(cgroup: &Path, mapping: &str) -> redirect::Redirector {
    let mappings = redirect::MappingSet::parse([mapping]).expect("valid mapping");
    redirect::Redirector::attach(cgroup, mappings, &redirect::Options::default()).expect("attach")
}

#[cfg(feature = "ebpf")]
/// Names of the programs attached directly to `cgroup`.
pub fn attached(cgroup: &Path) -> Vec<String> {
    attached_programs(cgroup)
        .expect("query attached programs")
        .into_iter()
        .map(|p| format!("{}:{}", p.hook, p.name))
        .collect()
}

#[cfg(feature = "ebpf")]
/// Waits (up to 3 s, see [`patience`]) until nothing is attached to `cgroup`; returns what is
/// still attached otherwise.
pub fn wait_detached(cgroup: &Path) -> Vec<String> {
    let deadline = Instant::now() + patience(Duration::from_secs(3));
    loop {
        let left = attached(cgroup);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The `redirect` binary the tests run, when not the one built beside
/// them: `cargo xtask test` runs part of the suite a second time against
/// the static-pie release binary, the one users install.
pub const REDIRECT_BIN_ENV: &str = "REDIRECT_TEST_BINARY";

/// A workspace binary that `nobody` can run wherever the checkout lives:
/// a copy in `$TMPDIR/redirect-tests-bin-<checkout>` (one fixed directory
/// per checkout, refreshed once per test process, so runs do not
/// accumulate copies and two checkouts tested at once never run each
/// other's binaries).
///
/// With [`REDIRECT_BIN_ENV`] set, `redirect` is that file instead of the
/// one built beside the tests.
pub fn binary(name: &str) -> PathBuf {
    use std::hash::{Hash as _, Hasher as _};
    static COPIED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let chosen = std::env::var_os(REDIRECT_BIN_ENV)
        .filter(|_| name == "redirect")
        .map(PathBuf::from);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    target_dir().hash(&mut hasher);
    chosen.hash(&mut hasher);
    let dir = std::env::temp_dir().join(format!("redirect-tests-bin-{:016x}", hasher.finish()));
    let copy = dir.join(name);
    let mut copied = COPIED.lock().unwrap();
    if !copied.iter().any(|n| n == name) {
        let built = chosen.unwrap_or_else(|| target_dir().join(name));
        assert!(
            built.exists(),
            "{} not found: build the binaries first (`cargo build --bins`; \
             `cargo xtask test` does it)",
            built.display()
        );
        fs::create_dir_all(&dir).expect("create binary dir");
        set_mode(&dir, 0o755);
        // Copy to a private name, then rename over: another test process
        // may be running the previous copy.
        let tmp = dir.join(format!("{name}.{}", std::process::id()));
        fs::copy(&built, &tmp).expect("copy binary");
        set_mode(&tmp, 0o755);
        fs::rename(&tmp, &copy).expect("rename binary");
        copied.push(name.to_owned());
    }
    copy
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// target/<profile>, found from this test binary's own path
/// (target/<profile>/deps/<test>).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// How to run a child process in a test.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spawn<'a> {
    /// Move the process into this cgroup before it execs.
    pub cgroup: Option<&'a ChildCgroup>,
    /// Drop to uid/gid `nobody` (no capabilities) before exec.
    pub unprivileged: bool,
}

impl Spawn<'_> {
    /// Applies these settings to `cmd`.
    pub fn apply(&self, cmd: &mut Command) {
        let procs = self
            .cgroup
            .map(|c| Arc::new(c.procs_writer().expect("open cgroup.procs")));
        let unprivileged = self.unprivileged;
        // SAFETY: only async-signal-safe calls (write, setgroups, setgid,
        // setuid) run between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs
                    && libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(std::io::Error::last_os_error());
                }
                if unprivileged
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(NOBODY) != 0
                        || libc::setuid(NOBODY) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// What the `probe` client reported.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// `key=value` lines of its output (`local`, `peer`, `reply`, `error`).
    pub fields: HashMap<String, String>,
    /// Whether it exited 0.
    pub ok: bool,
}

impl ProbeReport {
    /// A field, panicking with the whole report when it is missing.
    pub fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("probe reported no {key}: {self:?}"))
    }

    /// The client's own address (getsockname).
    pub fn local(&self) -> SocketAddr {
        self.get("local").parse().expect("local address")
    }

    /// The peer the client's socket reports (getpeername).
    pub fn peer(&self) -> SocketAddr {
        self.get("peer").parse().expect("peer address")
    }

    /// The server's reply, `label:message`.
    pub fn reply(&self) -> &str {
        self.get("reply")
    }
}

/// Runs the probe client (`tcp` or `udp`) against `addr` as `nobody`,
/// inside `cgroup` if given.
pub fn probe(cgroup: Option<&ChildCgroup>, proto: &str, addr: SocketAddr) -> ProbeReport {
    let mut cmd = Command::new(binary("probe"));
    cmd.args([proto, &addr.to_string(), "hello"]);
    Spawn {
        cgroup,
        unprivileged: true,
    }
    .apply(&mut cmd);
    let out = cmd.output().expect("run probe");
    parse_probe(&out)
}

/// Parses the probe's `key=value` output.
pub fn parse_probe(out: &Output) -> ProbeReport {
    let fields = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    ProbeReport {
        fields,
        ok: out.status.success(),
    }
}

/// A TCP server answering each line with `label:line`, recording the peer
/// address of every connection it accepts. Stops on drop.
pub struct TcpServer {
    /// Where it listens.
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TcpServer {
    /// Listens on `addr` (port 0 picks a free port).
    pub fn start(addr: &str, label: &'static str) -> Self {
        let listener = TcpListener::bind(addr).expect("bind tcp server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peers, stop) = (peers.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            peers.lock().unwrap().push(peer);
                            thread::spawn(move || serve_tcp(stream, label));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        TcpServer {
            addr,
            peers,
            stop,
            thread: Some(thread),
        }
    }

    /// The peer addresses of the connections accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

fn serve_tcp(stream: std::net::TcpStream, label: &str) {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_ok() {
        let _ = (&stream).write_all(format!("{label}:{}\n", line.trim_end()).as_bytes());
    }
    // Drain until the client closes.
    let _ = reader.read_to_end(&mut Vec::new());
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long [`UdpServer`] waits before answering a datagram that starts
/// with "slow".
pub const SLOW_REPLY: Duration = Duration::from_millis(500);

/// A UDP server answering each datagram with `label:datagram` to its
/// sender (after [`SLOW_REPLY`] for datagrams starting with "slow"),
/// recording the sender addresses. Stops on drop.
pub struct UdpServer {
    /// Where it listens.
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpServer {
    /// Binds `addr` (port 0 picks a free port).
    pub fn start(addr: &str, label: &'static str) -> Self {
        let socket = UdpSocket::bind(addr).expect("bind udp server");
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("local_addr");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peers, stop) = (peers.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                        peers.lock().unwrap().push(peer);
                        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let reply = format!("{label}:{msg}");
                        if msg.starts_with("slow") {
                            // Lets a test change mappings while a reply is
                            // in flight.
                            let socket = socket.try_clone().expect("clone socket");
                            thread::spawn(move || {
                                thread::sleep(SLOW_REPLY);
                                let _ = socket.send_to(reply.as_bytes(), peer);
                            });
                        } else {
                            let _ = socket.send_to(reply.as_bytes(), peer);
                        }
                    }
                }
            })
        };
        UdpServer {
            addr,
            peers,
            stop,
            thread: Some(thread),
        }
    }

    /// The sender addresses seen so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pair of servers for one test: `decoy` listens on FROM (where a client
/// that is not redirected lands) and `target` on TO.
pub struct Pair<S> {
    /// Listens on FROM; replies `decoy:…`.
    pub decoy: S,
    /// Listens on TO; replies `to:…`.
    pub target: S,
}

impl Pair<TcpServer> {
    /// Two TCP servers on free ports of `ip`.
    pub fn tcp(ip: &str) -> Self {
        Pair {
            decoy: TcpServer::start(&socket_addr(ip, 0), "decoy"),
            target: TcpServer::start(&socket_addr(ip, 0), "to"),
        }
    }

    /// The mapping FROM:TO for this pair.
    pub fn mapping(&self) -> String {
        format!("{}:{}", self.decoy.addr.port(), self.target.addr.port())
    }
}

/// `ip:port`, with brackets for IPv6.
pub fn socket_addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

impl Pair<UdpServer> {
    /// Two UDP servers on free ports of `ip`.
    pub fn udp(ip: &str) -> Self {
        Pair {
            decoy: UdpServer::start(&socket_addr(ip, 0), "decoy"),
            target: UdpServer::start(&socket_addr(ip, 0), "to"),
        }
    }

    /// Two UDP servers on the same ports as the TCP `pair`.
    pub fn udp_beside(pair: &Pair<TcpServer>) -> Self {
        let ip = pair.decoy.addr.ip().to_string();
        Pair {
            decoy: UdpServer::start(&socket_addr(&ip, pair.decoy.addr.port()), "decoy"),
            target: UdpServer::start(&socket_addr(&ip, pair.target.addr.port()), "to"),
        }
    }

    /// The mapping FROM:TO for this pair.
    pub fn mapping(&self) -> String {
        format!("{}:{}", self.decoy.addr.port(), self.target.addr.port())
    }
}

/// A `redirect` process started by a test; killed on drop if still running.
pub struct RedirectProcess {
    /// The child process.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl RedirectProcess {
    /// Starts `redirect ARGS…` with piped output.
    pub fn start<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::start_program(binary("redirect"), args)
    }

    /// Starts `PROGRAM ARGS…` (a wrapper such as `setpriv` that runs
    /// `redirect`) with piped output.
    pub fn start_program<I, S>(program: impl AsRef<OsStr>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start redirect");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = stderr.clone();
            let pipe = child.stderr.take().unwrap();
            // Line by line, so that what is logged is visible while the
            // process still runs.
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut all = stderr.lock().unwrap();
                    all.push_str(&line);
                    all.push('\n');
                }
            });
        }
        RedirectProcess {
            child,
            lines,
            stderr,
        }
    }

    /// Starts `redirect run --map MAPPING --cgroup CGROUP` and waits until it
    /// is ready.
    pub fn run(mapping: &str, cgroup: &Path) -> Self {
        let mut process = Self::start([
            "run",
            "--map",
            mapping,
            "--cgroup",
            &cgroup.display().to_string(),
        ]);
        process.wait_ready();
        process
    }

    /// Waits (up to 20 s, see [`patience`]) for the line starting with `ready`, and returns it.
    pub fn wait_ready(&mut self) -> String {
        let deadline = Instant::now() + patience(Duration::from_secs(20));
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with("ready") => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let status = self.child.try_wait();
        panic!(
            "redirect never printed its ready line (status {status:?}); stderr:\n{}",
            self.stderr()
        );
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain syscall on our own, not yet reaped child.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill");
    }

    /// Waits (up to 10 s, see [`patience`]) for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "redirect did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for RedirectProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `redirect ARGS…` to completion (stdin closed), optionally as
/// `nobody`, and returns its output.
pub fn redirect_output<I, S>(args: I, unprivileged: bool) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(binary("redirect"));
    cmd.args(args).stdin(Stdio::null());
    Spawn {
        cgroup: None,
        unprivileged,
    }
    .apply(&mut cmd);
    cmd.output().expect("run redirect")
}

/// An interactive `probe session` or `probe hold`, run as `nobody` inside a
/// cgroup, driven line by line. Killed on drop.
pub struct Interactive {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Interactive {
    /// Starts `probe ARGS…` inside `cgroup`.
    pub fn start(cgroup: &ChildCgroup, args: &[&str]) -> Self {
        let mut cmd = Command::new(binary("probe"));
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        Spawn {
            cgroup: Some(cgroup),
            unprivileged: true,
        }
        .apply(&mut cmd);
        let mut child = cmd.spawn().expect("start probe");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Interactive {
            child,
            stdin,
            lines,
        }
    }

    /// Sends one command line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to probe");
        stdin.flush().expect("flush probe stdin");
    }

    /// The next output line (waits up to 10 s, see [`patience`]).
    pub fn line(&mut self) -> String {
        self.lines
            .recv_timeout(patience(Duration::from_secs(10)))
            .expect("probe printed nothing")
    }

    /// Closes stdin and waits for the probe to exit.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A field of `/proc/PID/status` in KiB (`field` with its colon:
/// `"VmRSS:"`, `"VmHWM:"`); `None` if the process or the field is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Resident memory of process `pid` in KiB (`VmRSS`); panics if the
/// process is gone.
pub fn vm_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:").unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// `redirect status --json`, parsed.
pub fn status_json() -> serde_json::Value {
    let out = redirect_output(["status", "--json"], false);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// The entries of `status --json`'s `mappings` array that belong to the
/// instance with `pid`.
pub fn status_mappings(pid: u32) -> Vec<serde_json::Value> {
    status_json()["mappings"]
        .as_array()
        .expect("mappings array")
        .iter()
        .filter(|m| m["instance"] == pid)
        .cloned()
        .collect()
}

/// Two network namespaces joined by a veth pair, created for one test and
/// deleted on drop: SERVER (192.0.2.1) and CLIENT (192.0.2.2). TEST-NET-1
/// addresses, used nowhere but inside these namespaces.
pub struct NetnsPair {
    /// The server namespace's name (`/run/netns/NAME`).
    pub server: String,
    /// The client namespace's name.
    pub client: String,
}

impl NetnsPair {
    /// The server's address on the pair.
    pub const SERVER_IP: &str = "192.0.2.1";
    /// The client's address on the pair.
    pub const CLIENT_IP: &str = "192.0.2.2";

    /// Creates the pair.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pair = NetnsPair {
            server: format!("rt-{tag}-{}-{n}-s", std::process::id()),
            client: format!("rt-{tag}-{}-{n}-c", std::process::id()),
        };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &pair.server]);
        ip(&["netns", "add", &pair.client]);
        ip(&[
            "link",
            "add",
            "veth0",
            "netns",
            &pair.server,
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            &pair.client,
        ]);
        for (ns, addr) in [
            (&pair.server, Self::SERVER_IP),
            (&pair.client, Self::CLIENT_IP),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "veth0",
            ]);
            ip(&["-n", ns, "link", "set", "veth0", "up"]);
        }
        pair
    }

    /// `/run/netns/SERVER`.
    pub fn server_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.server)
    }

    /// A command run in namespace `ns` (`ip netns exec`).
    pub fn command(ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
