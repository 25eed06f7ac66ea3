//! A toy container runtime that gives each container its own privileged
//! ports with the `redirect` library: the few lines a real runtime adds.
//!
//! Each "container" is a child cgroup and a network namespace that the
//! runtime creates, with an init process inside both. On **create** the
//! runtime attaches a scope (the container's cgroup and namespace, with the
//! container's own mappings) *before* the container's program starts, as an
//! OCI `createRuntime` hook would; on **delete** it drops the scope, which
//! detaches everything, then removes the cgroup. The programs are loaded
//! once for all containers.
//!
//! Two containers map the same port differently (443 → 8443 and
//! 443 → 9443); each one's client reaches its own server.
//!
//! ```console
//! $ cargo build --example container_runtime && sudo target/debug/examples/container_runtime
//! create web-a: 443:8443 (cgroup …/redirect-example-…-web-a, netns /proc/…/ns/net)
//! create web-b: 443:9443 (…)
//! web-a: connect 127.0.0.1:443 -> "hello from web-a on 8443"
//! web-b: connect 127.0.0.1:443 -> "hello from web-b on 9443"
//! delete web-a
//! delete web-b
//! ```
//!
//! Needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and cgroup v2.
//! The same binary, re-executed with `--in-container`, plays the
//! container's programs (a server, a client), so the example needs nothing
//! else installed.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
};

use redirect::{
    LoadOptions, MappingSet, Programs, Scope,
    cgroup::{ChildCgroup, cgroup2_root, own_cgroup},
};

/// A running container: its cgroup, its init process (which holds the
/// network namespace), and the redirect scope serving it.
struct Container {
    name: String,
    scope: Scope,
    init: Child,
    cgroup: ChildCgroup,
}

/// The runtime: one loaded program set, shared by every container.
struct Runtime {
    programs: Programs,
    parent: PathBuf,
}

impl Runtime {
    fn new() -> anyhow::Result<Self> {
        // Load once (the object, the verifier): every container after the
        // first costs only links and map writes.
        let programs = Programs::load(&LoadOptions::default())?;
        let parent = own_cgroup(&cgroup2_root()?)?;
        Ok(Runtime { programs, parent })
    }

    /// Creates a container whose program serves on `port`, with `maps`.
    fn create(&self, name: &str, maps: &[&str], port: u16) -> anyhow::Result<Container> {
        // 1. The container's cgroup and its init process, which enters the
        //    cgroup and a new network namespace before it execs, then waits.
        let cgroup = ChildCgroup::create(
            &self.parent,
            &format!("redirect-example-{}-{name}", std::process::id()),
        )?;
        let mut init = container_command(&cgroup, None)?
            .args(["--in-container", "serve", name, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let netns = PathBuf::from(format!("/proc/{}/ns/net", init.id()));

        // 2. What a createRuntime hook does: the scope, before the
        //    container's program runs. Mappings are validated first: a bad
        //    one fails the container, never half-attaches it.
        let scope = self
            .programs
            .scope(cgroup.path())
            .name(name)
            .netns(&netns)
            .mappings(MappingSet::parse(maps)?)
            .attach()?;
        println!(
            "create {name}: {} (cgroup {}, netns {})",
            maps.join(","),
            cgroup.path().display(),
            netns.display()
        );

        // 3. Start the container's program and wait until it serves.
        start(&mut init)?;
        Ok(Container {
            name: name.to_owned(),
            scope,
            init,
            cgroup,
        })
    }

    /// Deletes a container: detaches its scope, stops it, removes its
    /// cgroup (and with its last process, its network namespace).
    fn delete(&self, mut c: Container) -> anyhow::Result<()> {
        c.scope.detach()?;
        let _ = c.init.kill();
        let _ = c.init.wait();
        c.cgroup.remove()?;
        println!("delete {}", c.name);
        Ok(())
    }
}

/// Tells the init process to start its program; waits for "ready".
fn start(init: &mut Child) -> anyhow::Result<()> {
    let stdin: &mut ChildStdin = init.stdin.as_mut().expect("piped");
    stdin.write_all(b"go\n")?;
    let mut line = String::new();
    BufReader::new(init.stdout.as_mut().expect("piped")).read_line(&mut line)?;
    anyhow::ensure!(
        line.trim() == "ready",
        "the container did not start: {line:?}"
    );
    Ok(())
}

/// This program, run inside `cgroup` and either a new network namespace
/// (`netns` None) or the one at `netns`, entered between fork and exec.
fn container_command(cgroup: &ChildCgroup, netns: Option<File>) -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    let procs = cgroup.procs_writer()?;
    // SAFETY: only async-signal-safe syscalls (write, unshare, setns) run
    // between fork and exec; the fds stay open in the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = match &netns {
                Some(ns) => libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET),
                None => libc::unshare(libc::CLONE_NEWNET),
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs a client inside container `c`: connects to 127.0.0.1:443.
fn fetch(c: &Container) -> anyhow::Result<String> {
    let netns = File::open(format!("/proc/{}/ns/net", c.init.id()))?;
    let out = container_command(&c.cgroup, Some(netns))?
        .args(["--in-container", "fetch", "443"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "client in {} failed: {}",
        c.name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// The container side: `serve NAME PORT` or `fetch PORT`.
fn in_container(args: &[String]) -> anyhow::Result<()> {
    match args {
        [cmd, name, port] if cmd == "serve" => {
            // Wait for the runtime's "go" (the scope is attached by then).
            let mut go = String::new();
            std::io::stdin().lock().read_line(&mut go)?;
            loopback_up()?;
            let listener = TcpListener::bind(("127.0.0.1", port.parse::<u16>()?))?;
            println!("ready");
            std::io::stdout().flush()?;
            for conn in listener.incoming() {
                let mut conn = conn?;
                write!(conn, "hello from {name} on {port}")?;
            }
            Ok(())
        }
        [cmd, port] if cmd == "fetch" => {
            let mut conn = TcpStream::connect(("127.0.0.1", port.parse::<u16>()?))?;
            let mut reply = String::new();
            conn.read_to_string(&mut reply)?;
            println!("{reply}");
            Ok(())
        }
        _ => anyhow::bail!("usage: --in-container serve NAME PORT | fetch PORT"),
    }
}

/// A new network namespace starts with `lo` down.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain ioctls on a socket we own, with a zeroed ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as libc::c_char;
        }
        let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 && {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) == 0
        };
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if ok { Ok(()) } else { Err(err) }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--in-container") {
        return in_container(&args[1..]);
    }
    let runtime = Runtime::new()?;
    let a = runtime.create("web-a", &["443:8443"], 8443)?;
    let b = runtime.create("web-b", &["443:9443"], 9443)?;
    for c in [&a, &b] {
        let reply = fetch(c)?;
        println!("{}: connect 127.0.0.1:443 -> {reply:?}", c.name);
        let want = format!("hello from {} on ", c.name);
        anyhow::ensure!(reply.starts_with(&want), "{} reached {reply:?}", c.name);
    }
    runtime.delete(a)?;
    runtime.delete(b)?;
    Ok(())
}
