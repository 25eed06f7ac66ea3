//! The daemon's config file (`redirect.toml`), parsed and validated as a
//! whole before anything is applied; every error names its line and
//! column.
//!
//! ```toml
//! pin_dir = "/sys/fs/bpf/redirect"
//! control = "/run/redirect/control.sock"
//! metrics = "127.0.0.1:9464"          # optional
//! [[scope]]
//! name = "web"                        # optional; default: the cgroup path
//! cgroup = "/sys/fs/cgroup/unified/system.slice/web.service"
//! netns = "/run/netns/web"            # optional: inbound steering
//! maps = ["443:8443", "53:5353/udp"]
//! owner = "www-data"                  # optional
//! grant = [80]                        # optional
//! allow_held_target = false           # optional: start even if a non-owner holds TO
//! guard_cgroup = "/sys/fs/cgroup/unified"  # optional: keep TO for the owner host-wide
//! backend = "auto"                    # optional: auto | ebpf | proxy
//!
//! [[scope]]                           # a proxy-backed scope: no cgroup
//! name = "legacy"
//! backend = "proxy"
//! maps = ["127.0.0.1:8080:8081"]
//! ```
//!
//! A scope without `cgroup` is host-wide (eBPF on the cgroup v2 root, as
//! `redirect run` without `--cgroup`) and needs a `name`.
//!
//! `backend` means what `redirect run --backend` means: `ebpf` rewrites
//! the scope's connects in the kernel; `proxy` listens on FROM inside the
//! daemon and forwards to TO, for every process of the host (so it takes
//! no `cgroup`, `netns`, `owner` or `grant`); `auto` (the default) is
//! eBPF, and falls back to the proxy when the programs cannot load or
//! attach, but only for a host-wide scope without `netns`, `owner` or
//! `grant`: a scoped redirect is never silently replaced with a host-wide
//! listener (it fails with the eBPF error instead).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    MappingSet,
    control::{Backend, DEFAULT_CONTROL, ScopeSpec},
    ebpf::pin::DEFAULT_PIN_DIR,
};

/// The parsed config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where maps and links are pinned.
    pub pin_dir: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The scopes, in file order.
    pub scopes: Vec<ScopeSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    pin_dir: Option<PathBuf>,
    control: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    #[serde(default, rename = "scope")]
    scopes: Vec<toml::Spanned<ScopeSpec>>,
}

/// A config file that cannot be used; nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}:{column}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the error.
    pub line: usize,
    /// 1-based column of the error.
    pub column: usize,
    /// What is wrong and how to fix it.
    pub reason: String,
}

/// A scope's mappings; none is allowed (a scope of grants only, or one
/// filled at run time).
pub fn parse_maps(maps: &[String]) -> Result<MappingSet, crate::MappingError> {
    if maps.is_empty() {
        return Ok(MappingSet::default());
    }
    MappingSet::parse(maps)
}

/// A scope with `backend = "proxy"` runs a listener on FROM for every
/// process of the host: it has a name and no cgroup, namespace, owner or
/// grant (which only the eBPF backend can honour).
pub fn check_proxy_scope(spec: &ScopeSpec) -> Result<(), String> {
    let name = spec.name.as_deref().unwrap_or_default();
    let only_ebpf: Vec<&str> = [
        ("cgroup", !spec.cgroup.as_os_str().is_empty()),
        ("netns", spec.netns.is_some()),
        ("owner", spec.owner.is_some()),
        ("grant", !spec.grant.is_empty()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect();
    if !only_ebpf.is_empty() {
        return Err(format!(
            "scope {name}: backend = \"proxy\" cannot use {}: the proxy listens on FROM for \
             every process of the host and cannot be scoped; remove {} or use backend = \
             \"ebpf\" (or \"auto\")",
            only_ebpf.join(", "),
            if only_ebpf.len() == 1 { "it" } else { "them" }
        ));
    }
    Ok(())
}

/// A scope's cgroup in messages: its path, or the whole host.
fn cgroup_text(cgroup: &Path) -> String {
    if cgroup.as_os_str().is_empty() {
        "(none: the whole host)".to_owned()
    } else {
        cgroup.display().to_string()
    }
}

/// Whether a scope is host-wide: no cgroup, namespace, owner or grant,
/// like `redirect run --map …` alone. Only such a scope may fall back
/// from eBPF to the proxy (`backend = "auto"`).
pub fn is_host_wide(spec: &ScopeSpec) -> bool {
    spec.cgroup.as_os_str().is_empty()
        && spec.netns.is_none()
        && spec.owner.is_none()
        && spec.grant.is_empty()
}

/// 1-based (line, column) of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl Config {
    /// Parses and validates `text` (read from `path`, which is named in
    /// errors): TOML syntax, known keys, every mapping, owner and grant,
    /// unique names, no two scopes on one cgroup or nested cgroups, no two
    /// scopes steering one namespace.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let error = |offset: usize, reason: String| {
            let (line, column) = position(text, offset);
            ConfigError {
                path: path.to_path_buf(),
                line,
                column,
                reason,
            }
        };
        let file: File = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            error(offset, e.message().to_owned())
        })?;
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut scopes = Vec::with_capacity(file.scopes.len());
        for spanned in &file.scopes {
            let at = spanned.span().start;
            let spec = spanned.get_ref().clone();
            let name = spec.name();
            if spec.cgroup.as_os_str().is_empty() && spec.name.is_none() {
                return Err(error(
                    at,
                    "a scope without a cgroup (host-wide, or backend = \"proxy\") needs a \
                     `name`"
                        .to_owned(),
                ));
            }
            if spec.backend == Backend::Proxy {
                check_proxy_scope(&spec).map_err(|reason| error(at, reason))?;
            }
            if name.is_empty() || name.contains(['\n', '/']) && spec.name.is_some() {
                return Err(error(
                    at,
                    format!("scope name {name:?}: use a non-empty name without '/' or newlines"),
                ));
            }
            if !spec.cgroup.as_os_str().is_empty() && !spec.cgroup.is_absolute() {
                return Err(error(
                    at,
                    format!(
                        "scope {name}: cgroup {} must be an absolute path (such as \
                         /sys/fs/cgroup/unified/my.service)",
                        spec.cgroup.display()
                    ),
                ));
            }
            parse_maps(&spec.maps).map_err(|e| error(at, format!("scope {name}: {e}")))?;
            if spec.guard_cgroup.is_some() && spec.owner.is_none() {
                return Err(error(
                    at,
                    format!(
                        "scope {name}: guard_cgroup keeps the TO ports for the owner, and the \
                         scope has none: add owner = \"USER\" (or remove guard_cgroup)"
                    ),
                ));
            }
            for port in &spec.grant {
                crate::mapping::parse_grant(&port.to_string())
                    .map_err(|e| error(at, format!("scope {name}: {e}")))?;
            }
            if let Some(prev) = names.insert(name.clone(), at) {
                let (line, _) = position(text, prev);
                return Err(error(
                    at,
                    format!(
                        "scope {name} is defined twice (first on line {line}); names must be unique"
                    ),
                ));
            }
            scopes.push((at, spec));
        }
        for (i, (at, a)) in scopes.iter().enumerate() {
            for (_, b) in &scopes[..i] {
                if a.backend == Backend::Proxy || b.backend == Backend::Proxy {
                    // No cgroup; two proxies on one FROM fail to bind, with
                    // the port named, when applied.
                    continue;
                }
                if a.cgroup.starts_with(&b.cgroup) || b.cgroup.starts_with(&a.cgroup) {
                    return Err(error(
                        *at,
                        format!(
                            "scope {}: cgroup {} overlaps the cgroup {} of scope {}; scopes may \
                             not share or nest cgroups (a connection would be rewritten twice)",
                            a.name(),
                            cgroup_text(&a.cgroup),
                            cgroup_text(&b.cgroup),
                            b.name()
                        ),
                    ));
                }
                if a.netns.is_some() && a.netns == b.netns {
                    return Err(error(
                        *at,
                        format!(
                            "scope {}: network namespace {} is steered by scope {} already",
                            a.name(),
                            a.netns
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                            b.name()
                        ),
                    ));
                }
            }
        }
        Ok(Config {
            pin_dir: file.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
            control: file.control.unwrap_or_else(|| DEFAULT_CONTROL.into()),
            metrics: file.metrics,
            scopes: scopes.into_iter().map(|(_, s)| s).collect(),
        })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            reason: format!("cannot read it: {e}"),
        })?;
        Config::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("redirect.toml"))
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(
            r#"
pin_dir = "/sys/fs/bpf/redirect"
control = "/run/redirect/control.sock"
metrics = "127.0.0.1:9464"
[[scope]]
name = "web"
cgroup = "/sys/fs/cgroup/unified/system.slice/web.service"
netns = "/run/netns/web"
maps = ["443:8443", "53:5353/udp"]
owner = "www-data"
grant = [80]
"#,
        )
        .unwrap();
        assert_eq!(c.scopes.len(), 1);
        assert_eq!(c.scopes[0].name(), "web");
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()));
    }

    #[test]
    fn defaults_apply() {
        let c = parse("").unwrap();
        assert_eq!(c.pin_dir, Path::new(DEFAULT_PIN_DIR));
        assert_eq!(c.control, Path::new(DEFAULT_CONTROL));
        assert!(c.scopes.is_empty());
    }

    #[test]
    fn errors_name_their_line() {
        let e = parse("[[scope]]\ncgroup = \"/a\"\nmaps = [\"443:99999\"]\n").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        assert!(e.reason.contains("99999"), "{e}");
        let e = parse("pin_dir = \"/x\"\nbogus = 1\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = parse("[[scope]]\ncgroup = \"/a\"\n[[scope]]\ncgroup = \"/a/b\"\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.reason.contains("nest"), "{e}");
        let e = parse(
            "[[scope]]\nname = \"x\"\ncgroup = \"/a\"\n[[scope]]\nname = \"x\"\ncgroup = \"/b\"\n",
        )
        .unwrap_err();
        assert!(e.reason.contains("twice"), "{e}");
    }

    #[test]
    fn the_backend_key_is_validated() {
        let c = parse(
            "[[scope]]\nname = \"p\"\nbackend = \"proxy\"\nmaps = [\"127.0.0.1:8080:8081\"]\n\
             [[scope]]\ncgroup = \"/a\"\nbackend = \"ebpf\"\n\
             [[scope]]\ncgroup = \"/b\"\n",
        )
        .unwrap();
        let backends: Vec<Backend> = c.scopes.iter().map(|s| s.backend).collect();
        assert_eq!(backends, [Backend::Proxy, Backend::Ebpf, Backend::Auto]);
        assert!(c.scopes[0].cgroup.as_os_str().is_empty());
        // An unknown backend names its line and the choices.
        let e = parse("[[scope]]\ncgroup = \"/a\"\nbackend = \"bpf\"\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 11), "{e}");
        assert!(
            e.reason.contains("auto") && e.reason.contains("proxy"),
            "{e}"
        );
        // The proxy cannot be scoped.
        let e = parse(
            "pin_dir = \"/p\"\n[[scope]]\nname = \"p\"\nbackend = \"proxy\"\ncgroup = \"/a\"\n\
             owner = \"www-data\"\nmaps = [\"1:2\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.reason.contains("cgroup, owner"), "{e}");
        // Without a cgroup it needs a name; a host-wide eBPF scope nests
        // every other one.
        let e = parse("[[scope]]\nbackend = \"proxy\"\nmaps = [\"1:2\"]\n").unwrap_err();
        assert!(e.reason.contains("needs a `name`"), "{e}");
        let c = parse("[[scope]]\nname = \"x\"\nmaps = [\"1:2\"]\n").unwrap();
        assert!(is_host_wide(&c.scopes[0]));
        let e = parse("[[scope]]\nname = \"x\"\n[[scope]]\ncgroup = \"/a\"\n").unwrap_err();
        assert!(e.reason.contains("whole host"), "{e}");
        // Two proxy scopes do not count as overlapping cgroups.
        parse(
            "[[scope]]\nname = \"a\"\nbackend = \"proxy\"\n\
             [[scope]]\nname = \"b\"\nbackend = \"proxy\"\n",
        )
        .unwrap();
    }

    proptest::proptest! {
        /// Whatever the text, parsing never panics, and every error has a
        /// position inside the text.
        #[test]
        fn never_panics_and_errors_have_positions(text in "\\PC{0,200}") {
            if let Err(e) = parse(&text) {
                proptest::prop_assert!(e.line >= 1);
                proptest::prop_assert!(e.line <= text.lines().count().max(1) + 1);
            }
        }

        /// Configs built from arbitrary mapping strings either parse or
        /// report the scope's line.
        #[test]
        fn mapping_errors_point_at_their_scope(map in "[0-9a-z:./\\[\\]]{0,20}") {
            let text = format!("pin_dir = \"/p\"\n[[scope]]\ncgroup = \"/c\"\nmaps = [{map:?}]\n");
            if let Err(e) = parse(&text) {
                proptest::prop_assert_eq!(e.line, 2);
            }
        }
    }
}
