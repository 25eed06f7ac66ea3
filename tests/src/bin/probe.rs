//! A test client, run by the tests inside a child cgroup as `nobody`. It
//! prints what its socket reports as `key=value` lines.
//!
//! ```text
//! probe tcp ADDR MSG      connect, send MSG, read one reply line
//! probe udp ADDR MSG      connected UDP: connect, send, recv
//! probe sendto ADDR MSG   unconnected UDP: sendto, recvfrom
//! probe session ADDR      unconnected UDP, driven from stdin:
//!                           `send MSG` -> sendto, prints `sent`
//!                           `recv`     -> recvfrom, prints `from=… data=…`
//! probe hold ADDR N       open N TCP connections, print `open`, close them
//!                         all when stdin closes
//! probe bind ADDR         bind a TCP listener, print `bound=ADDR`
//! probe serve ADDR        listen, print `listening`; accept one connection,
//!                         print its `local=` and `peer=`, answer `to:LINE`
//! probe udp-serve ADDR    bind UDP, print `listening local=ADDR`; answer
//!                         one datagram with `to:DATAGRAM`
//! probe bindlisten ADDR   bind (IPv4) and print `bound`; on a line on
//!                         stdin, listen, print `listening`, then serve as
//!                         `serve` does
//! probe autolisten ADDR   listen() without bind() (the kernel picks the
//!                         port: autobind), print `listening port=P`, then
//!                         answer one connection with `squatter:LINE`
//! probe loop ADDR SECS    TCP connect, send, read the reply, close, over
//!                         and over for SECS seconds; print `ok=N`,
//!                         `failed=N` and the first `error=`
//! probe idle-unix PATH N  connect N times to the unix socket PATH and never
//!                         read; print `open=N`, close them all when stdin
//!                         closes (an idle-client attack on a status socket)
//! ```
//!
//! The one-shot modes print `local=`, `peer=` (getpeername, or the source
//! recvfrom reported) and `reply=`; they exit 1 with `error=…` on failure.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, path, n] = args.as_slice()
        && mode == "idle-unix"
    {
        return idle_unix(path, n.parse().expect("N"));
    }
    let (mode, addr, rest) = match args.as_slice() {
        [mode, addr, rest @ ..] => (mode.as_str(), addr, rest),
        _ => usage(),
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is ip:port or [ip6]:port");
    let arg = || rest.first().cloned().unwrap_or_else(|| usage());
    let result = match mode {
        "tcp" => tcp(addr, &arg()),
        "udp" => udp(addr, &arg()),
        "sendto" => sendto(addr, &arg()),
        "session" => return session(addr),
        "hold" => return hold(addr, arg().parse().expect("N")),
        "bind" => return bind(addr),
        "serve" => return serve(addr),
        "udp-serve" => return udp_serve(addr),
        "loop" => return connect_loop(addr, arg().parse().expect("SECS")),
        "bindlisten" => return bind_then_listen(addr),
        "autolisten" => return auto_listen(),
        _ => usage(),
    };
    match result {
        Ok((local, peer, reply)) => {
            println!("local={local}\npeer={peer}\nreply={reply}");
        }
        Err(e) => {
            println!("error={e}");
            std::process::exit(1);
        }
    }
}

/// Sequential connections for `secs` seconds (a bounded load loop).
fn connect_loop(addr: SocketAddr, secs: f64) {
    let end = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let (mut ok, mut failed, mut first) = (0u64, 0u64, None);
    while std::time::Instant::now() < end {
        match tcp(addr, "loop") {
            Ok((_, _, reply)) if !reply.is_empty() => ok += 1,
            Ok(_) => {
                failed += 1;
                first.get_or_insert_with(|| "empty reply".to_owned());
            }
            Err(e) => {
                failed += 1;
                first.get_or_insert(e);
            }
        }
    }
    println!("ok={ok}\nfailed={failed}");
    if let Some(e) = first {
        println!("error={e}");
    }
}

fn usage() -> ! {
    eprintln!("usage: probe tcp|udp|sendto ADDR MSG | probe session|bind ADDR | probe hold ADDR N");
    std::process::exit(2);
}

type Report = (SocketAddr, SocketAddr, String);

fn tcp(addr: SocketAddr, message: &str) -> Result<Report, String> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{message}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| e.to_string())?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    Ok((local, peer, reply.trim_end().to_owned()))
}

fn unbound(addr: SocketAddr) -> Result<UdpSocket, String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

fn udp(addr: SocketAddr, message: &str) -> Result<Report, String> {
    let socket = unbound(addr)?;
    socket.connect(addr).map_err(|e| e.to_string())?;
    socket.send(message.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let peer = socket.peer_addr().map_err(|e| e.to_string())?;
    Ok((local, peer, String::from_utf8_lossy(&buf[..n]).into_owned()))
}

fn sendto(addr: SocketAddr, message: &str) -> Result<Report, String> {
    let socket = unbound(addr)?;
    socket
        .send_to(message.as_bytes(), addr)
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let (n, from) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    Ok((local, from, String::from_utf8_lossy(&buf[..n]).into_owned()))
}

fn session(addr: SocketAddr) {
    let socket = unbound(addr).expect("socket");
    let mut buf = [0u8; 1500];
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if let Some(msg) = line.strip_prefix("send ") {
            match socket.send_to(msg.as_bytes(), addr) {
                Ok(_) => println!("sent"),
                Err(e) => println!("error={e}"),
            }
        } else if let Some((to, msg)) = line
            .strip_prefix("sendto ")
            .and_then(|rest| rest.split_once(' '))
        {
            let to: SocketAddr = to.parse().expect("sendto ADDR MSG");
            match socket.send_to(msg.as_bytes(), to) {
                Ok(_) => println!("sent"),
                Err(e) => println!("error={e}"),
            }
        } else if line == "recv" {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    println!("from={from} data={}", String::from_utf8_lossy(&buf[..n]))
                }
                Err(e) => println!("error={e}"),
            }
        }
    }
}

fn serve(addr: SocketAddr) {
    let listener = std::net::TcpListener::bind(addr).expect("bind");
    println!("listening");
    let (stream, peer) = listener.accept().expect("accept");
    let local = stream.local_addr().expect("local_addr");
    println!("local={local}\npeer={peer}");
    let mut line = String::new();
    let _ = BufReader::new(&stream).read_line(&mut line);
    let _ = (&stream).write_all(format!("to:{}\n", line.trim_end()).as_bytes());
}

/// bind() now, listen() later: what an attacker does to get a socket
/// bound before a mapping exists and listening after.
fn bind_then_listen(addr: SocketAddr) {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(v4) = addr else {
        panic!("bindlisten takes an IPv4 address")
    };
    // SAFETY: plain syscalls with valid arguments; the fd is owned by the
    // listener built from it below.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::bind(
            fd,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 {
            println!("error={}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        fd
    };
    println!("bound");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    // SAFETY: our own bound socket.
    if unsafe { libc::listen(fd, 16) } != 0 {
        println!("error={}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    println!("listening");
    // SAFETY: the fd is a listening TCP socket we own.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let (stream, _) = listener.accept().expect("accept");
    let mut line = String::new();
    let _ = BufReader::new(&stream).read_line(&mut line);
    let _ = (&stream).write_all(format!("squatter:{}\n", line.trim_end()).as_bytes());
}

/// listen() on a socket never bound: the kernel autobinds it to a port of
/// `ip_local_port_range`, and no bind hook runs.
fn auto_listen() {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain syscalls; the fd is owned by the listener built below.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        if libc::listen(fd, 16) != 0 {
            println!("error={}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        fd
    };
    // SAFETY: a listening TCP socket we own.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let port = listener.local_addr().expect("local_addr").port();
    println!("listening port={port}");
    let (stream, _) = listener.accept().expect("accept");
    let mut line = String::new();
    let _ = BufReader::new(&stream).read_line(&mut line);
    let _ = (&stream).write_all(format!("squatter:{}\n", line.trim_end()).as_bytes());
}

fn udp_serve(addr: SocketAddr) {
    let socket = UdpSocket::bind(addr).expect("bind");
    println!(
        "listening local={}",
        socket.local_addr().expect("local_addr")
    );
    let mut buf = [0u8; 1500];
    let (n, peer) = socket.recv_from(&mut buf).expect("recv_from");
    let reply = format!("to:{}", String::from_utf8_lossy(&buf[..n]));
    socket.send_to(reply.as_bytes(), peer).expect("send_to");
}

fn bind(addr: SocketAddr) {
    match std::net::TcpListener::bind(addr) {
        Ok(l) => println!("bound={}", l.local_addr().expect("local_addr")),
        Err(e) => {
            println!("error={e}");
            std::process::exit(1);
        }
    }
}

fn hold(addr: SocketAddr, n: usize) {
    let streams: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect"))
        .collect();
    println!("open {}", streams.len());
    // Hold them until the test closes our stdin.
    let _ = std::io::stdin().lock().lines().count();
    drop(streams);
}

/// `n` connections to a unix socket that never read, held until stdin
/// closes.
fn idle_unix(path: &str, n: usize) {
    // n connections: the soft open-files limit up to the hard one.
    let _ = redirect::proxy::raise_open_files_limit();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => held.push(s),
            Err(e) => {
                println!("error={e}");
                break;
            }
        }
    }
    println!("open={}", held.len());
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().lines().count();
}
