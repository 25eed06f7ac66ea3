//! `redirect daemon`: a node-level daemon that keeps one pinned program set
//! and the scopes of a config file (and those added at run time) attached.
//!
//! - [`config`]: the TOML file, validated as a whole, errors with line and
//!   column.
//! - [`core`]: the scopes and how requests, reloads and vanished cgroups
//!   change them (synchronous; runs on a thread of its own).
//! - [`metrics`]: Prometheus text exposition.
//! - this file: the server, on a current-thread tokio runtime: the control
//!   socket (mode 0600, root peers only, checked with `SO_PEERCRED`), the
//!   metrics endpoint, SIGHUP (reload) and SIGTERM/SIGINT (exit, leaving
//!   every redirect in force: it is pinned), a garbage collection tick,
//!   and systemd's `READY=1` once the state is live.
//!
//! # State lifetime
//!
//! Everything the daemon attaches is pinned under its `pin_dir`: SIGKILL,
//! a crash, a restart or an upgrade leave every redirect in force, and the
//! next start adopts the pins (replacing programs in place when they
//! changed). A reboot clears bpffs and `/run`: the daemon attaches the
//! config's scopes again at boot. `redirect reset` removes everything.

pub mod config;
pub mod core;
pub mod metrics;
pub mod state;

use std::{io, os::unix::fs::PermissionsExt as _, path::Path, sync::mpsc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

use self::{config::Config, core::Core};
use crate::control::{ErrorKind, MAX_LINE, Request, Response};

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Loading or attaching failed.
    #[error(transparent)]
    Redirect(#[from] crate::Error),
    /// A socket could not be set up.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path or address.
        path: String,
        /// The failure.
        source: io::Error,
    },
}

impl DaemonError {
    /// Whether the error is the user's input (a CLI exits 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            DaemonError::Config(_) => true,
            DaemonError::Redirect(e) => e.is_bad_input(),
            DaemonError::Io { .. } => false,
        }
    }
}

/// Work for the core's thread.
enum Job {
    Request(Request, oneshot::Sender<Response>),
    Metrics(oneshot::Sender<String>),
    Gc,
}

/// How often scopes whose cgroup vanished are looked for.
const GC_INTERVAL: Duration = Duration::from_secs(2);
/// How long a control connection may stay silent between requests (and
/// take to read an answer).
const CONTROL_IDLE: Duration = Duration::from_secs(30);

/// Runs the daemon until SIGTERM or SIGINT. `ready` is called once the
/// config's scopes are attached and the control socket listens (the
/// binary sends systemd `READY=1` there).
pub async fn run(config_path: &Path, ready: impl FnOnce(&Config)) -> Result<(), DaemonError> {
    let config = Config::load(config_path)?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| io_error("installing", "SIGHUP", e))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| io_error("installing", "SIGTERM", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| io_error("installing", "SIGINT", e))?;

    // Attaching may take a moment: keep it off the runtime's thread.
    let (tx, rx) = mpsc::channel::<Job>();
    let (started_tx, started_rx) = oneshot::channel();
    let state = state::RuntimeStore::new(&config.control);
    let core_config = config.clone();
    let core_path = config_path.to_path_buf();
    std::thread::Builder::new()
        .name("redirect-core".into())
        .spawn(move || {
            let mut core = match Core::start(&core_path, &core_config, state) {
                Ok(core) => {
                    let _ = started_tx.send(Ok(()));
                    core
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            for job in rx {
                match job {
                    Job::Request(req, reply) => {
                        let _ = reply.send(core.handle(req));
                    }
                    Job::Metrics(reply) => {
                        let _ = reply.send(metrics::render(&core));
                    }
                    Job::Gc => {
                        core.collect_garbage();
                    }
                }
            }
        })
        .map_err(|e| io_error("starting", "the core thread", e))?;
    match started_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            return Err(io_error(
                "starting",
                "the core thread",
                io::Error::other("it stopped"),
            ));
        }
    }

    let control = bind_control(&config.control)?;
    let metrics = match config.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| io_error("listening for metrics on", &addr.to_string(), e))?,
        ),
        None => None,
    };
    ready(&config);
    let mut gc = tokio::time::interval(GC_INTERVAL);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let r = ask(&tx, Request::Reload).await;
                    match r.error {
                        None => log::info!("SIGHUP: reloaded {}", serde_json::to_string(&r.result).unwrap_or_default()),
                        Some(e) => log::error!("SIGHUP: {}", e.message),
                    }
                });
            }
            _ = gc.tick() => { let _ = tx.send(Job::Gc); }
            conn = control.accept() => match conn {
                Ok((stream, _)) => { tokio::spawn(serve_control(stream, tx.clone())); }
                Err(e) => log::warn!("control socket: {e}"),
            },
            conn = accept_metrics(&metrics) => match conn {
                Ok(stream) => { tokio::spawn(serve_metrics(stream, tx.clone())); }
                Err(e) => log::warn!("metrics: {e}"),
            },
        }
    }
    let _ = std::fs::remove_file(&config.control);
    log::info!(
        "stopping; every redirect stays in force (pinned under {})",
        config.pin_dir.display()
    );
    Ok(())
}

fn io_error(op: &'static str, what: &str, source: io::Error) -> DaemonError {
    DaemonError::Io {
        op,
        path: what.to_owned(),
        source,
    }
}

/// Binds the control socket with mode 0600, replacing a stale one (a live
/// daemon answering there is an error: two daemons must not share state).
fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error("creating", &dir.display().to_string(), e))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io_error(
            "binding the control socket",
            &path.display().to_string(),
            io::Error::new(
                io::ErrorKind::AddrInUse,
                "another redirect daemon answers there; stop it first",
            ),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| io_error("binding the control socket", &path.display().to_string(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_error("setting the mode of", &path.display().to_string(), e))?;
    Ok(listener)
}

async fn accept_metrics(listener: &Option<TcpListener>) -> io::Result<tokio::net::TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn ask(tx: &mpsc::Sender<Job>, request: Request) -> Response {
    let (reply, answer) = oneshot::channel();
    if tx.send(Job::Request(request, reply)).is_err() {
        return Response::failure(ErrorKind::Internal, "the daemon's core stopped");
    }
    answer
        .await
        .unwrap_or_else(|_| Response::failure(ErrorKind::Internal, "the daemon's core stopped"))
}

/// One control connection: root only; bounded request lines, each
/// answered by one line, until the peer closes its side (one request per
/// connection, as the CLI and the OCI hook send, or a session of many, as
/// [`crate::control::Session`] sends); each request must arrive within
/// [`CONTROL_IDLE`] of the previous answer.
async fn serve_control(stream: UnixStream, tx: mpsc::Sender<Job>) {
    let root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    loop {
        // The request is read in every case, so that the peer is never
        // answered while it still writes (it would see EPIPE, not why).
        let mut line = String::new();
        let read = tokio::time::timeout(
            CONTROL_IDLE,
            (&mut lines).take(MAX_LINE as u64).read_line(&mut line),
        )
        .await;
        let read = match read {
            Err(_) | Ok(Ok(0)) => break, // idle, or closed by the peer
            Ok(r) => r,
        };
        let response = if !root {
            Response::failure(
                ErrorKind::Permission,
                "only root may use the redirect control socket (run the command with sudo)",
            )
        } else {
            match read {
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => ask(&tx, req).await,
                    Err(e) => {
                        Response::failure(ErrorKind::Invalid, format!("unreadable request: {e}"))
                    }
                },
                Err(e) => {
                    Response::failure(ErrorKind::Invalid, format!("reading the request: {e}"))
                }
            }
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        let written = tokio::time::timeout(CONTROL_IDLE, write.write_all(&out)).await;
        if !root || !matches!(written, Ok(Ok(()))) || !line.ends_with('\n') {
            break;
        }
    }
    let _ = write.shutdown().await;
}

/// One HTTP request on the metrics endpoint: `GET /metrics` (or `/`).
async fn serve_metrics(mut stream: tokio::net::TcpStream, tx: mpsc::Sender<Job>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async move {
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        while len < buf.len() {
            match stream.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let head = String::from_utf8_lossy(&buf[..len]);
        let path = head.split_whitespace().nth(1).unwrap_or("");
        let (status, body) = if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
            let (reply, answer) = oneshot::channel();
            let body = if tx.send(Job::Metrics(reply)).is_ok() {
                answer.await.unwrap_or_default()
            } else {
                String::new()
            };
            ("200 OK", body)
        } else {
            ("404 Not Found", "only GET /metrics is served\n".to_owned())
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
