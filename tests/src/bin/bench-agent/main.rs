//! The load generator and servers `cargo xtask bench` drives. Every load
//! loop is bounded in time (and every wait has a timeout), so it stops by
//! itself. Results are printed as one `key=value …` line.
//!
//! ```text
//! bench-agent serve-tcp ADDR [--cpu C]   event-driven TCP server (one thread)
//! bench-agent serve-udp ADDR [--cpu C]   UDP echo server
//! bench-agent conn-rate ADDR SECS [--inflight N] [--cpu C] [--linger0] [TURNS]
//!                                        new connections per second
//! bench-agent latency ADDR SECS [--cpu C] [TURNS]      64-byte ping-pong, one connection
//! bench-agent udp-latency ADDR SECS [--cpu C] [TURNS]  64-byte sendto/recvfrom ping-pong
//!
//! TURNS = --turn OURS THEIRS [--first] [--slice-ms MS]: take turns of MS
//! (100) with a second client through two FIFOs (see `Turns`).
//! bench-agent first-connect ADDR SECS    retry until one request succeeds;
//!                                        prints its wall-clock time (µs)
//! bench-agent hold-mappings CGROUP FROM:TO EXTRA
//!                                        attach with EXTRA filler mappings,
//!                                        print `ready`, hold until stdin closes
//! bench-agent add-mapping CGROUP N       attach, then time N run-time inserts
//! bench-agent add-scope CGROUP N         load the program set once, then time
//!                                        attaching N scopes (children of
//!                                        CGROUP) and 200 mapping adds to one
//! bench-agent hold-scopes CGROUP FROM:TO EXTRA PARENT
//!                                        one program set: CGROUP's scope and
//!                                        EXTRA more (children of PARENT);
//!                                        `ready`, hold until stdin closes
//! bench-agent proxy-memory PID ADDR CONNS SECS
//!                                        the proxy PID's RSS with CONNS idle
//!                                        connections through ADDR, then over
//!                                        a SECS connection-rate run
//! bench-agent daemon REDIRECT PARENT SCOPES CONTAINERS
//!                                        `REDIRECT daemon`: cold start, SCOPES
//!                                        scopes and 200 mappings through its
//!                                        socket, CONTAINERS stand-in
//!                                        containers through `oci-hook`
//! ```
//!
//! # The TCP protocol
//!
//! The first byte a client sends picks the mode of its connection:
//! - `C` (connection-rate mode): the client sends one 64-byte request; the
//!   server answers 64 bytes and closes first. The client reads the reply
//!   and the end of stream and closes (or, with `--linger0`, resets right
//!   after the reply). The TIME_WAIT state thus lands on the server's side
//!   (whose port is fixed, so it never blocks a new connect), and the
//!   client's ephemeral ports never run out.
//! - anything else (echo mode): the server echoes every byte until the
//!   client closes. Used by `latency` and `first-connect`.
//!
//! # Why it is built this way
//!
//! The connection-rate client is one thread with N connections in flight
//! (mio, i.e. epoll): nonblocking connects, a fixed table of slots, no
//! allocation per connection. The server is one thread too (an accept loop
//! that tries the read at once, before registering the socket). A thread
//! per connection (the first version) spent most of its time creating
//! threads and measured ~11,000 conn/s where this machine does ~45,000.
//!
//! `--cpu C` pins the calling process to one CPU (`sched_setaffinity`).
//! The latency workloads pin client and server to fixed CPUs so that every
//! run sees the same placement: unpinned, the scheduler sometimes puts them
//! on one CPU and sometimes on two, and the median moved by 13× between
//! two identical runs.

mod daemon;
mod memory;

use std::{
    io::{self, BufRead as _, ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant, SystemTime},
};

use mio::{
    Events, Interest, Poll, Token,
    net::{TcpListener as MioListener, TcpStream as MioStream},
};
use redirect::{
    LoadOptions, Mapping, MappingSet, Options, Programs, Proto, Redirector, cgroup::ChildCgroup,
};

/// The echo-mode request (first byte not `C`).
const MSG: [u8; 64] = [b'x'; 64];
/// The connection-rate request: first byte `C`.
const CONN_MSG: [u8; 64] = {
    let mut m = [b'x'; 64];
    m[0] = b'C';
    m
};
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Samples at the start of a latency loop that are thrown away (cold
/// caches, the first wake-ups).
const WARMUP: Duration = Duration::from_millis(100);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> &str { args.get(i).map(String::as_str).unwrap_or_else(|| usage()) };
    let addr = || -> SocketAddr { arg(1).parse().expect("ADDR") };
    let secs = || Duration::from_secs_f64(arg(2).parse().expect("SECS"));
    let flag = |name: &str| args.iter().any(|a| a == name);
    let opt = |name: &str| -> Option<usize> {
        let i = args.iter().position(|a| a == name)?;
        Some(arg(i + 1).parse().unwrap_or_else(|_| usage()))
    };
    if let Some(cpu) = opt("--cpu") {
        pin(cpu);
    }
    match arg(0) {
        "serve-tcp" => serve_tcp(addr()),
        "serve-udp" => serve_udp(addr()),
        "conn-rate" => conn_rate(
            addr(),
            secs(),
            opt("--inflight").unwrap_or(8),
            flag("--linger0"),
            Turns::from_args(&args),
        ),
        "latency" => latency(addr(), secs(), Turns::from_args(&args)),
        "udp-latency" => udp_latency(addr(), secs(), Turns::from_args(&args)),
        "first-connect" => first_connect(addr(), secs()),
        "hold-mappings" => hold_mappings(arg(1), arg(2), arg(3).parse().expect("EXTRA")),
        "add-mapping" => add_mapping(arg(1), arg(2).parse().expect("N")),
        "add-scope" => add_scope(arg(1), arg(2).parse().expect("N")),
        "hold-scopes" => {
            daemon::hold_scopes(arg(1), arg(2), arg(3).parse().expect("EXTRA"), arg(4))
        }
        "daemon" => daemon::daemon(
            arg(1),
            arg(2),
            arg(3).parse().expect("SCOPES"),
            arg(4).parse().expect("CONTAINERS"),
        ),
        "proxy-memory" => memory::proxy_memory(
            arg(1).parse().expect("PID"),
            arg(2).parse().expect("ADDR"),
            arg(3).parse().expect("CONNS"),
            Duration::from_secs_f64(arg(4).parse().expect("SECS")),
        ),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: see the module documentation of bench-agent");
    std::process::exit(2);
}

/// Pins this process (its calling thread, before any other starts) to
/// `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity only read and write it.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    };
    if !ok {
        eprintln!(
            "bench-agent: pinning to CPU {cpu}: {}",
            io::Error::last_os_error()
        );
        std::process::exit(2);
    }
}

// ---------------------------------------------------------------- servers

const LISTENER: Token = Token(usize::MAX);

/// One accepted connection of the server.
struct Conn {
    stream: MioStream,
    /// Bytes of a `C` request read so far; `None` until the first byte
    /// decides the mode, `Some(usize::MAX)` in echo mode.
    got: Option<usize>,
}

/// What to do with a connection after reading from it.
enum Next {
    Keep,
    Close,
}

fn serve_tcp(addr: SocketAddr) {
    let mut listener = MioListener::bind(addr).expect("bind");
    let mut poll = Poll::new().expect("epoll");
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .expect("register listener");
    let mut events = Events::with_capacity(256);
    // A slab: slot i holds the connection of Token(i); `free` lists the
    // empty ones. It grows to the peak number of open connections, then
    // stays: no allocation per connection after warm-up.
    let mut conns: Vec<Option<Conn>> = Vec::with_capacity(1024);
    let mut free: Vec<usize> = Vec::with_capacity(1024);
    let mut buf = vec![0u8; 65536];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            panic!("epoll_wait: {e}");
        }
        for event in &events {
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let mut conn = Conn { stream, got: None };
                            // The request is often there already: serve it
                            // without an epoll round trip.
                            if let Next::Close = serve(&mut conn, &mut buf) {
                                continue;
                            }
                            let slot = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            if poll
                                .registry()
                                .register(&mut conn.stream, Token(slot), Interest::READABLE)
                                .is_ok()
                            {
                                conns[slot] = Some(conn);
                            } else {
                                free.push(slot);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        // ECONNABORTED and friends: the next one.
                        Err(_) => continue,
                    }
                }
                continue;
            }
            let slot = event.token().0;
            let Some(conn) = conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if let Next::Close = serve(conn, &mut buf) {
                // Dropping the stream closes it, which also removes it from
                // the epoll set.
                conns[slot] = None;
                free.push(slot);
            }
        }
    }
}

/// Reads what `conn` has (edge-triggered: until WouldBlock) and answers.
fn serve(conn: &mut Conn, buf: &mut [u8]) -> Next {
    loop {
        match conn.stream.read(buf) {
            Ok(0) => return Next::Close,
            Ok(n) => {
                let got = *conn.got.get_or_insert(if buf[0] == b'C' {
                    0
                } else {
                    let _ = conn.stream.set_nodelay(true);
                    usize::MAX
                });
                if got == usize::MAX {
                    if write_all_nb(&mut conn.stream, &buf[..n]).is_err() {
                        return Next::Close;
                    }
                } else {
                    let got = got + n;
                    conn.got = Some(got);
                    if got >= CONN_MSG.len() {
                        // Answer and close first (see the module docs).
                        let _ = conn.stream.write(&CONN_MSG);
                        return Next::Close;
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
}

/// Writes all of `data` on a nonblocking socket, waiting (briefly, bounded)
/// when its buffer is full: echo replies are small, so this is rare.
fn write_all_nb(stream: &mut MioStream, mut data: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + IO_TIMEOUT;
    while !data.is_empty() {
        match stream.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_micros(50));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

// ------------------------------------------------------- connection rate

/// A connection-rate client slot.
struct Slot {
    stream: Option<MioStream>,
    /// Request sent; now reading the reply.
    sent: bool,
    /// Reply bytes read.
    got: usize,
}

/// Counts of a connection-rate run.
#[derive(Default)]
struct ConnCounts {
    done: u64,
    opened: u64,
    errors: u64,
}

/// Opens connections to `addr`, `inflight` at a time, each: connect,
/// 64-byte `C` request, 64-byte reply, close; for `secs` in all, in turns
/// (see [`Turns`]). Prints the rate over the time spent in its turns.
fn conn_rate(addr: SocketAddr, secs: Duration, inflight: usize, linger0: bool, turns: Turns) {
    let mut load = ConnLoad::new(inflight);
    // In turns, the connections still in flight when a turn ends get a
    // short grace and are then abandoned (not counted): waiting for a
    // straggler (a SYN dropped by a full backlog is retried after 1 s)
    // would stretch a 100 ms turn to a second.
    let grace = if turns.fifos.is_some() {
        Duration::from_millis(20)
    } else {
        IO_TIMEOUT
    };
    let busy = turns.run(secs, Duration::ZERO, |until| {
        load.burst(addr, until, grace, linger0);
    });
    let ConnCounts {
        done,
        opened,
        errors,
    } = load.counts;
    println!(
        "value={:.1} n={done} opened={opened} errors={errors}",
        done as f64 / busy.as_secs_f64()
    );
}

/// A connection-rate load: a fixed table of slots (the connections in
/// flight) on one epoll, and what they have counted so far.
struct ConnLoad {
    poll: Poll,
    events: Events,
    slots: Vec<Slot>,
    counts: ConnCounts,
}

impl ConnLoad {
    /// `inflight` empty slots.
    fn new(inflight: usize) -> Self {
        ConnLoad {
            poll: Poll::new().expect("epoll"),
            events: Events::with_capacity(inflight.max(1) * 2),
            slots: (0..inflight)
                .map(|_| Slot {
                    stream: None,
                    sent: false,
                    got: 0,
                })
                .collect(),
            counts: ConnCounts::default(),
        }
    }

    /// Keeps the slots full of connections to `addr` until `until`, then
    /// lets those in flight finish (counted too: the time they take is
    /// part of the burst) for up to `grace`.
    fn burst(&mut self, addr: SocketAddr, until: Instant, grace: Duration, linger0: bool) {
        let ConnLoad {
            poll,
            events,
            slots,
            counts,
        } = self;
        let mut buf = [0u8; 256];
        let registry = poll.registry().try_clone().expect("epoll registry");
        let open = |slot: &mut Slot, i: usize| -> io::Result<()> {
            let mut stream = MioStream::connect(addr)?;
            registry.register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            *slot = Slot {
                stream: Some(stream),
                sent: false,
                got: 0,
            };
            Ok(())
        };
        for (i, slot) in slots.iter_mut().enumerate() {
            open(slot, i).expect("connect");
            counts.opened += 1;
        }
        let mut open_slots = slots.len();
        let mut now = Instant::now();
        // Stops opening at `until`; the connections in flight then finish (or
        // are abandoned after a grace period).
        while open_slots > 0 && now < until + grace {
            let left = (until + grace).saturating_duration_since(now);
            poll.poll(events, Some(left.min(Duration::from_millis(100))))
                .or_else(|e| {
                    if e.kind() == ErrorKind::Interrupted {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .expect("epoll_wait");
            now = Instant::now();
            for event in events.iter() {
                let i = event.token().0;
                let slot = &mut slots[i];
                let Some(stream) = slot.stream.as_mut() else {
                    continue;
                };
                let failed = event.is_error();
                let finished =
                    match step(stream, slot.sent, failed, &mut slot.got, &mut buf, linger0) {
                        Step::Sent => {
                            slot.sent = true;
                            false
                        }
                        Step::Wait => false,
                        Step::Done => {
                            counts.done += 1;
                            true
                        }
                        Step::Failed => {
                            counts.errors += 1;
                            true
                        }
                    };
                if finished {
                    slot.stream = None; // close
                    if now < until {
                        if let Err(e) = open(slot, i) {
                            counts.errors += 1;
                            eprintln!("bench-agent: connect: {e}");
                            open_slots -= 1;
                        } else {
                            counts.opened += 1;
                        }
                    } else {
                        open_slots -= 1;
                    }
                }
            }
            assert!(
                counts.errors <= 100 + counts.done / 100,
                "conn-rate: {} failed connections ({} done): see the server",
                counts.errors,
                counts.done
            );
        }
        // Abandoned after the grace period: closed here.
        for slot in slots.iter_mut() {
            slot.stream = None;
        }
    }
}

/// Taking turns with a second client: this one works only while it holds
/// the turn (a byte passed through two FIFOs), for `slice` at a time, so
/// that two clients measuring two paths alternate every 100 ms and see
/// the same machine. Without `--turn`, one turn as long as the run.
struct Turns {
    /// (ours to wait on, theirs to hand over to), and whether we start.
    fifos: Option<(std::fs::File, std::fs::File, bool)>,
    slice: Duration,
}

impl Turns {
    fn from_args(args: &[String]) -> Turns {
        let i = args.iter().position(|a| a == "--turn");
        let slice_ms = args
            .iter()
            .position(|a| a == "--slice-ms")
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(100);
        let fifos = i.map(|i| {
            let open = |p: &String| {
                // Read-write: opening a FIFO this way never blocks, so
                // neither client waits for the other to open its end.
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .unwrap_or_else(|e| panic!("opening {p}: {e}"))
            };
            let (ours, theirs) = (&args[i + 1], &args[i + 2]);
            (
                open(ours),
                open(theirs),
                args.iter().any(|a| a == "--first"),
            )
        });
        Turns {
            fifos,
            slice: Duration::from_millis(slice_ms),
        }
    }

    /// Calls `work(until)` in turns until it has had `secs` of turns (after
    /// a first, uncounted `warmup` inside the first turn); returns the time
    /// spent in counted turns.
    fn run(&self, secs: Duration, warmup: Duration, mut work: impl FnMut(Instant)) -> Duration {
        let Some((ours, theirs, first)) = &self.fifos else {
            if !warmup.is_zero() {
                work(Instant::now() + warmup);
            }
            let t = Instant::now();
            work(t + secs);
            return t.elapsed();
        };
        let turns = secs.as_nanos().div_ceil(self.slice.as_nanos()).max(1);
        let mut token = [0u8; 1];
        let mut busy = Duration::ZERO;
        for n in 0..turns {
            if n > 0 || !first {
                wait_turn(ours, &mut token);
            }
            if n == 0 && !warmup.is_zero() {
                work(Instant::now() + warmup);
            }
            let t = Instant::now();
            work(t + self.slice);
            busy += t.elapsed();
            (&*theirs).write_all(b"t").expect("handing the turn over");
        }
        busy
    }
}

/// Waits (up to 30 s: the other client died, or is stuck) for the turn.
fn wait_turn(fifo: &std::fs::File, token: &mut [u8; 1]) {
    use std::os::fd::AsRawFd as _;
    let mut pfd = libc::pollfd {
        fd: fifo.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 30_000) };
    assert!(ready == 1, "the other client never handed the turn over");
    let mut f = fifo;
    f.read_exact(token).expect("reading the turn");
}

enum Step {
    Sent,
    Wait,
    Done,
    Failed,
}

/// Advances one connection-rate connection on an event (`failed`: the
/// event carries EPOLLERR).
fn step(
    stream: &mut MioStream,
    sent: bool,
    failed: bool,
    got: &mut usize,
    buf: &mut [u8],
    linger0: bool,
) -> Step {
    if !sent {
        // Writable without EPOLLERR means connected: no getsockopt
        // (SO_ERROR) needed on the way.
        if failed {
            return Step::Failed;
        }
        return match stream.write(&CONN_MSG) {
            Ok(n) if n == CONN_MSG.len() => Step::Sent,
            Err(e) if e.kind() == ErrorKind::WouldBlock => Step::Wait,
            // NotConnected: the event was not the connect completing.
            Err(e) if e.kind() == ErrorKind::NotConnected => Step::Wait,
            _ => Step::Failed,
        };
    }
    loop {
        match stream.read(buf) {
            Ok(0) => {
                return if *got >= CONN_MSG.len() {
                    Step::Done
                } else {
                    Step::Failed
                };
            }
            Ok(n) => {
                *got += n;
                if linger0 && *got >= CONN_MSG.len() {
                    // Reset instead of a FIN: no TIME_WAIT on either side.
                    let _ = socket2::SockRef::from(&*stream).set_linger(Some(Duration::ZERO));
                    return Step::Done;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Step::Failed,
        }
    }
}

// ---------------------------------------------------------------- latency

/// Prints p50, p99 (µs) and the sample count; `total` counts the warm-up
/// too (every request the programs saw).
fn percentiles(mut samples: Vec<u32>, total: u64) {
    assert!(!samples.is_empty(), "no latency samples");
    samples.sort_unstable();
    let at = |q: f64| f64::from(samples[((samples.len() - 1) as f64 * q) as usize]) / 1e3;
    println!(
        "p50={:.2} p99={:.2} n={} total={total}",
        at(0.50),
        at(0.99),
        samples.len()
    );
}

/// Runs `once` (one request/response) for `secs` of turns after a
/// warm-up; returns the round trips in ns and the number of requests,
/// warm-up included. The sample buffer is allocated up front.
fn sample(secs: Duration, turns: &Turns, mut once: impl FnMut()) -> (Vec<u32>, u64) {
    let mut samples: Vec<u32> = Vec::with_capacity(4_000_000);
    let mut total = 0u64;
    let mut warm = true;
    turns.run(secs, WARMUP, |until| {
        while Instant::now() < until && samples.len() < samples.capacity() {
            let t = Instant::now();
            once();
            total += 1;
            if !warm {
                samples.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
            }
        }
        // The first call is the warm-up.
        warm = false;
    });
    (samples, total)
}

fn latency(addr: SocketAddr, secs: Duration, turns: Turns) {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    let (samples, total) = sample(secs, &turns, || {
        stream.write_all(&MSG).expect("write");
        stream.read_exact(&mut buf).expect("read");
    });
    percentiles(samples, total);
}

fn udp_latency(addr: SocketAddr, secs: Duration, turns: Turns) {
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).expect("bind");
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buf = [0u8; 2048];
    let (samples, total) = sample(secs, &turns, || {
        socket.send_to(&MSG, addr).expect("sendto");
        socket.recv_from(&mut buf).expect("recvfrom");
    });
    percentiles(samples, total);
}

/// One echo-mode request: connect, send 64 bytes, read them back, close.
fn one_request(addr: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&MSG)?;
    let mut buf = [0u8; 64];
    stream.read_exact(&mut buf)?;
    Ok(())
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

// --------------------------------------------------------------- mappings

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
    let _ = io::stdin().lock().lines().count();
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
        samples.push(t.elapsed().as_nanos() as u32);
    }
    print!("attach_ms={:.2} ", attach.as_secs_f64() * 1e3);
    let n = samples.len() as u64;
    percentiles(samples, n);
}

/// What a long-lived user of the library (the daemon, a container
/// runtime) pays per scope: the program set is loaded once, then each
/// scope (a child cgroup of `parent`, one mapping) is attached, and
/// mappings are added to a live scope.
fn add_scope(parent: &str, n: u32) {
    let t = Instant::now();
    let programs = Programs::load(&LoadOptions::default()).expect("load the program set");
    let load = t.elapsed();
    let children: Vec<ChildCgroup> = (0..n)
        .map(|i| ChildCgroup::create(parent.as_ref(), &format!("scope-{i}")).expect("cgroup"))
        .collect();
    let mut attach = Vec::with_capacity(n as usize);
    let mut scopes = Vec::with_capacity(n as usize);
    for c in &children {
        let t = Instant::now();
        let scope = programs
            .scope(c.path())
            .mappings(MappingSet::parse(["443:8443"]).expect("mapping"))
            .attach()
            .expect("attach a scope");
        attach.push(t.elapsed().as_nanos() as u32);
        scopes.push(scope);
    }
    let mut add = Vec::with_capacity(200);
    for m in fillers(200) {
        let t = Instant::now();
        scopes[0].add(m).expect("add a mapping");
        add.push(t.elapsed().as_nanos() as u32);
    }
    let p = |mut v: Vec<u32>, q: f64| {
        v.sort_unstable();
        f64::from(v[((v.len() - 1) as f64 * q) as usize]) / 1e3
    };
    println!(
        "load_ms={:.2} scope_p50={:.1} scope_p99={:.1} add_p50={:.2} add_p99={:.2}",
        load.as_secs_f64() * 1e3,
        p(attach.clone(), 0.5),
        p(attach, 0.99),
        p(add.clone(), 0.5),
        p(add, 0.99)
    );
    drop(scopes);
    drop(children);
}
