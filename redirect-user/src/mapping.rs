//! Port mappings: parsing `FROM:TO` and validating a set of them.
//!
//! Validation happens before anything is attached, so bad input never leaves
//! a half-configured redirector behind. A set is rejected when a port is 0 or
//! out of range, when FROM equals TO, when one FROM is mapped twice, and when
//! mappings chain (`443:8443` with `8443:9443`) or loop (`443:8443` with
//! `8443:443`): a connection is redirected once, at connect time, so a chain
//! would not do what it seems to say.

use std::{fmt, str::FromStr};

use redirect_common::MAX_MAPPINGS;

/// One redirection: connections to port `from` go to port `to` instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mapping {
    /// The port clients ask for (for example 443).
    pub from: u16,
    /// The port they are sent to (for example 8443).
    pub to: u16,
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.from, self.to)
    }
}

/// Why a mapping or a set of mappings was rejected.
///
/// All of these are the user's input, never the environment: a CLI reports
/// them with exit code 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// The text is not of the form `FROM:TO`.
    #[error("invalid mapping `{input}`: expected FROM:TO, for example 443:8443")]
    Syntax {
        /// The text as given.
        input: String,
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
    /// The same FROM port appears in two mappings.
    #[error("port {} is mapped twice ({first} and {second}): give each FROM port once", .first.from)]
    DuplicateFrom {
        /// The mapping seen first.
        first: Mapping,
        /// The mapping that repeats its FROM.
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
        "mappings {first} and {second} chain: port {} is both a target and a source, but a \
         connection is redirected only once; map {} straight to its final port",
        .first.to, .first.from
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
        let (from, to) = input.split_once(':').ok_or_else(|| MappingError::Syntax {
            input: input.to_owned(),
        })?;
        let mapping = Mapping {
            from: parse_port(input, from)?,
            to: parse_port(input, to)?,
        };
        if mapping.from == mapping.to {
            return Err(MappingError::SamePort(mapping));
        }
        Ok(mapping)
    }
}

fn parse_port(input: &str, port: &str) -> Result<u16, MappingError> {
    let err = |reason| MappingError::Port {
        input: input.to_owned(),
        port: port.to_owned(),
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

/// A validated set of mappings: no duplicates, no chains, no loops.
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
            if other.from == m.from {
                return Err(MappingError::DuplicateFrom {
                    first: other,
                    second: m,
                });
            }
            if other.to == m.from && other.from == m.to {
                return Err(MappingError::Loop {
                    first: other,
                    second: m,
                });
            }
            if other.to == m.from {
                return Err(MappingError::Chain {
                    first: other,
                    second: m,
                });
            }
            if m.to == other.from {
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

    /// Removes the mapping for port `from`, returning it if there was one.
    pub fn remove(&mut self, from: u16) -> Option<Mapping> {
        let i = self.mappings.iter().position(|m| m.from == from)?;
        Some(self.mappings.remove(i))
    }

    /// The mapping for port `from`, if any.
    pub fn get(&self, from: u16) -> Option<Mapping> {
        self.mappings.iter().copied().find(|m| m.from == from)
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
    /// `443->8443, 80->8080`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.mappings.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}->{}", m.from, m.to)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(from: u16, to: u16) -> Mapping {
        Mapping { from, to }
    }

    #[test]
    fn parses_from_to() {
        assert_eq!("443:8443".parse(), Ok(m(443, 8443)));
        assert_eq!("1:65535".parse(), Ok(m(1, 65535)));
    }

    #[test]
    fn rejects_bad_syntax() {
        for input in ["", "443", "443-8443", ":", "443:", ":8443"] {
            let err = input.parse::<Mapping>().unwrap_err();
            assert!(
                matches!(err, MappingError::Syntax { .. } | MappingError::Port { .. }),
                "{input}: {err}"
            );
        }
        assert!(matches!(
            "443:8443:1".parse::<Mapping>(),
            Err(MappingError::Port { .. })
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
        assert_eq!(set.remove(443), Some(m(443, 8443)));
        assert_eq!(set.remove(443), None);
        // Once 443:8443 is gone, 8443 may become a source.
        set.insert(m(8443, 9000)).unwrap();
        assert_eq!(set.get(8443), Some(m(8443, 9000)));
    }
}
