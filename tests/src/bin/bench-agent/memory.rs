//! `proxy-memory`: what a proxy process holds in memory (issue 12's
//! targets: ≤ 20 MiB with 1,000 idle connections open, and no growth over
//! a long connection-rate run).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use redirect_tests::{proc_status_kib, vm_rss_kib};

use super::{ConnLoad, IO_TIMEOUT};

/// `proxy-memory PID ADDR CONNS SECS`: `PID` is the proxy that `ADDR`
/// reaches. Prints its VmRSS before, with `CONNS` idle connections open
/// through it (each has echoed one byte, so both of its legs exist), 5 s
/// into a `SECS` connection-rate run (8 in flight) and at its end, and its
/// peak (VmHWM, or a larger sample); all in KiB.
pub fn proxy_memory(pid: u32, addr: SocketAddr, conns: usize, secs: Duration) {
    // CONNS connections: the soft open-files limit up to the hard one.
    let _ = redirect::proxy::raise_open_files_limit();
    let before = vm_rss_kib(pid);
    let mut held = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i} through the proxy: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.write_all(b"E").expect("send");
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("echo on connection {i}: {e}"));
        held.push(s);
    }
    let idle = vm_rss_kib(pid);
    drop(held);
    thread::sleep(Duration::from_millis(200));

    let mut load = ConnLoad::new(8);
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < secs {
        load.burst(
            addr,
            Instant::now() + Duration::from_secs(1),
            IO_TIMEOUT,
            false,
        );
        samples.push(vm_rss_kib(pid));
    }
    let warm = samples[samples.len().min(5) - 1];
    let end = *samples.last().expect("one sample at least");
    // VmHWM is updated lazily (it can read below a VmRSS sampled
    // earlier): the peak is the larger of it and every sample.
    let peak = samples
        .iter()
        .copied()
        .chain([
            idle,
            proc_status_kib(pid, "VmHWM:").expect("VmHWM in /proc/PID/status"),
        ])
        .max()
        .unwrap_or(0);
    println!(
        "rss_before_kib={before} rss_idle_kib={idle} rss_warm_kib={warm} rss_end_kib={end} \
         peak_kib={peak} done={} errors={}",
        load.counts.done, load.counts.errors
    );
}
