//! The load generator and servers `cargo xtask bench` drives. Every load
//! loop is bounded in time (and every wait has a timeout), so it stops by
//! itself. Results are printed as one `key=value …` line.
//!
//! ```text
//! bench-agent serve-tcp ADDR             echo server (thread per connection)
//! bench-agent serve-udp ADDR             echo server
//! bench-agent conn-rate ADDR SECS        connect, 64-byte request, reply, close
//! bench-agent latency ADDR SECS          64-byte ping-pong on one connection
//! bench-agent udp-latency ADDR SECS      64-byte sendto/recvfrom ping-pong
//! bench-agent first-connect ADDR SECS    retry until one request succeeds;
//!                                        prints its wall-clock time (µs)
//! bench-agent hold-mappings CGROUP FROM:TO EXTRA
//!                                        attach with EXTRA filler mappings,
//!                                        print `ready`, hold until stdin closes
//! bench-agent add-mapping CGROUP N       attach, then time N run-time inserts
//! ```

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant, SystemTime},
};

use redirect::{Mapping, MappingSet, Options, Proto, Redirector};

const MSG: [u8; 64] = [b'x'; 64];
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> &str { args.get(i).map(String::as_str).unwrap_or_else(|| usage()) };
    let addr = || -> SocketAddr { arg(1).parse().expect("ADDR") };
    let secs = || Duration::from_secs_f64(arg(2).parse().expect("SECS"));
    match arg(0) {
        "serve-tcp" => serve_tcp(addr()),
        "serve-udp" => serve_udp(addr()),
        "conn-rate" => conn_rate(addr(), secs()),
        "latency" => latency(addr(), secs()),
        "udp-latency" => udp_latency(addr(), secs()),
        "first-connect" => first_connect(addr(), secs()),
        "hold-mappings" => hold_mappings(arg(1), arg(2), arg(3).parse().expect("EXTRA")),
        "add-mapping" => add_mapping(arg(1), arg(2).parse().expect("N")),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: see the module documentation of bench-agent");
    std::process::exit(2);
}

fn serve_tcp(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).expect("bind");
    for stream in listener.incoming().flatten() {
        thread::spawn(move || echo(stream));
    }
}

/// Echoes until the client shuts down its side, then closes first, so the
/// TIME_WAIT lands here and the client's ephemeral ports are not exhausted.
fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

fn serve_udp(addr: SocketAddr) {
    let socket = UdpSocket::bind(addr).expect("bind");
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    }
}

/// One request: connect, send 64 bytes, read them back, close.
fn one_request(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&MSG)?;
    stream.shutdown(Shutdown::Write)?;
    let mut buf = [0u8; 64];
    stream.read_exact(&mut buf)?;
    Ok(())
}

fn conn_rate(addr: SocketAddr, secs: Duration) {
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < secs {
        one_request(addr).expect("request");
        done += 1;
    }
    println!("value={:.1}", done as f64 / start.elapsed().as_secs_f64());
}

fn percentiles(mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    println!(
        "p50={:.2} p99={:.2} n={}",
        at(0.50),
        at(0.99),
        samples.len()
    );
}

fn latency(addr: SocketAddr, secs: Duration) {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < secs {
        let t = Instant::now();
        stream.write_all(&MSG).expect("write");
        stream.read_exact(&mut buf).expect("read");
        samples.push(t.elapsed());
    }
    percentiles(samples);
}

fn udp_latency(addr: SocketAddr, secs: Duration) {
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).expect("bind");
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buf = [0u8; 2048];
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < secs {
        let t = Instant::now();
        socket.send_to(&MSG, addr).expect("sendto");
        socket.recv_from(&mut buf).expect("recvfrom");
        samples.push(t.elapsed());
    }
    percentiles(samples);
}

fn first_connect(addr: SocketAddr, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if one_request(addr).is_ok() {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap();
            println!("at_us={}", now.as_micros());
            return;
        }
        thread::sleep(Duration::from_micros(200));
    }
    println!("error=timeout");
    std::process::exit(1);
}

/// Filler mappings that never match the measured traffic: FROM ports
/// 10000.., all to port 9 (sharing a target is allowed), TCP only.
fn fillers(n: u32) -> impl Iterator<Item = Mapping> {
    (0..n).map(|i| Mapping::new(10_000 + i as u16, 9).with_proto(Proto::Tcp))
}

fn hold_mappings(cgroup: &str, mapping: &str, extra: u32) {
    let mut set = MappingSet::parse([mapping]).expect("mapping");
    for m in fillers(extra) {
        set.insert(m).expect("filler");
    }
    let _redirector =
        Redirector::attach(cgroup.as_ref(), set, &Options::default()).expect("attach");
    println!("ready");
    // Hold until our stdin closes (bounded by the caller).
    let _ = std::io::stdin().lock().lines().count();
}

fn add_mapping(cgroup: &str, n: u32) {
    let start = Instant::now();
    let mut redirector = Redirector::attach(
        cgroup.as_ref(),
        MappingSet::parse(["1:2"]).unwrap(),
        &Options::default(),
    )
    .expect("attach");
    let attach = start.elapsed();
    let mut samples = Vec::new();
    for m in fillers(n) {
        let t = Instant::now();
        redirector.insert(m).expect("insert");
        samples.push(t.elapsed());
    }
    print!("attach_ms={:.2} ", attach.as_secs_f64() * 1e3);
    percentiles(samples);
}
