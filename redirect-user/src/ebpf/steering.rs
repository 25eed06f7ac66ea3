//! Steering instances: the per-scope copy of the object that steers one
//! network namespace (`steer` on sk_lookup, `sockops_listen`,
//! `post_bind4/6`), and the pool of instances loaded ahead of time.
//!
//! sk_lookup runs with no cgroup and cannot tell its namespace, so each
//! steered namespace gets programs and maps of its own. Loading them
//! (parsing the object, creating its maps, the verifier) is what made
//! adding a steered scope cost ~15 ms; nothing in a loaded instance is
//! specific to a scope until userspace writes its `STEER` map (scope id,
//! namespace cookie) and `OWNERS`, so a program set that serves many
//! short-lived scopes (the daemon, container runtimes) keeps a few
//! instances loaded ([`crate::LoadOptions::steer_pool`]) and refills the
//! pool on a thread of its own, off the caller's path.
//!
//! An instance whose maps are pinned already (a restart adopting a scope)
//! is always loaded afresh, with those maps.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap},
    programs::{CgroupSock, SkLookup, SockOps},
};
use redirect_common::{Owner, SteerConfig, globals, maps, programs};

use super::{
    map_error, pin,
    programs::{LOG_DEBUG, LOG_OFF, ONE, load_error, map_mut, object, program},
};
use crate::{Error, Result};

/// How long a refill waits before loading (see [`SteerPool::fill`]).
const REFILL_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// The maps a steering instance really uses, and the size of each there.
const STEER_MAPS: [(&str, u32); 7] = [
    (maps::STEER_CELL, 1),
    (maps::MAPPINGS, 1024),
    // Written with the other per-port tables (unused by steering).
    (maps::REVERSE, 1024),
    (maps::PORTS, 1024),
    (maps::TARGETS, 1024),
    (maps::LISTENERS, 1024),
    (maps::OWNERS, 1),
];

/// Maps a steering instance has (it is the same object) but never uses:
/// made as small as the kernel allows.
const STEER_UNUSED: [&str; 9] = [
    maps::COUNTS,
    maps::FROM_PORTS,
    maps::GUARDS,
    maps::TO_PORTS,
    maps::SCOPES,
    maps::GRANTS,
    maps::UDP_BINDS,
    maps::REV_NAT,
    maps::STATS,
];

/// The maps of a steering instance that are pinned (in its scope's
/// `steer/maps` directory) and adopted on a restart: those its programs
/// read or userspace writes. The others (the object's maps steering never
/// uses, sized 1) are made afresh by every load.
fn pinned_names() -> impl Iterator<Item = &'static str> {
    STEER_MAPS
        .into_iter()
        .map(|(name, _)| name)
        .chain([maps::STEER])
}

/// Loads steering instances, and keeps up to `target` of them loaded
/// ahead of time.
pub(super) struct SteerPool {
    ready: Mutex<Vec<Ebpf>>,
    target: usize,
    filling: AtomicBool,
    debug_log: bool,
    set_retval: bool,
}

impl SteerPool {
    /// A pool of `target` instances (0: every instance is loaded when a
    /// scope asks for it). Nothing is loaded before [`SteerPool::fill`].
    pub(super) fn new(target: usize, debug_log: bool, set_retval: bool) -> Arc<Self> {
        Arc::new(SteerPool {
            ready: Mutex::new(Vec::with_capacity(target)),
            target,
            filling: AtomicBool::new(false),
            debug_log,
            set_retval,
        })
    }

    /// Starts loading instances on a thread of its own until `target` are
    /// ready, after `delay` (a refill waits a little, so that it does not
    /// compete for the CPU with the reply to the request that emptied the
    /// pool); returns at once. A failure is logged and ends the refill:
    /// scopes then load their instance themselves and report the error.
    pub(super) fn fill(self: &Arc<Self>, delay: std::time::Duration) {
        if self.target == 0 || self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("redirect-steer-pool".into())
            .spawn(move || {
                std::thread::sleep(delay);
                while pool.ready.lock().map(|r| r.len()).unwrap_or(usize::MAX) < pool.target {
                    match pool.load(None) {
                        Ok(instance) => match pool.ready.lock() {
                            Ok(mut ready) => ready.push(instance),
                            Err(_) => break,
                        },
                        Err(e) => {
                            log::warn!("loading a steering instance ahead of time: {e}");
                            break;
                        }
                    }
                }
                pool.filling.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.filling.store(false, Ordering::Release);
        }
    }

    /// Refills the pool after a scope took an instance.
    pub(super) fn refill(self: &Arc<Self>) {
        self.fill(REFILL_DELAY);
    }

    /// A loaded (not attached) instance for scope `scope`, steering the
    /// namespace whose cookie is `netns`, with `owner` written. With
    /// `pins` (the scope's `steer/maps` directory): maps pinned there are
    /// adopted, or the instance's maps are pinned there.
    pub(super) fn instance(
        self: &Arc<Self>,
        scope: u32,
        netns: u64,
        owner: Option<Owner>,
        pins: Option<&Path>,
    ) -> Result<Ebpf> {
        let adopting = pins.is_some_and(|d| d.join(maps::LISTENERS).exists());
        let pooled = if adopting {
            None
        } else {
            self.ready.lock().ok().and_then(|mut r| r.pop())
        };
        let mut steer = match pooled {
            Some(instance) => instance,
            None => self.load(if adopting { pins } else { None })?,
        };
        if !adopting && let Some(dir) = pins {
            pin_maps(&steer, dir)?;
        }
        if let Some(owner) = owner {
            map_mut::<HashMap<_, u32, Owner>>(&mut steer, maps::OWNERS)?
                .insert(scope, owner, 0)
                .map_err(|e| map_error("writing", maps::OWNERS, e))?;
        }
        map_mut::<Array<_, SteerConfig>>(&mut steer, maps::STEER)?
            .set(
                0,
                SteerConfig {
                    scope,
                    _pad: 0,
                    netns,
                },
                0,
            )
            .map_err(|e| map_error("writing", maps::STEER, e))?;
        Ok(steer)
    }

    /// Loads one instance; with `pins`, its maps are those pinned there
    /// (checked first).
    fn load(&self, pins: Option<&Path>) -> Result<Ebpf> {
        let mut loader = super::loader::without_kernel_btf();
        loader.override_global(
            "AYA_LOG_LEVEL",
            if self.debug_log { &LOG_DEBUG } else { &LOG_OFF },
            true,
        );
        loader.override_global(
            globals::HAS_SET_RETVAL,
            if self.set_retval { &ONE } else { &LOG_OFF },
            true,
        );
        for (name, size) in STEER_MAPS {
            loader.map_max_entries(name, size);
        }
        for name in STEER_UNUSED {
            loader.map_max_entries(name, 1);
        }
        if let Some(dir) = pins {
            for name in pinned_names() {
                let path = dir.join(name);
                pin::check_pinned_map(&path, name)?;
                loader.map_pin_path(name, path);
            }
        }
        load_programs(&mut loader)
    }
}

/// Pins the maps of a fresh instance in `dir` (its scope's `steer/maps`).
fn pin_maps(steer: &Ebpf, dir: &Path) -> Result<()> {
    for name in pinned_names() {
        let path = dir.join(name);
        steer
            .map(name)
            .ok_or(Error::Missing { kind: "map", name })?
            .pin(&path)
            .map_err(|e| Error::PinDir {
                path: path.clone(),
                reason: format!("cannot pin map {name} there: {e}"),
                hint: "check that the pin directory is on bpffs, or remove stale state with \
                       `redirect reset`"
                    .into(),
            })?;
    }
    Ok(())
}

/// Loads the object with `loader` and its four steering programs.
fn load_programs(loader: &mut EbpfLoader<'_>) -> Result<Ebpf> {
    let mut steer = loader
        .load(object())
        .map_err(|e| Error::Load(Box::new(e)))?;
    program::<SkLookup>(&mut steer, programs::STEER)?
        .load()
        .map_err(load_error(programs::STEER))?;
    program::<SockOps>(&mut steer, programs::SOCK_LISTEN)?
        .load()
        .map_err(load_error(programs::SOCK_LISTEN))?;
    for name in [programs::POST_BIND4, programs::POST_BIND6] {
        program::<CgroupSock>(&mut steer, name)?
            .load()
            .map_err(load_error(name))?;
    }
    Ok(steer)
}
