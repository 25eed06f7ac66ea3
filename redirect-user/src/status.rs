//! What every live redirector on the host is doing, for `redirect status`.
//!
//! Each live instance (`redirect run`, `redirect exec`, or a library user
//! that opts in) listens on a unix socket `/run/redirect/instances/<pid>.sock`
//! and answers every connection with one JSON [`InstanceStatus`], then
//! closes it. The socket is read-only (the instance ignores anything sent
//! to it) and world-connectable (mode 0666), so `status` needs no
//! privileges. It is removed when the instance ends; one left behind by a
//! SIGKILL refuses connections, and [`collect`] removes it. *Rejected*:
//! pinning the maps in bpffs, which would outlive a killed instance.
//!
//! # Bounded, since anyone may connect
//!
//! [`StatusService`] bounds what clients can cost the instance, whatever
//! they do ([`ServiceLimits`]): at most 64 clients are served at once and
//! at most 8 per uid (from `SO_PEERCRED`), so one user cannot take every
//! slot from another (root's `redirect status` is answered while `nobody`
//! holds a thousand idle connections); a connection beyond either cap is
//! closed at once, unanswered. The reply is built at most every 200 ms and
//! shared by every client as one `Arc<[u8]>` (never copied per client),
//! and a client that has not read all of it within 2 s is dropped. Memory
//! is then bounded by the slots (each holds a reference to a shared reply,
//! plus its kernel socket buffer) and the replies built in the last 2 s,
//! whatever the number of clients.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{self, Read as _},
    os::unix::{fs::PermissionsExt as _, net::UnixListener, net::UnixStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where instances put their status sockets.
pub const RUNTIME_DIR: &str = "/run/redirect/instances";

/// One live redirector.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Its process id.
    pub pid: u32,
    /// "run" or "exec" (or what a library user calls it).
    pub kind: String,
    /// The cgroup v2 directory it redirects for.
    pub scope: PathBuf,
    /// Whether that directory has been removed while the instance runs:
    /// its programs went with it, so nothing is redirected any more.
    #[serde(default)]
    pub scope_gone: bool,
    /// The inode of the network namespace it steers, if any (to tell
    /// which instance steers a namespace).
    #[serde(default)]
    pub netns_inode: Option<u64>,
    /// Other instances it was allowed to stack with (`--allow-stacking`),
    /// as found when it attached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stacked_with: Vec<String>,
    /// Processes other than the owner that held a TO port when it
    /// started (`--allow-held-target`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_targets: Vec<String>,
    /// When it started, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// Its eBPF programs.
    pub programs: Vec<ProgramStatus>,
    /// Its mappings with their counters.
    pub mappings: Vec<MappingStatus>,
    /// Ports its scope may bind without CAP_NET_BIND_SERVICE (`--grant`).
    #[serde(default)]
    pub grants: Vec<u16>,
    /// Global event counters by name (redirects, skips and errors by
    /// reason), from `redirect_common::Counter`.
    pub counters: BTreeMap<String, u64>,
}

/// One eBPF program of an instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgramStatus {
    /// Its name, such as "connect4".
    pub name: String,
    /// The kernel's program id (`bpftool prog show id N`).
    pub id: u32,
    /// Whether the kernel reports it attached to the scope right now.
    pub attached: bool,
}

/// One mapping of an instance with its counters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MappingStatus {
    /// The mapping as written (`127.0.0.1:443:8443/tcp`).
    pub mapping: String,
    /// FROM port.
    pub from: u16,
    /// TO port.
    pub to: u16,
    /// "tcp", "udp" or "any".
    pub proto: String,
    /// The destination address it is limited to, if any.
    pub address: Option<String>,
    /// Everything redirected: connects plus datagrams.
    pub redirected: u64,
    /// Connects (TCP and connected UDP) redirected.
    pub connects: u64,
    /// TCP connections established through it and still open.
    pub established: u64,
    /// Unconnected UDP datagrams redirected.
    pub datagrams: u64,
}

impl MappingStatus {
    /// The status of mapping `m` with counters `c`.
    pub fn new(m: &crate::Mapping, c: &crate::MappingCounts) -> Self {
        MappingStatus {
            mapping: m.to_string(),
            from: m.from,
            to: m.to,
            proto: m.proto.as_str().to_owned(),
            address: m.addr.map(|a| a.to_string()),
            redirected: c.redirected(),
            connects: c.connects,
            established: c.established,
            datagrams: c.datagrams,
        }
    }
}

/// A mapping in the flat list of [`Report::mappings`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReportMapping {
    /// The pid of the instance it belongs to.
    pub instance: u32,
    /// That instance's scope.
    pub scope: PathBuf,
    /// The mapping and its counters.
    #[serde(flatten)]
    pub status: MappingStatus,
}

/// Everything `redirect status --json` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    /// Every mapping of every live instance.
    pub mappings: Vec<ReportMapping>,
    /// The live instances.
    pub instances: Vec<InstanceStatus>,
}

impl Report {
    /// Builds the report from the instances' statuses.
    pub fn new(instances: Vec<InstanceStatus>) -> Self {
        let mappings = instances
            .iter()
            .flat_map(|i| {
                i.mappings.iter().map(|m| ReportMapping {
                    instance: i.pid,
                    scope: i.scope.clone(),
                    status: m.clone(),
                })
            })
            .collect();
        Report {
            mappings,
            instances,
        }
    }
}

/// The status socket path of instance `pid`.
pub fn socket_path(pid: u32) -> PathBuf {
    Path::new(RUNTIME_DIR).join(format!("{pid}.sock"))
}

/// A bound status socket; its file is removed on drop.
#[derive(Debug)]
pub struct StatusSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl StatusSocket {
    /// Binds this process's status socket (nonblocking).
    pub fn bind() -> Result<Self> {
        let path = socket_path(std::process::id());
        fs::create_dir_all(RUNTIME_DIR).map_err(|e| Error::io("creating", RUNTIME_DIR, e))?;
        // Any file with our pid was left by a dead process.
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| Error::io("binding", &path, e))?;
        // Read-only service: let anyone ask.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))
            .map_err(|e| Error::io("chmod", &path, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("configuring", &path, e))?;
        Ok(StatusSocket {
            listener: Some(listener),
            path,
        })
    }

    /// Takes the listener, to serve it (the file is still removed on drop).
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Asks every live instance for its status. Sockets of dead instances are
/// removed (when permitted) and skipped.
pub fn collect() -> Result<Vec<InstanceStatus>> {
    let entries = match fs::read_dir(RUNTIME_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("reading", RUNTIME_DIR, e)),
    };
    let mut instances = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "sock") {
            continue;
        }
        match ask(&path) {
            Ok(status) => instances.push(status),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) =>
            {
                let _ = fs::remove_file(&path);
            }
            Err(e) => log::warn!("asking {} for its status: {e}", path.display()),
        }
    }
    instances.sort_by_key(|i| i.pid);
    Ok(instances)
}

fn ask(path: &Path) -> io::Result<InstanceStatus> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    if buf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "it answered nothing: too many status clients at once (see `ss -x`); try again",
        ));
    }
    serde_json::from_slice(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// What [`StatusService`] allows its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceLimits {
    /// Clients served at once; a connection beyond it is closed at once.
    pub max_clients: usize,
    /// Clients of one uid served at once, so that one user cannot take the
    /// slots of every other.
    pub max_clients_per_uid: usize,
    /// How long a client has to read the whole reply before it is dropped.
    pub write_timeout: Duration,
    /// The reply is rebuilt at most this often; clients in between share
    /// the last one.
    pub refresh: Duration,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            max_clients: 64,
            max_clients_per_uid: 8,
            write_timeout: Duration::from_secs(2),
            refresh: Duration::from_millis(200),
        }
    }
}

/// Serves an instance's status socket with bounded cost (see the module
/// documentation): capped clients in all and per uid, a write timeout, and
/// one shared reply rebuilt at most every [`ServiceLimits::refresh`].
///
/// Needs a tokio runtime (with the `net` and `time` drivers): [`accept`]
/// and [`serve`] are called from its loop.
///
/// [`accept`]: StatusService::accept
/// [`serve`]: StatusService::serve
#[derive(Debug)]
pub struct StatusService {
    listener: tokio::net::UnixListener,
    limits: ServiceLimits,
    reply: Mutex<Option<(Instant, Arc<[u8]>)>>,
    clients: Arc<Mutex<Clients>>,
    // Removes the socket file when dropped.
    _socket: StatusSocket,
}

/// The clients being served, in all and by uid.
#[derive(Debug, Default)]
struct Clients {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

/// A client's slot; given back when dropped.
struct Slot {
    clients: Arc<Mutex<Clients>>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.by_uid.remove(&self.uid);
            }
        }
    }
}

impl StatusService {
    /// Binds this process's status socket ([`socket_path`]) and serves it
    /// within `limits`. Must be called within a tokio runtime.
    pub fn bind(limits: ServiceLimits) -> Result<Self> {
        let mut socket = StatusSocket::bind()?;
        let listener = socket
            .take_listener()
            .expect("a freshly bound socket has its listener");
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| Error::io("serving", &socket.path, e))?;
        Ok(StatusService {
            listener,
            limits,
            reply: Mutex::new(None),
            clients: Arc::default(),
            _socket: socket,
        })
    }

    /// The next connection. Errors (such as running out of file
    /// descriptors) are logged and retried after a pause, so that a caller
    /// looping on this never spins.
    pub async fn accept(&self) -> tokio::net::UnixStream {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => return stream,
                Err(e) => {
                    log::warn!("status socket: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Answers `stream` with the shared reply, in a task of its own, if the
    /// caps allow; otherwise closes it at once. `build` makes a fresh reply
    /// (the JSON of an [`InstanceStatus`]) and is called only when the last
    /// one is older than [`ServiceLimits::refresh`].
    pub fn serve<E: std::fmt::Display>(
        &self,
        stream: tokio::net::UnixStream,
        build: impl FnOnce() -> std::result::Result<Vec<u8>, E>,
    ) {
        // Without credentials the client counts as one anonymous uid.
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let Some(slot) = self.admit(uid) else {
            log::debug!("status socket: too many clients (uid {uid}); closing a connection");
            return;
        };
        let body = match self.reply(build) {
            Ok(body) => body,
            Err(e) => {
                log::warn!("building the status: {e}");
                return;
            }
        };
        let timeout = self.limits.write_timeout;
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut stream = stream;
            let _ = tokio::time::timeout(timeout, async {
                stream.write_all(&body).await?;
                stream.shutdown().await
            })
            .await;
            drop(slot);
        });
    }

    fn admit(&self, uid: u32) -> Option<Slot> {
        let mut c = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let mine = c.by_uid.get(&uid).copied().unwrap_or(0);
        if c.total >= self.limits.max_clients || mine >= self.limits.max_clients_per_uid {
            return None;
        }
        c.total += 1;
        *c.by_uid.entry(uid).or_default() += 1;
        Some(Slot {
            clients: self.clients.clone(),
            uid,
        })
    }

    /// The shared reply, rebuilt when older than the refresh period.
    fn reply<E>(
        &self,
        build: impl FnOnce() -> std::result::Result<Vec<u8>, E>,
    ) -> std::result::Result<Arc<[u8]>, E> {
        let mut reply = self.reply.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built, body)) = reply.as_ref()
            && built.elapsed() < self.limits.refresh
        {
            return Ok(body.clone());
        }
        let body: Arc<[u8]> = build()?.into();
        *reply = Some((Instant::now(), body.clone()));
        Ok(body)
    }
}
