//! The global port bitmaps (`TO_PORTS`, `FROM_PORTS`): bit `p` is set
//! while some scope has port `p` in that role, so that a program learns
//! in one array read that a port is nobody's (getpeername and recvmsg for
//! TO, sendmsg for FROM) before it reads its scope's cell.
//!
//! Kept here from the set of (scope, port) pairs present, so that a bit
//! flips only when the first scope gets the port or the last one loses it.

use std::collections::{HashMap, HashSet};

use redirect_common::TO_PORT_WORDS;

/// One bitmap's bookkeeping.
#[derive(Debug, Default)]
pub(super) struct PortBits {
    /// (scope, port) pairs present.
    keys: HashSet<(u32, u16)>,
    /// How many scopes have each port.
    refs: HashMap<u16, u32>,
    /// Ports whose bit stays set once set (see [`PortBits::stick`]).
    sticky: HashSet<u16>,
}

impl PortBits {
    /// The bookkeeping of the pairs in `keys` (read back from the maps at
    /// load: the bits are rebuilt, never trusted).
    pub(super) fn new(keys: impl IntoIterator<Item = (u32, u16)>) -> Self {
        let mut bits = PortBits::default();
        for (scope, port) in keys {
            bits.set(scope, port, true);
        }
        bits
    }

    /// Records whether `scope` has `port`; returns the word to write
    /// (index, value) when the port's bit flips.
    pub(super) fn set(&mut self, scope: u32, port: u16, present: bool) -> Option<(u32, u32)> {
        let flipped = if present {
            self.keys.insert((scope, port)) && {
                let n = self.refs.entry(port).or_default();
                *n += 1;
                *n == 1
            }
        } else {
            self.keys.remove(&(scope, port)) && {
                let n = self.refs.entry(port).or_default();
                *n = n.saturating_sub(1);
                *n == 0 && !self.sticky.contains(&port)
            }
        };
        flipped.then(|| self.word(u32::from(port >> 5)))
    }

    /// Keeps `port`'s bit set for the life of this process once it is
    /// set: recvmsg must still reach the reverse entries of a removed UDP
    /// mapping's TO to find them stale and delete them.
    pub(super) fn stick(&mut self, port: u16) {
        self.sticky.insert(port);
    }

    /// The ports `scope` has.
    pub(super) fn ports_of(&self, scope: u32) -> Vec<u16> {
        self.keys
            .iter()
            .filter(|(s, _)| *s == scope)
            .map(|(_, p)| *p)
            .collect()
    }

    /// Every word with a bit set, as (index, value).
    pub(super) fn words(&self) -> Vec<(u32, u32)> {
        let mut words = vec![0u32; TO_PORT_WORDS as usize];
        for (port, n) in &self.refs {
            if *n > 0 || self.sticky.contains(port) {
                words[usize::from(port >> 5)] |= 1 << (port & 31);
            }
        }
        words
            .into_iter()
            .enumerate()
            .filter(|(_, w)| *w != 0)
            .map(|(i, w)| (i as u32, w))
            .collect()
    }

    fn word(&self, index: u32) -> (u32, u32) {
        let bits = (0..32u16)
            .filter(|b| {
                let port = (index as u16) << 5 | b;
                self.refs.get(&port).is_some_and(|n| *n > 0) || self.sticky.contains(&port)
            })
            .fold(0u32, |w, b| w | 1 << b);
        (index, bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bit_flips_with_the_first_scope_and_the_last() {
        let mut bits = PortBits::new([]);
        assert_eq!(bits.set(1, 443, true), Some((13, 1 << (443 & 31))));
        assert_eq!(bits.set(2, 443, true), None, "a second scope");
        assert_eq!(bits.set(1, 443, false), None, "one scope left");
        assert_eq!(bits.set(2, 443, false), Some((13, 0)));
        assert_eq!(bits.set(2, 443, false), None, "already gone");
    }

    #[test]
    fn a_sticky_port_keeps_its_bit() {
        let mut bits = PortBits::new([(1, 5353)]);
        bits.stick(5353);
        assert_eq!(bits.set(1, 5353, false), None);
        assert_eq!(bits.words(), vec![(5353 >> 5, 1 << (5353 & 31))]);
        assert!(bits.ports_of(1).is_empty());
    }
}
