//! redirect: send connections aimed at one port (443) to another (8443),
//! transparently, with eBPF.
//!
//! A [`Redirector`] attaches cgroup `connect4/6` programs that rewrite the
//! destination port of a TCP or UDP `connect()` once, at connect time (no
//! per-packet work afterwards), and `getpeername4/6` programs that make the
//! client see the port it asked for. Only processes in the chosen cgroup v2
//! directory (and its descendants) are affected.
//!
//! ```no_run
//! use redirect::{MappingSet, Options, Redirector};
//!
//! let mappings = MappingSet::parse(["443:8443"])?;
//! let redirector =
//!     Redirector::attach("/sys/fs/cgroup/unified".as_ref(), mappings, &Options::default())?;
//! // Connections from the cgroup to port 443 now reach port 8443.
//! drop(redirector); // detached
//! # Ok::<(), redirect::Error>(())
//! ```
//!
//! # Layout
//!
//! - [`mapping`]: `FROM:TO` parsing and validation of a set of mappings.
//! - [`cgroup`]: finding cgroup v2, opening a scope, child cgroups for `exec`.
//! - [`ebpf`]: loading, attaching and owning the programs; counters; which
//!   programs a cgroup carries.
//! - [`doctor`]: what works on this host (every hook tried for real) and
//!   what to do about the rest, for `redirect doctor`.
//! - [`proxy`]: the fallback proxy (tokio TCP and UDP forwarder, PROXY
//!   protocol) for hosts where eBPF cannot run; the only backend on macOS
//!   and Windows.
//! - [`status`]: the status socket each live instance serves, and
//!   collecting every instance's status for `redirect status`.
//! - [`daemon`]: `redirect daemon`: config file, control socket, reload,
//!   metrics, pinned state that outlives restarts.
//! - [`control`]: the daemon's control protocol and a blocking client.
//! - [`oci`]: OCI hook logic: container state and annotations to a
//!   control request.
//! - [`user`]: looking up and becoming another user (`exec --user`).
//! - [`kernel`]: the kernel version check made before attaching.
//! - [`netns`]: checking a `--netns` path before attaching.
//! - [`stacking`]: another instance's programs where one would attach.
//! - [`error`]: the [`Error`] type; every variant names the cause and a fix.
//!
//! # Minimum kernel version
//!
//! Linux 5.8 (getpeername hooks), with cgroup v2 and CONFIG_CGROUP_BPF.
//!
//! # Lifetime
//!
//! Nothing outlives the [`Redirector`]: its links are not pinned, so the
//! kernel detaches the programs when it is dropped or the process dies.

#![deny(missing_docs)]

#[cfg(target_os = "linux")]
pub mod cgroup;
#[cfg(unix)]
pub mod control;
#[cfg(with_ebpf)]
pub mod daemon;
pub mod doctor;
#[cfg(with_ebpf)]
pub mod ebpf;
pub mod error;
// Uses aya's kernel version parsing: only with the eBPF backend.
#[cfg(with_ebpf)]
pub mod kernel;
pub mod mapping;
#[cfg(target_os = "linux")]
pub mod netns;
#[cfg(target_os = "linux")]
pub mod oci;
pub mod proxy;
#[cfg(with_ebpf)]
pub mod stacking;
#[cfg(with_ebpf)]
pub mod status;
#[cfg(unix)]
pub mod user;

#[cfg(with_ebpf)]
pub use ebpf::{
    Counters, LoadOptions, MappingCounts, Options, PortOwner, Programs, Redirector, Scope,
    ScopeBuilder, ScopeStats,
};
pub use error::{Error, Result};
pub use mapping::{Mapping, MappingError, MappingSet, Proto};
pub use proxy::{Proxy, ProxyOptions, ProxyProtocol};
pub use redirect_common::Counter;
