//! The zero-copy pump (Linux): `splice(2)` moves data from one socket into
//! a pipe and from the pipe into the other socket, so the bytes never enter
//! userspace.

use std::{io, os::fd::OwnedFd, sync::atomic::AtomicU64};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::{io::Interest, net::TcpStream, time::Instant};

use super::{Stats, tcp::touch};

/// Copies `from` → `to` through a pipe of `size` bytes until end-of-file.
/// The pipe is made when the first data arrives (the TCP pump calls this
/// only once a direction turned out to be bulk), so an idle connection
/// costs no pipe. Backpressure works as with a buffer:
/// while the pipe cannot be emptied into `to`, nothing more is read.
pub(super) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    size: usize,
    start: Instant,
    activity: &AtomicU64,
    bytes: &AtomicU64,
) -> io::Result<()> {
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    loop {
        from.readable().await?;
        let (read_end, write_end) = match &pipe {
            Some(p) => p,
            None => {
                let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
                // The default (64 KiB) is kept when the size is refused.
                let _ = fcntl_setpipe_size(&w, size);
                pipe.insert((r, w))
            }
        };
        let moved = from.try_io(Interest::READABLE, || {
            splice(
                from,
                None,
                write_end,
                None,
                size,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            )
            .map_err(io::Error::from)
        });
        let mut in_pipe = match moved {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        touch(start, activity);
        Stats::add(bytes, in_pipe as u64);
        while in_pipe > 0 {
            to.writable().await?;
            let sent = to.try_io(Interest::WRITABLE, || {
                splice(
                    read_end,
                    None,
                    to,
                    None,
                    in_pipe,
                    SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(n) => in_pipe -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        touch(start, activity);
    }
}
