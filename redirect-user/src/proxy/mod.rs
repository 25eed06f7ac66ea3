//! The fallback proxy: a tokio TCP and UDP forwarder for hosts where the
//! eBPF programs cannot run (macOS, Windows, a container without CAP_BPF,
//! an old kernel).
//!
//! It listens on FROM and opens a new connection to TO for every client,
//! at the address the client connected to (a mapping's address, or the
//! listener's local address for a wildcard listener), and copies bytes both
//! ways. Unlike the eBPF path it costs a copy through userspace and a second
//! connection, and the backend sees the proxy as its peer unless PROXY
//! protocol is on ([`ProxyProtocol`]).
//!
//! The library never binds ports from argv or installs signal handlers on
//! its own: [`tcp::run`] and [`udp::run`] take a bound socket and a
//! shutdown future (mini-redis's `server::run` shape), and [`Proxy`] binds
//! every listener of a [`MappingSet`] for the `redirect` command.
//!
//! # Layout
//!
//! - [`tcp`]: accept loop, connection limit, graceful drain, the copy
//!   with half-close, backpressure and idle timeout.
//! - [`udp`]: per-client sessions, replies sent from FROM, expiry.
//! - [`proxy_protocol`]: PROXY v1/v2 headers.
//! - `splice` (Linux): the zero-copy pump through a pipe.
//! - [`bind_hint`]: what to do when FROM cannot be bound, per OS.
//! - [`raise_open_files_limit`]: room for as many connections as the
//!   hard limit on open files allows.

mod limits;
pub mod proxy_protocol;
#[cfg(target_os = "linux")]
mod splice;
pub mod tcp;
pub mod udp;

pub use limits::raise_open_files_limit;

use std::{
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

pub use proxy_protocol::ProxyProtocol;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::{Semaphore, watch},
};

use crate::mapping::{Mapping, MappingSet, Proto};

/// Limits and timeouts of the proxy. The defaults suit a host-wide
/// forwarder; every field can be changed.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// How long to wait for TO to accept a connection before closing the
    /// client's.
    pub connect_timeout: Duration,
    /// Close a TCP connection after this long without a byte either way
    /// (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Connections beyond this many (per listener) are accepted and closed
    /// at once, so clients see a clean close instead of a hang.
    pub max_connections: usize,
    /// Bytes buffered per direction of a connection. A slow peer stops the
    /// reads from the other side (backpressure): memory per connection
    /// never exceeds twice this, and an idle connection holds none.
    pub buffer_size: usize,
    /// After shutdown is asked for, how long connections in flight may
    /// take to finish before they are closed.
    pub drain_timeout: Duration,
    /// Send a PROXY protocol header to TO first (TCP only).
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Forget a UDP client after this long without a datagram either way.
    pub udp_idle_timeout: Duration,
    /// At most this many UDP clients per listener; the one idle the
    /// longest is forgotten to make room for a new one.
    pub max_udp_sessions: usize,
    /// Copy bulk transfers with `splice(2)` through a pipe instead of
    /// through a buffer (Linux; ignored elsewhere).
    pub splice: bool,
    /// Threads that accept and serve TCP connections. With more than one
    /// (Linux), every TCP mapping gets one listener per thread on
    /// `SO_REUSEPORT`, and the kernel spreads new connections over them;
    /// the first runs on the caller's runtime, each other one on a thread
    /// with a single-threaded runtime of its own, so a connection never
    /// moves between threads. Elsewhere, and with 1, everything runs on
    /// the caller's runtime.
    pub workers: usize,
}

/// The default [`ProxyOptions::workers`]: one per CPU, at most 4.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            max_connections: 16_384,
            buffer_size: 64 * 1024,
            drain_timeout: Duration::from_secs(10),
            proxy_protocol: None,
            udp_idle_timeout: Duration::from_secs(60),
            max_udp_sessions: 4096,
            splice: false,
            workers: 1,
        }
    }
}

/// Where a listener forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Port TO at the address the client connected to (what the eBPF
    /// backend does: the address stays, the port changes).
    Port(u16),
    /// This exact address.
    Addr(SocketAddr),
}

impl Target {
    /// The backend address for a client that reached `local`.
    pub fn resolve(self, local: SocketAddr) -> SocketAddr {
        match self {
            Target::Port(port) => SocketAddr::new(canonical(local).ip(), port),
            Target::Addr(addr) => addr,
        }
    }
}

/// Counters shared by every listener of a proxy.
#[derive(Debug, Default)]
pub struct Stats {
    /// TCP connections accepted and forwarded.
    pub accepted: AtomicU64,
    /// TCP connections closed at once because of the connection limit.
    pub refused: AtomicU64,
    /// TCP connections open now.
    pub active: AtomicU64,
    /// Connections to TO that failed or timed out.
    pub connect_failed: AtomicU64,
    /// TCP connections closed by the idle timeout.
    pub idle_closed: AtomicU64,
    /// TCP connections closed by the drain deadline.
    pub drain_aborted: AtomicU64,
    /// Bytes copied from clients to TO (TCP and UDP).
    pub bytes_up: AtomicU64,
    /// Bytes copied from TO back to clients (TCP and UDP).
    pub bytes_down: AtomicU64,
    /// UDP sessions open now.
    pub udp_sessions: AtomicU64,
    /// UDP sessions ended by the idle timeout or to make room.
    pub udp_expired: AtomicU64,
    /// Sockets of a [`Proxy`] bound on FROM and not closed yet (every
    /// worker's listener counts).
    pub listening: AtomicU64,
}

/// One socket of a [`Proxy`] bound on FROM: counted in
/// [`Stats::listening`] until dropped.
#[derive(Debug)]
pub(crate) struct Listening(Arc<Stats>);

impl Listening {
    fn new(stats: &Arc<Stats>) -> Self {
        Stats::add(&stats.listening, 1);
        Listening(stats.clone())
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.listening.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One TCP mapping's listeners: the first for the caller's runtime, the
/// others (`SO_REUSEPORT` siblings) for worker threads.
#[derive(Debug)]
struct TcpListeners {
    first: TcpListener,
    siblings: Vec<std::net::TcpListener>,
    target: Target,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Errors of the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// FROM could not be bound; the hint lists the ways out on this OS.
    #[error("binding {proto} {addr} (FROM of {mapping}): {cause}{hint}")]
    Bind {
        /// The mapping.
        mapping: Mapping,
        /// "tcp" or "udp".
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The failure (not a `source`: the message already includes it).
        cause: io::Error,
        /// What to do, starting with "; ", or empty.
        hint: String,
    },
    /// A socket call failed while serving.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The failure.
        source: io::Error,
    },
}

impl ProxyError {
    /// Whether the failure is a missing privilege (the caller may try
    /// another backend).
    pub fn is_permission(&self) -> bool {
        matches!(self, ProxyError::Bind { cause, .. }
            if cause.kind() == io::ErrorKind::PermissionDenied)
    }
}

/// A set of bound listeners, one per mapping and protocol, ready to run.
#[derive(Debug)]
pub struct Proxy {
    tcp: Vec<TcpListeners>,
    udp: Vec<(UdpSocket, SocketAddr)>,
    options: Arc<ProxyOptions>,
    stats: Arc<Stats>,
}

impl Proxy {
    /// Binds FROM for every mapping (TCP and/or UDP as the mapping says;
    /// the mapping's address, or every address, IPv4 and IPv6). Fails,
    /// with what to do, if any FROM cannot be bound.
    ///
    /// Each connection holds two descriptors or more: a program whose
    /// proxy should reach [`ProxyOptions::max_connections`] calls
    /// [`raise_open_files_limit`] first (the `redirect` command does).
    pub fn bind(mappings: &MappingSet, options: ProxyOptions) -> Result<Self, ProxyError> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let workers = if cfg!(target_os = "linux") {
            options.workers.max(1)
        } else {
            1
        };
        for m in mappings.iter() {
            let addr = listen_addr(&m);
            if m.proto != Proto::Udp {
                let bind = |addr| {
                    let socket = bind_tcp_socket(addr, workers > 1)?;
                    socket.set_nonblocking(true)?;
                    Ok::<_, io::Error>(std::net::TcpListener::from(socket))
                };
                let first = bind(addr).map_err(|e| bind_error(m, "tcp", addr, e))?;
                // The siblings take the address the first one got (its
                // port, when FROM is 0; IPv4, when IPv6 is off).
                let bound = first
                    .local_addr()
                    .map_err(|e| bind_error(m, "tcp", addr, e))?;
                let siblings = (1..workers)
                    .map(|_| bind(bound))
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(|e| bind_error(m, "tcp", bound, e))?;
                tcp.push(TcpListeners {
                    first: register(first)?,
                    siblings,
                    target: Target::Port(m.to),
                });
            }
            if m.proto != Proto::Tcp {
                let socket = bind_udp(addr).map_err(|e| bind_error(m, "udp", addr, e))?;
                // Without IP_PKTINFO the address a datagram was sent to is
                // unknown on a wildcard socket: forward to loopback there.
                let ip = m.addr.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
                udp.push((socket, SocketAddr::new(ip, m.to)));
            }
        }
        Ok(Proxy {
            tcp,
            udp,
            options: Arc::new(options),
            stats: Arc::default(),
        })
    }

    /// The addresses bound, with their protocol.
    pub fn local_addrs(&self) -> Vec<(Proto, SocketAddr)> {
        let tcp = self.tcp.iter().filter_map(|l| l.first.local_addr().ok());
        let udp = self.udp.iter().filter_map(|(s, _)| s.local_addr().ok());
        tcp.map(|a| (Proto::Tcp, a))
            .chain(udp.map(|a| (Proto::Udp, a)))
            .collect()
    }

    /// The counters, updated while the proxy runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and drains
    /// TCP connections for up to [`ProxyOptions::drain_timeout`].
    pub async fn run(self, shutdown: impl Future) -> Result<(), ProxyError> {
        let (tx, rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        // Worker i (1..) gets the i-th sibling of every mapping.
        let mut workers: Vec<Vec<WorkerListener>> = Vec::new();
        for set in self.tcp {
            let limit = Arc::new(Semaphore::new(self.options.max_connections));
            for (i, sibling) in set.siblings.into_iter().enumerate() {
                if workers.len() <= i {
                    workers.push(Vec::new());
                }
                let guard = Listening::new(&self.stats);
                workers[i].push((sibling, guard, set.target, limit.clone()));
            }
            tasks.spawn(tcp::serve(
                set.first,
                Some(Listening::new(&self.stats)),
                set.target,
                self.options.clone(),
                self.stats.clone(),
                limit,
                stopped(rx.clone()),
            ));
        }
        for (socket, target) in self.udp {
            let guard = Listening::new(&self.stats);
            let run = udp::run(
                socket,
                target,
                self.options.clone(),
                self.stats.clone(),
                stopped(rx.clone()),
            );
            tasks.spawn(async move {
                let res = run.await;
                drop(guard);
                res
            });
        }
        for (i, listeners) in workers.into_iter().enumerate() {
            let (done, finished) = tokio::sync::oneshot::channel();
            let (options, stats, rx) = (self.options.clone(), self.stats.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("redirect-proxy-{}", i + 1))
                .spawn(move || {
                    let _ = done.send(worker(listeners, options, stats, rx));
                })
                .map_err(|e| ProxyError::Io {
                    op: "starting a proxy worker thread",
                    source: e,
                })?;
            tasks.spawn(async move {
                finished.await.unwrap_or_else(|_| {
                    Err(ProxyError::Io {
                        op: "proxy worker thread",
                        source: io::Error::other("it stopped without a result"),
                    })
                })
            });
        }
        tokio::select! {
            _ = shutdown => {}
            Some(res) = tasks.join_next() => {
                // A listener failed: stop the others too.
                let _ = tx.send(true);
                task_result(res)?;
            }
        }
        let _ = tx.send(true);
        join_all(&mut tasks).await
    }
}

/// Resolves once `rx` says stop.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// A proxy task's outcome: its own error, or its panic as one.
fn task_result(
    res: Result<Result<(), ProxyError>, tokio::task::JoinError>,
) -> Result<(), ProxyError> {
    res.map_err(|e| ProxyError::Io {
        op: "proxy task",
        source: io::Error::other(e),
    })?
}

/// Waits for every task; the first failure is returned.
async fn join_all(
    tasks: &mut tokio::task::JoinSet<Result<(), ProxyError>>,
) -> Result<(), ProxyError> {
    while let Some(res) = tasks.join_next().await {
        task_result(res)?;
    }
    Ok(())
}

/// Hands a bound listener to the current runtime.
fn register(listener: std::net::TcpListener) -> Result<TcpListener, ProxyError> {
    TcpListener::from_std(listener).map_err(|e| ProxyError::Io {
        op: "registering a listener",
        source: e,
    })
}

/// A listener for a worker thread: the socket, its count in
/// [`Stats::listening`], where it forwards, and the connection limit it
/// shares with the other listeners of its mapping.
type WorkerListener = (std::net::TcpListener, Listening, Target, Arc<Semaphore>);

/// A worker thread: a single-threaded runtime serving one listener of
/// every TCP mapping until `rx` says stop, then draining.
fn worker(
    listeners: Vec<WorkerListener>,
    options: Arc<ProxyOptions>,
    stats: Arc<Stats>,
    rx: watch::Receiver<bool>,
) -> Result<(), ProxyError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ProxyError::Io {
            op: "starting a proxy worker's runtime",
            source: e,
        })?;
    runtime.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for (listener, guard, target, limit) in listeners {
            tasks.spawn(tcp::serve(
                register(listener)?,
                Some(guard),
                target,
                options.clone(),
                stats.clone(),
                limit,
                stopped(rx.clone()),
            ));
        }
        join_all(&mut tasks).await
    })
}

/// A tokio runtime for proxies that run beside other work (the daemon's
/// proxy-backed scopes): one thread of its own, named `redirect-proxy`,
/// with I/O and timers; a [`Proxy`] with more
/// [`workers`](ProxyOptions::workers) starts their threads itself.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("redirect-proxy")
        .enable_all()
        .build()
}

/// The mapping's address, or the IPv6 wildcard (dual-stack where the OS
/// allows; [`bind_tcp`] falls back to IPv4 when IPv6 is off).
fn listen_addr(m: &Mapping) -> SocketAddr {
    SocketAddr::new(m.addr.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), m.from)
}

/// Binds a TCP listener on `addr`: the IPv6 wildcard is made dual-stack
/// (IPv4 clients arrive as `::ffff:a.b.c.d`), or falls back to `0.0.0.0`
/// where IPv6 is disabled.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_tcp_socket(addr, false)?.into())
}

/// A nonblocking listening socket on `addr` (see [`bind_tcp`]), with
/// `SO_REUSEPORT` when `reuse_port` (Linux: more listeners on the same
/// address, by the same user, share its connections).
fn bind_tcp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    #[cfg(not(windows))]
    socket.set_reuse_address(true)?;
    #[cfg(target_os = "linux")]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = reuse_port;
    match socket.bind(&addr.into()) {
        Ok(()) => {}
        Err(e) if is_v6_wildcard(addr) && e.kind() == io::ErrorKind::AddrNotAvailable => {
            return bind_tcp_socket(
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
                reuse_port,
            );
        }
        Err(e) => return Err(e),
    }
    socket.listen(4096)?;
    Ok(socket)
}

/// Binds a UDP socket on `addr` (dual-stack for the IPv6 wildcard).
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    match socket.bind(&addr.into()) {
        Ok(()) => {}
        Err(e) if is_v6_wildcard(addr) && e.kind() == io::ErrorKind::AddrNotAvailable => {
            return bind_udp(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()));
        }
        Err(e) => return Err(e),
    }
    UdpSocket::from_std(socket.into())
}

fn new_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let socket = match Socket::new(Domain::for_address(addr), ty, Some(proto)) {
        Err(e) if is_v6_wildcard(addr) => {
            // No IPv6 on this host at all.
            log::debug!("no IPv6 socket ({e}); listening on IPv4 only");
            Socket::new(Domain::IPV4, ty, Some(proto))?
        }
        other => other?,
    };
    if is_v6_wildcard(addr) {
        // Ignored when the socket fell back to IPv4.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn is_v6_wildcard(addr: SocketAddr) -> bool {
    addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
}

/// IPv4-mapped IPv6 addresses as IPv4 (what a dual-stack listener reports
/// for IPv4 clients).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn bind_error(
    mapping: Mapping,
    proto: &'static str,
    addr: SocketAddr,
    source: io::Error,
) -> ProxyError {
    let hint = bind_hint(addr, &source);
    ProxyError::Bind {
        mapping,
        proto,
        addr,
        cause: source,
        hint,
    }
}

/// What to do when `addr` cannot be bound, for the OS this runs on,
/// starting with "; " (empty when there is nothing useful to say).
pub fn bind_hint(addr: SocketAddr, err: &io::Error) -> String {
    let port = addr.port();
    match err.kind() {
        io::ErrorKind::AddrInUse => format!(
            "; another socket already holds port {port}: stop it, map another FROM, or run \
             `redirect doctor --map {port}:TO` to see which process owns it"
        ),
        io::ErrorKind::PermissionDenied => privilege_hint(port),
        _ => String::new(),
    }
}

#[cfg(target_os = "linux")]
fn privilege_hint(port: u16) -> String {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(String::new(), |n| {
            format!(" (ip_unprivileged_port_start is {n})")
        });
    format!(
        "; port {port} is privileged{start}. Ways out: run as root; give this binary the \
         capability (`sudo setcap 'cap_net_bind_service=+ep' $(command -v redirect)`); lower \
         the limit (`sudo sysctl net.ipv4.ip_unprivileged_port_start={port}`, which is per \
         network namespace and applies to IPv4 and IPv6); use the eBPF backend as root \
         (`sudo redirect run --backend ebpf …`, which needs no listener on FROM); or let the \
         service bind it itself (`sudo redirect exec --grant {port} --user USER -- CMD`)"
    )
}

#[cfg(target_os = "macos")]
fn privilege_hint(port: u16) -> String {
    format!(
        "; port {port} is privileged. Ways out: since macOS 10.14 an unprivileged process may \
         bind ports below 1024 on the wildcard address only, so map without an address \
         (`--map {port}:TO`); run as root (sudo); or redirect with a pf `rdr` rule in \
         /etc/pf.conf (`rdr pass on lo0 proto tcp from any to any port {port} -> 127.0.0.1 \
         port TO`)"
    )
}

#[cfg(windows)]
fn privilege_hint(port: u16) -> String {
    format!(
        "; Windows has no privileged ports: port {port} is reserved or held exclusively by \
         another program (see `netsh interface ipv4 show excludedportrange protocol=tcp` and \
         `netstat -ano`), or blocked by policy; pick another FROM or free it"
    )
}

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
fn privilege_hint(port: u16) -> String {
    format!("; port {port} is privileged on this system: run as root or map another FROM")
}

/// Sets `SO_LINGER` to 0 so that dropping the socket sends a reset: used
/// to pass a reset from one side of a connection on to the other.
pub(crate) fn reset_on_close<S>(socket: &S)
where
    for<'a> SockRef<'a>: From<&'a S>,
{
    let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
}
