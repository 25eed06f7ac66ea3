//! Port mappings: parsing and validating a set of them.
//!
//! Syntax, backward compatible with plain `FROM:TO`:
//!
//! | text | meaning |
//! |---|---|
//! | `443:8443` | TCP and UDP to any address, port 443 → 8443 |
//! | `443:8443/tcp`, `53:5353/udp` | only that protocol |
//! | `127.0.0.1:443:8443` | only connections to 127.0.0.1 (the address stays, the port changes) |
//! | `[::1]:443:8443/tcp` | an IPv6 address, in brackets |
//!
//! Validation happens before anything is attached, so bad input never leaves
//! a half-configured redirector behind. A set is rejected when a port is 0 or
//! out of range, when FROM equals TO, when two mappings overlap (same FROM
//! port, a protocol and an address in common: `443:8443` and
//! `127.0.0.1:443:9443/tcp` overlap), and when mappings chain (`443:8443`
//! with `8443:9443`) or loop (`443:8443` with `8443:443`): a connection is
//! redirected once, at connect time, so a chain would not do what it seems
//! to say. Because overlaps are rejected, at most one mapping ever matches a
//! connection, and which one does not depend on lookup order.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use redirect_common::MAX_MAPPINGS;

use crate::error::clip;

/// The protocols a mapping applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP and UDP (no suffix).
    #[default]
    Any,
    /// `/tcp`.
    Tcp,
    /// `/udp`.
    Udp,
}

impl Proto {
    /// "any", "tcp" or "udp".
    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// Whether some protocol is covered by both.
    pub fn overlaps(self, other: Proto) -> bool {
        self == Proto::Any || other == Proto::Any || self == other
    }
}

/// One redirection: connections to port `from` (at `addr`, over `proto`) go
/// to port `to` instead, at the same address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mapping {
    /// The destination address this mapping is limited to; `None` matches
    /// every address. IPv4-mapped IPv6 addresses are stored as IPv4.
    pub addr: Option<IpAddr>,
    /// The port clients ask for (for example 443).
    pub from: u16,
    /// The port they are sent to (for example 8443).
    pub to: u16,
    /// The protocols it applies to.
    pub proto: Proto,
}

impl Mapping {
    /// An unscoped mapping: any address, TCP and UDP.
    pub const fn new(from: u16, to: u16) -> Self {
        Mapping {
            addr: None,
            from,
            to,
            proto: Proto::Any,
        }
    }

    /// Limits the mapping to `proto`.
    pub const fn with_proto(mut self, proto: Proto) -> Self {
        self.proto = proto;
        self
    }

    /// Limits the mapping to destination address `addr`.
    pub fn with_addr(mut self, addr: IpAddr) -> Self {
        self.addr = Some(canonical(addr));
        self
    }

    /// Whether both apply to the same source: same address, port and
    /// protocol scope (what [`MappingSet::remove`] matches on).
    pub fn same_source(&self, other: &Mapping) -> bool {
        self.addr == other.addr && self.from == other.from && self.proto == other.proto
    }

    fn addr_overlaps(&self, other: &Mapping) -> bool {
        match (self.addr, other.addr) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }

    /// Whether some connection would match both.
    fn overlaps(&self, other: &Mapping) -> bool {
        self.from == other.from && self.proto.overlaps(other.proto) && self.addr_overlaps(other)
    }

    /// Whether some connection redirected by `self` would then match `next`.
    fn feeds(&self, next: &Mapping) -> bool {
        self.to == next.from && self.proto.overlaps(next.proto) && self.addr_overlaps(next)
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

impl Mapping {
    /// Writes the mapping with `sep` between FROM and TO.
    fn write(&self, f: &mut fmt::Formatter<'_>, sep: &str) -> fmt::Result {
        match self.addr {
            Some(IpAddr::V4(a)) => write!(f, "{a}:")?,
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:")?,
            None => {}
        }
        write!(f, "{}{sep}{}", self.from, self.to)?;
        match self.proto {
            Proto::Any => Ok(()),
            p => write!(f, "/{}", p.as_str()),
        }
    }
}

impl fmt::Display for Mapping {
    /// The syntax it parses from: `[::1]:443:8443/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, ":")
    }
}

/// Why a mapping or a set of mappings was rejected.
///
/// All of these are the user's input, never the environment: a CLI reports
/// them with exit code 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// The text is not of the form `[ADDR:]FROM:TO[/tcp|/udp]`.
    #[error(
        "invalid mapping `{input}`: {reason}; expected FROM:TO, optionally with /tcp or /udp \
         and an address (127.0.0.1:443:8443, [::1]:443:8443)"
    )]
    Syntax {
        /// The text as given (clipped to [`QUOTE_MAX`](crate::error::QUOTE_MAX)
        /// characters).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A port is not a number between 1 and 65535.
    #[error("invalid port `{port}` in mapping `{input}`: {reason}")]
    Port {
        /// The whole mapping as given.
        input: String,
        /// The offending port text.
        port: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// FROM and TO are the same port.
    #[error("mapping {0} sends port {port} to itself: FROM and TO must differ", port = .0.from)]
    SamePort(Mapping),
    /// Two mappings match some of the same connections.
    #[error(
        "port {port} is mapped twice ({first} and {second} overlap): give each FROM port one \
         mapping per protocol and address",
        port = .first.from
    )]
    DuplicateFrom {
        /// The mapping seen first.
        first: Mapping,
        /// The mapping that overlaps it.
        second: Mapping,
    },
    /// Two mappings form a loop (`443:8443` and `8443:443`).
    #[error(
        "mappings {first} and {second} form a loop: a connection is redirected only once, \
         so remove one of them"
    )]
    Loop {
        /// One mapping of the loop.
        first: Mapping,
        /// The mapping leading back to `first.from`.
        second: Mapping,
    },
    /// The target of one mapping is the source of another (`443:8443` and
    /// `8443:9443`).
    #[error(
        "mappings {first} and {second} chain: port {to} is both a target and a source, but a \
         connection is redirected only once; map {from} straight to its final port",
        to = .first.to, from = .first.from
    )]
    Chain {
        /// The mapping whose target is `second.from`.
        first: Mapping,
        /// The mapping that starts where `first` ends.
        second: Mapping,
    },
    /// No mapping was given.
    #[error("no mapping given: pass at least one --map FROM:TO, for example --map 443:8443")]
    Empty,
    /// A `--grant` port is not a privileged port number.
    #[error("invalid port `{input}` for --grant: {reason}")]
    Grant {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `--user` or `--owner` names no user.
    #[error("unknown user `{name}` for {option}: no such user (see /etc/passwd)")]
    UnknownUser {
        /// The name or uid given (clipped).
        name: String,
        /// The option that named it: `--user`, `--owner`.
        option: &'static str,
    },
    /// `--grant` without a scope would grant the port to every process on
    /// the host.
    #[error(
        "--grant needs --cgroup: granting a port to the whole host is what \
         net.ipv4.ip_unprivileged_port_start does; name the cgroup that may bind it"
    )]
    GrantWithoutScope,
    /// More mappings than the table holds.
    #[error("{count} mappings given but at most {max} are supported")]
    TooMany {
        /// How many were given.
        count: usize,
        /// The limit, [`MAX_MAPPINGS`].
        max: u32,
    },
}

impl FromStr for Mapping {
    type Err = MappingError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let syntax = |reason| MappingError::Syntax {
            input: clip(input),
            reason,
        };
        let (rest, proto) = match input.rsplit_once('/') {
            Some((rest, "tcp")) => (rest, Proto::Tcp),
            Some((rest, "udp")) => (rest, Proto::Udp),
            Some(_) => return Err(syntax("the protocol suffix must be /tcp or /udp")),
            None => (input, Proto::Any),
        };
        let (addr, ports) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, ports) = v6.split_once("]:").ok_or_else(|| {
                syntax("an IPv6 address in brackets must be followed by :FROM:TO")
            })?;
            let addr: Ipv6Addr = addr
                .parse()
                .map_err(|_| syntax("the address in brackets is not an IPv6 address"))?;
            (Some(IpAddr::V6(addr)), ports)
        } else {
            match rest.matches(':').count() {
                0 => return Err(syntax("missing `:` between FROM and TO")),
                1 => (None, rest),
                2 => {
                    let (addr, ports) = rest.split_once(':').expect("two colons");
                    let addr: Ipv4Addr = addr
                        .parse()
                        .map_err(|_| syntax("the address is not an IPv4 address"))?;
                    (Some(IpAddr::V4(addr)), ports)
                }
                _ => {
                    return Err(syntax(
                        "IPv6 addresses go in brackets, as in [::1]:443:8443",
                    ));
                }
            }
        };
        let (from, to) = ports
            .split_once(':')
            .ok_or_else(|| syntax("missing `:` between FROM and TO"))?;
        let mut mapping =
            Mapping::new(parse_port(input, from)?, parse_port(input, to)?).with_proto(proto);
        if let Some(addr) = addr {
            mapping = mapping.with_addr(addr);
        }
        if mapping.from == mapping.to {
            return Err(MappingError::SamePort(mapping));
        }
        Ok(mapping)
    }
}

fn parse_port(input: &str, port: &str) -> Result<u16, MappingError> {
    let err = |reason| MappingError::Port {
        input: clip(input),
        port: clip(port),
        reason,
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("not a number"));
    }
    match port.parse::<u32>() {
        Ok(0) => Err(err("port 0 cannot be connected to; use 1 to 65535")),
        Ok(p) => u16::try_from(p).map_err(|_| err("above 65535")),
        // Only digits, so the one failure left is overflow.
        Err(_) => Err(err("above 65535")),
    }
}

/// Parses a `--grant` port: a number from 1 to 1023 (ports from 1024 up
/// need no grant).
pub fn parse_grant(input: &str) -> Result<u16, MappingError> {
    let err = |reason| MappingError::Grant {
        input: clip(input),
        reason,
    };
    if input.is_empty() || !input.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("not a number"));
    }
    match input.parse::<u32>() {
        Ok(0) => Err(err("port 0 cannot be granted; use 1 to 1023")),
        Ok(p) if p < 1024 => Ok(p as u16),
        Ok(p) if p <= 65535 => Err(err("ports from 1024 up can be bound without a grant")),
        _ => Err(err("above 65535")),
    }
}

/// A validated set of mappings: no overlaps, no chains, no loops.
///
/// Order is kept as given, which is the order the CLI reports them in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MappingSet {
    mappings: Vec<Mapping>,
}

impl MappingSet {
    /// Validates `mappings` as a whole; an empty set is an error.
    pub fn new(mappings: impl IntoIterator<Item = Mapping>) -> Result<Self, MappingError> {
        let mut set = MappingSet::default();
        for m in mappings {
            set.insert(m)?;
        }
        if set.mappings.is_empty() {
            return Err(MappingError::Empty);
        }
        Ok(set)
    }

    /// Parses and validates mappings given as text (`["443:8443", …]`).
    pub fn parse<S: AsRef<str>>(texts: impl IntoIterator<Item = S>) -> Result<Self, MappingError> {
        let parsed = texts
            .into_iter()
            .map(|t| t.as_ref().parse())
            .collect::<Result<Vec<Mapping>, _>>()?;
        Self::new(parsed)
    }

    /// Adds `m` if it keeps the set valid; the set is unchanged on error.
    pub fn insert(&mut self, m: Mapping) -> Result<(), MappingError> {
        if m.from == m.to {
            return Err(MappingError::SamePort(m));
        }
        for &other in &self.mappings {
            if other.overlaps(&m) {
                return Err(MappingError::DuplicateFrom {
                    first: other,
                    second: m,
                });
            }
            if other.feeds(&m) && m.feeds(&other) {
                return Err(MappingError::Loop {
                    first: other,
                    second: m,
                });
            }
            if other.feeds(&m) {
                return Err(MappingError::Chain {
                    first: other,
                    second: m,
                });
            }
            if m.feeds(&other) {
                return Err(MappingError::Chain {
                    first: m,
                    second: other,
                });
            }
        }
        if self.mappings.len() >= MAX_MAPPINGS as usize {
            return Err(MappingError::TooMany {
                count: self.mappings.len() + 1,
                max: MAX_MAPPINGS,
            });
        }
        self.mappings.push(m);
        Ok(())
    }

    /// Removes the mapping with the same source as `m` (address, FROM port
    /// and protocol; TO is ignored), returning it if there was one.
    pub fn remove(&mut self, m: &Mapping) -> Option<Mapping> {
        let i = self.mappings.iter().position(|x| x.same_source(m))?;
        Some(self.mappings.remove(i))
    }

    /// The mapping with the same source as `m`, if any.
    pub fn get(&self, m: &Mapping) -> Option<Mapping> {
        self.mappings.iter().copied().find(|x| x.same_source(m))
    }

    /// The mappings, in the order they were added.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Mapping> + '_ {
        self.mappings.iter().copied()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.mappings.len()
    }

    /// Whether the set holds no mapping (only after removals).
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }
}

impl fmt::Display for MappingSet {
    /// `443->8443, 53->5353/udp, 127.0.0.1:80->8080`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.mappings.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            m.write(f, "->")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(from: u16, to: u16) -> Mapping {
        Mapping::new(from, to)
    }

    #[test]
    fn parses_from_to() {
        assert_eq!("443:8443".parse(), Ok(m(443, 8443)));
        assert_eq!("1:65535".parse(), Ok(m(1, 65535)));
    }

    #[test]
    fn rejects_bad_syntax() {
        for input in [
            "",
            "443",
            "443-8443",
            ":",
            "443:",
            ":8443",
            "443:8443/sctp",
            "[::1:443:8443",
            "::1:443:8443",
            "1.2.3:443:8443",
        ] {
            let err = input.parse::<Mapping>().unwrap_err();
            assert!(
                matches!(err, MappingError::Syntax { .. } | MappingError::Port { .. }),
                "{input}: {err}"
            );
        }
        assert!(matches!(
            "443:8443:1".parse::<Mapping>(),
            Err(MappingError::Syntax { .. })
        ));
    }

    #[test]
    fn rejects_non_numbers() {
        for input in [
            "https:8443",
            "443:x",
            "+443:8443",
            "-1:8443",
            "44 3:8443",
            "0x1bb:8443",
        ] {
            let err = input.parse::<Mapping>().unwrap_err();
            assert!(
                matches!(
                    err,
                    MappingError::Port {
                        reason: "not a number",
                        ..
                    }
                ),
                "{input}: {err}"
            );
        }
    }

    #[test]
    fn rejects_out_of_range() {
        let err = "0:8443".parse::<Mapping>().unwrap_err();
        assert!(err.to_string().contains("port 0"), "{err}");
        let err = "443:65536".parse::<Mapping>().unwrap_err();
        assert!(err.to_string().contains("above 65535"), "{err}");
        let err = "443:99999999999999999999".parse::<Mapping>().unwrap_err();
        assert!(err.to_string().contains("above 65535"), "{err}");
    }

    #[test]
    fn rejects_same_port() {
        assert_eq!(
            "443:443".parse::<Mapping>(),
            Err(MappingError::SamePort(m(443, 443)))
        );
    }

    #[test]
    fn rejects_duplicate_from() {
        assert_eq!(
            MappingSet::new([m(443, 8443), m(443, 9443)]),
            Err(MappingError::DuplicateFrom {
                first: m(443, 8443),
                second: m(443, 9443)
            })
        );
        // Same mapping twice is still a duplicate.
        assert!(MappingSet::parse(["443:8443", "443:8443"]).is_err());
    }

    #[test]
    fn rejects_loops_and_chains() {
        assert_eq!(
            MappingSet::new([m(443, 8443), m(8443, 443)]),
            Err(MappingError::Loop {
                first: m(443, 8443),
                second: m(8443, 443)
            })
        );
        assert_eq!(
            MappingSet::new([m(443, 8443), m(8443, 9443)]),
            Err(MappingError::Chain {
                first: m(443, 8443),
                second: m(8443, 9443)
            })
        );
        // The order given does not matter.
        assert_eq!(
            MappingSet::new([m(8443, 9443), m(443, 8443)]),
            Err(MappingError::Chain {
                first: m(443, 8443),
                second: m(8443, 9443)
            })
        );
    }

    #[test]
    fn accepts_independent_mappings_and_shared_targets() {
        let set = MappingSet::parse(["443:8443", "80:8080", "8080:8081"]);
        assert!(set.is_err(), "80:8080 then 8080:8081 chains");
        let set = MappingSet::parse(["443:8443", "80:8080", "53:5353"]).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.to_string(), "443->8443, 80->8080, 53->5353");
        // Two sources may share one target.
        assert!(MappingSet::parse(["443:8443", "444:8443"]).is_ok());
    }

    #[test]
    fn empty_set_is_an_error() {
        assert_eq!(
            MappingSet::parse(Vec::<String>::new()),
            Err(MappingError::Empty)
        );
    }

    #[test]
    fn insert_and_remove_keep_the_set_valid() {
        let mut set = MappingSet::parse(["443:8443"]).unwrap();
        assert!(set.insert(m(8443, 9000)).is_err());
        assert_eq!(set.len(), 1, "a rejected insert changes nothing");
        set.insert(m(80, 8080)).unwrap();
        assert_eq!(set.remove(&m(443, 0)), Some(m(443, 8443)));
        assert_eq!(set.remove(&m(443, 0)), None);
        // Once 443:8443 is gone, 8443 may become a source.
        set.insert(m(8443, 9000)).unwrap();
        assert_eq!(set.get(&m(8443, 0)), Some(m(8443, 9000)));
    }

    #[test]
    fn grants_are_privileged_ports() {
        assert_eq!(parse_grant("443"), Ok(443));
        assert_eq!(parse_grant("1"), Ok(1));
        assert_eq!(parse_grant("1023"), Ok(1023));
        for (input, reason) in [
            ("0", "port 0"),
            ("1024", "without a grant"),
            ("8443", "without a grant"),
            ("70000", "above 65535"),
            ("https", "not a number"),
            ("", "not a number"),
        ] {
            let err = parse_grant(input).unwrap_err().to_string();
            assert!(err.contains(reason), "{input}: {err}");
        }
    }

    #[test]
    fn parses_protocol_and_address_scopes() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(
            "443:8443/tcp".parse(),
            Ok(m(443, 8443).with_proto(Proto::Tcp))
        );
        assert_eq!(
            "53:5353/udp".parse(),
            Ok(m(53, 5353).with_proto(Proto::Udp))
        );
        assert_eq!("127.0.0.1:443:8443".parse(), Ok(m(443, 8443).with_addr(v4)));
        assert_eq!(
            "[::1]:443:8443/tcp".parse(),
            Ok(m(443, 8443).with_addr(v6).with_proto(Proto::Tcp))
        );
        // A v4-mapped address is the IPv4 address.
        assert_eq!(
            "[::ffff:127.0.0.1]:443:8443".parse(),
            Ok(m(443, 8443).with_addr(v4))
        );
    }

    #[test]
    fn displays_as_parsed() {
        for text in [
            "443:8443",
            "53:5353/udp",
            "127.0.0.1:443:8443/tcp",
            "[::1]:443:44",
        ] {
            assert_eq!(text.parse::<Mapping>().unwrap().to_string(), text);
        }
        let set = MappingSet::parse(["127.0.0.1:443:44", "[::1]:80:8080/tcp"]).unwrap();
        assert_eq!(set.to_string(), "127.0.0.1:443->44, [::1]:80->8080/tcp");
    }

    #[test]
    fn disjoint_scopes_may_share_a_port() {
        assert!(MappingSet::parse(["443:8443/tcp", "443:9443/udp"]).is_ok());
        assert!(MappingSet::parse(["127.0.0.1:443:8443", "127.0.0.2:443:9443"]).is_ok());
        assert!(MappingSet::parse(["127.0.0.1:443:8443/tcp", "[::1]:443:8443/udp"]).is_ok());
    }

    #[test]
    fn scoped_and_unscoped_mappings_conflict_when_they_overlap() {
        for pair in [
            ["443:8443", "443:9443/tcp"],
            ["443:8443", "127.0.0.1:443:9443"],
            ["127.0.0.1:443:8443/udp", "443:9443/udp"],
            ["[::ffff:127.0.0.1]:443:8443", "127.0.0.1:443:9443"],
        ] {
            let err = MappingSet::parse(pair).unwrap_err();
            assert!(
                matches!(err, MappingError::DuplicateFrom { .. }),
                "{pair:?}: {err}"
            );
            assert!(err.to_string().contains("mapped twice"), "{err}");
        }
        // Chains and loops across scopes, when some traffic would follow them.
        assert!(matches!(
            MappingSet::parse(["127.0.0.1:443:8443", "8443:9443/tcp"]),
            Err(MappingError::Chain { .. })
        ));
        assert!(matches!(
            MappingSet::parse(["443:8443/tcp", "8443:443/tcp"]),
            Err(MappingError::Loop { .. })
        ));
        // No traffic follows these: a UDP redirect never meets a TCP mapping.
        assert!(MappingSet::parse(["443:8443/udp", "8443:9443/tcp"]).is_ok());
        assert!(MappingSet::parse(["127.0.0.1:443:8443", "127.0.0.2:8443:9443"]).is_ok());
    }

    #[test]
    fn remove_matches_the_whole_source() {
        let mut set = MappingSet::parse(["443:8443/tcp", "443:9443/udp"]).unwrap();
        assert_eq!(set.remove(&m(443, 0)), None, "scope must match");
        assert_eq!(
            set.remove(&m(443, 0).with_proto(Proto::Udp)),
            Some(m(443, 9443).with_proto(Proto::Udp))
        );
        assert_eq!(set.len(), 1);
    }
}
