//! One scope: a cgroup v2 directory (and optionally a network namespace)
//! with its own mappings, grants and owner, served by a shared
//! [`Programs`] set.
//!
//! A [`ScopeBuilder`] describes the scope; [`ScopeBuilder::attach`]
//! returns a [`Scope`] handle. Dropping a handle detaches the scope,
//! unless the program set pins its state ([`LoadOptions::pin_dir`]), in
//! which case the scope stays attached after the handle and the process
//! are gone, until [`Scope::detach`] (or `redirect reset`).
//!
//! [`LoadOptions::pin_dir`]: super::LoadOptions::pin_dir

use std::path::{Path, PathBuf};

use super::{MappingCounts, PortOwner, Programs, holders::Findings, programs::ScopeRequest};
use crate::{Error, Mapping, MappingSet, Result};

/// Describes a scope before it is attached.
#[derive(Debug)]
#[must_use = "a scope builder does nothing until attach() is called"]
pub struct ScopeBuilder {
    programs: Programs,
    name: Option<String>,
    cgroup: PathBuf,
    netns: Option<PathBuf>,
    owner: Option<PortOwner>,
    mappings: MappingSet,
    grants: Vec<u16>,
    allow_held_target: bool,
    guard_cgroup: Option<PathBuf>,
}

impl ScopeBuilder {
    pub(super) fn new(programs: Programs, cgroup: &Path) -> Self {
        ScopeBuilder {
            programs,
            name: None,
            cgroup: cgroup.to_path_buf(),
            netns: None,
            owner: None,
            mappings: MappingSet::default(),
            grants: Vec::new(),
            allow_held_target: false,
            guard_cgroup: None,
        }
    }

    /// Names the scope (unique per program set; default: the cgroup path).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Also steers inbound TCP connections for FROM ports arriving in this
    /// network namespace (`/proc/PID/ns/net`, `/run/netns/NAME`) to the
    /// scope's listener on TO (sk_lookup, Linux 5.9), and serves inbound
    /// UDP by binding the scope's UDP services to FROM.
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }

    /// Reserves the scope's TO ports for `owner`: within the scope only it
    /// may bind them (others get EACCES), and only its listeners are
    /// registered for steering.
    pub fn owner(mut self, owner: PortOwner) -> Self {
        self.owner = Some(owner);
        self
    }

    /// With an owner, attach even when a process that is not the owner
    /// already holds a TO port in a namespace the scope serves (refused
    /// by default with [`Error::TargetHeld`]), or a TO port is inside its
    /// `ip_local_port_range` ([`Error::TargetAutobindable`]);
    /// [`Scope::held_targets`] then names them.
    pub fn allow_held_target(mut self, allow: bool) -> Self {
        self.allow_held_target = allow;
        self
    }

    /// With an owner, also keeps the TO ports for it against processes
    /// outside the scope: guard programs on the cgroup v2 directory
    /// `cgroup` (an ancestor holding them; for a whole host the root)
    /// refuse a bind of a TO port, in the namespace the scope serves (the
    /// one it steers, else this process's), to anyone but the owner
    /// (EACCES). Processes of other namespaces are not affected.
    pub fn guard_cgroup(mut self, cgroup: impl Into<PathBuf>) -> Self {
        self.guard_cgroup = Some(cgroup.into());
        self
    }

    /// The scope's mappings.
    pub fn mappings(mut self, mappings: MappingSet) -> Self {
        self.mappings = mappings;
        self
    }

    /// Lets the scope's processes bind `port` (1–1023) without
    /// CAP_NET_BIND_SERVICE (Linux 5.12).
    pub fn grant(mut self, port: u16) -> Self {
        if !self.grants.contains(&port) {
            self.grants.push(port);
        }
        self
    }

    /// Attaches the scope: every hook is linked to the cgroup (or, when
    /// pinned state for this cgroup exists, adopted and its program
    /// replaced in place), its mappings and grants written. Either the
    /// whole scope is attached or nothing of it is.
    ///
    /// Refused with [`Error::ScopeConflict`] when the name is taken, the
    /// cgroup is the same as, inside or above another scope's, or the
    /// namespace is steered by another scope.
    pub fn attach(self) -> Result<Scope> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| self.cgroup.display().to_string());
        // The start-up check: with an owner, who else holds a TO port, and
        // whether autobind may hand one out. A pinned scope being adopted
        // has been guarded all along: not checked again.
        let check_holders = self.owner.is_some() && !self.adopts_pinned_scope()?;
        let holders = || self.non_owner_holders();
        if check_holders && !self.allow_held_target {
            refuse_held(&holders(), self.owner.as_ref())?;
        }
        let request = ScopeRequest {
            name,
            cgroup: self.cgroup.clone(),
            netns: self.netns.clone(),
            owner: self.owner.clone(),
            mappings: self.mappings.clone(),
            grants: self.grants.clone(),
            guard_cgroup: self.guard_cgroup.clone(),
        };
        let id = self.programs.lock().attach_scope(request)?;
        let pinned = self.programs.pin_dir().is_some();
        let mut scope = Scope {
            programs: self.programs.clone(),
            id,
            pinned,
            detached: false,
            held_targets: Vec::new(),
        };
        if check_holders {
            // Again, now that the guard is on: a bind that raced the first
            // look is seen here.
            let held = holders();
            if !self.allow_held_target
                && let Err(e) = refuse_held(&held, self.owner.as_ref())
            {
                scope.detach()?;
                return Err(e);
            }
            for h in &held.holders {
                log::warn!(
                    "{h}, and it is not the owner: it receives the connections redirected to \
                     that port (--allow-held-target)"
                );
            }
            for a in &held.autobind {
                log::warn!("{a}: any process's autobind may take it (--allow-held-target)");
            }
            scope.held_targets = held
                .holders
                .iter()
                .map(ToString::to_string)
                .chain(
                    held.autobind
                        .iter()
                        .map(|a| format!("{a} (any process's autobind may take it)")),
                )
                .collect();
        }
        Ok(scope)
    }

    /// Whether attaching adopts this cgroup's pinned scope (a daemon
    /// restart) rather than creating one.
    fn adopts_pinned_scope(&self) -> Result<bool> {
        use std::os::unix::fs::MetadataExt as _;
        if self.programs.pin_dir().is_none() {
            return Ok(false);
        }
        let Ok(meta) = std::fs::metadata(&self.cgroup) else {
            return Ok(false); // attach_scope says what is wrong with it
        };
        Ok(self.programs.lock().pinned_scope_id(meta.ino())?.is_some())
    }

    /// The holders of TO ports in the served namespaces that are not the
    /// owner, and the TO ports autobind may take there.
    fn non_owner_holders(&self) -> Findings {
        let Some(owner) = &self.owner else {
            return Findings::default();
        };
        super::holders::find(
            &self.cgroup,
            self.netns.as_deref(),
            &self.mappings,
            &|pid| owner.owns(pid),
        )
    }
}

/// [`Error::TargetHeld`] when a non-owner holds a TO port, else
/// [`Error::TargetAutobindable`] when autobind may take one.
fn refuse_held(found: &Findings, owner: Option<&PortOwner>) -> Result<()> {
    if !found.holders.is_empty() {
        let holders: Vec<String> = found.holders.iter().map(ToString::to_string).collect();
        return Err(Error::TargetHeld {
            holders: holders.join("; "),
            owner: owner.map(ToString::to_string).unwrap_or_default(),
        });
    }
    if !found.autobind.is_empty() {
        let ports: Vec<String> = found.autobind.iter().map(ToString::to_string).collect();
        return Err(Error::TargetAutobindable {
            ports: ports.join("; "),
        });
    }
    Ok(())
}

/// An attached scope. Dropping it detaches the scope unless its state is
/// pinned.
#[derive(Debug)]
pub struct Scope {
    programs: Programs,
    id: u32,
    /// Pinned scopes stay attached when the handle goes.
    pinned: bool,
    /// Detached already by [`Scope::detach`].
    detached: bool,
    /// Non-owners that held a TO port when it attached
    /// ([`ScopeBuilder::allow_held_target`]).
    held_targets: Vec<String>,
}

/// A scope's mappings with their counters, and its other settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeStats {
    /// The scope's name.
    pub name: String,
    /// Its id in the shared maps.
    pub id: u32,
    /// Its cgroup v2 directory.
    pub cgroup: PathBuf,
    /// The network namespace it steers, if any.
    pub netns: Option<PathBuf>,
    /// Each mapping with its counters, in order.
    pub mappings: Vec<(Mapping, MappingCounts)>,
    /// Its granted ports.
    pub grants: Vec<u16>,
    /// Its owner, if the TO ports are reserved.
    pub owner: Option<PortOwner>,
    /// The kernel ids of its links (one per hook).
    pub link_ids: Vec<u32>,
}

impl Scope {
    /// The scope's id in the shared maps.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The processes other than the owner that held a TO port when the
    /// scope attached, allowed by [`ScopeBuilder::allow_held_target`]:
    /// "pid 4242 (nc, user nobody) listens on port 8443/tcp in …".
    pub fn held_targets(&self) -> &[String] {
        &self.held_targets
    }

    /// Adds a mapping at run time; connects made from now on use it. No
    /// program is reattached.
    pub fn add(&self, m: Mapping) -> Result<()> {
        self.with(|shared, scope| shared.insert_mapping(scope, m))
    }

    /// Removes the mapping with the same source as `m` (address, FROM port
    /// and protocol); returns it, or `None` when there was none.
    /// Established connections keep their peer; replies to earlier
    /// datagrams are reported with their true source.
    pub fn remove(&self, m: &Mapping) -> Result<Option<Mapping>> {
        self.with(|shared, scope| shared.remove_mapping(scope, m))
    }

    /// Lets the scope bind `port` without CAP_NET_BIND_SERVICE.
    pub fn grant(&self, port: u16) -> Result<()> {
        self.with(|shared, scope| shared.grant(scope, port))
    }

    /// Takes a grant back; returns whether it was there.
    pub fn revoke(&self, port: u16) -> Result<bool> {
        self.with(|shared, scope| shared.revoke(scope, port))
    }

    /// The scope's mappings.
    pub fn mappings(&self) -> MappingSet {
        self.with(|_, scope| Ok(scope.mappings.clone()))
            .unwrap_or_default()
    }

    /// The scope's granted ports.
    pub fn grants(&self) -> Vec<u16> {
        self.with(|_, scope| Ok(scope.grants.clone()))
            .unwrap_or_default()
    }

    /// The scope's cgroup v2 directory.
    pub fn cgroup(&self) -> PathBuf {
        self.with(|_, scope| Ok(scope.cgroup.clone()))
            .unwrap_or_default()
    }

    /// The scope's mappings with their counters, and its settings.
    pub fn stats(&self) -> Result<ScopeStats> {
        let shared = self.programs.lock();
        let scope = shared.scopes.get(&self.id).ok_or(Error::ScopeNotFound {
            name: format!("#{}", self.id),
        })?;
        Ok(ScopeStats {
            name: scope.name.clone(),
            id: scope.id,
            cgroup: scope.cgroup.clone(),
            netns: scope.netns.as_ref().map(|(p, _)| p.clone()),
            mappings: shared.mapping_counts(scope)?,
            grants: scope.grants.clone(),
            owner: scope.owner.clone(),
            link_ids: shared.link_ids(scope),
        })
    }

    /// Detaches the scope now, pinned or not, and removes its pins.
    pub fn detach(mut self) -> Result<()> {
        self.detached = true;
        self.programs.lock().detach_scope(self.id)
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut super::programs::Shared, &mut super::programs::ScopeState) -> Result<T>,
    ) -> Result<T> {
        let mut shared = self.programs.lock();
        let mut scope = shared.scopes.remove(&self.id).ok_or(Error::ScopeNotFound {
            name: format!("#{}", self.id),
        })?;
        let result = f(&mut shared, &mut scope);
        shared.scopes.insert(self.id, scope);
        result
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if self.pinned || self.detached {
            return;
        }
        if let Err(e) = self.programs.lock().detach_scope(self.id) {
            log::warn!("detaching scope {}: {e}", self.id);
        }
    }
}
