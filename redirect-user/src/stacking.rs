//! Finding another redirect instance's programs where a new one would
//! attach, so that instances never stack silently.
//!
//! Cgroup programs of one hook all run (bpf_link attachments are always
//! "multi"): two instances on one cgroup, or on nested cgroups, both see
//! every connect of the inner scope, and the first rewrite is followed by
//! the second (`443→8443` then `8443→9443`), or the second one is simply
//! ignored; two sk_lookup programs on one network namespace interfere the
//! same way. Before attaching, [`find`] asks the kernel (`BPF_PROG_QUERY`)
//! what is attached to the cgroup, to each of its ancestors, to its
//! descendants, and to the namespace to be steered, and keeps the programs
//! with redirect's names. A caller refuses to attach when anything is
//! found ([`Error::Stacking`], bad input), unless told to allow it, in
//! which case `redirect status` shows the stacking.
//!
//! The other instance is named by its pid when it is a `redirect run` or
//! `exec` (matched by program id, or by steered namespace, against the
//! status sockets in [`RUNTIME_DIR`](crate::status::RUNTIME_DIR)); otherwise
//! (a `redirect daemon` scope, a library user) by its program ids.

use std::{
    fmt,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use redirect_common::programs;

use crate::{
    Error, Result,
    ebpf::{attached_programs, netns_programs},
    status::InstanceStatus,
};

/// The names redirect's programs have in the kernel.
const NAMES: [&str; 14] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::RECVMSG4,
    programs::RECVMSG6,
    programs::BIND4,
    programs::BIND6,
    programs::STEER,
    programs::SOCK_LISTEN,
    programs::POST_BIND4,
    programs::POST_BIND6,
];

/// Descendant cgroups looked at, at most: a host-wide scope on a machine
/// with very many cgroups is checked on its first ones only.
const MAX_DESCENDANTS: usize = 10_000;

/// Where another instance's programs were found, relative to the new scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// The scope's own cgroup.
    SameCgroup(PathBuf),
    /// A cgroup above the scope's.
    Ancestor(PathBuf),
    /// A cgroup below the scope's.
    Descendant(PathBuf),
    /// The network namespace to be steered.
    Netns(PathBuf),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::SameCgroup(p) => write!(f, "the same cgroup {}", p.display()),
            Place::Ancestor(p) => write!(f, "the parent cgroup {}", p.display()),
            Place::Descendant(p) => write!(f, "the child cgroup {}", p.display()),
            Place::Netns(p) => write!(f, "the network namespace {}", p.display()),
        }
    }
}

/// Another instance's programs found in one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stacked {
    /// Where.
    pub place: Place,
    /// `(name, id)` of each program found there.
    pub programs: Vec<(String, u32)>,
    /// The instance they belong to, when it is a `redirect run`/`exec`
    /// that answers on its status socket: "redirect run (pid 4242)".
    pub owner: Option<String>,
}

impl fmt::Display for Stacked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.owner {
            Some(owner) => write!(f, "{owner} on {}", self.place)?,
            None => {
                let ids: Vec<String> = self
                    .programs
                    .iter()
                    .map(|(name, id)| format!("{name} (id {id})"))
                    .collect();
                write!(
                    f,
                    "redirect programs {} on {}, of no `redirect run`/`exec` (a `redirect \
                     daemon` scope, or a library user; `redirect status` lists them)",
                    ids.join(", "),
                    self.place
                )?;
            }
        }
        Ok(())
    }
}

/// Another instance's programs on `cgroup`, its ancestors, its descendants
/// and, when given, the network namespace `netns`. Programs of this
/// process's earlier attachments count too: call it before attaching.
pub fn find(cgroup: &Path, netns: Option<&Path>) -> Result<Vec<Stacked>> {
    let mut found = Vec::new();
    let mut look = |place: Place, path: &Path| -> Result<()> {
        let programs: Vec<(String, u32)> = attached_programs(path)?
            .into_iter()
            .filter(|p| NAMES.contains(&p.name.as_str()))
            .map(|p| (p.name, p.id))
            .collect();
        if !programs.is_empty() {
            found.push(Stacked {
                place,
                programs,
                owner: None,
            });
        }
        Ok(())
    };
    look(Place::SameCgroup(cgroup.to_path_buf()), cgroup)?;
    let root = crate::cgroup::cgroup2_root()?;
    let mut up = cgroup.parent();
    while let Some(dir) = up.filter(|d| d.starts_with(&root)) {
        look(Place::Ancestor(dir.to_path_buf()), dir)?;
        up = dir.parent();
    }
    for dir in descendants(cgroup) {
        // A cgroup removed meanwhile holds nothing.
        if dir.exists() {
            look(Place::Descendant(dir.clone()), &dir)
                .or_else(|e| if dir.exists() { Err(e) } else { Ok(()) })?;
        }
    }
    if let Some(netns) = netns {
        crate::netns::open(netns)?;
        let ids = netns_programs(netns)?;
        if !ids.is_empty() {
            let programs: Vec<(String, u32)> = aya::programs::loaded_programs()
                .filter_map(std::result::Result::ok)
                .filter(|info| ids.contains(&info.id()))
                .map(|info| (info.name_as_str().unwrap_or_default().to_owned(), info.id()))
                .filter(|(name, _)| NAMES.contains(&name.as_str()))
                .collect();
            if !programs.is_empty() {
                found.push(Stacked {
                    place: Place::Netns(netns.to_path_buf()),
                    programs,
                    owner: None,
                });
            }
        }
    }
    if !found.is_empty() {
        name_owners(&mut found);
    }
    Ok(found)
}

/// Refuses `found` unless `allow`: [`Error::Stacking`] naming each other
/// instance. When allowed, logs a warning per instance and returns their
/// descriptions, for `redirect status`.
pub fn refuse_unless(found: &[Stacked], allow: bool) -> Result<Vec<String>> {
    let described: Vec<String> = found.iter().map(ToString::to_string).collect();
    if found.is_empty() {
        return Ok(described);
    }
    if !allow {
        return Err(Error::Stacking {
            found: described.join("; "),
        });
    }
    for d in &described {
        log::warn!("stacking with {d}: connections in both scopes may be rewritten twice");
    }
    Ok(described)
}

/// Every directory below `cgroup`, at most [`MAX_DESCENDANTS`].
fn descendants(cgroup: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![cgroup.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if out.len() >= MAX_DESCENDANTS {
                    log::debug!(
                        "stacking check: more than {MAX_DESCENDANTS} cgroups below {}; \
                         the rest are not checked",
                        cgroup.display()
                    );
                    return out;
                }
                out.push(entry.path());
                stack.push(entry.path());
            }
        }
    }
    out
}

/// Names the `redirect run`/`exec` each finding belongs to, from the live
/// instances' status sockets.
fn name_owners(found: &mut [Stacked]) {
    let instances = crate::status::collect().unwrap_or_default();
    for stacked in found.iter_mut() {
        stacked.owner = instances
            .iter()
            .find(|i| owns(i, stacked))
            .map(|i| format!("redirect {} (pid {})", i.kind, i.pid));
    }
}

fn owns(instance: &InstanceStatus, stacked: &Stacked) -> bool {
    if let Place::Netns(path) = &stacked.place {
        let ino = std::fs::metadata(path).map(|m| m.ino()).ok();
        return ino.is_some() && instance.netns_inode == ino;
    }
    stacked
        .programs
        .iter()
        .any(|(_, id)| instance.programs.iter().any(|p| p.id == *id))
}

/// Where [`lock`] takes its lock.
const LOCK_PATH: &str = "/run/redirect/attach.lock";

/// An exclusive lock (flock) that `redirect run`/`exec` hold from the check
/// until they are attached, so that two instances starting at once cannot
/// both find the other absent. `None` when it cannot be taken (no write
/// access to /run): the check then still runs, without that guarantee.
pub fn lock() -> Option<std::fs::File> {
    std::fs::create_dir_all("/run/redirect").ok()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(LOCK_PATH)
        .ok()?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).ok()?;
    Some(file)
}
