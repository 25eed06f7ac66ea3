//! The fallback proxy with real sockets on loopback: echo, bulk transfer with
//! checksums, half-close, many connections, the limits, the idle timeout,
//! graceful drain, UDP sessions. These run in the library (in this process);
//! the last part covers the `redirect run --backend proxy|auto` command
//! (drain on SIGTERM, memory with a slow reader, the fallback when
//! capabilities are dropped, the privilege error), and the middle one
//! PROXY protocol against real nginx and haproxy.
//!
//! Every listener binds port 0 on loopback, so the tests never take a port
//! they did not pick.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use redirect_tests::redirect::{
    ProxyProtocol,
    proxy::{self, ProxyOptions, Stats, Target},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::oneshot,
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};

/// A proxy on `ip`:0 forwarding to `target`, stopped through `stop`.
struct TestProxy {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), proxy::ProxyError>>,
}

impl TestProxy {
    async fn tcp(ip: &str, target: SocketAddr, options: ProxyOptions) -> Self {
        let listener = proxy::bind_tcp(format!("{}:0", bracket(ip)).parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy::tcp::run(
            listener,
            Target::Port(target.port()),
            Arc::new(options),
            stats.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        TestProxy {
            addr,
            stats,
            stop: Some(stop),
            task,
        }
    }

    async fn udp(target: SocketAddr, options: ProxyOptions) -> Self {
        let socket = proxy::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy::udp::run(
            socket,
            target,
            Arc::new(options),
            stats.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        TestProxy {
            addr,
            stats,
            stop: Some(stop),
            task,
        }
    }

    /// Asks for shutdown; returns the task to await.
    fn shutdown(&mut self) {
        let _ = self.stop.take().expect("not stopped yet").send(());
    }

    fn get(&self, counter: fn(&Stats) -> &std::sync::atomic::AtomicU64) -> u64 {
        counter(&self.stats).load(Ordering::Relaxed)
    }
}

fn bracket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    }
}

/// An echo server on `ip`:0 (each connection echoes until EOF, then
/// half-closes).
async fn echo_server(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind(format!("{}:0", bracket(ip)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn echo_once(proxy: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(proxy).await.unwrap();
    c.write_all(msg).await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(Duration::from_secs(5), c.read_to_end(&mut got))
        .await
        .expect("echo within 5 s")
        .unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_ipv4_and_ipv6() {
    for ip in ["127.0.0.1", "::1"] {
        let backend = echo_server(ip).await;
        let mut p = TestProxy::tcp(ip, backend, ProxyOptions::default()).await;
        assert_eq!(echo_once(p.addr, b"hello").await, b"hello", "{ip}");
        assert_eq!(p.get(|s| &s.accepted), 1);
        p.shutdown();
        p.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_through_a_dual_stack_wildcard_listener() {
    // The IPv6 wildcard takes IPv4 clients too, and forwards each to TO at
    // the address it connected to.
    let backend = echo_server("127.0.0.1").await;
    let listener = proxy::bind_tcp("[::]:0".parse().unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy::tcp::run(
        listener,
        Target::Port(backend.port()),
        Arc::new(ProxyOptions::default()),
        Arc::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(echo_once(addr, b"v4 via [::]").await, b"v4 via [::]");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// Deterministic data: block `i` of 64 KiB is filled from `seed` and `i`.
fn block(seed: u64, i: u64, buf: &mut [u8]) {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// A checksum that notices reordered, lost and changed bytes (Fletcher-like
/// over 64-bit words).
#[derive(Default, Debug, PartialEq, Clone, Copy)]
struct Sum {
    a: u64,
    b: u64,
    len: u64,
    partial: [u8; 8],
    fill: usize,
}

impl Sum {
    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while !data.is_empty() {
            let take = (8 - self.fill).min(data.len());
            self.partial[self.fill..self.fill + take].copy_from_slice(&data[..take]);
            self.fill += take;
            data = &data[take..];
            if self.fill == 8 {
                let w = u64::from_le_bytes(self.partial);
                self.a = self.a.wrapping_add(w);
                self.b = self.b.wrapping_add(self.a);
                self.fill = 0;
            }
        }
    }
}

const BULK: u64 = 256 << 20;
const BLOCK: usize = 64 << 10;

/// Writes BULK bytes of `seed` data, then half-closes; returns their sum.
async fn send_bulk(w: &mut (impl tokio::io::AsyncWrite + Unpin), seed: u64) -> Sum {
    let mut sum = Sum::default();
    let mut buf = vec![0u8; BLOCK];
    for i in 0..BULK / BLOCK as u64 {
        block(seed, i, &mut buf);
        sum.update(&buf);
        w.write_all(&buf).await.unwrap();
    }
    w.shutdown().await.unwrap();
    sum
}

/// Reads to EOF; returns the sum.
async fn recv_all(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Sum {
    let mut sum = Sum::default();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return sum;
        }
        sum.update(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_256_mib_each_way_arrives_intact() {
    for splice in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = listener.local_addr().unwrap();
        // The backend sends its own 256 MiB while receiving the client's.
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = stream.into_split();
            let sent = tokio::spawn(async move { send_bulk(&mut w, 2).await });
            let got = recv_all(&mut r).await;
            (got, sent.await.unwrap())
        });
        let options = ProxyOptions {
            splice,
            ..ProxyOptions::default()
        };
        let mut p = TestProxy::tcp("127.0.0.1", backend, options).await;
        let client = TcpStream::connect(p.addr).await.unwrap();
        let (mut r, mut w) = client.into_split();
        let sent = tokio::spawn(async move { send_bulk(&mut w, 1).await });
        let got = timeout(Duration::from_secs(120), recv_all(&mut r))
            .await
            .expect("256 MiB within 120 s");
        let client_sent = sent.await.unwrap();
        let (server_got, server_sent) = server.await.unwrap();
        assert_eq!(
            server_got, client_sent,
            "client → backend (splice {splice})"
        );
        assert_eq!(got, server_sent, "backend → client (splice {splice})");
        assert_eq!(got.len, BULK);
        assert_eq!(p.get(|s| &s.bytes_up), BULK);
        assert_eq!(p.get(|s| &s.bytes_down), BULK);
        p.shutdown();
        p.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_is_passed_on_both_ways() {
    for splice in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = listener.local_addr().unwrap();
        let options = ProxyOptions {
            splice,
            ..ProxyOptions::default()
        };
        let p = TestProxy::tcp("127.0.0.1", backend, options).await;

        // Client closes its side first: the backend sees EOF, and can still
        // answer afterwards.
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        c.write_all(b"question").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("backend sees the client's EOF")
            .unwrap();
        assert_eq!(got, b"question");
        s.write_all(b"answer after EOF").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        timeout(Duration::from_secs(5), c.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"answer after EOF");

        // Backend closes its side first: the client sees EOF, and can still
        // send afterwards.
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        timeout(Duration::from_secs(5), c.read_to_end(&mut got))
            .await
            .expect("client sees the backend's EOF")
            .unwrap();
        assert_eq!(got, b"banner");
        c.write_all(b"late upload").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"late upload");
    }
}

/// Raises the soft open-files limit to the hard one (1,000 connections
/// through an in-process proxy take 4,000 descriptors).
fn raise_nofile() {
    let limit = proxy::raise_open_files_limit().expect("raising RLIMIT_NOFILE to the hard limit");
    assert!(
        limit.is_some_and(|n| n >= 5000),
        "RLIMIT_NOFILE hard limit too low: {limit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections() {
    raise_nofile();
    let backend = echo_server("127.0.0.1").await;
    let mut p = TestProxy::tcp("127.0.0.1", backend, ProxyOptions::default()).await;
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(TcpStream::connect(p.addr).await.unwrap());
    }
    // All open at once: each answers in turn.
    for (i, c) in conns.iter_mut().enumerate() {
        let msg = format!("conn {i}\n");
        c.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        timeout(Duration::from_secs(5), c.read_exact(&mut buf))
            .await
            .expect("echo within 5 s")
            .unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
    assert_eq!(p.get(|s| &s.active), 1000);
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.get(|s| &s.active) > 0 && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(p.get(|s| &s.active), 0, "every connection ended");
    assert_eq!(p.get(|s| &s.accepted), 1000);
    p.shutdown();
    p.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let backend = echo_server("127.0.0.1").await;
    let options = ProxyOptions {
        max_connections: 2,
        ..ProxyOptions::default()
    };
    let p = TestProxy::tcp("127.0.0.1", backend, options).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        held.push(c);
    }
    // The third is accepted and closed: EOF (or a reset), never a hang.
    let mut third = TcpStream::connect(p.addr).await.unwrap();
    let mut b = [0u8; 1];
    let res = timeout(Duration::from_secs(2), third.read(&mut b))
        .await
        .expect("refused at once, not left hanging");
    assert!(matches!(res, Ok(0) | Err(_)), "{res:?}");
    assert_eq!(p.get(|s| &s.refused), 1);
    // Room again once one closes.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.get(|s| &s.active) > 1 && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(echo_once(p.addr, b"again").await, b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    let backend = echo_server("127.0.0.1").await;
    let options = ProxyOptions {
        idle_timeout: Some(Duration::from_millis(400)),
        ..ProxyOptions::default()
    };
    let p = TestProxy::tcp("127.0.0.1", backend, options).await;
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    let mut busy = TcpStream::connect(p.addr).await.unwrap();
    let started = Instant::now();
    // The busy one talks every 100 ms for 1.2 s, three idle timeouts.
    for _ in 0..12 {
        busy.write_all(b"k").await.unwrap();
        let mut b = [0u8; 1];
        busy.read_exact(&mut b)
            .await
            .expect("busy connection kept open");
        sleep(Duration::from_millis(100)).await;
    }
    let mut b = [0u8; 1];
    let n = timeout(Duration::from_secs(2), idle.read(&mut b))
        .await
        .expect("idle connection closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "idle connection got EOF");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(p.get(|s| &s.idle_closed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_connections_in_flight() {
    let backend = echo_server("127.0.0.1").await;
    let options = ProxyOptions {
        drain_timeout: Duration::from_secs(10),
        ..ProxyOptions::default()
    };
    let mut p = TestProxy::tcp("127.0.0.1", backend, options).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"before").await.unwrap();
    let mut b = [0u8; 6];
    c.read_exact(&mut b).await.unwrap();
    p.shutdown();
    sleep(Duration::from_millis(200)).await;
    // No new clients: the listener is closed.
    assert!(
        TcpStream::connect(p.addr).await.is_err(),
        "new connections refused while draining"
    );
    // The one in flight still works, and the proxy waits for it.
    c.write_all(b"during").await.unwrap();
    c.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"during");
    assert!(!p.task.is_finished(), "still draining");
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    timeout(Duration::from_secs(5), &mut p.task)
        .await
        .expect("run returns once drained")
        .unwrap()
        .unwrap();
    assert_eq!(p.get(|s| &s.drain_aborted), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_what_is_left() {
    let backend = echo_server("127.0.0.1").await;
    let options = ProxyOptions {
        drain_timeout: Duration::from_millis(500),
        ..ProxyOptions::default()
    };
    let mut p = TestProxy::tcp("127.0.0.1", backend, options).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.unwrap();
    let started = Instant::now();
    p.shutdown();
    timeout(Duration::from_secs(5), &mut p.task)
        .await
        .expect("run returns at the deadline")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(450));
    let n = timeout(Duration::from_secs(2), c.read(&mut b))
        .await
        .expect("client told")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed at the deadline");
    assert_eq!(p.get(|s| &s.drain_aborted), 1);
}

/// A UDP server answering `to:<datagram>`.
async fn udp_backend() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let mut reply = b"to:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, peer).await;
        }
    });
    addr
}

async fn udp_ask(client: &UdpSocket, to: SocketAddr, msg: &str) -> (String, SocketAddr) {
    client.send_to(msg.as_bytes(), to).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .expect("udp reply within 5 s")
        .unwrap();
    (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_replies_come_from_from_and_sessions_expire() {
    let backend = udp_backend().await;
    let options = ProxyOptions {
        udp_idle_timeout: Duration::from_millis(300),
        ..ProxyOptions::default()
    };
    let mut p = TestProxy::udp(backend, options).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (reply, from) = udp_ask(&client, p.addr, "hello").await;
    assert_eq!(reply, "to:hello");
    assert_eq!(from, p.addr, "the reply comes from FROM, not from TO");
    let (reply, _) = udp_ask(&client, p.addr, "again").await;
    assert_eq!(reply, "to:again");
    assert_eq!(p.get(|s| &s.udp_sessions), 1, "one session per client");
    sleep(Duration::from_millis(900)).await;
    assert_eq!(p.get(|s| &s.udp_sessions), 0, "session expired");
    assert_eq!(p.get(|s| &s.udp_expired), 1);
    // A new datagram opens a new session.
    let (reply, _) = udp_ask(&client, p.addr, "back").await;
    assert_eq!(reply, "to:back");
    p.shutdown();
    p.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sessions_are_bounded() {
    let backend = udp_backend().await;
    let options = ProxyOptions {
        max_udp_sessions: 2,
        ..ProxyOptions::default()
    };
    let p = TestProxy::udp(backend, options).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (reply, _) = udp_ask(&c, p.addr, &format!("c{i}")).await;
        assert_eq!(reply, format!("to:c{i}"));
        clients.push(c);
    }
    assert_eq!(p.get(|s| &s.udp_sessions), 2, "never more than the bound");
    assert_eq!(p.get(|s| &s.udp_expired), 1, "the idlest made room");
}

// ---------------------------------------------------------------------------
// PROXY protocol against real peers: nginx (`listen … proxy_protocol`) and
// haproxy (`bind … accept-proxy`), each started by the test on a port it
// picked, with its files in a temporary directory of its own.

/// A free loopback port, picked by binding port 0 (the peers below cannot
/// be handed a socket).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A program of a Debian package the tests need; `cargo xtask test`
/// installs it.
fn tool(name: &str) -> std::path::PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let path = std::path::Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} is not installed: `cargo xtask test` installs it (apt-get install {name})");
}

/// A peer process, killed and its directory removed on drop.
struct Peer {
    child: std::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn peer_dir(name: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "redirect-test-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// nginx answering every request with the client address it learnt from
/// the PROXY header, and logging it.
fn nginx() -> Peer {
    let dir = peer_dir("nginx");
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
         http {{\n  log_format pp '$proxy_protocol_addr:$proxy_protocol_port via $remote_addr';\n\
           access_log {d}/access.log pp;\n  client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n\
             location / {{ return 200 \"client=$proxy_protocol_addr:$proxy_protocol_port\\n\"; }}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = std::process::Command::new(tool("nginx"))
        .args([
            "-e",
            &format!("{d}/error.log"),
            "-c",
            &format!("{d}/nginx.conf"),
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start nginx");
    wait_listening(port, &dir);
    Peer { child, dir, port }
}

/// haproxy answering every request with the client address it learnt from
/// the PROXY header, and logging it to stdout.
fn haproxy() -> Peer {
    let dir = peer_dir("haproxy");
    let port = free_port();
    let conf = format!(
        "global\n  log stdout format raw local0\n\
         defaults\n  mode http\n  log global\n  option httplog\n  timeout connect 5s\n\
           timeout client 5s\n  timeout server 5s\n\
         frontend fe\n  bind 127.0.0.1:{port} accept-proxy\n\
           http-request return status 200 content-type text/plain lf-string \"client=%[src]:%[src_port]\\n\"\n"
    );
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, conf).unwrap();
    let child = std::process::Command::new(tool("haproxy"))
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout.log")).unwrap())
        .spawn()
        .expect("start haproxy");
    wait_listening(port, &dir);
    Peer { child, dir, port }
}

fn wait_listening(port: u16, dir: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "peer never listened on {port}; see {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP request through the proxy, from 127.0.0.2 (so that the real
/// client's address differs from the proxy's, 127.0.0.1); returns the
/// client's address and the response body.
async fn http_from_127_0_0_2(proxy: SocketAddr) -> (SocketAddr, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut c = socket.connect(proxy).await.unwrap();
    let me = c.local_addr().unwrap();
    c.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    timeout(Duration::from_secs(5), c.read_to_end(&mut resp))
        .await
        .expect("response within 5 s")
        .unwrap();
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let body = resp
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned();
    (me, body)
}

async fn check_proxy_protocol(peer: &Peer, version: ProxyProtocol, log: &str) {
    let backend: SocketAddr = format!("127.0.0.1:{}", peer.port).parse().unwrap();
    let options = ProxyOptions {
        proxy_protocol: Some(version),
        ..ProxyOptions::default()
    };
    let p = TestProxy::tcp("127.0.0.1", backend, options).await;
    let (me, body) = http_from_127_0_0_2(p.addr).await;
    assert_eq!(
        body,
        format!("client={me}"),
        "{version}: the backend saw the real client"
    );
    // And wrote it to its log.
    let log_path = peer.dir.join(log);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains(&me.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{version}: {me} not in {}:\n{text}",
            log_path.display()
        );
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_accepted_by_nginx() {
    use ProxyProtocol::{V1, V2};
    let nginx = nginx();
    check_proxy_protocol(&nginx, V1, "access.log").await;
    check_proxy_protocol(&nginx, V2, "access.log").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_accepted_by_haproxy() {
    use ProxyProtocol::{V1, V2};
    let haproxy = haproxy();
    check_proxy_protocol(&haproxy, V1, "stdout.log").await;
    check_proxy_protocol(&haproxy, V2, "stdout.log").await;
}

// ---------------------------------------------------------------------------
// The `redirect` command with the proxy backend.

use redirect_tests::{RedirectProcess, TcpServer, binary, vm_rss_kib};

/// `redirect run --backend proxy --map FROM:TO` with a FROM picked free on
/// loopback; waits for the ready line.
fn run_proxy(to: u16, extra: &[&str]) -> (RedirectProcess, u16, String) {
    let from = free_port();
    let mut args = vec![
        "run".to_owned(),
        "--backend".into(),
        "proxy".into(),
        "--map".into(),
        format!("127.0.0.1:{from}:{to}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = RedirectProcess::start(args);
    let ready = p.wait_ready();
    (p, from, ready)
}

#[test]
fn cli_proxy_forwards_and_drains_on_sigterm() {
    use std::io::{Read as _, Write as _};
    let server = TcpServer::start("127.0.0.1:0", "to");
    let (mut p, from, ready) = run_proxy(server.addr.port(), &["--drain-timeout", "10"]);
    assert!(ready.contains("backend proxy"), "{ready}");
    // One connection in flight when SIGTERM arrives.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", from)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    p.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(p.child.try_wait().unwrap().is_none(), "still draining");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", from)).is_err(),
        "no new connections while draining"
    );
    c.write_all(b"in flight\n").unwrap();
    let mut reply = [0u8; 12];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"to:in flight");
    drop(c);
    let status = p.wait_exit();
    assert!(status.success(), "clean exit after the drain: {status:?}");
}

#[test]
fn cli_slow_reader_does_not_grow_memory() {
    use std::io::{Read as _, Write as _};
    // The backend writes up to 1 GiB as fast as it can; the client reads
    // 4 KiB every 50 ms.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let buf = vec![7u8; 1 << 20];
        for _ in 0..1024 {
            if s.write_all(&buf).is_err() {
                return;
            }
        }
    });
    let (p, from, _) = run_proxy(to, &[]);
    let pid = p.child.id();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", from)).unwrap();
    let mut buf = [0u8; 4096];
    let mut samples = Vec::new();
    for i in 0..80 {
        c.read_exact(&mut buf).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        if i % 20 == 19 {
            samples.push(vm_rss_kib(pid));
        }
    }
    let growth = samples.last().unwrap().saturating_sub(samples[0]);
    assert!(
        growth < 2048,
        "RSS grew by {growth} KiB while the client read slowly: {samples:?} KiB"
    );
    assert!(
        *samples.last().unwrap() < 32 * 1024,
        "RSS {samples:?} KiB: buffers are not bounded"
    );
}

#[test]
fn cli_proxy_raises_its_open_files_limit_to_serve_many_clients() {
    use std::io::{BufRead as _, BufReader, Write as _};
    raise_nofile();
    let server = TcpServer::start("127.0.0.1:0", "to");
    // Started with a soft limit of 128 descriptors (room for ~60
    // connections) under a hard limit of 4,096.
    let from = free_port();
    let mut p = RedirectProcess::start_program(
        tool("prlimit"),
        [
            "--nofile=128:4096".to_owned(),
            binary("redirect").display().to_string(),
            "run".into(),
            "--backend".into(),
            "proxy".into(),
            "--map".into(),
            format!("127.0.0.1:{from}:{}", server.addr.port()),
        ],
    );
    p.wait_ready();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", p.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>()[3..5],
        ["4096", "4096"],
        "{line}"
    );
    // 300 clients at once, each answered while all are open.
    let mut conns = Vec::new();
    for i in 0..300 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", from)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(c, "client {i}").unwrap();
        conns.push(c);
    }
    for (i, c) in conns.iter().enumerate() {
        let mut reply = String::new();
        BufReader::new(c).read_line(&mut reply).unwrap();
        assert_eq!(reply, format!("to:client {i}\n"));
    }
}

/// Runs `redirect ARGS` under `setpriv` with CAP_BPF, CAP_SYS_ADMIN,
/// CAP_NET_ADMIN and CAP_PERFMON removed from the bounding set (so root
/// cannot load eBPF programs).
fn start_without_bpf_caps(args: &[String]) -> RedirectProcess {
    let mut all = vec![
        "--bounding-set=-bpf,-sys_admin,-net_admin,-perfmon".to_owned(),
        "--inh-caps=-all".into(),
        binary("redirect").display().to_string(),
    ];
    all.extend(args.iter().cloned());
    RedirectProcess::start_program(tool("setpriv"), all)
}

#[test]
fn cli_auto_falls_back_to_the_proxy_without_bpf_capabilities() {
    use std::io::{Read as _, Write as _};
    let server = TcpServer::start("127.0.0.1:0", "to");
    let from = free_port();
    let mut p = start_without_bpf_caps(&[
        "run".into(),
        "--map".into(),
        format!("127.0.0.1:{from}:{}", server.addr.port()),
    ]);
    let ready = p.wait_ready();
    assert!(ready.contains("backend proxy: auto"), "{ready}");
    // Says why: the missing capability, or (built without the eBPF
    // backend) that there is none.
    let why = if cfg!(feature = "ebpf") {
        "CAP_BPF"
    } else {
        "no eBPF backend"
    };
    assert!(ready.contains(why), "says why: {ready}");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", from)).unwrap();
    c.write_all(b"hi\n").unwrap();
    let mut reply = [0u8; 5];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"to:hi");
}

#[cfg(feature = "ebpf")]
#[test]
fn cli_auto_picks_ebpf_when_it_can_attach() {
    if !redirect_tests::privileged("auto-ebpf") {
        return;
    }
    let cgroup = redirect_tests::test_cgroup("auto");
    let mut p = RedirectProcess::start([
        "run",
        "--map",
        "61443:61444",
        "--cgroup",
        &cgroup.path().display().to_string(),
    ]);
    let ready = p.wait_ready();
    assert!(ready.contains("backend ebpf: auto"), "{ready}");
}

#[test]
fn cli_privileged_port_error_lists_the_ways_out() {
    // In a network namespace of its own (nothing of the host is bound), as
    // nobody: port 80 is privileged there.
    let out = std::process::Command::new(tool("unshare"))
        .args(["--net", "--"])
        .arg(tool("setpriv"))
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(binary("redirect"))
        .args([
            "run",
            "--backend",
            "proxy",
            "--map",
            "127.0.0.1:80:8080/tcp",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for way in [
        "cap_net_bind_service",
        "ip_unprivileged_port_start",
        "per network namespace",
        "--backend ebpf",
        "--grant 80",
    ] {
        assert!(err.contains(way), "{way:?} missing from: {err}");
    }
}
