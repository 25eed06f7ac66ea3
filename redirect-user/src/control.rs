//! The daemon's control protocol, and a blocking client for it.
//!
//! `redirect daemon` listens on a unix stream socket (default
//! [`DEFAULT_CONTROL`], mode 0600, and it checks every peer's credentials
//! with `SO_PEERCRED`: only root may talk to it). A client sends **one**
//! JSON [`Request`] on one line and reads **one** JSON [`Response`] line;
//! then the daemon closes the connection.
//!
//! ```text
//! → {"op":"add_scope","scope":{"name":"ctr-1","cgroup":"/sys/fs/cgroup/unified/ctr-1","maps":["443:8443"]}}
//! ← {"ok":true}
//! → {"op":"remove_scope","name":"ctr-1"}
//! ← {"ok":false,"error":{"kind":"not_found","message":"no scope named ctr-1; …"}}
//! ```
//!
//! This module knows nothing of eBPF: the OCI hook and `redirect
//! add|remove|reload|status` use it to speak to a daemon, and the daemon
//! turns requests into calls on the library's scopes.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Where `redirect daemon` listens unless told otherwise.
pub const DEFAULT_CONTROL: &str = "/run/redirect/control.sock";

/// The largest request or response line accepted, in bytes; anything
/// longer is refused, so a peer cannot make the other side buffer without
/// bound.
pub const MAX_LINE: usize = 1 << 20;

/// One scope as a request or the config file describes it: the
/// `[[scope]]` table of `redirect.toml` and the payload of
/// [`Request::AddScope`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeSpec {
    /// The scope's name, unique in the daemon; default: the cgroup path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The cgroup v2 directory whose processes are redirected. Empty for a
    /// host-wide scope (eBPF on the cgroup v2 root, or [`Backend::Proxy`],
    /// which serves every process that connects to FROM and cannot be
    /// limited to a cgroup).
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub cgroup: PathBuf,
    /// A network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`) in
    /// which inbound connections to FROM are steered to the scope's
    /// listener on TO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Mappings, `[ADDR:]FROM:TO[/tcp|/udp]`.
    #[serde(default)]
    pub maps: Vec<String>,
    /// Who alone may serve the mappings' TO ports: a user name, a uid, or a
    /// cgroup v2 directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Ports below 1024 the scope's processes may bind without
    /// CAP_NET_BIND_SERVICE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grant: Vec<u16>,
    /// With an owner, attach even when a process that is not the owner
    /// already holds a TO port in a namespace the scope serves (refused
    /// otherwise); the daemon's status names it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_held_target: bool,
    /// With an owner, a cgroup v2 directory above the scope (for a whole
    /// host, the root) on which guard programs keep the TO ports for the
    /// owner against processes outside the scope, in the namespace the
    /// scope serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_cgroup: Option<PathBuf>,
    /// Which backend redirects the scope's mappings (default
    /// [`Backend::Auto`], as `redirect run --backend`).
    #[serde(default, skip_serializing_if = "Backend::is_auto")]
    pub backend: Backend,
}

fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// Which implementation redirects a scope's mappings: the meaning of
/// `redirect run --backend` and of the daemon config's `backend` key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// eBPF where its programs load and attach, otherwise the proxy: only
    /// for a host-wide scope (no cgroup, `netns`, `owner` or `grant`), as
    /// `redirect run` without `--cgroup`; a scoped redirect is never
    /// silently replaced with a host-wide listener.
    #[default]
    Auto,
    /// The eBPF programs only: connects from the cgroup are rewritten in
    /// the kernel.
    Ebpf,
    /// The userspace proxy only: it listens on FROM and forwards to TO.
    Proxy,
}

impl Backend {
    /// Whether this is [`Backend::Auto`] (the default).
    pub fn is_auto(&self) -> bool {
        *self == Backend::Auto
    }

    /// The name used in the config file and in status: `auto`, `ebpf`
    /// or `proxy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Ebpf => "ebpf",
            Backend::Proxy => "proxy",
        }
    }
}

impl ScopeSpec {
    /// The scope's name: [`ScopeSpec::name`], or the cgroup path.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.cgroup.display().to_string())
    }
}

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Everything the daemon runs: scopes, mappings, counters.
    Status,
    /// Attach a new scope. Refused (kind `conflict`) when its name, its
    /// cgroup or its mappings overlap a running scope.
    AddScope {
        /// The scope.
        scope: ScopeSpec,
    },
    /// Detach a scope and forget it.
    RemoveScope {
        /// The scope's name.
        name: String,
    },
    /// Add one mapping to a running scope (lost on reload unless it is in
    /// the config file).
    Add {
        /// The scope's name.
        scope: String,
        /// The mapping, `[ADDR:]FROM:TO[/tcp|/udp]`.
        mapping: String,
    },
    /// Remove one mapping from a running scope.
    Remove {
        /// The scope's name.
        scope: String,
        /// The mapping, as added.
        mapping: String,
    },
    /// Re-read the config file and apply the difference.
    Reload,
}

/// What went wrong, for a caller to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or a mapping is invalid.
    Invalid,
    /// It overlaps what is already running (a scope, a mapping, a cgroup).
    Conflict,
    /// No such scope or mapping.
    NotFound,
    /// The peer may not use the control socket, or the daemon lacks a
    /// privilege.
    Permission,
    /// The kernel lacks a feature.
    Kernel,
    /// Anything else on the daemon's side.
    Internal,
}

/// An error reported by the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The daemon's message: the cause and the fix.
    pub message: String,
}

/// The daemon's answer to one [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RemoteError>,
    /// What the request returns (the status for [`Request::Status`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    /// Success, with an optional result.
    pub fn success(result: Option<serde_json::Value>) -> Self {
        Response {
            ok: true,
            error: None,
            result,
        }
    }

    /// Failure of `kind`, with the message to show.
    pub fn failure(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(RemoteError {
                kind,
                message: message.into(),
            }),
            result: None,
        }
    }
}

/// Failing to talk to the daemon, or the daemon refusing the request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listens on the socket (or it cannot be reached).
    #[error(
        "no redirect daemon answers on {path}: {source}; start it (`systemctl start redirect` or \
         `redirect daemon --config FILE`) or pass --control PATH"
    )]
    Unavailable {
        /// The control socket.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The exchange failed half-way, or the answer was not understood.
    #[error("talking to the redirect daemon on {path}: {reason}")]
    Protocol {
        /// The control socket.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The daemon refused the request.
    #[error("{}", .0.message)]
    Remote(RemoteError),
}

impl ControlError {
    /// The daemon's error kind, when it was the daemon that refused.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ControlError::Remote(e) => Some(e.kind),
            _ => None,
        }
    }
}

/// A blocking client of the control socket; usable from sync code, such as
/// an OCI hook (from async code, call it inside `spawn_blocking`).
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the socket at `path` with a 10 s timeout per exchange.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Client {
            path: path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Changes the timeout for connecting, sending and receiving.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `request`, returns the daemon's result (`None` when the
    /// request returns nothing), or its refusal as [`ControlError::Remote`].
    /// One connection per request; for many in a row, see
    /// [`Client::session`].
    pub fn request(&self, request: &Request) -> Result<Option<serde_json::Value>, ControlError> {
        self.session()?.request(request)
    }

    /// Opens a connection for several requests in a row (a runtime adding
    /// many mappings, a benchmark): each then costs one exchange, not a
    /// connection, the daemon's peer check and a task. The daemon closes a
    /// session that stays silent for 30 s.
    pub fn session(&self) -> Result<Session, ControlError> {
        let stream =
            UnixStream::connect(&self.path).map_err(|source| ControlError::Unavailable {
                path: self.path.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| ControlError::Protocol {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Session {
            path: self.path.clone(),
            stream: BufReader::new(stream),
        })
    }
}

/// An open connection to the daemon's control socket (see
/// [`Client::session`]); closed when dropped.
#[derive(Debug)]
pub struct Session {
    path: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Session {
    /// Sends `request` and waits for its answer, as [`Client::request`].
    pub fn request(
        &mut self,
        request: &Request,
    ) -> Result<Option<serde_json::Value>, ControlError> {
        let protocol = |reason: String| ControlError::Protocol {
            path: self.path.clone(),
            reason,
        };
        let mut line = serde_json::to_vec(request).map_err(|e| protocol(e.to_string()))?;
        line.push(b'\n');
        self.stream
            .get_mut()
            .write_all(&line)
            .map_err(|e| protocol(format!("sending the request: {e}")))?;
        let mut answer = String::new();
        (&mut self.stream)
            .take(MAX_LINE as u64)
            .read_line(&mut answer)
            .map_err(|e| protocol(format!("reading the answer: {e}")))?;
        if answer.is_empty() {
            return Err(protocol(
                "the daemon closed the connection without answering (is the caller root?)".into(),
            ));
        }
        let response: Response = serde_json::from_str(&answer)
            .map_err(|e| protocol(format!("unreadable answer: {e}")))?;
        match (response.ok, response.error) {
            (true, _) => Ok(response.result),
            (false, Some(e)) => Err(ControlError::Remote(e)),
            (false, None) => Err(protocol("refused without a reason".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let req = Request::AddScope {
            scope: ScopeSpec {
                name: Some("ctr-1".into()),
                cgroup: "/sys/fs/cgroup/unified/ctr-1".into(),
                netns: Some("/proc/42/ns/net".into()),
                maps: vec!["443:8443".into(), "53:5353/udp".into()],
                owner: None,
                grant: vec![80],
                ..ScopeSpec::default()
            },
        };
        let text = serde_json::to_string(&req).unwrap();
        assert!(text.starts_with(r#"{"op":"add_scope","scope":{"name":"ctr-1""#));
        assert!(!text.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
        let status: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(status, Request::Status);
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"remove_scope","name":"a","x":1}"#).is_err()
        );
    }

    #[test]
    fn failures_carry_their_kind() {
        let text =
            serde_json::to_string(&Response::failure(ErrorKind::NotFound, "no scope a")).unwrap();
        assert_eq!(
            text,
            r#"{"ok":false,"error":{"kind":"not_found","message":"no scope a"}}"#
        );
    }
}
