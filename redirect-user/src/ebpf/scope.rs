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

use super::{MappingCounts, PortOwner, Programs, programs::ScopeRequest};
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
        let request = ScopeRequest {
            name,
            cgroup: self.cgroup,
            netns: self.netns,
            owner: self.owner,
            mappings: self.mappings,
            grants: self.grants,
        };
        let id = self.programs.lock().attach_scope(request)?;
        let pinned = self.programs.pin_dir().is_some();
        Ok(Scope {
            programs: self.programs,
            id,
            pinned,
            detached: false,
        })
    }
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
