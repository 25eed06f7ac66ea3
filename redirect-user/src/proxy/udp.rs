//! The UDP side of the proxy: one session per client address, each with its
//! own connected socket to TO; replies go back to the client from the FROM
//! socket, so the client sees them come from the port it asked for.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::UdpSocket,
    task::JoinHandle,
    time::{Instant, interval},
};

use super::{ProxyError, ProxyOptions, Stats, tcp::touch};

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

struct Session {
    upstream: Arc<UdpSocket>,
    activity: Arc<AtomicU64>,
    replies: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Forwards datagrams arriving on `socket` (FROM) to `target` until
/// `shutdown` completes.
///
/// Each client address gets a session: a socket of its own connected to
/// `target`, so replies can be told apart, and a task that sends them back
/// to the client through `socket`. A session ends after
/// [`ProxyOptions::udp_idle_timeout`] without a datagram either way; with
/// [`ProxyOptions::max_udp_sessions`] open, the one idle the longest makes
/// room for a new client.
///
/// # Errors
///
/// Only if receiving on `socket` fails for a reason other than an ICMP
/// error reported by the kernel.
pub async fn run(
    socket: UdpSocket,
    target: SocketAddr,
    options: Arc<ProxyOptions>,
    stats: Arc<Stats>,
    shutdown: impl Future,
) -> Result<(), ProxyError> {
    let socket = Arc::new(socket);
    let start = Instant::now();
    let idle = options.udp_idle_timeout;
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut sweep = interval((idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = sweep.tick() => {
                let now = start.elapsed().as_millis() as u64;
                let limit = idle.as_millis() as u64;
                let before = sessions.len();
                sessions.retain(|_, s| now.saturating_sub(s.activity.load(Ordering::Relaxed)) < limit);
                expire(&stats, before - sessions.len());
            }
            received = socket.recv_from(&mut buf) => {
                let (n, client) = match received {
                    Ok(r) => r,
                    // An ICMP error for an earlier reply (Windows and
                    // Linux report them on the next receive).
                    Err(e) if is_icmp_report(&e) => continue,
                    Err(e) => return Err(ProxyError::Io { op: "receiving on the UDP FROM socket", source: e }),
                };
                if !sessions.contains_key(&client) {
                    if sessions.len() >= options.max_udp_sessions {
                        evict_idlest(&mut sessions, &stats);
                    }
                    match open(client, target, &socket, start, &stats).await {
                        Ok(s) => {
                            sessions.insert(client, s);
                        }
                        Err(e) => {
                            log::debug!("udp {client}: opening a session to {target}: {e}");
                            continue;
                        }
                    }
                }
                let session = &sessions[&client];
                touch(start, &session.activity);
                match session.upstream.send(&buf[..n]).await {
                    Ok(_) => Stats::add(&stats.bytes_up, n as u64),
                    Err(e) => log::debug!("udp {client} -> {target}: {e}"),
                }
            }
        }
    }
    let open = sessions.len();
    sessions.clear();
    stats.udp_sessions.fetch_sub(open as u64, Ordering::Relaxed);
    Ok(())
}

fn expire(stats: &Stats, n: usize) {
    if n > 0 {
        stats.udp_sessions.fetch_sub(n as u64, Ordering::Relaxed);
        Stats::add(&stats.udp_expired, n as u64);
    }
}

fn evict_idlest(sessions: &mut HashMap<SocketAddr, Session>, stats: &Stats) {
    let idlest = sessions
        .iter()
        .min_by_key(|(_, s)| s.activity.load(Ordering::Relaxed))
        .map(|(addr, _)| *addr);
    if let Some(addr) = idlest {
        sessions.remove(&addr);
        expire(stats, 1);
    }
}

fn is_icmp_report(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    )
}

/// A new session for `client`: a socket connected to `target` and the task
/// relaying its replies to the client from `downstream` (FROM).
async fn open(
    client: SocketAddr,
    target: SocketAddr,
    downstream: &Arc<UdpSocket>,
    start: Instant,
    stats: &Arc<Stats>,
) -> io::Result<Session> {
    let any: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let upstream = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    upstream.connect(target).await?;
    let upstream = Arc::new(upstream);
    let activity = Arc::new(AtomicU64::new(0));
    touch(start, &activity);
    let replies = tokio::spawn(relay_replies(
        client,
        upstream.clone(),
        downstream.clone(),
        activity.clone(),
        start,
        stats.clone(),
    ));
    Stats::add(&stats.udp_sessions, 1);
    Ok(Session {
        upstream,
        activity,
        replies,
    })
}

/// Sends every reply from TO back to `client` from FROM. The buffer exists
/// only while a reply is being relayed, so idle sessions hold none.
async fn relay_replies(
    client: SocketAddr,
    upstream: Arc<UdpSocket>,
    downstream: Arc<UdpSocket>,
    activity: Arc<AtomicU64>,
    start: Instant,
    stats: Arc<Stats>,
) {
    loop {
        if upstream.readable().await.is_err() {
            return;
        }
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            match upstream.try_recv(&mut buf) {
                Ok(n) => {
                    touch(start, &activity);
                    match downstream.send_to(&buf[..n], client).await {
                        Ok(_) => Stats::add(&stats.bytes_down, n as u64),
                        Err(e) => log::debug!("udp reply to {client}: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // TO is not listening (ICMP port unreachable): keep the
                // session; the client times out as it would without us.
                Err(e) if is_icmp_report(&e) => break,
                Err(e) => {
                    log::debug!("udp session {client}: {e}");
                    return;
                }
            }
        }
    }
}
