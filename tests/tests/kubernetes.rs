//! dist/kubernetes/redirect.yaml, read with the Kubernetes API types
//! (k8s-openapi): the DaemonSet runs `redirect daemon` with the config from
//! the ConfigMap, mounts what it needs from the node, holds the
//! capabilities it needs and no privileged flag, probes the metrics
//! endpoint, and installs the same hook as dist/oci-hooks.d. No cluster is
//! reachable here, so this is what "deploys" means in CI.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, Volume},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize as _;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

struct Manifest {
    namespace: Namespace,
    config: ConfigMap,
    daemonset: DaemonSet,
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(repo().join("dist/kubernetes/redirect.yaml")).unwrap();
    let mut by_kind: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(doc).expect("valid YAML");
        let kind = value["kind"].as_str().expect("every document has a kind");
        assert!(
            by_kind.insert(kind.to_owned(), value.clone()).is_none(),
            "one {kind}"
        );
    }
    let take = |kind: &str| {
        by_kind
            .get(kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    // deny-unknown-fields is not what k8s-openapi does, so compare the
    // round trip too: a misspelt field would vanish from it.
    fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(v: serde_json::Value) -> T {
        let t: T = serde_json::from_value(v.clone()).expect("matches the API type");
        assert_eq!(
            strip_nulls(serde_json::to_value(&t).unwrap()),
            strip_nulls(v),
            "a field is unknown to the API type (misspelt?)"
        );
        t
    }
    Manifest {
        namespace: typed(take("Namespace")),
        config: typed(take("ConfigMap")),
        daemonset: typed(take("DaemonSet")),
    }
}

fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => m
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k, strip_nulls(v)))
            .collect(),
        serde_json::Value::Array(a) => a.into_iter().map(strip_nulls).collect(),
        other => other,
    }
}

fn daemon(ds: &DaemonSet) -> &Container {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

fn volume<'a>(ds: &'a DaemonSet, name: &str) -> &'a Volume {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

#[test]
fn everything_lives_in_one_namespace() {
    let m = manifest();
    let ns = m.namespace.metadata.name.clone();
    assert_eq!(ns.as_deref(), Some("redirect-system"));
    assert_eq!(m.config.metadata.namespace, ns);
    assert_eq!(m.daemonset.metadata.namespace, ns);
}

#[test]
fn the_daemon_runs_with_the_configmaps_config() {
    let m = manifest();
    let c = daemon(&m.daemonset);
    let mut argv = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    assert_eq!(
        argv,
        [
            "/usr/local/bin/redirect",
            "daemon",
            "--config",
            "/etc/redirect/redirect.toml"
        ]
    );
    let config = volume(&m.daemonset, "config");
    assert_eq!(
        config.config_map.as_ref().unwrap().name,
        m.config.metadata.name.clone().unwrap()
    );
    let toml = &m.config.data.as_ref().unwrap()["redirect.toml"];
    for line in [
        "control = \"/run/redirect/control.sock\"",
        "metrics = \"127.0.0.1:9464\"",
        "pin_dir = \"/sys/fs/bpf/redirect\"",
    ] {
        assert!(toml.lines().any(|l| l == line), "{line} in {toml}");
    }
}

#[test]
fn node_paths_are_mounted_where_the_hook_and_the_pins_expect_them() {
    let m = manifest();
    let c = daemon(&m.daemonset);
    let mounts = c.volume_mounts.as_ref().unwrap();
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|v| v.mount_path == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
    };
    // (mount path in the pod, node path): the same, because the hook sends
    // node paths and pins must be on the node's bpffs.
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup", "/run/redirect"] {
        let vm = mount(path);
        let host = volume(&m.daemonset, &vm.name).host_path.as_ref();
        assert_eq!(host.map(|h| h.path.as_str()), Some(path), "{path}");
    }
    assert_eq!(
        mount("/sys/fs/bpf").mount_propagation.as_deref(),
        Some("HostToContainer"),
        "a bpffs mounted on the node after the pod started must be seen"
    );
    assert_eq!(mount("/sys/fs/cgroup").read_only, Some(true));
    let pod = m
        .daemonset
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.host_pid, Some(true), "/proc/<host pid>/ns/net");
    assert_eq!(
        pod.host_network,
        Some(true),
        "metrics on the node's loopback"
    );
}

#[test]
fn the_daemon_holds_only_the_capabilities_it_needs() {
    let m = manifest();
    let sc = daemon(&m.daemonset).security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let mut add = caps.add.clone().unwrap();
    add.sort();
    assert_eq!(
        add,
        [
            "BPF",
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "SYS_RESOURCE"
        ]
    );
    // Only the init container that mounts bpffs for the node is privileged.
    let pod = m
        .daemonset
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let privileged: Vec<&str> = pod
        .init_containers
        .iter()
        .flatten()
        .chain(&pod.containers)
        .filter(|c| {
            c.security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false)
        })
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(privileged, ["mount-bpffs"]);
}

#[test]
fn liveness_is_the_metrics_endpoint_and_updates_roll_one_node_at_a_time() {
    let m = manifest();
    let probe = daemon(&m.daemonset).liveness_probe.as_ref().unwrap();
    let http = probe.http_get.as_ref().unwrap();
    assert_eq!(http.host.as_deref(), Some("127.0.0.1"));
    assert_eq!(http.path.as_deref(), Some("/metrics"));
    assert_eq!(http.port, IntOrString::Int(9464));
    let strategy = m
        .daemonset
        .spec
        .as_ref()
        .unwrap()
        .update_strategy
        .as_ref()
        .unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(
        rolling.max_surge,
        Some(IntOrString::Int(0)),
        "never two daemons on a node"
    );
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
}

#[test]
fn the_node_gets_the_same_hook_as_dist_oci_hooks_d() {
    let m = manifest();
    let installed: serde_json::Value =
        serde_json::from_str(&m.config.data.as_ref().unwrap()["oci-hook.json"]).unwrap();
    let mut dist: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("dist/oci-hooks.d/redirect.json")).unwrap(),
    )
    .unwrap();
    // Only the binary's location on the node differs.
    dist["hook"]["path"] = "/opt/redirect/bin/redirect".into();
    assert_eq!(installed, dist);
    let stages = &dist["stages"];
    assert_eq!(*stages, serde_json::json!(["createRuntime", "poststop"]));
    // The init container copies to the paths the hook names.
    let pod = m
        .daemonset
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let install = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "install-hook")
        .unwrap();
    let script = install.command.as_ref().unwrap().join(" ");
    assert!(
        script.contains("/host/opt/redirect/bin/redirect"),
        "{script}"
    );
    let node_bin = install
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.mount_path == "/host/opt/redirect/bin")
        .unwrap();
    assert_eq!(
        volume(&m.daemonset, &node_bin.name)
            .host_path
            .as_ref()
            .unwrap()
            .path,
        "/opt/redirect/bin"
    );
}
