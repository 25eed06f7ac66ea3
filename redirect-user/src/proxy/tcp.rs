//! The TCP side of the proxy: accept, limit, connect to TO, copy both ways
//! with half-close, backpressure and an idle timeout; drain on shutdown.

use std::{
    cell::RefCell,
    future::Future,
    io,
    net::{Shutdown, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use socket2::SockRef;
use tokio::{
    io::{AsyncWriteExt as _, Interest},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::{Instant, Sleep, sleep, timeout},
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
    serve(listener, None, target, options, stats, limit, shutdown).await
}

/// [`run`] with the connection limit shared with other listeners of the
/// same mapping (one per worker thread); `guard` is dropped as soon as the
/// listener is closed.
pub(crate) async fn serve(
    listener: TcpListener,
    guard: Option<super::Listening>,
    target: Target,
    options: Arc<ProxyOptions>,
    stats: Arc<Stats>,
    limit: Arc<Semaphore>,
    shutdown: impl Future,
) -> Result<(), ProxyError> {
    let mut conns = JoinSet::new();
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux and the
    // BSDs): one setsockopt here instead of one per connection.
    let inherit_nodelay = cfg!(any(target_os = "linux", target_os = "macos"))
        && SockRef::from(&listener).set_tcp_nodelay(true).is_ok();
    // A listener on one address knows every connection's local address:
    // no getsockname per connection.
    let fixed_local = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    // Takes on an accepted connection, or closes it at once beyond the
    // limit.
    let admit = |conns: &mut JoinSet<()>, client: TcpStream, peer: SocketAddr| {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            let n = stats.refused.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                log::warn!(
                    "refusing {peer}: {} connections open (the limit); {} refused so far",
                    options.max_connections,
                    n + 1
                );
            }
            return;
        };
        Stats::add(&stats.accepted, 1);
        if !inherit_nodelay {
            let _ = client.set_nodelay(true);
        }
        conns.spawn(connection(
            client,
            peer,
            fixed_local,
            target,
            options.clone(),
            stats.clone(),
            permit,
        ));
    };
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
                admit(&mut conns, client, peer);
            }
        }
    }
    // Connections the kernel completed before the stop are established
    // for their clients: serve them too rather than reset them with the
    // listener.
    while let Ok((socket, addr)) = SockRef::from(&listener).accept() {
        let Some(peer) = addr.as_socket() else {
            continue;
        };
        if socket.set_nonblocking(true).is_err() {
            continue;
        }
        if let Ok(client) = TcpStream::from_std(socket.into()) {
            admit(&mut conns, client, peer);
        }
    }
    drop(listener);
    drop(guard);
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
    fixed_local: Option<SocketAddr>,
    target: Target,
    options: Arc<ProxyOptions>,
    stats: Arc<Stats>,
    _permit: OwnedSemaphorePermit,
) {
    Stats::add(&stats.active, 1);
    let _active = Active(stats.clone());
    let local = match fixed_local.map_or_else(|| client.local_addr(), Ok) {
        Ok(local) => local,
        Err(e) => {
            log::debug!("{peer}: getsockname: {e}");
            return;
        }
    };
    let backend = target.resolve(local);
    // One timer per connection serves the connect timeout and then the
    // idle timeout. It first expires no later than the connect deadline,
    // so no earlier than the timers of the connections made before it:
    // registering it never has to wake the runtime's driver (a timer due
    // before every other one does, with a write to its eventfd).
    let connect_deadline = Instant::now() + options.connect_timeout;
    let first = options
        .idle_timeout
        .map_or(options.connect_timeout, |idle| {
            idle.min(options.connect_timeout)
        });
    let timer = sleep(first);
    tokio::pin!(timer);
    let connecting = connect(backend);
    tokio::pin!(connecting);
    let connected = loop {
        tokio::select! {
            res = &mut connecting => break Some(res),
            () = &mut timer => {
                if Instant::now() >= connect_deadline {
                    break None;
                }
                timer.as_mut().reset(connect_deadline);
            }
        }
    };
    let mut upstream = match connected {
        Some(Ok(upstream)) => upstream,
        Some(Err(e)) => {
            Stats::add(&stats.connect_failed, 1);
            log::debug!("{peer}: connecting to {backend}: {e}");
            // The backend refused: refuse the client the same way.
            reset_on_close(&client);
            return;
        }
        None => {
            Stats::add(&stats.connect_failed, 1);
            log::debug!("{peer}: connecting to {backend}: timed out");
            return;
        }
    };
    if let Some(pp) = options.proxy_protocol {
        let header = pp.header(canonical(peer), canonical(local));
        if let Err(e) = upstream.write_all(&header).await {
            log::debug!("{peer}: writing the PROXY header to {backend}: {e}");
            return;
        }
    }
    match forward(&client, &upstream, &options, &stats, timer).await {
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
    timer: std::pin::Pin<&mut Sleep>,
) -> io::Result<Ended> {
    let start = Instant::now();
    let activity = AtomicU64::new(0);
    let one_done = AtomicBool::new(false);
    let both = async {
        tokio::try_join!(
            direction(
                client,
                upstream,
                options,
                start,
                &activity,
                &stats.bytes_up,
                &one_done,
                true
            ),
            direction(
                upstream,
                client,
                options,
                start,
                &activity,
                &stats.bytes_down,
                &one_done,
                false
            ),
        )
    };
    tokio::select! {
        res = both => res.map(|_| Ended::Closed),
        () = idle(options.idle_timeout, start, &activity, timer) => Ok(Ended::Idle),
    }
}

/// Resolves once nothing has moved for `limit` (never, for `None`),
/// checking whenever `timer` expires and setting it to the next deadline.
async fn idle(
    limit: Option<Duration>,
    start: Instant,
    activity: &AtomicU64,
    mut timer: std::pin::Pin<&mut Sleep>,
) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        timer.as_mut().await;
        let last = start + Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = last + limit;
        if Instant::now() >= deadline {
            return;
        }
        timer.as_mut().reset(deadline);
    }
}

/// Records that bytes moved now.
pub(crate) fn touch(start: Instant, activity: &AtomicU64) {
    let ms = start.elapsed().as_millis() as u64;
    activity.store(ms, Ordering::Relaxed);
}

/// Opens a connection to `addr` with TCP_NODELAY set before the connect
/// (request/response traffic is not held back by Nagle).
///
/// On Linux the socket is made with socket2 and connected by hand, so
/// that the outcome is read from the readiness itself: `getsockopt
/// (SO_ERROR)` is only asked when the kernel flagged an error or a hang-up
/// (tokio's `TcpSocket::connect` asks every time: one syscall per
/// connection saved).
#[cfg(target_os = "linux")]
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if (ready.is_error() || ready.is_write_closed())
        && let Some(e) = stream.take_error()?
    {
        return Err(e);
    }
    Ok(stream)
}

/// Opens a connection to `addr` with TCP_NODELAY set before the connect
/// (request/response traffic is not held back by Nagle).
#[cfg(not(target_os = "linux"))]
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

/// One direction, `from` → `to`, until end-of-file; then `to` is
/// half-closed (`shutdown(SHUT_WR)`), unless the other direction has ended
/// already: both sockets are about to be closed, which sends the FIN
/// anyway (no unread data is left on `to`, whose reading side is done), so
/// the syscall is saved.
#[allow(clippy::too_many_arguments)]
async fn direction(
    from: &TcpStream,
    to: &TcpStream,
    options: &ProxyOptions,
    start: Instant,
    activity: &AtomicU64,
    bytes: &AtomicU64,
    one_done: &AtomicBool,
    eager: bool,
) -> io::Result<()> {
    pump(from, to, options, start, activity, bytes, eager).await?;
    if !one_done.swap(true, Ordering::AcqRel) {
        SockRef::from(to)
            .shutdown(Shutdown::Write)
            .or_else(ignore_not_connected)?;
    }
    Ok(())
}

/// Bytes read at a time before a direction counts as bulk.
const SMALL: usize = 16 * 1024;

thread_local! {
    /// The buffer short messages pass through: read, then written at once,
    /// so it is free again before the task yields. Only what `to` does not
    /// take at once is copied out to the connection.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SMALL].into_boxed_slice());
}

/// Copies `from` → `to` until end-of-file.
///
/// Short messages (request/response, short connections) go through the
/// thread's scratch buffer: no allocation and no pipe per connection. A
/// read that fills the scratch buffer marks the direction as bulk; from
/// then on it copies with `splice(2)` ([`ProxyOptions::splice`], Linux) or
/// through a buffer of [`ProxyOptions::buffer_size`] bytes.
///
/// A write that cannot proceed (slow reader) stops the reads: memory
/// stays bounded by one buffer per direction, and the kernel's socket
/// buffers push back on the sender.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    options: &ProxyOptions,
    start: Instant,
    activity: &AtomicU64,
    bytes: &AtomicU64,
    mut eager: bool,
) -> io::Result<()> {
    loop {
        // Whether the peer's FIN has arrived (EPOLLRDHUP): then a read
        // shorter than the buffer empties the socket for good.
        let mut closed = false;
        if !eager {
            closed = from.ready(Interest::READABLE).await?.is_read_closed();
        }
        let mut pending: Vec<u8> = Vec::new();
        let read = SCRATCH.with_borrow_mut(|buf| {
            let read = if eager {
                // The runtime has not seen `from` readable yet, but the
                // data may be there: try without waiting for its event.
                io::Read::read(&mut &*SockRef::from(from), buf)
            } else {
                from.try_read(buf)
            };
            eager = false;
            let n = match read {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            // The last bytes before the end: held (MSG_MORE) so that the
            // FIN the caller sends next leaves in the same segment.
            let last = closed && n > 0 && n < buf.len();
            let mut sent = 0;
            while sent < n {
                match write_some(to, &buf[sent..n], last) {
                    Ok(k) => sent += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            pending.extend_from_slice(&buf[sent..n]);
            Ok(Some((n, last)))
        })?;
        let (n, last) = match read {
            None => continue,
            Some((0, _)) => return Ok(()),
            Some(read) => read,
        };
        touch(start, activity);
        if !pending.is_empty() {
            write_all(to, &pending).await?;
            touch(start, activity);
        }
        Stats::add(bytes, n as u64);
        if last {
            // The end of stream is next: no read to learn it, and the
            // caller's shutdown carries the held bytes with the FIN.
            return Ok(());
        }
        if n < SMALL {
            // A short read emptied the socket: forget its readiness now
            // instead of learning it from one more read that fails with
            // EAGAIN. Safe because new data (or a FIN or reset: tokio keeps
            // the closed states) raises a new edge-triggered event.
            let _ = from.try_io(Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
        if n == SMALL {
            #[cfg(target_os = "linux")]
            if options.splice {
                return super::splice::pump(from, to, options.buffer_size, start, activity, bytes)
                    .await;
            }
            return buffered(from, to, options.buffer_size, start, activity, bytes).await;
        }
    }
}

/// Copies `from` → `to` through a buffer of `size` bytes until end-of-file
/// (a bulk direction without splice).
///
/// The buffer is allocated when data arrives and freed once `from` has
/// nothing more to read, so an idle connection holds no buffer.
async fn buffered(
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
            Ok(0) => return Ok(()),
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

/// Writes what `to` takes of `data` now; with `more`, on Linux, with
/// `MSG_MORE`, so that the kernel holds a short tail for the FIN that
/// follows (one segment instead of two: what HAProxy does when it sees
/// both at once).
fn write_some(to: &TcpStream, data: &[u8], more: bool) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    if more {
        return to.try_io(Interest::WRITABLE, || {
            SockRef::from(to).send_with_flags(data, libc::MSG_MORE)
        });
    }
    let _ = more;
    to.try_write(data)
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
