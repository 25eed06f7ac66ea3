//! The daemon's state: one pinned [`Programs`] set and the scopes it
//! serves, changed only through [`Core::handle`] (control requests),
//! [`Core::reload`] (the config file) and [`Core::collect_garbage`]
//! (scopes whose cgroup is gone).
//!
//! Scopes have an origin: `config` (the file's `[[scope]]` tables; a
//! reload makes them match the file again, dropping runtime edits) or
//! `runtime` (added over the control socket, by the OCI hook say; kept
//! across reloads and restarts in a state file beside the control socket,
//! and removed when their cgroup disappears).
//!
//! The core is synchronous; the server runs it on a thread of its own so
//! that no library call blocks a tokio worker.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::config::Config;
use crate::{
    Error, Mapping, PortOwner, Programs, Scope,
    control::{ErrorKind, Request, Response, ScopeSpec},
    ebpf::LoadOptions,
    status::MappingStatus,
};

/// Where a scope came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The config file.
    Config,
    /// The control socket (`add_scope`).
    Runtime,
}

struct Managed {
    spec: ScopeSpec,
    origin: Origin,
    scope: Scope,
    /// Changed over the control socket since the file was applied.
    edited: bool,
}

/// The daemon's scopes on one pinned program set.
pub struct Core {
    programs: Programs,
    config_path: PathBuf,
    state_path: PathBuf,
    scopes: BTreeMap<String, Managed>,
}

/// A failed request: its kind and message.
type Failure = (ErrorKind, String);

fn failure(e: Error) -> Failure {
    let kind = match &e {
        Error::Mapping(_) | Error::NetnsPath { .. } | Error::NotCgroup2 { .. } => {
            ErrorKind::Invalid
        }
        Error::ScopeConflict(_) | Error::TargetHeld { .. } | Error::TargetAutobindable { .. } => {
            ErrorKind::Conflict
        }
        Error::ScopeNotFound { .. } => ErrorKind::NotFound,
        Error::Privileges { .. } => ErrorKind::Permission,
        Error::KernelUnsupported { .. } | Error::KernelFeature { .. } => ErrorKind::Kernel,
        _ => ErrorKind::Internal,
    };
    (kind, e.to_string())
}

/// A runtime scope's netns saved as `/proc/PID/ns/net` (the OCI hook's)
/// still names the scope's namespace only while PID lives in the scope's
/// cgroup: after a restart the pid may have been reused.
fn netns_still_names_the_scope(spec: &ScopeSpec) -> bool {
    let Some(pid) = spec.netns.as_ref().and_then(|p| {
        p.strip_prefix("/proc")
            .ok()?
            .components()
            .next()?
            .as_os_str()
            .to_str()?
            .parse::<u32>()
            .ok()
    }) else {
        return true; // not a /proc path: stable by name
    };
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    crate::cgroup::cgroup2_root()
        .map(|root| root.join(rel.trim_start_matches('/')))
        .is_ok_and(|dir| dir.starts_with(&spec.cgroup))
}

impl Core {
    /// Loads (or adopts) the pinned program set and makes the scopes match
    /// the config plus the runtime scopes saved at `state_path`; pinned
    /// scopes that neither names are detached.
    pub fn start(config_path: &Path, config: &Config, state_path: PathBuf) -> Result<Core, Error> {
        let programs = Programs::load(&LoadOptions {
            pin_dir: Some(config.pin_dir.clone()),
            ebpf_debug_log: false,
            // Containers come and go with inbound mappings: keep two
            // steering instances loaded (a burst beyond that loads inline).
            steer_pool: 2,
        })?;
        let mut core = Core {
            programs,
            config_path: config_path.to_path_buf(),
            state_path,
            scopes: BTreeMap::new(),
        };
        for spec in &config.scopes {
            core.attach(spec.clone(), Origin::Config)?;
        }
        for spec in core.saved_runtime_scopes() {
            if core.scopes.contains_key(&spec.name()) {
                continue;
            }
            if !spec.cgroup.exists() {
                log::info!(
                    "runtime scope {}: its cgroup is gone, dropping it",
                    spec.name()
                );
                continue;
            }
            if !netns_still_names_the_scope(&spec) {
                log::info!(
                    "runtime scope {}: its namespace path names another process now, dropping it",
                    spec.name()
                );
                continue;
            }
            if let Err(e) = core.attach(spec.clone(), Origin::Runtime) {
                log::warn!("runtime scope {} could not be restored: {e}", spec.name());
            }
        }
        for id in core.programs.unclaimed_pinned_scopes()? {
            log::info!(
                "removing pinned scope {id}: neither the config nor the runtime state names it"
            );
            core.programs.remove_pinned_scope(id)?;
        }
        core.save_runtime_scopes();
        Ok(core)
    }

    fn attach(&mut self, spec: ScopeSpec, origin: Origin) -> Result<(), Error> {
        let name = spec.name();
        if self.scopes.contains_key(&name) {
            return Err(Error::ScopeConflict(format!(
                "a scope named {name} exists already; remove it first or pick another name"
            )));
        }
        let mappings = super::config::parse_maps(&spec.maps)?;
        let mut builder = self
            .programs
            .scope(&spec.cgroup)
            .name(name.clone())
            .mappings(mappings);
        if let Some(netns) = &spec.netns {
            builder = builder.netns(netns);
        }
        if let Some(owner) = &spec.owner {
            builder = builder.owner(PortOwner::parse(owner)?);
        }
        for port in &spec.grant {
            builder = builder.grant(*port);
        }
        if let Some(guard) = &spec.guard_cgroup {
            builder = builder.guard_cgroup(guard);
        }
        let started = std::time::Instant::now();
        let scope = builder.allow_held_target(spec.allow_held_target).attach()?;
        log::info!(
            "scope {name} attached to {} in {} µs",
            spec.cgroup.display(),
            started.elapsed().as_micros()
        );
        self.scopes.insert(
            name,
            Managed {
                spec,
                origin,
                scope,
                edited: false,
            },
        );
        Ok(())
    }

    fn detach(&mut self, name: &str) -> Result<(), Error> {
        let managed = self.scopes.remove(name).ok_or(Error::ScopeNotFound {
            name: name.to_owned(),
        })?;
        managed.scope.detach()
    }

    /// Carries out one control request.
    pub fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => Ok(Some(self.status())),
            Request::AddScope { scope } => {
                let r = self.attach(scope, Origin::Runtime).map_err(failure);
                self.save_runtime_scopes();
                r.map(|()| None)
            }
            Request::RemoveScope { name } => {
                let r = self.detach(&name).map_err(failure);
                self.save_runtime_scopes();
                r.map(|()| None)
            }
            Request::Add { scope, mapping } => self.edit(&scope, &mapping, true),
            Request::Remove { scope, mapping } => self.edit(&scope, &mapping, false),
            Request::Reload => self.reload().map(Some),
        };
        match result {
            Ok(v) => Response::success(v),
            Err((kind, message)) => Response::failure(kind, message),
        }
    }

    fn edit(&mut self, scope: &str, mapping: &str, add: bool) -> Result<Option<Value>, Failure> {
        let m: Mapping = mapping
            .parse()
            .map_err(|e: crate::MappingError| (ErrorKind::Invalid, e.to_string()))?;
        let managed = self.scopes.get_mut(scope).ok_or_else(|| {
            failure(Error::ScopeNotFound {
                name: scope.to_owned(),
            })
        })?;
        if add {
            managed.scope.add(m).map_err(failure)?;
        } else if managed.scope.remove(&m).map_err(failure)?.is_none() {
            return Err((
                ErrorKind::NotFound,
                format!("scope {scope} has no mapping {mapping}"),
            ));
        }
        managed.spec.maps = managed
            .scope
            .mappings()
            .iter()
            .map(|m| m.to_string())
            .collect();
        managed.edited = true;
        if managed.origin == Origin::Runtime {
            self.save_runtime_scopes();
        }
        Ok(None)
    }

    /// Re-reads the config file and applies the difference: config scopes
    /// added, removed, re-attached when their cgroup, namespace or owner
    /// changed, and otherwise only their mappings and grants changed (the
    /// untouched ones keep their counters). A file with an error changes
    /// nothing.
    pub fn reload(&mut self) -> Result<Value, Failure> {
        let config = Config::load(&self.config_path).map_err(|e| {
            (
                ErrorKind::Invalid,
                format!("{e}; the running state is unchanged"),
            )
        })?;
        let mut changes = Vec::new();
        let wanted: BTreeMap<String, ScopeSpec> = config
            .scopes
            .iter()
            .map(|s| (s.name(), s.clone()))
            .collect();
        // Runtime scopes may not collide with config names.
        for name in wanted.keys() {
            if self
                .scopes
                .get(name)
                .is_some_and(|m| m.origin == Origin::Runtime)
            {
                return Err((
                    ErrorKind::Conflict,
                    format!(
                        "{}: scope {name} is also a runtime scope; remove one of them; the \
                         running state is unchanged",
                        self.config_path.display()
                    ),
                ));
            }
        }
        let gone: Vec<String> = self
            .scopes
            .iter()
            .filter(|(n, m)| m.origin == Origin::Config && !wanted.contains_key(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            self.detach(&name).map_err(failure)?;
            changes.push(format!("removed scope {name}"));
        }
        for (name, spec) in wanted {
            let Some(current) = self.scopes.get_mut(&name) else {
                self.attach(spec, Origin::Config).map_err(failure)?;
                changes.push(format!("added scope {name}"));
                continue;
            };
            let same_place = current.spec.cgroup == spec.cgroup
                && current.spec.netns == spec.netns
                && current.spec.owner == spec.owner
                && current.spec.guard_cgroup == spec.guard_cgroup;
            if !same_place {
                self.detach(&name).map_err(failure)?;
                self.attach(spec, Origin::Config).map_err(failure)?;
                changes.push(format!("re-attached scope {name}"));
                continue;
            }
            let want = super::config::parse_maps(&spec.maps)
                .map_err(|e| (ErrorKind::Invalid, e.to_string()))?;
            let have = current.scope.mappings();
            for m in have.iter() {
                if want.get(&m) != Some(m) {
                    current.scope.remove(&m).map_err(failure)?;
                    changes.push(format!("{name}: removed {m}"));
                }
            }
            for m in want.iter() {
                if have.get(&m) != Some(m) {
                    current.scope.add(m).map_err(failure)?;
                    changes.push(format!("{name}: added {m}"));
                }
            }
            for port in current.scope.grants() {
                if !spec.grant.contains(&port) {
                    current.scope.revoke(port).map_err(failure)?;
                    changes.push(format!("{name}: revoked {port}"));
                }
            }
            for port in &spec.grant {
                current.scope.grant(*port).map_err(failure)?;
            }
            current.spec = spec;
            current.edited = false;
        }
        Ok(json!({ "changes": changes }))
    }

    /// Detaches runtime scopes whose cgroup disappeared (a container that
    /// is gone); returns their names.
    pub fn collect_garbage(&mut self) -> Vec<String> {
        let gone: Vec<String> = self
            .scopes
            .iter()
            .filter(|(_, m)| !m.spec.cgroup.exists())
            .map(|(n, _)| n.clone())
            .collect();
        for name in &gone {
            log::info!("scope {name}: its cgroup is gone, detaching");
            if let Err(e) = self.detach(name) {
                log::warn!("detaching scope {name}: {e}");
            }
        }
        if !gone.is_empty() {
            self.save_runtime_scopes();
        }
        gone
    }

    /// Everything the daemon runs, as JSON.
    pub fn status(&self) -> Value {
        let scopes: Vec<Value> = self
            .scopes
            .values()
            .map(|m| {
                let stats = m.scope.stats().ok();
                let mappings: Vec<MappingStatus> = stats
                    .as_ref()
                    .map(|s| {
                        s.mappings
                            .iter()
                            .map(|(m, c)| MappingStatus::new(m, c))
                            .collect()
                    })
                    .unwrap_or_default();
                let note = match (m.origin, m.edited) {
                    (Origin::Config, true) => Some(
                        "changed at run time: a reload resets it to the config file unless the \
                         change is written there",
                    ),
                    (Origin::Runtime, _) => {
                        Some("added at run time: kept across reloads and restarts, not in the config file")
                    }
                    _ => None,
                };
                json!({
                    "name": m.spec.name(),
                    "origin": m.origin,
                    "cgroup": m.spec.cgroup,
                    "netns": m.spec.netns,
                    "owner": m.spec.owner,
                    "guard_cgroup": m.spec.guard_cgroup,
                    "grants": m.scope.grants(),
                    "held_targets": m.scope.held_targets(),
                    "id": m.scope.id(),
                    "links": stats.as_ref().map(|s| s.link_ids.clone()).unwrap_or_default(),
                    "mappings": mappings,
                    "note": note,
                })
            })
            .collect();
        let counters: BTreeMap<String, u64> = self
            .programs
            .counters()
            .map(|c| {
                c.values
                    .into_iter()
                    .map(|(k, v)| (k.name().to_owned(), v))
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "daemon": {
                "pid": std::process::id(),
                "config": self.config_path,
                "pin_dir": self.programs.pin_dir(),
            },
            "scopes": scopes,
            "counters": counters,
        })
    }

    /// The program set (for metrics).
    pub fn programs(&self) -> &Programs {
        &self.programs
    }

    /// Each scope's name and stats (for metrics).
    pub fn scope_stats(&self) -> Vec<crate::ScopeStats> {
        self.scopes
            .values()
            .filter_map(|m| m.scope.stats().ok())
            .collect()
    }

    fn saved_runtime_scopes(&self) -> Vec<ScopeSpec> {
        let Ok(text) = std::fs::read_to_string(&self.state_path) else {
            return Vec::new();
        };
        match serde_json::from_str(&text) {
            Ok(specs) => specs,
            Err(e) => {
                log::warn!("ignoring {}: {e}", self.state_path.display());
                Vec::new()
            }
        }
    }

    /// Writes the runtime scopes atomically (a temp file renamed over the
    /// old one), so a crash never leaves half a file.
    fn save_runtime_scopes(&self) {
        let specs: Vec<&ScopeSpec> = self
            .scopes
            .values()
            .filter(|m| m.origin == Origin::Runtime)
            .map(|m| &m.spec)
            .collect();
        let tmp = self.state_path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.state_path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, serde_json::to_vec_pretty(&specs)?)?;
            std::fs::rename(&tmp, &self.state_path)
        };
        if let Err(e) = write() {
            log::warn!(
                "saving runtime scopes to {}: {e}",
                self.state_path.display()
            );
        }
    }
}
