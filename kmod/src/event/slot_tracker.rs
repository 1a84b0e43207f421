//! Turns `KVM_SET_USER_MEMORY_REGION(2)` calls into memslot events, deciding add / delete / move
//! / flags-only from the slot's previous state exactly as KVM does (`enum kvm_mr_change`).
//! Shared by every source that sees the raw calls: the live probes and trace importers.

use alloc::collections::BTreeMap;
use core::fmt;

use crate::event::{EventKind, Memslot};

/// A call that KVM would have rejected: deleting a slot that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteOfAbsentSlot {
    pub as_id: u8,
    pub slot: u16,
}

impl fmt::Display for DeleteOfAbsentSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "slot {} of address space {} deleted but never added",
            self.slot, self.as_id
        )
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DeleteOfAbsentSlot {}

/// The slots of one VM, as the calls so far left them.
#[derive(Debug, Clone, Default)]
pub struct SlotTracker {
    slots: BTreeMap<(u8, u16), Memslot>,
}

impl SlotTracker {
    /// Splits KVM's slot number (address space in bits 16 and up) into (as_id, slot).
    pub fn split_slot_id(raw: u32) -> (u8, u16) {
        ((raw >> 16) as u8, (raw & 0xffff) as u16)
    }

    /// Applies one successful call; a `size` of 0 deletes.
    pub fn apply(&mut self, call: Memslot) -> Result<EventKind, DeleteOfAbsentSlot> {
        let key = (call.as_id, call.slot);
        Ok(match (self.slots.get(&key).copied(), call.size) {
            (None, 0) => {
                return Err(DeleteOfAbsentSlot {
                    as_id: call.as_id,
                    slot: call.slot,
                });
            }
            (Some(old), 0) => {
                self.slots.remove(&key);
                EventKind::MemslotDelete(old)
            }
            (None, _) => {
                self.slots.insert(key, call);
                EventKind::MemslotAdd(call)
            }
            (Some(old), _) if old.gpa != call.gpa || old.size != call.size || old.ua != call.ua => {
                self.slots.insert(key, call);
                EventKind::MemslotMove {
                    old_gpa: old.gpa,
                    slot: call,
                }
            }
            (Some(old), _) => {
                self.slots.insert(key, call);
                EventKind::MemslotFlags {
                    old_flags: old.flags,
                    slot: call,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(slot: u16, gpa: u64, size: u64, flags: u32) -> Memslot {
        Memslot {
            slot,
            as_id: 0,
            gpa: crate::event::Gpa(gpa),
            size,
            flags,
            ua: 0x7f00_0000_0000 + gpa,
        }
    }

    #[test]
    fn decides_like_kvm() {
        let mut t = SlotTracker::default();
        assert!(matches!(
            t.apply(call(1, 0, 0x1000, 0)),
            Ok(EventKind::MemslotAdd(_))
        ));
        assert!(matches!(
            t.apply(call(1, 0, 0x1000, 1)),
            Ok(EventKind::MemslotFlags { old_flags: 0, .. })
        ));
        assert!(matches!(
            t.apply(Memslot {
                ua: 0x7f00_0000_0000,
                ..call(1, 0x5000, 0x1000, 1)
            }),
            Ok(EventKind::MemslotMove {
                old_gpa: crate::event::Gpa(0),
                ..
            })
        ));
        // The delete reports the slot's extent, not the call's size 0.
        let Ok(EventKind::MemslotDelete(old)) = t.apply(call(1, 0x5000, 0, 0)) else {
            panic!()
        };
        assert_eq!(old.size, 0x1000);
        assert_eq!(
            t.apply(call(1, 0, 0, 0)),
            Err(DeleteOfAbsentSlot { as_id: 0, slot: 1 })
        );
        assert_eq!(SlotTracker::split_slot_id(0x1_0003), (1, 3));
    }
}
