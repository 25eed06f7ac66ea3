//! A test client: connects (TCP, or connected UDP), sends one message, reads
//! one reply, and prints what the socket reports, as `key=value` lines:
//!
//! ```text
//! local=127.0.0.1:40000
//! peer=127.0.0.1:443
//! reply=to:hello
//! ```
//!
//! Usage: `probe tcp|udp ADDR MESSAGE`. Exits 1 with `error=…` on failure.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [proto, addr, message] = args.as_slice() else {
        eprintln!("usage: probe tcp|udp ADDR MESSAGE");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is ip:port or [ip6]:port");
    let result = match proto.as_str() {
        "tcp" => tcp(addr, message),
        "udp" => udp(addr, message),
        other => Err(format!("unknown protocol {other}")),
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

fn udp(addr: SocketAddr, message: &str) -> Result<Report, String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    socket.connect(addr).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    socket.send(message.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let peer = socket.peer_addr().map_err(|e| e.to_string())?;
    Ok((local, peer, String::from_utf8_lossy(&buf[..n]).into_owned()))
}
