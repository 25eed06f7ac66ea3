//! The `redirect` command: a thin CLI over the `redirect` library.
//!
//! Exit codes: 0 on success (for `exec`, the command's own status), 2 for bad
//! input (nothing is attached), 1 for an environment problem (privileges,
//! kernel, cgroup), 126/127 when `exec` cannot start its command.

// Without the eBPF backend (macOS, Windows, `--no-default-features`), only
// `run` (as the proxy) and `doctor` exist; the items marked
// `cfg(with_ebpf)` below are the eBPF backend's.
#![cfg_attr(not(with_ebpf), allow(dead_code))]

use std::{ffi::OsString, path::PathBuf, process::ExitCode};
#[cfg(with_ebpf)]
use std::{
    io::{self, Write as _},
    os::fd::AsRawFd as _,
};

use crate::cmd::proxy::BackendArgs;
#[cfg(with_ebpf)]
use anyhow::Context as _;
use clap::{ArgAction, Args, Parser, Subcommand};
use redirect::{MappingError, MappingSet, mapping::parse_grant};
#[cfg(with_ebpf)]
use redirect::{
    Options, PortOwner, Redirector,
    cgroup::{cgroup2_root, create_exec_cgroup, own_cgroup},
    ebpf::{Logger, check_privileges},
    status::{self, InstanceStatus, Report, ServiceLimits, StatusService},
    user::User,
};
#[cfg(with_ebpf)]
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::UnixStream,
    signal::unix::{Signal, SignalKind, signal},
};

mod cmd;

const EXAMPLES: &str = "\
Examples:
  # Clients on this host that connect to port 443 reach the server on 8443:
  sudo redirect run --map 443:8443

  # Several mappings, only for processes of one cgroup (a service, a container):
  sudo redirect run --map 443:8443 --map 80:8080 --cgroup /sys/fs/cgroup/unified/my.service

  # Only this command and its children are redirected:
  sudo redirect exec --map 443:8443 -- curl -s http://127.0.0.1:443/

  # DNS on an unprivileged port, for UDP only, and only to 127.0.0.1:
  sudo redirect run --map 127.0.0.1:53:5353/udp

  # authbind without authbind: nobody binds port 443 directly, no capability:
  sudo redirect exec --grant 443 --user nobody -- python3 -m http.server 443

  # What every live redirector is doing (no privileges needed):
  redirect status --json

Requirements: Linux >= 5.9 with cgroup v2, and root or CAP_BPF + CAP_NET_ADMIN.
Nothing outlives the process: the programs are detached when it exits.";

/// Sends connections aimed at one port to another, transparently, with eBPF.
///
/// A connect() to port FROM made by a process in the scope reaches port TO
/// instead; the rewrite happens once, at connect time, and the client's
/// getpeername() still reports FROM.
#[derive(Parser, Debug)]
#[command(name = "redirect", version, after_help = EXAMPLES)]
struct Cli {
    /// Log more: -v shows every rewrite made by the eBPF programs.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Redirect for a cgroup until SIGINT or SIGTERM, then detach.
    ///
    /// Prints one line starting with `ready` once the redirect is live.
    #[command(after_help = EXAMPLES)]
    Run(RunArgs),
    /// Run a command in a fresh cgroup with redirection, then clean up.
    ///
    /// Only CMD and its children are affected. Exits with CMD's status; once
    /// CMD exits, whatever it left running in the cgroup is killed and the
    /// cgroup removed.
    #[command(after_help = EXAMPLES)]
    #[cfg(with_ebpf)]
    Exec(ExecArgs),
    /// Check what works on this host (kernel, capabilities, every eBPF
    /// hook tried for real, ports) and say what to do about the rest.
    ///
    /// Exits 0 only when the chosen backend can run.
    Doctor(cmd::doctor::DoctorArgs),
    /// Show every live redirector on this host: the daemon's scopes (or,
    /// with no daemon, what is pinned), and each `run`/`exec` instance.
    #[cfg(with_ebpf)]
    Status(StatusArgs),
    /// Run the node daemon: keep the scopes of a config file attached, with
    /// pinned state that outlives restarts and upgrades.
    #[cfg(with_ebpf)]
    Daemon(cmd::daemon::DaemonArgs),
    /// Add a mapping to a scope of the running daemon (lost on reload
    /// unless written to the config file).
    #[cfg(with_ebpf)]
    Add(cmd::daemon::EditArgs),
    /// Remove a mapping from a scope of the running daemon.
    #[cfg(with_ebpf)]
    Remove(cmd::daemon::EditArgs),
    /// Make the running daemon re-read its config file and apply the
    /// difference (as SIGHUP does).
    #[cfg(with_ebpf)]
    Reload(cmd::daemon::ControlArgs),
    /// Remove everything pinned under the daemon's pin directory (every
    /// scope it attached), leaving the host as it found it.
    #[cfg(with_ebpf)]
    Reset(cmd::daemon::ResetArgs),
    /// OCI runtime hook (createRuntime, poststop): asks the daemon for a
    /// scope per container annotated io.redirect.map (docs/CONTAINERS.md).
    #[cfg(with_ebpf)]
    OciHook(cmd::oci_hook::OciHookArgs),
}

#[cfg(with_ebpf)]
#[derive(Args, Debug)]
struct StatusArgs {
    /// Print one JSON object with `mappings` and `instances` arrays (and
    /// `daemon` when a daemon answers or state is pinned).
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    control: cmd::daemon::ControlArgs,

    /// Where to look for pinned state when no daemon answers.
    #[arg(long, value_name = "DIR", default_value = redirect::ebpf::pin::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Args, Debug)]
struct MapArgs {
    /// Redirect connections to port FROM to port TO (repeatable). Optional
    /// scopes: a protocol (`443:8443/tcp`, `53:5353/udp`; default both) and
    /// a destination address (`127.0.0.1:443:8443`, `[::1]:443:8443`;
    /// default any).
    #[arg(long = "map", value_name = "[ADDR:]FROM:TO[/tcp|/udp]")]
    maps: Vec<String>,

    /// Let the scope's processes bind PORT (1-1023) without
    /// CAP_NET_BIND_SERVICE, like authbind (repeatable; Linux >= 5.12).
    #[arg(long = "grant", value_name = "PORT")]
    grants: Vec<String>,

    /// Attach even when another redirect instance's programs are on the
    /// cgroup, a parent or child of it, or the steered namespace (refused
    /// otherwise, exit code 2): connections in both scopes may then be
    /// rewritten twice. `redirect status` shows the stacking.
    #[arg(long)]
    allow_stacking: bool,
}

impl MapArgs {
    /// The validated mappings and granted ports; bad input is an error
    /// before anything is attached.
    fn validated(&self) -> Result<(MappingSet, Vec<u16>), MappingError> {
        let mappings = if self.maps.is_empty() {
            MappingSet::default()
        } else {
            MappingSet::parse(&self.maps)?
        };
        let grants = self
            .grants
            .iter()
            .map(|g| parse_grant(g))
            .collect::<Result<Vec<u16>, _>>()?;
        Ok((mappings, grants))
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    map: MapArgs,

    /// The cgroup v2 directory whose processes are redirected [default: the
    /// root of the cgroup v2 hierarchy, i.e. the whole host].
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,

    /// Also steer inbound TCP connections for FROM, arriving in this network
    /// namespace (`/proc/PID/ns/net`, `/run/netns/NAME`), to the listener
    /// that a process of the scope has on TO [default: this process's own
    /// namespace when --cgroup is not given; none with --cgroup].
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,

    /// Reserve the TO ports for OWNER (a user name, a uid, or a cgroup v2
    /// directory): within the scope only it may bind them, others get
    /// EACCES, and only its listeners are registered for inbound steering.
    /// Refused (exit code 2) when another process already holds a TO port
    /// in a namespace the scope serves, naming it, or when a TO port is
    /// inside that namespace's ip_local_port_range.
    #[arg(long, value_name = "OWNER")]
    owner: Option<String>,

    /// With --owner, start even when a process that is not the owner
    /// already holds a TO port (listening or bound), or a TO port is inside
    /// ip_local_port_range (any process's autobind may take it): such a
    /// process keeps the port and receives the connections redirected to
    /// it. The ready line and `redirect status` name it.
    #[arg(long, requires = "owner")]
    allow_held_target: bool,

    /// With --owner, keep the TO ports for the owner against processes
    /// outside the scope too: guard programs on DIR (a cgroup v2 directory
    /// holding them; the root for the whole host) refuse anyone else's
    /// bind of TO with EACCES, in the namespace served (--netns, else this
    /// one). Other namespaces are not affected.
    #[arg(long, value_name = "DIR", requires = "owner")]
    guard_cgroup: Option<PathBuf>,

    #[command(flatten)]
    backend: BackendArgs,
}

#[derive(Args, Debug)]
struct ExecArgs {
    #[command(flatten)]
    map: MapArgs,

    /// Run CMD as this user (name or uid) instead of root.
    #[arg(long, value_name = "USER")]
    user: Option<String>,

    /// The command to run, and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    // The release binary is static-pie (`cargo xtask build`): user names
    // come from /etc/passwd and /etc/group only (see `use_files_only`).
    #[cfg(all(target_os = "linux", target_env = "gnu", target_feature = "crt-static"))]
    redirect::user::use_files_only();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // The hook runs on every container start: no runtime to build.
    #[cfg(with_ebpf)]
    if let Command::OciHook(args) = &cli.command {
        return cmd::oci_hook::run(args);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("redirect: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(with_ebpf)]
    let options = Options {
        ebpf_debug_log: cli.verbose > 0,
        ..Options::default()
    };
    let result = runtime.block_on(async {
        match cli.command {
            #[cfg(with_ebpf)]
            Command::Run(args) => run(args, &options).await,
            #[cfg(not(with_ebpf))]
            Command::Run(args) => run_without_ebpf(args).await,
            #[cfg(with_ebpf)]
            Command::Exec(args) => exec(args, &options).await,
            #[cfg(with_ebpf)]
            Command::Status(args) => show_status(&args),
            #[cfg(with_ebpf)]
            Command::Daemon(args) => cmd::daemon::daemon(args).await,
            #[cfg(with_ebpf)]
            Command::Add(a) => cmd::daemon::request(
                &a.control.control,
                redirect::control::Request::Add {
                    scope: a.scope,
                    mapping: a.mapping,
                },
            ),
            #[cfg(with_ebpf)]
            Command::Remove(a) => cmd::daemon::request(
                &a.control.control,
                redirect::control::Request::Remove {
                    scope: a.scope,
                    mapping: a.mapping,
                },
            ),
            #[cfg(with_ebpf)]
            Command::Reload(a) => {
                cmd::daemon::request(&a.control, redirect::control::Request::Reload)
            }
            #[cfg(with_ebpf)]
            Command::Reset(a) => cmd::daemon::reset(a),
            Command::Doctor(args) => cmd::doctor::run(&args),
            #[cfg(with_ebpf)]
            Command::OciHook(_) => unreachable!("run before the runtime is built"),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("redirect: error: {}", render(&e));
            if is_bad_input(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes, each said once: many library errors already
/// quote their source in their own message.
fn render(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn is_bad_input(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<redirect::Error>()
            .is_some_and(redirect::Error::is_bad_input)
            || c.downcast_ref::<MappingError>().is_some()
            || daemon_bad_input(c)
    })
}

#[cfg(with_ebpf)]
fn daemon_bad_input(c: &(dyn std::error::Error + 'static)) -> bool {
    c.downcast_ref::<redirect::daemon::DaemonError>()
        .is_some_and(redirect::daemon::DaemonError::is_bad_input)
        || c.downcast_ref::<redirect::daemon::config::ConfigError>()
            .is_some()
}

#[cfg(not(with_ebpf))]
fn daemon_bad_input(_: &(dyn std::error::Error + 'static)) -> bool {
    false
}

/// Quiet by default (warnings and errors); `-v` adds redirect's debug log,
/// eBPF events included; `-vv` everything. `RUST_LOG` overrides.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "warn,redirect=debug",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .init();
}

/// `run` in a build without the eBPF backend: the proxy, or an error
/// saying that eBPF is not in this build.
#[cfg(not(with_ebpf))]
async fn run_without_ebpf(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (mappings, grants) = args.map.validated()?;
    if mappings.is_empty() {
        return Err(MappingError::Empty.into());
    }
    let scoped =
        args.cgroup.is_some() || args.owner.is_some() || args.netns.is_some() || !grants.is_empty();
    cmd::proxy::run_without_ebpf(&mappings, &args.backend, scoped).await
}

#[cfg(with_ebpf)]
/// `--owner`: a cgroup directory (an absolute path), else a user or uid.
fn parse_owner(text: &str) -> Result<PortOwner, MappingError> {
    PortOwner::parse(text)
}

#[cfg(with_ebpf)]
/// Attaches to `cgroup` with `mappings`, then grants `grants`.
fn attach(
    cgroup: &std::path::Path,
    mappings: MappingSet,
    grants: &[u16],
    options: &Options,
) -> anyhow::Result<Redirector> {
    let mut redirector = Redirector::attach(cgroup, mappings, options)?;
    for port in grants {
        redirector.grant(*port)?;
    }
    Ok(redirector)
}

#[cfg(with_ebpf)]
async fn run(args: RunArgs, options: &Options) -> anyhow::Result<ExitCode> {
    let (mappings, grants) = args.map.validated()?;
    if mappings.is_empty() && grants.is_empty() {
        return Err(MappingError::Empty.into());
    }
    if !grants.is_empty() && args.cgroup.is_none() {
        return Err(MappingError::GrantWithoutScope.into());
    }
    let owner = args.owner.as_deref().map(parse_owner).transpose()?;
    if let Some(path) = &args.netns {
        redirect::netns::open(path)?;
    }
    let scoped = args.cgroup.is_some() || owner.is_some() || !grants.is_empty();
    if let Some(why) = cmd::proxy::chosen(&args.backend, scoped) {
        return cmd::proxy::run(&mappings, &args.backend, why).await;
    }
    // Handlers first: a signal during attach is then handled like one after.
    let mut shutdown = Shutdown::new()?;
    let cgroup = match check_privileges().and_then(|()| match &args.cgroup {
        Some(dir) => Ok(dir.clone()),
        None => cgroup2_root(),
    }) {
        Ok(cgroup) => cgroup,
        Err(e) => return cmd::proxy::fall_back(&mappings, &args.backend, scoped, e.into()).await,
    };
    clean_stale_exec_cgroups();
    // Inbound steering is per network namespace, not per cgroup: a
    // cgroup-scoped run steers only a namespace it is given.
    let netns = match (&args.netns, &args.cgroup) {
        (Some(path), _) => Some(path.clone()),
        (None, None) => Some(PathBuf::from("/proc/self/ns/net")),
        (None, Some(_)) => None,
    };
    let options = Options {
        netns,
        owner,
        allow_stacking: args.map.allow_stacking,
        allow_held_target: args.allow_held_target,
        guard_cgroup: args.guard_cgroup.clone(),
        ..options.clone()
    };
    let mut redirector = match attach(&cgroup, mappings.clone(), &grants, &options) {
        Ok(redirector) => redirector,
        // Bad input (stacking, a held target) is said as it is: the proxy
        // would not fix it.
        Err(e) if is_bad_input(&e) => return Err(e),
        Err(e) => return cmd::proxy::fall_back(&mappings, &args.backend, scoped, e).await,
    };
    let status = StatusServer::start("run");
    ready(&redirector, cmd::proxy::ebpf_why(&args.backend))?;
    let logging = pump_logger(redirector.take_logger());
    tokio::pin!(logging);
    loop {
        tokio::select! {
            signal = shutdown.recv() => {
                log::info!("{signal}: detaching");
                break;
            }
            res = &mut logging => res?,
            conn = status.accept() => status.serve(conn, &redirector),
        }
    }
    drop(status);
    drop(redirector);
    Ok(ExitCode::SUCCESS)
}

#[cfg(with_ebpf)]
async fn exec(args: ExecArgs, options: &Options) -> anyhow::Result<ExitCode> {
    // An exec with neither is allowed: CMD still runs in a scope of its
    // own (and as --user), which is how "without --grant" is compared.
    let (mappings, grants) = args.map.validated()?;
    let user = args.user.as_deref().map(User::lookup).transpose()?;
    let mut shutdown = Shutdown::new()?;
    check_privileges()?;
    clean_stale_exec_cgroups();
    let root = cgroup2_root()?;
    let parent = own_cgroup(&root)?;
    let scope = create_exec_cgroup(&parent)?;
    let options = Options {
        allow_stacking: args.map.allow_stacking,
        ..options.clone()
    };
    let mut redirector = attach(scope.path(), mappings, &grants, &options)?;
    log::debug!("{}", describe(&redirector));

    let procs = scope.procs_writer()?;
    let procs_fd = procs.as_raw_fd();
    let mut cmd = tokio::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    if let Some(user) = &user {
        cmd.env("USER", &user.name)
            .env("LOGNAME", &user.name)
            .env("HOME", &user.home);
    }
    // We fork from this thread (the runtime is current-thread), and the
    // parent-death signal follows the thread that forked.
    let parent_pid = rustix::process::getpid();
    // SAFETY: the closure only makes async-signal-safe syscalls (write,
    // setgroups, setgid, setuid, prctl, getppid) and allocates nothing.
    // Writing "0" to cgroup.procs moves the calling process (the forked
    // child, before exec) into the scope, so CMD never runs outside it;
    // then it drops to --user; then it asks for SIGKILL when we die (after
    // the uid change, which clears that setting), so a SIGKILLed exec never
    // leaves CMD running unredirected. If we died before that, getppid
    // tells, and CMD is not started at all.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if let Some(user) = &user {
                user.become_user()?;
            }
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if rustix::process::getppid() != Some(parent_pid) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let name = args.command[0].to_string_lossy();
            eprintln!("redirect: error: cannot run {name}: {e}");
            drop(redirector);
            scope.remove()?;
            return Ok(ExitCode::from(spawn_failure_code(&e)));
        }
    };
    drop(procs);

    let status_server = StatusServer::start("exec");
    let pid = child.id();
    let logging = pump_logger(redirector.take_logger());
    tokio::pin!(logging);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.context("waiting for the command")?,
            signal = shutdown.recv() => forward(signal, pid),
            res = &mut logging => res?,
            conn = status_server.accept() => status_server.serve(conn, &redirector),
        }
    };
    drop(status_server);
    drop(redirector);
    scope.remove()?;
    Ok(exit_code(status))
}

#[cfg(with_ebpf)]
/// Removes the cgroups that SIGKILLed `redirect exec`s left behind (when
/// root), and says so.
fn clean_stale_exec_cgroups() {
    for path in redirect::cgroup::remove_stale_exec_cgroups() {
        log::warn!(
            "removed {}, left by a `redirect exec` that was killed",
            path.display()
        );
    }
}

#[cfg(with_ebpf)]
/// `redirect status`: asks every live instance, prints a table or JSON.
fn show_status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    clean_stale_exec_cgroups();
    let report = Report::new(status::collect()?);
    let daemon = cmd::daemon::daemon_status(&args.control.control)
        .or_else(|| redirect::ebpf::pin::pinned_status(&args.pin_dir));
    // Buffered: a report of thousands of mappings is tens of thousands of
    // lines, one write(2) each through the line-buffered stdout.
    let mut out = io::BufWriter::new(io::stdout().lock());
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(d) = &daemon {
            value["daemon"] = d.clone();
        }
        serde_json::to_writer_pretty(&mut out, &value)?;
        writeln!(out)?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(d) = &daemon {
        cmd::daemon::print_daemon(&mut out, d)?;
    }
    if report.instances.is_empty() && daemon.is_none() {
        writeln!(out, "no redirect instance is running")?;
    }
    for i in &report.instances {
        print_instance(&mut out, i)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(with_ebpf)]
fn print_instance(out: &mut impl io::Write, i: &InstanceStatus) -> io::Result<()> {
    let gone = if i.scope_gone {
        " (the cgroup is gone: nothing is redirected; stop this instance)"
    } else {
        ""
    };
    writeln!(
        out,
        "redirect {} (pid {}) for cgroup {}{gone}",
        i.kind,
        i.pid,
        i.scope.display()
    )?;
    writeln!(
        out,
        "  {:<32} {:>5} {:>11} {:>12} {:>10}",
        "MAPPING", "PROTO", "CONNECTS", "ESTABLISHED", "DATAGRAMS"
    )?;
    for m in &i.mappings {
        writeln!(
            out,
            "  {:<32} {:>5} {:>11} {:>12} {:>10}",
            m.mapping, m.proto, m.connects, m.established, m.datagrams
        )?;
    }
    for other in &i.stacked_with {
        writeln!(out, "  STACKED with {other} (--allow-stacking)")?;
    }
    for held in &i.held_targets {
        writeln!(
            out,
            "  TARGET HELD: {held}, not the owner (--allow-held-target)"
        )?;
    }
    if !i.grants.is_empty() {
        let ports: Vec<String> = i.grants.iter().map(u16::to_string).collect();
        writeln!(out, "  granted ports: {}", ports.join(", "))?;
    }
    let programs: Vec<String> = i
        .programs
        .iter()
        .map(|p| {
            let state = if p.attached { "" } else { ", NOT attached" };
            format!("{} (id {}{state})", p.name, p.id)
        })
        .collect();
    writeln!(out, "  programs: {}", programs.join(", "))?;
    let counters: Vec<String> = i
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    writeln!(out, "  counters: {}", counters.join(" "))
}

#[cfg(with_ebpf)]
/// Serves this instance's status socket, if it could be bound (it needs
/// write access to /run; without it `status` cannot see this instance,
/// which is worth a warning, not a failure). Bounded whatever clients do:
/// see [`StatusService`].
struct StatusServer {
    service: Option<StatusService>,
    kind: &'static str,
    started_unix: u64,
}

#[cfg(with_ebpf)]
impl StatusServer {
    fn start(kind: &'static str) -> Self {
        let started_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let service = match StatusService::bind(ServiceLimits::default()) {
            Ok(service) => Some(service),
            Err(e) => {
                log::warn!("`redirect status` will not see this instance: {e}");
                None
            }
        };
        StatusServer {
            service,
            kind,
            started_unix,
        }
    }

    /// The next status request; never resolves without a socket.
    async fn accept(&self) -> UnixStream {
        match &self.service {
            Some(s) => s.accept().await,
            None => std::future::pending().await,
        }
    }

    /// Answers one request with the shared JSON snapshot, without blocking
    /// the loop.
    fn serve(&self, stream: UnixStream, redirector: &Redirector) {
        if let Some(service) = &self.service {
            service.serve(stream, || {
                redirector
                    .status(self.kind, self.started_unix)
                    .map_err(anyhow::Error::from)
                    .and_then(|s| Ok(serde_json::to_vec(&s)?))
                    .map_err(|e| format!("{e:#}"))
            });
        }
    }
}

#[cfg(with_ebpf)]
/// "redirecting 443->8443; granting port 80 for cgroup …".
fn describe(redirector: &Redirector) -> String {
    let mut what = Vec::new();
    if !redirector.mappings().is_empty() {
        what.push(format!("redirecting {}", redirector.mappings()));
    }
    if !redirector.grants().is_empty() {
        let ports: Vec<String> = redirector.grants().iter().map(u16::to_string).collect();
        what.push(format!("granting port {}", ports.join(", ")));
    }
    format!(
        "{} for cgroup {}",
        what.join("; "),
        redirector.cgroup().display()
    )
}

#[cfg(with_ebpf)]
/// Prints the `ready` line, which scripts and tests wait for; `backend`
/// says which backend runs and why (empty for `exec`).
fn ready(redirector: &Redirector, backend: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    let mut held = String::new();
    for h in redirector.held_targets() {
        held.push_str(&format!(
            "; TARGET HELD: {h}, not the owner (--allow-held-target)"
        ));
    }
    writeln!(out, "ready: {}{backend}{held}", describe(redirector))?;
    out.flush()?;
    Ok(())
}

#[cfg(with_ebpf)]
/// Forwards `signal` to the command; SIGINT is left alone because the
/// terminal already sent it to the whole foreground process group.
fn forward(signal: &'static str, pid: Option<u32>) {
    let signo = match signal {
        "SIGTERM" => libc::SIGTERM,
        "SIGHUP" => libc::SIGHUP,
        _ => return,
    };
    if let Some(pid) = pid {
        // SAFETY: plain syscall; the pid is our own child, not yet reaped.
        unsafe { libc::kill(pid as libc::pid_t, signo) };
    }
}

#[cfg(with_ebpf)]
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        _ => ExitCode::FAILURE,
    }
}

#[cfg(with_ebpf)]
/// The shell's conventions: 127 for a command not found, 126 otherwise.
fn spawn_failure_code(e: &io::Error) -> u8 {
    if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

#[cfg(with_ebpf)]
/// The signals that end `run` (and that `exec` forwards).
struct Shutdown {
    int: Signal,
    term: Signal,
    hup: Signal,
}

#[cfg(with_ebpf)]
impl Shutdown {
    fn new() -> anyhow::Result<Self> {
        let install = |kind| signal(kind).context("installing a signal handler");
        Ok(Shutdown {
            int: install(SignalKind::interrupt())?,
            term: install(SignalKind::terminate())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

#[cfg(with_ebpf)]
/// Forwards eBPF log records to `log` for as long as the program runs;
/// never returns without a logger.
async fn pump_logger(logger: Option<Logger>) -> anyhow::Result<()> {
    let Some(logger) = logger else {
        return std::future::pending().await;
    };
    // SAFETY: the logger owns its ring buffer fd, which stays open and the
    // same for as long as the logger (now owned by the AsyncFd) lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("polling the eBPF log ring buffer")?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
