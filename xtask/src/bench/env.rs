//! The bench's own worlds, two identical ones: each has two network
//! namespaces joined by a veth pair, a child cgroup for its local clients
//! and servers, and the servers. The *test* world is where a path is set
//! up; the *base* world stays untouched, and the direct reference runs
//! there at the same time as the path (the two clients take turns, see
//! `workloads::duel`). Everything is created here and removed on drop;
//! nothing the bench does touches the host's network stack or iptables.
//!
//! ```text
//!  netns SRV (lo + veth-srv 192.0.2.1)          netns CLI (veth-cli 192.0.2.2)
//!    echo :8443  iperf3 :8444  udp echo :5353       inbound clients
//!    local clients (in the world's cgroup)
//! ```
//!
//! The ports clients ask for (443, 444, 53) are privileged on purpose: that
//! is the case being solved. Inside our own namespaces every port is free.

use std::{
    fs,
    io::Write as _,
    net::SocketAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::workloads::{Placement, cpu_args};

/// The server namespace's address on the veth pair (TEST-NET-1: used only
/// inside namespaces the bench creates).
pub const SRV_ADDR: &str = "192.0.2.1";
const CLI_ADDR: &str = "192.0.2.2";

/// FROM and TO ports of the three services.
pub const ECHO: (u16, u16) = (443, 8443);
/// iperf3.
pub const IPERF: (u16, u16) = (444, 8444);
/// UDP echo.
pub const UDP: (u16, u16) = (53, 5353);

/// Which namespace a client runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The server namespace, over loopback: local clients.
    Local,
    /// The client namespace, over the veth pair: inbound clients.
    Remote,
}

/// Which of the two identical worlds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum World {
    /// Where the path under test is set up.
    Test,
    /// Never touched: the direct reference.
    Base,
}

/// The namespaces, the client cgroups and the servers of both worlds.
pub struct Env {
    /// The test world's server namespace.
    pub srv: String,
    /// The test world's client namespace.
    pub cli: String,
    /// The test world's cgroup (cgroup v2 directory): the scope of the
    /// redirect paths.
    pub cgroup: PathBuf,
    /// The base world's server and client namespaces.
    base_ns: (String, String),
    /// The base world's cgroup.
    base_cgroup: PathBuf,
    /// The two FIFOs through which paired clients take turns.
    pub fifos: (PathBuf, PathBuf),
    /// Built binaries.
    pub bench_agent: PathBuf,
    /// The `redirect` binary.
    pub redirect: PathBuf,
    /// Where outputs go (target/bench).
    pub out_dir: PathBuf,
    /// Which CPUs the servers and clients run on.
    pub placement: Placement,
    /// The nice value of every process the bench starts (see
    /// [`prioritize`]).
    pub nice: i32,
    servers: Vec<Child>,
}

impl Env {
    pub fn new(
        bench_agent: PathBuf,
        redirect: PathBuf,
        out_dir: PathBuf,
        placement: Placement,
        nice: i32,
    ) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let root = cgroup2_root()?;
        let cgroup = root.join(format!("redirect-bench-{pid}"));
        let base_cgroup = root.join(format!("redirect-bench-base-{pid}"));
        for dir in [&cgroup, &base_cgroup] {
            fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let fifos = (out_dir.join("turn-base"), out_dir.join("turn-test"));
        for f in [&fifos.0, &fifos.1] {
            let _ = fs::remove_file(f);
            let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes())?;
            // SAFETY: a valid C string.
            anyhow::ensure!(
                unsafe { libc::mkfifo(c.as_ptr(), 0o600) } == 0,
                "mkfifo {}: {}",
                f.display(),
                std::io::Error::last_os_error()
            );
        }
        let mut env = Env {
            srv: format!("rbench-srv-{pid}"),
            cli: format!("rbench-cli-{pid}"),
            cgroup,
            base_ns: (format!("rbench-bsrv-{pid}"), format!("rbench-bcli-{pid}")),
            base_cgroup,
            fifos,
            bench_agent,
            redirect,
            out_dir,
            placement,
            nice,
            servers: Vec::new(),
        };
        for world in [World::Test, World::Base] {
            env.create_namespaces(world)?;
            env.start_servers(world)?;
        }
        Ok(env)
    }

    /// Exchanges the roles of the two worlds: the base world becomes the
    /// test world and the other way round. The bench does it every round,
    /// so that state a path leaves behind in the test world (TIME_WAIT
    /// sockets, say; the first full runs showed the test world slower than
    /// the base world after a few visits) weighs on both sides of the
    /// ratios alike instead of on one.
    pub fn swap_worlds(&mut self) {
        std::mem::swap(&mut self.srv, &mut self.base_ns.0);
        std::mem::swap(&mut self.cli, &mut self.base_ns.1);
        std::mem::swap(&mut self.cgroup, &mut self.base_cgroup);
    }

    /// Destroys every TIME_WAIT socket in both worlds' namespaces
    /// (`ss -K`, sock_diag's SOCK_DESTROY), so that each visit starts with
    /// none, whatever the path before it did.
    ///
    /// Why: a path leaves tens of thousands of them on the server side
    /// (the server closes first), and a later connection that reuses one's
    /// ports is refused by it when its initial sequence number is older,
    /// which happens when the two were dialled differently: a client
    /// behind iptables REDIRECT computed its ISN for port 443, one dialling
    /// 8443 (direct, or redirect's connect-time rewrite) for 8443. The
    /// SYN is then retransmitted after 1 s: measured, the direct
    /// connection rate fell to 2,000/s after the iptables path and took
    /// ~6 s to recover, the A/A control's 17 % band (and iptables' own
    /// 0.12×, after the other paths) came from that.
    pub fn forget_time_wait(&self) {
        for ns in [&self.srv, &self.cli, &self.base_ns.0, &self.base_ns.1] {
            let _ = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    "ss",
                    "-K",
                    "-tan",
                    "state",
                    "time-wait",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// The (server, client) namespaces of `world`.
    fn ns(&self, world: World) -> (&str, &str) {
        match world {
            World::Test => (&self.srv, &self.cli),
            World::Base => (&self.base_ns.0, &self.base_ns.1),
        }
    }

    fn create_namespaces(&self, world: World) -> anyhow::Result<()> {
        let (srv, cli) = self.ns(world);
        run(&["ip", "netns", "add", srv])?;
        run(&["ip", "netns", "add", cli])?;
        run(&[
            "ip", "link", "add", "veth-srv", "netns", srv, "type", "veth", "peer", "name",
            "veth-cli", "netns", cli,
        ])?;
        for (ns, dev, addr) in [(srv, "veth-srv", SRV_ADDR), (cli, "veth-cli", CLI_ADDR)] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            // Namespaced sysctls: plenty of ephemeral ports, and TIME_WAIT
            // reuse, so a bounded connection-rate loop never runs dry.
            for sysctl in [
                "net.ipv4.ip_local_port_range=10240 65000",
                "net.ipv4.tcp_tw_reuse=1",
            ] {
                run(&["ip", "netns", "exec", ns, "sysctl", "-qw", sysctl])?;
            }
        }
        Ok(())
    }

    fn start_servers(&mut self, world: World) -> anyhow::Result<()> {
        let agent = self.bench_agent.display().to_string();
        let echo = format!("0.0.0.0:{}", ECHO.1);
        let udp = format!("0.0.0.0:{}", UDP.1);
        let iperf = IPERF.1.to_string();
        let cpu = cpu_args(self.placement.server);
        let cpu: Vec<&str> = cpu.iter().map(String::as_str).collect();
        let mut tcp = vec![agent.as_str(), "serve-tcp", &echo];
        tcp.extend(&cpu);
        let mut udp_args = vec![agent.as_str(), "serve-udp", &udp];
        udp_args.extend(&cpu);
        for args in [tcp, udp_args, vec!["iperf3", "-s", "-p", &iperf]] {
            // In the clients' cgroup: the scope of the redirect paths, so
            // that inbound steering finds these listeners and registers them.
            let child = self
                .command_in(world, Side::Local, true, &args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {args:?}"))?;
            self.servers.push(child);
        }
        // Wait until both TCP servers accept, directly.
        for port in [ECHO.1, IPERF.1] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.tcp_ready(world, port) {
                anyhow::ensure!(Instant::now() < deadline, "server on :{port} did not start");
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn tcp_ready(&self, world: World, port: u16) -> bool {
        self.command_in(
            world,
            Side::Local,
            false,
            &["bash", "-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")],
        )
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    }

    /// A command run in `side`'s namespace of the test world, inside its
    /// cgroup when `in_cgroup`.
    pub fn command(&self, side: Side, in_cgroup: bool, args: &[&str]) -> Command {
        self.command_in(World::Test, side, in_cgroup, args)
    }

    /// A command run in `side`'s namespace of `world`, inside its cgroup
    /// when `in_cgroup`.
    pub fn command_in(&self, world: World, side: Side, in_cgroup: bool, args: &[&str]) -> Command {
        let (srv, cli) = self.ns(world);
        let ns = match side {
            Side::Local => srv,
            Side::Remote => cli,
        };
        let cgroup = match world {
            World::Test => &self.cgroup,
            World::Base => &self.base_cgroup,
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null());
        prioritize(&mut cmd, self.nice);
        if in_cgroup {
            let procs = Arc::new(
                fs::OpenOptions::new()
                    .write(true)
                    .open(cgroup.join("cgroup.procs"))
                    .expect("open bench cgroup.procs"),
            );
            // SAFETY: only write(2) runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd
    }

    /// A command run in the host's namespaces, for what only touches the
    /// cgroup (`redirect run`, the mapping helpers): `ip netns exec`
    /// remounts /sys, which hides the cgroup v2 mount.
    pub fn host_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]).stdin(Stdio::null());
        prioritize(&mut cmd, self.nice);
        cmd
    }

    /// Runs a command in the server namespace (iptables rules and such).
    pub fn in_srv(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["ip", "netns", "exec", &self.srv];
        all.extend_from_slice(args);
        run(&all)
    }

    /// A client command on `side`: local clients run in the bench's
    /// cgroup (the scope of the redirect paths); inbound clients stand for
    /// other hosts, so they run outside it and no cgroup program sees
    /// their connects.
    pub fn client_command(&self, side: Side, args: &[&str]) -> Command {
        self.client_command_in(World::Test, side, args)
    }

    /// [`Env::client_command`] in `world`.
    pub fn client_command_in(&self, world: World, side: Side, args: &[&str]) -> Command {
        self.command_in(world, side, side == Side::Local, args)
    }

    /// Runs a bench-agent client and returns its `key=value` output line.
    pub fn client(&self, side: Side, args: &[&str]) -> anyhow::Result<String> {
        let agent = self.bench_agent.display().to_string();
        let mut all = vec![agent.as_str()];
        all.extend_from_slice(args);
        output(self.client_command(side, &all))
    }

    /// The server namespace's bind-mounted file (for sk_lookup queries).
    pub fn srv_netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.srv))
    }

    /// Writes a file under the output directory and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let path = self.out_dir.join(name);
        fs::File::create(&path)?.write_all(contents.as_bytes())?;
        Ok(path)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.srv, &self.cli, &self.base_ns.0, &self.base_ns.1] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        remove_cgroup(&self.cgroup);
        remove_cgroup(&self.base_cgroup);
        for f in [&self.fifos.0, &self.fifos.1] {
            let _ = fs::remove_file(f);
        }
    }
}

/// Starts `cmd` in a session of its own, which is also the leader of its
/// own process group (so that `Process` can stop it with its children),
/// killed if the bench dies (`PR_SET_PDEATHSIG`), and at `nice`.
///
/// Why a session: with `kernel.sched_autogroup_enabled` (the default),
/// the scheduler shares the CPU between sessions first and applies nice
/// values only within a session, so a plain nice does nothing against the
/// compile jobs of other sessions. Each process gets its own autogroup,
/// whose nice is set through `/proc/self/autogroup`. Without autogroups the
/// plain nice (also set) applies.
fn prioritize(cmd: &mut Command, nice: i32) {
    let value = format!("{nice}\n");
    // SAFETY: only async-signal-safe syscalls run between fork and exec,
    // on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if nice != 0 {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                let fd = libc::open(
                    c"/proc/self/autogroup".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if fd >= 0 {
                    libc::write(fd, value.as_ptr().cast(), value.len());
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
}

/// Kills what is left in `path` (our clients only) and removes it.
pub fn remove_cgroup(path: &Path) {
    for _ in 0..100 {
        if fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        let _ = fs::write(path.join("cgroup.kill"), "1");
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("xtask: could not remove {}", path.display());
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 mount found in /proc/self/mountinfo")
}

/// Runs a command, failing with its stderr if it does not succeed.
pub fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `cmd` to completion and returns its stdout, failing with its stderr.
pub fn output(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The address a client on `side` dials for `port` on the server.
pub fn addr(side: Side, port: u16) -> SocketAddr {
    let ip = match side {
        Side::Local => "127.0.0.1",
        Side::Remote => SRV_ADDR,
    };
    format!("{ip}:{port}").parse().expect("address")
}
