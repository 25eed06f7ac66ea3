//! The library's error type.
//!
//! Every variant a user can hit says what failed, where, and what to do about
//! it. [`Error::is_bad_input`] separates the user's input (a CLI exits 2)
//! from the environment (a CLI exits 1).

use std::{io, path::PathBuf};

use crate::mapping::MappingError;

/// Errors returned by the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mappings given are invalid; nothing was attached.
    #[error(transparent)]
    Mapping(#[from] MappingError),

    /// The process lacks the capabilities needed to load and attach eBPF
    /// programs.
    #[error(
        "missing privileges: this process lacks {missing}; run as root (for example with sudo) \
         or grant CAP_BPF and CAP_NET_ADMIN"
    )]
    Privileges {
        /// The capabilities that are missing, comma-separated.
        missing: String,
    },

    /// The kernel lacks a feature redirect needs.
    #[error(
        "this kernel does not support {feature}: redirect needs Linux >= 5.9 built with \
         CONFIG_CGROUP_BPF=y and CONFIG_BPF_SYSCALL=y{detail}"
    )]
    KernelUnsupported {
        /// The missing feature, such as "cgroup sock_addr programs".
        feature: &'static str,
        /// Extra detail from the probe, starting with "; ", or empty.
        detail: String,
    },

    /// The kernel is older than redirect's minimum, or its version cannot
    /// be read (aya would then attach with legacy `BPF_PROG_ATTACH`, which
    /// outlives the process).
    #[error(
        "kernel {release}: {reason}; redirect needs Linux >= 5.9 with a version it can read \
         (otherwise programs would be attached in a way that outlives redirect)"
    )]
    KernelVersion {
        /// `uname -r`.
        release: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A feature asked for needs a newer kernel; nothing was attached.
    #[error(
        "{feature} needs Linux >= {minimum}, and this kernel is {running}: upgrade the kernel, \
         or do without it (docs/KERNELS.md lists what each feature needs)"
    )]
    KernelFeature {
        /// What was asked for, such as "--grant".
        feature: &'static str,
        /// The first kernel that has it.
        minimum: String,
        /// The running kernel's version.
        running: String,
    },

    /// The directory given as scope is not a cgroup v2 directory.
    #[error(
        "{path} is not a cgroup v2 directory ({reason}); pass --cgroup with a directory of the \
         cgroup2 mount{hint}",
        path = clip(&.path.to_string_lossy())
    )]
    NotCgroup2 {
        /// The directory given.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
        /// ", such as /sys/fs/cgroup/unified", or empty when no cgroup2 is
        /// mounted.
        hint: String,
    },

    /// No cgroup v2 hierarchy is mounted, and mounting one failed.
    #[error(
        "cgroup v2 not found in /proc/self/mountinfo, and mounting it at {path} failed: {source}; \
         mount it (`mount -t cgroup2 none {path}`) or pass --cgroup"
    )]
    MountCgroup2 {
        /// Where the mount was tried.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },

    #[cfg(with_ebpf)]
    /// Loading the embedded eBPF object failed.
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),

    #[cfg(with_ebpf)]
    /// Loading one eBPF program into the kernel failed.
    #[error("loading eBPF program {program}: {source}")]
    LoadProgram {
        /// The program's name.
        program: &'static str,
        /// The failure, with the verifier's log when there is one.
        source: Box<aya::programs::ProgramError>,
    },

    #[cfg(with_ebpf)]
    /// Attaching one eBPF program failed; everything attached before it has
    /// been detached again.
    #[error("attaching {program} to {path}: {source}{hint}")]
    Attach {
        /// The program's name.
        program: &'static str,
        /// The cgroup it was attached to.
        path: PathBuf,
        /// The failure.
        source: Box<aya::programs::ProgramError>,
        /// What to try, starting with "; ", or empty.
        hint: &'static str,
    },

    #[cfg(with_ebpf)]
    /// Taking hold of a link (to pin or adopt it) failed.
    #[error("link of {program}: {source}")]
    Link {
        /// The program's name.
        program: &'static str,
        /// The failure.
        source: Box<aya::programs::links::LinkError>,
    },

    #[cfg(with_ebpf)]
    /// Reading or writing a BPF map failed.
    #[error("{op} map {map}: {source}")]
    Map {
        /// What was being done ("writing", "reading").
        op: &'static str,
        /// The map's name.
        map: &'static str,
        /// The failure.
        source: Box<aya::maps::MapError>,
    },

    /// A map or program expected in the embedded object is missing: the
    /// object and this library were built from different sources.
    #[error("the embedded eBPF object has no {kind} named {name}; rebuild redirect")]
    Missing {
        /// "map" or "program".
        kind: &'static str,
        /// The name looked up.
        name: &'static str,
    },

    /// The network namespace path given cannot be opened: bad input.
    #[error(
        "network namespace {path}: {source}; pass a namespace file such as /run/netns/NAME or \
         /proc/PID/ns/net",
        path = clip(&.path.to_string_lossy())
    )]
    NetnsPath {
        /// The path given.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },

    /// The pin directory cannot be used as it is.
    #[error("pin directory {path}: {reason}; {hint}")]
    PinDir {
        /// The directory or pin involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// What to do.
        hint: String,
    },

    /// A scope overlaps one that is already attached (same name, same or
    /// nested cgroup, same steered network namespace); nothing was
    /// attached.
    #[error("{0}")]
    ScopeConflict(String),

    /// Another redirect instance's programs are on the cgroup, a parent or
    /// child of it, or the network namespace to be steered: both would
    /// rewrite the same connections. Nothing was attached.
    #[error(
        "another redirect instance serves this scope: {found}; instances on one cgroup, on \
         nested cgroups or on one network namespace would both rewrite the same connections: \
         stop the other one or give it these mappings too (or pass --allow-stacking, and \
         `redirect status` shows the stacking)"
    )]
    Stacking {
        /// Each other instance and where it was found.
        found: String,
    },

    /// A process that is not the owner already holds a TO port (listens
    /// on it, or has it bound) in a network namespace the scope serves:
    /// it would receive the scope's redirected connections, and keep the
    /// owner from binding. Nothing was left attached.
    #[error(
        "{holders}, and it is not the owner ({owner}): it would receive the connections \
         redirected to that port; stop it (or have the owner serve the port), or pass \
         --allow-held-target to start anyway (the ready line and `redirect status` then name it)"
    )]
    TargetHeld {
        /// Each holder: pid, command, user, port and namespace.
        holders: String,
        /// The owner, as given.
        owner: String,
    },

    /// A TO port of a scope with an owner is inside `ip_local_port_range`
    /// of a namespace it serves: any process's autobind (`listen()` or
    /// `connect()` without `bind()`, which no bind hook sees) may take it.
    /// Nothing was left attached.
    #[error(
        "{ports}: any process's listen() or connect() without bind() may be given it, and the \
         owner's reservation cannot stop that; pick a TO outside the range, or reserve it \
         (`sysctl -w net.ipv4.ip_local_reserved_ports=PORT` in that namespace), or pass \
         --allow-held-target to start anyway"
    )]
    TargetAutobindable {
        /// Each port, its range and its namespace.
        ports: String,
    },

    /// The proxy backend of a scope could not start (FROM could not be
    /// bound; the message says what to do).
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),

    /// eBPF is unavailable and the scope needs it (`backend = "ebpf"`, or
    /// `netns`, `owner` or `grant`, which the proxy cannot honour).
    #[error("scope {scope} needs the eBPF backend, which is unavailable: {cause}")]
    EbpfUnavailable {
        /// The scope.
        scope: String,
        /// Why the programs could not be loaded.
        cause: String,
    },

    /// No scope has this name.
    #[error("no scope named {name}; `redirect status` lists them")]
    ScopeNotFound {
        /// The name asked for.
        name: String,
    },

    /// A file-system or system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done, such as "creating cgroup".
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
}

impl Error {
    /// Whether the error is the caller's input (exit code 2) rather than the
    /// environment (exit code 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::Mapping(_)
                | Error::ScopeConflict(_)
                | Error::NetnsPath { .. }
                | Error::Stacking { .. }
                | Error::TargetHeld { .. }
                | Error::TargetAutobindable { .. }
        )
    }

    // Only the Linux modules (cgroup, ebpf) build these.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How much of a user's input an error message quotes.
pub const QUOTE_MAX: usize = 64;

/// `input` as an error message quotes it: whole when short, else its first
/// [`QUOTE_MAX`] characters and "…", so that a 100,000-character argument
/// does not come back whole.
pub fn clip(input: &str) -> String {
    match input.char_indices().nth(QUOTE_MAX) {
        Some((end, _)) => format!("{}…", &input[..end]),
        None => input.to_owned(),
    }
}
