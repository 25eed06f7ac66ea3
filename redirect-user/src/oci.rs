//! OCI runtime hooks: from a container's state (the JSON a runtime writes on
//! a hook's stdin) and its annotations to a control-socket [`Request`].
//!
//! `redirect oci-hook` is called by runc, crun, podman or CRI-O at
//! `createRuntime` (state `creating`: the container's process exists, in its
//! cgroup and network namespace, but the user's program has not started)
//! and at `poststop` (state `stopped`). This module decides what to ask the
//! daemon; it never talks to the kernel, and everything but
//! [`HookInput::read_host`] is pure, so it is tested without root.
//!
//! # Annotations
//!
//! | annotation | value | meaning |
//! |---|---|---|
//! | [`MAP`] `io.redirect.map` | `443:8443,53:5353/udp` | mappings, comma-separated, as `--map` |
//! | [`GRANT`] `io.redirect.grant` | `80,443` | ports the container may bind without `CAP_NET_BIND_SERVICE` |
//! | [`OWNER`] `io.redirect.owner` | `1000` | the container's uid alone may bind the TO ports (mapped through the user namespace) |
//! | [`INBOUND`] `io.redirect.inbound` | `true` (default) or `false` | steer inbound connections in the container's network namespace |
//!
//! A container carrying none of `io.redirect.map` and `io.redirect.grant` is
//! left alone. In a Kubernetes pod (CRI-O's or containerd's container-type
//! annotation present), the containers share one network namespace, so the
//! scope is the **pod**: its cgroup (the parent of the container's) and its
//! namespace, named `oci-pod-<sandbox id>`. Whichever container of the pod
//! starts first adds it, later ones find it there, and the daemon removes it
//! when the pod's cgroup disappears.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    control::{Request, ScopeSpec},
    mapping::{MappingError, MappingSet, parse_grant},
};

/// Mappings, comma-separated: `io.redirect.map=443:8443,53:5353/udp`.
pub const MAP: &str = "io.redirect.map";
/// Granted ports, comma-separated: `io.redirect.grant=80,443`.
pub const GRANT: &str = "io.redirect.grant";
/// The uid (inside the container) that alone may bind the TO ports.
pub const OWNER: &str = "io.redirect.owner";
/// `false` turns inbound steering in the container's namespace off.
pub const INBOUND: &str = "io.redirect.inbound";

/// CRI-O's and containerd's annotations saying whether a container is a
/// pod's sandbox or one of its containers, and naming the sandbox.
const CONTAINER_TYPE: [&str; 2] = [
    "io.kubernetes.cri-o.ContainerType",
    "io.kubernetes.cri.container-type",
];
const SANDBOX_ID: [&str; 2] = [
    "io.kubernetes.cri-o.SandboxID",
    "io.kubernetes.cri.sandbox-id",
];

/// The container state a runtime writes on a hook's stdin (OCI runtime
/// spec, "State").
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The spec version the runtime follows.
    #[serde(default)]
    pub oci_version: String,
    /// The container's id, unique on the host.
    pub id: String,
    /// `creating`, `created`, `running` or `stopped`.
    pub status: String,
    /// The container's process, while it exists (absent at `poststop`).
    #[serde(default)]
    pub pid: Option<u32>,
    /// The bundle directory.
    #[serde(default)]
    pub bundle: PathBuf,
    /// The container's annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl State {
    /// Parses the state JSON.
    pub fn parse(json: &str) -> Result<Self, OciError> {
        serde_json::from_str(json).map_err(|e| OciError::State(e.to_string()))
    }

    /// Whether the container asks for anything from redirect.
    pub fn wants_redirect(&self) -> bool {
        self.annotations.contains_key(MAP) || self.annotations.contains_key(GRANT)
    }

    /// The pod's sandbox id when the container runs in a Kubernetes pod.
    fn pod(&self) -> Option<&str> {
        let in_pod = CONTAINER_TYPE
            .iter()
            .any(|k| self.annotations.contains_key(*k));
        if !in_pod {
            return None;
        }
        let sandbox = SANDBOX_ID
            .iter()
            .find_map(|k| self.annotations.get(*k))
            .map(String::as_str);
        // A sandbox without the id annotation is its own sandbox.
        Some(sandbox.unwrap_or(&self.id))
    }

    /// The name of the daemon scope that serves this container:
    /// `oci-<id>`, or `oci-pod-<sandbox id>` in a pod.
    pub fn scope_name(&self) -> String {
        match self.pod() {
            Some(sandbox) => format!("oci-pod-{sandbox}"),
            None => format!("oci-{}", self.id),
        }
    }
}

/// What the host says about the container's process, read by
/// [`HookInput::read_host`] (or given by a test).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookInput {
    /// The cgroup v2 hierarchy's mount point.
    pub cgroup_root: PathBuf,
    /// The text of `/proc/<pid>/cgroup`.
    pub proc_cgroup: String,
    /// The text of `/proc/<pid>/uid_map`.
    pub uid_map: String,
}

impl HookInput {
    /// Reads what [`plan`] needs about process `pid` from `/proc`.
    pub fn read_host(pid: u32) -> Result<Self, OciError> {
        let read = |what: &str| {
            let path = format!("/proc/{pid}/{what}");
            fs::read_to_string(&path).map_err(|e| OciError::Proc {
                path: path.clone(),
                reason: e.to_string(),
            })
        };
        // Only looked up, never mounted: a hook must not change the host,
        // and a container cannot be in a hierarchy that is not mounted.
        let cgroup_root = crate::cgroup::cgroup2_mount()
            .map_err(|e| OciError::Proc {
                path: "/proc/self/mountinfo".into(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| OciError::Cgroup("no cgroup v2 hierarchy is mounted".into()))?;
        Ok(HookInput {
            cgroup_root,
            proc_cgroup: read("cgroup")?,
            uid_map: read("uid_map")?,
        })
    }
}

/// What the hook should do for one state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask the daemon for this request.
    Send(Request),
    /// Nothing to do, for the reason given (logged at debug level).
    Nothing(&'static str),
}

/// Which stage a state belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// `createRuntime` (and `createContainer`, `prestart`): status `creating`
    /// or `created`.
    Create,
    /// `poststop`: status `stopped`.
    Stop,
    /// `startContainer`, `poststart`: status `running`; nothing to do.
    Running,
}

impl Stage {
    /// The stage of a state, from its status.
    pub fn of(state: &State) -> Result<Self, OciError> {
        match state.status.as_str() {
            "creating" | "created" => Ok(Stage::Create),
            "stopped" => Ok(Stage::Stop),
            "running" => Ok(Stage::Running),
            other => Err(OciError::Status(other.to_owned())),
        }
    }
}

/// Whether [`plan`] needs [`HookInput`] for `state` (only when adding a
/// scope), so that a hook that has nothing to add does not read `/proc`.
pub fn needs_host(state: &State) -> bool {
    state.wants_redirect() && matches!(Stage::of(state), Ok(Stage::Create))
}

/// Decides what to ask the daemon for `state`. `host` is required when
/// [`needs_host`] says so.
pub fn plan(state: &State, host: Option<&HookInput>) -> Result<Action, OciError> {
    if !state.wants_redirect() {
        return Ok(Action::Nothing(
            "the container has no io.redirect.map or io.redirect.grant annotation",
        ));
    }
    match Stage::of(state)? {
        Stage::Running => Ok(Action::Nothing("nothing to do once the container runs")),
        // A pod's scope is the pod's: the daemon removes it when the pod's
        // cgroup goes, not when one of its containers stops.
        Stage::Stop if state.pod().is_some() => Ok(Action::Nothing(
            "a pod's scope lives until the pod's cgroup is removed",
        )),
        Stage::Stop => Ok(Action::Send(Request::RemoveScope {
            name: state.scope_name(),
        })),
        Stage::Create => {
            let host = host.ok_or(OciError::NoPid)?;
            let pid = state.pid.ok_or(OciError::NoPid)?;
            Ok(Action::Send(Request::AddScope {
                scope: scope_spec(state, pid, host)?,
            }))
        }
    }
}

/// The scope for a container being created.
fn scope_spec(state: &State, pid: u32, host: &HookInput) -> Result<ScopeSpec, OciError> {
    let annotation = |key: &str| state.annotations.get(key).map(|v| v.trim());
    let list = |key: &str| -> Vec<String> {
        annotation(key)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let bad = |key: &'static str, value: &str, source: MappingError| OciError::Annotation {
        key,
        value: value.to_owned(),
        reason: source.to_string(),
    };

    let maps = list(MAP);
    if !maps.is_empty() {
        // Validated here so that a typo fails the container with a message
        // naming the annotation, not a daemon error.
        MappingSet::parse(&maps).map_err(|e| bad(MAP, annotation(MAP).unwrap_or(""), e))?;
    }
    let grant = list(GRANT)
        .iter()
        .map(|g| parse_grant(g).map_err(|e| bad(GRANT, g, e)))
        .collect::<Result<Vec<u16>, _>>()?;
    if maps.is_empty() && grant.is_empty() {
        return Err(OciError::Annotation {
            key: MAP,
            value: annotation(MAP).unwrap_or("").to_owned(),
            reason: "no mapping and no granted port".into(),
        });
    }
    let owner = match annotation(OWNER) {
        None | Some("") => None,
        Some(text) => Some(host_uid(text, &host.uid_map)?.to_string()),
    };
    let inbound = match annotation(INBOUND) {
        None | Some("") | Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(OciError::Annotation {
                key: INBOUND,
                value: other.to_owned(),
                reason: "expected true or false".into(),
            });
        }
    };

    let mut cgroup = cgroup_dir(&host.proc_cgroup, &host.cgroup_root)?;
    if state.pod().is_some() {
        // The container's cgroup is a child of the pod's
        // (`…pod<uid>.slice/crio-<id>.scope`, `…/pod<uid>/<id>`).
        cgroup = cgroup
            .parent()
            .filter(|p| p.starts_with(&host.cgroup_root) && *p != host.cgroup_root)
            .ok_or_else(|| OciError::Cgroup(format!("{} has no pod parent", cgroup.display())))?
            .to_path_buf();
    }
    Ok(ScopeSpec {
        name: Some(state.scope_name()),
        cgroup,
        netns: inbound.then(|| PathBuf::from(format!("/proc/{pid}/ns/net"))),
        maps,
        owner,
        grant,
        backend: Default::default(),
    })
}

/// The cgroup v2 directory from the text of `/proc/<pid>/cgroup` (its
/// `0::/path` line), under the hierarchy mounted at `root`.
pub fn cgroup_dir(proc_cgroup: &str, root: &Path) -> Result<PathBuf, OciError> {
    let rel = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| {
            OciError::Cgroup("the process has no cgroup v2 line (0::/path)".to_owned())
        })?;
    // "0::/" is the root: a container there would redirect the whole host.
    let rel = rel.trim().trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == "..") || rel.ends_with(" (deleted)") {
        return Err(OciError::Cgroup(format!(
            "the process's cgroup v2 path {:?} is not a container's own cgroup",
            format!("/{rel}")
        )));
    }
    Ok(root.join(rel))
}

/// The host uid of container uid `text`, through the user namespace's
/// `uid_map` (lines `inside outside count`).
pub fn host_uid(text: &str, uid_map: &str) -> Result<u32, OciError> {
    let bad = |reason: String| OciError::Annotation {
        key: OWNER,
        value: text.to_owned(),
        reason,
    };
    let uid: u32 = text.parse().map_err(|_| {
        bad(
            "expected a numeric uid as the container sees it (names are not resolved: \
             the host's user database is not the container's)"
                .into(),
        )
    })?;
    uid_map
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace().map(str::parse::<u64>);
            match (f.next(), f.next(), f.next()) {
                (Some(Ok(inside)), Some(Ok(outside)), Some(Ok(count))) => {
                    Some((inside, outside, count))
                }
                _ => None,
            }
        })
        .find(|&(inside, _, count)| (inside..inside + count).contains(&u64::from(uid)))
        .and_then(|(inside, outside, _)| u32::try_from(outside + (u64::from(uid) - inside)).ok())
        .ok_or_else(|| bad("this uid is not mapped in the container's user namespace".into()))
}

/// Why a hook cannot say what to ask.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The state on stdin is not an OCI state.
    #[error(
        "the container state on stdin is not OCI state JSON ({0}); `redirect oci-hook` must be \
         called by an OCI runtime as a createRuntime or poststop hook"
    )]
    State(String),
    /// The status names no stage the hook handles.
    #[error(
        "unknown container status {0:?}; install the hook for the createRuntime and poststop \
         stages"
    )]
    Status(String),
    /// A create-stage state without a process.
    #[error(
        "the container state has no pid; install the hook for createRuntime (or \
         createContainer), where the container's process exists"
    )]
    NoPid,
    /// An annotation's value is invalid.
    #[error("annotation {key}={value:?}: {reason}")]
    Annotation {
        /// The annotation.
        key: &'static str,
        /// Its value (or the offending part of it).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The container's cgroup cannot serve as a scope.
    #[error("the container's cgroup: {0}; redirect needs the container in a cgroup v2 directory")]
    Cgroup(String),
    /// Reading about the container's process failed.
    #[error(
        "reading {path}: {reason}; the hook must run in the host's pid namespace while the \
         container's process exists (createRuntime)"
    )]
    Proc {
        /// The file.
        path: String,
        /// The failure.
        reason: String,
    },
}

impl OciError {
    /// Whether the input (state, annotations) is at fault rather than the
    /// host (a hook exits 2 then).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            OciError::State(_) | OciError::Status(_) | OciError::Annotation { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATING: &str = r#"{"ociVersion":"1.0.2-dev","id":"web","status":"creating",
        "pid":4242,"bundle":"/run/bundles/web",
        "annotations":{"io.redirect.map":"443:8443, 53:5353/udp","io.redirect.grant":"80"}}"#;

    fn host() -> HookInput {
        HookInput {
            cgroup_root: "/sys/fs/cgroup/unified".into(),
            proc_cgroup: "12:pids:/web\n1:name=systemd:/web\n0::/web\n".into(),
            uid_map: "         0          0 4294967295\n".into(),
        }
    }

    fn with(json: &str, extra: &[(&str, &str)]) -> State {
        let mut state = State::parse(json).unwrap();
        for (k, v) in extra {
            state.annotations.insert((*k).into(), (*v).into());
        }
        state
    }

    fn add(state: &State, host: &HookInput) -> ScopeSpec {
        match plan(state, Some(host)).unwrap() {
            Action::Send(Request::AddScope { scope }) => scope,
            other => panic!("expected add_scope, got {other:?}"),
        }
    }

    #[test]
    fn create_adds_a_scope_for_the_containers_cgroup_and_netns() {
        let state = with(CREATING, &[]);
        assert!(needs_host(&state));
        assert_eq!(
            add(&state, &host()),
            ScopeSpec {
                name: Some("oci-web".into()),
                cgroup: "/sys/fs/cgroup/unified/web".into(),
                netns: Some("/proc/4242/ns/net".into()),
                maps: vec!["443:8443".into(), "53:5353/udp".into()],
                owner: None,
                grant: vec![80],
                backend: Default::default(),
            }
        );
    }

    #[test]
    fn poststop_removes_the_scope_without_reading_proc() {
        let state = State::parse(
            r#"{"ociVersion":"1.0.2","id":"web","status":"stopped","bundle":"/b",
               "annotations":{"io.redirect.map":"443:8443"}}"#,
        )
        .unwrap();
        assert!(!needs_host(&state));
        assert_eq!(
            plan(&state, None).unwrap(),
            Action::Send(Request::RemoveScope {
                name: "oci-web".into()
            })
        );
    }

    #[test]
    fn containers_without_annotations_cost_nothing() {
        let state = State::parse(r#"{"id":"x","status":"creating","pid":1}"#).unwrap();
        assert!(!needs_host(&state));
        assert!(matches!(plan(&state, None).unwrap(), Action::Nothing(_)));
        let running = with(CREATING, &[]);
        let running = State {
            status: "running".into(),
            ..running
        };
        assert!(matches!(plan(&running, None).unwrap(), Action::Nothing(_)));
    }

    #[test]
    fn bad_annotations_name_the_annotation() {
        for (key, value, needle) in [
            (MAP, "443:443", "io.redirect.map"),
            (MAP, "443:8443,443:9443", "io.redirect.map"),
            (GRANT, "8080", "io.redirect.grant"),
            (OWNER, "www-data", "numeric uid"),
            (INBOUND, "yes", "true or false"),
        ] {
            let state = with(CREATING, &[(key, value)]);
            let err = plan(&state, Some(&host())).unwrap_err();
            assert!(err.is_bad_input(), "{err}");
            assert!(err.to_string().contains(needle), "{key}={value}: {err}");
        }
        let empty = with(CREATING, &[(MAP, " , "), (GRANT, "")]);
        assert!(plan(&empty, Some(&host())).unwrap_err().is_bad_input());
    }

    #[test]
    fn owner_is_translated_through_the_user_namespace() {
        let mut h = host();
        h.uid_map = "0 100000 65536\n".into();
        let state = with(CREATING, &[(OWNER, "1000"), (INBOUND, "false")]);
        let scope = add(&state, &h);
        assert_eq!(scope.owner.as_deref(), Some("101000"));
        assert_eq!(scope.netns, None);
        assert!(host_uid("70000", &h.uid_map).is_err());
        assert_eq!(host_uid("1000", &host().uid_map).unwrap(), 1000);
    }

    #[test]
    fn the_cgroup_must_be_a_containers_own() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir("0::/system.slice/crio-abc.scope\n", root).unwrap(),
            PathBuf::from("/sys/fs/cgroup/system.slice/crio-abc.scope")
        );
        for text in ["0::/\n", "1:name=systemd:/web\n", "0::/../etc\n"] {
            assert!(cgroup_dir(text, root).is_err(), "{text:?}");
        }
    }

    #[test]
    fn a_pod_shares_one_scope_on_the_pod_cgroup() {
        let mut h = host();
        h.proc_cgroup = "0::/kubepods.slice/kubepods-pod1.slice/crio-c1.scope\n".into();
        let state = with(
            CREATING,
            &[
                ("io.kubernetes.cri-o.ContainerType", "container"),
                ("io.kubernetes.cri-o.SandboxID", "sb1"),
            ],
        );
        let scope = add(&state, &h);
        assert_eq!(scope.name.as_deref(), Some("oci-pod-sb1"));
        assert_eq!(
            scope.cgroup,
            PathBuf::from("/sys/fs/cgroup/unified/kubepods.slice/kubepods-pod1.slice")
        );
        let stopped = State {
            status: "stopped".into(),
            pid: None,
            ..state
        };
        assert!(matches!(plan(&stopped, None).unwrap(), Action::Nothing(_)));
        // A pod container directly under the root has no pod cgroup.
        h.proc_cgroup = "0::/crio-c1.scope\n".into();
        let top = with(CREATING, &[("io.kubernetes.cri.container-type", "sandbox")]);
        assert!(plan(&top, Some(&h)).is_err());
    }

    #[test]
    fn unknown_status_and_garbage_are_bad_input() {
        assert!(State::parse("not json").unwrap_err().is_bad_input());
        let odd = State {
            status: "paused".into(),
            ..with(CREATING, &[])
        };
        assert!(plan(&odd, None).unwrap_err().is_bad_input());
    }
}
