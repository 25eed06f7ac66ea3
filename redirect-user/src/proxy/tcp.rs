//! The TCP side of the proxy: accept, limit, connect to TO, copy both ways
//! with half-close, backpressure and an idle timeout; drain on shutdown.

use std::{
    future::Future,
    io,
    net::{Shutdown, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use socket2::SockRef;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::{Instant, sleep, sleep_until, timeout},
};

use super::{ProxyError, ProxyOptions, Stats, Target, canonical, reset_on_close};

/// Accepts connections on `listener` and forwards each to `target` until
/// `shutdown` completes; then stops accepting (the listener is closed, so
/// new clients are refused by the kernel) and lets the connections in
/// flight finish for up to [`ProxyOptions::drain_timeout`] before closing
/// the rest.
///
/// Beyond [`ProxyOptions::max_connections`] open connections, a new one is
/// accepted and closed at once: the client reads end-of-file instead of
/// waiting in the backlog.
///
/// # Errors
///
/// Only if the listener itself fails; errors of single connections are
/// logged at debug level and counted in `stats`. Running out of file
/// descriptors pauses accepting for 100 ms instead of spinning.
pub async fn run(
    listener: TcpListener,
    target: Target,
    options: Arc<ProxyOptions>,
    stats: Arc<Stats>,
    shutdown: impl Future,
) -> Result<(), ProxyError> {
    let limit = Arc::new(Semaphore::new(options.max_connections));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (client, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) if is_fd_exhaustion(&e) => {
                        log::warn!("accept: {e}; pausing 100 ms (raise the open files limit)");
                        sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(e) => {
                        log::debug!("accept: {e}");
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    let n = stats.refused.fetch_add(1, Ordering::Relaxed);
                    if n.is_power_of_two() || n == 0 {
                        log::warn!(
                            "refusing {peer}: {} connections open (the limit); {} refused so far",
                            options.max_connections,
                            n + 1
                        );
                    }
                    drop(client);
                    continue;
                };
                Stats::add(&stats.accepted, 1);
                conns.spawn(connection(client, peer, target, options.clone(), stats.clone(), permit));
            }
        }
    }
    drop(listener);
    let open = conns.len();
    if open > 0 {
        log::info!(
            "draining {open} connection(s) for up to {:?}",
            options.drain_timeout
        );
    }
    let drained = timeout(options.drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let left = conns.len() as u64;
        log::warn!("closing {left} connection(s) still open after the drain deadline");
        Stats::add(&stats.drain_aborted, left);
        conns.shutdown().await;
    }
    Ok(())
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// Decrements `active` when the connection ends, however it ends (also
/// when the drain deadline aborts its task).
struct Active(Arc<Stats>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    client: TcpStream,
    peer: SocketAddr,
    target: Target,
    options: Arc<ProxyOptions>,
    stats: Arc<Stats>,
    _permit: OwnedSemaphorePermit,
) {
    Stats::add(&stats.active, 1);
    let _active = Active(stats.clone());
    let local = match client.local_addr() {
        Ok(local) => local,
        Err(e) => {
            log::debug!("{peer}: getsockname: {e}");
            return;
        }
    };
    let backend = target.resolve(local);
    let mut upstream = match timeout(options.connect_timeout, TcpStream::connect(backend)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            Stats::add(&stats.connect_failed, 1);
            log::debug!("{peer}: connecting to {backend}: {e}");
            // The backend refused: refuse the client the same way.
            reset_on_close(&client);
            return;
        }
        Err(_) => {
            Stats::add(&stats.connect_failed, 1);
            log::debug!("{peer}: connecting to {backend}: timed out");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Some(pp) = options.proxy_protocol {
        let header = pp.header(canonical(peer), canonical(local));
        if let Err(e) = upstream.write_all(&header).await {
            log::debug!("{peer}: writing the PROXY header to {backend}: {e}");
            return;
        }
    }
    match forward(&client, &upstream, &options, &stats).await {
        Ok(Ended::Closed) => {}
        Ok(Ended::Idle) => {
            Stats::add(&stats.idle_closed, 1);
            log::debug!("{peer}: idle for {:?}, closed", options.idle_timeout);
        }
        Err(e) => {
            log::debug!("{peer} <-> {backend}: {e}");
            // Pass the failure (usually a reset) on to both sides.
            reset_on_close(&client);
            reset_on_close(&upstream);
        }
    }
}

enum Ended {
    /// Both directions reached end-of-file.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
}

/// Copies both ways until both directions have ended, an error occurs, or
/// nothing moves for the idle timeout. The end of one direction is passed
/// on as a half-close (`shutdown(SHUT_WR)`), and the other direction keeps
/// going.
async fn forward(
    client: &TcpStream,
    upstream: &TcpStream,
    options: &ProxyOptions,
    stats: &Stats,
) -> io::Result<Ended> {
    let start = Instant::now();
    let activity = AtomicU64::new(0);
    let both = async {
        #[cfg(target_os = "linux")]
        if options.splice {
            return tokio::try_join!(
                super::splice::pump(
                    client,
                    upstream,
                    options.buffer_size,
                    start,
                    &activity,
                    &stats.bytes_up
                ),
                super::splice::pump(
                    upstream,
                    client,
                    options.buffer_size,
                    start,
                    &activity,
                    &stats.bytes_down
                ),
            );
        }
        tokio::try_join!(
            pump(
                client,
                upstream,
                options.buffer_size,
                start,
                &activity,
                &stats.bytes_up
            ),
            pump(
                upstream,
                client,
                options.buffer_size,
                start,
                &activity,
                &stats.bytes_down
            ),
        )
    };
    tokio::select! {
        res = both => res.map(|_| Ended::Closed),
        () = idle(options.idle_timeout, start, &activity) => Ok(Ended::Idle),
    }
}

/// Resolves once nothing has moved for `limit` (never, for `None`).
async fn idle(limit: Option<Duration>, start: Instant, activity: &AtomicU64) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let last = start + Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = last + limit;
        if Instant::now() >= deadline {
            return;
        }
        sleep_until(deadline).await;
    }
}

/// Records that bytes moved now.
pub(crate) fn touch(start: Instant, activity: &AtomicU64) {
    let ms = start.elapsed().as_millis() as u64;
    activity.store(ms, Ordering::Relaxed);
}

/// Copies `from` → `to` through a buffer of `size` bytes until end-of-file,
/// then half-closes `to`.
///
/// The buffer is allocated when data arrives and freed once `from` has
/// nothing more to read, so an idle connection holds no buffer. A write
/// that cannot proceed (slow reader) stops the reads: memory stays bounded
/// by one buffer per direction, and the kernel's socket buffers push back
/// on the sender.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    size: usize,
    start: Instant,
    activity: &AtomicU64,
    bytes: &AtomicU64,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        from.readable().await?;
        if buf.is_empty() {
            buf = vec![0; size];
        }
        match from.try_read(&mut buf) {
            Ok(0) => {
                SockRef::from(to)
                    .shutdown(Shutdown::Write)
                    .or_else(ignore_not_connected)?;
                return Ok(());
            }
            Ok(n) => {
                touch(start, activity);
                write_all(to, &buf[..n]).await?;
                Stats::add(bytes, n as u64);
                touch(start, activity);
            }
            // Nothing left for now: give the buffer back while waiting.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf = Vec::new(),
            Err(e) => return Err(e),
        }
    }
}

/// A peer that already closed both ways makes shutdown fail with ENOTCONN,
/// which is not an error here.
pub(crate) fn ignore_not_connected(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotConnected {
        Ok(())
    } else {
        Err(e)
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
