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
//! Each scope runs on a backend (`backend` in the config, as `redirect
//! run --backend`): the eBPF programs, pinned and attached to its cgroup,
//! or the library's [`Proxy`] listening on FROM for the scope's mappings.
//! Proxies run on a tokio runtime of the core's own (made when the first
//! proxy-backed scope starts); unlike pinned eBPF scopes they stop with
//! the daemon. `auto` scopes use eBPF and fall back to the proxy when the
//! programs cannot be loaded or attached, and status and metrics say which
//! backend runs each scope and why.
//!
//! The core is synchronous; the server runs it on a thread of its own so
//! that no library call blocks a tokio worker.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{config::Config, state::RuntimeStore};
use crate::{
    Error, Mapping, MappingSet, PortOwner, Programs, Proxy, ProxyOptions, Scope,
    control::{Backend, ErrorKind, Request, Response, ScopeSpec},
    ebpf::LoadOptions,
    proxy::{ProxyError, Stats},
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
    runner: Runner,
    /// Why the scope runs on its backend (for status and metrics).
    why: String,
    /// Changed over the control socket since the file was applied.
    edited: bool,
}

/// What redirects a scope's mappings.
enum Runner {
    /// The pinned eBPF programs, attached to the scope's cgroup.
    Ebpf(Scope),
    /// The proxy, listening on FROM.
    Proxy(ProxyScope),
}

/// A proxy serving one scope's mappings on the core's runtime.
struct ProxyScope {
    mappings: MappingSet,
    stats: Arc<Stats>,
    /// Dropping it stops the proxy: its listeners close at once, and the
    /// connections in flight drain in the background.
    stop: tokio::sync::oneshot::Sender<()>,
}

impl ProxyScope {
    /// Stops the proxy and waits (up to [`REBIND_PATIENCE`]) until it no
    /// longer holds FROM, so that FROM can be bound again at once (the
    /// listeners are `SO_REUSEPORT`: a new one beside a closing one would
    /// share its connections, and those queued on the old one be reset).
    fn stop(self) {
        drop(self.stop);
        let deadline = Instant::now() + REBIND_PATIENCE;
        while self.stats.listening.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Runner {
    fn backend(&self) -> Backend {
        match self {
            Runner::Ebpf(_) => Backend::Ebpf,
            Runner::Proxy(_) => Backend::Proxy,
        }
    }

    fn mappings(&self) -> MappingSet {
        match self {
            Runner::Ebpf(scope) => scope.mappings(),
            Runner::Proxy(p) => p.mappings.clone(),
        }
    }
}

/// The daemon's scopes on one pinned program set (and proxies).
pub struct Core {
    /// The program set, or why it could not be loaded (then only proxy
    /// and `auto` scopes run).
    programs: Result<Programs, String>,
    pin_dir: PathBuf,
    /// Where proxy-backed scopes run; made for the first one.
    proxy_runtime: Option<tokio::runtime::Runtime>,
    config_path: PathBuf,
    store: RuntimeStore,
    scopes: BTreeMap<String, Managed>,
}

/// How long a proxy that replaces another waits for the old one's
/// listeners to close (they close as soon as it is told to stop).
const REBIND_PATIENCE: Duration = Duration::from_secs(2);

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
        Error::EbpfUnavailable { .. } => ErrorKind::Kernel,
        Error::Proxy(p) if p.is_permission() => ErrorKind::Permission,
        Error::Proxy(ProxyError::Bind { cause, .. })
            if cause.kind() == io::ErrorKind::AddrInUse =>
        {
            ErrorKind::Conflict
        }
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
    /// the config plus the runtime scopes saved in `store`; pinned
    /// scopes that neither names are detached.
    ///
    /// When the programs cannot be loaded and no config scope insists on
    /// `backend = "ebpf"`, the daemon starts anyway: `auto` scopes run on
    /// the proxy, saying why.
    pub fn start(config_path: &Path, config: &Config, store: RuntimeStore) -> Result<Core, Error> {
        let programs = match Programs::load(&LoadOptions {
            pin_dir: Some(config.pin_dir.clone()),
            ebpf_debug_log: false,
            // Containers come and go with inbound mappings: keep two
            // steering instances loaded (a burst beyond that loads inline).
            steer_pool: 2,
        }) {
            Ok(programs) => Ok(programs),
            Err(e) if config.scopes.iter().any(|s| s.backend == Backend::Ebpf) => return Err(e),
            Err(e) => {
                log::warn!(
                    "eBPF backend unavailable ({e}); scopes with backend auto fall back to the proxy"
                );
                Err(e.to_string())
            }
        };
        let mut core = Core {
            programs,
            pin_dir: config.pin_dir.clone(),
            proxy_runtime: None,
            config_path: config_path.to_path_buf(),
            store,
            scopes: BTreeMap::new(),
        };
        for spec in &config.scopes {
            core.attach(spec.clone(), Origin::Config)?;
        }
        for spec in core.store.load() {
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
        if let Ok(programs) = &core.programs {
            for id in programs.unclaimed_pinned_scopes()? {
                log::info!(
                    "removing pinned scope {id}: neither the config nor the runtime state names it"
                );
                programs.remove_pinned_scope(id)?;
            }
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
        let (runner, why) = match spec.backend {
            Backend::Proxy => {
                super::config::check_proxy_scope(&spec).map_err(Error::ScopeConflict)?;
                (
                    self.start_proxy(&name, mappings)?,
                    "chosen with backend = \"proxy\"".to_owned(),
                )
            }
            Backend::Ebpf => (
                Runner::Ebpf(self.attach_ebpf(&spec, mappings)?),
                "chosen with backend = \"ebpf\"".to_owned(),
            ),
            Backend::Auto => match self.attach_ebpf(&spec, mappings.clone()) {
                Ok(scope) => (
                    Runner::Ebpf(scope),
                    "auto: its programs loaded and attached".to_owned(),
                ),
                Err(e) if may_fall_back(&spec, &e) => {
                    log::warn!("scope {name}: eBPF unavailable ({e}); falling back to the proxy");
                    (
                        self.start_proxy(&name, mappings)?,
                        format!("auto, because eBPF is unavailable: {e}"),
                    )
                }
                Err(e) => return Err(e),
            },
        };
        log::info!(
            "scope {name}: backend {} ({why})",
            runner.backend().as_str()
        );
        self.scopes.insert(
            name,
            Managed {
                spec,
                origin,
                runner,
                why,
                edited: false,
            },
        );
        Ok(())
    }

    fn attach_ebpf(&self, spec: &ScopeSpec, mappings: MappingSet) -> Result<Scope, Error> {
        let programs = self
            .programs
            .as_ref()
            .map_err(|cause| Error::EbpfUnavailable {
                scope: spec.name(),
                cause: cause.clone(),
            })?;
        // A host-wide scope sits on the cgroup v2 root.
        let cgroup = if spec.cgroup.as_os_str().is_empty() {
            crate::cgroup::cgroup2_root()?
        } else {
            spec.cgroup.clone()
        };
        let mut builder = programs.scope(&cgroup).name(spec.name()).mappings(mappings);
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
        let started = Instant::now();
        let scope = builder.allow_held_target(spec.allow_held_target).attach()?;
        log::info!(
            "scope {} attached to {} in {} µs",
            spec.name(),
            cgroup.display(),
            started.elapsed().as_micros()
        );
        Ok(scope)
    }

    /// Binds FROM of every mapping and runs a proxy for them on the core's
    /// runtime. A proxy being replaced may still hold FROM for a moment:
    /// binding is retried for up to [`REBIND_PATIENCE`].
    fn start_proxy(&mut self, name: &str, mappings: MappingSet) -> Result<Runner, Error> {
        if self.proxy_runtime.is_none() {
            // Room for as many connections as the hard limit allows; when
            // it cannot be raised, the proxy logs running out at accept.
            match crate::proxy::raise_open_files_limit() {
                Ok(n) => log::debug!("open files limit: {n:?}"),
                Err(e) => log::warn!("raising the open files limit: {e}; keeping the current one"),
            }
            let runtime = crate::proxy::runtime()
                .map_err(|e| Error::io("starting", "the proxy runtime", e))?;
            self.proxy_runtime = Some(runtime);
        }
        let runtime = self.proxy_runtime.as_ref().expect("made above");
        let _entered = runtime.enter();
        let options = ProxyOptions {
            splice: cfg!(target_os = "linux"),
            workers: crate::proxy::default_workers(),
            ..ProxyOptions::default()
        };
        let deadline = Instant::now() + REBIND_PATIENCE;
        let proxy = loop {
            match Proxy::bind(&mappings, options.clone()) {
                Ok(proxy) => break proxy,
                Err(ProxyError::Bind { cause, .. })
                    if cause.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let stats = proxy.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let name = name.to_owned();
        runtime.spawn(async move {
            if let Err(e) = proxy
                .run(async move {
                    let _ = stopped.await;
                })
                .await
            {
                log::error!("scope {name}: the proxy stopped: {e}");
            }
        });
        Ok(Runner::Proxy(ProxyScope {
            mappings,
            stats,
            stop,
        }))
    }

    /// Detaches a scope and, for a runtime scope, forgets it in the store
    /// (even when detaching failed: the scope is gone from the daemon).
    fn remove(&mut self, name: &str) -> Result<(), Error> {
        let runtime = self
            .scopes
            .get(name)
            .is_some_and(|m| m.origin == Origin::Runtime);
        let r = self.detach(name);
        if runtime {
            self.store.forget(name);
        }
        r
    }

    fn detach(&mut self, name: &str) -> Result<(), Error> {
        let managed = self.scopes.remove(name).ok_or(Error::ScopeNotFound {
            name: name.to_owned(),
        })?;
        match managed.runner {
            Runner::Ebpf(scope) => scope.detach(),
            Runner::Proxy(p) => {
                p.stop();
                Ok(())
            }
        }
    }

    /// Gives a proxy-backed scope a new set of mappings: its proxy is
    /// replaced (connections in flight on the old one drain).
    fn restart_proxy(&mut self, name: &str, mappings: MappingSet) -> Result<(), Error> {
        let Some(managed) = self.scopes.get_mut(name) else {
            return Err(Error::ScopeNotFound {
                name: name.to_owned(),
            });
        };
        let old = std::mem::replace(
            &mut managed.runner,
            Runner::Proxy(ProxyScope {
                mappings: MappingSet::default(),
                stats: Arc::default(),
                stop: tokio::sync::oneshot::channel().0,
            }),
        );
        let old_mappings = old.mappings();
        if let Runner::Proxy(p) = old {
            p.stop();
        }
        match self.start_proxy(name, mappings) {
            Ok(runner) => {
                self.scopes.get_mut(name).expect("present").runner = runner;
                Ok(())
            }
            Err(e) => {
                // Put the old mappings back if they still bind.
                if let Ok(runner) = self.start_proxy(name, old_mappings) {
                    self.scopes.get_mut(name).expect("present").runner = runner;
                }
                Err(e)
            }
        }
    }

    /// Carries out one control request.
    pub fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => Ok(Some(self.status())),
            Request::AddScope { scope } => {
                let name = scope.name();
                let r = self.attach(scope, Origin::Runtime).map_err(failure);
                if r.is_ok() {
                    self.save_runtime_scope(&name);
                }
                r.map(|()| None)
            }
            Request::RemoveScope { name } => self.remove(&name).map(|()| None).map_err(failure),
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
        let not_found = || {
            (
                ErrorKind::NotFound,
                format!("scope {scope} has no mapping {mapping}"),
            )
        };
        match &managed.runner {
            Runner::Ebpf(s) => {
                if add {
                    s.add(m).map_err(failure)?;
                } else if s.remove(&m).map_err(failure)?.is_none() {
                    return Err(not_found());
                }
            }
            Runner::Proxy(p) => {
                let mut mappings = p.mappings.clone();
                if add {
                    mappings
                        .insert(m)
                        .map_err(|e| (ErrorKind::Invalid, e.to_string()))?;
                } else if mappings.remove(&m).is_none() {
                    return Err(not_found());
                }
                self.restart_proxy(scope, mappings).map_err(failure)?;
            }
        }
        let managed = self.scopes.get_mut(scope).expect("present");
        if add && matches!(managed.runner, Runner::Ebpf(_)) {
            // The set refused any overlap, so this is one more entry;
            // rebuilding the list (a copy and a string per mapping) made
            // an add O(mappings).
            managed.spec.maps.push(m.to_string());
        } else {
            managed.spec.maps = managed
                .runner
                .mappings()
                .iter()
                .map(|m| m.to_string())
                .collect();
        }
        managed.edited = true;
        if managed.origin == Origin::Runtime {
            self.save_runtime_scope(scope);
        }
        Ok(None)
    }

    /// Re-reads the config file and applies the difference: config scopes
    /// added, removed, re-attached when their cgroup, namespace, owner or
    /// backend changed (a proxy stopped and eBPF attached, or the other
    /// way), and otherwise only their mappings and grants changed (the
    /// untouched ones keep their counters; a proxy-backed scope whose
    /// mappings changed gets a new proxy). A file with an error changes
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
                && current.spec.guard_cgroup == spec.guard_cgroup
                && current.spec.backend == spec.backend;
            if !same_place {
                let was = current.runner.backend();
                self.detach(&name).map_err(failure)?;
                self.attach(spec, Origin::Config).map_err(failure)?;
                let now = self.scopes[&name].runner.backend();
                changes.push(if was == now {
                    format!("re-attached scope {name}")
                } else {
                    format!(
                        "re-attached scope {name} (backend {} → {})",
                        was.as_str(),
                        now.as_str()
                    )
                });
                continue;
            }
            let want = super::config::parse_maps(&spec.maps)
                .map_err(|e| (ErrorKind::Invalid, e.to_string()))?;
            let current_scope = match &current.runner {
                Runner::Ebpf(scope) => scope,
                Runner::Proxy(p) => {
                    if p.mappings != want {
                        self.restart_proxy(&name, want).map_err(failure)?;
                        changes.push(format!("{name}: restarted its proxy with new mappings"));
                    }
                    let current = self.scopes.get_mut(&name).expect("present");
                    current.spec = spec;
                    current.edited = false;
                    continue;
                }
            };
            let have = current_scope.mappings();
            for m in have.iter() {
                if want.get(&m) != Some(m) {
                    current_scope.remove(&m).map_err(failure)?;
                    changes.push(format!("{name}: removed {m}"));
                }
            }
            for m in want.iter() {
                if have.get(&m) != Some(m) {
                    current_scope.add(m).map_err(failure)?;
                    changes.push(format!("{name}: added {m}"));
                }
            }
            for port in current_scope.grants() {
                if !spec.grant.contains(&port) {
                    current_scope.revoke(port).map_err(failure)?;
                    changes.push(format!("{name}: revoked {port}"));
                }
            }
            for port in &spec.grant {
                current_scope.grant(*port).map_err(failure)?;
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
            .filter(|(_, m)| {
                // A proxy-backed scope has no cgroup to lose.
                !m.spec.cgroup.as_os_str().is_empty() && !m.spec.cgroup.exists()
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in &gone {
            log::info!("scope {name}: its cgroup is gone, detaching");
            if let Err(e) = self.remove(name) {
                log::warn!("detaching scope {name}: {e}");
            }
        }
        gone
    }

    /// Everything the daemon runs, as JSON.
    pub fn status(&self) -> Value {
        let scopes: Vec<Value> = self
            .scopes
            .values()
            .map(|m| {
                let (stats, proxy) = match &m.runner {
                    Runner::Ebpf(scope) => (scope.stats().ok(), None),
                    Runner::Proxy(p) => (None, Some(proxy_status(p))),
                };
                let mappings: Vec<Value> = match &m.runner {
                    Runner::Ebpf(_) => stats
                        .as_ref()
                        .map(|s| {
                            s.mappings
                                .iter()
                                .map(|(m, c)| json!(MappingStatus::new(m, c)))
                                .collect()
                        })
                        .unwrap_or_default(),
                    Runner::Proxy(p) => p
                        .mappings
                        .iter()
                        .map(|m| {
                            json!({
                                "mapping": m.to_string(),
                                "from": m.from,
                                "to": m.to,
                                "proto": m.proto.as_str(),
                                "address": m.addr.map(|a| a.to_string()),
                            })
                        })
                        .collect(),
                };
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
                    "held_targets": match &m.runner {
                        Runner::Ebpf(scope) => scope.held_targets().to_vec(),
                        Runner::Proxy(_) => Vec::new(),
                    },
                    "backend": m.runner.backend().as_str(),
                    "backend_config": m.spec.backend.as_str(),
                    "backend_reason": m.why,
                    "grants": match &m.runner {
                        Runner::Ebpf(scope) => scope.grants(),
                        Runner::Proxy(_) => Vec::new(),
                    },
                    "id": match &m.runner {
                        Runner::Ebpf(scope) => Some(scope.id()),
                        Runner::Proxy(_) => None,
                    },
                    "proxy": proxy,
                    "links": stats.as_ref().map(|s| s.link_ids.clone()).unwrap_or_default(),
                    "mappings": mappings,
                    "note": note,
                })
            })
            .collect();
        let counters: BTreeMap<String, u64> = self
            .programs
            .as_ref()
            .ok()
            .and_then(|p| p.counters().ok())
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
                "pin_dir": self.pin_dir,
                "ebpf": match &self.programs {
                    Ok(_) => json!({ "available": true }),
                    Err(cause) => json!({ "available": false, "reason": cause }),
                },
            },
            "scopes": scopes,
            "counters": counters,
        })
    }

    /// The program set (for metrics), unless it could not be loaded.
    pub fn programs(&self) -> Option<&Programs> {
        self.programs.as_ref().ok()
    }

    /// Each eBPF-backed scope's name and stats (for metrics).
    pub fn scope_stats(&self) -> Vec<crate::ScopeStats> {
        self.scopes
            .values()
            .filter_map(|m| match &m.runner {
                Runner::Ebpf(scope) => scope.stats().ok(),
                Runner::Proxy(_) => None,
            })
            .collect()
    }

    /// Each scope's name, the backend it runs on and why (for metrics).
    pub fn backends(&self) -> Vec<(String, Backend, String)> {
        self.scopes
            .iter()
            .map(|(name, m)| (name.clone(), m.runner.backend(), m.why.clone()))
            .collect()
    }

    /// Each proxy-backed scope's name and counters (for metrics).
    pub fn proxy_stats(&self) -> Vec<(String, Arc<Stats>)> {
        self.scopes
            .iter()
            .filter_map(|(name, m)| match &m.runner {
                Runner::Proxy(p) => Some((name.clone(), p.stats.clone())),
                Runner::Ebpf(_) => None,
            })
            .collect()
    }

    /// Saves one runtime scope (the store's file for it).
    fn save_runtime_scope(&self, name: &str) {
        if let Some(m) = self.scopes.get(name) {
            self.store.save(&m.spec);
        }
    }

    /// Makes the store hold exactly the runtime scopes.
    fn save_runtime_scopes(&self) {
        self.store.sync(
            self.scopes
                .values()
                .filter(|m| m.origin == Origin::Runtime)
                .map(|m| &m.spec),
        );
    }
}

/// Whether an `auto` scope whose eBPF attach failed with `e` may run on
/// the proxy instead: only a host-wide scope (a scoped redirect is never
/// silently replaced with a host-wide listener, as in `redirect run`), and not
/// for the caller's own mistakes (a bad mapping, a conflict), which the
/// proxy would not fix.
fn may_fall_back(spec: &ScopeSpec, e: &Error) -> bool {
    let own_mistake =
        e.is_bad_input() || matches!(e, Error::NotCgroup2 { .. } | Error::ScopeNotFound { .. });
    super::config::is_host_wide(spec) && !own_mistake
}

/// A proxy's counters, as JSON.
fn proxy_status(p: &ProxyScope) -> Value {
    let s = &p.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    json!({
        "accepted": get(&s.accepted),
        "active": get(&s.active),
        "refused": get(&s.refused),
        "connect_failed": get(&s.connect_failed),
        "bytes_up": get(&s.bytes_up),
        "bytes_down": get(&s.bytes_down),
        "udp_sessions": get(&s.udp_sessions),
    })
}
