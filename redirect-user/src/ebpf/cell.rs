//! The scope cell: a summary of one scope's mappings that the hot paths
//! (connect, sendmsg, recvmsg, getpeername) read from the scope cgroup's
//! storage instead of walking four hash maps (see
//! [`ScopeCell`](redirect_common::ScopeCell)).
//!
//! The cell is derived: the maps stay the truth, and every slot the cell
//! cannot answer exactly is [`CELL_SLOW`], which sends the program to
//! them. Building it is pure, so it is tested here without a kernel.

use std::collections::BTreeSet;

use redirect_common::{
    CELL_FROM, CELL_SLOTS, CELL_SLOW, CELL_TO, CellSlot, FLAG_SHARED_TO, MappingValue, ScopeCell,
    cell_index,
};

use crate::Mapping;

/// A scope's cell and what keeps it exact across changes: the scope's
/// ports by slot, and the slots of retired UDP targets.
pub(super) struct CellState {
    /// The value written to the scope's cgroup storage.
    pub(super) cell: ScopeCell,
    /// The FROM and TO ports of the scope's mappings, by slot.
    ports: Vec<BTreeSet<u16>>,
    /// Slots of TO ports of removed UDP mappings.
    retired: [bool; CELL_SLOTS],
}

/// The mappings whose FROM is a port (with their table values), and those
/// whose TO is.
pub(super) type Uses = (Vec<(Mapping, MappingValue)>, Vec<Mapping>);

impl CellState {
    /// The empty cell of scope `id`.
    pub(super) fn new(id: u32) -> Self {
        CellState {
            cell: ScopeCell {
                scope: id,
                ..ScopeCell::default()
            },
            ports: vec![BTreeSet::new(); CELL_SLOTS],
            retired: [false; CELL_SLOTS],
        }
    }

    /// Recomputes the slot of `port` after the scope's uses of it
    /// changed; `uses` answers for any port of the scope. O(1) in the
    /// number of mappings, so that adding 10,000 stays linear.
    pub(super) fn update(&mut self, port: u16, uses: impl Fn(u16) -> Uses) {
        let i = cell_index(port);
        let (from, to) = uses(port);
        if from.is_empty() && to.is_empty() {
            self.ports[i].remove(&port);
        } else {
            self.ports[i].insert(port);
        }
        let mut in_slot = self.ports[i].iter();
        self.cell.slots[i] = match (in_slot.next(), in_slot.next()) {
            (None, _) if self.retired[i] => slow(),
            (None, _) => CellSlot::default(),
            (Some(&p), None) if p == port => slot_of(p, &from, &to),
            (Some(&p), None) => {
                let (from, to) = uses(p);
                slot_of(p, &from, &to)
            }
            // Two ports in one slot: the maps tell them apart.
            (Some(_), Some(_)) => slow(),
        };
    }

    /// Marks `port` as the TO of a removed UDP mapping: while nothing
    /// else uses its slot, the slot is [`CELL_SLOW`], so a late reply
    /// from it goes through the table path, which finds the old reverse
    /// entry stale and deletes it (instead of leaving it to age out of
    /// the LRU). Call [`update`](Self::update) for the port afterwards.
    pub(super) fn retire(&mut self, port: u16) {
        self.retired[cell_index(port)] = true;
    }
}

/// The slot of a port no other port of the scope shares a slot with.
fn slot_of(port: u16, from: &[(Mapping, MappingValue)], to: &[Mapping]) -> CellSlot {
    match (from, to) {
        ([(m, v)], []) if m.addr.is_none() && v.flags & FLAG_SHARED_TO == 0 => CellSlot {
            port,
            other: v.port,
            kind: CELL_FROM,
            proto: super::programs::proto_number(m.proto),
            flags: v.flags,
            slot: v.slot,
            generation: v.generation,
        },
        ([], [m]) if m.addr.is_none() => CellSlot {
            port,
            other: m.from,
            kind: CELL_TO,
            proto: super::programs::proto_number(m.proto),
            ..CellSlot::default()
        },
        _ => slow(),
    }
}

fn slow() -> CellSlot {
    CellSlot {
        kind: CELL_SLOW,
        ..CellSlot::default()
    }
}

#[cfg(test)]
mod tests {
    use redirect_common::{CELL_EMPTY, PROTO_ANY, PROTO_UDP};

    use super::*;
    use crate::Proto;

    /// The next port after `port` that shares its slot.
    fn same_slot(port: u16) -> u16 {
        (port + 1..)
            .find(|p| cell_index(*p) == cell_index(port))
            .unwrap()
    }

    #[test]
    fn the_usual_mappings_do_not_share_slots() {
        for (from, to) in [(443, 8443), (80, 8080), (53, 5353), (22, 2222), (25, 2525)] {
            assert_ne!(cell_index(from), cell_index(to), "{from}:{to}");
        }
    }

    /// The cell of scope `id` with `mappings` added one by one.
    fn build(id: u32, mappings: &[(Mapping, MappingValue)], retired: &[u16]) -> ScopeCell {
        let mut state = CellState::new(id);
        for port in retired {
            state.retire(*port);
            state.update(*port, |_| (Vec::new(), Vec::new()));
        }
        let uses = |p: u16| -> Uses {
            (
                mappings
                    .iter()
                    .filter(|(m, _)| m.from == p)
                    .copied()
                    .collect(),
                mappings
                    .iter()
                    .filter(|(m, _)| m.to == p)
                    .map(|(m, _)| *m)
                    .collect(),
            )
        };
        for (m, _) in mappings {
            state.update(m.from, uses);
            state.update(m.to, uses);
        }
        state.cell
    }

    fn value(to: u16, slot: u32) -> MappingValue {
        MappingValue {
            port: to,
            flags: 0,
            slot,
            generation: 7,
        }
    }

    #[test]
    fn a_plain_mapping_fills_its_from_and_its_to_slot() {
        let m = Mapping::new(443, 8443);
        let cell = build(3, &[(m, value(8443, 5))], &[]);
        assert_eq!(cell.scope, 3);
        let from = cell.slot(443);
        assert_eq!(
            (from.kind, from.port, from.other, from.proto, from.slot),
            (CELL_FROM, 443, 8443, PROTO_ANY, 5)
        );
        let to = cell.slot(8443);
        assert_eq!((to.kind, to.port, to.other), (CELL_TO, 8443, 443));
        // Any other port is either in an empty slot or in one whose port
        // differs: both mean "not the scope's".
        assert_eq!(cell.slot(80).kind, CELL_EMPTY);
        assert_ne!(cell.slot(same_slot(443)).port, same_slot(443));
    }

    #[test]
    fn every_case_the_cell_cannot_answer_exactly_is_slow() {
        let addr = Mapping {
            addr: Some("127.0.0.1".parse().unwrap()),
            ..Mapping::new(80, 8080)
        };
        // Two FROMs in one slot.
        let a = Mapping::new(1000, 9000);
        let b = Mapping::new(same_slot(1000), 9001);
        // A chain: 2050 is a TO and a FROM.
        let c = Mapping::new(3000, 2050);
        let d = Mapping::new(2050, 2051);
        let mut shared = value(5000, 1);
        shared.flags = FLAG_SHARED_TO;
        let e = Mapping::new(4000, 5000);
        let f = Mapping::new(4001, 5000);
        let list = [
            (addr, value(8080, 0)),
            (a, value(9000, 2)),
            (b, value(9001, 3)),
            (c, value(2050, 4)),
            (d, value(2051, 5)),
            (e, shared),
            (f, shared),
        ];
        let cell = build(1, &list, &[]);
        for port in [80, 8080, 1000, 2050, 4000, 4001, 5000] {
            assert_eq!(cell.slot(port).kind, CELL_SLOW, "port {port}");
        }
        // The chain's ends are plain.
        assert_eq!(cell.slot(3000).kind, CELL_FROM);
        assert_eq!(cell.slot(2051).kind, CELL_TO);
    }

    #[test]
    fn a_retired_udp_target_stays_slow_until_its_slot_is_needed() {
        let cell = build(1, &[], &[5353]);
        assert_eq!(cell.slot(5353).kind, CELL_SLOW);
        let m = Mapping {
            proto: Proto::Udp,
            ..Mapping::new(5353, 53)
        };
        let cell = build(1, &[(m, value(53, 0))], &[5353]);
        let slot = cell.slot(5353);
        assert_eq!((slot.kind, slot.proto), (CELL_FROM, PROTO_UDP));
    }
}
