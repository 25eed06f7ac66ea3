//! What every live redirector on the host is doing, for `redirect status`.
//!
//! Each live instance (`redirect run`, `redirect exec`, or a library user
//! that opts in) listens on a unix socket `/run/redirect/instances/<pid>.sock`
//! and answers every connection with one JSON [`InstanceStatus`], then
//! closes it. The socket is read-only (the instance ignores anything sent
//! to it) and world-connectable, so `status` needs no privileges. It is
//! removed when the instance ends; one left behind by a SIGKILL refuses
//! connections, and [`collect`] removes it. *Rejected*: pinning the maps in
//! bpffs, which would outlive a killed instance.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read as _},
    os::unix::{fs::PermissionsExt as _, net::UnixListener, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
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
    serde_json::from_slice(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
